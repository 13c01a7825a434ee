//! One stress worker: random file operations through the mount, fsx-style, each checked against
//! the worker's own model of its files; plus creates, renames, unlinks and reads in a shared
//! directory whose files describe themselves, so that any reader can check them.
//!
//! A worker owns the files `wK/f0..f3` (its directory moves between `wK` and `wK.moved`) and
//! keeps their expected contents in [`Owned`]. It writes random bytes at random offsets,
//! truncates, reads ranges and whole files back and compares, fsyncs, and closes and reopens
//! its descriptors (which stay open across renames of its directory). In `shared/` it publishes
//! records (written under a temporary name, then renamed into place), renames published names
//! over each other, unlinks them, reads them back, renames the directories `shared/ldN` (which
//! start in the lower layers) and makes and removes empty directories. Errors that races
//! between workers explain there (ENOENT, EEXIST, ENOTEMPTY) are counted, not failures; any
//! other error, and any difference from the model or a record that does not check, fails the run.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// How many files a worker owns.
pub const FILES: usize = 4;

/// The largest size an owned file grows to.
pub const MAX_SIZE: u64 = 1 << 20;

/// Names of the shared lower-layer directories (`shared/ldN`).
pub const SHARED_DIRS: u64 = 4;

/// A small, fast, seedable random source (splitmix64): xtask takes no dependency for it.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A self-describing record: `ovlstress WORKER N LEN\n` and LEN bytes that follow from the header.
pub fn record(worker: u64, n: u64, len: usize) -> Vec<u8> {
    let mut out = format!("ovlstress {worker} {n} {len}\n").into_bytes();
    out.extend(Rng::new(worker.wrapping_mul(1_000_003) ^ n).bytes(len));
    out
}

/// Checks that `data` is a whole [`record`].
pub fn check_record(data: &[u8]) -> Result<(), String> {
    let end = data.iter().position(|b| *b == b'\n').ok_or("no header line")?;
    let header = std::str::from_utf8(&data[..end]).map_err(|_| "a header that is not text")?;
    let nums: Vec<u64> =
        header.strip_prefix("ovlstress ").unwrap_or("").split(' ').filter_map(|w| w.parse().ok()).collect();
    let [worker, n, len] = nums[..] else { return Err(format!("a bad header {header:?}")) };
    if data != record(worker, n, len as usize) {
        return Err(format!("{} bytes do not match their header {header:?}", data.len()));
    }
    Ok(())
}

/// The expected content of each worker's files, by worker, then file.
pub type Models = Vec<Vec<Vec<u8>>>;

/// What a worker owns, shared with whoever takes snapshots (to record the expected contents).
pub struct Owned {
    /// The worker's directory now (`wK` or `wK.moved`).
    pub dir: String,
    /// The expected content of `f0..f3`.
    pub models: Vec<Vec<u8>>,
}

/// Where each worker and the taker stand: the operation under way and since when.
#[derive(Default)]
pub struct Slot(Mutex<Option<(String, Instant)>>);

impl Slot {
    /// Notes that `what` starts now.
    pub fn begin(&self, what: String) {
        *self.0.lock().unwrap() = Some((what, Instant::now()));
    }

    /// Notes that the operation returned.
    pub fn end(&self) {
        *self.0.lock().unwrap() = None;
    }

    /// The operation under way and how long it has been running.
    pub fn busy(&self) -> Option<(String, std::time::Duration)> {
        self.0.lock().unwrap().as_ref().map(|(w, t)| (w.clone(), t.elapsed()))
    }
}

/// What the workers of one run share.
pub struct Shared {
    /// Held shared by every operation, exclusively while a snapshot is taken and recorded.
    pub gate: RwLock<()>,
    /// Set to end the run.
    pub stop: AtomicBool,
    /// The first failure.
    pub failure: Mutex<Option<String>>,
    /// One per worker, then one for the taker.
    pub slots: Vec<Slot>,
}

