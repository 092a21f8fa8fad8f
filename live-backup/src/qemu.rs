//! The QEMU backup source: QMP to take the point in time, NBD to read it.
//!
//! # The point in time: fleecing with `blockdev-backup sync=none`
//!
//! [`begin`](BackupSource::begin) runs ONE QMP `transaction` holding, for every disk:
//!
//! 1. `block-dirty-bitmap-add` of the new checkpoint on the disk's node (persistent: stored
//!    in the qcow2 image when the VM stops, so incremental backups survive a restart);
//! 2. for an incremental backup, `block-dirty-bitmap-add` of a non-persistent, disabled
//!    export bitmap on the scratch node, and `block-dirty-bitmap-merge` of the previous
//!    checkpoint into it (the changes between the previous checkpoint and this moment, frozen);
//! 3. `blockdev-backup sync=none` from the disk into a scratch qcow2 overlay whose backing is
//!    the disk: from this moment, before the guest overwrites a cluster, QEMU copies the old
//!    contents into the scratch image, so the scratch node reads as the disk at the moment.
//!
//! Every action of a transaction takes effect at one instant for all disks, so the views and
//! the checkpoints of every disk are of the same moment. This is libvirt's pull-mode backup.
//! The newer `copy-before-write` + `snapshot-access` fleecing (QEMU ≥ 7.0, as qmpbackup and
//! Proxmox use it) needs the filter inserted with `blockdev-add` and `qom-set` (or
//! `blockdev-reopen`), which are not transaction actions: the checkpoint would then not be
//! atomic with the view unless the guest were paused. `blockdev-backup` is a transaction
//! action on every QEMU since 2.12 and QEMU inserts the same copy-before-write filter itself.
//!
//! The scratch node is exported read-only over NBD on a Unix socket in the scratch
//! directory, with the export bitmap for incremental backups (QEMU 7.2 and 10.0 refuse an
//! *enabled* bitmap on a read-only export, hence the disabled copy), and read with
//! disk-transport's NBD client and copy engine.
//!
//! # A scratch filesystem that runs full
//!
//! The scratch image grows by the old contents of every cluster the guest overwrites while the
//! backup reads. The copy-before-write filter `blockdev-backup` inserts fails the *guest's*
//! write when it cannot save the old data (its `on-cbw-error` is `break-guest-write`, and
//! `blockdev-backup` has no way to set it): a guest write then fails with `ENOSPC`, and a
//! device with the default `werror=enospc` stops the VM. The view itself stays right (the
//! write never reached the disk). Verified on QEMU 7.2 and 10.0 with a tmpfs as the scratch
//! directory (`tests/tests/backup_scratch_full.rs`: a `qemu-io` write is missing from the
//! disk afterwards; a guest's write through its virtio-blk device, from a boot sector, stops
//! the VM with `io-error`).
//!
//! vmsdk keeps `blockdev-backup` (its checkpoint and view atomic in one transaction) and
//! guards the VM around it:
//! - before anything is made, a scratch filesystem with less free space than
//!   [`min_scratch_free`](QemuSource::min_scratch_free) is refused with
//!   [`Error::ScratchFull`];
//! - while the backup reads, [`BackupSession::watch`] (called on every progress report, about
//!   every 50 ms, and once more before the point is stored) looks at the scratch
//!   filesystem's free space and at the events of the session (`BLOCK_IO_ERROR` with
//!   `nospace` on one of its disks or on the filter the job put above it, named
//!   `vmsdk-cbw-N`, which is the device's root node while the job runs; its backup jobs
//!   failing or ending); when the free space
//!   falls below [`scratch_reserve`](QemuSource::scratch_reserve) or such an event came, it
//!   gives the views up at once: the exports removed (hard: QEMU drops the connections),
//!   the backup jobs
//!   cancelled (their filters leave the disks, so the guest's next and retried writes
//!   succeed), and a VM that ran when the backup began and stopped on an I/O error since is
//!   continued (`cont`) when that error can only have been the scratch space's: every I/O
//!   error event of the session was an ENOSPC on one of its disks, and the scratch
//!   filesystem is below its reserve. A VM stopped by another device's error, by an error
//!   other than ENOSPC, or by its disk's own storage running full is left stopped for its
//!   owner, and the backup's error says so. Every later `watch` answers the same, and the
//!   backup checks it once more after the last read, so a point whose views were given up is
//!   never stored, whatever a read in flight returned: the backup fails with
//!   [`Error::ScratchFull`], removes what it made, and the chain stays as it was.
//!
//! The reserve lets vmsdk act before the guest sees an error in the common case (a scratch
//! filesystem filling gradually); a burst of guest writes larger than the reserve between two
//! looks still fails those writes, and they are then retried by the guest (or, with
//! `werror=enospc`, the VM is continued once the filter is gone).
//!
//! The alternative, `copy-before-write` with `on-cbw-error=break-snapshot` and
//! `snapshot-access` (QEMU ≥ 7.1), never fails a guest write, but its insertion (`blockdev-add`
//! and a `qom-set` of each device's drive) is not a transaction action: the checkpoint and the
//! views of several disks would no longer be one moment unless the VM were paused around the
//! insertion. A backup that pauses the VM, or whose checkpoint may miss writes, is worse than
//! one that gives up cleanly when its scratch space runs out.
//!
//! # The end, and crashes
//!
//! [`finish`](BackupSession::finish) and [`abort`](BackupSession::abort) (and drop) remove the
//! exports and stop the NBD server, cancel and dismiss the jobs, delete the scratch nodes and
//! their files; abort also removes the new checkpoint. Everything this source makes in QEMU
//! is named `vmsdk-…`: exports `vmsdk-exp-N`, jobs `vmsdk-job-N` (and
//! `vmsdk-create-N`, the scratch images' `blockdev-create` jobs of earlier versions),
//! nodes `vmsdk-sc-N` (scratch) and `vmsdk-sf-N` (its file), so
//! [`cleanup`](BackupSource::cleanup) finds what a killed backup left and removes it; it runs
//! at the start of every backup too. A failed backup never touches the guest's own nodes
//! except for adding and removing its checkpoint bitmap: the VM keeps running with writable
//! disks.
//!
//! ## Half-made checkpoints
//!
//! The transaction also adds, per disk, a *pending marker*: a disabled persistent bitmap
//! named after the checkpoint with `~pending` (`vmsdk-CHAIN-N~pending`, the coarsest
//! granularity, so a few bits). Being in the same transaction, it exists exactly when the
//! checkpoint does; being persistent, it survives with it a clean restart of the VM.
//! [`data_written`](BackupSession::data_written), called once the point's images are
//! written and synced and just before its manifest is stored, removes it. So `cleanup`
//! recognises a checkpoint a killed backup left half-made without the backup directory (a
//! checkpoint with its marker; it removes both, and markers left alone), and never removes a
//! stored one: a backup killed between the marker's removal and the manifest's rename (a
//! rename and a directory sync) leaves an unmarked checkpoint, which the next backup into
//! the directory (or `cleanup` with it) removes as one no point records. Removing a
//! checkpoint removes the checkpoint first and the marker second, so an interruption never
//! makes a pending checkpoint look stored. [`checkpoints`](BackupSource::checkpoints) does not
//! list markers.
//!
//! ## A backup still running
//!
//! `cleanup` must not destroy a backup in progress (its views, its not yet stored
//! checkpoint). A session holds its scratch directory's lock file (`vmsdk.lock`, a POSIX
//! record lock, dropped by the kernel when the process dies) from `begin` to its end;
//! `cleanup` takes the lock of its own scratch directory and of every directory holding a
//! `vmsdk-sc-N` node's file, and fails with [`Error::Busy`] when one is held, touching
//! nothing; `begin` fails the same way, so two backups of one VM through one scratch
//! directory never run at once. (QEMU serves one client per monitor: on a VM with a single
//! QMP socket a second vmsdk cannot even connect while a backup holds it; the lock matters
//! for VMs with several monitors.)
//!
//! Every command goes through qmp-proto's typed commands ([`qmp_proto::MonitorExt::call`]),
//! checked against the QEMU version of the greeting before it is sent, and the jobs it
//! cancels are followed with its job helper. Only `query-name`,
//! `query-uuid`, `qom-list`, `object-add` and `object-del`, which qmp-proto has no typed
//! form of, are sent with `execute_raw`.
//!
//! One scratch directory per VM: it holds the scratch images and the NBD socket, and the
//! QEMU process must be able to write the scratch images, which this process creates (0600,
//! empty qcow2 images made with disk-transport's qcow2 writer) and QEMU opens with
//! `blockdev-add`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disk_transport::qcow2::{CreateOptions, Qcow2Disk};
use disk_transport::{Disk, DiskUri, OpenFlags};
use qmp_proto::cmd::{
    BlockDirtyBitmap, BlockDirtyBitmapAddArgs, BlockDirtyBitmapMergeArgs, BlockDirtyBitmapRemove,
    BlockExportAdd, BlockExportAddArgs, BlockExportDel, BlockExportDelArgs, BlockdevAdd,
    BlockdevBackupArgs, BlockdevDel, BlockdevDelArgs, Command, Cont, ExportRemoveMode, JobCancel,
    JobDismiss, JobId, NbdServerStart, NbdServerStartArgs, NbdServerStop, QueryBlock,
    QueryBlockExports, QueryJobs, QueryNamedBlockNodes, QueryNamedBlockNodesArgs, QueryStatus,
    Transaction, TransactionAction, TransactionArgs,
};
use qmp_proto::types::{
    BitmapRef, BlockDeviceInfo, BlockDirtyInfo, BlockExportInfo, BlockdevOptions, JobInfo, JobType,
    RunState, SyncMode,
};
use qmp_proto::{EventFilter, JobOptions, Monitor, MonitorExt, SubscriptionId};
use serde_json::{json, Value};
use std::sync::{Mutex, MutexGuard};

