//! Virtual disk access the way VMware's VDDK (`VixDiskLib`) models it — a transport, a
//! connection, an open disk — with backends for NBD servers, raw image files and an in-memory
//! fake, plus a pipelined, sparse-aware [`copy`] engine.
//!
//! ```text
//! DiskTransport ──connect(&ConnectParams)──▶ Connection ──open(path, OpenFlags)──▶ Disk
//!  (memory, file, nbd, vddk)                  (ConnectEx)                        (read_at, write_at,
//!                                                                                 allocated_extents, ...)
//! ```
//!
//! Every trait is object safe, so callers hold `Box<dyn DiskTransport>` / `Box<dyn Disk>` and
//! pick the backend at run time, e.g. from a URI with [`open_uri`]
//! (`mem://NAME?size=1G`, `file:///var/lib/images/disk.img`, `nbd://host:10809/export`,
//! `nbd+unix:///export?socket=/run/nbd.sock`).
//!
//! # Example: unit-testing backup code against the in-memory fake
//!
//! The [`memory`] backend is a product for your tests: sparse (a 1 TiB disk costs nothing),
//! stateful, with extents, dirty bitmaps and failure injection. The backup logic below is what
//! runs in production against NBD or VDDK: a full copy, then incremental ones of what a dirty
//! bitmap marks changed, all through the pipelined [`copy`] engine (a few request-sized buffers,
//! whatever the disk's size; holes are never read).
//!
//! ```
//! use disk_transport::copy::{copy, copy_changed, CopyError, CopyOptions};
//! use disk_transport::memory::{Fault, MemoryDisk, MemoryTransport, CHUNK_SIZE};
//! use disk_transport::{ConnectParams, Disk, DiskTransport, Error, OpenFlags};
//!
//! /// The code under test: a full backup of `vm` into `backup`, or with `incremental` only
//! /// what changed since the last one. Returns the bytes read from the VM's disk.
//! fn backup(vm: &dyn Disk, backup: &dyn Disk, incremental: bool) -> Result<u64, CopyError> {
//!     let options = CopyOptions::default().retries(2);
//!     let report = if incremental {
//!         copy_changed(vm, backup, &options, &mut |_| {})?
//!     } else {
//!         copy(vm, backup, &options, &mut |_| {})?
//!     };
//!     Ok(report.progress.read)
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vm_disk = MemoryDisk::new(1 << 40); // 1 TiB, sparse
//! vm_disk.write_at(b"boot sector", 0)?;
//! vm_disk.write_at(b"some data", 512 << 30)?;
//! vm_disk.add_dirty_bitmap("checkpoint-1")?; // taken with the full backup
//! let transport = MemoryTransport::new()
//!     .with_disk("[datastore1] vm/vm.vmdk", vm_disk.clone())
//!     .with_disk("backup.img", MemoryDisk::new(1 << 40));
//!
//! let connection = transport.connect(&ConnectParams::builder().read_write().build()?)?;
//! let src = connection.open("[datastore1] vm/vm.vmdk", OpenFlags::read_only())?;
//! let dst = connection.open("backup.img", OpenFlags::read_write())?;
//! assert_eq!(backup(src.as_ref(), dst.as_ref(), false)?, 2 * CHUNK_SIZE); // two chunks hold data
//!
//! // The guest writes; the incremental backup reads only the chunk it changed.
//! vm_disk.write_at(b"a new file", 7 << 30)?;
//! let changes = vm_disk.dirty_bitmap_handle("checkpoint-1")?;
//! assert_eq!(backup(&changes, dst.as_ref(), true)?, CHUNK_SIZE);
//! let mut check = [0u8; 10];
//! dst.read_at(&mut check, 7 << 30)?;
//! assert_eq!(&check, b"a new file");
//!
//! // And the unhappy path: a bad sector, which two retries do not cure.
//! vm_disk.inject(Fault::read_at(512 << 30));
//! let failed = backup(src.as_ref(), dst.as_ref(), false).unwrap_err();
//! assert!(matches!(failed.error, Error::Injected { offset, .. } if offset == 512 << 30));
//! assert_eq!(failed.report.progress.retried, 2);
//! # Ok(())
//! # }
//! ```
//!
//! # Backends
//!
//! | backend | module | reaches | extents from |
//! |---|---|---|---|
//! | in-memory fake | [`memory`] | named sparse disks in this process | allocated chunks |
//! | sink | [`null`] | nothing (like nbdcopy's `null:`) | all holes |
//! | raw files, block devices | `file` | local paths, optionally `O_DIRECT` | `SEEK_DATA`/`SEEK_HOLE` |
//! | NBD client | `nbd` | qemu-nbd, nbdkit, qemu's NBD server, ... | `base:allocation`, `qemu:dirty-bitmap:*` |
//! | qcow2 images | `qcow2` | local `.qcow2` files and their backing chains | L1/L2 tables (data, zero, backing) |
//! | VDDK | `vddk` | vSphere (SAN, HotAdd, NBD/NBDSSL) and local VMDKs | `QueryAllocatedBlocks` |
//!
//! Copies between any two of them go through [`copy::copy`] (whole disks),
//! [`copy::copy_changed`] (incremental backups from the source's dirty bitmap,
//! [`Disk::dirty_extents`]) or [`copy::copy_extents`] (from a change list you have). Streams,
//! such as standard input and output (`-`, as nbdcopy names them), go through
//! [`stream::copy_to_stream`] and [`stream::copy_from_stream`].
//!
//! # Failure model
//!
//! Every network wait has a deadline: a request without a reply in time fails with
//! [`Error::Timeout`] naming its offset and the connection is closed, so no call hangs. A lost
//! connection fails every waiting request with [`Error::Disconnected`]. Short reads are protocol
//! errors, never zero-filled data. Server errors keep the server's errno ([`Error::nbd_errno`])
//! or VDDK code ([`Error::vix_code`]).
//!
//! # Features
//!
//! - `nbd` (default): `disk_transport::nbd`, a pure-Rust NBD client.
//! - `file` (default): `disk_transport::file`, raw image files with `O_DIRECT` and `SEEK_DATA`/`SEEK_HOLE`.
//! - `qcow2` (default): `disk_transport::qcow2`, qcow2 images (create, read, write, backing
//!   chains, compressed reads), on the spec; pulls in `miniz_oxide` for compressed clusters.
//! - `vddk` (default): `disk_transport::vddk`, VMware VDDK (`libvixDiskLib.so`) loaded at run time;
//!   nothing is linked, so it builds everywhere.
//! - `mock`: mockall mocks of the traits (`MockDiskTransport`, `MockConnection`, `MockDisk`).

