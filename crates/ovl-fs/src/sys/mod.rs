//! The `ovlfs` binary's one system call without a safe wrapper: `fork`, with which the daemon
//! goes to the background without a second `exec` of the binary (about 1 ms of the ~3 ms from
//! start to a live mount, and podman starts the mount program once per container and twice per
//! build step). The only `unsafe` in ovl-fs.

use std::io;

/// Which side of a [`fork`] we are on.
pub enum Forked {
    /// The new process.
    Child,
    /// The old one, with the child's process id.
    Parent(rustix::process::Pid),
}

/// True if this process has exactly one thread (`/proc/self/task`).
fn single_threaded() -> io::Result<bool> {
    let mut tasks = std::fs::read_dir("/proc/self/task")?;
    Ok(tasks.next().is_some() && tasks.next().is_none())
}

/// Forks this process. Refused (`EBUSY`) unless it is single-threaded: a child of a process
/// with other threads may find a lock (the allocator's, say) held forever, and it goes on to run
/// the whole daemon.
pub fn fork() -> io::Result<Forked> {
    if !single_threaded()? {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    // SAFETY: the process has one thread (checked just above; nothing starts one in between, as
    // this thread is the one running here), so the child gets every lock in the state this
    // thread left it, and may allocate and run any code, as after an ordinary start.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(rustix::process::Pid::from_raw(p).ok_or_else(|| io::Error::other("fork: bad pid"))?)),
    }
}