use crate::manifest::{ensure_private_dir, set_private};
use crate::quiesce::{FreezeWindow, Quiesce};
use crate::source::{
    BackupSession, BackupSource, BeginRequest, Checkpoint, CheckpointDisk, CleanupReport,
    Consistency, SessionDisk, SourceDisk, VmIdentity, CHECKPOINT_PREFIX,
};
use crate::{Error, Result};

/// The id of the TLS credentials object of the NBD server.
const TLS_OBJECT: &str = "vmsdk-tls";
/// The export bitmap's name on a scratch node.
const EXPORT_BITMAP: &str = "vmsdk-export";
/// The NBD socket's file name in the scratch directory.
const SOCKET: &str = "nbd.sock";
/// A checkpoint's pending marker is named after it with this suffix (see the module docs).
const PENDING_SUFFIX: &str = "~pending";
/// The granularity of a pending marker: the coarsest QEMU allows (it never records anything
/// that matters, so a few bits per disk are enough).
const MARKER_GRANULARITY: u32 = 1 << 31;
/// The lock file of a scratch directory, held while a backup through it runs.
const LOCK_FILE: &str = "vmsdk.lock";
/// [`QemuSource::min_scratch_free`]'s default.
const DEFAULT_MIN_SCRATCH_FREE: u64 = 16 << 20;
/// [`QemuSource::scratch_reserve`]'s default.
const DEFAULT_SCRATCH_RESERVE: u64 = 1 << 20;
/// The events a session watches: a guest write that failed (and the VM stopped on it), a
/// backup job that failed or ended on its own.
const WATCHED_EVENTS: [&str; 5] = [
    "BLOCK_IO_ERROR",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "STOP",
];

/// The pending marker of `checkpoint`.
fn pending_marker(checkpoint: &str) -> String {
    format!("{checkpoint}{PENDING_SUFFIX}")
}

/// Takes the lock of scratch directory `dir` (its `vmsdk.lock`, created 0600): held by a
/// backup session from `begin` to its end, and by `cleanup` while it runs. The kernel drops
/// it when its holder dies, so a killed backup's is free.
///
/// A POSIX record lock (`fcntl(F_SETLK)`), which belongs to the process: it keeps other
/// processes' backups and cleanups out, and a process never locks itself out (a session it
/// leaked, `std::mem::forget` standing in for a killed process in tests, is cleaned up by the
/// same process as a killed one would be).
fn lock_scratch(dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match rustix::fs::fcntl_lock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::ACCESS) => Err(Error::Busy {
            dir: dir.to_owned(),
        }),
        Err(e) => Err(Error::io("lock", &path, e.into())),
    }
}

/// The free bytes of the filesystem holding `dir` (for an unprivileged writer).
fn free_space(dir: &Path) -> Result<u64> {
    let stat = rustix::fs::statvfs(dir).map_err(|e| Error::io("statvfs", dir, e.into()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn scratch_node(i: usize) -> String {
    format!("vmsdk-sc-{i}")
}
fn scratch_file_node(i: usize) -> String {
    format!("vmsdk-sf-{i}")
}
fn backup_job(i: usize) -> String {
    format!("vmsdk-job-{i}")
}
/// The copy-before-write filter backup job `i` inserts above its disk: the devices' root
/// node while the job runs, so the node their I/O errors name.
fn filter_node(i: usize) -> String {
    format!("vmsdk-cbw-{i}")
}
fn export_id(i: usize) -> String {
    format!("vmsdk-exp-{i}")
}
fn scratch_file_name(i: usize) -> String {
    format!("vmsdk-scratch-{i}.qcow2")
}

/// A running QEMU, backed up through its monitor (any [`qmp_proto::Monitor`]: a
/// [`qmp_proto::Client`] on its QMP socket, or a test double). See the [module docs](self).
pub struct QemuSource<M: Monitor> {
    monitor: M,
    scratch_dir: PathBuf,
    tls: Option<TlsDirs>,
    job_timeout: Duration,
    nbd_timeout: Duration,
    min_scratch_free: u64,
    scratch_reserve: u64,
    /// The VM's name and UUID, asked once: they are fixed for the life of a QEMU process.
    identity: Option<VmIdentity>,
}

/// Where the certificates of NBD over TLS are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsDirs {
    /// QEMU's: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    server: PathBuf,
    /// Ours, as libnbd lays it out: `ca-cert.pem` (and a client certificate if QEMU asks).
    client: PathBuf,
    /// The name the server certificate must carry.
    hostname: String,
}

impl<M: Monitor> fmt::Debug for QemuSource<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuSource")
            .field("qemu", &self.monitor.greeting().version.qemu.to_string())
            .field("scratch_dir", &self.scratch_dir)
            .finish()
    }
}

impl QemuSource<qmp_proto::Client> {
    /// Connects to the QMP socket at `address` (`qmp+unix:///run/vm1.qmp`,
    /// `qmp+tcp://127.0.0.1:4444`); scratch images and the NBD socket go to `scratch_dir`.
    pub fn connect(address: &str, scratch_dir: impl Into<PathBuf>) -> Result<Self> {
        let client = qmp_proto::Client::connect(address, qmp_proto::ClientConfig::default())
            .map_err(|e| Error::Monitor {
                command: format!("connect to {address}"),
                message: e.to_string(),
            })?;
        Ok(QemuSource::new(client, scratch_dir))
    }
}

impl<M: Monitor> QemuSource<M> {
    /// A source driving `monitor`; scratch images and the NBD socket go to `scratch_dir`
    /// (created 0700; one directory per VM).
    pub fn new(monitor: M, scratch_dir: impl Into<PathBuf>) -> Self {
        QemuSource {
            monitor,
            scratch_dir: scratch_dir.into(),
            tls: None,
            job_timeout: Duration::from_secs(60),
            nbd_timeout: Duration::from_secs(30),
            min_scratch_free: DEFAULT_MIN_SCRATCH_FREE,
            scratch_reserve: DEFAULT_SCRATCH_RESERVE,
            identity: None,
        }
    }

