//! An in-memory VM for unit-testing backup code: disks are
//! [`MemoryDisk`]s, checkpoints their dirty bitmaps, views point-in-time copies; guest writes
//! and faults are injected.
//!
//! It keeps the contract of [`BackupSource`] the way the QEMU implementation does: one moment
//! for every disk (a guest write through [`FakeVm::guest_write`] falls wholly before or after
//! it), a refused `begin` leaves nothing, an aborted session removes its checkpoint, and a
//! session that is never ended (`std::mem::forget`, the way a killed process ends) leaves
//! views that [`cleanup`](BackupSource::cleanup) finds and removes, and a checkpoint that is
//! pending until [`BackupSession::data_written`], which `cleanup` removes as half-made (the
//! fake has no processes: its `cleanup` treats every session not ended as a killed one's).
//!
//! ```
//! use live_backup::fake::{FakeFault, FakeVm};
//! use live_backup::{BackupSource, BeginRequest};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut vm = FakeVm::new("web-1").with_disk("vda", 4 << 20);
//! vm.guest_write("vda", 0, b"boot")?;
//! let session = vm.begin(&BeginRequest::full("vmsdk-doc-1", vec!["vda".into()]), None)?;
//! let view = session.open("vda")?;
//! let mut sector = [0u8; 4];
//! view.read_at(&mut sector, 0)?;
//! assert_eq!(&sector, b"boot");
//! session.finish()?;
//! assert_eq!(vm.checkpoints()?[0].name, "vmsdk-doc-1");
//!
//! vm.inject(FakeFault::Begin);
//! assert!(vm.begin(&BeginRequest::full("vmsdk-doc-2", vec!["vda".into()]), None).is_err());
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use disk_transport::memory::{Fault, MemoryDisk};
use disk_transport::{Disk, ExtentKind};

use crate::quiesce::{FreezeWindow, Quiesce};
use crate::source::{
    BackupSession, BackupSource, BeginRequest, Checkpoint, CheckpointDisk, CleanupReport,
    Consistency, SessionDisk, SourceDisk, VmIdentity, CHECKPOINT_PREFIX,
};
use crate::{Error, Result};

/// A fault the fake injects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FakeFault {
    /// The next `begin` is refused (QEMU refusing the transaction); nothing is left behind.
    Begin,
    /// Reading the view of `node` at `offset` fails in every session from now on (an NBD
    /// error).
    ViewRead {
        /// The disk.
        node: String,
        /// A byte offset inside the failing range.
        offset: u64,
    },
    /// The next `finish` fails after removing its views (a monitor that went away).
    Finish,
    /// The next `abort` fails and removes nothing (a QEMU that was killed): the session's
    /// views and checkpoint stay for `cleanup`.
    Abort,
    /// The scratch space runs out in the next session: its
    /// [`watch`](BackupSession::watch) gives the views up and answers
    /// [`Error::ScratchFull`], as the QEMU source does when its scratch filesystem fills.
    ScratchFull,
}

type Hook = Box<dyn FnMut(&FakeVm) + Send>;

#[derive(Default)]
struct State {
    name: String,
    disks: BTreeMap<String, MemoryDisk>,
    /// (node, checkpoint) pairs marked inconsistent (a VM that crashed).
    inconsistent: BTreeSet<(String, String)>,
    /// (node, checkpoint) pairs disabled (not recording).
    disabled: BTreeSet<(String, String)>,
    faults: Vec<FakeFault>,
    /// Views of sessions not ended yet, by session number.
    sessions: BTreeMap<u64, Vec<String>>,
    /// Checkpoints made by a `begin` whose data was not written yet (half-made if their
    /// session never ends).
    pending: BTreeSet<String>,
    next_session: u64,
    during_backup: Option<Hook>,
    log: Vec<String>,
}

/// An in-memory VM; clones share it, so a test keeps one to write as the guest while the
/// code under test backs up another. See the [module docs](self).
#[derive(Clone)]
pub struct FakeVm {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("FakeVm")
            .field("name", &state.name)
            .field("disks", &state.disks.keys().collect::<Vec<_>>())
            .field("sessions", &state.sessions.len())
            .finish()
    }
}

impl FakeVm {
    /// A VM named `name` without disks.
    pub fn new(name: impl Into<String>) -> Self {
        FakeVm {
            state: Arc::new(Mutex::new(State {
                name: name.into(),
                ..State::default()
            })),
        }
    }

