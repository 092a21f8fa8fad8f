//! Any bytes from an NBD server during negotiation give an export or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = disk_transport::nbd::replay_handshake(data, "disk", None);
    let _ = disk_transport::nbd::replay_handshake(data, "", Some("bitmap0"));
});
