//! The qcow2 header and its extensions (QEMU's `block/qcow2.c` reads them; the layout is
//! `docs/interop/qcow2.txt`): parsing from the first cluster, checks of every field against the
//! file, and the encoding of the headers this crate writes. Pure functions on bytes, so they are
//! property-tested and fuzzed.

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Smallest cluster size this crate opens (512 bytes, the format's minimum).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size (2 MiB, QEMU's limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table (32 MiB); larger ones are refused rather than loaded.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be inconsistent (lazy refcounts were used and the image was not closed).
    pub const DIRTY: u64 = 1 << 0;
    /// QEMU found the image corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// Compressed clusters use a compression type other than zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits wide, with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Header extension: end of the extension area.
const EXT_END: u32 = 0;
/// Header extension: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Offset of the autoclear field in a v3 header, rewritten on a writable open.
pub const AUTOCLEAR_OFFSET: u64 = 88;
/// Offset of the refcount table offset (8 bytes) followed by its cluster count (4 bytes).
pub const REFCOUNT_TABLE_OFFSET_FIELD: u64 = 48;

/// A qcow2 header after its checks: every offset is aligned and inside the limits, every
/// feature is one this crate implements.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits (only ones this crate implements remain after the checks).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// The backing file name, as stored.
    pub backing_file: Option<String>,
    /// The backing file's format from the backing format extension.
    pub backing_format: Option<String>,
    /// The bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
    /// Every header extension in order (type and data), to rewrite the area without one.
    pub extensions: Vec<(u32, Vec<u8>)>,
}

/// The bitmaps header extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapsExtension {
    /// How many bitmaps.
    pub count: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Where it starts.
    pub directory_offset: u64,
}

/// One bitmap of the directory: where its table is and how many entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapTable {
    /// Host offset of the bitmap table.
    pub offset: u64,
    /// Entries (8 bytes each).
    pub entries: u32,
}

/// The bitmap tables a bitmap directory lists.
pub fn parse_bitmap_directory(directory: &[u8], count: u32) -> Result<Vec<BitmapTable>, String> {
    let mut tables = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 24 > directory.len() {
            return Err("the bitmap directory is shorter than its entries".into());
        }
        let offset = be_u64(directory, at);
        let entries = be_u32(directory, at + 8);
        let name_size = u16::from_be_bytes([directory[at + 18], directory[at + 19]]) as usize;
        let extra = be_u32(directory, at + 20) as usize;
        tables.push(BitmapTable { offset, entries });
        at = (at + 24)
            .checked_add(extra)
            .and_then(|a| a.checked_add(name_size))
            .map(|a| a.next_multiple_of(8))
            .ok_or_else(|| "a bitmap directory entry is too long".to_owned())?;
    }
    Ok(tables)
}

/// The header-extension area of the first cluster after dropping extension `kind`: every
/// other extension, the end marker, then the backing file name. Returns the bytes from
/// `header_length` on and where the backing name now starts.
pub fn extension_area_without(header: &Header, kind: u32) -> (Vec<u8>, Option<u64>) {
    let mut area = Vec::new();
    for (k, data) in header.extensions.iter().filter(|(k, _)| *k != kind) {
        area.extend_from_slice(&k.to_be_bytes());
        area.extend_from_slice(&(data.len() as u32).to_be_bytes());
        area.extend_from_slice(data);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend_from_slice(&[0u8; 8]);
    let backing_offset = header.backing_file.as_ref().map(|name| {
        let at = u64::from(header.header_length) + area.len() as u64;
        area.extend_from_slice(name.as_bytes());
        at
    });
    (area, backing_offset)
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L1 entries needed to map `size` bytes with this cluster size.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let bytes_per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(bytes_per_l2)
    }
}

/// Reads a big-endian integer at `at`; the caller checked the length.
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The names a feature name table gives incompatible bits, for error messages.
fn feature_names(table: &[u8]) -> Vec<(u8, u8, String)> {
    table
        .chunks_exact(48)
        .map(|entry| {
            let name = &entry[2..48];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            (
                entry[0],
                entry[1],
                String::from_utf8_lossy(&name[..end]).into_owned(),
            )
        })
        .collect()
}

