//! Copy-up of one lower object into its (already present) upper parent directory.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result, UpperLayer, XattrNames};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, Stat, Timespec, Timestamps};

use crate::dir::UpperDir;
use crate::upper::{restore_dir_times, temp_name, upper_of};

/// The lower object to copy up.
#[derive(Debug, Clone)]
pub struct Source {
    /// The layer it is in.
    pub layer: LayerId,
    /// Its path in that layer.
    pub path: PathBuf,
}

/// Copies `src` to `upper_parent/<name of src>` in the upper layer, where `upper_parent` (an
/// overlay path) must already exist in the upper layer. A directory is copied without its
/// entries (they stay in the lower layers and merge). Returns the new upper object's `lstat`.
/// The parent's timestamps are left as they were.
///
/// `publish` is called with the finished object's `lstat` just before it becomes visible in the
/// upper layer, so the caller can record its identity before anyone can look it up.
pub fn copy_up<'u>(
    stack: &LayerStack,
    src: &Source,
    upper_parent: impl Into<UpperDir<'u>>,
    publish: &dyn Fn(&Stat),
) -> Result<Stat> {
    copy_up_with(stack, src, upper_parent.into(), Kind::Full, publish)
}

/// Like [`copy_up`] for a non-directory, but atomically replaces the upper object of the same
/// name (the snapshot store uses it to turn a shared hard link into a private copy).
pub fn copy_up_replacing<'u>(stack: &LayerStack, src: &Source, upper_parent: impl Into<UpperDir<'u>>) -> Result<Stat> {
    copy_up_with(stack, src, upper_parent.into(), Kind::Replace, &|_| {})
}

/// What kind of copy [`copy_up_with`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Full,
    Meta,
    Replace,
}

/// Like [`copy_up`], but a regular file gets only its metadata (owner, mode, times, xattrs, size
/// as a hole) and `overlay.metacopy`: its data stays in `src` until [`copy_up_data`].
pub fn copy_up_meta<'u>(
    stack: &LayerStack,
    src: &Source,
    upper_parent: impl Into<UpperDir<'u>>,
    publish: &dyn Fn(&Stat),
) -> Result<Stat> {
    copy_up_with(stack, src, upper_parent.into(), Kind::Meta, publish)
}

/// Copies the data of the metacopy file `name` in `upper_parent` in from `data`, then clears its
/// `overlay.metacopy`. A crash before the xattr is removed leaves a metacopy file whose data
/// still comes from `data`, so nothing is lost.
pub fn copy_up_data<'u>(
    stack: &LayerStack,
    data: &Source,
    upper_parent: impl Into<UpperDir<'u>>,
    name: &CStr,
) -> Result<Stat> {
    let upper = upper_of(stack)?;
    let lower = stack.layer(data.layer);
    let src = sys::open_beneath(lower.root()?, &data.path, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())?;
    let uparent = upper_parent.into().open(upper)?;
    let dst = rustix::fs::openat(&uparent, name, OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let before = rustix::fs::fstat(&dst)?;
    let len = rustix::fs::fstat(&src)?.st_size as u64;
    rustix::fs::ftruncate(&dst, 0)?;
    let cloned = copy_data(&src, &dst, len)?;
    rustix::fs::futimens(&dst, &times_of(&before))?;
    if !stack.options().volatile && !cloned {
        rustix::fs::fsync(&dst)?;
    }
    match rustix::fs::fremovexattr(&dst, &stack.names().metacopy) {
        Ok(()) | Err(Errno::NODATA) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(rustix::fs::fstat(&dst)?)
}

fn copy_up_with(
    stack: &LayerStack,
    src: &Source,
    upper_parent: UpperDir<'_>,
    how: Kind,
    publish: &dyn Fn(&Stat),
) -> Result<Stat> {
    let meta_only = how == Kind::Meta;
    let replace = how == Kind::Replace;
    let upper = upper_of(stack)?;
    let name = src.path.file_name().ok_or(Errno::INVAL)?;
    let name = sys::name_cstr(name)?;
    let lower = stack.layer(src.layer);
    let (lparent, lname) = sys::open_parent(lower.root()?, &src.path)?;
    let st = sys::lstat_at(&lparent, &lname)?;
    let uparent = upper_parent.open(upper)?;
    let parent_st = rustix::fs::fstat(&uparent)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    // Like the kernel with index=off: no origin for a hard-linked lower non-directory.
    let origin = if ft != FileType::Directory && st.st_nlink > 1 { None } else { origin_of(lower, &lparent, &lname) };
    if origin.is_some() {
        mark_impure(stack, &uparent)?;
    }
    let origin = origin.as_deref();
    if ft == FileType::RegularFile {
        let into = (uparent.as_fd(), name.as_c_str());
        copy_regular(stack, upper, (&lparent, &lname), &st, into, (meta_only, replace, origin), publish)?;
    } else {
        let tmp = temp_name();
        let work = upper.work();
        match ft {
            FileType::Directory => rustix::fs::mkdirat(work, &tmp, Mode::from_raw_mode(0o700))?,
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&lparent, &lname, Vec::new())?;
                rustix::fs::symlinkat(&target, work, &tmp)?
            }
            _ => rustix::fs::mknodat(work, &tmp, ft, Mode::from_raw_mode(0o600), st.st_rdev)?,
        }
        let done = copy_meta_at(stack, &lparent, &lname, &st, work, &tmp).and_then(|()| {
            if let Some(o) = origin {
                sys::set_xattr(work, Some(&tmp), &stack.names().origin, o, 0)?;
            }
            publish(&sys::lstat_at(work, &tmp)?);
            let flags = if replace { rustix::fs::RenameFlags::empty() } else { rustix::fs::RenameFlags::NOREPLACE };
            Ok(rustix::fs::renameat_with(work, &tmp, &uparent, &name, flags)?)
        });
        if let Err(e) = done {
            let _ = sys::remove_tree_at(work, &tmp);
            return Err(e);
        }
    }
    restore_dir_times(uparent.as_fd(), &parent_st);
    sys::lstat_at(&uparent, &name)
}

