//! Restore: make LIVE equal to a snapshot's tree, online, by replaying the differences as ordinary
//! changes through the mount. The changes go through the CoW rules like any other, so every
//! snapshot, newer ones included, keeps its tree. Each round diffs again and applies what is left,
//! so a restore interrupted by a kill is finished by running it again.
//!
//! Objects come from the snapshot's view (`MNT/.snapshots/NAME`). Every object restore writes
//! (a file, or a directory with everything below it) is built whole under a temporary name
//! beside its target ([`TEMP_PREFIX`]`PID.N`), its file data synced, and then renamed into place:
//! with `RENAME_NOREPLACE` where the name must be free, over the old object where it replaces
//! one. So LIVE never shows a half-made object under a name of the snapshot. A restore killed
//! midway may leave such temporary names; they are new since the snapshot, so the next
//! restore's diff lists them as additions and it removes them before anything else.
//!
//! Every path is opened from the descriptor of LIVE's root or the view's ([`Tree`]) with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, a piece of whole names at a time when longer than
//! `PATH_MAX` (`ovl_core::sys::open_beneath`), and each object is changed through its parent's
//! descriptor or its own: a symlink a user puts in LIVE (or had in it when the snapshot was taken)
//! never leads root's restore out of the tree, and trees deeper than `PATH_MAX` restore whole.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use ovl_core::sys;
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RenameFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::diff::Change;

/// A directory restore works beneath: LIVE through the mount, or a snapshot's view. Paths are
/// relative to it; the empty path is the root itself.
struct Tree<'a> {
    root: OwnedFd,
    shown: &'a Path,
}

impl<'a> Tree<'a> {
    fn open(dir: &'a Path) -> Result<Self> {
        let root = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("opening {}", dir.display()))?;
        Ok(Tree { root, shown: dir })
    }

    /// `rel` for messages.
    fn show(&self, rel: &Path) -> String {
        self.shown.join(rel).display().to_string()
    }

    /// The directory holding `rel`, opened, and `rel`'s name in it.
    fn place(&self, rel: &Path) -> Result<(OwnedFd, CString)> {
        sys::open_parent(&self.root, rel).with_context(|| format!("opening the directory of {}", self.show(rel)))
    }

    /// The metadata of `rel` (not following a symlink there); `None` when nothing is there.
    fn lstat(&self, rel: &Path) -> Result<Option<Stat>> {
        if rel.as_os_str().is_empty() {
            return Ok(Some(rustix::fs::fstat(&self.root)?));
        }
        match sys::lstat_beneath(&self.root, rel) {
            Ok(st) => Ok(Some(st)),
            Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.show(rel))),
        }
    }

    fn exists(&self, rel: &Path) -> bool {
        matches!(self.lstat(rel), Ok(Some(_)))
    }

    /// A directory (itself, not a symlink to one) is at `rel`.
    fn is_dir(&self, rel: &Path) -> bool {
        matches!(self.lstat(rel), Ok(Some(st)) if FileType::from_raw_mode(st.st_mode) == FileType::Directory)
    }

    /// The directory `rel` would be in exists.
    fn parent_is_dir(&self, rel: &Path) -> bool {
        rel.parent().is_some_and(|p| self.is_dir(p))
    }

    /// The object at `rel` itself, held (`O_PATH`, a symlink not followed).
    fn object(&self, rel: &Path) -> Result<OwnedFd> {
        sys::open_beneath(&self.root, rel, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())
            .with_context(|| format!("opening {}", self.show(rel)))
    }

    /// Removes a file or a whole tree.
    fn remove(&self, rel: &Path) -> Result<()> {
        let (dir, name) = self.place(rel)?;
        sys::remove_tree_at(&dir, &name).with_context(|| format!("removing {}", self.show(rel)))
    }

    fn rename(&self, from: &Path, to: &Path, flags: RenameFlags) -> Result<()> {
        let ((fdir, fname), (tdir, tname)) = (self.place(from)?, self.place(to)?);
        rustix::fs::renameat_with(&fdir, &fname, &tdir, &tname, flags)
            .with_context(|| format!("renaming {} to {}", self.show(from), self.show(to)))
    }

    fn link(&self, from: &Path, to: &Path) -> Result<()> {
        let ((fdir, fname), (tdir, tname)) = (self.place(from)?, self.place(to)?);
        rustix::fs::linkat(&fdir, &fname, &tdir, &tname, AtFlags::empty())
            .with_context(|| format!("linking {} to {}", self.show(to), self.show(from)))
    }

    /// A temporary name beside `dst` that is free now.
    fn temp_beside(&self, dst: &Path) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let tmp = dst.with_file_name(format!("{TEMP_PREFIX}{pid}.{n}"));
            if !self.exists(&tmp) {
                return tmp;
            }
        }
    }
}

