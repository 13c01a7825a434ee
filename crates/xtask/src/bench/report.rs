//! What is measured, the targets of issues 5 and 7, and the results: medians, ratios to the kernel,
//! a table for people and JSON for machines (written by hand: xtask keeps to `anyhow` and `clap`).
//!
//! The snapshot rows measure `ovlsnap`, which only we have: they go in the `ovlfs` column (our
//! release build) and are "n/a" for the kernel and fuse-overlayfs.

use std::fmt::Write;
use std::time::Duration;

use super::Phase;
use super::layers::Scale;
use super::mounts::{Backend, fuse_overlayfs_version};
use super::ops::Outcome;
use crate::mountinfo;

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Full tree walk with `lstat` of every entry, after dropping all caches.
    WalkCold,
    /// The same walk again, caches warm.
    WalkHot,
    /// Sequential read of the big file, after one warm-up read.
    ReadBigHot,
    /// Copy-up of the big file (open for append, write a byte, close), on ext4.
    CopyupBig,
    /// The same on a mount with `volatile` (no fsync).
    CopyupBigVolatile,
    /// The same on XFS with reflink.
    CopyupBigXfs,
    /// Worst `lstat` latency on an unrelated file during a big copy-up.
    StatDuringCopyupMax,
    /// 99th percentile of the same.
    StatDuringCopyupP99,
    /// Worst `lstat` latency on an unrelated file while `rename(2)` of the big lower file copies it
    /// up, on a mount of its own.
    StatDuringRenameCopyupMax,
    /// Create 5000 files of 4 KiB.
    Create5k,
    /// Unlink 2000 files that live in a lower layer.
    Unlink2kLower,
    /// Rename a lower directory of 1000 entries with `rename(2)`.
    RenameDir1k,
    /// Move another such directory with `mv` (copy and delete where rename gives `EXDEV`).
    MvDir1k,
    /// One thread cycling create (4 KiB) + rename + unlink of a file in a merged dir; ops/s.
    ChurnOneDir,
    /// Two such threads at once, each in a merged dir of its own; total ops/s.
    ChurnTwoDirs,
    /// [`Metric::ChurnTwoDirs`] / [`Metric::ChurnOneDir`], per run: 2 for perfect scaling, 1 when
    /// the two threads take turns.
    ChurnScaling,
    /// `ovlsnap take` with 1k files in LIVE, from the command's start to its exit.
    SnapshotTake1k,
    /// The same with 10k files.
    SnapshotTake10k,
    /// The same with 100k files.
    SnapshotTake100k,
    /// `ovlsnap take` with 1k files and [`MANY_SNAPSHOTS`] snapshots already in the store.
    SnapshotTakeManySnapshots,
    /// A take as one request on the daemon's control socket (connect, request, reply), 1k files.
    SnapshotTakeSocket1k,
    /// The same with 10k files.
    SnapshotTakeSocket10k,
    /// The same with 100k files.
    SnapshotTakeSocket100k,
    /// Sequential write (1 MiB writes, fsync) of a new file on an ovlsnap mount, no snapshot.
    WriteNoSnapshot,
    /// The same into another new file after a take: a new file needs no copy, so this is the
    /// per-write cost of the copy-on-write check.
    WriteNewWithSnapshot,
    /// [`Metric::WriteNewWithSnapshot`] / [`Metric::WriteNoSnapshot`], per run.
    WriteWithSnapshot,
    /// Overwrite of an existing file in place (no truncate, from offset 0), no snapshot.
    OverwriteNoSnapshot,
    /// The same right after a take: the first write copies the whole file into the snapshot.
    OverwriteFirstAfterTake,
    /// The same once more: the file is saved, so writes should run at full speed again.
    OverwriteAgainAfterTake,
    /// [`Metric::OverwriteFirstAfterTake`] / [`Metric::OverwriteNoSnapshot`], per run.
    OverwriteAfterTakeRatio,
    /// The slowest create + stat + unlink of a small file in another dir of the mount (one every
    /// 2 ms) while [`Metric::OverwriteNoSnapshot`] runs: no copy.
    ProbeWhileWriting,
    /// The same while [`Metric::OverwriteFirstAfterTake`] runs, whose first write copies the whole
    /// file into the snapshot (issue 16.6: nobody else may wait for that copy).
    ProbeWhileCopying,
}

/// How a metric is judged against the kernel.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// ovlfs's time is at most this many times the kernel's.
    Ratio(f64),
    /// ovlfs's time is at most this many times the kernel's time for another metric.
    RatioTo(Metric, f64),
    /// ovlfs's value is at most this many milliseconds.
    Millis(f64),
    /// At most this many milliseconds, and flat in tree size: at most [`FLAT_FACTOR`] times the
    /// median of `base` (the smallest tree) plus [`FLAT_SLACK_MS`] (so that noise on a
    /// millisecond does not count as growth).
    MillisFlat(f64, Metric),
    /// The value (a ratio) is at least this.
    AtLeast(f64),
    /// At most this many times ovlfs's (ovlsnap's) own value of another metric.
    OwnTimes(Metric, f64),
    /// No target; reported for information.
    None,
}

