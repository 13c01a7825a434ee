//! `cargo xtask bench-compare [--quick] [--json] [--runs N] [--only PHASE]`: the same workload on
//! the kernel's overlayfs, fuse-overlayfs (when installed) and a release build of `ovlfs`, side by
//! side (issue 7), and the snapshots of a release build of `ovlsnap` (issue 5).
//!
//! A run has three phases ([`Phase`]; `--only` picks one):
//! - `ext4`: generates the layers once (two lower layers with merged directories, two big files of
//!   real data, directories of 1000 entries) in a fresh ext4 filesystem in a loop image in the temp
//!   dir (why not the temp dir itself: see [`layers::LoopFs`]), then for each repetition mounts
//!   every backend in turn on a fresh, empty upper and work dir on that ext4 and runs the
//!   measurements of [`ops`] on it: cold and hot tree walks, a hot read and a copy-up of a big
//!   file, the worst and 99th percentile `lstat` of other files while another big file is copied
//!   up, 5000 creates, 2000 unlinks of lower files, a directory rename and an `mv`, then file
//!   churn (create, rename, unlink in a loop) in one merged directory and in two at once, and the
//!   scaling from one to two. Two more fresh mounts per backend and repetition follow: the big
//!   copy-up again with `volatile`, and the worst `lstat` of other files while `rename(2)` of the
//!   big file copies it up;
//! - `xfs`: repeats the big copy-up on XFS with reflink, in another loop image;
//! - `snapshots`: `ovlsnap` on a third, ext4, loop image ([`snapshots`]): the latency of a take
//!   with 1k, 10k and 100k files in the tree (the `ovlsnap take` command from start to exit, and
//!   the control-socket request alone) and with 100 snapshots in the store, and sequential write
//!   throughput (1 MiB writes, `fsync`) on a mount with a snapshot against without one (a new
//!   file, and an existing file overwritten in place, whose first write after a take copies it).
//!   Only ovlsnap has snapshots: these rows are "n/a" for the kernel and fuse-overlayfs, and
//!   ovlsnap's numbers stand in the ovlfs column.
//!
//! The medians, their ratios to the kernel and the targets go to a table ([`report`]), or with
//! `--json` to stdout as JSON (the table and the progress then go to stderr). The release builds
//! (`cargo build --release -p ovl-fs`, `-p snap-cli`) use the workspace's target dir
//! (`CARGO_TARGET_DIR` honoured); if `ovlsnap` does not build, the snapshot rows say so and the
//! other phases still run.
//!
//! Every mount (overlays and `ovlsnap` alike), loop device and scratch directory has a guard that
//! undoes it on drop, so an error or a panic halfway still leaves the machine as it was (an
//! interrupt with Ctrl-C does not run them: then `umount` the mounts under
//! `$TMPDIR/ovlfs-bench.PID`, which ends their daemons, and `losetup -d` its devices).

pub(crate) mod layers;
pub(crate) mod mounts;
pub(crate) mod ops;
pub(crate) mod report;
pub(crate) mod snapshots;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use self::layers::{FsKind, Layers, LoopFs, Scale, Scratch};
use self::mounts::{Backend, Mounted, RunDirs};
use self::ops::Outcome;
use self::report::{Metric, Results};
pub(crate) use self::report::{Pressure, median};
use crate::prereqs;

/// What the user asked for.
pub struct Options {
    /// Fewer repetitions and a scaled-down workload, for a run of a few minutes.
    pub quick: bool,
    /// Print the results as JSON on stdout (everything else goes to stderr).
    pub json: bool,
    /// Override the number of repetitions.
    pub runs: Option<usize>,
    /// Run only this phase.
    pub only: Option<Phase>,
}

/// A part of the run, with its own loop image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// The overlay workload on ext4 (every row but the XFS copy-up and the snapshot rows).
    Ext4,
    /// The big copy-up on XFS with reflink.
    Xfs,
    /// ovlsnap: take latency at 1k/10k/100k files, write throughput with and without a snapshot.
    Snapshots,
}

impl Phase {
    /// Every phase, in the order a run goes through them.
    pub const ALL: [Phase; 3] = [Phase::Ext4, Phase::Xfs, Phase::Snapshots];

