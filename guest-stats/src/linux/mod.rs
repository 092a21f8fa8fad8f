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
//! # What is read once
//!
//! An update reads what changes: `/proc/stat`, `/proc/uptime`, `/proc/meminfo`, the boot id,
//! `/proc/self/cgroup` and the limit files of this process's cgroups (plus `/proc/vmstat` and
//! the Xen balloon files only when `/proc/meminfo` has no `Balloon` line). The files stay open
//! between updates and are read again from offset 0, which makes the kernel print them afresh;
//! no path is looked up again.
//!
//! What does not change within a boot is found once and kept: USER_HZ and the page size (from
//! `/proc/self/auxv`), `cpu MHz` of the first CPU in `/proc/cpuinfo` (in a guest, the rate the
//! kernel calibrated at boot; only the top of the file is read), where this process's cgroups
//! are (from `/proc/self/mountinfo`), and which optional files are missing (`memory.max` in
//! the root cgroup, the Xen balloon, …). It is all found again, with every file opened afresh,
//!
//! - when the session id changes (a new boot id: a reboot, or another tree under the root);
//! - when `/proc/self/cgroup` changes (the process was moved to another cgroup);
//! - when a kept file fails to read or parse (a cgroup was removed): the update is retried
//!   once with everything looked up afresh, and only a failure then is reported; a failed
//!   update keeps nothing.
//!
//! It is also found again, keeping the files that are open, every
//! [`LinuxGuestStatsBuilder::refresh_interval`] (default 30 s), so a controller enabled on an
//! ancestor cgroup (its `memory.max` appears), a new cgroup mount or a CPU rate that does vary
//! (cpufreq or APERF/MPERF exposed to the guest) is seen within that interval.
//!
//! That is about ten open files on a typical guest (one per file read on an update). A tree
//! under a custom root that is changed by replacing files (rename over) rather than rewriting
//! them in place, as the kernel does, is seen only after one of these; with a refresh interval
//! of zero nothing is kept and every update opens every file.
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

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, GuestStats, Result, SessionId, Snapshot, Stat, StatValue};

const AT_PAGESZ: u64 = 6;
const AT_CLKTCK: u64 = 17;
const DEFAULT_USER_HZ: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 4096;
const XEN_MEMORY: &str = "sys/devices/system/xen_memory/xen_memory0";
const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Builds a [`LinuxGuestStats`] with a non-default root or clock rate.
#[derive(Debug, Clone)]
pub struct LinuxGuestStatsBuilder {
    root: PathBuf,
    user_hz: Option<u64>,
    cgroups: bool,
    refresh_interval: Duration,
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

    /// How long what is read once (clock rate, page size, CPU MHz, where the cgroups are,
    /// which optional files are missing) is trusted before it is looked up again; see
    /// [What is read once](self#what-is-read-once). Default 30 s; zero keeps nothing, not
    /// even open files, between updates.
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// The backend, before its first update. Nothing is read until then.
    pub fn build(self) -> LinuxGuestStats {
        LinuxGuestStats {
            root: self.root,
            user_hz: self.user_hz,
            cgroups: self.cgroups,
            refresh_interval: self.refresh_interval,
            current: None,
            layout: None,
            files: OpenFiles::default(),
        }
    }
}

/// [`GuestStats`] from the guest kernel's procfs, sysfs and cgroupfs; see the
/// [module documentation](self).
///
/// It keeps the files it reads open between updates. A clone shares no files: it opens its
/// own on its first update.
#[derive(Debug)]
pub struct LinuxGuestStats {
    root: PathBuf,
    user_hz: Option<u64>,
    cgroups: bool,
    refresh_interval: Duration,
    current: Option<Snapshot>,
    /// What was found once; `None` until the first update and after anything made it stale.
    layout: Option<Layout>,
    files: OpenFiles,
}

