//! `cargo xtask bench-snapshots [--quick | --max N] [--json]`: what ten thousand snapshots cost
//! (issue 17), for a release `ovlsnap` and, side by side, for btrfs's own snapshots.
//!
//! Each system gets a fresh loop image of its own (ext4 under ovlsnap, btrfs for btrfs) holding
//! the same LIVE tree ([`workload`]: 1000 dirs of 20 files of 100 bytes). Then the store grows
//! one snapshot at a time, [`Options::changes`] random files (seeded) overwritten in LIVE before
//! each take, and at the checkpoints N = 1, 100, 1000, 10000 (up to `--max`) [`growth`] measures:
//! take, list, diff and delete latency, a cold walk of the oldest and of the newest view (in a
//! child process with a timeout), the first copy-on-write write of a file, the daemon's
//! descriptors and memory, and whether the stock-kernel mount command `ovlsnap mount-cmd` prints
//! for the oldest snapshot mounts and shows the whole tree. Growing to 10,000 takes a while:
//! progress with an estimate of the time left goes to stderr.
//!
//! Only the tools' command lines are used, as a user would ([`snap`] for `ovlsnap`, [`btrfs`]
//! for `btrfs subvolume`); the table and the JSON are in [`results`]. Every mount, loop device
//! and scratch dir has a guard that undoes it on drop, on errors and panics too (not on Ctrl-C:
//! then unmount what is under `$TMPDIR/ovlfs-bench.PID` and `losetup -d` its devices by hand).

mod btrfs;
mod growth;
mod results;
mod snap;
mod workload;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::results::Results;
use crate::bench::layers::Scratch;
use crate::bench::{Pressure, build_release, progress};
use crate::prereqs;

/// What the user asked for.
pub struct Options {
    /// Grow to 1000 snapshots at most (checkpoints 1, 100, 1000).
    pub quick: bool,
    /// Grow to this many snapshots (default 10,000, or 1000 with `quick`).
    pub max: Option<usize>,
    /// Files overwritten in LIVE before each take.
    pub changes: usize,
    /// Seed of the choice of files to change.
    pub seed: u64,
    /// How long one cold walk of a view may take before it is stopped.
    pub walk_timeout: Duration,
    /// Print JSON on stdout (the table and the progress go to stderr).
    pub json: bool,
    /// Measure only this system.
    pub only: Option<System>,
}

/// A snapshotting system under measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum System {
    /// A release `ovlsnap` on ext4.
    Ovlsnap,
    /// `btrfs subvolume snapshot -r`, the reference.
    Btrfs,
}

impl System {
    /// The name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::Ovlsnap => "ovlsnap",
            System::Btrfs => "btrfs",
        }
    }
}

/// The checkpoints of the issue, the largest of them at most 10,000.
const CHECKPOINTS: [usize; 4] = [1, 100, 1000, 10_000];

/// The default `--max`, and the one of `--quick`.
const MAX_FULL: usize = 10_000;
const MAX_QUICK: usize = 1000;

/// What a run does, fixed before it starts.
pub struct Plan {
    /// The numbers of snapshots at which to measure, ascending; the last is the most grown to.
    pub checkpoints: Vec<usize>,
    /// Files changed before each take.
    pub changes: usize,
    /// Seed of the choice of files.
    pub seed: u64,
    /// Limit of one cold walk.
    pub walk_timeout: Duration,
}

impl Plan {
    /// The most snapshots the run grows to.
    pub fn max(&self) -> usize {
        *self.checkpoints.last().expect("a plan has checkpoints")
    }

    /// Size of each loop image: room for the tree and, per snapshot, the ~20 inodes and ~100 KiB
    /// a take with its changes costs (ext4's default of one inode per 16 KiB sets the size).
    pub fn image_gib(&self) -> u64 {
        4 + self.max().div_ceil(1000) as u64
    }
}

/// [`CHECKPOINTS`] up to `max`, and `max` itself.
fn checkpoints(max: usize) -> Vec<usize> {
    let mut points: Vec<usize> = CHECKPOINTS.into_iter().filter(|&n| n < max).collect();
    points.push(max);
    points
}

/// Runs the benchmark.
pub fn run(options: &Options) -> Result<()> {
    if !prereqs::is_root()? {
        bail!("bench-snapshots mounts filesystems, drops caches and sets up loop devices, so it must run as root");
    }
    let max = options.max.unwrap_or(if options.quick { MAX_QUICK } else { MAX_FULL });
    if max == 0 {
        bail!("--max must be at least 1");
    }
    let plan = Plan {
        checkpoints: checkpoints(max),
        changes: options.changes,
        seed: options.seed,
        walk_timeout: options.walk_timeout,
    };
    let systems: Vec<System> = options.only.map_or(vec![System::Ovlsnap, System::Btrfs], |s| vec![s]);
    let started = Instant::now();
    let pressure = Pressure::read();
    let mut results = Results::new(&plan, &systems);

    let ovlsnap = if systems.contains(&System::Ovlsnap) {
        progress("==> building release ovlsnap (cargo build --release -p snap-cli)");
        match build_release("snap-cli", "ovlsnap") {
            Err(err) if systems.len() == 1 => return Err(err),
            built => Some(built),
        }
    } else {
        None
    };
    let scratch = Scratch::create()?;
    progress(&format!(
        "==> {} snapshots, checkpoints {:?}, {} files changed per take (seed {}), walks stopped after {} s",
        plan.max(),
        plan.checkpoints,
        plan.changes,
        plan.seed,
        plan.walk_timeout.as_secs()
    ));
    for &system in &systems {
        let outcome = match system {
            System::Ovlsnap => match &ovlsnap {
                Some(Ok(binary)) => snap::run(binary, &scratch, &plan, &mut results),
                Some(Err(err)) => Err(anyhow::anyhow!("ovlsnap did not build: {err:#}")),
                None => Ok(()),
            },
            System::Btrfs => btrfs::run(&scratch, &plan, &mut results),
        };
        if let Err(err) = outcome {
            progress(&format!("==> {}: stopped: {err:#}", system.name()));
            results.stopped(system, &format!("{err:#}"));
        }
    }
    drop(scratch);
    results.set_elapsed(started.elapsed(), pressure.and_then(Pressure::since));

    let table = results.table();
    if options.json {
        eprintln!("\n{table}");
        writeln!(std::io::stdout().lock(), "{}", results.json()).context("writing the JSON results")?;
    } else {
        println!("\n{table}");
    }
    Ok(())
}

/// The hidden `bench-snapshots-walk DIR`: a walk in a process of its own, which the benchmark can
/// kill when it runs past its timeout (a thread stuck in the filesystem could not be stopped).
pub fn walk_child(dir: &Path) -> Result<()> {
    let (entries, elapsed) = workload::walk(dir)?;
    println!("{entries} {}", elapsed.as_secs_f64() * 1e3);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_stop_at_max_and_include_it() {
        assert_eq!(checkpoints(10_000), [1, 100, 1000, 10_000]);
        assert_eq!(checkpoints(1000), [1, 100, 1000]);
        assert_eq!(checkpoints(3000), [1, 100, 1000, 3000]);
        assert_eq!(checkpoints(50), [1, 50]);
        assert_eq!(checkpoints(1), [1]);
        assert_eq!(checkpoints(20_000), [1, 100, 1000, 10_000, 20_000]);
    }
}