    /// The name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Ext4 => "ext4",
            Phase::Xfs => "xfs",
            Phase::Snapshots => "snapshots",
        }
    }
}

/// Runs the whole comparison (or the one phase asked for).
/// True when the kernel offers FUSE over io_uring to new mounts (`enable_uring` set).
pub fn uring_available() -> bool {
    std::fs::read_to_string(crate::testing::ENABLE_URING).is_ok_and(|v| v.trim() == "Y")
}

pub fn run(options: &Options) -> Result<()> {
    if !prereqs::is_root()? {
        bail!("bench-compare mounts overlays, drops caches and sets up a loop device, so it must run as root");
    }
    let started = Instant::now();
    let pressure = Pressure::read();
    let scale = if options.quick { Scale::quick() } else { Scale::full() };
    let runs = options.runs.unwrap_or(scale.runs).max(1);
    let phases: Vec<Phase> = options.only.map_or(Phase::ALL.to_vec(), |phase| vec![phase]);
    let overlays = phases.iter().any(|phase| *phase != Phase::Snapshots);
    // The rings are offered to a FUSE server only with this set; put back as it was after.
    let _uring = crate::testing::EnableUring::set(true);
    let backends = Backend::available();

    let ovlfs = if overlays {
        progress("==> building release ovlfs (cargo build --release -p ovl-fs)");
        Some(build_release("ovl-fs", "ovlfs")?)
    } else {
        None
    };
    let ovlsnap = if phases.contains(&Phase::Snapshots) {
        progress("==> building release ovlsnap (cargo build --release -p snap-cli)");
        match build_release("snap-cli", "ovlsnap") {
            // With nothing else to measure, a failed build is the answer.
            Err(err) if !overlays => return Err(err),
            built => Some(built),
        }
    } else {
        None
    };

    let scratch = Scratch::create()?;
    let mut results = Results::new(&backends, &phases, runs, scale.clone());
    if let Some(ovlfs) = &ovlfs {
        if phases.contains(&Phase::Ext4) {
            ext4_phase(&backends, ovlfs, &scratch, &scale, runs, &mut results)?;
        }
        if phases.contains(&Phase::Xfs) {
            progress("==> XFS with reflink: loop image");
            xfs_phase(&backends, ovlfs, &scratch, &scale, runs, &mut results)?;
        }
    }
    match &ovlsnap {
        Some(Ok(ovlsnap)) => {
            progress("==> snapshots: ext4 loop image");
            snapshots::phase(ovlsnap, &scratch, &scale, runs, &mut results)?;
        }
        Some(Err(err)) => {
            progress(&format!("==> snapshots: skipped, ovlsnap did not build: {err:#}"));
            snapshots::record_failed(&mut results, &format!("build: {err:#}"));
        }
        None => {}
    }

    results.set_elapsed(started.elapsed(), pressure.and_then(Pressure::since));
    drop(scratch);
    let table = results.table();
    if options.json {
        eprintln!("\n{table}");
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", results.json()).context("writing the JSON results")?;
    } else {
        println!("\n{table}");
    }
    Ok(())
}

/// The ext4 phase: the layers, generated once in their loop image, then `runs` repetitions of
/// every backend.
fn ext4_phase(
    backends: &[Backend],
    ovlfs: &Path,
    scratch: &Scratch,
    scale: &Scale,
    runs: usize,
    results: &mut Results,
) -> Result<()> {
    let ext4 = LoopFs::create(&scratch.dir, "ext4", FsKind::Ext4, 6)?;
    progress(&format!("==> generating layers in {} ({})", ext4.dir.display(), scale.describe()));
    let generated = Instant::now();
    let layers = Layers::generate(&ext4.dir, scale)?;
    progress(&format!("    done in {:.1}s", generated.elapsed().as_secs_f64()));
    for rep in 1..=runs {
        for &backend in backends {
            progress(&format!("==> ext4 run {rep}/{runs}: {}", backend.name()));
            ext4_run(backend, ovlfs, scratch, &ext4, &layers, scale, results)?;
        }
    }
    Ok(())
}

