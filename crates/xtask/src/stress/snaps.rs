//! The taker of the ovlsnap stress run: takes snapshots every so often, deletes random older
//! ones while the workers run, and checks what every kept snapshot's view shows.
//!
//! A recorded take pauses every worker and fsx writer between operations (the run's gate),
//! copies their models aside (to files under the scratch dir, so that long runs with many big
//! files keep little in memory) and takes the snapshot; the others run while they write. With
//! fsx writers every take is recorded, without them every second one. A delete comes when more
//! than `--keep` snapshots are kept and, with fsx writers, after every second take (issue 16,
//! item 8): its victim is the oldest, the newest but one or one in the middle, one in three
//! each. Right after every delete (the writers running on), every kept recorded snapshot's files
//! are read through `.snapshots/NAME/...` and compared byte for byte with the record; with
//! `--restore-every N`, every Nth delete also copies a random kept snapshot's view into the
//! scratch dir (`cp -a`) and compares the copy. A mismatch is printed with what tells a cached
//! size or page in the kernel from a changed layer file (a re-read after dropping the caches,
//! the view's inode number, the file in each layer of the store), counted, and the run goes on;
//! it fails at the end.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::daemon::drop_dentries;
use super::fsx;
use super::worker::{Owned, Rng, Shared, check_record};

/// Takes snapshots every so often on an ovlsnap mount, and deletes old ones.
pub struct Taker {
    pub bin: PathBuf,
    pub mnt: PathBuf,
    /// LIVE, where the store is (for the layer files a mismatch report shows).
    pub live: PathBuf,
    /// Where recorded contents and restored copies go.
    pub scratch: PathBuf,
    pub every: Duration,
    /// Snapshots kept before a take brings a delete.
    pub keep: usize,
    /// Every Nth delete restores a snapshot into the scratch dir (0: never).
    pub restore_every: u64,
    /// The fsx files' models (none: the old alternation of recorded and unrecorded takes).
    pub fsx: Vec<fsx::Model>,
}

/// A snapshot the taker made and kept, with the files recorded at its take.
pub struct Taken {
    pub name: String,
    /// (path under the mount, file holding what it held), when recorded.
    pub files: Option<Vec<(String, PathBuf)>>,
    /// A mismatch was found in it: not checked again.
    bad: bool,
}

/// What the taker did.
#[derive(Default)]
pub struct TakerReport {
    pub takes: u64,
    pub recorded: u64,
    pub deletes: u64,
    pub restores: u64,
    /// Kept recorded snapshots compared with their records (each time counts).
    pub views_verified: u64,
    /// Files compared in them.
    pub files_verified: u64,
    /// Every mismatch found, described.
    pub mismatches: Vec<String>,
    pub kept: Vec<Taken>,
}

