//! VMware VDDK's whole lifecycle through the one `vmsdk` dependency: load and initialise the
//! library ([`VddkTransport`]), plan the transport modes ([`VddkTransport::plan`]), prepare the
//! VM for access ([`AccessGuard`]: EndAccess on every path), connect, open, read, map, close
//! ([`VddkDisk::close`]) and disconnect ([`VddkConnection::disconnect`]) with their errors,
//! clean up after a crash ([`DiskTransport::cleanup`]) and [`shutdown`].
//!
//! [`VddkOptions`] is the one place for the library directory, the InitEx configuration file
//! (checked before InitEx: [`check_config`]) and the log hook. InitEx runs once per process;
//! the `libdir` and `config_path` of [`ConnectParams`] exist for `vddk://` URIs and are only
//! compared with what the process initialised (see [`VddkOptions`]).
//!
//! A backup of a snapshot (needs VDDK and a vCenter; for integration tests without either,
//! point `libdir` at the stand-in library, see disk-transport's README):
//!
//! ```no_run
//! use vmsdk::disk::vddk::{ConnectParams, DiskTransport, Thumbprint, TransportMode, VddkOptions};
//! use vmsdk::disk::{Disk, OpenFlags};
//!
//! # fn main() -> vmsdk::Result<()> {
//! let vddk = vmsdk::disk::vddk::transport(
//!     &VddkOptions::new()
//!         .libdir("/opt/vmware-vix-disklib-distrib")
//!         .config_path("/etc/vmsdk/vddk.conf")
//!         .strict_config(true),
//! )?;
//! let params = ConnectParams::builder()
//!     .server("vcenter.example.com")
//!     .thumbprint(Thumbprint::new("AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD")?)
//!     .user_password("backup@vsphere.local", std::env::var("VC_PASSWORD").unwrap_or_default())
//!     .vm("moref=vm-16")
//!     .snapshot("snapshot-47")
//!     .transport_modes([TransportMode::HotAdd, TransportMode::NbdSsl])
//!     .build()?;
//! println!("will try {:?}", vddk.plan(&params)?);
//! let access = vddk.prepare_for_access(&params, "my-backup")?; // EndAccess on drop, too
//! let connection = vddk.connect_vddk(&params)?;
//! let disk = connection.open_disk("[datastore1] vm/vm.vmdk", OpenFlags::read_only())?;
//! let extents = disk.allocated_extents(0, disk.info()?.capacity)?;
//! println!("{} extents", extents.len());
//! disk.close()?; // Close's error, which a drop could only log
//! connection.disconnect()?;
//! access.end()?; // EndAccess's error
//! vmsdk::disk::vddk::shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! Unit tests run the same code against [`MemoryTransport`], which applies VDDK's transport
//! rules and refuses a login, a PrepareForAccess, an Open or a Cleanup with VDDK's codes when
//! told to ([`Refusal`]):
//!
//! ```
//! use vmsdk::disk::vddk::{vix, ConnectParams, DiskTransport, MemoryTransport, Refusal};
//! use vmsdk::disk::{MemoryDisk, OpenFlags};
//!
//! /// The code under test: back up one disk, ending access on every path.
//! fn backup(vcenter: &dyn DiskTransport, params: &ConnectParams) -> vmsdk::Result<u64> {
//!     let access = vcenter.prepare_for_access(params, "unit-test")?;
//!     let connection = vcenter.connect(params)?;
//!     let disk = connection.open("[ds1] vm/vm.vmdk", OpenFlags::read_only())?;
//!     let capacity = disk.info()?.capacity;
//!     access.end()?;
//!     Ok(capacity)
//! }
//!
//! let vcenter = MemoryTransport::new()
//!     .with_disk("[ds1] vm/vm.vmdk", MemoryDisk::new(1 << 20))
//!     .with_refusal(Refusal::open(vix::E_FILE_NOT_FOUND).times(1));
//! let params = ConnectParams::builder()
//!     .server("vc")
//!     .user_password("backup@vsphere.local", "secret")
//!     .vm("moref=vm-16")
//!     .snapshot("snapshot-47")
//!     .build()?;
//! let err = backup(&vcenter, &params).unwrap_err();
//! assert!(err.to_string().contains("VixError 4"), "{err}");
//! assert_eq!(vcenter.accesses_outstanding(), 0); // the guard ended access on the error path
//! assert_eq!(backup(&vcenter, &params)?, 1 << 20);
//! # Ok::<(), vmsdk::Error>(())
//! ```

use std::path::Path;

pub use disk_transport::memory::{AccessEvent, MemoryTransport, Refusal, Step};
pub use disk_transport::vddk::{
    call_stats, find_library, loaded_library, shutdown, CallStats, LibraryInfo, LogLevel,
    VddkConnection, VddkDisk, VddkOptions, VddkTransport,
};
pub use disk_transport::{
    check_snapshot_moref, check_vm_spec, vix, vix_hint, AccessGuard, CleanupStats, Config,
    ConfigCheck, ConfigWarning, ConnectParams, ConnectParamsBuilder, Connection, Credentials,
    DiskTransport, Secret, Thumbprint, TransportMode,
};

use crate::Result;

/// Loads and initialises VDDK (the first call in the process) or shares the library already
/// loaded; see [`VddkTransport::new`].
pub fn transport(options: &VddkOptions) -> Result<VddkTransport> {
    Ok(VddkTransport::new(options)?)
}

/// Checks an InitEx configuration file as [`VddkTransport::new`] does before InitEx: a
/// malformed line or an out-of-range value is an error naming the file, line and key; the
/// keys nobody knows come back as warnings naming the nearest known key, or, with `strict`,
/// as an error.
///
/// ```
/// let path = std::env::temp_dir().join(format!("vmsdk-vddk-doc-{}.conf", std::process::id()));
/// std::fs::write(&path, "vixDiskLib.nfc.ReadTimoutMs = 60000\n")?;
/// let warnings = vmsdk::disk::vddk::check_config(&path, false)?;
/// assert!(warnings[0].to_string().ends_with("did you mean vixDiskLib.nfc.ReadTimeoutMs?"));
/// assert!(vmsdk::disk::vddk::check_config(&path, true).is_err());
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check_config(path: impl AsRef<Path>, strict: bool) -> Result<Vec<ConfigWarning>> {
    let mode = if strict {
        ConfigCheck::Strict
    } else {
        ConfigCheck::Lenient
    };
    Ok(Config::check_path(path, mode)?.1)
}

/// The warnings about the configuration file a `vddk://…?config=FILE` URI names (none for
/// other URIs): what a program that opens disks by URI shows its user before opening, since
/// the URI path has no log hook. Errors in the file are left to the open, which reports them.
pub fn uri_config_warnings(uri: &str) -> Vec<ConfigWarning> {
    match uri.parse::<disk_transport::DiskUri>() {
        Ok(disk_transport::DiskUri::Vddk(vddk)) => vddk
            .config
            .as_deref()
            .and_then(|config| check_config(config, false).ok())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
