//! The guestlib statistics RPC: `guestlib.info.get <version>` and pure decoders (and encoders,
//! for simulated hosts and tests) of its two reply formats.
//!
//! - **v3** (current hosts): a 16-byte little-endian header (version, session id, data size),
//!   then XDR (big-endian): a count and that many tagged statistics, ids 1, 2, 3, … in order,
//!   each with a validity flag. A host sends every statistic it knows; ids past the count are
//!   statistics the host is too old for ([`Error::UnsupportedVersion`]).
//! - **v2** (ESX 3.x/4.x era): one packed little-endian struct of exactly 669 bytes.
//!
//! The decoders take the reply payload (after the `"1 "` prefix) and never panic: every
//! malformed input is an [`Error::Decode`] saying what and where.

use std::collections::BTreeMap;

use super::rpci::{self, RpciOptions};
use super::Backdoor;
use crate::{Error, Result, SessionId, Stat, StatValue};

/// The newest data version this crate speaks (`VMGUESTLIB_DATA_VERSION`).
pub const DATA_VERSION: u32 = 3;
/// The exact length of a v2 reply.
pub const V2_LEN: usize = 669;
/// The length of the v3 header.
pub const V3_HEADER_LEN: usize = 16;
/// The longest resource pool path of the v2 struct and the v3 `string<512>`.
pub const POOL_PATH_MAX: usize = 512;
/// The reply text of a host that does not know the command (Workstation, Fusion).
pub const UNKNOWN_COMMAND: &str = "Unknown command";

/// v3 id of the long resource pool path (`opaque<>`, no C getter).
const ID_POOL_PATH_LONG: u32 = 37;
/// v3 id of the 64-bit memory shares.
const ID_MEM_SHARES_64: u32 = 38;
/// The highest v3 id this crate knows.
const MAX_KNOWN_ID: u32 = 38;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    U32,
    U64,
    Text,
    Opaque,
}

/// The statistic and XDR arm of each v3 id (index = id − 1).
const V3_LAYOUT: [(Option<Stat>, Arm); MAX_KNOWN_ID as usize] = [
    (Some(Stat::CpuReservationMhz), Arm::U32),
    (Some(Stat::CpuLimitMhz), Arm::U32),
    (Some(Stat::CpuShares), Arm::U32),
    (Some(Stat::CpuUsedMs), Arm::U64),
    (Some(Stat::HostProcessorSpeedMhz), Arm::U32),
    (Some(Stat::MemReservationMb), Arm::U32),
    (Some(Stat::MemLimitMb), Arm::U32),
    (Some(Stat::MemShares), Arm::U32),
    (Some(Stat::MemMappedMb), Arm::U32),
    (Some(Stat::MemActiveMb), Arm::U32),
    (Some(Stat::MemOverheadMb), Arm::U32),
    (Some(Stat::MemBalloonedMb), Arm::U32),
    (Some(Stat::MemSwappedMb), Arm::U32),
    (Some(Stat::MemSharedMb), Arm::U32),
    (Some(Stat::MemSharedSavedMb), Arm::U32),
    (Some(Stat::MemUsedMb), Arm::U32),
    (Some(Stat::ElapsedMs), Arm::U64),
    (Some(Stat::ResourcePoolPath), Arm::Text),
    (Some(Stat::CpuStolenMs), Arm::U64),
    (Some(Stat::MemTargetSizeMb), Arm::U64),
    (Some(Stat::HostCpuNumCores), Arm::U32),
    (Some(Stat::HostCpuUsedMs), Arm::U64),
    (Some(Stat::HostMemSwappedMb), Arm::U64),
    (Some(Stat::HostMemSharedMb), Arm::U64),
    (Some(Stat::HostMemUsedMb), Arm::U64),
    (Some(Stat::HostMemPhysMb), Arm::U64),
    (Some(Stat::HostMemPhysFreeMb), Arm::U64),
    (Some(Stat::HostMemKernOvhdMb), Arm::U64),
    (Some(Stat::HostMemMappedMb), Arm::U64),
    (Some(Stat::HostMemUnmappedMb), Arm::U64),
    (Some(Stat::MemZippedMb), Arm::U32),
    (Some(Stat::MemZipSavedMb), Arm::U32),
    (Some(Stat::MemLlSwappedMb), Arm::U32),
    (Some(Stat::MemSwapTargetMb), Arm::U32),
    (Some(Stat::MemBalloonTargetMb), Arm::U32),
    (Some(Stat::MemBalloonMaxMb), Arm::U32),
    (None, Arm::Opaque), // 37: RESOURCE_POOL_PATH_LONG, folded into ResourcePoolPath
    (None, Arm::U64),    // 38: MEM_SHARES_64, folded into MemShares
];

