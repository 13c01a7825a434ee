//! The harness of the crash tests (`crash.rs`): rounds on a fresh LIVE, the kill of the daemon
//! at a random instant while an operation runs on a thread, the remount, and the checks that
//! follow (the store, the list, every view, LIVE against the states before and after).

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rustix::mount::UnmountFlags;
use rustix::process::{Pid, Signal};

use crate::common::*;

mod tree;
pub use tree::*;

/// How long the operation may stay blocked once the daemon is dead (it should fail at once).
pub const AFTER_KILL: Duration = Duration::from_secs(30);

/// The smallest bound of the kill delay.
pub const MIN_DELAY: Duration = Duration::from_millis(2);

/// Settings read from the environment.
pub struct Config {
    /// The seed of the first round.
    pub seed: u64,
    /// Rounds per kind.
    pub rounds: u64,
    /// Print each round's steps.
    pub verbose: bool,
}

impl Config {
    /// Reads the `OVLSNAP_CRASH_*` variables.
    pub fn from_env() -> Config {
        let num = |name: &str, default: u64| {
            std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        };
        Config {
            seed: num("OVLSNAP_CRASH_SEED", 1),
            rounds: num("OVLSNAP_CRASH_ROUNDS", 15),
            verbose: std::env::var_os("OVLSNAP_CRASH_VERBOSE").is_some(),
        }
    }
}

/// The bound of the random kill delay, learned from the rounds so far.
pub struct Tuner {
    /// The current bound.
    pub max: Duration,
}

impl Tuner {
    /// Learns from one kill after `delay`: `took` is how long the operation ran when it had
    /// already returned by then.
    pub fn learn(&mut self, delay: Duration, took: Option<Duration>) {
        match took {
            Some(t) => self.max = t.mul_f64(1.25).max(MIN_DELAY),
            None if delay > self.max.mul_f64(0.7) => self.max = self.max.mul_f64(1.5),
            None => {}
        }
    }
}

/// What LIVE was after the remount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    /// As before the interrupted step.
    Before,
    /// As after it.
    After,
    /// In between (restore and receive only; a rerun finished it).
    Between,
}

/// How one round went, for the summary.
pub struct Outcome {
    /// Which state LIVE was in.
    pub live: Live,
    /// Whether the operation had returned before the kill.
    pub finished: bool,
}

/// Counts of outcomes of one kind.
#[derive(Default)]
pub struct Stats {
    rounds: u64,
    before: u64,
    after: u64,
    between: u64,
    in_flight: u64,
    leftovers: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rounds, killed in flight {}; LIVE before {}, after {}, in between {}",
            self.rounds, self.in_flight, self.before, self.after, self.between
        )?;
        if self.leftovers > 0 {
            write!(f, "; leftovers after the kill (receive stages, restore temporaries) {}", self.leftovers)?;
        }
        Ok(())
    }
}

/// Prints the round's notes and how to reproduce it if it fails (also during a panic).
pub struct PanicNote {
    /// The headline, with the command that reproduces the round.
    pub text: String,
    /// What the round did so far.
    pub notes: Vec<String>,
}

impl Drop for PanicNote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}\n  {}", self.text, self.notes.join("\n  "));
        }
    }
}

/// Runs the rounds of one kind of operation; `round` plays one on a fresh [`Round`].
pub fn run_kind(kind: &'static str, test: &str, first_max: Duration, mut round: impl FnMut(&mut Round) -> Outcome) {
    let cfg = Config::from_env();
    let mut tuner = Tuner { max: first_max };
    let mut stats = Stats::default();
    for i in 0..cfg.rounds {
        let seed = cfg.seed + i;
        let mut r = Round::new(kind, seed, cfg.verbose, tuner.max);
        r.note.text = format!(
            "crash round failed: {kind}, seed {seed} ({:?}); reproduce with OVLSNAP_CRASH_SEED={seed} \
             OVLSNAP_CRASH_ROUNDS=1 cargo test -p snap-cli --test it -- --exact crash::{test}",
            r.m.form()
        );
        let out = round(&mut r);
        tuner.learn(r.delay, r.took);
        stats.rounds += 1;
        stats.leftovers += r.leftovers;
        stats.in_flight += u64::from(!out.finished);
        match out.live {
            Live::Before => stats.before += 1,
            Live::After => stats.after += 1,
            Live::Between => stats.between += 1,
        }
        r.finish();
    }
    eprintln!("crash {kind} (seeds {}..{}): {stats}", cfg.seed, cfg.seed + cfg.rounds);
}

