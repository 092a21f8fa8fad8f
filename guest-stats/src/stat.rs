//! The statistics: their names, units and descriptions, and a value of one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The unit a statistic is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Unit {
    /// Megahertz (processor speed, CPU limits and reservations).
    Mhz,
    /// Milliseconds (CPU time, elapsed time).
    Ms,
    /// Megabytes (2^20 bytes, as the C API counts them).
    Mb,
    /// A share count (relative priority under contention).
    Shares,
    /// A count of physical processor cores.
    Cores,
    /// Free text (the resource pool path).
    Text,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Mhz => "MHz",
            Unit::Ms => "ms",
            Unit::Mb => "MB",
            Unit::Shares => "shares",
            Unit::Cores => "cores",
            Unit::Text => "text",
        })
    }
}

/// The value of one statistic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatValue {
    /// A number (every statistic except the resource pool path). The C API returns some as
    /// `uint32` and some as `uint64`; here they are all widened losslessly to `u64`.
    U64(u64),
    /// Text (the resource pool path).
    Text(String),
}

impl StatValue {
    /// The number, if this is a numeric value.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            StatValue::U64(value) => Some(*value),
            StatValue::Text(_) => None,
        }
    }

    /// The text, if this is a text value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            StatValue::U64(_) => None,
            StatValue::Text(text) => Some(text),
        }
    }
}

impl fmt::Display for StatValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatValue::U64(value) => write!(f, "{value}"),
            StatValue::Text(text) => f.write_str(text),
        }
    }
}

impl From<u64> for StatValue {
    fn from(value: u64) -> Self {
        StatValue::U64(value)
    }
}

impl From<u32> for StatValue {
    fn from(value: u32) -> Self {
        StatValue::U64(value.into())
    }
}

impl From<String> for StatValue {
    fn from(value: String) -> Self {
        StatValue::Text(value)
    }
}

impl From<&str> for StatValue {
    fn from(value: &str) -> Self {
        StatValue::Text(value.to_owned())
    }
}

macro_rules! stats {
    ($( $(#[$attr:meta])* $variant:ident => $name:literal, $unit:ident, $counter:literal, $c_fn:literal, $desc:literal; )*) => {
        /// One statistic of the vSphere Guest API.
        ///
        /// The names follow the C accessors (`VMGuestLib_GetMemBalloonedMB` is
        /// [`Stat::MemBalloonedMb`]); [`Stat::name`] is the stable snake_case identifier used in
        /// JSON and Prometheus output.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Stat {
            $( $(#[$attr])* $variant, )*
        }

        impl Stat {
            /// Every statistic, in the order of the C API's statistic ids.
            pub const ALL: &'static [Stat] = &[ $( Stat::$variant, )* ];

            /// The stable snake_case identifier, e.g. `"cpu_stolen_ms"`.
            pub fn name(self) -> &'static str {
                match self { $( Stat::$variant => $name, )* }
            }

            /// The unit of the value.
            pub fn unit(self) -> Unit {
                match self { $( Stat::$variant => Unit::$unit, )* }
            }

            /// Whether the value only grows within a session (a counter such as CPU time),
            /// rather than going up and down (a gauge). Counters are what
            /// [`Sampler`](crate::Sampler) turns into rates.
            pub fn is_counter(self) -> bool {
                match self { $( Stat::$variant => $counter, )* }
            }

            /// The name of the C accessor, e.g. `"VMGuestLib_GetMemBalloonedMB"`.
            pub fn c_function(self) -> &'static str {
                match self { $( Stat::$variant => $c_fn, )* }
            }

            /// One line saying what the statistic means (after the vSphere Guest SDK guide).
            pub fn description(self) -> &'static str {
                match self { $( Stat::$variant => $desc, )* }
            }
        }
    };
}

