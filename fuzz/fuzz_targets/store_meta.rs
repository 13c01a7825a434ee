//! A store's `snapshots.json` may be corrupt or hand-edited: parsing never panics, and what it
//! accepts has unique valid names and ids below `next_id`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(meta) = snap_fs::store::parse_meta(text) {
        let mut names = std::collections::HashSet::new();
        for s in &meta.snapshots {
            assert!(s.id > 0 && s.id < meta.next_id);
            assert!(snap_fs::store::valid_name(&s.name));
            assert!(names.insert(s.name.clone()));
        }
    }
});