/// An operation run by [`Round::crash`]: it counts its successful steps in the counter.
pub type Op = Box<dyn FnOnce(&AtomicUsize) -> Result<(), String> + Send>;

/// What the operation thread reported.
pub struct Crash {
    /// Steps that returned successfully.
    pub done: usize,
    /// The first error, if any.
    pub error: Option<String>,
    /// Whether the operation had returned before the kill.
    pub finished: bool,
}

/// One round: a fresh LIVE and its mount, the snapshots it must hold and their trees.
pub struct Round {
    /// The kind of operation, for messages.
    pub kind: &'static str,
    /// The round's random source (from its seed).
    pub rng: StdRng,
    /// LIVE and its mount.
    pub m: SnapMount,
    /// LIVE opened before the first mount: reaches the store under a stacked mount.
    pub live_dir: Option<File>,
    /// The snapshots the store must hold, oldest first, with their recorded trees.
    pub snaps: Vec<(String, Tree)>,
    /// Print each step.
    pub verbose: bool,
    /// The kill delay bound for this round.
    pub max: Duration,
    /// The delay of the kill.
    pub delay: Duration,
    /// How long the operation took, when it returned before the kill.
    pub took: Option<Duration>,
    /// Receive stages or restore temporaries found after the kill (a rerun must remove them).
    pub leftovers: u64,
    /// What to print if the round fails.
    pub note: PanicNote,
}

impl Round {
    /// A round of `kind` from `seed`: LIVE prepared (empty), the form of the mount chosen.
    pub fn new(kind: &'static str, seed: u64, verbose: bool, max: Duration) -> Round {
        let mut rng = StdRng::seed_from_u64(seed ^ fnv(kind.as_bytes()));
        let form = if rng.random_bool(0.5) { Form::Stacked } else { Form::Separate };
        Round {
            kind,
            rng,
            m: SnapMount::prepare(form),
            live_dir: None,
            snaps: Vec::new(),
            verbose,
            max,
            delay: Duration::ZERO,
            took: None,
            leftovers: 0,
            note: PanicNote { text: String::new(), notes: Vec::new() },
        }
    }

    /// Notes a step of the round (printed when it fails, or at once when verbose).
    pub fn log(&mut self, line: String) {
        if self.verbose {
            eprintln!("[{}] {line}", self.kind);
        }
        self.note.notes.push(line);
    }

    /// Fills LIVE with `init`, then mounts it.
    pub fn start(&mut self, init: impl FnOnce(&Path, &mut StdRng)) {
        init(self.m.live(), &mut self.rng);
        self.live_dir = Some(File::open(self.m.live()).expect("open LIVE"));
        self.m.mount();
    }

    /// The mount point.
    pub fn mnt(&self) -> PathBuf {
        self.m.mnt().to_owned()
    }

    /// Takes snapshot `name` and records the live tree as its expected view.
    pub fn take(&mut self, name: &str) -> Tree {
        self.m.take(Some(name));
        let tree = record_unlinked(self.m.mnt());
        self.snaps.push((name.to_owned(), tree.clone()));
        self.log(format!("took {name}"));
        tree
    }

    /// The store as seen under the mount (through the descriptor of LIVE).
    pub fn store(&self) -> PathBuf {
        let fd = self.live_dir.as_ref().expect("mounted").as_raw_fd();
        PathBuf::from(format!("/proc/self/fd/{fd}/.ovlsnap"))
    }

