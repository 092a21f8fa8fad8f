//! The option-reply parser and handshake state machine: any server bytes, for any request the
//! client may make (TLS first, extended headers or not, a dirty bitmap), end in an export or a
//! clear error, never a panic, a hang or an unbounded allocation.
#![no_main]

use disk_transport::nbd::{replay_handshake_with, NbdOptions};
use disk_transport::{NbdAddress, NbdTls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let mut options = NbdOptions::new(NbdAddress::Unix("fuzz".into()))
        .export(if flags & 1 != 0 { "disk" } else { "" })
        .extended_headers(flags & 2 != 0)
        .structured_replies(flags & 4 != 0)
        .extents(flags & 8 != 0);
    if flags & 16 != 0 {
        options = options.dirty_bitmap("bitmap0");
    }
    if flags & 32 != 0 {
        options = options.tls(NbdTls::default());
    }
    let _ = replay_handshake_with(bytes, &options);
});
