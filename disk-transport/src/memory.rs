//! An in-memory fake: sparse disks, a transport that serves them by name, and failure
//! injection — for unit tests of code that reads and writes virtual disks.
//!
//! - [`MemoryDisk`] keeps only the [`CHUNK_SIZE`] chunks that were written, so a 1 TiB disk
//!   costs nothing until used; [`Disk::allocated_extents`] reports exactly those chunks.
//!   Clones are handles to the same disk.
//! - [`MemoryTransport`] serves named disks and applies VDDK's rules when connecting
//!   ([`select_transport`]): a remote connection needs a VM, a powered-on VM needs a snapshot,
//!   read-only connections make every open read-only. It records PrepareForAccess/EndAccess
//!   calls so tests can check that every access was ended.
//! - [`Fault`]s make reads, writes, flushes or extent queries fail at chosen offsets, always or
//!   a number of times.
//! - [`Refusal`]s make the transport refuse a login (ConnectEx), a PrepareForAccess, an Open or
//!   a Cleanup with a VDDK error code ([`Error::Vix`], codes in [`vix`](crate::vix)), as
//!   vCenter does, so the error paths of a backup program are tested without mocks:
//!
//! ```
//! use disk_transport::memory::{MemoryDisk, MemoryTransport, Refusal};
//! use disk_transport::{vix, ConnectParams, DiskTransport};
//!
//! let vcenter = MemoryTransport::new()
//!     .with_disk("[ds1] vm/vm.vmdk", MemoryDisk::new(1 << 20))
//!     .with_refusal(Refusal::login(vix::E_AUTHENTICATION_FAIL).times(1));
//! let params = ConnectParams::builder()
//!     .server("vcenter.example")
//!     .user_password("backup@vsphere.local", "wrong")
//!     .vm("moref=vm-16")
//!     .build()?;
//! let err = vcenter.connect(&params).unwrap_err();
//! assert_eq!(err.vix_code(), Some(35));
//! assert!(err.to_string().contains("SSO domain"));
//! assert!(vcenter.connect(&params).is_ok()); // refused once only
//! # Ok::<(), disk_transport::Error>(())
//! ```
//! - Dirty bitmaps, as QEMU keeps them for incremental backups: after
//!   [`MemoryDisk::add_dirty_bitmap`], every write marks its [`CHUNK_SIZE`] chunks dirty, and a
//!   handle from [`MemoryDisk::dirty_bitmap_handle`] reports them through
//!   [`Disk::dirty_extents`], as an NBD export with `qemu:dirty-bitmap:NAME` does. Your
//!   full-then-incremental backup logic runs against it unchanged.
//!
//! ```
//! use disk_transport::copy::{copy, copy_changed, CopyOptions};
//! use disk_transport::memory::MemoryDisk;
//! use disk_transport::Disk;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = MemoryDisk::new(1 << 30);
//! vm.write_at(b"installed system", 0)?;
//! vm.add_dirty_bitmap("backup-vda")?; // the checkpoint of the full backup
//! let backup = MemoryDisk::new(1 << 30);
//! copy(&vm, &backup, &CopyOptions::default(), &mut |_| {})?;
//!
//! vm.write_at(b"a day of work", 300 << 20)?; // the guest keeps writing
//! let since = vm.dirty_bitmap_handle("backup-vda")?;
//! let report = copy_changed(&since, &backup, &CopyOptions::default(), &mut |_| {})?;
//! assert_eq!(report.progress.total, disk_transport::memory::CHUNK_SIZE); // one chunk changed
//! assert_eq!(backup.to_vec()?, vm.to_vec()?);
//! # Ok(())
//! # }
//! ```
//!
//! See the crate documentation for a complete example.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::mode::{select_transport, StorageKind, TransportContext, TransportMode};
use crate::types::{push_dirty_extent, push_range, DirtyExtent, DiskInfo, Extent, ExtentKind};
use crate::{
    check_range, AccessGuard, CleanupStats, ConnectParams, Connection, Disk, DiskTransport, Error,
    OpenFlags, Result,
};

/// Allocation granularity of [`MemoryDisk`]: 64 KiB, VDDK's minimum `QueryAllocatedBlocks`
/// chunk.
pub const CHUNK_SIZE: u64 = 64 * 1024;

/// Splits the `len` bytes at `offset` along chunk boundaries: for each piece, the chunk's
/// index, where the piece starts within the chunk, and its range within the caller's buffer.
fn chunk_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        (done < len).then(|| {
            let pos = offset + done as u64;
            let within = (pos % CHUNK_SIZE) as usize;
            let n = (CHUNK_SIZE as usize - within).min(len - done);
            let piece = (pos / CHUNK_SIZE, within, done..done + n);
            done += n;
            piece
        })
    })
}

/// Which operation a [`Fault`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultOp {
    /// `read_at` and `submit_read`.
    Read,
    /// `write_at`, `submit_write`, `write_zeroes`, `trim`.
    Write,
    /// `flush`.
    Flush,
    /// `allocated_extents`.
    Extents,
    /// `dirty_extents`.
    DirtyExtents,
}

