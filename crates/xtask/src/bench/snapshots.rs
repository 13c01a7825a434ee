//! The snapshot phase (issue 5): a release `ovlsnap` on a fresh ext4 loop image of its own, timed
//! from the outside as a user or a script would see it.
//!
//! **Take latency.** For each tree size (1k, 10k, 100k files of 100 bytes in dirs of
//! [`FILES_PER_DIR`]) a LIVE dir is generated straight on the ext4, mounted with `ovlsnap mount
//! LIVE` (over itself), and snapshots are taken [`Scale::snapshot_takes`] times in each of two
//! ways, alternating: the `ovlsnap take NAME --mount MNT` command, timed from its start to its exit
//! (what a script waits for), and one `take` request on the daemon's control socket (connect, one
//! request line, one reply line: the daemon's own work without a process start). Before every
//! take a few files are changed through the mount, so that each take follows real copy-on-write
//! work rather than an empty snapshot. A fresh store per tree size keeps the number of snapshots,
//! which a take may also depend on, the same for every size. On the 1k tree, the store is then
//! filled up to [`MANY_SNAPSHOTS`] snapshots (untimed) and the command timed again.
//!
//! **Write throughput.** Each run mounts a fresh LIVE holding one existing file of
//! [`Scale::snapshot_write_mib`] MiB, then times, from open through `fsync` to close, in writes of
//! 1 MiB: a new file without any snapshot; the existing file overwritten in place (no truncate,
//! from offset 0); then, after one take, another new file (no copy: the cost of the copy-on-write
//! check per write), the existing file overwritten again (its first write copies the whole file
//! into the snapshot; ext4 has no clone, so a real copy), and once more (saved by then: full speed
//! again). The ratios with / without a snapshot are taken within each run, the new-file one
//! also for [`EXTRA_WRITE_PAIRS`] more pairs (a new file with no snapshot and one after a fresh
//! take, in alternating order, each pair's files removed afterwards).
//! The write runs have an ext4 image of their own, in RAM (`/dev/shm`) when there is room, so
//! that the ratios compare ovlsnap with itself rather than two moods of the VM's disk; it is
//! preallocated ([`Image::Preallocated`]) so that new files do not time the host's allocation,
//! and a first run warms it up unrecorded.
//!
//! Every mount is a [`SnapMount`], which unmounts on drop.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::layers::{FsKind, Image, LoopFs, Scale, Scratch, write_big_file};
use super::mounts::{Backend, quiet, quiet_output};
use super::ops::{self, Outcome, WriteInto};
use super::progress;
use super::report::{MANY_SNAPSHOTS, Metric, Results};
use crate::mountinfo;

/// The tree sizes, with the metrics of their takes by command and by socket.
const TREES: [(usize, Metric, Metric); 3] = [
    (1_000, Metric::SnapshotTake1k, Metric::SnapshotTakeSocket1k),
    (10_000, Metric::SnapshotTake10k, Metric::SnapshotTakeSocket10k),
    (100_000, Metric::SnapshotTake100k, Metric::SnapshotTakeSocket100k),
];

/// Files per directory of a generated tree.
const FILES_PER_DIR: usize = 500;

/// Files changed through the mount before each take.
const CHANGES_PER_TAKE: usize = 3;

/// The metrics of one write run, in the order they are measured.
const WRITE_METRICS: [Metric; 9] = [
    Metric::WriteNoSnapshot,
    Metric::OverwriteNoSnapshot,
    Metric::WriteNewWithSnapshot,
    Metric::OverwriteFirstAfterTake,
    Metric::OverwriteAgainAfterTake,
    Metric::WriteWithSnapshot,
    Metric::OverwriteAfterTakeRatio,
    Metric::ProbeWhileWriting,
    Metric::ProbeWhileCopying,
];

/// Where the daemons' control sockets live (snap-fs's `control::RUN_DIR`).
const RUN_DIR: &str = "/run/ovlsnap";

