//! Many guests' agents polled in one bounded scrape: what a host-side exporter needs.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use qga_proto::cmd::Command as _;
use qga_proto::types::{
    GuestAgentInfo, GuestCpuStats, GuestDiskStatsInfo, GuestFilesystemInfo, GuestLoadAverage,
    GuestNetworkInterface, GuestOSInfo,
};
use qga_proto::{cmd, Address, AsyncClient, BoxedStream, ClientConfig, GuestAgent};
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::{Error, Result};

/// One guest to watch: a name (the `guest` label of its metrics), its agent's address and
/// labels of its own.
///
/// ```
/// use vmsdk::agent::monitor::Guest;
///
/// let guest = Guest::new("web-1", "qga+unix:///var/run/qemu-server/101.qga")?
///     .label("tenant", "shop");
/// assert_eq!(guest.name(), "web-1");
/// # Ok::<(), vmsdk::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    name: String,
    address: Address,
    labels: Vec<(String, String)>,
    #[cfg(feature = "qmp")]
    qmp: Option<(qmp_proto::Address, String)>,
}

impl Guest {
    /// A guest named `name` whose agent is at `uri` (`qga+unix:///…`, `qga+tcp://…`, a
    /// socket path; see [`connect`](super::connect)).
    pub fn new(name: impl Into<String>, uri: &str) -> Result<Guest> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::InvalidGuests(format!(
                "the guest at {uri} has an empty name"
            )));
        }
        Ok(Guest {
            name,
            address: Address::parse(uri)?,
            labels: Vec::new(),
            #[cfg(feature = "qmp")]
            qmp: None,
        })
    }

    /// Also reads the guest's memory and disks as the host sees them, from its QEMU monitor
    /// at `uri` (`qmp+unix:///var/run/qemu-server/101.qmp`, or a socket path): the balloon's
    /// size (`query-balloon`), the statistics its driver reports (`qom-get` of the balloon
    /// device `balloon0`'s `guest-stats`; see [`balloon_device`](Self::balloon_device)) and
    /// the block devices' counters (`query-blockstats`). These come even when the agent is
    /// down. Each poll connects and closes at once: a QMP socket, too, serves one client at a
    /// time.
    #[cfg(feature = "qmp")]
    #[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
    pub fn qmp(mut self, uri: &str) -> Result<Guest> {
        let uri = if uri.starts_with('/') {
            format!("qmp+unix://{uri}")
        } else {
            uri.to_owned()
        };
        let device = self
            .qmp
            .take()
            .map_or_else(|| "balloon0".to_owned(), |(_, device)| device);
        self.qmp = Some((qmp_proto::Address::parse(&uri)?, device));
        Ok(self)
    }

    /// The QOM id of the guest's balloon device (`-device virtio-balloon-pci,id=…`; default
    /// `balloon0`, the id libvirt and Proxmox give it), whose `guest-stats` are read.
    #[cfg(feature = "qmp")]
    #[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
    pub fn balloon_device(mut self, id: impl Into<String>) -> Guest {
        if let Some((_, device)) = &mut self.qmp {
            *device = id.into();
        }
        self
    }

    /// Adds a label to this guest's metrics and reports (a tenant, a cluster, ...).
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Guest {
        self.labels.push((name.into(), value.into()));
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The guest's own labels.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }
}

/// How the monitor reaches an agent between polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Connection {
    /// Connect for each poll and close at once (the default). QEMU's chardev socket serves one
    /// client at a time: a connection kept open locks every other tool out of the agent
    /// (`virsh`, `qm agent`, a backup's filesystem freeze), which is why Proxmox connects per
    /// command too.
    #[default]
    PerPoll,
    /// Keep one connection per guest and reuse it; reconnect after a failure. Only for
    /// channels nobody else uses (a dedicated second agent channel, a test agent): it saves a
    /// connect and a `guest-sync` handshake per poll.
    Keep,
}

/// Settings of a [`GuestMonitor`], with [`GuestMonitor::builder`].
#[derive(Debug, Clone)]
pub struct GuestMonitorBuilder {
    guests: Vec<Guest>,
    guest_deadline: Duration,
    scrape_deadline: Duration,
    concurrency: usize,
    cache: Option<Duration>,
    connection: Connection,
}

