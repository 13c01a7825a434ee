//! `cargo xtask stress [--secs N] [--procs P]`: random file operations from several workers at
//! once, for a bounded time, (a) through `ovlfs` over two lower layers (`redirect_dir=on`) and
//! (b) through an `ovlsnap` mount that takes a snapshot every few seconds and deletes old ones
//! (the oldest, or one in the middle, merged).
//!
//! The workers ([`worker`]) are threads making real syscalls through the mount, fsx-style: each
//! owns files it writes at random offsets, truncates and reads back against its own model, and
//! all of them create, rename, unlink and read self-checking records in a shared directory. Every
//! second take of (b) pauses the workers between operations and records what their files hold;
//! at the end each such snapshot's view must show exactly that (the other takes run while the
//! workers write), and every record in every view must check.
//!
//! The run fails on any data mismatch or unexpected error, on an operation (or a take or delete)
//! running past `--op-deadline` (the daemon is then killed so that stuck calls return), on
//! descriptors the daemon keeps after the run (counted in `/proc/PID/fd` before the workers start
//! and after they closed everything, snapshots deleted, dentries and inodes dropped so the kernel
//! forgets what it can), and on gross growth of its resident memory (over 4x and over 200 MiB;
//! allocators keep freed memory, so only that is reported as a failure). It prints ops per
//! second by kind, the errors races explain, and the descriptor and memory numbers.
//!
//! The binaries are debug builds (`--release` for release builds), or the ones given with
//! `--ovlfs` and `--ovlsnap` (the integration test uses those Cargo built for it). The seed
//! fixes every random choice but not the interleaving of the workers. `--skip KINDS` leaves
//! kinds of operations out (to find which ones a failure needs), `--only kernel` runs the same
//! workers on the kernel's overlay: the check of the checks.

mod daemon;
mod worker;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::daemon::Daemon;
use self::worker::{Counts, KINDS, Models, Owned, Rng, Shared, Slot, Worker, check_record};
use crate::mountinfo;

/// A mount to stress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `ovlfs` over two lower layers.
    Ovlfs,
    /// An `ovlsnap` mount with takes and deletes.
    Ovlsnap,
    /// The kernel's overlay on the layers of `ovlfs`: checks the stress test itself (not run
    /// unless asked for).
    Kernel,
}

/// What the user asked for.
pub struct Options {
    /// Seconds of operations per mount.
    pub secs: u64,
    /// Worker threads.
    pub procs: u64,
    /// The seed (default: from the clock).
    pub seed: Option<u64>,
    /// Stress only this mount.
    pub only: Option<Target>,
    /// Seconds one operation may take before the run fails as hung.
    pub op_deadline: u64,
    /// Seconds between takes on the ovlsnap mount.
    pub take_every: u64,
    /// Build release binaries.
    pub release: bool,
    /// The ovlfs binary to use instead of building one.
    pub ovlfs: Option<PathBuf>,
    /// The ovlsnap binary to use instead of building one.
    pub ovlsnap: Option<PathBuf>,
    /// Kinds of operations to leave out (names of [`worker::KINDS`]).
    pub skip: Vec<String>,
}

/// Gross growth of the daemon's memory: more than this factor and more than [`RSS_GROWTH`].
const RSS_FACTOR: u64 = 4;

/// See [`RSS_FACTOR`] (KiB).
const RSS_GROWTH: u64 = 200 << 10;

/// Snapshots kept on the ovlsnap mount while the workers run; a take beyond deletes one.
const KEEP: usize = 3;

/// Runs the stress test of each target; fails if any failed.
pub fn run(o: &Options) -> Result<()> {
    if !crate::prereqs::is_root()? {
        bail!("stress mounts filesystems and reads the daemons' /proc entries: run it as root");
    }
    if let Some(bad) = o.skip.iter().find(|s| !KINDS.iter().any(|(k, _)| k == s)) {
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        bail!("--skip {bad}: no such kind of operation (known: {})", known.join(", "));
    }
    if KINDS.iter().all(|(k, _)| o.skip.contains(&k.to_string())) {
        bail!("--skip leaves no operation to make");
    }
    let targets: Vec<Target> = o.only.map_or(vec![Target::Ovlfs, Target::Ovlsnap], |t| vec![t]);
    let bins = binaries(o, &targets)?;
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "stress: {} workers, {} s per mount, seed {seed} (--seed {seed} repeats the choices, not the timing)",
        o.procs, o.secs
    );
    let scratch = Scratch::create()?;
    let mut failed = Vec::new();
    for t in targets {
        let dir = scratch.0.join(format!("{t:?}").to_lowercase());
        fs::create_dir(&dir)?;
        let result = match t {
            Target::Ovlfs => stress_ovlfs(o, seed, &bins.0, &dir),
            Target::Ovlsnap => stress_ovlsnap(o, seed, &bins.1, &dir),
            Target::Kernel => stress_kernel(o, seed, &dir),
        };
        if let Err(e) = result {
            println!("FAILED: {e:#}");
            failed.push(format!("{t:?}"));
        }
    }
    if !failed.is_empty() {
        bail!("stress failed on {} (seed {seed})", failed.join(" and "));
    }
    println!("\nstress: passed");
    Ok(())
}

