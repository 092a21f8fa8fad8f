//! Opening a disk by URI: the one place that knows every backend.
//!
//! [`DiskUri`] parses (see [`uri`](crate::uri) for the syntax); this module turns a parsed URI
//! into an open [`Disk`] of whichever backend it names and this build has (features `file`,
//! `nbd`, `tls`, `vddk`), as cloud-hypervisor's `block::factory` does for its disk images. The
//! parser knows no backend and the backends know no URI syntax.
//!
//! ```
//! use disk_transport::{factory, OpenFlags};
//!
//! # fn main() -> disk_transport::Result<()> {
//! let disk = factory::open("mem://factory-doc?size=1M", OpenFlags::read_write())?;
//! disk.write_at(b"hello", 4096)?;
//! let (sink, reads_as_zero) = factory::open_or_create("null:", 1 << 30)?;
//! assert!(reads_as_zero && sink.info()?.capacity == 1 << 30);
//! # Ok(())
//! # }
//! ```

use crate::uri::{DiskUri, NbdAddress, VddkUri, VDDK_PASSWORD_ENV};
use crate::{Disk, Error, OpenFlags, Result};

/// The destination that discards everything, as nbdcopy names it: for measuring how fast a
/// source can be read.
pub const NULL_SINK: &str = "null:";

/// Opens the disk `uri` names: `file:///path` or a path, a qcow2 image (`NAME.qcow2`,
/// `qcow2:NAME`), `nbd://`, `nbd+unix://`, `nbds://`,
/// `nbds+unix://`, `mem://NAME?size=SIZE`, `null:?size=SIZE`, `vddk://…` (the password of a
/// user comes from [`VDDK_PASSWORD_ENV`]). `flags.read_only` opens read-only.
///
/// `-` is no disk but a stream (standard input or output, as nbdcopy takes it): it fails with
/// [`Error::InvalidUri`] pointing to [`stream`](crate::stream), whose copies take it.
///
/// A [`Path`](std::path::Path) or `PathBuf` is always a file, however it is spelled, and a
/// [`DiskUri`] is taken as built (see [`IntoDiskUri`](crate::uri::IntoDiskUri)).
pub fn open(uri: impl crate::uri::IntoDiskUri, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    uri.into_disk_uri()?.open(flags)
}

/// `-` names standard input or output, which cannot seek: never a file named `-`.
pub(crate) fn refuse_stream(uri: &str) -> Result<()> {
    if crate::stream::is_stdio(uri) {
        return Err(Error::InvalidUri {
            uri: uri.to_owned(),
            reason: "`-` is standard input or output, a stream and not a disk: copy from or \
                to it with stream::copy_from_stream or stream::copy_to_stream (`vmsdk disk \
                copy - DST`, `vmsdk disk copy SRC -`); for a file named `-` write ./-"
                .into(),
        });
    }
    Ok(())
}

/// [`open`] under its older name.
pub fn open_uri(uri: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    open(uri, flags)
}

/// Opens `uri` for writing, creating it as a sparse file of `size` bytes when it names a file
/// that does not exist (a qcow2 image with 64 KiB clusters when it names one); `null:` is a [`NullDisk`](crate::null::NullDisk) of `size` bytes.
/// Returns the disk and whether it reads as zeros (created, or the null sink), so a copy may
/// skip writing zeros.
pub fn open_or_create(uri: &str, size: u64) -> Result<(Box<dyn Disk>, bool)> {
    refuse_stream(uri)?;
    match uri.parse::<DiskUri>()? {
        DiskUri::Null { size: given } => Ok((
            Box::new(crate::null::NullDisk::new(given.unwrap_or(size))),
            true,
        )),
        #[cfg(feature = "file")]
        DiskUri::File { path, .. } if !std::path::Path::new(&path).exists() => {
            let disk = crate::file::FileDisk::create(&path, size)?;
            Ok((Box::new(disk), true))
        }
        #[cfg(feature = "qcow2")]
        DiskUri::Qcow2 { path } if !path.exists() => {
            let disk =
                crate::qcow2::Qcow2Disk::create(&path, &crate::qcow2::CreateOptions::new(size))?;
            Ok((Box::new(disk), true))
        }
        parsed => Ok((parsed.open(OpenFlags::read_write())?, false)),
    }
}

