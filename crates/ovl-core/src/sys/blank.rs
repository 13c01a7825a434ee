//! A `stat` record made from stored attributes instead of a system call (layer summaries,
//! `crate::presence`): the one `unsafe` line it needs.

use rustix::fs::Stat;

/// A `stat` record of all zeros, to fill in field by field.
pub fn blank_stat() -> Stat {
    // SAFETY: `Stat` is the kernel's plain-data `struct stat` (integers only, padding included);
    // all zero bytes is a valid value of it.
    unsafe { std::mem::zeroed() }
}
