//! The directory-relative xattr syscalls of Linux 6.13 (`getxattrat`, `setxattrat`,
//! `listxattrat`, `removexattrat`). Without them an xattr of `name` in a directory fd has to be
//! reached through `/proc/self/fd/N/NAME`, a path walk through procfs and a magic link that cost
//! about 3 us more per call; a readdirplus lists the xattrs of every entry. No libc or rustix
//! wraps these calls yet, so they are raw `syscall(2)`s here. Each returns `None` when the kernel
//! (or a seccomp filter) does not know the call, and the caller falls back to the procfs path;
//! the first `ENOSYS` is remembered so later calls skip straight to the fallback. `AT_EMPTY_PATH`
//! on the `O_PATH` descriptors the layers are held by gives `EBADF`, so an object's own xattrs go
//! through its `.` when it is a directory (`sys::via_at`) and keep the procfs path otherwise.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;

// The generic syscall table, shared by every architecture since Linux 5.1 (syscall 424 on).
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// `struct xattr_args` of the uapi.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Cleared at the first `ENOSYS`.
static AVAILABLE: AtomicBool = AtomicBool::new(true);

/// `at_flags` for a name in a directory: `l*xattr` semantics.
const AT: libc::c_uint = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;

/// Turns a raw return into `Some(Ok(n))`, `Some(Err(errno))`, or `None` for `ENOSYS`.
fn outcome(rc: libc::c_long) -> Option<Result<usize, Errno>> {
    if rc >= 0 {
        return Some(Ok(rc as usize));
    }
    let errno = Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
    if errno == Errno::NOSYS {
        AVAILABLE.store(false, Ordering::Relaxed);
        return None;
    }
    Some(Err(errno))
}

/// `getxattrat` into `buf`: the value's length.
pub(super) fn get(dir: BorrowedFd<'_>, name: &CStr, key: &CStr, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let mut args = XattrArgs { value: buf.as_mut_ptr() as u64, size: buf.len() as u32, flags: 0 };
    // SAFETY: `name` and `key` are NUL-terminated and outlive the call; `args` points at `buf`,
    // valid for writes of `buf.len()` bytes, and its size is passed as the struct's size.
    let rc = unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            AT,
            key.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    outcome(rc)
}

/// `setxattrat` with `flags` (`XATTR_CREATE`/`XATTR_REPLACE`).
pub(super) fn set(dir: BorrowedFd<'_>, name: &CStr, key: &CStr, value: &[u8], flags: u32) -> Option<Result<(), Errno>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let mut args = XattrArgs { value: value.as_ptr() as u64, size: value.len() as u32, flags };
    // SAFETY: `name` and `key` are NUL-terminated and outlive the call; `args` points at
    // `value`, valid for reads of `value.len()` bytes (the kernel only reads it).
    let rc = unsafe {
        libc::syscall(
            SYS_SETXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            AT,
            key.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    outcome(rc).map(|r| r.map(|_| ()))
}

/// `listxattrat` into `buf`: the length of the NUL-separated list.
pub(super) fn list(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `name` is NUL-terminated and outlives the call; `buf` is valid for writes of
    // `buf.len()` bytes.
    let rc = unsafe { libc::syscall(SYS_LISTXATTRAT, dir.as_raw_fd(), name.as_ptr(), AT, buf.as_mut_ptr(), buf.len()) };
    outcome(rc)
}

/// `removexattrat`.
pub(super) fn remove(dir: BorrowedFd<'_>, name: &CStr, key: &CStr) -> Option<Result<(), Errno>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `name` and `key` are NUL-terminated and outlive the call.
    let rc = unsafe { libc::syscall(SYS_REMOVEXATTRAT, dir.as_raw_fd(), name.as_ptr(), AT, key.as_ptr()) };
    outcome(rc).map(|r| r.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn c(p: &std::path::Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    /// The `*at` calls act on the named object itself, as `l*xattr` on its full path do: a
    /// symlink's own attributes, never its target's.
    #[test]
    fn the_at_calls_agree_with_the_path_calls_and_never_follow_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink("target", tmp.path().join("link")).unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let dir = std::os::fd::AsFd::as_fd(&dir);
        let Some(r) = set(dir, c"link", c"trusted.t", b"on-link", 0) else {
            eprintln!("this kernel has no setxattrat: only the procfs path is in use");
            return;
        };
        r.unwrap();
        let link = c(&tmp.path().join("link"));
        let target = c(&tmp.path().join("target"));
        let mut buf = [0u8; 64];
        let n = rustix::fs::lgetxattr(link.as_c_str(), c"trusted.t", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"on-link");
        assert_eq!(rustix::fs::getxattr(target.as_c_str(), c"trusted.t", &mut buf), Err(Errno::NODATA));

        rustix::fs::lsetxattr(target.as_c_str(), c"trusted.u", b"on-target", rustix::fs::XattrFlags::empty()).unwrap();
        let n = get(dir, c"target", c"trusted.u", &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"on-target");
        assert_eq!(get(dir, c"link", c"trusted.u", &mut buf).unwrap(), Err(Errno::NODATA));
        assert_eq!(get(dir, c"target", c"trusted.u", &mut [0u8; 2]).unwrap(), Err(Errno::RANGE));

        let n = list(dir, c"link", &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"trusted.t\0");
        assert_eq!(set(dir, c"link", c"trusted.t", b"again", libc::XATTR_CREATE as u32).unwrap(), Err(Errno::EXIST));
        remove(dir, c"link", c"trusted.t").unwrap().unwrap();
        assert_eq!(list(dir, c"link", &mut buf).unwrap(), Ok(0));
        assert_eq!(remove(dir, c"missing", c"trusted.t").unwrap(), Err(Errno::NOENT));
    }

    /// An object's own xattrs and times, through an `O_PATH` descriptor: a directory by its `.`,
    /// anything else (here a file and a symlink) by the procfs path; both reach the object itself.
    #[test]
    fn own_xattrs_and_times_reach_dirs_files_and_symlinks_through_o_path() {
        use crate::sys;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
        let root = std::fs::File::open(tmp.path()).unwrap();
        for (i, name) in ["d", "f", "l"].into_iter().enumerate() {
            let fd = rustix::fs::openat(
                &root,
                name,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            let fd = std::os::fd::AsFd::as_fd(&fd);
            sys::set_xattr(fd, None, c"trusted.own", name.as_bytes(), 0).unwrap();
            assert_eq!(sys::get_xattr(fd, None, c"trusted.own").unwrap().as_deref(), Some(name.as_bytes()));
            let path = c(&tmp.path().join(name));
            let mut buf = [0u8; 16];
            let n = rustix::fs::lgetxattr(path.as_c_str(), c"trusted.own", &mut buf).unwrap();
            assert_eq!(&buf[..n], name.as_bytes(), "{name}: the object itself, not a symlink's target");
            assert!(sys::list_xattrs(fd, None).unwrap().iter().any(|x| x == "trusted.own"));
            sys::remove_xattr(fd, None, c"trusted.own").unwrap();
            assert_eq!(sys::get_xattr(fd, None, c"trusted.own").unwrap(), None);
            let when = rustix::fs::Timespec { tv_sec: 1_000_000 + i as i64, tv_nsec: 5 };
            sys::set_times(fd, &rustix::fs::Timestamps { last_access: when, last_modification: when }).unwrap();
            let st = rustix::fs::lstat(path.as_c_str()).unwrap();
            assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_000_000 + i as i64, 5), "{name}");
        }
        assert_eq!(
            std::fs::metadata(tmp.path().join("f")).unwrap().modified().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::new(1_000_001, 5)
        );
    }
}