/// Creates the qcow2 image `uri` (a `.qcow2` name or a `qcow2:` URI; it must not exist) of
/// `size` bytes on top of the backing image `backing` (a `.qcow2` or `qcow2:` name is a qcow2
/// image, anything else raw): an incremental backup holding only what gets written to it.
///
/// The backing name goes into the header relative to the new image's directory when the
/// backing file lies in it or below (the chain can move as one directory), absolute otherwise.
#[cfg(feature = "qcow2")]
pub fn create_overlay(uri: &str, size: u64, backing: &str) -> Result<crate::qcow2::Qcow2Disk> {
    use crate::qcow2::{BackingFormat, CreateOptions, Qcow2Disk};
    let DiskUri::Qcow2 { path } = uri.parse::<DiskUri>()? else {
        return Err(Error::InvalidUri {
            uri: uri.to_owned(),
            reason: "an image with a backing file is a qcow2 image: name it NAME.qcow2 or \
                qcow2:NAME"
                .into(),
        });
    };
    let (backing_path, format) = match backing.parse::<DiskUri>()? {
        DiskUri::Qcow2 { path } => (path, BackingFormat::Qcow2),
        DiskUri::File { path, .. } => (path, BackingFormat::Raw),
        _ => {
            return Err(Error::InvalidUri {
                uri: backing.to_owned(),
                reason: "a backing file is a local qcow2 or raw image".into(),
            })
        }
    };
    let absolute = std::fs::canonicalize(&backing_path).map_err(|e| {
        Error::io(
            format!("open backing file {}", backing_path.display()),
            None,
            e,
        )
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("open directory {}", dir.display()), None, e))?;
    let name = match absolute.strip_prefix(&dir) {
        Ok(relative) => relative.to_path_buf(),
        Err(_) => absolute.clone(),
    };
    let name = name.to_str().ok_or_else(|| Error::InvalidUri {
        uri: backing.to_owned(),
        reason: "the backing file's path is not UTF-8".into(),
    })?;
    Qcow2Disk::create(&path, &CreateOptions::new(size).backing(name, format))
}

/// How many NBD connections a tool should ask for by default to reach `uri` (what `vmsdk
/// disk copy` and `disk checksum` do without `--connections`): one over a plaintext Unix
/// socket, else one per CPU, at most 4, as nbdcopy does.
///
/// A server on a Unix socket shares this machine's CPUs, and one connection carries any
/// number of requests in flight. qemu-nbd serves every connection from its one main loop, so
/// a second connection adds a reader thread on each side and no throughput: copying 2 GiB
/// from qemu-nbd 7.2 into a file on tmpfs took 0.94 s over one connection and 1.24 s over two,
/// from qemu-nbd 10.0 1.06 and 1.15 s, and writing into a qemu-nbd export took the same (2
/// CPUs; medians of 3). Over TCP and TLS each connection is a flow of its own, which can pay
/// off on a network.
///
/// ```
/// use disk_transport::factory::default_connections;
///
/// assert_eq!(default_connections("nbd+unix:///disk?socket=/run/s.sock"), 1);
/// assert!((1..=4).contains(&default_connections("nbd://host/disk")));
/// assert_eq!(default_connections("disk.img"), 1);
/// ```
pub fn default_connections(uri: &str) -> usize {
    match uri.parse::<DiskUri>() {
        Ok(DiskUri::Nbd {
            address: NbdAddress::Tcp { .. },
            ..
        })
        | Ok(DiskUri::Nbd { tls: Some(_), .. }) => crate::copy::default_threads(),
        _ => 1,
    }
}

