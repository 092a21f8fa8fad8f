//! The data types of the typed commands and events, as QEMU's schema (`qapi/*.json`) declares
//! them. Fields this crate does not model are ignored when decoding, and enum values it does
//! not know are kept in an `Other` variant, so a newer QEMU never breaks decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

open_enum! {
    /// Where a VM is in its life (`qapi/run-state.json`).
    pub enum RunState {
        /// Stopped by the debugger.
        Debug => "debug",
        /// Waiting for an incoming migration.
        Inmigrate => "inmigrate",
        /// An internal error stopped it.
        InternalError => "internal-error",
        /// An I/O error stopped it.
        IoError => "io-error",
        /// Paused (`stop`).
        Paused => "paused",
        /// Stopped after a migration.
        Postmigrate => "postmigrate",
        /// Started with `-S`, never run.
        Prelaunch => "prelaunch",
        /// Finishing a migration.
        FinishMigrate => "finish-migrate",
        /// Restoring a saved state.
        RestoreVm => "restore-vm",
        /// Running.
        Running => "running",
        /// Saving its state.
        SaveVm => "save-vm",
        /// Shut down (with `-no-shutdown`).
        Shutdown => "shutdown",
        /// Suspended (ACPI S3).
        Suspended => "suspended",
        /// Stopped by the watchdog.
        Watchdog => "watchdog",
        /// The guest panicked.
        GuestPanicked => "guest-panicked",
        /// COLO replication.
        Colo => "colo",
    }
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
    /// Single-step mode; QEMU 10.0 no longer reports it (deprecated since 8.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub singlestep: Option<bool>,
}

open_enum! {
    /// A job's state (`qapi/job.json`, since 2.12).
    pub enum JobStatus {
        /// Never seen by users.
        Undefined => "undefined",
        /// Created, not started.
        Created => "created",
        /// Running.
        Running => "running",
        /// Paused by the user or an error.
        Paused => "paused",
        /// Ready to complete (mirror, commit of the active layer).
        Ready => "ready",
        /// Paused while ready.
        Standby => "standby",
        /// Waiting for other jobs of its transaction.
        Waiting => "waiting",
        /// Done working, waiting for `job-finalize` (auto-finalize off).
        Pending => "pending",
        /// Failing or cancelled, cleaning up.
        Aborting => "aborting",
        /// Ended; waiting for `job-dismiss` (auto-dismiss off).
        Concluded => "concluded",
        /// Gone.
        Null => "null",
    }
}

