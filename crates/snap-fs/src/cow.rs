//! The copy-on-write rules (DESIGN.md §4): before a change reaches LIVE, the state it destroys
//! is saved into the newest snapshot's layer `u_N`, so that the read-only overlay
//! `u_N : LIVE` keeps showing the tree as it was when snapshot N was taken.
//!
//! `u_N` is an overlay upper layer over LIVE, but "inverted": LIVE keeps changing and `u_N`
//! records the difference. Paths in `u_N` are *snapshot paths* (where an object was at take
//! time); an object's LIVE path differs once it or a parent was renamed. Renamed directories
//! get an absolute `overlay.redirect` to their current LIVE path, kept up to date as LIVE
//! changes; this module keeps those redirects in a table (snapshot path → LIVE path) to map
//! a LIVE path back to its snapshot path.
//!
//! Saving: a modified object is copied (clone on XFS/btrfs); a removed non-directory with one
//! link is hard-linked into `u_N` (no copy: the LIVE name goes away right after); a new name
//! gets a whiteout; a removed directory becomes an opaque copy; a renamed directory becomes a
//! metadata copy with a redirect. A snapshot path that the layer already decides (an entry, a
//! whiteout, an opaque parent) needs nothing: only the first change after a take costs.
//!
//! Hard links (issue 16.4): a non-directory with several links is saved under every name the
//! snapshot shows it by at once, as one copy and links to it, whatever the change (write,
//! chmod, unlink, rename of one name, or `link`, which the live overlay reports as a change of
//! the file), so a view shows all its names as one inode with the link count of take time.
//! A saved directory keeps its take-time times: an entry made in it (whiteout, link) puts them
//! back.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_copyup::Source;

use crate::layerwalk::{State, Walk, layer_walk, rel};
use crate::precopy::{Ahead, Precopies};
use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result, is_whiteout_stat};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use serde::{Deserialize, Serialize};

/// LIVE in the copy-up stack.
pub(crate) const LIVE: LayerId = LayerId(1);

/// The CoW target: the newest snapshot's layer.
#[derive(Debug)]
pub(crate) struct Cow {
    /// Upper = `u_N`, its work dir = the store's, lower = LIVE (shared with copies made ahead).
    stack: Arc<LayerStack>,
    /// Copies made ahead of the rules, taken by the rule that saves their file.
    pre: Arc<Precopies>,
    /// Renamed directories of `u_N`: (snapshot path, LIVE path it redirects to).
    redirects: Vec<(PathBuf, PathBuf)>,
    /// LIVE root names that are not part of any snapshot (the store).
    hidden: Vec<OsString>,
    /// The store dir, where a rename in progress is recorded.
    journal: OwnedFd,
    /// The redirect changes of the rename in progress, to undo if it does not happen.
    pending: Option<Pending>,
    /// `u_N`'s root and LIVE's, held open while this is the CoW target.
    roots: (Arc<OwnedFd>, Arc<OwnedFd>),
}

/// A directory rename whose redirects are already written while LIVE may not have moved yet:
/// kept in `JOURNAL` until the rename is known to have happened, so that a rename that fails,
/// or a daemon killed in between, leaves the redirects matching LIVE.
/// Paths in it are written as [`crate::names`] says (bytes when not UTF-8).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Pending {
    /// The moved object's inode and where the rename puts it.
    pub moved: u64,
    #[serde(with = "crate::names::json_path")]
    pub to: PathBuf,
    /// Each changed redirect: snapshot path and its previous target (`None`: it had none).
    #[serde(with = "undo_json")]
    pub undo: Vec<(PathBuf, Option<PathBuf>)>,
}

/// `Pending::undo` in JSON: each path in the form of [`crate::names::json_path`].
mod undo_json {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::names::JsonPath;

    type Undo = Vec<(PathBuf, Option<PathBuf>)>;

