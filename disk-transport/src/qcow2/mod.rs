//! qcow2 images: create, open read-only or read-write, read through backing chains, write,
//! zero, discard, with extents that tell data, zeros and the backing chain apart.
//!
//! Written on QEMU's specification (`docs/interop/qcow2.txt`) and split as QEMU splits its
//! driver: `header` (`qcow2.c`: header, extensions, feature checks), `cluster`
//! (`qcow2-cluster.c`: L1/L2 entries, compressed clusters), `refcount`
//! (`qcow2-refcount.c`: reference counts, allocation). The I/O is synchronous `pread`/`pwrite`
//! on the image file.
//!
//! ```
//! use disk_transport::qcow2::{BackingFormat, CreateOptions, Qcow2Disk};
//! use disk_transport::Disk;
//!
//! # fn main() -> disk_transport::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let full = dir.path().join("full.qcow2");
//! let disk = Qcow2Disk::create(&full, &CreateOptions::new(1 << 30))?;
//! disk.write_at(&[7u8; 65536], 0)?;
//! disk.flush()?;
//! drop(disk);
//!
//! // An incremental backup: an overlay holding only what changed.
//! let inc = dir.path().join("inc1.qcow2");
//! let overlay = Qcow2Disk::create(
//!     &inc,
//!     &CreateOptions::new(1 << 30).backing("full.qcow2", BackingFormat::Qcow2),
//! )?;
//! overlay.write_at(&[9u8; 512], 65536)?;
//! let mut check = [0u8; 2];
//! overlay.read_at(&mut check, 65535)?; // the last byte of full, the first of inc1
//! assert_eq!(check, [7, 9]);
//! assert_eq!(overlay.chain().len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! # Formats are never probed
//! A file is opened as qcow2 because its name ends in `.qcow2` or its URI says `qcow2:`
//! ([`factory`](crate::factory)), and its backing file with the format its header names (the
//! backing format extension). A file that is not what it is said to be is an
//! [`Error::Format`]; an image whose header names no backing format is refused (set one with
//! `qemu-img rebase -u -b NAME -F FORMAT`). Backing names are resolved relative to the image's
//! directory; chains deeper than [`MAX_CHAIN_DEPTH`] and loops are errors.
//!
//! # What is supported
//! - Versions 2 and 3, cluster sizes 512 bytes to 2 MiB (images are created with 4 KiB to
//!   2 MiB), refcount widths 1 to 64 bits, zero clusters, zlib-compressed clusters (read, and
//!   rewritten uncompressed when written to).
//! - Refused with an [`Error::Format`] naming the feature: encryption, external data files,
//!   extended L2 entries (subclusters), compression types other than zlib (zstd), a set dirty
//!   bit (lazy refcounts left inconsistent) or corrupt bit, unknown incompatible features.
//!   Images with internal snapshots open read-only only.
//! - A writable open clears the autoclear feature bits, as QEMU does for the bits it does not
//!   maintain, and **drops the persistent dirty bitmaps stored in the image** (their clusters
//!   are freed, so `qemu-img check` finds no leak): this crate does not track writes in them.
//!   Keep bitmaps on the VM's disk, not in backup images; read-only opens leave them alone.
//!
//! # Concurrency and crashes
//! A [`Qcow2Disk`] may be shared by threads: allocations and table updates are serialised by
//! one lock, data writes are not. A write that needs new clusters allocates them (refcount 1)
//! and claims its guest clusters under the lock, writes its data outside it, then publishes
//! the L2 entries under the lock again, so a reader never sees an entry pointing to data not
//! written yet, and a second writer to a claimed cluster waits for the entry rather than
//! allocate the cluster twice; a run of new clusters is contiguous at the end of the file and
//! written with one `pwrite`. A write in place claims its clusters too, so that a trim or
//! zeroing of them waits for it. A host cluster freed while reads are in flight (a read looks
//! its clusters up under the lock and reads outside it) is not used again until those reads
//! have ended, so a read racing a trim never returns what another cluster, or metadata, wrote
//! there since. The `pwrite`s into the image go one at a time, as the
//! kernel's page cache takes them (waiting in user space, not spinning in the kernel); while
//! one thread writes, the others receive, read and hash. Metadata is written
//! through as it changes (data and refcounts first, then the table entry pointing to them),
//! and [`Disk::flush`] is an `fsync`. A crash before a flush can leave leaked clusters that
//! `qemu-img check -r leaks` reclaims.
//!
//! # Image locking
//! A writable open locks the image as QEMU does (open file description locks on bytes 100 +
//! permission and 200 + permission of the file, `block/file-posix.c`): QEMU, qemu-img and
//! qemu-nbd refuse an image open here for writing (`Failed to get shared "write" lock`), and
//! a writable open fails with an [`Error::Io`] of kind `ResourceBusy` while one of them has
//! the image open for writing, or without sharing writes (`qemu-img info` without `-U`). Two
//! writable opens of one image, even in one process, exclude each other. Read-only opens take
//! no locks, like `qemu-img -U`.

mod cluster;
#[allow(unsafe_code)]
mod ffi;
mod header;
mod refcount;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::file::{FileDisk, FileOptions};
use crate::types::{push_extent, DiskInfo, Extent, ExtentKind};
use crate::{check_range, Disk, Error, Result, TransportMode};

use cluster::{Mapping, COPIED};
pub use header::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// The deepest backing chain opened: an image and this many backing files below it.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// The default cluster size of new images (QEMU's).
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;

/// The format of a backing file, as the backing format extension names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackingFormat {
    /// Another qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl BackingFormat {
    /// The name QEMU writes: `qcow2`, `raw`.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

impl std::fmt::Display for BackingFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to create a qcow2 image ([`Qcow2Disk::create`]): version 3, 16-bit refcounts, zlib.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CreateOptions {
    size: u64,
    cluster_size: u32,
    backing: Option<(String, BackingFormat)>,
}

impl CreateOptions {
    /// An image of `size` bytes with 64 KiB clusters and no backing file.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
        }
    }

    /// The cluster size: a power of two from 4 KiB to 2 MiB.
    pub fn cluster_size(mut self, bytes: u32) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// A backing file, written into the header as given (a relative name is relative to the
    /// new image's directory), with its format. It must exist and open.
    pub fn backing(mut self, name: impl Into<String>, format: BackingFormat) -> Self {
        self.backing = Some((name.into(), format));
        self
    }
}

/// One image of a backing chain, top first ([`Qcow2Disk::chain`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainLink {
    /// The file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: BackingFormat,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
}

/// One run of `qemu-img map --output=json`: what a range reads from and at which depth of the
/// chain (0 is the top image), the same fields with the same meaning, so the two compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// The image of the chain that defines the range (NBD's `qemu:allocation-depth` minus 1).
    pub depth: u32,
    /// Whether that image allocates the range (false: no image does and it reads as zeros).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range holds data.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Host offset of the data in that image's file, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

fn push_map(out: &mut Vec<MapEntry>, entry: MapEntry) {
    if entry.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, entry.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.start + last.length == entry.start
            && last.depth == entry.depth
            && last.present == entry.present
            && last.zero == entry.zero
            && last.data == entry.data
            && last.compressed == entry.compressed
            && contiguous
        {
            last.length += entry.length;
            return;
        }
    }
    out.push(entry);
}

/// The image file with error context.
#[derive(Debug)]
struct ImageFile {
    file: File,
    path: PathBuf,
    /// The lock bytes this open holds ([`lock_for_writing`]).
    locked: Vec<u64>,
    /// Held around every write; see [`ImageFile::write_all_at`].
    writing: Mutex<()>,
}

impl Drop for ImageFile {
    /// Releases the locks before the file closes: a child process forked by another thread
    /// shares the open file (and so its locks) until it execs, and QEMU's tools started right
    /// after the image is dropped must not find it still locked.
    fn drop(&mut self) {
        for &offset in &self.locked {
            let _ = ffi::unlock_byte(&self.file, offset);
        }
    }
}

