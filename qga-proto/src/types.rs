//! Data types of the QEMU Guest Agent protocol, named as in the QAPI schema.
//!
//! Every struct maps one-to-one to a schema object; members keep their wire
//! names through serde renames (`kebab-case`, except `supported_commands`
//! which the schema spells with an underscore). Optional members are
//! `Option`s that are left out of the serialised form when `None`.
//!
//! Enums are *open*: an agent newer than this crate may send a value the
//! crate does not know yet, and that value is kept in the `Other` variant
//! instead of failing the whole reply. Unknown members of objects are
//! ignored for the same reason.

use std::fmt;

use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------
// Binary payloads
// ---------------------------------------------------------------------------

/// Bytes carried as a base64 string on the wire (`buf-b64`, `out-data`,
/// `err-data`, `input-data`).
///
/// The wrapper decodes on receipt, so a reply with broken base64 is a
/// deserialisation error rather than garbage handed to the caller.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Base64Data(pub Vec<u8>);

impl Base64Data {
    /// The decoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Consumes the wrapper, returning the decoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for Base64Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if text.len() <= 256 => write!(f, "Base64Data({text:?})"),
            _ => write!(f, "Base64Data(<{} bytes>)", self.0.len()),
        }
    }
}

impl From<Vec<u8>> for Base64Data {
    fn from(v: Vec<u8>) -> Self {
        Base64Data(v)
    }
}

impl From<&[u8]> for Base64Data {
    fn from(v: &[u8]) -> Self {
        Base64Data(v.to_vec())
    }
}

impl From<&str> for Base64Data {
    fn from(v: &str) -> Self {
        Base64Data(v.as_bytes().to_vec())
    }
}

impl Serialize for Base64Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Base64Data)
            .map_err(|e| D::Error::custom(format_args!("invalid base64 from agent: {e}")))
    }
}

/// A password for `guest-set-user-password`.
///
/// `Debug` and `Display` never show it; on the wire it is base64-encoded as the
/// protocol requires.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a clear-text password (or a `crypt()` hash when `crypted` is set).
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    /// The secret itself. Callers decide where it may go; it never reaches logs
    /// through this crate.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Password {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0.as_bytes()))
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Base64Data::deserialize(d)?;
        String::from_utf8(raw.0)
            .map(Password)
            .map_err(|_| D::Error::custom("password is not valid UTF-8 after base64 decoding"))
    }
}

/// The empty object `{}` that commands without a declared return type answer.
///
/// Members an agent might add are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Empty {}

// ---------------------------------------------------------------------------
// guest-info
// ---------------------------------------------------------------------------

fn default_true() -> bool {
    true
}

/// Information about one guest agent command (`GuestAgentCommandInfo`, since 1.1.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestAgentCommandInfo {
    /// Name of the command.
    pub name: String,
    /// Whether the guest administrator left the command enabled.
    pub enabled: bool,
    /// Whether the command answers on success (since 1.7; assumed `true` when an
    /// older agent leaves it out).
    #[serde(rename = "success-response", default = "default_true")]
    pub success_response: bool,
}

/// Information about the guest agent (`GuestAgentInfo`, since 0.15.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// Guest agent version, e.g. `7.2.22` (Windows builds use their own numbering).
    pub version: String,
    /// The commands this agent knows.
    pub supported_commands: Vec<GuestAgentCommandInfo>,
}

impl GuestAgentInfo {
    /// The entry for `name`, if the agent knows that command.
    pub fn command(&self, name: &str) -> Option<&GuestAgentCommandInfo> {
        self.supported_commands.iter().find(|c| c.name == name)
    }

    /// Whether the agent knows `name` and has it enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.command(name).is_some_and(|c| c.enabled)
    }

    /// The leading `major.minor` numbers of `version`, when it has that shape.
    pub fn version_numbers(&self) -> Option<(u32, u32)> {
        let mut it = self.version.split(['.', '-', ' ']);
        let major = it.next()?.trim().parse().ok()?;
        let minor = it.next().and_then(|m| m.trim().parse().ok()).unwrap_or(0);
        Some((major, minor))
    }
}

// ---------------------------------------------------------------------------
// guest-shutdown
// ---------------------------------------------------------------------------

