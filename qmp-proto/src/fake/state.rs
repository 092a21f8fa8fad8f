//! What the fake monitor knows: the VM's run state, the block graph (nodes whose data are
//! [`MemoryDisk`]s, with dirty bitmaps), jobs, the NBD server and its exports, the balloon, and
//! the events waiting to be sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use disk_transport::memory::MemoryDisk;
use disk_transport::Disk;
use serde_json::{json, Map, Value};

use super::release::QemuRelease;
use super::{FaultQueue, Handler};

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

/// Dirty granules as disjoint, non-touching half-open ranges `[start, end)` of granule
/// indices: a bitmap's memory grows with the number of dirty areas, not their size (a 512-byte
/// granularity bitmap merged from a 2 GiB one stays one range).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct GranuleRanges(BTreeMap<u64, u64>);

impl GranuleRanges {
    fn insert(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let touching: Vec<u64> = self.0.range(start..=end).map(|(&k, _)| k).collect();
        for k in touching {
            if let Some(e) = self.0.remove(&k) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    fn granules(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    fn last_end(&self) -> Option<u64> {
        self.0.values().next_back().copied()
    }
}

/// A dirty bitmap of a block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Its name (unique on its node).
    pub name: String,
    /// Bytes per bit: a power of two, at least 512.
    pub granularity: u64,
    /// Whether writes mark it (`disabled` is the opposite).
    pub recording: bool,
    /// Whether it is stored in the image (qcow2 only).
    pub persistent: bool,
    /// Whether an export or a job uses it (then it cannot be changed or removed).
    pub busy: bool,
    /// Whether it was not saved properly (a crash with a persistent bitmap in use).
    pub inconsistent: bool,
    pub(crate) dirty: GranuleRanges,
}

impl DirtyBitmap {
    /// The dirty byte count `query-named-block-nodes` reports: granules × granularity.
    pub fn count(&self) -> u64 {
        self.dirty.granules().saturating_mul(self.granularity)
    }

    /// The dirty ranges as `(offset, length)` in bytes, whole granules, adjacent ones merged.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.dirty
            .iter()
            .map(|(s, e)| {
                (
                    s.saturating_mul(self.granularity),
                    (e - s).saturating_mul(self.granularity),
                )
            })
            .collect()
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let g = offset / self.granularity;
        self.dirty.iter().any(|(s, e)| s <= g && g < e)
    }

    pub(crate) fn mark(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = offset.saturating_add(length - 1) / self.granularity;
        self.dirty.insert(first, last.saturating_add(1));
    }

    pub(crate) fn clear(&mut self) {
        self.dirty = GranuleRanges::default();
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("recording".into(), json!(self.recording));
        m.insert("persistent".into(), json!(self.persistent));
        m.insert("busy".into(), json!(self.busy));
        m.insert("granularity".into(), json!(self.granularity));
        m.insert("count".into(), json!(self.count()));
        if self.inconsistent {
            m.insert("inconsistent".into(), json!(true));
        }
        Value::Object(m)
    }
}

/// A block node.
#[derive(Debug, Clone)]
pub struct BlockNode {
    /// Its node name (`#blockNNN` for nodes QEMU named itself).
    pub name: String,
    /// The block driver: `qcow2`, `raw`, `file`, `null-co`, `copy-before-write`.
    pub driver: String,
    /// Whether it was opened read-only.
    pub read_only: bool,
    /// Its `file` child.
    pub file: Option<String>,
    /// Its `backing` child.
    pub backing: Option<String>,
    /// For `file` nodes: the path.
    pub filename: Option<String>,
    /// The size the guest sees.
    pub size: u64,
    /// Dirty bitmaps, oldest first (QEMU lists them newest first).
    pub bitmaps: Vec<DirtyBitmap>,
    /// One past the highest byte written through this node.
    pub wr_highest_offset: u64,
    /// The data of qcow2 and raw-over-file nodes (shared with the [`ImageFile`]).
    pub(crate) data: Option<MemoryDisk>,
    /// The options QEMU prints in `json:{...}` file names.
    pub(crate) options: Value,
    /// Named by QEMU (an implicit child), deleted with its parent.
    pub(crate) implicit: bool,
}

impl BlockNode {
    /// The bitmap called `name`.
    pub fn bitmap(&self, name: &str) -> Option<&DirtyBitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    pub(crate) fn bitmap_mut(&mut self, name: &str) -> Option<&mut DirtyBitmap> {
        self.bitmaps.iter_mut().find(|b| b.name == name)
    }
}

/// A job's status (`JobStatus` of `qapi/job.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobStatus {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused by the user.
    Paused,
    /// A mirror job that reached sync.
    Ready,
    /// Finished its work, waiting for its transaction.
    Waiting,
    /// Waiting for `job-finalize` (auto-finalize off).
    Pending,
    /// Being cancelled.
    Aborting,
    /// Done, waiting for `job-dismiss` (auto-dismiss off).
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobKind {
    /// `blockdev-backup` from `source` to `target`.
    Backup {
        /// Source node.
        source: String,
        /// Target node.
        target: String,
        /// `none`, `full`, `incremental` or `bitmap`.
        sync: String,
        /// The bitmap of an incremental backup.
        bitmap: Option<String>,
        /// The copy-before-write filter QEMU put above the source.
        filter: String,
        /// Clusters already copied to the target (copy-before-write).
        copied: BTreeSet<u64>,
    },
    /// `blockdev-create`.
    Create,
}

/// A job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// Where it is in its life.
    pub status: JobStatus,
    /// Finalize without `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: bool,
    /// Total progress (bytes).
    pub len: u64,
    /// Current progress (bytes).
    pub offset: u64,
    /// Why it failed (`Operation canceled` after a cancel).
    pub error: Option<String>,
    /// Finishes once the reply of the command that started it is sent.
    pub(crate) finish_after_reply: bool,
}