/// Parses and checks the header in `first` (the image's first bytes: at least its first
/// cluster, or the whole file when it is smaller) of an image whose file is `file_size` bytes.
/// Unsupported features and inconsistent fields are errors naming what is wrong.
pub fn parse(first: &[u8], file_size: u64) -> Result<Header, String> {
    if first.len() < 72 {
        return Err(format!(
            "not a qcow2 image: {} bytes, shorter than a qcow2 header",
            first.len()
        ));
    }
    if be_u32(first, 0) != MAGIC {
        return Err("not a qcow2 image (no QFI\\xfb magic at its start)".into());
    }
    let version = be_u32(first, 4);
    if version != 2 && version != 3 {
        return Err(format!(
            "qcow2 version {version} is not supported (only 2 and 3)"
        ));
    }
    let backing_file_offset = be_u64(first, 8);
    let backing_file_size = be_u32(first, 16);
    let cluster_bits = be_u32(first, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(format!(
            "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
             (512 bytes to 2 MiB)"
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be_u64(first, 24);
    let crypt_method = be_u32(first, 32);
    if crypt_method != 0 {
        return Err(format!(
            "encrypted qcow2 images (crypt_method {crypt_method}) are not supported"
        ));
    }
    let l1_size = be_u32(first, 36);
    let l1_table_offset = be_u64(first, 40);
    let refcount_table_offset = be_u64(first, 48);
    let refcount_table_clusters = be_u32(first, 56);
    let nb_snapshots = be_u32(first, 60);
    let (
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
    ) = if version == 2 {
        (0, 0, 0, 4, 72)
    } else {
        if first.len() < 104 {
            return Err("truncated qcow2 v3 header".into());
        }
        (
            be_u64(first, 72),
            be_u64(first, 80),
            be_u64(first, 88),
            be_u32(first, 96),
            be_u32(first, 100),
        )
    };
    if version == 3
        && (header_length < 104
            || header_length % 8 != 0
            || u64::from(header_length) > cluster_size)
    {
        return Err(format!(
            "header_length {header_length} is invalid (at least 104, a multiple of 8, within \
             the first cluster)"
        ));
    }
    if refcount_order > 6 {
        return Err(format!("refcount_order {refcount_order} is above 6"));
    }

    // Extensions, needed before the feature checks for the feature names.
    let mut backing_format = None;
    let mut names = Vec::new();
    let mut bitmaps = None;
    let mut extensions = Vec::new();
    let mut at = header_length as usize;
    let area_end = first.len().min(cluster_size as usize);
    loop {
        if at + 8 > area_end {
            break; // v2 images may end the area without an end marker
        }
        let kind = be_u32(first, at);
        let length = be_u32(first, at + 4) as usize;
        at += 8;
        if kind == EXT_END {
            break;
        }
        if length > area_end - at {
            return Err(format!(
                "header extension {kind:#010x} of {length} bytes reaches past the first cluster"
            ));
        }
        let data = &first[at..at + length];
        extensions.push((kind, data.to_vec()));
        match kind {
            EXT_BACKING_FORMAT => {
                backing_format = Some(
                    std::str::from_utf8(data)
                        .map_err(|_| "the backing format name is not UTF-8".to_owned())?
                        .to_owned(),
                )
            }
            EXT_FEATURE_NAMES => names = feature_names(data),
            EXT_BITMAPS => {
                if data.len() < 24 {
                    return Err("the bitmaps extension is shorter than 24 bytes".into());
                }
                bitmaps = Some(BitmapsExtension {
                    count: be_u32(data, 0),
                    directory_size: be_u64(data, 8),
                    directory_offset: be_u64(data, 16),
                });
            }
            EXT_DATA_FILE => {}
            _ => {} // unknown extensions can be ignored, says the specification
        }
        at += length.next_multiple_of(8);
    }

    let refuse = |bit: u64, what: &str| -> Result<(), String> {
        if incompatible_features & bit != 0 {
            return Err(what.to_owned());
        }
        Ok(())
    };
    refuse(
        incompatible::DIRTY,
        "the image's dirty bit is set (lazy refcounts were in use and the image was not \
         closed cleanly): repair it with `qemu-img check -r all` first",
    )?;
    refuse(
        incompatible::CORRUPT,
        "QEMU marked the image corrupt: repair it with `qemu-img check -r all` first",
    )?;
    refuse(
        incompatible::DATA_FILE,
        "images with an external data file are not supported",
    )?;
    refuse(
        incompatible::COMPRESSION_TYPE,
        "compressed clusters of a compression type other than zlib (zstd) are not supported: \
         convert with `qemu-img convert -O qcow2 -o compression_type=zlib`",
    )?;
    refuse(
        incompatible::EXTENDED_L2,
        "images with extended L2 entries (subclusters) are not supported",
    )?;
    let unknown = incompatible_features & !0x1f;
    if unknown != 0 {
        let named: Vec<String> = (0..64)
            .filter(|bit| unknown & (1 << bit) != 0)
            .map(|bit| {
                names
                    .iter()
                    .find(|(kind, b, _)| *kind == 0 && u64::from(*b) == bit)
                    .map(|(_, _, name)| format!("{name} (bit {bit})"))
                    .unwrap_or_else(|| format!("bit {bit}"))
            })
            .collect();
        return Err(format!(
            "the image uses incompatible features this crate does not know: {}",
            named.join(", ")
        ));
    }

    // The tables: aligned, inside QEMU's limits, inside the file.
    let cluster_mask = cluster_size - 1;
    let min_l1 = Header::l1_entries_for(size, cluster_bits);
    if u64::from(l1_size) < min_l1 {
        return Err(format!(
            "the L1 table has {l1_size} entries, too few for a virtual size of {size} bytes \
             ({min_l1} needed)"
        ));
    }
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(format!(
            "the L1 table ({l1_bytes} bytes) is larger than 32 MiB"
        ));
    }
    let in_file = |offset: u64, length: u64, what: &str| -> Result<(), String> {
        if offset & cluster_mask != 0 {
            return Err(format!("the {what} at {offset:#x} is not cluster-aligned"));
        }
        if offset == 0 && length > 0 {
            return Err(format!("the {what} overlaps the header"));
        }
        match offset.checked_add(length) {
            Some(end) if end <= file_size => Ok(()),
            _ => Err(format!(
                "the {what} ({length} bytes at {offset:#x}) reaches past the end of the \
                 {file_size}-byte file"
            )),
        }
    };
    if l1_size > 0 {
        in_file(l1_table_offset, l1_bytes, "L1 table")?;
    }
    let rt_bytes = u64::from(refcount_table_clusters) * cluster_size;
    if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(format!(
            "the refcount table ({rt_bytes} bytes) is larger than 8 MiB"
        ));
    }
    if refcount_table_clusters == 0 {
        return Err("the image has no refcount table".into());
    }
    in_file(refcount_table_offset, rt_bytes, "refcount table")?;

    let backing_file = if backing_file_offset != 0 {
        if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
            return Err(format!(
                "the backing file name is {backing_file_size} bytes long (1..=1023 allowed)"
            ));
        }
        let end = backing_file_offset
            .checked_add(u64::from(backing_file_size))
            .filter(|&end| end <= first.len() as u64)
            .ok_or_else(|| {
                "the backing file name lies outside the image's first cluster".to_owned()
            })?;
        let name = &first[backing_file_offset as usize..end as usize];
        Some(
            std::str::from_utf8(name)
                .map_err(|_| "the backing file name is not UTF-8".to_owned())?
                .to_owned(),
        )
    } else {
        None
    };

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        refcount_order,
        nb_snapshots,
        incompatible_features,
        compatible_features,
        autoclear_features,
        header_length,
        backing_file,
        backing_format,
        bitmaps,
        extensions,
    })
}

