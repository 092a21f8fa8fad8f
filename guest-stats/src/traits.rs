//! [`GuestStats`], the crate's trait, and its mockall mock (feature `mock`).

use crate::{number, wrong_kind, Result, SessionId, Snapshot, Stat, StatValue};

/// A handle on the statistics the hypervisor (or the guest kernel) gives about this VM.
///
/// Backends implement [`backend`](GuestStats::backend), [`update`](GuestStats::update),
/// [`session_id`](GuestStats::session_id) and [`stat`](GuestStats::stat); the typed accessors
/// and [`snapshot`](GuestStats::snapshot) are built on those.
///
/// Every accessor returns [`Error::NoInfo`](crate::Error::NoInfo) until an `update` has succeeded, and again after an
/// `update` fails (as the C library does). A statistic the backend cannot give is
/// [`Error::NotAvailable`](crate::Error::NotAvailable) (or [`Error::UnsupportedVersion`](crate::Error::UnsupportedVersion) when the host is too old for it).
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait GuestStats: Send {
    /// The backend's name: `"vmware"`, `"linux"` or `"fake"`.
    fn backend(&self) -> &'static str;

    /// Refreshes every statistic and returns the session they belong to
    /// (`VMGuestLib_UpdateInfo` followed by `VMGuestLib_GetSessionId`).
    ///
    /// If the id differs from the previous one, counters read before are stale.
    fn update(&mut self) -> Result<SessionId>;

    /// The session of the last successful [`update`](GuestStats::update).
    fn session_id(&self) -> Result<SessionId>;

    /// One statistic of the last successful [`update`](GuestStats::update).
    fn stat(&self, stat: Stat) -> Result<StatValue>;

    /// All statistics of the last successful update; those without a value are `None`.
    ///
    /// Fails only if there is no update yet ([`Error::NoInfo`](crate::Error::NoInfo)) or a statistic fails for a
    /// reason other than being unavailable.
    fn snapshot(&self) -> Result<Snapshot> {
        let mut snapshot = Snapshot::new(self.session_id()?, self.backend());
        for &stat in Stat::ALL {
            match self.stat(stat) {
                Ok(value) => {
                    if !snapshot.set(stat, Some(value)) {
                        return Err(wrong_kind(stat));
                    }
                }
                Err(error) if error.is_missing_statistic() => {}
                Err(error) => return Err(error),
            }
        }
        Ok(snapshot)
    }

    /// `VMGuestLib_GetCpuReservationMHz`: minimum processing power reserved for the VM, in MHz.
    fn cpu_reservation_mhz(&self) -> Result<u64> {
        number(self.stat(Stat::CpuReservationMhz), Stat::CpuReservationMhz)
    }

    /// `VMGuestLib_GetCpuLimitMHz`: upper limit of processor use available to the VM, in MHz.
    fn cpu_limit_mhz(&self) -> Result<u64> {
        number(self.stat(Stat::CpuLimitMhz), Stat::CpuLimitMhz)
    }

    /// `VMGuestLib_GetCpuShares`: CPU shares allocated to the VM.
    fn cpu_shares(&self) -> Result<u64> {
        number(self.stat(Stat::CpuShares), Stat::CpuShares)
    }

    /// `VMGuestLib_GetCpuStolenMs`: milliseconds the VM was ready to run but not scheduled.
    fn cpu_stolen_ms(&self) -> Result<u64> {
        number(self.stat(Stat::CpuStolenMs), Stat::CpuStolenMs)
    }

    /// `VMGuestLib_GetCpuUsedMs`: milliseconds the VM has used the CPU.
    fn cpu_used_ms(&self) -> Result<u64> {
        number(self.stat(Stat::CpuUsedMs), Stat::CpuUsedMs)
    }

    /// `VMGuestLib_GetElapsedMs`: milliseconds since the VM last started running on its host.
    fn elapsed_ms(&self) -> Result<u64> {
        number(self.stat(Stat::ElapsedMs), Stat::ElapsedMs)
    }

    /// `VMGuestLib_GetHostProcessorSpeed`: speed of the host's physical CPU, in MHz.
    fn host_processor_speed_mhz(&self) -> Result<u64> {
        number(
            self.stat(Stat::HostProcessorSpeedMhz),
            Stat::HostProcessorSpeedMhz,
        )
    }

    /// `VMGuestLib_GetMemActiveMB`: memory the VM is actively using, in MB.
    fn mem_active_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemActiveMb), Stat::MemActiveMb)
    }

    /// `VMGuestLib_GetMemBalloonedMB`: memory reclaimed by the balloon driver, in MB.
    fn mem_ballooned_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemBalloonedMb), Stat::MemBalloonedMb)
    }

    /// `VMGuestLib_GetMemLimitMB`: upper limit of memory available to the VM, in MB.
    fn mem_limit_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemLimitMb), Stat::MemLimitMb)
    }

    /// `VMGuestLib_GetMemMappedMB`: memory allocated to the VM, in MB.
    fn mem_mapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemMappedMb), Stat::MemMappedMb)
    }

    /// `VMGuestLib_GetMemOverheadMB`: host overhead memory of the VM, in MB.
    fn mem_overhead_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemOverheadMb), Stat::MemOverheadMb)
    }

    /// `VMGuestLib_GetMemReservationMB`: minimum memory reserved for the VM, in MB.
    fn mem_reservation_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemReservationMb), Stat::MemReservationMb)
    }

    /// `VMGuestLib_GetMemSharedMB`: VM memory copy-on-write shared on the host, in MB.
    fn mem_shared_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemSharedMb), Stat::MemSharedMb)
    }

    /// `VMGuestLib_GetMemSharedSavedMB`: host memory saved by sharing, in MB.
    fn mem_shared_saved_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemSharedSavedMb), Stat::MemSharedSavedMb)
    }

    /// `VMGuestLib_GetMemShares64` (or `GetMemShares` on older hosts): memory shares.
    fn mem_shares(&self) -> Result<u64> {
        number(self.stat(Stat::MemShares), Stat::MemShares)
    }

    /// `VMGuestLib_GetMemSwappedMB`: memory reclaimed by host swapping, in MB.
    fn mem_swapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemSwappedMb), Stat::MemSwappedMb)
    }

    /// `VMGuestLib_GetMemTargetSizeMB`: target memory allocation of the VM, in MB.
    fn mem_target_size_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemTargetSizeMb), Stat::MemTargetSizeMb)
    }

    /// `VMGuestLib_GetMemUsedMB`: host memory consumed for the VM's memory, in MB.
    fn mem_used_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemUsedMb), Stat::MemUsedMb)
    }

    /// `VMGuestLib_GetResourcePoolPath`: the host resource pool of the VM.
    ///
    /// Returns an owned `String`, so the C API's `VMGUESTLIB_ERROR_BUFFER_TOO_SMALL` cannot
    /// happen.
    fn resource_pool_path(&self) -> Result<String> {
        match self.stat(Stat::ResourcePoolPath)? {
            StatValue::Text(path) => Ok(path),
            StatValue::U64(_) => Err(wrong_kind(Stat::ResourcePoolPath)),
        }
    }

    /// `VMGuestLib_GetHostNumCpuCores`: physical CPU cores of the host (v3 hosts).
    fn host_cpu_num_cores(&self) -> Result<u64> {
        number(self.stat(Stat::HostCpuNumCores), Stat::HostCpuNumCores)
    }

    /// `VMGuestLib_GetHostCpuUsedMs`: CPU time used by the whole host, in ms (v3 hosts).
    fn host_cpu_used_ms(&self) -> Result<u64> {
        number(self.stat(Stat::HostCpuUsedMs), Stat::HostCpuUsedMs)
    }

    /// `VMGuestLib_GetHostMemSwappedMB`: memory swapped on the host, in MB (v3 hosts).
    fn host_mem_swapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemSwappedMb), Stat::HostMemSwappedMb)
    }

    /// `VMGuestLib_GetHostMemSharedMB`: memory shared on the host, in MB (v3 hosts).
    fn host_mem_shared_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemSharedMb), Stat::HostMemSharedMb)
    }

    /// `VMGuestLib_GetHostMemUsedMB`: memory used on the host, in MB (v3 hosts).
    fn host_mem_used_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemUsedMb), Stat::HostMemUsedMb)
    }

    /// `VMGuestLib_GetHostMemPhysMB`: physical memory of the host, in MB (v3 hosts).
    fn host_mem_phys_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemPhysMb), Stat::HostMemPhysMb)
    }

    /// `VMGuestLib_GetHostMemPhysFreeMB`: free physical memory of the host, in MB (v3 hosts).
    fn host_mem_phys_free_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemPhysFreeMb), Stat::HostMemPhysFreeMb)
    }

    /// `VMGuestLib_GetHostMemKernOvhdMB`: host kernel overhead, in MB (deprecated, reports 0).
    fn host_mem_kern_ovhd_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemKernOvhdMb), Stat::HostMemKernOvhdMb)
    }

    /// `VMGuestLib_GetHostMemMappedMB`: memory mapped on the host, in MB (v3 hosts).
    fn host_mem_mapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemMappedMb), Stat::HostMemMappedMb)
    }

    /// `VMGuestLib_GetHostMemUnmappedMB`: memory not mapped on the host, in MB (v3 hosts).
    fn host_mem_unmapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::HostMemUnmappedMb), Stat::HostMemUnmappedMb)
    }

    /// `VMGuestLib_GetMemZippedMB`: VM memory compressed by the host, in MB (ESX 5.0+).
    fn mem_zipped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemZippedMb), Stat::MemZippedMb)
    }

    /// `VMGuestLib_GetMemZipSavedMB`: host memory saved by compression, in MB (ESX 5.0+).
    fn mem_zip_saved_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemZipSavedMb), Stat::MemZipSavedMb)
    }

    /// `VMGuestLib_GetMemLLSwappedMB`: VM memory in the host's low-latency swap, in MB.
    fn mem_ll_swapped_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemLlSwappedMb), Stat::MemLlSwappedMb)
    }

    /// `VMGuestLib_GetMemSwapTargetMB`: target of host swapping for the VM, in MB.
    fn mem_swap_target_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemSwapTargetMb), Stat::MemSwapTargetMb)
    }

    /// `VMGuestLib_GetMemBalloonTargetMB`: target size of the balloon, in MB.
    fn mem_balloon_target_mb(&self) -> Result<u64> {
        number(
            self.stat(Stat::MemBalloonTargetMb),
            Stat::MemBalloonTargetMb,
        )
    }

    /// `VMGuestLib_GetMemBalloonMaxMB`: largest balloon the host may ask for, in MB.
    fn mem_balloon_max_mb(&self) -> Result<u64> {
        number(self.stat(Stat::MemBalloonMaxMb), Stat::MemBalloonMaxMb)
    }
}
