//! Thin wrappers over the syscalls that touch a layer. Every path inside a layer is resolved
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the layer's root, so neither a
//! hostile symlink nor a `..` in a layer can lead outside it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::Result;

mod blank;
mod handle;
mod xattr_at;
pub use blank::blank_stat;
pub use handle::{FileHandle, fd_to_handle, fs_uuid, name_to_handle, open_by_handle};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// A relative path inside a layer as a C string; the empty path is the layer root (`.`).
pub fn rel_cstr(rel: &Path) -> CString {
    let b = rel.as_os_str().as_bytes();
    if b.is_empty() { c".".to_owned() } else { CString::new(b).unwrap_or_else(|_| c"\u{1}invalid".to_owned()) }
}

/// A single name as a C string; names with `/` or NUL, `.` and `..` give `EINVAL`.
pub fn name_cstr(name: &OsStr) -> Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::INVAL.into());
    }
    Ok(CString::new(b).map_err(|_| Errno::INVAL)?)
}

/// The longest path the kernel resolves in one call, its NUL included (`PATH_MAX`).
const PATH_MAX: usize = libc::PATH_MAX as usize;

/// Opens `rel` beneath `root` (never following symlinks on the way). A path longer than one
/// call resolves (a tree deeper than `PATH_MAX` bytes, which a kernel overlay serves) is opened
/// a piece of whole names at a time, each beneath the directory the last one opened.
pub fn open_beneath(root: impl AsFd, rel: &Path, flags: OFlags, mode: Mode) -> Result<OwnedFd> {
    let mut rest = rel.as_os_str().as_bytes();
    let mut dir: Option<OwnedFd> = None;
    while rest.len() >= PATH_MAX {
        // Cut after the last whole name that fits; a single name that long cannot exist.
        let cut = rest[..PATH_MAX].iter().rposition(|&b| b == b'/').filter(|&i| i > 0).ok_or(Errno::NAMETOOLONG)?;
        let head = CString::new(&rest[..cut]).map_err(|_| Errno::INVAL)?;
        let at = dir.as_ref().map_or(root.as_fd(), |d| d.as_fd());
        let next =
            rustix::fs::openat2(at, &head, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), RESOLVE)?;
        dir = Some(next);
        rest = &rest[cut + 1..];
    }
    let p = rel_cstr(Path::new(OsStr::from_bytes(rest)));
    let at = dir.as_ref().map_or(root.as_fd(), |d| d.as_fd());
    Ok(rustix::fs::openat2(at, &p, flags | OFlags::CLOEXEC, mode, RESOLVE)?)
}

