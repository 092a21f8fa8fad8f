//! The backup-source trait and the data it speaks: disks, checkpoints, a session's views.

use std::fmt;
use std::time::Duration;

use disk_transport::Disk;
use serde::{Deserialize, Serialize};

use crate::quiesce::Quiesce;
use crate::Result;

/// Every checkpoint vmsdk makes is named with this prefix, so `cleanup` and the checkpoint
/// listing never touch anyone else's dirty bitmaps (libvirt's, qmpbackup's, a user's own).
pub const CHECKPOINT_PREFIX: &str = "vmsdk-";

/// Which VM a backup came from, as the source knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VmIdentity {
    /// The VM's name, when the source knows one (QEMU's `-name`, vSphere's VM name).
    pub name: Option<String>,
    /// The VM's UUID, when the source knows one.
    pub uuid: Option<String>,
    /// The hypervisor and its version: `qemu 7.2.22`, `fake`.
    pub hypervisor: String,
}

/// A disk of the VM that can be backed up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceDisk {
    /// The name the source knows it by: QEMU's block node name (`drive-virtio-disk0`), a
    /// vSphere disk key, the fake's name.
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The image format behind it (`qcow2`, `raw`, ...), for display.
    pub format: String,
    /// The image file, when there is one.
    pub file: Option<String>,
}

/// The state of one checkpoint on one disk: QEMU's dirty-bitmap flags, vSphere's CBT state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckpointDisk {
    /// The disk.
    pub node: String,
    /// It records writes (QEMU: the bitmap is enabled).
    pub recording: bool,
    /// It survives the VM's restart (QEMU: stored in the qcow2 image).
    pub persistent: bool,
    /// It was not stored properly (QEMU: after a crash of the VM) and cannot be trusted.
    pub inconsistent: bool,
    /// Something uses it now (QEMU: a job or an export).
    pub busy: bool,
    /// Bytes per bit.
    pub granularity: u64,
}

impl CheckpointDisk {
    /// Why this checkpoint cannot be the base of an incremental backup, if it cannot.
    pub fn unusable(&self) -> Option<&'static str> {
        if self.inconsistent {
            Some("inconsistent (the VM stopped without storing it)")
        } else if !self.recording {
            Some("not recording (disabled)")
        } else if !self.persistent {
            Some("not persistent (lost when the VM stops)")
        } else {
            None
        }
    }
}

/// A checkpoint: the moment of a backup, from which writes are recorded on every disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The name (`vmsdk-…`).
    pub name: String,
    /// The disks that carry it.
    pub disks: Vec<CheckpointDisk>,
}

