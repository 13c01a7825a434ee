//! The tree both systems snapshot, the changes made to it between takes, and the timed operations
//! on files and views: cold walks in a child process with a timeout, first copy-on-write writes,
//! commands timed from start to exit, and a daemon's descriptors and memory read from `/proc`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::results::Cell;
use crate::bench::median;
use crate::bench::{ops, snapshots};

/// Directories of the tree (`d000` .. `d999`).
pub const DIRS: usize = 1000;
/// Files per directory (`f000` .. `f019`), 100 bytes each.
pub const FILES_PER_DIR: usize = 20;
/// Files in the tree.
pub const FILES: usize = DIRS * FILES_PER_DIR;
/// Entries a walk of any view must see: the changes only overwrite files, so every snapshot holds
/// the same names.
pub const ENTRIES: u64 = (DIRS + FILES) as u64;

/// Writes the tree into `live`.
pub fn generate(live: &Path) -> Result<()> {
    snapshots::generate_tree(live, FILES, FILES_PER_DIR)
}

/// File number `index` of the tree, relative to its root.
fn file(index: usize) -> PathBuf {
    PathBuf::from(format!("d{:03}/f{:03}", index / FILES_PER_DIR, index % FILES_PER_DIR))
}

/// A small seeded generator (xorshift64): the same files change in every run with the same seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number below `n`.
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    /// `count` files of the tree picked at random across all dirs, none of them in `changed`
    /// (the files changed since the last take), which they join.
    pub fn fresh_files(&mut self, count: usize, changed: &mut HashSet<usize>) -> Vec<PathBuf> {
        let count = count.min(FILES - changed.len());
        let mut picked = Vec::with_capacity(count);
        while picked.len() < count {
            let index = self.below(FILES);
            if changed.insert(index) {
                picked.push(file(index));
            }
        }
        picked
    }
}

/// Overwrites the first 8 bytes of each of `files` below `root` with `stamp` (same size, new data).
pub fn change(root: &Path, files: &[PathBuf], stamp: usize) -> Result<()> {
    let data = format!("{:08}", stamp % 100_000_000);
    for rel in files {
        let path = root.join(rel);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(data.as_bytes(), 0))
            .with_context(|| format!("changing {}", path.display()))?;
    }
    Ok(())
}

/// The first write to each of `files` below `root` since the last take: an `lstat` first,
/// untimed, so that only the write pays; then open, one byte written in the middle, close,
/// timed. The median in milliseconds.
pub fn first_writes(root: &Path, files: &[PathBuf]) -> Cell {
    let mut times = Vec::with_capacity(files.len());
    for rel in files {
        let path = root.join(rel);
        let timed = fs::symlink_metadata(&path).and_then(|_| {
            let start = Instant::now();
            OpenOptions::new().write(true).open(&path)?.write_all_at(b"c", 50)?;
            Ok(start.elapsed())
        });
        match timed {
            Ok(elapsed) => times.push(elapsed.as_secs_f64() * 1e3),
            Err(err) => return Cell::Failed(format!("writing {}: {err}", path.display())),
        }
    }
    median(&mut times).map_or(Cell::NotApplicable, Cell::Value)
}

/// Counts every entry below `dir` with `readdir` and an `lstat` of each, as `find` does (not a
/// `.snapshots` at the top).
pub fn walk(dir: &Path) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut entries = 0;
    let walk = |entries: &mut u64| -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            // The tree only: an ovlsnap mount of LIVE shows every view under `.snapshots`.
            if entry.file_name() == ".snapshots" {
                continue;
            }
            *entries += 1;
            if entry.metadata()?.is_dir() {
                ops::walk_dir(&entry.path(), entries)?;
            }
        }
        Ok(())
    };
    walk(&mut entries).with_context(|| format!("walking {}", dir.display()))?;
    Ok((entries, start.elapsed()))
}