impl JobStatus {
    /// Whether the job will not run any more (concluded or gone).
    pub fn is_final(&self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

open_enum! {
    /// What kind of job (`qapi/job.json`).
    pub enum JobType {
        /// `block-commit`.
        Commit => "commit",
        /// `block-stream`.
        Stream => "stream",
        /// `blockdev-mirror`/`drive-mirror`.
        Mirror => "mirror",
        /// `blockdev-backup`/`drive-backup`.
        Backup => "backup",
        /// `blockdev-create`.
        Create => "create",
        /// `x-blockdev-amend`.
        Amend => "amend",
        /// `snapshot-load`.
        SnapshotLoad => "snapshot-load",
        /// `snapshot-save`.
        SnapshotSave => "snapshot-save",
        /// `snapshot-delete`.
        SnapshotDelete => "snapshot-delete",
    }
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: JobType,
    /// Its state.
    pub status: JobStatus,
    /// Progress so far, in units of `total_progress`.
    pub current_progress: u64,
    /// The estimated whole; it may grow while the job runs.
    pub total_progress: u64,
    /// Why the job failed, once it has concluded with an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job's kind (`backup`, `mirror`, ...).
    #[serde(rename = "type")]
    pub kind: JobType,
    /// The job's id (`device` for historical reasons).
    pub device: String,
    /// The estimated total bytes.
    pub len: u64,
    /// Bytes done.
    pub offset: u64,
    /// Whether the job is doing I/O right now.
    pub busy: bool,
    /// Whether it is paused.
    pub paused: bool,
    /// Rate limit in bytes per second (0: none).
    pub speed: i64,
    /// `ok`, `failed` or `nospace`.
    pub io_status: String,
    /// Whether it is ready to complete.
    pub ready: bool,
    /// Its state.
    pub status: JobStatus,
    /// Whether it finalizes itself.
    pub auto_finalize: bool,
    /// Whether it disappears once concluded.
    pub auto_dismiss: bool,
    /// Why it failed, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A dirty bitmap as `query-named-block-nodes`/`query-block` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDirtyInfo {
    /// Its name (always set for named bitmaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether it records writes (enabled). Since 4.0.
    #[serde(default)]
    pub recording: bool,
    /// Whether an operation uses it (a backup job, an export).
    #[serde(default)]
    pub busy: bool,
    /// Whether it is stored in the image (qcow2) and survives a restart.
    #[serde(default)]
    pub persistent: bool,
    /// Whether QEMU found it inconsistent (an unclean shutdown); such a bitmap can only be
    /// removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<bool>,
}

/// The image behind a node (`ImageInfo`), as far as a client needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file name (or a `json:` pseudo-name).
    pub filename: String,
    /// The format driver.
    pub format: String,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The backing file as written in the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Whether the image is marked dirty (qcow2 lazy refcounts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
}

/// A block node (`BlockDeviceInfo`): an entry of `query-named-block-nodes` or the medium of
/// `query-block`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    /// The file name or `json:` pseudo-name.
    pub file: String,
    /// The node name (auto-generated ones start with `#block`).
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// The driver (`qcow2`, `raw`, `file`, `null-co`, ...).
    pub drv: String,
    /// The backing file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Length of the backing chain below.
    #[serde(default)]
    pub backing_file_depth: u64,
    /// Whether it is encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// The image.
    pub image: ImageInfo,
    /// Its dirty bitmaps (since 4.0 on nodes).
    #[serde(
        rename = "dirty-bitmaps",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dirty_bitmaps: Option<Vec<BlockDirtyInfo>>,
}

/// A block device of the VM (`query-block`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// The drive's id (empty for `-blockdev` devices, which have `qdev`).
    pub device: String,
    /// The device's qdev id or QOM path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// Kind (`unknown` today).
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether the medium can be removed.
    pub removable: bool,
    /// Whether the tray is locked.
    pub locked: bool,
    /// The medium, if one is inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
    /// Whether the tray is open (removable media).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tray_open: Option<bool>,
    /// `ok`, `failed` or `nospace`, when I/O status reporting is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_status: Option<String>,
}

/// I/O statistics of a device or node (`BlockDeviceStats`), the common counters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlockDeviceStats {
    /// Bytes read.
    #[serde(default)]
    pub rd_bytes: u64,
    /// Bytes written.
    #[serde(default)]
    pub wr_bytes: u64,
    /// Bytes discarded.
    #[serde(default)]
    pub unmap_bytes: u64,
    /// Read operations.
    #[serde(default)]
    pub rd_operations: u64,
    /// Write operations.
    #[serde(default)]
    pub wr_operations: u64,
    /// Flushes.
    #[serde(default)]
    pub flush_operations: u64,
    /// Discard operations.
    #[serde(default)]
    pub unmap_operations: u64,
    /// Nanoseconds spent reading.
    #[serde(default)]
    pub rd_total_time_ns: u64,
    /// Nanoseconds spent writing.
    #[serde(default)]
    pub wr_total_time_ns: u64,
    /// Nanoseconds spent flushing.
    #[serde(default)]
    pub flush_total_time_ns: u64,
    /// The highest offset written since the start.
    #[serde(default)]
    pub wr_highest_offset: u64,
    /// Failed reads.
    #[serde(default)]
    pub failed_rd_operations: u64,
    /// Failed writes.
    #[serde(default)]
    pub failed_wr_operations: u64,
}