impl Taker {
    pub fn run(self, seed: u64, shared: &Shared, owned: &[Arc<Mutex<Owned>>], deadline: Duration) -> TakerReport {
        let mut rng = Rng::new(seed ^ 0x007a_6be5);
        let slot = shared.slots.last().expect("the taker's slot");
        let mut r = TakerReport::default();
        let records = self.scratch.join("records");
        let _ = fs::create_dir_all(&records);
        loop {
            let wake = Instant::now() + self.every;
            while Instant::now() < wake && !shared.stop.load(Ordering::SeqCst) {
                sleep(Duration::from_millis(10));
            }
            if shared.stop.load(Ordering::SeqCst) {
                return r;
            }
            let name = format!("stress-{}", r.takes + 1);
            let record = !self.fsx.is_empty() || r.takes % 2 == 1;
            slot.begin(format!("ovlsnap take {name}{}", if record { " (workers paused)" } else { "" }));
            let result = if record {
                let _paused = shared.gate.write().unwrap();
                let files = self.models(owned);
                cli(&self.bin, &["take", &name, "--mount"], &self.mnt, deadline).map(|_| Some(files))
            } else {
                cli(&self.bin, &["take", &name, "--mount"], &self.mnt, deadline).map(|_| None)
            };
            slot.end();
            let files = match result {
                Ok(files) => files,
                Err(e) => {
                    shared.fail(format!("the taker: {e}"));
                    return r;
                }
            };
            r.takes += 1;
            let files = match files.map(|f| save_records(&records.join(&name), f)).transpose() {
                Ok(f) => f,
                Err(e) => {
                    shared.fail(format!("the taker, saving the records of {name}: {e:#}"));
                    return r;
                }
            };
            r.recorded += u64::from(files.is_some());
            r.kept.push(Taken { name, files, bad: false });
            let fsx_round = !self.fsx.is_empty() && r.takes % 2 == 0 && r.kept.len() > 2;
            if r.kept.len() <= self.keep && !fsx_round {
                continue;
            }
            let last = r.kept.len() - 2;
            let i = match rng.below(3) {
                0 => 0,
                1 => last,
                _ => rng.below(last as u64 + 1) as usize,
            };
            let victim = r.kept.remove(i);
            slot.begin(format!("ovlsnap delete {}", victim.name));
            let result = delete(&self.bin, &self.mnt, &victim.name, deadline);
            slot.end();
            if let Err(e) = result {
                shared.fail(format!("the taker: {e}"));
                return r;
            }
            let _ = fs::remove_dir_all(records.join(&victim.name));
            r.deletes += 1;
            slot.begin(format!("comparing the kept snapshots after delete {}", victim.name));
            let when = format!("right after delete {} (take {})", victim.name, r.takes);
            self.check_kept(&mut r, &when);
            if self.restore_every > 0 && r.deletes % self.restore_every == 0 {
                self.restore_one(&mut r, &mut rng, &when);
            }
            slot.end();
            if r.deletes % 100 == 0 {
                println!(
                    "  ... {} takes, {} deletes, {} snapshots verified, {} mismatches",
                    r.takes,
                    r.deletes,
                    r.views_verified,
                    r.mismatches.len()
                );
            }
        }
    }

    /// What every worker's and fsx writer's files hold now (the workers are paused).
    fn models(&self, owned: &[Arc<Mutex<Owned>>]) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        for o in owned {
            let o = o.lock().unwrap();
            files.extend(o.models.iter().enumerate().map(|(i, m)| (format!("{}/f{i}", o.dir), m.clone())));
        }
        files.extend(self.fsx.iter().enumerate().map(|(k, m)| (fsx::name(k), m.lock().unwrap().clone())));
        files
    }

    /// Compares every kept recorded snapshot's files with their records.
    fn check_kept(&self, r: &mut TakerReport, when: &str) {
        let view_root = self.mnt.join(".snapshots");
        for t in r.kept.iter_mut().filter(|t| !t.bad) {
            let Some(files) = &t.files else { continue };
            r.views_verified += 1;
            for (rel, record) in files {
                match compare_file(&view_root.join(&t.name).join(rel), record) {
                    Ok(()) => r.files_verified += 1,
                    Err(e) => {
                        let at = view_root.join(&t.name).join(rel);
                        let text =
                            format!("{when}: snapshot {} {rel}: {e}\n{}", t.name, self.diagnose(&at, rel, record));
                        println!("  MISMATCH {text}");
                        r.mismatches.push(text);
                        t.bad = true;
                        break;
                    }
                }
            }
        }
    }

    /// Copies a random kept recorded snapshot's view into the scratch dir and compares the copy.
    fn restore_one(&self, r: &mut TakerReport, rng: &mut Rng, when: &str) {
        let candidates: Vec<&Taken> = r.kept.iter().filter(|t| t.files.is_some() && !t.bad).collect();
        if candidates.is_empty() {
            return;
        }
        let t = candidates[rng.below(candidates.len() as u64) as usize];
        let to = self.scratch.join("restored");
        let _ = fs::remove_dir_all(&to);
        let view = self.mnt.join(".snapshots").join(&t.name);
        let out = Command::new("cp").arg("-a").arg(&view).arg(&to).stdin(Stdio::null()).output();
        r.restores += 1;
        let mut failure = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("cp -a of the view failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("running cp: {e}")),
        };
        for (rel, record) in t.files.iter().flatten() {
            if failure.is_some() {
                break;
            }
            failure = compare_file(&to.join(rel), record).err().map(|e| format!("{rel} in the copy: {e}"));
        }
        if let Some(e) = failure {
            let text = format!("{when}: the restored copy of snapshot {}: {e}", t.name);
            println!("  MISMATCH {text}");
            r.mismatches.push(text);
        }
        let _ = fs::remove_dir_all(&to);
    }

    /// What tells a stale kernel cache from a changed layer file: the view file's inode number
    /// and size, a re-read after dropping every cache, and the file in each layer of the store.
    fn diagnose(&self, at: &Path, rel: &str, record: &Path) -> String {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        if let Ok(m) = fs::metadata(at) {
            out.push(format!("    the view's file: inode {:#x}, size {}", m.ino(), m.size()));
        }
        drop_dentries();
        let _ = fs::write("/proc/sys/vm/drop_caches", "3");
        out.push(match compare_file(at, record) {
            Ok(()) => "    re-read after dropping the caches: RIGHT (the kernel had kept a stale size or pages)".into(),
            Err(e) => format!("    re-read after dropping the caches: still wrong: {e}"),
        });
        let layers = self.live.join(".ovlsnap/layers");
        let mut ids: Vec<u64> = fs::read_dir(&layers)
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        for id in ids {
            if let Ok(m) = fs::symlink_metadata(layers.join(id.to_string()).join(rel)) {
                out.push(format!("    layer {id}: {rel} inode {}, size {}, links {}", m.ino(), m.size(), m.nlink()));
            }
        }
        if let Ok(m) = fs::metadata(self.live.join(rel)) {
            out.push(format!("    LIVE: {rel} inode {}, size {}", m.ino(), m.size()));
        }
        out.join("\n")
    }
}

