//! The Linux backend: the vSphere Guest API statistics that any Linux guest can know about
//! itself, on any hypervisor (KVM, Xen, Hyper-V, Firecracker, VMware too).
//!
//! | statistic | source |
//! |---|---|
//! | `cpu_used_ms` | `/proc/stat` aggregate `cpu` line: user + nice + system + irq + softirq, all CPUs |
//! | `cpu_stolen_ms` | `/proc/stat` `steal` column, all CPUs (0 when the hypervisor gives no steal accounting) |
//! | `elapsed_ms` | `/proc/uptime` (since boot; unlike VMware, not restarted by a migration) |
//! | `host_processor_speed_mhz` | `/proc/cpuinfo` `cpu MHz` of the first CPU (x86: the TSC rate the guest calibrated, i.e. the host's nominal clock) |
//! | `mem_active_mb` | `/proc/meminfo` `Active` (the guest kernel's working-set estimate) |
//! | `mem_ballooned_mb` | `/proc/meminfo` `Balloon` (recent kernels), else `/proc/vmstat` `nr_balloon_pages`, else the Xen balloon (`xen_memory0/info/{low,high}_kb`), else `balloon_inflate − balloon_deflate` of `/proc/vmstat` when a virtio or VMware balloon driver is bound |
//! | `mem_target_size_mb` | Xen: `/sys/devices/system/xen_memory/xen_memory0/target_kb` |
//! | `mem_limit_mb`, `mem_reservation_mb` | cgroup v2 `memory.max` / `memory.min`, or v1 `memory.limit_in_bytes`, of this process's cgroup and its ancestors |
//! | `cpu_limit_mhz` | cgroup `cpu.max` (v2) or `cpu.cfs_quota_us`/`cpu.cfs_period_us` (v1) × `host_processor_speed_mhz` |
//! | `cpu_shares` | cgroup v2 `cpu.weight` or v1 `cpu.shares` of this process's cgroup (not in the root cgroup) |
//!
//! Everything else (host memory, overhead, sharing, swapping by the host, the resource pool) is
//! [`Error::NotAvailable`]: a guest cannot see it, and this backend never makes up a number. The
//! cgroup values describe the limits on *this process's* workload inside the guest, which is
//! where a limit on it applies; they are `NotAvailable` when no limit is set.
//!
//! # Session id
//!
//! The session id is the kernel's boot id (`/proc/sys/kernel/random/boot_id`, a random UUID
//! drawn at each boot) folded to 64 bits, or the boot time (`btime` of `/proc/stat`) on kernels
//! without it. It changes on every reboot, which is when `elapsed_ms` and the CPU counters
//! restart. Live migration and snapshot restore do not change it: Linux does not expose them to
//! user space (the VM generation id driver only reseeds the random pool), and the counters of
//! this backend keep counting across them, so earlier values stay valid.
//!
//! # Clock ticks
//!
//! `/proc/stat` counts in USER_HZ ticks. The rate is taken from `AT_CLKTCK` in
//! `/proc/self/auxv` (what `sysconf(_SC_CLK_TCK)` returns, read without FFI and under the
//! configurable root), else 100, the value of every architecture Linux runs VMs on;
//! [`LinuxGuestStatsBuilder::user_hz`] overrides it.
//!
//! ```no_run
//! use guest_stats::linux::LinuxGuestStats;
//! use guest_stats::GuestStats;
//!
//! let mut stats = LinuxGuestStats::new();
//! stats.update()?;
//! println!("stolen: {} ms", stats.cpu_stolen_ms()?);
//! # Ok::<(), guest_stats::Error>(())
//! ```

mod cgroup;
mod procfs;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Error, GuestStats, Result, SessionId, Snapshot, Stat, StatValue};

const AT_PAGESZ: u64 = 6;
const AT_CLKTCK: u64 = 17;
const DEFAULT_USER_HZ: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 4096;
const XEN_MEMORY: &str = "sys/devices/system/xen_memory/xen_memory0";

/// Builds a [`LinuxGuestStats`] with a non-default root or clock rate.
#[derive(Debug, Clone)]
pub struct LinuxGuestStatsBuilder {
    root: PathBuf,
    user_hz: Option<u64>,
    cgroups: bool,
}