    /// Adds an empty disk `node` of `size` bytes.
    pub fn with_disk(self, node: impl Into<String>, size: u64) -> Self {
        self.with_memory_disk(node, MemoryDisk::new(size))
    }

    /// Adds `disk` as disk `node`.
    pub fn with_memory_disk(self, node: impl Into<String>, disk: MemoryDisk) -> Self {
        self.lock().disks.insert(node.into(), disk);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest writes `data` at `offset` of `node`: wholly before or wholly after any
    /// backup's moment.
    pub fn guest_write(&self, node: &str, offset: u64, data: &[u8]) -> Result<()> {
        let state = self.lock();
        let disk = state.disks.get(node).ok_or_else(|| no_disk(&state, node))?;
        disk.write_at(data, offset)
            .map_err(|e| Error::disk(format!("guest write to {node}"), e))
    }

    /// The live disk `node` (a handle sharing its data), to read what the guest sees now.
    pub fn disk(&self, node: &str) -> Option<MemoryDisk> {
        self.lock().disks.get(node).cloned()
    }

    /// Injects a fault; see [`FakeFault`].
    pub fn inject(&self, fault: FakeFault) {
        self.lock().faults.push(fault);
    }

    /// Runs `hook` once, inside the next `begin`, just after the point in time is taken:
    /// guest writes it makes land after the checkpoint, while the backup reads.
    pub fn during_next_backup(&self, hook: impl FnMut(&FakeVm) + Send + 'static) {
        self.lock().during_backup = Some(Box::new(hook));
    }

    /// Marks checkpoint `name` on `node` inconsistent, as QEMU does for a persistent bitmap
    /// the VM did not store before it stopped.
    pub fn make_inconsistent(&self, node: &str, name: &str) {
        self.lock()
            .inconsistent
            .insert((node.to_owned(), name.to_owned()));
    }

    /// Disables checkpoint `name` on `node` (it stops recording).
    pub fn disable_checkpoint(&self, node: &str, name: &str) {
        self.lock()
            .disabled
            .insert((node.to_owned(), name.to_owned()));
    }

    /// Deletes checkpoint `name` from `node` behind the backup's back.
    pub fn lose_checkpoint(&self, node: &str, name: &str) -> Result<()> {
        let state = self.lock();
        let disk = state.disks.get(node).ok_or_else(|| no_disk(&state, node))?;
        disk.remove_dirty_bitmap(name)
            .map_err(|e| Error::disk(format!("remove {name} from {node}"), e))
    }

    /// Views of sessions that were never ended (what `cleanup` would remove).
    pub fn leftovers(&self) -> Vec<String> {
        let state = self.lock();
        state
            .sessions
            .iter()
            .flat_map(|(n, views)| {
                views
                    .iter()
                    .map(move |v| format!("view {v} of session {n}"))
            })
            .collect()
    }

    /// Every call the fake received, in order (`begin vmsdk-…`, `finish`, `abort`, ...).
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    fn take_fault(state: &mut State, wanted: &FakeFault) -> bool {
        match state.faults.iter().position(|f| f == wanted) {
            Some(i) => {
                state.faults.remove(i);
                true
            }
            None => false,
        }
    }
}

fn no_disk(state: &State, node: &str) -> Error {
    Error::NoSuchDisk {
        disk: node.to_owned(),
        known: state.disks.keys().cloned().collect(),
    }
}

/// A point-in-time copy of `disk`; with `since`, its `dirty_extents` report what `since`
/// recorded on `disk` up to now.
fn snapshot(disk: &MemoryDisk, since: Option<&str>) -> disk_transport::Result<MemoryDisk> {
    let size = disk.capacity();
    let view = MemoryDisk::new(size);
    let mut buf = Vec::new();
    for extent in disk.allocated_extents(0, size)? {
        if extent.kind != ExtentKind::Data {
            continue;
        }
        buf.resize(extent.length as usize, 0);
        disk.read_at(&mut buf, extent.offset)?;
        view.write_at(&buf, extent.offset)?;
    }
    if let Some(since) = since {
        view.add_dirty_bitmap(since)?;
        let changes = disk.dirty_bitmap_handle(since)?;
        for extent in changes.dirty_extents(0, size)? {
            if extent.dirty {
                // Rewriting a range marks it in the view's bitmap.
                buf.resize(extent.length as usize, 0);
                view.read_at(&mut buf, extent.offset)?;
                view.write_at(&buf, extent.offset)?;
            }
        }
    }
    Ok(view)
}

impl BackupSource for FakeVm {
    fn vm(&mut self) -> Result<VmIdentity> {
        Ok(VmIdentity {
            name: Some(self.lock().name.clone()),
            uuid: None,
            hypervisor: "fake".into(),
        })
    }