// The only unsafe code allowed is the FFI layer of a VDDK backend (`vddk::ffi`), which must opt in
// with `#[allow(unsafe_code)]`; everything else stays safe.
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;
use std::time::Duration;

mod access;
mod error;
// The traits live in a private module so that the `__mock_*` modules mockall generates next to
// them (feature `mock`) stay out of the documentation; the traits and mocks are re-exported.
mod mode;
mod params;
mod traits;
mod types;

pub mod blkhash;
pub mod compare;
pub mod config;
pub mod copy;
pub mod factory;
pub mod memory;
pub mod null;
pub mod stream;
pub mod uri;

#[cfg(feature = "file")]
#[cfg_attr(docsrs, doc(cfg(feature = "file")))]
pub mod file;
#[cfg(feature = "nbd")]
#[cfg_attr(docsrs, doc(cfg(feature = "nbd")))]
pub mod nbd;
#[cfg(feature = "qcow2")]
#[cfg_attr(docsrs, doc(cfg(feature = "qcow2")))]
pub mod qcow2;
#[cfg(feature = "tls")]
mod tls;
#[cfg(all(feature = "vddk", unix))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "vddk", unix))))]
pub mod vddk;

pub use access::AccessGuard;
pub use config::{Config, ConfigCheck, ConfigWarning};
pub use error::{nbd_errno_name, vix, vix_hint, Error, Result};
pub use factory::open_uri;
pub use mode::{
    default_transport_priority, format_transport_modes, parse_transport_modes, select_transport,
    StorageKind, TransportContext, TransportMode, TransportPlan, ALL_TRANSPORT_MODES,
    DEFAULT_NETWORK_PRIORITY, DIRECT_IO_ALIGNMENT,
};
pub use params::{
    check_snapshot_moref, check_vm_spec, Compression, ConnectParams, ConnectParamsBuilder,
    Credentials, OpenFlags, Secret, Thumbprint,
};
pub use traits::{Connection, Disk, DiskTransport};
#[cfg(feature = "mock")]
pub use traits::{MockConnection, MockDisk, MockDiskTransport};
pub use types::{
    clip_extents, push_dirty_extent, push_extent, AdapterType, DirtyExtent, DiskInfo, Extent,
    ExtentKind, Geometry, ProtocolInfo,
};
pub use uri::{
    parse_size, percent_decode, DiskUri, IntoDiskUri, NbdAddress, NbdTls, VddkTarget, VddkUri,
    VDDK_PASSWORD_ENV,
};