/// Drops every cache, then walks `dir` in a child process (`xtask bench-snapshots-walk`), killed
/// after `timeout`. Seconds, or why not: a timeout, a failure, or a count other than [`ENTRIES`].
pub fn cold_walk(dir: &Path, timeout: Duration) -> Cell {
    if let Err(err) = ops::drop_caches() {
        return Cell::Failed(format!("{err:#}"));
    }
    match walk_in_child(dir, timeout) {
        Ok(None) => Cell::Timeout(timeout.as_secs_f64()),
        Ok(Some((entries, _))) if entries != ENTRIES => {
            Cell::Failed(format!("the walk of {} saw {entries} entries, not {ENTRIES}", dir.display()))
        }
        Ok(Some((_, elapsed))) => Cell::Value(elapsed.as_secs_f64()),
        Err(err) => Cell::Failed(format!("{err:#}")),
    }
}

/// The entries and the time of a walk of `dir` by a child process; `None` when it ran past
/// `timeout` (it is then killed).
fn walk_in_child(dir: &Path, timeout: Duration) -> Result<Option<(u64, Duration)>> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut child = Command::new(&exe)
        .arg("bench-snapshots-walk")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let start = Instant::now();
    // Its output is one short line, well within a pipe's buffer: waiting before reading is safe.
    while child.try_wait().context("waiting for the walk")?.is_none() {
        if start.elapsed() > timeout {
            // SIGKILL ends a process waiting on a FUSE request too.
            child.kill().context("stopping the walk")?;
            child.wait().context("reaping the walk")?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().context("reading the walk's output")?;
    if !output.status.success() {
        bail!("{} ({})", String::from_utf8_lossy(&output.stderr).trim(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout.split_once(' ').and_then(|(entries, ms)| {
        Some((entries.trim().parse::<u64>().ok()?, Duration::from_secs_f64(ms.trim().parse::<f64>().ok()? / 1e3)))
    });
    parsed.map(Some).with_context(|| format!("the walk printed {stdout:?}"))
}

/// Runs `program` with `args`, timed from its start to its exit; its stdout, or its stderr as the
/// error when it fails.
pub fn timed(program: impl AsRef<OsStr>, args: &[&OsStr]) -> Result<(Duration, String)> {
    let program = program.as_ref();
    let start = Instant::now();
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {}", program.to_string_lossy()))?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let words: Vec<_> = args.iter().take(3).map(|a| a.to_string_lossy()).collect();
        bail!("`{} {}` failed ({}): {}", program.to_string_lossy(), words.join(" "), output.status, stderr.trim());
    }
    Ok((elapsed, String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// The threads of a process, from `/proc`.
pub fn process_threads(pid: u32) -> Result<usize> {
    let task_dir = format!("/proc/{pid}/task");
    Ok(fs::read_dir(&task_dir).with_context(|| format!("listing {task_dir}"))?.count())
}

/// The descriptors a process holds and its resident memory in MiB, from `/proc`.
pub fn process_usage(pid: u32) -> Result<(usize, f64)> {
    let fd_dir = format!("/proc/{pid}/fd");
    let fds = fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))?.count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("reading the daemon's status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in the daemon's status")?;
    Ok((fds, kib as f64 / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_files_are_distinct_in_the_tree_and_not_changed_before() {
        let mut rng = Rng::new(17);
        let mut changed = HashSet::new();
        let first = rng.fresh_files(10, &mut changed);
        let second = rng.fresh_files(10, &mut changed);
        let all: HashSet<_> = first.iter().chain(&second).collect();
        assert_eq!(all.len(), 20);
        assert_eq!(changed.len(), 20);
        for path in all {
            let name = path.to_string_lossy();
            assert!(name[1..4].parse::<usize>().unwrap() < DIRS, "{name}");
            assert!(name[6..].parse::<usize>().unwrap() < FILES_PER_DIR, "{name}");
        }
        // The same seed picks the same files.
        assert_eq!(Rng::new(17).fresh_files(10, &mut HashSet::new()), first);
    }

    #[test]
    fn changes_keep_the_size_and_first_writes_are_timed() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-bsnap-test.{}", std::process::id()));
        fs::create_dir_all(dir.join("d000"))?;
        fs::write(dir.join("d000/f000"), [b's'; 100])?;
        change(&dir, &[file(0)], 42)?;
        let data = fs::read(dir.join("d000/f000"))?;
        assert_eq!(data.len(), 100);
        assert_eq!(&data[..8], b"00000042");
        assert!(matches!(first_writes(&dir, &[file(0)]), Cell::Value(_)));
        assert_eq!(fs::read(dir.join("d000/f000"))?[50], b'c');
        assert_eq!(walk(&dir)?.0, 2);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