/// Copies the symlink or special file `lname` in `lparent` (whose `lstat` is `st`) as `name` in
/// `dir` (the index dir), with its metadata and `origin`: made in the work dir first, then
/// renamed into place.
pub(crate) fn copy_other_into(
    stack: &LayerStack,
    (lparent, lname): (&OwnedFd, &CStr),
    st: &Stat,
    (dir, name): (BorrowedFd<'_>, &CStr),
    origin: &[u8],
    publish: &dyn Fn(&Stat),
) -> Result<()> {
    let work = upper_of(stack)?.work();
    let tmp = temp_name();
    let ft = FileType::from_raw_mode(st.st_mode);
    match ft {
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(lparent, lname, Vec::new())?;
            rustix::fs::symlinkat(&target, work, &tmp)?
        }
        FileType::Directory | FileType::RegularFile => return Err(Errno::INVAL.into()),
        _ => rustix::fs::mknodat(work, &tmp, ft, Mode::from_raw_mode(0o600), st.st_rdev)?,
    }
    let done = copy_meta_at(stack, lparent, lname, st, work, &tmp).and_then(|()| {
        sys::set_xattr(work, Some(&tmp), &stack.names().origin, origin, 0)?;
        publish(&sys::lstat_at(work, &tmp)?);
        Ok(rustix::fs::renameat_with(work, &tmp, dir, name, rustix::fs::RenameFlags::NOREPLACE)?)
    });
    if let Err(e) = done {
        let _ = sys::remove_tree_at(work, &tmp);
        return Err(e);
    }
    Ok(())
}

