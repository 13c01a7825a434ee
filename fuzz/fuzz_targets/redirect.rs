//! `overlay.redirect` values from a layer are untrusted: whatever parses is a plain relative name
//! or an absolute path of plain names, so it can never lead outside a layer root.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((absolute, path)) = ovl_lookup::parse_redirect_value(data) {
        assert_eq!(absolute, data.first() == Some(&b'/'));
        assert!(path.components().count() >= 1);
        assert!(path.components().all(|c| matches!(c, Component::Normal(_))), "{path:?} from {data:?}");
        assert!(absolute || path.components().count() == 1);
    }
});
