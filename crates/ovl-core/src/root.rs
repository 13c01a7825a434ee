//! A layer's root directory as a stack holds it: open for the stack's life ([`LayerRoot::held`]),
//! or, for the thousands of frozen layers a snapshot store can have, open only while used
//! ([`LayerRoot::lazy`]): reopened on demand from its parent directory, within a budget of open
//! roots shared by every lazy root of a [`RootPool`] (issue 17: a daemon used to hold one
//! descriptor per layer, so a store stopped at the open-file limit).
//!
//! A lazy root is reopened by name in a parent directory held open (never by an absolute path,
//! which may lead through the mount being served), and only accepted when it is the same
//! directory as when the root was made (device and inode number); otherwise `ESTALE`. Its
//! device and filesystem UUID are kept, so building a stack opens nothing.
//!
//! Over the budget the pool closes the roots unused longest (a clock: a root used since the pool
//! last passed it over gets a second chance). A root in use stays open until its user drops it,
//! so the descriptors open at once are the budget plus those requests in flight hold.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::{Errno, Result, sys};

/// One layer root: held, or reopened on demand (see the module).
#[derive(Debug, Clone)]
pub struct LayerRoot(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    dev: u64,
    ino: u64,
    uuid: [u8; 16],
    how: How,
    /// The root's own `overlay.opaque` state, once read while the layer was frozen.
    frozen_opaque: std::sync::OnceLock<crate::Opaque>,
}

#[derive(Debug)]
enum How {
    Held(Arc<OwnedFd>),
    Lazy(Lazy),
}

#[derive(Debug)]
struct Lazy {
    parent: Arc<OwnedFd>,
    name: CString,
    /// The open root, while the pool keeps it.
    slot: Mutex<Option<Arc<OwnedFd>>>,
    /// Used since the pool last passed it over.
    used: AtomicBool,
    pool: Arc<RootPool>,
}

impl LayerRoot {
    /// A root held open for as long as this (and its clones) live.
    pub fn held(fd: Arc<OwnedFd>) -> Result<Self> {
        let st = rustix::fs::fstat(&fd)?;
        let uuid = sys::fs_uuid(&fd);
        let frozen_opaque = Default::default();
        Ok(Self(Arc::new(Inner { dev: st.st_dev, ino: st.st_ino, uuid, how: How::Held(fd), frozen_opaque })))
    }

    /// The root `name` in `parent`, open now as `fd`: kept open while `pool`'s budget allows,
    /// and reopened from `parent` when used after the pool closed it.
    pub fn lazy(pool: &Arc<RootPool>, parent: Arc<OwnedFd>, name: &str, fd: OwnedFd) -> Result<Self> {
        let st = rustix::fs::fstat(&fd)?;
        let uuid = sys::fs_uuid(&fd);
        let name = CString::new(name).map_err(|_| Errno::INVAL)?;
        let lazy = Lazy {
            parent,
            name,
            slot: Mutex::new(Some(Arc::new(fd))),
            used: AtomicBool::new(true),
            pool: pool.clone(),
        };
        let frozen_opaque = Default::default();
        let root = Self(Arc::new(Inner { dev: st.st_dev, ino: st.st_ino, uuid, how: How::Lazy(lazy), frozen_opaque }));
        pool.admit(&root.0);
        Ok(root)
    }

    /// The root `name` in `parent`, not opened until first used (a mount of a store of 10,000
    /// snapshots opened every layer root once for nothing but its numbers): its device and inode
    /// number from `statat` (a directory, a symlink not followed) and `uuid`, the parent's
    /// filesystem's, which must be the root's own (`None` when the root is on another device:
    /// then it is opened as [`LayerRoot::lazy`] does, for its own).
    pub fn lazy_unopened(
        pool: &Arc<RootPool>,
        parent: Arc<OwnedFd>,
        name: &str,
        parent_fs: (u64, [u8; 16]),
    ) -> Result<Option<Self>> {
        let name = CString::new(name).map_err(|_| Errno::INVAL)?;
        let st = rustix::fs::statat(&*parent, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
            return Err(Errno::NOTDIR.into());
        }
        if st.st_dev != parent_fs.0 {
            return Ok(None);
        }
        let lazy = Lazy { parent, name, slot: Mutex::new(None), used: AtomicBool::new(false), pool: pool.clone() };
        let frozen_opaque = Default::default();
        let inner = Inner { dev: st.st_dev, ino: st.st_ino, uuid: parent_fs.1, how: How::Lazy(lazy), frozen_opaque };
        Ok(Some(Self(Arc::new(inner))))
    }

