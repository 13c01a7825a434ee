//! The integration tests of ovl-fs, one test binary (STYLE.md): real mounts of `ovlfs` and of the
//! kernel overlay (the oracle) over the same layers, as root, in temp dirs. Each module is one
//! concern and says what it checks and which environment variables it reads; `common` holds the
//! mounts, guards, layer fixtures and recordings they share.
//!
//! Run everything with `cargo test -p ovl-fs --test it`, one module with its path as a filter
//! (`cargo test -p ovl-fs --test it crash::`), one test with `-- --exact`
//! (`cargo test -p ovl-fs --test it -- --exact ops::read_only_without_upper`).

mod common;

mod acl;
mod aufs;
mod check;
mod copyup;
mod crash;
mod differential;
mod hostile;
mod limits;
mod ops;
mod passthrough;
mod permissions;
mod podman;
mod uring;