    /// Runs `op` on a thread, kills the daemon after a random delay, detaches the dead mount and
    /// mounts LIVE again. `op` counts its successful steps in the counter it is given.
    pub fn crash(&mut self, what: &str, op: impl FnOnce(&AtomicUsize) -> Result<(), String> + Send + 'static) -> Crash {
        let pid = daemon_pid(self.m.mnt());
        let conn = fuse_connection(self.m.mnt());
        self.delay = self.max.mul_f64(self.rng.random());
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let counter = done.clone();
        let start = Instant::now();
        std::thread::spawn(move || {
            let r = op(&counter);
            let _ = tx.send((r, start.elapsed()));
        });
        sleep(self.delay.saturating_sub(start.elapsed()));
        let early = rx.try_recv().ok();
        kill_and_wait(pid, conn);
        let finished = early.is_some();
        let (result, took) = match early {
            Some(r) => r,
            None => rx
                .recv_timeout(AFTER_KILL)
                .unwrap_or_else(|_| panic!("{what}: still blocked {AFTER_KILL:?} after the daemon was killed")),
        };
        self.took = finished.then_some(took);
        let done = done.load(Ordering::SeqCst);
        self.log(format!(
            "{what}: daemon killed after {:?} (bound {:?}); {} after {took:?} with {done} step(s) done: {result:?}",
            self.delay,
            self.max,
            if finished { "it had returned" } else { "it was in flight, returned" },
        ));
        rustix::mount::unmount(self.m.mnt(), UnmountFlags::DETACH).expect("umount -l the dead mount");
        self.m.mark_unmounted();
        self.m.mount();
        Crash { done, error: result.err(), finished }
    }

    /// Runs `cmd` (an `ovlsnap` client: the daemon is not touched) and kills it with SIGKILL after
    /// a random delay; one step when it succeeded before the kill.
    pub fn kill_client(&mut self, what: &str, cmd: Command) -> Crash {
        self.delay = self.max.mul_f64(self.rng.random());
        let (crash, took) = kill_client_after(cmd, self.delay);
        self.took = took;
        self.log(format!(
            "{what}: client killed after {:?} (bound {:?}); {}: {:?}",
            self.delay,
            self.max,
            if crash.finished { "it had returned" } else { "it was in flight" },
            crash.error,
        ));
        crash
    }

    /// Waits (with a deadline) until the daemon has finished what a killed client had asked of
    /// it: its copies in `work/work` are built and renamed in.
    pub fn settle(&self) {
        let work = self.store().join("work/work");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !names_in(&work).is_empty() && Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
    }

