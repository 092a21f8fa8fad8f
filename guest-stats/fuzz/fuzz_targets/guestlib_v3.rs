//! Any bytes as a `guestlib.info.get 3` payload: decode or error, never panic; and whatever
//! decodes re-encodes to something that decodes to the same statistics.
#![no_main]

use guest_stats::vmware::guestlib;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = guestlib::decode_v3(data) {
        let again = guestlib::decode_v3(&guestlib::encode_v3(&info)).expect("re-encoded reply decodes");
        assert_eq!(again.session_id, info.session_id);
    }
});
