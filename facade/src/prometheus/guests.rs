//! Guest agent answers of many guests as `prometheus-client` metric families.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use qga_proto::types::{GuestCpuStats, GuestDiskStats, GuestFilesystemInfo};

use super::PREFIX;
use crate::agent::monitor::{GuestMonitor, GuestReport, PollStatus};

/// Bytes per sector of `guest-get-diskstats` (Linux counts 512-byte sectors whatever the
/// device's own sector size).
const SECTOR: f64 = 512.0;

/// Adds the guest agent metrics of a [`GuestMonitor`]'s guests to a `prometheus-client`
/// [`Registry`]: every encode of the registry (every scrape) polls the guests within the
/// monitor's deadlines (or serves its cache).
///
/// Every sample carries `guest="NAME"` and the guest's own labels; the registry's prefix and
/// labels apply on top. Names follow node_exporter's under `vmsdk_guest_`, in base units:
///
/// | metric | type | from |
/// |---|---|---|
/// | `vmsdk_guest_up` | gauge | 1 when the agent answered `guest-info` in this scrape (or in the cached poll) |
/// | `vmsdk_guest_scrape_duration_seconds` | gauge | how long the poll took (polled guests only) |
/// | `vmsdk_guest_skipped` | gauge | 1 when the guest was not polled: its previous poll still runs, or no slot of the fan-out was free before the scrape deadline |
/// | `vmsdk_guest_result_age_seconds` | gauge | with a cache only: the age of the result served |
/// | `vmsdk_guest_agent_info{version}` | info | `guest-info` |
/// | `vmsdk_guest_os_info{id, name, pretty_name, version, version_id, variant, variant_id, kernel_release, kernel_version, machine, host_name}` | info | `guest-get-osinfo`, `guest-get-host-name` (a label the agent does not give is empty) |
/// | `vmsdk_guest_filesystem_size_bytes{device, mountpoint, fstype}` | gauge | `guest-get-fsinfo`, see below |
/// | `vmsdk_guest_filesystem_avail_bytes{…}` | gauge | `total-bytes` − `used-bytes` |
/// | `vmsdk_guest_filesystem_used_bytes{…}` | gauge | `used-bytes` |
/// | `vmsdk_guest_filesystem_free_bytes{…}` | gauge | `total-bytes-privileged` − `used-bytes` (qemu-ga 9.1 on Linux) |
/// | `vmsdk_guest_load1`, `_load5`, `_load15` | gauge | `guest-get-load` (qemu-ga 10.0) |
/// | `vmsdk_guest_cpu_seconds_total{cpu, mode}` | counter | `guest-get-cpustats` (7.1, Linux), modes user, nice, system, idle, iowait, irq, softirq, steal |
/// | `vmsdk_guest_cpu_guest_seconds_total{cpu, mode}` | counter | the same, time running guests of the guest (modes user, nice) |
/// | `vmsdk_guest_disk_reads_completed_total{device}`, `_writes_completed_total`, `_discards_completed_total`, `_reads_merged_total`, `_writes_merged_total`, `_discards_merged_total`, `_flush_requests_total` | counter | `guest-get-diskstats` (7.1, Linux) |
/// | `vmsdk_guest_disk_read_bytes_total{device}`, `_written_bytes_total`, `_discarded_sectors_total` | counter | the same, sectors × 512 |
/// | `vmsdk_guest_disk_read_time_seconds_total{device}`, `_write_time_seconds_total`, `_discard_time_seconds_total`, `_flush_requests_time_seconds_total`, `_io_time_seconds_total`, `_io_time_weighted_seconds_total` | counter | the same, milliseconds ÷ 1000 |
/// | `vmsdk_guest_disk_io_now{device}` | gauge | the same, I/Os in progress |
/// | `vmsdk_guest_network_receive_bytes_total{device}`, `_packets_total`, `_errs_total`, `_drop_total`, and the same for `transmit` | counter | `guest-network-get-interfaces` statistics (2.11; Linux reads `/proc/net/dev`; only interfaces with an address have them) |
///
/// | `vmsdk_guest_qmp_up` | gauge | with a QMP socket ([`Guest::qmp`](crate::agent::monitor::Guest), feature `qmp`): 1 when QEMU's monitor answered |
/// | `vmsdk_guest_balloon_actual_bytes` | gauge | `query-balloon` (the guest's memory as the balloon leaves it) |
/// | `vmsdk_guest_memory_total_bytes`, `_free_bytes`, `_available_bytes`, `_disk_caches_bytes` | gauge | the balloon driver's `guest-stats` (`qom-get`), when the guest reports them |
/// | `vmsdk_guest_memory_swapped_in_bytes_total`, `_swapped_out_bytes_total`, `_major_faults_total`, `_minor_faults_total`, `_hugetlb_allocations_total`, `_hugetlb_allocation_failures_total` | counter | the same |
/// | `vmsdk_guest_block_read_bytes_total{drive}`, `_written_bytes_total`, `_discarded_bytes_total`, `_reads_completed_total`, `_writes_completed_total`, `_discards_completed_total`, `_flush_requests_total`, `_read_time_seconds_total`, `_write_time_seconds_total`, `_flush_requests_time_seconds_total`, `_failed_reads_total`, `_failed_writes_total` | counter | `query-blockstats`, per drive (drive id, else qdev, else node name) |
///
/// **Filesystem sizes.** qemu-ga computes from `statvfs`: `used-bytes` = (blocks − free
/// blocks) × fragment size; `total-bytes` = used + blocks available to unprivileged users,
/// that is the capacity a non-root user sees; `total-bytes-privileged` (9.1, Linux) = all
/// blocks × fragment size, the raw size. So `size_bytes` is `total-bytes-privileged` where
/// the agent gives it (as node_exporter's `node_filesystem_size_bytes`) and `total-bytes`
/// otherwise (older agents, Windows); `avail_bytes` is what non-root users can still write,
/// as node_exporter's. Filesystems without sizes (qemu-ga before 3.0) are left out; network
/// filesystems are not listed by qemu-ga at all.
///
/// What an agent lacks (a command its release or platform does not have, or one it has
/// disabled) is left out, never reported as zero: a qemu-ga 7.2 guest has no `load1`.
///
/// ```
/// use vmsdk::agent::monitor::{Guest, GuestMonitor};
/// use vmsdk::prometheus::prometheus_client::registry::Registry;
/// use vmsdk::prometheus::{Format, GuestCollector};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let sock = dir.path().join("101.qga");
/// # let _agent = vmsdk::agent::fake::FakeAgent::linux().listen_unix(&sock).unwrap();
/// # let sock = sock.display().to_string();
/// let monitor = GuestMonitor::builder()
///     .guest(Guest::new("web-1", &sock)?.label("tenant", "shop"))
///     .build()?;
/// let mut registry = Registry::default();
/// GuestCollector::new(monitor).register(&mut registry);
/// let text = Format::Text.encode(&registry)?;
/// assert!(text.contains("vmsdk_guest_up{guest=\"web-1\",tenant=\"shop\"} 1"));
/// assert!(text.contains("vmsdk_guest_filesystem_size_bytes{guest=\"web-1\",tenant=\"shop\",device=\"vda1\",mountpoint=\"/\",fstype=\"ext4\"}"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GuestCollector {
    monitor: GuestMonitor,
    target: Option<String>,
    deadline: Option<Duration>,
}

