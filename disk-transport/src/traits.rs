//! The three traits of the crate: [`DiskTransport`], [`Connection`] and [`Disk`], with their
//! mockall mocks (feature `mock`).

use std::fmt;

use crate::{
    format_transport_modes, write_zeros_from, AccessGuard, CleanupStats, ConnectParams,
    DirtyExtent, DiskInfo, DrivenQueue, Error, Extent, OpenFlags, ProtocolInfo, ReadCompletion,
    Result, TransportMode, WriteCompletion,
};

/// A way to reach virtual disks (VDDK's library handle: `InitEx`, `ListTransportModes`,
/// `ConnectEx`, `PrepareForAccess`/`EndAccess`, `Cleanup`).
///
/// `prepare_for_access` and `cleanup` live here, not on [`Connection`], because VDDK takes
/// connection *parameters* for them: PrepareForAccess must run before the snapshot is created,
/// i.e. before the connection to that snapshot exists.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait DiskTransport: Send + Sync + fmt::Debug {
    /// Short backend name: `"memory"`, `"file"`, `"nbd"`, `"vddk"`.
    fn name(&self) -> &'static str;

    /// The transport modes this backend offers (`VixDiskLib_ListTransportModes`); format them
    /// with [`format_transport_modes`] for VDDK's colon-separated string.
    fn transport_modes(&self) -> Vec<TransportMode>;

    /// The modes as `VixDiskLib_ListTransportModes` prints them: `"file:san:hotadd:nbdssl:nbd"`.
    fn list_transport_modes(&self) -> String {
        format_transport_modes(&self.transport_modes())
    }

    /// Connects (`VixDiskLib_ConnectEx`). A read-only connection makes every open read-only.
    fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>>;

    /// Tells vCenter that the VM's disks are about to be opened (disables Storage vMotion);
    /// the guard's drop calls EndAccess with the same parameters and identity.
    fn prepare_for_access(&self, params: &ConnectParams, identity: &str) -> Result<AccessGuard>;

    /// Removes state left behind by connections that were not shut down cleanly.
    fn cleanup(&self, params: &ConnectParams) -> Result<CleanupStats>;
}

/// A connection to a host or a local disk store (`VixDiskLibConnection`).
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait Connection: Send + Sync + fmt::Debug {
    /// Opens a disk (`VixDiskLib_Open`). `path` is backend-specific: `"[datastore1] vm/vm.vmdk"`
    /// for VDDK, an export name for NBD, a file path for files, a disk name for memory.
    fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>>;

    /// Whether the connection is read-only.
    fn read_only(&self) -> bool;
}

