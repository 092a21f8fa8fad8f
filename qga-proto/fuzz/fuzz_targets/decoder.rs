//! The reply decoder on arbitrary bytes in arbitrary chunks: no panic, the
//! buffer stays bounded, and chunking does not change the frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qga_proto::wire::{Decoder, Frame};

fn decode(chunks: &[&[u8]], limit: usize) -> Vec<Frame> {
    let mut d = Decoder::with_max_reply_size(limit);
    let mut frames = Vec::new();
    for c in chunks {
        d.push(c);
        assert!(d.buffered() <= limit);
        frames.extend(std::iter::from_fn(|| d.next_frame()));
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let limit = 16 + usize::from(control) * 64;
    let step = usize::from(control % 13) + 1;
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    assert_eq!(decode(&[rest], limit), decode(&chunks, limit));
});
