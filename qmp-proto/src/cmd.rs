//! Typed commands: each a marker type implementing [`Command`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::wire::QemuVersion;

/// One QMP command.
pub trait Command {
    /// The wire name, e.g. `query-status`.
    const NAME: &'static str;
    /// Arguments (`()` for commands without any).
    type Args: Serialize + Send + Sync;
    /// The value of `return`.
    type Returns: DeserializeOwned + Send;
    /// The first QEMU release that has the command, `(major, minor)`.
    const SINCE: (u32, u32);

    /// Refuses arguments the QEMU of the greeting does not accept yet, before anything is
    /// sent. Most commands accept what this crate can express on every release they have.
    fn check_arguments(_args: &Self::Args, _qemu: &QemuVersion) -> Result<()> {
        Ok(())
    }
}

/// The `{}` that commands without a result return. Extra fields are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Empty {}

use serde_json::Value;

use crate::error::Error;
use crate::types::*;
use crate::wire::VersionInfo;

fn argument_too_new(
    command: &str,
    argument: &'static str,
    qemu: &QemuVersion,
    since: (u32, u32),
    advice: Option<&'static str>,
) -> Result<()> {
    if qemu.at_least(since) {
        Ok(())
    } else {
        Err(Error::ArgumentNotSupported {
            command: command.to_owned(),
            argument,
            qemu: qemu.to_string(),
            since,
            advice,
        })
    }
}

// ---- The VM ----------------------------------------------------------------------------

command! {
    /// `query-status`: whether the VM runs, and its run state.
    QueryStatus = "query-status" (()) -> StatusInfo, since (0, 14)
}

command! {
    /// `query-version`: QEMU's version (the greeting has it too).
    QueryVersion = "query-version" (()) -> VersionInfo, since (0, 14)
}

command! {
    /// `query-commands`: the commands this QEMU has.
    QueryCommands = "query-commands" (()) -> Vec<CommandInfo>, since (0, 14)
}

command! {
    /// `stop`: pauses the vCPUs.
    Stop = "stop" (()) -> Empty, since (0, 14)
}

command! {
    /// `cont`: resumes the vCPUs (or starts a VM started with `-S`).
    Cont = "cont" (()) -> Empty, since (0, 14)
}

command! {
    /// `query-balloon`: the balloon's current size. Fails with
    /// [`ErrorClass::DeviceNotActive`](crate::ErrorClass::DeviceNotActive) without a balloon
    /// device (or its guest driver).
    QueryBalloon = "query-balloon" (()) -> BalloonInfo, since (0, 14)
}

/// Arguments of `qom-get`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QomGetArgs {
    /// The object's QOM path, e.g. `/machine/peripheral/balloon0`.
    pub path: String,
    /// The property.
    pub property: String,
}

impl QomGetArgs {
    /// Property `property` of the object at `path`.
    pub fn new(path: impl Into<String>, property: impl Into<String>) -> Self {
        QomGetArgs {
            path: path.into(),
            property: property.into(),
        }
    }

    /// The `guest-stats` property of the balloon device with id `device_id`
    /// (`-device virtio-balloon,id=…`), decoded by [`BalloonGuestStats`].
    pub fn balloon_guest_stats(device_id: &str) -> Self {
        Self::new(format!("/machine/peripheral/{device_id}"), "guest-stats")
    }
}

command! {
    /// `qom-get`: a property of a QOM object, as JSON.
    QomGet = "qom-get" (QomGetArgs) -> Value, since (1, 2)
}

/// Arguments of `human-monitor-command`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommandArgs {
    /// The HMP command line, e.g. `info block`.
    pub command_line: String,
    /// The CPU HMP commands act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<i64>,
}

impl HumanMonitorCommandArgs {
    /// Runs `command_line`.
    pub fn new(command_line: impl Into<String>) -> Self {
        HumanMonitorCommandArgs {
            command_line: command_line.into(),
            cpu_index: None,
        }
    }
}