/// Runs the whole phase with the `ovlsnap` binary: takes at each tree size, then `runs` write runs.
pub fn phase(ovlsnap: &Path, scratch: &Scratch, scale: &Scale, runs: usize, results: &mut Results) -> Result<()> {
    // 100k small files (~0.5 GiB of blocks) and their snapshots.
    let gib = 2;
    let image = match LoopFs::create_in(&scratch.dir, "snap", FsKind::Ext4, gib, Image::Preallocated) {
        Ok(image) => image,
        Err(err) => {
            progress(&format!("    no ext4 image: {err:#}"));
            record_failed(results, &format!("ext4 image: {err:#}"));
            return Ok(());
        }
    };
    for (files, by_command, by_socket) in TREES {
        progress(&format!("==> snapshots: take with {files} files"));
        let with_many = by_command == Metric::SnapshotTake1k;
        let samples = match take_latency(ovlsnap, &image.dir, files, scale.snapshot_takes, with_many) {
            Ok(samples) => samples,
            Err(err) => {
                progress(&format!("    failed: {err:#}"));
                let failed = vec![Outcome::Failed(format!("{err:#}"))];
                Takes { commands: failed.clone(), sockets: failed.clone(), many: with_many.then_some(failed) }
            }
        };
        record_samples(results, by_command, samples.commands);
        record_samples(results, by_socket, samples.sockets);
        if let Some(many) = samples.many {
            record_samples(results, Metric::SnapshotTakeManySnapshots, many);
        }
    }
    drop(image);
    // The write runs get an image of their own, in RAM when there is room: on this VM's disk one
    // pair of fsync'ed 256 MiB writes gave ratios from 0.19 to 2.45 within one run, the disk's
    // moods rather than the snapshot's cost, which is what the ratio is for.
    let mib = scale.snapshot_write_mib;
    // Twice the most the runs hold at once (old.bin, its saved copy, two new files): ext4 slows
    // down as it fills.
    let write_gib = 1 + (2 * 4 * mib).div_ceil(1024);
    let ram = RamDir::create(write_gib);
    let base = ram.as_ref().map_or(scratch.dir.as_path(), |r| r.dir.as_path());
    progress(&format!(
        "==> snapshots: write runs in a {write_gib} GiB ext4 image {}",
        if ram.is_some() { "in RAM (/dev/shm)" } else { "on disk (/dev/shm lacks room)" }
    ));
    let image = match LoopFs::create_in(base, "snap-write", FsKind::Ext4, write_gib, Image::Preallocated) {
        Ok(image) => image,
        Err(err) => {
            progress(&format!("    no ext4 image: {err:#}"));
            for metric in WRITE_METRICS {
                results.record(metric, Backend::Ovlfs, Outcome::Failed(format!("ext4 image: {err:#}")));
            }
            return Ok(());
        }
    };
    // Run 0 warms up and is not recorded: the first writes into a fresh image run at a fraction
    // of the speed of later ones (the host converts the preallocated space on first write).
    progress(&format!("==> snapshots: write run 0 ({mib} MiB files; warm-up, not recorded)"));
    if let Err(err) = write_run(ovlsnap, &image.dir, 0, mib, &mut Vec::new()) {
        progress(&format!("    failed: {err:#}"));
    }
    for rep in 1..=runs {
        progress(&format!("==> snapshots: write run {rep}/{runs} ({mib} MiB files)"));
        let mut measured = Vec::new();
        let outcome = write_run(ovlsnap, &image.dir, rep, mib, &mut measured);
        if let Err(err) = outcome {
            progress(&format!("    failed: {err:#}"));
            for metric in WRITE_METRICS {
                if !measured.iter().any(|(m, _)| *m == metric) {
                    measured.push((metric, Outcome::Failed(format!("{err:#}"))));
                }
            }
        }
        for (metric, outcome) in measured {
            results.record(metric, Backend::Ovlfs, outcome);
        }
    }
    Ok(())
}

/// A directory in `/dev/shm` for an image file, removed on drop.
struct RamDir {
    dir: PathBuf,
}

