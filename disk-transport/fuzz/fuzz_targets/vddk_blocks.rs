//! Whatever block list and metadata key buffer a VDDK library returns, the conversion to
//! extents covers the queried range exactly and key parsing never panics.
#![no_main]

use disk_transport::vddk::{extents_from_blocks, parse_metadata_keys};
use disk_transport::ExtentKind;
use libfuzzer_sys::fuzz_target;

fn u64_at(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (j, byte) in b.iter_mut().enumerate() {
        *byte = data.get(i * 8 + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_metadata_keys(data);
    let start = u64_at(data, 0) % (1 << 40) * 512;
    let stop = start + (u64_at(data, 1) % (1 << 30) + 1) * 512;
    let blocks: Vec<(u64, u64)> = (1..data.len() / 16)
        .map(|i| (u64_at(data, 2 * i), u64_at(data, 2 * i + 1)))
        .collect();
    let mut out = Vec::new();
    extents_from_blocks(start, stop, &blocks, ExtentKind::Hole, &mut out);
    assert_eq!(out.first().map(|e| e.offset), Some(start));
    assert_eq!(out.last().map(|e| e.end()), Some(stop));
    assert!(out
        .windows(2)
        .all(|w| w[0].end() == w[1].offset && w[0].length > 0));
});