    /// The free space the scratch filesystem must have for a backup to begin (default
    /// 16 MiB): less is refused with [`Error::ScratchFull`] before anything is made. What a
    /// backup really needs there is the old contents of every cluster the guest overwrites
    /// while it reads, which nobody knows beforehand; this only refuses the obviously too
    /// small.
    pub fn min_scratch_free(mut self, bytes: u64) -> Self {
        self.min_scratch_free = bytes;
        self
    }

    /// The free space below which a running backup gives its views up (default 1 MiB),
    /// before the guest's writes would fail for want of scratch space (see the
    /// [module docs](self)).
    pub fn scratch_reserve(mut self, bytes: u64) -> Self {
        self.scratch_reserve = bytes;
        self
    }

    /// Serves the views over TLS when a backup asks for it (`BackupOptions::tls`):
    /// QEMU's NBD server takes X.509 credentials from `server_dir` (`ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`, as QEMU's `tls-creds-x509` reads them, on QEMU's
    /// side of the machine), and the reads verify its certificate for `hostname` with the CA
    /// in `client_dir` (`ca-cert.pem`, as libnbd lays it out).
    pub fn tls_certificates(
        mut self,
        server_dir: impl Into<PathBuf>,
        client_dir: impl Into<PathBuf>,
        hostname: impl Into<String>,
    ) -> Self {
        self.tls = Some(TlsDirs {
            server: server_dir.into(),
            client: client_dir.into(),
            hostname: hostname.into(),
        });
        self
    }

    /// The longest wait for a block job to start or end (default 60 s).
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// The NBD client's per-request timeout for reading the views (default 30 s).
    pub fn nbd_timeout(mut self, timeout: Duration) -> Self {
        self.nbd_timeout = timeout;
        self
    }

    /// The monitor, for anything else.
    pub fn monitor(&mut self) -> &mut M {
        &mut self.monitor
    }

    /// The scratch directory.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// Sends typed command `C`; qmp-proto checks it against the QEMU of the greeting first
    /// (the command's first release and its arguments'), so a too-old QEMU gets a clear
    /// error before anything is sent.
    fn call<C: Command>(&mut self, args: &C::Args) -> Result<C::Returns> {
        self.monitor
            .call::<C>(args)
            .map_err(|e| monitor_error(C::NAME, e))
    }

