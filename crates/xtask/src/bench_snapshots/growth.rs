//! Growing a store of snapshots one take at a time, with progress and an estimate of the time
//! left, and the measurements at each checkpoint; the same for every system, through [`Store`].

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::results::{Cell, Metric, Results};
use super::workload::{self, Rng};
use super::{Plan, System};
use crate::bench::mounts::Mounted;
use crate::bench::{median, progress};
use crate::mountinfo;

/// Takes timed at each checkpoint (the next ones the store grows by).
const TAKE_SAMPLES: usize = 15;
/// `list` and `diff` runs at each checkpoint.
const LIST_SAMPLES: usize = 3;
/// Middle snapshots deleted at each checkpoint (each a different one). Seven, not three: a
/// delete's time is mostly its fsyncs and the background work of the takes just before it, and
/// the median of three moved 13-28 ms at N = 100 between runs of one build (session 17).
const DELETE_SAMPLES: usize = 7;
/// Files written for the first time since the last take, at each checkpoint.
const FIRST_WRITE_SAMPLES: usize = 9;
/// How often a growing store reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The steps the estimate of the time left averages over.
const RECENT_STEPS: usize = 100;

/// A snapshotting system, driven through its command line.
pub trait Store {
    /// Which system this is.
    fn system(&self) -> System;
    /// The tree that changes between takes (for ovlsnap, LIVE through its mount).
    fn live(&self) -> &Path;
    /// Takes snapshot `name`; the command's time from start to exit.
    fn take(&mut self, name: &str) -> Result<Duration>;
    /// Lists the snapshots and checks that there are `expected`; the command's time.
    fn list(&self, expected: usize) -> Result<Duration>;
    /// Lists snapshot `name` alone; the command's time. Only called where [`Metric::ListOne`]
    /// applies to the system.
    fn list_one(&self, name: &str) -> Result<Duration>;
    /// What changed from `older` to `newer`; the command's time. Only called where
    /// [`Metric::Diff`] applies to the system.
    fn diff(&self, older: &str, newer: &str) -> Result<Duration>;
    /// Deletes snapshot `name`; the command's time.
    fn delete(&mut self, name: &str) -> Result<Duration>;
    /// Where the tree of snapshot `name` can be read.
    fn view(&self, name: &str) -> PathBuf;
    /// The daemon serving the store, if the system has one.
    fn daemon(&self) -> Option<u32>;
    /// Mounts snapshot `name` at `at` with the stock kernel's overlay, as the system tells one to;
    /// `None` when that is not how the system shows snapshots.
    fn kernel_mount(&self, name: &str, at: &Path) -> Option<Result<Mounted>>;
}

/// A store growing towards the plan's checkpoints.
pub struct Growth<'a> {
    plan: &'a Plan,
    /// Where kernel mounts of snapshots go.
    view_mnt: PathBuf,
    /// The snapshots in the store, oldest first.
    names: Vec<String>,
    /// Takes so far, which numbers the next name.
    taken: usize,
    rng: Rng,
    /// Files changed since the last take.
    changed: HashSet<usize>,
    /// Durations of the latest steps (changes and a take).
    recent: VecDeque<Duration>,
    /// Steps and their total time since the last checkpoint.
    segment: (usize, Duration),
    last_report: Instant,
}