/// The ovlfs and ovlsnap binaries: given, or built.
fn binaries(o: &Options, targets: &[Target]) -> Result<(PathBuf, PathBuf)> {
    let profile = if o.release { "release" } else { "debug" };
    let built = |name: &str| crate::target_dir().join(profile).join(name);
    let need = |t: Target, given: &Option<PathBuf>| targets.contains(&t) && given.is_none();
    let mut packages = Vec::new();
    if need(Target::Ovlfs, &o.ovlfs) {
        packages.extend(["-p", "ovl-fs"]);
    }
    if need(Target::Ovlsnap, &o.ovlsnap) {
        packages.extend(["-p", "snap-cli"]);
    }
    if !packages.is_empty() {
        let mut cargo = crate::cmd::cargo().arg("build").args(packages);
        if o.release {
            cargo = cargo.arg("--release");
        }
        cargo.run()?;
    }
    let ovlfs = o.ovlfs.clone().unwrap_or_else(|| built("ovlfs"));
    let ovlsnap = o.ovlsnap.clone().unwrap_or_else(|| built("ovlsnap"));
    for (t, b) in [(Target::Ovlfs, &ovlfs), (Target::Ovlsnap, &ovlsnap)] {
        if targets.contains(&t) && !b.is_file() {
            bail!("no binary at {}", b.display());
        }
    }
    Ok((ovlfs, ovlsnap))
}

/// The layers of (a) under `dir` (`l1:l2`, upper, work, and the mount point `mnt`), filled for
/// the workers; returns the mount options, the mount point and the workers' models.
fn overlay_layers(o: &Options, seed: u64, dir: &Path) -> Result<(String, PathBuf, Models)> {
    let (l1, l2, upper, work, mnt) =
        (dir.join("l1"), dir.join("l2"), dir.join("upper"), dir.join("work"), dir.join("mnt"));
    for d in [&upper, &work, &mnt] {
        fs::create_dir_all(d)?;
    }
    let models = worker::populate(&l1, &l2, o.procs, seed)?;
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},redirect_dir=on",
        l1.display(),
        l2.display(),
        upper.display(),
        work.display()
    );
    Ok((opts, mnt, models))
}

/// (a): ovlfs over `l1:l2` with the owned files and shared records in both.
fn stress_ovlfs(o: &Options, seed: u64, bin: &Path, dir: &Path) -> Result<()> {
    let (opts, mnt, models) = overlay_layers(o, seed, dir)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg("-o").arg(&opts).arg(&mnt);
    let mut daemon = Daemon::start(cmd, &mnt, &dir.join("ovlfs.log"))?;
    println!("\n== ovlfs -o lowerdir=l1:l2,upperdir=..,workdir=..,redirect_dir=on (pid {})", daemon.pid());
    let base = Baseline::take(&daemon)?;
    let run = drive(o, seed, &mnt, Some(&mut daemon), models, None)?;
    let end = Baseline::take(&daemon)?;
    let verdict = report(&run, &base, &end);
    daemon.stop()?;
    verdict
}

/// The kernel's overlay with the layout of (a): the oracle for the workers' own checks.
fn stress_kernel(o: &Options, seed: u64, dir: &Path) -> Result<()> {
    let (opts, mnt, models) = overlay_layers(o, seed, dir)?;
    let mut guard = mountinfo::MountGuard::new(&mnt);
    crate::cmd::cmd("mount").args(["-t", "overlay", "overlay", "-o"]).arg(&opts).arg(&mnt).run_quiet()?;
    println!("\n== the kernel's overlay, lowerdir=l1:l2,upperdir=..,workdir=..,redirect_dir=on");
    let run = drive(o, seed, &mnt, None, models, None)?;
    let none = Baseline { fds: 0, rss: 0 };
    let verdict = report(&run, &none, &none);
    guard.unmount()?;
    verdict
}

