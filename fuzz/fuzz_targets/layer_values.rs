//! The other overlay xattr values a layer carries are untrusted too: `overlay.metacopy` (judged
//! as the kernel judges it) and `overlay.nlink` of an inode-index entry (`U+N`/`L-N`). Judging
//! never panics; an accepted metacopy value has the kernel's shape; an accepted link count is
//! positive and is exactly the base count plus the signed number the value spells.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if ovl_core::metacopy_value_is_valid(data) {
        assert!(data.is_empty() || (data.len() >= 4 && data[0] == 0 && data[1] as usize == data.len()));
    }
    let (upper, lower) = (3u64, 7u64);
    if let Some(n) = ovl_core::index::union_nlink(data, upper, lower) {
        assert!(n > 0);
        let base = if data[0] == b'U' { upper } else { lower };
        let diff: i64 = std::str::from_utf8(&data[1..]).expect("digits").parse().expect("a number");
        assert_eq!(n as i64, base as i64 + diff);
        let b = if data[0] == b'U' { ovl_core::index::NlinkBase::Upper } else { ovl_core::index::NlinkBase::Lower };
        let canonical = ovl_core::index::nlink_value(b, diff);
        assert_eq!(ovl_core::index::union_nlink(&canonical, upper, lower), Some(n));
    }
    let _ = ovl_lookup::redirect_error(data);
});