/// Where the tables of a new image go; see [`layout`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// L1 entries.
    pub l1_size: u64,
    /// First cluster of the refcount table (1: right after the header).
    pub refcount_table_cluster: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u64,
    /// First cluster of the refcount blocks covering the metadata.
    pub refcount_blocks_cluster: u64,
    /// How many refcount blocks.
    pub refcount_blocks: u64,
    /// First cluster of the L1 table.
    pub l1_cluster: u64,
    /// Clusters of the L1 table.
    pub l1_clusters: u64,
    /// Clusters in use after creation (all of the above plus the header).
    pub used_clusters: u64,
}

/// The layout of a new image of `size` bytes (16-bit refcounts): header, refcount table sized
/// for the whole image fully allocated (so it rarely grows), refcount blocks for the metadata,
/// L1 table, in that order as QEMU lays them out.
pub fn layout(size: u64, cluster_bits: u32) -> Result<Layout, String> {
    let cluster_size = 1u64 << cluster_bits;
    let l1_size = Header::l1_entries_for(size, cluster_bits);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(format!(
            "{size} bytes need an L1 table larger than 32 MiB with {cluster_size}-byte \
             clusters; choose larger clusters"
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size).max(1);
    let block_entries = cluster_size * 8 / 16;
    // Everything a fully written image holds: data, L2 tables, L1, refcount blocks, slack.
    let data_clusters = size.div_ceil(cluster_size);
    let l2_clusters = l1_size;
    let estimate = data_clusters + l2_clusters + l1_clusters + 16;
    let estimate = estimate + estimate.div_ceil(block_entries);
    let rt_entries = estimate.div_ceil(block_entries);
    let refcount_table_clusters = (rt_entries * 8).div_ceil(cluster_size).max(1);
    if refcount_table_clusters * cluster_size > MAX_REFCOUNT_TABLE_BYTES {
        return Err(format!(
            "{size} bytes need a refcount table larger than 8 MiB with {cluster_size}-byte \
             clusters; choose larger clusters"
        ));
    }
    let mut refcount_blocks = 1;
    loop {
        let used = 1 + refcount_table_clusters + refcount_blocks + l1_clusters;
        if used <= refcount_blocks * block_entries {
            return Ok(Layout {
                cluster_bits,
                l1_size,
                refcount_table_cluster: 1,
                refcount_table_clusters,
                refcount_blocks_cluster: 1 + refcount_table_clusters,
                refcount_blocks,
                l1_cluster: 1 + refcount_table_clusters + refcount_blocks,
                l1_clusters,
                used_clusters: used,
            });
        }
        refcount_blocks += 1;
    }
}

/// Encodes the first cluster of a new v3 image: header, backing format extension, end marker,
/// backing file name.
pub fn encode(
    layout: &Layout,
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<Vec<u8>, String> {
    let cluster_size = 1usize << layout.cluster_bits;
    let mut h = vec![0u8; cluster_size];
    let put32 =
        |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut h, 0, MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, layout.cluster_bits);
    put64(&mut h, 24, size);
    put32(&mut h, 36, layout.l1_size as u32);
    put64(&mut h, 40, layout.l1_cluster << layout.cluster_bits);
    put64(
        &mut h,
        48,
        layout.refcount_table_cluster << layout.cluster_bits,
    );
    put32(&mut h, 56, layout.refcount_table_clusters as u32);
    put32(&mut h, 96, 4); // 16-bit refcounts
    let header_length = 112; // with the compression type byte (zlib) and its padding
    put32(&mut h, 100, header_length);
    let mut at = header_length as usize;
    if let Some((name, format)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(format!(
                "the backing file name is {} bytes long (1..=1023 allowed)",
                name.len()
            ));
        }
        put32(&mut h, at, EXT_BACKING_FORMAT);
        put32(&mut h, at + 4, format.len() as u32);
        at += 8;
        h[at..at + format.len()].copy_from_slice(format.as_bytes());
        at += format.len().next_multiple_of(8);
        at += 8; // end marker, zeros
        if at + name.len() > cluster_size {
            return Err("the backing file name does not fit in the first cluster".into());
        }
        put64(&mut h, 8, at as u64);
        put32(&mut h, 16, name.len() as u32);
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encoded_headers_parse_back() {
        for bits in [12, 16, 21] {
            let lay = layout(10 << 30, bits).unwrap();
            let cluster = encode(&lay, 10 << 30, Some(("../base.raw", "raw"))).unwrap();
            let file_size = lay.used_clusters << bits;
            let h = parse(&cluster, file_size).unwrap();
            assert_eq!(h.size, 10 << 30);
            assert_eq!(h.cluster_bits, bits);
            assert_eq!(h.backing_file.as_deref(), Some("../base.raw"));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert_eq!(u64::from(h.l1_size), lay.l1_size);
            assert_eq!(h.refcount_order, 4);
        }
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let lay = layout(1 << 20, 16).unwrap();
        let mut cluster = encode(&lay, 1 << 20, None).unwrap();
        let file_size = lay.used_clusters << 16;
        for (bit, word) in [
            (0, "dirty"),
            (1, "corrupt"),
            (2, "external data file"),
            (3, "zstd"),
            (4, "extended L2"),
            (9, "bit 9"),
        ] {
            cluster[72..80].copy_from_slice(&(1u64 << bit).to_be_bytes());
            let err = parse(&cluster, file_size).unwrap_err();
            assert!(err.contains(word), "{err}");
        }
        cluster[72..80].fill(0);
        cluster[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(parse(&cluster, file_size)
            .unwrap_err()
            .contains("encrypted"));
        assert!(parse(
            b"raw data that is long enough to be a header but is none at all, really....",
            100
        )
        .unwrap_err()
        .contains("not a qcow2 image"));
    }

    proptest! {
        /// Any bytes are a header or an error, never a panic; a header's tables lie in the file.
        #[test]
        fn any_bytes_parse_or_fail(mut bytes in proptest::collection::vec(any::<u8>(), 0..1024),
                                   magic in any::<bool>(), file_size in any::<u64>()) {
            if magic && bytes.len() >= 8 {
                bytes[..4].copy_from_slice(&MAGIC.to_be_bytes());
                bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
            }
            if let Ok(h) = parse(&bytes, file_size) {
                prop_assert!(h.refcount_table_offset + u64::from(h.refcount_table_clusters) * h.cluster_size() <= file_size);
                prop_assert!(Header::l1_entries_for(h.size, h.cluster_bits) <= u64::from(h.l1_size));
            }
        }
    }
}