/// (b): an ovlsnap mount of a LIVE holding the owned files and shared records, with takes.
fn stress_ovlsnap(o: &Options, seed: u64, bin: &Path, dir: &Path) -> Result<()> {
    let (live, mnt) = (dir.join("live"), dir.join("mnt"));
    fs::create_dir_all(&mnt)?;
    let models = worker::populate(&live, &live, o.procs, seed)?;
    let mut cmd = Command::new(bin);
    cmd.arg("mount").arg("--foreground").arg(&live).arg(&mnt);
    let mut daemon = Daemon::start(cmd, &mnt, &dir.join("ovlsnap.log"))?;
    println!(
        "\n== ovlsnap mount LIVE MNT (pid {}), a take every {} s, at most {KEEP} kept",
        daemon.pid(),
        o.take_every
    );
    let base = Baseline::take(&daemon)?;
    let taker = Taker { bin: bin.to_owned(), mnt: mnt.clone(), every: Duration::from_secs(o.take_every) };
    let run = drive(o, seed, &mnt, Some(&mut daemon), models, Some(taker))?;
    let snaps = run.snapshots.as_ref().expect("the taker's report");
    let deadline = Duration::from_secs(o.op_deadline);
    let checked = verify_snapshots(&mnt, &snaps.kept)?;
    for t in &snaps.kept {
        delete(bin, &mnt, &t.name, deadline).map_err(|e| anyhow::anyhow!("{e}\n{}", daemon.log_tail()))?;
    }
    let end = Baseline::take(&daemon)?;
    let verdict = report(&run, &base, &end);
    println!(
        "  snapshots: {} taken ({} with the workers paused and recorded), {} deleted while running; at the end \
         {} views checked ({checked} files), then all deleted",
        snaps.takes,
        snaps.recorded,
        snaps.deletes,
        snaps.kept.len()
    );
    daemon.stop()?;
    verdict
}

/// Descriptors and memory of the daemon at one point.
struct Baseline {
    fds: usize,
    rss: u64,
}

impl Baseline {
    fn take(d: &Daemon) -> Result<Baseline> {
        Ok(Baseline { fds: d.settled_fds()?, rss: d.rss_kib()? })
    }
}

/// What a run did.
struct Run {
    secs: f64,
    counts: Counts,
    snapshots: Option<TakerReport>,
}