impl GuestCollector {
    /// A collector of every guest of `monitor`.
    pub fn new(monitor: GuestMonitor) -> GuestCollector {
        GuestCollector {
            monitor,
            target: None,
            deadline: None,
        }
    }

    /// A collector of the one guest named `name` (what a `/probe?target=NAME` request
    /// exports). A name the monitor does not know exports nothing.
    pub fn target(monitor: GuestMonitor, name: impl Into<String>) -> GuestCollector {
        GuestCollector {
            monitor,
            target: Some(name.into()),
            deadline: None,
        }
    }

    /// Scrapes within `deadline` when it is shorter than the monitor's scrape deadline (from
    /// a scraper's `X-Prometheus-Scrape-Timeout-Seconds` header).
    pub fn within(mut self, deadline: Duration) -> GuestCollector {
        self.deadline = Some(deadline);
        self
    }

    /// Registers this collector in a `vmsdk` sub-registry of `registry`, so its metrics are
    /// named `vmsdk_guest_...` under the registry's own prefix, with the registry's labels.
    pub fn register(self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(self));
    }
}

impl Collector for GuestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let deadline = self.deadline.unwrap_or(Duration::MAX);
        let reports = self
            .monitor
            .scrape_blocking_within(self.target.as_deref(), deadline);
        encode_reports(&mut encoder, &reports, self.monitor.caches())
    }
}