/// An entry of `query-blockstats`; `parent` and `backing` nest the layers below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// The drive's id (empty for `-blockdev` devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The device's qdev id or QOM path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// The node.
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Its counters.
    pub stats: BlockDeviceStats,
    /// The protocol layer below the format node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Box<BlockStats>>,
    /// The backing image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<Box<BlockStats>>,
}

/// An entry of `query-block-exports` (since 5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// The export's id.
    pub id: String,
    /// Its kind (`nbd`, `fuse`, `vhost-user-blk`, `vduse-blk`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The exported node.
    pub node_name: String,
    /// Whether `block-export-del` has been called and it waits for clients to leave.
    pub shutting_down: bool,
}

/// `query-balloon`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The guest's memory in bytes as the balloon leaves it.
    pub actual: i64,
}

/// The balloon's `guest-stats` property (read with `qom-get`): the statistics the guest's
/// balloon driver last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonGuestStats {
    /// `stat-free-memory`, `stat-total-memory`, `stat-available-memory`, ... in bytes or
    /// counts, as the virtio-balloon spec names them. QEMU sends its `-1` for "not reported"
    /// as an unsigned number, [`u64::MAX`]; [`reported`](Self::reported) leaves those out.
    pub stats: BTreeMap<String, u64>,
    /// When the guest last reported, in seconds since the epoch (0: never; statistics are
    /// only polled when `guest-stats-polling-interval` is set).
    #[serde(rename = "last-update")]
    pub last_update: i64,
}

impl BalloonGuestStats {
    /// The value of statistic `name`, if the guest reported it.
    pub fn reported(&self, name: &str) -> Option<u64> {
        self.stats.get(name).copied().filter(|&v| v != u64::MAX)
    }
}

/// A command QEMU has (`query-commands`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// Its name.
    pub name: String,
}

/// Options of a block node for `blockdev-add` (`BlockdevOptions`): the driver, the node
/// name and the driver's own options. QEMU has dozens of drivers with hundreds of options;
/// this keeps them as JSON, with constructors for the common ones.
///
/// ```
/// use qmp_proto::types::BlockdevOptions;
/// let file = BlockdevOptions::file("disk0-file", "/var/lib/vm/disk0.qcow2");
/// let disk = BlockdevOptions::qcow2("disk0", "disk0-file").read_only(true);
/// assert_eq!(
///     serde_json::to_value(&disk).unwrap(),
///     serde_json::json!({"driver": "qcow2", "node-name": "disk0", "file": "disk0-file", "read-only": true})
/// );
/// # let _ = file;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockdevOptions {
    /// The driver.
    pub driver: String,
    /// The node name (always set by this crate's constructors: nodes without one are hard
    /// to address).
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Everything else, as the driver defines it.
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

impl BlockdevOptions {
    /// A node of `driver` named `node_name`, without options.
    pub fn new(driver: impl Into<String>, node_name: impl Into<String>) -> Self {
        BlockdevOptions {
            driver: driver.into(),
            node_name: Some(node_name.into()),
            options: Map::new(),
        }
    }

    /// A `file` protocol node over `filename`.
    pub fn file(node_name: impl Into<String>, filename: impl Into<String>) -> Self {
        Self::new("file", node_name).option("filename", filename.into())
    }

    /// A `qcow2` format node over the node `file`.
    pub fn qcow2(node_name: impl Into<String>, file: impl Into<String>) -> Self {
        Self::new("qcow2", node_name).option("file", file.into())
    }

    /// A `raw` format node over the node `file`.
    pub fn raw(node_name: impl Into<String>, file: impl Into<String>) -> Self {
        Self::new("raw", node_name).option("file", file.into())
    }