impl ImageFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!("read {what} of {}", self.path.display()),
                Some(offset),
                e,
            )
        })
    }

    /// Writes through the page cache, one write at a time. The kernel runs page-cache writes
    /// of one file one after the other anyway (tmpfs, ext4 and xfs take the inode's lock
    /// exclusively), and a writer that finds that lock taken spins on it while the holder
    /// copies: copying an NBD export into a qcow2 on tmpfs with two threads, a fifth of the
    /// CPU time went to that spinning (as [`FileDisk`] found before). Waiting here sleeps
    /// instead, leaving the CPU to the threads receiving data and to the NBD server.
    fn write_all_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                format!("write {what} of {}", self.path.display()),
                Some(offset),
                e,
            )
        })
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("fsync {} ({what})", self.path.display()), None, e))
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Format {
            path: self.path.display().to_string(),
            reason,
        }
    }
}

/// A read of [`Qcow2Disk::read_at`] in flight, with its ticket; see
/// [`Metadata::quarantined`].
struct ReadInFlight<'a> {
    disk: &'a Qcow2Disk,
    ticket: u64,
}

impl Drop for ReadInFlight<'_> {
    fn drop(&mut self) {
        let mut meta = self.disk.lock();
        meta.reading.remove(&self.ticket);
        // What was freed after every read still in flight began is safe to use again.
        let oldest = meta.reading.first().copied().unwrap_or(meta.next_ticket);
        while meta
            .quarantined
            .front()
            .is_some_and(|&(_, freed_at)| freed_at <= oldest)
        {
            let (host, _) = meta.quarantined.pop_front().expect("front was checked");
            meta.freed.push(host);
        }
    }
}

/// A few tables by host offset, the least recently used dropped first.
#[derive(Debug)]
struct TableCache<T> {
    tables: HashMap<u64, (T, u64)>,
    capacity: usize,
    tick: u64,
}

impl<T> TableCache<T> {
    fn new(capacity: usize) -> Self {
        TableCache {
            tables: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    fn contains(&self, offset: u64) -> bool {
        self.tables.contains_key(&offset)
    }

    fn get(&mut self, offset: u64) -> Option<&T> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            &*t
        })
    }

    fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            t
        })
    }

    fn insert(&mut self, offset: u64, table: T) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            if let Some(oldest) = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.tables.remove(&oldest);
            }
        }
        self.tick += 1;
        self.tables.insert(offset, (table, self.tick));
    }
}

/// The mutable metadata: L1 table, cached L2 tables, refcounts, the allocation frontier.
#[derive(Debug)]
struct Metadata {
    cluster_bits: u32,
    l1: Vec<u64>,
    l1_offset: u64,
    l2: TableCache<Vec<u64>>,
    refcount_table: Vec<u64>,
    refcount_table_offset: u64,
    refcount_order: u32,
    blocks: TableCache<Vec<u8>>,
    /// The first host offset past everything allocated: where new clusters go.
    end: u64,
    /// Clusters whose refcount dropped to zero in this session, to be used again.
    freed: Vec<u64>,
    /// Set while the refcount table moves (its entries are written with the new table).
    moving_table: bool,
    /// Guest clusters a writer is writing outside the lock, as (first, count): allocating
    /// them (their entries are not published yet), or in place (their hosts must not be
    /// freed until the data is in).
    claims: Vec<(u64, u64)>,
    /// Writers waiting in [`Qcow2Disk::wait_unclaimed`]: only then does a claim's end wake
    /// anyone (a wake-up costs a system call even when nobody waits).
    waiting: usize,
    /// The tickets of the reads between looking their clusters up and reading them, outside
    /// the lock; each read takes the next ticket, so the first is the oldest.
    reading: BTreeSet<u64>,
    /// The ticket the next read takes.
    next_ticket: u64,
    /// Host clusters freed while reads were in flight, with the next ticket at that moment,
    /// in that order: a read that began before may still be about to read such a cluster,
    /// so it is not handed out again (to another guest cluster, or for metadata) until every
    /// such read has ended. Their refcounts are zero on disk already.
    quarantined: VecDeque<(u64, u64)>,
}

impl Metadata {
    /// Whether a writer has claimed any guest cluster of `[first, first + count)`.
    fn claimed(&self, first: u64, count: u64) -> bool {
        self.claims
            .iter()
            .any(|&(f, n)| f < first + count && first < f + n)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The L2 table mapping L1 index `index`, loaded, or `None` when unallocated.
    fn l2_table(&mut self, io: &ImageFile, index: u64) -> Result<Option<u64>> {
        let entry = self.l1.get(index as usize).copied().unwrap_or(0);
        let Some(offset) =
            cluster::decode_l1(entry, self.cluster_bits).map_err(|r| io.corrupt(r))?
        else {
            return Ok(None);
        };
        if !self.l2.contains(offset) {
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            io.read_exact_at(&mut bytes, offset, "L2 table")?;
            let table = bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect();
            self.l2.insert(offset, table);
        }
        Ok(Some(offset))
    }

    /// The raw L2 entries of `count` guest clusters from `first` (0 where no L2 table exists).
    fn entries(&mut self, io: &ImageFile, first: u64, count: u64) -> Result<Vec<u64>> {
        let per_table = self.l2_entries();
        let mut out = Vec::with_capacity(count as usize);
        let mut cluster = first;
        while cluster < first + count {
            let index = cluster / per_table;
            let from = cluster % per_table;
            let n = (per_table - from).min(first + count - cluster);
            match self.l2_table(io, index)? {
                None => out.extend(std::iter::repeat_n(0, n as usize)),
                Some(offset) => {
                    let table = self.l2.get(offset).expect("just loaded");
                    out.extend_from_slice(&table[from as usize..(from + n) as usize]);
                }
            }
            cluster += n;
        }
        Ok(out)
    }

    /// Writes the L2 entries of `entries.len()` guest clusters from `first`, allocating L2
    /// tables where needed (but not for entries that are all 0 under an unallocated table).
    fn set_entries(&mut self, io: &ImageFile, first: u64, entries: &[u64]) -> Result<()> {
        let per_table = self.l2_entries();
        let mut done = 0u64;
        while done < entries.len() as u64 {
            let cluster = first + done;
            let index = cluster / per_table;
            let from = cluster % per_table;
            let n = (per_table - from).min(entries.len() as u64 - done);
            let part = &entries[done as usize..(done + n) as usize];
            done += n;
            let offset = match self.l2_table(io, index)? {
                Some(offset) => {
                    if self.l1[index as usize] & COPIED == 0 {
                        return Err(io.corrupt(format!(
                            "the L2 table at {offset:#x} is shared (internal snapshots): \
                             writing it is not supported"
                        )));
                    }
                    offset
                }
                None if part.iter().all(|&e| e == 0) => continue,
                None => {
                    let offset = self.allocate(io)?;
                    let zeros = vec![0u8; self.cluster_size() as usize];
                    io.write_all_at(&zeros, offset, "new L2 table")?;
                    self.l2
                        .insert(offset, vec![0u64; self.l2_entries() as usize]);
                    self.l1[index as usize] = offset | COPIED;
                    io.write_all_at(
                        &(offset | COPIED).to_be_bytes(),
                        self.l1_offset + index * 8,
                        "L1 table",
                    )?;
                    offset
                }
            };
            let table = self.l2.get_mut(offset).expect("loaded");
            table[from as usize..(from + n) as usize].copy_from_slice(part);
            let bytes: Vec<u8> = part.iter().flat_map(|e| e.to_be_bytes()).collect();
            io.write_all_at(&bytes, offset + from * 8, "L2 table")?;
        }
        Ok(())
    }

    /// Drops the references an old mapping held (after its entry was replaced).
    fn release(&mut self, io: &ImageFile, old: Mapping) -> Result<()> {
        match old {
            Mapping::Unallocated | Mapping::Zero { host: None } => Ok(()),
            Mapping::Zero { host: Some(host) } | Mapping::Data { host, .. } => {
                self.adjust_refcount(io, host, -1)
            }
            Mapping::Compressed { offset, length } => {
                let (first, last) =
                    cluster::compressed_host_clusters(offset, length, self.cluster_bits);
                let mut host = first;
                while host <= last {
                    self.adjust_refcount(io, host, -1)?;
                    host += self.cluster_size();
                }
                Ok(())
            }
        }
    }
}

/// The image below another in a chain.
enum Backing {
    Qcow2(Box<Qcow2Disk>),
    Raw(FileDisk, PathBuf),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Qcow2(d) => d.fmt(f),
            Backing::Raw(_, path) => f.debug_tuple("Raw").field(path).finish(),
        }
    }
}