/// Polls many guests' agents in bounded scrapes: at most [`concurrency`] guests at once, each
/// poll within its own deadline and the whole scrape within another, a guest whose previous
/// poll is still running skipped rather than asked again, and by default a fresh connection
/// per poll, closed at once (see [`Connection`]).
///
/// A poll asks `guest-info` first and then, pipelined on the one connection, every
/// command of the metrics that the agent lists as enabled: `guest-get-osinfo`,
/// `guest-get-host-name`, `guest-get-fsinfo`, `guest-get-load` (qemu-ga 10.0),
/// `guest-get-cpustats` and `guest-get-diskstats` (7.1, Linux), and
/// `guest-network-get-interfaces`. What the agent lacks is left out of the report, never
/// reported as zero; a command that fails is left out too and named in
/// [`GuestData::failures`].
///
/// The polls run on a thread of the monitor's own (a single-threaded tokio runtime), so the
/// monitor serves async programs ([`scrape`](Self::scrape)) and blocking ones
/// ([`scrape_blocking`](Self::scrape_blocking), which a `prometheus-client` collector calls)
/// alike. Clones share the guests and their state.
///
/// ```
/// use std::time::Duration;
/// use vmsdk::agent::monitor::{Guest, GuestMonitor};
///
/// # fn main() -> vmsdk::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// # let sock = dir.path().join("101.qga");
/// # let _agent = vmsdk::agent::fake::FakeAgent::linux().listen_unix(&sock).unwrap();
/// # let sock = sock.display().to_string();
/// let monitor = GuestMonitor::builder()
///     .guest(Guest::new("web-1", &sock)?)
///     .guest(Guest::new("gone", "qga+unix:///nonexistent/102.qga")?)
///     .guest_deadline(Duration::from_secs(2))
///     .build()?;
/// for report in monitor.scrape_blocking() {
///     match &report.data {
///         Some(data) => println!("{}: qemu-ga {}", report.name, data.version),
///         None => println!("{}: down ({})", report.name, report.error.unwrap_or_default()),
///     }
/// }
/// # Ok(()) }
/// ```
///
/// [`concurrency`]: GuestMonitorBuilder::concurrency
#[derive(Clone)]
pub struct GuestMonitor {
    shared: Arc<Shared>,
}

struct Shared {
    slots: Vec<Arc<Slot>>,
    guest_deadline: Duration,
    scrape_deadline: Duration,
    cache: Option<Duration>,
    connection: Connection,
    permits: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    /// Ends the runtime's thread when the last clone drops.
    _stop: oneshot::Sender<()>,
}

struct Slot {
    guest: Guest,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// A poll is running (possibly left over from an earlier scrape).
    busy: bool,
    /// The last finished poll and when it finished, for the cache.
    last: Option<(Instant, GuestReport)>,
    /// The kept connection ([`Connection::Keep`]).
    client: Option<Arc<AsyncClient<BoxedStream>>>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state is plain data; a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for GuestMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("GuestMonitor")
            .field(
                "guests",
                &shared
                    .slots
                    .iter()
                    .map(|s| s.guest.name())
                    .collect::<Vec<_>>(),
            )
            .field("guest_deadline", &shared.guest_deadline)
            .field("scrape_deadline", &shared.scrape_deadline)
            .field("cache", &shared.cache)
            .field("connection", &shared.connection)
            .finish_non_exhaustive()
    }
}

/// How a guest's poll ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PollStatus {
    /// The agent answered `guest-info`; the data holds what else it answered.
    Up,
    /// The agent could not be reached or did not answer in time.
    Down,
    /// Not polled: its previous poll is still running (a hung agent is not asked twice).
    Busy,
    /// Not polled: the scrape's deadline passed while it waited for a free slot of the
    /// fan-out.
    NotPolled,
}