    /// Checks the store, the list and every view after the remount.
    pub fn check_snapshots(&self) {
        let store = self.store();
        let mut work = names_in(&store.join("work/work"));
        // The shared whiteout new whiteouts are linked from is made again by the new daemon.
        work.retain(|n| n != "#ovl.whiteout");
        assert!(work.is_empty(), "work/work after the remount: {work:?}");
        for journal in ["rename-in-progress.json", "delete-in-progress.json"] {
            assert!(!store.join(journal).exists(), "{journal} is still there after the remount");
        }
        // The list: `snapshots.json` and the log of changes since (a daemon that still runs,
        // after a client was killed, has not folded it).
        let root = fs::File::open(&store).expect("open the store");
        let meta = snap_fs::store::read_meta(std::os::fd::AsFd::as_fd(&root))
            .unwrap_or_else(|e| panic!("the snapshot list: {e:#}"))
            .expect("a snapshot list");
        let mut names = Vec::new();
        let mut ids = Vec::new();
        for s in &meta.snapshots {
            let layer = store.join("layers").join(format!("{}", s.id));
            assert!(layer.is_dir(), "the list names snapshot {} but {} is missing", s.name, layer.display());
            names.push(s.name.clone());
            ids.push(format!("{}", s.id));
        }
        ids.sort();
        assert_eq!(names_in(&store.join("layers")), ids, "layer dirs vs the snapshot list");
        let want: Vec<&str> = self.snaps.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, want, "the snapshot list after the remount");
        let listed: Vec<String> = self.m.list().into_iter().map(|s| s.name).collect();
        assert_eq!(listed, want, "ovlsnap list after the remount");
        let mut sorted = want.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        sorted.sort();
        assert_eq!(self.m.listed_views(), sorted, ".snapshots after the remount");
        for (name, tree) in &self.snaps {
            assert_same_tree(tree, &record_unlinked(&self.m.view(name)), &format!("view of {name} after the remount"));
        }
    }

    /// Which of the `states` LIVE is in: `states[done]` (before the step in flight) or
    /// `states[done + 1]` (after it); only the last one when the op had finished cleanly.
    pub fn check_live(&self, states: &[Tree], crash: &Crash) -> Live {
        let live = record_unlinked(self.m.mnt());
        self.check_live_tree(&live, states, crash)
    }

    /// [`check_live`](Self::check_live) of a recorded tree.
    pub fn check_live_tree(&self, live: &Tree, states: &[Tree], crash: &Crash) -> Live {
        // The states are modelled change by change, which does not follow link counts: the
        // crash tests judge atomicity, the hard-link tests (`hardlinks.rs`) judge links.
        let live = &tree::unlinked(live);
        let states: Vec<Tree> = states.iter().map(tree::unlinked).collect();
        let last = states.len() - 1;
        if crash.finished && crash.error.is_none() {
            assert_same_tree(&states[last], live, "LIVE after an operation that returned before the kill");
            return Live::After;
        }
        let i = crash.done.min(last);
        if diff_trees(&states[i], live).is_empty() {
            return Live::Before;
        }
        if i < last && diff_trees(&states[i + 1], live).is_empty() {
            return Live::After;
        }
        let mut msg = format!("LIVE after the remount is neither state {i} nor {} of {last}:\n", i + 1);
        for (j, label) in [(i, "before"), ((i + 1).min(last), "after")] {
            let d = diff_trees(&states[j], live);
            msg.push_str(&format!(
                "  vs {label} ({} differences):\n    {}\n",
                d.len(),
                d[..d.len().min(12)].join("\n    ")
            ));
        }
        panic!("{msg}");
    }

    /// The kernel mounts the newest snapshot and shows its tree; a change after the remount is
    /// still saved into it.
    pub fn check_kernel_and_cow(&mut self) {
        let Some((name, tree)) = self.snaps.last().cloned() else { return };
        let dir = self.m.scratch().mkdir("kernel");
        let k = KernelMount::snapshot(&self.m, &name, &dir);
        assert_same_tree(&tree, &record_unlinked(k.path()), &format!("kernel view of {name} after the remount"));
        drop(k);
        let mnt = self.m.mnt();
        let small = |(p, e): &(&PathBuf, &Entry)| {
            e.data.as_ref().is_some_and(|d| d.len() < 1 << 20)
                && fs::symlink_metadata(mnt.join(p)).is_ok_and(|m| m.is_file() && m.len() < 1 << 20)
        };
        let files: Vec<&PathBuf> = tree.iter().filter(small).map(|(p, _)| p).collect();
        if let Some(p) = files.choose(&mut self.rng) {
            let mut f = OpenOptions::new().append(true).open(self.m.mnt().join(p)).expect("open after the remount");
            f.write_all(b"a change after the remount").expect("write after the remount");
            drop(f);
            let seen = record_entry_unlinked(&self.m.view(&name).join(p)).expect("record the view");
            assert_eq!(&seen, &tree[*p], "view {name} of /{} after a change following the remount", p.display());
        }
    }

    /// The last checks ([`check_kernel_and_cow`](Self::check_kernel_and_cow)), then `ovlsnap umount`.
    pub fn finish(mut self) {
        self.check_kernel_and_cow();
        // Closed first: `umount` fails if a process holds a descriptor under the test dir, and
        // a child that another test forks from this process holds ours until it execs.
        self.live_dir = None;
        self.m.umount();
    }
}