impl FaultOp {
    fn name(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
            FaultOp::Extents => "extents",
            FaultOp::DirtyExtents => "dirty-extents",
        }
    }
}

/// A failure to inject into a [`MemoryDisk`]: requests of the given kind that overlap the
/// range fail with [`Error::Injected`], always or only the next `n` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    op: FaultOp,
    start: u64,
    end: u64,
    remaining: Option<u32>,
}

impl Fault {
    /// Fails reads that cover byte `offset` (a bad sector).
    pub fn read_at(offset: u64) -> Self {
        Fault::range(FaultOp::Read, offset, 1)
    }
    /// Fails writes that cover byte `offset`.
    pub fn write_at(offset: u64) -> Self {
        Fault::range(FaultOp::Write, offset, 1)
    }
    /// Fails every flush.
    pub fn flush() -> Self {
        Fault::range(FaultOp::Flush, 0, u64::MAX)
    }
    /// Fails every extent query.
    pub fn extents() -> Self {
        Fault::range(FaultOp::Extents, 0, u64::MAX)
    }
    /// Fails every dirty-extent query (a bitmap the server lost, a broken checkpoint).
    pub fn dirty_extents() -> Self {
        Fault::range(FaultOp::DirtyExtents, 0, u64::MAX)
    }
    /// Fails `op` for requests overlapping `[offset, offset + length)`.
    pub fn range(op: FaultOp, offset: u64, length: u64) -> Self {
        Fault {
            op,
            start: offset,
            end: offset.saturating_add(length.max(1)),
            remaining: None,
        }
    }
    /// Fails only the next `n` matching requests, then stops (a transient error).
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

#[derive(Default)]
struct Shared {
    capacity: u64,
    chunks: RwLock<BTreeMap<u64, Box<[u8]>>>,
    faults: Mutex<Vec<Fault>>,
    metadata: Mutex<BTreeMap<String, String>>,
    flushes: Mutex<u64>,
    /// Dirty bitmaps by name: the indices of the chunks written since each was added or cleared.
    bitmaps: Mutex<BTreeMap<String, BTreeSet<u64>>>,
}

/// A sparse in-memory disk. Clones share the data; see the [module docs](self).
#[derive(Clone)]
pub struct MemoryDisk {
    shared: Arc<Shared>,
    read_only: bool,
    transport_mode: Option<TransportMode>,
    /// The bitmap `dirty_extents` reports.
    dirty_bitmap: Option<String>,
}

impl std::fmt::Debug for MemoryDisk {
    // The contents would drown any assertion message: show the shape only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDisk")
            .field("capacity", &self.capacity())
            .field("allocated_bytes", &self.allocated_bytes())
            .field("read_only", &self.read_only)
            .field("transport_mode", &self.transport_mode)
            .field("dirty_bitmap", &self.dirty_bitmap)
            .finish()
    }
}

fn missing_bitmap(name: &str) -> Error {
    Error::NotFound(format!("dirty bitmap {name:?} on this memory disk"))
}

fn poisoned<T>(_: T) -> Error {
    Error::Protocol("memory disk lock poisoned by a panicking thread".into())
}