    fn disks(&mut self) -> Result<Vec<SourceDisk>> {
        Ok(self
            .lock()
            .disks
            .iter()
            .map(|(node, disk)| SourceDisk {
                node: node.clone(),
                size: disk.capacity(),
                format: "memory".into(),
                file: None,
            })
            .collect())
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        let state = self.lock();
        let mut by_name: BTreeMap<String, Vec<CheckpointDisk>> = BTreeMap::new();
        for (node, disk) in &state.disks {
            for name in disk.dirty_bitmaps() {
                if !name.starts_with(CHECKPOINT_PREFIX) {
                    continue;
                }
                let key = (node.clone(), name.clone());
                by_name.entry(name).or_default().push(CheckpointDisk {
                    node: node.clone(),
                    recording: !state.disabled.contains(&key),
                    persistent: true,
                    inconsistent: state.inconsistent.contains(&key),
                    busy: false,
                    granularity: disk_transport::memory::CHUNK_SIZE,
                });
            }
        }
        Ok(by_name
            .into_iter()
            .map(|(name, disks)| Checkpoint { name, disks })
            .collect())
    }

    fn begin(
        &mut self,
        request: &BeginRequest,
        quiesce: Option<&mut dyn Quiesce>,
    ) -> Result<Box<dyn BackupSession + '_>> {
        let mut state = self.lock();
        state.log.push(format!(
            "begin {}{}",
            request.checkpoint,
            request
                .since
                .as_deref()
                .map(|s| format!(" since {s}"))
                .unwrap_or_default()
        ));
        if FakeVm::take_fault(&mut state, &FakeFault::Begin) {
            return Err(Error::Monitor {
                command: "transaction".into(),
                message: "injected failure: the transaction was refused".into(),
            });
        }
        if !request.checkpoint.starts_with(CHECKPOINT_PREFIX) {
            return Err(Error::Checkpoint {
                name: request.checkpoint.clone(),
                problem: format!("checkpoint names start with {CHECKPOINT_PREFIX}"),
            });
        }
        let mut disks = Vec::new();
        for node in &request.disks {
            let disk = state.disks.get(node).ok_or_else(|| no_disk(&state, node))?;
            let bitmaps = disk.dirty_bitmaps();
            if bitmaps.contains(&request.checkpoint) {
                return Err(Error::Checkpoint {
                    name: request.checkpoint.clone(),
                    problem: format!("exists already on disk {node}"),
                });
            }
            if let Some(since) = &request.since {
                if !bitmaps.contains(since) {
                    return Err(Error::Checkpoint {
                        name: since.clone(),
                        problem: format!("missing on disk {node}"),
                    });
                }
            }
            disks.push((node.clone(), disk.clone()));
        }
        // The moment: every view and every new checkpoint under one lock, frozen around it.
        let window = FreezeWindow::enter(quiesce);
        let mut views = BTreeMap::new();
        for (node, disk) in &disks {
            let view = snapshot(disk, request.since.as_deref())
                .map_err(|e| Error::disk(format!("snapshot of {node}"), e))?;
            views.insert(node.clone(), view);
        }
        for (node, disk) in &disks {
            disk.add_dirty_bitmap(&request.checkpoint)
                .map_err(|e| Error::disk(format!("checkpoint on {node}"), e))?;
        }
        let (frozen, warnings) = window.leave();
        for fault in &state.faults {
            if let FakeFault::ViewRead { node, offset } = fault {
                if let Some(view) = views.get(node) {
                    view.inject(Fault::read_at(*offset));
                }
            }
        }
        let id = state.next_session;
        state.next_session += 1;
        state.sessions.insert(id, views.keys().cloned().collect());
        state.pending.insert(request.checkpoint.clone());
        let scratch_full = FakeVm::take_fault(&mut state, &FakeFault::ScratchFull);
        let hook = state.during_backup.take();
        drop(state);
        if let Some(mut hook) = hook {
            hook(self);
        }
        Ok(Box::new(FakeSession {
            vm: self.clone(),
            id,
            checkpoint: request.checkpoint.clone(),
            since: request.since.clone(),
            disks: disks
                .iter()
                .map(|(node, disk)| SessionDisk {
                    node: node.clone(),
                    size: disk.capacity(),
                })
                .collect(),
            views,
            consistency: Consistency::from_frozen(frozen),
            warnings,
            scratch_full,
            ended: false,
        }))
    }

