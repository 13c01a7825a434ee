//! fsx-style writers on LIVE files of an ovlsnap mount (issue 16, item 8): one thread per file
//! rewrites it at random with buffered `pwrite`s, `O_DIRECT` writes in 4 KiB units, truncates
//! to a multiple of 4 KiB, and stores through a shared mapping (`msync`ed), and reads ranges
//! back (through `O_DIRECT` when that I/O is on), each checked against the file's model.
//!
//! Every operation holds the run's gate shared, as the other workers' do, so a take that holds
//! it exclusively sees the files exactly as their models say; the taker records the models then.
//! The files are `fsxN` in LIVE's root; `--fsx-size` is the size they start with and the
//! largest they grow to, and `--fsx-io` chooses the kinds of I/O (fsx `-Z` is
//! `--fsx-io direct`).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::sys::SharedMap;
use super::worker::{Rng, Shared};

/// The unit of `O_DIRECT` I/O and of truncates, as fsx `-Z` uses.
pub const UNIT: usize = 4096;

/// The kinds of I/O an fsx writer may use (`--fsx-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Io {
    /// `O_DIRECT` writes and reads in 4 KiB units.
    Direct,
    /// Buffered `pwrite`s of 1 byte to 128 KiB at any offset.
    Buffered,
    /// Stores through a shared mapping of the file, then `msync`.
    Mmap,
}

/// The expected content of each fsx file, shared by its writer and the taker.
pub type Model = Arc<Mutex<Vec<u8>>>;

/// The name of fsx file `k` in LIVE's root.
pub fn name(k: usize) -> String {
    format!("fsx{k}")
}

/// Operation counts of the fsx writers.
#[derive(Default, Clone, Copy)]
pub struct FsxCounts {
    /// Buffered writes, `O_DIRECT` writes, stores through a mapping, truncates, reads checked.
    pub ops: [u64; 5],
}

/// The names of [`FsxCounts::ops`].
pub const OPS: [&str; 5] = ["buffered", "direct", "mmap", "truncate", "read"];

impl FsxCounts {
    /// Adds `o` in.
    pub fn add(&mut self, o: &FsxCounts) {
        for (a, b) in self.ops.iter_mut().zip(o.ops) {
            *a += b;
        }
    }
}

/// Writes `n` files of `size` random bytes into `live`; returns their models.
pub fn populate(live: &Path, n: usize, size: usize, seed: u64) -> std::io::Result<Vec<Model>> {
    let mut rng = Rng::new(seed ^ 0x0f5f_0f5f);
    (0..n)
        .map(|k| {
            let data = rng.bytes(size);
            std::fs::write(live.join(name(k)), &data)?;
            Ok(Arc::new(Mutex::new(data)))
        })
        .collect()
}

/// A buffer of `len` bytes aligned for `O_DIRECT` (a slice of a larger vector).
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + UNIT];
        let start = buf.as_ptr().align_offset(UNIT);
        Aligned { buf, start, len }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// One fsx writer: its file (two descriptors) and model.
pub struct Writer {
    /// Its index among the fsx files.
    k: usize,
    /// Its slot in [`Shared::slots`].
    slot: usize,
    model: Model,
    buffered: File,
    direct: File,
    rng: Rng,
    io: Vec<Io>,
    max: usize,
    shared: Arc<Shared>,
    counts: FsxCounts,
}

type Fail = String;