impl MemoryDisk {
    /// An empty (all-zero, unallocated) disk of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        MemoryDisk {
            shared: Arc::new(Shared {
                capacity,
                ..Shared::default()
            }),
            read_only: false,
            transport_mode: None,
            dirty_bitmap: None,
        }
    }

    /// A disk holding `data` (its size is `data.len()`); all-zero chunks stay unallocated.
    pub fn with_data(data: &[u8]) -> Self {
        let disk = MemoryDisk::new(data.len() as u64);
        {
            let mut chunks = disk
                .shared
                .chunks
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for (index, piece) in data.chunks(CHUNK_SIZE as usize).enumerate() {
                if piece.iter().any(|&b| b != 0) {
                    let mut chunk = vec![0u8; CHUNK_SIZE as usize].into_boxed_slice();
                    chunk[..piece.len()].copy_from_slice(piece);
                    chunks.insert(index as u64, chunk);
                }
            }
        }
        disk
    }

    /// A read-only handle to the same disk.
    pub fn read_only_handle(&self) -> Self {
        MemoryDisk {
            read_only: true,
            ..self.clone()
        }
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// Bytes of memory holding data (allocated chunks × [`CHUNK_SIZE`]).
    pub fn allocated_bytes(&self) -> u64 {
        let chunks = self.shared.chunks.read().unwrap_or_else(|e| e.into_inner());
        chunks.len() as u64 * CHUNK_SIZE
    }

    /// The whole disk as a vector (for small disks in tests).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut out = vec![
            0u8;
            usize::try_from(self.capacity()).map_err(|_| {
                Error::Unsupported("to_vec of a disk larger than the address space".into())
            })?
        ];
        self.copy_out(&mut out, 0)?;
        Ok(out)
    }

    /// How many times `flush` succeeded.
    pub fn flush_count(&self) -> u64 {
        *self
            .shared
            .flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Starts a dirty bitmap: from now on every write, zeroing or trim marks the
    /// [`CHUNK_SIZE`] chunks it touches (QEMU's `block-dirty-bitmap-add`, `qemu-img bitmap
    /// --add`). A name already in use is an error, as in QEMU.
    pub fn add_dirty_bitmap(&self, name: &str) -> Result<()> {
        let mut bitmaps = self.shared.bitmaps.lock().map_err(poisoned)?;
        if bitmaps.contains_key(name) {
            return Err(Error::InvalidParams(format!(
                "dirty bitmap {name:?} already exists"
            )));
        }
        bitmaps.insert(name.to_owned(), BTreeSet::new());
        Ok(())
    }

    /// Marks every chunk of the bitmap clean again (`block-dirty-bitmap-clear`): the checkpoint
    /// of the next incremental backup.
    pub fn clear_dirty_bitmap(&self, name: &str) -> Result<()> {
        self.shared
            .bitmaps
            .lock()
            .map_err(poisoned)?
            .get_mut(name)
            .ok_or_else(|| missing_bitmap(name))?
            .clear();
        Ok(())
    }

    /// Deletes a bitmap (`block-dirty-bitmap-remove`); handles reading it fail afterwards.
    pub fn remove_dirty_bitmap(&self, name: &str) -> Result<()> {
        self.shared
            .bitmaps
            .lock()
            .map_err(poisoned)?
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| missing_bitmap(name))
    }

    /// The names of the bitmaps, sorted.
    pub fn dirty_bitmaps(&self) -> Vec<String> {
        self.shared
            .bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// A handle to the same disk whose [`Disk::dirty_extents`] reports bitmap `name`, as an NBD
    /// export opened with `?dirty-bitmap=NAME` does. A missing bitmap is an error now, not at
    /// the first query.
    pub fn dirty_bitmap_handle(&self, name: &str) -> Result<Self> {
        if !self
            .shared
            .bitmaps
            .lock()
            .map_err(poisoned)?
            .contains_key(name)
        {
            return Err(missing_bitmap(name));
        }
        Ok(MemoryDisk {
            dirty_bitmap: Some(name.to_owned()),
            ..self.clone()
        })
    }

    /// Marks the chunks of `[offset, offset + length)` dirty in every bitmap.
    fn mark_dirty(&self, offset: u64, length: u64) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mut bitmaps = self.shared.bitmaps.lock().map_err(poisoned)?;
        let (first, last) = (offset / CHUNK_SIZE, (offset + length).div_ceil(CHUNK_SIZE));
        for set in bitmaps.values_mut() {
            set.extend(first..last);
        }
        Ok(())
    }

    fn check_fault(&self, op: FaultOp, offset: u64, length: u64) -> Result<()> {
        let mut faults = self.shared.faults.lock().map_err(poisoned)?;
        let end = offset.saturating_add(length.max(1));
        let hit = faults
            .iter_mut()
            .position(|f| f.op == op && f.start < end && offset < f.end && f.remaining != Some(0));
        if let Some(index) = hit {
            let fault = &mut faults[index];
            if let Some(n) = fault.remaining.as_mut() {
                *n -= 1;
            }
            let at = if op == FaultOp::Flush {
                0
            } else {
                fault.start.max(offset)
            };
            faults.retain(|f| f.remaining != Some(0));
            return Err(Error::Injected {
                op: op.name(),
                offset: at,
            });
        }
        Ok(())
    }

    fn copy_out(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let chunks = self.shared.chunks.read().map_err(poisoned)?;
        for (index, within, piece) in chunk_pieces(offset, buf.len()) {
            let n = piece.len();
            match chunks.get(&index) {
                Some(chunk) => buf[piece].copy_from_slice(&chunk[within..within + n]),
                None => buf[piece].fill(0),
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("memory disk".into()));
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, length: u64) -> Result<()> {
        let mut chunks = self.shared.chunks.write().map_err(poisoned)?;
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let index = pos / CHUNK_SIZE;
            let within = pos % CHUNK_SIZE;
            let n = (CHUNK_SIZE - within).min(end - pos);
            if n == CHUNK_SIZE {
                chunks.remove(&index);
            } else if let Some(chunk) = chunks.get_mut(&index) {
                chunk[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
        Ok(())
    }
}

impl Disk for MemoryDisk {
    fn info(&self) -> Result<DiskInfo> {
        Ok(DiskInfo {
            read_only: self.read_only,
            can_extents: true,
            can_multi_conn: true,
            transport_mode: self.transport_mode,
            dirty_bitmap: self.dirty_bitmap.clone(),
            ..DiskInfo::new(self.capacity())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        self.check_fault(FaultOp::Read, offset, buf.len() as u64)?;
        self.copy_out(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.capacity())?;
        self.check_fault(FaultOp::Write, offset, buf.len() as u64)?;
        let mut chunks = self.shared.chunks.write().map_err(poisoned)?;
        for (index, within, piece) in chunk_pieces(offset, buf.len()) {
            let n = piece.len();
            let chunk = chunks
                .entry(index)
                .or_insert_with(|| vec![0u8; CHUNK_SIZE as usize].into_boxed_slice());
            chunk[within..within + n].copy_from_slice(&buf[piece]);
        }
        drop(chunks);
        self.mark_dirty(offset, buf.len() as u64)
    }

    fn flush(&self) -> Result<()> {
        self.check_fault(FaultOp::Flush, 0, 0)?;
        *self.shared.flushes.lock().map_err(poisoned)? += 1;
        Ok(())
    }

    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.capacity())?;
        self.check_fault(FaultOp::Extents, offset, length)?;
        let chunks = self.shared.chunks.read().map_err(poisoned)?;
        let end = offset + length;
        let mut extents = Vec::new();
        let mut pos = offset;
        let first = offset / CHUNK_SIZE;
        let last = end.div_ceil(CHUNK_SIZE);
        for (&index, _) in chunks.range(first..last) {
            let start = (index * CHUNK_SIZE).max(offset);
            let stop = ((index + 1) * CHUNK_SIZE).min(end);
            if start > pos {
                push_range(&mut extents, pos, start, ExtentKind::Hole);
            }
            push_range(&mut extents, start, stop, ExtentKind::Data);
            pos = stop;
        }
        if pos < end {
            push_range(&mut extents, pos, end, ExtentKind::Hole);
        }
        Ok(extents)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, length, self.capacity())?;
        self.check_fault(FaultOp::Write, offset, length)?;
        self.zero_range(offset, length)?;
        self.mark_dirty(offset, length)
    }

    fn dirty_extents(&self, offset: u64, length: u64) -> Result<Vec<DirtyExtent>> {
        let name = self
            .dirty_bitmap
            .as_deref()
            .ok_or_else(|| Error::NoDirtyBitmap {
                what: "this memory disk handle".into(),
                how: "MemoryDisk::dirty_bitmap_handle(NAME)".into(),
            })?;
        check_range(offset, length, self.capacity())?;
        self.check_fault(FaultOp::DirtyExtents, offset, length)?;
        let bitmaps = self.shared.bitmaps.lock().map_err(poisoned)?;
        let set = bitmaps.get(name).ok_or_else(|| missing_bitmap(name))?;
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        for &index in set.range(offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE)) {
            let start = (index * CHUNK_SIZE).max(offset);
            let stop = ((index + 1) * CHUNK_SIZE).min(end);
            for (from, to, dirty) in [(pos, start, false), (start, stop, true)] {
                if to > from {
                    push_dirty_extent(
                        &mut out,
                        DirtyExtent {
                            offset: from,
                            length: to - from,
                            dirty,
                        },
                    );
                }
            }
            pos = stop;
        }
        if pos < end {
            push_dirty_extent(
                &mut out,
                DirtyExtent {
                    offset: pos,
                    length: end - pos,
                    dirty: false,
                },
            );
        }
        Ok(out)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.write_zeroes(offset, length)
    }

    fn metadata_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .shared
            .metadata
            .lock()
            .map_err(poisoned)?
            .keys()
            .cloned()
            .collect())
    }

    fn read_metadata(&self, key: &str) -> Result<String> {
        self.shared
            .metadata
            .lock()
            .map_err(poisoned)?
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("metadata key {key:?}")))
    }

    fn write_metadata(&self, key: &str, value: &str) -> Result<()> {
        self.check_writable()?;
        self.shared
            .metadata
            .lock()
            .map_err(poisoned)?
            .insert(key.to_owned(), value.to_owned());
        Ok(())
    }
}

