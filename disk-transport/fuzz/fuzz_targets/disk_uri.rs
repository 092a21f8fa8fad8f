//! Any string parses as a disk URI or gives an error naming it.
#![no_main]

use disk_transport::DiskUri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<DiskUri>();
    }
});