impl Writer {
    /// The writer of fsx file `k` under `mnt`, reporting in slot `slot`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        k: usize,
        slot: usize,
        mnt: &Path,
        model: Model,
        seed: u64,
        io: &[Io],
        max: usize,
        shared: Arc<Shared>,
    ) -> std::io::Result<Writer> {
        let path = mnt.join(name(k));
        let open = |flags: i32| OpenOptions::new().read(true).write(true).custom_flags(flags).open(&path);
        let (buffered, direct) = (open(0)?, open(libc::O_DIRECT)?);
        let rng = Rng::new(seed ^ (k as u64 + 1).wrapping_mul(0x0f5c_0ffe));
        let io = io.to_vec();
        Ok(Writer { k, slot, model, buffered, direct, rng, io, max, shared, counts: FsxCounts::default() })
    }

    /// Runs operations until the run stops; then checks the whole file once.
    pub fn run(mut self) -> FsxCounts {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let shared = self.shared.clone();
            let result = {
                let _gate = shared.gate.read().unwrap();
                self.op()
            };
            self.shared.slots[self.slot].end();
            if let Err(e) = result {
                self.shared.fail(format!("fsx writer {}: {e}", name(self.k)));
                return self.counts;
            }
        }
        if self.shared.failure.lock().unwrap().is_none() {
            if let Err(e) = self.check_all() {
                self.shared.fail(format!("fsx writer {} at the end: {e}", name(self.k)));
            }
        }
        self.counts
    }

    fn begin(&self, what: String) {
        self.shared.slots[self.slot].begin(format!("{what} of {}", name(self.k)));
    }

    fn op(&mut self) -> Result<(), Fail> {
        let model = self.model.clone();
        let mut model = model.lock().unwrap();
        let direct = self.io.contains(&Io::Direct);
        // One in five a truncate, one in five a read, the rest a write of a kind allowed.
        match self.rng.below(10) {
            0 | 1 => self.truncate(&mut model),
            2 | 3 => self.read(&model, direct),
            _ => match self.io[self.rng.below(self.io.len() as u64) as usize] {
                Io::Direct => self.write_direct(&mut model),
                Io::Buffered => self.write_buffered(&mut model),
                Io::Mmap if !model.is_empty() => self.store_mapped(&mut model),
                Io::Mmap => self.write_buffered(&mut model),
            },
        }
    }

    fn truncate(&mut self, model: &mut Vec<u8>) -> Result<(), Fail> {
        let to = self.rng.below((self.max / UNIT) as u64 + 1) as usize * UNIT;
        self.begin(format!("ftruncate to {to}"));
        self.direct.set_len(to as u64).map_err(|e| format!("ftruncate to {to}: {e}"))?;
        model.resize(to, 0);
        self.counts.ops[3] += 1;
        Ok(())
    }

    fn write_direct(&mut self, model: &mut Vec<u8>) -> Result<(), Fail> {
        let units = 1 + self.rng.below(16) as usize;
        let at = self.rng.below((self.max / UNIT - units) as u64 + 1) as usize * UNIT;
        let mut buf = Aligned::new(units * UNIT);
        let bytes = self.rng.bytes(units * UNIT);
        buf.get().copy_from_slice(&bytes);
        self.begin(format!("O_DIRECT pwrite {} at {at}", units * UNIT));
        self.direct
            .write_all_at(buf.get(), at as u64)
            .map_err(|e| format!("O_DIRECT pwrite {} at {at}: {e}", units * UNIT))?;
        put(model, at, &bytes);
        self.counts.ops[1] += 1;
        Ok(())
    }

    fn write_buffered(&mut self, model: &mut Vec<u8>) -> Result<(), Fail> {
        let len = 1 + self.rng.below(128 << 10) as usize;
        let at = self.rng.below((self.max - len) as u64 + 1) as usize;
        let bytes = self.rng.bytes(len);
        self.begin(format!("pwrite {len} at {at}"));
        self.buffered.write_all_at(&bytes, at as u64).map_err(|e| format!("pwrite {len} at {at}: {e}"))?;
        put(model, at, &bytes);
        self.counts.ops[0] += 1;
        Ok(())
    }

    fn store_mapped(&mut self, model: &mut [u8]) -> Result<(), Fail> {
        let size = model.len();
        let at = self.rng.below(size as u64) as usize;
        let len = 1 + self.rng.below((size - at).min(64 << 10) as u64) as usize;
        let bytes = self.rng.bytes(len);
        self.begin(format!("store {len} at {at} through a mapping"));
        let mut map = SharedMap::new(&self.buffered, size).map_err(|e| format!("mmap {size}: {e}"))?;
        map.store(at, &bytes).map_err(|e| format!("msync after a store of {len} at {at}: {e}"))?;
        model[at..at + len].copy_from_slice(&bytes);
        self.counts.ops[2] += 1;
        Ok(())
    }

    /// Reads a random range (4 KiB units through `O_DIRECT` when `direct`) and compares.
    fn read(&mut self, model: &[u8], direct: bool) -> Result<(), Fail> {
        let units = 1 + self.rng.below(32) as usize;
        let at = self.rng.below((model.len() / UNIT) as u64 + 2) as usize * UNIT;
        let mut buf = Aligned::new(units * UNIT);
        let what = format!("{}pread {} at {at}", if direct { "O_DIRECT " } else { "" }, units * UNIT);
        self.begin(what.clone());
        let f = if direct { &self.direct } else { &self.buffered };
        let mut got = 0;
        while got < units * UNIT {
            match f.read_at(&mut buf.get()[got..], (at + got) as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        let want = &model[at.min(model.len())..(at + units * UNIT).min(model.len())];
        self.counts.ops[4] += 1;
        compare(want, &buf.get()[..got], &format!("{what} of LIVE {}", name(self.k)))
    }

    /// Reads the whole file through a fresh descriptor and compares.
    fn check_all(&mut self) -> Result<(), Fail> {
        let path = format!("/proc/self/fd/{}", self.buffered.as_raw_fd());
        self.begin("read all".into());
        let got = std::fs::read(&path).map_err(|e| format!("read all: {e}"))?;
        compare(&self.model.lock().unwrap(), &got, &format!("the whole of LIVE {}", name(self.k)))
    }
}

/// Writes `bytes` into `model` at `at`, growing it with zeros as a file grows.
fn put(model: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if model.len() < at + bytes.len() {
        model.resize(at + bytes.len(), 0);
    }
    model[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Where `got` differs from `want`, if it does.
pub fn compare(want: &[u8], got: &[u8], what: &str) -> Result<(), Fail> {
    if want == got {
        return Ok(());
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    let prefix = got.len() < want.len() && want.starts_with(got);
    Err(format!(
        "DATA MISMATCH in {what}: {} bytes where {} were expected, first difference at byte {at}{}",
        got.len(),
        want.len(),
        if prefix { " (an exact prefix of what was expected)" } else { "" }
    ))
}
