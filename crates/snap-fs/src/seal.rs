//! The seal: what LIVE showed the snapshots when it was last guarded, so that a mount can tell
//! whether LIVE changed while no daemon served it (issue 16.2: at boot before the mount, after a
//! crash, after an umount). A write that bypasses the daemon is saved into no snapshot, so every
//! view that shows LIVE's object at that path would silently show the new data.
//!
//! Which objects matter: a view of snapshot k is `u_k:...:u_N:LIVE`, and `u_N` lies directly on
//! LIVE in every view, so the LIVE objects any view shows are those the newest view `u_N:LIVE`
//! shows from LIVE, at the same paths. While the daemon serves, such an object never changes:
//! the CoW rules save it into `u_N` first, after which it is hidden from every view. So the seal
//! is one walk of the newest view recording, for each object LIVE provides, its path, inode, data
//! times and size, mode and owner ([`Mark::holds`] says why not ctime), made at mount and after
//! every take; it stays true while the mount is served, through a crash too. At the next mount the same walk finds
//! what LIVE changed behind our back, and [`affected`] which snapshots show it.
//!
//! A seal made before the newest take or delete (a stop before the background seal ended)
//! describes another view than the newest, whose paths may lead to other LIVE objects (a
//! directory renamed in between) and which may show changes made legitimately before the take: a
//! difference is then reported as unverified (with the paths, readable), never as changed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ovl_core::{LayerId, LayerStack, sys};
use ovl_lookup::DirLayers;
use rustix::fs::{FileType, Mode, OFlags};

/// The seal's file in the store.
pub(crate) const SEAL: &str = "seal";

const HEADER: &str = "ovlsnap-seal 2";

/// What LIVE provided at one path of the newest view: inode, times, size, mode, owner, links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    ino: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: i64,
    mode: u32,
    owner: (u32, u32),
    nlink: u64,
}

impl Mark {
    /// Whether `now` is the object this mark recorded, unchanged: same inode, data (mtime, size),
    /// mode and owner. Not the change time, though it tells any change: the daemon itself
    /// touches it on inodes it never changes for a view (a name saved into a layer by a hard
    /// link, a merge that links and unlinks), and a false alarm would fail good files. So what
    /// goes unseen while unserved is a change of xattrs or link count alone, or a write that puts
    /// the old mtime back (SECURITY.md says so).
    fn holds(&self, now: &Mark) -> bool {
        self.ino == now.ino
            && self.mtime == now.mtime
            && self.size == now.size
            && self.mode == now.mode
            && self.owner == now.owner
    }
}

/// The LIVE objects of the newest view when it was sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seal {
    /// The newest snapshot's id then.
    pub newest: u64,
    /// View path (bytes; the root is empty) → mark.
    pub marks: BTreeMap<Vec<u8>, Mark>,
}

fn mark_of(st: &rustix::fs::Stat) -> Mark {
    Mark {
        ino: st.st_ino,
        ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        mtime: (st.st_mtime, st.st_mtime_nsec as i64),
        size: st.st_size,
        mode: st.st_mode,
        owner: (st.st_uid, st.st_gid),
        nlink: st.st_nlink,
    }
}

