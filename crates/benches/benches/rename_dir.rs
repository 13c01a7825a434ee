//! rename(2) of a directory through a real `ovlfs` mount (the built binary) over 10 lower layers
//! with `redirect_dir=on` (issue 3: O(1) in the number of entries below it). The directory `d`
//! holds N = 100 or 10,000 files spread over all ten layers and ten merged subdirectories.
//!
//! - `first`: the first rename of `d`, which copies up `d` itself (metadata only), sets its
//!   `overlay.redirect` and leaves a whiteout. Every iteration gets a fresh upper layer and a
//!   fresh mount (untimed); the names are looked up before the timer starts, so only the
//!   `RENAME` is timed, not the lookup of `d` through ten layers.
//! - `again`: `d` renamed to `e` and back, one rename(2) per iteration, once `d` is in the
//!   upper layer.
//!
//! Before timing, the setup checks the O(1) claim without a clock: after the rename the upper
//! layer holds the renamed directory, empty, and a whiteout, nothing else (also
//! `tests/rename_dir.rs`).

use std::path::Path;
use std::time::{Duration, Instant};

use benches::{OvlfsMount, TempLayers, ovlfs_bin, spread_tree, upper_after_rename};
use criterion::{BenchmarkId, Criterion, SamplingMode};

const LOWERS: usize = 10;

fn rename_dirs(c: &mut Criterion) {
    let bin = ovlfs_bin();
    let quick = std::env::args().any(|a| a == "--quick");
    let mut group = c.benchmark_group("rename_dir");
    group.sample_size(10);
    for n in [100usize, 10_000] {
        let layers = TempLayers::new(LOWERS);
        spread_tree(&layers, "d", n);
        let mnt = layers.scratch().join("mnt");
        std::fs::create_dir(&mnt).expect("a mount point");
        let options = layers.options("redirect_dir=on");
        let mount_fresh = || {
            layers.reset_upper();
            OvlfsMount::new(&bin, &options, &mnt)
        };

        {
            let m = mount_fresh();
            std::fs::rename(m.path().join("d"), m.path().join("e")).expect("rename d e");
            assert_eq!(upper_after_rename(layers.upper(), "d", "e"), Ok(()), "N = {n}");
        }

        // Each iteration mounts anew (about 10 ms), so the measured time is small against the
        // wall time. A full run sizes its iterations by measured time: a short budget with flat
        // sampling keeps it to a few hundred mounts. `--quick` stops at the budget in wall time
        // instead, so it gets a longer one.
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_millis(20));
        group.measurement_time(if quick { Duration::from_secs(4) } else { Duration::from_millis(100) });
        group.bench_function(BenchmarkId::new("first", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let m = mount_fresh();
                    let (from, to) = (m.path().join("d"), m.path().join("e"));
                    let _ = std::fs::symlink_metadata(&from).expect("d is there");
                    let _ = std::fs::symlink_metadata(&to).expect_err("e is not");
                    // The rename fsyncs the upper dir: commit the setup's changes first, so
                    // that the journal commit it waits for holds only its own.
                    rustix::fs::syncfs(std::fs::File::open(layers.upper()).expect("the upper dir")).expect("syncfs");
                    total += timed_rename(&from, &to);
                }
                total
            })
        });

        group.sampling_mode(SamplingMode::Auto);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(2));
        let m = mount_fresh();
        let mut names = (m.path().join("d"), m.path().join("e"));
        std::fs::rename(&names.0, &names.1).expect("the first rename");
        std::mem::swap(&mut names.0, &mut names.1);
        group.bench_function(BenchmarkId::new("again", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += timed_rename(&names.0, &names.1);
                    std::mem::swap(&mut names.0, &mut names.1);
                }
                total
            })
        });
    }
    group.finish();
}

fn timed_rename(from: &Path, to: &Path) -> Duration {
    let start = Instant::now();
    std::fs::rename(from, to).expect("rename");
    start.elapsed()
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    rename_dirs(&mut criterion);
    criterion.final_summary();
}