open_enum! {
    /// `mode` of `guest-shutdown` (the schema types it as a plain string).
    pub enum GuestShutdownMode {
        /// Power the guest off (the agent's default).
        Powerdown => "powerdown",
        /// Halt without powering off.
        Halt => "halt",
        /// Reboot.
        Reboot => "reboot",
    }
}

// ---------------------------------------------------------------------------
// guest-file-*
// ---------------------------------------------------------------------------

/// Result of `guest-file-read` (`GuestFileRead`, since 0.15.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileRead {
    /// Number of bytes read (before base64 encoding).
    pub count: i64,
    /// The bytes read.
    #[serde(rename = "buf-b64")]
    pub buf_b64: Base64Data,
    /// Whether end of file was reached.
    pub eof: bool,
}

/// Result of `guest-file-write` (`GuestFileWrite`, since 0.15.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileWrite {
    /// Number of bytes written.
    pub count: i64,
    /// Whether end of file was reached.
    pub eof: bool,
}

/// Result of `guest-file-seek` (`GuestFileSeek`, since 0.15.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileSeek {
    /// Current file position.
    pub position: i64,
    /// Whether end of file was reached.
    pub eof: bool,
}

open_enum! {
    /// Symbolic `whence` for `guest-file-seek` (`QGASeek`, since 2.6).
    pub enum QGASeek {
        /// From the start of the file.
        Set => "set",
        /// From the current position.
        Cur => "cur",
        /// From the end of the file.
        End => "end",
    }
}

/// `whence` of `guest-file-seek` (alternate `GuestFileWhence`, since 2.6): an
/// integer (0, 1, 2, accepted by every agent) or a symbolic name (2.6+).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GuestFileWhence {
    /// Integral value: 0 = set, 1 = cur, 2 = end.
    Value(i64),
    /// Symbolic name.
    Name(QGASeek),
}

impl From<QGASeek> for GuestFileWhence {
    fn from(s: QGASeek) -> Self {
        GuestFileWhence::Name(s)
    }
}

impl From<std::io::SeekFrom> for GuestFileWhence {
    fn from(s: std::io::SeekFrom) -> Self {
        // Integers work on every agent version, names only from 2.6 on.
        match s {
            std::io::SeekFrom::Start(_) => GuestFileWhence::Value(0),
            std::io::SeekFrom::Current(_) => GuestFileWhence::Value(1),
            std::io::SeekFrom::End(_) => GuestFileWhence::Value(2),
        }
    }
}

// ---------------------------------------------------------------------------
// guest-fsfreeze-*, guest-fstrim
// ---------------------------------------------------------------------------

open_enum! {
    /// Filesystem freeze state (`GuestFsfreezeStatus`, since 0.15.0).
    pub enum GuestFsfreezeStatus {
        /// Filesystems thawed/unfrozen.
        Thawed => "thawed",
        /// All non-network guest filesystems frozen.
        Frozen => "frozen",
    }
}

/// Trim result for one path (`GuestFilesystemTrimResult`, since 2.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResult {
    /// Path that was trimmed.
    pub path: String,
    /// Error message when the trim failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes trimmed for this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trimmed: Option<i64>,
    /// Effective minimum the guest used for this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<i64>,
}

/// Result of `guest-fstrim` (`GuestFilesystemTrimResponse`, since 2.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResponse {
    /// One entry per trimmed path.
    pub paths: Vec<GuestFilesystemTrimResult>,
}

// ---------------------------------------------------------------------------
// Networking
// ---------------------------------------------------------------------------

open_enum! {
    /// IP address family (`GuestIpAddressType`, since 1.1).
    pub enum GuestIpAddressType {
        /// IP version 4.
        Ipv4 => "ipv4",
        /// IP version 6.
        Ipv6 => "ipv6",
    }
}

/// IPv4, so that test fixtures built with `..Default::default()` need not name the family.
impl Default for GuestIpAddressType {
    fn default() -> Self {
        GuestIpAddressType::Ipv4
    }
}

