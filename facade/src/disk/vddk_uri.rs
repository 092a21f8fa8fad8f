//! `vddk://` URIs: a VMware virtual disk reached through VDDK (libvixDiskLib loaded at run time).
//! Parsed by disk-transport's [`DiskUri`] like every disk URI; see [`VddkUri`] for the syntax.
//!
//! ```text
//! vddk://USER@SERVER[:PORT]/DISK-PATH?vm=moref=vm-16&snapshot=snapshot-47&thumbprint=AA:..:99
//!        &transports=nbdssl:nbd&libdir=/opt/vmware-vix-disklib-distrib&config=/etc/vddk.conf
//! vddk:///path/to/local.vmdk?libdir=/opt/vmware-vix-disklib-distrib
//! ```
//!
//! The password never goes in the URI, where shell history and logs would keep it: it comes
//! from the `VMSDK_VDDK_PASSWORD` environment variable.

use disk_transport::{DiskUri, Error, OpenFlags, Result};
pub use disk_transport::{VddkTarget, VddkUri, VDDK_PASSWORD_ENV as PASSWORD_ENV};

/// Parses a `vddk://` URI; `password` is consulted only when the URI names a user.
///
/// ```
/// use vmsdk::disk::{vddk_uri, OpenFlags};
///
/// let target = vddk_uri::parse("vddk:///srv/a.vmdk", OpenFlags::read_only(), None)?;
/// assert_eq!(target.path, "/srv/a.vmdk");
/// # Ok::<(), vmsdk::disk_transport::Error>(())
/// ```
pub fn parse(uri: &str, flags: OpenFlags, password: Option<String>) -> Result<VddkTarget> {
    match uri.parse::<DiskUri>()? {
        DiskUri::Vddk(vddk) => vddk.target(flags, password),
        _ => Err(Error::InvalidUri {
            uri: uri.to_owned(),
            reason: "expected vddk://".into(),
        }),
    }
}