/// One PrepareForAccess or EndAccess call seen by a [`MemoryTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessEvent {
    /// PrepareForAccess(vm, identity).
    Prepare {
        /// The `vmxSpec` of the parameters.
        vm: String,
        /// The identity string.
        identity: String,
    },
    /// EndAccess(vm, identity).
    End {
        /// The `vmxSpec` of the parameters.
        vm: String,
        /// The identity string.
        identity: String,
    },
}

/// A step of VDDK's access lifecycle that a [`MemoryTransport`] can refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// [`DiskTransport::connect`] (`VixDiskLib_ConnectEx`, where VDDK logs in).
    Login,
    /// [`DiskTransport::prepare_for_access`] (`VixDiskLib_PrepareForAccess`).
    PrepareForAccess,
    /// [`Connection::open`] (`VixDiskLib_Open`).
    Open,
    /// [`DiskTransport::cleanup`] (`VixDiskLib_Cleanup`).
    Cleanup,
}

impl Step {
    fn function(self) -> &'static str {
        match self {
            Step::Login => "VixDiskLib_ConnectEx",
            Step::PrepareForAccess => "VixDiskLib_PrepareForAccess",
            Step::Open => "VixDiskLib_Open",
            Step::Cleanup => "VixDiskLib_Cleanup",
        }
    }
}

/// A lifecycle step a [`MemoryTransport`] refuses with a VDDK error code: the call fails with
/// [`Error::Vix`] (the function's name, the code, VDDK's text for it), always or the next `n`
/// times. A refused PrepareForAccess is not recorded in the access log (nothing to end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    step: Step,
    code: u64,
    disk: Option<String>,
    remaining: Option<u32>,
}