/// One address of an interface (`GuestIpAddress`, since 1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestIpAddress {
    /// The address.
    #[serde(rename = "ip-address")]
    pub ip_address: String,
    /// Address family.
    #[serde(rename = "ip-address-type")]
    pub ip_address_type: GuestIpAddressType,
    /// Network prefix length.
    pub prefix: i64,
}

/// Interface counters (`GuestNetworkInterfaceStat`, since 2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterfaceStat {
    /// Total bytes received.
    pub rx_bytes: u64,
    /// Total packets received.
    pub rx_packets: u64,
    /// Bad packets received.
    pub rx_errs: u64,
    /// Packets dropped by the receiver.
    pub rx_dropped: u64,
    /// Total bytes transmitted.
    pub tx_bytes: u64,
    /// Total packets transmitted.
    pub tx_packets: u64,
    /// Packet transmit problems.
    pub tx_errs: u64,
    /// Transmitted packets dropped.
    pub tx_dropped: u64,
}

/// A guest network interface (`GuestNetworkInterface`, since 1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterface {
    /// Interface name.
    pub name: String,
    /// Hardware (MAC) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    /// Addresses assigned to the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<GuestIpAddress>>,
    /// Counters (since 2.11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<GuestNetworkInterfaceStat>,
}

/// A routing table entry (`GuestNetworkRoute`, since 9.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkRoute {
    /// Egress interface.
    pub iface: String,
    /// Destination network or host.
    pub destination: String,
    /// Route metric.
    pub metric: i64,
    /// Next-hop router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Subnet mask (IPv4 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// Initial round-trip time (IPv4 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irtt: Option<i64>,
    /// Route flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<u64>,
    /// Reference count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcnt: Option<i64>,
    /// Usage count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#use: Option<i64>,
    /// TCP window size (IPv4 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<i64>,
    /// Link MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i64>,
    /// Destination prefix length (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desprefixlen: Option<String>,
    /// Source address (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Source prefix length (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srcprefixlen: Option<String>,
    /// Next hop (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nexthop: Option<String>,
    /// IP version, 4 or 6.
    pub version: i64,
}

// ---------------------------------------------------------------------------
// vCPUs and memory blocks
// ---------------------------------------------------------------------------

/// A logical processor (`GuestLogicalProcessor`, since 1.5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestLogicalProcessor {
    /// Guest-specific identifier of the vCPU.
    pub logical_id: i64,
    /// Whether the vCPU is online.
    pub online: bool,
    /// Whether it can be taken offline (ignored on input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// A memory block (`GuestMemoryBlock`, since 2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlock {
    /// Guest-specific identifier of the block.
    pub phys_index: u64,
    /// Whether the block is online.
    pub online: bool,
    /// Whether it can be taken offline (ignored on input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

open_enum! {
    /// Outcome of one memory block change (`GuestMemoryBlockResponseType`, since 2.3).
    pub enum GuestMemoryBlockResponseType {
        /// The block changed state.
        Success => "success",
        /// No such block in sysfs.
        NotFound => "not-found",
        /// The kernel cannot change this block.
        OperationNotSupported => "operation-not-supported",
        /// The change failed; see `error-code`.
        OperationFailed => "operation-failed",
    }
}

/// `success`, the common outcome, for test fixtures built with `..Default::default()`.
impl Default for GuestMemoryBlockResponseType {
    fn default() -> Self {
        GuestMemoryBlockResponseType::Success
    }
}

/// Result for one block of `guest-set-memory-blocks` (`GuestMemoryBlockResponse`, since 2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlockResponse {
    /// The block this result is about.
    pub phys_index: u64,
    /// What happened.
    pub response: GuestMemoryBlockResponseType,
    /// `errno` when the operation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
}

/// Memory block geometry (`GuestMemoryBlockInfo`, since 2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestMemoryBlockInfo {
    /// Size in bytes of one memory block.
    pub size: u64,
}

// ---------------------------------------------------------------------------
// Disks and filesystems
// ---------------------------------------------------------------------------

