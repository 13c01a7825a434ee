//! The open-file limit (`RLIMIT_NOFILE`) of a daemon. Every layer is held open and every file a
//! user of the mount opens is a descriptor of ours too, so a daemon raises its soft limit to the
//! hard one at start ([`raise`]); and before it starts something that needs descriptors to
//! finish (the mount, a snapshot) it checks that they are free ([`ensure_free`]): running out
//! midway would fail it half done or, for a mount, after it was reported live.

use std::fmt;

/// Descriptors kept free for serving besides what an operation needs: files users open, the
/// parent dirs a lookup opens, control connections.
pub const SERVE_RESERVE: usize = 16;

/// Raises the soft limit to the hard one (again at every check, so that a hard limit raised
/// with `prlimit --pid` counts at once); returns the limit in force (`u64::MAX`: none).
pub fn raise() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        if let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: lim.maximum, maximum: lim.maximum }) {
            tracing::warn!("raising the open-file limit to its hard limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The descriptors this process has open (`None`: none is free to count them with).
pub fn open_count() -> Option<usize> {
    // The listing's own descriptor is listed too.
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count().saturating_sub(1))
}

/// The size of this process's descriptor table (`FDSize` in /proc/self/status): above every
/// open descriptor, so at least their count.
fn fd_table_size() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("FDSize:")?.trim().parse().ok())
}

/// Too few free descriptors for what was about to start; nothing was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    /// Descriptors the operation needs free.
    pub need: usize,
    /// Descriptors open (`None`: so many that none was left to count them).
    pub open: Option<usize>,
    /// The limit in force.
    pub limit: u64,
    /// Whether the daemon already serves a mount (it can then be raised for the daemon itself).
    pub serving: bool,
}

impl Shortage {
    /// A hard limit that would do: what is open plus what is needed, rounded up generously.
    pub fn suggested(&self) -> u64 {
        let open = self.open.map_or(self.limit, |n| n as u64);
        (open + self.need as u64).next_power_of_two().max(1024)
    }
}

impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.open {
            Some(open) => write!(f, "{open} of the open-file limit of {} descriptors are in use", self.limit)?,
            None => write!(f, "all {} descriptors of the open-file limit are in use", self.limit)?,
        }
        write!(f, " and {} must be free: {}", self.need, advice(self.suggested(), self.serving))
    }
}

/// How to raise the limit to `s`, for a daemon that is `serving` or about to.
fn advice(s: u64, serving: bool) -> String {
    let mount = format!("`ulimit -n {s}` before `mount`, or `LimitNOFILE={s}` in its systemd unit");
    if serving {
        let pid = std::process::id();
        format!(
            "raise the hard limit (RLIMIT_NOFILE), here with `prlimit --pid {pid} --nofile={s}:{s}`, at the next mount with {mount}"
        )
    } else {
        format!("raise the hard limit (RLIMIT_NOFILE) with {mount}")
    }
}

impl std::error::Error for Shortage {}

/// Makes sure `need` descriptors are free under the limit (after raising the soft limit to the
/// hard one); `serving`: the daemon serves a mount already.
pub fn ensure_free(need: usize, serving: bool) -> Result<(), Shortage> {
    let limit = raise();
    // The size of the descriptor table bounds the count from above and costs one small read;
    // listing /proc/self/fd costs a dentry per descriptor (~3 ms at 2,800, each take at
    // N = 10,000 snapshots, issue 17). Counted only when the bound is not enough.
    if fd_table_size().is_some_and(|size| size.saturating_add(need as u64) <= limit) {
        return Ok(());
    }
    let open = open_count();
    let free = open.map_or(0, |n| limit.saturating_sub(n as u64));
    if free >= need as u64 { Ok(()) } else { Err(Shortage { need, open, limit, serving }) }
}

/// Whether `e` was caused by running out of descriptors (`EMFILE`).
pub fn is_emfile(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()))
            || c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::MFILE)
            || c.downcast_ref::<ovl_core::Error>().is_some_and(|o| o.errno() == rustix::io::Errno::MFILE)
    })
}

/// `e`, with advice on the open-file limit when it came from running out of descriptors while
/// a mount was being prepared.
pub fn explain(e: anyhow::Error) -> anyhow::Error {
    if !is_emfile(&e) {
        return e;
    }
    let limit = raise();
    let s = Shortage { need: SERVE_RESERVE, open: open_count(), limit, serving: false }.suggested();
    e.context(format!("out of descriptors under the open-file limit of {limit}: {}", advice(s, false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_table_bounds_the_open_count_from_above() {
        // A few hundred descriptors open, some high: the bound must still hold.
        let held: Vec<std::fs::File> = (0..300).map(|_| std::fs::File::open("/proc/self/status").unwrap()).collect();
        let size = fd_table_size().expect("FDSize in /proc/self/status");
        let open = open_count().unwrap() as u64;
        let highest = held.iter().map(|f| std::os::fd::AsRawFd::as_raw_fd(f) as u64).max().unwrap();
        assert!(size >= open && size > highest, "FDSize {size}, open {open}, highest {highest}");
    }
}
