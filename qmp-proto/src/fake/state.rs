//! What the fake monitor knows: the VM's run state, the block graph (nodes whose data are
//! [`MemoryDisk`]s, with dirty bitmaps), jobs, the NBD server and its exports, the balloon, and
//! the events waiting to be sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use disk_transport::memory::MemoryDisk;
use serde_json::Value;

use super::release::QemuRelease;
use super::{FaultQueue, Handler};

pub use super::bitmap::DirtyBitmap;
pub use super::export::BlockExport;
pub use super::graph::BlockNode;
pub use super::jobs::{Job, JobKind, JobStatus};

/// QEMU's cluster size for new qcow2 images and the default bitmap granularity.
pub const DEFAULT_CLUSTER: u64 = 64 * 1024;

/// Events kept for connections that have not read them yet; older ones are dropped (a
/// monitor that never reads cannot make the fake grow without bound).
pub(crate) const EVENT_BACKLOG: usize = 4096;

/// The VM's run state, as `query-status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// Started with `-S`, never run (`cont` starts it).
    Prelaunch,
    /// Running.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest shut down (QEMU started with `-no-shutdown`).
    Shutdown,
    /// The guest is suspended to RAM.
    Suspended,
    /// The guest panicked.
    GuestPanicked,
    /// Stopped on an I/O error.
    IoError,
    /// Stopped on an internal error (e.g. KVM failure).
    InternalError,
    /// Finished an outgoing migration.
    Postmigrate,
}

impl RunState {
    /// The wire name (`prelaunch`, `running`, `paused`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::GuestPanicked => "guest-panicked",
            RunState::IoError => "io-error",
            RunState::InternalError => "internal-error",
            RunState::Postmigrate => "postmigrate",
        }
    }
}

/// How an image file the fake knows is formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// qcow2 (compat 1.1, zlib, 16-bit refcounts, as `qemu-img create -f qcow2` makes it).
    Qcow2,
}

/// An image file on the fake's "file system": a `file` node opens it by path. For a qcow2
/// image `disk` holds what the guest sees (the fake does not lay out clusters).
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// The format written in the file.
    pub format: ImageFormat,
    /// The guest-visible contents.
    pub disk: MemoryDisk,
}

/// The virtio balloon device.
#[derive(Debug, Clone, PartialEq)]
pub struct Balloon {
    /// The QOM path of the device (`/machine/peripheral/balloon0` for `id=balloon0`).
    pub path: String,
    /// Guest memory size in bytes (`query-balloon`'s `actual`).
    pub actual: u64,
    /// The guest's statistics; a statistic missing here reads as `u64::MAX` ("not
    /// reported"), as QEMU shows it before the guest driver reports.
    pub stats: BTreeMap<String, u64>,
    /// When the guest last reported (seconds since the epoch; 0: never).
    pub last_update: u64,
    /// The `guest-stats-polling-interval` property (seconds; 0: off).
    pub polling_interval: u64,
}

/// One event waiting for delivery: a sequence number, name and data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingEvent {
    pub seq: u64,
    pub name: String,
    pub data: Option<Value>,
}

/// The fake monitor's state; lock it with [`super::FakeMonitor::state`].
#[derive(Clone)]
pub struct FakeState {
    /// The release the fake imitates.
    pub release: QemuRelease,
    /// The VM's run state.
    pub run_state: RunState,
    /// The balloon device, if the VM has one.
    pub balloon: Option<Balloon>,
    /// Commands received, in order (also those refused).
    pub requests: Vec<String>,
    pub(crate) nodes: Vec<BlockNode>,
    pub(crate) images: BTreeMap<String, ImageFile>,
    pub(crate) jobs: Vec<Job>,
    pub(crate) nbd_server: Option<Value>,
    /// Whether `nbd-server-start` really listens ([`super::FakeMonitorBuilder::serve_nbd`]).
    pub(crate) serve_nbd: bool,
    /// The listening server, when it does.
    pub(crate) nbd_listener: Option<std::sync::Arc<super::nbd::NbdListener>>,
    /// This state's own handle, for the NBD server's connections.
    pub(crate) me: Option<std::sync::Weak<std::sync::Mutex<FakeState>>>,
    pub(crate) exports: Vec<BlockExport>,
    pub(crate) events: VecDeque<PendingEvent>,
    pub(crate) next_event: u64,
    pub(crate) next_auto_node: u32,
    pub(crate) faults: FaultQueue,
    pub(crate) handlers: BTreeMap<String, Handler>,
}

impl fmt::Debug for FakeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeState")
            .field("release", &self.release)
            .field("run_state", &self.run_state)
            .field("nodes", &self.nodes)
            .field("images", &self.images.keys().collect::<Vec<_>>())
            .field("jobs", &self.jobs)
            .field("nbd_server", &self.nbd_server)
            .field("exports", &self.exports)
            .field("balloon", &self.balloon)
            .field("pending_events", &self.events.len())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A block-layer error with QEMU's class and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub(crate) fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