open_enum! {
    /// Disk bus type (`GuestDiskBusType`, since 2.2).
    pub enum GuestDiskBusType {
        /// IDE disks.
        Ide => "ide",
        /// Floppy disks.
        Fdc => "fdc",
        /// SCSI disks.
        Scsi => "scsi",
        /// virtio disks.
        Virtio => "virtio",
        /// Xen disks.
        Xen => "xen",
        /// USB disks.
        Usb => "usb",
        /// UML disks.
        Uml => "uml",
        /// SATA disks.
        Sata => "sata",
        /// SD cards.
        Sd => "sd",
        /// Unknown bus type.
        Unknown => "unknown",
        /// Windows IEEE 1394 bus.
        Ieee1394 => "ieee1394",
        /// Windows SSA bus.
        Ssa => "ssa",
        /// Windows fibre channel bus.
        Fibre => "fibre",
        /// Windows RAID bus.
        Raid => "raid",
        /// Windows iSCSI bus.
        Iscsi => "iscsi",
        /// Windows serial-attached SCSI bus.
        Sas => "sas",
        /// Windows multimedia card bus.
        Mmc => "mmc",
        /// Windows virtual bus.
        Virtual => "virtual",
        /// Windows file-backed virtual bus.
        FileBackedVirtual => "file-backed-virtual",
        /// NVMe disks (since 7.1).
        Nvme => "nvme",
    }
}

/// `unknown`, what the agent reports when it cannot tell the bus.
impl Default for GuestDiskBusType {
    fn default() -> Self {
        GuestDiskBusType::Unknown
    }
}

/// PCI address (`GuestPCIAddress`, since 2.2); fields are -1 when invalid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestPCIAddress {
    /// Domain.
    pub domain: i64,
    /// Bus.
    pub bus: i64,
    /// Slot.
    pub slot: i64,
    /// Function.
    pub function: i64,
}

/// s390x channel address (`GuestCCWAddress`, since 6.0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestCCWAddress {
    /// Channel subsystem image id.
    pub cssid: i64,
    /// Subchannel set id.
    pub ssid: i64,
    /// Subchannel number.
    pub subchno: i64,
    /// Device number.
    pub devno: i64,
}

/// Where a disk sits (`GuestDiskAddress`, since 2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskAddress {
    /// PCI address of the controller.
    pub pci_controller: GuestPCIAddress,
    /// Bus type.
    pub bus_type: GuestDiskBusType,
    /// Bus id.
    pub bus: i64,
    /// Target id.
    pub target: i64,
    /// Unit id.
    pub unit: i64,
    /// Serial number (since 3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Device node or UNC (since 3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// CCW address on s390x (since 6.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ccw_address: Option<GuestCCWAddress>,
}

/// NVMe SMART / health log (`GuestNVMeSmart`, since 7.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // The schema documents none of these; names follow the NVMe spec.
pub struct GuestNVMeSmart {
    pub critical_warning: i64,
    pub temperature: i64,
    pub available_spare: i64,
    pub available_spare_threshold: i64,
    pub percentage_used: i64,
    pub data_units_read_lo: u64,
    pub data_units_read_hi: u64,
    pub data_units_written_lo: u64,
    pub data_units_written_hi: u64,
    pub host_read_commands_lo: u64,
    pub host_read_commands_hi: u64,
    pub host_write_commands_lo: u64,
    pub host_write_commands_hi: u64,
    pub controller_busy_time_lo: u64,
    pub controller_busy_time_hi: u64,
    pub power_cycles_lo: u64,
    pub power_cycles_hi: u64,
    pub power_on_hours_lo: u64,
    pub power_on_hours_hi: u64,
    pub unsafe_shutdowns_lo: u64,
    pub unsafe_shutdowns_hi: u64,
    pub media_errors_lo: u64,
    pub media_errors_hi: u64,
    pub number_of_error_log_entries_lo: u64,
    pub number_of_error_log_entries_hi: u64,
}

/// Splits a flat QAPI union object into its discriminator and the rest.
fn split_union<E: serde::de::Error>(
    value: Value,
    tag: &str,
) -> Result<(String, Map<String, Value>), E> {
    let mut map = match value {
        Value::Object(m) => m,
        other => return Err(E::custom(format_args!("expected an object, got {other}"))),
    };
    let kind = match map.remove(tag) {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(E::custom(format_args!(
                "'{tag}' must be a string, got {other}"
            )))
        }
        None => return Err(E::custom(format_args!("missing discriminator '{tag}'"))),
    };
    Ok((kind, map))
}

