//! `ovl_lookup::lookup` of one name through 1 and 10 lower layers: a file that only the bottom
//! layer has (every layer above is asked first), a directory merged from every layer (its
//! `opaque` xattr is read in each), and a name no layer has (a negative lookup asks them all).

use std::ffi::OsStr;
use std::hint::black_box;

use benches::{TempLayers, fill};
use criterion::{BenchmarkId, Criterion};
use ovl_lookup::{DirLayers, lookup};

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for depth in [1usize, 10] {
        let layers = TempLayers::new(depth);
        for i in 0..depth {
            // Some neighbours in every directory, so that no layer is trivially empty.
            fill(layers.lower(i), &format!("l{i}-"), 0, 100, 64);
            fill(&layers.lower(i).join("dir"), &format!("l{i}-"), 0, 10, 64);
        }
        std::fs::write(layers.lower(depth - 1).join("target"), b"bottom").expect("the target file");
        let stack = layers.open_read_only();
        let root = DirLayers::root(&stack).expect("the root dir");
        let dir = lookup(&stack, &root, OsStr::new("dir")).expect("lookup").expect("dir exists");
        assert_eq!(dir.dir.expect("a dir").lowers.len(), depth);

        for (case, name) in [("file_in_bottom_layer", "target"), ("merged_dir", "dir"), ("missing", "nowhere")] {
            group.bench_with_input(BenchmarkId::new(case, format!("{depth}_layers")), name, |b, name| {
                b.iter(|| lookup(&stack, &root, black_box(OsStr::new(name))).expect("lookup"))
            });
        }
    }
    group.finish();
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    lookups(&mut criterion);
    criterion.final_summary();
}
