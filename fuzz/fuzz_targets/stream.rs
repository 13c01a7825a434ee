//! A send stream given to `receive` is hostile: it never panics, and whatever it does stays inside
//! the target (a sibling directory is checked to be untouched).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("target");
    let sibling = tmp.path().join("sibling");
    std::fs::create_dir(&target).unwrap();
    std::fs::create_dir(&sibling).unwrap();
    std::fs::write(sibling.join("keep"), b"keep").unwrap();
    let _ = snap_fs::stream::receive(&target, data, &|| {});
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "receive left something next to the target: {names:?}");
    assert_eq!(std::fs::read(sibling.join("keep")).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(&sibling).unwrap().count(), 1);
});
