//! `overlay.origin` values from a layer are untrusted: decoding never panics, and whatever decodes
//! encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(o) = ovl_core::Origin::decode(data) {
        let again = o.encode();
        assert_eq!(ovl_core::Origin::decode(&again).map(|o| o.encode()).ok(), Some(again.clone()));
        assert!(again.len() <= ovl_core::origin::MAX_LEN);
    }
});
