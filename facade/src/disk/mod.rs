//! Virtual disks by URI, for every backend this build has.

pub mod vddk_uri;

use std::path::Path;

use disk_transport::{Disk, DiskUri, OpenFlags, Result};

/// Opens the disk `uri` names: `file:///path` (or a bare path), `nbd://host[:port]/export`,
/// `nbd+unix:///export?socket=PATH`, `mem://NAME?size=SIZE`, `vddk://…` (see [`vddk_uri`]).
///
/// ```
/// use vmsdk::disk_transport::OpenFlags;
///
/// let disk = vmsdk::disk::open("mem://example?size=1M", OpenFlags::read_write())?;
/// disk.write_at(b"hello", 4096)?;
/// assert_eq!(disk.info()?.capacity, 1 << 20);
/// # Ok::<(), vmsdk::disk_transport::Error>(())
/// ```
pub fn open(uri: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    if uri.starts_with("vddk://") {
        let target = vddk_uri::parse(uri, flags, std::env::var(vddk_uri::PASSWORD_ENV).ok())?;
        let transport = disk_transport::vddk::VddkTransport::from_params(&target.params)?;
        let connection = transport.connect_vddk(&target.params)?;
        // The disk keeps its connection alive; dropping ours here is fine.
        return Ok(Box::new(connection.open_disk(&target.path, flags)?));
    }
    disk_transport::open_uri(&normalize(uri), flags)
}

/// A bare relative path (`disk.img`, as people type on a command line) names a file.
fn normalize(uri: &str) -> std::borrow::Cow<'_, str> {
    if uri.contains(':') || uri.starts_with('/') || uri.starts_with("./") {
        uri.into()
    } else {
        format!("./{uri}").into()
    }
}

/// Opens `uri` for writing, creating it as a sparse file of `size` bytes when it names a file
/// that does not exist. Returns the disk and whether it was created (so it reads as zeros and a
/// copy may skip writing zeros).
pub fn open_or_create(uri: &str, size: u64) -> Result<(Box<dyn Disk>, bool)> {
    if let DiskUri::File { path, .. } = normalize(uri).parse::<DiskUri>()? {
        if !Path::new(&path).exists() {
            let disk = disk_transport::file::FileDisk::create(&path, size)?;
            return Ok((Box::new(disk), true));
        }
    }
    Ok((open(uri, OpenFlags::read_write())?, false))
}