/// The v3 id of a statistic.
pub fn v3_id(stat: Stat) -> u32 {
    V3_LAYOUT
        .iter()
        .position(|(candidate, _)| *candidate == Some(stat))
        .map_or(0, |index| index as u32 + 1)
}

/// The v2 struct: offset of each statistic's `valid` byte and whether its value is 64-bit.
const V2_LAYOUT: [(Stat, usize, bool); 17] = [
    (Stat::CpuReservationMhz, 12, false),
    (Stat::CpuLimitMhz, 20, false),
    (Stat::CpuShares, 28, false),
    (Stat::CpuUsedMs, 36, true),
    (Stat::HostProcessorSpeedMhz, 48, false),
    (Stat::MemReservationMb, 56, false),
    (Stat::MemLimitMb, 64, false),
    (Stat::MemShares, 72, false),
    (Stat::MemMappedMb, 80, false),
    (Stat::MemActiveMb, 88, false),
    (Stat::MemOverheadMb, 96, false),
    (Stat::MemBalloonedMb, 104, false),
    (Stat::MemSwappedMb, 112, false),
    (Stat::MemSharedMb, 120, false),
    (Stat::MemSharedSavedMb, 128, false),
    (Stat::MemUsedMb, 136, false),
    (Stat::ElapsedMs, 144, true),
];
const V2_POOL_PATH_VALID: usize = 156;
const V2_POOL_PATH: usize = 157;

/// One decoded guestlib reply: its version, session and statistics.
///
/// Each statistic is either absent (the host's data version does not carry it:
/// [`Error::UnsupportedVersion`]), present but invalid ([`Error::NotAvailable`]), or present
/// with a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestlibInfo {
    /// The data version of the reply (2 or 3).
    pub version: u32,
    /// The session id of the header.
    pub session_id: SessionId,
    values: BTreeMap<Stat, Option<StatValue>>,
}

impl GuestlibInfo {
    /// An empty reply (every statistic absent).
    pub fn new(version: u32, session_id: SessionId) -> GuestlibInfo {
        GuestlibInfo {
            version,
            session_id,
            values: BTreeMap::new(),
        }
    }

    /// Marks a statistic present, valid with a value (`Some`) or invalid (`None`).
    pub fn with(mut self, stat: Stat, value: Option<StatValue>) -> GuestlibInfo {
        self.values.insert(stat, value);
        self
    }

    /// One statistic, with the C API's errors.
    pub fn stat(&self, stat: Stat) -> Result<StatValue> {
        match self.values.get(&stat) {
            None => Err(Error::UnsupportedVersion { stat }),
            Some(None) => Err(Error::NotAvailable { stat }),
            Some(Some(value)) => Ok(value.clone()),
        }
    }

    /// The statistics the reply carries (valid or not), in [`Stat`] order.
    pub fn present(&self) -> impl Iterator<Item = (Stat, Option<&StatValue>)> + '_ {
        self.values
            .iter()
            .map(|(stat, value)| (*stat, value.as_ref()))
    }
}

fn decode_error(version: u32, detail: impl Into<String>) -> Error {
    Error::Decode {
        version,
        detail: detail.into(),
    }
}

/// Decodes the payload of a `guestlib.info.get 2` reply.
pub fn decode_v2(bytes: &[u8]) -> Result<GuestlibInfo> {
    if bytes.len() != V2_LEN {
        return Err(decode_error(
            2,
            format!(
                "reply is {} bytes, a v2 reply is exactly {V2_LEN}",
                bytes.len()
            ),
        ));
    }
    let le_u32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let le_u64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let version = le_u32(0);
    if version != 2 {
        return Err(decode_error(
            2,
            format!("header says version {version}, expected 2"),
        ));
    }
    let mut info = GuestlibInfo::new(2, SessionId::new(le_u64(4)));
    for (stat, offset, wide) in V2_LAYOUT {
        let value = if wide {
            le_u64(offset + 4)
        } else {
            u64::from(le_u32(offset + 4))
        };
        info.values
            .insert(stat, (bytes[offset] != 0).then_some(StatValue::U64(value)));
    }
    // The C library forces the last byte to NUL; a path without one ends there.
    let field = &bytes[V2_POOL_PATH..V2_LEN - 1];
    let path = field.split(|&b| b == 0).next().unwrap_or_default();
    info.values.insert(
        Stat::ResourcePoolPath,
        (bytes[V2_POOL_PATH_VALID] != 0)
            .then(|| StatValue::Text(String::from_utf8_lossy(path).into_owned())),
    );
    Ok(info)
}