/// What one scrape learnt about one guest.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct GuestReport {
    /// The guest's name.
    pub name: String,
    /// The guest's own labels.
    pub labels: Vec<(String, String)>,
    /// How the poll ended.
    pub status: PollStatus,
    /// Why the guest is not up.
    pub error: Option<String>,
    /// How long the poll took, in seconds (0 when the guest was not polled).
    pub duration_seconds: f64,
    /// With a cache: how old this result is, in seconds (0 for a fresh poll).
    pub age_seconds: Option<f64>,
    /// What the agent answered, when it is up.
    pub data: Option<GuestData>,
    /// What QEMU's monitor answered, for a guest given one (feature `qmp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<HostData>,
}

impl GuestReport {
    /// Whether the agent answered.
    pub fn is_up(&self) -> bool {
        self.status == PollStatus::Up
    }
}

/// The agent's answers of one poll; `None` where the agent lacks the command or it failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct GuestData {
    /// The agent's version (`guest-info`).
    pub version: String,
    /// The commands `guest-info` lists as enabled.
    #[serde(skip)]
    pub info: GuestAgentInfo,
    /// `guest-get-osinfo`.
    pub os: Option<GuestOSInfo>,
    /// `guest-get-host-name`.
    pub host_name: Option<String>,
    /// `guest-get-fsinfo`.
    pub filesystems: Option<Vec<GuestFilesystemInfo>>,
    /// `guest-get-load` (qemu-ga 10.0).
    pub load: Option<GuestLoadAverage>,
    /// `guest-get-cpustats` (7.1, Linux).
    pub cpus: Option<Vec<GuestCpuStats>>,
    /// `guest-get-diskstats` (7.1, Linux).
    pub disks: Option<Vec<GuestDiskStatsInfo>>,
    /// `guest-network-get-interfaces`.
    pub interfaces: Option<Vec<GuestNetworkInterface>>,
    /// Commands the agent has but that failed in this poll, with the error.
    pub failures: Vec<(String, String)>,
}

/// A guest as its QEMU sees it (feature `qmp`): what the monitor answered in one poll.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HostData {
    /// Whether the monitor answered at all.
    pub up: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// `query-balloon`: the guest's memory in bytes as the balloon leaves it (left out
    /// without a balloon).
    pub balloon_bytes: Option<u64>,
    /// The balloon driver's statistics (`guest-stats`), by QEMU's names (`stat-free-memory`,
    /// ...), those the guest reported; left out when it never did (statistics are polled
    /// only with `guest-stats-polling-interval` set, as libvirt and Proxmox do).
    pub balloon_stats: Option<std::collections::BTreeMap<String, u64>>,
    /// `query-blockstats`: each block device's name (drive id, else qdev, else node name)
    /// and counters.
    #[cfg(feature = "qmp")]
    #[cfg_attr(docsrs, doc(cfg(feature = "qmp")))]
    pub block: Option<Vec<(String, qmp_proto::types::BlockDeviceStats)>>,
    /// Commands that failed, with the error.
    pub failures: Vec<(String, String)>,
}

impl GuestMonitor {
    /// Settings, starting from no guests, a 3 s deadline per guest, 8 s per scrape (below
    /// Prometheus' default scrape timeout of 10 s), 16 guests polled at once, no cache and a
    /// connection per poll.
    pub fn builder() -> GuestMonitorBuilder {
        GuestMonitorBuilder {
            guests: Vec::new(),
            guest_deadline: Duration::from_secs(3),
            scrape_deadline: Duration::from_secs(8),
            concurrency: 16,
            cache: None,
            connection: Connection::PerPoll,
        }
    }

    /// The guests, in the order given.
    pub fn guests(&self) -> impl Iterator<Item = &Guest> {
        self.shared.slots.iter().map(|slot| &slot.guest)
    }

    /// The per-guest deadline.
    pub fn guest_deadline(&self) -> Duration {
        self.shared.guest_deadline
    }

    /// Whether results are cached (then reports carry their age).
    pub fn caches(&self) -> bool {
        self.shared.cache.is_some()
    }

    /// Polls every guest, within the scrape deadline; one report per guest, in order.
    pub async fn scrape(&self) -> Vec<GuestReport> {
        self.scrape_within(None, self.shared.scrape_deadline).await
    }

    /// Polls the guest named `name` alone (a `/probe?target=` request), within the scrape
    /// deadline; `None` when no guest has that name.
    pub async fn scrape_one(&self, name: &str) -> Option<GuestReport> {
        self.scrape_within(Some(name), self.shared.scrape_deadline)
            .await
            .pop()
    }

