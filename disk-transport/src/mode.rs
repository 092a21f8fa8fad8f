//! Transport modes and the rules VDDK applies when choosing one.
//!
//! VDDK names its ways of reaching a disk `file`, `san`, `hotadd`, `nbd` and `nbdssl`, lists
//! them as a colon-separated string (`VixDiskLib_ListTransportModes`, e.g.
//! `"file:san:hotadd:nbd"`) and, over the network, tries them in the order
//! `san:hotadd:nbdssl:nbd`. [`select_transport`] applies the documented rules as a pure function
//! so an application can explain *before* connecting why a mode will or will not be used.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A way of reaching a virtual disk, named as VDDK names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TransportMode {
    /// A disk file on a local or mounted file system (hosted disks).
    File,
    /// Direct access to the VMFS LUN over Fibre Channel or iSCSI (LAN-free). On Linux all I/O
    /// is done with `O_DIRECT`.
    San,
    /// The disk is hot-added to the backup appliance VM itself.
    HotAdd,
    /// Network block transfer over the LAN (NFC), unencrypted.
    Nbd,
    /// NFC over TLS.
    NbdSsl,
}

/// Every transport mode, in the order VDDK lists them.
pub const ALL_TRANSPORT_MODES: [TransportMode; 5] = [
    TransportMode::File,
    TransportMode::San,
    TransportMode::HotAdd,
    TransportMode::NbdSsl,
    TransportMode::Nbd,
];

/// The order VDDK tries transports over the network when the caller passes none:
/// `san:hotadd:nbdssl:nbd`.
pub const DEFAULT_NETWORK_PRIORITY: [TransportMode; 4] = [
    TransportMode::San,
    TransportMode::HotAdd,
    TransportMode::NbdSsl,
    TransportMode::Nbd,
];

impl TransportMode {
    /// The lowercase name VDDK uses (`"hotadd"`, `"nbdssl"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TransportMode::File => "file",
            TransportMode::San => "san",
            TransportMode::HotAdd => "hotadd",
            TransportMode::Nbd => "nbd",
            TransportMode::NbdSsl => "nbdssl",
        }
    }

    /// Whether VDDK needs a snapshot MoRef to use this mode (SAN, HotAdd and NBDSSL do).
    pub fn needs_snapshot(self) -> bool {
        matches!(
            self,
            TransportMode::San | TransportMode::HotAdd | TransportMode::NbdSsl
        )
    }

    /// Whether I/O in this mode uses `O_DIRECT` on Linux (SAN does), so offsets, lengths and
    /// buffers must be aligned.
    pub fn uses_direct_io(self) -> bool {
        self == TransportMode::San
    }

    /// Whether this mode reaches the disk over the network through a host (NBD, NBDSSL).
    pub fn is_network(self) -> bool {
        matches!(self, TransportMode::Nbd | TransportMode::NbdSsl)
    }
}

impl fmt::Display for TransportMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "file" => Ok(TransportMode::File),
            "san" => Ok(TransportMode::San),
            "hotadd" => Ok(TransportMode::HotAdd),
            "nbd" => Ok(TransportMode::Nbd),
            "nbdssl" => Ok(TransportMode::NbdSsl),
            other => Err(Error::InvalidParams(format!(
                "unknown transport mode {other:?} (expected one of file, san, hotadd, nbdssl, nbd)"
            ))),
        }
    }
}