/// What an XDR read is for, named in errors (built only when one happens).
#[derive(Debug, Clone, Copy)]
enum Field {
    Count,
    Id,
    Stat(u32),
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Count => f.write_str("statistic count"),
            Field::Id => f.write_str("statistic id"),
            Field::Stat(id) => write!(f, "statistic {id}"),
        }
    }
}

/// A big-endian XDR reader over a byte slice that reports where it ran out.
struct Xdr<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Xdr<'a> {
    fn take(&mut self, n: usize, what: Field) -> Result<&'a [u8]> {
        let end = self
            .offset
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                decode_error(
                    3,
                    format!(
                        "truncated: {what} needs {n} bytes at data offset {}, {} left",
                        self.offset,
                        self.bytes.len() - self.offset
                    ),
                )
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn u32(&mut self, what: Field) -> Result<u32> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self, what: Field) -> Result<u64> {
        Ok((u64::from(self.u32(what)?) << 32) | u64::from(self.u32(what)?))
    }

    /// A variable-length `opaque<max>`/`string<max>`: length, bytes, zero padding to 4.
    fn opaque(&mut self, max: Option<usize>, what: Field) -> Result<&'a [u8]> {
        let length = self.u32(what)? as usize;
        if let Some(max) = max {
            if length > max {
                return Err(decode_error(
                    3,
                    format!("{what} is {length} bytes long, at most {max} allowed"),
                ));
            }
        }
        let data = self.take(length, what)?;
        self.take((4 - length % 4) % 4, what)?;
        Ok(data)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }
}

/// Decodes the payload of a `guestlib.info.get 3` reply.
pub fn decode_v3(bytes: &[u8]) -> Result<GuestlibInfo> {
    if bytes.len() < V3_HEADER_LEN {
        return Err(decode_error(
            3,
            format!(
                "reply is {} bytes, shorter than the {V3_HEADER_LEN}-byte header",
                bytes.len()
            ),
        ));
    }
    let version = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if version != 3 {
        return Err(decode_error(
            3,
            format!("header says version {version}, expected 3"),
        ));
    }
    let mut session = [0u8; 8];
    session.copy_from_slice(&bytes[4..12]);
    let session_id = SessionId::new(u64::from_le_bytes(session));
    let data_size = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    let data = bytes
        .get(V3_HEADER_LEN..)
        .and_then(|rest| rest.get(..data_size))
        .ok_or_else(|| {
            decode_error(
                3,
                format!(
                    "header announces {data_size} data bytes, the reply has {}",
                    bytes.len() - V3_HEADER_LEN
                ),
            )
        })?;

    let mut xdr = Xdr {
        bytes: data,
        offset: 0,
    };
    let count = xdr.u32(Field::Count)?;
    // Every statistic takes at least 8 bytes: a count beyond that is a lie, caught before
    // looping on it.
    if count as usize > xdr.remaining() / 8 {
        return Err(decode_error(
            3,
            format!(
                "count of {count} statistics cannot fit in {} bytes",
                xdr.remaining()
            ),
        ));
    }
    let mut info = GuestlibInfo::new(3, session_id);
    let mut long_path: Option<String> = None;
    let mut shares_64: Option<u64> = None;
    for index in 0..count {
        let expected = index + 1;
        let id = xdr.u32(Field::Id)?;
        if id != expected {
            return Err(decode_error(
                3,
                format!("statistic #{expected} has id {id}; ids must be 1, 2, 3, … in order"),
            ));
        }
        if id > MAX_KNOWN_ID {
            // A newer host: everything this crate knows has been read.
            break;
        }
        let (stat, arm) = V3_LAYOUT[(id - 1) as usize];
        let what = Field::Stat(id);
        let valid = xdr.u32(what)? != 0;
        let value = match arm {
            Arm::U32 => StatValue::U64(u64::from(xdr.u32(what)?)),
            Arm::U64 => StatValue::U64(xdr.u64(what)?),
            Arm::Text => {
                let text = xdr.opaque(Some(POOL_PATH_MAX), what)?;
                let text = text.split(|&b| b == 0).next().unwrap_or_default();
                StatValue::Text(String::from_utf8_lossy(text).into_owned())
            }
            Arm::Opaque => {
                let text = xdr.opaque(None, what)?;
                let text = text.split(|&b| b == 0).next().unwrap_or_default();
                StatValue::Text(String::from_utf8_lossy(text).into_owned())
            }
        };
        match (stat, id) {
            (Some(stat), _) => {
                info.values.insert(stat, valid.then_some(value));
            }
            (None, ID_POOL_PATH_LONG) => {
                if valid {
                    long_path = value.as_text().map(str::to_owned).filter(|p| !p.is_empty());
                }
            }
            (None, _) => {
                if valid {
                    shares_64 = value.as_u64();
                }
            }
        }
    }
    if let Some(path) = long_path {
        info.values
            .insert(Stat::ResourcePoolPath, Some(StatValue::Text(path)));
    }
    if let Some(shares) = shares_64 {
        info.values
            .insert(Stat::MemShares, Some(StatValue::U64(shares)));
    }
    Ok(info)
}

