//! Virtual disks by URI, for every backend this build has.
//!
//! Disk calls are blocking: a read, write, flush or copy takes as long as the storage and the
//! network take. In an async program run them with `tokio::task::spawn_blocking`; a disk is
//! `Send + Sync`, so an `Arc<dyn Disk>` can be shared between blocking tasks:
//!
//! ```
//! use std::sync::Arc;
//! use vmsdk::disk::{Disk, OpenFlags};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> vmsdk::Result<()> {
//! let disk: Arc<dyn Disk> = vmsdk::disk::open("mem://scratch?size=1M", OpenFlags::read_write())?.into();
//! let writer = Arc::clone(&disk);
//! tokio::task::spawn_blocking(move || writer.write_at(b"boot", 0))
//!     .await
//!     .expect("the blocking task panicked")?;
//! let mut sector = [0; 4];
//! disk.read_at(&mut sector, 0)?;
//! assert_eq!(&sector, b"boot");
//! # Ok(())
//! # }
//! ```
//!
//! Unit-test code that takes a `&dyn Disk` against [`MemoryDisk`], or against
//! `vmsdk::mock::MockDisk` (feature `mock`).
//!
//! VMware VDDK's lifecycle (PrepareForAccess/EndAccess, the transport plan, connections,
//! Cleanup, shutdown) is in [`vddk`], with an in-memory vCenter for unit tests.

#[cfg(unix)]
pub mod vddk;
pub mod vddk_uri;

pub use disk_transport::factory::NULL_SINK;
pub use disk_transport::memory::MemoryDisk;
pub use disk_transport::{blkhash, compare, copy, qcow2, stream};
pub use disk_transport::{
    DirtyExtent, Disk, DiskInfo, DiskUri, DrivenQueue, Extent, ExtentKind, IntoDiskUri, OpenFlags,
    ProtocolInfo,
};

use crate::Result;

/// Opens the disk `uri` names: `file:///path` (or a path), `nbd://host[:port]/export`,
/// `nbd+unix:///export?socket=PATH`, `nbds://…` and `nbds+unix://…` (TLS, feature `tls`),
/// `mem://NAME?size=SIZE`, `null:?size=SIZE`, `vddk://…` (see [`vddk_uri`]). One parser
/// ([`DiskUri`]) and one factory ([`disk_transport::factory`]) serve every backend.
///
/// ```
/// use vmsdk::disk::OpenFlags;
///
/// let disk = vmsdk::disk::open("mem://example?size=1M", OpenFlags::read_write())?;
/// disk.write_at(b"hello", 4096)?;
/// assert_eq!(disk.info()?.capacity, 1 << 20);
/// # Ok::<(), vmsdk::Error>(())
/// ```
///
/// A [`Path`](std::path::Path) or `PathBuf` is a file, however it is spelled (a path is never
/// read as a URI), and a [`DiskUri`] is taken as built:
///
/// ```
/// use std::path::PathBuf;
/// use vmsdk::disk::{DiskUri, OpenFlags};
///
/// let image: PathBuf = std::env::temp_dir().join(format!("vmsdk-open-doc-{}.img", std::process::id()));
/// std::fs::write(&image, vec![0u8; 65536]).unwrap();
/// let disk = vmsdk::disk::open(&image, OpenFlags::read_only())?;
/// assert_eq!(disk.info()?.capacity, 65536);
/// let uri = DiskUri::file(&image);
/// println!("opened {uri}"); // file:///tmp/vmsdk-open-doc-….img
/// assert_eq!(vmsdk::disk::open(uri, OpenFlags::read_only())?.info()?.capacity, 65536);
/// # std::fs::remove_file(&image).unwrap();
/// # Ok::<(), vmsdk::Error>(())
/// ```
pub fn open(uri: impl IntoDiskUri, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    Ok(disk_transport::factory::open(uri, flags)?)
}

/// How many NBD connections to ask for by default to reach `uri`: one over a plaintext Unix
/// socket (a local server gains nothing from more: qemu-nbd serves them all from one thread),
/// else one per CPU, at most 4, as nbdcopy; see
/// [`disk_transport::factory::default_connections`].
///
/// ```
/// assert_eq!(vmsdk::disk::default_connections("nbd+unix:///disk?socket=/run/s.sock"), 1);
/// ```
pub fn default_connections(uri: &str) -> usize {
    disk_transport::factory::default_connections(uri)
}

/// Returns `uri` asking for up to `connections` NBD connections when it is an NBD URI that
/// does not say `connections=` itself; any other URI comes back unchanged. The client opens
/// more than one only when the server advertises multi-conn, so this is safe for any server.
/// More connections pay off when each request waits on the server (a slow disk, a network,
/// VDDK behind nbdkit); [`default_connections`] says how many to ask for.
///
/// ```
/// let uri = vmsdk::disk::with_default_connections("nbd+unix:///disk?socket=/run/s.sock", 2);
/// assert_eq!(uri, "nbd+unix:///disk?socket=/run/s.sock&connections=2");
/// let uri = vmsdk::disk::with_default_connections("nbd://host/disk?connections=1", 4);
/// assert_eq!(uri, "nbd://host/disk?connections=1");
/// assert_eq!(vmsdk::disk::with_default_connections("disk.img", 4), "disk.img");
/// ```
pub fn with_default_connections(uri: &str, connections: usize) -> String {
    disk_transport::factory::with_default_connections(uri, connections)
}

/// Opens `uri` for writing, creating it as a sparse file of `size` bytes when it names a file
/// that does not exist; [`NULL_SINK`] (`null:`) is a [`NullDisk`](disk_transport::null::NullDisk)
/// of `size` bytes. Returns the disk and whether it reads as zeros (created, or the null sink),
/// so a copy may skip writing zeros.
///
/// ```
/// let (sink, reads_as_zero) = vmsdk::disk::open_or_create("null:", 1 << 30)?;
/// assert!(reads_as_zero);
/// assert_eq!(sink.info()?.capacity, 1 << 30);
/// # Ok::<(), vmsdk::Error>(())
/// ```
pub fn open_or_create(uri: &str, size: u64) -> Result<(Box<dyn Disk>, bool)> {
    Ok(disk_transport::factory::open_or_create(uri, size)?)
}