impl Backing {
    fn disk(&self) -> &dyn Disk {
        match self {
            Backing::Qcow2(d) => d.as_ref(),
            Backing::Raw(d, _) => d,
        }
    }

    fn capacity(&self) -> u64 {
        match self {
            Backing::Qcow2(d) => d.header.size,
            Backing::Raw(d, _) => d.info().map(|i| i.capacity).unwrap_or(0),
        }
    }
}

/// Guest clusters claimed by one write, and the new host clusters it has not published yet
/// (none for a write in place). Dropped (after publishing, on an error or a panic) it frees
/// what was not published, drops the claim and wakes the writers waiting for it.
struct Claim<'a> {
    disk: &'a Qcow2Disk,
    first: u64,
    count: u64,
    unpublished: Vec<Vec<u64>>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut meta = self.disk.lock();
        for host in self.unpublished.iter().flatten() {
            // Nothing points to it: give it back rather than leak it (a failure here leaks it,
            // which `qemu-img check -r leaks` repairs).
            let _ = meta.adjust_refcount(&self.disk.io, *host, -1);
        }
        if let Some(at) = meta
            .claims
            .iter()
            .position(|&c| c == (self.first, self.count))
        {
            meta.claims.swap_remove(at);
        }
        let wake = meta.waiting > 0;
        drop(meta);
        if wake {
            self.disk.published.notify_all();
        }
    }
}

/// An open qcow2 image and its backing chain; see the [module docs](self).
pub struct Qcow2Disk {
    io: ImageFile,
    header: header::Header,
    read_only: bool,
    backing: Option<Backing>,
    meta: Mutex<Metadata>,
    /// Signalled whenever a writer publishes (or gives up) the clusters it claimed.
    published: Condvar,
    /// Data bytes written through the page cache so far; see [`Qcow2Disk::write_back_early`].
    written: AtomicU64,
}

impl std::fmt::Debug for Qcow2Disk {
    /// The image and its chain, not the cached tables.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.io.path)
            .field("version", &self.header.version)
            .field("cluster_size", &self.cluster_size())
            .field("size", &self.header.size)
            .field("read_only", &self.read_only)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// How many bytes of data written start their write-back (as the `file` backend does).
const WRITE_BACK_WINDOW: u64 = 32 << 20;

impl Qcow2Disk {
    /// Opens an image read-only, and its backing chain.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_in_chain(path.as_ref(), true, &mut Vec::new())
    }

    /// Opens an image read-write (its backing chain read-only). Clears the autoclear feature
    /// bits: persistent bitmaps in the image are dropped.
    pub fn open_read_write(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_in_chain(path.as_ref(), false, &mut Vec::new())
    }