command! {
    /// `human-monitor-command`: an HMP command and its text output. Its text is not an
    /// interface; prefer a QMP command where there is one.
    HumanMonitorCommand = "human-monitor-command" (HumanMonitorCommandArgs) -> String, since (0, 14)
}

// ---- Block nodes -------------------------------------------------------------------------

command! {
    /// `query-block`: the VM's block devices and their media.
    QueryBlock = "query-block" (()) -> Vec<BlockInfo>, since (0, 14)
}

/// Arguments of `query-named-block-nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct QueryNamedBlockNodesArgs {
    /// Leave out the backing images nested in each entry (every node is listed on its own
    /// anyway); since 5.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}

impl QueryNamedBlockNodesArgs {
    /// The flat list, as libvirt asks for it.
    pub fn flat() -> Self {
        QueryNamedBlockNodesArgs { flat: Some(true) }
    }
}

/// `query-named-block-nodes`: every named block node, with its dirty bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QueryNamedBlockNodes;

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Args = QueryNamedBlockNodesArgs;
    type Returns = Vec<BlockDeviceInfo>;
    const SINCE: (u32, u32) = (2, 0);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        if args.flat.is_some() {
            argument_too_new(
                Self::NAME,
                "flat",
                qemu,
                since::NAMED_NODES_FLAT,
                Some("leave it out; the list then nests backing images"),
            )?;
        }
        Ok(())
    }
}

/// Arguments of `query-blockstats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryBlockstatsArgs {
    /// List every named node instead of the VM's devices (since 2.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_nodes: Option<bool>,
}

command! {
    /// `query-blockstats`: I/O counters of devices or nodes.
    QueryBlockstats = "query-blockstats" (QueryBlockstatsArgs) -> Vec<BlockStats>, since (0, 14)
}

command! {
    /// `blockdev-add`: adds a block node.
    BlockdevAdd = "blockdev-add" (BlockdevOptions) -> Empty, since (2, 9)
}

/// Arguments of `blockdev-del`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockdevDelArgs {
    /// The node to remove (it must have no users).
    #[serde(rename = "node-name")]
    pub node_name: String,
}

command! {
    /// `blockdev-del`: removes a block node added with `blockdev-add`.
    BlockdevDel = "blockdev-del" (BlockdevDelArgs) -> Empty, since (2, 9)
}

/// Arguments of `blockdev-create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCreateArgs {
    /// The id of the job that does the work.
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}

command! {
    /// `blockdev-create`: starts a job that creates an image. The job never dismisses
    /// itself; [`crate::MonitorExt::run_job`] waits for it, returns its error and dismisses it.
    BlockdevCreate = "blockdev-create" (BlockdevCreateArgs) -> Empty, since (3, 0)
}

// ---- Dirty bitmaps -----------------------------------------------------------------------

/// Arguments of `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockDirtyBitmapAddArgs {
    /// The node (or device) to track.
    pub node: String,
    /// The bitmap's name, unique on the node.
    pub name: String,
    /// Bytes per bit (a power of two; QEMU picks one by default, the cluster size for qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Store it in the image (qcow2) so it survives a restart (since 2.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Create it disabled, not recording (since 4.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl BlockDirtyBitmapAddArgs {
    /// An enabled, transient bitmap `name` on `node`.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        BlockDirtyBitmapAddArgs {
            node: node.into(),
            name: name.into(),
            granularity: None,
            persistent: None,
            disabled: None,
        }
    }

    /// Sets the granularity.
    pub fn granularity(mut self, bytes: u32) -> Self {
        self.granularity = Some(bytes);
        self
    }

    /// Makes it persistent.
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = Some(on);
        self
    }

    /// Creates it disabled.
    pub fn disabled(mut self, on: bool) -> Self {
        self.disabled = Some(on);
        self
    }
}

/// `block-dirty-bitmap-add`: starts tracking writes to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockDirtyBitmapAdd;