/// Returns `uri` asking for up to `connections` NBD connections when it is an NBD URI that
/// does not say `connections=` itself; any other URI comes back unchanged. The client opens
/// more than one only when the server advertises multi-conn, so this is safe for any server.
/// More connections pay off when each request waits on the server (a slow disk, a network,
/// TLS, VDDK behind nbdkit); [`default_connections`] says how many to ask for.
///
/// ```
/// use disk_transport::factory::with_default_connections;
///
/// let uri = with_default_connections("nbd+unix:///disk?socket=/run/s.sock", 2);
/// assert_eq!(uri, "nbd+unix:///disk?socket=/run/s.sock&connections=2");
/// assert_eq!(with_default_connections("nbd://host/disk?connections=1", 4), "nbd://host/disk?connections=1");
/// assert_eq!(with_default_connections("disk.img", 4), "disk.img");
/// ```
pub fn with_default_connections(uri: &str, connections: usize) -> String {
    match uri.parse::<DiskUri>() {
        Ok(DiskUri::Nbd {
            connections: None, ..
        }) if connections > 1 => {
            let separator = if uri.contains('?') { '&' } else { '?' };
            format!("{uri}{separator}connections={connections}")
        }
        _ => uri.to_owned(),
    }
}

#[cfg(all(feature = "vddk", unix))]
fn open_vddk(vddk: &VddkUri, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    let target = vddk.target(flags, std::env::var(VDDK_PASSWORD_ENV).ok())?;
    let transport = crate::vddk::VddkTransport::from_params(&target.params)?;
    let connection = transport.connect_vddk(&target.params)?;
    // The disk keeps its connection alive; dropping ours here is fine.
    Ok(Box::new(connection.open_disk(&target.path, flags)?))
}

#[cfg(not(all(feature = "vddk", unix)))]
fn open_vddk(vddk: &VddkUri, flags: OpenFlags) -> Result<Box<dyn Disk>> {
    let _ = (vddk, flags, VDDK_PASSWORD_ENV);
    Err(Error::Unsupported(
        "vddk:// (disk-transport was built without the `vddk` feature)".into(),
    ))
}