/// How many snapshots exist before the takes of [`Metric::SnapshotTakeManySnapshots`].
pub const MANY_SNAPSHOTS: usize = 100;

/// How much slower than with the smallest tree a take may be and still count as flat.
const FLAT_FACTOR: f64 = 2.0;
/// Added to the allowance of [`FLAT_FACTOR`].
const FLAT_SLACK_MS: f64 = 1.0;

impl Metric {
    /// Every row, in table order.
    pub const ALL: &'static [Metric] = &[
        Metric::WalkCold,
        Metric::WalkHot,
        Metric::ReadBigHot,
        Metric::CopyupBig,
        Metric::CopyupBigVolatile,
        Metric::CopyupBigXfs,
        Metric::Create5k,
        Metric::Unlink2kLower,
        Metric::RenameDir1k,
        Metric::MvDir1k,
        Metric::ChurnOneDir,
        Metric::ChurnTwoDirs,
        Metric::ChurnScaling,
        Metric::StatDuringCopyupMax,
        Metric::StatDuringCopyupP99,
        Metric::StatDuringRenameCopyupMax,
        Metric::SnapshotTake1k,
        Metric::SnapshotTake10k,
        Metric::SnapshotTake100k,
        Metric::SnapshotTakeManySnapshots,
        Metric::SnapshotTakeSocket1k,
        Metric::SnapshotTakeSocket10k,
        Metric::SnapshotTakeSocket100k,
        Metric::WriteNoSnapshot,
        Metric::WriteNewWithSnapshot,
        Metric::WriteWithSnapshot,
        Metric::OverwriteNoSnapshot,
        Metric::OverwriteFirstAfterTake,
        Metric::OverwriteAgainAfterTake,
        Metric::OverwriteAfterTakeRatio,
        Metric::ProbeWhileWriting,
        Metric::ProbeWhileCopying,
    ];

    /// The metrics of the main ext4 sequence (one mount).
    pub const EXT4_MAIN: &'static [Metric] = &[
        Metric::WalkCold,
        Metric::WalkHot,
        Metric::ReadBigHot,
        Metric::CopyupBig,
        Metric::StatDuringCopyupMax,
        Metric::StatDuringCopyupP99,
        Metric::Create5k,
        Metric::Unlink2kLower,
        Metric::RenameDir1k,
        Metric::MvDir1k,
        Metric::ChurnOneDir,
        Metric::ChurnTwoDirs,
        Metric::ChurnScaling,
    ];

    /// The stable name (also the JSON key).
    pub fn id(self) -> &'static str {
        match self {
            Metric::WalkCold => "walk_cold",
            Metric::WalkHot => "walk_hot",
            Metric::ReadBigHot => "read_big_hot",
            Metric::CopyupBig => "copyup_big",
            Metric::CopyupBigVolatile => "copyup_big_volatile",
            Metric::CopyupBigXfs => "copyup_big_xfs_reflink",
            Metric::StatDuringCopyupMax => "stat_during_copyup_max",
            Metric::StatDuringCopyupP99 => "stat_during_copyup_p99",
            Metric::StatDuringRenameCopyupMax => "stat_during_rename_copyup_max",
            Metric::Create5k => "create_5k",
            Metric::Unlink2kLower => "unlink_2k_lower",
            Metric::RenameDir1k => "rename_dir_1k",
            Metric::MvDir1k => "mv_dir_1k",
            Metric::ChurnOneDir => "churn_1_dir",
            Metric::ChurnTwoDirs => "churn_2_dirs",
            Metric::ChurnScaling => "churn_scaling",
            Metric::SnapshotTake1k => "snapshot_take_1k",
            Metric::SnapshotTake10k => "snapshot_take_10k",
            Metric::SnapshotTake100k => "snapshot_take_100k",
            Metric::SnapshotTakeManySnapshots => "snapshot_take_1k_100_snapshots",
            Metric::SnapshotTakeSocket1k => "snapshot_take_socket_1k",
            Metric::SnapshotTakeSocket10k => "snapshot_take_socket_10k",
            Metric::SnapshotTakeSocket100k => "snapshot_take_socket_100k",
            Metric::WriteNoSnapshot => "write_no_snapshot",
            Metric::WriteNewWithSnapshot => "write_new_with_snapshot",
            Metric::WriteWithSnapshot => "write_with_snapshot",
            Metric::OverwriteNoSnapshot => "overwrite_no_snapshot",
            Metric::OverwriteFirstAfterTake => "overwrite_first_after_take",
            Metric::OverwriteAgainAfterTake => "overwrite_again_after_take",
            Metric::OverwriteAfterTakeRatio => "overwrite_after_take_ratio",
            Metric::ProbeWhileWriting => "probe_max_while_writing",
            Metric::ProbeWhileCopying => "probe_max_while_copying",
        }
    }

    /// The phase of the run that measures it.
    pub fn phase(self) -> Phase {
        match self {
            Metric::CopyupBigXfs => Phase::Xfs,
            Metric::SnapshotTake1k
            | Metric::SnapshotTake10k
            | Metric::SnapshotTake100k
            | Metric::SnapshotTakeManySnapshots
            | Metric::SnapshotTakeSocket1k
            | Metric::SnapshotTakeSocket10k
            | Metric::SnapshotTakeSocket100k
            | Metric::WriteNoSnapshot
            | Metric::WriteNewWithSnapshot
            | Metric::WriteWithSnapshot
            | Metric::OverwriteNoSnapshot
            | Metric::OverwriteFirstAfterTake
            | Metric::OverwriteAgainAfterTake
            | Metric::OverwriteAfterTakeRatio
            | Metric::ProbeWhileWriting
            | Metric::ProbeWhileCopying => Phase::Snapshots,
            _ => Phase::Ext4,
        }
    }

    /// Measured on ovlsnap only (in the ovlfs column; the overlays have no snapshots).
    fn ovlsnap_only(self) -> bool {
        self.phase() == Phase::Snapshots
    }

    /// The unit of the values.
    fn unit(self) -> &'static str {
        match self {
            Metric::ReadBigHot => "MB/s",
            Metric::ChurnOneDir | Metric::ChurnTwoDirs => "ops/s",
            Metric::WriteNoSnapshot
            | Metric::WriteNewWithSnapshot
            | Metric::OverwriteNoSnapshot
            | Metric::OverwriteFirstAfterTake
            | Metric::OverwriteAgainAfterTake => "MiB/s",
            Metric::WriteWithSnapshot | Metric::OverwriteAfterTakeRatio | Metric::ChurnScaling => "ratio",
            _ => "ms",
        }
    }

    /// Higher values are better (throughput); ratios are then inverted so that, for every row,
    /// a ratio above 1 means slower than the kernel.
    fn higher_is_better(self) -> bool {
        matches!(self.unit(), "MB/s" | "MiB/s" | "ops/s" | "ratio")
    }

    fn target(self) -> Target {
        match self {
            Metric::WalkCold => Target::Ratio(1.5),
            Metric::WalkHot => Target::Ratio(1.0),
            Metric::ReadBigHot => Target::Ratio(1.1),
            Metric::CopyupBig => Target::Ratio(1.0),
            Metric::CopyupBigVolatile => Target::RatioTo(Metric::CopyupBig, 0.5),
            Metric::CopyupBigXfs => Target::None,
            Metric::StatDuringCopyupMax | Metric::StatDuringRenameCopyupMax => Target::Millis(5.0),
            Metric::StatDuringCopyupP99 => Target::None,
            Metric::Create5k => Target::Ratio(2.0),
            Metric::Unlink2kLower => Target::Ratio(2.0),
            Metric::RenameDir1k => Target::Ratio(3.0),
            Metric::MvDir1k | Metric::ChurnOneDir | Metric::ChurnTwoDirs | Metric::ChurnScaling => Target::None,
            Metric::SnapshotTake1k | Metric::SnapshotTake10k | Metric::SnapshotTake100k => {
                Target::MillisFlat(10.0, Metric::SnapshotTake1k)
            }
            Metric::SnapshotTakeSocket1k | Metric::SnapshotTakeSocket10k | Metric::SnapshotTakeSocket100k => {
                Target::MillisFlat(10.0, Metric::SnapshotTakeSocket1k)
            }
            Metric::SnapshotTakeManySnapshots => Target::Millis(10.0),
            Metric::WriteWithSnapshot => Target::AtLeast(0.9),
            Metric::WriteNoSnapshot
            | Metric::WriteNewWithSnapshot
            | Metric::OverwriteNoSnapshot
            | Metric::OverwriteFirstAfterTake
            | Metric::OverwriteAgainAfterTake
            | Metric::OverwriteAfterTakeRatio
            | Metric::ProbeWhileWriting => Target::None,
            Metric::ProbeWhileCopying => Target::OwnTimes(Metric::ProbeWhileWriting, 2.0),
        }
    }

    fn target_text(self) -> String {
        match self.target() {
            Target::Ratio(ratio) => format!("<= {ratio}x kernel"),
            Target::RatioTo(other, ratio) => format!("<= {ratio}x kernel {}", other.id()),
            Target::Millis(ms) => format!("<= {ms} ms"),
            Target::MillisFlat(ms, _) => format!("<= {ms} ms, flat in tree size"),
            Target::AtLeast(ratio) => format!(">= {ratio} (with / without)"),
            Target::OwnTimes(other, times) => format!("<= {times}x {}", other.id()),
            Target::None => "-".to_owned(),
        }
    }
}