impl Command for BlockDirtyBitmapAdd {
    const NAME: &'static str = "block-dirty-bitmap-add";
    type Args = BlockDirtyBitmapAddArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (2, 4);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        if args.persistent.is_some() {
            argument_too_new(Self::NAME, "persistent", qemu, (2, 10), None)?;
        }
        if args.disabled.is_some() {
            argument_too_new(Self::NAME, "disabled", qemu, (4, 0), None)?;
        }
        Ok(())
    }
}

/// A bitmap of a node: the arguments of `block-dirty-bitmap-remove`, `-clear`, `-enable` and
/// `-disable`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockDirtyBitmap {
    /// The node.
    pub node: String,
    /// The bitmap.
    pub name: String,
}

impl BlockDirtyBitmap {
    /// Bitmap `name` of `node`.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        BlockDirtyBitmap {
            node: node.into(),
            name: name.into(),
        }
    }
}

command! {
    /// `block-dirty-bitmap-remove`: deletes a bitmap (from the image too, if persistent).
    BlockDirtyBitmapRemove = "block-dirty-bitmap-remove" (BlockDirtyBitmap) -> Empty, since (2, 4)
}

command! {
    /// `block-dirty-bitmap-clear`: marks everything clean.
    BlockDirtyBitmapClear = "block-dirty-bitmap-clear" (BlockDirtyBitmap) -> Empty, since (2, 4)
}

command! {
    /// `block-dirty-bitmap-enable`: starts recording writes.
    BlockDirtyBitmapEnable = "block-dirty-bitmap-enable" (BlockDirtyBitmap) -> Empty, since (4, 0)
}

command! {
    /// `block-dirty-bitmap-disable`: stops recording writes.
    BlockDirtyBitmapDisable = "block-dirty-bitmap-disable" (BlockDirtyBitmap) -> Empty, since (4, 0)
}

/// Arguments of `block-dirty-bitmap-merge`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockDirtyBitmapMergeArgs {
    /// The node of the target bitmap.
    pub node: String,
    /// The bitmap that receives the union.
    pub target: String,
    /// The bitmaps to merge into it: names on `node`, or node/name pairs (since 5.0).
    pub bitmaps: Vec<BitmapRef>,
}

/// `block-dirty-bitmap-merge`: ORs bitmaps into a target bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockDirtyBitmapMerge;

impl Command for BlockDirtyBitmapMerge {
    const NAME: &'static str = "block-dirty-bitmap-merge";
    type Args = BlockDirtyBitmapMergeArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (4, 0);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        if args
            .bitmaps
            .iter()
            .any(|b| matches!(b, BitmapRef::Node { .. }))
        {
            argument_too_new(
                Self::NAME,
                "bitmaps (node/name pairs)",
                qemu,
                since::MERGE_NODE_PAIRS,
                Some("name bitmaps of the target's own node only"),
            )?;
        }
        Ok(())
    }
}

// ---- Transactions -------------------------------------------------------------------------

/// One action of a `transaction` (`TransactionAction`): all of them happen, or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TransactionAction {
    /// `block-dirty-bitmap-add` (since 2.5 in transactions).
    BlockDirtyBitmapAdd(BlockDirtyBitmapAddArgs),
    /// `block-dirty-bitmap-remove` (since 6.0 in transactions).
    BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-clear` (since 2.5).
    BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable` (since 4.0).
    BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable` (since 4.0).
    BlockDirtyBitmapDisable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-merge` (since 4.0).
    BlockDirtyBitmapMerge(BlockDirtyBitmapMergeArgs),
    /// `blockdev-backup` (since 2.3).
    BlockdevBackup(BlockdevBackupArgs),
    /// An empty action (for tests of transaction semantics).
    Abort(Empty),
}

