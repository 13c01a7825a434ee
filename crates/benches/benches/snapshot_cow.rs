//! The snapshot copy-on-write check a write pays after a take, through snap-fs's public
//! `Snapper` (the live overlay's `ChangeHook`) on a real LIVE dir and store, without a mount:
//!
//! - `saved_node_check`: a write to a node already saved in the current generation. This is
//!   ovl-fs's fast path (`OverlayFs::gate_for` + `hook_modify`, crate-private, so repeated here
//!   step by step against the public hook): compare the node's mark with the generation, enter
//!   the quiet gate (a shared lock), compare again, leave.
//! - `hook_asked_again`: what the generation mark saves: `before_modify` of a file the layer
//!   already holds (lstat in LIVE, the walk of the snapshot layer, an inode compare).
//! - `first_write_4k`: the first write to a 4 KiB file after a take: the full gate (views lock,
//!   the settling of renames at its end) and `before_modify`, which copies the file into the
//!   snapshot layer (built in the store's work dir, fsynced, renamed in). A take before each
//!   batch (untimed) makes every file unsaved again.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use benches::write_data;
use criterion::Criterion;
use ovl_fs::hook::ChangeHook;
use rustix::fs::{Mode, OFlags};
use snap_fs::snapper::Snapper;
use snap_fs::store::Store;

/// A LIVE dir and its store (outside LIVE, on the same filesystem) in a temp dir.
struct Live {
    _dir: tempfile::TempDir,
    path: PathBuf,
    snapper: Snapper,
    takes: u64,
}

impl Live {
    fn new() -> Live {
        let dir = tempfile::Builder::new().prefix("ovl-bench-snap").tempdir().expect("a temp dir");
        let path = std::fs::canonicalize(dir.path()).expect("canonical").join("live");
        std::fs::create_dir(&path).expect("LIVE");
        let fd = rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("LIVE opens");
        let store = Store::open(fd.as_fd(), &path, Some(&dir.path().join("store"))).expect("the store opens");
        let snapper = Snapper::new(fd, path.clone(), store, Vec::new()).expect("the snapshot state");
        Live { _dir: dir, path, snapper, takes: 0 }
    }

    /// Takes a snapshot: a new generation, in which nothing is saved yet.
    fn take(&mut self) {
        self.takes += 1;
        self.snapper.take(&format!("s{}", self.takes)).expect("take");
    }
}

fn file(i: u64) -> PathBuf {
    PathBuf::from(format!("f{i:06}"))
}

fn cow_checks(c: &mut Criterion) {
    let mut live = Live::new();
    write_data(&live.path.join(file(0)), 4096);
    live.take();
    let hook: &dyn ChangeHook = &live.snapper;
    let mut group = c.benchmark_group("snapshot_cow");

    // The node's mark as ovl-fs keeps it: set once its first change was told in this generation.
    let hooked = AtomicU64::new(0);
    {
        let _gate = hook.gate(false);
        hook.before_modify(&file(0)).expect("the first change saves f000000");
        hooked.store(hook.generation(), Ordering::Release);
    }
    group.bench_function("saved_node_check", |b| {
        b.iter(|| {
            // gate_for
            let quiet = hooked.load(Ordering::Acquire) == hook.generation();
            let gate = hook.gate(quiet);
            assert!(quiet && hooked.load(Ordering::Acquire) == hook.generation());
            // hook_modify
            let generation = hook.generation();
            assert!(generation == 0 || hooked.load(Ordering::Acquire) == generation);
            drop(gate);
        })
    });
    group.bench_function("hook_asked_again", |b| {
        b.iter(|| {
            let _gate = hook.gate(false);
            hook.before_modify(&file(0)).expect("before_modify")
        })
    });

    // Files f1.. are made as batches need them and stay; each batch starts with a take.
    let mut files = 1u64;
    group.bench_function("first_write_4k", |b| {
        b.iter_custom(|iters| {
            while files <= iters {
                write_data(&live.path.join(file(files)), 4096);
                files += 1;
            }
            live.take();
            let hook: &dyn ChangeHook = &live.snapper;
            let mut total = Duration::ZERO;
            for i in 1..=iters {
                let path = file(i);
                let start = Instant::now();
                let gate = hook.gate(false);
                hook.before_modify(&path).expect("the first change saves the file");
                drop(gate);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
    assert!(saved(&live, &file(1)), "the first write copied the file into the newest layer");
}

/// Whether the newest snapshot's layer holds `name` (as a regular file).
fn saved(live: &Live, name: &Path) -> bool {
    let layers = live.path.with_file_name("store").join("layers");
    let newest = std::fs::read_dir(&layers)
        .expect("the layers")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .expect("a layer");
    layers.join(newest.to_string()).join(name).is_file()
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    cow_checks(&mut criterion);
    criterion.final_summary();
}
