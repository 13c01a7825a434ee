//! Criterion benchmarks of ovlsnap's hot paths (issue 7): lookup through 1 and 10 layers,
//! merged readdir, whiteout creation, copy-up small and large, `overlay.origin` encoding and
//! following, the snapshot copy-on-write check, and directory rename through a real `ovlfs`
//! mount over 10 lower layers (issue 3). Run them with `cargo bench -p benches` (or
//! `-- --quick` for a fast pass); each file in `benches/` is one area, and `tests/` holds the
//! checks that do not need a clock (a renamed directory's children stay in the lower layers).
//!
//! This crate owns only measurements; it must not hold logic the filesystem needs. The library
//! part is the fixture the benches share: real layer directories in a temp dir, opened as an
//! [`ovl_core::LayerStack`] exactly as a mount would open them, or mounted by the built `ovlfs`
//! binary ([`OvlfsMount`]). The side-by-side comparison with the kernel overlay and
//! fuse-overlayfs lives in `xtask` (`cargo xtask bench-compare`).
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

pub use mount::{OvlfsMount, ovlfs_bin};

mod mount;

/// Lower layers (top first), an upper and a work dir in a fresh temp dir, removed on drop.
pub struct TempLayers {
    // Deletes everything below on drop.
    dir: TempDir,
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
        TempLayers { dir, lowers, upper, work }
    }

    /// Lower layer `i` (0 is the top).
    pub fn lower(&self, i: usize) -> &Path {
        &self.lowers[i]
    }

    /// The upper layer.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// Empties the upper layer and the work dir (new dirs, so that the upper root loses any
    /// xattr a mount set on it too), for a fresh mount of the same lower layers.
    ///
    /// # Panics
    /// On any I/O error, or when a mount still uses them.
    pub fn reset_upper(&self) {
        for path in [&self.upper, &self.work] {
            fs::remove_dir_all(path).expect("remove a layer dir");
            fs::create_dir(path).expect("a layer dir");
        }
    }

    /// The temp dir holding the layers, for anything else a bench needs beside them (a mount
    /// point).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `lowerdir=..,upperdir=..,workdir=..`, then `extra` options (e.g. `volatile`) if any.
    pub fn options(&self, extra: &str) -> String {
        let mut options =
            format!("lowerdir={},upperdir={},workdir={}", self.lowerdir(), self.upper.display(), self.work.display());
        if !extra.is_empty() {
            options.push(',');
            options.push_str(extra);
        }
        options
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
        self.open(&self.options(extra))
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

/// Builds a directory `name` holding `count` empty files spread over every lower layer: file `i`
/// is `name/s{j}/f{i:05}` in lower layer `i % lowers`, with `j = (i / lowers) % 10`. `name` and
/// its ten subdirectories exist in every layer, so both levels are merged directories.
///
/// # Panics
/// On any I/O error.
pub fn spread_tree(layers: &TempLayers, name: &str, count: usize) {
    let depth = layers.lowers.len();
    for layer in &layers.lowers {
        for j in 0..10 {
            fs::create_dir_all(layer.join(name).join(format!("s{j}"))).expect("a subdir");
        }
    }
    for i in 0..count {
        let path = layers.lowers[i % depth].join(name).join(format!("s{}", (i / depth) % 10)).join(format!("f{i:05}"));
        fs::write(path, b"").expect("a file");
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

/// Checks that `upper` holds exactly what an O(1) rename of the merged directory `from` to `to`
/// leaves (issue 3): `to`, a directory with an `overlay.redirect` and no entries (no child was
/// copied up), and a whiteout at `from`. The error says what differs.
pub fn upper_after_rename(upper: &Path, from: &str, to: &str) -> Result<(), String> {
    let mut names: Vec<String> = fs::read_dir(upper)
        .map_err(|e| format!("listing {upper:?}: {e}"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut want = vec![from.to_owned(), to.to_owned()];
    want.sort();
    if names != want {
        return Err(format!("the upper layer holds {names:?}, not {want:?}"));
    }
    let st = rustix::fs::lstat(upper.join(from)).map_err(|e| format!("lstat {from}: {e}"))?;
    if !ovl_core::is_whiteout_stat(&st) {
        return Err(format!("{from} in the upper layer is not a whiteout"));
    }
    let moved = upper.join(to);
    let children = fs::read_dir(&moved).map_err(|e| format!("listing {moved:?}: {e}"))?.count();
    if children != 0 {
        return Err(format!("{children} children of {to} were copied up"));
    }
    let mut buf = [0u8; 4096];
    rustix::fs::lgetxattr(&moved, "trusted.overlay.redirect", &mut buf)
        .map_err(|e| format!("{to} in the upper layer has no overlay.redirect: {e}"))?;
    Ok(())
}