    /// A `null-co` node of `size` bytes (reads zeroes, drops writes): a disk for tests.
    pub fn null_co(node_name: impl Into<String>, size: u64) -> Self {
        Self::new("null-co", node_name).option("size", size)
    }

    /// Sets `read-only`.
    pub fn read_only(self, on: bool) -> Self {
        self.option("read-only", on)
    }

    /// Sets the backing node of a format node (`backing`); `None` for no backing at all.
    pub fn backing(self, node: Option<&str>) -> Self {
        self.option("backing", node.map(Value::from).unwrap_or(Value::Null))
    }

    /// Sets any other option.
    pub fn option(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.options.insert(name.to_owned(), value.into());
        self
    }
}

/// What `blockdev-create` creates (`BlockdevCreateOptions`): a driver and its options.
///
/// ```
/// use qmp_proto::types::BlockdevCreateOptions;
/// let file = BlockdevCreateOptions::file("/var/lib/vm/scratch.qcow2", 0);
/// let image = BlockdevCreateOptions::qcow2("scratch-file", 1 << 30);
/// assert_eq!(serde_json::to_value(&image).unwrap()["size"], 1u64 << 30);
/// # let _ = file;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockdevCreateOptions {
    /// The driver.
    pub driver: String,
    /// The driver's options.
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

impl BlockdevCreateOptions {
    /// Options for `driver`, to fill with [`option`](Self::option).
    pub fn new(driver: impl Into<String>) -> Self {
        BlockdevCreateOptions {
            driver: driver.into(),
            options: Map::new(),
        }
    }

    /// A host file of `size` bytes (0 for a format to fill).
    pub fn file(filename: impl Into<String>, size: u64) -> Self {
        Self::new("file")
            .option("filename", filename.into())
            .option("size", size)
    }

    /// A qcow2 image of `size` bytes on the node `file`.
    pub fn qcow2(file: impl Into<String>, size: u64) -> Self {
        Self::new("qcow2")
            .option("file", file.into())
            .option("size", size)
    }

    /// Sets any other option.
    pub fn option(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.options.insert(name.to_owned(), value.into());
        self
    }
}

/// A bitmap named by node and name, or (as a plain string) by name on the node the command
/// addresses: `BlockDirtyBitmapOrStr`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BitmapRef {
    /// A bitmap of the command's own node.
    Local(String),
    /// A bitmap of any node.
    Node {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

impl From<&str> for BitmapRef {
    fn from(name: &str) -> Self {
        BitmapRef::Local(name.to_owned())
    }
}

open_enum! {
    /// How a backup or mirror job chooses what to copy (`MirrorSyncMode`).
    pub enum SyncMode {
        /// Only the top image.
        Top => "top",
        /// Everything.
        Full => "full",
        /// Nothing up front: the old data of every area the guest overwrites (fleecing,
        /// point-in-time views).
        None => "none",
        /// What a bitmap marks (with `bitmap`, since 2.4).
        Incremental => "incremental",
        /// What a bitmap marks, with `bitmap-mode` (since 4.2).
        Bitmap => "bitmap",
    }
}

/// The releases that added the arguments the typed commands check, in one place.
pub(crate) mod since {
    /// `flat` of `query-named-block-nodes`.
    pub const NAMED_NODES_FLAT: (u32, u32) = (5, 0);
    /// `BlockDirtyBitmapOrStr` (node/name pairs) in `block-dirty-bitmap-merge`.
    pub const MERGE_NODE_PAIRS: (u32, u32) = (5, 0);
    /// Node/name pairs in `block-export-add`'s `bitmaps`.
    pub const EXPORT_BITMAP_PAIRS: (u32, u32) = (7, 1);
    /// `allocation-depth` of NBD exports.
    pub const EXPORT_ALLOCATION_DEPTH: (u32, u32) = (5, 2);
    /// `max-connections` of `nbd-server-start`.
    pub const NBD_MAX_CONNECTIONS: (u32, u32) = (5, 2);
}