impl Checkpoint {
    /// Checks that this checkpoint can be the base of an incremental backup of `disks`:
    /// present, recording, persistent and consistent on every one. The error says which
    /// disk fails and why.
    pub fn check_usable_for(&self, disks: &[String]) -> std::result::Result<(), String> {
        for node in disks {
            match self.disks.iter().find(|d| &d.node == node) {
                None => {
                    return Err(format!(
                        "checkpoint {} is missing on disk {node}",
                        self.name
                    ))
                }
                Some(d) => {
                    if let Some(why) = d.unusable() {
                        return Err(format!("checkpoint {} on disk {node} is {why}", self.name));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What [`BackupSource::begin`] is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BeginRequest {
    /// The checkpoint to create at the backup's moment (named with [`CHECKPOINT_PREFIX`]).
    pub checkpoint: String,
    /// For an incremental backup, the earlier checkpoint whose changes the views report
    /// through [`Disk::dirty_extents`].
    pub since: Option<String>,
    /// The disks to back up, by node name.
    pub disks: Vec<String>,
    /// Serve the views over TLS where the source serves them over a network protocol.
    pub tls: bool,
}

impl BeginRequest {
    /// A full backup of `disks`, creating `checkpoint`.
    pub fn full(checkpoint: impl Into<String>, disks: Vec<String>) -> Self {
        BeginRequest {
            checkpoint: checkpoint.into(),
            since: None,
            disks,
            tls: false,
        }
    }

    /// An incremental backup of what changed since `since`.
    pub fn since(mut self, since: impl Into<String>) -> Self {
        self.since = Some(since.into());
        self
    }

    /// Serve the views over TLS.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }
}

/// How consistent the point in time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum Consistency {
    /// As if the power was cut at the checkpoint: what the guest had written, not what it
    /// still held in its page cache.
    Crash,
    /// The guest's filesystems were frozen around the checkpoint.
    Application {
        /// How long they stayed frozen, in milliseconds.
        frozen_ms: u64,
    },
}

impl Consistency {
    /// From the frozen time, when there was one.
    pub fn from_frozen(frozen: Option<Duration>) -> Self {
        match frozen {
            Some(d) => Consistency::Application {
                frozen_ms: d.as_millis().try_into().unwrap_or(u64::MAX),
            },
            None => Consistency::Crash,
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Crash => f.write_str("crash-consistent"),
            Consistency::Application { frozen_ms } => {
                write!(f, "application-consistent (frozen {frozen_ms} ms)")
            }
        }
    }
}

/// One disk of a running backup session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionDisk {
    /// The disk's node name.
    pub node: String,
    /// Its size in bytes at the checkpoint.
    pub size: u64,
}

/// What a source's `cleanup` removed (and what it could not).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CleanupReport {
    /// What was removed, one line each: `export vmsdk-vda`, `job vmsdk-backup-vda`,
    /// `scratch node vmsdk-scratch-vda`, `file /var/tmp/…`, `checkpoint vmsdk-…`.
    pub removed: Vec<String>,
    /// What could not be removed, and why.
    pub failed: Vec<String>,
}

impl CleanupReport {
    /// Whether there was nothing to do.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.failed.is_empty()
    }
}

/// A VM whose disks can be backed up while it runs: VDDK's access lifecycle for any
/// hypervisor.
///
/// | VDDK (vSphere) | here | QEMU ([`qemu`](crate::qemu)) |
/// |---|---|---|
/// | `PrepareForAccess`, `CreateSnapshot` (quiesced), record each disk's `changeId` | [`begin`](Self::begin) | one QMP `transaction`: checkpoint bitmaps + `blockdev-backup sync=none` into scratch overlays; NBD exports |
/// | `ConnectEx` on the snapshot, `Open`, `QueryChangedDiskAreas` | [`BackupSession::open`], [`Disk::dirty_extents`] | the NBD export with `qemu:dirty-bitmap` |
/// | `RemoveSnapshot`, `EndAccess` | [`BackupSession::finish`] / [`abort`](BackupSession::abort) / drop | exports, jobs, scratch nodes and files removed |
/// | `EndAccess` "to clean up after a crash", `VixDiskLib_Cleanup` | [`cleanup`](Self::cleanup) | leftover `vmsdk-` exports, jobs, nodes, files |
///
/// Implementations: the QEMU one over QMP and NBD, and [`FakeVm`](crate::fake::FakeVm) for
/// unit tests. A VMware implementation fits the same shape: `begin` creates a vSphere
/// snapshot (quiesced through VMware Tools when asked, instead of a [`Quiesce`]), the
/// checkpoint is the set of the disks' `changeId`s at the snapshot (kept by the source under
/// the checkpoint's name, since vSphere has no named bitmaps), `open` opens the snapshot's
/// disk through disk-transport's VDDK backend inside a `PrepareForAccess` guard, and
/// `dirty_extents` of an incremental view answers from `QueryChangedDiskAreas(changeId)`;
/// `finish` removes the snapshot and ends access; `cleanup` removes `vmsdk-` snapshots and
/// calls `VixDiskLib_Cleanup`.
pub trait BackupSource: Send + fmt::Debug {
    /// The VM, for the manifest.
    fn vm(&mut self) -> Result<VmIdentity>;

    /// The disks that can be backed up.
    fn disks(&mut self) -> Result<Vec<SourceDisk>>;

    /// The checkpoints named with [`CHECKPOINT_PREFIX`], with their disks and state.
    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>>;

    /// The point in time of a backup: for every disk of `request` at once, the new checkpoint
    /// and a read-only view of the disk at that moment, atomically (no guest write falls
    /// between one disk's checkpoint and another's view). `quiesce`, when given, is frozen
    /// just before that moment and thawed just after, on every path; when it cannot freeze,
    /// the session is crash-consistent and says why in its warnings.
    ///
    /// A failed `begin` leaves nothing behind: no checkpoint, no view.
    fn begin(
        &mut self,
        request: &BeginRequest,
        quiesce: Option<&mut dyn Quiesce>,
    ) -> Result<Box<dyn BackupSession + '_>>;

    /// Removes a checkpoint from every disk that has it (no error when none has).
    fn remove_checkpoint(&mut self, name: &str) -> Result<()>;

    /// Removes what interrupted backups left behind (views, their exports, jobs and scratch
    /// images): `EndAccess` "to clean up after a crash". Of the checkpoints, only those a
    /// backup made and never got to [`BackupSession::data_written`] go, where the source can
    /// tell them (QEMU marks them pending); stored ones stay, and the backup directory
    /// decides which of its own are stale. A backup still running is left alone (QEMU: its
    /// scratch directory's lock is held), with [`Error::Busy`](crate::Error::Busy).
    fn cleanup(&mut self) -> Result<CleanupReport>;
}

/// A backup in progress: the point-in-time views of the disks, until
/// [`finish`](Self::finish), [`abort`](Self::abort) or drop (which aborts).
pub trait BackupSession: Send + fmt::Debug {
    /// The checkpoint created at the backup's moment.
    fn checkpoint(&self) -> &str;

    /// The checkpoint whose changes the views report (incremental), if any.
    fn since(&self) -> Option<&str>;

    /// The disks of the backup, with their sizes at the checkpoint.
    fn disks(&self) -> &[SessionDisk];

    /// Crash- or application-consistent, and how long the guest was frozen.
    fn consistency(&self) -> Consistency;

    /// What went less well than asked (an agent that did not answer, ...).
    fn warnings(&self) -> &[String];

    /// The disk as it was at the checkpoint, read-only. For an incremental session its
    /// [`Disk::dirty_extents`] reports what changed between [`since`](Self::since) and the
    /// checkpoint.
    fn open(&self, node: &str) -> Result<Box<dyn Disk>>;

    /// Whether the views still hold the point in time, and the VM is not harmed by them.
    /// The backup calls it often while it reads (on every progress report): a source that
    /// must give its views up while the backup runs (QEMU's scratch filesystem runs full, and
    /// the guest's writes would fail) does it here and answers with the reason, which the
    /// backup then fails with. The default has nothing to watch.
    fn watch(&self) -> Result<()> {
        Ok(())
    }

    /// The backup's data is written and synced, and its point is about to be stored: the
    /// new checkpoint is no longer half-made. Until then a source may mark it pending so that
    /// [`BackupSource::cleanup`] recognises it without the backup directory (QEMU removes
    /// its pending marker here). Called just before the point is stored, so a backup killed
    /// in between leaves an unmarked checkpoint, which the next backup into the directory
    /// removes, rather than ever a marked stored one. The default has no marker.
    fn data_written(&self) -> Result<()> {
        Ok(())
    }

    /// The backup's data is safely stored: removes the views, keeps the new checkpoint.
    fn finish(self: Box<Self>) -> Result<()>;

    /// The backup failed: removes the views and the new checkpoint, so the previous one
    /// stays the base of the next incremental backup.
    fn abort(self: Box<Self>) -> Result<()>;
}

impl<T: BackupSource + ?Sized> BackupSource for Box<T> {
    fn vm(&mut self) -> Result<VmIdentity> {
        (**self).vm()
    }
    fn disks(&mut self) -> Result<Vec<SourceDisk>> {
        (**self).disks()
    }
    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        (**self).checkpoints()
    }
    fn begin(
        &mut self,
        request: &BeginRequest,
        quiesce: Option<&mut dyn Quiesce>,
    ) -> Result<Box<dyn BackupSession + '_>> {
        (**self).begin(request, quiesce)
    }
    fn remove_checkpoint(&mut self, name: &str) -> Result<()> {
        (**self).remove_checkpoint(name)
    }
    fn cleanup(&mut self) -> Result<CleanupReport> {
        (**self).cleanup()
    }
}
