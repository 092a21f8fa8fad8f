//! Data types describing disks and their allocation.

use serde::{Deserialize, Serialize};

use crate::mode::TransportMode;

/// Disk geometry (`VixDiskLibGeometry`): cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

/// The virtual disk's controller type (`VixDiskLibAdapterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AdapterType {
    /// IDE (1).
    Ide,
    /// BusLogic SCSI (2).
    ScsiBuslogic,
    /// LSI Logic SCSI (3).
    ScsiLsilogic,
    /// Unknown or not applicable (256).
    #[default]
    Unknown,
}

impl AdapterType {
    /// From the VDDK enum value.
    pub fn from_vddk(value: u32) -> Self {
        match value {
            1 => AdapterType::Ide,
            2 => AdapterType::ScsiBuslogic,
            3 => AdapterType::ScsiLsilogic,
            _ => AdapterType::Unknown,
        }
    }
}

/// What is known about an open disk (`VixDiskLibInfo` plus the transport in use).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Logical sector size in bytes (512 when the backend does not say).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Smallest I/O unit the backend accepts without read-modify-write; offsets and lengths of
    /// reads and writes must be multiples of it.
    pub min_block_size: u32,
    /// Preferred I/O size (NBD preferred block size, VDDK max(sector sizes, 4096)).
    pub preferred_block_size: u32,
    /// Largest single read or write the backend accepts.
    pub max_request_size: u32,
    /// BIOS geometry, if the format records one.
    pub bios_geometry: Option<Geometry>,
    /// Physical geometry, if the format records one.
    pub physical_geometry: Option<Geometry>,
    /// Controller type.
    pub adapter_type: AdapterType,
    /// Number of links in the chain (base disk + redo logs); 1 for flat images.
    pub num_links: u32,
    /// Parent file name hint of a child disk.
    pub parent_file_name_hint: Option<String>,
    /// Disk UUID, if the format has one.
    pub uuid: Option<String>,
    /// The transport in use, for VDDK backends (`VixDiskLib_GetTransportMode`).
    pub transport_mode: Option<TransportMode>,
    /// Whether the disk was opened read-only.
    pub read_only: bool,
    /// Whether [`Disk::allocated_extents`](crate::Disk::allocated_extents) gives real allocation
    /// information (false: it reports everything as data).
    pub can_extents: bool,
    /// Whether several connections to the same disk see each other's flushed writes
    /// (NBD `CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
    /// The dirty bitmap (changed-block tracking) this handle was opened with, whose ranges
    /// [`Disk::dirty_extents`](crate::Disk::dirty_extents) reports: the `NAME` of an NBD
    /// `qemu:dirty-bitmap:NAME` context, a [`MemoryDisk`](crate::memory::MemoryDisk) bitmap.
    /// `None`: `dirty_extents` fails with [`Error::NoDirtyBitmap`](crate::Error::NoDirtyBitmap).
    #[serde(default)]
    pub dirty_bitmap: Option<String>,
}

impl DiskInfo {
    /// Info for a plain disk of `capacity` bytes with 512-byte sectors and no other
    /// constraints; backends then adjust the fields they know.
    pub fn new(capacity: u64) -> Self {
        DiskInfo {
            capacity,
            logical_sector_size: 512,
            physical_sector_size: 512,
            min_block_size: 1,
            preferred_block_size: 4096,
            max_request_size: 32 << 20,
            bios_geometry: None,
            physical_geometry: None,
            adapter_type: AdapterType::Unknown,
            num_links: 1,
            parent_file_name_hint: None,
            uuid: None,
            transport_mode: None,
            read_only: false,
            can_extents: false,
            can_multi_conn: false,
            dirty_bitmap: None,
        }
    }

    /// Size in 512-byte sectors, rounded up (VDDK's `capacity` field).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity.div_ceil(512)
    }
}

/// What a range of the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExtentKind {
    /// Allocated data: must be read and copied.
    Data,
    /// Allocated, but reads as zeros (NBD `ZERO` without `HOLE`).
    Zero,
    /// Not allocated, reads as zeros (a sparse hole; NBD `HOLE|ZERO`).
    Hole,
    /// Not allocated in this layer, contents defined elsewhere (NBD `HOLE` without `ZERO`, VDDK
    /// single-link opens: a parent disk may hold data). Copies treat it as data.
    Unallocated,
}

impl ExtentKind {
    /// Whether the range reads as zeros, so a copy can skip reading it.
    pub fn reads_as_zero(self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Hole)
    }

    /// From the NBD `base:allocation` flags (bit 0 HOLE, bit 1 ZERO).
    pub fn from_nbd_flags(flags: u32) -> Self {
        match (flags & 1 != 0, flags & 2 != 0) {
            (false, false) => ExtentKind::Data,
            (false, true) => ExtentKind::Zero,
            (true, true) => ExtentKind::Hole,
            (true, false) => ExtentKind::Unallocated,
        }
    }

    /// The NBD `base:allocation` flags of this kind.
    pub fn nbd_flags(self) -> u32 {
        match self {
            ExtentKind::Data => 0,
            ExtentKind::Zero => 2,
            ExtentKind::Hole => 3,
            ExtentKind::Unallocated => 1,
        }
    }
}

