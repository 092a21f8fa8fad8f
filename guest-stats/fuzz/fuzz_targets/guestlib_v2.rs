//! Any bytes as a `guestlib.info.get 2` payload: decode or error, never panic.
#![no_main]

use guest_stats::vmware::guestlib;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = guestlib::decode_v2(data) {
        assert_eq!(guestlib::encode_v2(&info).len(), guestlib::V2_LEN);
    }
});