    pub fn serialize<S: Serializer>(undo: &Undo, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(undo.iter().map(|(p, t)| (JsonPath(p.clone()), t.clone().map(JsonPath))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Undo, D::Error> {
        let v = Vec::<(JsonPath, Option<JsonPath>)>::deserialize(d)?;
        Ok(v.into_iter().map(|(p, t)| (p.0, t.map(|t| t.0))).collect())
    }
}

/// The journal file in the store.
pub(crate) const JOURNAL: &str = "rename-in-progress.json";

/// The rename journal of the store dir `journal`, if there is one: the pending rename, or why
/// it does not parse (the next open then drops it).
pub(crate) fn read_journal(journal: BorrowedFd<'_>) -> Result<Option<std::result::Result<Pending, serde_json::Error>>> {
    let fd = match rustix::fs::openat(journal, JOURNAL, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = std::io::read_to_string(std::fs::File::from(fd)).map_err(ovl_core::Error::from)?;
    Ok(Some(serde_json::from_str::<Pending>(&text)))
}

/// Whether the rename `p` happened: LIVE (`live`) shows the moved inode at its new path. If not,
/// its redirects are put back.
pub(crate) fn rename_happened(live: BorrowedFd<'_>, p: &Pending) -> bool {
    sys::lstat_beneath(live, &p.to).is_ok_and(|st| st.st_ino == p.moved)
}

fn split(p: &Path) -> Result<(&Path, &OsStr)> {
    Ok((p.parent().unwrap_or(Path::new("")), p.file_name().ok_or(Errno::INVAL)?))
}

impl Cow {
    /// The CoW target `layer` (open) over LIVE (`live`, open), with the work dir `work`, read and
    /// written with the store's overlay options `opts` (its xattr namespace).
    pub fn new(
        layer: (PathBuf, Arc<OwnedFd>),
        work: OwnedFd,
        live: (PathBuf, Arc<OwnedFd>),
        hidden: Vec<OsString>,
        journal: OwnedFd,
        opts: ovl_core::MountOptions,
        pre: Arc<Precopies>,
    ) -> Result<Self> {
        let roots = (layer.1.clone(), live.1.clone());
        let live = (live.0, ovl_core::LayerRoot::held(live.1)?);
        let upper = (layer.0, ovl_core::LayerRoot::held(layer.1)?, work);
        let stack = Arc::new(LayerStack::from_open_dirs(vec![live], Some(upper), opts)?);
        let mut cow = Self { stack, pre, redirects: Vec::new(), hidden, journal, pending: None, roots };
        cow.redirects = cow.scan_redirects()?;
        if let Some(journal) = read_journal(cow.journal.as_fd())? {
            match journal {
                Ok(p) => {
                    tracing::info!(to = ?p.to, "settling a directory rename interrupted by a stop");
                    cow.pending = Some(p);
                    cow.finish()?;
                }
                Err(e) => {
                    tracing::warn!("ignoring an unreadable {JOURNAL}: {e}");
                    let _ = rustix::fs::unlinkat(&cow.journal, JOURNAL, AtFlags::empty());
                }
            }
        }
        Ok(cow)
    }

    /// Ends the change in progress: a rename that did not happen gets its redirects back.
    pub fn finish(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else { return Ok(()) };
        let happened = rename_happened(self.live(), &p);
        if !happened {
            let key = self.stack.names().redirect.clone();
            for (s, old) in p.undo.iter().rev() {
                let Ok(fd) = sys::open_dir_path(self.upper(), s) else { continue };
                self.redirects.retain(|(rs, _)| rs != s);
                match old {
                    Some(t) => {
                        sys::set_xattr(&fd, None, &key, &redirect_value(t), 0)?;
                        self.redirects.push((s.clone(), t.clone()));
                    }
                    None => match sys::remove_xattr(&fd, None, &key) {
                        Ok(()) => {}
                        Err(e) if e.errno() == Errno::NODATA => {}
                        Err(e) => return Err(e),
                    },
                }
            }
        }
        match rustix::fs::unlinkat(&self.journal, JOURNAL, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records `p` in the journal before its redirects are written.
    fn begin(&mut self, p: Pending) -> Result<()> {
        use std::io::Write;
        // Before the file exists: a journal that cannot be written must leave none behind.
        let text = serde_json::to_vec(&p).map_err(|_| Errno::INVAL)?;
        let fd = rustix::fs::openat(
            &self.journal,
            JOURNAL,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        std::fs::File::from(fd).write_all(&text).map_err(ovl_core::Error::from)?;
        self.pending = Some(p);
        Ok(())
    }

    fn upper(&self) -> std::os::fd::BorrowedFd<'_> {
        self.roots.0.as_fd()
    }

    fn live(&self) -> std::os::fd::BorrowedFd<'_> {
        self.roots.1.as_fd()
    }

    /// The redirects already in `u_N` (after a remount).
    fn scan_redirects(&self) -> Result<Vec<(PathBuf, PathBuf)>> {
        let mut out = Vec::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(dir) = todo.pop() {
            for e in sys::read_dir(self.upper(), &dir)? {
                if e.file_type != FileType::Directory {
                    continue;
                }
                let p = dir.join(&e.name);
                let fd = sys::open_dir_path(self.upper(), &p)?;
                if let Some(v) = sys::get_xattr(&fd, None, &self.stack.names().redirect)? {
                    if let Some(abs) = v.strip_prefix(b"/") {
                        out.push((p.clone(), PathBuf::from(OsStr::from_bytes(abs))));
                    }
                }
                todo.push(p);
            }
        }
        Ok(out)
    }

    fn lstat_upper(&self, s: &Path) -> Result<Option<Stat>> {
        match sys::lstat_beneath(self.upper(), s) {
            Ok(st) => Ok(Some(st)),
            Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn lstat_live(&self, p: &Path) -> Result<Stat> {
        sys::lstat_beneath(self.live(), p)
    }

    /// Resolves snapshot path `s` in `u_N` (see [`layer_walk`]).
    fn walk(&self, s: &Path) -> Result<Walk> {
        layer_walk(self.upper(), self.stack.names(), s)
    }

    /// The snapshot path of the object now at LIVE path `p`, if the snapshot shows it there
    /// (through LIVE, or as a shared link saved before a removal that then failed).
    fn snap_path(&self, p: &Path) -> Result<Option<(PathBuf, Walk)>> {
        if rel(p).next().is_some_and(|first| self.hidden.iter().any(|h| h == first)) {
            return Ok(None);
        }
        let mut cands: Vec<(usize, PathBuf)> = self
            .redirects
            .iter()
            .filter_map(|(s, t)| p.strip_prefix(t).ok().map(|rest| (t.as_os_str().len(), s.join(rest))))
            .collect();
        cands.sort_by_key(|c| std::cmp::Reverse(c.0));
        cands.push((0, p.to_path_buf()));
        for (_, s) in cands {
            let w = self.walk(&s)?;
            let shows_live = matches!(w.state, State::Absent | State::Dir { opaque: false } | State::File(..));
            if shows_live && w.lower == p {
                return Ok(Some((s, w)));
            }
        }
        Ok(None)
    }

    /// Makes every parent of snapshot path `s` exist in `u_N`, copying LIVE's dirs (metadata
    /// only: their entries keep showing through).
    fn ensure_parents(&self, s: &Path) -> Result<()> {
        let mut cur = PathBuf::new();
        let comps: Vec<&OsStr> = rel(s).collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            let parent = cur.clone();
            cur.push(c);
            if self.lstat_upper(&cur)?.is_some() {
                continue;
            }
            let w = self.walk(&cur)?;
            if w.state != State::Absent {
                return Err(ovl_core::Error::corrupt(format!("snapshot path {cur:?} is not a directory in the layer")));
            }
            ovl_copyup::copy_up(&self.stack, &Source { layer: LIVE, path: w.lower }, &parent, &|_| {})?;
        }
        Ok(())
    }

    /// The stack copies are made with: `u_N` over LIVE.
    pub fn stack(&self) -> Arc<LayerStack> {
        self.stack.clone()
    }

    /// Whether the file at LIVE `p` (`st`, about to change) has its state saved by nothing in
    /// `u_N` yet, so that its first change will copy it.
    pub fn needs_copy(&self, p: &Path, st: &Stat) -> Result<bool> {
        let Some((_, w)) = self.snap_path(p)? else { return Ok(false) };
        Ok(match w.state {
            State::Absent => true,
            State::File(dev, ino) => (dev, ino) == (st.st_dev, st.st_ino),
            _ => false,
        })
    }

    /// Copies LIVE `p` to snapshot path `s` (whose parents exist); a directory without entries.
    /// A copy of the file made ahead (`pre`) is used instead when there is one.
    fn copy(&self, p: &Path, s: &Path, pre: &mut Option<Ahead>) -> Result<()> {
        let (sparent, sname) = split(s)?;
        match pre.as_mut().and_then(|a| a.copy.take()) {
            Some(c) => ovl_copyup::place_copy(&self.stack, c, sparent, sname, false)?,
            None => ovl_copyup::copy_up(&self.stack, &Source { layer: LIVE, path: p.to_path_buf() }, sparent, &|_| {})?,
        };
        Ok(())
    }

    /// Replaces `u_N`'s `s`, a link of the LIVE file `p`, by a copy of it (from `pre` if made ahead).
    fn copy_replacing(&self, p: &Path, s: &Path, pre: &mut Option<Ahead>) -> Result<()> {
        let (sparent, sname) = split(s)?;
        match pre.as_mut().and_then(|a| a.copy.take()) {
            Some(c) => ovl_copyup::place_copy(&self.stack, c, sparent, sname, true)?,
            None => {
                ovl_copyup::copy_up_replacing(&self.stack, &Source { layer: LIVE, path: p.to_path_buf() }, sparent)?
            }
        };
        Ok(())
    }

    /// What was made ahead for the LIVE file `st`, about to change (see `crate::precopy`): every
    /// rule run for a file takes its slot, so that nothing made before this change is used after
    /// it.
    fn precopied(&self, st: &Stat) -> Option<Ahead> {
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return None;
        }
        self.pre.take(st)
    }

    /// True when `u_N`'s saved file `(dev, ino)` is the very inode at LIVE `p` (a hard link made
    /// for a removal that did not happen).
    fn shares_inode(&self, saved: (u64, u64), p: &Path) -> Result<bool> {
        let st = self.lstat_live(p)?;
        Ok((st.st_dev, st.st_ino) == saved)
    }

    /// Runs `f`, which adds or removes an entry of `u_N`'s directory `dir`, and puts back the
    /// directory's times: a saved directory shows its take-time times in the views (the kernel
    /// shows the top layer's).
    fn keep_times<T>(&self, dir: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.lstat_upper(dir)?;
        let out = f()?;
        if let Some(st) = before {
            let times = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
                last_modification: rustix::fs::Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
            };
            sys::set_times(sys::open_dir_path(self.upper(), dir)?.as_fd(), &times)?;
        }
        Ok(out)
    }

    /// Hard-links `u_N`'s `from` to `to` (whose parent exists), keeping the parent's times.
    fn link_in_layer(&self, from: &Path, to: &Path) -> Result<()> {
        let (fdir, fname) = sys::open_parent(self.upper(), from)?;
        let (tparent, _) = split(to)?;
        self.keep_times(tparent, || {
            let (qdir, qname) = sys::open_parent(self.upper(), to)?;
            Ok(rustix::fs::linkat(&fdir, &fname, &qdir, &qname, AtFlags::empty())?)
        })
    }

    /// Object at LIVE `p` is about to change. Returns the LIVE inodes whose old state was copied.
    pub fn before_modify(&self, p: &Path) -> Result<Vec<u64>> {
        let st = self.lstat_live(p)?;
        let mut pre = self.precopied(&st);
        if is_linked(&st) {
            // Every name of the file may show it in the snapshot, not only the one used now.
            return self.save_all_names(&st, &mut pre);
        }
        let Some((s, w)) = self.snap_path(p)? else { return Ok(Vec::new()) };
        match w.state {
            State::Absent => {
                self.ensure_parents(&s)?;
                self.copy(p, &s, &mut pre)?;
                Ok(vec![st.st_ino])
            }
            State::File(dev, ino) if self.shares_inode((dev, ino), p)? => {
                self.copy_replacing(p, &s, &mut pre)?;
                Ok(vec![st.st_ino])
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Saves a file with several LIVE names (`st`) under each name the snapshot shows it by: one
    /// copy, and links to it for the other names.
    fn save_all_names(&self, st: &Stat, pre: &mut Option<Ahead>) -> Result<Vec<u64>> {
        let mut first: Option<PathBuf> = None;
        let found = pre.as_mut().and_then(|a| a.names.take()).filter(|n| self.all_names(st, n));
        let names = match found {
            Some(n) => n,
            None => live_names(self.live(), &self.hidden, st)?,
        };
        for q in names {
            let Some((s, w)) = self.snap_path(&q)? else { continue };
            match w.state {
                State::Absent => {
                    self.ensure_parents(&s)?;
                    match &first {
                        None => {
                            self.copy(&q, &s, pre)?;
                            first = Some(s);
                        }
                        Some(f) => self.link_in_layer(f, &s)?,
                    }
                }
                State::File(dev, ino) if (dev, ino) == (st.st_dev, st.st_ino) => self.copy_replacing(&q, &s, pre)?,
                _ => {}
            }
        }
        Ok(vec![st.st_ino])
    }

    /// Whether `names`, found ahead, are still every LIVE name of the file `st`: as many as it
    /// has links, each still naming it.
    fn all_names(&self, st: &Stat, names: &[PathBuf]) -> bool {
        let distinct: std::collections::HashSet<&PathBuf> = names.iter().collect();
        distinct.len() == names.len()
            && names.len() as u64 == st.st_nlink
            && names.iter().all(|q| self.lstat_live(q).is_ok_and(|s2| (s2.st_dev, s2.st_ino) == (st.st_dev, st.st_ino)))
    }

    /// A new object is about to appear at LIVE `p`.
    pub fn before_create(&self, p: &Path) -> Result<()> {
        let (parent, name) = split(p)?;
        let Some((sp, wp)) = self.snap_path(parent)? else { return Ok(()) };
        if !matches!(wp.state, State::Dir { opaque: false } | State::Absent) {
            return Ok(());
        }
        let s = sp.join(name);
        if self.walk(&s)?.state != State::Absent {
            return Ok(());
        }
        self.ensure_parents(&s)?;
        let (sparent, sname) = split(&s)?;
        self.keep_times(sparent, || ovl_copyup::whiteout(&self.stack, sparent, &sys::name_cstr(sname)?))
    }

    /// The name LIVE `p` is gone. A whiteout at its snapshot path in `u_N` (made by
    /// [`Cow::before_create`] for a name the snapshot did not have) hid only LIVE's `p`, which
    /// no longer exists: it hides nothing now, in any view, and goes, with its dir's times kept,
    /// so that temp files renamed into place or removed leave no orphan whiteouts (issue 21: a
    /// restore left one per file, editors and package managers one per save).
    pub fn drop_orphan_whiteout(&self, p: &Path) -> Result<()> {
        let (parent, name) = split(p)?;
        let Some((sp, _)) = self.snap_path(parent)? else { return Ok(()) };
        let s = sp.join(name);
        if self.walk(&s)?.state != State::Whiteout {
            return Ok(());
        }
        match self.lstat_live(p) {
            Err(e) if e.errno() == ovl_core::Errno::NOENT => {}
            _ => return Ok(()),
        }
        let (sparent, sname) = split(&s)?;
        self.keep_times(sparent, || {
            let dir = sys::open_dir_path(self.upper(), sparent)?;
            Ok(rustix::fs::unlinkat(&dir, &sys::name_cstr(sname)?, AtFlags::empty())?)
        })
    }

    /// The object at LIVE `p` is about to be removed (a dir: it is empty). Returns the LIVE
    /// inodes whose state was copied (a file with other names, which stays in LIVE).
    pub fn before_remove(&mut self, p: &Path) -> Result<Vec<u64>> {
        let st = self.lstat_live(p)?;
        let mut pre = self.precopied(&st);
        if is_linked(&st) {
            // Its other names lose a link: all of them are saved as one object.
            return self.save_all_names(&st, &mut pre);
        }
        let Some((s, w)) = self.snap_path(p)? else { return Ok(Vec::new()) };
        match w.state {
            State::Absent => {
                self.ensure_parents(&s)?;
                let ft = FileType::from_raw_mode(st.st_mode);
                if ft == FileType::Directory {
                    self.copy(p, &s, &mut None)?;
                    ovl_copyup::set_opaque(&self.stack, &s)?;
                } else {
                    let (ldir, lname) = sys::open_parent(self.live(), p)?;
                    self.keep_times(split(&s)?.0, || {
                        let (udir, uname) = sys::open_parent(self.upper(), &s)?;
                        Ok(rustix::fs::linkat(&ldir, &lname, &udir, &uname, AtFlags::empty())?)
                    })?;
                }
            }
            State::Dir { opaque: false } => {
                // LIVE's dir is empty, so everything the snapshot had in it is saved here;
                // whiteouts would only hide LIVE entries, and none are left.
                let fd = sys::open_dir_path(self.upper(), &s)?;
                self.keep_times(&s, || {
                    for e in sys::read_dir(self.upper(), &s)? {
                        let n = sys::name_cstr(&e.name)?;
                        if e.file_type == FileType::CharacterDevice && is_whiteout_stat(&sys::lstat_at(&fd, &n)?) {
                            rustix::fs::unlinkat(&fd, &n, AtFlags::empty())?;
                        }
                    }
                    Ok(())
                })?;
                ovl_copyup::set_opaque(&self.stack, &s)?;
                self.drop_redirect(&s);
            }
            _ => {}
        }
        Ok(Vec::new())
    }

    /// `p1` is about to move to `p2` (swapping with it when `exchange`); a replaced target was
    /// already passed to [`Cow::before_remove`]. Returns the LIVE inodes whose state was copied.
    pub fn before_rename(&mut self, p1: &Path, p2: &Path, exchange: bool) -> Result<Vec<u64>> {
        self.finish()?;
        let moved = self.lstat_live(p1)?;
        let moved_ino = moved.st_ino;
        let s1 = self.snap_path(p1)?;
        let s2 = if exchange { self.snap_path(p2)? } else { None };
        // A file the snapshot does not show needs no copy, but a copy made ahead of it must not
        // outlive this change (`save_moving` takes it for the others).
        if s1.is_none() {
            self.precopied(&moved);
        }
        if exchange && s2.is_none() {
            self.precopied(&self.lstat_live(p2)?);
        }
        if !exchange {
            self.before_create(p2)?;
        }
        let mut copied = Vec::new();
        let mut new_redirects = Vec::new();
        for (from, to, saved) in [(p1, p2, s1), (p2, p1, s2)] {
            if let Some((s, w)) = saved {
                let (c, r) = self.save_moving(from, to, &s, w)?;
                copied.extend(c);
                new_redirects.extend(r);
            }
        }
        // Redirects into the moved subtrees follow them (both ways for an exchange).
        let mut changes: Vec<(PathBuf, PathBuf)> = Vec::new();
        for (s, t) in &self.redirects {
            if new_redirects.iter().any(|(ns, _)| ns == s) {
                continue;
            }
            let moved = match (t.strip_prefix(p1), exchange) {
                (Ok(rest), _) => Some(p2.join(rest)),
                (Err(_), true) => t.strip_prefix(p2).ok().map(|rest| p1.join(rest)),
                (Err(_), false) => None,
            };
            if let Some(nt) = moved {
                changes.push((s.clone(), nt));
            }
        }
        changes.extend(new_redirects);
        if changes.is_empty() {
            return Ok(copied);
        }
        let undo = changes
            .iter()
            .map(|(s, _)| (s.clone(), self.redirects.iter().find(|(rs, _)| rs == s).map(|(_, t)| t.clone())))
            .collect();
        self.begin(Pending { moved: moved_ino, to: p2.to_path_buf(), undo })?;
        let key = self.stack.names().redirect.clone();
        for (s, t) in changes {
            let fd = sys::open_dir_path(self.upper(), &s)?;
            sys::set_xattr(&fd, None, &key, &redirect_value(&t), 0)?;
            self.redirects.retain(|(rs, _)| *rs != s);
            self.redirects.push((s, t));
        }
        Ok(copied)
    }

    /// Saves the object moving away from LIVE `from` (to `to`), at snapshot path `s`. Returns
    /// the LIVE inodes copied and the redirect the saved dir needs (set by the caller).
    #[allow(clippy::type_complexity)]
    fn save_moving(&self, from: &Path, to: &Path, s: &Path, w: Walk) -> Result<(Vec<u64>, Option<(PathBuf, PathBuf)>)> {
        let st = self.lstat_live(from)?;
        let mut pre = self.precopied(&st);
        if is_linked(&st) {
            // The other names stay: the snapshot's names are saved as one object.
            return Ok((self.save_all_names(&st, &mut pre)?, None));
        }
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        let redirect = Some((s.to_path_buf(), to.to_path_buf()));
        match w.state {
            State::Absent => {
                self.ensure_parents(s)?;
                self.copy(from, s, &mut pre)?;
                if is_dir { Ok((Vec::new(), redirect)) } else { Ok((vec![st.st_ino], None)) }
            }
            State::Dir { opaque: false } if is_dir => Ok((Vec::new(), redirect)),
            State::File(dev, ino) if self.shares_inode((dev, ino), from)? => {
                self.copy_replacing(from, s, &mut pre)?;
                Ok((vec![st.st_ino], None))
            }
            _ => Ok((Vec::new(), None)),
        }
    }

    /// Forgets redirects of dirs that became opaque (their LIVE side is gone).
    fn drop_redirect(&mut self, s: &Path) {
        self.redirects.retain(|(rs, _)| rs != s);
    }
}

/// A non-directory with more than one link: its names are saved together.
fn is_linked(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) != FileType::Directory && st.st_nlink > 1
}

/// The `overlay.redirect` value for LIVE path `p`: absolute from the overlay root.
fn redirect_value(p: &Path) -> Vec<u8> {
    let mut v = b"/".to_vec();
    v.extend_from_slice(p.as_os_str().as_bytes());
    v
}

/// Every path in LIVE (`live`, skipping the root names `hidden`) of the inode `st`: a walk of
/// LIVE, only for files with several links.
pub(crate) fn live_names(live: BorrowedFd<'_>, hidden: &[OsString], st: &Stat) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        for e in sys::read_dir(live, &dir)? {
            if dir.as_os_str().is_empty() && hidden.contains(&e.name) {
                continue;
            }
            let p = dir.join(&e.name);
            match e.file_type {
                FileType::Directory => todo.push(p),
                FileType::Unknown => {
                    let s2 = sys::lstat_beneath(live, &p)?;
                    match FileType::from_raw_mode(s2.st_mode) {
                        FileType::Directory => todo.push(p),
                        _ if s2.st_ino == st.st_ino => out.push(p),
                        _ => {}
                    }
                }
                // Any non-directory: hard-linked symlinks and special files count too.
                _ if e.ino == st.st_ino => out.push(p),
                _ => {}
            }
        }
    }
    Ok(out)
}