/// Copies the regular file `lname` in `lparent` (whose `lstat` is `st`) as `name` in `dir`
/// (any dir on the upper fs, the index dir for an indexed copy-up).
pub(crate) fn copy_regular_into(
    stack: &LayerStack,
    (lparent, lname): (&OwnedFd, &CStr),
    st: &Stat,
    into: (BorrowedFd<'_>, &CStr),
    origin: Option<&[u8]>,
    publish: &dyn Fn(&Stat),
) -> Result<()> {
    copy_regular(stack, upper_of(stack)?, (lparent, lname), st, into, (false, false, origin), publish)
}

fn copy_regular(
    stack: &LayerStack,
    upper: &UpperLayer,
    (lparent, lname): (&OwnedFd, &CStr),
    st: &Stat,
    into: (BorrowedFd<'_>, &CStr),
    (meta_only, replace, origin): (bool, bool, Option<&[u8]>),
    publish: &dyn Fn(&Stat),
) -> Result<()> {
    let dst = fill_regular(stack, upper, (lparent, lname), st, meta_only, origin)?;
    publish(&rustix::fs::fstat(&dst)?);
    link_regular(upper, &dst, into, replace)
}

/// Makes an unnamed file in the work dir with the data (or, `meta_only`, only the size) and the
/// metadata of the regular file `lname` in `lparent`, whose `lstat` is `st`, durable.
fn fill_regular(
    stack: &LayerStack,
    upper: &UpperLayer,
    (lparent, lname): (&OwnedFd, &CStr),
    st: &Stat,
    meta_only: bool,
    origin: Option<&[u8]>,
) -> Result<OwnedFd> {
    let src = rustix::fs::openat(lparent, lname, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let dst = rustix::fs::openat(
        upper.work(),
        c".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    // Data written by copying must be durable before the copy becomes visible (as in the
    // kernel); a metacopy has no data, and a clone shares already durable extents.
    let needs_sync = if meta_only {
        rustix::fs::ftruncate(&dst, st.st_size as u64)?;
        rustix::fs::fsetxattr(&dst, &stack.names().metacopy, b"", rustix::fs::XattrFlags::empty())?;
        false
    } else {
        !copy_data(&src, &dst, st.st_size as u64)?
    };
    copy_xattrs(stack, lparent, lname, &dst)?;
    rustix::fs::fchown(&dst, Some(uid(st.st_uid)), Some(gid(st.st_gid)))?;
    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    rustix::fs::futimens(&dst, &times_of(st))?;
    if !stack.options().volatile && needs_sync {
        rustix::fs::fsync(&dst)?;
    }
    if let Some(o) = origin {
        rustix::fs::fsetxattr(&dst, &stack.names().origin, o, rustix::fs::XattrFlags::empty())?;
    }
    Ok(dst)
}

/// Links the unnamed work file `dst` in as `name` in `uparent`, atomically replacing an object
/// of that name when `replace`.
fn link_regular(
    upper: &UpperLayer,
    dst: &OwnedFd,
    (uparent, name): (BorrowedFd<'_>, &CStr),
    replace: bool,
) -> Result<()> {
    if replace {
        let tmp = temp_name();
        rustix::fs::linkat(dst, c"", upper.work(), &tmp, AtFlags::EMPTY_PATH)?;
        if let Err(e) = rustix::fs::renameat(upper.work(), &tmp, uparent, name) {
            let _ = rustix::fs::unlinkat(upper.work(), &tmp, AtFlags::empty());
            return Err(e.into());
        }
    } else {
        rustix::fs::linkat(dst, c"", uparent, name, AtFlags::EMPTY_PATH)?;
    }
    Ok(())
}

/// A full copy of a lower regular file made ahead of its copy-up, with no name yet (an
/// `O_TMPFILE` in the work dir): the slow part of a copy-up, done by [`prepare_copy`] while the
/// caller holds none of its locks, and put in place later by [`place_copy`] in an instant. The
/// caller must make sure the file did not change in between ([`PreparedCopy::source`] is its
/// `lstat` from before the copy began); dropping an unplaced copy frees it.
#[derive(Debug)]
pub struct PreparedCopy {
    file: OwnedFd,
    source: Stat,
    with_origin: bool,
}

impl PreparedCopy {
    /// The source's `lstat`, taken before its data was read.
    pub fn source(&self) -> &Stat {
        &self.source
    }

    /// The copy's own `lstat` (for a caller that records the upper identity before the copy
    /// becomes visible, as [`copy_up`]'s `publish`).
    pub fn stat(&self) -> Result<Stat> {
        Ok(rustix::fs::fstat(&self.file)?)
    }
}

/// Copies the lower regular file `src` into the upper layer's work dir, to be placed by
/// [`place_copy`]; other kinds of object give `EINVAL` (they are quick to copy in place).
pub fn prepare_copy(stack: &LayerStack, src: &Source) -> Result<PreparedCopy> {
    let upper = upper_of(stack)?;
    let lower = stack.layer(src.layer);
    let (lparent, lname) = sys::open_parent(lower.root()?, &src.path)?;
    let st = sys::lstat_at(&lparent, &lname)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Errno::INVAL.into());
    }
    let origin = if st.st_nlink > 1 { None } else { origin_of(lower, &lparent, &lname) };
    let file = fill_regular(stack, upper, (&lparent, &lname), &st, false, origin.as_deref())?;
    Ok(PreparedCopy { file, source: st, with_origin: origin.is_some() })
}

/// Puts `copy` in the upper layer as `name` in `upper_parent` (which must exist), atomically
/// replacing an object of that name when `replace`, as [`copy_up`] or [`copy_up_replacing`]
/// would have. Returns the new upper object's `lstat`.
pub fn place_copy<'u>(
    stack: &LayerStack,
    copy: PreparedCopy,
    upper_parent: impl Into<UpperDir<'u>>,
    name: &std::ffi::OsStr,
    replace: bool,
) -> Result<Stat> {
    let name = sys::name_cstr(name)?;
    let upper = upper_of(stack)?;
    let uparent = upper_parent.into().open(upper)?;
    let parent_st = rustix::fs::fstat(&uparent)?;
    if copy.with_origin {
        mark_impure(stack, &uparent)?;
    }
    link_regular(upper, &copy.file, (uparent.as_fd(), &name), replace)?;
    restore_dir_times(uparent.as_fd(), &parent_st);
    sys::lstat_at(&uparent, &name)
}

/// The encoded `overlay.origin` for the lower object `lname` in `lparent`, or `None` when its
/// filesystem cannot make file handles (the kernel then copies up without origin too).
fn origin_of(lower: &ovl_core::Layer, lparent: &OwnedFd, lname: &CStr) -> Option<Vec<u8>> {
    ovl_core::index::origin_value(lower, lparent, lname)
}

/// Sets `overlay.impure` on an upper dir about to hold an entry with an origin (the kernel uses
/// it to fix `d_ino` in listings); kept if already there.
pub(crate) fn mark_impure(stack: &LayerStack, dir: impl AsFd) -> Result<()> {
    let dir = dir.as_fd();
    let key = &stack.names().impure;
    if sys::get_xattr(dir, None, key)?.is_none() {
        sys::set_xattr(dir, None, key, b"y", 0)?;
    }
    Ok(())
}

/// Copies `len` bytes: a reflink when the filesystem can share extents, otherwise
/// `copy_file_range` over the data segments only, so holes stay holes.
/// Returns whether the data was cloned (nothing new to make durable).
fn copy_data(src: &OwnedFd, dst: &OwnedFd, len: u64) -> Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(true);
    }
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL) | Err(Errno::NOTSUP) => pos,
            Err(e) => return Err(e.into()),
        };
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(_) => len,
        };
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            // In chunks, as the kernel copies up (1 MiB there): each call returns to user
            // space, so the copying thread does not hold a CPU for the whole file.
            let want = (hole - off_in).min(4 << 20) as usize;
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
                Ok(0) => break,
                Ok(_) => {}
                // Layers on different filesystems (or one that cannot): plain reads and writes.
                Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                    copy_by_hand(src, dst, off_in, hole)?;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        pos = hole;
    }
    rustix::fs::ftruncate(dst, len)?;
    Ok(false)
}

