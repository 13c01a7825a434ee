//! `overlay.origin`: the kernel's `ovl_fb` encoding of a file handle (`Origin::encode` and
//! `Origin::decode` of a real ext4/xfs handle), making the value of a real file
//! (`ovl_core::index::origin_value`: `name_to_handle_at` plus the encoding), opening what an
//! origin names (`ovl_lookup::resolve_origin`: `open_by_handle_at` on the lower layer's
//! filesystem), and the identity of a copied-up file, which reads its origin and follows it
//! (`ovl_lookup::identity`), against a file without one.

use std::ffi::CStr;
use std::hint::black_box;
use std::path::Path;

use benches::{TempLayers, write_data};
use criterion::Criterion;
use ovl_copyup::{Source, copy_up};
use ovl_core::Origin;
use ovl_lookup::{OriginTarget, identity, resolve_origin};

const NAME: &CStr = c"file";

fn origins(c: &mut Criterion) {
    let layers = TempLayers::new(1);
    write_data(&layers.lower(0).join("file"), 4096);
    let stack = layers.open_writable("");
    let lower = &stack.lowers()[0];
    let upper = stack.upper().expect("an upper layer").layer();
    // A real copy-up writes the origin the benches read back.
    copy_up(&stack, &Source { layer: lower.id(), path: "file".into() }, Path::new(""), &|_| {}).expect("copy-up");
    let root = lower.root().expect("the layer root");
    let value = ovl_core::index::origin_value(lower, &*root, NAME).expect("the filesystem makes handles");
    let origin = Origin::decode(&value).expect("a valid origin");
    assert_eq!(origin.encode(), value);
    let lower_st = rustix::fs::lstat(layers.lower(0).join("file")).expect("lstat lower");
    let upper_st = rustix::fs::lstat(layers.upper().join("file")).expect("lstat upper");
    let followed = identity(&stack, upper, Path::new("file"), &upper_st).expect("identity");
    assert_eq!((followed.fs_index, followed.ino), (lower.fs_index(), lower_st.st_ino), "the origin is followed");

    let mut group = c.benchmark_group("origin");
    group.bench_function("encode", |b| b.iter(|| black_box(&origin).encode()));
    group.bench_function("decode", |b| b.iter(|| Origin::decode(black_box(&value)).expect("decode")));
    group.bench_function("origin_value", |b| {
        b.iter(|| ovl_core::index::origin_value(lower, &*root, black_box(NAME)).expect("a value"))
    });
    group.bench_function("resolve_origin", |b| {
        b.iter(|| match resolve_origin(&stack, black_box(&origin)) {
            OriginTarget::Found(fd) => fd,
            other => panic!("the origin does not resolve: {other:?}"),
        })
    });
    group.bench_function("identity/followed_origin", |b| {
        b.iter(|| identity(&stack, upper, black_box(Path::new("file")), &upper_st).expect("identity"))
    });
    group.bench_function("identity/no_origin", |b| {
        b.iter(|| identity(&stack, lower, black_box(Path::new("file")), &lower_st).expect("identity"))
    });
    group.finish();
}

// `criterion_group!` would make an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    origins(&mut criterion);
    criterion.final_summary();
}
