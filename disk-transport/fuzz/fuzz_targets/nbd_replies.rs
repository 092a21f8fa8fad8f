//! Any bytes from an NBD server, as transmission-phase replies in any header style (simple,
//! structured, extended), end every waiting request (with data or an error) without panicking
//! or hanging.
#![no_main]

use disk_transport::nbd::{replay_reply_stream, ReplyStyle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (style, bytes) = match data.split_first() {
        Some((flag, rest)) => (
            match flag % 3 {
                0 => ReplyStyle::Simple,
                1 => ReplyStyle::Structured,
                _ => ReplyStyle::Extended,
            },
            rest,
        ),
        None => (ReplyStyle::Structured, data),
    };
    let _ = replay_reply_stream(bytes, style);
});