    /// Opens an image, read-only when `read_only` says so.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        Self::open_in_chain(path.as_ref(), read_only, &mut Vec::new())
    }

    fn open_in_chain(path: &Path, read_only: bool, above: &mut Vec<PathBuf>) -> Result<Self> {
        let name = path.display().to_string();
        let format_error = |reason: String| Error::Format {
            path: name.clone(),
            reason,
        };
        if above.len() > MAX_CHAIN_DEPTH {
            return Err(format_error(format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        let canonical =
            std::fs::canonicalize(path).map_err(|e| Error::io(format!("open {name}"), None, e))?;
        if above.contains(&canonical) {
            return Err(format_error(
                "the backing chain loops back to this image".into(),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("open {name}"), None, e))?;
        let mut io = ImageFile {
            file,
            path: path.to_owned(),
            locked: Vec::new(),
            writing: Mutex::new(()),
        };
        if !read_only {
            lock_for_writing(&mut io)?;
        }
        let file_size = io
            .file
            .metadata()
            .map_err(|e| Error::io(format!("size of {name}"), None, e))?
            .len();
        let mut first = vec![0u8; file_size.min(104) as usize];
        io.read_exact_at(&mut first, 0, "header")?;
        if first.len() >= 24 {
            let bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
            if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
                first = vec![0u8; file_size.min(1 << bits) as usize];
                io.read_exact_at(&mut first, 0, "header")?;
            }
        }
        let header = header::parse(&first, file_size).map_err(format_error)?;
        if !read_only && header.nb_snapshots > 0 {
            return Err(format_error(format!(
                "the image has {} internal snapshots: it opens read-only only (writing would \
                 need copy-on-write of shared clusters)",
                header.nb_snapshots
            )));
        }
        let cluster_size = header.cluster_size();

        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        io.read_exact_at(&mut l1_bytes, header.l1_table_offset, "L1 table")?;
        let l1 = be_u64s(&l1_bytes);
        let mut rt_bytes =
            vec![0u8; (u64::from(header.refcount_table_clusters) * cluster_size) as usize];
        io.read_exact_at(
            &mut rt_bytes,
            header.refcount_table_offset,
            "refcount table",
        )?;
        let refcount_table = be_u64s(&rt_bytes);

        above.push(canonical.clone());
        let backing = match &header.backing_file {
            None => None,
            Some(backing_name) => Some(open_backing(
                &canonical,
                backing_name,
                header.backing_format.as_deref(),
                above,
            )?),
        };

        let mut meta = Metadata {
            cluster_bits: header.cluster_bits,
            l1,
            l1_offset: header.l1_table_offset,
            l2: TableCache::new(((32u64 << 20) / cluster_size).max(16) as usize),
            refcount_table,
            refcount_table_offset: header.refcount_table_offset,
            refcount_order: header.refcount_order,
            blocks: TableCache::new(((4u64 << 20) / cluster_size).max(8) as usize),
            end: file_size.next_multiple_of(cluster_size),
            freed: Vec::new(),
            moving_table: false,
            claims: Vec::new(),
            waiting: 0,
            reading: BTreeSet::new(),
            next_ticket: 0,
            quarantined: VecDeque::new(),
        };
        let mut header = header;
        if !read_only {
            drop_bitmaps(&io, &mut header, &mut meta)?;
            if header.version >= 3 && header.autoclear_features != 0 {
                io.write_all_at(
                    &[0u8; 8],
                    header::AUTOCLEAR_OFFSET,
                    "header (autoclear bits)",
                )?;
                header.autoclear_features = 0;
            }
        }
        Ok(Qcow2Disk {
            io,
            header,
            read_only,
            backing,
            meta: Mutex::new(meta),
            published: Condvar::new(),
            written: AtomicU64::new(0),
        })
    }

    /// Creates a new image (mode 0600; an existing file is an error) and opens it read-write.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let cluster_size = options.cluster_size;
        if !cluster_size.is_power_of_two() || !(4096..=(2 << 20)).contains(&cluster_size) {
            return Err(Error::InvalidParams(format!(
                "qcow2 cluster size {cluster_size}: a power of two from 4 KiB to 2 MiB"
            )));
        }
        let bits = cluster_size.trailing_zeros();
        if let Some((backing, format)) = &options.backing {
            let dir = path.parent().unwrap_or(Path::new("."));
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let resolved = dir.join(backing);
            // The backing file must open as what it is said to be, chain and all.
            match format {
                BackingFormat::Qcow2 => drop(Qcow2Disk::open_read_only(&resolved)?),
                BackingFormat::Raw => drop(FileDisk::open(
                    &resolved,
                    &FileOptions {
                        read_only: true,
                        ..FileOptions::default()
                    },
                )?),
            }
        }
        let layout = header::layout(options.size, bits).map_err(Error::InvalidParams)?;
        let first = header::encode(
            &layout,
            options.size,
            options
                .backing
                .as_ref()
                .map(|(n, f)| (n.as_str(), f.name())),
        )
        .map_err(Error::InvalidParams)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("create {name}"), None, e))?;
        let io = ImageFile {
            file,
            path: path.to_owned(),
            locked: Vec::new(),
            writing: Mutex::new(()),
        };
        let cs = u64::from(cluster_size);
        io.file
            .set_len(layout.used_clusters * cs)
            .map_err(|e| Error::io(format!("resize {name}"), None, e))?;
        io.write_all_at(&first, 0, "header")?;
        let table: Vec<u8> = (0..layout.refcount_blocks)
            .flat_map(|i| ((layout.refcount_blocks_cluster + i) * cs).to_be_bytes())
            .collect();
        io.write_all_at(&table, layout.refcount_table_cluster * cs, "refcount table")?;
        let mut counts = vec![0u8; (layout.refcount_blocks * cs) as usize];
        for cluster in 0..layout.used_clusters {
            counts[cluster as usize * 2 + 1] = 1; // 16-bit big-endian 1
        }
        io.write_all_at(
            &counts,
            layout.refcount_blocks_cluster * cs,
            "refcount blocks",
        )?;
        drop(io);
        Qcow2Disk::open_read_write(path)
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.io.path
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The backing file name as the header stores it, and its format.
    pub fn backing_file(&self) -> Option<(&str, &str)> {
        self.header.backing_file.as_deref().map(|name| {
            (
                name,
                self.header.backing_format.as_deref().unwrap_or_default(),
            )
        })
    }

    /// The chain from this image (first) down to its last backing file.
    pub fn chain(&self) -> Vec<ChainLink> {
        let mut links = vec![ChainLink {
            path: self.io.path.clone(),
            format: BackingFormat::Qcow2,
            virtual_size: self.header.size,
            cluster_size: Some(self.cluster_size()),
        }];
        match &self.backing {
            None => {}
            Some(Backing::Qcow2(below)) => links.extend(below.chain()),
            Some(Backing::Raw(disk, path)) => links.push(ChainLink {
                path: path.clone(),
                format: BackingFormat::Raw,
                virtual_size: disk.info().map(|i| i.capacity).unwrap_or(0),
                cluster_size: None,
            }),
        }
        links
    }

    /// Called after `length` bytes of data went into the page cache: every
    /// [`WRITE_BACK_WINDOW`] bytes, starts write-back of the file's dirty pages and drops those
    /// written back before (`POSIX_FADV_DONTNEED`: clean pages only, so no data is at risk), so
    /// that a big copy does not end in one long `fsync` of gigabytes, nor fill the page cache
    /// with a backup nobody reads. Does nothing on tmpfs.
    fn write_back_early(&self, length: u64) {
        let before = self.written.fetch_add(length, Ordering::Relaxed);
        if (before + length) / WRITE_BACK_WINDOW != before / WRITE_BACK_WINDOW {
            // Only advice: a refusal costs speed, never data.
            let _ = rustix::fs::fadvise(&self.io.file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Metadata> {
        // A panic while holding the lock leaves write-through metadata consistent on disk; the
        // cache may lack an entry the file has, never the other way round.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn decode(&self, entry: u64) -> Result<Mapping> {
        cluster::decode_l2(entry, self.header.cluster_bits, self.header.version)
            .map_err(|r| self.io.corrupt(r))
    }

    fn read_only_error(&self) -> Error {
        Error::ReadOnly(self.io.path.display().to_string())
    }

    /// Reads `buf.len()` bytes of the backing chain at `offset` (zeros past its end, or
    /// without one).
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let capacity = backing.capacity();
        let inside = capacity.saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            backing.disk().read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    /// Inflates a compressed cluster into `out` (one cluster).
    fn read_compressed(&self, offset: u64, length: u64, out: &mut [u8]) -> Result<()> {
        let file_size = self
            .io
            .file
            .metadata()
            .map_err(|e| Error::io(format!("size of {}", self.io.path.display()), None, e))?
            .len();
        // The last sector may be cut short by the end of the file.
        let length = length.min(file_size.saturating_sub(offset));
        let mut packed = vec![0u8; length as usize];
        self.io
            .read_exact_at(&mut packed, offset, "compressed cluster")?;
        cluster::inflate(&packed, out).map_err(|r| {
            self.io
                .corrupt(format!("compressed cluster at {offset:#x}: {r}"))
        })
    }

    /// The current contents of guest cluster `cluster` under `mapping`, clipped to the disk.
    fn cluster_contents(&self, cluster: u64, mapping: Mapping, out: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let start = cluster * cs;
        let inside = self.header.size.saturating_sub(start).min(cs) as usize;
        out[inside..].fill(0);
        let out = &mut out[..inside];
        match mapping {
            Mapping::Unallocated => self.read_backing(out, start),
            Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => self.io.read_exact_at(out, host, "data cluster"),
            Mapping::Compressed { offset, length } => {
                let mut full = vec![0u8; cs as usize];
                self.read_compressed(offset, length, &mut full)?;
                out.copy_from_slice(&full[..inside]);
                Ok(())
            }
        }
    }

    /// Calls `f` with runs of guest clusters and their mappings over `[offset, offset+length)`,
    /// a table at a time (so a terabyte disk costs no terabyte-sized list), the lock held only
    /// while entries are fetched.
    fn walk(
        &self,
        offset: u64,
        length: u64,
        mut f: impl FnMut(u64, u64, Mapping) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + length;
        let span = cs * (cs / 8); // guest bytes one L2 table maps
        let mut pos = offset;
        while pos < end {
            let stop = (pos / span + 1).saturating_mul(span).min(end);
            let first = pos / cs;
            let count = (stop - 1) / cs - first + 1;
            let entries = {
                let mut meta = self.lock();
                if meta.l2_table(&self.io, pos / span)?.is_none() {
                    // No L2 table: the whole span is one unallocated run (a sparse disk of
                    // any size costs one call per table, not one per cluster).
                    drop(meta);
                    f(pos, stop - pos, Mapping::Unallocated)?;
                    pos = stop;
                    continue;
                }
                meta.entries(&self.io, first, count)?
            };
            let mut at = pos;
            for (i, &entry) in entries.iter().enumerate() {
                let cluster_end = ((first + i as u64 + 1) * cs).min(stop);
                f(at, cluster_end - at, self.decode(entry)?)?;
                at = cluster_end;
            }
            pos = stop;
        }
        Ok(())
    }

    /// What each range holds and at which depth of the chain, as `qemu-img map --output=json`
    /// says it (the same runs and fields).
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<MapEntry>> {
        check_range(offset, length, self.header.size)?;
        let mut out = Vec::new();
        self.map_into(offset, length, 0, &mut out)?;
        Ok(out)
    }

    fn map_into(
        &self,
        offset: u64,
        length: u64,
        depth: u32,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let entry = |start, length, present, zero, data, compressed, host: Option<u64>| MapEntry {
            start,
            length,
            depth,
            present,
            zero,
            data,
            compressed,
            offset: host,
        };
        let mut pending: Option<(u64, u64)> = None; // an unallocated run for the backing file
        let flush_pending =
            |pending: &mut Option<(u64, u64)>, out: &mut Vec<MapEntry>| -> Result<()> {
                let Some((start, len)) = pending.take() else {
                    return Ok(());
                };
                match &self.backing {
                    None => push_map(out, entry(start, len, false, true, false, false, None)),
                    Some(backing) => {
                        let capacity = backing.capacity();
                        let inside = capacity.saturating_sub(start).min(len);
                        if inside > 0 {
                            match backing {
                                Backing::Qcow2(below) => {
                                    below.map_into(start, inside, depth + 1, out)?
                                }
                                Backing::Raw(raw, _) => {
                                    for e in raw.allocated_extents(start, inside)? {
                                        let data = !e.kind.reads_as_zero();
                                        push_map(
                                            out,
                                            MapEntry {
                                                start: e.offset,
                                                length: e.length,
                                                depth: depth + 1,
                                                present: true,
                                                zero: !data,
                                                data,
                                                compressed: false,
                                                offset: Some(e.offset),
                                            },
                                        );
                                    }
                                }
                            }
                        }
                        push_map(
                            out,
                            entry(
                                start + inside,
                                len - inside,
                                false,
                                true,
                                false,
                                false,
                                None,
                            ),
                        );
                    }
                }
                Ok(())
            };
        self.walk(offset, length, |start, len, mapping| {
            if mapping == Mapping::Unallocated {
                pending = Some(match pending {
                    Some((s, l)) => (s, l + len),
                    None => (start, len),
                });
                return Ok(());
            }
            flush_pending(&mut pending, out)?;
            let within = start % cs;
            let e = match mapping {
                Mapping::Data { host, .. } => {
                    entry(start, len, true, false, true, false, Some(host + within))
                }
                Mapping::Compressed { .. } => entry(start, len, true, false, true, true, None),
                Mapping::Zero { host } => entry(
                    start,
                    len,
                    true,
                    true,
                    false,
                    false,
                    host.map(|h| h + within),
                ),
                Mapping::Unallocated => unreachable!("handled above"),
            };
            push_map(out, e);
            Ok(())
        })?;
        flush_pending(&mut pending, out)
    }

    /// Makes whole clusters `[first, first+count)` unallocated (`to_backing`: reads come from
    /// the backing file again) or read as zeros (zero clusters where a backing file would
    /// show through, unallocated where none does), freeing what they held. Returns false when
    /// zeros need writing instead (a version 2 image with a backing file).
    fn unmap_clusters(&self, first: u64, count: u64, to_backing: bool) -> Result<bool> {
        let new = if to_backing || self.backing.is_none() {
            0
        } else if self.header.version >= 3 {
            cluster::ZERO
        } else {
            return Ok(false);
        };
        // Clusters being written are left to their writer first: an allocating writer's entry
        // goes in, then this unmaps it (freeing it under the writer's feet would count it
        // twice); a writer in place finishes before its host is freed and allocated again.
        let meta = self.lock();
        let mut meta = self.wait_unclaimed(meta, first, count);
        let per_table = meta.l2_entries();
        let mut cluster = first;
        while cluster < first + count {
            let n = (per_table - cluster % per_table).min(first + count - cluster);
            if new == 0 && meta.l2_table(&self.io, cluster / per_table)?.is_none() {
                cluster += n; // unallocated already, the whole table's span
                continue;
            }
            let old = meta.entries(&self.io, cluster, n)?;
            if old.iter().any(|&e| e != new) {
                meta.set_entries(&self.io, cluster, &vec![new; n as usize])?;
                for entry in old {
                    let mapping = self.decode(entry)?;
                    meta.release(&self.io, mapping)?;
                }
            }
            cluster += n;
        }
        Ok(true)
    }

    /// Makes `[offset, offset + length)` read from the backing file again (whole clusters only;
    /// partial clusters at the ends are left as they are): the inverse of writing there.
    pub fn discard_to_backing(&self, offset: u64, length: u64) -> Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        check_range(offset, length, self.header.size)?;
        let (first, count) = self.whole_clusters(offset, length);
        self.unmap_clusters(first, count, true).map(|_| ())
    }

    /// The whole clusters inside a range (the last cluster counts as whole when the range
    /// reaches the end of the disk): first and count.
    fn whole_clusters(&self, offset: u64, length: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        let end = offset + length;
        let first = offset.div_ceil(cs);
        let stop = if end == self.header.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        (first, stop.saturating_sub(first))
    }

    /// Waits until no writer has claimed any guest cluster of `[first, first + count)`.
    fn wait_unclaimed<'a>(
        &'a self,
        mut meta: MutexGuard<'a, Metadata>,
        first: u64,
        count: u64,
    ) -> MutexGuard<'a, Metadata> {
        while meta.claimed(first, count) {
            meta.waiting += 1;
            meta = self.published.wait(meta).unwrap_or_else(|e| e.into_inner());
            meta.waiting -= 1;
        }
        meta
    }

    /// The write path for clusters that need allocating (or rewriting). Under the lock: the
    /// new host clusters are allocated (counted) and the guest clusters claimed, so no other
    /// writer allocates them too. Outside it: the data is written, while other writers
    /// allocate, publish or write. Under the lock again: the L2 entries are published, so no reader ever sees an
    /// entry pointing to a cluster whose data is not written yet, and the old mappings freed.
    fn write_allocating<'a>(
        &'a self,
        mut meta: MutexGuard<'a, Metadata>,
        buf: &[u8],
        offset: u64,
        mappings: &[Mapping],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let first = offset / cs;
        let length = buf.len() as u64;
        // Runs of clusters to allocate: (index of the first in `mappings`, its new hosts).
        let mut runs: Vec<(usize, Vec<u64>)> = Vec::new();
        let mut i = 0usize;
        while i < mappings.len() {
            if matches!(mappings[i], Mapping::Data { copied: true, .. }) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < mappings.len() && !matches!(mappings[j], Mapping::Data { copied: true, .. }) {
                j += 1;
            }
            match meta.allocate_many(&self.io, j - i) {
                Ok(hosts) => runs.push((i, hosts)),
                Err(e) => {
                    for host in runs.iter().flat_map(|(_, h)| h) {
                        let _ = meta.adjust_refcount(&self.io, *host, -1);
                    }
                    return Err(e);
                }
            }
            i = j;
        }
        let mut claim = Claim {
            disk: self,
            first,
            count: mappings.len() as u64,
            unpublished: runs.iter().map(|(_, h)| h.clone()).collect(),
        };
        meta.claims.push((first, mappings.len() as u64));
        drop(meta);

        // The data, outside the lock: clusters allocated already in place, new ones at their
        // new hosts. Whole clusters go straight from `buf`, several at once where the hosts
        // are contiguous; a partial one is assembled with what the cluster held (the backing
        // file's data, zeros, the old or compressed cluster), which stays as it is while the
        // cluster is claimed.
        let mut hosts: Vec<Option<u64>> = mappings
            .iter()
            .map(|m| match m {
                Mapping::Data { host, copied: true } => Some(*host),
                _ => None,
            })
            .collect();
        for (at, new) in &runs {
            for (k, host) in new.iter().enumerate() {
                hosts[at + k] = Some(*host);
            }
        }
        let whole = |c: u64| {
            let (from, to) = piece(offset, length, c, cs);
            from == c * cs && to == (c + 1) * cs
        };
        let mut k = 0usize;
        while k < hosts.len() {
            let c = first + k as u64;
            let host = hosts[k].expect("every cluster has a host");
            let (from, _) = piece(offset, length, c, cs);
            let fresh = !matches!(mappings[k], Mapping::Data { copied: true, .. });
            if fresh && !whole(c) {
                let to = piece(offset, length, c, cs).1;
                let mut slot = vec![0u8; cs as usize];
                self.cluster_contents(c, mappings[k], &mut slot)?;
                slot[(from % cs) as usize..(from % cs + (to - from)) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                self.io.write_all_at(&slot, host, "data")?;
                k += 1;
                continue;
            }
            // A run of clusters written as they are (in place, or whole new ones) whose hosts
            // follow each other.
            let mut m = k + 1;
            while m < hosts.len()
                && hosts[m] == Some(host + (m - k) as u64 * cs)
                && (matches!(mappings[m], Mapping::Data { copied: true, .. })
                    || whole(first + m as u64))
            {
                m += 1;
            }
            let to = piece(offset, length, first + m as u64 - 1, cs).1;
            self.io.write_all_at(
                &buf[(from - offset) as usize..(to - offset) as usize],
                host + from % cs,
                "data",
            )?;
            k = m;
        }

        // Publish: the entries are read again (a claimed cluster's entry does not change, but
        // what is freed is what the table says now).
        let mut meta = self.lock();
        for (n, (at, new)) in runs.iter().enumerate() {
            let cluster = first + *at as u64;
            let old = meta.entries(&self.io, cluster, new.len() as u64)?;
            let entries: Vec<u64> = new.iter().map(|h| h | COPIED).collect();
            // From here a failure leaves these clusters leaked at worst, never counted free
            // while an entry may point to them.
            claim.unpublished[n].clear();
            meta.set_entries(&self.io, cluster, &entries)?;
            for entry in old {
                let mapping = self.decode(entry)?;
                meta.release(&self.io, mapping)?;
            }
        }
        drop(meta);
        drop(claim);
        self.write_back_early(length);
        Ok(())
    }

    /// Whether a range of one cluster reads as zeros without reading data.
    fn reads_as_zero(&self, mapping: Mapping) -> bool {
        match mapping {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }
}

/// The part of `[offset, offset+length)` inside guest cluster `cluster`.
fn piece(offset: u64, length: u64, cluster: u64, cs: u64) -> (u64, u64) {
    let from = offset.max(cluster * cs);
    let to = (offset + length).min((cluster + 1) * cs);
    (from, to)
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Removes the persistent bitmaps of an image opened for writing, which this crate does not
/// maintain (QEMU clears the autoclear bit of what it does not maintain, leaving the bitmaps'
/// clusters for `qemu-img check` to call leaked): the extension goes from the header first,
/// then the directory, tables and bitmap data are freed. Bitmaps already marked inconsistent
/// (autoclear bit clear) are only unlinked: their directory is not trusted to free clusters.
fn drop_bitmaps(io: &ImageFile, header: &mut header::Header, meta: &mut Metadata) -> Result<()> {
    let Some(bitmaps) = header.bitmaps else {
        return Ok(());
    };
    let cs = header.cluster_size();
    let mut free = Vec::new();
    if header.autoclear_features & 1 != 0 {
        if bitmaps.directory_size > 64 << 20 {
            return Err(io.corrupt(format!(
                "the bitmap directory is {} bytes (more than 64 MiB)",
                bitmaps.directory_size
            )));
        }
        let mut directory = vec![0u8; bitmaps.directory_size as usize];
        io.read_exact_at(&mut directory, bitmaps.directory_offset, "bitmap directory")?;
        let tables =
            header::parse_bitmap_directory(&directory, bitmaps.count).map_err(|r| io.corrupt(r))?;
        for table in tables {
            let bytes = u64::from(table.entries) * 8;
            if bytes > 64 << 20 || table.offset % cs != 0 {
                return Err(io.corrupt(format!(
                    "a bitmap table at {:#x} with {} entries is invalid",
                    table.offset, table.entries
                )));
            }
            let mut entries = vec![0u8; bytes as usize];
            io.read_exact_at(&mut entries, table.offset, "bitmap table")?;
            free.extend(
                be_u64s(&entries)
                    .into_iter()
                    .map(|e| e & cluster::OFFSET_MASK)
                    .filter(|&h| h != 0),
            );
            free.extend((0..bytes.div_ceil(cs)).map(|i| table.offset + i * cs));
        }
        free.extend(
            (0..bitmaps.directory_size.div_ceil(cs)).map(|i| bitmaps.directory_offset + i * cs),
        );
    }
    let old_length: usize = header
        .extensions
        .iter()
        .map(|(_, d)| 8 + d.len().next_multiple_of(8))
        .sum::<usize>()
        + 8
        + header.backing_file.as_ref().map_or(0, String::len);
    let (mut area, backing_offset) = header::extension_area_without(header, header::EXT_BITMAPS);
    area.resize(area.len().max(old_length), 0);
    io.write_all_at(&area, u64::from(header.header_length), "header extensions")?;
    if let Some(at) = backing_offset {
        io.write_all_at(&at.to_be_bytes(), 8, "header (backing file offset)")?;
    }
    io.write_all_at(
        &[0u8; 8],
        header::AUTOCLEAR_OFFSET,
        "header (autoclear bits)",
    )?;
    io.sync("header without bitmaps")?;
    header.autoclear_features = 0;
    header.bitmaps = None;
    header.extensions.retain(|(k, _)| *k != header::EXT_BITMAPS);
    for host in free {
        meta.adjust_refcount(io, host, -1)?;
    }
    Ok(())
}

/// QEMU's permissions (`BLK_PERM_*` bit numbers) and their names in its lock errors.
const PERM_CONSISTENT_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_RESIZE: u64 = 3;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// Byte `LOCK_PERM_BASE + n` is locked (shared) by every open holding permission n, byte
/// `LOCK_SHARED_BASE + n` by every open that does not share permission n with others
/// (QEMU's `RAW_LOCK_PERM_BASE`, `RAW_LOCK_SHARED_BASE`; libvirt uses byte 0).
const LOCK_PERM_BASE: u64 = 100;
const LOCK_SHARED_BASE: u64 = 200;

/// Takes the locks QEMU takes for a writer (consistent read, write and resize, sharing
/// neither write nor resize) and checks them as QEMU does, so that QEMU, qemu-img and
/// qemu-nbd refuse an image open here for writing ("Failed to get shared \"write\" lock"),
/// and this open fails while one of them has the image open for writing, or open without
/// sharing writes (as `qemu-img info` without `-U` does). Read-only opens take no locks, as
/// `qemu-img -U` (force share): backups read images that QEMU may hold.
fn lock_for_writing(io: &mut ImageFile) -> Result<()> {
    let held = [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE];
    let unshared = [PERM_WRITE, PERM_RESIZE];
    let path = io.path.display().to_string();
    let failed = |what: &str, e: std::io::Error| Error::io(format!("{what} {path}"), None, e);
    // The reason goes into the operation, which the error's text shows.
    let busy = |reason: String| {
        Error::io(
            format!("lock {path}: {reason}"),
            None,
            std::io::ErrorKind::ResourceBusy.into(),
        )
    };
    let bytes = held
        .iter()
        .map(|p| LOCK_PERM_BASE + p)
        .chain(unshared.iter().map(|p| LOCK_SHARED_BASE + p));
    for offset in bytes {
        ffi::lock_byte_shared(&io.file, offset).map_err(|e| failed("lock", e))?;
        io.locked.push(offset);
    }
    // On an error below, dropping `io` releases the locks taken above.
    for perm in held {
        if ffi::byte_locked_elsewhere(&io.file, LOCK_SHARED_BASE + perm)
            .map_err(|e| failed("test the locks of", e))?
        {
            return Err(busy(format!(
                "Failed to get \"{}\" lock: another process (QEMU, qemu-img, qemu-nbd) has \
                 the image open and does not share it",
                PERM_NAMES[perm as usize]
            )));
        }
    }
    for perm in unshared {
        if ffi::byte_locked_elsewhere(&io.file, LOCK_PERM_BASE + perm)
            .map_err(|e| failed("test the locks of", e))?
        {
            let doing = if perm == PERM_WRITE {
                "writing"
            } else {
                "resizing"
            };
            return Err(busy(format!(
                "Failed to get shared \"{}\" lock: another process (QEMU, qemu-img, \
                 qemu-nbd) has the image open for {doing}",
                PERM_NAMES[perm as usize]
            )));
        }
    }
    Ok(())
}

/// Opens the backing file `name` of the image at `image` (canonical), with `format`.
fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    above: &mut Vec<PathBuf>,
) -> Result<Backing> {
    let refuse = |reason: String| Error::Format {
        path: image.display().to_string(),
        reason,
    };
    if name.contains("://") || name.starts_with("json:") {
        return Err(refuse(format!(
            "the backing file {name:?} is not a local file name: only local backing files are \
             supported"
        )));
    }
    let path = image.parent().unwrap_or(Path::new("/")).join(name);
    match format {
        Some("qcow2") => Ok(Backing::Qcow2(Box::new(Qcow2Disk::open_in_chain(
            &path, true, above,
        )?))),
        Some("raw") => {
            let canonical = std::fs::canonicalize(&path)
                .map_err(|e| Error::io(format!("open backing file {}", path.display()), None, e))?;
            if above.contains(&canonical) {
                return Err(refuse(
                    "the backing chain loops back to an image above".into(),
                ));
            }
            let disk = FileDisk::open(
                &path,
                &FileOptions {
                    read_only: true,
                    ..FileOptions::default()
                },
            )?;
            Ok(Backing::Raw(disk, path))
        }
        Some(other) => Err(refuse(format!(
            "the backing file {name:?} has format {other:?}; only qcow2 and raw are supported"
        ))),
        None => Err(refuse(format!(
            "the header names the backing file {name:?} but not its format, and formats are \
             never guessed: set it with `qemu-img rebase -u -b {name:?} -F raw|qcow2`"
        ))),
    }
}

impl Disk for Qcow2Disk {
    fn info(&self) -> Result<DiskInfo> {
        let mut info = DiskInfo::new(self.header.size);
        info.read_only = self.read_only;
        info.can_extents = true;
        info.transport_mode = Some(TransportMode::File);
        info.preferred_block_size = self.cluster_size().min(u64::from(u32::MAX)) as u32;
        info.max_request_size = 64 << 20;
        info.num_links = self.chain().len() as u32;
        info.parent_file_name_hint = self.header.backing_file.clone();
        Ok(info)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let first = offset / cs;
        let last = (offset + buf.len() as u64 - 1) / cs;
        let (entries, ticket) = {
            let mut meta = self.lock();
            let entries = meta.entries(&self.io, first, last - first + 1)?;
            let ticket = meta.next_ticket;
            meta.next_ticket += 1;
            meta.reading.insert(ticket);
            (entries, ticket)
        };
        // Until the data is read, no host cluster freed meanwhile is used again.
        let _reading = ReadInFlight { disk: self, ticket };
        let mappings: Vec<Mapping> = entries
            .iter()
            .map(|&e| self.decode(e))
            .collect::<Result<_>>()?;
        let length = buf.len() as u64;
        let slice = |from: u64, to: u64| ((from - offset) as usize, (to - offset) as usize);
        let mut i = 0;
        while i < mappings.len() {
            let cluster = first + i as u64;
            let (from, mut to) = piece(offset, length, cluster, cs);
            let mut j = i + 1;
            match mappings[i] {
                Mapping::Data { host, .. } => {
                    while j < mappings.len()
                        && matches!(mappings[j], Mapping::Data { host: h, .. } if h == host + (j - i) as u64 * cs)
                    {
                        to = piece(offset, length, first + j as u64, cs).1;
                        j += 1;
                    }
                    let (a, b) = slice(from, to);
                    self.io
                        .read_exact_at(&mut buf[a..b], host + from % cs, "data")?;
                }
                Mapping::Zero { .. } => {
                    while j < mappings.len() && matches!(mappings[j], Mapping::Zero { .. }) {
                        to = piece(offset, length, first + j as u64, cs).1;
                        j += 1;
                    }
                    let (a, b) = slice(from, to);
                    buf[a..b].fill(0);
                }
                Mapping::Unallocated => {
                    while j < mappings.len() && mappings[j] == Mapping::Unallocated {
                        to = piece(offset, length, first + j as u64, cs).1;
                        j += 1;
                    }
                    let (a, b) = slice(from, to);
                    self.read_backing(&mut buf[a..b], from)?;
                }
                Mapping::Compressed {
                    offset: at,
                    length: len,
                } => {
                    let mut full = vec![0u8; cs as usize];
                    self.read_compressed(at, len, &mut full)?;
                    let (a, b) = slice(from, to);
                    buf[a..b].copy_from_slice(
                        &full[(from % cs) as usize..(from % cs + (to - from)) as usize],
                    );
                }
            }
            i = j;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        check_range(offset, buf.len() as u64, self.header.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let first = offset / cs;
        let last = (offset + buf.len() as u64 - 1) / cs;
        let count = last - first + 1;
        let mut meta = self.lock();
        let mut in_place = Vec::with_capacity(count as usize);
        loop {
            let entries = meta.entries(&self.io, first, count)?;
            let mappings: Vec<Mapping> = entries
                .iter()
                .map(|&e| self.decode(e))
                .collect::<Result<_>>()?;
            if mappings
                .iter()
                .all(|m| matches!(m, Mapping::Data { copied: true, .. }))
            {
                in_place.extend(mappings.iter().map(|m| match m {
                    Mapping::Data { host, .. } => *host,
                    _ => unreachable!("all allocated"),
                }));
                break;
            }
            if meta.claimed(first, count) {
                // Another writer is allocating some of these clusters: wait for its entries.
                meta = self.wait_unclaimed(meta, first, count);
                continue;
            }
            return self.write_allocating(meta, buf, offset, &mappings);
        }
        // Every cluster is allocated: write in place outside the metadata lock, a contiguous
        // run at a time. Claimed meanwhile, so that a trim or zeroing of these
        // clusters waits: freed under this write, a cluster could be allocated again to
        // another guest cluster, whose data this write would then overwrite.
        meta.claims.push((first, count));
        let claim = Claim {
            disk: self,
            first,
            count,
            unpublished: Vec::new(),
        };
        drop(meta);
        let length = buf.len() as u64;
        let mut i = 0;
        while i < in_place.len() {
            let (from, mut to) = piece(offset, length, first + i as u64, cs);
            let mut j = i + 1;
            while j < in_place.len() && in_place[j] == in_place[i] + (j - i) as u64 * cs {
                to = piece(offset, length, first + j as u64, cs).1;
                j += 1;
            }
            self.io.write_all_at(
                &buf[(from - offset) as usize..(to - offset) as usize],
                in_place[i] + from % cs,
                "data",
            )?;
            i = j;
        }
        drop(claim);
        self.write_back_early(length);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Data and metadata were written through; one fsync makes both durable.
        let _meta = self.lock();
        self.io.sync("flush")
    }

    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.header.size)?;
        let mut extents = Vec::new();
        for entry in self.map(offset, length)? {
            let kind = if entry.data {
                ExtentKind::Data
            } else if entry.present {
                ExtentKind::Zero
            } else {
                ExtentKind::Hole
            };
            push_extent(
                &mut extents,
                Extent {
                    offset: entry.start,
                    length: entry.length,
                    kind,
                },
            );
        }
        Ok(extents)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_or_trim(offset, length, true)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_or_trim(offset, length, false)
    }
}

impl Qcow2Disk {
    fn zero_or_trim(&self, offset: u64, length: u64, zero: bool) -> Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        check_range(offset, length, self.header.size)?;
        if length == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let (first, count) = self.whole_clusters(offset, length);
        let whole =
            (first * cs).min(self.header.size)..((first + count) * cs).min(self.header.size);
        let unmapped = count > 0 && self.unmap_clusters(first, count, false)?;
        if !zero {
            return Ok(()); // a trim of partial clusters (or of a v2 overlay) is a no-op hint
        }
        let mut pieces = Vec::new();
        if count == 0 {
            pieces.push((offset, offset + length));
        } else {
            pieces.push((offset, whole.start));
            pieces.push((whole.end, offset + length));
            if !unmapped {
                pieces.push((whole.start, whole.end));
            }
        }
        for (from, to) in pieces {
            self.write_zero_bytes(from, to)?;
        }
        Ok(())
    }

    /// Writes zeros over `[from, to)` where it does not read as zeros already.
    fn write_zero_bytes(&self, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut runs = Vec::new();
        self.walk(from, to - from, |start, len, mapping| {
            if !self.reads_as_zero(mapping) {
                runs.push((start, len));
            }
            Ok(())
        })?;
        let zeros = vec![0u8; (cs as usize).max(1 << 20).min((to - from) as usize)];
        for (start, len) in runs {
            crate::write_zeros_from(self, &zeros, start, len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 64 MiB image of 4 KiB clusters for the race tests, and its cluster size.
    fn race_image(dir: &Path) -> (Qcow2Disk, u64) {
        let cs = 4096u64;
        let disk = Qcow2Disk::create(
            dir.join("race.qcow2"),
            &CreateOptions::new(64 << 20).cluster_size(cs as u32),
        )
        .unwrap();
        (disk, cs)
    }

    /// A trim racing writes in place to the same clusters must never free a host cluster a
    /// write is still filling: allocated again to another guest cluster, that one's data
    /// would be overwritten. Writers in place, a trimmer and an allocating writer run
    /// together; the allocating writer's clusters must read back as it wrote them.
    #[test]
    fn trims_racing_writes_in_place_never_hit_other_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, cs) = race_image(dir.path());
        // Clusters 0..64 are rewritten in place and trimmed; 1024.. are the allocating
        // writer's, each written once with its own pattern.
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for t in 0..2u8 {
                let (disk, stop) = (&disk, &stop);
                scope.spawn(move || {
                    let buf = vec![0xA0 + t; (64 * cs) as usize];
                    while !stop.load(Ordering::Relaxed) {
                        disk.write_at(&buf, 0).unwrap();
                    }
                });
            }
            let (disk, stop) = (&disk, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    disk.trim(0, 64 * cs).unwrap();
                }
            });
            for c in 1024..8192u64 {
                disk.write_at(&vec![c as u8; cs as usize], c * cs).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let mut buf = vec![0u8; cs as usize];
        for c in 1024..8192u64 {
            disk.read_at(&mut buf, c * cs).unwrap();
            assert!(
                buf.iter().all(|&b| b == c as u8),
                "cluster {c} was overwritten"
            );
        }
    }

    /// A read racing a trim must never return another cluster's data: the host cluster it
    /// looked up, freed under it and allocated again to another guest cluster, would hold
    /// that one's data by the time the read reaches it. Readers of clusters that are trimmed
    /// and written again (each reading as all 0x11 or all zeros) run beside an allocating
    /// writer whose clusters hold neither byte.
    #[test]
    fn reads_racing_trims_never_see_other_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, cs) = race_image(dir.path());
        let pattern = vec![0x11u8; (16 * cs) as usize];
        disk.write_at(&pattern, 0).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let bad = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let (disk, stop, bad) = (&disk, &stop, &bad);
                scope.spawn(move || {
                    let mut buf = vec![0u8; (16 * cs) as usize];
                    while !stop.load(Ordering::Relaxed) {
                        disk.read_at(&mut buf, 0).unwrap();
                        for (c, cluster) in buf.chunks(cs as usize).enumerate() {
                            let first = cluster[0];
                            if (first != 0x11 && first != 0) || cluster.iter().any(|&b| b != first)
                            {
                                *bad.lock().unwrap() = Some((c, first));
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            let (disk, stop, pattern) = (&disk, &stop, &pattern);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    disk.trim(0, 16 * cs).unwrap();
                    disk.write_at(pattern, 0).unwrap();
                }
            });
            // Writes and trims its own clusters over and over, so that it keeps taking freed
            // host clusters, the readers' among them.
            let started = std::time::Instant::now();
            let mut c = 1024u64;
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < std::time::Duration::from_secs(2)
            {
                disk.write_at(&[0x80 | (c % 64) as u8; 4096], c * cs)
                    .unwrap();
                c += 1;
                if c == 4096 {
                    disk.trim(1024 * cs, 3072 * cs).unwrap();
                    c = 1024;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(
            *bad.lock().unwrap(),
            None,
            "a read returned another cluster's data (cluster, byte)"
        );
        // Quarantined clusters are used again once the reads that saw them end: the writer's
        // passes (12 MiB each, trimmed after) do not grow the image pass after pass.
        let length = std::fs::metadata(dir.path().join("race.qcow2"))
            .unwrap()
            .len();
        assert!(length < 24 << 20, "the image grew to {length} bytes");
    }

    /// A small image with data, zero clusters and an L2 table, as bytes.
    fn small_image(dir: &Path) -> Vec<u8> {
        let path = dir.join("seed.qcow2");
        let disk =
            Qcow2Disk::create(&path, &CreateOptions::new(1 << 20).cluster_size(4096)).unwrap();
        disk.write_at(&[7u8; 10_000], 3000).unwrap();
        drop(disk);
        let disk = Qcow2Disk::open_read_write(&path).unwrap();
        disk.write_zeroes(64 << 10, 8192).unwrap();
        drop(disk);
        std::fs::read(&path).unwrap()
    }

    fn exercise(path: &Path) {
        for writable in [false, true] {
            let Ok(disk) = Qcow2Disk::open(path, !writable) else {
                continue;
            };
            let size = disk.info().unwrap().capacity;
            let _ = disk.map(0, size);
            let mut buf = vec![0u8; size.min(128 << 10) as usize];
            let _ = disk.read_at(&mut buf, 0);
            if writable {
                let _ = disk.write_at(&[1u8; 9000], size.min(5000) / 2);
                let _ = disk.write_zeroes(0, size.min(70_000));
                let _ = disk.trim(0, size);
                let _ = disk.flush();
            }
        }
    }

    #[test]
    fn created_images_read_back_and_refuse_what_they_must() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let disk = Qcow2Disk::create(&path, &CreateOptions::new(1 << 20)).unwrap();
        assert!(
            Qcow2Disk::create(&path, &CreateOptions::new(1 << 20)).is_err(),
            "no clobbering"
        );
        disk.write_at(b"hello", 65533).unwrap();
        let mut buf = [0u8; 5];
        disk.read_at(&mut buf, 65533).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(
            disk.read_at(&mut buf, (1 << 20) - 2),
            Err(Error::OutOfRange { .. })
        ));
        let extents = disk.allocated_extents(0, 1 << 20).unwrap();
        assert_eq!(extents[0].kind, ExtentKind::Data);
        assert_eq!(extents[0].length, 2 << 16, "two clusters");
        assert_eq!(extents[1].kind, ExtentKind::Hole);
        drop(disk);
        let ro = Qcow2Disk::open_read_only(&path).unwrap();
        assert!(matches!(ro.write_at(b"x", 0), Err(Error::ReadOnly(_))));
        let shown = format!("{ro:?}");
        assert!(shown.contains("a.qcow2") && shown.len() < 300, "{shown}");
        for bad in [1000u32, 2048, 4 << 20] {
            let err = Qcow2Disk::create(
                dir.path().join(format!("{bad}.qcow2")),
                &CreateOptions::new(1 << 20).cluster_size(bad),
            );
            assert!(matches!(err, Err(Error::InvalidParams(_))), "{bad}");
        }
        let err = Qcow2Disk::create(
            dir.path().join("b.qcow2"),
            &CreateOptions::new(1 << 20).backing("missing.qcow2", BackingFormat::Qcow2),
        );
        assert!(err.is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A valid image with any bytes changed opens with an error or works, never panics.
        #[test]
        fn damaged_images_fail_cleanly(changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = small_image(dir.path());
            // Most damage goes where the metadata is: the first clusters.
            for (index, value) in changes {
                let at = index.index(bytes.len().min(6 * 4096));
                bytes[at] = value;
            }
            let path = dir.path().join("damaged.qcow2");
            std::fs::write(&path, &bytes).unwrap();
            exercise(&path);
        }
    }
}
