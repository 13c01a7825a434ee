//! What an unprivileged mounter (rootless podman: a user namespace) may write into the upper
//! layer, probed once when a writable stack opens, as the kernel probes its upper fs at mount.
//!
//! `trusted.*` xattrs need `CAP_SYS_ADMIN` in the initial user namespace; without it the stack
//! uses `user.overlay.*`, as the kernel's `userxattr` option does (podman never passes that
//! option to a mount program). A 0/0 character device (the kernel's whiteout) may be made by
//! anyone since Linux 5.8, inside a user namespace too (`vfs_mknod` exempts it from
//! `CAP_MKNOD`), which is what the kernel's own unprivileged overlay relies on; only where the
//! upper fs still refuses it (older kernels, some security modules) are whiteouts written as
//! `.wh.NAME` files, the encoding fuse-overlayfs falls back to (see [`crate::aufs`]).

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use crate::{Result, sys};

/// What the upper layer's filesystem lets this process write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperCaps {
    /// `trusted.overlay.*` xattrs can be set.
    pub trusted_xattrs: bool,
    /// A 0/0 character device can be made.
    pub whiteout_devices: bool,
}

/// Probes `WORKDIR/work` (open as `work`): sets and removes `trusted.overlay.opaque` (unless
/// `userxattr` already says not to use it), makes and removes a whiteout. Only `EPERM` counts
/// as "not allowed"; any other failure is left for the real operation to report.
pub fn probe_upper(work: impl std::os::fd::AsFd, userxattr: bool) -> Result<UpperCaps> {
    let work = work.as_fd();
    let trusted_xattrs = userxattr || probe_trusted(work)?;
    if !trusted_xattrs {
        tracing::warn!(
            "cannot set trusted.* xattrs on the upper layer (unprivileged, as in a user namespace): \
             using user.overlay.* as with the userxattr option"
        );
    }
    let whiteout_devices = probe_mknod(work)?;
    if !whiteout_devices {
        tracing::warn!(
            "the upper layer refuses 0/0 character devices: writing whiteouts as .wh.NAME files, as fuse-overlayfs does"
        );
    }
    Ok(UpperCaps { trusted_xattrs, whiteout_devices })
}

fn probe_trusted(work: BorrowedFd<'_>) -> Result<bool> {
    let key = c"trusted.overlay.opaque";
    match sys::set_xattr(work, None, key, b"0", 0) {
        Ok(()) => {
            sys::remove_xattr(work, None, key)?;
            Ok(true)
        }
        Err(e) if e.errno() == Errno::PERM => Ok(false),
        Err(_) => Ok(true),
    }
}

fn probe_mknod(work: BorrowedFd<'_>) -> Result<bool> {
    let name = std::ffi::CString::new(format!("#ovl.probe.{}", std::process::id())).expect("no NUL");
    match crate::make_whiteout(work, &name) {
        Ok(()) => {
            rustix::fs::unlinkat(work, &name, rustix::fs::AtFlags::empty())?;
            Ok(true)
        }
        Err(e) if e.errno() == Errno::PERM => Ok(false),
        Err(_) => Ok(true),
    }
}

/// Whether this process can read `trusted.*` xattrs (for a stack without a writable upper
/// layer, where nothing can be probed): `CAP_SYS_ADMIN` in its effective set and the initial
/// user namespace's identity uid map. When `/proc` cannot tell, assumes yes.
pub fn may_read_trusted() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    if cap_eff.is_some_and(|c| c & (1 << CAP_SYS_ADMIN) == 0) {
        return false;
    }
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields.is_empty() || fields == ["0", "0", "4294967295"]
        }
        Err(_) => true,
    }
}