    /// [`scrape`](Self::scrape) for blocking code (a `prometheus-client` collector). Blocks
    /// the calling thread for at most the scrape deadline; inside an async program call it
    /// from `spawn_blocking`, or use [`scrape`](Self::scrape).
    pub fn scrape_blocking(&self) -> Vec<GuestReport> {
        self.blocking(None, self.shared.scrape_deadline)
    }

    /// [`scrape_one`](Self::scrape_one) for blocking code.
    pub fn scrape_one_blocking(&self, name: &str) -> Option<GuestReport> {
        self.blocking(Some(name), self.shared.scrape_deadline).pop()
    }

    /// [`scrape_blocking`](Self::scrape_blocking) of one guest or all, with a shorter
    /// deadline (from a scraper's `X-Prometheus-Scrape-Timeout-Seconds` header).
    pub fn scrape_blocking_within(
        &self,
        name: Option<&str>,
        deadline: Duration,
    ) -> Vec<GuestReport> {
        self.blocking(name, deadline.min(self.shared.scrape_deadline))
    }

    fn blocking(&self, name: Option<&str>, deadline: Duration) -> Vec<GuestReport> {
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        let monitor = self.clone();
        let name = name.map(str::to_owned);
        self.shared.runtime.spawn(async move {
            let reports = monitor.scrape_on_runtime(name.as_deref(), deadline).await;
            let _ = done.send(reports);
        });
        // The scrape answers by its deadline; the slack covers a runtime that stopped.
        outcome
            .recv_timeout(deadline + Duration::from_secs(1))
            .unwrap_or_default()
    }

    async fn scrape_within(&self, name: Option<&str>, deadline: Duration) -> Vec<GuestReport> {
        let monitor = self.clone();
        let name = name.map(str::to_owned);
        self.shared
            .runtime
            .spawn(async move { monitor.scrape_on_runtime(name.as_deref(), deadline).await })
            .await
            .unwrap_or_default()
    }

    /// The scrape itself, on the monitor's runtime.
    async fn scrape_on_runtime(&self, name: Option<&str>, deadline: Duration) -> Vec<GuestReport> {
        let shared = &self.shared;
        let scrape_deadline = Instant::now() + deadline;
        let mut pending = Vec::new();
        for slot in &shared.slots {
            if name.is_some_and(|n| n != slot.guest.name) {
                continue;
            }
            pending.push(self.start(slot, scrape_deadline));
        }
        let mut reports = Vec::with_capacity(pending.len());
        for (slot, started) in pending {
            let report = match started {
                Started::Ready(report) => *report,
                Started::Polling(answer) => match timeout_at(scrape_deadline, answer).await {
                    Ok(Ok(report)) => report,
                    // The task ended without a report: the runtime is shutting down.
                    Ok(Err(_)) => not_up(&slot.guest, PollStatus::Down, "the monitor stopped"),
                    Err(_) => not_up(
                        &slot.guest,
                        PollStatus::Down,
                        &format!(
                            "no answer within the scrape deadline of {} (the poll goes on in the background and the guest is skipped until it ends)",
                            seconds_text(deadline)
                        ),
                    ),
                },
            };
            reports.push(report);
        }
        reports
    }

    /// Starts polling `slot`, or answers from the cache, or reports it busy.
    fn start(&self, slot: &Arc<Slot>, scrape_deadline: Instant) -> (Arc<Slot>, Started) {
        let shared = &self.shared;
        let mut state = slot.lock();
        if let (Some(max_age), Some((finished, report))) = (shared.cache, &state.last) {
            let age = finished.elapsed();
            if age <= max_age || state.busy {
                let mut report = report.clone();
                report.age_seconds = Some(age.as_secs_f64());
                return (Arc::clone(slot), Started::Ready(Box::new(report)));
            }
        }
        if state.busy {
            return (
                Arc::clone(slot),
                Started::Ready(Box::new(not_up(
                    &slot.guest,
                    PollStatus::Busy,
                    "skipped: the previous poll of this guest is still running (a hung agent is not asked twice)",
                ))),
            );
        }
        state.busy = true;
        drop(state);
        let (reply, answer) = oneshot::channel();
        let task_slot = Arc::clone(slot);
        let monitor = self.clone();
        shared.runtime.spawn(async move {
            let report = monitor.poll_slot(&task_slot, scrape_deadline).await;
            let mut state = task_slot.lock();
            state.busy = false;
            if report.status != PollStatus::NotPolled {
                state.last = Some((Instant::now(), report.clone()));
            }
            drop(state);
            let _ = reply.send(report);
        });
        (Arc::clone(slot), Started::Polling(answer))
    }