/// Formats modes as VDDK does: names joined by `:` (`"san:hotadd:nbdssl:nbd"`).
pub fn format_transport_modes(modes: &[TransportMode]) -> String {
    modes
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses a colon-separated list such as `"nbdssl:nbd"`. Empty items are ignored, duplicates
/// are dropped (the first occurrence keeps its place), unknown names are an error.
pub fn parse_transport_modes(list: &str) -> Result<Vec<TransportMode>> {
    let mut modes = Vec::new();
    for item in list.split(':').filter(|s| !s.trim().is_empty()) {
        let mode: TransportMode = item.parse()?;
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    Ok(modes)
}

/// The default priority as a string: `"san:hotadd:nbdssl:nbd"`.
pub fn default_transport_priority() -> String {
    format_transport_modes(&DEFAULT_NETWORK_PRIORITY)
}

/// Where the disk's datastore lives, as far as the caller knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageKind {
    /// A SAN LUN (FC/iSCSI) the backup host can see.
    San,
    /// Storage local to the ESXi host (or NFS/vSAN the backup host cannot reach directly).
    Local,
    /// Not known.
    #[default]
    Unknown,
}

/// What [`select_transport`] knows about the connection being planned.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransportContext {
    /// What the library offers (`VixDiskLib_ListTransportModes`), e.g. `file:san:hotadd:nbd`.
    pub available: Vec<TransportMode>,
    /// Whether the disk is reached through an ESXi host or vCenter (false: a hosted disk file).
    pub remote: bool,
    /// Whether a snapshot MoRef was given.
    pub has_snapshot: bool,
    /// Whether the VM is powered on, if known.
    pub vm_powered_on: Option<bool>,
    /// Where the disk lives, if known.
    pub storage: StorageKind,
    /// Whether the connection is read-only.
    pub read_only: bool,
}

/// The outcome of [`select_transport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportPlan {
    /// The mode that will be used.
    pub mode: TransportMode,
    /// Whether every open on this connection will be read-only.
    pub read_only: bool,
    /// Alignment (bytes) that offsets, lengths and buffers must have because the mode uses
    /// `O_DIRECT`; `None` when any alignment works.
    pub direct_io_alignment: Option<u64>,
    /// Modes that were tried first and why each was passed over.
    pub skipped: Vec<(TransportMode, String)>,
}

/// The alignment used for `O_DIRECT` I/O: the 512-byte VDDK sector; 4096 is safer for
/// buffers on 4Kn devices, and the file backend uses that.
pub const DIRECT_IO_ALIGNMENT: u64 = 512;

