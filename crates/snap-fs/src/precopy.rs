//! Copies made ahead of the CoW rules (issue 16.6). The first change of a file after a take must
//! save its old content into the newest layer first, and copying gigabytes takes seconds. Made
//! inside the change gate, with the views and the CoW target locked, that copy would stop every
//! other change, every view and every take for as long. So the live overlay asks first
//! ([`ovl_fs::hook::ChangeHook::prepare`], before the gate): the file is then copied into the
//! store's work dir as an unnamed file, holding no lock but its slot here, and the CoW rule inside
//! the gate only links the finished copy in place.
//!
//! Why a copy made outside the gate is the state to save. A slot is opened under the CoW target's
//! lock, after checking that the file still needs saving, and every CoW rule run for an inode
//! (any change of it: data, attributes, link, unlink, rename) takes the inode's slot out under the
//! same lock, using a finished copy or dropping one still in progress. A file that needs saving
//! changes only after such a rule ran for it (the live overlay tells the hook of each node's first
//! change in every generation, and a take waits for the changes in flight), so a copy still in its
//! slot was made from the file as it is. A take in between changes nothing to that: the file is
//! then as the new snapshot must save it. As a second guard the copy's source is compared with the
//! file (inode, size, times) before use.
//!
//! Writers of the same file wait for the copy in progress, before the gate; nobody else waits.
//!
//! A file with several links is saved under every name the snapshot shows it by, and finding its
//! names walks LIVE: that walk is made ahead too, and used only if it is still complete (as many
//! names as links, each still that file).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ovl_copyup::PreparedCopy;
use ovl_core::Result;
use parking_lot::{Condvar, Mutex};
use rustix::fs::Stat;

/// A finished copy nobody took for this long is dropped at the next claim (its change failed
/// before reaching the CoW rules).
const STALE: Duration = Duration::from_secs(60);

/// The copies made ahead, by LIVE inode.
#[derive(Debug, Default)]
pub(crate) struct Precopies {
    slots: Mutex<HashMap<(u64, u64), Arc<Slot>>>,
}

/// One inode's copy.
#[derive(Debug)]
pub(crate) struct Slot {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug)]
enum State {
    Copying,
    Ready(Box<Ahead>, Instant),
    /// Taken, dropped, or failed.
    Gone,
}

/// What was made ahead for one file.
#[derive(Debug)]
pub(crate) struct Ahead {
    /// The file's `lstat` before anything was read.
    pub source: Stat,
    /// A copy of its data and metadata (regular files with data).
    pub copy: Option<PreparedCopy>,
    /// Its LIVE names (files with several links).
    pub names: Option<Vec<PathBuf>>,
}

/// What a caller of [`Precopies::claim`] does next.
pub(crate) enum Claim {
    /// Another caller copies the file: wait for it ([`Slot::wait`]).
    Wait(Arc<Slot>),
    /// Copy the file and [`Slot::fill`] the slot.
    Copy(Arc<Slot>),
    /// Nothing to save.
    Skip,
}

impl Precopies {
    /// Claims the copy of the LIVE file `st`, under the CoW target's lock; `needed` says whether
    /// the newest snapshot still lacks the file's state.
    pub fn claim(&self, st: &Stat, needed: impl FnOnce() -> Result<bool>) -> Result<Claim> {
        let mut slots = self.slots.lock();
        let key = (st.st_dev, st.st_ino);
        if let Some(s) = slots.get(&key) {
            if !s.gone() {
                return Ok(Claim::Wait(s.clone()));
            }
        }
        if !needed()? {
            return Ok(Claim::Skip);
        }
        slots.retain(|_, s| !s.stale());
        let slot = Arc::new(Slot { state: Mutex::new(State::Copying), done: Condvar::new() });
        slots.insert(key, slot.clone());
        Ok(Claim::Copy(slot))
    }

    /// Takes out the slot of the LIVE file `st`, about to change, under the CoW target's lock:
    /// what was made ahead when it shows the file as `st` is, else nothing (a copy in progress
    /// is dropped when it ends).
    pub fn take(&self, st: &Stat) -> Option<Ahead> {
        let slot = self.slots.lock().remove(&(st.st_dev, st.st_ino))?;
        let mut state = slot.state.lock();
        match std::mem::replace(&mut *state, State::Gone) {
            State::Ready(ahead, _) if same_file(&ahead.source, st) => Some(*ahead),
            State::Ready(..) => {
                tracing::warn!(ino = st.st_ino, "a copy made ahead no longer matches its file; copying again");
                None
            }
            State::Copying | State::Gone => None,
        }
    }
}

impl Slot {
    /// Waits until the copy in progress ended.
    pub fn wait(&self) {
        let mut state = self.state.lock();
        while matches!(*state, State::Copying) {
            self.done.wait(&mut state);
        }
    }

    /// Ends the copy with its result; a copy whose slot was taken meanwhile is dropped.
    pub fn fill(&self, ahead: Result<Ahead>) {
        let mut state = self.state.lock();
        if matches!(*state, State::Copying) {
            *state = match ahead {
                Ok(c) => State::Ready(Box::new(c), Instant::now()),
                Err(e) => {
                    tracing::debug!("copy ahead failed ({e}); the change copies inside the gate");
                    State::Gone
                }
            };
        }
        self.done.notify_all();
    }

    fn gone(&self) -> bool {
        matches!(*self.state.lock(), State::Gone)
    }

    fn stale(&self) -> bool {
        match &*self.state.lock() {
            State::Ready(_, made) => made.elapsed() > STALE,
            State::Gone => true,
            State::Copying => false,
        }
    }
}

/// Whether `now` is the file the copy was made of, unchanged: same inode, size, data and change
/// times (a change the slots missed would have moved the ctime).
fn same_file(then: &Stat, now: &Stat) -> bool {
    (then.st_dev, then.st_ino, then.st_size, then.st_mtime, then.st_mtime_nsec, then.st_ctime, then.st_ctime_nsec)
        == (now.st_dev, now.st_ino, now.st_size, now.st_mtime, now.st_mtime_nsec, now.st_ctime, now.st_ctime_nsec)
}
