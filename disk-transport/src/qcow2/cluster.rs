//! Guest-to-host cluster mapping (QEMU's `block/qcow2-cluster.c`): what an L1 or L2 entry
//! says, and the inflating of compressed clusters. Pure functions on the entries, fuzzed and
//! property-tested; the tables themselves are cached in [`super::Qcow2Disk`].

/// Bits 9..=55 of an L1 or standard L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: the table or cluster has refcount exactly one (QEMU's `QCOW_OFLAG_COPIED`).
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 bit 0 (v3): the cluster reads as zeros.
pub const ZERO: u64 = 1;

/// Where the data of one guest cluster is, as its L2 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// Not allocated here: the backing file's data, or zeros without one.
    Unallocated,
    /// Reads as zeros, whatever the backing file holds; `host` is a preallocated cluster.
    Zero {
        /// The host cluster kept for it, if any.
        host: Option<u64>,
    },
    /// A standard cluster at this host offset.
    Data {
        /// Host offset (cluster-aligned).
        host: u64,
        /// Whether its refcount is exactly one (bit 63), so it can be written in place.
        copied: bool,
    },
    /// A zlib-compressed cluster.
    Compressed {
        /// Host offset of the compressed bytes (not aligned).
        offset: u64,
        /// How many bytes may hold them: up to the end of the last 512-byte sector.
        length: u64,
    },
}

/// The host offset of the L2 table an L1 entry points to, `None` when there is none.
pub fn decode_l1(entry: u64, cluster_bits: u32) -> Result<Option<u64>, String> {
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if offset & ((1 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "an L1 entry points to an L2 table at {offset:#x}, not cluster-aligned"
        ));
    }
    Ok(Some(offset))
}

/// What an L2 entry says. `version` 2 images have no zero flag.
pub fn decode_l2(entry: u64, cluster_bits: u32, version: u32) -> Result<Mapping, String> {
    if entry & COMPRESSED != 0 {
        // x = 62 - (cluster_bits - 8) bits of offset, then the count of additional sectors.
        let offset_bits = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << offset_bits) - 1);
        let sectors_field = (entry >> offset_bits) & ((1u64 << (cluster_bits - 8)) - 1);
        if offset == 0 {
            return Err("a compressed cluster at host offset 0 (the header)".into());
        }
        let start_sector = offset & !511;
        let end = start_sector + (sectors_field + 1) * 512;
        return Ok(Mapping::Compressed {
            offset,
            length: end - offset,
        });
    }
    let host = entry & OFFSET_MASK;
    let zero = entry & ZERO != 0;
    if zero && version < 3 {
        return Err("an L2 entry of a version 2 image has the v3 zero flag".into());
    }
    if host & ((1 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "an L2 entry points to a data cluster at {host:#x}, not cluster-aligned"
        ));
    }
    if zero {
        return Ok(Mapping::Zero {
            host: (host != 0).then_some(host),
        });
    }
    if host == 0 {
        if entry & COPIED != 0 {
            return Err(
                "an L2 entry points to host offset 0 (only images with an external data file \
                 do that)"
                    .into(),
            );
        }
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data {
        host,
        copied: entry & COPIED != 0,
    })
}

/// The host clusters a compressed cluster's bytes touch, each of which holds one reference for
/// it: `[first, last]` cluster offsets.
pub fn compressed_host_clusters(offset: u64, length: u64, cluster_bits: u32) -> (u64, u64) {
    let mask = !((1u64 << cluster_bits) - 1);
    let start = offset & !511;
    let end = offset + length; // sector-aligned end
    (start & mask, (end - 1) & mask)
}

/// Inflates the raw deflate stream of a compressed cluster (zlib without its header, as QEMU
/// writes it with window bits -12) into `out`, which must be filled exactly; bytes after the
/// stream's end (the next cluster's data sharing the last sector) are ignored.
pub fn inflate(compressed: &[u8], out: &mut [u8]) -> Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut state, compressed, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
            Err(format!(
                "a compressed cluster inflates to {written} bytes, not the cluster's {}",
                out.len()
            ))
        }
        other => Err(format!("a compressed cluster does not inflate: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_decode() {
        assert_eq!(decode_l2(0, 16, 3).unwrap(), Mapping::Unallocated);
        assert_eq!(
            decode_l2(COPIED | 0x50000, 16, 3).unwrap(),
            Mapping::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            decode_l2(ZERO, 16, 3).unwrap(),
            Mapping::Zero { host: None }
        );
        assert!(decode_l2(ZERO, 16, 2).is_err());
        assert!(decode_l2(COPIED | 0x50200, 16, 3).is_err());
        assert!(decode_l2(COPIED, 16, 3).is_err());
        // 64 KiB clusters: 54 offset bits, then 8 bits of additional sectors.
        let entry = COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            decode_l2(entry, 16, 3).unwrap(),
            Mapping::Compressed {
                offset: 0x12345,
                length: 0x12200 + 3 * 512 - 0x12345
            }
        );
        assert_eq!(
            compressed_host_clusters(0x1ff00, 0x300, 16),
            (0x10000, 0x20000)
        );
        assert_eq!(decode_l1(0x30000 | COPIED, 16).unwrap(), Some(0x30000));
        assert!(decode_l1(0x30200, 16).is_err());
    }

    #[test]
    fn inflates_what_deflate_made_and_refuses_short_streams() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut tail = packed.clone();
        tail.extend_from_slice(&[0xAB; 300]); // the next cluster's bytes in the last sector
        let mut out = vec![0u8; 4096];
        inflate(&tail, &mut out).unwrap();
        assert_eq!(out, data);
        let mut bigger = vec![0u8; 8192];
        assert!(inflate(&packed, &mut bigger).is_err());
        assert!(inflate(&[0xff; 64], &mut out).is_err());
    }

    proptest! {
        #[test]
        fn any_entry_decodes_or_fails(entry in any::<u64>(), bits in 9u32..=21, version in 2u32..=3) {
            match decode_l2(entry, bits, version) {
                Ok(Mapping::Data { host, .. }) => prop_assert_eq!(host % (1 << bits), 0),
                Ok(Mapping::Compressed { offset, length }) => {
                    prop_assert!(length >= 1 && length <= 2 << bits);
                    let (first, last) = compressed_host_clusters(offset, length, bits);
                    prop_assert!(first <= last);
                }
                _ => {}
            }
        }

        #[test]
        fn any_bytes_inflate_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = vec![0u8; 4096];
            let _ = inflate(&bytes, &mut out);
        }
    }
}