/// Decodes a reply payload of the given requested version.
pub fn decode(version: u32, bytes: &[u8]) -> Result<GuestlibInfo> {
    match version {
        2 => decode_v2(bytes),
        3 => decode_v3(bytes),
        other => Err(decode_error(
            other,
            "this crate speaks guestlib versions 2 and 3",
        )),
    }
}

/// Encodes `info` as a v2 reply payload (what a v2 host sends). Statistics v2 does not carry
/// are left out; values too large for a 32-bit field, and text in a numeric field, are sent
/// as invalid.
pub fn encode_v2(info: &GuestlibInfo) -> Vec<u8> {
    let mut bytes = vec![0u8; V2_LEN];
    bytes[0..4].copy_from_slice(&2u32.to_le_bytes());
    bytes[4..12].copy_from_slice(&info.session_id.get().to_le_bytes());
    for (stat, offset, wide) in V2_LAYOUT {
        let Some(Some(value)) = info
            .values
            .get(&stat)
            .map(|v| v.as_ref().and_then(StatValue::as_u64))
        else {
            continue;
        };
        if wide {
            bytes[offset] = 1;
            bytes[offset + 4..offset + 12].copy_from_slice(&value.to_le_bytes());
        } else if let Ok(value) = u32::try_from(value) {
            bytes[offset] = 1;
            bytes[offset + 4..offset + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
    if let Some(Some(path)) = info
        .values
        .get(&Stat::ResourcePoolPath)
        .map(|v| v.as_ref().and_then(StatValue::as_text))
    {
        let path = path.as_bytes();
        let length = path.len().min(POOL_PATH_MAX - 1);
        bytes[V2_POOL_PATH_VALID] = 1;
        bytes[V2_POOL_PATH..V2_POOL_PATH + length].copy_from_slice(&path[..length]);
    }
    bytes
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_opaque(out: &mut Vec<u8>, data: &[u8]) {
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
    out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
}

/// Encodes `info` as a v3 reply payload (what a v3 host sends): header, then statistics 1 up
/// to the highest present one (absent ones in between are sent as invalid). A memory-shares
/// value beyond 32 bits also sends id 38, a resource pool path beyond 511 bytes also sends
/// id 37, as current hosts do.
pub fn encode_v3(info: &GuestlibInfo) -> Vec<u8> {
    let value_of = |stat: Stat| info.values.get(&stat).cloned().flatten();
    let shares = value_of(Stat::MemShares).and_then(|v| v.as_u64());
    let path = value_of(Stat::ResourcePoolPath).and_then(|v| v.as_text().map(str::to_owned));
    let mut count = info
        .values
        .keys()
        .map(|&stat| v3_id(stat))
        .max()
        .unwrap_or(0);
    if shares.is_some_and(|s| s > u64::from(u32::MAX)) {
        count = ID_MEM_SHARES_64;
    }
    if path.as_ref().is_some_and(|p| p.len() >= POOL_PATH_MAX) {
        count = count.max(ID_POOL_PATH_LONG);
    }

    let mut data = Vec::new();
    put_u32(&mut data, count);
    for id in 1..=count {
        put_u32(&mut data, id);
        let (stat, arm) = V3_LAYOUT[(id - 1) as usize];
        let value = match (stat, id) {
            (Some(stat), _) => value_of(stat),
            (None, ID_POOL_PATH_LONG) => path.clone().map(StatValue::Text),
            (None, _) => shares.map(StatValue::U64),
        };
        match arm {
            Arm::U32 => {
                let number = value
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok());
                put_u32(&mut data, u32::from(number.is_some()));
                put_u32(&mut data, number.unwrap_or(0));
            }
            Arm::U64 => {
                let number = value.and_then(|v| v.as_u64());
                put_u32(&mut data, u32::from(number.is_some()));
                data.extend_from_slice(&number.unwrap_or(0).to_be_bytes());
            }
            Arm::Text => {
                let text = value
                    .as_ref()
                    .and_then(|v| v.as_text())
                    .filter(|t| t.len() < POOL_PATH_MAX);
                put_u32(&mut data, u32::from(text.is_some()));
                put_opaque(&mut data, text.unwrap_or_default().as_bytes());
            }
            Arm::Opaque => {
                let text = value.as_ref().and_then(|v| v.as_text());
                put_u32(&mut data, u32::from(text.is_some()));
                put_opaque(&mut data, text.unwrap_or_default().as_bytes());
            }
        }
    }
    let mut bytes = Vec::with_capacity(V3_HEADER_LEN + data.len());
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&info.session_id.get().to_le_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&data);
    bytes
}

/// The request text for a data version.
pub fn request(version: u32) -> String {
    format!("guestlib.info.get {version}")
}

/// Asks the host for the statistics, starting at `version` and falling back from 3 to 2 as
/// the C library does. A host that does not know the command, or refuses version 2, is
/// [`Error::NotEnabled`]; a broken channel is [`Error::Channel`]; a reply that does not decode
/// is [`Error::Decode`].
pub fn fetch<B: Backdoor + ?Sized>(
    backdoor: &mut B,
    options: &RpciOptions,
    version: u32,
) -> Result<GuestlibInfo> {
    let mut version = version.clamp(2, DATA_VERSION);
    loop {
        let reply = rpci::send_one(backdoor, options, request(version).as_bytes())?;
        if reply.success {
            return decode(version, &reply.payload);
        }
        if version <= 2 || reply.text() == UNKNOWN_COMMAND {
            return Err(Error::NotEnabled);
        }
        version -= 1;
    }
}

/// The longest `guestlib.stat.get` request the host accepts (the C client's buffer).
pub const STAT_GET_MAX_REQUEST: usize = 256;

/// The formats `guestlib.stat.get` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatEncoding {
    /// `key = value` lines.
    Text,
    /// JSON, with each metric's type and units.
    Json,
    /// XML (`<metrics session="…">`).
    Xml,
    /// YAML.
    Yaml,
}

impl std::fmt::Display for StatEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StatEncoding::Text => "text",
            StatEncoding::Json => "json",
            StatEncoding::Xml => "xml",
            StatEncoding::Yaml => "yaml",
        })
    }
}