/// Called when a submitted read completes: the filled buffer, or the error.
pub type ReadCompletion = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;
/// Called when a submitted write completes: the buffer back (for reuse), or the error.
pub type WriteCompletion = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;

/// What `VixDiskLib_Cleanup` reports.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct CleanupStats {
    /// VMs whose leftover state was removed.
    pub cleaned_up: u32,
    /// VMs still needing cleanup.
    pub remaining: u32,
}

/// Reads that complete on the thread that owns the queue, inside [`drive`](Self::drive) and
/// nowhere else: a thread that both waits for reads and works on their data reads the replies
/// itself instead of being woken by another thread for each one. Get one from
/// [`Disk::driven_queue`]; it belongs to one thread at a time (it is `Send`, not `Sync`).
///
/// Requests still waiting when the queue is dropped complete with
/// [`Error::Disconnected`] (on the dropping thread).
pub trait DrivenQueue: Send + fmt::Debug {
    /// Starts a read of `buf.len()` bytes at `offset`; `done` runs inside a later
    /// [`drive`](Self::drive), or here at once when the request cannot be sent (bad range, the
    /// connection has ended).
    fn submit_read(&mut self, offset: u64, buf: Vec<u8>, done: ReadCompletion);

    /// Waits at most `wait` for replies and runs the completions of the requests they finish;
    /// returns how many replies it read (0 when none came in time). A request older than the
    /// backend's timeout, or a broken connection, completes every waiting request with its
    /// error.
    fn drive(&mut self, wait: Duration) -> usize;
}

/// Implements [`Disk`] for a pointer by forwarding every method, the provided ones included, so
/// a backend's (or a mock's) own answer survives the `Box<dyn Disk>` or `Arc<dyn Disk>` it is
/// handed out in. `clippy::missing_trait_methods` keeps the list complete when the trait grows.
macro_rules! forward_disk {
    ($($pointer:tt)*) => {
        #[deny(clippy::missing_trait_methods)]
        impl<D: Disk + ?Sized> Disk for $($pointer)* {
            fn info(&self) -> Result<DiskInfo> {
                (**self).info()
            }

            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                (**self).read_at(buf, offset)
            }

            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_at(buf, offset)
            }

            fn flush(&self) -> Result<()> {
                (**self).flush()
            }

            fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
                (**self).allocated_extents(offset, length)
            }

            fn dirty_extents(&self, offset: u64, length: u64) -> Result<Vec<DirtyExtent>> {
                (**self).dirty_extents(offset, length)
            }

            fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
                (**self).write_zeroes(offset, length)
            }

            fn trim(&self, offset: u64, length: u64) -> Result<()> {
                (**self).trim(offset, length)
            }

            fn metadata_keys(&self) -> Result<Vec<String>> {
                (**self).metadata_keys()
            }

            fn read_metadata(&self, key: &str) -> Result<String> {
                (**self).read_metadata(key)
            }

            fn write_metadata(&self, key: &str, value: &str) -> Result<()> {
                (**self).write_metadata(key, value)
            }

            fn submit_read(&self, offset: u64, buf: Vec<u8>, done: ReadCompletion) {
                (**self).submit_read(offset, buf, done)
            }

            fn submit_write(&self, offset: u64, buf: Vec<u8>, done: WriteCompletion) {
                (**self).submit_write(offset, buf, done)
            }

            fn max_in_flight(&self) -> usize {
                (**self).max_in_flight()
            }

            fn discards_writes(&self) -> bool {
                (**self).discards_writes()
            }

            fn protocol(&self) -> Option<ProtocolInfo> {
                (**self).protocol()
            }

            fn driven_queue(&self) -> Result<Option<Box<dyn DrivenQueue>>> {
                (**self).driven_queue()
            }
        }
    };
}