/// One repetition of the ext4 measurements for one backend: the main sequence on one mount, then the
/// big copy-up again on a second mount with `volatile`, then `lstat`s during a rename's copy-up of
/// the big file on a third (each copy-up needs the big file still in the lower layer only).
fn ext4_run(
    backend: Backend,
    ovlfs: &Path,
    scratch: &Scratch,
    ext4: &LoopFs,
    layers: &Layers,
    scale: &Scale,
    results: &mut Results,
) -> Result<()> {
    let dirs = RunDirs::create(&ext4.dir, "ext4")?;
    let mnt = scratch.dir.join("mnt");
    let mounted = Mounted::mount(backend, ovlfs, &layers.lowers, &dirs, &mnt, false);
    match mounted {
        Ok(mut mounted) => {
            main_sequence(backend, &mnt, layers, scale, results)?;
            mounted.unmount()?;
        }
        Err(err) => {
            progress(&format!("    mount failed: {err:#}"));
            for metric in Metric::EXT4_MAIN {
                results.record(*metric, backend, Outcome::Failed(format!("mount: {err:#}")));
            }
        }
    }
    dirs.remove()?;

    // Mounts the backend on fresh dirs named after `tag`, measures, unmounts.
    let on_fresh_mount = |tag: &str, volatile: bool, measure: &dyn Fn(&Path) -> Result<Outcome>| {
        let dirs = RunDirs::create(&ext4.dir, tag)?;
        let outcome = match Mounted::mount(backend, ovlfs, &layers.lowers, &dirs, &mnt, volatile) {
            Ok(mut mounted) => {
                let outcome = measure(&mnt)?;
                mounted.unmount()?;
                outcome
            }
            Err(err) => Outcome::Failed(format!("mount: {err:#}")),
        };
        dirs.remove()?;
        anyhow::Ok(outcome)
    };
    let mut record = |metric: Metric, outcome: Outcome| {
        progress(&format!("    {:<29} {}", metric.id(), outcome.show(metric)));
        results.record(metric, backend, outcome);
    };

    let volatile = on_fresh_mount("ext4-volatile", true, &|mnt| {
        ops::warm(&layers.big_lower)?;
        Ok(ops::copy_up_append(&mnt.join(layers::BIG)))
    })?;
    record(Metric::CopyupBigVolatile, volatile);

    let renamed = on_fresh_mount("ext4-rename", false, &|mnt| {
        ops::warm(&layers.big_lower)?;
        ops::sync()?;
        let (from, to) = (mnt.join(layers::BIG), mnt.join(layers::BIG_RENAMED));
        Ok(ops::stat_during_rename_copy_up(&from, &to, scale.big_mib << 20, &layers.stat_targets_in(mnt)))
    })?;
    record(Metric::StatDuringRenameCopyupMax, renamed);
    Ok(())
}

