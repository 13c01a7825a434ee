//! `cargo xtask`: the project's own automation, written in Rust so it runs wherever cargo does.
//!
//! `cargo xtask` is an alias (see `.cargo/config.toml`) for `cargo run --package xtask --`.
//!
//! What this crate owns:
//! - `test` / `ci`: check the machine (root, `/dev/fuse`, the kernel's overlay, the tools the tests shell
//!   out to; install missing packages with apt-get when root), then `cargo fmt --check`, `cargo clippy`
//!   and `cargo test` over the workspace. `.ci/run` ends in `cargo xtask test`.
//! - `install`: release build of the binaries, copied into `PREFIX/bin`.
//! - `mount`: a sample set of layers in a directory, mounted with `ovlfs`, left for a person to explore.
//! - `demo`: the product end to end with narrated steps, checking each result and cleaning up after itself.
//! - `bench-compare`: the same workload on the kernel's overlay, fuse-overlayfs and ovlfs; medians and ratios;
//!   and ovlsnap's snapshots (take latency, write throughput with a snapshot).
//! - `bench-snapshots`: ovlsnap's snapshots grown to 10,000 on a 20k-file tree, take, list, diff, delete,
//!   cold walks of the oldest and newest view, the daemon's descriptors and memory and the kernel mount of
//!   the oldest snapshot at N = 1, 100, 1000, 10000; btrfs snapshots alongside (issue 17).
//! - `bench-podman`: podman builds and runs on the kernel's overlay driver, fuse-overlayfs and ovlfs.
//! - `stress`: random file operations from several workers with data checks, through ovlfs and through an
//!   ovlsnap mount taking and deleting snapshots; fails on mismatches, hangs, leaked descriptors.
//!
//! Architecture Invariant: xtask knows nothing about the workspace's crates as code. It never depends on
//! them; it only builds them with cargo and runs the binaries they produce, exactly as a user would.
//! It stays small: `anyhow` and `clap` only, no `unsafe`, no libc.