forward_disk!(Box<D>);
forward_disk!(std::sync::Arc<D>);
forward_disk!(&D);

/// Implements [`DiskTransport`] and [`Connection`] for a pointer by forwarding every method.
macro_rules! forward_transport_and_connection {
    ($($pointer:tt)*) => {
        #[deny(clippy::missing_trait_methods)]
        impl<T: DiskTransport + ?Sized> DiskTransport for $($pointer)*<T> {
            fn name(&self) -> &'static str {
                (**self).name()
            }

            fn transport_modes(&self) -> Vec<TransportMode> {
                (**self).transport_modes()
            }

            fn list_transport_modes(&self) -> String {
                (**self).list_transport_modes()
            }

            fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>> {
                (**self).connect(params)
            }

            fn prepare_for_access(
                &self,
                params: &ConnectParams,
                identity: &str,
            ) -> Result<AccessGuard> {
                (**self).prepare_for_access(params, identity)
            }

            fn cleanup(&self, params: &ConnectParams) -> Result<CleanupStats> {
                (**self).cleanup(params)
            }
        }

        #[deny(clippy::missing_trait_methods)]
        impl<C: Connection + ?Sized> Connection for $($pointer)*<C> {
            fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
                (**self).open(path, flags)
            }

            fn read_only(&self) -> bool {
                (**self).read_only()
            }
        }
    };
}

forward_transport_and_connection!(Box);
forward_transport_and_connection!(std::sync::Arc);

/// Makes `[offset, offset + length)` read as zeros by writing `zeros`, an all-zero buffer, as
/// many times as it takes: the fallback of [`Disk::write_zeroes`].
pub(crate) fn write_zeros_from<D: Disk + ?Sized>(
    disk: &D,
    zeros: &[u8],
    offset: u64,
    length: u64,
) -> Result<()> {
    let mut done = 0;
    while done < length {
        let n = (length - done).min(zeros.len() as u64) as usize;
        disk.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Checks that `[offset, offset + length)` lies within a disk of `capacity` bytes.
pub fn check_range(offset: u64, length: u64, capacity: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            length,
            capacity,
        }),
    }
}

#[cfg(all(test, feature = "mock"))]
mod forwarding_tests {
    use std::sync::Arc;

    use super::*;

    /// The provided methods are the ones a pointer could silently bypass: a mock's expectation
    /// on each answers through `Box<dyn Disk>`, `Arc<dyn Disk>` and `&dyn Disk` alike.
    #[test]
    fn pointers_forward_the_provided_methods_to_the_mock() {
        fn check(disk: &impl Disk) {
            assert_eq!(disk.max_in_flight(), 7);
            assert_eq!(disk.metadata_keys().unwrap(), ["uuid"]);
            assert_eq!(disk.read_metadata("uuid").unwrap(), "42");
            disk.write_metadata("uuid", "43").unwrap();
            disk.write_zeroes(0, 4096).unwrap();
            disk.trim(0, 4096).unwrap();
            assert!(disk.dirty_extents(0, 4096).unwrap().is_empty());
            assert!(disk.protocol().is_none());
        }
        let mock = || {
            let mut mock = MockDisk::new();
            mock.expect_max_in_flight().return_const(7_usize);
            mock.expect_metadata_keys()
                .returning(|| Ok(vec!["uuid".to_owned()]));
            mock.expect_read_metadata()
                .returning(|_| Ok("42".to_owned()));
            mock.expect_write_metadata().returning(|_, _| Ok(()));
            mock.expect_write_zeroes().times(1).returning(|_, _| Ok(()));
            mock.expect_trim().times(1).returning(|_, _| Ok(()));
            mock.expect_dirty_extents().returning(|_, _| Ok(Vec::new()));
            mock.expect_protocol().returning(|| None);
            mock
        };
        let boxed: Box<dyn Disk> = Box::new(mock());
        check(&boxed);
        let shared: Arc<dyn Disk> = Arc::new(mock());
        check(&shared);
        let plain = mock();
        let by_ref: &dyn Disk = &plain;
        check(&by_ref);
    }
}