/// A range of the disk and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes (never 0).
    pub length: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte (saturating, so a bogus extent from a backend cannot overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// A range of the disk and whether it changed since a checkpoint: a run of a dirty bitmap
/// (QEMU's `qemu:dirty-bitmap:NAME`), of VMware's changed-block tracking, or of a
/// [`MemoryDisk`](crate::memory::MemoryDisk) bitmap. [`Disk::dirty_extents`](crate::Disk::dirty_extents)
/// returns them covering the asked range, clean and dirty alternating, and the incremental
/// copies of [`copy`](crate::copy) take them as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirtyExtent {
    /// Start in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the range changed since the bitmap was started (or last cleared).
    pub dirty: bool,
}

impl DirtyExtent {
    /// A changed range, for lists built by hand (VMware's `QueryChangedDiskAreas` answer, a
    /// change log of your own).
    pub fn dirty(offset: u64, length: u64) -> Self {
        DirtyExtent {
            offset,
            length,
            dirty: true,
        }
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The NBD block-status flags of a `qemu:dirty-bitmap:` context (1 dirty, 0 clean).
    pub fn nbd_flags(&self) -> u32 {
        u32::from(self.dirty)
    }
}

/// Appends `extent` to `extents`, merging it with the last one when they touch and have the same
/// state. Empty extents are dropped.
pub fn push_dirty_extent(extents: &mut Vec<DirtyExtent>, extent: DirtyExtent) {
    if extent.length == 0 {
        return;
    }
    if let Some(last) = extents.last_mut() {
        if last.dirty == extent.dirty && last.end() == extent.offset {
            last.length = last.length.saturating_add(extent.length);
            return;
        }
    }
    extents.push(extent);
}

/// Appends `extent` to `extents`, merging it with the last one when they touch and are of the
/// same kind. Empty extents are dropped.
pub fn push_extent(extents: &mut Vec<Extent>, extent: Extent) {
    if extent.length == 0 {
        return;
    }
    if let Some(last) = extents.last_mut() {
        if last.kind == extent.kind && last.end() == extent.offset {
            last.length = last.length.saturating_add(extent.length);
            return;
        }
    }
    extents.push(extent);
}

/// [`push_extent`] of the range `[start, stop)`.
pub(crate) fn push_range(extents: &mut Vec<Extent>, start: u64, stop: u64, kind: ExtentKind) {
    push_extent(
        extents,
        Extent {
            offset: start,
            length: stop - start,
            kind,
        },
    );
}

/// Clips a list of extents to `[offset, offset + length)`, merging neighbours; extents the
/// backend returned beyond the range are cut.
pub fn clip_extents(extents: &[Extent], offset: u64, length: u64) -> Vec<Extent> {
    let end = offset.saturating_add(length);
    let mut out = Vec::new();
    for e in extents {
        let start = e.offset.max(offset);
        let stop = e.end().min(end);
        if start < stop {
            push_range(&mut out, start, stop, e.kind);
        }
    }
    out
}

/// What a network protocol negotiated for an open disk, named as `nbdinfo` names it: the
/// NBD backend fills it ([`Disk::protocol`](crate::Disk::protocol)); `vmsdk disk info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProtocolInfo {
    /// The handshake style, e.g. `newstyle-fixed`.
    pub protocol: String,
    /// The TLS session (protocol version, cipher, authentication), `None` in plaintext.
    pub tls: Option<String>,
    /// How requests and replies are framed: `extended`, `structured` or `simple`.
    pub transmission: String,
    /// The export name.
    pub export: String,
    /// The metadata contexts in use (`base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub contexts: Vec<String>,
    /// The medium is rotational.
    pub is_rotational: bool,
    /// The server exports it read-only.
    pub is_read_only: bool,
    /// Block status takes a context filter (extended headers only).
    pub can_block_status_payload: bool,
    /// The server takes cache (prefetch) hints.
    pub can_cache: bool,
    /// Reads can be asked unfragmented.
    pub can_df: bool,
    /// Zeroing can be asked to fail unless it is fast.
    pub can_fast_zero: bool,
    /// The server has a flush command.
    pub can_flush: bool,
    /// Writes can force unit access.
    pub can_fua: bool,
    /// Several connections share one view (flushes on one cover all).
    pub can_multi_conn: bool,
    /// The server can trim (discard).
    pub can_trim: bool,
    /// The server can write zeroes without a payload.
    pub can_zero: bool,
    /// Advertised minimum block size, if the server advertised block sizes.
    pub block_size_minimum: Option<u32>,
    /// Advertised preferred block size.
    pub block_size_preferred: Option<u32>,
    /// Advertised maximum payload.
    pub block_size_maximum: Option<u32>,
    /// Connections in use.
    pub connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_flags_round_trip() {
        for flags in 0..4 {
            assert_eq!(ExtentKind::from_nbd_flags(flags).nbd_flags(), flags);
        }
        assert!(ExtentKind::Hole.reads_as_zero());
        assert!(!ExtentKind::Unallocated.reads_as_zero());
    }

    #[test]
    fn extents_merge_and_clip() {
        let mut v = Vec::new();
        push_extent(
            &mut v,
            Extent {
                offset: 0,
                length: 10,
                kind: ExtentKind::Data,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 10,
                length: 5,
                kind: ExtentKind::Data,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 15,
                length: 0,
                kind: ExtentKind::Hole,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 15,
                length: 5,
                kind: ExtentKind::Hole,
            },
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].length, 15);
        let c = clip_extents(&v, 5, 12);
        assert_eq!(
            c,
            vec![
                Extent {
                    offset: 5,
                    length: 10,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 15,
                    length: 2,
                    kind: ExtentKind::Hole
                },
            ]
        );
        let json = serde_json::to_string(&c[1]).unwrap();
        assert_eq!(json, r#"{"offset":15,"length":2,"kind":"hole"}"#);
    }
}