/// Opens the directory `rel` beneath `root` as an `O_PATH` handle.
pub fn open_dir_path(root: impl AsFd, rel: &Path) -> Result<OwnedFd> {
    open_beneath(root, rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
}

/// Splits `rel` into its parent dir fd (opened beneath `root`) and final name.
/// The root itself has no parent: `EINVAL`.
pub fn open_parent(root: impl AsFd, rel: &Path) -> Result<(OwnedFd, CString)> {
    let name = rel.file_name().ok_or(Errno::INVAL)?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((open_dir_path(root, parent)?, name_cstr(name)?))
}

/// `lstat` of `rel` beneath `root`.
pub fn lstat_beneath(root: impl AsFd, rel: &Path) -> Result<Stat> {
    if rel.as_os_str().is_empty() {
        return Ok(rustix::fs::fstat(root)?);
    }
    let (dir, name) = open_parent(root, rel)?;
    Ok(rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// `lstat` of `name` in the directory `dir`.
pub fn lstat_at(dir: impl AsFd, name: &CStr) -> Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The `/proc/self/fd/N/NAME` path that names `name` in `dir` for the path-based xattr calls
/// (`l*xattr` do not follow the final symlink, and the directory is already resolved safely).
fn proc_path(dir: BorrowedFd<'_>, name: Option<&CStr>) -> CString {
    let mut s = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        s.push(b'/');
        s.extend_from_slice(n.to_bytes());
    }
    CString::new(s).expect("no NUL")
}

/// Runs a directory-relative xattr call for `name` in `dir`, or for `dir` itself through `.`
/// (which names a directory; any other object answers `ENOTDIR` there). `None`: take the
/// procfs path instead.
fn via_at<T>(
    name: Option<&CStr>,
    call: impl FnOnce(&CStr) -> Option<std::result::Result<T, Errno>>,
) -> Option<std::result::Result<T, Errno>> {
    match (name, call(name.unwrap_or(c"."))) {
        (None, Some(Err(Errno::NOTDIR))) => None,
        (_, r) => r,
    }
}

/// Reads xattr `key` of `name` in `dir` (or of `dir` itself when `name` is `None`).
/// `Ok(None)` when the attribute does not exist or the fs does not support xattrs.
pub fn get_xattr(dir: impl AsFd, name: Option<&CStr>, key: &CStr) -> Result<Option<Vec<u8>>> {
    let dir = dir.as_fd();
    let mut buf = vec![0u8; 256];
    loop {
        let r = match via_at(name, |n| xattr_at::get(dir, n, key, &mut buf[..])) {
            Some(r) => r,
            None => {
                let p = proc_path(dir, name);
                if name.is_some() {
                    rustix::fs::lgetxattr(&p, key, &mut buf[..])
                } else {
                    rustix::fs::getxattr(&p, key, &mut buf[..])
                }
            }
        };
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::NODATA) | Err(Errno::NOTSUP) => return Ok(None),
            Err(Errno::RANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 8, 0),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets xattr `key` on `name` in `dir` (or on `dir` itself).
pub fn set_xattr(dir: impl AsFd, name: Option<&CStr>, key: &CStr, value: &[u8], flags: i32) -> Result<()> {
    let dir = dir.as_fd();
    if let Some(r) = via_at(name, |n| xattr_at::set(dir, n, key, value, flags as u32)) {
        return Ok(r?);
    }
    let p = proc_path(dir, name);
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    if name.is_some() {
        rustix::fs::lsetxattr(&p, key, value, flags)?;
    } else {
        rustix::fs::setxattr(&p, key, value, flags)?;
    }
    Ok(())
}

/// Removes xattr `key` from `name` in `dir` (or from `dir` itself).
pub fn remove_xattr(dir: impl AsFd, name: Option<&CStr>, key: &CStr) -> Result<()> {
    let dir = dir.as_fd();
    if let Some(r) = via_at(name, |n| xattr_at::remove(dir, n, key)) {
        return Ok(r?);
    }
    let p = proc_path(dir, name);
    if name.is_some() {
        rustix::fs::lremovexattr(&p, key)?;
    } else {
        rustix::fs::removexattr(&p, key)?;
    }
    Ok(())
}

/// Lists the xattr names of `name` in `dir` (or of `dir` itself).
pub fn list_xattrs(dir: impl AsFd, name: Option<&CStr>) -> Result<Vec<OsString>> {
    let dir = dir.as_fd();
    let mut buf = vec![0u8; 1024];
    loop {
        let r = match via_at(name, |n| xattr_at::list(dir, n, &mut buf[..])) {
            Some(r) => r,
            None => {
                let p = proc_path(dir, name);
                if name.is_some() {
                    rustix::fs::llistxattr(&p, &mut buf[..])
                } else {
                    rustix::fs::listxattr(&p, &mut buf[..])
                }
            }
        };
        match r {
            Ok(n) => {
                buf.truncate(n);
                break;
            }
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 8, 0),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(buf.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| OsString::from_vec(s.to_vec())).collect())
}

/// Sets atime and mtime of the object `fd` refers to (works on `O_PATH` descriptors).
pub fn set_times(fd: BorrowedFd<'_>, times: &rustix::fs::Timestamps) -> Result<()> {
    // A directory is reached as its own `.`, without a walk through procfs.
    match rustix::fs::utimensat(fd, c".", times, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOTDIR) => {}
        r => return Ok(r?),
    }
    let p = proc_path(fd, None);
    rustix::fs::utimensat(rustix::fs::CWD, &p, times, AtFlags::empty())?;
    Ok(())
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// The entry's name (never `.` or `..`).
    pub name: OsString,
    /// The type from `d_type` (may be `Unknown` on some filesystems).
    pub file_type: rustix::fs::FileType,
    /// The inode number from `d_ino`.
    pub ino: u64,
}

/// Reads all entries of the directory `rel` beneath `root`, without `.` and `..`.
pub fn read_dir(root: impl AsFd, rel: &Path) -> Result<Vec<RawEntry>> {
    let fd = open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    read_dir_fd(fd)
}

/// Reads all entries of an open directory, without `.` and `..`. The directory is opened afresh
/// (its own offset), so a descriptor read before, or a `dup` of one, still gives every entry.
pub fn read_dir_fd(fd: OwnedFd) -> Result<Vec<RawEntry>> {
    let fresh = rustix::fs::openat(&fd, c".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    drop(fd);
    let mut dir = rustix::fs::Dir::new(fresh)?;
    let mut out = Vec::new();
    while let Some(e) = dir.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(RawEntry { name: OsString::from_vec(name.to_vec()), file_type: e.file_type(), ino: e.ino() });
    }
    Ok(out)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it.
pub fn remove_tree_at(dir: impl AsFd, name: &CStr) -> Result<()> {
    let dir = dir.as_fd();
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let sub2 = rustix::io::dup(&sub)?;
    for e in read_dir_fd(sub2)? {
        remove_tree_at(&sub, &name_cstr(&e.name)?)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes `depth` nested dirs named `name` under `root`; returns the relative path.
    fn deep(root: &Path, name: &str, depth: usize) -> std::path::PathBuf {
        let mut dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..depth {
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)).unwrap();
            dir = rustix::fs::openat(&dir, name, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        }
        (0..depth).map(|_| name).collect()
    }

    #[test]
    fn paths_longer_than_one_call_resolves_open_piece_by_piece_and_stay_beneath() {
        let tmp = tempfile::tempdir().unwrap();
        let root = rustix::fs::open(tmp.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let name = "d".repeat(100);
        let rel = deep(tmp.path(), &name, 90);
        assert!(rel.as_os_str().len() > 2 * PATH_MAX, "{}", rel.as_os_str().len());
        let dir = open_beneath(&root, &rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        rustix::fs::mkdirat(&dir, "end", Mode::from_raw_mode(0o755)).unwrap();
        let file = rel.join("end/f");
        let fd = open_beneath(&root, &file, OFlags::WRONLY | OFlags::CREATE, Mode::from_raw_mode(0o644)).unwrap();
        rustix::io::write(&fd, b"deep").unwrap();
        assert_eq!(lstat_beneath(&root, &file).unwrap().st_size, 4);
        // Missing on the way, and a name too long to exist, as for a short path.
        let missing = rel.join("nope/f");
        assert_eq!(open_beneath(&root, &missing, OFlags::RDONLY, Mode::empty()).unwrap_err().errno(), Errno::NOENT);
        let long = Path::new(&"x".repeat(PATH_MAX + 10)).to_owned();
        assert_eq!(open_beneath(&root, &long, OFlags::RDONLY, Mode::empty()).unwrap_err().errno(), Errno::NAMETOOLONG);
        // A symlink far down is not followed, and `..` cannot climb out of a piece.
        let half: std::path::PathBuf = rel.iter().take(60).collect();
        let at = open_beneath(&root, &half, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        rustix::fs::symlinkat("/etc", &at, "link").unwrap();
        let through = half.join("link/passwd");
        let err = |p: &Path| open_beneath(&root, p, OFlags::RDONLY, Mode::empty()).unwrap_err().errno();
        assert_eq!(err(&through.join("x").join(&rel).join("y")), Errno::LOOP);
        let climb: std::path::PathBuf = rel.iter().chain(std::iter::repeat_n(OsStr::new(".."), 95)).collect();
        assert_eq!(err(&climb.join("etc/passwd")), Errno::XDEV);
    }
}
