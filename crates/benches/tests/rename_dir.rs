//! The O(1) evidence for the `rename_dir` bench that needs no clock (issue 3): renaming a
//! directory merged from 10 lower layers through an `ovlfs` mount copies up the directory
//! itself and none of the entries below it, and the renamed directory still shows them all.

use std::path::Path;

use benches::{OvlfsMount, TempLayers, ovlfs_bin, spread_tree, upper_after_rename};

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("a listing") {
        let e = e.expect("an entry");
        if e.file_type().expect("a type").is_dir() { n += count_files(&e.path()) } else { n += 1 }
    }
    n
}

#[test]
fn issue_3_dir_rename_over_10_layers_copies_no_child() {
    const N: usize = 1_000;
    let layers = TempLayers::new(10);
    spread_tree(&layers, "d", N);
    let mnt = layers.scratch().join("mnt");
    std::fs::create_dir(&mnt).expect("a mount point");
    let mount = OvlfsMount::new(&ovlfs_bin(), &layers.options("redirect_dir=on"), &mnt);

    std::fs::rename(mount.path().join("d"), mount.path().join("e")).expect("rename d e");
    assert_eq!(upper_after_rename(layers.upper(), "d", "e"), Ok(()));
    assert_eq!(count_files(&mount.path().join("e")), N);
    assert!(std::fs::symlink_metadata(mount.path().join("d")).is_err(), "d is gone");
    // Listing every file through the mount copies nothing up either.
    assert_eq!(upper_after_rename(layers.upper(), "d", "e"), Ok(()));
}