impl TransactionAction {
    fn check(&self, qemu: &QemuVersion) -> Result<()> {
        let (name, since) = match self {
            TransactionAction::BlockDirtyBitmapAdd(a) => {
                BlockDirtyBitmapAdd::check_arguments(a, qemu)?;
                ("block-dirty-bitmap-add", (2, 5))
            }
            TransactionAction::BlockDirtyBitmapRemove(_) => ("block-dirty-bitmap-remove", (6, 0)),
            TransactionAction::BlockDirtyBitmapClear(_) => ("block-dirty-bitmap-clear", (2, 5)),
            TransactionAction::BlockDirtyBitmapEnable(_) => ("block-dirty-bitmap-enable", (4, 0)),
            TransactionAction::BlockDirtyBitmapDisable(_) => ("block-dirty-bitmap-disable", (4, 0)),
            TransactionAction::BlockDirtyBitmapMerge(a) => {
                BlockDirtyBitmapMerge::check_arguments(a, qemu)?;
                ("block-dirty-bitmap-merge", (4, 0))
            }
            TransactionAction::BlockdevBackup(a) => {
                BlockdevBackup::check_arguments(a, qemu)?;
                ("blockdev-backup", (2, 3))
            }
            TransactionAction::Abort(_) => ("abort", (1, 6)),
        };
        if qemu.at_least(since) {
            Ok(())
        } else {
            Err(Error::CommandNotSupported {
                command: format!("transaction action {name}"),
                qemu: qemu.to_string(),
                since,
            })
        }
    }
}

open_enum! {
    /// How the jobs a transaction starts complete (`ActionCompletionMode`).
    pub enum CompletionMode {
        /// Each job on its own.
        Individual => "individual",
        /// If one job fails, all are cancelled.
        Grouped => "grouped",
    }
}

/// Properties of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransactionProperties {
    /// How its jobs complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_mode: Option<CompletionMode>,
}

/// Arguments of `transaction`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TransactionArgs {
    /// The actions, applied atomically.
    pub actions: Vec<TransactionAction>,
    /// Its properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}

impl TransactionArgs {
    /// A transaction of `actions`.
    pub fn new(actions: Vec<TransactionAction>) -> Self {
        TransactionArgs {
            actions,
            properties: None,
        }
    }

    /// Adds an action.
    pub fn action(mut self, action: TransactionAction) -> Self {
        self.actions.push(action);
        self
    }
}

/// `transaction`: several block actions at one point in time, all or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Transaction;

impl Command for Transaction {
    const NAME: &'static str = "transaction";
    type Args = TransactionArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (1, 1);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        args.actions.iter().try_for_each(|a| a.check(qemu))
    }
}

// ---- Block jobs ----------------------------------------------------------------------------

open_enum! {
    /// What a backup does with a bitmap when it ends (`BitmapSyncMode`, since 4.2).
    pub enum BitmapSyncMode {
        /// Clears what was copied, if the job succeeded.
        OnSuccess => "on-success",
        /// Leaves the bitmap alone.
        Never => "never",
        /// Clears what was copied, whatever the outcome.
        Always => "always",
    }
}

/// Arguments of `blockdev-backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackupArgs {
    /// The job's id (QEMU uses `device` when none is given; always set one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The source node or device.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// The bitmap for `incremental`/`bitmap` syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What to do with `bitmap` at the end (since 4.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Compress the target (qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Rate limit, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<i64>,
    /// Whether the job finalizes itself (since 2.12; default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Whether the job disappears when it concludes (since 2.12; default true). Off keeps
    /// it, and its error, in `query-jobs` until `job-dismiss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// The node name of the filter the job inserts above the source (since 4.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
}

