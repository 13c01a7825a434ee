//! The integration tests of ovlsnap, one test binary (STYLE.md): the `ovlsnap` command run for
//! real (mounts over LIVE, takes, views, streams, the stock kernel overlay mounting snapshots),
//! as root with `/dev/fuse`, in temp dirs. Each module is one concern and says what it checks and
//! which environment variables it reads; `common` holds the CLI runner, the mount guards and tree
//! recordings they share, `crash_support` the harness of the crash tests.
//!
//! Run everything with `cargo test -p snap-cli --test it`, one module with its path as a filter
//! (`cargo test -p snap-cli --test it crash::`), one test with `-- --exact`
//! (`cargo test -p snap-cli --test it -- --exact crash::take`).

mod common;
mod crash_support;

mod big_copy;
mod check;
mod cli;
mod crash;
mod failures;
mod fd_limits;
mod hardlinks;
mod holds;
mod lifecycle;
mod model;
mod mount_cmd;
mod oci;
mod odd_names;
mod open_files;
mod security;
mod snapshot_stress;
mod stream;
mod summaries;
mod timeline;
mod view_names;