impl LinuxGuestStatsBuilder {
    /// Reads `/proc` and `/sys` under `root` instead of `/` (a captured fixture tree, a
    /// container's view of the host, …).
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// Uses this USER_HZ rate instead of the one in `/proc/self/auxv`. Zero is ignored.
    pub fn user_hz(mut self, hz: u64) -> Self {
        self.user_hz = (hz > 0).then_some(hz);
        self
    }

    /// Whether to read cgroup limits (default `true`). Without them the limit, reservation
    /// and share statistics are `NotAvailable`.
    pub fn cgroups(mut self, enabled: bool) -> Self {
        self.cgroups = enabled;
        self
    }

    /// The backend, before its first update. Nothing is read until then.
    pub fn build(self) -> LinuxGuestStats {
        LinuxGuestStats {
            root: self.root,
            user_hz: self.user_hz,
            cgroups: self.cgroups,
            current: None,
        }
    }
}

/// [`GuestStats`] from the guest kernel's procfs, sysfs and cgroupfs; see the
/// [module documentation](self).
#[derive(Debug, Clone)]
pub struct LinuxGuestStats {
    root: PathBuf,
    user_hz: Option<u64>,
    cgroups: bool,
    current: Option<Snapshot>,
}

impl Default for LinuxGuestStats {
    fn default() -> Self {
        LinuxGuestStats::new()
    }
}

impl LinuxGuestStats {
    /// The backend on this machine (root `/`).
    pub fn new() -> LinuxGuestStats {
        LinuxGuestStats::builder().build()
    }

    /// The backend reading everything under `root`.
    pub fn with_root(root: impl Into<PathBuf>) -> LinuxGuestStats {
        LinuxGuestStats::builder().root(root).build()
    }

    /// Starts a builder (root `/`, USER_HZ from auxv, cgroups read).
    pub fn builder() -> LinuxGuestStatsBuilder {
        LinuxGuestStatsBuilder {
            root: PathBuf::from("/"),
            user_hz: None,
            cgroups: true,
        }
    }

    /// Whether this looks like a Linux system the backend can read (`/proc/stat` exists under
    /// the root).
    pub fn is_available(&self) -> bool {
        self.path("proc/stat").is_file()
    }