pub(crate) type QResult<T> = Result<T, QmpError>;

pub(crate) fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// The text QEMU gives for an operation on a bitmap in use.
pub(crate) fn bitmap_busy(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}

/// The text for a bitmap that is not there.
pub(crate) fn bitmap_missing(name: &str) -> QmpError {
    QmpError::generic(format!("Dirty bitmap '{name}' not found"))
}

impl FakeState {
    /// A VM in `prelaunch` with no block nodes.
    pub fn new(release: QemuRelease) -> Self {
        FakeState {
            release,
            run_state: RunState::Prelaunch,
            balloon: None,
            requests: Vec::new(),
            nodes: Vec::new(),
            images: BTreeMap::new(),
            jobs: Vec::new(),
            nbd_server: None,
            serve_nbd: false,
            nbd_listener: None,
            me: None,
            exports: Vec::new(),
            events: VecDeque::new(),
            next_event: 0,
            next_auto_node: 100,
            faults: FaultQueue::new(),
            handlers: BTreeMap::new(),
        }
    }

    /// The block nodes, oldest first.
    pub fn nodes(&self) -> &[BlockNode] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&BlockNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub(crate) fn node_mut(&mut self, name: &str) -> Option<&mut BlockNode> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// The jobs, oldest first (dismissed ones are gone).
    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    /// The block exports.
    pub fn exports(&self) -> &[BlockExport] {
        &self.exports
    }

    /// The NBD server's address (`nbd-server-start`'s `addr`), if it runs.
    pub fn nbd_server(&self) -> Option<&Value> {
        self.nbd_server.as_ref()
    }

    /// Adds an image file that `file` nodes can open at `path`.
    pub fn add_image(&mut self, path: impl Into<String>, format: ImageFormat, disk: MemoryDisk) {
        self.images.insert(path.into(), ImageFile { format, disk });
    }

    /// The image file at `path`.
    pub fn image(&self, path: &str) -> Option<&ImageFile> {
        self.images.get(path)
    }

    /// Queues an event for every negotiated connection (`data` omitted when `None`).
    pub fn emit(&mut self, name: &str, data: Option<Value>) {
        self.events.push_back(PendingEvent {
            seq: self.next_event,
            name: name.to_owned(),
            data,
        });
        self.next_event += 1;
        while self.events.len() > EVENT_BACKLOG {
            self.events.pop_front();
        }
    }

    pub(crate) fn lookup(&self, name: &str) -> QResult<&BlockNode> {
        self.node(name).ok_or_else(|| not_found(name))
    }

    pub(crate) fn auto_name(&mut self) -> String {
        let name = format!("#block{:03}", self.next_auto_node);
        self.next_auto_node += 1;
        name
    }

    /// Checks the fake's own invariants (for property tests): unique names, children and
    /// users that exist, busy bitmaps that something uses, bitmap bits inside the disk.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for n in &self.nodes {
            if !names.insert(&n.name) {
                return Err(format!("duplicate node {}", n.name));
            }
            for child in [&n.file, &n.backing].into_iter().flatten() {
                if self.node(child).is_none() {
                    return Err(format!("{} has missing child {child}", n.name));
                }
            }
            let mut bitmap_names = BTreeSet::new();
            for b in &n.bitmaps {
                if !bitmap_names.insert(&b.name) {
                    return Err(format!("duplicate bitmap {} on {}", b.name, n.name));
                }
                if b.granularity < 512 || !b.granularity.is_power_of_two() {
                    return Err(format!("bad granularity {}", b.granularity));
                }
                let granules = n.size.div_ceil(b.granularity);
                if b.dirty.last_end().is_some_and(|end| end > granules) {
                    return Err(format!("bitmap {} has bits past the end", b.name));
                }
                let used = self
                    .exports
                    .iter()
                    .any(|e| e.bitmaps.iter().any(|(o, x)| *o == n.name && *x == b.name))
                    || self.jobs.iter().any(|j| {
                        j.is_live()
                            && matches!(&j.kind, JobKind::Backup { source, bitmap: Some(x), .. }
                                if *source == n.name && *x == b.name)
                    });
                if b.busy != used {
                    return Err(format!("bitmap {} busy={} but used={used}", b.name, b.busy));
                }
                if b.persistent && n.driver != "qcow2" {
                    return Err(format!("persistent bitmap on {}", n.driver));
                }
            }
        }
        for e in &self.exports {
            if self.node(&e.node).is_none() {
                return Err(format!("export {} of a missing node", e.id));
            }
        }
        for j in self.jobs.iter().filter(|j| j.is_live()) {
            for n in j.nodes() {
                if self.node(n).is_none() {
                    return Err(format!("job {} holds missing node {n}", j.id));
                }
            }
        }
        if !self.exports.is_empty() && self.nbd_server.is_none() {
            return Err("exports without an NBD server".into());
        }
        Ok(())
    }
}