impl DiskUri {
    /// Opens the disk this URI names (see [`open`]).
    pub fn open(&self, flags: OpenFlags) -> Result<Box<dyn Disk>> {
        match self {
            DiskUri::Null { size } => {
                let size = size.ok_or_else(|| {
                    Error::InvalidParams(
                        "null: needs a size to be opened on its own (null:?size=1G); as a copy \
                         destination it takes the source's"
                            .into(),
                    )
                })?;
                Ok(Box::new(crate::null::NullDisk::new(size)))
            }
            DiskUri::Vddk(vddk) => open_vddk(vddk, flags),
            DiskUri::Memory { name, size } => {
                let registry = crate::memory::shared();
                let disk = match (registry.disk(name), size) {
                    (Some(disk), Some(size)) if disk.capacity() != *size => {
                        return Err(Error::InvalidParams(format!(
                            "memory disk {name:?} exists with {} bytes, not {size}",
                            disk.capacity()
                        )))
                    }
                    (Some(disk), _) => disk,
                    (None, Some(size)) => {
                        let disk = crate::memory::MemoryDisk::new(*size);
                        registry.insert(name.clone(), disk.clone());
                        disk
                    }
                    (None, None) => {
                        return Err(Error::NotFound(format!(
                            "memory disk {name:?}; give ?size=SIZE to create it"
                        )))
                    }
                };
                Ok(Box::new(if flags.read_only {
                    disk.read_only_handle()
                } else {
                    disk
                }))
            }
            DiskUri::File { path, direct } => {
                #[cfg(feature = "file")]
                {
                    let options = crate::file::FileOptions {
                        read_only: flags.read_only,
                        direct: *direct || flags.unbuffered,
                        create_size: None,
                    };
                    Ok(Box::new(crate::file::FileDisk::open(path, &options)?))
                }
                #[cfg(not(feature = "file"))]
                {
                    let _ = (path, direct);
                    Err(Error::Unsupported(
                        "file:// (disk-transport was built without the `file` feature)".into(),
                    ))
                }
            }
            DiskUri::Qcow2 { path } => {
                #[cfg(feature = "qcow2")]
                {
                    Ok(Box::new(crate::qcow2::Qcow2Disk::open(
                        path,
                        flags.read_only,
                    )?))
                }
                #[cfg(not(feature = "qcow2"))]
                {
                    let _ = path;
                    Err(Error::Unsupported(
                        "qcow2 images (disk-transport was built without the `qcow2` feature)"
                            .into(),
                    ))
                }
            }
            DiskUri::Nbd {
                address,
                export,
                tls,
                timeout,
                dirty_bitmap,
                connections,
            } => {
                #[cfg(feature = "nbd")]
                {
                    let mut options = crate::nbd::NbdOptions::new(address.clone())
                        .export(export.clone())
                        .read_only(flags.read_only);
                    if let Some(tls) = tls {
                        options = options.tls(tls.clone());
                    }
                    if let Some(t) = timeout {
                        options = options.timeout(*t);
                    }
                    if let Some(b) = dirty_bitmap {
                        options = options.dirty_bitmap(b.clone());
                    }
                    if let Some(n) = connections {
                        options = options.connections(*n);
                    }
                    Ok(Box::new(crate::nbd::NbdDisk::connect(&options)?))
                }
                #[cfg(not(feature = "nbd"))]
                {
                    let _ = (address, export, tls, timeout, dirty_bitmap, connections);
                    Err(Error::Unsupported(
                        "nbd:// (disk-transport was built without the `nbd` feature)".into(),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_relative_paths_and_nbd_connections() {
        let (sink, zero) = open_or_create("null:", 4096).unwrap();
        assert!(zero);
        assert_eq!(sink.info().unwrap().capacity, 4096);
        assert_eq!(
            open("null:?size=1M", OpenFlags::read_only())
                .unwrap()
                .info()
                .unwrap()
                .capacity,
            1 << 20
        );
        assert!(open("null:", OpenFlags::read_only())
            .unwrap_err()
            .to_string()
            .contains("size"));
        assert_eq!(
            with_default_connections("nbds://h/x?tls-psk-file=/k", 3),
            "nbds://h/x?tls-psk-file=/k&connections=3"
        );
        assert_eq!(
            with_default_connections("mem://a?size=1M", 3),
            "mem://a?size=1M"
        );
    }

    #[cfg(feature = "file")]
    #[test]
    fn missing_files_are_created_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.img");
        let (disk, zero) = open_or_create(path.to_str().unwrap(), 1 << 20).unwrap();
        assert!(zero);
        assert_eq!(disk.info().unwrap().capacity, 1 << 20);
        drop(disk);
        let (_, zero) = open_or_create(path.to_str().unwrap(), 1 << 20).unwrap();
        assert!(!zero);
    }

    #[test]
    fn a_dash_is_a_stream_not_a_file() {
        for result in [
            open("-", OpenFlags::read_only()).map(|_| ()),
            open_or_create("-", 4096).map(|_| ()),
        ] {
            let err = result.unwrap_err();
            assert!(matches!(err, Error::InvalidUri { .. }), "{err}");
            assert!(err.to_string().contains("copy_to_stream"), "{err}");
        }
    }

    #[test]
    fn vddk_without_password_names_the_variable() {
        let err = match open(
            "vddk://root@esx/disk.vmdk?vm=moref=vm-1",
            OpenFlags::read_only(),
        ) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened"),
        };
        assert!(
            err.contains(VDDK_PASSWORD_ENV) || err.contains("vddk"),
            "{err}"
        );
    }
}