/// Serialises `inner` and puts the discriminator next to its members.
fn join_union<S: Serializer, T: Serialize>(
    s: S,
    tag: &str,
    kind: &str,
    inner: &T,
) -> Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
    let mut map = match serde_json::to_value(inner).map_err(S::Error::custom)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    map.insert(tag.to_owned(), Value::String(kind.to_owned()));
    Value::Object(map).serialize(s)
}

/// Disk SMART data (flat union `GuestDiskSmart` on `type`, since 7.1).
#[derive(Debug, Clone, PartialEq)]
pub enum GuestDiskSmart {
    /// NVMe health information.
    Nvme(GuestNVMeSmart),
    /// A bus type without SMART members in this crate; members kept verbatim.
    Other {
        /// The discriminator.
        bus_type: GuestDiskBusType,
        /// Remaining members.
        members: Map<String, Value>,
    },
}

impl Serialize for GuestDiskSmart {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GuestDiskSmart::Nvme(v) => join_union(s, "type", "nvme", v),
            GuestDiskSmart::Other { bus_type, members } => {
                join_union(s, "type", bus_type.as_str(), members)
            }
        }
    }
}

impl<'de> Deserialize<'de> for GuestDiskSmart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, rest) = split_union::<D::Error>(Value::deserialize(d)?, "type")?;
        match GuestDiskBusType::from(kind.as_str()) {
            GuestDiskBusType::Nvme => serde_json::from_value(Value::Object(rest))
                .map(GuestDiskSmart::Nvme)
                .map_err(D::Error::custom),
            bus_type => Ok(GuestDiskSmart::Other {
                bus_type,
                members: rest,
            }),
        }
    }
}

/// A disk (`GuestDiskInfo`, since 5.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskInfo {
    /// Device node (Linux) or UNC (Windows).
    pub name: String,
    /// Whether this is a partition.
    pub partition: bool,
    /// Devices this one depends on (e.g. PVs of an LV).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<String>>,
    /// Hardware address (non-virtual devices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<GuestDiskAddress>,
    /// Alias, e.g. the device-mapper name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// SMART data (since 7.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smart: Option<GuestDiskSmart>,
}

/// A mounted filesystem (`GuestFilesystemInfo`, since 2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFilesystemInfo {
    /// Disk name.
    pub name: String,
    /// Mount point.
    pub mountpoint: String,
    /// Filesystem type.
    pub r#type: String,
    /// Used bytes (since 3.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Capacity for unprivileged users (since 3.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Capacity for privileged users (since 9.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_privileged: Option<u64>,
    /// Disks the volume lies on (may be empty).
    pub disk: Vec<GuestDiskAddress>,
}

/// I/O counters of a disk (`GuestDiskStats`, since 7.1); every member is optional.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskStats {
    /// Sectors read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_sectors: Option<u64>,
    /// Reads completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ios: Option<u64>,
    /// Reads merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_merges: Option<u64>,
    /// Sectors written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_sectors: Option<u64>,
    /// Writes completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_ios: Option<u64>,
    /// Writes merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_merges: Option<u64>,
    /// Sectors discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_sectors: Option<u64>,
    /// Discards completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_ios: Option<u64>,
    /// Discards merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_merges: Option<u64>,
    /// Flushes completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_ios: Option<u64>,
    /// Time spent reading (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ticks: Option<u64>,
    /// Time spent writing (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_ticks: Option<u64>,
    /// Time spent discarding (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_ticks: Option<u64>,
    /// Time spent flushing (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_ticks: Option<u64>,
    /// I/Os in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ios_pgr: Option<u64>,
    /// Time spent doing I/O (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ticks: Option<u64>,
    /// Weighted time spent doing I/O (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_ticks: Option<u64>,
}

/// Disk statistics entry (`GuestDiskStatsInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestDiskStatsInfo {
    /// Disk name.
    pub name: String,
    /// Major device number.
    pub major: u64,
    /// Minor device number.
    pub minor: u64,
    /// Counters.
    pub stats: GuestDiskStats,
}