    /// A command qmp-proto has no typed form of (`query-name`, `query-uuid`, `qom-list`,
    /// `object-add`, `object-del`): sent as JSON, its reply read as JSON.
    fn raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.monitor
            .execute_raw(command, arguments)
            .map_err(|e| monitor_error(command, e))
    }

    /// `query-named-block-nodes`: every node with its bitmaps; flat (without the backing
    /// chains nested in each entry) where the QEMU of the greeting has `flat` (5.0).
    fn nodes(&mut self) -> Result<Vec<BlockDeviceInfo>> {
        let args = if self.monitor.greeting().version.qemu.at_least((5, 0)) {
            QueryNamedBlockNodesArgs::flat()
        } else {
            QueryNamedBlockNodesArgs::default()
        };
        self.call::<QueryNamedBlockNodes>(&args)
    }

    fn node<'a>(nodes: &'a [BlockDeviceInfo], name: &str) -> Option<&'a BlockDeviceInfo> {
        nodes.iter().find(|n| n.node_name.as_deref() == Some(name))
    }

    fn bitmap<'a>(node: &'a BlockDeviceInfo, name: &str) -> Option<&'a BlockDirtyInfo> {
        node.dirty_bitmaps
            .as_ref()?
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
    }

    fn jobs(&mut self) -> Result<Vec<JobInfo>> {
        self.call::<QueryJobs>(&())
    }

    fn exports(&mut self) -> Result<Vec<BlockExportInfo>> {
        self.call::<QueryBlockExports>(&())
    }

    fn job_options(&self) -> JobOptions {
        JobOptions::default().timeout(self.job_timeout)
    }

    /// Waits until job `id` is concluded (or gone), polling `query-jobs`; returns its error,
    /// if it had one. For jobs this session did not start and follow from their events (a
    /// killed backup's), whose events are long gone.
    fn wait_job(&mut self, id: &str) -> Result<Option<String>> {
        let deadline = Instant::now() + self.job_timeout;
        loop {
            let job = self.jobs()?.into_iter().find(|j| j.id == id);
            match job {
                None => return Ok(None),
                Some(job) if job.status.is_final() => return Ok(job.error),
                Some(job) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Monitor {
                            command: format!("job {id}"),
                            message: format!("still {} after {:?}", job.status, self.job_timeout),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Cancels (if running), waits for and dismisses job `id`; a job that is gone is fine.
    fn end_job(&mut self, id: &str) -> Result<()> {
        let job = self.jobs()?.into_iter().find(|j| j.id == id);
        self.end_known_job(id, job)
    }

    /// [`end_job`](Self::end_job) of job `id` whose entry of a `query-jobs` just made is
    /// `job` (`None`: gone), so that ending several jobs costs one query.
    fn end_known_job(&mut self, id: &str, job: Option<JobInfo>) -> Result<()> {
        let Some(mut job) = job else {
            return Ok(());
        };
        if !job.status.is_final() {
            let options = self.job_options();
            // qmp-proto's job helper cancels and follows the job to its end from the events,
            // and dismisses it.
            let cancel = if job.kind == JobType::Create {
                self.monitor
                    .run_job(id, &options, |m| {
                        m.call::<JobCancel>(&JobId::new(id)).map(drop)
                    })
                    .map(drop)
            } else {
                self.monitor.cancel_block_job(id, &options)
            };
            match cancel {
                // Followed to its end and dismissed by the helper: nothing is left of it.
                Ok(()) | Err(qmp_proto::Error::JobCancelled { .. }) => return Ok(()),
                // It may have concluded on its own meanwhile, or failed while cancelled: what
                // is left of it is dismissed below.
                Err(e) => tracing::debug!("cancelling job {id}: {e}"),
            }
            match self.jobs()?.into_iter().find(|j| j.id == id) {
                Some(now) => job = now,
                None => return Ok(()),
            }
        }
        if !job.status.is_final() {
            self.wait_job(id)?;
        }
        if job.status != qmp_proto::types::JobStatus::Null {
            self.call::<JobDismiss>(&JobId::new(id))?;
        }
        Ok(())
    }

    /// Deletes node `name`, retrying while an export or job lets go of it.
    fn delete_node(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let del = BlockdevDelArgs {
                node_name: name.to_owned(),
            };
            match self.call::<BlockdevDel>(&del) {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let nodes = self.nodes()?;
                    if Self::node(&nodes, name).is_none() {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Removes what a session with `count` disks made: exports, the NBD server (and its TLS
    /// credentials when it served `tls`), jobs, scratch nodes and files. Every step is tried;
    /// the first error is returned. Also returns the nodes as they were before the scratch
    /// nodes went (the disks' bitmaps, for the caller; empty when the query failed).
    fn teardown(&mut self, count: usize, tls: bool) -> (Result<Vec<String>>, Vec<BlockDeviceInfo>) {
        let mut removed = Vec::new();
        let mut first_error = None;
        let mut note = |r: Result<()>, what: String, removed: &mut Vec<String>| match r {
            Ok(()) => removed.push(what),
            Err(e) => {
                tracing::warn!("teardown: {what}: {e}");
                first_error.get_or_insert(e);
            }
        };
        let exports = self.exports().unwrap_or_default();
        for i in 0..count {
            let id = export_id(i);
            if exports.iter().any(|x| x.id == id) {
                let r = self.delete_export(&id);
                note(r, format!("export {id}"), &mut removed);
            }
        }
        if let Err(e) = self.call::<NbdServerStop>(&()) {
            tracing::debug!("nbd-server-stop: {e}");
        }
        if tls {
            // Its removal failing is no error: a failed begin may not have made it.
            // (`object-del` has no typed form in qmp-proto.)
            let _ = self.raw("object-del", Some(json!({ "id": TLS_OBJECT })));
        }
        let _ = std::fs::remove_file(self.scratch_dir.join(SOCKET));
        match self.jobs() {
            Ok(jobs) => {
                for i in 0..count {
                    let id = backup_job(i);
                    let job = jobs.iter().find(|j| j.id == id).cloned();
                    let r = self.end_known_job(&id, job);
                    note(r, format!("job {id}"), &mut removed);
                }
            }
            Err(e) => note(Err(e), "query-jobs".into(), &mut removed),
        }
        let nodes = self.nodes().unwrap_or_default();
        for i in 0..count {
            // The file node was made inside the qcow2 node's `blockdev-add` and goes with it;
            // alone (no qcow2 node above it) it is deleted itself.
            let node = [scratch_node(i), scratch_file_node(i)]
                .into_iter()
                .find(|node| Self::node(&nodes, node).is_some());
            if let Some(node) = node {
                let r = self.delete_node(&node);
                note(r, format!("scratch node {node}"), &mut removed);
            }
            let file = self.scratch_dir.join(scratch_file_name(i));
            if file.exists() {
                let r = std::fs::remove_file(&file).map_err(|e| Error::io("remove", &file, e));
                note(r, format!("file {}", file.display()), &mut removed);
            }
        }
        let result = match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        };
        (result, nodes)
    }

    /// Removes export `id`, disconnecting its clients.
    fn delete_export(&mut self, id: &str) -> Result<()> {
        let mut del = BlockExportDelArgs::new(id);
        del.mode = Some(ExportRemoveMode::Hard);
        self.call::<BlockExportDel>(&del).map(drop)
    }

    /// Creates scratch image `i` of `size` bytes on top of `disk`: an empty qcow2 made here
    /// (0600, without a backing file: QEMU is given the disk as its backing node), opened by
    /// one `blockdev-add` of the qcow2 node with its file node inside. Made here rather than
    /// by QEMU's `blockdev-create`, which costs a `blockdev-add` of the file node and a job
    /// followed from its events (subscribe, create, the job's events, query-jobs, dismiss),
    /// a few milliseconds before every backup's moment.
    fn add_scratch(&mut self, i: usize, disk: &str, size: u64) -> Result<()> {
        let path = self.scratch_dir.join(scratch_file_name(i));
        let _ = std::fs::remove_file(&path);
        let filename = path.to_string_lossy().into_owned();
        drop(
            Qcow2Disk::create(&path, &CreateOptions::new(size))
                .map_err(|e| Error::disk(format!("create the scratch image {filename}"), e))?,
        );
        set_private(&path, 0o600)?;
        let file = json!({
            "driver": "file",
            "node-name": scratch_file_node(i),
            "filename": filename,
        });
        self.call::<BlockdevAdd>(
            &BlockdevOptions::new("qcow2", scratch_node(i))
                .option("file", file)
                .backing(Some(disk)),
        )?;
        Ok(())
    }

    /// The part of `begin` after the checks; on error the caller tears down.
    fn begin_inner(
        &mut self,
        request: &BeginRequest,
        disks: &[SessionDisk],
        granularities: &[Option<u32>],
        quiesce: Option<&mut dyn Quiesce>,
    ) -> Result<(Consistency, Vec<String>)> {
        ensure_private_dir(&self.scratch_dir)?;
        let free = free_space(&self.scratch_dir)?;
        if free < self.min_scratch_free {
            return Err(Error::ScratchFull {
                dir: self.scratch_dir.clone(),
                problem: format!(
                    "has {free} bytes free, less than the {} a backup needs to begin \
                     (QemuSource::min_scratch_free)",
                    self.min_scratch_free
                ),
            });
        }
        for (i, disk) in disks.iter().enumerate() {
            self.add_scratch(i, &disk.node, disk.size)?;
        }
        let mut actions = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            actions.push(TransactionAction::BlockDirtyBitmapAdd(
                BlockDirtyBitmapAddArgs::new(&disk.node, &request.checkpoint).persistent(true),
            ));
            actions.push(TransactionAction::BlockDirtyBitmapAdd(
                BlockDirtyBitmapAddArgs::new(&disk.node, pending_marker(&request.checkpoint))
                    .persistent(true)
                    .disabled(true)
                    .granularity(MARKER_GRANULARITY),
            ));
            if let Some(since) = &request.since {
                let mut add = BlockDirtyBitmapAddArgs::new(scratch_node(i), EXPORT_BITMAP)
                    .persistent(false)
                    .disabled(true);
                if let Some(g) = granularities[i] {
                    add = add.granularity(g);
                }
                actions.push(TransactionAction::BlockDirtyBitmapAdd(add));
                actions.push(TransactionAction::BlockDirtyBitmapMerge(
                    BlockDirtyBitmapMergeArgs {
                        node: scratch_node(i),
                        target: EXPORT_BITMAP.to_owned(),
                        bitmaps: vec![BitmapRef::Node {
                            node: disk.node.clone(),
                            name: since.clone(),
                        }],
                    },
                ));
            }
            let mut backup =
                BlockdevBackupArgs::new(backup_job(i), &disk.node, scratch_node(i), SyncMode::None)
                    .auto_finalize(true)
                    .auto_dismiss(false);
            backup.filter_node_name = Some(filter_node(i));
            actions.push(TransactionAction::BlockdevBackup(backup));
        }
        // Checked against the greeting's version before the guest is frozen: a QEMU without
        // one of the actions (or node/name pairs in the merge, 5.0) is refused up front.
        let transaction = TransactionArgs::new(actions);
        qmp_proto::check_command::<Transaction>(self.monitor.greeting(), &transaction)
            .map_err(|e| monitor_error(Transaction::NAME, e))?;
        // The moment: the guest frozen around the transaction only.
        let window = FreezeWindow::enter(quiesce);
        let result = self.call::<Transaction>(&transaction);
        let (frozen, warnings) = window.leave();
        result?;

        let socket = self.scratch_dir.join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        // nbd-server-start takes the legacy address form (`data` wrapped), on 7.2 and 10.0.
        let mut start = NbdServerStartArgs::unix(socket.to_string_lossy());
        if request.tls {
            let tls = self.tls.clone().ok_or_else(|| {
                Error::Source(
                    "TLS was asked for, but the QEMU source has no certificates \
                     (QemuSource::tls_certificates)"
                        .into(),
                )
            })?;
            // `object-add`/`object-del` have no typed form in qmp-proto (their arguments are
            // every QOM type's properties).
            let _ = self.raw("object-del", Some(json!({ "id": TLS_OBJECT })));
            self.raw(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": TLS_OBJECT,
                       "dir": tls.server.to_string_lossy(), "endpoint": "server",
                       "verify-peer": false})),
            )?;
            start.tls_creds = Some(TLS_OBJECT.to_owned());
        }
        if let Err(e) = self.call::<NbdServerStart>(&start) {
            if !e.to_string().contains("already running") {
                return Err(e);
            }
            // A server left by a killed backup serves nobody: stop it and start ours. One
            // with exports of someone else's is not ours to stop.
            let foreign: Vec<String> = self
                .exports()?
                .into_iter()
                .map(|x| x.id)
                .filter(|id| !id.starts_with(CHECKPOINT_PREFIX))
                .collect();
            if !foreign.is_empty() {
                return Err(Error::Monitor {
                    command: "nbd-server-start".into(),
                    message: format!(
                        "{e}; QEMU's NBD server is running with exports that are not \
                         vmsdk's ({}): QEMU has one NBD server, stop them first",
                        foreign.join(", ")
                    ),
                });
            }
            self.call::<NbdServerStop>(&())?;
            self.call::<NbdServerStart>(&start)?;
        }
        for (i, disk) in disks.iter().enumerate() {
            let mut export = BlockExportAddArgs::nbd(export_id(i), scratch_node(i))
                .name(&disk.node)
                .writable(false);
            if request.since.is_some() {
                export = export.bitmap(EXPORT_BITMAP);
            }
            self.call::<BlockExportAdd>(&export)?;
        }
        Ok((Consistency::from_frozen(frozen), warnings))
    }
}

impl<M: Monitor> BackupSource for QemuSource<M> {
    fn vm(&mut self) -> Result<VmIdentity> {
        if let Some(identity) = &self.identity {
            return Ok(identity.clone());
        }
        // `query-name` and `query-uuid` have no typed form in qmp-proto.
        let name = self.raw("query-name", None);
        let uuid = self.raw("query-uuid", None);
        let answered = name.is_ok() && uuid.is_ok();
        let identity = VmIdentity {
            name: name
                .ok()
                .and_then(|v| v["name"].as_str().map(str::to_owned)),
            uuid: uuid
                .ok()
                .and_then(|v| v["UUID"].as_str().map(str::to_owned))
                .filter(|u| u != "00000000-0000-0000-0000-000000000000"),
            hypervisor: format!("qemu {}", self.monitor.greeting().version.qemu),
        };
        if answered {
            self.identity = Some(identity.clone());
        }
        Ok(identity)
    }

    fn disks(&mut self) -> Result<Vec<SourceDisk>> {
        let devices = self.call::<QueryBlock>(&())?;
        let mut disks = Vec::new();
        for device in &devices {
            let Some(inserted) = &device.inserted else {
                continue; // an empty drive (a CD-ROM without a medium)
            };
            let Some(node) = inserted.node_name.as_deref() else {
                continue;
            };
            if inserted.ro {
                continue; // read-only media hold nothing a backup must keep
            }
            if inserted.drv == "copy-before-write" {
                let device = device
                    .qdev
                    .as_deref()
                    .or((!device.device.is_empty()).then_some(device.device.as_str()));
                return Err(Error::Source(format!(
                    "a backup job runs on {} (its copy-before-write filter {node} sits on the \
                     disk): another backup is running, or one was killed and `cleanup` has not \
                     run yet",
                    device.unwrap_or(node)
                )));
            }
            let image = &inserted.image;
            disks.push(SourceDisk {
                node: node.to_owned(),
                size: image.virtual_size,
                format: image.format.clone(),
                file: Some(image.filename.clone()),
            });
        }
        Ok(disks)
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        let mut found: Vec<Checkpoint> = Vec::new();
        for node in self.nodes()? {
            let Some(node_name) = node.node_name.as_deref() else {
                continue;
            };
            if node_name.starts_with(CHECKPOINT_PREFIX) {
                continue; // our scratch nodes carry export bitmaps, not checkpoints
            }
            for bitmap in node.dirty_bitmaps.iter().flatten() {
                let Some(name) = bitmap.name.as_deref() else {
                    continue;
                };
                if !name.starts_with(CHECKPOINT_PREFIX) || name.ends_with(PENDING_SUFFIX) {
                    continue;
                }
                let disk = CheckpointDisk {
                    node: node_name.to_owned(),
                    recording: bitmap.recording,
                    persistent: bitmap.persistent,
                    inconsistent: bitmap.inconsistent.unwrap_or(false),
                    busy: bitmap.busy,
                    granularity: bitmap.granularity,
                };
                match found.iter_mut().find(|c| c.name == name) {
                    Some(c) => {
                        if !c.disks.iter().any(|d| d.node == disk.node) {
                            c.disks.push(disk)
                        }
                    }
                    None => found.push(Checkpoint {
                        name: name.to_owned(),
                        disks: vec![disk],
                    }),
                }
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    fn begin(
        &mut self,
        request: &BeginRequest,
        quiesce: Option<&mut dyn Quiesce>,
    ) -> Result<Box<dyn BackupSession + '_>> {
        if !request.checkpoint.starts_with(CHECKPOINT_PREFIX) {
            return Err(Error::Checkpoint {
                name: request.checkpoint.clone(),
                problem: format!("checkpoint names start with {CHECKPOINT_PREFIX}"),
            });
        }
        if request.tls && self.tls.is_none() {
            return Err(Error::Source(
                "TLS was asked for, but the QEMU source has no certificates \
                 (QemuSource::tls_certificates)"
                    .into(),
            ));
        }
        ensure_private_dir(&self.scratch_dir)?;
        let lock = lock_scratch(&self.scratch_dir)?;
        let known = self.disks()?;
        let nodes = self.nodes()?;
        let mut disks = Vec::new();
        let mut granularities = Vec::new();
        for name in &request.disks {
            let disk = known
                .iter()
                .find(|d| &d.node == name)
                .ok_or_else(|| Error::NoSuchDisk {
                    disk: name.clone(),
                    known: known.iter().map(|d| d.node.clone()).collect(),
                })?;
            let node = Self::node(&nodes, name).ok_or_else(|| Error::NoSuchDisk {
                disk: name.clone(),
                known: known.iter().map(|d| d.node.clone()).collect(),
            })?;
            if Self::bitmap(node, &request.checkpoint).is_some() {
                return Err(Error::Checkpoint {
                    name: request.checkpoint.clone(),
                    problem: format!("exists already on disk {name}"),
                });
            }
            let mut granularity = None;
            if let Some(since) = &request.since {
                let bitmap = Self::bitmap(node, since).ok_or_else(|| Error::Checkpoint {
                    name: since.clone(),
                    problem: format!("missing on disk {name}"),
                })?;
                if bitmap.inconsistent == Some(true) {
                    return Err(Error::Checkpoint {
                        name: since.clone(),
                        problem: format!("inconsistent on disk {name}"),
                    });
                }
                granularity =
                    Some(
                        u32::try_from(bitmap.granularity).map_err(|_| Error::Checkpoint {
                            name: since.clone(),
                            problem: format!(
                                "granularity {} on disk {name} is beyond what a bitmap can have",
                                bitmap.granularity
                            ),
                        })?,
                    );
            }
            disks.push(SessionDisk {
                node: name.clone(),
                size: disk.size,
            });
            granularities.push(granularity);
        }
        // Watched from before the moment on: a guest write that fails for want of scratch
        // space, and the VM stopping on it (see the module docs).
        let was_running = self.call::<QueryStatus>(&())?.status == RunState::Running;
        let subscription = self
            .monitor
            .subscribe(EventFilter::names(WATCHED_EVENTS))
            .map_err(|e| monitor_error("subscribe to events", e))?;
        match self.begin_inner(request, &disks, &granularities, quiesce) {
            Ok((consistency, warnings)) => Ok(Box::new(QemuSession {
                socket: self.scratch_dir.join(SOCKET),
                scratch_dir: self.scratch_dir.clone(),
                _lock: lock,
                tls: request.tls.then(|| self.tls.clone()).flatten(),
                nbd_timeout: self.nbd_timeout,
                source: Mutex::new(self),
                watch: Mutex::new(Watch {
                    subscription: Some(subscription),
                    was_running,
                    foreign_error: None,
                    lost: None,
                }),
                checkpoint: request.checkpoint.clone(),
                since: request.since.clone(),
                disks,
                consistency,
                warnings,
                ended: false,
            })),
            Err(e) => {
                let _ = self.monitor.unsubscribe(subscription);
                if let (Err(t), _) = self.teardown(disks.len(), request.tls) {
                    tracing::warn!("tearing down a failed begin: {t}");
                }
                // The transaction is atomic: its bitmaps exist only if it succeeded, and then
                // a later step failed.
                for disk in &disks {
                    for name in [
                        request.checkpoint.clone(),
                        pending_marker(&request.checkpoint),
                    ] {
                        let _ = self.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(
                            &disk.node, name,
                        ));
                    }
                }
                Err(e)
            }
        }
    }

    fn remove_checkpoint(&mut self, name: &str) -> Result<()> {
        let marker = pending_marker(name);
        for node in self.nodes()? {
            let node_name = node.node_name.clone().unwrap_or_default();
            // The checkpoint first: interrupted in between, an orphaned marker is left,
            // which `cleanup` removes, never a pending checkpoint looking stored.
            for bitmap in [name, marker.as_str()] {
                if Self::bitmap(&node, bitmap).is_some() {
                    self.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(
                        &node_name, bitmap,
                    ))?;
                }
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        // A backup through this scratch directory that still runs holds its lock; one
        // through another scratch directory holds that one's, found from its scratch
        // node's file. Either is left alone: Busy.
        let _lock = if self.scratch_dir.is_dir() {
            Some(lock_scratch(&self.scratch_dir)?)
        } else {
            None
        };
        let mut _other_locks = Vec::new();
        // Queried again below only when something was removed since (each query returns
        // every node of the VM).
        let mut nodes = self.nodes()?;
        for node in &nodes {
            let Some(name) = node.node_name.as_deref() else {
                continue;
            };
            if !name.starts_with("vmsdk-sc-") {
                continue;
            }
            if let Some(dir) = Path::new(&node.file).parent() {
                if dir != self.scratch_dir && dir.join(LOCK_FILE).is_file() {
                    _other_locks.push(lock_scratch(dir)?);
                }
            }
        }
        let mut report = CleanupReport::default();
        let mut foreign_exports = false;
        for export in self.exports()? {
            let id = export.id;
            if !id.starts_with(CHECKPOINT_PREFIX) {
                foreign_exports = true;
                continue;
            }
            match self.delete_export(&id) {
                Ok(()) => report.removed.push(format!("export {id}")),
                Err(e) => report.failed.push(format!("export {id}: {e}")),
            }
        }
        if !foreign_exports && !report.removed.is_empty() {
            let _ = self.call::<NbdServerStop>(&());
        }
        // `qom-list` and `object-del` have no typed form in qmp-proto.
        let objects = self.raw("qom-list", Some(json!({"path": "/objects"})))?;
        let tls_left = objects
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| o["name"] == TLS_OBJECT);
        if tls_left && !foreign_exports {
            let _ = self.call::<NbdServerStop>(&());
            match self.raw("object-del", Some(json!({ "id": TLS_OBJECT }))) {
                Ok(_) => report.removed.push(format!("TLS credentials {TLS_OBJECT}")),
                Err(e) => report
                    .failed
                    .push(format!("TLS credentials {TLS_OBJECT}: {e}")),
            }
        }
        let mut jobs_ended = false;
        for job in self.jobs()? {
            let id = job.id.clone();
            if id.starts_with(CHECKPOINT_PREFIX) {
                jobs_ended = true;
                match self.end_known_job(&id, Some(job)) {
                    Ok(()) => report.removed.push(format!("job {id}")),
                    Err(e) => report.failed.push(format!("job {id}: {e}")),
                }
            }
        }
        // A job's end takes its copy-before-write filter node (`vmsdk-cbw-N`) away.
        if jobs_ended {
            nodes = self.nodes()?;
        }
        // Scratch qcow2 nodes before the file nodes under them.
        let mut ours: Vec<(String, Option<String>)> = nodes
            .iter()
            .filter_map(|n| {
                let name = n.node_name.as_deref()?;
                name.starts_with(CHECKPOINT_PREFIX)
                    .then(|| (name.to_owned(), Some(n.file.clone())))
            })
            .collect();
        ours.sort_by_key(|(name, _)| !name.starts_with("vmsdk-sc-"));
        if !ours.is_empty() {
            // Looked at again below for their bitmaps, without the nodes deleted here.
            nodes = Vec::new();
        }
        for (name, file) in ours {
            match self.delete_node(&name) {
                Ok(()) => report.removed.push(format!("scratch node {name}")),
                Err(e) => report.failed.push(format!("scratch node {name}: {e}")),
            }
            if let Some(file) = file {
                let path = PathBuf::from(&file);
                let ours = path.parent() == Some(self.scratch_dir.as_path())
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmsdk-scratch-"));
                if ours && path.exists() && std::fs::remove_file(&path).is_ok() {
                    report.removed.push(format!("file {file}"));
                }
            }
        }
        // Half-made checkpoints: those with a pending marker (and orphaned markers). No
        // backup runs (the locks above), so none of them is in the making.
        if nodes.is_empty() {
            nodes = self.nodes()?;
        }
        for node in nodes {
            let Some(node_name) = node.node_name.as_deref() else {
                continue;
            };
            for bitmap in node.dirty_bitmaps.iter().flatten() {
                let Some(marker) = bitmap.name.as_deref() else {
                    continue;
                };
                let Some(checkpoint) = marker.strip_suffix(PENDING_SUFFIX) else {
                    continue;
                };
                if !checkpoint.starts_with(CHECKPOINT_PREFIX) {
                    continue;
                }
                if Self::bitmap(&node, checkpoint).is_some() {
                    match self.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(
                        node_name, checkpoint,
                    )) {
                        Ok(_) => report.removed.push(format!(
                            "checkpoint {checkpoint} on {node_name} (half-made)"
                        )),
                        Err(e) => {
                            report
                                .failed
                                .push(format!("checkpoint {checkpoint} on {node_name}: {e}"));
                            continue;
                        }
                    }
                }
                match self.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(node_name, marker))
                {
                    Ok(_) => report
                        .removed
                        .push(format!("pending marker {marker} on {node_name}")),
                    Err(e) => report
                        .failed
                        .push(format!("pending marker {marker} on {node_name}: {e}")),
                }
            }
        }
        // Scratch files whose nodes died with an earlier QEMU.
        if let Ok(entries) = std::fs::read_dir(&self.scratch_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("vmsdk-scratch-") && name.ends_with(".qcow2") {
                    let path = entry.path();
                    if std::fs::remove_file(&path).is_ok() {
                        report.removed.push(format!("file {}", path.display()));
                    }
                }
            }
        }
        Ok(report)
    }
}