mod bench;
mod bench_podman;
mod bench_snapshots;
mod cmd;
mod demo;
mod dist;
mod fuzz;
mod install;
mod mount;
mod mountinfo;
mod pictures;
mod prereqs;
mod sample;
mod stress;
mod testing;
mod tidy;
mod tree;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Project automation for ovlsnap.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check prerequisites, then run fmt, clippy and the whole test suite.
    Test {
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- copy_up` or `-- -- --nocapture`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// What CI runs after installing packages (same as `test`).
    Ci,
    /// Build release binaries and copy them into PREFIX/bin.
    Install {
        /// Installation prefix.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Release binaries, shell completions, man pages and examples (fstab, systemd) into
    /// target/dist/.
    Dist,
    /// Fuzz the decoders of untrusted input (needs nightly and cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Targets (default: all).
        targets: Vec<String>,
    },
    /// Draw the SVG pictures in docs/pictures/ from their text sources.
    Pictures,
    /// Build ovlfs, create sample layers in DIR and mount them at DIR/mnt.
    Mount {
        /// Where to put the layers and the mount point.
        #[arg(long, default_value = "/tmp/ovlfs-demo")]
        dir: PathBuf,
    },
    /// Show ovlfs end to end on sample layers, then clean up (needs root).
    Demo,
    /// Time the kernel overlay, fuse-overlayfs and a release ovlfs on the same layers, and a
    /// release ovlsnap's snapshots (needs root).
    BenchCompare {
        /// One run instead of five (same overlay workload; fewer snapshot takes, 64 MiB snapshot
        /// writes): under a minute instead of a few.
        #[arg(long)]
        quick: bool,
        /// Print the results as JSON on stdout (the table and progress go to stderr).
        #[arg(long)]
        json: bool,
        /// Repetitions of each measurement (default: 5, or 1 with --quick); the median is reported.
        /// Snapshot takes are repeated 15 times per tree and way (7 with --quick) regardless.
        #[arg(long)]
        runs: Option<usize>,
        /// Run only this phase (e.g. `--only snapshots` for ovlsnap alone).
        #[arg(long, value_enum, value_name = "PHASE")]
        only: Option<bench::Phase>,
    },
    /// Grow ovlsnap's snapshots of a 20k-file tree (a few files changed before each take) to
    /// 10,000 and time, at N = 1, 100, 1000 and 10000: take, list, diff, delete, a cold walk of
    /// the oldest and of the newest snapshot, the first copy-on-write write, the daemon's
    /// descriptors and memory, and the kernel mount `ovlsnap mount-cmd` prints for the oldest
    /// snapshot; the same for btrfs snapshots alongside (needs root).
    BenchSnapshots {
        /// Grow to 1000 snapshots (checkpoints 1, 100, 1000): under ten minutes.
        #[arg(long, conflicts_with = "max")]
        quick: bool,
        /// Grow to N snapshots (default 10000); checkpoints 1, 100, 1000, 10000 below N, and N.
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        /// Files overwritten in LIVE before each take, picked at random across the tree.
        #[arg(long, default_value_t = 10)]
        changes: usize,
        /// Seed of the choice of files.
        #[arg(long, default_value_t = 17)]
        seed: u64,
        /// Seconds a cold walk of one view may take before it is stopped and recorded as a timeout.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        walk_timeout: u64,
        /// Measure only this system.
        #[arg(long, value_enum, value_name = "SYSTEM")]
        only: Option<bench_snapshots::System>,
        /// Print the results as JSON on stdout (the table and progress go to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Used by bench-snapshots: walk DIR (readdir and lstat of every entry) and print the
    /// entries and the milliseconds, in a process of its own so that a slow walk can be killed.
    #[command(hide = true)]
    BenchSnapshotsWalk {
        /// The tree to walk.
        dir: PathBuf,
    },
    /// Time podman on the kernel's overlay driver, with fuse-overlayfs and with a release
    /// ovlfs as its mount program: `podman build --no-cache` of a multi-step image and 10 x
    /// `podman run --rm`, interleaved rounds, medians and ratios (needs root and podman).
    BenchPodman {
        /// Rounds; each backend is measured once per round and the median reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Keep one core busy with a spinning thread during the measurements.
        #[arg(long)]
        load: bool,
    },
    /// Random file operations with data checks from several workers at once, through ovlfs
    /// over two lower layers and through an ovlsnap mount taking a snapshot every few seconds
    /// and deleting old ones (with `--fsx N`, fsx-style writers on LIVE files and every kept
    /// snapshot compared after each delete); fails on a data mismatch, a stuck operation,
    /// descriptors the daemon leaks or gross growth of its memory (needs root).
    Stress(stress::Options),
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line; no backtrace: these are user-facing.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Test { cargo_test_args } => testing::run(&cargo_test_args),
        Task::Ci => testing::run(&[]),
        Task::Install { prefix } => install::run(&prefix),
        Task::Mount { dir } => mount::run(&dir),
        Task::Demo => demo::run(),
        Task::Dist => dist::run(),
        Task::Pictures => pictures::run(),
        Task::Fuzz { secs, targets } => fuzz::run(secs, &targets),
        Task::BenchCompare { quick, json, runs, only } => bench::run(&bench::Options { quick, json, runs, only }),
        Task::BenchSnapshots { quick, max, changes, seed, walk_timeout, only, json } => {
            bench_snapshots::run(&bench_snapshots::Options {
                quick,
                max,
                changes,
                seed,
                walk_timeout: std::time::Duration::from_secs(walk_timeout),
                json,
                only,
            })
        }
        Task::BenchSnapshotsWalk { dir } => bench_snapshots::walk_child(&dir),
        Task::BenchPodman { rounds, load } => bench_podman::run(&bench_podman::Options { rounds, load }),
        Task::Stress(o) => stress::run(&o),
    }
}

/// The workspace root: xtask lives at `ROOT/crates/xtask`.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("xtask lives two levels below the workspace root")
}

/// Cargo's target directory for the workspace, honouring `CARGO_TARGET_DIR` as cargo does.
fn target_dir() -> PathBuf {
    let configured = std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .filter(|dir| !dir.is_empty());
    match configured {
        // cargo resolves a relative target dir against its working directory, which for us is the root.
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo_test() {
        let cli = Cli::parse_from(["xtask", "test", "--", "-p", "ovl-core", "--", "--nocapture"]);
        let Task::Test { cargo_test_args } = cli.task else {
            panic!("expected the test task");
        };
        assert_eq!(cargo_test_args, ["-p", "ovl-core", "--", "--nocapture"]);
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("crates/xtask").is_dir());
    }
}