impl Refusal {
    /// Refuses `step` with the `VixError` `code` (see [`vix`](crate::vix)).
    pub fn new(step: Step, code: u64) -> Self {
        Refusal {
            step,
            code,
            disk: None,
            remaining: None,
        }
    }
    /// Refuses logins: a wrong password is [`vix::E_AUTHENTICATION_FAIL`](crate::vix::E_AUTHENTICATION_FAIL).
    pub fn login(code: u64) -> Self {
        Refusal::new(Step::Login, code)
    }
    /// Refuses PrepareForAccess (a VM that does not exist, missing privileges).
    pub fn prepare_for_access(code: u64) -> Self {
        Refusal::new(Step::PrepareForAccess, code)
    }
    /// Refuses every Open (narrow it with [`disk`](Self::disk)).
    pub fn open(code: u64) -> Self {
        Refusal::new(Step::Open, code)
    }
    /// Refuses Cleanup.
    pub fn cleanup(code: u64) -> Self {
        Refusal::new(Step::Cleanup, code)
    }
    /// Refuses only Opens of the disk `name`.
    pub fn disk(mut self, name: impl Into<String>) -> Self {
        self.disk = Some(name.into());
        self
    }
    /// Refuses only the next `n` matching calls, then lets them through.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

#[derive(Debug, Default)]
struct TransportState {
    disks: BTreeMap<String, MemoryDisk>,
    access_log: Vec<AccessEvent>,
    leftover_connections: u32,
    refusals: Vec<Refusal>,
}

impl TransportState {
    /// The error of the first refusal matching `step` (and `disk`), counting it down.
    fn refused(&mut self, step: Step, disk: Option<&str>) -> Result<()> {
        let hit = self.refusals.iter().position(|r| {
            r.step == step
                && r.remaining != Some(0)
                && (r.disk.is_none() || r.disk.as_deref() == disk)
        });
        let Some(index) = hit else { return Ok(()) };
        let refusal = &mut self.refusals[index];
        if let Some(n) = refusal.remaining.as_mut() {
            *n -= 1;
        }
        let code = refusal.code;
        self.refusals.retain(|r| r.remaining != Some(0));
        let function = match disk {
            Some(name) => format!("{}({name:?})", step.function()),
            None => step.function().to_owned(),
        };
        Err(Error::Vix {
            function,
            code,
            message: crate::vix::text(code).unwrap_or("Error").to_owned(),
        })
    }
}

/// Serves [`MemoryDisk`]s by name as a [`DiskTransport`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct MemoryTransport {
    state: Arc<Mutex<TransportState>>,
    modes: Vec<TransportMode>,
    vm_powered_on: Option<bool>,
    storage: StorageKind,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        MemoryTransport::new()
    }
}

impl MemoryTransport {
    /// A transport without disks offering every transport mode.
    pub fn new() -> Self {
        MemoryTransport {
            state: Arc::default(),
            modes: crate::ALL_TRANSPORT_MODES.to_vec(),
            vm_powered_on: None,
            storage: StorageKind::Unknown,
        }
    }

    /// Adds (or replaces) a disk under `name`.
    pub fn with_disk(self, name: impl Into<String>, disk: MemoryDisk) -> Self {
        self.insert(name, disk);
        self
    }

    /// The modes the fake library offers (`ListTransportModes`).
    pub fn with_transport_modes(mut self, modes: impl Into<Vec<TransportMode>>) -> Self {
        self.modes = modes.into();
        self
    }

    /// Pretends the VM is powered on (then connections need a snapshot) or off.
    pub fn with_vm_powered_on(mut self, powered_on: bool) -> Self {
        self.vm_powered_on = Some(powered_on);
        self
    }

    /// Pretends the disks live on this kind of storage (SAN on local storage cannot write).
    pub fn with_storage(mut self, storage: StorageKind) -> Self {
        self.storage = storage;
        self
    }

    /// Adds a [`Refusal`]: a lifecycle step fails with a VDDK error code.
    pub fn with_refusal(self, refusal: Refusal) -> Self {
        self.refuse(refusal);
        self
    }

    /// Adds a [`Refusal`] to a transport in use (clones share them).
    pub fn refuse(&self, refusal: Refusal) {
        self.lock().refusals.push(refusal);
    }

    /// Removes every refusal.
    pub fn clear_refusals(&self) {
        self.lock().refusals.clear();
    }