    /// Waits for a slot of the fan-out, then polls.
    async fn poll_slot(&self, slot: &Slot, scrape_deadline: Instant) -> GuestReport {
        let shared = &self.shared;
        let permit = match timeout_at(scrape_deadline, Arc::clone(&shared.permits).acquire_owned())
            .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return not_up(
                    &slot.guest,
                    PollStatus::NotPolled,
                    "not polled: the scrape deadline passed while every slot of the fan-out was busy (raise the concurrency)",
                )
            }
        };
        let started = Instant::now();
        let deadline = started + shared.guest_deadline;
        let (outcome, host) = tokio::join!(
            self.poll(slot, deadline),
            poll_host(&slot.guest, shared.guest_deadline, deadline)
        );
        drop(permit);
        let duration_seconds = started.elapsed().as_secs_f64();
        let age_seconds = shared.cache.map(|_| 0.0);
        let (status, error, data) = match outcome {
            Ok(data) => (PollStatus::Up, None, Some(data)),
            Err(error) => (PollStatus::Down, Some(error), None),
        };
        GuestReport {
            name: slot.guest.name.clone(),
            labels: slot.guest.labels.clone(),
            status,
            error,
            duration_seconds,
            age_seconds,
            data,
            host,
        }
    }

    /// One poll: connect (or reuse), `guest-info`, then the metrics' commands pipelined.
    async fn poll(&self, slot: &Slot, deadline: Instant) -> std::result::Result<GuestData, String> {
        let shared = &self.shared;
        let kept = match shared.connection {
            Connection::Keep => slot.lock().client.clone(),
            Connection::PerPoll => None,
        };
        let client = match kept {
            Some(client) => client,
            None => {
                let config = ClientConfig::monitoring(shared.guest_deadline);
                let connect = AsyncClient::connect_address(&slot.guest.address, config);
                match timeout_at(deadline, connect).await {
                    Ok(Ok(client)) => Arc::new(client),
                    Ok(Err(error)) => return Err(error_chain(&error)),
                    Err(_) => return Err(self.late()),
                }
            }
        };
        // Every step of `collect` is bounded by the deadline.
        let result = collect(&client, deadline).await;
        match (shared.connection, &result) {
            (Connection::Keep, Ok(_)) => slot.lock().client = Some(client),
            (Connection::Keep, Err(_)) => slot.lock().client = None,
            (Connection::PerPoll, _) => {
                // Close at once so that the channel is free for other clients (after reading
                // for at most DRAIN_TIME what an unfinished call may still send).
                if let Ok(client) = Arc::try_unwrap(client) {
                    client.close().await;
                }
            }
        }
        result.map_err(|error| match error {
            Late => self.late(),
            Failed(error) => error_chain(&error),
        })
    }

    fn late(&self) -> String {
        format!(
            "the guest agent did not answer within the guest deadline of {}",
            seconds_text(self.shared.guest_deadline)
        )
    }
}

