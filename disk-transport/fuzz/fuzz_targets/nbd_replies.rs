//! Any bytes from an NBD server, as transmission-phase replies, end every waiting request
//! (with data or an error) without panicking or hanging.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (structured, bytes) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => (true, data),
    };
    let _ = disk_transport::nbd::replay_reply_stream(bytes, structured);
});