/// Writes each recorded file to `dir/N`; returns (path under the mount, record file).
fn save_records(dir: &Path, files: Vec<(String, Vec<u8>)>) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::with_capacity(files.len());
    for (n, (rel, data)) in files.into_iter().enumerate() {
        let to = dir.join(n.to_string());
        fs::write(&to, data).with_context(|| format!("writing {}", to.display()))?;
        out.push((rel, to));
    }
    Ok(out)
}

/// Compares file `at` with the record `record`.
fn compare_file(at: &Path, record: &Path) -> Result<(), String> {
    let want = fs::read(record).map_err(|e| format!("reading the record {}: {e}", record.display()))?;
    let got = fs::read(at).map_err(|e| format!("reading it: {e}"))?;
    fsx::compare(&want, &got, "the file").map_err(|e| e.replace("DATA MISMATCH in the file: ", ""))
}

/// Runs `ovlsnap ARGS MNT`, killed after `deadline`; its stdout, or an error with its output.
pub fn cli(bin: &Path, args: &[&str], mnt: &Path, deadline: Duration) -> Result<String, String> {
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
pub fn delete(bin: &Path, mnt: &Path, name: &str, deadline: Duration) -> Result<(), String> {
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

/// Checks the views of the snapshots kept at the end: recorded ones show exactly the recorded
/// files (those found wrong during the run are left out: already counted), and every record in
/// `shared/` of every view checks. Returns how many files were compared.
pub fn verify_snapshots(mnt: &Path, kept: &[Taken]) -> Result<usize> {
    let mut n = 0;
    for t in kept {
        let view = mnt.join(".snapshots").join(&t.name);
        for (rel, record) in t.files.iter().filter(|_| !t.bad).flatten() {
            compare_file(&view.join(rel), record)
                .map_err(|e| anyhow::anyhow!("DATA MISMATCH in snapshot {} at the end: {rel}: {e}", t.name))?;
            n += 1;
        }
        let shared = view.join("shared");
        if !shared.exists() {
            continue;
        }
        let mut dirs = vec![shared];
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