/// Applies `changes` (from the snapshot whose view is `view` to the live tree at `mnt`); calls
/// `step` after each. Renames come first (outermost first) and end the round when there are any;
/// then removals, then copies.
pub fn apply(mnt: &Path, view: &Path, changes: &[Change], step: &dyn Fn(&Change)) -> Result<()> {
    let (live, snap) = (Tree::open(mnt)?, Tree::open(view)?);
    let mut linked = Linked::new();
    let mut put = |src: &Path, dst: &Path, over: bool| install(&snap, src, &live, dst, over, &mut linked);
    let mut renames: Vec<&Change> = changes.iter().filter(|c| matches!(c, Change::Renamed { .. })).collect();
    renames.sort_by_key(|c| match c {
        Change::Renamed { path, .. } => path.components().count(),
        _ => 0,
    });
    // First the leftovers of a restore killed midway, which are no part of the snapshot.
    for c in changes {
        let Change::Added { path, .. } = c else { continue };
        if is_temp(path) {
            if live.exists(path) {
                live.remove(path)?;
            }
            step(c);
        }
    }
    // Moving dirs changes where everything below them is: the next round diffs again. A round
    // whose renames must all wait goes on to the removals and copies, which they wait for.
    let mut moved = false;
    for c in renames {
        let Change::Renamed { path, to } = c else { continue };
        if !live.is_dir(to) {
            step(c);
            continue;
        }
        if path.starts_with(to) {
            // It goes back below where it is now, into what will hold its place: out beside
            // that place first; a later round puts it back once its parent is there.
            let tmp = live.temp_beside(to);
            live.rename(to, &tmp, RenameFlags::NOREPLACE)
                .with_context(|| format!("moving /{} out of the way of /{}", to.display(), path.display()))?;
            moved = true;
        } else if live.parent_is_dir(path) {
            // Only when the parent exists; what else holds its place goes. Moved below what now
            // holds its place (`mv a t; mkdir -p a/d; mv t a/d/n`), it goes out beside that
            // place first, or removing what holds it would take the dir along.
            let from = if to.starts_with(path) {
                let tmp = live.temp_beside(path);
                live.rename(to, &tmp, RenameFlags::NOREPLACE)
                    .with_context(|| format!("moving /{} out of /{}", to.display(), path.display()))?;
                tmp
            } else {
                to.clone()
            };
            if live.exists(path) {
                live.remove(path)?;
            }
            live.rename(&from, path, RenameFlags::empty())
                .with_context(|| format!("moving /{} back to /{}", to.display(), path.display()))?;
            moved = true;
        }
        step(c);
    }
    if moved {
        return Ok(());
    }
    for c in changes {
        let Change::Added { path, .. } = c else { continue };
        if !is_temp(path) {
            if live.exists(path) {
                live.remove(path)?;
            }
            step(c);
        }
    }
    for c in changes {
        match c {
            Change::Deleted { path, at } => {
                if live.exists(at) {
                    live.remove(at)?;
                }
                if live.parent_is_dir(at) {
                    put(path, at, false)?;
                }
                step(c);
            }
            Change::Modified { path, at } => {
                let src = snap.lstat(path)?.with_context(|| format!("reading /{}", path.display()))?;
                let dir = |st: &Stat| FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                match live.lstat(at)? {
                    Some(d) if dir(&d) && dir(&src) => {
                        copy_meta(&snap.object(path)?, &src, &live.object(at)?)
                            .with_context(|| format!("copying the metadata of /{}", path.display()))?;
                    }
                    Some(d) => put(path, at, !dir(&d) && !dir(&src))?,
                    None => put(path, at, false)?,
                }
                step(c);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The prefix of the temporary names restore builds objects under (`.ovlsnap-restore.PID.N`).
pub const TEMP_PREFIX: &str = ".ovlsnap-restore.";

/// Whether the last component of `p` is one of restore's temporary names.
pub fn is_temp(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()))
}

/// The LIVE name restore gave each non-directory of the view with several links, by the view's
/// (device, inode): its other names become links to it (issue 16.4). A name of such a file that
/// the diff does not list yet is linked in a later round, once its link count differs.
type Linked = HashMap<(u64, u64), PathBuf>;

/// Puts a copy of `src` in the view (with everything below it) at `dst` in LIVE: built whole
/// under a temporary name beside `dst`, then renamed into place; another name of a hard-linked
/// file already installed (`linked`) is linked to that file instead. `over`: `dst` holds a
/// non-directory and `src` is one, and the rename replaces it atomically. Otherwise what `dst`
/// holds (a directory, or an object of the other kind) is removed first and the name must then
/// be free (`RENAME_NOREPLACE`).
fn install(snap: &Tree, src: &Path, live: &Tree, dst: &Path, over: bool, linked: &mut Linked) -> Result<()> {
    let m = snap.lstat(src)?.with_context(|| format!("reading {}", snap.show(src)))?;
    let is_dir = FileType::from_raw_mode(m.st_mode) == FileType::Directory;
    let key = (!is_dir && m.st_nlink > 1).then_some((m.st_dev, m.st_ino));
    let first = key.and_then(|k| linked.get(&k)).filter(|f| live.exists(f)).cloned();
    let tmp = live.temp_beside(dst);
    let made = match &first {
        Some(f) => live.link(f, &tmp),
        None => copy_tree(snap, src, live, &tmp),
    };
    let built = made.and_then(|()| {
        if !over && live.exists(dst) {
            live.remove(dst)?;
        }
        let flags = if over { RenameFlags::empty() } else { RenameFlags::NOREPLACE };
        live.rename(&tmp, dst, flags)
    });
    if built.is_err() && live.exists(&tmp) {
        let _ = live.remove(&tmp);
    }
    if let (Some(k), None, Ok(())) = (key, &first, &built) {
        linked.insert(k, dst.to_path_buf());
    }
    built
}

/// Copies `src` of `from` to `dst` of `to` (which must not exist): type, data (synced), owner,
/// mode, times, xattrs; dirs with everything below them.
fn copy_tree(from: &Tree, src: &Path, to: &Tree, dst: &Path) -> Result<()> {
    let ((sdir, sname), (ddir, dname)) = (from.place(src)?, to.place(dst)?);
    copy_at(sdir.as_fd(), &sname, ddir.as_fd(), &dname)
        .with_context(|| format!("copying {} to {}", from.show(src), to.show(dst)))
}

/// Copies `sname` in `sdir` to `dname` in `ddir`, the way [`copy_tree`] says. What it makes is
/// opened without following a symlink and checked to be what was made before its metadata is
/// set through its own descriptor.
fn copy_at(sdir: BorrowedFd<'_>, sname: &CStr, ddir: BorrowedFd<'_>, dname: &CStr) -> Result<()> {
    let source = rustix::fs::openat(sdir, sname, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&source)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let private = Mode::from_raw_mode(0o700);
    let mut data = None;
    match kind {
        FileType::Directory => {
            rustix::fs::mkdirat(ddir, dname, private)?;
            let made = rustix::fs::openat(
                ddir,
                dname,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // (Listed through a descriptor of its own: `read_dir_fd` opens the dir afresh.)
            for e in sys::read_dir_fd(rustix::io::dup(&source)?)? {
                let name = sys::name_cstr(&e.name)?;
                copy_at(source.as_fd(), &name, made.as_fd(), &name)?;
            }
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(sdir, sname, Vec::new())?;
            rustix::fs::symlinkat(&target, ddir, dname)?;
        }
        FileType::RegularFile => {
            let reader =
                rustix::fs::openat(sdir, sname, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let writer = rustix::fs::openat(ddir, dname, flags, Mode::from_raw_mode(0o600))?;
            let (mut reader, mut writer) = (File::from(reader), File::from(writer));
            std::io::copy(&mut reader, &mut writer)?;
            data = Some(writer);
        }
        other => rustix::fs::mknodat(ddir, dname, other, Mode::from_raw_mode(0o600), st.st_rdev)?,
    }
    let made = rustix::fs::openat(ddir, dname, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    if FileType::from_raw_mode(rustix::fs::fstat(&made)?.st_mode) != kind {
        bail!("{:?} changed while it was being made", dname);
    }
    copy_meta(&source, &st, &made)?;
    if let Some(file) = data {
        // Durable before a rename makes it visible under a name of the snapshot.
        file.sync_all()?;
    }
    Ok(())
}

/// Gives `dst` the owner, mode, xattrs and times of `src` (two directories: a clone's upper root
/// and the view it overlays).
pub fn copy_metadata(src: &Path, dst: &Path) -> Result<()> {
    let (from, to) = (Tree::open(src)?, Tree::open(dst)?);
    let st = rustix::fs::fstat(&from.root)?;
    copy_meta(&from.root, &st, &to.root).with_context(|| format!("copying the metadata of {}", src.display()))
}

/// Gives the object `dst` (a descriptor of it, `O_PATH` will do) the owner, mode, xattrs and
/// times of `src` (metadata `st`). Symlinks get the owner and times only.
fn copy_meta(src: &OwnedFd, st: &Stat, dst: &OwnedFd) -> Result<()> {
    let symlink = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
    rustix::fs::chownat(
        dst,
        c"",
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !symlink {
        // The object itself through its descriptor's procfs link (`fchmod` takes no `O_PATH`).
        let own = format!("/proc/self/fd/{}", dst.as_raw_fd());
        rustix::fs::chmodat(CWD, own.as_str(), Mode::from_raw_mode(st.st_mode & 0o7777), AtFlags::empty())?;
        let want = sys::list_xattrs(src, None).unwrap_or_default();
        let have = sys::list_xattrs(dst, None).unwrap_or_default();
        let security = |k: &std::ffi::OsStr| k.as_encoded_bytes().starts_with(b"security.");
        let key = |k: &std::ffi::OsStr| CString::new(k.as_encoded_bytes()).map_err(|_| Errno::INVAL);
        for k in have.iter().filter(|k| !want.contains(k) && !security(k)) {
            let _ = sys::remove_xattr(dst, None, &key(k)?);
        }
        for k in want.iter().filter(|k| !security(k)) {
            let key = key(k)?;
            if let Some(v) = sys::get_xattr(src, None, &key)? {
                sys::set_xattr(dst, None, &key, &v, 0)?;
            }
        }
    }
    let times = Timestamps {
        last_access: Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
        last_modification: Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
    };
    sys::set_times(dst.as_fd(), &times)?;
    Ok(())
}

/// Where the live copy of snapshot path `p` goes: for messages, escaped as `ls -b` does
/// ([`crate::names::shown`]).
pub fn shown(p: &Path) -> String {
    crate::names::shown(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user swaps a LIVE directory for a symlink to a directory outside LIVE between the diff
    /// and its replay (a restore of a big tree takes a while). What the diff listed inside that
    /// directory must not be removed or written through the symlink: restore runs as root, and
    /// through paths it deleted the outside file and wrote the snapshot's in its place.
    #[test]
    fn a_directory_swapped_for_a_symlink_during_a_restore_leads_nowhere_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (live, view, outside) = (tmp.path().join("live"), tmp.path().join("view"), tmp.path().join("outside"));
        for dir in [&live, &view, &outside] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::create_dir(view.join("x")).unwrap();
        std::fs::write(view.join("x/f"), "the snapshot's").unwrap();
        std::fs::write(view.join("x/g"), "the snapshot's too").unwrap();
        std::fs::write(outside.join("f"), "outside").unwrap();
        // The diff saw LIVE's x without f and with a g of its own; then x became a symlink.
        std::os::unix::fs::symlink(&outside, live.join("x")).unwrap();
        std::fs::write(outside.join("g"), "outside too").unwrap();
        let p = |s: &str| PathBuf::from(s);
        let changes =
            [Change::Deleted { path: p("x/f"), at: p("x/f") }, Change::Modified { path: p("x/g"), at: p("x/g") }];
        let r = apply(&live, &view, &changes, &|_| {});
        let err = format!("{:#}", r.expect_err("the restore went through a symlink"));
        assert!(err.contains("x/"), "{err}");
        let mut names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["f", "g"]);
        assert_eq!(std::fs::read_to_string(outside.join("f")).unwrap(), "outside");
        assert_eq!(std::fs::read_to_string(outside.join("g")).unwrap(), "outside too");
    }
}