impl<'a> Growth<'a> {
    /// An empty store's growth; kernel mounts of snapshots go to `view_mnt`.
    pub fn new(plan: &'a Plan, view_mnt: &Path) -> Growth<'a> {
        Growth {
            plan,
            view_mnt: view_mnt.to_owned(),
            names: Vec::new(),
            taken: 0,
            rng: Rng::new(plan.seed),
            changed: HashSet::new(),
            recent: VecDeque::new(),
            segment: (0, Duration::ZERO),
            last_report: Instant::now(),
        }
    }

    /// Grows `store` to each checkpoint in turn and measures there.
    pub fn run(&mut self, store: &mut dyn Store, results: &mut Results) -> Result<()> {
        for &n in &self.plan.checkpoints {
            self.grow_to(store, n)?;
            self.measure(store, n, results)?;
        }
        Ok(())
    }

    /// One step: a few files changed, then a take. Returns the take's time.
    fn step(&mut self, store: &mut dyn Store) -> Result<Duration> {
        let start = Instant::now();
        let files = self.rng.fresh_files(self.plan.changes, &mut self.changed);
        workload::change(store.live(), &files, self.taken + 1)?;
        let name = format!("s{:05}", self.taken + 1);
        let took = store.take(&name)?;
        self.taken += 1;
        self.names.push(name);
        self.changed.clear();
        let elapsed = start.elapsed();
        if self.recent.len() == RECENT_STEPS {
            self.recent.pop_front();
        }
        self.recent.push_back(elapsed);
        self.segment.0 += 1;
        self.segment.1 += elapsed;
        Ok(took)
    }

    /// Steps until the store holds `n` snapshots, reporting progress every so often.
    fn grow_to(&mut self, store: &mut dyn Store, n: usize) -> Result<()> {
        let system = store.system().name();
        if self.names.len() < n {
            progress(&format!("==> {system}: growing from {} to {n} snapshots", self.names.len()));
        }
        while self.names.len() < n {
            self.step(store)?;
            if self.last_report.elapsed() >= PROGRESS_EVERY {
                self.last_report = Instant::now();
                let per_step = self.recent.iter().sum::<Duration>() / self.recent.len().max(1) as u32;
                let left = |to: usize| clock(per_step * to.saturating_sub(self.names.len()) as u32);
                let max = self.plan.max();
                let beyond = if max > n { format!(", {} to {max}", left(max)) } else { String::new() };
                progress(&format!(
                    "    {system}: {} snapshots, {:.1} ms per change+take lately; about {} to {n}{beyond} \
                     (growth only)",
                    self.names.len(),
                    per_step.as_secs_f64() * 1e3,
                    left(n),
                ));
            }
        }
        Ok(())
    }

    /// Every measurement at `n` snapshots; the store grows by [`TAKE_SAMPLES`] and shrinks by
    /// [`DELETE_SAMPLES`] on the way.
    fn measure(&mut self, store: &mut dyn Store, n: usize, results: &mut Results) -> Result<()> {
        let system = store.system();
        let started = Instant::now();
        // Checkpoints closer together than the samples find the store past them already.
        let held = self.names.len();
        progress(&format!(
            "==> {}: N = {n}{}",
            system.name(),
            if held == n { String::new() } else { format!(" ({held} in the store)") }
        ));
        let mut record = |metric: Metric, cell: Cell| {
            progress(&format!("    {:<24} {}", metric.id(), cell.show(metric)));
            results.record(system, n, metric, cell);
        };
        let (steps, spent) = std::mem::take(&mut self.segment);
        let per_step = spent.as_secs_f64() * 1e3 / steps as f64;
        record(Metric::GrowthStep, if steps == 0 { Cell::NotApplicable } else { Cell::Value(per_step) });

        // Work a take left running in the daemon (ovlsnap reseals LIVE in a thread per take).
        if let Some(pid) = store.daemon() {
            let threads = workload::process_threads(pid);
            record(
                Metric::DaemonThreads,
                threads.map_or_else(|e| Cell::Failed(format!("{e:#}")), |n| Cell::Value(n as f64)),
            );
        }

        // First, while nothing has changed since the last take.
        let files = self.rng.fresh_files(FIRST_WRITE_SAMPLES, &mut self.changed);
        record(Metric::FirstWrite, workload::first_writes(store.live(), &files));

        record(Metric::List, samples(LIST_SAMPLES, || store.list(self.names.len())));
        let cell = match self.middle_pair() {
            Some((one, _)) if Metric::ListOne.applies_to(system) => samples(LIST_SAMPLES, || store.list_one(&one)),
            _ => Cell::NotApplicable,
        };
        record(Metric::ListOne, cell);
        let cell = match self.middle_pair() {
            Some((older, newer)) if Metric::Diff.applies_to(system) => {
                samples(LIST_SAMPLES, || store.diff(&older, &newer))
            }
            _ => Cell::NotApplicable,
        };
        record(Metric::Diff, cell);

        let (oldest, newest) = (self.names[0].clone(), self.names[self.names.len() - 1].clone());
        record(Metric::FindLive, workload::cold_walk(store.live(), self.plan.walk_timeout));
        record(Metric::FindNewest, workload::cold_walk(&store.view(&newest), self.plan.walk_timeout));
        record(Metric::FindOldest, workload::cold_walk(&store.view(&oldest), self.plan.walk_timeout));
        if let Some(mounted) = store.kernel_mount(&oldest, &self.view_mnt) {
            let (mount, walk) = self.check_kernel_mount(mounted);
            record(Metric::MountCmdOldest, mount);
            record(Metric::KernelViewWalk, walk);
        }
        if let Some(pid) = store.daemon() {
            let (fds, rss) = match workload::process_usage(pid) {
                Ok((fds, rss)) => (Cell::Value(fds as f64), Cell::Value(rss)),
                Err(err) => (Cell::Failed(format!("{err:#}")), Cell::Failed(format!("{err:#}"))),
            };
            record(Metric::DaemonFds, fds);
            record(Metric::DaemonRss, rss);
        }

        let mut takes = Vec::new();
        for _ in 0..TAKE_SAMPLES {
            match self.step(store) {
                Ok(took) => takes.push(took.as_secs_f64() * 1e3),
                Err(err) => {
                    record(Metric::Take, Cell::Failed(format!("{err:#}")));
                    return Err(err);
                }
            }
        }
        record(Metric::Take, median(&mut takes).map_or(Cell::NotApplicable, Cell::Value));
        // The steps that were samples do not count as growth.
        self.segment = (0, Duration::ZERO);

        // Only where the store had a middle before the samples (as the table: none at 1).
        let cell = if n < 3 {
            Cell::NotApplicable
        } else {
            samples(DELETE_SAMPLES, || {
                let name = self.names.remove(self.names.len() / 2);
                store.delete(&name)
            })
        };
        record(Metric::Delete, cell);
        progress(&format!("    (measured in {})", clock(started.elapsed())));
        Ok(())
    }

    /// Two adjacent snapshots in the middle of the store.
    fn middle_pair(&self) -> Option<(String, String)> {
        let at = self.names.len() / 2;
        (self.names.len() >= 2).then(|| (self.names[at - 1].clone(), self.names[at].clone()))
    }

    /// Whether the kernel mount of the oldest snapshot came up and shows the whole tree (and how
    /// long a cold walk of it takes); unmounts it.
    fn check_kernel_mount(&self, mounted: Result<Mounted>) -> (Cell, Cell) {
        let mut mounted = match mounted {
            Ok(mounted) => mounted,
            Err(err) => return (Cell::Failed(format!("{err:#}")), Cell::NotApplicable),
        };
        let walk = match mountinfo::is_mounted(&self.view_mnt) {
            Ok(true) => workload::cold_walk(&self.view_mnt, self.plan.walk_timeout),
            Ok(false) => {
                Cell::Failed(format!("the command succeeded but nothing is mounted at {}", self.view_mnt.display()))
            }
            Err(err) => Cell::Failed(format!("{err:#}")),
        };
        let unmounted = mounted.unmount();
        let mount = match (&walk, unmounted) {
            (_, Err(err)) => Cell::Failed(format!("unmount: {err:#}")),
            (Cell::Value(_), Ok(())) => Cell::Ok,
            (Cell::Timeout(_), Ok(())) => Cell::Failed("mounted, but its walk timed out".to_owned()),
            (Cell::Failed(why), Ok(())) => Cell::Failed(format!("mounted, but {why}")),
            (_, Ok(())) => Cell::Failed("mounted, but not walked".to_owned()),
        };
        (mount, walk)
    }
}

/// The median in milliseconds of `count` runs of `f`; the first failure instead if one fails.
fn samples(count: usize, mut f: impl FnMut() -> Result<Duration>) -> Cell {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        match f() {
            Ok(elapsed) => times.push(elapsed.as_secs_f64() * 1e3),
            Err(err) => return Cell::Failed(format!("{err:#}")),
        }
    }
    median(&mut times).map_or(Cell::NotApplicable, Cell::Value)
}

/// A duration for people: `42 s`, `3m05s`, `1h02m`.
pub fn clock(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..60 => format!("{:.0} s", duration.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_like_a_person_would_write_it() {
        assert_eq!(clock(Duration::from_secs(42)), "42 s");
        assert_eq!(clock(Duration::from_secs(185)), "3m05s");
        assert_eq!(clock(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn samples_give_the_median_or_the_first_failure() {
        let mut n = 0;
        let cell = samples(3, || {
            n += 1;
            Ok(Duration::from_millis(n * 10))
        });
        assert_eq!(cell, Cell::Value(20.0));
        let cell = samples(3, || anyhow::bail!("no"));
        assert_eq!(cell, Cell::Failed("no".to_owned()));
    }
}