/// The measurements that share one mount, in an order where each leaves the next a known state:
/// reads first, then the copy-ups, then the changes to the tree.
fn main_sequence(backend: Backend, mnt: &Path, layers: &Layers, scale: &Scale, results: &mut Results) -> Result<()> {
    // Returns the outcome for the ratio of the churns.
    let mut record = |metric: Metric, outcome: Outcome| {
        progress(&format!("    {:<29} {}", metric.id(), outcome.show(metric)));
        results.record(metric, backend, outcome.clone());
        outcome
    };

    ops::drop_caches()?;
    record(Metric::WalkCold, ops::walk(mnt, layers.entries));
    record(Metric::WalkHot, ops::walk(mnt, layers.entries));

    record(Metric::ReadBigHot, ops::read_hot(&mnt.join(layers::BIG)));

    ops::sync()?;
    record(Metric::CopyupBig, ops::copy_up_append(&mnt.join(layers::BIG)));

    ops::warm(&layers.big2_lower)?;
    ops::sync()?;
    let (worst, p99) = ops::stat_during_copy_up(&mnt.join(layers::BIG2), &layers.stat_targets_in(mnt));
    record(Metric::StatDuringCopyupMax, worst);
    record(Metric::StatDuringCopyupP99, p99);

    ops::sync()?;
    record(Metric::Create5k, ops::create_files(&mnt.join("created"), scale.create_files));

    ops::sync()?;
    let victims: Vec<PathBuf> = layers.unlink_victims.iter().map(|path| mnt.join(path)).collect();
    record(Metric::Unlink2kLower, ops::unlink_all(&victims));

    ops::sync()?;
    let renamed = match ops::rename_dir(&mnt.join(layers::RENAME_DIR), &mnt.join("renamed")) {
        // Ours will rename with redirects (issue 3); until then say so rather than just "EXDEV".
        Outcome::Unsupported(why) if backend == Backend::Ovlfs => {
            Outcome::Unsupported(format!("{why} (not supported yet)"))
        }
        outcome => outcome,
    };
    record(Metric::RenameDir1k, renamed);
    ops::sync()?;
    record(Metric::MvDir1k, ops::mv_dir(&mnt.join(layers::MV_DIR), &mnt.join("moved")));

    // Last: the churn leaves the tree as it found it, but for copying its two dirs up (the first
    // create in each does that, once in seconds of cycles).
    let churn_dirs = layers.churn_dirs.each_ref().map(|dir| mnt.join(dir));
    ops::sync()?;
    let one = record(Metric::ChurnOneDir, ops::churn(&churn_dirs[..1], scale.churn));
    ops::sync()?;
    let two = record(Metric::ChurnTwoDirs, ops::churn(&churn_dirs, scale.churn));
    record(Metric::ChurnScaling, two.ratio_to(&one));
    Ok(())
}

/// Copy-up of the big file on XFS with reflink, every backend, `runs` times.
fn xfs_phase(
    backends: &[Backend],
    ovlfs: &Path,
    scratch: &Scratch,
    scale: &Scale,
    runs: usize,
    results: &mut Results,
) -> Result<()> {
    let image = match LoopFs::create(&scratch.dir, "xfs", FsKind::XfsReflink, 3) {
        Ok(image) => image,
        Err(err) => {
            progress(&format!("    no XFS image: {err:#}"));
            for &backend in backends {
                results.record(Metric::CopyupBigXfs, backend, Outcome::Failed(format!("XFS image: {err:#}")));
            }
            return Ok(());
        }
    };
    let lower = image.dir.join("lower");
    let big = lower.join(layers::BIG);
    std::fs::create_dir_all(big.parent().expect("BIG has a parent")).context("creating the XFS lower layer")?;
    layers::write_big_file(&big, scale.big_mib, 7)?;
    let lowers = vec![lower];
    let mnt = scratch.dir.join("mnt");
    for rep in 1..=runs {
        for &backend in backends {
            let dirs = RunDirs::create(&image.dir, "xfs")?;
            let outcome = match Mounted::mount(backend, ovlfs, &lowers, &dirs, &mnt, false) {
                Ok(mut mounted) => {
                    ops::warm(&big)?;
                    ops::sync()?;
                    let outcome = ops::copy_up_append(&mnt.join(layers::BIG));
                    mounted.unmount()?;
                    outcome
                }
                Err(err) => Outcome::Failed(format!("mount: {err:#}")),
            };
            progress(&format!(
                "    xfs run {rep}/{runs} {:<15} {}",
                backend.name(),
                outcome.show(Metric::CopyupBigXfs)
            ));
            results.record(Metric::CopyupBigXfs, backend, outcome);
            dirs.remove()?;
        }
    }
    Ok(())
}

/// `cargo build --release -p PACKAGE`, its output on stderr; returns its binary `name` in the
/// workspace's target dir.
pub(crate) fn build_release(package: &str, name: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", package])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("could not start cargo")?;
    if !status.success() {
        bail!("`cargo build --release -p {package}` failed ({status})");
    }
    let binary = crate::target_dir().join("release").join(name);
    if !binary.is_file() {
        bail!("the build produced no {}", binary.display());
    }
    Ok(binary)
}

/// A progress line, always on stderr so that `--json` output on stdout stays clean.
pub(crate) fn progress(text: &str) {
    eprintln!("{text}");
}
