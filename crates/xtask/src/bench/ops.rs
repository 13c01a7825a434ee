//! The measurements themselves: plain file operations through a mount point, timed from the caller's
//! side exactly as an application would see them. Each returns an [`Outcome`] in the metric's unit
//! (milliseconds, MB/s for reads, MiB/s for writes, operations per second for the churn) rather than
//! failing the whole run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::layers::{mark_block, pattern_block};
use super::mounts::quiet;

/// What one measurement gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A number in the metric's unit.
    Value(f64),
    /// The backend refuses the operation by design, for now (e.g. `EXDEV` for a directory rename).
    Unsupported(String),
    /// Something went wrong: the mount, the operation, or a wrong result.
    Failed(String),
}

impl Outcome {
    /// A duration in milliseconds.
    pub fn millis(elapsed: Duration) -> Outcome {
        Outcome::Value(elapsed.as_secs_f64() * 1e3)
    }

    /// `self / base`, two values of the same run (e.g. a write with a snapshot and one without);
    /// fails when either is not a value.
    pub fn ratio_to(&self, base: &Outcome) -> Outcome {
        match (self, base) {
            (Outcome::Value(value), Outcome::Value(base)) => Outcome::Value(value / base),
            _ => Outcome::Failed("a measurement of the pair failed".to_owned()),
        }
    }

    fn from_io(what: &str, result: io::Result<Duration>) -> Outcome {
        match result {
            Ok(elapsed) => Outcome::millis(elapsed),
            Err(err) => Outcome::Failed(format!("{what}: {err}")),
        }
    }
}

/// Flushes every filesystem (`sync`), so writeback of an earlier step does not land in the next one.
pub fn sync() -> Result<()> {
    quiet("sync", &[])
}

/// Flushes and then drops the page cache, dentries and inodes of every filesystem.
pub fn drop_caches() -> Result<()> {
    sync()?;
    fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Reads `path` once, untimed, so that it is in the page cache (used on lower files directly).
pub fn warm(path: &Path) -> Result<()> {
    read_all(path).map(drop).with_context(|| format!("reading {}", path.display()))
}

/// Walks the whole tree below `root` with `readdir` and an `lstat` of every entry; checks that it
/// saw `expected` entries. Milliseconds.
pub fn walk(root: &Path, expected: u64) -> Outcome {
    let start = Instant::now();
    let mut count = 0;
    if let Err(err) = walk_dir(root, &mut count) {
        return Outcome::Failed(format!("walk: {err}"));
    }
    let elapsed = start.elapsed();
    if count != expected {
        return Outcome::Failed(format!("walk saw {count} entries, expected {expected}"));
    }
    Outcome::millis(elapsed)
}

/// Adds the entries below `dir` to `count`, with a `readdir` of every directory and an `lstat` of
/// every entry.
pub(crate) fn walk_dir(dir: &Path, count: &mut u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // `DirEntry::metadata` is an lstat relative to the open directory, like `find` or `ls -l`.
        let meta = entry.metadata()?;
        *count += 1;
        if meta.is_dir() {
            walk_dir(&entry.path(), count)?;
        }
    }
    Ok(())
}

/// Reads `path` sequentially once to warm the caches, then again timed. MB/s (10^6 bytes).
pub fn read_hot(path: &Path) -> Outcome {
    let timed = read_all(path).and_then(|_| {
        let start = Instant::now();
        let bytes = read_all(path)?;
        Ok((bytes, start.elapsed()))
    });
    match timed {
        Ok((bytes, elapsed)) => Outcome::Value(bytes as f64 / elapsed.as_secs_f64() / 1e6),
        Err(err) => Outcome::Failed(format!("read: {err}")),
    }
}

fn read_all(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buffer)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Opens a lower file for appending, writes one byte and closes it: the time of its copy-up.
/// Milliseconds.
pub fn copy_up_append(path: &Path) -> Outcome {
    Outcome::from_io("copy-up", append_byte(path))
}

fn append_byte(path: &Path) -> io::Result<Duration> {
    let start = Instant::now();
    let mut file = OpenOptions::new().append(true).open(path)?;
    file.write_all(b"!")?;
    drop(file);
    Ok(start.elapsed())
}

/// Copies up `copy_target` (as [`copy_up_append`]) while another thread `lstat`s unrelated files in
/// a tight loop, cycling through `stat_targets`. Returns the worst and the 99th percentile `lstat`
/// latency, in milliseconds.
pub fn stat_during_copy_up(copy_target: &Path, stat_targets: &[PathBuf]) -> (Outcome, Outcome) {
    let (copy, sampled) = lstat_during(stat_targets, || append_byte(copy_target));
    let failed = |why: String| (Outcome::Failed(why.clone()), Outcome::Failed(why));
    if let Err(err) = copy {
        return failed(format!("copy-up: {err}"));
    }
    match sampled {
        Ok(latencies) => (Outcome::millis(latencies.worst()), Outcome::millis(latencies.p99())),
        Err(why) => failed(why),
    }
}