impl Shared {
    /// Records a failure (the first one wins) and ends the run.
    pub fn fail(&self, what: String) {
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            *f = Some(what);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Operation counts of a worker.
#[derive(Default, Clone)]
pub struct Counts {
    /// Per kind of operation (see [`KINDS`]).
    pub ops: [u64; KINDS.len()],
    /// Errors explained by races in `shared/` (ENOENT, EEXIST, ENOTEMPTY).
    pub races: u64,
    /// Bytes written and read back.
    pub written: u64,
    /// Bytes read and compared.
    pub read: u64,
}

impl Counts {
    /// Adds `other` in.
    pub fn add(&mut self, other: &Counts) {
        for (a, b) in self.ops.iter_mut().zip(other.ops) {
            *a += b;
        }
        self.races += other.races;
        self.written += other.written;
        self.read += other.read;
    }
}

/// The kinds of operations, with their weights.
pub const KINDS: [(&str, u64); 14] = [
    ("write", 28),
    ("read", 18),
    ("truncate", 6),
    ("verify", 4),
    ("fsync", 2),
    ("reopen", 5),
    ("mvdir", 1),
    ("publish", 9),
    ("rename", 6),
    ("unlink", 5),
    ("readback", 8),
    ("mvshared", 2),
    ("mkdir", 3),
    ("listing", 3),
];

/// Why an operation failed the run.
type Fail = String;

/// One worker.
pub struct Worker {
    id: u64,
    rng: Rng,
    mnt: PathBuf,
    owned: Arc<Mutex<Owned>>,
    fds: Vec<Option<File>>,
    shared: Arc<Shared>,
    seq: u64,
    /// The weight of each kind of operation ([`KINDS`], zero for those left out).
    weights: Vec<u64>,
    /// What it did.
    pub counts: Counts,
}

impl Worker {
    /// Worker `id` on the mount `mnt`, owning `owned`, making no operation of the kinds `skip`.
    pub fn new(
        id: u64,
        seed: u64,
        mnt: PathBuf,
        owned: Arc<Mutex<Owned>>,
        shared: Arc<Shared>,
        skip: &[String],
    ) -> Worker {
        let fds = (0..FILES).map(|_| None).collect();
        let weights = KINDS.iter().map(|(k, w)| if skip.iter().any(|s| s == k) { 0 } else { *w }).collect();
        Worker {
            weights,
            id,
            rng: Rng::new(seed ^ id.wrapping_mul(0x0051_7cc1)),
            mnt,
            owned,
            fds,
            shared,
            seq: 0,
            counts: Counts::default(),
        }
    }

    /// Runs operations until the run stops, then checks every owned file one last time.
    pub fn run(mut self) -> Counts {
        let total: u64 = self.weights.iter().sum();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let mut roll = self.rng.below(total);
            let mut kind = 0;
            for (k, w) in self.weights.iter().enumerate() {
                if roll < *w {
                    kind = k;
                    break;
                }
                roll -= w;
            }
            let shared = self.shared.clone();
            let result = {
                let _gate = shared.gate.read().unwrap();
                self.op(kind)
            };
            self.shared.slots[self.id as usize].end();
            match result {
                Ok(()) => self.counts.ops[kind] += 1,
                Err(e) => {
                    self.shared.fail(format!("worker {}: {e}", self.id));
                    break;
                }
            }
        }
        self.fds.clear();
        if self.shared.failure.lock().unwrap().is_none() {
            for i in 0..FILES {
                if let Err(e) = self.verify(i) {
                    self.shared.fail(format!("worker {} at the end: {e}", self.id));
                }
                self.shared.slots[self.id as usize].end();
            }
        }
        self.counts
    }

    fn begin(&self, what: String) {
        self.shared.slots[self.id as usize].begin(what);
    }

    /// The path of owned file `i` now.
    fn path(&self, i: usize) -> PathBuf {
        self.mnt.join(&self.owned.lock().unwrap().dir).join(format!("f{i}"))
    }

    fn fd(&mut self, i: usize) -> Result<&File, Fail> {
        if self.fds[i].is_none() {
            let p = self.path(i);
            self.begin(format!("open {}", p.display()));
            let f =
                OpenOptions::new().read(true).write(true).open(&p).map_err(|e| format!("open {}: {e}", p.display()))?;
            self.fds[i] = Some(f);
        }
        Ok(self.fds[i].as_ref().expect("opened above"))
    }

    fn op(&mut self, kind: usize) -> Result<(), Fail> {
        let i = self.rng.below(FILES as u64) as usize;
        match KINDS[kind].0 {
            "write" => self.write(i),
            "read" => self.read(i),
            "truncate" => self.truncate(i),
            "verify" => self.verify(i),
            "fsync" => {
                self.begin(format!("fsync f{i}"));
                let f = self.fd(i)?;
                f.sync_all().map_err(|e| format!("fsync f{i}: {e}"))
            }
            "reopen" => {
                self.fds[i] = None;
                Ok(())
            }
            "mvdir" => self.move_dir(),
            "publish" => self.publish(),
            "rename" => self.rename_shared(),
            "unlink" => self.unlink_shared(),
            "readback" => self.read_shared(),
            "mvshared" => self.move_shared_dir(),
            "mkdir" => self.mkdir_shared(),
            _ => self.list_shared(),
        }
    }

    fn write(&mut self, i: usize) -> Result<(), Fail> {
        let len = 1 + self.rng.below(64 << 10) as usize;
        let off = self.rng.below(MAX_SIZE - len as u64);
        let data = self.rng.bytes(len);
        self.begin(format!("pwrite {len} bytes at {off} of f{i}"));
        self.fd(i)?.write_all_at(&data, off).map_err(|e| format!("pwrite {len} at {off} of f{i}: {e}"))?;
        let mut owned = self.owned.lock().unwrap();
        let model = &mut owned.models[i];
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        self.counts.written += len as u64;
        Ok(())
    }

    fn read(&mut self, i: usize) -> Result<(), Fail> {
        let len = 1 + self.rng.below(128 << 10) as usize;
        let size = self.owned.lock().unwrap().models[i].len() as u64;
        let off = self.rng.below(size + 4096);
        self.begin(format!("pread {len} bytes at {off} of f{i}"));
        let mut buf = vec![0u8; len];
        let mut got = 0;
        let f = self.fd(i)?;
        while got < len {
            match f.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("pread {len} at {off} of f{i}: {e}")),
            }
        }
        let owned = self.owned.lock().unwrap();
        let model = &owned.models[i];
        let want = &model[(off as usize).min(model.len())..(off as usize + len).min(model.len())];
        self.counts.read += got as u64;
        compare(want, &buf[..got], off, &format!("pread {len} at {off} of {}/f{i}", owned.dir))
    }

    fn truncate(&mut self, i: usize) -> Result<(), Fail> {
        let size = self.rng.below(MAX_SIZE);
        self.begin(format!("ftruncate f{i} to {size}"));
        self.fd(i)?.set_len(size).map_err(|e| format!("ftruncate f{i} to {size}: {e}"))?;
        self.owned.lock().unwrap().models[i].resize(size as usize, 0);
        Ok(())
    }

    /// Reads owned file `i` whole through a fresh descriptor and compares.
    fn verify(&mut self, i: usize) -> Result<(), Fail> {
        let p = self.path(i);
        self.begin(format!("read all of {}", p.display()));
        let data = fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
        self.counts.read += data.len() as u64;
        let owned = self.owned.lock().unwrap();
        compare(&owned.models[i], &data, 0, &format!("the whole of {}/f{i}", owned.dir))
    }

    /// Moves the worker's own directory between its two names; its descriptors stay open.
    fn move_dir(&mut self) -> Result<(), Fail> {
        let mut owned = self.owned.lock().unwrap();
        let to = if owned.dir.ends_with(".moved") { format!("w{}", self.id) } else { format!("w{}.moved", self.id) };
        self.shared.slots[self.id as usize].begin(format!("mv {} {to}", owned.dir));
        fs::rename(self.mnt.join(&owned.dir), self.mnt.join(&to)).map_err(|e| format!("mv {} {to}: {e}", owned.dir))?;
        owned.dir = to;
        Ok(())
    }

    fn shared_path(&self, name: &str) -> PathBuf {
        self.mnt.join("shared").join(name)
    }

    /// A name in `shared/` that workers publish to (a small pool, so that they meet).
    fn pick_name(&mut self) -> String {
        match self.rng.below(4) {
            0 => format!("ld{}/p{}", self.rng.below(SHARED_DIRS + 1), self.rng.below(8)),
            _ => format!("p{}", self.rng.below(48)),
        }
    }

    /// Whether an error is one that races between workers explain.
    fn race(&mut self, e: &std::io::Error) -> bool {
        let raced = matches!(e.raw_os_error(), Some(2 | 17 | 39)); // ENOENT, EEXIST, ENOTEMPTY
        self.counts.races += u64::from(raced);
        raced
    }

    /// Writes a record under a temporary name, then renames it to a published name.
    fn publish(&mut self) -> Result<(), Fail> {
        self.seq += 1;
        let tmp = self.shared_path(&format!("tmp-{}-{}", self.id, self.seq));
        let len = self.rng.below(32 << 10) as usize;
        let data = record(self.id, self.seq, len);
        self.begin(format!("create and write {}", tmp.display()));
        File::create(&tmp).and_then(|mut f| f.write_all(&data)).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        let name = self.pick_name();
        self.begin(format!("mv {} shared/{name}", tmp.display()));
        match fs::rename(&tmp, self.shared_path(&name)) {
            Ok(()) => Ok(()),
            Err(e) if self.race(&e) => fs::remove_file(&tmp).map_err(|e| format!("rm {}: {e}", tmp.display())),
            Err(e) => Err(format!("mv {} shared/{name}: {e}", tmp.display())),
        }
    }

    fn rename_shared(&mut self) -> Result<(), Fail> {
        let (a, b) = (self.pick_name(), self.pick_name());
        self.begin(format!("mv shared/{a} shared/{b}"));
        match fs::rename(self.shared_path(&a), self.shared_path(&b)) {
            Err(e) if !self.race(&e) => Err(format!("mv shared/{a} shared/{b}: {e}")),
            _ => Ok(()),
        }
    }

    fn unlink_shared(&mut self) -> Result<(), Fail> {
        let a = self.pick_name();
        self.begin(format!("rm shared/{a}"));
        match fs::remove_file(self.shared_path(&a)) {
            Err(e) if !self.race(&e) => Err(format!("rm shared/{a}: {e}")),
            _ => Ok(()),
        }
    }

    fn read_shared(&mut self) -> Result<(), Fail> {
        let a = self.pick_name();
        self.begin(format!("read shared/{a}"));
        match fs::read(self.shared_path(&a)) {
            Ok(data) => {
                self.counts.read += data.len() as u64;
                check_record(&data).map_err(|e| format!("shared/{a}: {e}"))
            }
            Err(e) if self.race(&e) => Ok(()),
            Err(e) => Err(format!("read shared/{a}: {e}")),
        }
    }

    /// Renames one of the directories `shared/ldN` (from the lower layers at first) to another.
    fn move_shared_dir(&mut self) -> Result<(), Fail> {
        let (a, b) = (self.rng.below(SHARED_DIRS + 1), self.rng.below(SHARED_DIRS + 1));
        self.begin(format!("mv shared/ld{a} shared/ld{b}"));
        match fs::rename(self.shared_path(&format!("ld{a}")), self.shared_path(&format!("ld{b}"))) {
            Err(e) if !self.race(&e) => Err(format!("mv shared/ld{a} shared/ld{b}: {e}")),
            _ => Ok(()),
        }
    }

    fn mkdir_shared(&mut self) -> Result<(), Fail> {
        let d = format!("e{}", self.rng.below(8));
        let (what, r) = if self.rng.below(2) == 0 {
            self.begin(format!("mkdir shared/{d}"));
            ("mkdir", fs::create_dir(self.shared_path(&d)))
        } else {
            self.begin(format!("rmdir shared/{d}"));
            ("rmdir", fs::remove_dir(self.shared_path(&d)))
        };
        match r {
            Err(e) if !self.race(&e) => Err(format!("{what} shared/{d}: {e}")),
            _ => Ok(()),
        }
    }

    /// Lists `shared/` and checks every record it shows (names may go away meanwhile).
    fn list_shared(&mut self) -> Result<(), Fail> {
        self.begin("list shared/".into());
        let dir = self.mnt.join("shared");
        let names = fs::read_dir(&dir).map_err(|e| format!("readdir shared/: {e}"))?;
        for entry in names {
            let entry = entry.map_err(|e| format!("readdir shared/: {e}"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('p') {
                match fs::read(entry.path()) {
                    Ok(data) => check_record(&data).map_err(|e| format!("shared/{name}: {e}"))?,
                    Err(e) if self.race(&e) => {}
                    Err(e) => return Err(format!("read shared/{name}: {e}")),
                }
            }
        }
        Ok(())
    }
}

/// Compares what was read with what the model expects; the error says where they differ.
fn compare(want: &[u8], got: &[u8], off: u64, what: &str) -> Result<(), Fail> {
    if want == got {
        return Ok(());
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    let show = |d: &[u8]| format!("{:02x?}", &d[at.min(d.len())..(at + 8).min(d.len())]);
    Err(format!(
        "DATA MISMATCH in {what}: want {} bytes, got {}; first difference at file offset {}: want {} got {}",
        want.len(),
        got.len(),
        off + at as u64,
        show(want),
        show(got)
    ))
}

/// Fills a fresh layout for `workers` workers: owned files in `bottom` (and `top` overriding
/// `f1` and adding a file, making `wK` a merged dir when they differ), shared records and the
/// dirs `shared/ldN` in both. Returns the expected content of each worker's files.
pub fn populate(top: &Path, bottom: &Path, workers: u64, seed: u64) -> std::io::Result<Models> {
    let mut rng = Rng::new(seed);
    let mut models = Vec::new();
    for k in 0..workers {
        let (b, t) = (bottom.join(format!("w{k}")), top.join(format!("w{k}")));
        fs::create_dir_all(&b)?;
        fs::create_dir_all(&t)?;
        let mut files = Vec::new();
        for i in 0..FILES {
            let len = rng.below(256 << 10) as usize;
            let data = rng.bytes(len);
            fs::write(b.join(format!("f{i}")), &data)?;
            files.push(data);
        }
        let len = rng.below(64 << 10) as usize;
        files[1] = rng.bytes(len);
        fs::write(t.join("f1"), &files[1])?;
        fs::write(t.join("extra"), b"from the top layer\n")?;
        models.push(files);
    }
    for (layer, base) in [(bottom, 1000), (top, 2000)] {
        for d in 0..SHARED_DIRS {
            let dir = layer.join(format!("shared/ld{d}"));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join(format!("p{}", base % 7)), record(base, d, 1000 + d as usize))?;
        }
        for n in 0..8 {
            fs::write(layer.join(format!("shared/p{}", n * 5 + base / 1000)), record(base, 100 + n, 5000))?;
        }
    }
    Ok(models)
}
