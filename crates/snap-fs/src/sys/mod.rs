//! The one system call rustix does not wrap for us: the supplementary groups of a Unix socket's
//! peer (`SO_PEERGROUPS`, Linux 4.13), which the control socket's authorization needs besides
//! `SO_PEERCRED`. The only `unsafe` in snap-fs.

use std::os::fd::{AsFd, AsRawFd};

/// The supplementary groups the peer of `sock` had when it connected (or listened), as the
/// kernel recorded them: nothing the peer says.
pub fn peer_groups(sock: impl AsFd) -> std::io::Result<Vec<u32>> {
    let fd = sock.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes, and `len` is a valid
        // out-pointer; the kernel writes at most `len` bytes and updates `len`.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` says how big it must be.
        if err.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(err);
        }
        groups.resize(needed, 0);
    }
}