/// `VMGuestLib_StatGet` (`vmware-toolbox-cmd stat raw <encoding> <stat> [<param>]`): asks the
/// host for a raw statistic such as `session`, `host`, `resources`, `vscsi <device>` or
/// `vnet <mac>`, in the given encoding, and returns the host's text. An empty `stat` lists the
/// categories.
///
/// A request longer than [`STAT_GET_MAX_REQUEST`] bytes is [`Error::BufferTooSmall`] (as in
/// C), a `stat` with a NUL byte [`Error::InvalidArg`], a refusal
/// [`Error::RawStatNotAvailable`].
pub fn stat_get<B: Backdoor + ?Sized>(
    backdoor: &mut B,
    options: &RpciOptions,
    encoding: StatEncoding,
    stat: &str,
) -> Result<String> {
    if stat.contains('\0') {
        return Err(Error::InvalidArg);
    }
    let request = format!("guestlib.stat.get {encoding} {}", stat.trim());
    let request = request.trim_end();
    if request.len() > STAT_GET_MAX_REQUEST {
        return Err(Error::BufferTooSmall);
    }
    let reply = rpci::send_one(backdoor, options, request.as_bytes())?;
    if reply.success {
        Ok(reply.text())
    } else {
        Err(Error::RawStatNotAvailable {
            name: stat.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v3_ids_follow_the_c_enum() {
        assert_eq!(v3_id(Stat::CpuReservationMhz), 1);
        assert_eq!(v3_id(Stat::ResourcePoolPath), 18);
        assert_eq!(v3_id(Stat::CpuStolenMs), 19);
        assert_eq!(v3_id(Stat::MemTargetSizeMb), 20);
        assert_eq!(v3_id(Stat::HostMemUnmappedMb), 30);
        assert_eq!(v3_id(Stat::MemBalloonMaxMb), 36);
        for &stat in Stat::ALL {
            assert!((1..=36).contains(&v3_id(stat)), "{stat}");
        }
    }

    fn value_strategy(stat: Stat) -> BoxedStrategy<Option<StatValue>> {
        match (stat, V3_LAYOUT[(v3_id(stat) - 1) as usize].1) {
            (_, Arm::U32) => proptest::option::of(any::<u32>().prop_map(StatValue::from)).boxed(),
            (_, Arm::U64) => proptest::option::of(any::<u64>().prop_map(StatValue::U64)).boxed(),
            _ => proptest::option::of("[a-zA-Z0-9/ _-]{0,100}".prop_map(StatValue::Text)).boxed(),
        }
    }

    fn info_strategy() -> impl Strategy<Value = GuestlibInfo> {
        (1usize..=Stat::ALL.len(), any::<u64>()).prop_flat_map(|(count, session)| {
            let stats: Vec<Stat> = Stat::ALL[..count].to_vec();
            let values: Vec<_> = stats.iter().map(|&stat| value_strategy(stat)).collect();
            values.prop_map(move |values| {
                stats.iter().zip(values).fold(
                    GuestlibInfo::new(3, SessionId::new(session)),
                    |info, (&stat, value)| info.with(stat, value),
                )
            })
        })
    }

    proptest! {
        #[test]
        fn v3_round_trips(info in info_strategy()) {
            prop_assert_eq!(decode_v3(&encode_v3(&info)).unwrap(), info);
        }

        #[test]
        fn v2_round_trips_the_v2_statistics(info in info_strategy()) {
            let decoded = decode_v2(&encode_v2(&info)).unwrap();
            prop_assert_eq!(decoded.session_id, info.session_id);
            for (stat, _, wide) in V2_LAYOUT {
                let expected = match info.values.get(&stat).cloned().flatten() {
                    Some(StatValue::U64(v)) if wide || v <= u64::from(u32::MAX) => Some(StatValue::U64(v)),
                    _ => None,
                };
                prop_assert_eq!(decoded.stat(stat).ok(), expected);
            }
            let unsupported = matches!(decoded.stat(Stat::CpuStolenMs), Err(Error::UnsupportedVersion { .. }));
            prop_assert!(unsupported);
        }

        #[test]
        fn v3_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_v3(&bytes);
        }

        #[test]
        fn v3_with_valid_header_never_panics(
            session in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..600),
            lie in any::<bool>(),
        ) {
            let mut bytes = 3u32.to_le_bytes().to_vec();
            bytes.extend_from_slice(&session.to_le_bytes());
            let size = if lie { data.len() as u32 + 4 } else { data.len() as u32 };
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&data);
            let result = decode_v3(&bytes);
            if lie {
                prop_assert!(result.is_err());
            }
        }

        #[test]
        fn v3_mutated_valid_replies_never_panic(
            info in info_strategy(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode_v3(&info);
            for (index, value) in flips {
                let at = index.index(bytes.len());
                bytes[at] = value;
            }
            let _ = decode_v3(&bytes);
            let _ = decode_v3(&bytes[..cut.index(bytes.len() + 1)]);
        }

        #[test]
        fn v2_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
            let _ = decode_v2(&bytes);
        }

        #[test]
        fn v2_of_the_right_length_never_panics(bytes in proptest::collection::vec(any::<u8>(), V2_LEN..=V2_LEN)) {
            let _ = decode_v2(&bytes);
        }
    }
}