    /// The root everything is read under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    fn read(&self, relative: &str) -> Result<String> {
        let path = self.path(relative);
        std::fs::read_to_string(&path).map_err(|error| Error::io(path, error))
    }

    /// Like `read`, but a missing file (or directory) is `None`: many of these files exist only
    /// with some drivers or kernels.
    fn read_optional(&self, path: &Path) -> Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            // NotADirectory: a path component is a file (a sysfs node that is not a directory
            // on this kernel).
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(Error::io(path, error)),
        }
    }

    fn parsed<T>(
        &self,
        relative: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T> {
        let text = self.read(relative)?;
        parse(&text).map_err(|detail| Error::parse(self.path(relative), detail))
    }

    fn optional_number(&self, relative: &str) -> Result<Option<u64>> {
        let path = self.path(relative);
        match self.read_optional(&path)? {
            Some(text) => procfs::parse_number(&text)
                .map(Some)
                .map_err(|detail| Error::parse(path, detail)),
            None => Ok(None),
        }
    }

    fn auxv(&self) -> BTreeMap<u64, u64> {
        // auxv only refines defaults, so an unreadable one is not an error.
        std::fs::read(self.path("proc/self/auxv"))
            .map(|bytes| procfs::parse_auxv(&bytes))
            .unwrap_or_default()
    }

    fn session(&self, stat: &procfs::ProcStat) -> Result<SessionId> {
        let boot_id_path = self.path("proc/sys/kernel/random/boot_id");
        if let Some(text) = self.read_optional(&boot_id_path)? {
            let id = procfs::parse_boot_id(&text).map_err(|d| Error::parse(&boot_id_path, d))?;
            return Ok(SessionId::new(id));
        }
        match stat.btime {
            Some(btime) => Ok(SessionId::new(btime.max(1))),
            None => Err(Error::parse(
                self.path("proc/stat"),
                "no boot id (proc/sys/kernel/random/boot_id) and no btime line to identify the boot",
            )),
        }
    }

    fn read_all(&self) -> Result<Snapshot> {
        let auxv = self.auxv();
        let user_hz = self
            .user_hz
            .or_else(|| auxv.get(&AT_CLKTCK).copied().filter(|&hz| hz > 0))
            .unwrap_or(DEFAULT_USER_HZ);
        let page_size = auxv
            .get(&AT_PAGESZ)
            .copied()
            .filter(|&size| size > 0)
            .unwrap_or(DEFAULT_PAGE_SIZE);
        let ticks_to_ms = |ticks: u64| (u128::from(ticks) * 1_000 / u128::from(user_hz)) as u64;

        let stat = self.parsed("proc/stat", procfs::parse_proc_stat)?;
        let session = self.session(&stat)?;
        let mut snapshot = Snapshot::new(session, "linux");
        let mut set = |stat: Stat, value: Option<u64>| {
            snapshot.set(stat, value.map(StatValue::U64));
        };

        set(Stat::CpuUsedMs, Some(ticks_to_ms(stat.busy_ticks)));
        set(Stat::CpuStolenMs, stat.steal_ticks.map(ticks_to_ms));
        set(
            Stat::ElapsedMs,
            Some(self.parsed("proc/uptime", procfs::parse_uptime_ms)?),
        );

        let cpuinfo_path = self.path("proc/cpuinfo");
        let mhz = self
            .read_optional(&cpuinfo_path)?
            .and_then(|text| procfs::parse_cpuinfo_mhz(&text));
        set(Stat::HostProcessorSpeedMhz, mhz);

        let meminfo = self.parsed("proc/meminfo", procfs::parse_meminfo)?;
        set(Stat::MemActiveMb, meminfo.get("Active").map(|kb| kb / 1024));

        let vmstat_path = self.path("proc/vmstat");
        let vmstat = match self.read_optional(&vmstat_path)? {
            Some(text) => procfs::parse_vmstat(&text).map_err(|d| Error::parse(&vmstat_path, d))?,
            None => BTreeMap::new(),
        };
        set(
            Stat::MemBalloonedMb,
            self.ballooned_mb(&meminfo, &vmstat, page_size)?,
        );
        set(
            Stat::MemTargetSizeMb,
            self.optional_number(&format!("{XEN_MEMORY}/target_kb"))?
                .map(|kb| kb / 1024),
        );

        if self.cgroups {
            self.read_cgroups(&mut snapshot, mhz)?;
        }
        Ok(snapshot)
    }

    fn ballooned_mb(
        &self,
        meminfo: &BTreeMap<String, u64>,
        vmstat: &BTreeMap<String, u64>,
        page_size: u64,
    ) -> Result<Option<u64>> {
        let pages_to_mb = |pages: u64| ((u128::from(pages) * u128::from(page_size)) >> 20) as u64;
        if let Some(kb) = meminfo.get("Balloon") {
            return Ok(Some(kb / 1024));
        }
        if let Some(&pages) = vmstat.get("nr_balloon_pages") {
            return Ok(Some(pages_to_mb(pages)));
        }
        let low = self.optional_number(&format!("{XEN_MEMORY}/info/low_kb"))?;
        let high = self.optional_number(&format!("{XEN_MEMORY}/info/high_kb"))?;
        if low.is_some() || high.is_some() {
            return Ok(Some((low.unwrap_or(0) + high.unwrap_or(0)) / 1024));
        }
        // balloon_compaction counts every page the virtio and VMware drivers put in or take
        // out of their balloon, so the difference is the balloon's size. Other drivers (Hyper-V)
        // do not count there, so the difference is trusted only when one of these is bound.
        let (Some(&inflated), Some(&deflated)) =
            (vmstat.get("balloon_inflate"), vmstat.get("balloon_deflate"))
        else {
            return Ok(None);
        };
        if self.compaction_balloon_bound() {
            Ok(Some(pages_to_mb(inflated.saturating_sub(deflated))))
        } else {
            Ok(None)
        }
    }

    fn compaction_balloon_bound(&self) -> bool {
        let virtio_bound = std::fs::read_dir(self.path("sys/bus/virtio/drivers/virtio_balloon"))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().starts_with("virtio"))
            })
            .unwrap_or(false);
        virtio_bound || self.path("sys/module/vmw_balloon").is_dir()
    }

    fn read_cgroups(&self, snapshot: &mut Snapshot, mhz: Option<u64>) -> Result<()> {
        let memberships_path = self.path("proc/self/cgroup");
        let Some(memberships) = self.read_optional(&memberships_path)? else {
            return Ok(());
        };
        let memberships = cgroup::parse_memberships(&memberships)
            .map_err(|d| Error::parse(&memberships_path, d))?;
        let mounts = self
            .read_optional(&self.path("proc/self/mountinfo"))?
            .map(|text| cgroup::parse_cgroup_mounts(&text))
            .unwrap_or_default();

        let mut memory_limit: Option<u64> = None;
        let mut memory_min: Option<u64> = None;
        for chain in cgroup::chains(&self.root, &memberships, &mounts, "memory") {
            for dir in &chain.dirs {
                let (limit, min) = if chain.unified {
                    (
                        self.cgroup_value(&dir.join("memory.max"), cgroup::parse_memory_max)?,
                        self.cgroup_value(&dir.join("memory.min"), cgroup::parse_memory_max)?,
                    )
                } else {
                    let limit = self.cgroup_value(&dir.join("memory.limit_in_bytes"), |text| {
                        procfs::parse_number(text)
                            .map(|bytes| (bytes < cgroup::V1_UNLIMITED_BYTES).then_some(bytes))
                    })?;
                    (limit, None)
                };
                memory_limit = min_option(memory_limit, limit);
                // The root cgroup has no memory.min, so a value here is a real protection.
                memory_min = min_option(memory_min, min);
            }
        }
        snapshot.set(
            Stat::MemLimitMb,
            memory_limit.map(|bytes| StatValue::U64(bytes >> 20)),
        );
        snapshot.set(
            Stat::MemReservationMb,
            memory_min.map(|bytes| StatValue::U64(bytes >> 20)),
        );

        let mut cpus: Option<f64> = None;
        let mut shares: Option<u64> = None;
        for chain in cgroup::chains(&self.root, &memberships, &mounts, "cpu") {
            for dir in &chain.dirs {
                let quota = if chain.unified {
                    self.cgroup_value(&dir.join("cpu.max"), cgroup::parse_cpu_max)?
                } else {
                    self.v1_cpu_quota(dir)?
                };
                cpus = match (cpus, quota) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            if !chain.is_root() && shares.is_none() {
                let file = if chain.unified {
                    "cpu.weight"
                } else {
                    "cpu.shares"
                };
                shares = self.cgroup_value(&chain.dirs[0].join(file), |text| {
                    procfs::parse_number(text).map(Some)
                })?;
            }
        }
        snapshot.set(
            Stat::CpuLimitMhz,
            cpus.zip(mhz)
                .map(|(cpus, mhz)| StatValue::U64((cpus * mhz as f64).round() as u64)),
        );
        snapshot.set(Stat::CpuShares, shares.map(StatValue::U64));
        Ok(())
    }

    fn v1_cpu_quota(&self, dir: &Path) -> Result<Option<f64>> {
        let parse_signed = |text: &str| {
            text.trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("`{}` is not a number", text.trim()))
        };
        let quota = self.cgroup_value(&dir.join("cpu.cfs_quota_us"), parse_signed)?;
        let period = self.cgroup_value(&dir.join("cpu.cfs_period_us"), parse_signed)?;
        Ok(match (quota, period) {
            (Some(quota), Some(period)) if quota > 0 && period > 0 => {
                Some(quota as f64 / period as f64)
            }
            _ => None,
        })
    }

    fn cgroup_value<T>(
        &self,
        path: &Path,
        parse: impl FnOnce(&str) -> Result<Option<T>, String>,
    ) -> Result<Option<T>> {
        match self.read_optional(path)? {
            Some(text) => parse(&text).map_err(|detail| Error::parse(path, detail)),
            None => Ok(None),
        }
    }
}

fn min_option(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl GuestStats for LinuxGuestStats {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn update(&mut self) -> Result<SessionId> {
        // A failed update drops the old data, as the C library does.
        self.current = None;
        let snapshot = self.read_all()?;
        let session = snapshot.session_id;
        self.current = Some(snapshot);
        Ok(session)
    }

    fn session_id(&self) -> Result<SessionId> {
        Ok(self.current.as_ref().ok_or(Error::NoInfo)?.session_id)
    }

    fn stat(&self, stat: Stat) -> Result<StatValue> {
        self.current
            .as_ref()
            .ok_or(Error::NoInfo)?
            .value(stat)
            .ok_or(Error::NotAvailable { stat })
    }

    fn snapshot(&self) -> Result<Snapshot> {
        self.current.clone().ok_or(Error::NoInfo)
    }
}