impl BlockdevBackupArgs {
    /// A backup job `job_id` from `device` into `target` with `sync`.
    pub fn new(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
        sync: SyncMode,
    ) -> Self {
        BlockdevBackupArgs {
            job_id: Some(job_id.into()),
            device: device.into(),
            target: target.into(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
            speed: None,
            auto_finalize: None,
            auto_dismiss: None,
            filter_node_name: None,
        }
    }

    /// Copies what `bitmap` marks (`sync` should be `incremental` or `bitmap`).
    pub fn bitmap(mut self, bitmap: impl Into<String>) -> Self {
        self.bitmap = Some(bitmap.into());
        self
    }

    /// Sets `auto-dismiss`.
    pub fn auto_dismiss(mut self, on: bool) -> Self {
        self.auto_dismiss = Some(on);
        self
    }

    /// Sets `auto-finalize`.
    pub fn auto_finalize(mut self, on: bool) -> Self {
        self.auto_finalize = Some(on);
        self
    }
}

/// `blockdev-backup`: starts a backup job from one node into another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockdevBackup;

impl Command for BlockdevBackup {
    const NAME: &'static str = "blockdev-backup";
    type Args = BlockdevBackupArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (2, 3);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        if args.auto_finalize.is_some() {
            argument_too_new(Self::NAME, "auto-finalize", qemu, (2, 12), None)?;
        }
        if args.auto_dismiss.is_some() {
            argument_too_new(Self::NAME, "auto-dismiss", qemu, (2, 12), None)?;
        }
        if args.bitmap_mode.is_some() || args.sync == SyncMode::Bitmap {
            argument_too_new(
                Self::NAME,
                "bitmap-mode/sync=bitmap",
                qemu,
                (4, 2),
                Some("use sync=incremental"),
            )?;
        }
        if args.filter_node_name.is_some() {
            argument_too_new(Self::NAME, "filter-node-name", qemu, (4, 2), None)?;
        }
        Ok(())
    }
}

/// Arguments of `block-job-cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockJobCancelArgs {
    /// The job's id.
    pub device: String,
    /// Cancel even a mirror that is ready (which otherwise completes instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

impl BlockJobCancelArgs {
    /// Cancels job `id`.
    pub fn new(id: impl Into<String>) -> Self {
        BlockJobCancelArgs {
            device: id.into(),
            force: None,
        }
    }

    /// Sets `force`.
    pub fn force(mut self, on: bool) -> Self {
        self.force = Some(on);
        self
    }
}

command! {
    /// `block-job-cancel`: stops a block job; it then concludes with `BLOCK_JOB_CANCELLED`.
    BlockJobCancel = "block-job-cancel" (BlockJobCancelArgs) -> Empty, since (1, 1)
}

/// The id of a job: the arguments of `job-dismiss`, `job-finalize` and `job-cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobId {
    /// The job's id.
    pub id: String,
}

impl JobId {
    /// Job `id`.
    pub fn new(id: impl Into<String>) -> Self {
        JobId { id: id.into() }
    }
}

command! {
    /// `query-jobs`: every job, with its error once it has concluded.
    QueryJobs = "query-jobs" (()) -> Vec<JobInfo>, since (3, 0)
}

command! {
    /// `query-block-jobs`: the block jobs (backup, mirror, commit, stream).
    QueryBlockJobs = "query-block-jobs" (()) -> Vec<BlockJobInfo>, since (1, 1)
}

command! {
    /// `job-dismiss`: removes a concluded job.
    JobDismiss = "job-dismiss" (JobId) -> Empty, since (3, 0)
}

command! {
    /// `job-finalize`: finishes a pending job (auto-finalize off).
    JobFinalize = "job-finalize" (JobId) -> Empty, since (3, 0)
}

command! {
    /// `job-cancel`: cancels any job.
    JobCancel = "job-cancel" (JobId) -> Empty, since (3, 0)
}

command! {
    /// `job-complete`: ends a `ready` job (a mirror pivots to its target, a commit of the
    /// active layer drops the committed overlay).
    JobComplete = "job-complete" (JobId) -> Empty, since (3, 0)
}

// ---- NBD exports ---------------------------------------------------------------------------

/// Where the NBD server listens (`SocketAddressLegacy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
#[non_exhaustive]
pub enum SocketAddressLegacy {
    /// A TCP address.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (a number or a service name).
        port: String,
    },
    /// A Unix socket.
    Unix {
        /// Its path.
        path: String,
    },
}