/// Renames the lower file `from` to `to` with `rename(2)`, which copies all of it up first, while
/// another thread `lstat`s unrelated files as in [`stat_during_copy_up`]. Returns the worst `lstat`
/// latency in milliseconds; fails unless afterwards `to` holds `len` bytes and `from` is gone.
pub fn stat_during_rename_copy_up(from: &Path, to: &Path, len: u64, stat_targets: &[PathBuf]) -> Outcome {
    let (renamed, sampled) = lstat_during(stat_targets, || fs::rename(from, to));
    if let Err(err) = renamed {
        return Outcome::Failed(format!("rename: {err}"));
    }
    match fs::symlink_metadata(to) {
        Ok(meta) if meta.len() == len => {}
        Ok(meta) => {
            return Outcome::Failed(format!("{} holds {} bytes after the rename, not {len}", to.display(), meta.len()));
        }
        Err(err) => return Outcome::Failed(format!("{} after the rename: {err}", to.display())),
    }
    if fs::symlink_metadata(from).is_ok() {
        return Outcome::Failed(format!("{} is still there after the rename", from.display()));
    }
    match sampled {
        Ok(latencies) => Outcome::millis(latencies.worst()),
        Err(why) => Outcome::Failed(why),
    }
}

/// `lstat` latencies, sorted; at least one.
struct Latencies(Vec<Duration>);

impl Latencies {
    /// `None` when there are none.
    fn sorted(mut latencies: Vec<Duration>) -> Option<Latencies> {
        latencies.sort_unstable();
        (!latencies.is_empty()).then_some(Latencies(latencies))
    }

    fn worst(&self) -> Duration {
        self.0[self.0.len() - 1]
    }

    fn p99(&self) -> Duration {
        self.0[(self.0.len() * 99).div_ceil(100) - 1]
    }
}

/// Runs `copy` (an operation that copies a big file up) while another thread `lstat`s
/// `stat_targets` in a tight loop, cycling through them; returns what `copy` returned and the
/// latencies of the `lstat`s, or why there are none.
///
/// Cycling through many files rather than one is deliberate: a FUSE overlay answers a repeated
/// `lstat` of one file from the kernel's attribute cache (1 s in ovlfs), so at most one request
/// would reach the daemon during the copy-up, and a daemon that blocks every request while it
/// copies (a global lock) would go unnoticed.
fn lstat_during<T>(stat_targets: &[PathBuf], copy: impl FnOnce() -> T) -> (T, Result<Latencies, String>) {
    let stop = AtomicBool::new(false);
    let (copied, sampled) = thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_lstat(stat_targets, &stop));
        // Let the sampler get going, so that the copy-up starts under observation.
        thread::sleep(Duration::from_millis(10));
        let copied = copy();
        stop.store(true, Ordering::Relaxed);
        (copied, sampler.join())
    });
    let latencies = match sampled {
        Ok(Ok(latencies)) => {
            Latencies::sorted(latencies).ok_or_else(|| "no lstat completed during the copy-up".to_owned())
        }
        Ok(Err(err)) => Err(format!("lstat: {err}")),
        Err(_) => Err("the lstat thread panicked".to_owned()),
    };
    (copied, latencies)
}

fn sample_lstat(paths: &[PathBuf], stop: &AtomicBool) -> io::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(1 << 20);
    for path in paths.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let start = Instant::now();
        fs::symlink_metadata(path)?;
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

/// Where [`write_seq`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteInto {
    /// A new file (`O_CREAT | O_EXCL`).
    NewFile,
    /// An existing file of at least the size written, from offset 0, without truncating it.
    InPlace,
}

/// Opens `path`, writes `mib` MiB of pseudo-random data in writes of 1 MiB, `fsync`s and closes
/// it; the time covers all of that. MiB/s.
pub fn write_seq(path: &Path, mib: u64, into: WriteInto) -> Outcome {
    let mut block = pattern_block(mib ^ 0x5eed);
    let mut write = || -> io::Result<Duration> {
        let start = Instant::now();
        let mut file = match into {
            WriteInto::NewFile => OpenOptions::new().write(true).create_new(true).open(path)?,
            WriteInto::InPlace => OpenOptions::new().write(true).open(path)?,
        };
        for index in 0..mib {
            mark_block(&mut block, index);
            file.write_all(&block)?;
        }
        file.sync_all()?;
        drop(file);
        Ok(start.elapsed())
    };
    match write() {
        Ok(elapsed) => Outcome::Value(mib as f64 / elapsed.as_secs_f64()),
        Err(err) => Outcome::Failed(format!("write {}: {err}", path.display())),
    }
}