fn monitor_error(command: &str, e: qmp_proto::Error) -> Error {
    Error::Monitor {
        command: command.to_owned(),
        message: e.to_string(),
    }
}

/// A backup session of [`QemuSource`]. The source sits behind a mutex because
/// [`watch`](BackupSession::watch), called through `&self` while the views are read, may
/// have to act in QEMU.
struct QemuSession<'a, M: Monitor> {
    source: Mutex<&'a mut QemuSource<M>>,
    watch: Mutex<Watch>,
    socket: PathBuf,
    scratch_dir: PathBuf,
    /// The scratch directory's lock, held until the session is dropped (after its end).
    _lock: std::fs::File,
    tls: Option<TlsDirs>,
    nbd_timeout: Duration,
    checkpoint: String,
    since: Option<String>,
    disks: Vec<SessionDisk>,
    consistency: Consistency,
    warnings: Vec<String>,
    ended: bool,
}

/// What a session's watch keeps between looks.
#[derive(Debug)]
struct Watch {
    /// The events subscribed to at `begin`, until the session ends.
    subscription: Option<SubscriptionId>,
    /// The VM ran when the backup began: a stop on an I/O error of a disk of this session is
    /// ended with `cont` once the views are given up (unless [`foreign_error`] says the stop
    /// may not be the backup's).
    ///
    /// [`foreign_error`]: Self::foreign_error
    was_running: bool,
    /// The first I/O error seen during the session that is not the scratch space running
    /// out under a disk of this session: another device's, or another errno than ENOSPC.
    /// A VM stopped while one came is left stopped for its owner: continuing it would retry
    /// a failed request that is none of the backup's business.
    foreign_error: Option<String>,
    /// Why the views were given up, once they were.
    lost: Option<String>,
}