    fn remove_checkpoint(&mut self, name: &str) -> Result<()> {
        let mut state = self.lock();
        state.log.push(format!("remove-checkpoint {name}"));
        for disk in state.disks.values() {
            if disk.dirty_bitmaps().iter().any(|b| b == name) {
                disk.remove_dirty_bitmap(name)
                    .map_err(|e| Error::disk(format!("remove checkpoint {name}"), e))?;
            }
        }
        state.inconsistent.retain(|(_, n)| n != name);
        state.disabled.retain(|(_, n)| n != name);
        state.pending.remove(name);
        Ok(())
    }

    fn cleanup(&mut self) -> Result<CleanupReport> {
        let mut removed = self.leftovers();
        let mut failed = Vec::new();
        let mut state = self.lock();
        state.log.push("cleanup".into());
        state.sessions.clear();
        for name in std::mem::take(&mut state.pending) {
            for disk in state.disks.values() {
                if disk.dirty_bitmaps().contains(&name) {
                    if let Err(e) = disk.remove_dirty_bitmap(&name) {
                        failed.push(format!("checkpoint {name}: {e}"));
                    }
                }
            }
            removed.push(format!("checkpoint {name} (half-made)"));
        }
        Ok(CleanupReport { removed, failed })
    }
}

/// A session of [`FakeVm`].
struct FakeSession {
    vm: FakeVm,
    id: u64,
    checkpoint: String,
    since: Option<String>,
    disks: Vec<SessionDisk>,
    views: BTreeMap<String, MemoryDisk>,
    consistency: Consistency,
    warnings: Vec<String>,
    /// [`FakeFault::ScratchFull`] was injected for this session.
    scratch_full: bool,
    ended: bool,
}

impl fmt::Debug for FakeSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeSession")
            .field("id", &self.id)
            .field("checkpoint", &self.checkpoint)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

impl FakeSession {
    fn end(&mut self, keep_checkpoint: bool) -> Result<()> {
        self.ended = true;
        let mut state = self.vm.lock();
        if !keep_checkpoint && FakeVm::take_fault(&mut state, &FakeFault::Abort) {
            return Err(Error::Monitor {
                command: "query-jobs".into(),
                message: "injected failure: the monitor connection closed".into(),
            });
        }
        state.sessions.remove(&self.id);
        state.pending.remove(&self.checkpoint);
        state
            .log
            .push(if keep_checkpoint { "finish" } else { "abort" }.into());
        if !keep_checkpoint {
            for disk in &self.disks {
                if let Some(live) = state.disks.get(&disk.node) {
                    let _ = live.remove_dirty_bitmap(&self.checkpoint);
                }
            }
        } else if FakeVm::take_fault(&mut state, &FakeFault::Finish) {
            return Err(Error::Monitor {
                command: "block-export-del".into(),
                message: "injected failure at the end of the session".into(),
            });
        }
        Ok(())
    }
}

impl BackupSession for FakeSession {
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
        if self.scratch_full {
            return Err(Error::ScratchFull {
                dir: "(the fake's scratch space)".into(),
                problem: "is full (FakeFault::ScratchFull): the views were given up".into(),
            });
        }
        Ok(())
    }

    fn data_written(&self) -> Result<()> {
        let mut state = self.vm.lock();
        state.log.push("data-written".into());
        state.pending.remove(&self.checkpoint);
        Ok(())
    }

    fn open(&self, node: &str) -> Result<Box<dyn Disk>> {
        if self.scratch_full {
            return Err(Error::ScratchFull {
                dir: "(the fake's scratch space)".into(),
                problem: "is full (FakeFault::ScratchFull): the views were given up".into(),
            });
        }
        let view = self.views.get(node).ok_or_else(|| Error::NoSuchDisk {
            disk: node.to_owned(),
            known: self.views.keys().cloned().collect(),
        })?;
        let handle = match &self.since {
            Some(since) => view
                .dirty_bitmap_handle(since)
                .map_err(|e| Error::disk(format!("open the view of {node}"), e))?,
            None => view.clone(),
        };
        Ok(Box::new(handle.read_only_handle()))
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.end(true)
    }

    fn abort(mut self: Box<Self>) -> Result<()> {
        self.end(false)
    }
}

impl Drop for FakeSession {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end(false);
        }
    }
}