/// Arguments of `nbd-server-start`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStartArgs {
    /// Where to listen.
    pub addr: SocketAddressLegacy,
    /// The id of a `tls-creds-x509`/`tls-creds-psk` object for TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The id of an authorization object for TLS clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Most clients at once (since 5.2; 0 is unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl NbdServerStartArgs {
    /// An NBD server on the Unix socket `path`.
    pub fn unix(path: impl Into<String>) -> Self {
        Self::at(SocketAddressLegacy::Unix { path: path.into() })
    }

    /// An NBD server on `host:port`.
    pub fn inet(host: impl Into<String>, port: u16) -> Self {
        Self::at(SocketAddressLegacy::Inet {
            host: host.into(),
            port: port.to_string(),
        })
    }

    fn at(addr: SocketAddressLegacy) -> Self {
        NbdServerStartArgs {
            addr,
            tls_creds: None,
            tls_authz: None,
            max_connections: None,
        }
    }
}

/// `nbd-server-start`: starts QEMU's NBD server (one per QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NbdServerStart;

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Args = NbdServerStartArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (1, 3);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        if args.max_connections.is_some() {
            argument_too_new(
                Self::NAME,
                "max-connections",
                qemu,
                since::NBD_MAX_CONNECTIONS,
                None,
            )?;
        }
        Ok(())
    }
}

command! {
    /// `nbd-server-stop`: stops the NBD server and drops all its exports.
    NbdServerStop = "nbd-server-stop" (()) -> Empty, since (1, 3)
}

/// Arguments of `block-export-add` for an NBD export (`BlockExportOptions` with
/// `type: nbd`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAddArgs {
    /// Always `nbd` for this crate's exports.
    #[serde(rename = "type")]
    pub kind: String,
    /// The export's id.
    pub id: String,
    /// The node to export.
    pub node_name: String,
    /// Whether clients may write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// The NBD export name (default: the node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A description clients see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Dirty bitmaps to offer as `qemu:dirty-bitmap:NAME` contexts: names of the exported
    /// node's bitmaps, or node/name pairs (since 7.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapRef>>,
    /// Offer `qemu:allocation-depth` (since 5.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_depth: Option<bool>,
}

impl BlockExportAddArgs {
    /// A read-only NBD export `id` of `node_name`.
    pub fn nbd(id: impl Into<String>, node_name: impl Into<String>) -> Self {
        BlockExportAddArgs {
            kind: "nbd".to_owned(),
            id: id.into(),
            node_name: node_name.into(),
            writable: None,
            name: None,
            description: None,
            bitmaps: None,
            allocation_depth: None,
        }
    }

    /// Sets the export name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets `writable`.
    pub fn writable(mut self, on: bool) -> Self {
        self.writable = Some(on);
        self
    }

    /// Offers a dirty bitmap.
    pub fn bitmap(mut self, bitmap: impl Into<BitmapRef>) -> Self {
        self.bitmaps
            .get_or_insert_with(Vec::new)
            .push(bitmap.into());
        self
    }

    /// Sets `allocation-depth`.
    pub fn allocation_depth(mut self, on: bool) -> Self {
        self.allocation_depth = Some(on);
        self
    }
}

/// `block-export-add`: exports a node (here over NBD; needs `nbd-server-start` first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockExportAdd;

impl Command for BlockExportAdd {
    const NAME: &'static str = "block-export-add";
    type Args = BlockExportAddArgs;
    type Returns = Empty;
    const SINCE: (u32, u32) = (5, 2);

    fn check_arguments(args: &Self::Args, qemu: &QemuVersion) -> Result<()> {
        let pairs = args
            .bitmaps
            .iter()
            .flatten()
            .any(|b| matches!(b, BitmapRef::Node { .. }));
        if pairs {
            argument_too_new(
                Self::NAME,
                "bitmaps (node/name pairs)",
                qemu,
                since::EXPORT_BITMAP_PAIRS,
                Some("name bitmaps of the exported node only"),
            )?;
        }
        if args.allocation_depth.is_some() {
            argument_too_new(
                Self::NAME,
                "allocation-depth",
                qemu,
                since::EXPORT_ALLOCATION_DEPTH,
                None,
            )?;
        }
        Ok(())
    }
}