type Labels = Vec<(String, String)>;

/// One family's samples: labels and value.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, unit: Option<Unit>, kind: MetricType) -> Self {
        Family {
            name,
            help,
            unit,
            kind,
            samples: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels, value: f64) {
        self.samples.push((labels, value));
    }

    fn encode(self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut family =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in &self.samples {
            let sample = family.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*value).encode(sample)?,
                _ => ConstGauge::new(*value).encode(sample)?,
            }
        }
        Ok(())
    }
}

/// `base` with `extra` appended.
fn with(base: &Labels, extra: &[(&str, &str)]) -> Labels {
    let mut labels = base.clone();
    labels.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    labels
}

/// Every family of `reports`, each guest's samples in the guests' order.
fn encode_reports(
    encoder: &mut DescriptorEncoder<'_>,
    reports: &[GuestReport],
    cached: bool,
) -> fmt::Result {
    use MetricType::{Counter, Gauge};
    let seconds = || Some(Unit::Seconds);
    let bytes = || Some(Unit::Bytes);
    let mut up = Family::new(
        "guest_up",
        "1 when the guest agent answered guest-info in this scrape, 0 when it could not be reached, did not answer in time or was skipped",
        None,
        Gauge,
    );
    let mut duration = Family::new(
        "guest_scrape_duration",
        "How long polling the guest agent took",
        seconds(),
        Gauge,
    );
    let mut skipped = Family::new(
        "guest_skipped",
        "1 when the guest was not polled: its previous poll was still running, or no slot of the fan-out was free before the scrape deadline",
        None,
        Gauge,
    );
    let mut age = Family::new(
        "guest_result_age",
        "Age of the cached result served for this guest (results are cached by the exporter's --cache setting)",
        seconds(),
        Gauge,
    );
    let mut infos: Vec<(Labels, Labels)> = Vec::new();
    let mut os_infos: Vec<(Labels, Labels)> = Vec::new();
    let mut fs_size = Family::new(
        "guest_filesystem_size",
        "Filesystem size: guest-get-fsinfo total-bytes-privileged (all blocks) where the agent gives it, else total-bytes",
        bytes(),
        Gauge,
    );
    let mut fs_avail = Family::new(
        "guest_filesystem_avail",
        "Filesystem space available to non-root users: total-bytes minus used-bytes",
        bytes(),
        Gauge,
    );
    let mut fs_used = Family::new(
        "guest_filesystem_used",
        "Filesystem space in use: guest-get-fsinfo used-bytes",
        bytes(),
        Gauge,
    );
    let mut fs_free = Family::new(
        "guest_filesystem_free",
        "Filesystem free space including the blocks reserved for root: total-bytes-privileged minus used-bytes (qemu-ga 9.1 on Linux)",
        bytes(),
        Gauge,
    );
    let mut loads = [
        Family::new(
            "guest_load1",
            "1-minute load average (guest-get-load)",
            None,
            Gauge,
        ),
        Family::new(
            "guest_load5",
            "5-minute load average (guest-get-load)",
            None,
            Gauge,
        ),
        Family::new(
            "guest_load15",
            "15-minute load average (guest-get-load)",
            None,
            Gauge,
        ),
    ];
    let mut cpu = Family::new(
        "guest_cpu",
        "Seconds the guest's CPUs spent in each mode (guest-get-cpustats)",
        seconds(),
        Counter,
    );
    let mut cpu_guest = Family::new(
        "guest_cpu_guest",
        "Seconds the guest's CPUs spent running guests of their own (guest-get-cpustats)",
        seconds(),
        Counter,
    );
    let mut disk = DiskFamilies::new();
    let mut net = NetFamilies::new();
    let mut host = HostFamilies::new();

    for report in reports {
        let base: Labels = std::iter::once(("guest".to_owned(), report.name.clone()))
            .chain(report.labels.iter().cloned())
            .collect();
        up.push(base.clone(), if report.is_up() { 1.0 } else { 0.0 });
        let polled = matches!(report.status, PollStatus::Up | PollStatus::Down);
        if polled {
            duration.push(base.clone(), report.duration_seconds);
        }
        skipped.push(base.clone(), if polled { 0.0 } else { 1.0 });
        if cached {
            if let Some(seconds) = report.age_seconds {
                age.push(base.clone(), seconds);
            }
        }
        if let Some(data) = &report.host {
            host.push(&base, data);
        }
        let Some(data) = &report.data else {
            continue;
        };
        infos.push((
            base.clone(),
            vec![("version".to_owned(), data.version.clone())],
        ));
        if data.os.is_some() || data.host_name.is_some() {
            let os = data.os.clone().unwrap_or_default();
            let labels: Labels = [
                ("id", os.id),
                ("name", os.name),
                ("pretty_name", os.pretty_name),
                ("version", os.version),
                ("version_id", os.version_id),
                ("variant", os.variant),
                ("variant_id", os.variant_id),
                ("kernel_release", os.kernel_release),
                ("kernel_version", os.kernel_version),
                ("machine", os.machine),
                ("host_name", data.host_name.clone()),
            ]
            .into_iter()
            // Every label on every guest, empty when unknown (as node_exporter's
            // node_os_info): Prometheus reads an empty label as absent, and one label set
            // per family keeps strict parsers content.
            .map(|(k, v)| (k.to_owned(), v.unwrap_or_default()))
            .collect();
            os_infos.push((base.clone(), labels));
        }
        if let Some(filesystems) = &data.filesystems {
            let mut seen = HashSet::new();
            for fs in filesystems {
                // A mount point mounted over (or listed twice) would repeat a series, which
                // Prometheus refuses for the whole scrape: the first entry wins.
                if !seen.insert((&fs.name, &fs.mountpoint, &fs.r#type)) {
                    continue;
                }
                filesystem(
                    &base,
                    fs,
                    [&mut fs_size, &mut fs_avail, &mut fs_used, &mut fs_free],
                );
            }
        }
        if let Some(load) = &data.load {
            for (family, value) in loads
                .iter_mut()
                .zip([load.load1m, load.load5m, load.load15m])
            {
                family.push(base.clone(), value);
            }
        }
        if let Some(cpus) = &data.cpus {
            for stats in cpus {
                let GuestCpuStats::Linux(times) = stats else {
                    continue;
                };
                let index = times.cpu.to_string();
                let modes = [
                    ("user", Some(times.user)),
                    ("nice", Some(times.nice)),
                    ("system", Some(times.system)),
                    ("idle", Some(times.idle)),
                    ("iowait", times.iowait),
                    ("irq", times.irq),
                    ("softirq", times.softirq),
                    ("steal", times.steal),
                ];
                for (mode, ms) in modes {
                    if let Some(ms) = ms {
                        cpu.push(
                            with(&base, &[("cpu", &index), ("mode", mode)]),
                            ms as f64 / 1e3,
                        );
                    }
                }
                for (mode, ms) in [("user", times.guest), ("nice", times.guestnice)] {
                    if let Some(ms) = ms {
                        cpu_guest.push(
                            with(&base, &[("cpu", &index), ("mode", mode)]),
                            ms as f64 / 1e3,
                        );
                    }
                }
            }
        }
        if let Some(disks) = &data.disks {
            let mut seen = HashSet::new();
            for d in disks {
                if seen.insert(&d.name) {
                    disk.push(&with(&base, &[("device", &d.name)]), &d.stats);
                }
            }
        }
        if let Some(interfaces) = &data.interfaces {
            let mut seen = HashSet::new();
            for interface in interfaces {
                if let Some(stats) = &interface.statistics {
                    if seen.insert(&interface.name) {
                        net.push(&with(&base, &[("device", &interface.name)]), stats);
                    }
                }
            }
        }
    }

    up.encode(encoder)?;
    duration.encode(encoder)?;
    skipped.encode(encoder)?;
    age.encode(encoder)?;
    encode_infos(
        encoder,
        "guest_agent",
        "The guest agent's version (guest-info)",
        &infos,
    )?;
    encode_infos(
        encoder,
        "guest_os",
        "The guest's operating system (guest-get-osinfo) and host name (guest-get-host-name)",
        &os_infos,
    )?;
    for family in [fs_size, fs_avail, fs_used, fs_free] {
        family.encode(encoder)?;
    }
    for family in loads {
        family.encode(encoder)?;
    }
    cpu.encode(encoder)?;
    cpu_guest.encode(encoder)?;
    for family in disk.0 {
        family.encode(encoder)?;
    }
    for family in net.0 {
        family.encode(encoder)?;
    }
    for family in host.0 {
        family.encode(encoder)?;
    }
    Ok(())
}

/// The memory and block families from QEMU's monitor, in the order they are encoded.
struct HostFamilies(Vec<Family>);

/// The balloon driver's statistics by QEMU's name: metric name, help, unit, counter?
const BALLOON_STATS: [(&str, &str, &str, Option<Unit>, bool); 10] = [
    ("stat-total-memory", "guest_memory_total", "Memory the guest's kernel manages (balloon stat-total-memory)", Some(Unit::Bytes), false),
    ("stat-free-memory", "guest_memory_free", "Memory the guest leaves unused (balloon stat-free-memory)", Some(Unit::Bytes), false),
    ("stat-available-memory", "guest_memory_available", "Memory available to new programs without swapping, as the guest estimates it (balloon stat-available-memory)", Some(Unit::Bytes), false),
    ("stat-disk-caches", "guest_memory_disk_caches", "Memory the guest's page cache holds (balloon stat-disk-caches)", Some(Unit::Bytes), false),
    ("stat-swap-in", "guest_memory_swapped_in", "Memory swapped in (balloon stat-swap-in)", Some(Unit::Bytes), true),
    ("stat-swap-out", "guest_memory_swapped_out", "Memory swapped out (balloon stat-swap-out)", Some(Unit::Bytes), true),
    ("stat-major-faults", "guest_memory_major_faults", "Major page faults (balloon stat-major-faults)", None, true),
    ("stat-minor-faults", "guest_memory_minor_faults", "Minor page faults (balloon stat-minor-faults)", None, true),
    ("stat-htlb-pgalloc", "guest_memory_hugetlb_allocations", "Huge page allocations (balloon stat-htlb-pgalloc)", None, true),
    ("stat-htlb-pgfail", "guest_memory_hugetlb_allocation_failures", "Failed huge page allocations (balloon stat-htlb-pgfail)", None, true),
];

/// Block counters of `query-blockstats`: metric name, help, unit, counter?
const BLOCK_STATS: [(&str, &str, Option<Unit>, bool); 12] = [
    (
        "guest_block_read",
        "Bytes read by the guest from the block device, as QEMU counts (rd_bytes)",
        Some(Unit::Bytes),
        true,
    ),
    (
        "guest_block_written",
        "Bytes written (wr_bytes)",
        Some(Unit::Bytes),
        true,
    ),
    (
        "guest_block_discarded",
        "Bytes discarded (unmap_bytes)",
        Some(Unit::Bytes),
        true,
    ),
    (
        "guest_block_reads_completed",
        "Read operations (rd_operations)",
        None,
        true,
    ),
    (
        "guest_block_writes_completed",
        "Write operations (wr_operations)",
        None,
        true,
    ),
    (
        "guest_block_flush_requests",
        "Flush operations (flush_operations)",
        None,
        true,
    ),
    (
        "guest_block_discards_completed",
        "Discard operations (unmap_operations)",
        None,
        true,
    ),
    (
        "guest_block_read_time",
        "Time spent reading (rd_total_time_ns)",
        Some(Unit::Seconds),
        true,
    ),
    (
        "guest_block_write_time",
        "Time spent writing (wr_total_time_ns)",
        Some(Unit::Seconds),
        true,
    ),
    (
        "guest_block_flush_requests_time",
        "Time spent flushing (flush_total_time_ns)",
        Some(Unit::Seconds),
        true,
    ),
    (
        "guest_block_failed_reads",
        "Failed read operations (failed_rd_operations)",
        None,
        true,
    ),
    (
        "guest_block_failed_writes",
        "Failed write operations (failed_wr_operations)",
        None,
        true,
    ),
];

impl HostFamilies {
    fn new() -> Self {
        let kind = |counter: bool| {
            if counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            }
        };
        let mut families = vec![
            Family::new(
                "guest_qmp_up",
                "1 when the guest's QEMU monitor answered in this scrape, 0 when not (guests given a QMP socket only)",
                None,
                MetricType::Gauge,
            ),
            Family::new(
                "guest_balloon_actual",
                "The guest's memory as the balloon leaves it (query-balloon actual)",
                Some(Unit::Bytes),
                MetricType::Gauge,
            ),
        ];
        for (_, name, help, unit, counter) in BALLOON_STATS {
            families.push(Family::new(name, help, unit, kind(counter)));
        }
        for (name, help, unit, counter) in BLOCK_STATS {
            families.push(Family::new(name, help, unit, kind(counter)));
        }
        HostFamilies(families)
    }

    fn push(&mut self, base: &Labels, host: &crate::agent::monitor::HostData) {
        let (head, rest) = self.0.split_at_mut(2);
        let (memory, block) = rest.split_at_mut(BALLOON_STATS.len());
        head[0].push(base.clone(), if host.up { 1.0 } else { 0.0 });
        if let Some(bytes) = host.balloon_bytes {
            head[1].push(base.clone(), bytes as f64);
        }
        if let Some(stats) = &host.balloon_stats {
            for (family, (stat, ..)) in memory.iter_mut().zip(BALLOON_STATS) {
                if let Some(value) = stats.get(stat) {
                    family.push(base.clone(), *value as f64);
                }
            }
        }
        #[cfg(feature = "qmp")]
        if let Some(devices) = &host.block {
            let mut seen = HashSet::new();
            for (drive, s) in devices {
                if !seen.insert(drive) {
                    continue;
                }
                let labels = with(base, &[("drive", drive)]);
                let ns = |v: u64| v as f64 / 1e9;
                let values = [
                    s.rd_bytes as f64,
                    s.wr_bytes as f64,
                    s.unmap_bytes as f64,
                    s.rd_operations as f64,
                    s.wr_operations as f64,
                    s.flush_operations as f64,
                    s.unmap_operations as f64,
                    ns(s.rd_total_time_ns),
                    ns(s.wr_total_time_ns),
                    ns(s.flush_total_time_ns),
                    s.failed_rd_operations as f64,
                    s.failed_wr_operations as f64,
                ];
                for (family, value) in block.iter_mut().zip(values) {
                    family.push(labels.clone(), value);
                }
            }
        }
        #[cfg(not(feature = "qmp"))]
        let _ = block;
    }
}