impl Job {
    pub(crate) fn type_name(&self) -> &'static str {
        match self.kind {
            JobKind::Backup { .. } => "backup",
            JobKind::Create => "create",
        }
    }

    /// Nodes the job holds.
    pub(crate) fn nodes(&self) -> Vec<&str> {
        match &self.kind {
            JobKind::Backup { source, target, .. } => vec![source, target],
            JobKind::Create => Vec::new(),
        }
    }

    pub(crate) fn is_live(&self) -> bool {
        !matches!(self.status, JobStatus::Concluded | JobStatus::Null)
    }
}

/// A block export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExport {
    /// Export id.
    pub id: String,
    /// Exported node.
    pub node: String,
    /// NBD export name.
    pub name: String,
    /// Writable export.
    pub writable: bool,
    /// Exported dirty bitmaps as `(node, bitmap)`.
    pub bitmaps: Vec<(String, String)>,
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

fn not_found(name: &str) -> QmpError {
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

/// Formats a JSON value the way QEMU prints `json:` file names (`", "` and `": "`).
fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
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

    fn auto_name(&mut self) -> String {
        let name = format!("#block{:03}", self.next_auto_node);
        self.next_auto_node += 1;
        name
    }

    // ---------------------------------------------------------------- block graph

    /// Opens a node from `blockdev-add` options (already type-checked). Children given as
    /// objects become implicit nodes. Returns the node name.
    pub(crate) fn open_node(&mut self, opts: &Map<String, Value>, top: bool) -> QResult<String> {
        let driver = opts
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = match opts.get("node-name").and_then(Value::as_str) {
            Some(n) => {
                if self.node(n).is_some() {
                    return Err(QmpError::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                if n.is_empty()
                    || n.len() > 31
                    || !n.starts_with(|c: char| c.is_ascii_alphabetic())
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    return Err(QmpError::generic(
                        "Invalid node-name: '".to_owned() + n + "'",
                    ));
                }
                (n.to_owned(), false)
            }
            None if top => {
                return Err(QmpError::generic(
                    "'node-name' must be specified for the root node",
                ))
            }
            None => (String::new(), true),
        };
        let read_only = opts
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut node = BlockNode {
            name: name.0,
            driver: driver.clone(),
            read_only,
            file: None,
            backing: None,
            filename: None,
            size: 0,
            bitmaps: Vec::new(),
            wr_highest_offset: 0,
            data: None,
            options: Value::Null,
            implicit: name.1,
        };
        let mut created_children = Vec::new();
        let result = (|| -> QResult<()> {
            let mut shown = Map::new();
            match driver.as_str() {
                "null-co" => {
                    node.size = opts.get("size").and_then(Value::as_u64).unwrap_or(1 << 30);
                    shown.insert("driver".into(), json!("null-co"));
                    if let Some(v) = opts.get("read-zeroes") {
                        shown.insert("read-zeroes".into(), v.clone());
                    }
                    shown.insert("size".into(), json!(node.size));
                }
                "file" => {
                    let path = opts
                        .get("filename")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let image = self.images.get(path).ok_or_else(|| {
                        QmpError::generic(format!(
                            "Could not open '{path}': No such file or directory"
                        ))
                    })?;
                    node.size = file_size(image);
                    node.filename = Some(path.to_owned());
                    shown.insert("driver".into(), json!("file"));
                    shown.insert("filename".into(), json!(path));
                }
                "raw" | "qcow2" => {
                    let file = self.child(opts, "file", &mut created_children)?;
                    let Some(file) = file else {
                        return Err(QmpError::generic("Parameter 'file' is missing"));
                    };
                    let file_node = self.lookup(&file)?.clone();
                    let image = file_node
                        .filename
                        .as_ref()
                        .and_then(|p| self.images.get(p).cloned());
                    if driver == "qcow2" {
                        let Some(image) = image.filter(|i| i.format == ImageFormat::Qcow2) else {
                            return Err(QmpError::generic("Image is not in qcow2 format"));
                        };
                        node.size = image.disk.capacity();
                        node.data = Some(image.disk.clone());
                        if let Some(backing) = opts.get("backing") {
                            if !backing.is_null() {
                                node.backing =
                                    self.child(opts, "backing", &mut created_children)?;
                            }
                        }
                    } else {
                        match image {
                            Some(image) if image.format == ImageFormat::Raw => {
                                node.size = image.disk.capacity();
                                node.data = Some(image.disk.clone());
                            }
                            _ => node.size = file_node.size,
                        }
                    }
                    if let Some(b) = &node.backing {
                        shown.insert("backing".into(), self.lookup(b)?.options.clone());
                    }
                    shown.insert("driver".into(), json!(driver));
                    shown.insert("file".into(), file_node.options.clone());
                    node.file = Some(file);
                }
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'driver' does not accept value '{other}'"
                    )))
                }
            }
            node.options = Value::Object(shown);
            Ok(())
        })();
        if let Err(e) = result {
            // Children opened for this node go away with it.
            self.nodes.retain(|n| !created_children.contains(&n.name));
            return Err(e);
        }
        if node.implicit {
            node.name = self.auto_name();
        }
        let name = node.name.clone();
        self.nodes.push(node);
        Ok(name)
    }

    /// A child given by reference (a node name) or inline (options of a new implicit node).
    fn child(
        &mut self,
        opts: &Map<String, Value>,
        key: &str,
        created: &mut Vec<String>,
    ) -> QResult<Option<String>> {
        match opts.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(reference)) => {
                self.lookup(reference)?;
                Ok(Some(reference.clone()))
            }
            Some(Value::Object(inline)) => {
                let name = self.open_node(inline, false)?;
                created.push(name.clone());
                Ok(Some(name))
            }
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: BlockdevRef"
            ))),
        }
    }

    /// The text of a node's `file` name as QEMU shows it.
    fn display_filename(&self, node: &BlockNode) -> String {
        match node.driver.as_str() {
            "file" => node.filename.clone().unwrap_or_default(),
            "copy-before-write" => node
                .file
                .as_deref()
                .and_then(|f| self.node(f))
                .map(|f| self.display_filename(f))
                .unwrap_or_default(),
            "qcow2" | "raw" if node.backing.is_none() => {
                let file = node.file.as_deref().and_then(|f| self.node(f));
                match file {
                    Some(f) if f.driver == "file" => self.display_filename(f),
                    _ => format!("json:{}", qemu_json(&node.options)),
                }
            }
            _ => format!("json:{}", qemu_json(&node.options)),
        }
    }

    /// Nodes that use `name` as a child, an export or a job.
    pub(crate) fn users(&self, name: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.file.as_deref() == Some(name) || n.backing.as_deref() == Some(name))
            .map(|n| n.name.clone())
            .collect()
    }

    pub(crate) fn job_holding(&self, name: &str) -> Option<&Job> {
        self.jobs
            .iter()
            .find(|j| j.is_live() && j.nodes().contains(&name))
    }

    /// `blockdev-del`.
    pub(crate) fn delete_node(&mut self, name: &str) -> QResult<()> {
        let Some(node) = self.node(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let implicit = node.implicit;
        if self.exports.iter().any(|e| e.node == name) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if self.job_holding(name).is_some() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: block device is in use by block job: backup"
            )));
        }
        if implicit {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.users(name).is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let node = self.node(name).cloned().expect("checked above");
        self.nodes.retain(|n| n.name != name);
        // Implicit children nobody else uses go with their parent.
        for child in [node.file, node.backing].into_iter().flatten() {
            let implicit = self.node(&child).is_some_and(|c| c.implicit);
            if implicit && self.users(&child).is_empty() {
                let _ = self.delete_implicit(&child);
            }
        }
        Ok(())
    }

    fn delete_implicit(&mut self, name: &str) -> QResult<()> {
        if let Some(n) = self.node_mut(name) {
            n.implicit = false;
        }
        self.delete_node(name)
    }

    /// `query-named-block-nodes` (flat: the filter nodes are listed, not nested).
    pub(crate) fn named_block_nodes(&self) -> Value {
        Value::Array(self.nodes.iter().rev().map(|n| self.node_info(n)).collect())
    }

    fn node_info(&self, n: &BlockNode) -> Value {
        let filename = self.display_filename(n);
        let mut image = Map::new();
        image.insert("virtual-size".into(), json!(n.size));
        image.insert("filename".into(), json!(filename));
        match n.driver.as_str() {
            "qcow2" | "copy-before-write" => {
                image.insert("cluster-size".into(), json!(DEFAULT_CLUSTER));
            }
            _ => {}
        }
        image.insert("format".into(), json!(n.driver));
        image.insert("actual-size".into(), json!(self.actual_size(n)));
        if n.driver == "qcow2" {
            image.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
                    "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false,
                    "extended-l2": false}}),
            );
        }
        if n.driver == "file" && self.release.file_format_specific() {
            image.insert(
                "format-specific".into(),
                json!({"type": "file", "data": {}}),
            );
        }
        if matches!(n.driver.as_str(), "qcow2" | "file" | "copy-before-write") {
            image.insert("dirty-flag".into(), json!(false));
        }
        let mut m = Map::new();
        m.insert("iops_rd".into(), json!(0));
        m.insert("detect_zeroes".into(), json!("off"));
        if self.release.has_active_flag() {
            m.insert("active".into(), json!(true));
        }
        m.insert("image".into(), Value::Object(image));
        m.insert("iops_wr".into(), json!(0));
        m.insert("ro".into(), json!(n.read_only));
        m.insert("node-name".into(), json!(n.name));
        m.insert("backing_file_depth".into(), json!(0));
        m.insert("drv".into(), json!(n.driver));
        m.insert("iops".into(), json!(0));
        m.insert("bps_wr".into(), json!(0));
        m.insert("write_threshold".into(), json!(0));
        if let Some(b) = n.backing.as_deref().and_then(|b| self.node(b)) {
            m.insert("backing_file".into(), json!(self.display_filename(b)));
        }
        if !n.bitmaps.is_empty() {
            m.insert(
                "dirty-bitmaps".into(),
                Value::Array(n.bitmaps.iter().rev().map(DirtyBitmap::to_json).collect()),
            );
        }
        m.insert("encrypted".into(), json!(false));
        m.insert("bps".into(), json!(0));
        m.insert("bps_rd".into(), json!(0));
        m.insert(
            "cache".into(),
            json!({"no-flush": false, "direct": false, "writeback": true}),
        );
        m.insert("file".into(), json!(filename));
        Value::Object(m)
    }

    /// Bytes of host storage a node takes (what `actual-size` shows).
    fn actual_size(&self, n: &BlockNode) -> u64 {
        match n.driver.as_str() {
            "null-co" => 0,
            "raw" => n
                .file
                .as_deref()
                .and_then(|f| self.node(f))
                .map_or(0, |f| self.actual_size(f)),
            _ => {
                let path = match n.driver.as_str() {
                    "file" => n.filename.clone(),
                    _ => n
                        .file
                        .as_deref()
                        .and_then(|f| self.node(f))
                        .and_then(|f| f.filename.clone()),
                };
                path.and_then(|p| self.images.get(&p))
                    .map_or(0, |i| file_size(i) + 3 * 4096)
            }
        }
    }

    /// `query-blockstats` with `query-nodes: true` (oldest node first).
    pub(crate) fn blockstats(&self) -> Value {
        Value::Array(self.nodes.iter().map(|n| self.node_stats(n)).collect())
    }

    fn node_stats(&self, n: &BlockNode) -> Value {
        let mut stats = Map::new();
        let zero_keys = [
            "unmap_operations",
            "unmap_merged",
            "flush_total_time_ns",
            "wr_total_time_ns",
            "failed_wr_operations",
            "failed_rd_operations",
            "wr_merged",
            "wr_bytes",
            "failed_unmap_operations",
            "failed_flush_operations",
            "rd_total_time_ns",
            "invalid_unmap_operations",
            "flush_operations",
            "wr_operations",
            "unmap_bytes",
            "rd_merged",
            "rd_bytes",
            "unmap_total_time_ns",
            "invalid_flush_operations",
            "rd_operations",
            "invalid_wr_operations",
            "invalid_rd_operations",
        ];
        for k in zero_keys {
            stats.insert(k.into(), json!(0));
        }
        if self.release.has_zone_stats() {
            for k in [
                "failed_zone_append_operations",
                "zone_append_merged",
                "zone_append_total_time_ns",
                "zone_append_operations",
                "zone_append_bytes",
                "invalid_zone_append_operations",
            ] {
                stats.insert(k.into(), json!(0));
            }
        }
        stats.insert("wr_highest_offset".into(), json!(n.wr_highest_offset));
        stats.insert("timed_stats".into(), json!([]));
        stats.insert("account_invalid".into(), json!(false));
        stats.insert("account_failed".into(), json!(false));
        let mut m = Map::new();
        m.insert("stats".into(), Value::Object(stats));
        m.insert("node-name".into(), json!(n.name));
        if n.driver == "file" {
            m.insert(
                "driver-specific".into(),
                json!({"discard-bytes-ok": 0, "discard-nb-ok": 0, "driver": "file",
                    "discard-nb-failed": 0}),
            );
        }
        if let Some(f) = n.file.as_deref().and_then(|f| self.node(f)) {
            m.insert("parent".into(), self.node_stats(f));
        }
        Value::Object(m)
    }

    // ---------------------------------------------------------------- data

    /// Reads what the guest of node `name` sees.
    pub(crate) fn read(&self, name: &str, buf: &mut [u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        check_range(node, offset, buf.len() as u64)?;
        match node.driver.as_str() {
            "null-co" => {
                buf.fill(0);
                Ok(())
            }
            "qcow2" => {
                let disk = node.data.as_ref().expect("qcow2 nodes have data");
                let mut pos = 0usize;
                while pos < buf.len() {
                    let at = offset + pos as u64;
                    let cluster_end = (at / DEFAULT_CLUSTER + 1) * DEFAULT_CLUSTER;
                    let n = ((cluster_end - at) as usize).min(buf.len() - pos);
                    let piece = &mut buf[pos..pos + n];
                    let allocated = disk
                        .allocated_extents(at, n as u64)
                        .map_err(io_error)?
                        .iter()
                        .any(|e| e.kind == disk_transport::ExtentKind::Data);
                    if allocated {
                        disk.read_at(piece, at).map_err(io_error)?;
                    } else if let Some(b) = &node.backing {
                        let backing_size = self.lookup(b)?.size;
                        piece.fill(0);
                        if at < backing_size {
                            let m = ((backing_size - at) as usize).min(n);
                            self.read(b, &mut piece[..m], at)?;
                        }
                    } else {
                        piece.fill(0);
                    }
                    pos += n;
                }
                Ok(())
            }
            "raw" if node.data.is_some() => node
                .data
                .as_ref()
                .expect("checked")
                .read_at(buf, offset)
                .map_err(io_error),
            "raw" | "copy-before-write" => {
                let child = node.file.clone().unwrap_or_default();
                self.read(&child, buf, offset)
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes into node `name`'s own layer (no copy-before-write, no bitmaps).
    fn write_layer(&mut self, name: &str, data: &[u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        match node.driver.as_str() {
            "qcow2" | "raw" if node.data.is_some() => node
                .data
                .as_ref()
                .expect("checked")
                .write_at(data, offset)
                .map_err(io_error),
            "raw" | "copy-before-write" => {
                let child = node.file.clone().unwrap_or_default();
                self.write_layer(&child, data, offset)
            }
            // null-co and protocol nodes of images the fake does not lay out: discarded.
            _ => Ok(()),
        }
    }

    /// A guest write to node `name`: copy-before-write for backup jobs reading it, then the
    /// data, then the recording bitmaps.
    pub(crate) fn guest_write(&mut self, name: &str, data: &[u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        // Writes through a backup's copy-before-write filter are writes to its source.
        if node.driver == "copy-before-write" {
            let source = node.file.clone().unwrap_or_default();
            return self.guest_write(&source, data, offset);
        }
        check_range(node, offset, data.len() as u64)?;
        if node.read_only {
            return Err(QmpError::generic(format!("Node '{name}' is read only")));
        }
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / DEFAULT_CLUSTER;
        let last = (offset + data.len() as u64 - 1) / DEFAULT_CLUSTER;
        let jobs: Vec<usize> = self
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| {
                j.is_live() && matches!(&j.kind, JobKind::Backup { source, .. } if source == name)
            })
            .map(|(i, _)| i)
            .collect();
        for i in jobs {
            let JobKind::Backup { target, copied, .. } = &self.jobs[i].kind else {
                continue;
            };
            let target = target.clone();
            let todo: Vec<u64> = (first..=last).filter(|c| !copied.contains(c)).collect();
            let size = self.lookup(name)?.size;
            for cluster in todo {
                let start = cluster * DEFAULT_CLUSTER;
                let len = DEFAULT_CLUSTER.min(size - start) as usize;
                let mut old = vec![0u8; len];
                self.read(name, &mut old, start)?;
                self.write_layer(&target, &old, start)?;
                if let JobKind::Backup { copied, .. } = &mut self.jobs[i].kind {
                    copied.insert(cluster);
                }
            }
        }
        self.write_layer(name, data, offset)?;
        let node = self.node_mut(name).expect("looked up above");
        for b in node.bitmaps.iter_mut().filter(|b| b.recording) {
            b.mark(offset, data.len() as u64);
        }
        node.wr_highest_offset = node.wr_highest_offset.max(offset + data.len() as u64);
        Ok(())
    }

    // ---------------------------------------------------------------- bitmaps

    pub(crate) fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> QResult<()> {
        let n = self.lookup(node)?;
        if name.is_empty() {
            return Err(QmpError::generic("Bitmap name cannot be empty"));
        }
        if name.len() > 1023 {
            return Err(QmpError::generic("Bitmap name is too long"));
        }
        let granularity = granularity.unwrap_or(DEFAULT_CLUSTER);
        if granularity < 512 || !granularity.is_power_of_two() || granularity > 1 << 31 {
            return Err(QmpError::generic(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        if n.bitmap(name).is_some() {
            return Err(QmpError::generic(format!("Bitmap already exists: {name}")));
        }
        if persistent && n.driver != "qcow2" {
            return Err(QmpError::generic(format!(
                "Can't store persistent bitmaps to {node}: Operation not supported"
            )));
        }
        let n = self.node_mut(node).expect("looked up above");
        n.bitmaps.push(DirtyBitmap {
            name: name.to_owned(),
            granularity,
            recording: !disabled,
            persistent,
            busy: false,
            inconsistent: false,
            dirty: GranuleRanges::default(),
        });
        Ok(())
    }

    /// The node of an existing bitmap (`block_dirty_bitmap_lookup`'s text when missing).
    fn bitmap_node(&self, node: &str) -> QResult<&BlockNode> {
        self.node(node)
            .ok_or_else(|| QmpError::generic(format!("Node '{node}' not found")))
    }

    /// Looks up a bitmap that may be changed (exists, not busy, consistent).
    fn bitmap_for_change(&mut self, node: &str, name: &str) -> QResult<&mut DirtyBitmap> {
        self.bitmap_node(node)?;
        let b = self
            .node_mut(node)
            .expect("looked up above")
            .bitmap_mut(name)
            .ok_or_else(|| bitmap_missing(name))?;
        if b.busy {
            return Err(bitmap_busy(name));
        }
        if b.inconsistent {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
            )));
        }
        Ok(b)
    }

    pub(crate) fn bitmap_remove(&mut self, node: &str, name: &str) -> QResult<()> {
        self.bitmap_node(node)?;
        let b = self
            .node(node)
            .and_then(|n| n.bitmap(name))
            .ok_or_else(|| bitmap_missing(name))?;
        if b.busy {
            return Err(bitmap_busy(name));
        }
        let n = self.node_mut(node).expect("looked up above");
        n.bitmaps.retain(|b| b.name != name);
        Ok(())
    }

    pub(crate) fn bitmap_clear(&mut self, node: &str, name: &str) -> QResult<()> {
        self.bitmap_for_change(node, name)?.clear();
        Ok(())
    }

    pub(crate) fn bitmap_enable(&mut self, node: &str, name: &str, on: bool) -> QResult<()> {
        self.bitmap_for_change(node, name)?.recording = on;
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: `sources` are `(node, name)`.
    pub(crate) fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[(String, String)],
    ) -> QResult<()> {
        self.bitmap_for_change(node, target)?;
        let mut ranges = Vec::new();
        for (src_node, src_name) in sources {
            let n = self.bitmap_node(src_node)?;
            let b = n.bitmap(src_name).ok_or_else(|| bitmap_missing(src_name))?;
            ranges.extend(b.dirty_ranges());
        }
        let b = self.bitmap_for_change(node, target)?;
        for (off, len) in ranges {
            b.mark(off, len);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- jobs

    pub(crate) fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    pub(crate) fn set_status(&mut self, id: &str, status: JobStatus) {
        if let Some(j) = self.job_mut(id) {
            j.status = status;
        }
        self.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"status": status.as_str(), "id": id})),
        );
    }

    fn block_job_event(&mut self, name: &str, id: &str) {
        let Some(j) = self.job(id) else { return };
        let mut data = json!({"device": id, "len": j.len, "offset": j.offset, "speed": 0,
            "type": j.type_name()});
        if let (Some(e), "BLOCK_JOB_COMPLETED") = (&j.error, name) {
            data["error"] = json!(e);
        }
        self.emit(name, Some(data));
    }

    /// Verb check with QEMU's text.
    pub(crate) fn job_verb(&self, id: &str, verb: &str, allowed: &[JobStatus]) -> QResult<()> {
        let j = self
            .job(id)
            .ok_or_else(|| QmpError::generic("Job not found"))?;
        if !allowed.contains(&j.status) {
            return Err(QmpError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb '{verb}'",
                j.status.as_str()
            )));
        }
        Ok(())
    }

    /// Starts `blockdev-backup` (arguments checked). Sync `none` keeps running with
    /// copy-before-write until cancelled; the others copy now and complete.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_backup(
        &mut self,
        id: &str,
        source: &str,
        target: &str,
        sync: &str,
        bitmap: Option<&str>,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> QResult<()> {
        let src = self.lookup(source)?.clone();
        let tgt = self.lookup(target)?.clone();
        if let Some(j) = self.job(id) {
            let _ = j;
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        if src.size != tgt.size {
            return Err(QmpError::generic(
                "Source and target image have different sizes",
            ));
        }
        if self.job_holding(target).is_some() {
            return Err(QmpError::generic(format!(
                "Node '{target}' is busy: block device is in use by block job: backup"
            )));
        }
        match (sync, bitmap) {
            ("incremental" | "bitmap", None) => {
                return Err(QmpError::generic(format!(
                    "must provide a valid bitmap name for '{sync}' sync mode"
                )))
            }
            (_, Some(b)) if src.bitmap(b).is_none() => {
                return Err(QmpError::generic(format!(
                    "Bitmap '{b}' could not be found"
                )))
            }
            (_, Some(b)) if src.bitmap(b).is_some_and(|b| b.busy) => return Err(bitmap_busy(b)),
            _ => {}
        }
        let filter = self.auto_name();
        self.nodes.push(BlockNode {
            name: filter.clone(),
            driver: "copy-before-write".into(),
            read_only: false,
            file: Some(source.to_owned()),
            backing: None,
            filename: None,
            size: src.size,
            bitmaps: Vec::new(),
            wr_highest_offset: 0,
            data: None,
            options: json!({"driver": "copy-before-write", "file": src.options}),
            implicit: true,
        });
        self.jobs.push(Job {
            id: id.to_owned(),
            kind: JobKind::Backup {
                source: source.to_owned(),
                target: target.to_owned(),
                sync: sync.to_owned(),
                bitmap: bitmap.map(str::to_owned),
                filter,
                copied: BTreeSet::new(),
            },
            status: JobStatus::Created,
            auto_finalize,
            auto_dismiss,
            len: src.size,
            offset: 0,
            error: None,
            finish_after_reply: false,
        });
        self.set_status(id, JobStatus::Created);
        self.set_status(id, JobStatus::Running);
        if let Some(b) = bitmap {
            if let Some(bm) = self.node_mut(source).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = true;
            }
        }
        if sync != "none" {
            self.run_backup_copy(id)?;
            self.complete_job(id);
        }
        Ok(())
    }

    /// The clusters of node `name` (through its children and backing chain) that hold data;
    /// everything else reads as zeros. Bounded by the memory the data takes.
    fn allocated_clusters(&self, name: &str, out: &mut BTreeSet<u64>) -> QResult<()> {
        let node = self.lookup(name)?;
        if let Some(disk) = &node.data {
            for e in disk
                .allocated_extents(0, disk.capacity())
                .map_err(io_error)?
                .iter()
                .filter(|e| e.kind == disk_transport::ExtentKind::Data)
            {
                out.extend(e.offset / DEFAULT_CLUSTER..e.end().div_ceil(DEFAULT_CLUSTER));
            }
        } else if matches!(node.driver.as_str(), "raw" | "copy-before-write") {
            if let Some(child) = node.file.clone() {
                self.allocated_clusters(&child, out)?;
            }
        }
        if let Some(b) = node.backing.clone() {
            self.allocated_clusters(&b, out)?;
        }
        Ok(())
    }

    /// Copies what a full or incremental backup copies: for `full`, every cluster that holds
    /// data in the source or the target (the rest reads as zeros on both sides); for
    /// `incremental`/`bitmap`, what the bitmap marks.
    fn run_backup_copy(&mut self, id: &str) -> QResult<()> {
        let Some(Job {
            kind:
                JobKind::Backup {
                    source,
                    target,
                    sync,
                    bitmap,
                    ..
                },
            len,
            ..
        }) = self.job(id).cloned()
        else {
            return Ok(());
        };
        let clusters: Vec<(u64, u64)> = match (&*sync, &bitmap) {
            ("incremental" | "bitmap", Some(b)) => self
                .node(&source)
                .and_then(|n| n.bitmap(b))
                .map(|b| b.dirty_ranges())
                .unwrap_or_default()
                .into_iter()
                .flat_map(|(off, l)| {
                    let end = off.saturating_add(l).min(len);
                    (off / DEFAULT_CLUSTER..end.div_ceil(DEFAULT_CLUSTER))
                        .map(|c| (c, 0))
                        .collect::<Vec<_>>()
                })
                .collect(),
            _ => {
                let mut set = BTreeSet::new();
                self.allocated_clusters(&source, &mut set)?;
                self.allocated_clusters(&target, &mut set)?;
                set.into_iter().map(|c| (c, 0)).collect()
            }
        };
        let mut copied = 0u64;
        for (cluster, _) in clusters {
            let start = cluster * DEFAULT_CLUSTER;
            if start >= len {
                continue;
            }
            let n = DEFAULT_CLUSTER.min(len - start);
            let mut buf = vec![0u8; n as usize];
            self.read(&source, &mut buf, start)?;
            self.write_layer(&target, &buf, start)?;
            copied += n;
        }
        if let Some(j) = self.job_mut(id) {
            if sync == "full" {
                j.offset = j.len;
            } else {
                j.offset = copied;
                j.len = copied;
            }
        }
        Ok(())
    }

    /// waiting → pending → (finalize) → completed/concluded → null.
    fn complete_job(&mut self, id: &str) {
        self.set_status(id, JobStatus::Waiting);
        self.set_status(id, JobStatus::Pending);
        let auto_finalize = self.job(id).is_some_and(|j| j.auto_finalize);
        if auto_finalize {
            self.finalize_job(id);
        } else {
            let ty = self.job(id).map(Job::type_name).unwrap_or("backup");
            self.emit("BLOCK_JOB_PENDING", Some(json!({"type": ty, "id": id})));
        }
    }

    /// Finalizes a pending job: a successful incremental backup clears its bitmap.
    pub(crate) fn finalize_job(&mut self, id: &str) {
        let Some(job) = self.job(id).cloned() else {
            return;
        };
        if let JobKind::Backup {
            source,
            bitmap: Some(b),
            sync,
            ..
        } = &job.kind
        {
            if let Some(bm) = self.node_mut(source).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = false;
                if sync == "incremental" {
                    bm.clear();
                }
            }
        }
        if matches!(job.kind, JobKind::Backup { .. }) {
            self.block_job_event("BLOCK_JOB_COMPLETED", id);
        }
        self.conclude(id);
    }

    fn conclude(&mut self, id: &str) {
        if let Some(JobKind::Backup { filter, .. }) = self.job(id).map(|j| j.kind.clone()) {
            self.nodes.retain(|n| n.name != filter);
        }
        self.set_status(id, JobStatus::Concluded);
        if self.job(id).is_some_and(|j| j.auto_dismiss) {
            self.dismiss(id);
        }
    }

    pub(crate) fn dismiss(&mut self, id: &str) {
        self.set_status(id, JobStatus::Null);
        self.jobs.retain(|j| j.id != id);
    }

    /// `block-job-cancel` / `job-cancel` of a running job.
    pub(crate) fn cancel_job(&mut self, id: &str) {
        if let Some(JobKind::Backup {
            source,
            bitmap: Some(b),
            ..
        }) = self.job(id).map(|j| j.kind.clone())
        {
            if let Some(bm) = self.node_mut(&source).and_then(|n| n.bitmap_mut(&b)) {
                bm.busy = false;
            }
        }
        self.set_status(id, JobStatus::Aborting);
        if let Some(j) = self.job_mut(id) {
            j.error = Some("Operation canceled".into());
        }
        if matches!(self.job(id).map(|j| &j.kind), Some(JobKind::Backup { .. })) {
            self.block_job_event("BLOCK_JOB_CANCELLED", id);
        }
        self.conclude(id);
    }

    /// `blockdev-create`: `file` makes an empty raw image, `qcow2` formats a file node's
    /// image. The job finishes after the reply, as QEMU's coroutine does.
    pub(crate) fn start_create(&mut self, id: &str, options: &Map<String, Value>) -> QResult<()> {
        if self.job(id).is_some() {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        let driver = options.get("driver").and_then(Value::as_str).unwrap_or("");
        let size = options.get("size").and_then(Value::as_u64).unwrap_or(0);
        match driver {
            "file" => {
                let path = options
                    .get("filename")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                self.add_image(path, ImageFormat::Raw, MemoryDisk::new(size));
            }
            "qcow2" => {
                let file = options.get("file").and_then(Value::as_str).unwrap_or("");
                let node = self.lookup(file)?;
                let Some(path) = node.filename.clone() else {
                    return Err(QmpError::generic(format!(
                        "fake monitor: blockdev-create of qcow2 needs a 'file' node ({file} is {})",
                        node.driver
                    )));
                };
                self.add_image(path, ImageFormat::Qcow2, MemoryDisk::new(size));
            }
            other => {
                return Err(QmpError::generic(format!(
                    "fake monitor: blockdev-create for driver '{other}' is not modelled"
                )))
            }
        }
        self.jobs.push(Job {
            id: id.to_owned(),
            kind: JobKind::Create,
            status: JobStatus::Created,
            auto_finalize: true,
            auto_dismiss: false,
            len: 1,
            offset: 0,
            error: None,
            finish_after_reply: true,
        });
        self.set_status(id, JobStatus::Created);
        self.set_status(id, JobStatus::Running);
        Ok(())
    }

    /// Work QEMU does after the reply is sent: jobs that run in the background finish.
    pub(crate) fn after_reply(&mut self) {
        let ids: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| j.finish_after_reply && j.status == JobStatus::Running)
            .map(|j| j.id.clone())
            .collect();
        for id in ids {
            if let Some(j) = self.job_mut(&id) {
                j.finish_after_reply = false;
                j.offset = j.len;
            }
            self.complete_job(&id);
        }
    }

    pub(crate) fn jobs_json(&self) -> Value {
        Value::Array(
            self.jobs
                .iter()
                .rev()
                .map(|j| {
                    let mut m = Map::new();
                    m.insert("current-progress".into(), json!(j.offset));
                    m.insert("status".into(), json!(j.status.as_str()));
                    m.insert("total-progress".into(), json!(j.len));
                    m.insert("type".into(), json!(j.type_name()));
                    m.insert("id".into(), json!(j.id));
                    if let Some(e) = &j.error {
                        m.insert("error".into(), json!(e));
                    }
                    Value::Object(m)
                })
                .collect(),
        )
    }

    pub(crate) fn block_jobs_json(&self) -> Value {
        Value::Array(
            self.jobs
                .iter()
                .rev()
                .filter(|j| matches!(j.kind, JobKind::Backup { .. }))
                .map(|j| {
                    json!({"auto-finalize": j.auto_finalize, "io-status": "ok", "device": j.id,
                        "auto-dismiss": j.auto_dismiss, "busy": false, "len": j.len,
                        "offset": j.offset, "status": j.status.as_str(), "paused": false,
                        "speed": 0, "ready": false, "type": j.type_name()})
                })
                .collect(),
        )
    }

    // ---------------------------------------------------------------- exports

    /// `block-export-add` of type `nbd` (arguments checked).
    pub(crate) fn export_add(
        &mut self,
        id: &str,
        node: &str,
        name: Option<&str>,
        writable: bool,
        bitmaps: &[String],
    ) -> QResult<()> {
        if self.exports.iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        if self.node(node).is_none() {
            return Err(QmpError::generic(format!(
                "Cannot find device='' nor node-name='{node}'"
            )));
        }
        if self.nbd_server.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let name = name.unwrap_or(node);
        if name.len() > 4096 {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        if self.exports.iter().any(|e| e.name == name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let mut found = Vec::new();
        for b in bitmaps {
            // The bitmap may live on the node or anywhere down its backing chain.
            let mut cur = Some(node.to_owned());
            let mut hit = None;
            while let Some(n) = cur {
                let Some(nd) = self.node(&n) else { break };
                if nd.bitmap(b).is_some() {
                    hit = Some(n.clone());
                    break;
                }
                cur = nd.backing.clone().or_else(|| {
                    (nd.driver == "raw" || nd.driver == "copy-before-write")
                        .then(|| nd.file.clone())
                        .flatten()
                });
            }
            let Some(owner) = hit else {
                return Err(QmpError::generic(format!("Bitmap '{b}' is not found")));
            };
            let bm = self
                .node(&owner)
                .and_then(|n| n.bitmap(b))
                .expect("found above");
            if bm.busy || bm.inconsistent {
                return Err(bitmap_busy(b));
            }
            if !writable && bm.recording {
                return Err(QmpError::generic(format!(
                    "Enabled bitmap '{b}' incompatible with readonly export"
                )));
            }
            found.push((owner, b.clone()));
        }
        for (owner, b) in &found {
            if let Some(bm) = self.node_mut(owner).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = true;
            }
        }
        self.exports.push(BlockExport {
            id: id.to_owned(),
            node: node.to_owned(),
            name: name.to_owned(),
            writable,
            bitmaps: found,
        });
        Ok(())
    }

    pub(crate) fn export_del(&mut self, id: &str) -> QResult<()> {
        let Some(pos) = self.exports.iter().position(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let export = self.exports.remove(pos);
        for (owner, b) in &export.bitmaps {
            if let Some(bm) = self.node_mut(owner).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = false;
            }
        }
        self.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
        Ok(())
    }

    pub(crate) fn exports_json(&self) -> Value {
        Value::Array(
            self.exports
                .iter()
                .rev()
                .map(|e| {
                    json!({"node-name": e.node, "shutting-down": false, "type": "nbd", "id": e.id})
                })
                .collect(),
        )
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

fn check_range(node: &BlockNode, offset: u64, len: u64) -> QResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= node.size => Ok(()),
        _ => Err(QmpError::generic(format!(
            "Request of {len} bytes at offset {offset} is beyond the end of node '{}' ({} bytes)",
            node.name, node.size
        ))),
    }
}

fn io_error(e: disk_transport::Error) -> QmpError {
    QmpError::generic(format!("Input/output error: {e}"))
}

/// Size of an image file: raw images are their data; qcow2 ones a header, tables and the
/// allocated clusters (an approximation; QEMU's exact layout is not modelled).
fn file_size(image: &ImageFile) -> u64 {
    match image.format {
        ImageFormat::Raw => image.disk.capacity(),
        ImageFormat::Qcow2 => 3 * DEFAULT_CLUSTER + image.disk.allocated_bytes(),
    }
}
