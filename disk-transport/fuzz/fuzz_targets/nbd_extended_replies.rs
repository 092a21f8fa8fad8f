//! Extended-header reply streams (32-byte chunk headers, 64-bit lengths, BLOCK_STATUS_EXT):
//! any bytes end every waiting request without a panic, a hang or an allocation the server
//! chose.
#![no_main]

use disk_transport::nbd::{replay_reply_stream, ReplyStyle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = replay_reply_stream(data, ReplyStyle::Extended);
});
