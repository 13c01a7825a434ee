//! What is measured at each checkpoint, the results, the targets of issue 17, and their report: a
//! Markdown table (a row per metric, a column per checkpoint and system) and JSON (by hand, as
//! the rest of xtask: `anyhow` and `clap` only).

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use super::workload::{DIRS, ENTRIES, FILES_PER_DIR};
use super::{Plan, System};
use crate::bench::Pressure;
use crate::bench::report::{json_number, machine, markdown_table, number, string};

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// The take command, from start to exit: the median of the takes right after the checkpoint.
    Take,
    /// The list command (`ovlsnap list --json`, `btrfs subvolume list`): its output grows with N.
    List,
    /// The list command for one snapshot in the middle (`ovlsnap list --json NAME`): what a
    /// list costs apart from its output.
    ListOne,
    /// `ovlsnap diff` of two adjacent snapshots in the middle of the store.
    Diff,
    /// Deleting a snapshot in the middle of the store.
    Delete,
    /// A walk (readdir + lstat of everything) of the oldest snapshot's tree, caches dropped.
    FindOldest,
    /// The same for the newest snapshot.
    FindNewest,
    /// The same for LIVE itself (for ovlsnap: through its mount, an ovlfs overlay of LIVE).
    FindLive,
    /// [`Metric::FindOldest`] / [`Metric::FindNewest`] (derived, not recorded).
    OldestOverNewest,
    /// Open, write a byte, close of a file not written since the last take (its copy-on-write).
    FirstWrite,
    /// Open descriptors of the daemon.
    DaemonFds,
    /// Resident memory of the daemon.
    DaemonRss,
    /// Threads of the daemon right after the growth to the checkpoint (before the measurements).
    DaemonThreads,
    /// Whether the command `ovlsnap mount-cmd` prints for the oldest snapshot mounts it, with
    /// the whole tree.
    MountCmdOldest,
    /// A cold walk of that kernel mount.
    KernelViewWalk,
    /// Changes plus a take, averaged over the growth since the previous checkpoint.
    GrowthStep,
}

impl Metric {
    /// Every row, in table order.
    pub const ALL: [Metric; 16] = [
        Metric::Take,
        Metric::List,
        Metric::ListOne,
        Metric::Diff,
        Metric::Delete,
        Metric::FindOldest,
        Metric::FindNewest,
        Metric::FindLive,
        Metric::OldestOverNewest,
        Metric::FirstWrite,
        Metric::DaemonFds,
        Metric::DaemonRss,
        Metric::DaemonThreads,
        Metric::MountCmdOldest,
        Metric::KernelViewWalk,
        Metric::GrowthStep,
    ];

    /// The stable name (the JSON key).
    pub fn id(self) -> &'static str {
        match self {
            Metric::Take => "take",
            Metric::List => "list",
            Metric::ListOne => "list_one",
            Metric::Diff => "diff_middle",
            Metric::Delete => "delete_middle",
            Metric::FindOldest => "find_oldest_cold",
            Metric::FindNewest => "find_newest_cold",
            Metric::FindLive => "find_live_cold",
            Metric::OldestOverNewest => "find_oldest_over_newest",
            Metric::FirstWrite => "first_cow_write",
            Metric::DaemonFds => "daemon_fds",
            Metric::DaemonRss => "daemon_rss",
            Metric::DaemonThreads => "daemon_threads_after_growth",
            Metric::MountCmdOldest => "mount_cmd_oldest",
            Metric::KernelViewWalk => "kernel_mount_find_cold",
            Metric::GrowthStep => "growth_step",
        }
    }

    /// The unit of its values.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::FindOldest | Metric::FindNewest | Metric::FindLive | Metric::KernelViewWalk => "s",
            Metric::OldestOverNewest => "ratio",
            Metric::DaemonFds | Metric::DaemonThreads => "count",
            Metric::DaemonRss => "MiB",
            Metric::MountCmdOldest => "-",
            _ => "ms",
        }
    }

    /// Whether `system` has it at all (btrfs has no daemon, no diff command, no kernel overlay).
    pub fn applies_to(self, system: System) -> bool {
        system == System::Ovlsnap
            || !matches!(
                self,
                Metric::Diff
                    | Metric::ListOne
                    | Metric::DaemonFds
                    | Metric::DaemonRss
                    | Metric::DaemonThreads
                    | Metric::MountCmdOldest
                    | Metric::KernelViewWalk
            )
    }
}