/// Walks the newest view `stack` (its last layer is LIVE) and records every object LIVE provides;
/// `hidden` are LIVE root names that belong to no view (the store).
pub(crate) fn record(stack: &LayerStack, hidden: &[OsString]) -> ovl_core::Result<BTreeMap<Vec<u8>, Mark>> {
    let live = LayerId(stack.lowers().len() as u16 - 1);
    let mut marks = BTreeMap::new();
    let root = DirLayers::root(stack)?;
    if root.lowers.first().is_some_and(|l| l.layer == live) {
        marks.insert(Vec::new(), mark_of(&rustix::fs::fstat(stack.layer(live).root()?)?));
    }
    let mut todo: Vec<(PathBuf, DirLayers)> = vec![(PathBuf::new(), root)];
    while let Some((path, dir)) = todo.pop() {
        let live_dir = dir.lowers.iter().find(|l| l.layer == live).map(|l| l.path.clone());
        let entries = ovl_lookup::read_merged(stack, &dir)?;
        // Read while changes run (after a take): a directory renamed or removed under us since
        // it was looked up would have us read LIVE's new objects under an old view path.
        if dir_layers_at(stack, &path)?.as_ref() != Some(&dir) {
            return Err(ovl_core::Errno::AGAIN.into());
        }
        for e in entries {
            if path.as_os_str().is_empty() && hidden.contains(&e.name) {
                continue;
            }
            let child = path.join(&e.name);
            if e.file_type == FileType::Directory {
                let Some(found) = ovl_lookup::lookup(stack, &dir, &e.name)? else { continue };
                let Some(d) = found.dir else { continue };
                if d.lowers.first().is_some_and(|l| l.layer == live) {
                    marks.insert(child.as_os_str().as_bytes().to_vec(), mark_of(&found.stat));
                }
                todo.push((child, d));
            } else if e.layer == live {
                // A non-dir from LIVE is at its name in LIVE's part of this dir.
                let Some(ld) = &live_dir else { continue };
                if let Ok(st) = sys::lstat_beneath(stack.layer(live).root()?, &ld.join(&e.name)) {
                    marks.insert(child.as_os_str().as_bytes().to_vec(), mark_of(&st));
                }
            }
        }
    }
    Ok(marks)
}

/// The view paths where LIVE now (`now`, a [`record`] of the newest view) differs from `seal`:
/// changed, added, or gone (removed, or saved into a newer layer, which [`shows_live`] tells
/// apart). Whether a difference is a change behind our back depends on the snapshot: one no newer
/// than `seal.newest` that shows LIVE's object there was guarded all along, so any difference is
/// one; a newer one may show a legitimate change made before its take that the seal missed.
pub(crate) fn drift(seal: &Seal, now: &BTreeMap<Vec<u8>, Mark>) -> Vec<PathBuf> {
    let path = |p: &Vec<u8>| PathBuf::from(OsString::from_vec(p.clone()));
    let mut out: Vec<PathBuf> =
        now.iter().filter(|(p, m)| !seal.marks.get(*p).is_some_and(|old| old.holds(m))).map(|(p, _)| path(p)).collect();
    out.extend(seal.marks.keys().filter(|p| !now.contains_key(*p)).map(path));
    out
}

/// Where the directory at view path `path` lives now (`None`: no directory there).
fn dir_layers_at(stack: &LayerStack, path: &Path) -> ovl_core::Result<Option<DirLayers>> {
    let mut dir = DirLayers::root(stack)?;
    for c in path.iter() {
        match ovl_lookup::lookup(stack, &dir, c)?.and_then(|e| e.dir) {
            Some(d) => dir = d,
            None => return Ok(None),
        }
    }
    Ok(Some(dir))
}

/// Whether every mark of `marks` (a [`record`] of the newest view made while changes ran) still
/// names the object the view shows from LIVE at its path. A walk that met a directory renamed or
/// removed half way may have read LIVE's new objects under an old view path: such a record must
/// not become the seal (the next mount would take the difference for a change behind our back).
pub(crate) fn consistent(
    stack: &LayerStack,
    hidden: &[OsString],
    marks: &BTreeMap<Vec<u8>, Mark>,
) -> ovl_core::Result<bool> {
    let live = LayerId(stack.lowers().len() as u16 - 1);
    // The marks come sorted by path: siblings follow each other and share their parent's walk.
    let mut dirs = HashMap::new();
    for (p, m) in marks {
        let path = Path::new(std::ffi::OsStr::from_bytes(p));
        match shown_at_with(stack, hidden, path, &mut dirs)? {
            Shown::Live(q) => match sys::lstat_beneath(stack.layer(live).root()?, &q) {
                Ok(st) if st.st_ino == m.ino => {}
                // Changed since it was read: saved into the newest layer first, or being saved.
                Ok(_) | Err(_) => return Ok(false),
            },
            // Saved into the newest layer since it was read: the mark no longer matters.
            Shown::Layer => {}
            Shown::Missing => return Ok(false),
        }
    }
    Ok(true)
}

/// What a view shows at one path, as far as LIVE is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shown {
    /// LIVE's object at this path inside LIVE.
    Live(PathBuf),
    /// Nothing, where LIVE's object would show if LIVE had one: what LIVE removed is missing.
    Missing,
    /// A layer's object, or nothing because a layer hides the name: LIVE does not matter here.
    Layer,
}