impl Clone for LinuxGuestStats {
    fn clone(&self) -> Self {
        LinuxGuestStats {
            root: self.root.clone(),
            user_hz: self.user_hz,
            cgroups: self.cgroups,
            refresh_interval: self.refresh_interval,
            current: self.current.clone(),
            layout: None,
            files: OpenFiles::default(),
        }
    }
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
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        }
    }

    /// Whether this looks like a Linux system the backend can read (`/proc/stat` exists under
    /// the root).
    pub fn is_available(&self) -> bool {
        self.root.join("proc/stat").is_file()
    }

    /// The root everything is read under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads a file whole without keeping it open, for what is read once: a missing file (or
    /// directory) is `None`, as many of these files exist only with some drivers or kernels.
    /// Large reads: a seq_file such as mountinfo walks its list from the start on every
    /// read call.
    fn read_once(path: &Path) -> Result<Option<String>> {
        let mut buffer = Vec::new();
        match File::open(path).and_then(|file| read_from_start(&file, &mut buffer)) {
            Ok(len) => {
                buffer.truncate(len);
                String::from_utf8(buffer).map(Some).map_err(|_| {
                    Error::io(
                        path,
                        io::Error::new(io::ErrorKind::InvalidData, "the file is not UTF-8"),
                    )
                })
            }
            Err(error) if is_absent(&error) => Ok(None),
            Err(error) => Err(Error::io(path, error)),
        }
    }

    /// `cpu MHz` of the first CPU: from the first 4 KiB of the file (the kernel then prints
    /// only the first few CPUs), or from the whole file when they do not hold it.
    fn cpuinfo_mhz(path: &Path) -> Result<Option<u64>> {
        const PREFIX: usize = 4096;
        let mut prefix = vec![0; PREFIX];
        match File::open(path).and_then(|file| read_up_to(&file, &mut prefix)) {
            Ok(len) => prefix.truncate(len),
            Err(error) if is_absent(&error) => return Ok(None),
            Err(error) => return Err(Error::io(path, error)),
        }
        // Only whole lines: a number cut at the end of the prefix would be wrong.
        let whole_lines = match prefix.iter().rposition(|&byte| byte == b'\n') {
            Some(end) => &prefix[..=end],
            None => &[][..],
        };
        let found = std::str::from_utf8(whole_lines)
            .ok()
            .and_then(procfs::parse_cpuinfo_mhz);
        if found.is_some() || prefix.len() < PREFIX {
            return Ok(found);
        }
        Ok(Self::read_once(path)?.and_then(|text| procfs::parse_cpuinfo_mhz(&text)))
    }

    /// Finds what is kept across updates; see [What is read once](self#what-is-read-once).
    fn discover(&mut self) -> Result<Layout> {
        let path = |relative: &str| self.root.join(relative);
        let paths = Paths {
            stat: path("proc/stat"),
            uptime: path("proc/uptime"),
            meminfo: path("proc/meminfo"),
            vmstat: path("proc/vmstat"),
            boot_id: path("proc/sys/kernel/random/boot_id"),
            memberships: path("proc/self/cgroup"),
            xen_target: path(&format!("{XEN_MEMORY}/target_kb")),
            xen_low: path(&format!("{XEN_MEMORY}/info/low_kb")),
            xen_high: path(&format!("{XEN_MEMORY}/info/high_kb")),
        };

        // auxv only refines defaults, so an unreadable one is not an error.
        let mut auxv_bytes = Vec::new();
        let auxv = File::open(path("proc/self/auxv"))
            .and_then(|file| read_from_start(&file, &mut auxv_bytes))
            .map(|len| procfs::parse_auxv(&auxv_bytes[..len]))
            .unwrap_or_default();
        let user_hz = self
            .user_hz
            .or_else(|| auxv.get(&AT_CLKTCK).copied().filter(|&hz| hz > 0))
            .unwrap_or(DEFAULT_USER_HZ);
        let page_size = auxv
            .get(&AT_PAGESZ)
            .copied()
            .filter(|&size| size > 0)
            .unwrap_or(DEFAULT_PAGE_SIZE);

        // The whole of cpuinfo is costly to print (every flag of every CPU, so it grows with
        // the CPU count) for one number of the first CPU, which x86 prints near its top.
        let mhz = Self::cpuinfo_mhz(&path("proc/cpuinfo"))?;

        let mut memberships = None;
        let mut memory_chains = Vec::new();
        let mut cpu_chains = Vec::new();
        if self.cgroups {
            if let Some(text) = self.files.read_optional(&paths.memberships)? {
                let parsed = cgroup::parse_memberships(text)
                    .map_err(|d| Error::parse(&paths.memberships, d))?;
                memberships = Some(text.to_owned());
                let mounts = Self::read_once(&path("proc/self/mountinfo"))?
                    .map(|text| cgroup::parse_cgroup_mounts(&text))
                    .unwrap_or_default();
                memory_chains = cgroup::chains(&self.root, &parsed, &mounts, "memory");
                cpu_chains = cgroup::chains(&self.root, &parsed, &mounts, "cpu");
            }
        }

        Ok(Layout {
            found_at: Instant::now(),
            session: None,
            paths,
            user_hz,
            page_size,
            mhz,
            memberships,
            memory_chains,
            cpu_chains,
        })
    }

    /// One update with the layout found earlier (or just now). `Ok(None)`: something the
    /// layout holds is stale (a new session, the process moved to another cgroup); a layout
    /// read for the first time is never stale.
    fn read_all(&mut self) -> Result<Option<Snapshot>> {
        let mut layout = match self.layout.take() {
            Some(layout) => layout,
            None => self.discover()?,
        };
        let snapshot = self.read_with(&mut layout)?;
        if snapshot.is_some() {
            self.layout = Some(layout);
        }
        Ok(snapshot)
    }

    fn read_with(&mut self, layout: &mut Layout) -> Result<Option<Snapshot>> {
        let files = &mut self.files;
        let paths = &layout.paths;
        let user_hz = layout.user_hz;
        let ticks_to_ms = |ticks: u64| (u128::from(ticks) * 1_000 / u128::from(user_hz)) as u64;

        let stat = procfs::parse_proc_stat(files.read(&paths.stat)?)
            .map_err(|d| Error::parse(&paths.stat, d))?;
        let session = match files.read_optional(&paths.boot_id)? {
            Some(text) => SessionId::new(
                procfs::parse_boot_id(text).map_err(|d| Error::parse(&paths.boot_id, d))?,
            ),
            None => match stat.btime {
                Some(btime) => SessionId::new(btime.max(1)),
                None => {
                    return Err(Error::parse(
                        &paths.stat,
                        "no boot id (proc/sys/kernel/random/boot_id) and no btime line to identify the boot",
                    ))
                }
            },
        };
        let warm = layout.session.is_some();
        if warm && layout.session != Some(session) {
            return Ok(None);
        }
        layout.session = Some(session);

        let mut snapshot = Snapshot::new(session, "linux");
        let mut set = |stat: Stat, value: Option<u64>| {
            snapshot.set(stat, value.map(StatValue::U64));
        };
        set(Stat::CpuUsedMs, Some(ticks_to_ms(stat.busy_ticks)));
        set(Stat::CpuStolenMs, stat.steal_ticks.map(ticks_to_ms));
        let uptime = procfs::parse_uptime_ms(files.read(&paths.uptime)?)
            .map_err(|d| Error::parse(&paths.uptime, d))?;
        set(Stat::ElapsedMs, Some(uptime));
        set(Stat::HostProcessorSpeedMhz, layout.mhz);

        let meminfo = procfs::parse_meminfo(files.read(&paths.meminfo)?)
            .map_err(|d| Error::parse(&paths.meminfo, d))?;
        set(Stat::MemActiveMb, meminfo.active_kb.map(|kb| kb / 1024));
        let ballooned = match meminfo.balloon_kb {
            Some(kb) => Some(kb / 1024),
            None => Self::ballooned_mb_without_meminfo(&self.root, files, layout)?,
        };
        set(Stat::MemBalloonedMb, ballooned);
        set(
            Stat::MemTargetSizeMb,
            optional_number(files, &paths.xen_target)?.map(|kb| kb / 1024),
        );

        if self.cgroups && layout.memberships.is_some() {
            // A process moved to another cgroup has other chains to read.
            if warm && files.read_optional(&paths.memberships)? != layout.memberships.as_deref() {
                return Ok(None);
            }
            read_cgroups(files, layout, &mut snapshot)?;
        }
        Ok(Some(snapshot))
    }

    /// The balloon on kernels whose `/proc/meminfo` has no `Balloon` line.
    fn ballooned_mb_without_meminfo(
        root: &Path,
        files: &mut OpenFiles,
        layout: &Layout,
    ) -> Result<Option<u64>> {
        let paths = &layout.paths;
        let page_size = layout.page_size;
        let pages_to_mb = |pages: u64| ((u128::from(pages) * u128::from(page_size)) >> 20) as u64;
        let vmstat = match files.read_optional(&paths.vmstat)? {
            Some(text) => procfs::parse_vmstat(text).map_err(|d| Error::parse(&paths.vmstat, d))?,
            None => procfs::VmStat::default(),
        };
        if let Some(pages) = vmstat.balloon_pages {
            return Ok(Some(pages_to_mb(pages)));
        }
        let low = optional_number(files, &paths.xen_low)?;
        let high = optional_number(files, &paths.xen_high)?;
        if low.is_some() || high.is_some() {
            return Ok(Some((low.unwrap_or(0) + high.unwrap_or(0)) / 1024));
        }
        // balloon_compaction counts every page the virtio and VMware drivers put in or take
        // out of their balloon, so the difference is the balloon's size. Other drivers (Hyper-V)
        // do not count there, so the difference is trusted only when one of these is bound.
        let (Some(inflated), Some(deflated)) = (vmstat.balloon_inflate, vmstat.balloon_deflate)
        else {
            return Ok(None);
        };
        if compaction_balloon_bound(root) {
            Ok(Some(pages_to_mb(inflated.saturating_sub(deflated))))
        } else {
            Ok(None)
        }
    }
}