/// Runs the workers (and the taker) on `mnt` for `--secs`, watching for stuck operations.
fn drive(
    o: &Options,
    seed: u64,
    mnt: &Path,
    mut daemon: Option<&mut Daemon>,
    models: Models,
    taker: Option<Taker>,
) -> Result<Run> {
    let shared = Arc::new(Shared {
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        slots: (0..=o.procs).map(|_| Slot::default()).collect(),
    });
    let owned: Vec<Arc<Mutex<Owned>>> = models
        .into_iter()
        .enumerate()
        .map(|(k, m)| Arc::new(Mutex::new(Owned { dir: format!("w{k}"), models: m })))
        .collect();
    let start = Instant::now();
    let workers: Vec<_> = owned
        .iter()
        .enumerate()
        .map(|(k, own)| {
            let w = Worker::new(k as u64, seed, mnt.to_owned(), own.clone(), shared.clone(), &o.skip);
            std::thread::spawn(move || w.run())
        })
        .collect();
    let taker = taker.map(|t| {
        let (shared, owned) = (shared.clone(), owned.clone());
        let deadline = Duration::from_secs(o.op_deadline);
        std::thread::spawn(move || t.run(seed, &shared, &owned, deadline))
    });
    let limit = Duration::from_secs(o.op_deadline);
    while start.elapsed() < Duration::from_secs(o.secs) && !shared.stop.load(Ordering::SeqCst) {
        sleep(Duration::from_millis(100));
        for (i, slot) in shared.slots.iter().enumerate() {
            if let Some((what, since)) = slot.busy().filter(|(_, since)| *since > limit) {
                let who = if i as u64 == o.procs { "the taker".to_owned() } else { format!("worker {i}") };
                shared.fail(format!("HUNG: {who} has been in `{what}` for {since:.1?} (deadline {limit:?})"));
            }
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    if shared.failure.lock().unwrap().as_ref().is_some_and(|f| f.starts_with("HUNG")) {
        // Stuck calls return once the daemon is gone.
        if let Some(d) = daemon.as_deref_mut() {
            d.kill();
        }
    }
    let mut counts = Counts::default();
    for w in workers {
        counts.add(&w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?);
    }
    let snapshots = taker.map(|t| t.join().map_err(|_| anyhow::anyhow!("the taker panicked"))).transpose()?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(f) = shared.failure.lock().unwrap().take() {
        bail!("{f}\n{}", daemon.map(|d| d.log_tail()).unwrap_or_default());
    }
    Ok(Run { secs, counts, snapshots })
}

/// Prints the summary of a run; fails on leaked descriptors or gross memory growth.
fn report(run: &Run, base: &Baseline, end: &Baseline) -> Result<()> {
    let c = &run.counts;
    let total: u64 = c.ops.iter().sum();
    let by_kind: Vec<String> = KINDS.iter().zip(c.ops).map(|((k, _), n)| format!("{k} {n}")).collect();
    println!("  {total} operations in {:.1} s, {:.0}/s: {}", run.secs, total as f64 / run.secs, by_kind.join(", "));
    println!(
        "  {:.1} MiB written, {:.1} MiB read back and compared: no mismatch; errors races explain \
         (ENOENT/EEXIST/ENOTEMPTY in shared/): {}; other errors: 0",
        c.written as f64 / (1 << 20) as f64,
        c.read as f64 / (1 << 20) as f64,
        c.races
    );
    let mib = |k: u64| k as f64 / 1024.0;
    if base.rss == 0 {
        return Ok(());
    }
    println!(
        "  daemon: {} open descriptors before, {} after; resident memory {:.1} MiB before, {:.1} MiB after",
        base.fds,
        end.fds,
        mib(base.rss),
        mib(end.rss)
    );
    if end.fds > base.fds {
        bail!("the daemon leaked {} descriptors ({} before the run, {} after)", end.fds - base.fds, base.fds, end.fds);
    }
    if end.rss > RSS_FACTOR * base.rss && end.rss - base.rss > RSS_GROWTH {
        bail!("the daemon's memory grew from {:.1} MiB to {:.1} MiB", mib(base.rss), mib(end.rss));
    }
    if total == 0 {
        bail!("no operation completed");
    }
    Ok(())
}

/// Takes snapshots every so often on an ovlsnap mount, and deletes old ones.
struct Taker {
    bin: PathBuf,
    mnt: PathBuf,
    every: Duration,
}

/// A snapshot the taker made and kept, with what the owned files held if it was recorded.
struct Taken {
    name: String,
    /// (path under the mount, content).
    files: Option<Vec<(String, Vec<u8>)>>,
}

/// What the taker did.
struct TakerReport {
    takes: u64,
    recorded: u64,
    deletes: u64,
    kept: Vec<Taken>,
}

impl Taker {
    fn run(self, seed: u64, shared: &Shared, owned: &[Arc<Mutex<Owned>>], deadline: Duration) -> TakerReport {
        let mut rng = Rng::new(seed ^ 0x007a_6be5);
        let slot = shared.slots.last().expect("the taker's slot");
        let mut r = TakerReport { takes: 0, recorded: 0, deletes: 0, kept: Vec::new() };
        loop {
            let wake = Instant::now() + self.every;
            while Instant::now() < wake && !shared.stop.load(Ordering::SeqCst) {
                sleep(Duration::from_millis(20));
            }
            if shared.stop.load(Ordering::SeqCst) {
                return r;
            }
            let name = format!("stress-{}", r.takes + 1);
            let record = r.takes % 2 == 1;
            slot.begin(format!("ovlsnap take {name}{}", if record { " (workers paused)" } else { "" }));
            let result = if record {
                let _paused = shared.gate.write().unwrap();
                let files = owned
                    .iter()
                    .flat_map(|o| {
                        let o = o.lock().unwrap();
                        let dir = o.dir.clone();
                        o.models
                            .iter()
                            .enumerate()
                            .map(move |(i, m)| (format!("{dir}/f{i}"), m.clone()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                cli(&self.bin, &["take", &name, "--mount"], &self.mnt, deadline).map(|_| Some(files))
            } else {
                cli(&self.bin, &["take", &name, "--mount"], &self.mnt, deadline).map(|_| None)
            };
            slot.end();
            match result {
                Ok(files) => {
                    r.takes += 1;
                    r.recorded += u64::from(files.is_some());
                    r.kept.push(Taken { name, files });
                }
                Err(e) => {
                    shared.fail(format!("the taker: {e}"));
                    return r;
                }
            }
            if r.kept.len() > KEEP {
                let i = if rng.below(2) == 0 { 0 } else { 1 + rng.below(r.kept.len() as u64 - 2) as usize };
                let victim = r.kept.remove(i);
                slot.begin(format!("ovlsnap delete {}", victim.name));
                let result = delete(&self.bin, &self.mnt, &victim.name, deadline);
                slot.end();
                if let Err(e) = result {
                    shared.fail(format!("the taker: {e}"));
                    return r;
                }
                r.deletes += 1;
            }
        }
    }
}

/// Runs `ovlsnap ARGS MNT`, killed after `deadline`; its stdout, or an error with its output.
fn cli(bin: &Path, args: &[&str], mnt: &Path, deadline: Duration) -> Result<String, String> {
    let shown = format!("ovlsnap {} {}", args.join(" "), mnt.display());
    let mut child = Command::new(bin)
        .args(args)
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < deadline => sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("HUNG: `{shown}` still running after {deadline:?}: killed"));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("{shown}: {e}"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("`{shown}` failed ({}): {}", out.status, text(&out.stderr)))
    }
}

/// `ovlsnap delete NAME`, retried while the snapshot is in use (the kernel closes files of its
/// view a moment after `close` returns).
fn delete(bin: &Path, mnt: &Path, name: &str, deadline: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        match cli(bin, &["delete", name, "--mount"], mnt, deadline) {
            Err(e) if e.contains("in use") && start.elapsed() < Duration::from_secs(5) => {
                sleep(Duration::from_millis(50))
            }
            r => return r.map(drop),
        }
    }
}

/// Checks the views of the snapshots kept: recorded ones show exactly the recorded files, and
/// every record in `shared/` of every view checks. Returns how many files were compared.
fn verify_snapshots(mnt: &Path, kept: &[Taken]) -> Result<usize> {
    let mut n = 0;
    for t in kept {
        let view = mnt.join(".snapshots").join(&t.name);
        for (rel, want) in t.files.iter().flatten() {
            let got = fs::read(view.join(rel)).with_context(|| format!("reading {rel} in snapshot {}", t.name))?;
            if &got != want {
                let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
                bail!(
                    "DATA MISMATCH in snapshot {}: {rel} has {} bytes, the workers had written {} when it was taken; \
                     first difference at byte {at}",
                    t.name,
                    got.len(),
                    want.len()
                );
            }
            n += 1;
        }
        let mut dirs = vec![view.join("shared")];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
                let e = e?;
                let name = e.file_name();
                if e.file_type()?.is_dir() {
                    dirs.push(e.path());
                } else if name.to_string_lossy().starts_with('p') {
                    let data = fs::read(e.path())?;
                    check_record(&data).map_err(|err| anyhow::anyhow!("{}: {err}", e.path().display()))?;
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

/// `$TMPDIR/ovlsnap-stress.PID`; dropping it detaches whatever is still mounted below it and
/// removes it.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("ovlsnap-stress.{}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut inside: Vec<PathBuf> = mountinfo::mounts()
            .map(|m| m.into_iter().map(|e| e.mount_point).filter(|p| p.starts_with(&self.0)).collect())
            .unwrap_or_default();
        inside.reverse();
        for p in &inside {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        if mountinfo::has_mounts_under(&self.0).unwrap_or(true) {
            eprintln!("warning: left {} in place: something is still mounted there", self.0.display());
        } else if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker::{Rng, check_record, record};

    #[test]
    fn records_check_and_damaged_ones_do_not() {
        let r = record(3, 7, 1000);
        assert_eq!(check_record(&r), Ok(()));
        let mut bad = r.clone();
        bad[500] ^= 1;
        assert!(check_record(&bad).is_err());
        assert!(check_record(&r[..r.len() - 1]).is_err());
        assert!(check_record(b"not a record").is_err());
    }

    #[test]
    fn the_random_source_is_reproducible() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert_eq!(a.bytes(100), b.bytes(100));
        assert!((0..1000).all(|_| a.below(7) < 7));
    }
}