/// What the view `stack` (its last layer LIVE) shows at `path`. `hidden` as in [`record`].
pub(crate) fn shown_at(stack: &LayerStack, hidden: &[OsString], path: &Path) -> ovl_core::Result<Shown> {
    shown_at_with(stack, hidden, path, &mut HashMap::new())
}

/// [`shown_at`], starting from `path`'s parent when `dirs` has it (the directories met on the
/// way are added, by view path): for many paths looked at one after the other.
fn shown_at_with(
    stack: &LayerStack,
    hidden: &[OsString],
    path: &Path,
    dirs: &mut HashMap<PathBuf, DirLayers>,
) -> ovl_core::Result<Shown> {
    let live = LayerId(stack.lowers().len() as u16 - 1);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let (mut dir, mut here, mut first, skip) = match parent.and_then(|p| dirs.get(p)) {
        Some(d) => (d.clone(), parent.unwrap_or(Path::new("")).to_path_buf(), false, path.iter().count() - 1),
        None => (DirLayers::root(stack)?, PathBuf::new(), true, 0),
    };
    let mut comps = path.iter().skip(skip).peekable();
    if first && comps.peek().is_none() {
        return Ok(match dir.lowers.first() {
            Some(l) if l.layer != live => Shown::Layer,
            _ => Shown::Live(PathBuf::new()),
        });
    }
    while let Some(c) = comps.next() {
        here.push(c);
        if first && hidden.iter().any(|h| h == c) {
            return Ok(Shown::Layer);
        }
        first = false;
        let Some(e) = ovl_lookup::lookup(stack, &dir, c)? else {
            // Nothing here: what LIVE removed shows as missing, unless a layer hides the
            // name above it (a whiteout or an opaque dir of a layer).
            return Ok(if live_could_show(stack, &dir, c, live) { Shown::Missing } else { Shown::Layer });
        };
        let (from, at) = match (&e.lower, &e.dir) {
            (Some(l), _) => (l.layer, l.path.clone()),
            (None, Some(d)) => d.lowers.first().map_or((live, PathBuf::new()), |l| (l.layer, l.path.clone())),
            (None, None) => return Ok(Shown::Layer),
        };
        if let Some(d) = &e.dir {
            dirs.insert(here.clone(), d.clone());
        }
        match e.dir {
            Some(d) if comps.peek().is_some() => dir = d,
            _ if comps.peek().is_some() => return Ok(Shown::Layer),
            _ if from == live => return Ok(Shown::Live(at)),
            _ => return Ok(Shown::Layer),
        }
    }
    Ok(Shown::Layer)
}

/// Whether the snapshot layer `layer` holds a directory with an absolute or relative redirect:
/// then the views over it may show LIVE's objects at other paths than the newest view does.
pub(crate) fn has_redirects(layer: BorrowedFd<'_>, names: &ovl_core::XattrNames) -> ovl_core::Result<bool> {
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        for e in sys::read_dir(layer, &dir)? {
            if e.file_type != FileType::Directory {
                continue;
            }
            let p = dir.join(&e.name);
            let fd = sys::open_dir_path(layer, &p)?;
            if sys::get_xattr(&fd, None, &names.redirect)?.is_some() {
                return Ok(true);
            }
            todo.push(p);
        }
    }
    Ok(false)
}

/// Whether LIVE's `name` in the merged `dir` would show: LIVE is part of `dir` and no layer above
/// it holds a whiteout for `name` (a layer's opaque dir leaves LIVE out of `dir` altogether).
fn live_could_show(stack: &LayerStack, dir: &DirLayers, name: &std::ffi::OsStr, live: LayerId) -> bool {
    if !dir.lowers.iter().any(|l| l.layer == live) {
        return false;
    }
    !dir.lowers.iter().take_while(|l| l.layer != live).any(|l| {
        let Ok(root) = stack.layer(l.layer).root() else { return true };
        sys::lstat_beneath(&*root, &l.path.join(name)).is_ok_and(|st| ovl_core::is_whiteout_stat(&st))
    })
}

