//! Criterion benchmarks of ovlsnap's hot paths (issue 7): lookup through 1 and 10 layers,
//! merged readdir, whiteout creation, origin encode/decode, copy-up, the snapshot CoW check.
//!
//! This crate owns only measurements; it must not hold logic the filesystem needs. The
//! side-by-side comparison with the kernel overlay and fuse-overlayfs lives in `xtask`.
