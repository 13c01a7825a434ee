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

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, CWD, RenameFlags, Timespec, Timestamps};

use crate::diff::Change;

/// Applies `changes` (from the snapshot whose view is `view` to the live tree at `mnt`); calls
/// `step` after each. Renames come first (outermost first) and end the round when there are any;
/// then removals, then copies.
pub fn apply(mnt: &Path, view: &Path, changes: &[Change], step: &dyn Fn(&Change)) -> Result<()> {
    let mut linked = Linked::new();
    let mut put = |src: &Path, dst: &Path, over: bool| install(src, dst, over, &mut linked);
    let live = |p: &Path| mnt.join(p);
    let snap = |p: &Path| view.join(p);
    let mut renames: Vec<&Change> = changes.iter().filter(|c| matches!(c, Change::Renamed { .. })).collect();
    renames.sort_by_key(|c| match c {
        Change::Renamed { path, .. } => path.components().count(),
        _ => 0,
    });
    // First the leftovers of a restore killed midway, which are no part of the snapshot.
    for c in changes {
        let Change::Added { path, .. } = c else { continue };
        if is_temp(path) {
            if fs::symlink_metadata(live(path)).is_ok() {
                remove(&live(path))?;
            }
            step(c);
        }
    }
    // Moving dirs changes where everything below them is: the next round diffs again.
    let moved = !renames.is_empty();
    for c in renames {
        let Change::Renamed { path, to } = c else { continue };
        // Only when the place is free of anything but what the snapshot has there, and the
        // parent exists: otherwise a later round does it (or a copy takes its place).
        if live(path).parent().is_some_and(|p| p.is_dir()) && live(to).is_dir() && !path.starts_with(to) {
            if fs::symlink_metadata(live(path)).is_ok() {
                remove(&live(path))?;
            }
            fs::rename(live(to), live(path))
                .with_context(|| format!("moving /{} back to /{}", to.display(), path.display()))?;
        }
        step(c);
    }
    if moved {
        return Ok(());
    }
    for c in changes {
        let Change::Added { path, .. } = c else { continue };
        if !is_temp(path) {
            if fs::symlink_metadata(live(path)).is_ok() {
                remove(&live(path))?;
            }
            step(c);
        }
    }
    for c in changes {
        match c {
            Change::Deleted { path, at } => {
                if fs::symlink_metadata(live(at)).is_ok() {
                    remove(&live(at))?;
                }
                if live(at).parent().is_some_and(|p| p.is_dir()) {
                    put(&snap(path), &live(at), false)?;
                }
                step(c);
            }
            Change::Modified { path, at } => {
                let src = fs::symlink_metadata(snap(path)).with_context(|| format!("reading /{}", path.display()))?;
                let dst = fs::symlink_metadata(live(at)).ok();
                match dst {
                    Some(d) if d.is_dir() && src.is_dir() => copy_meta(&snap(path), &live(at), &src)?,
                    Some(d) => put(&snap(path), &live(at), !d.is_dir() && !src.is_dir())?,
                    None => put(&snap(path), &live(at), false)?,
                }
                step(c);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes a file or a whole tree.
fn remove(p: &Path) -> Result<()> {
    let m = fs::symlink_metadata(p)?;
    if m.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) }
        .with_context(|| format!("removing {}", p.display()))
}

/// The prefix of the temporary names restore builds objects under (`.ovlsnap-restore.PID.N`).
pub const TEMP_PREFIX: &str = ".ovlsnap-restore.";

/// Whether the last component of `p` is one of restore's temporary names.
pub fn is_temp(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()))
}

/// A temporary name beside `dst` that is free now.
fn temp_beside(dst: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dst.with_file_name(format!("{TEMP_PREFIX}{pid}.{n}"));
        if fs::symlink_metadata(&tmp).is_err() {
            return tmp;
        }
    }
}

/// The LIVE name restore gave each non-directory of the view with several links, by the view's
/// (device, inode): its other names become links to it (issue 16.4). A name of such a file that
/// the diff does not list yet is linked in a later round, once its link count differs.
type Linked = HashMap<(u64, u64), PathBuf>;