/// Creates `dir`, then `count` files of 4 KiB in it. Milliseconds.
pub fn create_files(dir: &Path, count: usize) -> Outcome {
    let content = [b'c'; 4096];
    let create = || -> io::Result<Duration> {
        let moved = migrations();
        let start = Instant::now();
        fs::create_dir(dir)?;
        for i in 0..count {
            File::create(dir.join(format!("f{i:05}")))?.write_all(&content)?;
        }
        let elapsed = start.elapsed();
        if let (Some(before), Some(after)) = (moved, migrations()) {
            super::progress(&format!("    (the creating thread moved between CPUs {} times)", after - before));
        }
        Ok(elapsed)
    };
    Outcome::from_io("create", create())
}

/// How many times the calling thread has moved to another CPU (`se.nr_migrations` of
/// `/proc/thread-self/sched`): a FUSE request whose reply wakes the caller on another, idle
/// CPU costs that CPU's wake-up on a VM that halts idle vCPUs, the cause of create_5k's slow
/// runs (BENCHMARKS.md, session 20).
fn migrations() -> Option<u64> {
    let sched = fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = sched.lines().find(|l| l.starts_with("se.nr_migrations"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

/// Churns small files in every dir of `dirs` at once, one thread per dir, for about `duration`:
/// create a file (`O_CREAT | O_EXCL`), write 4 KiB, close; rename it to a second name in the same
/// dir; unlink it. Each cycle is three operations. Operations per second, the threads' summed.
pub fn churn(dirs: &[PathBuf], duration: Duration) -> Outcome {
    // The threads start together, so that their runs overlap all the way.
    let start = Barrier::new(dirs.len());
    let rates: Vec<Result<f64, String>> = thread::scope(|scope| {
        let workers: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    churn_dir(dir, duration).map_err(|err| format!("churn in {}: {err}", dir.display()))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|_| Err("a churn thread panicked".to_owned())))
            .collect()
    });
    let mut total = 0.0;
    for rate in rates {
        match rate {
            Ok(rate) => total += rate,
            Err(why) => return Outcome::Failed(why),
        }
    }
    Outcome::Value(total)
}

/// One thread of [`churn`]: cycles until `duration` has passed; operations per second.
fn churn_dir(dir: &Path, duration: Duration) -> io::Result<f64> {
    let content = [b'c'; 4096];
    let (created, renamed) = (dir.join("churn-created"), dir.join("churn-renamed"));
    let start = Instant::now();
    let mut cycles = 0u64;
    while start.elapsed() < duration {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&created)?;
        file.write_all(&content)?;
        drop(file);
        fs::rename(&created, &renamed)?;
        fs::remove_file(&renamed)?;
        cycles += 1;
    }
    Ok((3 * cycles) as f64 / start.elapsed().as_secs_f64())
}

/// Unlinks every path (files that live in a lower layer, so each needs a whiteout). Milliseconds.
pub fn unlink_all(paths: &[PathBuf]) -> Outcome {
    let unlink = || -> io::Result<Duration> {
        let start = Instant::now();
        for path in paths {
            fs::remove_file(path)?;
        }
        Ok(start.elapsed())
    };
    Outcome::from_io("unlink", unlink())
}

/// Renames a directory that lives in a lower layer with `rename(2)`. Milliseconds; `EXDEV` (what an
/// overlay without redirects answers) is reported as not supported rather than as a failure.
pub fn rename_dir(from: &Path, to: &Path) -> Outcome {
    let start = Instant::now();
    match fs::rename(from, to) {
        Ok(()) => Outcome::millis(start.elapsed()),
        Err(err) if err.kind() == io::ErrorKind::CrossesDevices => Outcome::Unsupported("EXDEV".to_owned()),
        Err(err) => Outcome::Failed(format!("rename: {err}")),
    }
}

