//! Jobs: `blockdev-backup` (with its copy-before-write filter) and `blockdev-create`, their
//! state machine and `JOB_STATUS_CHANGE`/`BLOCK_JOB_*` events.

use std::collections::BTreeSet;

use disk_transport::memory::MemoryDisk;
use disk_transport::Disk;
use serde_json::{json, Map, Value};

use super::graph::io_error;
use super::state::*;

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

impl FakeState {
    // ---------------------------------------------------------------- jobs

    pub(crate) fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    pub(crate) fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
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

    pub(crate) fn block_job_event(&mut self, name: &str, id: &str) {
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
        if source == target {
            return Err(QmpError::generic("Source and target cannot be the same"));
        }
        if self.job(id).is_some() {
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
    pub(crate) fn allocated_clusters(&self, name: &str, out: &mut BTreeSet<u64>) -> QResult<()> {
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
    pub(crate) fn run_backup_copy(&mut self, id: &str) -> QResult<()> {
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
    pub(crate) fn complete_job(&mut self, id: &str) {
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

    pub(crate) fn conclude(&mut self, id: &str) {
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
            // Formats QEMU can create that the fake does not lay out.
            other @ ("luks" | "parallels" | "qed" | "rbd" | "ssh" | "vdi" | "vhdx" | "vmdk"
            | "vpc" | "nfs" | "gluster") => {
                return Err(QmpError::generic(format!(
                    "fake monitor: blockdev-create for driver '{other}' is not modelled"
                )))
            }
            _ => return Err(QmpError::generic("Driver does not support blockdev-create")),
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
}
