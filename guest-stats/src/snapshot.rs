//! The session id and a snapshot of every statistic at once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Stat, StatValue};

/// The id of a statistics session: it changes when the VM is migrated, suspended and resumed,
/// or reverted to a snapshot, and every counter read before the change is then stale.
///
/// Ids are opaque: compare them for equality, nothing more. `0` is never a valid id (the C API
/// uses it for "no information yet"). `Display` prints `0x` and lowercase hex, as
/// `vmware-toolbox-cmd stat sessionid` does.
///
/// Serde writes the same hex string (`"0x5a17e0c0ffee0001"`), not a number: ids use all 64
/// bits, and JSON readers that hold numbers as doubles (JavaScript, jq) would round them.
/// Deserialising also accepts a bare integer, as older vmsdk versions wrote it.
///
/// ```
/// use guest_stats::SessionId;
///
/// let id = SessionId::new(6491904507409989633);
/// let json = serde_json::to_string(&id).unwrap();
/// assert_eq!(json, r#""0x5a17e0c0ffee0001""#);
/// assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
/// assert_eq!("0x5a17e0c0ffee0001".parse::<SessionId>().unwrap(), id);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl SessionId {
    /// The id `0`, which no live session has.
    pub const INVALID: SessionId = SessionId(0);

    /// A session id with the given raw value.
    pub const fn new(raw: u64) -> SessionId {
        SessionId(raw)
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether this is a real session id (not `0`).
    pub const fn is_valid(self) -> bool {
        self.0 != 0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A string that is not a session id in `0x`-prefixed hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSessionIdError(String);

impl fmt::Display for ParseSessionIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a session id (expected `0x` and up to 16 hex digits)",
            self.0
        )
    }
}

impl std::error::Error for ParseSessionIdError {}

impl std::str::FromStr for SessionId {
    type Err = ParseSessionIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .filter(|digits| !digits.is_empty() && digits.len() <= 16)
            .and_then(|digits| u64::from_str_radix(digits, 16).ok())
            .map(SessionId)
            .ok_or_else(|| ParseSessionIdError(text.to_owned()))
    }
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = SessionId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a session id as a hex string (\"0x…\") or an integer")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SessionId, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, raw: u64) -> Result<SessionId, E> {
                Ok(SessionId(raw))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

impl From<u64> for SessionId {
    fn from(raw: u64) -> Self {
        SessionId(raw)
    }
}

macro_rules! snapshot {
    ($( $field:ident : $ty:ty => $stat:ident ),* $(,)?) => {
        /// Every statistic of one [`update`](crate::GuestStats::update), each `None` when the
        /// backend has no value for it (`NotAvailable` or `UnsupportedVersion`).
        ///
        /// Serialises to one JSON object with a key per [`Stat::name`]. [`Snapshot::iter`] walks
        /// every statistic generically, so a program can print a table, JSON or Prometheus
        /// text without naming each one.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[non_exhaustive]
        pub struct Snapshot {
            /// The session the values belong to.
            pub session_id: SessionId,
            /// The backend that produced the values: `"vmware"`, `"linux"` or `"fake"`.
            pub backend: String,
            $(
                #[doc = concat!("See [`Stat::", stringify!($stat), "`].")]
                #[serde(default)]
                pub $field: Option<$ty>,
            )*
        }

        impl Snapshot {
            /// An empty snapshot (every statistic `None`).
            pub fn new(session_id: SessionId, backend: impl Into<String>) -> Snapshot {
                Snapshot { session_id, backend: backend.into(), $( $field: None, )* }
            }

            /// The value of one statistic.
            pub fn value(&self, stat: Stat) -> Option<StatValue> {
                match stat {
                    $( Stat::$stat => self.$field.clone().map(StatValue::from), )*
                }
            }

            /// Sets (or with `None` clears) one statistic. A value of the wrong kind (text for a
            /// number or a number for text) is refused with `false` and leaves the snapshot as
            /// it was.
            pub fn set(&mut self, stat: Stat, value: Option<StatValue>) -> bool {
                match stat {
                    $( Stat::$stat => match value {
                        None => { self.$field = None; true }
                        Some(value) => match <$ty as SnapshotField>::from_value(value) {
                            Some(value) => { self.$field = Some(value); true }
                            None => false,
                        },
                    }, )*
                }
            }
        }
    };
}

trait SnapshotField: Sized {
    fn from_value(value: StatValue) -> Option<Self>;
}

impl SnapshotField for u64 {
    fn from_value(value: StatValue) -> Option<Self> {
        value.as_u64()
    }
}

impl SnapshotField for String {
    fn from_value(value: StatValue) -> Option<Self> {
        match value {
            StatValue::Text(text) => Some(text),
            StatValue::U64(_) => None,
        }
    }
}

snapshot! {
    cpu_reservation_mhz: u64 => CpuReservationMhz,
    cpu_limit_mhz: u64 => CpuLimitMhz,
    cpu_shares: u64 => CpuShares,
    cpu_used_ms: u64 => CpuUsedMs,
    host_processor_speed_mhz: u64 => HostProcessorSpeedMhz,
    mem_reservation_mb: u64 => MemReservationMb,
    mem_limit_mb: u64 => MemLimitMb,
    mem_shares: u64 => MemShares,
    mem_mapped_mb: u64 => MemMappedMb,
    mem_active_mb: u64 => MemActiveMb,
    mem_overhead_mb: u64 => MemOverheadMb,
    mem_ballooned_mb: u64 => MemBalloonedMb,
    mem_swapped_mb: u64 => MemSwappedMb,
    mem_shared_mb: u64 => MemSharedMb,
    mem_shared_saved_mb: u64 => MemSharedSavedMb,
    mem_used_mb: u64 => MemUsedMb,
    elapsed_ms: u64 => ElapsedMs,
    resource_pool_path: String => ResourcePoolPath,
    cpu_stolen_ms: u64 => CpuStolenMs,
    mem_target_size_mb: u64 => MemTargetSizeMb,
    host_cpu_num_cores: u64 => HostCpuNumCores,
    host_cpu_used_ms: u64 => HostCpuUsedMs,
    host_mem_swapped_mb: u64 => HostMemSwappedMb,
    host_mem_shared_mb: u64 => HostMemSharedMb,
    host_mem_used_mb: u64 => HostMemUsedMb,
    host_mem_phys_mb: u64 => HostMemPhysMb,
    host_mem_phys_free_mb: u64 => HostMemPhysFreeMb,
    host_mem_kern_ovhd_mb: u64 => HostMemKernOvhdMb,
    host_mem_mapped_mb: u64 => HostMemMappedMb,
    host_mem_unmapped_mb: u64 => HostMemUnmappedMb,
    mem_zipped_mb: u64 => MemZippedMb,
    mem_zip_saved_mb: u64 => MemZipSavedMb,
    mem_ll_swapped_mb: u64 => MemLlSwappedMb,
    mem_swap_target_mb: u64 => MemSwapTargetMb,
    mem_balloon_target_mb: u64 => MemBalloonTargetMb,
    mem_balloon_max_mb: u64 => MemBalloonMaxMb,
}

impl Snapshot {
    /// Every statistic with its value, in the order of [`Stat::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Stat, Option<StatValue>)> + '_ {
        Stat::ALL.iter().map(move |&stat| (stat, self.value(stat)))
    }

    /// The statistics that have a value, in the order of [`Stat::ALL`].
    pub fn available(&self) -> impl Iterator<Item = (Stat, StatValue)> + '_ {
        self.iter()
            .filter_map(|(stat, value)| value.map(|value| (stat, value)))
    }
}