    /// Pretends `n` connections were left behind by a crash, for [`DiskTransport::cleanup`].
    pub fn with_leftover_state(self, n: u32) -> Self {
        self.lock().leftover_connections = n;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TransportState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a disk under `name`.
    pub fn insert(&self, name: impl Into<String>, disk: MemoryDisk) {
        self.lock().disks.insert(name.into(), disk);
    }

    /// A handle to the named disk.
    pub fn disk(&self, name: &str) -> Option<MemoryDisk> {
        self.lock().disks.get(name).cloned()
    }

    /// The names of all disks.
    pub fn disk_names(&self) -> Vec<String> {
        self.lock().disks.keys().cloned().collect()
    }

    /// Every PrepareForAccess/EndAccess call so far, in order.
    pub fn access_log(&self) -> Vec<AccessEvent> {
        self.lock().access_log.clone()
    }

    /// PrepareForAccess calls not yet matched by EndAccess.
    pub fn accesses_outstanding(&self) -> usize {
        let log = self.lock();
        let prepared = log
            .access_log
            .iter()
            .filter(|e| matches!(e, AccessEvent::Prepare { .. }))
            .count();
        prepared.saturating_sub(log.access_log.len() - prepared)
    }
}

/// The process-wide transport behind `mem://NAME` URIs ([`open_uri`](crate::open_uri)):
/// opening the same name twice gives handles to the same disk.
pub fn shared() -> &'static MemoryTransport {
    static SHARED: OnceLock<MemoryTransport> = OnceLock::new();
    SHARED.get_or_init(MemoryTransport::new)
}

impl DiskTransport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn transport_modes(&self) -> Vec<TransportMode> {
        self.modes.clone()
    }

    fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>> {
        self.lock().refused(Step::Login, None)?;
        let plan = select_transport(
            params.transport_modes(),
            &TransportContext {
                available: self.modes.clone(),
                remote: params.is_remote(),
                has_snapshot: params.snapshot().is_some(),
                vm_powered_on: self.vm_powered_on,
                storage: self.storage,
                read_only: params.read_only(),
            },
        )?;
        Ok(Box::new(MemoryConnection {
            transport: self.clone(),
            read_only: plan.read_only,
            mode: plan.mode,
        }))
    }

    fn prepare_for_access(&self, params: &ConnectParams, identity: &str) -> Result<AccessGuard> {
        let vm = params
            .vm()
            .ok_or_else(|| {
                Error::InvalidParams(
                    "PrepareForAccess needs connection parameters naming one VM".into(),
                )
            })?
            .to_owned();
        let mut state = self.lock();
        state.refused(Step::PrepareForAccess, None)?;
        state.access_log.push(AccessEvent::Prepare {
            vm: vm.clone(),
            identity: identity.to_owned(),
        });
        drop(state);
        let state = self.state.clone();
        Ok(AccessGuard::new(identity, move |identity| {
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .access_log
                .push(AccessEvent::End {
                    vm,
                    identity: identity.to_owned(),
                });
            Ok(())
        }))
    }

    fn cleanup(&self, _params: &ConnectParams) -> Result<CleanupStats> {
        let mut state = self.lock();
        state.refused(Step::Cleanup, None)?;
        let cleaned_up = std::mem::take(&mut state.leftover_connections);
        Ok(CleanupStats {
            cleaned_up,
            remaining: 0,
        })
    }
}

#[derive(Debug)]
struct MemoryConnection {
    transport: MemoryTransport,
    read_only: bool,
    mode: TransportMode,
}