/// The guest's QEMU monitor, when it has one: connect, ask, close, within `deadline`.
#[cfg(feature = "qmp")]
async fn poll_host(guest: &Guest, budget: Duration, deadline: Instant) -> Option<HostData> {
    use qmp_proto::cmd::{Command as _, QomGet, QomGetArgs, QueryBalloon, QueryBlockstats};
    let (address, balloon_device) = guest.qmp.as_ref()?;
    let config = qmp_proto::ClientConfig::default()
        .handshake_timeout(budget / 2)
        .timeout(budget / 2);
    let qemu = match timeout_at(
        deadline,
        qmp_proto::AsyncClient::connect_address(address, config),
    )
    .await
    {
        Ok(Ok(qemu)) => qemu,
        Ok(Err(error)) => {
            return Some(HostData {
                error: Some(error_chain(&error)),
                ..HostData::default()
            })
        }
        Err(_) => {
            return Some(HostData {
                error: Some("QEMU's monitor did not answer within the guest deadline".to_owned()),
                ..HostData::default()
            })
        }
    };
    let stats_args = QomGetArgs::balloon_guest_stats(balloon_device);
    let devices = qmp_proto::cmd::QueryBlockstatsArgs::default();
    let (balloon, stats, block) = tokio::join!(
        timeout_at(deadline, qemu.call::<QueryBalloon>(&())),
        timeout_at(deadline, qemu.call::<QomGet>(&stats_args)),
        timeout_at(deadline, qemu.call::<QueryBlockstats>(&devices)),
    );
    drop(qemu);
    let mut host = HostData {
        up: true,
        ..HostData::default()
    };
    let mut failed = |command: &str, error: String| host.failures.push((command.to_owned(), error));
    let late = || "no answer within the guest deadline".to_owned();
    let balloon_bytes = match balloon {
        Ok(Ok(info)) => u64::try_from(info.actual).ok(),
        // No balloon device, or no driver in the guest: nothing to report, not a failure.
        Ok(Err(qmp_proto::Error::Qmp {
            class: qmp_proto::ErrorClass::DeviceNotActive,
            ..
        })) => None,
        Ok(Err(error)) => {
            failed(QueryBalloon::NAME, error_chain(&error));
            None
        }
        Err(_) => {
            failed(QueryBalloon::NAME, late());
            None
        }
    };
    let balloon_stats = match stats {
        // `{"stats": {"stat-free-memory": N, ...}, "last-update": T}`; QEMU shows a statistic
        // the guest did not report as -1 in a uint64, 18446744073709551615.
        Ok(Ok(value)) => {
            let stats = value.get("stats").and_then(|s| s.as_object());
            match (stats, value.get("last-update").and_then(|t| t.as_u64())) {
                // Never reported (no polling interval set, or no driver in the guest).
                (Some(_), Some(0)) => None,
                (Some(stats), Some(_)) => Some(
                    stats
                        .iter()
                        .filter_map(|(name, value)| {
                            let value = value.as_u64().filter(|v| *v != u64::MAX)?;
                            Some((name.clone(), value))
                        })
                        .collect(),
                ),
                _ => {
                    failed(QomGet::NAME, format!("unexpected guest-stats: {value}"));
                    None
                }
            }
        }
        // A guest without a balloon device of that id.
        Ok(Err(qmp_proto::Error::Qmp {
            class: qmp_proto::ErrorClass::DeviceNotFound,
            ..
        })) => None,
        Ok(Err(error)) => {
            failed(QomGet::NAME, error_chain(&error));
            None
        }
        Err(_) => {
            failed(QomGet::NAME, late());
            None
        }
    };
    let block = match block {
        Ok(Ok(devices)) => Some(
            devices
                .into_iter()
                .map(|d| {
                    let name = [d.device, d.qdev, d.node_name]
                        .into_iter()
                        .flatten()
                        .find(|n| !n.is_empty())
                        .unwrap_or_default();
                    (name, d.stats)
                })
                .collect(),
        ),
        Ok(Err(error)) => {
            failed(QueryBlockstats::NAME, error_chain(&error));
            None
        }
        Err(_) => {
            failed(QueryBlockstats::NAME, late());
            None
        }
    };
    host.balloon_bytes = balloon_bytes;
    host.balloon_stats = balloon_stats;
    host.block = block;
    Some(host)
}

/// Without the `qmp` feature a guest has no monitor to ask.
#[cfg(not(feature = "qmp"))]
async fn poll_host(_guest: &Guest, _budget: Duration, _deadline: Instant) -> Option<HostData> {
    None
}

/// Why a poll found no agent.
enum Missing {
    /// The deadline passed.
    Late,
    /// The agent or its channel failed.
    Failed(qga_proto::Error),
}
use Missing::{Failed, Late};