/// Chooses a transport mode the way VDDK's `ConnectEx` + first `Open` would, but tells why.
///
/// Rules (VDDK programming guide, "Advanced Transport APIs"):
/// - `requested` is the caller's list; `None` means the default: `file` for hosted disks and
///   `san:hotadd:nbdssl:nbd` over the network.
/// - Modes the library does not offer are skipped (VDDK would connect and then fail the first
///   `Open`; here it is an error up front).
/// - SAN, HotAdd and NBDSSL need a snapshot MoRef, and a powered-on VM can only be read through
///   a snapshot at all.
/// - SAN on local storage makes every write fail later, so a read-write connection skips SAN
///   there; if SAN was the only choice the result is [`Error::SanOnLocalStorage`].
/// - A read-only connection makes every later open read-only.
/// - SAN uses `O_DIRECT`: I/O must be aligned to [`DIRECT_IO_ALIGNMENT`].
pub fn select_transport(
    requested: Option<&[TransportMode]>,
    ctx: &TransportContext,
) -> Result<TransportPlan> {
    if ctx.remote && ctx.vm_powered_on == Some(true) && !ctx.has_snapshot {
        return Err(Error::InvalidParams(
            "the VM is powered on: its disks can only be read through a snapshot; create one and \
             pass its MoRef (e.g. \"snapshot-47\")"
                .to_owned(),
        ));
    }
    let candidates: Vec<TransportMode> = match requested {
        Some(list) if !list.is_empty() => list.to_vec(),
        _ if ctx.remote => DEFAULT_NETWORK_PRIORITY.to_vec(),
        _ => vec![TransportMode::File],
    };
    let mut skipped = Vec::new();
    let mut san_blocked_by_local_storage = false;
    for mode in candidates {
        if !ctx.available.is_empty() && !ctx.available.contains(&mode) {
            skipped.push((mode, "not offered by the library".to_owned()));
            continue;
        }
        if ctx.remote && mode == TransportMode::File {
            skipped.push((
                mode,
                "file transport only reaches hosted disks, not an ESXi host".to_owned(),
            ));
            continue;
        }
        if !ctx.remote && mode != TransportMode::File {
            skipped.push((
                mode,
                "needs a server: set ConnectParams::server and the VM".to_owned(),
            ));
            continue;
        }
        if mode.needs_snapshot() && !ctx.has_snapshot {
            skipped.push((mode, "needs a snapshot MoRef".to_owned()));
            continue;
        }
        if mode == TransportMode::San && ctx.storage == StorageKind::Local && !ctx.read_only {
            san_blocked_by_local_storage = true;
            skipped.push((
                mode,
                "disk is on local storage: writes through SAN would fail".to_owned(),
            ));
            continue;
        }
        return Ok(TransportPlan {
            mode,
            read_only: ctx.read_only,
            direct_io_alignment: mode.uses_direct_io().then_some(DIRECT_IO_ALIGNMENT),
            skipped,
        });
    }
    if san_blocked_by_local_storage && skipped.len() == 1 {
        return Err(Error::SanOnLocalStorage);
    }
    Err(Error::NoTransport(skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TransportMode::*;

    fn remote() -> TransportContext {
        TransportContext {
            available: ALL_TRANSPORT_MODES.to_vec(),
            remote: true,
            has_snapshot: true,
            vm_powered_on: Some(true),
            storage: StorageKind::San,
            read_only: true,
        }
    }

    #[test]
    fn names_round_trip() {
        for mode in ALL_TRANSPORT_MODES {
            assert_eq!(mode.to_string().parse::<TransportMode>().unwrap(), mode);
        }
        assert_eq!("NBDSSL".parse::<TransportMode>().unwrap(), NbdSsl);
        assert!("nfs".parse::<TransportMode>().is_err());
        assert_eq!(default_transport_priority(), "san:hotadd:nbdssl:nbd");
        assert_eq!(
            parse_transport_modes("file:san:hotadd:nbd:nbd:").unwrap(),
            vec![File, San, HotAdd, Nbd]
        );
        assert_eq!(
            format_transport_modes(&ALL_TRANSPORT_MODES),
            "file:san:hotadd:nbdssl:nbd"
        );
    }

    #[test]
    fn default_priority_picks_san_with_direct_io() {
        let plan = select_transport(None, &remote()).unwrap();
        assert_eq!(plan.mode, San);
        assert_eq!(plan.direct_io_alignment, Some(512));
        assert!(plan.read_only);
    }

    #[test]
    fn without_snapshot_only_nbd_remains_for_powered_off_vm() {
        let ctx = TransportContext {
            has_snapshot: false,
            vm_powered_on: Some(false),
            ..remote()
        };
        let plan = select_transport(None, &ctx).unwrap();
        assert_eq!(plan.mode, Nbd);
        assert_eq!(plan.skipped.len(), 3);
        assert!(plan.skipped.iter().all(|(_, why)| why.contains("snapshot")));
    }

    #[test]
    fn powered_on_vm_needs_snapshot() {
        let ctx = TransportContext {
            has_snapshot: false,
            ..remote()
        };
        let err = select_transport(None, &ctx).unwrap_err();
        assert!(err.to_string().contains("snapshot"));
    }

    #[test]
    fn san_on_local_storage_is_skipped_for_writes() {
        let ctx = TransportContext {
            storage: StorageKind::Local,
            read_only: false,
            ..remote()
        };
        let plan = select_transport(None, &ctx).unwrap();
        assert_eq!(plan.mode, HotAdd);
        let only_san = select_transport(Some(&[San]), &ctx).unwrap_err();
        assert!(matches!(only_san, Error::SanOnLocalStorage));
        // Read-only SAN access to local storage is fine.
        let ro = TransportContext {
            read_only: true,
            ..ctx
        };
        assert_eq!(select_transport(Some(&[San]), &ro).unwrap().mode, San);
    }

    #[test]
    fn unavailable_modes_are_reported() {
        let ctx = TransportContext {
            available: vec![File, Nbd],
            ..remote()
        };
        let err = select_transport(Some(&[San, HotAdd]), &ctx).unwrap_err();
        match err {
            Error::NoTransport(reasons) => assert_eq!(reasons.len(), 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hosted_disks_use_file() {
        let ctx = TransportContext {
            available: ALL_TRANSPORT_MODES.to_vec(),
            ..TransportContext::default()
        };
        let plan = select_transport(None, &ctx).unwrap();
        assert_eq!(plan.mode, File);
        assert!(select_transport(Some(&[Nbd]), &ctx).is_err());
    }
}
