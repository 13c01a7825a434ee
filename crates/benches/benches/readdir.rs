//! `ovl_lookup::read_merged` of a directory of 10,000 entries: merged from two lower layers that
//! share 2,000 names (the union is de-duplicated), and from a single layer for comparison.

use std::ffi::OsStr;

use benches::{TempLayers, fill};
use criterion::{BenchmarkId, Criterion, Throughput};
use ovl_lookup::{DirLayers, lookup, read_merged};

const ENTRIES: usize = 10_000;

fn readdirs(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_merged");
    group.throughput(Throughput::Elements(ENTRIES as u64));

    let merged = TempLayers::new(2);
    fill(&merged.lower(0).join("big"), "e", 0, 6_000, 0);
    fill(&merged.lower(1).join("big"), "e", 4_000, 6_000, 0);
    let single = TempLayers::new(1);
    fill(&single.lower(0).join("big"), "e", 0, ENTRIES, 0);

    for (case, layers) in [("merged_2_layers", &merged), ("single_layer", &single)] {
        let stack = layers.open_read_only();
        let root = DirLayers::root(&stack).expect("the root dir");
        let big = lookup(&stack, &root, OsStr::new("big")).expect("lookup").expect("big exists");
        let dir = big.dir.expect("big is a dir");
        assert_eq!(read_merged(&stack, &dir).expect("read_merged").len(), ENTRIES);
        group.bench_with_input(BenchmarkId::new(case, ENTRIES), &dir, |b, dir: &DirLayers| {
            b.iter(|| read_merged(&stack, dir).expect("read_merged"))
        });
    }
    group.finish();
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().sample_size(30).configure_from_args();
    readdirs(&mut criterion);
    criterion.final_summary();
}