enum Started {
    Ready(Box<GuestReport>),
    Polling(oneshot::Receiver<GuestReport>),
}

/// Asks `guest-info`, then every enabled command of the metrics at once.
async fn collect(
    client: &AsyncClient<BoxedStream>,
    deadline: Instant,
) -> std::result::Result<GuestData, Missing> {
    let info = async {
        match client.capabilities().await? {
            Some(info) => Ok(info),
            None => client.info().await,
        }
    };
    let info = match timeout_at(deadline, info).await {
        Ok(Ok(info)) => info,
        Ok(Err(error)) => return Err(Failed(error)),
        Err(_) => return Err(Late),
    };
    let has = |name: &str| info.is_enabled(name);
    let mut failures = Vec::new();
    // Each within the poll's deadline, so that what came in time is kept when one hangs.
    let (os, host, filesystems, load, cpus, disks, interfaces) = tokio::join!(
        ask(
            has(cmd::GuestGetOsinfo::NAME),
            deadline,
            client.call::<cmd::GuestGetOsinfo>(&())
        ),
        ask(
            has(cmd::GuestGetHostName::NAME),
            deadline,
            client.call::<cmd::GuestGetHostName>(&())
        ),
        ask(
            has(cmd::GuestGetFsinfo::NAME),
            deadline,
            client.call::<cmd::GuestGetFsinfo>(&())
        ),
        ask(
            has(cmd::GuestGetLoad::NAME),
            deadline,
            client.call::<cmd::GuestGetLoad>(&())
        ),
        ask(
            has(cmd::GuestGetCpustats::NAME),
            deadline,
            client.call::<cmd::GuestGetCpustats>(&())
        ),
        ask(
            has(cmd::GuestGetDiskstats::NAME),
            deadline,
            client.call::<cmd::GuestGetDiskstats>(&())
        ),
        ask(
            has(cmd::GuestNetworkGetInterfaces::NAME),
            deadline,
            client.call::<cmd::GuestNetworkGetInterfaces>(&())
        ),
    );
    let os = keep(&mut failures, cmd::GuestGetOsinfo::NAME, os);
    let host_name = keep(&mut failures, cmd::GuestGetHostName::NAME, host).map(|h| h.host_name);
    let filesystems = keep(&mut failures, cmd::GuestGetFsinfo::NAME, filesystems);
    let load = keep(&mut failures, cmd::GuestGetLoad::NAME, load);
    let cpus = keep(&mut failures, cmd::GuestGetCpustats::NAME, cpus);
    let disks = keep(&mut failures, cmd::GuestGetDiskstats::NAME, disks);
    let interfaces = keep(
        &mut failures,
        cmd::GuestNetworkGetInterfaces::NAME,
        interfaces,
    );
    Ok(GuestData {
        version: info.version.clone(),
        info,
        os,
        host_name,
        filesystems,
        load,
        cpus,
        disks,
        interfaces,
        failures,
    })
}

/// The value of an answer; a failure is noted in `failures`.
fn keep<T>(
    failures: &mut Vec<(String, String)>,
    name: &str,
    outcome: Option<std::result::Result<T, String>>,
) -> Option<T> {
    match outcome {
        Some(Ok(value)) => Some(value),
        Some(Err(error)) => {
            failures.push((name.to_owned(), error));
            None
        }
        None => None,
    }
}

/// The answer to one command the agent has (`None` when it lacks it), bounded by `deadline`.
async fn ask<T>(
    wanted: bool,
    deadline: Instant,
    call: impl std::future::Future<Output = qga_proto::Result<T>>,
) -> Option<std::result::Result<T, String>> {
    if !wanted {
        return None;
    }
    Some(match timeout_at(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error_chain(&error)),
        Err(_) => Err("no answer within the guest deadline".to_owned()),
    })
}

fn not_up(guest: &Guest, status: PollStatus, why: &str) -> GuestReport {
    GuestReport {
        name: guest.name.clone(),
        labels: guest.labels.clone(),
        status,
        error: Some(why.to_owned()),
        duration_seconds: 0.0,
        age_seconds: None,
        data: None,
        host: None,
    }
}