// ---------------------------------------------------------------------------
// CPU statistics and load
// ---------------------------------------------------------------------------

open_enum! {
    /// Operating systems with CPU statistics (`GuestCpuStatsType`, since 7.1).
    pub enum GuestCpuStatsType {
        /// Linux.
        Linux => "linux",
    }
}

/// Linux CPU times in milliseconds (`GuestLinuxCpuStats`, since 7.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestLinuxCpuStats {
    /// CPU index.
    pub cpu: i64,
    /// User mode.
    pub user: u64,
    /// User mode at low priority.
    pub nice: u64,
    /// System mode.
    pub system: u64,
    /// Idle task.
    pub idle: u64,
    /// Waiting for I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iowait: Option<u64>,
    /// Servicing interrupts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<u64>,
    /// Servicing softirqs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softirq: Option<u64>,
    /// Stolen by the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal: Option<u64>,
    /// Running guests of this guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<u64>,
    /// Running niced guests of this guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guestnice: Option<u64>,
}

/// CPU statistics of one CPU (flat union `GuestCpuStats` on `type`, since 7.1).
#[derive(Debug, Clone, PartialEq)]
pub enum GuestCpuStats {
    /// Linux counters.
    Linux(GuestLinuxCpuStats),
    /// An operating system this crate does not know; members kept verbatim.
    Other {
        /// The discriminator.
        os: GuestCpuStatsType,
        /// Remaining members.
        members: Map<String, Value>,
    },
}

/// A Linux CPU with every counter zero.
impl Default for GuestCpuStats {
    fn default() -> Self {
        GuestCpuStats::Linux(GuestLinuxCpuStats::default())
    }
}

impl Serialize for GuestCpuStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GuestCpuStats::Linux(v) => join_union(s, "type", "linux", v),
            GuestCpuStats::Other { os, members } => join_union(s, "type", os.as_str(), members),
        }
    }
}

impl<'de> Deserialize<'de> for GuestCpuStats {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, rest) = split_union::<D::Error>(Value::deserialize(d)?, "type")?;
        match GuestCpuStatsType::from(kind.as_str()) {
            GuestCpuStatsType::Linux => serde_json::from_value(Value::Object(rest))
                .map(GuestCpuStats::Linux)
                .map_err(D::Error::custom),
            os => Ok(GuestCpuStats::Other { os, members: rest }),
        }
    }
}

/// Load averages (`GuestLoadAverage`, since 10.0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestLoadAverage {
    /// 1-minute load average.
    pub load1m: f64,
    /// 5-minute load average.
    pub load5m: f64,
    /// 15-minute load average.
    pub load15m: f64,
}

// ---------------------------------------------------------------------------
// guest-exec
// ---------------------------------------------------------------------------

/// Result of `guest-exec` (`GuestExec`, since 2.5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestExec {
    /// PID of the child process in the guest.
    pub pid: i64,
}

/// Result of `guest-exec-status` (`GuestExecStatus`, since 2.5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecStatus {
    /// Whether the process has terminated.
    pub exited: bool,
    /// Exit code after a normal exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    /// Signal number (Linux) or exception code (Windows) after an abnormal exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    /// Captured stdout (only after exit, only when capture was requested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_data: Option<Base64Data>,
    /// Captured stderr (only after exit, only when capture was requested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_data: Option<Base64Data>,
    /// Whether stdout hit the agent's capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_truncated: Option<bool>,
    /// Whether stderr hit the agent's capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_truncated: Option<bool>,
}

open_enum! {
    /// What `guest-exec` captures (`GuestExecCaptureOutputMode`, schema says 8.0, shipped in 8.1).
    pub enum GuestExecCaptureOutputMode {
        /// Capture nothing.
        None => "none",
        /// Only stdout.
        Stdout => "stdout",
        /// Only stderr.
        Stderr => "stderr",
        /// Both, into `out-data` and `err-data`.
        Separated => "separated",
        /// Both, merged into `out-data` (not on Windows).
        Merged => "merged",
    }
}