/// Copies bytes `from..to` of `src` to the same offsets of `dst` with reads and writes.
fn copy_by_hand(src: &OwnedFd, dst: &OwnedFd, from: u64, to: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = from;
    while off < to {
        let want = ((to - off) as usize).min(buf.len());
        let n = match rustix::io::pread(src, &mut buf[..want], off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut done = 0;
        while done < n {
            match rustix::io::pwrite(dst, &buf[done..n], off + done as u64) {
                Ok(k) => done += k,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        off += n as u64;
    }
    Ok(())
}

/// Copies owner, mode (not for symlinks), times and non-overlay xattrs from `lparent/lname` to
/// `dir/name`.
fn copy_meta_at(
    stack: &LayerStack,
    lparent: &OwnedFd,
    lname: &CStr,
    st: &Stat,
    dir: impl AsFd,
    name: &CStr,
) -> Result<()> {
    let dir = dir.as_fd();
    let ft = FileType::from_raw_mode(st.st_mode);
    for key in sys::list_xattrs(lparent, Some(lname))? {
        if !carried(stack, key.as_encoded_bytes()) {
            continue;
        }
        let key = std::ffi::CString::new(key.as_encoded_bytes()).map_err(|_| Errno::INVAL)?;
        if let Some(v) = sys::get_xattr(lparent, Some(lname), &key)? {
            if let Err(e) = sys::set_xattr(dir, Some(name), &key, &v, 0) {
                // user.* xattrs are not allowed on symlinks and special files on some filesystems.
                if !matches!(e.errno(), Errno::PERM | Errno::NOTSUP) {
                    return Err(e);
                }
            }
        }
    }
    rustix::fs::chownat(dir, name, Some(uid(st.st_uid)), Some(gid(st.st_gid)), AtFlags::SYMLINK_NOFOLLOW)?;
    if ft != FileType::Symlink {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(st.st_mode & 0o7777), AtFlags::empty())?;
    }
    rustix::fs::utimensat(dir, name, &times_of(st), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Whether copy-up carries the xattr `key`: not overlay metadata of either namespace, nor (on a
/// stack reading fuse-overlayfs's layers) fuse-overlayfs's own.
fn carried(stack: &LayerStack, key: &[u8]) -> bool {
    let foreign = stack.reads_aufs() && ovl_core::aufs::is_fuse_overlayfs_metadata(key);
    !XattrNames::is_any_overlay(key) && !foreign
}

fn copy_xattrs(stack: &LayerStack, lparent: &OwnedFd, lname: &CStr, dst: &OwnedFd) -> Result<()> {
    for key in sys::list_xattrs(lparent, Some(lname))? {
        if !carried(stack, key.as_encoded_bytes()) {
            continue;
        }
        let key = std::ffi::CString::new(key.as_encoded_bytes()).map_err(|_| Errno::INVAL)?;
        if let Some(v) = sys::get_xattr(lparent, Some(lname), &key)? {
            rustix::fs::fsetxattr(dst, &key, &v, rustix::fs::XattrFlags::empty())?;
        }
    }
    Ok(())
}

pub(crate) fn times_of(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
        last_modification: Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
    }
}

fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}
fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}