/// An open virtual disk (`VixDiskLibHandle`).
///
/// Methods take `&self` so a disk can be shared between threads; backends that must serialise
/// access (VDDK) do so inside. Offsets and lengths are bytes and must be multiples of
/// [`DiskInfo::min_block_size`].
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait Disk: Send + Sync + fmt::Debug {
    /// Size, sector sizes, geometry, transport, capabilities.
    fn info(&self) -> Result<DiskInfo>;

    /// Fills `buf` from `offset`. Short reads are errors, never silent.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;

    /// What `[offset, offset + length)` holds, as consecutive extents covering the range
    /// (merged where neighbours have the same kind). Backends without allocation information
    /// return one [`ExtentKind::Data`](crate::ExtentKind::Data) extent.
    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// What changed in `[offset, offset + length)` since the checkpoint of the dirty bitmap this
    /// handle was opened with ([`DiskInfo::dirty_bitmap`]): clean and dirty extents covering the
    /// range, merged. The NBD backend reads `qemu:dirty-bitmap:NAME` (`?dirty-bitmap=NAME` in
    /// the URI), [`MemoryDisk`](crate::memory::MemoryDisk) its own bitmaps. Backends and handles
    /// without one fail with [`Error::Unsupported`]. Feed the answer to
    /// [`copy::copy_extents`](crate::copy::copy_extents), or let [`copy::copy_changed`](crate::copy::copy_changed) ask for it.
    fn dirty_extents(&self, offset: u64, length: u64) -> Result<Vec<DirtyExtent>> {
        let _ = (offset, length);
        Err(Error::NoDirtyBitmap {
            what: "this disk handle".into(),
            how: "a backend with changed-block tracking: NBD's ?dirty-bitmap=NAME \
                  (DiskUri::with_dirty_bitmap), MemoryDisk::dirty_bitmap_handle"
                .into(),
        })
    }

    /// Makes `[offset, offset + length)` read as zeros, deallocating where the backend can.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let zeros = vec![0u8; length.min(1 << 20) as usize];
        write_zeros_from(self, &zeros, offset, length)
    }

    /// Tells the backend the range is no longer needed (NBD TRIM). A hint: backends without it
    /// do nothing, and the contents afterwards are unspecified either way.
    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// Keys of the disk's metadata table (`VixDiskLib_GetMetadataKeys`).
    fn metadata_keys(&self) -> Result<Vec<String>> {
        Err(Error::Unsupported("disk metadata".into()))
    }

    /// One metadata value (`VixDiskLib_ReadMetadata`).
    fn read_metadata(&self, key: &str) -> Result<String> {
        let _ = key;
        Err(Error::Unsupported("disk metadata".into()))
    }

    /// Sets a metadata value (`VixDiskLib_WriteMetadata`).
    fn write_metadata(&self, key: &str, value: &str) -> Result<()> {
        let _ = (key, value);
        Err(Error::Unsupported("disk metadata".into()))
    }

    /// Starts a read of `buf.len()` bytes at `offset` and calls `done` when it completes,
    /// possibly on another thread and possibly before this returns. Backends that can overlap
    /// requests (NBD) return at once; the default reads synchronously.
    fn submit_read(&self, offset: u64, mut buf: Vec<u8>, done: ReadCompletion) {
        let result = self.read_at(&mut buf, offset).map(|()| buf);
        done(result);
    }

    /// Starts a write of `buf` at `offset`; see [`submit_read`](Disk::submit_read).
    fn submit_write(&self, offset: u64, buf: Vec<u8>, done: WriteCompletion) {
        let result = self.write_at(&buf, offset).map(|()| buf);
        done(result);
    }

    /// How many submitted requests the backend overlaps usefully (1 for synchronous backends).
    fn max_in_flight(&self) -> usize {
        1
    }

    /// Whether writes are thrown away unstored, as [`NullDisk`](crate::null::NullDisk) does
    /// (`null:`): writing to such a disk costs nothing, which the copy engine uses to pick how
    /// it reads (see [`driven_queue`](Disk::driven_queue)). False by default.
    fn discards_writes(&self) -> bool {
        false
    }

    /// What the network protocol negotiated (NBD: TLS, header style, contexts, flags, block
    /// sizes), for display; `None` for local backends.
    fn protocol(&self) -> Option<ProtocolInfo> {
        None
    }

    /// A private queue of reads whose completions run on the thread that drives it (see
    /// [`DrivenQueue`]), or `Ok(None)` when the backend has none (the default): then
    /// [`submit_read`](Disk::submit_read) is the way to overlap requests.
    ///
    /// NBD opens one more connection for each queue, without a reader thread, when the server
    /// allows several (`CAN_MULTI_CONN`) and the export is not behind TLS. The copy engine asks
    /// for one per copying thread when its destination [discards writes](Disk::discards_writes),
    /// so no completion is handed from a reader thread to a copying thread. A destination that
    /// stores data keeps the reader threads: a copying thread busy writing cannot read its
    /// socket, and the server stalls once its few hundred KiB of socket buffer are full.
    fn driven_queue(&self) -> Result<Option<Box<dyn DrivenQueue>>> {
        Ok(None)
    }
}