/// `capture-output` of `guest-exec` (alternate `GuestExecCaptureOutput`).
///
/// Agents before 8.1 accept only the boolean form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GuestExecCaptureOutput {
    /// `true` captures stdout and stderr separately (since 2.5).
    Flag(bool),
    /// A capture mode (since 8.1).
    Mode(GuestExecCaptureOutputMode),
}

// ---------------------------------------------------------------------------
// Host name, users, time zone, OS
// ---------------------------------------------------------------------------

/// Result of `guest-get-host-name` (`GuestHostName`, since 2.10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestHostName {
    /// The machine's name.
    pub host_name: String,
}

/// A logged-in user (`GuestUser`, since 2.10).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestUser {
    /// User name.
    pub user: String,
    /// Logon domain (Windows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Earliest login, in fractional seconds since the epoch.
    pub login_time: f64,
}

/// Time zone (`GuestTimezone`, since 2.10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestTimezone {
    /// Zone name (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Offset to UTC in seconds, east positive.
    pub offset: i64,
}

/// Operating system information (`GuestOSInfo`, since 2.10); every member is optional.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestOSInfo {
    /// uname release (POSIX) or build number (Windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// uname version (POSIX) or version number (Windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// uname machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// os-release `ID` (`mswindows` on Windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// os-release `NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// os-release `PRETTY_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    /// os-release `VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// os-release `VERSION_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// os-release `VARIANT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// os-release `VARIANT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_id: Option<String>,
}

// ---------------------------------------------------------------------------
// Devices (Windows)
// ---------------------------------------------------------------------------

open_enum! {
    /// Device kind (`GuestDeviceType`).
    pub enum GuestDeviceType {
        /// PCI device.
        Pci => "pci",
    }
}

/// PCI ids (`GuestDeviceIdPCI`, since 5.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDeviceIdPCI {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
}

/// Device id (flat union `GuestDeviceId` on `type`, since 5.2).
#[derive(Debug, Clone, PartialEq)]
pub enum GuestDeviceId {
    /// A PCI device.
    Pci(GuestDeviceIdPCI),
    /// A device kind this crate does not know; members kept verbatim.
    Other {
        /// The discriminator.
        kind: GuestDeviceType,
        /// Remaining members.
        members: Map<String, Value>,
    },
}

impl Serialize for GuestDeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GuestDeviceId::Pci(v) => join_union(s, "type", "pci", v),
            GuestDeviceId::Other { kind, members } => join_union(s, "type", kind.as_str(), members),
        }
    }
}

impl<'de> Deserialize<'de> for GuestDeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, rest) = split_union::<D::Error>(Value::deserialize(d)?, "type")?;
        match GuestDeviceType::from(kind.as_str()) {
            GuestDeviceType::Pci => serde_json::from_value(Value::Object(rest))
                .map(GuestDeviceId::Pci)
                .map_err(D::Error::custom),
            kind => Ok(GuestDeviceId::Other {
                kind,
                members: rest,
            }),
        }
    }
}

/// A device and its driver (`GuestDeviceInfo`, since 5.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDeviceInfo {
    /// Driver name.
    pub driver_name: String,
    /// Driver release date, ns since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_date: Option<i64>,
    /// Driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<GuestDeviceId>,
}

// ---------------------------------------------------------------------------
// SSH keys
// ---------------------------------------------------------------------------

/// Result of `guest-ssh-get-authorized-keys` (`GuestAuthorizedKeys`, since 5.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestAuthorizedKeys {
    /// Public keys in `authorized_keys` format.
    pub keys: Vec<String>,
}

open_enum! {
    /// Error class of an agent error reply (QEMU `QapiErrorClass`).
    ///
    /// Modern agents send `GenericError` or `CommandNotFound`; older class names
    /// (`CommandDisabled`, ...) arrive as `Other`.
    pub enum ErrorClass {
        /// Any failure of a command, including bad arguments.
        GenericError => "GenericError",
        /// Unknown command, or one the guest administrator disabled.
        CommandNotFound => "CommandNotFound",
        /// A device is not active.
        DeviceNotActive => "DeviceNotActive",
        /// A device was not found.
        DeviceNotFound => "DeviceNotFound",
        /// KVM lacks a capability.
        KVMMissingCap => "KVMMissingCap",
    }
}