open_enum! {
    /// How `block-export-del` treats connected clients (`BlockExportRemoveMode`).
    pub enum ExportRemoveMode {
        /// Wait for clients to leave.
        Safe => "safe",
        /// Disconnect them.
        Hard => "hard",
    }
}

/// Arguments of `block-export-del`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockExportDelArgs {
    /// The export's id.
    pub id: String,
    /// How to treat connected clients (default `safe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ExportRemoveMode>,
}

impl BlockExportDelArgs {
    /// Removes export `id`.
    pub fn new(id: impl Into<String>) -> Self {
        BlockExportDelArgs {
            id: id.into(),
            mode: None,
        }
    }
}

command! {
    /// `block-export-del`: removes an export (`BLOCK_EXPORT_DELETED` follows when it is gone).
    BlockExportDel = "block-export-del" (BlockExportDelArgs) -> Empty, since (5, 2)
}

command! {
    /// `query-block-exports`: the exports.
    QueryBlockExports = "query-block-exports" (()) -> Vec<BlockExportInfo>, since (5, 2)
}

/// Every typed command's name and first release, for tools that list them.
pub const COMMANDS: &[(&str, (u32, u32))] = &[
    (QueryStatus::NAME, QueryStatus::SINCE),
    (QueryVersion::NAME, QueryVersion::SINCE),
    (QueryCommands::NAME, QueryCommands::SINCE),
    (Stop::NAME, Stop::SINCE),
    (Cont::NAME, Cont::SINCE),
    (QueryBalloon::NAME, QueryBalloon::SINCE),
    (QomGet::NAME, QomGet::SINCE),
    (HumanMonitorCommand::NAME, HumanMonitorCommand::SINCE),
    (QueryBlock::NAME, QueryBlock::SINCE),
    (QueryNamedBlockNodes::NAME, QueryNamedBlockNodes::SINCE),
    (QueryBlockstats::NAME, QueryBlockstats::SINCE),
    (BlockdevAdd::NAME, BlockdevAdd::SINCE),
    (BlockdevDel::NAME, BlockdevDel::SINCE),
    (BlockdevCreate::NAME, BlockdevCreate::SINCE),
    (BlockDirtyBitmapAdd::NAME, BlockDirtyBitmapAdd::SINCE),
    (BlockDirtyBitmapRemove::NAME, BlockDirtyBitmapRemove::SINCE),
    (BlockDirtyBitmapClear::NAME, BlockDirtyBitmapClear::SINCE),
    (BlockDirtyBitmapEnable::NAME, BlockDirtyBitmapEnable::SINCE),
    (
        BlockDirtyBitmapDisable::NAME,
        BlockDirtyBitmapDisable::SINCE,
    ),
    (BlockDirtyBitmapMerge::NAME, BlockDirtyBitmapMerge::SINCE),
    (Transaction::NAME, Transaction::SINCE),
    (BlockdevBackup::NAME, BlockdevBackup::SINCE),
    (BlockJobCancel::NAME, BlockJobCancel::SINCE),
    (QueryJobs::NAME, QueryJobs::SINCE),
    (QueryBlockJobs::NAME, QueryBlockJobs::SINCE),
    (JobDismiss::NAME, JobDismiss::SINCE),
    (JobFinalize::NAME, JobFinalize::SINCE),
    (JobCancel::NAME, JobCancel::SINCE),
    (JobComplete::NAME, JobComplete::SINCE),
    (NbdServerStart::NAME, NbdServerStart::SINCE),
    (NbdServerStop::NAME, NbdServerStop::SINCE),
    (BlockExportAdd::NAME, BlockExportAdd::SINCE),
    (BlockExportDel::NAME, BlockExportDel::SINCE),
    (QueryBlockExports::NAME, QueryBlockExports::SINCE),
];