/// Puts a copy of `src` (with everything below it) at `dst`: built whole under a temporary name
/// beside `dst`, then renamed into place; another name of a hard-linked file already installed
/// (`linked`) is linked to that file instead. `over`: `dst` holds a non-directory and `src` is
/// one, and the rename replaces it atomically. Otherwise what `dst` holds (a directory, or an
/// object of the other kind) is removed first and the name must then be free
/// (`RENAME_NOREPLACE`).
fn install(src: &Path, dst: &Path, over: bool, linked: &mut Linked) -> Result<()> {
    let m = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let key = (!m.is_dir() && m.nlink() > 1).then_some((m.dev(), m.ino()));
    let first = key.and_then(|k| linked.get(&k)).filter(|f| fs::symlink_metadata(f).is_ok()).cloned();
    let tmp = temp_beside(dst);
    let made = match &first {
        Some(f) => fs::hard_link(f, &tmp).with_context(|| format!("linking {} to {}", tmp.display(), f.display())),
        None => copy_tree(src, &tmp),
    };
    let built = made.and_then(|()| {
        if !over && fs::symlink_metadata(dst).is_ok() {
            remove(dst)?;
        }
        let flags = if over { RenameFlags::empty() } else { RenameFlags::NOREPLACE };
        rustix::fs::renameat_with(CWD, &tmp, CWD, dst, flags)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
    });
    if built.is_err() && fs::symlink_metadata(&tmp).is_ok() {
        let _ = remove(&tmp);
    }
    if let (Some(k), None, Ok(())) = (key, &first, &built) {
        linked.insert(k, dst.to_path_buf());
    }
    built
}

/// Copies `src` to `dst` (which must not exist): type, data (synced), owner, mode, times, xattrs;
/// dirs with everything below them.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let m = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let ft = m.file_type();
    if ft.is_dir() {
        fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_file() {
        fs::copy(src, dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    } else {
        let kind = if ft.is_fifo() {
            rustix::fs::FileType::Fifo
        } else if ft.is_char_device() {
            rustix::fs::FileType::CharacterDevice
        } else if ft.is_block_device() {
            rustix::fs::FileType::BlockDevice
        } else {
            rustix::fs::FileType::Socket
        };
        rustix::fs::mknodat(CWD, dst, kind, rustix::fs::Mode::from_raw_mode(0o600), m.rdev())?;
    }
    copy_meta(src, dst, &m)?;
    if ft.is_file() {
        // Durable before a rename makes it visible under a name of the snapshot.
        fs::File::open(dst).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dst.display()))?;
    }
    Ok(())
}

/// Gives `dst` the owner, mode, xattrs and times of `src`.
pub fn copy_metadata(src: &Path, dst: &Path) -> Result<()> {
    let m = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    copy_meta(src, dst, &m)
}

/// Gives `dst` the owner, mode, xattrs and times of `src` (metadata `m`).
fn copy_meta(src: &Path, dst: &Path, m: &fs::Metadata) -> Result<()> {
    let symlink = m.file_type().is_symlink();
    rustix::fs::chownat(
        CWD,
        dst,
        Some(rustix::fs::Uid::from_raw(m.uid())),
        Some(rustix::fs::Gid::from_raw(m.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !symlink {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        let want = list(src);
        let have = list(dst);
        for k in &have {
            if !want.contains(k) && !k.starts_with(b"security.") {
                let _ = rustix::fs::removexattr(dst, k.as_slice());
            }
        }
        for k in &want {
            if k.starts_with(b"security.") {
                continue;
            }
            if let Some(v) = get(src, k) {
                rustix::fs::setxattr(dst, k.as_slice(), &v, rustix::fs::XattrFlags::empty())?;
            }
        }
    }
    let ts = |s: i64, ns: i64| Timespec { tv_sec: s as _, tv_nsec: ns as _ };
    let times =
        Timestamps { last_access: ts(m.atime(), m.atime_nsec()), last_modification: ts(m.mtime(), m.mtime_nsec()) };
    rustix::fs::utimensat(CWD, dst, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// The xattr names of `p` (not following a symlink there is not needed: never called on one).
fn list(p: &Path) -> Vec<Vec<u8>> {
    let Ok(n) = rustix::fs::listxattr_query(p) else { return Vec::new() };
    let mut raw = vec![0u8; n];
    let Ok(len) = rustix::fs::listxattr(p, &mut raw[..]) else { return Vec::new() };
    raw[..len].split(|b| *b == 0).filter(|k| !k.is_empty()).map(|k| k.to_vec()).collect()
}

fn get(p: &Path, k: &[u8]) -> Option<Vec<u8>> {
    let n = rustix::fs::getxattr_query(p, k).ok()?;
    let mut v = vec![0u8; n];
    let len = rustix::fs::getxattr(p, k, &mut v[..]).ok()?;
    v.truncate(len);
    Some(v)
}

/// Where the live copy of snapshot path `p` goes: for messages, escaped as `ls -b` does
/// ([`crate::names::shown`]).
pub fn shown(p: &Path) -> String {
    crate::names::shown(p)
}