/// Whether a virtio or VMware balloon driver is bound. Asked only on kernels without the
/// `Balloon` line and without `nr_balloon_pages`, where the driver may be loaded at any time,
/// so it is not kept.
fn compaction_balloon_bound(root: &Path) -> bool {
    let virtio_bound = std::fs::read_dir(root.join("sys/bus/virtio/drivers/virtio_balloon"))
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with("virtio"))
        })
        .unwrap_or(false);
    virtio_bound || root.join("sys/module/vmw_balloon").is_dir()
}

fn read_cgroups(files: &mut OpenFiles, layout: &Layout, snapshot: &mut Snapshot) -> Result<()> {
    let mut memory_limit: Option<u64> = None;
    let mut memory_min: Option<u64> = None;
    for chain in &layout.memory_chains {
        for dir in &chain.dirs {
            let (limit, min) = if chain.unified {
                (
                    cgroup_value(files, &dir.join("memory.max"), cgroup::parse_memory_max)?,
                    cgroup_value(files, &dir.join("memory.min"), cgroup::parse_memory_max)?,
                )
            } else {
                let limit = cgroup_value(files, &dir.join("memory.limit_in_bytes"), |text| {
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
    for chain in &layout.cpu_chains {
        for dir in &chain.dirs {
            let quota = if chain.unified {
                cgroup_value(files, &dir.join("cpu.max"), cgroup::parse_cpu_max)?
            } else {
                v1_cpu_quota(files, dir)?
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
            shares = cgroup_value(files, &chain.dirs[0].join(file), |text| {
                procfs::parse_number(text).map(Some)
            })?;
        }
    }
    snapshot.set(
        Stat::CpuLimitMhz,
        cpus.zip(layout.mhz)
            .map(|(cpus, mhz)| StatValue::U64((cpus * mhz as f64).round() as u64)),
    );
    snapshot.set(Stat::CpuShares, shares.map(StatValue::U64));
    Ok(())
}

fn v1_cpu_quota(files: &mut OpenFiles, dir: &Path) -> Result<Option<f64>> {
    let parse_signed = |text: &str| {
        text.trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("`{}` is not a number", text.trim()))
    };
    let quota = cgroup_value(files, &dir.join("cpu.cfs_quota_us"), parse_signed)?;
    let period = cgroup_value(files, &dir.join("cpu.cfs_period_us"), parse_signed)?;
    Ok(match (quota, period) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            Some(quota as f64 / period as f64)
        }
        _ => None,
    })
}

fn cgroup_value<T>(
    files: &mut OpenFiles,
    path: &Path,
    parse: impl FnOnce(&str) -> Result<Option<T>, String>,
) -> Result<Option<T>> {
    match files.read_optional(path)? {
        Some(text) => parse(text).map_err(|detail| Error::parse(path, detail)),
        None => Ok(None),
    }
}

fn optional_number(files: &mut OpenFiles, path: &Path) -> Result<Option<u64>> {
    match files.read_optional(path)? {
        Some(text) => procfs::parse_number(text)
            .map(Some)
            .map_err(|detail| Error::parse(path, detail)),
        None => Ok(None),
    }
}

fn min_option(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Missing, for a file that exists only with some drivers or kernels. NotADirectory: a path
/// component is a file (a sysfs node that is not a directory on this kernel).
fn is_absent(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// The absolute paths read on every update.
#[derive(Debug)]
struct Paths {
    stat: PathBuf,
    uptime: PathBuf,
    meminfo: PathBuf,
    vmstat: PathBuf,
    boot_id: PathBuf,
    memberships: PathBuf,
    xen_target: PathBuf,
    xen_low: PathBuf,
    xen_high: PathBuf,
}

/// What is found once and kept across updates; see
/// [What is read once](self#what-is-read-once).
#[derive(Debug)]
struct Layout {
    found_at: Instant,
    /// The session it belongs to; `None` until the first update with it.
    session: Option<SessionId>,
    paths: Paths,
    user_hz: u64,
    page_size: u64,
    mhz: Option<u64>,
    /// `/proc/self/cgroup` when the chains were resolved; `None` without cgroups.
    memberships: Option<String>,
    memory_chains: Vec<cgroup::CgroupChain>,
    cpu_chains: Vec<cgroup::CgroupChain>,
}

/// Files kept open across updates, by path, and the one buffer they are all read into.
#[derive(Default)]
struct OpenFiles {
    /// `None`: the file did not exist when it was looked up.
    files: HashMap<PathBuf, Option<File>>,
    buffer: Vec<u8>,
}

/// The paths, not the handles or the bytes last read.
impl fmt::Debug for OpenFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenFiles")
            .field(
                "open",
                &self
                    .files
                    .iter()
                    .filter(|(_, file)| file.is_some())
                    .map(|(path, _)| path)
                    .collect::<Vec<_>>(),
            )
            .field(
                "absent",
                &self
                    .files
                    .iter()
                    .filter(|(_, file)| file.is_none())
                    .map(|(path, _)| path)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl OpenFiles {
    /// The smallest buffer: every file read on an update fits (a larger one grows it).
    const INITIAL_BUFFER: usize = 8 * 1024;

    /// Closes every file: the next reads open them again.
    fn clear(&mut self) {
        self.files.clear();
    }

    fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Forgets which files were missing, so the next reads look for them again; open files
    /// stay open.
    fn forget_missing(&mut self) {
        self.files.retain(|_, file| file.is_some());
    }

    /// The file's current contents.
    fn read(&mut self, path: &Path) -> Result<&str> {
        if !matches!(self.files.get(path), Some(Some(_))) {
            let file = File::open(path).map_err(|error| Error::io(path, error))?;
            self.files.insert(path.to_path_buf(), Some(file));
        }
        self.read_optional(path)?
            .ok_or_else(|| Error::io(path, io::ErrorKind::NotFound.into()))
    }

    /// The file's current contents, or `None` when it (or a directory on its path) did not
    /// exist when first looked up.
    fn read_optional(&mut self, path: &Path) -> Result<Option<&str>> {
        if !self.files.contains_key(path) {
            let file = match File::open(path) {
                Ok(file) => Some(file),
                Err(error) if is_absent(&error) => None,
                Err(error) => return Err(Error::io(path, error)),
            };
            self.files.insert(path.to_path_buf(), file);
        }
        let Some(Some(file)) = self.files.get(path) else {
            return Ok(None);
        };
        let len =
            read_from_start(file, &mut self.buffer).map_err(|error| Error::io(path, error))?;
        std::str::from_utf8(&self.buffer[..len])
            .map(Some)
            .map_err(|_| {
                Error::io(
                    path,
                    io::Error::new(io::ErrorKind::InvalidData, "the file is not UTF-8"),
                )
            })
    }
}

/// Fills `buffer` from the file's current offset, short only at the end of the file (in
/// few, large reads, unlike `Read::take`, which starts with small ones).
fn read_up_to(mut file: &File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Reads a file from offset 0 to its end into `buffer` (growing it as needed), returning the
/// length. procfs, sysfs and cgroupfs print a file afresh when it is read from offset 0.
fn read_from_start(file: &File, buffer: &mut Vec<u8>) -> io::Result<usize> {
    if buffer.len() < OpenFiles::INITIAL_BUFFER {
        buffer.resize(OpenFiles::INITIAL_BUFFER, 0);
    }
    let mut filled = 0;
    loop {
        if filled == buffer.len() {
            buffer.resize(buffer.len() * 2, 0);
        }
        match file.read_at(&mut buffer[filled..], filled as u64) {
            Ok(0) => return Ok(filled),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

impl GuestStats for LinuxGuestStats {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn update(&mut self) -> Result<SessionId> {
        // A failed update drops the old data, as the C library does.
        self.current = None;
        if let Some(layout) = &self.layout {
            if self.refresh_interval.is_zero() {
                self.layout = None;
                self.files.clear();
            } else if layout.found_at.elapsed() >= self.refresh_interval {
                // The kernel's files are never replaced, so open ones stay open (one that goes
                // away fails to read, and that is handled below).
                self.layout = None;
                self.files.forget_missing();
            }
        }
        // Open files are kept across a refresh too.
        let kept = self.layout.is_some() || !self.files.is_empty();
        let result = match self.read_all() {
            Ok(Some(snapshot)) => Ok(snapshot),
            // A new session or a moved process: look everything up again. A kept file may be
            // gone (its cgroup removed) or another tree put in place: the error counts only if
            // it happens again with everything looked up afresh.
            Ok(None) | Err(_) if kept => {
                self.layout = None;
                self.files.clear();
                self.read_all().and_then(|snapshot| {
                    // A layout found in this update is never stale.
                    snapshot.ok_or_else(|| {
                        Error::parse(&self.root, "the tree changed while it was being read")
                    })
                })
            }
            Ok(None) => Err(Error::parse(
                &self.root,
                "the tree changed while it was being read",
            )),
            Err(error) => Err(error),
        };
        let snapshot = match result {
            Ok(snapshot) => snapshot,
            Err(error) => {
                // Nothing is kept from a failed update: the next one opens every file.
                self.layout = None;
                self.files.clear();
                return Err(error);
            }
        };
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