impl<M: Monitor> fmt::Debug for QemuSession<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuSession")
            .field("checkpoint", &self.checkpoint)
            .field("since", &self.since)
            .field("disks", &self.disks)
            .field("socket", &self.socket)
            .finish()
    }
}

/// Locks `mutex`, whether or not a thread panicked holding it (what it guards stays usable:
/// every step of a session re-reads QEMU's state).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<M: Monitor> QemuSession<'_, M> {
    fn end(&mut self, keep_checkpoint: bool) -> Result<()> {
        self.ended = true;
        let subscription = lock(&self.watch).subscription.take();
        let source = self
            .source
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(subscription) = subscription {
            let _ = source.monitor.unsubscribe(subscription);
        }
        let (torn, nodes) = source.teardown(self.disks.len(), self.tls.is_some());
        // Kept: stored, so its marker goes (already gone after `data_written`). Not kept:
        // the checkpoint, then its marker.
        let marker = pending_marker(&self.checkpoint);
        let doomed: Vec<&str> = if keep_checkpoint {
            vec![&marker]
        } else {
            vec![&self.checkpoint, &marker]
        };
        // The nodes as they were before the scratch nodes went: the disks' bitmaps are the
        // same now.
        let mut removal = Ok(());
        for disk in &self.disks {
            for name in &doomed {
                let present = QemuSource::<M>::node(&nodes, &disk.node)
                    .is_none_or(|n| QemuSource::<M>::bitmap(n, name).is_some());
                if !present {
                    continue;
                }
                let r = source
                    .call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(&disk.node, *name));
                if let Err(e) = r {
                    removal = Err(e);
                }
            }
        }
        torn.map(drop).and(removal)
    }

    fn scratch_full(&self, problem: &str) -> Error {
        Error::ScratchFull {
            dir: self.scratch_dir.clone(),
            problem: problem.to_owned(),
        }
    }

    /// Why the views must be given up now, if they must: the scratch filesystem below its
    /// reserve, a guest write to one of the disks failed for want of space, a backup job of
    /// this session failed or ended on its own.
    fn danger(&self, source: &mut QemuSource<M>, watch: &mut Watch) -> Result<Option<String>> {
        let free = free_space(&self.scratch_dir)?;
        // The events first: they say more than the free space.
        let mut danger = None;
        let Some(subscription) = watch.subscription else {
            return Ok(Self::low_space(free, source.scratch_reserve));
        };
        // A device's errors name its root node: our filter while the job runs.
        let ours_node = |name: &str| {
            self.disks
                .iter()
                .enumerate()
                .find(|(i, d)| d.node == name || filter_node(*i) == name)
                .map(|(_, d)| d.node.clone())
        };
        let ours_job = |id: &str| (0..self.disks.len()).any(|i| backup_job(i) == id);
        loop {
            // Only the events that have arrived (a zero timeout reads without waiting: a
            // socket's shortest timeout is a scheduler tick, paid on every progress report).
            // A monitor that fails here (QEMU gone) is no reason of the watch's: the reads
            // fail on their own, with their own error.
            let event = match source.monitor.next_event(subscription, Duration::ZERO) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("watching the backup's events: {e}");
                    break;
                }
            };
            let data = &event.data;
            match event.event.as_str() {
                "BLOCK_IO_ERROR" => {
                    let node = data["node-name"].as_str().unwrap_or_default();
                    let device = data["device"].as_str().unwrap_or_default();
                    let disk = ours_node(node).or_else(|| ours_node(device));
                    match (data["nospace"] == true, disk) {
                        (true, Some(disk)) => {
                            danger.get_or_insert_with(|| {
                                format!(
                                    "is full: a guest write to disk {disk} failed with ENOSPC \
                                     while the backup's copy-before-write filter was on it \
                                     ({free} bytes free there now; if that is plenty, the \
                                     disk's own storage is full)"
                                )
                            });
                        }
                        _ => {
                            let what = if device.is_empty() { node } else { device };
                            let operation = data["operation"].as_str().unwrap_or("an I/O");
                            let reason = data["reason"].as_str().unwrap_or("no reason given");
                            watch.foreign_error.get_or_insert_with(|| {
                                format!("{operation} error on {what}: {reason}")
                            });
                        }
                    }
                }
                "BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                    let job = data["device"].as_str().unwrap_or_default();
                    if ours_job(job) {
                        let error = data["error"].as_str().unwrap_or("no error given");
                        danger.get_or_insert_with(|| {
                            format!(
                                "holds the view of a backup job that stopped ({}: {}, {error}; \
                                 {free} bytes free)",
                                job, event.event
                            )
                        });
                    }
                }
                _ => {} // STOP: the run state is looked at when the views are given up.
            }
        }
        Ok(danger.or_else(|| Self::low_space(free, source.scratch_reserve)))
    }

    fn low_space(free: u64, reserve: u64) -> Option<String> {
        (free < reserve).then(|| {
            format!(
                "is full: {free} bytes free, below the reserve of {reserve} bytes \
                 (QemuSource::scratch_reserve)"
            )
        })
    }

    /// Gives the views up so that the guest's writes go on: the exports first (hard: QEMU
    /// drops the connections), then the backup jobs, whose copy-before-write filters leave the
    /// disks; a VM that ran when the backup began and stopped on an I/O error meanwhile is
    /// continued when that error can only be the backup's: no other I/O error came (see
    /// [`Watch::foreign_error`]) and the scratch filesystem is below its reserve (an ENOSPC
    /// with scratch space to spare came from the disk's own storage). The scratch nodes and
    /// files go with the session's end.
    ///
    /// Returns what failed, and why a stopped VM was left stopped, if it was.
    fn give_up(&self, source: &mut QemuSource<M>, watch: &Watch) -> (Vec<String>, Option<String>) {
        let mut problems = Vec::new();
        for i in 0..self.disks.len() {
            let id = export_id(i);
            if let Err(e) = source.delete_export(&id) {
                problems.push(format!("export {id}: {e}"));
            }
        }
        for i in 0..self.disks.len() {
            let job = backup_job(i);
            if let Err(e) = source.end_job(&job) {
                problems.push(format!("job {job}: {e}"));
            }
        }
        let mut left_stopped = None;
        if watch.was_running {
            match source.call::<QueryStatus>(&()) {
                Ok(status) if status.status == RunState::IoError => {
                    let free = free_space(&self.scratch_dir).unwrap_or(u64::MAX);
                    let not_ours = match &watch.foreign_error {
                        Some(error) => Some(format!("({error})")),
                        None if free >= source.scratch_reserve => Some(format!(
                            "(the scratch filesystem has {free} bytes free, so the ENOSPC came \
                             from the disk's own storage)"
                        )),
                        None => None,
                    };
                    match not_ours {
                        Some(why) => {
                            let why = format!(
                                "stopped on an I/O error that is not the backup's {why}: it is \
                                 left stopped for its owner to continue"
                            );
                            tracing::warn!("the VM {why}");
                            left_stopped = Some(why);
                        }
                        None => match source.call::<Cont>(&()) {
                            Ok(_) => tracing::warn!(
                                "the VM had stopped on an I/O error of the backup's scratch \
                                 space: continued"
                            ),
                            Err(e) => problems.push(format!("cont: {e}")),
                        },
                    }
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("query-status: {e}")),
            }
        }
        (problems, left_stopped)
    }
}