/// Runs `cmd` and kills it with SIGKILL after `delay` unless it exited before; how long it
/// took when it had.
pub fn kill_client_after(mut cmd: Command, delay: Duration) -> (Crash, Option<Duration>) {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn the client");
    let mut exited = None;
    while exited.is_none() && start.elapsed() < delay {
        exited = child.try_wait().expect("wait for the client").map(|st| (st, start.elapsed()));
        sleep(Duration::from_micros(200).min(delay.saturating_sub(start.elapsed())));
    }
    if exited.is_none() {
        exited = child.try_wait().expect("wait for the client").map(|st| (st, start.elapsed()));
    }
    let finished = exited.is_some();
    if !finished {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for the client");
    let error = (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
    let error = if finished { error } else { Some(error.unwrap_or_else(|| "killed".into())) };
    let done = usize::from(finished && error.is_none());
    (Crash { done, error, finished }, exited.map(|(_, t)| t))
}

/// FNV-1a 64, as the daemon names its control socket.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// One request on the control socket of the daemon of `mnt` (see docs/format.md).
pub fn control(mnt: &Path, request: &str) -> Result<(), String> {
    let sock = Path::new("/run/ovlsnap").join(format!("{:016x}.sock", fnv(mnt.as_os_str().as_encoded_bytes())));
    let mut s = UnixStream::connect(&sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.write_all(format!("{request}\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    match parse_json(&line).map(|r| r.get("error").cloned()) {
        Ok(Some(Json::Null)) => Ok(()),
        Ok(Some(Json::Str(e))) => Err(e),
        _ => Err(format!("no answer: {line:?}")),
    }
}

/// The pid of the daemon serving `mnt`.
pub fn daemon_pid(mnt: &Path) -> i32 {
    let out = ovlsnap(&["status".as_ref(), "--json".as_ref(), "--mount".as_ref(), mnt.as_os_str()]);
    match parse_json(out.expect_ok("ovlsnap status")).map(|s| s.get("pid").cloned()) {
        Ok(Some(Json::Num(pid))) => pid as i32,
        other => panic!("ovlsnap status --json: no pid: {other:?}\n{out}"),
    }
}

/// The FUSE connection of the mount at `mnt` (its name in `/sys/fs/fuse/connections`).
pub fn fuse_connection(mnt: &Path) -> u64 {
    let dev = rustix::fs::stat(mnt).expect("stat the mount").st_dev;
    (u64::from(rustix::fs::major(dev)) << 20) | u64::from(rustix::fs::minor(dev))
}

/// Threads of `pid` that are not dead yet (a zombie leader may still have live threads).
fn live_threads(pid: i32) -> Vec<(String, String)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]).unwrap_or("X");
        if !matches!(state, "Z" | "X" | "x") {
            let stack = fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            out.push((format!("{} ({state})", t.file_name().to_string_lossy()), stack));
        }
    }
    out
}

/// SIGKILL, then waits until every thread of the daemon is gone. A daemon thread waiting on a
/// request to its own mount cannot die: once a daemon thread has read a request, FUSE waits for
/// the answer unkillably, and the connection ends only when the last thread closes /dev/fuse. Then
/// the connection `conn` is aborted through fusectl (mounted if need be) so that the run can go
/// on, and the test fails naming the stuck thread.
pub fn kill_and_wait(pid: i32, conn: u64) {
    rustix::process::kill_process(Pid::from_raw(pid).expect("a pid"), Signal::KILL).expect("kill -9 the daemon");
    let start = Instant::now();
    loop {
        let live = live_threads(pid);
        if live.is_empty() {
            return;
        }
        if start.elapsed() > Duration::from_secs(5) {
            let abort = abort_connection(conn);
            let threads: Vec<String> = live.iter().map(|(t, stack)| format!("thread {t}:\n{stack}")).collect();
            panic!(
                "the daemon {pid} is still there 5 s after SIGKILL (aborting its FUSE connection {conn}: {abort}):\n{}",
                threads.join("")
            );
        }
        sleep(Duration::from_millis(2));
    }
}

/// Aborts FUSE connection `conn`, mounting fusectl for it if needed; says what happened.
fn abort_connection(conn: u64) -> String {
    let dir = Path::new("/sys/fs/fuse/connections");
    let mounted_here = !dir.join(conn.to_string()).exists()
        && rustix::mount::mount("fusectl", dir, "fusectl", rustix::mount::MountFlags::empty(), c"").is_ok();
    let result = match fs::write(dir.join(conn.to_string()).join("abort"), "1") {
        Ok(()) => "done".to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    if mounted_here {
        sleep(Duration::from_millis(100));
        let _ = rustix::mount::unmount(dir, UnmountFlags::DETACH);
    }
    result
}

/// Runs `ovlsnap ARGS` (stdin from `input`); an error with its stderr unless it succeeds.
pub fn ovlsnap_step(args: &[OsString], input: Option<&Path>) -> Result<(), String> {
    let stdin = match input {
        Some(p) => Stdio::from(File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => Stdio::null(),
    };
    let out = Command::new(ovlsnap_bin()).args(args).stdin(stdin).output().map_err(|e| format!("spawn: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
}

/// Counts a successful step.
pub fn step(done: &AtomicUsize, r: Result<(), String>) -> Result<(), String> {
    r.map(|()| {
        done.fetch_add(1, Ordering::SeqCst);
    })
}

/// [`step`] of an I/O result, `what` naming it in the error.
pub fn io_step(done: &AtomicUsize, what: &str, r: std::io::Result<()>) -> Result<(), String> {
    step(done, r.map_err(|e| format!("{what}: {e}")))
}
