//! Whiteout creation: the bare `mknod` of a 0:0 character device (`ovl_core::make_whiteout`) and
//! the upper-layer operation around it (`ovl_copyup::whiteout`, which also resolves the parent
//! directory beneath the layer root). The whiteouts are removed between batches, untimed.

use std::ffi::CString;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use benches::TempLayers;
use criterion::Criterion;

/// Times `make` on fresh names `0..iters` (one directory entry each), then removes them untimed.
fn timed_batch(upper: &Path, iters: u64, mut make: impl FnMut(&CString)) -> Duration {
    let names: Vec<CString> = (0..iters).map(|i| CString::new(format!("wh{i}")).expect("no NUL")).collect();
    let start = Instant::now();
    for name in &names {
        make(name);
    }
    let elapsed = start.elapsed();
    for name in &names {
        std::fs::remove_file(upper.join(name.to_str().expect("ASCII"))).expect("remove a whiteout");
    }
    elapsed
}

fn whiteouts(c: &mut Criterion) {
    let layers = TempLayers::new(1);
    let stack = layers.open_writable("");
    let upper = layers.upper().to_owned();
    let dir = File::open(&upper).expect("the upper dir");
    let mut group = c.benchmark_group("whiteout");
    group.bench_function("ovl_core::make_whiteout", |b| {
        b.iter_custom(|iters| timed_batch(&upper, iters, |name| ovl_core::make_whiteout(&dir, name).expect("mknod")))
    });
    group.bench_function("ovl_copyup::whiteout", |b| {
        b.iter_custom(|iters| {
            timed_batch(&upper, iters, |name| ovl_copyup::whiteout(&stack, Path::new(""), name).expect("whiteout"))
        })
    });
    group.finish();
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    whiteouts(&mut criterion);
    criterion.final_summary();
}