impl<M: Monitor> BackupSession for QemuSession<'_, M> {
    fn checkpoint(&self) -> &str {
        &self.checkpoint
    }

    fn since(&self) -> Option<&str> {
        self.since.as_deref()
    }

    fn disks(&self) -> &[SessionDisk] {
        &self.disks
    }

    fn consistency(&self) -> Consistency {
        self.consistency
    }

    fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn watch(&self) -> Result<()> {
        let mut watch = lock(&self.watch);
        if let Some(lost) = &watch.lost {
            return Err(self.scratch_full(lost));
        }
        let mut source = lock(&self.source);
        let Some(danger) = self.danger(&mut source, &mut watch)? else {
            return Ok(());
        };
        tracing::warn!(
            "the scratch filesystem of {} {danger}: giving the backup's views up",
            self.scratch_dir.display()
        );
        let (problems, left_stopped) = self.give_up(&mut source, &watch);
        let danger = match left_stopped {
            Some(why) => format!("{danger}; the VM {why}"),
            None => danger,
        };
        let lost = if problems.is_empty() {
            danger
        } else {
            format!(
                "{danger}; giving the views up failed in part ({}): run `vmsdk backup cleanup`",
                problems.join("; ")
            )
        };
        let error = self.scratch_full(&lost);
        watch.lost = Some(lost);
        Err(error)
    }

    fn data_written(&self) -> Result<()> {
        let mut source = lock(&self.source);
        let marker = pending_marker(&self.checkpoint);
        for disk in &self.disks {
            source.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new(&disk.node, &marker))?;
        }
        Ok(())
    }

    fn open(&self, node: &str) -> Result<Box<dyn Disk>> {
        if !self.disks.iter().any(|d| d.node == node) {
            return Err(Error::NoSuchDisk {
                disk: node.to_owned(),
                known: self.disks.iter().map(|d| d.node.clone()).collect(),
            });
        }
        let mut uri = DiskUri::nbd_unix(&self.socket, node)
            .with_timeout(self.nbd_timeout)
            .map_err(|e| Error::disk("build the view's URI", e))?;
        if self.since.is_some() {
            uri = uri
                .with_dirty_bitmap(EXPORT_BITMAP)
                .map_err(|e| Error::disk("build the view's URI", e))?;
        }
        if let Some(tls) = &self.tls {
            uri = uri
                .with_tls(disk_transport::NbdTls {
                    certificates: Some(tls.client.clone()),
                    hostname: Some(tls.hostname.clone()),
                    verify_peer: Some(true),
                    ..Default::default()
                })
                .map_err(|e| Error::disk("build the view's URI", e))?;
        }
        disk_transport::factory::open(&uri, OpenFlags::read_only())
            .map_err(|e| Error::disk(format!("open the view of {node} ({uri})"), e))
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.end(true)
    }

    fn abort(mut self: Box<Self>) -> Result<()> {
        self.end(false)
    }
}