impl Outcome {
    /// The outcome as a table cell would show it.
    pub fn show(&self, metric: Metric) -> String {
        match self {
            Outcome::Value(value) => format!("{} {}", number(*value), metric.unit()),
            Outcome::Unsupported(why) => why.clone(),
            Outcome::Failed(why) => format!("FAILED: {why}"),
        }
    }
}

/// The median of a metric for one backend, or why there is none.
#[derive(Debug, Clone, PartialEq)]
enum Summary {
    Median { median: f64, values: Vec<f64>, failures: usize },
    Unsupported(String),
    Failed(String),
    Missing,
}

/// Every sample of a run, and the context to report them in.
pub struct Results {
    backends: Vec<Backend>,
    phases: Vec<Phase>,
    runs: usize,
    scale: Scale,
    samples: Vec<(Metric, Backend, Outcome)>,
    elapsed: Duration,
    pressure: Option<Pressure>,
}

/// Pressure stall totals (`/proc/pressure/{cpu,io}`, "some" line, microseconds): how much of a
/// run some task waited for a CPU or for I/O. Other work on a shared machine shows up here; so
/// does the benchmark's own (it syncs, and it keeps both cores of a small machine busy).
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    cpu_us: u64,
    io_us: u64,
}

impl Pressure {
    /// The totals now; `None` without PSI (kernel without `CONFIG_PSI`).
    pub fn read() -> Option<Pressure> {
        let total = |resource: &str| -> Option<u64> {
            let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
            let some = text.lines().find(|l| l.starts_with("some"))?;
            some.split_whitespace().find_map(|field| field.strip_prefix("total="))?.parse().ok()
        };
        Some(Pressure { cpu_us: total("cpu")?, io_us: total("io")? })
    }

