//! The one call the command line needs that no wrapper crate offers safely: putting `SIGPIPE`
//! back to its default, so `ovlsnap list | head` ends quietly as other Unix tools do instead of
//! panicking on a closed stdout (Rust ignores `SIGPIPE`). The only `unsafe` in snap-cli.

/// Lets a write to a closed pipe end the process silently. Never for a daemon: a client that
/// goes away must not kill the mount.
pub fn default_sigpipe() {
    // SAFETY: `signal` with `SIG_DFL` installs no handler code; it only changes this process's
    // disposition of SIGPIPE, which nothing else in the client relies on.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