impl<M: Monitor> Drop for QemuSession<'_, M> {
    fn drop(&mut self) {
        if !self.ended {
            if let Err(e) = self.end(false) {
                tracing::warn!("ending the backup session on drop: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The QEMU source against qmp-proto's fake QEMU, for what a real QEMU cannot be made to
    //! do on demand: a VM stopped by an I/O error while a backup runs.

    use std::time::{Duration, Instant};

    use disk_transport::memory::MemoryDisk;
    use qmp_proto::fake::{FakeMonitor, ImageFormat, Response, RunState as FakeRunState};
    use serde_json::json;

    use super::*;
    use crate::BeginRequest;

    const SIZE: u64 = 4 << 20;

    /// A running fake VM with disk `vda` (a qcow2 node behind a device), the image its scratch
    /// node will open in `scratch`, and the QEMU source on it.
    fn running_vm(
        scratch: &Path,
        reserve: u64,
    ) -> (
        FakeMonitor,
        QemuSource<qmp_proto::Client<std::os::unix::net::UnixStream>>,
    ) {
        let scratch_image = scratch.join(scratch_file_name(0));
        let fake = FakeMonitor::builder()
            .run_state(FakeRunState::Running)
            .image(
                "/images/vda.qcow2",
                ImageFormat::Qcow2,
                MemoryDisk::new(SIZE),
            )
            .image(
                scratch_image.to_string_lossy(),
                ImageFormat::Qcow2,
                MemoryDisk::new(SIZE),
            )
            .build();
        let mut setup = fake.connect().unwrap();
        setup
            .execute_raw(
                "blockdev-add",
                Some(json!({"driver": "qcow2", "node-name": "vda",
                    "file": {"driver": "file", "filename": "/images/vda.qcow2"}})),
            )
            .unwrap();
        // The fake has no devices: `query-block` shows `vda` as a virtio disk's medium.
        fake.handler("query-block", |_, _| {
            Response::ok(
                json!([{"device": "", "qdev": "/machine/peripheral/vda/virtio-backend",
                "type": "unknown", "removable": false, "locked": false,
                "inserted": {"file": "/images/vda.qcow2", "node-name": "vda", "ro": false,
                    "drv": "qcow2", "image": {"filename": "/images/vda.qcow2",
                        "format": "qcow2", "virtual-size": SIZE}}}]),
            )
        });
        let source = QemuSource::new(fake.connect().unwrap(), scratch)
            .min_scratch_free(0)
            .scratch_reserve(reserve);
        (fake, source)
    }

    /// Calls `watch` until it gives the views up. The fake sends the events raised with
    /// `emit_event` within 10 ms; waiting well past that first makes the first `watch` see
    /// all of them, as a watch after the same events from a real QEMU would.
    fn watch_until_given_up(session: &dyn BackupSession) -> Error {
        std::thread::sleep(Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Err(e) = session.watch() {
                return e;
            }
            assert!(Instant::now() < deadline, "the views were never given up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A backup of a running fake VM during which the VM stops on the I/O `errors` (node,
    /// ENOSPC or not), with a scratch `reserve`: the error `watch` gives the views up with,
    /// once the session has ended; and the fake, to look at what the VM was left as.
    fn vm_stopped_during_backup(reserve: u64, errors: &[(&str, bool)]) -> (FakeMonitor, String) {
        let dir = tempfile::tempdir().unwrap();
        let (fake, mut source) = running_vm(dir.path(), reserve);
        let session = source
            .begin(&BeginRequest::full("vmsdk-t-1", vec!["vda".into()]), None)
            .unwrap();
        fake.state().run_state = FakeRunState::IoError;
        for &(node, nospace) in errors {
            let reason = if nospace {
                "No space left on device"
            } else {
                "Input/output error"
            };
            fake.emit_event(
                "BLOCK_IO_ERROR",
                Some(
                    json!({"device": "", "node-name": node, "operation": "write",
                    "action": "stop", "nospace": nospace, "reason": reason}),
                ),
            );
        }
        let error = watch_until_given_up(session.as_ref());
        assert!(matches!(error, Error::ScratchFull { .. }), "{error}");
        assert!(fake.state().exports().is_empty(), "the views were given up");
        drop(session);
        assert!(fake.state().jobs().is_empty(), "the job was ended");
        (fake, error.to_string())
    }

    #[test]
    fn a_vm_stopped_by_the_scratch_running_full_is_continued() {
        // Every byte free is below a reserve of u64::MAX: the scratch counts as full.
        let (fake, message) = vm_stopped_during_backup(u64::MAX, &[(&filter_node(0), true)]);
        assert!(!message.contains("left stopped"), "{message}");
        assert_eq!(fake.state().run_state, FakeRunState::Running, "continued");
    }

    /// A VM stopped during a backup by `errors` is not continued, and the backup's error
    /// says why (`because`).
    fn assert_left_stopped(reserve: u64, errors: &[(&str, bool)], because: &str) {
        let (fake, message) = vm_stopped_during_backup(reserve, errors);
        assert!(
            message.contains("left stopped") && message.contains(because),
            "{message}"
        );
        assert_eq!(
            fake.state().run_state,
            FakeRunState::IoError,
            "not continued"
        );
    }

    #[test]
    fn a_vm_stopped_by_another_devices_error_is_left_stopped() {
        // Another disk failed (EIO, werror=stop) while the scratch ran full under vda.
        let errors = [("data2", false), (&filter_node(0), true)];
        assert_left_stopped(u64::MAX, &errors, "write error on data2");
    }

    #[test]
    fn a_vm_stopped_by_its_own_storage_running_full_is_left_stopped() {
        // A reserve of 0: the scratch filesystem has space to spare, so an ENOSPC under vda
        // came from vda's own storage.
        assert_left_stopped(0, &[("vda", true)], "the disk's own storage");
    }
}
