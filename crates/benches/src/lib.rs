//! Criterion benchmarks of ovlsnap's hot paths (issue 7): lookup through 1 and 10 layers,
//! merged readdir, whiteout creation, copy-up small and large. Run them with
//! `cargo bench -p benches` (or `-- --quick` for a fast pass); each file in `benches/` is one
//! area. Not measured yet, because the code does not exist yet: origin handle encode/decode
//! (ovl-core has no origin API so far) and the snapshot copy-on-write check (snap-fs, issue 5).
//!
//! This crate owns only measurements; it must not hold logic the filesystem needs. The library
//! part is the fixture the benches share: real layer directories in a temp dir, opened as an
//! [`ovl_core::LayerStack`] exactly as a mount would open them. The side-by-side comparison
//! with the kernel overlay and fuse-overlayfs lives in `xtask` (`cargo xtask bench-compare`).
//!
//! ```no_run
//! let layers = benches::TempLayers::new(2);
//! std::fs::write(layers.lower(1).join("file"), b"bottom").unwrap();
//! let stack = layers.open_read_only();
//! assert_eq!(stack.lowers().len(), 2);
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use ovl_core::{LayerStack, MountOptions};
use tempfile::TempDir;

/// Lower layers (top first), an upper and a work dir in a fresh temp dir, removed on drop.
pub struct TempLayers {
    // Held for its `Drop`, which deletes everything below.
    _dir: TempDir,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
}

impl TempLayers {
    /// `lowers` empty lower layers (at least one), an empty upper and work dir.
    ///
    /// # Panics
    /// When the temp dir cannot be made: a bench cannot run without it.
    pub fn new(lowers: usize) -> TempLayers {
        assert!(lowers > 0, "an overlay needs a lower layer");
        let dir = tempfile::Builder::new().prefix("ovl-bench").tempdir().expect("a temp dir");
        let lowers: Vec<PathBuf> = (0..lowers).map(|i| dir.path().join(format!("lower{i}"))).collect();
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        for path in lowers.iter().chain([&upper, &work]) {
            fs::create_dir(path).expect("a layer dir");
        }
        TempLayers { _dir: dir, lowers, upper, work }
    }

    /// Lower layer `i` (0 is the top).
    pub fn lower(&self, i: usize) -> &Path {
        &self.lowers[i]
    }

    /// The upper layer.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The stack of the lower layers only (a read-only overlay).
    ///
    /// # Panics
    /// When the stack does not open.
    pub fn open_read_only(&self) -> LayerStack {
        self.open(&format!("lowerdir={}", self.lowerdir()))
    }

    /// The stack with the upper and work dir; `extra` options are appended (e.g. `volatile`).
    ///
    /// # Panics
    /// When the stack does not open.
    pub fn open_writable(&self, extra: &str) -> LayerStack {
        let mut options =
            format!("lowerdir={},upperdir={},workdir={}", self.lowerdir(), self.upper.display(), self.work.display());
        if !extra.is_empty() {
            options.push(',');
            options.push_str(extra);
        }
        self.open(&options)
    }

    fn lowerdir(&self) -> String {
        self.lowers.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(":")
    }

    fn open(&self, options: &str) -> LayerStack {
        let options = MountOptions::parse(options).expect("valid options");
        LayerStack::open(&options).expect("the stack opens")
    }
}

/// Writes `count` files named `{prefix}{index:05}` of `size` bytes into `dir` (created if needed),
/// for indexes `start..start + count`.
///
/// # Panics
/// On any I/O error.
pub fn fill(dir: &Path, prefix: &str, start: usize, count: usize, size: usize) {
    fs::create_dir_all(dir).expect("a dir to fill");
    let content = vec![b'b'; size];
    for i in start..start + count {
        fs::write(dir.join(format!("{prefix}{i:05}")), &content).expect("a file");
    }
}

/// Writes a file of `size` bytes of non-repeating data (not sparse, not zeroes).
///
/// # Panics
/// On any I/O error.
pub fn write_data(path: &Path, size: usize) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    fs::write(path, data).expect("a data file");
}
