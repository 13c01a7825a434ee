//! The calls rustix does not wrap for us: the supplementary groups of a Unix socket's peer
//! (`SO_PEERGROUPS`, Linux 4.13), which the control socket's authorization needs besides
//! `SO_PEERCRED`; and glibc's allocator settings, with which the daemon's memory stays near what
//! it uses ([`bound_malloc_arenas`], [`trim_heap`]). The only `unsafe` in snap-fs.

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

/// Lets the allocator keep at most `arenas` arenas (glibc; elsewhere nothing happens). glibc gives
/// threads arenas of their own, up to eight per CPU, and each keeps what was freed in it: the
/// snapshot daemon, whose threads take turns building and dropping large tables (view stacks,
/// summaries, the store's records at every take), held several copies of its high-water mark
/// (at 10,000 snapshots, +13 MiB in 100 takes with glibc's default, +2.3 MiB with one arena).
/// Call it before the process starts threads: arenas made already stay.
pub fn bound_malloc_arenas(arenas: u32) {
    #[cfg(target_env = "gnu")]
    {
        let n = i32::try_from(arenas.max(1)).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` only sets a parameter of glibc's allocator, which it reads under its
        // own locks; it takes no pointers and changes no memory the program holds.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } != 1 {
            tracing::warn!("the allocator refused a bound of {n} arenas");
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
}

/// Gives the pages of freed memory back to the system (glibc's `malloc_trim`; elsewhere nothing
/// happens). Freed memory below memory still in use stays in the heap, and in the process's RSS,
/// until then.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` works under the allocator's own locks on memory no live allocation
    // holds; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}
