//! The monitor-message decoder on arbitrary bytes in arbitrary chunks: no panic, the buffer
//! stays within the limit, and chunking does not change the messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_proto::wire::{Decoder, Message, WireError};

fn decode(chunks: &[&[u8]], limit: usize) -> Vec<Result<Message, WireError>> {
    let mut decoder = Decoder::with_max_message_size(limit);
    let mut messages = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        assert!(decoder.buffered() <= limit);
        messages.extend(std::iter::from_fn(|| decoder.next_message()));
    }
    messages
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let limit = 16 + usize::from(control) * 64;
    let step = usize::from(control % 13) + 1;
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    assert_eq!(decode(&[rest], limit), decode(&chunks, limit));
});