/// Reads the seal of the store dir `root`; `None` if there is none.
pub(crate) fn read(root: BorrowedFd<'_>) -> anyhow::Result<Option<Seal>> {
    let fd = match rustix::fs::openat(root, SEAL, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e).context("opening the seal"),
    };
    let mut lines = BufReader::new(File::from(fd)).lines();
    let head = lines.next().transpose()?.unwrap_or_default();
    let newest = head
        .strip_prefix(HEADER)
        .and_then(|r| r.trim().strip_prefix("newest="))
        .and_then(|n| n.parse().ok())
        .context("the seal is corrupt (its header)")?;
    let mut marks = BTreeMap::new();
    for line in lines {
        let line = line?;
        let f: Vec<&str> = line.split(' ').collect();
        let [ino, cs, cns, ms, mns, size, mode, uid, gid, nlink, p] = f[..] else {
            anyhow::bail!("the seal is corrupt: {line:?}");
        };
        let mark = Mark {
            ino: ino.parse()?,
            ctime: (cs.parse()?, cns.parse()?),
            mtime: (ms.parse()?, mns.parse()?),
            size: size.parse()?,
            mode: mode.parse()?,
            owner: (uid.parse()?, gid.parse()?),
            nlink: nlink.parse()?,
        };
        marks.insert(unhex(p).context("the seal is corrupt (a path)")?, mark);
    }
    Ok(Some(Seal { newest, marks }))
}

/// Writes `seal` into the store dir `root`, atomically and durably.
pub(crate) fn write(root: BorrowedFd<'_>, seal: &Seal) -> anyhow::Result<()> {
    let mut staged = stage(root, seal)?;
    staged.install()?;
    staged.sync()
}

/// [`write`] up to the rename: the seal written and synced under a temporary name, for the
/// caller to put in place under the store's lock (the fsync of a 20k-line seal ran under it, and
/// a take or delete waited).
pub(crate) fn stage(root: BorrowedFd<'_>, seal: &Seal) -> anyhow::Result<crate::store::StagedFile> {
    crate::store::stage_file(root, SEAL, true, |f| {
        writeln!(f, "{HEADER} newest={}", seal.newest)?;
        for (p, m) in &seal.marks {
            // Paths as hex: any bytes, one line each ("-" for the root).
            let hex: String = if p.is_empty() { "-".into() } else { p.iter().map(|b| format!("{b:02x}")).collect() };
            writeln!(
                f,
                "{} {} {} {} {} {} {} {} {} {} {hex}",
                m.ino, m.ctime.0, m.ctime.1, m.mtime.0, m.mtime.1, m.size, m.mode, m.owner.0, m.owner.1, m.nlink
            )?;
        }
        Ok(())
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        return Some(Vec::new());
    }
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_round_trip_any_bytes() {
        let mut marks = BTreeMap::new();
        let m = Mark { ino: 2, ctime: (1, 2), mtime: (3, 4), size: 5, mode: 0o100644, owner: (6, 7), nlink: 1 };
        marks.insert(Vec::new(), m);
        marks.insert(b"a/b c\n\xff".to_vec(), Mark { ino: 9, ctime: (-1, 999_999_999), ..m });
        let seal = Seal { newest: 7, marks };
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(dir.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        write(std::os::fd::AsFd::as_fd(&fd), &seal).unwrap();
        assert_eq!(read(std::os::fd::AsFd::as_fd(&fd)).unwrap(), Some(seal));
    }

    #[test]
    fn drift_lists_changed_added_and_gone_paths() {
        let m = |ino| Mark { ino, ctime: (0, 0), mtime: (0, 0), size: 0, mode: 0, owner: (0, 0), nlink: 1 };
        let seal =
            Seal { newest: 3, marks: [(b"a".to_vec(), m(1)), (b"b".to_vec(), m(2)), (b"d".to_vec(), m(4))].into() };
        let now: BTreeMap<Vec<u8>, Mark> = [(b"a".to_vec(), m(1)), (b"c".to_vec(), m(3)), (b"d".to_vec(), m(5))].into();
        let mut got = drift(&seal, &now);
        got.sort();
        assert_eq!(got, [PathBuf::from("b"), PathBuf::from("c"), PathBuf::from("d")]);
    }
}