fn encode_infos(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    infos: &[(Labels, Labels)],
) -> fmt::Result {
    if infos.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Info)?;
    for (base, labels) in infos {
        Info::new(labels.clone()).encode(family.encode_family(base)?)?;
    }
    Ok(())
}

/// The size, available, used and free samples of one filesystem, those it has.
fn filesystem(base: &Labels, fs: &GuestFilesystemInfo, families: [&mut Family; 4]) {
    let [size, avail, used, free] = families;
    let (Some(total), Some(in_use)) = (fs.total_bytes, fs.used_bytes) else {
        return;
    };
    let labels = with(
        base,
        &[
            ("device", &fs.name),
            ("mountpoint", &fs.mountpoint),
            ("fstype", &fs.r#type),
        ],
    );
    size.push(
        labels.clone(),
        fs.total_bytes_privileged.unwrap_or(total) as f64,
    );
    avail.push(labels.clone(), total.saturating_sub(in_use) as f64);
    used.push(labels.clone(), in_use as f64);
    if let Some(privileged) = fs.total_bytes_privileged {
        free.push(labels, privileged.saturating_sub(in_use) as f64);
    }
}

/// The disk families, in node_exporter's names.
struct DiskFamilies(Vec<Family>);

impl DiskFamilies {
    const COUNTS: [(&'static str, &'static str); 7] = [
        (
            "guest_disk_reads_completed",
            "Reads completed (guest-get-diskstats read-ios)",
        ),
        (
            "guest_disk_writes_completed",
            "Writes completed (write-ios)",
        ),
        (
            "guest_disk_discards_completed",
            "Discards completed (discard-ios)",
        ),
        ("guest_disk_reads_merged", "Reads merged (read-merges)"),
        ("guest_disk_writes_merged", "Writes merged (write-merges)"),
        (
            "guest_disk_discards_merged",
            "Discards merged (discard-merges)",
        ),
        (
            "guest_disk_flush_requests",
            "Flush requests completed (flush-ios)",
        ),
    ];
    const BYTES: [(&'static str, &'static str); 2] = [
        ("guest_disk_read", "Bytes read (read-sectors × 512)"),
        ("guest_disk_written", "Bytes written (write-sectors × 512)"),
    ];
    const TIMES: [(&'static str, &'static str); 6] = [
        ("guest_disk_read_time", "Time spent reading (read-ticks)"),
        ("guest_disk_write_time", "Time spent writing (write-ticks)"),
        (
            "guest_disk_discard_time",
            "Time spent discarding (discard-ticks)",
        ),
        (
            "guest_disk_flush_requests_time",
            "Time spent flushing (flush-ticks)",
        ),
        ("guest_disk_io_time", "Time spent doing I/Os (total-ticks)"),
        (
            "guest_disk_io_time_weighted",
            "Weighted time spent doing I/Os (weight-ticks)",
        ),
    ];

    fn new() -> Self {
        let mut families = Vec::new();
        for (name, help) in Self::COUNTS {
            families.push(Family::new(name, help, None, MetricType::Counter));
        }
        for (name, help) in Self::BYTES {
            families.push(Family::new(
                name,
                help,
                Some(Unit::Bytes),
                MetricType::Counter,
            ));
        }
        families.push(Family::new(
            "guest_disk_discarded_sectors",
            "Sectors discarded (discard-sectors)",
            None,
            MetricType::Counter,
        ));
        for (name, help) in Self::TIMES {
            families.push(Family::new(
                name,
                help,
                Some(Unit::Seconds),
                MetricType::Counter,
            ));
        }
        families.push(Family::new(
            "guest_disk_io_now",
            "I/Os in progress (ios-pgr)",
            None,
            MetricType::Gauge,
        ));
        DiskFamilies(families)
    }

    fn push(&mut self, labels: &Labels, s: &GuestDiskStats) {
        let ms = |v: Option<u64>| v.map(|v| v as f64 / 1e3);
        let count = |v: Option<u64>| v.map(|v| v as f64);
        let sectors = |v: Option<u64>| v.map(|v| v as f64 * SECTOR);
        let values = [
            count(s.read_ios),
            count(s.write_ios),
            count(s.discard_ios),
            count(s.read_merges),
            count(s.write_merges),
            count(s.discard_merges),
            count(s.flush_ios),
            sectors(s.read_sectors),
            sectors(s.write_sectors),
            count(s.discard_sectors),
            ms(s.read_ticks),
            ms(s.write_ticks),
            ms(s.discard_ticks),
            ms(s.flush_ticks),
            ms(s.total_ticks),
            ms(s.weight_ticks),
            count(s.ios_pgr),
        ];
        for (family, value) in self.0.iter_mut().zip(values) {
            if let Some(value) = value {
                family.push(labels.clone(), value);
            }
        }
    }
}

/// The network families, in node_exporter's names.
struct NetFamilies(Vec<Family>);

impl NetFamilies {
    fn new() -> Self {
        let spec: [(&'static str, &'static str, Option<Unit>); 8] = [
            (
                "guest_network_receive",
                "Bytes received (rx-bytes)",
                Some(Unit::Bytes),
            ),
            (
                "guest_network_receive_packets",
                "Packets received (rx-packets)",
                None,
            ),
            (
                "guest_network_receive_errs",
                "Receive errors (rx-errs)",
                None,
            ),
            (
                "guest_network_receive_drop",
                "Received packets dropped (rx-dropped)",
                None,
            ),
            (
                "guest_network_transmit",
                "Bytes sent (tx-bytes)",
                Some(Unit::Bytes),
            ),
            (
                "guest_network_transmit_packets",
                "Packets sent (tx-packets)",
                None,
            ),
            (
                "guest_network_transmit_errs",
                "Transmit errors (tx-errs)",
                None,
            ),
            (
                "guest_network_transmit_drop",
                "Sent packets dropped (tx-dropped)",
                None,
            ),
        ];
        NetFamilies(
            spec.into_iter()
                .map(|(name, help, unit)| Family::new(name, help, unit, MetricType::Counter))
                .collect(),
        )
    }

    fn push(&mut self, labels: &Labels, s: &qga_proto::types::GuestNetworkInterfaceStat) {
        let values = [
            s.rx_bytes,
            s.rx_packets,
            s.rx_errs,
            s.rx_dropped,
            s.tx_bytes,
            s.tx_packets,
            s.tx_errs,
            s.tx_dropped,
        ];
        for (family, value) in self.0.iter_mut().zip(values) {
            family.push(labels.clone(), value as f64);
        }
    }
}
