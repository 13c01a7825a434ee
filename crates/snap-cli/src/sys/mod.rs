//! The calls no wrapper crate offers safely: putting `SIGPIPE` back to its default, so `ovlsnap
//! list | head` ends quietly as other Unix tools do instead of panicking on a closed stdout
//! (Rust ignores `SIGPIPE`), and glibc's `mallopt`, with which the daemon bounds its
//! allocator's arenas. The only `unsafe` in snap-cli.

/// Lets a write to a closed pipe end the process silently. Never for a daemon: a client that
/// goes away must not kill the mount.
pub fn default_sigpipe() {
    // SAFETY: `signal` with `SIG_DFL` installs no handler code; it only changes this process's
    // disposition of SIGPIPE, which nothing else in the client relies on.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
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