/// Moves a directory with `mv`, as a user would: a rename, or a copy and delete when the rename
/// gives `EXDEV`. Milliseconds (including starting `mv`, about a millisecond).
pub fn mv_dir(from: &Path, to: &Path) -> Outcome {
    let start = Instant::now();
    match quiet("mv", &[from.as_os_str(), to.as_os_str()]) {
        Ok(()) => Outcome::millis(start.elapsed()),
        Err(err) => Outcome::Failed(format!("{err:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_counts_every_entry_and_checks_the_count() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-bench-walk-{}", std::process::id()));
        fs::create_dir_all(root.join("a/b"))?;
        fs::write(root.join("a/f"), "x")?;
        fs::write(root.join("a/b/g"), "y")?;
        let right = walk(&root, 4);
        let wrong = walk(&root, 5);
        let renamed = rename_dir(&root.join("a/b"), &root.join("c"));
        let moved = mv_dir(&root.join("c"), &root.join("d"));
        fs::remove_dir_all(&root)?;
        assert!(matches!(right, Outcome::Value(ms) if ms >= 0.0), "{right:?}");
        assert_eq!(wrong, Outcome::Failed("walk saw 4 entries, expected 5".to_owned()));
        assert!(matches!(renamed, Outcome::Value(_)), "{renamed:?}");
        assert!(matches!(moved, Outcome::Value(_)), "{moved:?}");
        Ok(())
    }

    #[test]
    fn sequential_writes_create_or_overwrite_in_place() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-bench-write-{}", std::process::id()));
        fs::create_dir_all(&root)?;
        fs::write(root.join("old"), vec![0u8; 3 << 20])?;
        let fresh = write_seq(&root.join("new"), 2, WriteInto::NewFile);
        let again = write_seq(&root.join("new"), 2, WriteInto::NewFile);
        let in_place = write_seq(&root.join("old"), 2, WriteInto::InPlace);
        let (new_len, old) = (fs::metadata(root.join("new"))?.len(), fs::read(root.join("old"))?);
        fs::remove_dir_all(&root)?;
        assert!(matches!(fresh, Outcome::Value(v) if v > 0.0), "{fresh:?}");
        assert!(matches!(again, Outcome::Failed(_)), "a second write into a new file must fail: {again:?}");
        assert!(matches!(in_place, Outcome::Value(_)), "{in_place:?}");
        assert_eq!(new_len, 2 << 20);
        assert_eq!(old.len(), 3 << 20, "an in-place write does not truncate");
        assert!(old[..2 << 20].iter().any(|&b| b != 0) && old[2 << 20..].iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn stat_latency_is_sampled_during_a_copy() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-bench-stat-{}", std::process::id()));
        fs::create_dir_all(&root)?;
        fs::write(root.join("big"), vec![0u8; 1 << 20])?;
        fs::write(root.join("other"), "x")?;
        let (worst, p99) = stat_during_copy_up(&root.join("big"), &[root.join("other"), root.join("big")]);
        let grown = fs::metadata(root.join("big"))?.len();
        fs::remove_dir_all(&root)?;
        let (Outcome::Value(worst), Outcome::Value(p99)) = (worst, p99) else {
            panic!("expected values");
        };
        assert!(p99 <= worst);
        assert_eq!(grown, (1 << 20) + 1);
        Ok(())
    }

    #[test]
    fn a_rename_copy_up_is_sampled_and_checked() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-bench-rename-{}", std::process::id()));
        fs::create_dir_all(&root)?;
        fs::write(root.join("big"), vec![1u8; 1 << 20])?;
        fs::write(root.join("other"), "x")?;
        let targets = [root.join("other")];
        let renamed = stat_during_rename_copy_up(&root.join("big"), &root.join("big.renamed"), 1 << 20, &targets);
        let gone = stat_during_rename_copy_up(&root.join("big"), &root.join("big.again"), 1 << 20, &targets);
        let short = stat_during_rename_copy_up(&root.join("big.renamed"), &root.join("big"), 2 << 20, &targets);
        fs::remove_dir_all(&root)?;
        assert!(matches!(renamed, Outcome::Value(ms) if ms >= 0.0), "{renamed:?}");
        assert!(matches!(&gone, Outcome::Failed(why) if why.starts_with("rename: ")), "{gone:?}");
        assert!(matches!(&short, Outcome::Failed(why) if why.contains("holds 1048576 bytes")), "{short:?}");
        Ok(())
    }

    #[test]
    fn churn_counts_ops_in_every_dir_and_leaves_nothing_behind() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-bench-churn-{}", std::process::id()));
        let dirs = [root.join("a"), root.join("b")];
        for dir in &dirs {
            fs::create_dir_all(dir)?;
        }
        let one = churn(&dirs[..1], Duration::from_millis(50));
        let two = churn(&dirs, Duration::from_millis(50));
        let missing = churn(&[root.join("missing")], Duration::from_millis(50));
        let left = fs::read_dir(&dirs[0])?.count() + fs::read_dir(&dirs[1])?.count();
        fs::remove_dir_all(&root)?;
        assert!(matches!(one, Outcome::Value(ops) if ops > 0.0), "{one:?}");
        assert!(matches!(two, Outcome::Value(ops) if ops > 0.0), "{two:?}");
        assert!(matches!(&missing, Outcome::Failed(why) if why.starts_with("churn in ")), "{missing:?}");
        assert_eq!(left, 0);
        assert_eq!(Outcome::Value(6.0).ratio_to(&Outcome::Value(2.0)), Outcome::Value(3.0));
        assert!(matches!(two.ratio_to(&missing), Outcome::Failed(_)));
        Ok(())
    }
}