    /// The open root directory (opened again if the pool closed it).
    pub fn get(&self) -> Result<Arc<OwnedFd>> {
        let lazy = match &self.0.how {
            How::Held(fd) => return Ok(fd.clone()),
            How::Lazy(l) => l,
        };
        lazy.used.store(true, Ordering::Relaxed);
        if let Some(fd) = lazy.slot.lock().as_ref() {
            return Ok(fd.clone());
        }
        let fd = rustix::fs::openat(
            &*lazy.parent,
            &lazy.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if (st.st_dev, st.st_ino) != (self.0.dev, self.0.ino) {
            tracing::warn!(name = ?lazy.name, "a layer's directory was replaced while in use");
            return Err(Errno::STALE.into());
        }
        let fd = Arc::new(fd);
        {
            let mut slot = lazy.slot.lock();
            match slot.as_ref() {
                // Another thread opened it meanwhile: one descriptor kept.
                Some(other) => return Ok(other.clone()),
                None => *slot = Some(fd.clone()),
            }
        }
        lazy.pool.admit(&self.0);
        Ok(fd)
    }

    /// The root's own opaque state (`read` reads it), read once: only for a frozen layer, whose
    /// root nothing changes while this root lives (a snapshot store gives a merged layer a root
    /// of its own).
    pub fn frozen_opaque(&self, read: impl FnOnce() -> Result<crate::Opaque>) -> Result<crate::Opaque> {
        if let Some(o) = self.0.frozen_opaque.get() {
            return Ok(*o);
        }
        let o = read()?;
        let _ = self.0.frozen_opaque.set(o);
        Ok(o)
    }

    /// The root's device.
    pub fn dev(&self) -> u64 {
        self.0.dev
    }

    /// The root's inode number.
    pub fn ino(&self) -> u64 {
        self.0.ino
    }

    /// The UUID of the root's filesystem (zeros if it has none).
    pub fn uuid(&self) -> [u8; 16] {
        self.0.uuid
    }

    /// Whether the root stays open for the life of this value (a held root), so holding on to
    /// [`LayerRoot::get`]'s descriptor costs no descriptor of its own.
    pub fn is_held(&self) -> bool {
        matches!(self.0.how, How::Held(_))
    }
}

impl TryFrom<Arc<OwnedFd>> for LayerRoot {
    type Error = crate::Error;
    fn try_from(fd: Arc<OwnedFd>) -> Result<Self> {
        Self::held(fd)
    }
}

/// The budget of open lazy roots, and the order they were opened in.
#[derive(Debug)]
pub struct RootPool {
    budget: usize,
    open: AtomicUsize,
    order: Mutex<VecDeque<Weak<Inner>>>,
}

impl RootPool {
    /// At most `budget` (at least 1) lazy roots kept open at once.
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self { budget: budget.max(1), open: AtomicUsize::new(0), order: Mutex::default() })
    }

    /// How many roots the pool keeps open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Closes every root the pool keeps open (a request using one keeps its descriptor until it
    /// is done); they open again when next used. Returns how many were closed. For a caller
    /// that needs descriptors free now (a take under a low open-file limit).
    pub fn shed(&self) -> usize {
        let order: Vec<Weak<Inner>> = self.order.lock().drain(..).collect();
        let mut closed = 0;
        for inner in order.iter().filter_map(Weak::upgrade) {
            if let How::Lazy(l) = &inner.how {
                if l.slot.lock().take().is_some() {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Counts `root`, just opened, and closes others over the budget. Takes slot locks with the
    /// order lock held; [`LayerRoot::get`] never takes the order lock with its slot held.
    fn admit(&self, root: &Arc<Inner>) {
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut order = self.order.lock();
        order.push_back(Arc::downgrade(root));
        // Each root is passed over at most twice (once to clear its mark): bounded.
        let mut turns = order.len() * 2;
        while self.open() > self.budget && turns > 0 {
            turns -= 1;
            let Some(victim) = order.pop_front() else { break };
            // (A dropped root uncounted itself.)
            let Some(inner) = victim.upgrade() else { continue };
            let How::Lazy(l) = &inner.how else { continue };
            if Arc::ptr_eq(&inner, root) || l.used.swap(false, Ordering::Relaxed) {
                order.push_back(victim);
                continue;
            }
            if l.slot.lock().take().is_some() {
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Dropped and closed roots leave entries behind.
        if order.len() > 4 * self.budget.max(64) {
            order.retain(|w| w.upgrade().is_some_and(|i| matches!(&i.how, How::Lazy(l) if l.slot.lock().is_some())));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Its entry in the pool's order is left to be skipped.
        if let How::Lazy(l) = &self.how {
            if l.slot.lock().take().is_some() {
                l.pool.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_dir(parent: &OwnedFd, name: &str) -> OwnedFd {
        rustix::fs::openat(parent, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap()
    }

    #[test]
    fn a_pool_keeps_its_budget_and_reopens_the_same_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = Arc::new(rustix::fs::open(tmp.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap());
        let pool = RootPool::new(3);
        let mut roots = Vec::new();
        for i in 0..20 {
            let name = format!("{i}");
            std::fs::create_dir(tmp.path().join(&name)).unwrap();
            std::fs::write(tmp.path().join(&name).join("mark"), &name).unwrap();
            roots.push(LayerRoot::lazy(&pool, parent.clone(), &name, open_dir(&parent, &name)).unwrap());
            assert!(pool.open() <= 3, "{} roots open after making {}", pool.open(), i + 1);
        }
        for _ in 0..3 {
            for (i, r) in roots.iter().enumerate() {
                let fd = r.get().unwrap();
                let mark = crate::sys::read_dir(&*fd, std::path::Path::new("")).unwrap();
                assert_eq!(mark.len(), 1, "root {i}");
                let st = rustix::fs::fstat(&fd).unwrap();
                assert_eq!((st.st_dev, st.st_ino), (r.dev(), r.ino()), "root {i} is its own dir again");
                assert!(pool.open() <= 3);
            }
        }
        // Roots made without opening them open on first use, within the budget, as themselves.
        let fs = (rustix::fs::fstat(&*parent).unwrap().st_dev, crate::sys::fs_uuid(&*parent));
        let unopened: Vec<LayerRoot> = (0..20)
            .map(|i| LayerRoot::lazy_unopened(&pool, parent.clone(), &i.to_string(), fs).unwrap().unwrap())
            .collect();
        for (i, r) in unopened.iter().enumerate() {
            assert_eq!((r.dev(), r.ino(), r.uuid()), (roots[i].dev(), roots[i].ino(), roots[i].uuid()), "root {i}");
            let st = rustix::fs::fstat(&*r.get().unwrap()).unwrap();
            assert_eq!((st.st_dev, st.st_ino), (r.dev(), r.ino()));
            assert!(pool.open() <= 3);
        }
        // Shed: every kept root closed (a descriptor in use stays open), each opens again.
        let in_use = unopened[19].get().unwrap();
        assert!(pool.open() > 0);
        assert_eq!(pool.shed(), 3);
        assert_eq!(pool.open(), 0, "roots kept open after a shed");
        assert!(rustix::fs::fstat(&*in_use).is_ok(), "a root in use was closed under its user");
        assert_eq!(rustix::fs::fstat(&*unopened[0].get().unwrap()).unwrap().st_ino, unopened[0].ino());
        assert_eq!(pool.open(), 1);
        drop(in_use);
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        assert_eq!(LayerRoot::lazy_unopened(&pool, parent.clone(), "file", fs).unwrap_err().errno(), Errno::NOTDIR);
        std::os::unix::fs::symlink("0", tmp.path().join("link")).unwrap();
        assert_eq!(LayerRoot::lazy_unopened(&pool, parent.clone(), "link", fs).unwrap_err().errno(), Errno::NOTDIR);
        drop(unopened);
        // A root whose dir was replaced is refused, not followed.
        let victim = roots.iter().position(|r| matches!(&r.0.how, How::Lazy(l) if l.slot.lock().is_none())).unwrap();
        std::fs::rename(tmp.path().join(victim.to_string()), tmp.path().join("gone")).unwrap();
        std::fs::create_dir(tmp.path().join(victim.to_string())).unwrap();
        assert_eq!(roots[victim].get().unwrap_err().errno(), Errno::STALE);
        drop(roots);
        assert_eq!(pool.open(), 0, "dropped roots are uncounted");
    }
}