stats! {
    /// Minimum processing power reserved for the VM.
    CpuReservationMhz => "cpu_reservation_mhz", Mhz, false, "VMGuestLib_GetCpuReservationMHz",
        "Minimum processing power in MHz reserved for the virtual machine.";
    /// Upper limit of processor use available to the VM.
    CpuLimitMhz => "cpu_limit_mhz", Mhz, false, "VMGuestLib_GetCpuLimitMHz",
        "Upper limit of processor use in MHz available to the virtual machine.";
    /// CPU shares allocated to the VM.
    CpuShares => "cpu_shares", Shares, false, "VMGuestLib_GetCpuShares",
        "Number of CPU shares allocated to the virtual machine.";
    /// CPU time used by the VM, guest and virtualization code.
    CpuUsedMs => "cpu_used_ms", Ms, true, "VMGuestLib_GetCpuUsedMs",
        "Milliseconds during which the virtual machine has used the CPU, guest and virtualization code together.";
    /// Speed of the host's physical CPU.
    HostProcessorSpeedMhz => "host_processor_speed_mhz", Mhz, false, "VMGuestLib_GetHostProcessorSpeed",
        "Speed of the host system's physical CPU in MHz.";
    /// Minimum memory reserved for the VM.
    MemReservationMb => "mem_reservation_mb", Mb, false, "VMGuestLib_GetMemReservationMB",
        "Minimum amount of memory reserved for the virtual machine.";
    /// Upper limit of memory available to the VM.
    MemLimitMb => "mem_limit_mb", Mb, false, "VMGuestLib_GetMemLimitMB",
        "Upper limit of memory that is available to the virtual machine.";
    /// Memory shares allocated to the VM (64-bit where the host gives it).
    MemShares => "mem_shares", Shares, false, "VMGuestLib_GetMemShares64",
        "Number of memory shares allocated to the virtual machine.";
    /// Memory allocated to the VM.
    MemMappedMb => "mem_mapped_mb", Mb, false, "VMGuestLib_GetMemMappedMB",
        "Memory allocated to the virtual machine, excluding ballooned, swapped and never-accessed memory.";
    /// Memory the VM actively uses (working set estimate).
    MemActiveMb => "mem_active_mb", Mb, false, "VMGuestLib_GetMemActiveMB",
        "Memory the virtual machine is actively using: its estimated working set size.";
    /// Host memory consumed for virtualization data structures of this VM.
    MemOverheadMb => "mem_overhead_mb", Mb, false, "VMGuestLib_GetMemOverheadMB",
        "Overhead memory of this virtual machine currently consumed on the host.";
    /// Memory reclaimed from the VM by the balloon driver.
    MemBalloonedMb => "mem_ballooned_mb", Mb, false, "VMGuestLib_GetMemBalloonedMB",
        "Memory reclaimed from this virtual machine by the memory balloon driver.";
    /// Memory reclaimed from the VM by host swapping.
    MemSwappedMb => "mem_swapped_mb", Mb, false, "VMGuestLib_GetMemSwappedMB",
        "Memory reclaimed from this virtual machine by transparently swapping guest memory to disk.";
    /// Memory of the VM that is copy-on-write shared on the host.
    MemSharedMb => "mem_shared_mb", Mb, false, "VMGuestLib_GetMemSharedMB",
        "Physical memory of this virtual machine that is copy-on-write shared on the host.";
    /// Host memory saved by copy-on-write sharing.
    MemSharedSavedMb => "mem_shared_saved_mb", Mb, false, "VMGuestLib_GetMemSharedSavedMB",
        "Estimated physical host memory saved by copy-on-write sharing of guest memory.";
    /// Host memory consumed for the VM's memory.
    MemUsedMb => "mem_used_mb", Mb, false, "VMGuestLib_GetMemUsedMB",
        "Estimated physical host memory currently consumed for this virtual machine's memory.";
    /// Time since the VM last started running on the host.
    ElapsedMs => "elapsed_ms", Ms, true, "VMGuestLib_GetElapsedMs",
        "Milliseconds since the virtual machine last started running on the host (power-on, resume or migration).";
    /// The host resource pool the VM belongs to.
    ResourcePoolPath => "resource_pool_path", Text, false, "VMGuestLib_GetResourcePoolPath",
        "Path name of the resource pool the virtual machine belongs to on its host.";
    /// Time the VM was ready to run but not scheduled.
    CpuStolenMs => "cpu_stolen_ms", Ms, true, "VMGuestLib_GetCpuStolenMs",
        "Milliseconds the virtual machine was ready to run but not scheduled.";
    /// Target memory allocation of the VM.
    MemTargetSizeMb => "mem_target_size_mb", Mb, false, "VMGuestLib_GetMemTargetSizeMB",
        "Size of the target memory allocation for this virtual machine.";
    /// Physical CPU cores of the host.
    HostCpuNumCores => "host_cpu_num_cores", Cores, false, "VMGuestLib_GetHostNumCpuCores",
        "Number of physical CPU cores of the host.";
    /// CPU time used by the whole host.
    HostCpuUsedMs => "host_cpu_used_ms", Ms, true, "VMGuestLib_GetHostCpuUsedMs",
        "Milliseconds of CPU time used by the whole host.";
    /// Memory the host has swapped out.
    HostMemSwappedMb => "host_mem_swapped_mb", Mb, false, "VMGuestLib_GetHostMemSwappedMB",
        "Memory swapped out on the host.";
    /// Memory copy-on-write shared on the host.
    HostMemSharedMb => "host_mem_shared_mb", Mb, false, "VMGuestLib_GetHostMemSharedMB",
        "Memory copy-on-write shared on the host.";
    /// Memory used on the host.
    HostMemUsedMb => "host_mem_used_mb", Mb, false, "VMGuestLib_GetHostMemUsedMB",
        "Memory used on the host.";
    /// Physical memory of the host.
    HostMemPhysMb => "host_mem_phys_mb", Mb, false, "VMGuestLib_GetHostMemPhysMB",
        "Physical memory of the host.";
    /// Free physical memory of the host.
    HostMemPhysFreeMb => "host_mem_phys_free_mb", Mb, false, "VMGuestLib_GetHostMemPhysFreeMB",
        "Free physical memory of the host.";
    /// Host kernel overhead memory (deprecated: hosts report 0).
    HostMemKernOvhdMb => "host_mem_kern_ovhd_mb", Mb, false, "VMGuestLib_GetHostMemKernOvhdMB",
        "Host kernel overhead memory (deprecated; current hosts report 0).";
    /// Memory mapped on the host.
    HostMemMappedMb => "host_mem_mapped_mb", Mb, false, "VMGuestLib_GetHostMemMappedMB",
        "Memory mapped on the host.";
    /// Memory not mapped on the host.
    HostMemUnmappedMb => "host_mem_unmapped_mb", Mb, false, "VMGuestLib_GetHostMemUnmappedMB",
        "Memory not mapped on the host.";
    /// Memory of the VM that the host compressed.
    MemZippedMb => "mem_zipped_mb", Mb, false, "VMGuestLib_GetMemZippedMB",
        "Memory of this virtual machine compressed by the host.";
    /// Host memory saved by compressing the VM's memory.
    MemZipSavedMb => "mem_zip_saved_mb", Mb, false, "VMGuestLib_GetMemZipSavedMB",
        "Host memory saved by compressing this virtual machine's memory.";
    /// Memory of the VM swapped to the host's swap cache (SSD).
    MemLlSwappedMb => "mem_ll_swapped_mb", Mb, false, "VMGuestLib_GetMemLLSwappedMB",
        "Memory of this virtual machine swapped to the host's low-latency swap (host cache).";
    /// Target size of the VM's host swap.
    MemSwapTargetMb => "mem_swap_target_mb", Mb, false, "VMGuestLib_GetMemSwapTargetMB",
        "Target amount of this virtual machine's memory to be swapped by the host.";
    /// Target size of the VM's balloon.
    MemBalloonTargetMb => "mem_balloon_target_mb", Mb, false, "VMGuestLib_GetMemBalloonTargetMB",
        "Target amount of memory the balloon driver should reclaim from this virtual machine.";
    /// Largest balloon the host may ask for.
    MemBalloonMaxMb => "mem_balloon_max_mb", Mb, false, "VMGuestLib_GetMemBalloonMaxMB",
        "Largest amount of memory the balloon driver may reclaim from this virtual machine.";
}

impl Stat {
    /// The statistic with the given [`name`](Stat::name), if there is one.
    pub fn from_name(name: &str) -> Option<Stat> {
        Stat::ALL.iter().copied().find(|stat| stat.name() == name)
    }
}

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing a [`Stat`] from an unknown name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown statistic `{0}` (see Stat::ALL for the names)")]
pub struct UnknownStat(pub String);

impl FromStr for Stat {
    type Err = UnknownStat;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Stat::from_name(name).ok_or_else(|| UnknownStat(name.to_owned()))
    }
}

impl Serialize for Stat {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Stat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Stat::from_name(&name).ok_or_else(|| serde::de::Error::custom(UnknownStat(name)))
    }
}