    /// The stall totals (cpu, io) in microseconds.
    pub fn micros(self) -> (u64, u64) {
        (self.cpu_us, self.io_us)
    }

    /// What accumulated since `start`.
    pub fn since(start: Pressure) -> Option<Pressure> {
        let now = Pressure::read()?;
        Some(Pressure { cpu_us: now.cpu_us.saturating_sub(start.cpu_us), io_us: now.io_us.saturating_sub(start.io_us) })
    }
}

impl Results {
    /// No samples yet; the report will show the metrics of `phases`.
    pub fn new(backends: &[Backend], phases: &[Phase], runs: usize, scale: Scale) -> Results {
        Results {
            backends: backends.to_vec(),
            phases: phases.to_vec(),
            runs,
            scale,
            samples: Vec::new(),
            elapsed: Duration::ZERO,
            pressure: None,
        }
    }

    /// Adds one sample.
    pub fn record(&mut self, metric: Metric, backend: Backend, outcome: Outcome) {
        self.samples.push((metric, backend, outcome));
    }

    /// The metrics of the phases that ran, in table order.
    fn metrics(&self) -> impl Iterator<Item = Metric> + '_ {
        Metric::ALL.iter().copied().filter(|m| self.phases.contains(&m.phase()))
    }

    /// How long the whole run took, and the pressure stalls during it.
    pub fn set_elapsed(&mut self, elapsed: Duration, pressure: Option<Pressure>) {
        self.elapsed = elapsed;
        self.pressure = pressure;
    }

    /// The stall shares of the run as percentages of its wall time (cpu, io).
    fn pressure_percent(&self) -> Option<(f64, f64)> {
        let pressure = self.pressure?;
        let wall_us = self.elapsed.as_secs_f64() * 1e6;
        (wall_us > 0.0).then(|| (pressure.cpu_us as f64 / wall_us * 100.0, pressure.io_us as f64 / wall_us * 100.0))
    }

    fn summary(&self, metric: Metric, backend: Backend) -> Summary {
        let outcomes: Vec<&Outcome> =
            self.samples.iter().filter(|(m, b, _)| *m == metric && *b == backend).map(|(_, _, o)| o).collect();
        let mut values: Vec<f64> =
            outcomes.iter().filter_map(|o| if let Outcome::Value(v) = o { Some(*v) } else { None }).collect();
        let failures = outcomes.iter().filter(|o| matches!(o, Outcome::Failed(_))).count();
        if let Some(median) = median(&mut values) {
            return Summary::Median { median, values, failures };
        }
        let unsupported = outcomes.iter().find_map(|o| if let Outcome::Unsupported(w) = o { Some(w) } else { None });
        let failed = outcomes.iter().find_map(|o| if let Outcome::Failed(w) = o { Some(w) } else { None });
        match (unsupported, failed) {
            (Some(why), _) => Summary::Unsupported(why.clone()),
            (None, Some(why)) => Summary::Failed(why.clone()),
            (None, None) => Summary::Missing,
        }
    }

    fn median_of(&self, metric: Metric, backend: Backend) -> Option<f64> {
        match self.summary(metric, backend) {
            Summary::Median { median, .. } => Some(median),
            _ => None,
        }
    }

    /// The backend's median relative to the kernel's, as a time ratio (> 1 = slower).
    fn ratio(&self, metric: Metric, backend: Backend) -> Option<f64> {
        let ours = self.median_of(metric, backend)?;
        let kernel = self.median_of(metric, Backend::Kernel)?;
        let ratio = if metric.higher_is_better() { kernel / ours } else { ours / kernel };
        ratio.is_finite().then_some(ratio)
    }

    /// Whether ovlfs meets the metric's target: `None` when there is no target or no number.
    fn target_met(&self, metric: Metric) -> Option<bool> {
        match metric.target() {
            Target::Ratio(limit) => Some(self.ratio(metric, Backend::Ovlfs)? <= limit),
            Target::RatioTo(other, limit) => {
                let ours = self.median_of(metric, Backend::Ovlfs)?;
                Some(ours / self.median_of(other, Backend::Kernel)? <= limit)
            }
            Target::Millis(limit) => Some(self.median_of(metric, Backend::Ovlfs)? <= limit),
            Target::MillisFlat(limit, base) => {
                let ours = self.median_of(metric, Backend::Ovlfs)?;
                let flat =
                    metric == base || ours <= FLAT_FACTOR * self.median_of(base, Backend::Ovlfs)? + FLAT_SLACK_MS;
                Some(ours <= limit && flat)
            }
            Target::AtLeast(limit) => Some(self.median_of(metric, Backend::Ovlfs)? >= limit),
            Target::OwnTimes(other, times) => {
                Some(self.median_of(metric, Backend::Ovlfs)? <= times * self.median_of(other, Backend::Ovlfs)?)
            }
            Target::None => None,
        }
    }

    fn verdict(&self, metric: Metric) -> String {
        match (self.target_met(metric), self.summary(metric, Backend::Ovlfs), metric.target()) {
            (Some(true), ..) => "met".to_owned(),
            (Some(false), ..) => "NOT met".to_owned(),
            (None, _, Target::None) => "-".to_owned(),
            (None, Summary::Unsupported(_), _) => "not supported yet".to_owned(),
            (None, ..) => "unknown (no number)".to_owned(),
        }
    }

    fn cell(&self, metric: Metric, backend: Backend) -> String {
        if metric.ovlsnap_only() && backend != Backend::Ovlfs {
            return "n/a".to_owned();
        }
        match self.summary(metric, backend) {
            Summary::Median { median, failures, .. } => {
                let mut cell = number(median);
                if backend != Backend::Kernel {
                    if let Some(ratio) = self.ratio(metric, backend) {
                        let _ = write!(cell, " ({ratio:.2}x)");
                    }
                }
                if failures > 0 {
                    let _ = write!(cell, " [{failures} failed]");
                }
                cell
            }
            Summary::Unsupported(why) => why,
            Summary::Failed(_) => "FAILED (see below)".to_owned(),
            Summary::Missing => "-".to_owned(),
        }
    }

    /// The table for people: the context, one row per metric, then the failures in full.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "bench-compare: medians of {} run(s); {}", self.runs, self.scale.describe());
        for (key, value) in machine() {
            let _ = writeln!(out, "  {key}: {value}");
        }
        let _ = writeln!(out, "  total time: {:.0}s", self.elapsed.as_secs_f64());
        if let Some((cpu, io)) = self.pressure_percent() {
            let _ = writeln!(out, "  stalls during the run (PSI \"some\"): cpu {cpu:.0}%, io {io:.0}% of the time");
        }
        let _ = writeln!(
            out,
            "(x) = time relative to the kernel overlay in the same run (for MB/s, ops/s and ratios: kernel's \
             / this); above 1 = slower."
        );
        if self.phases.contains(&Phase::Ext4) {
            let _ = writeln!(
                out,
                "churn_*: cycles of create (O_EXCL, 4 KiB) + rename + unlink for {} s, 3 ops a cycle, in one \
                 merged dir, then in two at once (one thread each); churn_scaling: churn_2_dirs / churn_1_dir \
                 per run (2 = perfect scaling).\n  stat_during_rename_copyup_max: on a mount of its own, while \
                 rename(2) copies the big lower file up.",
                self.scale.churn.as_secs_f64()
            );
        }
        if self.phases.contains(&Phase::Snapshots) {
            let _ = writeln!(
                out,
                "snapshot rows measure ovlsnap (release build), shown in the ovlfs column; the overlays have no \
                 snapshots.\n  snapshot_take_*: `ovlsnap take` from start to exit, in a fresh store (up to {} \
                 snapshots; *_100_snapshots: with {MANY_SNAPSHOTS}); snapshot_take_socket_*: the control-socket \
                 request alone.\n  write_*/overwrite_*: 1 MiB writes + fsync through an ovlsnap \
                 mount on ext4; *_ratio and write_with_snapshot: with / without a snapshot, per run.",
                2 * self.scale.snapshot_takes
            );
        }
        out.push('\n');
        let mut header = vec!["metric".to_owned(), "unit".to_owned()];
        header.extend(self.backends.iter().map(|b| b.name().to_owned()));
        header.extend(["target (ovlfs)".to_owned(), "ovlfs vs target".to_owned()]);
        let mut rows = vec![header];
        for metric in self.metrics() {
            let mut row = vec![metric.id().to_owned(), metric.unit().to_owned()];
            row.extend(self.backends.iter().map(|&b| self.cell(metric, b)));
            row.extend([metric.target_text(), self.verdict(metric)]);
            rows.push(row);
        }
        out.push_str(&markdown_table(&rows));
        // One line per backend and reason (a failed build fails every snapshot row alike).
        let mut grouped: Vec<(Backend, &str, Vec<&str>)> = Vec::new();
        for (metric, backend, outcome) in &self.samples {
            let Outcome::Failed(why) = outcome else { continue };
            match grouped.iter_mut().find(|(b, w, _)| b == backend && w == why) {
                Some((_, _, ids)) if ids.contains(&metric.id()) => {}
                Some((_, _, ids)) => ids.push(metric.id()),
                None => grouped.push((*backend, why, vec![metric.id()])),
            }
        }
        let failures: Vec<String> =
            grouped.iter().map(|(b, why, ids)| format!("  {} / {}: {why}", ids.join(", "), b.name())).collect();
        if !failures.is_empty() {
            let _ = writeln!(out, "\nfailures:\n{}", failures.join("\n"));
        }
        out
    }

    /// The results for machines.
    pub fn json(&self) -> String {
        let mut out = String::from("{\n");
        let _ = writeln!(out, "  \"schema\": \"ovlsnap-bench-compare/1\",");
        let _ = writeln!(out, "  \"quick\": {},", self.scale.quick);
        let _ = writeln!(out, "  \"runs\": {},", self.runs);
        let phases: Vec<String> = self.phases.iter().map(|p| string(p.name())).collect();
        let _ = writeln!(out, "  \"phases\": [{}],", phases.join(", "));
        let s = &self.scale;
        let _ = writeln!(
            out,
            "  \"scale\": {{\"dirs\": {}, \"files_per_dir\": {}, \"big_mib\": {}, \"create_files\": {}, \
             \"unlink_files\": {}, \"rename_dir_files\": {}, \"churn_s\": {}, \"snapshot_takes\": {}, \
             \"snapshot_write_mib\": {}}},",
            s.dirs,
            s.files_per_dir,
            s.big_mib,
            s.create_files,
            s.unlink_files,
            s.rename_dir_files,
            json_number(s.churn.as_secs_f64()),
            s.snapshot_takes,
            s.snapshot_write_mib
        );
        let machine: Vec<String> = machine().iter().map(|(k, v)| format!("{}: {}", string(k), string(v))).collect();
        let _ = writeln!(out, "  \"machine\": {{{}}},", machine.join(", "));
        let _ = writeln!(out, "  \"elapsed_s\": {},", json_number(self.elapsed.as_secs_f64()));
        if let Some((cpu, io)) = self.pressure_percent() {
            let _ =
                writeln!(out, "  \"stall_percent\": {{\"cpu\": {}, \"io\": {}}},", json_number(cpu), json_number(io));
        }
        let backends: Vec<String> = self.backends.iter().map(|b| string(b.name())).collect();
        let _ = writeln!(out, "  \"backends\": [{}],", backends.join(", "));
        out.push_str("  \"metrics\": [\n");
        let metrics: Vec<String> = self.metrics().map(|m| self.metric_json(m)).collect();
        out.push_str(&metrics.join(",\n"));
        out.push_str("\n  ]\n}");
        out
    }

    fn metric_json(&self, metric: Metric) -> String {
        let met = match self.target_met(metric) {
            Some(met) => met.to_string(),
            None => "null".to_owned(),
        };
        let mut results = Vec::new();
        for &backend in &self.backends {
            let body = if metric.ovlsnap_only() && backend != Backend::Ovlfs {
                "{\"status\": \"n/a\", \"detail\": \"no snapshots\"}".to_owned()
            } else {
                match self.summary(metric, backend) {
                    Summary::Median { median, values, failures } => {
                        let values: Vec<String> = values.iter().map(|v| json_number(*v)).collect();
                        let ratio = self.ratio(metric, backend).map_or("null".to_owned(), json_number);
                        format!(
                            "{{\"status\": \"ok\", \"median\": {}, \"ratio_to_kernel\": {ratio}, \"samples\": [{}], \
                             \"failed_samples\": {failures}}}",
                            json_number(median),
                            values.join(", ")
                        )
                    }
                    Summary::Unsupported(why) => {
                        format!("{{\"status\": \"unsupported\", \"detail\": {}}}", string(&why))
                    }
                    Summary::Failed(why) => format!("{{\"status\": \"failed\", \"detail\": {}}}", string(&why)),
                    Summary::Missing => "{\"status\": \"missing\"}".to_owned(),
                }
            };
            results.push(format!("{}: {body}", string(backend.name())));
        }
        // Which of ours the `ovlfs` result measures.
        let system = if metric.ovlsnap_only() { "ovlsnap" } else { "ovlfs" };
        format!(
            "    {{\"id\": {}, \"system\": {}, \"unit\": {}, \"higher_is_better\": {}, \"target\": {}, \
             \"ovlfs_target_met\": {met}, \"results\": {{{}}}}}",
            string(metric.id()),
            string(system),
            string(metric.unit()),
            metric.higher_is_better(),
            string(&metric.target_text()),
            results.join(", ")
        )
    }
}