/// What one cell of the table holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// A number in the metric's unit.
    Value(f64),
    /// At least this much (a ratio with a timed-out walk above it).
    AtLeast(f64),
    /// It worked (a yes/no metric).
    Ok,
    /// A walk stopped after this many seconds.
    Timeout(f64),
    /// Something failed; what.
    Failed(String),
    /// Not measured here (no middle snapshot at N = 1; a metric the system does not have).
    NotApplicable,
}

impl Cell {
    /// The cell as a progress line shows it.
    pub fn show(&self, metric: Metric) -> String {
        match self {
            Cell::Failed(why) => format!("FAILED: {why}"),
            Cell::Ok | Cell::NotApplicable | Cell::Timeout(_) => self.short(metric),
            cell => format!("{} {}", cell.short(metric), metric.unit()),
        }
    }

    /// The cell in the table, where a failure is a footnote.
    fn short(&self, metric: Metric) -> String {
        match self {
            Cell::Value(value) if metric.unit() == "count" => format!("{value:.0}"),
            Cell::Value(value) => number(*value),
            Cell::AtLeast(value) => format!(">{}", number(*value)),
            Cell::Ok => "ok".to_owned(),
            Cell::Timeout(secs) => format!("timeout (>{secs:.0} s)"),
            Cell::Failed(_) => "failed".to_owned(),
            Cell::NotApplicable => "-".to_owned(),
        }
    }

    fn json(&self) -> String {
        match self {
            Cell::Value(value) => json_number(*value),
            Cell::AtLeast(value) => format!("{{\"at_least\": {}}}", json_number(*value)),
            Cell::Ok => "\"ok\"".to_owned(),
            Cell::Timeout(secs) => format!("{{\"timeout_s\": {}}}", json_number(*secs)),
            Cell::Failed(why) => format!("{{\"error\": {}}}", string(why)),
            Cell::NotApplicable => "null".to_owned(),
        }
    }
}