impl Connection for MemoryConnection {
    fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
        self.transport.lock().refused(Step::Open, Some(path))?;
        let disk = self.transport.disk(path).ok_or_else(|| {
            Error::NotFound(format!(
                "memory disk {path:?} (have: {})",
                self.transport.disk_names().join(", ")
            ))
        })?;
        let flags = flags.effective(self.read_only);
        Ok(Box::new(MemoryDisk {
            read_only: flags.read_only,
            transport_mode: Some(self.mode),
            ..disk
        }))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_disk_costs_nothing_and_reports_extents() {
        let disk = MemoryDisk::new(1 << 40);
        assert_eq!(disk.allocated_bytes(), 0);
        disk.write_at(&[1, 2, 3], CHUNK_SIZE - 1).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * CHUNK_SIZE);
        let mut buf = [9u8; 5];
        disk.read_at(&mut buf, CHUNK_SIZE - 2).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 0]);
        let extents = disk.allocated_extents(0, 1 << 40).unwrap();
        assert_eq!(
            extents,
            vec![
                Extent {
                    offset: 0,
                    length: 2 * CHUNK_SIZE,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 2 * CHUNK_SIZE,
                    length: (1 << 40) - 2 * CHUNK_SIZE,
                    kind: ExtentKind::Hole
                },
            ]
        );
        let part = disk.allocated_extents(100, CHUNK_SIZE * 3).unwrap();
        assert_eq!(part[0].offset, 100);
        assert_eq!(part.last().unwrap().end(), 100 + CHUNK_SIZE * 3);
        disk.write_zeroes(0, 2 * CHUNK_SIZE).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn out_of_range_and_read_only_are_errors() {
        let disk = MemoryDisk::new(1000);
        let mut buf = [0u8; 10];
        assert!(matches!(
            disk.read_at(&mut buf, 995),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(&mut buf, u64::MAX),
            Err(Error::OutOfRange { .. })
        ));
        let ro = disk.read_only_handle();
        assert!(matches!(ro.write_at(&buf, 0), Err(Error::ReadOnly(_))));
        assert!(ro.info().unwrap().read_only);
    }

    #[test]
    fn faults_fire_where_and_as_often_as_asked() {
        let disk = MemoryDisk::with_data(&[7u8; 3 * CHUNK_SIZE as usize]);
        disk.inject(Fault::read_at(CHUNK_SIZE + 5).times(2));
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        disk.read_at(&mut buf, 0).unwrap();
        for _ in 0..2 {
            match disk.read_at(&mut buf, CHUNK_SIZE) {
                Err(Error::Injected { op: "read", offset }) => assert_eq!(offset, CHUNK_SIZE + 5),
                other => panic!("unexpected {other:?}"),
            }
        }
        disk.read_at(&mut buf, CHUNK_SIZE).unwrap();
        disk.inject(Fault::flush());
        assert!(disk.flush().is_err());
        disk.clear_faults();
        disk.flush().unwrap();
        assert_eq!(disk.flush_count(), 1);
        disk.inject(Fault::write_at(0));
        assert!(disk.write_at(&[1], 0).is_err());
        disk.inject(Fault::extents().times(1));
        assert!(disk.allocated_extents(0, 10).is_err());
        assert!(disk.allocated_extents(0, 10).is_ok());
    }

    #[test]
    fn transport_enforces_vddk_rules() {
        let t = MemoryTransport::new()
            .with_disk("d", MemoryDisk::new(4096))
            .with_vm_powered_on(true);
        let remote = ConnectParams::builder()
            .server("esx")
            .vm("moref=2")
            .user_password("root", "pw")
            .build()
            .unwrap();
        assert!(t
            .connect(&remote)
            .unwrap_err()
            .to_string()
            .contains("snapshot"));
        let with_snapshot = ConnectParams::builder()
            .server("esx")
            .vm("moref=2")
            .snapshot("snapshot-47")
            .user_password("root", "pw")
            .build()
            .unwrap();
        let c = t.connect(&with_snapshot).unwrap();
        assert!(c.read_only());
        let d = c.open("d", OpenFlags::read_write()).unwrap();
        let info = d.info().unwrap();
        assert!(info.read_only);
        assert_eq!(info.transport_mode, Some(TransportMode::San));
        assert!(d.write_at(&[1], 0).is_err());
        assert!(matches!(
            c.open("nope", OpenFlags::read_only()),
            Err(Error::NotFound(_))
        ));
        assert_eq!(t.list_transport_modes(), "file:san:hotadd:nbdssl:nbd");
    }

    #[test]
    fn access_guard_is_recorded() {
        let t = MemoryTransport::new().with_leftover_state(2);
        let params = ConnectParams::builder()
            .server("vc")
            .vm("moref=vm-16")
            .user_password("u", "p")
            .build()
            .unwrap();
        let guard = t.prepare_for_access(&params, "backup-app").unwrap();
        assert_eq!(t.accesses_outstanding(), 1);
        drop(guard);
        assert_eq!(t.accesses_outstanding(), 0);
        assert_eq!(t.access_log().len(), 2);
        assert!(t.prepare_for_access(&ConnectParams::local(), "x").is_err());
        assert_eq!(t.cleanup(&params).unwrap().cleaned_up, 2);
        assert_eq!(t.cleanup(&params).unwrap().cleaned_up, 0);
    }

    #[test]
    fn refusals_fail_each_step_with_vddk_codes() {
        use crate::{vix, vix_hint};
        let t = MemoryTransport::new()
            .with_disk("a.vmdk", MemoryDisk::new(CHUNK_SIZE))
            .with_disk("b.vmdk", MemoryDisk::new(CHUNK_SIZE))
            .with_leftover_state(1)
            .with_refusal(Refusal::login(vix::E_AUTHENTICATION_FAIL).times(2))
            .with_refusal(Refusal::prepare_for_access(vix::E_FILE_ACCESS_ERROR).times(1))
            .with_refusal(Refusal::open(vix::E_FILE_NOT_FOUND).disk("b.vmdk"))
            .with_refusal(Refusal::cleanup(vix::E_FAIL).times(1));
        let params = ConnectParams::builder()
            .server("vc")
            .vm("moref=vm-16")
            .snapshot("snapshot-1")
            .user_password("u", "p")
            .build()
            .unwrap();
        for _ in 0..2 {
            let err = t.connect(&params).unwrap_err();
            assert_eq!(err.vix_code(), Some(35));
            assert_eq!(
                err.to_string(),
                format!(
                    "VDDK VixDiskLib_ConnectEx failed: Authentication failed (VixError 35); {}",
                    vix_hint(35).unwrap()
                )
            );
        }
        let connection = t.connect(&params).unwrap();

        let err = t.prepare_for_access(&params, "app").unwrap_err();
        assert_eq!(err.vix_code(), Some(13));
        assert!(
            t.access_log().is_empty(),
            "a refused PrepareForAccess has nothing to end"
        );
        drop(t.prepare_for_access(&params, "app").unwrap());
        assert_eq!(t.accesses_outstanding(), 0);

        assert!(connection.open("a.vmdk", OpenFlags::read_only()).is_ok());
        let err = connection
            .open("b.vmdk", OpenFlags::read_only())
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "VDDK VixDiskLib_Open(\"b.vmdk\") failed: A file was not found (VixError 4)"
            ),
            "{err}"
        );
        assert_eq!(
            connection
                .open("b.vmdk", OpenFlags::read_only())
                .unwrap_err()
                .vix_code(),
            Some(4),
            "refused until cleared"
        );

        assert_eq!(t.cleanup(&params).unwrap_err().vix_code(), Some(1));
        assert_eq!(t.cleanup(&params).unwrap().cleaned_up, 1);
        t.clear_refusals();
        assert!(connection.open("b.vmdk", OpenFlags::read_only()).is_ok());
    }

    #[test]
    fn debug_shows_the_shape_not_the_data() {
        let d = MemoryDisk::with_data(&[0xAB; 4 * CHUNK_SIZE as usize]);
        let text = format!("{d:?}");
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("allocated_bytes: 262144"), "{text}");
    }

    #[test]
    fn dirty_bitmaps_track_writes_like_qemu() {
        let disk = MemoryDisk::new(16 * CHUNK_SIZE);
        disk.write_at(b"before", 0).unwrap();
        assert!(matches!(
            disk.dirty_extents(0, 10),
            Err(Error::NoDirtyBitmap { .. })
        ));
        assert!(disk.dirty_bitmap_handle("b0").is_err());
        disk.add_dirty_bitmap("b0").unwrap();
        assert!(disk.add_dirty_bitmap("b0").is_err(), "names are unique");
        let b0 = disk.dirty_bitmap_handle("b0").unwrap();
        assert_eq!(b0.info().unwrap().dirty_bitmap.as_deref(), Some("b0"));
        assert_eq!(
            b0.dirty_extents(0, 16 * CHUNK_SIZE).unwrap(),
            vec![DirtyExtent {
                offset: 0,
                length: 16 * CHUNK_SIZE,
                dirty: false
            }]
        );
        // A write across a chunk boundary, a zeroing, a trim; a failed write marks nothing.
        disk.write_at(&[1; 10], 2 * CHUNK_SIZE - 5).unwrap();
        disk.write_zeroes(5 * CHUNK_SIZE, 1).unwrap();
        disk.trim(9 * CHUNK_SIZE, CHUNK_SIZE).unwrap();
        disk.inject(Fault::write_at(12 * CHUNK_SIZE));
        assert!(disk.write_at(&[1], 12 * CHUNK_SIZE).is_err());
        disk.clear_faults();
        let d = |offset: u64, chunks: u64, dirty| DirtyExtent {
            offset: offset * CHUNK_SIZE,
            length: chunks * CHUNK_SIZE,
            dirty,
        };
        assert_eq!(
            b0.dirty_extents(0, 16 * CHUNK_SIZE).unwrap(),
            vec![
                d(0, 1, false),
                d(1, 2, true),
                d(3, 2, false),
                d(5, 1, true),
                d(6, 3, false),
                d(9, 1, true),
                d(10, 6, false)
            ]
        );
        // Asked ranges are clipped exactly.
        let part = b0.dirty_extents(CHUNK_SIZE + 3, 10).unwrap();
        assert_eq!(part, vec![DirtyExtent::dirty(CHUNK_SIZE + 3, 10)]);
        // A second bitmap starts clean; clearing one leaves the other.
        disk.add_dirty_bitmap("b1").unwrap();
        disk.write_at(b"x", 15 * CHUNK_SIZE).unwrap();
        disk.clear_dirty_bitmap("b0").unwrap();
        assert_eq!(disk.dirty_bitmaps(), vec!["b0", "b1"]);
        let b1 = disk.dirty_bitmap_handle("b1").unwrap();
        assert_eq!(
            b1.dirty_extents(0, 16 * CHUNK_SIZE).unwrap(),
            vec![d(0, 15, false), d(15, 1, true)]
        );
        assert!(b0
            .dirty_extents(0, 16 * CHUNK_SIZE)
            .unwrap()
            .iter()
            .all(|e| !e.dirty));
        // Faults, out-of-range queries, removed bitmaps.
        disk.inject(Fault::dirty_extents().times(1));
        assert!(matches!(
            b1.dirty_extents(0, 1),
            Err(Error::Injected {
                op: "dirty-extents",
                ..
            })
        ));
        assert!(b1.dirty_extents(0, 1).is_ok());
        assert!(matches!(
            b1.dirty_extents(16 * CHUNK_SIZE, 1),
            Err(Error::OutOfRange { .. })
        ));
        disk.remove_dirty_bitmap("b1").unwrap();
        assert!(matches!(b1.dirty_extents(0, 1), Err(Error::NotFound(_))));
        assert!(disk.remove_dirty_bitmap("b1").is_err());
    }

    #[test]
    fn metadata_round_trips() {
        let d = MemoryDisk::new(512);
        d.write_metadata("uuid", "60 00 C2 9b").unwrap();
        assert_eq!(d.metadata_keys().unwrap(), vec!["uuid"]);
        assert_eq!(d.read_metadata("uuid").unwrap(), "60 00 C2 9b");
        assert!(d.read_metadata("missing").is_err());
    }
}