/// The median, sorting `values`; `None` when empty.
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// A number with about three significant digits.
pub(crate) fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// A JSON number, `null` for NaN and infinities.
pub(crate) fn json_number(value: f64) -> String {
    if value.is_finite() { format!("{value}") } else { "null".to_owned() }
}

/// A JSON string literal.
pub(crate) fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Markdown table with padded columns (readable in a terminal and pasteable into BENCHMARKS.md).
pub(crate) fn markdown_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let line = |row: &[String]| {
        let cells: Vec<String> =
            widths.iter().enumerate().map(|(c, &w)| format!("{:<w$}", row.get(c).map_or("", String::as_str))).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        out.push_str(&line(row));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        }
    }
    out
}

/// What the numbers were measured on.
pub(crate) fn machine() -> Vec<(&'static str, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".to_owned(), |kib| format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64));
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let temp = std::env::temp_dir();
    let fs_type = mountinfo::mounts()
        .ok()
        .and_then(|mounts| {
            mounts
                .into_iter()
                .filter(|m| temp.starts_with(&m.mount_point))
                .max_by_key(|m| m.mount_point.as_os_str().len())
                .map(|m| format!("fresh ext4 / XFS loop images in {} (on {})", temp.display(), m.fs_type))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    vec![
        ("cpu", format!("{nproc} x {cpu}")),
        ("memory", memory),
        ("kernel", read("/proc/sys/kernel/osrelease").trim().to_owned()),
        ("layers on", fs_type),
        ("fuse-overlayfs", fuse_overlayfs_version().unwrap_or_else(|| "not installed".to_owned())),
        ("ovlfs", git_describe()),
    ]
}

fn git_describe() -> String {
    let output = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::workspace_root())
        .stderr(std::process::Stdio::null())
        .output();
    match output {
        Ok(output) if output.status.success() => {
            format!("release build of {}", String::from_utf8_lossy(&output.stdout).trim())
        }
        _ => "release build".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn ratios_are_time_ratios_and_targets_are_judged() {
        let backends = [Backend::Kernel, Backend::Ovlfs];
        let mut results = Results::new(&backends, &[Phase::Ext4], 1, Scale::quick());
        results.record(Metric::WalkCold, Backend::Kernel, Outcome::Value(100.0));
        results.record(Metric::WalkCold, Backend::Ovlfs, Outcome::Value(140.0));
        results.record(Metric::ReadBigHot, Backend::Kernel, Outcome::Value(2000.0));
        results.record(Metric::ReadBigHot, Backend::Ovlfs, Outcome::Value(1000.0));
        results.record(Metric::RenameDir1k, Backend::Kernel, Outcome::Value(1.0));
        results.record(Metric::RenameDir1k, Backend::Ovlfs, Outcome::Unsupported("EXDEV (not supported yet)".into()));
        assert_eq!(results.ratio(Metric::WalkCold, Backend::Ovlfs), Some(1.4));
        assert_eq!(results.ratio(Metric::ReadBigHot, Backend::Ovlfs), Some(2.0));
        assert_eq!(results.verdict(Metric::WalkCold), "met");
        assert_eq!(results.verdict(Metric::ReadBigHot), "NOT met");
        assert_eq!(results.verdict(Metric::RenameDir1k), "not supported yet");
        assert_eq!(results.cell(Metric::WalkCold, Backend::Ovlfs), "140 (1.40x)");
        let table = results.table();
        assert!(table.contains("EXDEV (not supported yet)"), "{table}");
        assert!(!table.contains("snapshot_take_1k") && !table.contains("copyup_big_xfs"), "{table}");
        let json = results.json();
        assert!(json.contains("\"ratio_to_kernel\": 1.4"), "{json}");
        assert!(json.contains("\"status\": \"unsupported\""), "{json}");
    }

    #[test]
    fn churn_rows_are_rates_and_the_rename_stat_has_the_copyup_target() {
        let backends = [Backend::Kernel, Backend::Ovlfs];
        let mut results = Results::new(&backends, &[Phase::Ext4], 1, Scale::quick());
        for (metric, kernel, ovlfs) in [
            (Metric::ChurnOneDir, 30_000.0, 10_000.0),
            (Metric::ChurnTwoDirs, 54_000.0, 11_000.0),
            (Metric::StatDuringRenameCopyupMax, 0.5, 7.0),
        ] {
            results.record(metric, Backend::Kernel, Outcome::Value(kernel));
            results.record(metric, Backend::Ovlfs, Outcome::Value(ovlfs));
        }
        results.record(Metric::ChurnScaling, Backend::Ovlfs, Outcome::Value(1.1));
        assert_eq!(results.ratio(Metric::ChurnOneDir, Backend::Ovlfs), Some(3.0), "a third of the rate");
        assert_eq!(results.verdict(Metric::ChurnTwoDirs), "-");
        assert_eq!(results.verdict(Metric::ChurnScaling), "-");
        assert_eq!(results.verdict(Metric::StatDuringRenameCopyupMax), "NOT met");
        let table = results.table();
        let order: Vec<usize> = ["| churn_1_dir", "| churn_scaling", "| stat_during_rename_copyup_max"]
            .iter()
            .map(|row| table.find(row).unwrap_or_else(|| panic!("no {row} in {table}")))
            .collect();
        assert!(order.is_sorted(), "{table}");
        assert!(results.json().contains("\"churn_s\": 1.5"));
    }

    #[test]
    fn snapshot_rows_are_ovlsnap_only_and_judged_flat_and_by_ratio() {
        let backends = [Backend::Kernel, Backend::Ovlfs];
        let mut results = Results::new(&backends, &[Phase::Snapshots], 1, Scale::quick());
        for (metric, ms) in [
            (Metric::SnapshotTake1k, 2.0),
            (Metric::SnapshotTake10k, 4.5),
            (Metric::SnapshotTake100k, 6.0),
            (Metric::SnapshotTakeSocket1k, 1.0),
            (Metric::SnapshotTakeSocket100k, 12.0),
            (Metric::WriteWithSnapshot, 0.95),
            (Metric::OverwriteAfterTakeRatio, 0.4),
        ] {
            results.record(metric, Backend::Ovlfs, Outcome::Value(ms));
        }
        assert_eq!(results.verdict(Metric::SnapshotTake1k), "met");
        assert_eq!(results.verdict(Metric::SnapshotTake10k), "met", "4.5 <= 2 x 2.0 + 1");
        assert_eq!(results.verdict(Metric::SnapshotTake100k), "NOT met", "6.0 > 2 x 2.0 + 1: grows");
        assert_eq!(results.verdict(Metric::SnapshotTakeSocket100k), "NOT met", "over 10 ms");
        assert_eq!(results.verdict(Metric::SnapshotTakeSocket10k), "unknown (no number)");
        assert_eq!(results.verdict(Metric::WriteWithSnapshot), "met");
        assert_eq!(results.verdict(Metric::OverwriteAfterTakeRatio), "-");
        assert_eq!(results.cell(Metric::SnapshotTake1k, Backend::Kernel), "n/a");
        assert_eq!(results.cell(Metric::SnapshotTake1k, Backend::Ovlfs), "2.00");
        let table = results.table();
        assert!(table.contains("snapshot rows measure ovlsnap") && !table.contains("walk_cold"), "{table}");
        let json = results.json();
        assert!(json.contains("\"system\": \"ovlsnap\"") && json.contains("\"status\": \"n/a\""), "{json}");
    }

    #[test]
    fn failures_are_listed_once_per_reason() {
        let mut results = Results::new(&[Backend::Ovlfs], &[Phase::Snapshots], 2, Scale::quick());
        for metric in [Metric::SnapshotTake1k, Metric::SnapshotTake1k, Metric::WriteNoSnapshot] {
            results.record(metric, Backend::Ovlfs, Outcome::Failed("build".to_owned()));
        }
        results.record(Metric::WriteNoSnapshot, Backend::Ovlfs, Outcome::Failed("EIO".to_owned()));
        let table = results.table();
        assert!(table.contains("\n  snapshot_take_1k, write_no_snapshot / ovlfs: build\n"), "{table}");
        assert!(table.contains("\n  write_no_snapshot / ovlfs: EIO"), "{table}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