/// Everything measured in a run, and the context to report it in.
pub struct Results {
    checkpoints: Vec<usize>,
    systems: Vec<System>,
    changes: usize,
    seed: u64,
    walk_timeout: Duration,
    cells: HashMap<(System, usize, Metric), Cell>,
    elapsed: Duration,
    pressure: Option<Pressure>,
    /// Read at the start: the build described is the one measured, not the tree at the end.
    machine: Vec<(&'static str, String)>,
}

impl Results {
    /// No results yet for the run of `plan` on `systems`.
    pub fn new(plan: &Plan, systems: &[System]) -> Results {
        Results {
            checkpoints: plan.checkpoints.clone(),
            systems: systems.to_vec(),
            changes: plan.changes,
            seed: plan.seed,
            walk_timeout: plan.walk_timeout,
            cells: HashMap::new(),
            elapsed: Duration::ZERO,
            pressure: None,
            machine: machine()
                .into_iter()
                .filter_map(|(key, value)| match key {
                    "cpu" | "memory" | "kernel" => Some((key, value)),
                    "ovlfs" => Some(("ovlsnap", value)),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Records the cell of `metric` for `system` at `n` snapshots.
    pub fn record(&mut self, system: System, n: usize, metric: Metric, cell: Cell) {
        self.cells.insert((system, n, metric), cell);
    }

    /// `system` stopped with `why`: every cell it did not reach says so.
    pub fn stopped(&mut self, system: System, why: &str) {
        for &n in &self.checkpoints {
            for metric in Metric::ALL {
                if metric != Metric::OldestOverNewest && metric.applies_to(system) {
                    self.cells.entry((system, n, metric)).or_insert_with(|| Cell::Failed(format!("stopped: {why}")));
                }
            }
        }
    }

    /// How long the run took and how much it stalled.
    pub fn set_elapsed(&mut self, elapsed: Duration, pressure: Option<Pressure>) {
        self.elapsed = elapsed;
        self.pressure = pressure;
    }

    /// The cell of `metric` for `system` at `n`, the ratio derived; `None` when not reached.
    fn cell(&self, system: System, n: usize, metric: Metric) -> Option<Cell> {
        if metric != Metric::OldestOverNewest {
            return self.cells.get(&(system, n, metric)).cloned();
        }
        let oldest = self.cell(system, n, Metric::FindOldest)?;
        let newest = self.cell(system, n, Metric::FindNewest)?;
        Some(match (oldest, newest) {
            (Cell::Value(oldest), Cell::Value(newest)) => Cell::Value(oldest / newest),
            (Cell::Timeout(oldest), Cell::Value(newest)) => Cell::AtLeast(oldest / newest),
            _ => Cell::NotApplicable,
        })
    }

    fn value(&self, system: System, n: usize, metric: Metric) -> Option<f64> {
        match self.cell(system, n, metric)? {
            Cell::Value(value) => Some(value),
            _ => None,
        }
    }

    /// The table, its footnotes, the targets and the circumstances, in Markdown.
    pub fn table(&self) -> String {
        let mut header = vec!["metric".to_owned(), "unit".to_owned()];
        for &n in &self.checkpoints {
            for system in &self.systems {
                header.push(format!("N={n} {}", system.name()));
            }
        }
        let mut notes: Vec<String> = Vec::new();
        let mut rows = vec![header];
        for metric in Metric::ALL {
            let mut row = vec![metric.id().to_owned(), metric.unit().to_owned()];
            for &n in &self.checkpoints {
                for &system in &self.systems {
                    row.push(match self.cell(system, n, metric) {
                        None => String::new(),
                        Some(Cell::Failed(why)) => {
                            let index = notes.iter().position(|note| *note == why).unwrap_or_else(|| {
                                notes.push(why);
                                notes.len() - 1
                            });
                            format!("failed [{}]", index + 1)
                        }
                        Some(cell) => cell.short(metric),
                    });
                }
            }
            rows.push(row);
        }
        let mut out = markdown_table(&rows);
        for (i, note) in notes.iter().enumerate() {
            let _ = writeln!(out, "[{}] {note}", i + 1);
        }
        out.push_str("\nTargets (issue 17):\n");
        for (what, met) in self.targets() {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let _ = writeln!(out, "- {what}: {verdict}");
        }
        let _ = writeln!(out, "\n{}", self.circumstances());
        out
    }

    /// One paragraph: the workload, the machine, the time and the stalls.
    fn circumstances(&self) -> String {
        let mut out = format!(
            "Tree: {DIRS} dirs x {FILES_PER_DIR} files of 100 bytes ({ENTRIES} entries) on a fresh loop image per \
             system; {} files overwritten before each take (seed {}); walks stopped after {} s. Run: {:.0} s",
            self.changes,
            self.seed,
            self.walk_timeout.as_secs(),
            self.elapsed.as_secs_f64()
        );
        if let Some((cpu, io)) = self.pressure_percent() {
            let _ = write!(out, "; pressure stalls: cpu {cpu:.0}%, io {io:.0}% of it");
        }
        out.push('.');
        for (key, value) in &self.machine {
            let _ = write!(out, "\n{key}: {value}");
        }
        out
    }

    fn pressure_percent(&self) -> Option<(f64, f64)> {
        let (cpu, io) = self.pressure?.micros();
        let total = self.elapsed.as_micros().max(1) as f64;
        Some((cpu as f64 * 100.0 / total, io as f64 * 100.0 / total))
    }

    /// The targets of issue 17 that this run can judge, with whether each was met (`None`: not
    /// measured).
    fn targets(&self) -> Vec<(String, Option<bool>)> {
        let mut out = Vec::new();
        if !self.systems.contains(&System::Ovlsnap) {
            return out;
        }
        let ours = System::Ovlsnap;
        // Flat in N: the largest checkpoint within 2x (plus a little) of the smallest measured.
        // A full list prints a row per snapshot: its cost per row is what must stay flat (the
        // issue's "apart from the output size"; `list_one` shows the rest of it flat).
        let rows: Vec<(usize, f64)> =
            self.checkpoints.iter().filter_map(|&n| Some((n, self.value(ours, n, Metric::List)? / n as f64))).collect();
        match rows.len() {
            0 | 1 => out.push(("list per row flat in N".into(), None)),
            k => {
                // The two largest checkpoints: at small N the fixed cost of a call is most of it.
                let ((n0, first), (n1, last)) = (rows[k - 2], rows[k - 1]);
                out.push((
                    format!(
                        "list per row flat in N (N={n1} <= 2x N={n0}): {} -> {} us a row",
                        number(first * 1e3),
                        number(last * 1e3)
                    ),
                    Some(last <= 2.0 * first),
                ));
            }
        }
        for (metric, slack) in [
            (Metric::Take, 1.0),
            (Metric::ListOne, 1.0),
            (Metric::Diff, 1.0),
            (Metric::Delete, 1.0),
            (Metric::FirstWrite, 1.0),
            (Metric::DaemonRss, 4.0),
            (Metric::DaemonFds, 16.0),
        ] {
            let measured: Vec<(usize, f64)> =
                self.checkpoints.iter().filter_map(|&n| Some((n, self.value(ours, n, metric)?))).collect();
            let (what, met) = match (measured.first(), measured.last()) {
                (Some(&(n0, first)), Some(&(n1, last))) if n1 > n0 => (
                    format!(
                        "{} flat in N (N={n1} <= 2x N={n0} + {slack} {unit}): {} -> {} {unit}",
                        metric.id(),
                        number(first),
                        number(last),
                        unit = metric.unit()
                    ),
                    Some(last <= 2.0 * first + slack),
                ),
                _ => (format!("{} flat in N", metric.id()), None),
            };
            out.push((what, met));
        }
        // A snapshot's view of one layer (the newest) walks within 2x of LIVE's own mount, at
        // every N (the worst ratio counts).
        let ratios: Vec<(usize, Option<f64>)> = self
            .checkpoints
            .iter()
            .filter_map(|&n| {
                let (newest, live) = (self.cell(ours, n, Metric::FindNewest)?, self.value(ours, n, Metric::FindLive)?);
                Some((n, if let Cell::Value(v) = newest { Some(v / live) } else { None }))
            })
            .collect();
        let worst = ratios.iter().max_by(|a, b| a.1.unwrap_or(f64::INFINITY).total_cmp(&b.1.unwrap_or(f64::INFINITY)));
        out.push(match worst {
            None => ("newest-view find within 2x of LIVE's at every N".into(), None),
            Some(&(n, r)) => (
                format!(
                    "newest-view find within 2x of LIVE's at every N: worst {} at N={n}",
                    r.map_or("(no walk)".into(), number)
                ),
                Some(r.is_some_and(|r| r <= 2.0)),
            ),
        });
        let n = 1000;
        let ratio = self.cell(ours, n, Metric::OldestOverNewest);
        out.push((
            format!(
                "oldest-view find within 2x of the newest at N={n}: {}",
                ratio.as_ref().map_or("-".into(), |c| c.short(Metric::OldestOverNewest))
            ),
            match ratio {
                Some(Cell::Value(r)) => Some(r <= 2.0),
                Some(Cell::AtLeast(_)) => Some(false),
                _ => None,
            },
        ));
        let (oldest, btrfs) =
            (self.cell(ours, n, Metric::FindOldest), self.value(System::Btrfs, n, Metric::FindOldest));
        out.push((
            format!(
                "oldest-view find within 10x of btrfs at N={n}: {} s vs {} s",
                oldest.as_ref().map_or("-".into(), |c| c.short(Metric::FindOldest)),
                btrfs.map_or("-".into(), number)
            ),
            match (oldest, btrfs) {
                (Some(Cell::Value(ours)), Some(theirs)) => Some(ours <= 10.0 * theirs),
                (Some(Cell::Timeout(_)), Some(_)) => Some(false),
                _ => None,
            },
        ));
        let mount = self.cell(ours, n, Metric::MountCmdOldest);
        out.push((
            format!("`mount-cmd` of the oldest snapshot mounts and shows the tree at N={n}"),
            mount.map(|cell| cell == Cell::Ok),
        ));
        out
    }

    /// The results as JSON: per metric, per system, one value per checkpoint (a number; `null`
    /// when not applicable or not reached; `"ok"`; or an object saying `timeout_s`, `at_least`
    /// or `error`).
    pub fn json(&self) -> String {
        let mut out = String::from("{\n  \"benchmark\": \"bench-snapshots\",\n");
        let _ = writeln!(
            out,
            "  \"tree\": {{\"dirs\": {DIRS}, \"files_per_dir\": {FILES_PER_DIR}, \"file_bytes\": 100, \"entries\": {ENTRIES}}},"
        );
        let _ = writeln!(
            out,
            "  \"changes_per_take\": {},\n  \"seed\": {},\n  \"walk_timeout_s\": {},",
            self.changes,
            self.seed,
            self.walk_timeout.as_secs()
        );
        let points: Vec<String> = self.checkpoints.iter().map(usize::to_string).collect();
        let _ = writeln!(out, "  \"checkpoints\": [{}],", points.join(", "));
        let machine: Vec<String> =
            self.machine.iter().map(|(key, value)| format!("{}: {}", string(key), string(value))).collect();
        let _ = writeln!(out, "  \"machine\": {{{}}},", machine.join(", "));
        let _ = writeln!(out, "  \"elapsed_s\": {},", json_number(self.elapsed.as_secs_f64()));
        let pressure = self.pressure.map(Pressure::micros).map_or("null".to_owned(), |(cpu, io)| {
            format!("{{\"cpu_stall_s\": {}, \"io_stall_s\": {}}}", cpu as f64 / 1e6, io as f64 / 1e6)
        });
        let _ = writeln!(out, "  \"pressure\": {pressure},");
        let metrics: Vec<String> = Metric::ALL
            .iter()
            .map(|&metric| {
                let systems: Vec<String> = self
                    .systems
                    .iter()
                    .map(|&system| {
                        let cells: Vec<String> = self
                            .checkpoints
                            .iter()
                            .map(|&n| self.cell(system, n, metric).map_or("null".to_owned(), |c| c.json()))
                            .collect();
                        format!("{}: [{}]", string(system.name()), cells.join(", "))
                    })
                    .collect();
                format!(
                    "    {{\"id\": {}, \"unit\": {}, {}}}",
                    string(metric.id()),
                    string(metric.unit()),
                    systems.join(", ")
                )
            })
            .collect();
        let _ = writeln!(out, "  \"metrics\": [\n{}\n  ],", metrics.join(",\n"));
        let targets: Vec<String> = self
            .targets()
            .iter()
            .map(|(what, met)| {
                let met = met.map_or("null".to_owned(), |m| m.to_string());
                format!("    {{\"target\": {}, \"met\": {met}}}", string(what))
            })
            .collect();
        let _ = writeln!(out, "  \"targets\": [\n{}\n  ]\n}}", targets.join(",\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        let plan = Plan { checkpoints: vec![1, 1000], changes: 10, seed: 1, walk_timeout: Duration::from_secs(300) };
        Results::new(&plan, &[System::Ovlsnap, System::Btrfs])
    }

    #[test]
    fn the_ratio_is_derived_and_a_timeout_makes_it_a_lower_bound() {
        let mut r = results();
        r.record(System::Ovlsnap, 1, Metric::FindOldest, Cell::Value(3.0));
        r.record(System::Ovlsnap, 1, Metric::FindNewest, Cell::Value(1.5));
        r.record(System::Ovlsnap, 1000, Metric::FindOldest, Cell::Timeout(300.0));
        r.record(System::Ovlsnap, 1000, Metric::FindNewest, Cell::Value(1.0));
        assert_eq!(r.cell(System::Ovlsnap, 1, Metric::OldestOverNewest), Some(Cell::Value(2.0)));
        assert_eq!(r.cell(System::Ovlsnap, 1000, Metric::OldestOverNewest), Some(Cell::AtLeast(300.0)));
        assert_eq!(r.cell(System::Btrfs, 1, Metric::OldestOverNewest), None);
        let targets = r.targets();
        let within = targets.iter().find(|(what, _)| what.starts_with("oldest-view find within 2x")).unwrap();
        assert_eq!(within.1, Some(false));
    }

    #[test]
    fn flatness_compares_the_largest_checkpoint_with_the_smallest() {
        let mut r = results();
        r.record(System::Ovlsnap, 1, Metric::Take, Cell::Value(5.0));
        r.record(System::Ovlsnap, 1000, Metric::Take, Cell::Value(10.5));
        r.record(System::Ovlsnap, 1, Metric::List, Cell::Value(5.0));
        r.record(System::Ovlsnap, 1000, Metric::List, Cell::Value(12.0));
        let targets = r.targets();
        let met = |id: &str| targets.iter().find(|(what, _)| what.starts_with(id)).unwrap().1;
        assert_eq!(met("take flat"), Some(true));
        assert_eq!(met("diff_middle flat"), None);
        // A full list is judged per row printed: 5 ms for one row, 12 ms for 1000 is flat.
        assert_eq!(met("list per row flat"), Some(true));
        r.record(System::Ovlsnap, 1000, Metric::List, Cell::Value(10_500.0));
        let targets = r.targets();
        let met = |id: &str| targets.iter().find(|(what, _)| what.starts_with(id)).unwrap().1;
        assert_eq!(met("list per row flat"), Some(false), "10.5 ms a row against 5");
        assert_eq!(met("newest-view find within 2x of LIVE's"), None, "no walks recorded");
        for (n, newest, live) in [(1, 1.0, 0.8), (1000, 1.5, 0.7)] {
            r.record(System::Ovlsnap, n, Metric::FindNewest, Cell::Value(newest));
            r.record(System::Ovlsnap, n, Metric::FindLive, Cell::Value(live));
        }
        let targets = r.targets();
        let within = targets.iter().find(|(what, _)| what.starts_with("newest-view find")).unwrap();
        assert_eq!(within.1, Some(false), "{}", within.0);
        assert!(within.0.contains("at N=1000"), "the worst one: {}", within.0);
        r.record(System::Ovlsnap, 1000, Metric::FindNewest, Cell::Value(1.3));
        assert_eq!(r.targets().iter().find(|(what, _)| what.starts_with("newest-view find")).unwrap().1, Some(true));
        assert!(!targets.iter().any(|(what, _)| what.starts_with("list flat")));
    }

    #[test]
    fn a_stopped_system_fails_what_it_did_not_reach_and_failures_are_footnotes() {
        let mut r = results();
        r.record(System::Btrfs, 1, Metric::Take, Cell::Value(20.0));
        r.stopped(System::Btrfs, "no mkfs.btrfs");
        assert_eq!(r.cell(System::Btrfs, 1, Metric::Take), Some(Cell::Value(20.0)));
        assert_eq!(r.cell(System::Btrfs, 1000, Metric::List), Some(Cell::Failed("stopped: no mkfs.btrfs".into())));
        assert_eq!(r.cell(System::Btrfs, 1000, Metric::DaemonFds), None);
        let table = r.table();
        assert!(table.contains("failed [1]"), "{table}");
        assert!(table.contains("\n[1] stopped: no mkfs.btrfs\n"), "{table}");
        assert!(!table.contains("[2]"), "one footnote per reason: {table}");
        let json = r.json();
        assert!(json.contains("\"btrfs\": [20, {\"error\""), "{json}");
        assert!(json.contains("{\"error\": \"stopped: no mkfs.btrfs\"}"), "{json}");
    }
}