impl RamDir {
    /// `None` when `/dev/shm` has less than `gib` GiB and 2 GiB to spare, or cannot be used.
    fn create(gib: u64) -> Option<RamDir> {
        let avail = quiet_output("df", &["-B1".as_ref(), "--output=avail".as_ref(), "/dev/shm".as_ref()]).ok()?;
        let avail: u64 = avail.lines().nth(1)?.trim().parse().ok()?;
        if avail < (gib + 2) << 30 {
            return None;
        }
        let dir = PathBuf::from(format!("/dev/shm/ovlsnap-bench.{}", std::process::id()));
        fs::create_dir(&dir).ok()?;
        Some(RamDir { dir })
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Records `why` as the failure of every metric of the phase (e.g. when `ovlsnap` did not build).
pub fn record_failed(results: &mut Results, why: &str) {
    for metric in Metric::ALL.iter().filter(|m| m.phase() == super::Phase::Snapshots) {
        results.record(*metric, Backend::Ovlfs, Outcome::Failed(why.to_owned()));
    }
}

fn record_samples(results: &mut Results, metric: Metric, samples: Vec<Outcome>) {
    let mut shown: Vec<String> = samples
        .iter()
        .filter_map(|o| if let Outcome::Value(ms) = o { Some(format!("{ms:.2}")) } else { None })
        .collect();
    if !shown.is_empty() {
        shown.push("ms".to_owned());
    }
    for outcome in &samples {
        let show = outcome.show(metric);
        if !matches!(outcome, Outcome::Value(_)) && !shown.contains(&show) {
            shown.push(show);
        }
    }
    progress(&format!("    {:<30} {}", metric.id(), shown.join(" ")));
    for outcome in samples {
        results.record(metric, Backend::Ovlfs, outcome);
    }
}

/// The take times of one tree.
struct Takes {
    /// By `ovlsnap take`.
    commands: Vec<Outcome>,
    /// By a request on the control socket.
    sockets: Vec<Outcome>,
    /// By `ovlsnap take` with [`MANY_SNAPSHOTS`] in the store, when asked for.
    many: Option<Vec<Outcome>>,
}

/// One tree of `files` files on a fresh mount and store: `takes` takes by command and by socket,
/// alternating; then, `with_many`, as many by command after filling the store up to
/// [`MANY_SNAPSHOTS`].
fn take_latency(ovlsnap: &Path, base: &Path, files: usize, takes: usize, with_many: bool) -> Result<Takes> {
    let live = base.join(format!("tree-{files}"));
    let started = Instant::now();
    generate_tree(&live, files, FILES_PER_DIR)?;
    ops::sync()?;
    let generated = started.elapsed();
    let started = Instant::now();
    let mut mount = SnapMount::mount(ovlsnap, &live)?;
    progress(&format!(
        "    generated in {:.1}s; `ovlsnap mount` took {:.0} ms; daemon pid {}",
        generated.as_secs_f64(),
        started.elapsed().as_secs_f64() * 1e3,
        mount.pid.map_or("unknown".to_owned(), |pid| pid.to_string())
    ));
    let (mut commands, mut sockets) = (Vec::new(), Vec::new());
    let mut changed = 0;
    for take in 0..takes {
        change_files(&mount.mnt, files, &mut changed)?;
        commands.push(mount.take_command(&format!("by-command-{take}")));
        change_files(&mount.mnt, files, &mut changed)?;
        sockets.push(mount.take_socket(&format!("by-socket-{take}")));
    }
    let mut succeeded = commands.iter().chain(&sockets).filter(|o| matches!(o, Outcome::Value(_))).count();
    let many = if with_many {
        let started = Instant::now();
        for fill in succeeded..MANY_SNAPSHOTS {
            if let Outcome::Failed(why) = mount.take_socket(&format!("fill-{fill}")) {
                bail!("filling the store up to {MANY_SNAPSHOTS} snapshots: {why}");
            }
        }
        progress(&format!(
            "    filled the store up to {MANY_SNAPSHOTS} snapshots in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        succeeded = succeeded.max(MANY_SNAPSHOTS);
        let mut many = Vec::new();
        for take in 0..takes {
            change_files(&mount.mnt, files, &mut changed)?;
            many.push(mount.take_command(&format!("after-many-{take}")));
        }
        succeeded += many.iter().filter(|o| matches!(o, Outcome::Value(_))).count();
        Some(many)
    } else {
        None
    };
    let listed = mount.list()?.matches("\"name\"").count();
    if listed != succeeded {
        bail!("{succeeded} takes succeeded but `ovlsnap list` shows {listed} snapshots");
    }
    mount.unmount()?;
    Ok(Takes { commands, sockets, many })
}

/// `files` files of 100 bytes in `live`, in dirs `dNNN` of `per_dir` files `fNNN`.
pub(crate) fn generate_tree(live: &Path, files: usize, per_dir: usize) -> Result<()> {
    let content = [b's'; 100];
    for (d, first) in (0..files).step_by(per_dir).enumerate() {
        let dir = live.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in 0..per_dir.min(files - first) {
            let path = dir.join(format!("f{f:03}"));
            fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The `n`th file of a tree of `files` files, cycling through the dirs so that changes spread out.
fn tree_file(files: usize, n: usize) -> PathBuf {
    let dirs = files.div_ceil(FILES_PER_DIR);
    let (d, f) = (n % dirs, n / dirs % FILES_PER_DIR);
    PathBuf::from(format!("d{d:03}/f{f:03}"))
}

/// Appends a line to the next [`CHANGES_PER_TAKE`] files of the tree, through the mount.
fn change_files(mnt: &Path, files: usize, changed: &mut usize) -> Result<()> {
    for _ in 0..CHANGES_PER_TAKE {
        let path = mnt.join(tree_file(files, *changed));
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"changed\n"))
            .with_context(|| format!("changing {}", path.display()))?;
        *changed += 1;
    }
    Ok(())
}

/// One write run on a fresh LIVE (`base/write-REP`); pushes each outcome as it is measured.
fn write_run(ovlsnap: &Path, base: &Path, rep: usize, mib: u64, out: &mut Vec<(Metric, Outcome)>) -> Result<()> {
    let live = base.join(format!("write-{rep}"));
    fs::create_dir(&live).with_context(|| format!("creating {}", live.display()))?;
    write_big_file(&live.join("old.bin"), mib, rep as u64)?;
    let mut mount = SnapMount::mount(ovlsnap, &live)?;
    let mnt = mount.mnt.clone();
    let write = |name: &str, into: WriteInto| -> Result<Outcome> {
        ops::sync()?;
        Ok(ops::write_seq(&mnt.join(name), mib, into))
    };
    let without = note(out, Metric::WriteNoSnapshot, write("new-a.bin", WriteInto::NewFile)?);
    let (overwrite_without, probe) = probed(&mnt, || write("old.bin", WriteInto::InPlace));
    let overwrite_without = note(out, Metric::OverwriteNoSnapshot, overwrite_without?);
    note(out, Metric::ProbeWhileWriting, probe);
    if let Outcome::Failed(why) = mount.take_command("write-test") {
        bail!("take: {why}");
    }
    let with = note(out, Metric::WriteNewWithSnapshot, write("new-b.bin", WriteInto::NewFile)?);
    let (overwrite_first, probe) = probed(&mnt, || write("old.bin", WriteInto::InPlace));
    let mut overwrite_first = overwrite_first?;
    note(out, Metric::ProbeWhileCopying, probe);
    // Without the copy the first overwrite would be a fast number that means nothing.
    let saved = mount.layer_bytes()?;
    if saved < mib << 20 && matches!(overwrite_first, Outcome::Value(_)) {
        overwrite_first = Outcome::Failed(format!("the snapshot holds {saved} bytes: old.bin was not saved"));
    }
    let overwrite_first = note(out, Metric::OverwriteFirstAfterTake, overwrite_first);
    note(out, Metric::OverwriteAgainAfterTake, write("old.bin", WriteInto::InPlace)?);
    note(out, Metric::WriteWithSnapshot, with.ratio_to(&without));
    note(out, Metric::OverwriteAfterTakeRatio, overwrite_first.ratio_to(&overwrite_without));
    // One pair of sequential writes swings with this VM's disk far more than a snapshot costs:
    // more pairs, each a write with no snapshot left (the last one deleted) next to a write
    // after a fresh take. The order alternates within pairs and each pair's files go afterwards:
    // new files in this ext4 get slower as it fills up, which put every second half at a
    // disadvantage (ratios of 0.15-0.23 in the last pair of every run, none in the others).
    for name in ["new-a.bin", "new-b.bin"] {
        fs::remove_file(mnt.join(name)).with_context(|| format!("removing {name}"))?;
    }
    let mut taken = String::from("write-test");
    for pair in 1..=EXTRA_WRITE_PAIRS {
        let (a, b) = (format!("new-a{pair}.bin"), format!("new-b{pair}.bin"));
        let (with, without) = if pair % 2 == 1 {
            delete(&mount, &taken)?;
            let without = write(&a, WriteInto::NewFile)?;
            taken = format!("write-test-{pair}");
            take(&mount, &taken)?;
            (write(&b, WriteInto::NewFile)?, without)
        } else {
            let with = write(&b, WriteInto::NewFile)?;
            delete(&mount, &taken)?;
            let without = write(&a, WriteInto::NewFile)?;
            taken = format!("write-test-{pair}");
            take(&mount, &taken)?;
            (with, without)
        };
        note(out, Metric::WriteWithSnapshot, with.ratio_to(&without));
        for name in [&a, &b] {
            fs::remove_file(mnt.join(name)).with_context(|| format!("removing {name}"))?;
        }
    }
    mount.unmount()?;
    fs::remove_dir_all(&live).with_context(|| format!("removing {}", live.display()))
}

/// Runs `f` while another thread creates, stats and removes a small file in `MNT/probe` every
/// 2 ms; returns what `f` returned and the slowest probe in ms.
fn probed<T>(mnt: &Path, f: impl FnOnce() -> T) -> (T, Outcome) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = mnt.join("probe");
    if let Err(e) = fs::create_dir_all(&dir) {
        return (f(), Outcome::Failed(format!("mkdir {}: {e}", dir.display())));
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut worst, mut n) = (0f64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let p = dir.join(format!("p{n}"));
                let start = Instant::now();
                let probe = fs::write(&p, b"p").and_then(|()| fs::metadata(&p)).and_then(|_| fs::remove_file(&p));
                if let Err(e) = probe {
                    return Outcome::Failed(format!("probe {}: {e}", p.display()));
                }
                worst = worst.max(start.elapsed().as_secs_f64() * 1e3);
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            if n == 0 { Outcome::Failed("no probe ran".to_owned()) } else { Outcome::Value(worst) }
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        (out, prober.join().unwrap_or_else(|_| Outcome::Failed("the probe thread panicked".to_owned())))
    })
}

/// Pairs of new-file writes without and with a snapshot per write run, after the first.
const EXTRA_WRITE_PAIRS: usize = 4;

/// `ovlsnap take NAME`, or the run fails.
fn take(mount: &SnapMount, name: &str) -> Result<()> {
    match mount.take_command(name) {
        Outcome::Failed(why) => bail!("take {name}: {why}"),
        _ => Ok(()),
    }
}

/// `ovlsnap delete NAME`, or the run fails.
fn delete(mount: &SnapMount, name: &str) -> Result<()> {
    match mount.delete_command(name) {
        Outcome::Failed(why) => bail!("delete {name}: {why}"),
        _ => Ok(()),
    }
}

/// Shows an outcome as progress and keeps it; returns it for the ratios.
fn note(out: &mut Vec<(Metric, Outcome)>, metric: Metric, outcome: Outcome) -> Outcome {
    progress(&format!("    {:<30} {}", metric.id(), outcome.show(metric)));
    out.push((metric, outcome.clone()));
    outcome
}

/// An `ovlsnap mount` of LIVE over itself; dropping it unmounts with `ovlsnap umount`, falling back
/// to `umount -l`, and then stops the daemon (`SIGTERM`, then `SIGKILL`) if it is still running.
pub struct SnapMount {
    ovlsnap: PathBuf,
    /// The mount point (LIVE, canonical).
    pub(crate) mnt: PathBuf,
    /// The daemon, once known.
    pub(crate) pid: Option<u32>,
}

impl SnapMount {
    /// `ovlsnap mount LIVE`, which returns once the mount is live; learns the daemon's pid.
    pub fn mount(ovlsnap: &Path, live: &Path) -> Result<SnapMount> {
        let mnt = fs::canonicalize(live).with_context(|| format!("{}: no such directory", live.display()))?;
        if mountinfo::is_mounted(&mnt)? {
            bail!("{} is already a mount point", mnt.display());
        }
        // The guard exists before the mount does, so a half-made mount is cleaned up too.
        let mut guard = SnapMount { ovlsnap: ovlsnap.to_owned(), mnt, pid: None };
        quiet(ovlsnap, &["mount".as_ref(), guard.mnt.as_os_str()])?;
        mountinfo::wait_until_mounted(&guard.mnt)?;
        let status =
            quiet_output(ovlsnap, &["status".as_ref(), "--json".as_ref(), "--mount".as_ref(), guard.mnt.as_ref()])?;
        guard.pid = Some(json_u64(&status, "pid").context("`ovlsnap status --json` shows no pid")? as u32);
        if !guard.socket().exists() {
            bail!("no control socket at {} for {}", guard.socket().display(), guard.mnt.display());
        }
        Ok(guard)
    }

    /// The daemon's control socket.
    fn socket(&self) -> PathBuf {
        socket_path(&self.mnt)
    }

    /// `ovlsnap take NAME --mount MNT`, from its start to its exit. Milliseconds.
    pub fn take_command(&self, name: &str) -> Outcome {
        let start = Instant::now();
        let output = Command::new(&self.ovlsnap)
            .args(["take".as_ref(), name.as_ref(), "--mount".as_ref(), self.mnt.as_os_str()])
            .stdin(Stdio::null())
            .output();
        let elapsed = start.elapsed();
        match output {
            Err(err) => Outcome::Failed(format!("could not start {}: {err}", self.ovlsnap.display())),
            Ok(output) if !output.status.success() => Outcome::Failed(format!(
                "`ovlsnap take` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(output) if String::from_utf8_lossy(&output.stdout).trim() != name => Outcome::Failed(format!(
                "`ovlsnap take {name}` printed {:?}",
                String::from_utf8_lossy(&output.stdout).trim()
            )),
            Ok(_) => Outcome::millis(elapsed),
        }
    }

    /// `ovlsnap delete NAME --mount MNT`. Milliseconds.
    pub fn delete_command(&self, name: &str) -> Outcome {
        let start = Instant::now();
        let output = Command::new(&self.ovlsnap)
            .args(["delete".as_ref(), name.as_ref(), "--mount".as_ref(), self.mnt.as_os_str()])
            .stdin(Stdio::null())
            .output();
        match output {
            Err(err) => Outcome::Failed(format!("could not start {}: {err}", self.ovlsnap.display())),
            Ok(output) if !output.status.success() => Outcome::Failed(format!(
                "`ovlsnap delete` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(_) => Outcome::millis(start.elapsed()),
        }
    }

    /// One `take` request on the control socket: connect, send, read the reply. Milliseconds.
    /// `name` must need no JSON escaping.
    pub fn take_socket(&self, name: &str) -> Outcome {
        let request = format!("{{\"cmd\":\"take\",\"name\":\"{name}\"}}\n");
        let socket = self.socket();
        let start = Instant::now();
        let reply = (|| -> io::Result<String> {
            let mut stream = UnixStream::connect(&socket)?;
            // A daemon that hangs fails the sample instead of the whole benchmark.
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            stream.write_all(request.as_bytes())?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line)?;
            Ok(line)
        })();
        let elapsed = start.elapsed();
        match reply {
            Err(err) => Outcome::Failed(format!("control socket {}: {err}", socket.display())),
            Ok(line) if !line.contains("\"error\":null") || !line.contains(&format!("\"name\":\"{name}\"")) => {
                Outcome::Failed(format!("the daemon answered {:?}", line.trim()))
            }
            Ok(_) => Outcome::millis(elapsed),
        }
    }

    /// `ovlsnap list --json`.
    pub(crate) fn list(&self) -> Result<String> {
        quiet_output(&self.ovlsnap, &["list".as_ref(), "--json".as_ref(), "--mount".as_ref(), self.mnt.as_os_str()])
    }

    /// The bytes the newest snapshot's layer holds, from `ovlsnap list --json`.
    fn layer_bytes(&self) -> Result<u64> {
        let list = self.list()?;
        let newest = list.rfind("\"layer_bytes\"").context("`ovlsnap list --json` shows no snapshot")?;
        json_u64(&list[newest..], "layer_bytes").context("`ovlsnap list --json`: bad layer_bytes")
    }

    /// `ovlsnap umount MNT` (which waits for the daemon to exit), and waits until the mount is gone.
    pub fn unmount(&mut self) -> Result<()> {
        if !mountinfo::is_mounted(&self.mnt)? {
            return Ok(());
        }
        quiet(&self.ovlsnap, &["umount".as_ref(), self.mnt.as_os_str()])?;
        let start = Instant::now();
        while mountinfo::is_mounted(&self.mnt)? {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{} is still mounted 10s after `ovlsnap umount`", self.mnt.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for SnapMount {
    fn drop(&mut self) {
        if mountinfo::is_mounted(&self.mnt).unwrap_or(true) {
            eprintln!("cleaning up: unmounting {}", self.mnt.display());
            if let Err(err) = self.unmount() {
                eprintln!("warning: {err:#}; detaching it with umount -l");
                if quiet("umount", &["-l".as_ref(), self.mnt.as_os_str()]).is_err() {
                    eprintln!("warning: could not unmount {}; unmount it by hand", self.mnt.display());
                }
            }
        }
        if let Some(pid) = self.pid {
            stop_daemon(pid);
        }
    }
}

/// The control socket of the daemon serving `mnt` (canonical), as snap-fs names it:
/// `RUN_DIR/<FNV-1a 64 of the mount point's bytes, 16 hex digits>.sock`.
fn socket_path(mnt: &Path) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in mnt.as_os_str().as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_DIR).join(format!("{hash:016x}.sock"))
}

/// Waits for the daemon `pid` to exit (it does once unmounted), then insists with `SIGTERM` (on
/// which it detaches its mount) and `SIGKILL`.
fn stop_daemon(pid: u32) {
    for signal in [None, Some("-TERM"), Some("-KILL")] {
        if let Some(signal) = signal {
            if !is_ovlsnap(pid) {
                return;
            }
            eprintln!("cleaning up: kill {signal} {pid} (the ovlsnap daemon)");
            let _ = quiet("kill", &[signal.as_ref(), pid.to_string().as_ref()]);
        }
        let start = Instant::now();
        while is_ovlsnap(pid) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !is_ovlsnap(pid) {
            return;
        }
    }
    eprintln!("warning: the ovlsnap daemon {pid} does not exit");
}

/// Whether `pid` is a live (not zombie) `ovlsnap` process: the check keeps us from signalling a
/// process that got the pid after the daemon exited.
fn is_ovlsnap(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((name, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    name.ends_with("(ovlsnap") && !rest.starts_with('Z')
}

/// The unsigned number after `"key":` in a JSON text (the first such key).
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let quoted = format!("\"{key}\"");
    let after = &text[text.find(&quoted)? + quoted.len()..];
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    value[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_is_fnv1a_of_the_mount_point() {
        // FNV-1a 64 of no bytes is the offset basis; of "a", the published test vector.
        assert_eq!(socket_path(Path::new("")), Path::new("/run/ovlsnap/cbf29ce484222325.sock"));
        assert_eq!(socket_path(Path::new("a")), Path::new("/run/ovlsnap/af63dc4c8601ec8c.sock"));
    }

    #[test]
    fn json_numbers_are_found_by_key() {
        let text = "{\n  \"live\": \"/x\",\n  \"pid\": 4242,\n  \"layer_bytes\":7}";
        assert_eq!(json_u64(text, "pid"), Some(4242));
        assert_eq!(json_u64(text, "layer_bytes"), Some(7));
        assert_eq!(json_u64(text, "live"), None);
        assert_eq!(json_u64(text, "absent"), None);
    }

    #[test]
    fn tree_files_exist_and_spread_over_the_dirs() {
        for files in [1_000, 10_000, 100_000] {
            let dirs = files / FILES_PER_DIR;
            let picked: Vec<PathBuf> =
                (0..CHANGES_PER_TAKE * 3 * Scale::full().snapshot_takes).map(|n| tree_file(files, n)).collect();
            let distinct: std::collections::HashSet<_> = picked.iter().collect();
            assert_eq!(distinct.len(), picked.len());
            assert!(picked.iter().all(|p| {
                let name = p.to_string_lossy();
                name[1..4].parse::<usize>().unwrap() < dirs && name[6..].parse::<usize>().unwrap() < FILES_PER_DIR
            }));
        }
    }
}
