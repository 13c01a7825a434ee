//! `ovl_copyup::copy_up` of a regular file from the lower layer into the upper root: 4 KiB and
//! 64 MiB, durable (data and parent fsynced, as the kernel does) and with `volatile` (no fsync).
//! Each copy is deleted again between iterations, untimed. On a filesystem with reflink (XFS,
//! btrfs) the large copy is a clone; on ext4 (the temp dir here) it is `copy_file_range`.

use std::path::Path;
use std::time::{Duration, Instant};

use benches::{TempLayers, write_data};
use criterion::{BenchmarkId, Criterion, Throughput};
use ovl_copyup::{Source, copy_up};

fn copy_ups(c: &mut Criterion) {
    let layers = TempLayers::new(1);
    let sizes = [("small_4k", 4usize << 10), ("large_64m", 64 << 20)];
    for (name, size) in sizes {
        write_data(&layers.lower(0).join(name), size);
    }
    let mut group = c.benchmark_group("copy_up");
    group.sample_size(10);
    for (mode, extra) in [("durable", ""), ("volatile", "volatile")] {
        let stack = layers.open_writable(extra);
        for (name, size) in sizes {
            let src = Source { layer: stack.lowers()[0].id(), path: name.into() };
            let copied = layers.upper().join(name);
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(name, mode), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        copy_up(&stack, &src, Path::new(""), &|_| {}).expect("copy-up");
                        total += start.elapsed();
                        std::fs::remove_file(&copied).expect("remove the copy");
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    copy_ups(&mut criterion);
    criterion.final_summary();
}
