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
//! On the ovlsnap mount, `--fsx N` adds fsx-style writers on N files in LIVE's root (issue 16,
//! item 8; [`fsx`]): random buffered writes, `O_DIRECT` writes in 4 KiB units, truncates and
//! stores through a shared mapping. With them every take pauses all writers and records their
//! files, a random older snapshot is deleted after every second take while they run, and every
//! kept recorded snapshot is compared byte for byte right after each delete ([`snaps`]); `--keep`,
//! `--fsx-size`, `--fsx-io` and `--restore-every` shape that. `--procs 0` runs the fsx writers
//! alone. The run ends with totals: operations, takes, deletes, snapshots verified, mismatches.
//!
//! The binaries are debug builds (`--release` for release builds), or the ones given with
//! `--ovlfs` and `--ovlsnap` (the integration test uses those Cargo built for it). The seed
//! fixes every random choice but not the interleaving of the workers. `--skip KINDS` leaves
//! kinds of operations out (to find which ones a failure needs), `--only kernel` runs the same
//! workers on the kernel's overlay: the check of the checks.

mod daemon;
mod fsx;
mod snaps;
mod sys;
mod worker;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::daemon::Daemon;
use self::fsx::FsxCounts;
use self::snaps::{Taker, TakerReport, delete, verify_snapshots};
use self::worker::{Counts, KINDS, Models, Owned, Shared, Slot, Worker};
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
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds of operations per mount.
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
    /// Workers (threads making syscalls through the mount); 0 with --fsx: the fsx writers alone.
    #[arg(long, default_value_t = 4)]
    pub procs: u64,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stress only this mount.
    #[arg(long, value_enum)]
    pub only: Option<Target>,
    /// Seconds one operation, take or delete may take before the run fails as hung.
    #[arg(long, default_value_t = 60)]
    pub op_deadline: u64,
    /// Seconds between takes on the ovlsnap mount (fractions allowed: 0.5).
    #[arg(long, default_value_t = 3.0)]
    pub take_every: f64,
    /// Snapshots kept on the ovlsnap mount; a take beyond deletes a random older one.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// fsx writers on the ovlsnap mount, one per LIVE file `fsxN` (see the module docs).
    #[arg(long, default_value_t = 0)]
    pub fsx: usize,
    /// Size the fsx files start with and the largest they grow to (bytes, a multiple of 4096).
    #[arg(long, default_value_t = 4 << 20)]
    pub fsx_size: usize,
    /// Kinds of I/O of the fsx writers, comma-separated (`direct` alone is fsx -Z).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,buffered,mmap")]
    pub fsx_io: Vec<fsx::Io>,
    /// Every Nth delete also copies a kept snapshot's view into the scratch dir and compares it.
    #[arg(long, default_value_t = 0)]
    pub restore_every: u64,
    /// Stress release builds.
    #[arg(long)]
    pub release: bool,
    /// Use this ovlfs binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub ovlfs: Option<PathBuf>,
    /// Use this ovlsnap binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub ovlsnap: Option<PathBuf>,
    /// Kinds of operations to leave out, comma-separated (write, read, truncate, verify,
    /// fsync, reopen, mvdir, publish, rename, unlink, readback, mvshared, mkdir, listing).
    #[arg(long, value_delimiter = ',', value_name = "KINDS")]
    pub skip: Vec<String>,
}

/// Gross growth of the daemon's memory: more than this factor and more than [`RSS_GROWTH`].
const RSS_FACTOR: u64 = 4;

/// See [`RSS_FACTOR`] (KiB).
const RSS_GROWTH: u64 = 200 << 10;

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
    if o.procs == 0 && (o.fsx == 0 || targets != [Target::Ovlsnap]) {
        bail!("--procs 0 leaves no worker: it needs --fsx N and --only ovlsnap");
    }
    if o.fsx > 0 && (o.fsx_size % fsx::UNIT != 0 || o.fsx_size < 256 << 10 || o.fsx_io.is_empty()) {
        bail!("--fsx-size must be a multiple of 4096 of at least 256 KiB, and --fsx-io name a kind of I/O");
    }
    if o.take_every.is_nan() || o.take_every < 0.01 || o.keep < 2 {
        bail!("--take-every must be at least 0.01 s and --keep at least 2");
    }
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