fn seconds_text(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// Labels the metrics of a guest carry themselves, which a guest's own label may not shadow.
pub const OWN_LABELS: &[&str] = &[
    "guest",
    "version",
    "device",
    "mountpoint",
    "fstype",
    "cpu",
    "mode",
    "id",
    "name",
    "pretty_name",
    "version_id",
    "variant",
    "variant_id",
    "kernel_release",
    "kernel_version",
    "machine",
    "host_name",
];

/// A label name every Prometheus version accepts (ASCII letters, digits, `_`, not starting
/// with a digit or `__`) and not one of [`OWN_LABELS`].
fn check_label(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__");
    if !valid {
        return Err(Error::InvalidGuests(format!(
            "`{name}` is not a label name: ASCII letters, digits and `_`, not starting with a digit or `__`"
        )));
    }
    if OWN_LABELS.contains(&name) {
        return Err(Error::InvalidGuests(format!(
            "the label `{name}` is one the guest metrics set themselves"
        )));
    }
    Ok(())
}

impl GuestMonitorBuilder {
    /// Adds a guest. Names must be unique.
    pub fn guest(mut self, guest: Guest) -> Self {
        self.guests.push(guest);
        self
    }

    /// Adds guests.
    pub fn guests(mut self, guests: impl IntoIterator<Item = Guest>) -> Self {
        self.guests.extend(guests);
        self
    }

    /// How long one guest's poll may take, connect included (default 3 s). The agent client
    /// gets [`ClientConfig::monitoring`] of it: a quarter to connect, a quarter for one
    /// `guest-sync`, half for the replies.
    pub fn guest_deadline(mut self, deadline: Duration) -> Self {
        self.guest_deadline = deadline;
        self
    }

    /// How long a whole scrape may take (default 8 s). Guests whose poll has not ended by
    /// then are reported down; their poll goes on until its own deadline and they are
    /// skipped ([`PollStatus::Busy`]) until it ends.
    pub fn scrape_deadline(mut self, deadline: Duration) -> Self {
        self.scrape_deadline = deadline;
        self
    }

    /// How many guests are polled at once (default 16, at least 1).
    pub fn concurrency(mut self, guests: usize) -> Self {
        self.concurrency = guests.max(1);
        self
    }

    /// Serves a guest's last result for up to `max_age` instead of polling it again; reports
    /// then carry their age (`vmsdk_guest_result_age_seconds`). Default: no cache, every
    /// scrape polls.
    pub fn cache(mut self, max_age: Duration) -> Self {
        self.cache = Some(max_age);
        self
    }

    /// How guests are reached between polls (default [`Connection::PerPoll`]).
    pub fn connection(mut self, connection: Connection) -> Self {
        self.connection = connection;
        self
    }

    /// The monitor, with its polling thread started.
    pub fn build(self) -> Result<GuestMonitor> {
        let mut names = HashSet::new();
        for guest in &self.guests {
            if !names.insert(guest.name.as_str()) {
                return Err(Error::InvalidGuests(format!(
                    "two guests are named `{}`",
                    guest.name
                )));
            }
        }
        for guest in &self.guests {
            let mut own = HashSet::new();
            for (label, _) in &guest.labels {
                check_label(label)?;
                if !own.insert(label.as_str()) {
                    return Err(Error::InvalidGuests(format!(
                        "guest `{}` has the label `{label}` twice",
                        guest.name
                    )));
                }
            }
        }
        if self.guest_deadline.is_zero() || self.scrape_deadline.is_zero() {
            return Err(Error::InvalidGuests(
                "deadlines must be longer than zero".to_owned(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::MonitorThread)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("vmsdk-guests".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(Error::MonitorThread)?;
        Ok(GuestMonitor {
            shared: Arc::new(Shared {
                slots: self
                    .guests
                    .into_iter()
                    .map(|guest| {
                        Arc::new(Slot {
                            guest,
                            state: Mutex::new(SlotState::default()),
                        })
                    })
                    .collect(),
                guest_deadline: self.guest_deadline,
                scrape_deadline: self.scrape_deadline,
                cache: self.cache,
                connection: self.connection,
                permits: Arc::new(Semaphore::new(self.concurrency)),
                runtime: handle,
                _stop: stop,
            }),
        })
    }
}