/// (b): an ovlsnap mount of a LIVE holding the owned files, the fsx files and shared records,
/// with takes and deletes.
fn stress_ovlsnap(o: &Options, seed: u64, bin: &Path, dir: &Path) -> Result<()> {
    let (live, mnt) = (dir.join("live"), dir.join("mnt"));
    fs::create_dir_all(&mnt)?;
    let models = worker::populate(&live, &live, o.procs, seed)?;
    let fsx_models = fsx::populate(&live, o.fsx, o.fsx_size, seed)?;
    let mut cmd = Command::new(bin);
    cmd.arg("mount").arg("--foreground").arg(&live).arg(&mnt);
    let mut daemon = Daemon::start(cmd, &mnt, &dir.join("ovlsnap.log"))?;
    println!(
        "\n== ovlsnap mount LIVE MNT (pid {}), a take every {} s, at most {} kept{}",
        daemon.pid(),
        o.take_every,
        o.keep,
        if o.fsx == 0 {
            String::new()
        } else {
            let io: Vec<String> = o.fsx_io.iter().map(|i| format!("{i:?}").to_lowercase()).collect();
            format!("; {} fsx files of up to {} bytes ({})", o.fsx, o.fsx_size, io.join("+"))
        }
    );
    let base = Baseline::take(&daemon)?;
    let taker = Taker {
        bin: bin.to_owned(),
        mnt: mnt.clone(),
        live: live.clone(),
        scratch: dir.to_owned(),
        every: Duration::from_secs_f64(o.take_every),
        keep: o.keep,
        restore_every: o.restore_every,
        fsx: fsx_models.clone(),
    };
    let run = drive(o, seed, &mnt, Some(&mut daemon), models, Some((taker, fsx_models)))?;
    let snaps = run.snapshots.as_ref().expect("the taker's report");
    let deadline = Duration::from_secs(o.op_deadline);
    let checked = verify_snapshots(&mnt, &snaps.kept)?;
    for t in &snaps.kept {
        delete(bin, &mnt, &t.name, deadline).map_err(|e| anyhow::anyhow!("{e}\n{}", daemon.log_tail()))?;
    }
    let end = Baseline::take(&daemon)?;
    let verdict = report(&run, &base, &end);
    println!(
        "  snapshots: {} taken ({} with the workers paused and recorded), {} deleted while running{}; after the \
         deletes {} recorded snapshots verified ({} files compared); at the end {} views checked ({checked} files), \
         then all deleted",
        snaps.takes,
        snaps.recorded,
        snaps.deletes,
        if snaps.restores > 0 {
            format!(", {} restored into a scratch dir and compared", snaps.restores)
        } else {
            String::new()
        },
        snaps.views_verified,
        snaps.files_verified,
        snaps.kept.len()
    );
    let ops = run.counts.ops.iter().sum::<u64>() + run.fsx.ops.iter().sum::<u64>();
    println!(
        "  totals: {ops} ops, {} takes, {} deletes, {} snapshots verified, {} mismatches",
        snaps.takes,
        snaps.deletes,
        snaps.views_verified + snaps.kept.iter().filter(|t| t.files.is_some()).count() as u64,
        snaps.mismatches.len()
    );
    daemon.stop()?;
    if !snaps.mismatches.is_empty() {
        bail!("{} snapshot mismatches:\n{}", snaps.mismatches.len(), snaps.mismatches.join("\n"));
    }
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
    fsx: FsxCounts,
    snapshots: Option<TakerReport>,
}

/// Runs the workers (and the taker with its fsx writers) on `mnt` for `--secs`, watching for
/// stuck operations.
fn drive(
    o: &Options,
    seed: u64,
    mnt: &Path,
    mut daemon: Option<&mut Daemon>,
    models: Models,
    taker: Option<(Taker, Vec<fsx::Model>)>,
) -> Result<Run> {
    let (taker, fsx_models) = taker.map_or((None, Vec::new()), |(t, m)| (Some(t), m));
    let nfsx = fsx_models.len() as u64;
    // A slot per worker, then per fsx writer, then the taker's.
    let shared = Arc::new(Shared {
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        slots: (0..=o.procs + nfsx).map(|_| Slot::default()).collect(),
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
    let mut writers = Vec::new();
    for (k, m) in fsx_models.into_iter().enumerate() {
        let slot = o.procs as usize + k;
        let w = fsx::Writer::new(k, slot, mnt, m, seed, &o.fsx_io, o.fsx_size, shared.clone())
            .with_context(|| format!("opening {} through the mount", fsx::name(k)))?;
        writers.push(std::thread::spawn(move || w.run()));
    }
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
                let who = match i as u64 {
                    i if i == o.procs + nfsx => "the taker".to_owned(),
                    i if i >= o.procs => format!("fsx writer {}", fsx::name((i - o.procs) as usize)),
                    i => format!("worker {i}"),
                };
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
    let mut fsx = FsxCounts::default();
    for w in writers {
        fsx.add(&w.join().map_err(|_| anyhow::anyhow!("an fsx writer panicked"))?);
    }
    let snapshots = taker.map(|t| t.join().map_err(|_| anyhow::anyhow!("the taker panicked"))).transpose()?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(f) = shared.failure.lock().unwrap().take() {
        bail!("{f}\n{}", daemon.map(|d| d.log_tail()).unwrap_or_default());
    }
    Ok(Run { secs, counts, fsx, snapshots })
}

/// Prints the summary of a run; fails on leaked descriptors or gross memory growth.
fn report(run: &Run, base: &Baseline, end: &Baseline) -> Result<()> {
    let c = &run.counts;
    let total: u64 = c.ops.iter().sum();
    let by_kind: Vec<String> = KINDS.iter().zip(c.ops).map(|((k, _), n)| format!("{k} {n}")).collect();
    println!("  {total} operations in {:.1} s, {:.0}/s: {}", run.secs, total as f64 / run.secs, by_kind.join(", "));
    let fsx_total: u64 = run.fsx.ops.iter().sum();
    if fsx_total > 0 {
        let by_kind: Vec<String> = fsx::OPS.iter().zip(run.fsx.ops).map(|(k, n)| format!("{k} {n}")).collect();
        println!("  fsx writers: {fsx_total} operations, {:.0}/s: {}", fsx_total as f64 / run.secs, by_kind.join(", "));
    }
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
    if total + fsx_total == 0 {
        bail!("no operation completed");
    }
    Ok(())
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
        mountinfo::detach_and_remove(&self.0);
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
