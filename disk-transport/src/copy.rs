//! Copying any [`Disk`] to any other, fast: whole disks ([`copy`]) and incremental backups of
//! what changed since a checkpoint ([`copy_changed`], [`copy_extents`]).
//!
//! A few worker threads ([`CopyOptions::threads`], one per CPU by default) pull request-sized
//! pieces from a shared plan and keep [`CopyOptions::requests_in_flight`] reads and writes going
//! through [`Disk::submit_read`]/[`Disk::submit_write`]: a completed read is handed straight to
//! the destination, a completed write frees its buffer for the next read. The calling thread
//! only sums progress and calls the callback; workers report to it every 50 ms rather than per
//! request, so it does not wake for every completion. Ranges the source reports as zero or
//! holes ([`Disk::allocated_extents`]) are never read; they are zeroed on the destination
//! (`write_zeroes`, cheap on NBD and files), or skipped entirely when the caller knows the
//! destination is already zero. Read buffers that turn out all-zero are zeroed the same way,
//! keeping the destination sparse.
//!
//! Failures stop the copy with the first error, which names the offset; the copy never reports
//! success for fewer bytes than the source has. A failed copy still says what it did: the
//! [`CopyError`] carries the error and the [`CopyReport`] up to that point. Transient errors
//! ([`Error::is_transient`]) can be retried a bounded number of times
//! ([`CopyOptions::retries`], off by default), and a [`CancelToken`] stops a copy from another
//! thread (or a signal handler) with [`Error::Cancelled`] within a fraction of a second.
//!
//! ```
//! use disk_transport::copy::{copy, CopyOptions};
//! use disk_transport::memory::MemoryDisk;
//! use disk_transport::Disk;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let src = MemoryDisk::new(64 << 20);
//! src.write_at(&[1; 4096], 32 << 20)?;
//! let dst = MemoryDisk::new(64 << 20);
//! let report = copy(&src, &dst, &CopyOptions::default(), &mut |p| {
//!     eprint!("\r{} / {} bytes", p.done, p.total);
//! })?;
//! assert_eq!(report.progress.read, disk_transport::memory::CHUNK_SIZE);
//! assert_eq!(dst.to_vec()?, src.to_vec()?);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::blkhash::{BlkHasher, Blkhash, BlkhashSpec};
use crate::types::{push_range, DirtyExtent, Extent, ExtentKind};
use crate::{Disk, DrivenQueue, Error, ReadCompletion, Result};

/// Bytes per request unless [`CopyOptions::request_size`] says otherwise. Twice nbdcopy's
/// 256 KiB: where a copying thread cannot drive its own queue ([`Disk::driven_queue`]), each
/// request costs a hand-over from the connection's reader thread to a copying thread (a
/// wake-up and a context switch); halving their number (with
/// [`DEFAULT_REQUESTS_IN_FLIGHT`]) copied a 2 GiB qemu-nbd 10.0 export to `null:` in 1.13 s
/// instead of 1.26 s, nbdcopy 1.22 taking 1.37 s (medians of 5 interleaved runs, 2 CPUs).
pub const DEFAULT_REQUEST_SIZE: usize = 512 * 1024;
/// Bytes per request into an NBD export unless [`CopyOptions::request_size`] says otherwise:
/// nbdcopy's 256 KiB. A server writing into a file through the page cache holds the file's
/// inode lock for the whole of each write while its other writer threads spin on that lock;
/// halving the writes halved that: restoring a four-deep 4 GiB qcow2 chain into a qemu-nbd 7.2
/// export (`--cache=writeback`, a raw file on disk) took 5.8 to 7.1 s instead of 6.9 to 9.6 s,
/// and the server 6.2 to 7.8 CPU s instead of 7.5 to 10.2 (four and seven runs).
pub const DEFAULT_REQUEST_SIZE_INTO_NBD: usize = 256 * 1024;
/// How many bytes written into an NBD export are followed by a flush unless
/// [`CopyOptions::flush_every`] says otherwise. A server writing through its page cache
/// (qemu-nbd's default `--cache=writeback`) otherwise gathers gigabytes of dirty pages, and
/// past the kernel's dirty limit every one of its writes is throttled: copying 4 GiB into a
/// qemu-nbd 7.2 export of a raw file on disk took 5.68 to 5.98 s and once 10.1 s (its CPU 6.3
/// to 6.8 s, that once 13.4 s) without, 5.17 to 6.04 s with a flush every 256 MiB (four runs
/// each, interleaved; nbdcopy 1.14 took 6.02 to 7.52 s).
pub const DEFAULT_FLUSH_EVERY_INTO_NBD: u64 = 256 << 20;
/// Requests in flight unless [`CopyOptions::requests_in_flight`] says otherwise: with
/// [`DEFAULT_REQUEST_SIZE`], 16 MiB, the bytes nbdcopy keeps in flight (64 × 256 KiB), enough
/// to hide a millisecond of server latency per request.
pub const DEFAULT_REQUESTS_IN_FLIGHT: usize = 32;
/// Requests a copying thread holds at once when both disks complete requests as they are
/// submitted (files, qcow2 images, memory): there is no latency to hide, so more only hold
/// more memory. Reading a four-deep qcow2 chain of 2 GiB into a raw file on tmpfs took 0.64 to
/// 0.67 s with 2 or 4 per thread and 0.70 s with 16 (the default 32 over two threads), at a
/// peak RSS of 10 to 12 MiB instead of 24 MiB (qemu-img convert: 0.82 s, 22 MiB).
pub const SYNCHRONOUS_REQUESTS_PER_THREAD: usize = 4;
/// How long a copy waits for any request to complete before giving up, unless
/// [`CopyOptions::stall_timeout`] says otherwise.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The first pause before a retry, unless [`CopyOptions::retry_delay`] says otherwise; each
/// further retry of the same request waits twice as long (at most 16 times this).
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a stopping copy (an error, a cancel) waits for the requests it has in flight before
/// it returns without them.
const STOP_GRACE: Duration = Duration::from_millis(500);
/// How often a waiting worker looks at the cancel token.
const POLL: Duration = Duration::from_millis(50);

/// Stops a copy from elsewhere: another thread, a signal handler, a UI's cancel button. Clones
/// share the flag. The copy ends with [`Error::Cancelled`] soon after [`cancel`](Self::cancel)
/// (it waits at most half a second for requests already in flight).
///
/// ```
/// use disk_transport::copy::{copy, CancelToken, CopyOptions};
/// use disk_transport::memory::MemoryDisk;
/// use disk_transport::Error;
///
/// let src = MemoryDisk::with_data(&[7u8; 4 << 20]);
/// let dst = MemoryDisk::new(4 << 20);
/// let token = CancelToken::new();
/// let options = CopyOptions::default().cancel(token.clone());
/// // Elsewhere (a Ctrl-C handler, a UI thread), during or even before the copy:
/// token.cancel();
/// let failed = copy(&src, &dst, &options, &mut |_| {}).unwrap_err();
/// assert!(matches!(failed.error, Error::Cancelled));
/// eprintln!("stopped after {} of {} bytes", failed.report.progress.done, failed.report.progress.total);
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        CancelToken::default()
    }
    /// Asks every copy holding this token (or a clone) to stop. Async-signal-safe: a single
    /// atomic store.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A flag set elsewhere, e.g. by `signal_hook::flag::register(SIGINT, flag)`.
impl From<Arc<AtomicBool>> for CancelToken {
    fn from(flag: Arc<AtomicBool>) -> Self {
        CancelToken(flag)
    }
}

/// Tokens are equal when they share one flag.
impl PartialEq for CancelToken {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for CancelToken {}

/// How to copy; chain the setters on [`CopyOptions::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// `None`: [`DEFAULT_REQUEST_SIZE`], or [`DEFAULT_REQUEST_SIZE_INTO_NBD`].
    request_size: Option<usize>,
    requests_in_flight: usize,
    extents: bool,
    detect_zeroes: bool,
    destination_is_zero: bool,
    flush: bool,
    /// `None`: [`DEFAULT_FLUSH_EVERY_INTO_NBD`] into an NBD export, never otherwise; 0: never.
    flush_every: Option<u64>,
    stall_timeout: Duration,
    threads: usize,
    retries: u32,
    retry_delay: Duration,
    cancel: Option<CancelToken>,
    blkhash: Option<BlkhashSpec>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            request_size: None,
            requests_in_flight: DEFAULT_REQUESTS_IN_FLIGHT,
            extents: true,
            detect_zeroes: true,
            destination_is_zero: false,
            flush: true,
            flush_every: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            threads: default_threads(),
            retries: 0,
            retry_delay: DEFAULT_RETRY_DELAY,
            cancel: None,
            blkhash: None,
        }
    }
}

/// One copying thread per CPU, at most 4 (nbdcopy's default connection count); also the
/// NBD connections over a network ([`default_connections`](crate::factory::default_connections)).
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

impl CopyOptions {
    /// Bytes per read/write request (default [`DEFAULT_REQUEST_SIZE`], 512 KiB, or
    /// [`DEFAULT_REQUEST_SIZE_INTO_NBD`], 256 KiB, when the destination is an NBD export;
    /// rounded to the disks' block sizes and capped by their maximum request sizes).
    pub fn request_size(mut self, bytes: usize) -> Self {
        self.request_size = Some(bytes.max(1));
        self
    }
    /// Requests kept in flight (default [`DEFAULT_REQUESTS_IN_FLIGHT`], 32), spread over the
    /// threads; between two disks that complete requests as they are submitted (see
    /// [`Disk::max_in_flight`]), at most [`SYNCHRONOUS_REQUESTS_PER_THREAD`] per thread.
    pub fn requests_in_flight(mut self, n: usize) -> Self {
        self.requests_in_flight = n.max(1);
        self
    }
    /// Ask the source which ranges hold data (default on).
    pub fn extents(mut self, on: bool) -> Self {
        self.extents = on;
        self
    }
    /// Turn all-zero read buffers into zeroing requests (default on).
    pub fn detect_zeroes(mut self, on: bool) -> Self {
        self.detect_zeroes = on;
        self
    }
    /// The destination already reads as zeros (a new sparse file, a fresh export): skip
    /// zero ranges instead of zeroing them (default off). Incremental copies ignore it: their
    /// destination holds the previous backup, whose changed ranges must be zeroed.
    pub fn destination_is_zero(mut self, yes: bool) -> Self {
        self.destination_is_zero = yes;
        self
    }
    /// Flush the destination at the end (default on). Off, it is not flushed on the way
    /// either ([`flush_every`](Self::flush_every)).
    pub fn flush(mut self, on: bool) -> Self {
        self.flush = on;
        self
    }
    /// Also flush the destination each time another `bytes` have been written (0: only at the
    /// end). Default: every [`DEFAULT_FLUSH_EVERY_INTO_NBD`] (256 MiB) into an NBD export, so
    /// that the server never holds gigabytes of unwritten data; only at the end into anything
    /// else (files and qcow2 images start their own write-back as they go). The calling
    /// thread flushes, while the copying threads go on; a failed flush fails the copy.
    pub fn flush_every(mut self, bytes: u64) -> Self {
        self.flush_every = Some(bytes);
        self
    }
    /// Copying threads (default: the number of CPUs, at most 4). Each drives its share of the
    /// requests in flight; more than one lets reading, writing and zero-detection of different
    /// requests run on different cores.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }
    /// Give up if no request completes for this long (default [`DEFAULT_STALL_TIMEOUT`], 60 s;
    /// backends have their own, shorter timeouts).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }
    /// Try a request that failed with a transient error ([`Error::is_transient`]: a server's
    /// `EIO`, an interrupted read) up to `n` more times before failing the copy (default 0:
    /// the first error fails it). A failed write is retried by reading the piece again.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }
    /// The pause before the first retry of a request (default [`DEFAULT_RETRY_DELAY`], 1 s);
    /// it doubles with each further retry of the same request, up to 16 times this.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }
    /// Stop when `token` is cancelled, failing with [`Error::Cancelled`].
    pub fn cancel(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }
    /// Also compute the source's block hash while copying, as `nbdcopy --blkhash` does
    /// ([`CopyReport::blkhash`]; default none). Whole-disk copies only: an incremental copy
    /// does not see the whole disk, and fails with [`Error::Unsupported`] when asked (hash it
    /// with the previous point's block digests: [`copy_changed_hashing`]).
    pub fn blkhash(mut self, spec: Option<BlkhashSpec>) -> Self {
        self.blkhash = spec;
        self
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(CancelToken::is_cancelled)
    }

    // What other engines ([`compare`](crate::compare), checksums) take from the options.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled()
    }
    /// The request size for reading (no destination, or one that is not an NBD export).
    pub(crate) fn request_size_bytes(&self) -> usize {
        self.request_size_into(false)
    }
    /// The bytes between flushes on the way, if any, into an NBD export (`into_nbd`) or not.
    fn flush_every_into(&self, into_nbd: bool) -> Option<u64> {
        if !self.flush {
            return None;
        }
        let every = self.flush_every.unwrap_or(if into_nbd {
            DEFAULT_FLUSH_EVERY_INTO_NBD
        } else {
            0
        });
        (every > 0).then_some(every)
    }

    /// When to flush on the way into an NBD export (`into_nbd`) or not, if at all.
    pub(crate) fn flush_schedule(&self, into_nbd: bool) -> Option<FlushSchedule> {
        self.flush_every_into(into_nbd)
            .map(|every| FlushSchedule { every, next: every })
    }

    /// The request size asked for, else the default for a destination that is an NBD export
    /// (`into_nbd`) or not.
    fn request_size_into(&self, into_nbd: bool) -> usize {
        self.request_size.unwrap_or(if into_nbd {
            DEFAULT_REQUEST_SIZE_INTO_NBD
        } else {
            DEFAULT_REQUEST_SIZE
        })
    }
    pub(crate) fn uses_extents(&self) -> bool {
        self.extents
    }
    pub(crate) fn thread_count(&self) -> usize {
        self.threads.max(1)
    }
    pub(crate) fn in_flight(&self) -> usize {
        self.requests_in_flight.max(1)
    }
    pub(crate) fn stall(&self) -> Duration {
        self.stall_timeout
    }
    // What the sequential copies of [`stream`](crate::stream) take besides.
    pub(crate) fn blkhash_spec(&self) -> Option<BlkhashSpec> {
        self.blkhash
    }
    pub(crate) fn detects_zeroes(&self) -> bool {
        self.detect_zeroes
    }
    pub(crate) fn destination_starts_zero(&self) -> bool {
        self.destination_is_zero
    }
    pub(crate) fn flushes(&self) -> bool {
        self.flush
    }
    pub(crate) fn retry_limit(&self) -> u32 {
        self.retries
    }
    pub(crate) fn first_retry_delay(&self) -> Duration {
        self.retry_delay
    }
}

/// Progress so far, passed to the callback as requests complete (about every 50 ms per copying
/// thread, and at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CopyProgress {
    /// Bytes to copy: the source size, or the sum of the changed ranges of an incremental copy.
    pub total: u64,
    /// Bytes finished (copied, zeroed or skipped).
    pub done: u64,
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination.
    pub written: u64,
    /// Bytes zeroed on the destination without writing data.
    pub zeroed: u64,
    /// Bytes skipped because the destination was already zero.
    pub skipped: u64,
    /// Requests tried again after a transient error ([`CopyOptions::retries`]).
    #[serde(default)]
    pub retried: u64,
}

impl CopyProgress {
    fn add(&mut self, delta: &CopyProgress) {
        self.done += delta.done;
        self.read += delta.read;
        self.written += delta.written;
        self.zeroed += delta.zeroed;
        self.skipped += delta.skipped;
        self.retried += delta.retried;
    }
}

/// What a copy did: all of it when it succeeded, what it finished before it stopped when it
/// failed ([`CopyError::report`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CopyReport {
    /// Final counters.
    pub progress: CopyProgress,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// The source's block hash, when [`CopyOptions::blkhash`] asked for one and the copy
    /// finished.
    #[serde(default)]
    pub blkhash: Option<Blkhash>,
}

impl CopyReport {
    /// Throughput over the bytes finished, in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.progress.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A copy that did not finish: why ([`Error::Cancelled`] when it was cancelled), and what it
/// had done until then. The destination was not flushed. `?` turns it into the crate's
/// [`Error`] where the report is not needed (and into `vmsdk::Error` through the facade).
///
/// Its message says how far the copy got and why it stopped, so printing it alone is enough:
/// `copy stopped after 1048576 of 4194304 bytes: injected read failure at offset 1048576`, or
/// `copy did not start: ...` when it failed before its first byte (a destination too small,
/// a source that cannot say its size). Its [`source`](std::error::Error::source) is the
/// reason's own cause, so a printer that walks the chain repeats nothing.
#[derive(Debug)]
pub struct CopyError {
    /// Why the copy stopped.
    pub error: Error,
    /// What the copy finished before it stopped. Bytes are counted as done once written,
    /// zeroed or skipped; with requests in flight they need not be one contiguous range.
    /// (Boxed, to keep `Result`s small.)
    pub report: Box<CopyReport>,
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let progress = &self.report.progress;
        if progress.total == 0 && progress.done == 0 {
            write!(f, "copy did not start: {}", self.error)
        } else {
            write!(
                f,
                "copy stopped after {} of {} bytes: {}",
                progress.done, progress.total, self.error
            )
        }
    }
}

impl std::error::Error for CopyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<CopyError> for Error {
    fn from(failed: CopyError) -> Self {
        failed.error
    }
}

/// The result of a copy.
pub type CopyResult = std::result::Result<CopyReport, CopyError>;

/// Extents window queried at a time, so huge disks need no huge extent lists.
const EXTENT_WINDOW: u64 = 1 << 30;
/// Largest single zeroing request issued by the engine.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Dirty-bitmap window queried at a time by [`copy_changed`] (between two looks at the cancel
/// token).
const DIRTY_WINDOW: u64 = 64 << 30;

struct Planner<'a> {
    src: &'a dyn Disk,
    align: u64,
    request: u64,
    use_extents: bool,
    /// `[start, end)` ranges still to plan, sorted and disjoint.
    ranges: VecDeque<(u64, u64)>,
    queue: VecDeque<Extent>,
}

impl Planner<'_> {
    /// The next piece: a data range of at most one request, or a whole zero range.
    fn next(&mut self) -> Result<Option<Extent>> {
        loop {
            if let Some(front) = self.queue.front_mut() {
                let take = if front.kind.reads_as_zero() {
                    front.length.min(MAX_ZERO_REQUEST)
                } else {
                    front.length.min(self.request)
                };
                let piece = Extent {
                    offset: front.offset,
                    length: take,
                    kind: front.kind,
                };
                front.offset += take;
                front.length -= take;
                if front.length == 0 {
                    self.queue.pop_front();
                }
                return Ok(Some(piece));
            }
            // The ranges starting within one window share one extent query: many small changed
            // ranges cost one round trip, not one each.
            let Some(&(window_start, _)) = self.ranges.front() else {
                return Ok(None);
            };
            let limit = window_start.saturating_add(EXTENT_WINDOW);
            let mut taken: Vec<(u64, u64)> = Vec::new();
            while let Some(range) = self.ranges.front_mut() {
                if range.0 >= limit {
                    break;
                }
                if range.1 > limit {
                    taken.push((range.0, limit));
                    range.0 = limit;
                    break;
                }
                taken.push(*range);
                self.ranges.pop_front();
            }
            let window_end = taken.last().map_or(window_start, |r| r.1);
            let extents = if self.use_extents {
                self.src
                    .allocated_extents(window_start, window_end - window_start)?
            } else {
                vec![Extent {
                    offset: window_start,
                    length: window_end - window_start,
                    kind: ExtentKind::Data,
                }]
            };
            for (start, end) in taken {
                let first = extents.partition_point(|e| e.end() <= start);
                self.queue
                    .extend(normalise(&extents[first..], start, end - start, self.align));
            }
        }
    }
}

/// Checks, widens to `align`, sorts and merges the dirty ranges of `changes` into `[start,
/// end)` ranges of a disk of `size` bytes.
fn plan_changes(changes: &[DirtyExtent], size: u64, align: u64) -> Result<VecDeque<(u64, u64)>> {
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(changes.len());
    for change in changes {
        crate::check_range(change.offset, change.length, size)?;
        if !change.dirty || change.length == 0 {
            continue;
        }
        let start = change.offset / align * align;
        let end = (change.offset + change.length)
            .next_multiple_of(align)
            .min(size);
        spans.push((start, end));
    }
    spans.sort_unstable();
    let mut merged: VecDeque<(u64, u64)> = VecDeque::new();
    for (start, end) in spans {
        match merged.back_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push_back((start, end)),
        }
    }
    Ok(merged)
}

/// Makes extents cover `[start, start + length)` exactly, and shrinks zero extents to
/// `align` boundaries (the partial blocks become data), so every request is aligned. `extents`
/// are sorted; those before `start` are skipped, and the walk stops at the first one past the
/// range.
fn normalise(extents: &[Extent], start: u64, length: u64, align: u64) -> Vec<Extent> {
    let end = start + length;
    let mut out = Vec::new();
    let mut pos = start;
    for e in extents {
        if e.offset >= end {
            break;
        }
        let s = e.offset.max(pos);
        let t = e.end().min(end);
        if t <= s {
            continue;
        }
        if s > pos {
            // A gap the backend did not describe: copy it.
            push_range(&mut out, pos, s, ExtentKind::Data);
        }
        if e.kind.reads_as_zero() {
            let zs = s.next_multiple_of(align);
            let zt = if t == end { t } else { t / align * align };
            if zt > zs {
                push_range(&mut out, s, zs, ExtentKind::Data);
                push_range(&mut out, zs, zt, e.kind);
                push_range(&mut out, zt, t, ExtentKind::Data);
            } else {
                push_range(&mut out, s, t, ExtentKind::Data);
            }
        } else {
            push_range(&mut out, s, t, ExtentKind::Data);
        }
        pos = t;
    }
    if pos < end {
        push_range(&mut out, pos, end, ExtentKind::Data);
    }
    out
}

/// Splits `buf` into runs of whole `block`s that are all zero or not: `(start, end, zero)`,
/// covering the buffer in order (the last block may be short).
fn zero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, b) in buf.chunks(block.max(1)).enumerate() {
        let start = i * block.max(1);
        let zero = is_zero(b);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = start + b.len(),
            _ => runs.push((start, start + b.len(), zero)),
        }
    }
    runs
}

/// Whether `buf` is all zeros. Checked 64 bytes at a time (a vectorisable OR), so data is
/// usually rejected after its first 64 bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(64)
        .all(|piece| piece.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Copies all of `src` onto the start of `dst` (which may be larger); see the
/// [module docs](self).
pub fn copy(
    src: &dyn Disk,
    dst: &dyn Disk,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let setup = Setup::new(src, dst, options, false).map_err(|e| failed(e, 0, started))?;
    let ranges = whole_disk(setup.size);
    run(src, dst, &setup, ranges, options, None, progress, started)
}

/// The one range a whole-disk copy plans: nothing for an empty disk.
fn whole_disk(size: u64) -> VecDeque<(u64, u64)> {
    if size == 0 {
        VecDeque::new()
    } else {
        VecDeque::from([(0, size)])
    }
}

/// [`copy`], feeding `hasher` (a [`BlkHasher`] for `src`'s size) with every piece copied,
/// instead of a hasher of its own ([`CopyOptions::blkhash`], which must be unset): for a
/// [`BlkHasher::recording`] whose block digests start the next point's incremental hash.
pub fn copy_hashing(
    src: &dyn Disk,
    dst: &dyn Disk,
    options: &CopyOptions,
    hasher: &BlkHasher,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let setup = Setup::new(src, dst, options, false)
        .and_then(|setup| check_hasher(&setup, options, hasher).map(|()| setup))
        .map_err(|e| failed(e, 0, started))?;
    let ranges = whole_disk(setup.size);
    run(
        src,
        dst,
        &setup,
        ranges,
        options,
        Some(hasher),
        progress,
        started,
    )
}

/// A hasher given to a copy must hash the source, alone.
fn check_hasher(setup: &Setup, options: &CopyOptions, hasher: &BlkHasher) -> Result<()> {
    if options.blkhash.is_some() {
        return Err(Error::InvalidParams(
            "a copy given a block hasher computes no second block hash (unset \
             CopyOptions::blkhash)"
                .into(),
        ));
    }
    if hasher.size() != setup.size {
        return Err(Error::InvalidParams(format!(
            "the block hasher is for {} bytes, the copy's source has {}",
            hasher.size(),
            setup.size
        )));
    }
    Ok(())
}

/// An incremental backup: copies what changed in `src` since the checkpoint of the dirty bitmap
/// it was opened with ([`Disk::dirty_extents`]) onto `dst`, the previous backup, of the same
/// size. Changed ranges that now read as zeros are zeroed on `dst`.
///
/// Everything that can be known before writing is checked before the first byte is written:
/// that `src` has a bitmap ([`Error::Unsupported`] otherwise), that the sizes match, and the
/// whole bitmap is read first (so [`CopyProgress::total`] is the changed bytes from the start).
///
/// ```
/// use disk_transport::copy::{copy_changed, CopyOptions};
/// use disk_transport::memory::MemoryDisk;
/// use disk_transport::Disk;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let vm = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// let backup = MemoryDisk::with_data(&[1u8; 1 << 20]); // the last full backup
/// vm.add_dirty_bitmap("since-full")?;
/// vm.write_at(&[2u8; 4096], 65536)?; // changed since then
/// let changes = vm.dirty_bitmap_handle("since-full")?;
/// let report = copy_changed(&changes, &backup, &CopyOptions::default(), &mut |_| {})?;
/// assert_eq!(report.progress.total, 65536); // the bitmap's granularity
/// assert_eq!(backup.to_vec()?, vm.to_vec()?);
/// // Without a bitmap there is nothing to go by: an error, and nothing written.
/// assert!(copy_changed(&vm, &backup, &CopyOptions::default(), &mut |_| {}).is_err());
/// # Ok(())
/// # }
/// ```
pub fn copy_changed(
    src: &dyn Disk,
    dst: &dyn Disk,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let setup = Setup::new(src, dst, options, true).map_err(|e| failed(e, 0, started))?;
    let changes = dirty_changes(src, setup.size, options).map_err(|e| failed(e, 0, started))?;
    let ranges =
        plan_changes(&changes, setup.size, setup.align).map_err(|e| failed(e, 0, started))?;
    run(src, dst, &setup, ranges, options, None, progress, started)
}

/// The dirty extents of `src`'s bitmap over its `size` bytes, asked for [`DIRTY_WINDOW`] at a
/// time so that a cancel is seen between two windows.
fn dirty_changes(src: &dyn Disk, size: u64, options: &CopyOptions) -> Result<Vec<DirtyExtent>> {
    let mut changes = Vec::new();
    let mut at = 0;
    while at < size {
        if options.cancelled() {
            return Err(Error::Cancelled);
        }
        let length = (size - at).min(DIRTY_WINDOW);
        let window = src.dirty_extents(at, length)?;
        changes.extend(window.into_iter().filter(|e| e.dirty));
        at += length;
    }
    Ok(changes)
}

/// [`copy_changed`], also computing the block hash of `src` at this point (the whole disk,
/// not only its changes) from the changed blocks alone: `hasher` was made by
/// [`BlkHasher::resume`] from the block digests of the previous point, the one `dst` holds.
/// The changed ranges are widened to whole hash blocks (the unchanged rest of a partly changed
/// block is read from `src`, which holds it as well, and written again), so every block that
/// changed is hashed whole. [`BlkHasher::finish_with_digests`] then gives this point's hash
/// and the digests for the next one.
///
/// ```
/// use disk_transport::blkhash::{checksum, BlkHasher, BlkhashSpec};
/// use disk_transport::copy::{copy_changed_hashing, copy_hashing, CopyOptions};
/// use disk_transport::memory::MemoryDisk;
/// use disk_transport::Disk;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let spec = BlkhashSpec::default();
/// let vm = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// vm.add_dirty_bitmap("since-full")?;
/// // The full backup, keeping its block digests.
/// let backup = MemoryDisk::new(1 << 20);
/// let full = BlkHasher::recording(spec, 1 << 20)?;
/// copy_hashing(&vm, &backup, &CopyOptions::default(), &full, &mut |_| {})?;
/// let (_, digests) = full.finish_with_digests()?;
/// // Changes, then the incremental copy hashes what changed only.
/// vm.write_at(&[2u8; 100], 200_000)?;
/// let changes = vm.dirty_bitmap_handle("since-full")?;
/// let next = BlkHasher::resume(digests);
/// copy_changed_hashing(&changes, &backup, &CopyOptions::default(), &next, &mut |_| {})?;
/// let (hash, _) = next.finish_with_digests()?;
/// assert_eq!(hash, checksum(&vm, spec, &CopyOptions::default(), &mut |_| {})?);
/// # Ok(())
/// # }
/// ```
pub fn copy_changed_hashing(
    src: &dyn Disk,
    dst: &dyn Disk,
    options: &CopyOptions,
    hasher: &BlkHasher,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let setup = Setup::new(src, dst, options, true)
        .and_then(|setup| check_hasher(&setup, options, hasher).map(|()| setup))
        .map_err(|e| failed(e, 0, started))?;
    let changes = dirty_changes(src, setup.size, options).map_err(|e| failed(e, 0, started))?;
    // Both are powers of two: the larger is a multiple of the smaller.
    let align = setup.align.max(hasher.spec().block_size);
    let ranges = plan_changes(&changes, setup.size, align).map_err(|e| failed(e, 0, started))?;
    run(
        src,
        dst,
        &setup,
        ranges,
        options,
        Some(hasher),
        progress,
        started,
    )
}

/// Copies the dirty ranges of `changes` (clean ones are ignored) from `src` to the same offsets
/// of `dst`, of the same size: an incremental backup from a change list you already have —
/// what [`Disk::dirty_extents`] returned, VMware's `QueryChangedDiskAreas`
/// ([`DirtyExtent::dirty`]). An empty list copies nothing. Ranges are widened to the disks'
/// block size, sorted and merged; [`CopyProgress::total`] is the sum of their lengths.
///
/// ```
/// use disk_transport::copy::{copy_extents, CopyOptions};
/// use disk_transport::memory::MemoryDisk;
/// use disk_transport::{DirtyExtent, Disk};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let vm = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// let backup = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// vm.write_at(&[2u8; 4096], 65536)?;
/// let changed = [DirtyExtent::dirty(65536, 4096)];
/// let report = copy_extents(&vm, &backup, &changed, &CopyOptions::default(), &mut |_| {})?;
/// assert_eq!(report.progress.total, 4096);
/// assert_eq!(backup.to_vec()?, vm.to_vec()?);
/// # Ok(())
/// # }
/// ```
pub fn copy_extents(
    src: &dyn Disk,
    dst: &dyn Disk,
    changes: &[DirtyExtent],
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let setup = Setup::new(src, dst, options, true).map_err(|e| failed(e, 0, started))?;
    let ranges =
        plan_changes(changes, setup.size, setup.align).map_err(|e| failed(e, 0, started))?;
    run(src, dst, &setup, ranges, options, None, progress, started)
}

fn failed(error: Error, total: u64, started: Instant) -> CopyError {
    CopyError {
        error,
        report: Box::new(CopyReport {
            progress: CopyProgress {
                total,
                ..CopyProgress::default()
            },
            elapsed: started.elapsed(),
            blkhash: None,
        }),
    }
}

/// When a copy flushes its destination on the way ([`CopyOptions::flush_every`]).
pub(crate) struct FlushSchedule {
    every: u64,
    next: u64,
}

impl FlushSchedule {
    /// Whether `written` bytes (so far, in all) call for a flush now; the next one is then
    /// due `every` bytes further on.
    pub(crate) fn due(&mut self, written: u64) -> bool {
        if written < self.next {
            return false;
        }
        self.next = (written / self.every + 1) * self.every;
        true
    }
}

/// What the disks allow, checked before anything is read or written.
struct Setup {
    size: u64,
    align: u64,
    request: u64,
    use_extents: bool,
    /// Zero ranges may be skipped.
    destination_is_zero: bool,
}

impl Setup {
    fn new(
        src: &dyn Disk,
        dst: &dyn Disk,
        options: &CopyOptions,
        incremental: bool,
    ) -> Result<Self> {
        if incremental && options.blkhash.is_some() {
            return Err(Error::Unsupported(
                "a block hash of an incremental copy (it needs the whole disk: hash the \
                 result, or ask the full copy)"
                    .into(),
            ));
        }
        let sinfo = src.info()?;
        let dinfo = dst.info()?;
        if dinfo.read_only {
            return Err(Error::ReadOnly("the copy destination".into()));
        }
        if incremental && dinfo.capacity != sinfo.capacity {
            return Err(Error::SizeMismatch {
                what: "an incremental copy needs a destination of the source's size".into(),
                source_size: sinfo.capacity,
                destination_size: dinfo.capacity,
                hint: "write it onto the previous backup of this disk, or an overlay of it; a \
                       disk resized since the last backup needs a full one"
                    .into(),
            });
        }
        if dinfo.capacity < sinfo.capacity {
            return Err(Error::SizeMismatch {
                what: "the copy destination is smaller than the source".into(),
                source_size: sinfo.capacity,
                destination_size: dinfo.capacity,
                hint: "give a destination at least as large as the source".into(),
            });
        }
        let align = u64::from(sinfo.min_block_size.max(dinfo.min_block_size).max(1));
        let max_request = u64::from(sinfo.max_request_size.min(dinfo.max_request_size)).max(align);
        let request = (options.request_size_into(dst.protocol().is_some()) as u64)
            .max(u64::from(
                sinfo.preferred_block_size.max(dinfo.preferred_block_size),
            ))
            .min(max_request)
            / align
            * align;
        Ok(Setup {
            size: sinfo.capacity,
            align,
            request: request.max(align),
            use_extents: options.extents && sinfo.can_extents,
            destination_is_zero: options.destination_is_zero && !incremental,
        })
    }
}

/// Runs the workers over `ranges` and reports. `given` is a hasher of the caller's to feed;
/// else one is made when [`CopyOptions::blkhash`] asks for one.
#[allow(clippy::too_many_arguments)]
fn run(
    src: &dyn Disk,
    dst: &dyn Disk,
    setup: &Setup,
    ranges: VecDeque<(u64, u64)>,
    options: &CopyOptions,
    given: Option<&BlkHasher>,
    progress: &mut dyn FnMut(&CopyProgress),
    started: Instant,
) -> CopyResult {
    let own = options.blkhash.map(|spec| BlkHasher::new(spec, setup.size));
    let threads = options.threads.max(1);
    let mut per_thread = options.requests_in_flight.max(1).div_ceil(threads);
    if src.max_in_flight() <= 1 && dst.max_in_flight() <= 1 {
        per_thread = per_thread.min(SYNCHRONOUS_REQUESTS_PER_THREAD);
    }
    let total = ranges.iter().map(|r| r.1 - r.0).sum();
    let shared = WorkerShared {
        planner: Mutex::new(Planner {
            src,
            align: setup.align,
            request: setup.request,
            use_extents: setup.use_extents,
            ranges,
            queue: VecDeque::new(),
        }),
        sparse_block: setup.align.max(4096) as usize,
        destination_is_zero: setup.destination_is_zero,
        hasher: given.or(own.as_ref()),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    };
    let mut p = CopyProgress {
        total,
        ..CopyProgress::default()
    };
    let (delta_tx, delta_rx) = mpsc::channel::<CopyProgress>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let delta_tx = delta_tx.clone();
            let shared = &shared;
            scope.spawn(move || {
                worker(src, dst, shared, per_thread, options, &delta_tx);
            });
        }
        drop(delta_tx);
        // Every worker ends (its waits have deadlines), and with it the channel.
        let mut flushes = options.flush_schedule(dst.protocol().is_some());
        for delta in delta_rx {
            p.add(&delta);
            progress(&p);
            let due = flushes.as_mut().is_some_and(|f| f.due(p.written));
            // Here rather than in a copying thread, which would stop copying meanwhile.
            if due && !shared.stopping() {
                if let Err(e) = dst.flush() {
                    shared.fail(e);
                }
            }
        }
    });
    let report = |p: CopyProgress| CopyReport {
        progress: p,
        elapsed: started.elapsed(),
        blkhash: None,
    };
    let failed = |error, p| {
        Err(CopyError {
            error,
            report: Box::new(report(p)),
        })
    };
    if let Some(error) = shared
        .first_error
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        return failed(error, p);
    }
    if p.done != p.total {
        let error = Error::Protocol(format!(
            "copy finished {} of {} bytes; refusing to report success",
            p.done, p.total
        ));
        return failed(error, p);
    }
    if options.flush {
        if let Err(error) = dst.flush() {
            return failed(error, p);
        }
    }
    let blkhash = match own.map(BlkHasher::finish).transpose() {
        Ok(hash) => hash,
        Err(error) => return failed(error, p),
    };
    Ok(CopyReport {
        blkhash,
        ..report(p)
    })
}

struct WorkerShared<'a> {
    planner: Mutex<Planner<'a>>,
    /// Granularity of zero detection in read buffers.
    sparse_block: usize,
    destination_is_zero: bool,
    /// Fed every finished range, when a block hash was asked for.
    hasher: Option<&'a BlkHasher>,
    stop: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

impl WorkerShared<'_> {
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(e);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn next_piece(&self) -> Result<Option<Extent>> {
        if self.stopping() {
            return Ok(None);
        }
        self.planner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next()
    }
}

/// How often a worker sends its progress to the coordinating thread.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// A worker's progress not yet sent to the coordinating thread. Sending it per request woke
/// that thread twice per request, a context switch each; every [`PROGRESS_INTERVAL`] is enough
/// for a progress bar. Whatever is left is sent when the worker ends (on drop, so early returns
/// report too).
struct Unreported<'a> {
    sum: CopyProgress,
    since: Instant,
    to: &'a mpsc::Sender<CopyProgress>,
}

impl Unreported<'_> {
    fn add(&mut self, delta: CopyProgress) {
        self.sum.add(&delta);
        if self.since.elapsed() >= PROGRESS_INTERVAL {
            self.send();
        }
    }

    fn send(&mut self) {
        if self.sum != CopyProgress::default() {
            let _ = self.to.send(std::mem::take(&mut self.sum));
        }
        self.since = Instant::now();
    }
}

impl Drop for Unreported<'_> {
    fn drop(&mut self) {
        self.send();
    }
}

/// A completed request, sent by the completion callback to its worker.
enum Event {
    Read {
        offset: u64,
        length: u64,
        attempt: u32,
        result: Result<Vec<u8>>,
    },
    Written {
        offset: u64,
        length: u64,
        attempt: u32,
        result: Result<Vec<u8>>,
    },
}

/// Where a copying thread sends the source's reads.
enum SourceQueue {
    /// Ask the source for a driven queue at the first read.
    NotAsked,
    /// Through the source itself (no queue, or none wanted).
    Shared,
    /// On a queue this thread drives itself.
    Driven(Box<dyn DrivenQueue>),
}

/// One copying thread's state.
struct Worker<'a, 's, 'p> {
    src: &'a dyn Disk,
    dst: &'a dyn Disk,
    shared: &'s WorkerShared<'p>,
    options: &'s CopyOptions,
    tx: mpsc::Sender<Event>,
    /// Where the source's reads go.
    queue: SourceQueue,
    pool: Vec<Vec<u8>>,
    outstanding: usize,
}

impl Worker<'_, '_, '_> {
    fn submit_read(&mut self, offset: u64, length: u64, attempt: u32) {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.resize(length as usize, 0);
        let tx = self.tx.clone();
        self.outstanding += 1;
        let done: ReadCompletion = Box::new(move |result| {
            let _ = tx.send(Event::Read {
                offset,
                length,
                attempt,
                result,
            });
        });
        if matches!(self.queue, SourceQueue::NotAsked) {
            // Asked at the first read, so a copy with nothing to read opens no connection. A
            // server that refuses one more connection still serves the disk's own: the reads
            // go there, as they would without queues; nothing but speed depends on it.
            self.queue = match self.src.driven_queue() {
                Ok(Some(queue)) => SourceQueue::Driven(queue),
                _ => SourceQueue::Shared,
            };
        }
        // A retry goes through the disk itself: the queue's connection may be what failed.
        match &mut self.queue {
            SourceQueue::Driven(queue) if attempt == 0 => queue.submit_read(offset, buf, done),
            _ => self.src.submit_read(offset, buf, done),
        }
    }

    fn submit_write(&mut self, offset: u64, buf: Vec<u8>, attempt: u32) {
        let tx = self.tx.clone();
        let length = buf.len() as u64;
        self.outstanding += 1;
        self.dst.submit_write(
            offset,
            buf,
            Box::new(move |result| {
                let _ = tx.send(Event::Written {
                    offset,
                    length,
                    attempt,
                    result,
                });
            }),
        );
    }

    /// Whether a request that failed with `e` on its `attempt`-th try may be tried again, after
    /// waiting the backoff (`Err` if the copy was cancelled meanwhile).
    fn retry(&self, e: &Error, attempt: u32) -> Result<bool> {
        if attempt >= self.options.retries || !e.is_transient() || self.shared.stopping() {
            return Ok(false);
        }
        let delay = self.options.retry_delay * 2u32.pow(attempt.min(4));
        let until = Instant::now() + delay;
        loop {
            if self.options.cancelled() {
                return Err(Error::Cancelled);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(true);
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of retries; counts retries.
    fn with_retries(&self, d: &mut CopyProgress, mut op: impl FnMut() -> Result<()>) -> Result<()> {
        let mut attempt = 0;
        loop {
            match op() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if !self.retry(&e, attempt)? {
                        return Err(e);
                    }
                    attempt += 1;
                    d.retried += 1;
                }
            }
        }
    }

    /// Zeroes (or skips) a range of the destination.
    fn zero_range(&self, offset: u64, length: u64) -> Result<CopyProgress> {
        let mut d = CopyProgress {
            done: length,
            ..CopyProgress::default()
        };
        if self.shared.destination_is_zero {
            d.skipped = length;
        } else {
            let dst = self.dst;
            self.with_retries(&mut d, || dst.write_zeroes(offset, length))?;
            d.zeroed = length;
        }
        Ok(d)
    }

    /// A read came back with zero blocks in it: zero (or skip) those blocks and write the rest
    /// synchronously, keeping the destination as sparse as the data allows. Mixed buffers are
    /// rare (edges of data), so they are not pipelined.
    fn write_sparse(
        &self,
        offset: u64,
        buf: &[u8],
        runs: &[(usize, usize, bool)],
    ) -> (CopyProgress, Result<()>) {
        let mut d = CopyProgress {
            read: buf.len() as u64,
            ..CopyProgress::default()
        };
        for &(start, end, zero) in runs {
            let at = offset + start as u64;
            let n = (end - start) as u64;
            let step = if zero {
                self.zero_range(at, n).map(|z| {
                    d.zeroed += z.zeroed;
                    d.skipped += z.skipped;
                    d.retried += z.retried;
                })
            } else {
                let dst = self.dst;
                let mut r = CopyProgress::default();
                let result = self.with_retries(&mut r, || dst.write_at(&buf[start..end], at));
                d.retried += r.retried;
                result.map(|()| d.written += n)
            };
            if let Err(e) = step {
                return (d, Err(e));
            }
            d.done += n;
        }
        (d, Ok(()))
    }
}

/// One copying thread: pulls pieces from the shared planner and keeps up to `in_flight` of
/// them moving, sending progress deltas to the coordinating thread. Errors go to
/// [`WorkerShared::fail`], which stops every worker.
fn worker(
    src: &dyn Disk,
    dst: &dyn Disk,
    shared: &WorkerShared<'_>,
    in_flight: usize,
    options: &CopyOptions,
    deltas: &mpsc::Sender<CopyProgress>,
) {
    let (tx, rx) = mpsc::channel::<Event>();
    // A read completed by a reader thread costs a wake-up of this one; on a queue this thread
    // drives, the read completes here. Only when writing costs nothing (`null:`): while this
    // thread writes, nobody reads the queue's socket, and a server such as qemu-nbd, whose
    // socket buffer holds a few hundred KiB, stops sending. From a qemu-nbd 7.2 export into a
    // qcow2 on tmpfs, 2 GiB took 1.33 s on queues and 0.98 s through the reader threads (the
    // server 0.93 against 0.64 CPU s; medians of 5 interleaved runs); into `null:` both took
    // 0.70 s, the queues with 13 % less CPU.
    let queue = if src.max_in_flight() > 1 && dst.discards_writes() {
        SourceQueue::NotAsked
    } else {
        SourceQueue::Shared
    };
    let mut w = Worker {
        src,
        dst,
        shared,
        options,
        tx,
        queue,
        pool: Vec::new(),
        outstanding: 0,
    };
    let mut first_error: Option<Error> = None;
    let mut source_done = false;
    let mut unreported = Unreported {
        sum: CopyProgress::default(),
        since: Instant::now(),
        to: deltas,
    };
    let mut last_event = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        if first_error.is_none() && options.cancelled() {
            first_error = Some(Error::Cancelled);
        }
        while first_error.is_none() && !source_done && w.outstanding < in_flight {
            let piece = match shared.next_piece() {
                Ok(Some(piece)) => piece,
                Ok(None) => {
                    source_done = true;
                    break;
                }
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            };
            if piece.kind.reads_as_zero() {
                match w.zero_range(piece.offset, piece.length) {
                    Ok(d) => {
                        if let Some(h) = shared.hasher {
                            h.zeroes(piece.offset, piece.length);
                        }
                        unreported.add(d);
                    }
                    Err(e) => first_error = Some(e),
                }
                continue;
            }
            w.submit_read(piece.offset, piece.length, 0);
        }
        if let Some(e) = first_error.take() {
            shared.fail(e);
        }
        if w.outstanding == 0 {
            break;
        }
        if shared.stopping() {
            // Give the requests in flight a moment to land, then leave them behind: a stalled
            // server must not hold up a cancel.
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STOP_GRACE {
                break;
            }
        }
        let waited = last_event.elapsed();
        if waited >= options.stall_timeout {
            shared.fail(Error::Timeout {
                what: format!("copy ({} requests outstanding)", w.outstanding),
                offset: None,
                after: options.stall_timeout,
            });
            break;
        }
        let wait = (options.stall_timeout - waited).min(POLL);
        let event = match &mut w.queue {
            // Completions of the queue's reads arrive while it is driven; retries and writes
            // send theirs from elsewhere, and are seen within a `wait`.
            SourceQueue::Driven(queue) => match rx.try_recv() {
                Ok(event) => event,
                Err(_) => {
                    queue.drive(wait);
                    continue;
                }
            },
            SourceQueue::NotAsked | SourceQueue::Shared => match rx.recv_timeout(wait) {
                Ok(event) => event,
                Err(_) => continue,
            },
        };
        last_event = Instant::now();
        w.outstanding -= 1;
        match event {
            Event::Read {
                offset,
                result: Ok(buf),
                ..
            } => {
                let length = buf.len() as u64;
                if shared.stopping() {
                    w.pool.push(buf);
                    continue;
                }
                let runs = if options.detect_zeroes {
                    zero_runs(&buf, shared.sparse_block)
                } else {
                    Vec::new()
                };
                if runs.iter().any(|r| r.2) {
                    let (d, result) = w.write_sparse(offset, &buf, &runs);
                    match result {
                        Ok(()) => {
                            if let Some(h) = shared.hasher {
                                h.update(offset, &buf);
                            }
                        }
                        Err(e) => first_error = Some(e),
                    }
                    w.pool.push(buf);
                    unreported.add(d);
                    continue;
                }
                unreported.add(CopyProgress {
                    read: length,
                    ..CopyProgress::default()
                });
                w.submit_write(offset, buf, 0);
            }
            Event::Written {
                offset,
                result: Ok(buf),
                ..
            } => {
                // Hashed once it is written, so a retried piece is hashed once.
                if let Some(h) = shared.hasher {
                    h.update(offset, &buf);
                }
                unreported.add(CopyProgress {
                    written: buf.len() as u64,
                    done: buf.len() as u64,
                    ..CopyProgress::default()
                });
                w.pool.push(buf);
            }
            Event::Read {
                offset,
                length,
                attempt,
                result: Err(e),
            }
            | Event::Written {
                offset,
                length,
                attempt,
                result: Err(e),
            } => match w.retry(&e, attempt) {
                Ok(true) => {
                    // A failed write lost its buffer: read the piece again.
                    unreported.add(CopyProgress {
                        retried: 1,
                        ..CopyProgress::default()
                    });
                    w.submit_read(offset, length, attempt + 1);
                }
                Ok(false) => first_error = Some(e),
                Err(cancelled) => first_error = Some(cancelled),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Fault, FaultOp, MemoryDisk, CHUNK_SIZE};
    use proptest::prelude::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Printed alone (`{}`), a copy's error says how far it got and why it stopped; walking
    /// the chain repeats nothing.
    #[test]
    fn copy_error_messages_name_the_cause() {
        let src = MemoryDisk::with_data(&pattern(1 << 20, 3));
        let failed = copy(
            &src,
            &MemoryDisk::new(4096),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(failed.error, Error::SizeMismatch { .. }),
            "{failed}"
        );
        assert_eq!(
            failed.to_string(),
            "copy did not start: the copy destination is smaller than the source: the source \
             has 1048576 bytes, the destination 4096 bytes (give a destination at least as \
             large as the source)"
        );
        assert!(std::error::Error::source(&failed).is_none());

        src.inject(Fault::read_at(512 << 10));
        let failed = copy(
            &src,
            &MemoryDisk::new(1 << 20),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        let text = failed.to_string();
        assert!(
            text.starts_with("copy stopped after ")
                && text.contains(" of 1048576 bytes: injected read failure at offset 524288"),
            "{text}"
        );
        assert!(!text.contains("0 of 0"), "{text}");
    }

    #[test]
    fn copies_sparse_disks_exactly() {
        let src = MemoryDisk::new(10 * CHUNK_SIZE + 123);
        src.write_at(&pattern(5000, 1), 3).unwrap();
        src.write_at(&pattern(CHUNK_SIZE as usize, 2), 7 * CHUNK_SIZE)
            .unwrap();
        src.write_at(&pattern(123, 3), 10 * CHUNK_SIZE).unwrap();
        let dst = MemoryDisk::with_data(&vec![0xFFu8; (11 * CHUNK_SIZE) as usize]);
        let mut calls = 0;
        let report = copy(
            &src,
            &dst,
            &CopyOptions::default().request_size(4096),
            &mut |_| calls += 1,
        )
        .unwrap();
        assert!(calls > 0);
        assert_eq!(report.progress.done, src.capacity());
        let out = dst.to_vec().unwrap();
        assert_eq!(&out[..src.capacity() as usize], &src.to_vec().unwrap()[..]);
        assert!(out[src.capacity() as usize..].iter().all(|&b| b == 0xFF));
        assert_eq!(report.progress.read, 2 * CHUNK_SIZE + 123);
        assert_eq!(dst.flush_count(), 1);
    }

    #[test]
    fn destination_is_zero_skips_holes() {
        let src = MemoryDisk::new(1 << 30);
        src.write_at(b"x", 5 << 20).unwrap();
        let dst = MemoryDisk::new(1 << 30);
        let report = copy(
            &src,
            &dst,
            &CopyOptions::default().destination_is_zero(true),
            &mut |_| {},
        )
        .unwrap();
        // Everything but the one 4 KiB block holding data (zero blocks of read buffers too).
        assert_eq!(report.progress.skipped, (1 << 30) - 4096);
        assert_eq!(dst.allocated_bytes(), CHUNK_SIZE);
    }

    #[test]
    fn errors_stop_the_copy_and_name_the_offset() {
        let src = MemoryDisk::with_data(&pattern(1 << 20, 9));
        src.inject(Fault::read_at(600_000));
        let dst = MemoryDisk::new(1 << 20);
        let err = copy(&src, &dst, &CopyOptions::default(), &mut |_| {})
            .unwrap_err()
            .error;
        assert!(
            matches!(
                err,
                Error::Injected {
                    offset: 600_000,
                    ..
                }
            ),
            "{err}"
        );
        src.clear_faults();
        dst.inject(Fault::write_at(100));
        assert!(copy(&src, &dst, &CopyOptions::default(), &mut |_| {}).is_err());
        dst.clear_faults();
        dst.inject(Fault::flush());
        assert!(copy(&src, &dst, &CopyOptions::default(), &mut |_| {}).is_err());
        let small = MemoryDisk::new(100);
        assert!(copy(&src, &small, &CopyOptions::default(), &mut |_| {}).is_err());
        assert!(copy(
            &src,
            &dst.read_only_handle(),
            &CopyOptions::default(),
            &mut |_| {}
        )
        .is_err());
    }

    #[test]
    fn changes_are_widened_sorted_and_merged() {
        let d = DirtyExtent::dirty;
        let clean = DirtyExtent {
            offset: 0,
            length: 10_000,
            dirty: false,
        };
        let r = plan_changes(
            &[d(9000, 10), d(0, 100), clean, d(4000, 200), d(10_000, 0)],
            10_000,
            4096,
        )
        .unwrap();
        assert_eq!(r, VecDeque::from([(0, 10_000)]));
        let r = plan_changes(&[d(20_000, 1), d(0, 1)], 30_000, 4096).unwrap();
        assert_eq!(r, VecDeque::from([(0, 4096), (16384, 20480)]));
        assert!(plan_changes(&[d(9999, 2)], 10_000, 1).is_err());
        assert_eq!(plan_changes(&[clean], 10_000, 1).unwrap(), VecDeque::new());
        let src = MemoryDisk::with_data(&pattern(1 << 20, 1));
        let dst = MemoryDisk::new(1 << 20);
        let report = copy_extents(
            &src,
            &dst,
            &[d(100_000, 10), d(5, 5)],
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.progress.total, 15);
        let (s, t) = (src.to_vec().unwrap(), dst.to_vec().unwrap());
        assert_eq!(&t[100_000..100_010], &s[100_000..100_010]);
        assert_eq!(&t[5..10], &s[5..10]);
        assert!(t[..5].iter().all(|&b| b == 0));
        // An empty change list copies nothing (it does not mean "everything").
        let report = copy_extents(&src, &dst, &[], &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.progress, CopyProgress::default());
    }

    #[test]
    fn incremental_copies_follow_the_bitmap_and_zero_what_was_erased() {
        let vm = MemoryDisk::new(64 * CHUNK_SIZE);
        vm.write_at(&pattern(20 * CHUNK_SIZE as usize, 1), 0)
            .unwrap();
        vm.add_dirty_bitmap("b0").unwrap();
        let backup = MemoryDisk::new(64 * CHUNK_SIZE);
        let full = copy(&vm, &backup, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(full.progress.total, 64 * CHUNK_SIZE);
        // The guest writes, overwrites, and erases (zeroes) a range that held data.
        vm.write_at(&pattern(100, 2), 30 * CHUNK_SIZE + 7).unwrap();
        vm.write_at(&pattern(CHUNK_SIZE as usize, 3), 2 * CHUNK_SIZE)
            .unwrap();
        vm.write_zeroes(10 * CHUNK_SIZE, 3 * CHUNK_SIZE).unwrap();
        let since = vm.dirty_bitmap_handle("b0").unwrap();
        let report = copy_changed(&since, &backup, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.progress.total, 5 * CHUNK_SIZE);
        // The erased chunks, and the zero blocks around the 100 bytes in theirs.
        assert_eq!(report.progress.zeroed, 3 * CHUNK_SIZE + CHUNK_SIZE - 4096);
        assert_eq!(backup.to_vec().unwrap(), vm.to_vec().unwrap());
        // Nothing changed since: nothing to do.
        vm.clear_dirty_bitmap("b0").unwrap();
        let report = copy_changed(&since, &backup, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.progress.total, 0);
        // destination_is_zero would skip the erased range: incremental copies ignore it.
        vm.write_zeroes(0, CHUNK_SIZE).unwrap();
        let options = CopyOptions::default().destination_is_zero(true);
        copy_changed(&since, &backup, &options, &mut |_| {}).unwrap();
        assert_eq!(backup.to_vec().unwrap(), vm.to_vec().unwrap());
    }

    #[test]
    fn incremental_copies_check_everything_before_writing() {
        let vm = MemoryDisk::with_data(&pattern(1 << 20, 1));
        vm.add_dirty_bitmap("b0").unwrap();
        vm.write_at(b"new", 0).unwrap();
        let since = vm.dirty_bitmap_handle("b0").unwrap();
        let options = CopyOptions::default();
        // No bitmap on the handle.
        let dst = MemoryDisk::new(1 << 20);
        let failed = copy_changed(&vm, &dst, &options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::NoDirtyBitmap { .. }),
            "{failed}"
        );
        // The message names the cause and the way out, not "not supported by this backend".
        let text = failed.to_string();
        assert!(
            text.contains("was opened without a dirty bitmap")
                && text.contains("dirty_bitmap_handle"),
            "{text}"
        );
        // A destination of another size, even a larger one: both sizes, not "invalid
        // connection parameters".
        let bigger = MemoryDisk::new(2 << 20);
        let failed = copy_changed(&since, &bigger, &options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                failed.error,
                Error::SizeMismatch { source_size, destination_size, .. }
                    if source_size == 1 << 20 && destination_size == 2 << 20
            ),
            "{failed}"
        );
        let text = failed.to_string();
        assert!(
            text.starts_with("copy did not start: ")
                && text.contains("source's size")
                && text.contains("1048576")
                && text.contains("2097152")
                && !text.contains("invalid connection parameters"),
            "{text}"
        );
        // The bitmap cannot be read (a broken checkpoint).
        vm.inject(Fault::dirty_extents());
        let failed = copy_changed(&since, &dst, &options, &mut |_| {}).unwrap_err();
        assert!(matches!(failed.error, Error::Injected { .. }), "{failed}");
        vm.clear_faults();
        // The bitmap was deleted after the handle was made.
        vm.remove_dirty_bitmap("b0").unwrap();
        let failed = copy_changed(&since, &dst, &options, &mut |_| {}).unwrap_err();
        assert!(matches!(failed.error, Error::NotFound(_)), "{failed}");
        assert_eq!(dst.allocated_bytes(), 0, "nothing was written");
        assert_eq!(dst.flush_count(), 0);
    }

    /// A source that cancels `token` when a read reaches `at` (a user pressing Ctrl-C then).
    #[derive(Debug)]
    struct CancelAt {
        disk: MemoryDisk,
        at: u64,
        token: CancelToken,
    }

    impl Disk for CancelAt {
        fn info(&self) -> Result<crate::DiskInfo> {
            self.disk.info()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset + buf.len() as u64 > self.at {
                self.token.cancel();
            }
            self.disk.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.disk.write_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            self.disk.flush()
        }
        fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            self.disk.allocated_extents(offset, length)
        }
    }

    /// The buffers a copy holds, and the most it held at once: reads of the source not yet
    /// written to the destination.
    type Held = Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>;

    /// A disk that counts into [`Held`]: a read takes a buffer, a write gives one back.
    #[derive(Debug)]
    struct Counting {
        disk: MemoryDisk,
        held: Held,
    }

    impl Disk for Counting {
        fn info(&self) -> Result<crate::DiskInfo> {
            self.disk.info()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let (held, peak) = &*self.held;
            peak.fetch_max(held.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            self.disk.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.held.0.fetch_sub(1, Ordering::SeqCst);
            self.disk.write_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            self.disk.allocated_extents(offset, length)
        }
    }

    #[test]
    fn between_synchronous_disks_a_thread_holds_a_few_buffers_whatever_is_asked() {
        let data = vec![0x5a; 16 << 20];
        let held = Held::default();
        let src = Counting {
            disk: MemoryDisk::with_data(&data),
            held: Arc::clone(&held),
        };
        let dst = Counting {
            disk: MemoryDisk::new(16 << 20),
            held: Arc::clone(&held),
        };
        let options = CopyOptions::default()
            .threads(2)
            .requests_in_flight(256)
            .request_size(64 << 10);
        let report = copy(&src, &dst, &options, &mut |_| {}).unwrap();
        assert_eq!(report.progress.read, 16 << 20);
        assert_eq!(dst.disk.to_vec().unwrap(), data);
        let peak = held.1.load(Ordering::SeqCst);
        assert!(
            (1..=2 * SYNCHRONOUS_REQUESTS_PER_THREAD).contains(&peak),
            "{peak} buffers held at once"
        );
    }

    #[test]
    fn flushes_on_the_way_when_asked() {
        let data = pattern(32 << 20, 9);
        let src = MemoryDisk::with_data(&data);
        let copy_into = |options: CopyOptions| {
            let dst = MemoryDisk::new(32 << 20);
            copy(&src, &dst, &options.request_size(1 << 20), &mut |_| {}).unwrap();
            assert_eq!(dst.to_vec().unwrap(), data);
            dst.flush_count()
        };
        // Progress arrives in batches (every 50 ms, and at the end): at least one flush on
        // the way, then the final one; never more than one per 4 MiB.
        let flushes = copy_into(CopyOptions::default().flush_every(4 << 20));
        assert!((2..=9).contains(&flushes), "{flushes} flushes");
        // Into anything but an NBD export, only at the end by default; never without flush.
        assert_eq!(copy_into(CopyOptions::default()), 1);
        assert_eq!(copy_into(CopyOptions::default().flush_every(0)), 1);
        assert_eq!(
            copy_into(CopyOptions::default().flush(false).flush_every(4 << 20)),
            0
        );
        // A flush that fails fails the copy.
        let dst = MemoryDisk::new(32 << 20);
        dst.inject(Fault::flush());
        let failed = copy(
            &src,
            &dst,
            &CopyOptions::default().flush_every(4 << 20),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(failed.to_string().contains("flush"), "{failed}");
    }

    #[test]
    fn nbd_destinations_are_flushed_every_256_mib_by_default() {
        let options = CopyOptions::default();
        assert_eq!(
            options.flush_every_into(true),
            Some(DEFAULT_FLUSH_EVERY_INTO_NBD)
        );
        assert_eq!(options.flush_every_into(false), None);
        let asked = CopyOptions::default().flush_every(1 << 30);
        assert_eq!(asked.flush_every_into(true), Some(1 << 30));
        assert_eq!(asked.flush_every_into(false), Some(1 << 30));
        assert_eq!(
            CopyOptions::default().flush_every(0).flush_every_into(true),
            None
        );
        assert_eq!(
            CopyOptions::default().flush(false).flush_every_into(true),
            None
        );
    }

    #[test]
    fn cancelling_stops_soon_and_reports_what_was_done() {
        let token = CancelToken::new();
        let src = CancelAt {
            disk: MemoryDisk::with_data(&pattern(16 << 20, 5)),
            at: 4 << 20,
            token: token.clone(),
        };
        let dst = MemoryDisk::new(16 << 20);
        let options = CopyOptions::default()
            .request_size(65536)
            .threads(2)
            .cancel(token.clone());
        let mut last = CopyProgress::default();
        let failed = copy(&src, &dst, &options, &mut |p| last = *p).unwrap_err();
        assert!(matches!(failed.error, Error::Cancelled), "{failed}");
        assert!(
            failed
                .to_string()
                .ends_with(" of 16777216 bytes: cancelled"),
            "{failed}"
        );
        let done = failed.report.progress.done;
        // Stopped early: what was read by then (the token's 4 MiB plus at most 64 requests of
        // 64 KiB in flight) bounds what was written.
        assert!(done < 9 << 20, "{done}");
        // What landed is the source's data, never a torn or misplaced piece.
        let (want, got) = (src.disk.to_vec().unwrap(), dst.to_vec().unwrap());
        let landed = want
            .chunks(65536)
            .zip(got.chunks(65536))
            .filter(|(w, g)| {
                assert!(
                    w == g || is_zero(g),
                    "a piece that is neither copied nor untouched"
                );
                w == g
            })
            .count();
        assert_eq!(landed as u64 * 65536, done);
        assert_eq!(
            last, failed.report.progress,
            "the callback saw the final counters"
        );
        assert_eq!(dst.flush_count(), 0, "a cancelled copy is not flushed");
        // A token cancelled before the start writes nothing.
        let src = src.disk;
        let dst = MemoryDisk::new(16 << 20);
        let failed = copy(&src, &dst, &options, &mut |_| {}).unwrap_err();
        assert!(matches!(failed.error, Error::Cancelled));
        assert_eq!(dst.allocated_bytes(), 0);
        // Tokens compare by identity, so options stay comparable.
        assert_eq!(options.clone(), options);
        assert_ne!(options, CopyOptions::default().cancel(CancelToken::new()));
    }

    #[test]
    fn cancel_interrupts_a_retry_backoff() {
        let src = MemoryDisk::with_data(&pattern(1 << 20, 5));
        src.inject(Fault::read_at(300_000));
        let dst = MemoryDisk::new(1 << 20);
        let token = CancelToken::new();
        let options = CopyOptions::default()
            .retries(5)
            .retry_delay(Duration::from_secs(30))
            .cancel(token.clone());
        let canceller = {
            let token = token.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                token.cancel();
            })
        };
        let started = Instant::now();
        let failed = copy(&src, &dst, &options, &mut |_| {}).unwrap_err();
        canceller.join().unwrap();
        assert!(matches!(failed.error, Error::Cancelled), "{failed}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn transient_errors_are_retried_when_asked() {
        let data = pattern(4 << 20, 8);
        let src = MemoryDisk::with_data(&data);
        let dst = MemoryDisk::new(4 << 20);
        let fast = CopyOptions::default().retry_delay(Duration::from_millis(1));
        // Off by default: the first error fails the copy.
        src.inject(Fault::read_at(1 << 20).times(2));
        assert!(copy(&src, &dst, &fast, &mut |_| {}).is_err());
        // Two failures of a read, one of a write, one of a zeroing: three retries suffice.
        src.clear_faults();
        src.inject(Fault::read_at(1 << 20).times(2));
        dst.inject(Fault::write_at(3 << 20).times(1));
        let sparse = MemoryDisk::new(4 << 20);
        sparse.write_at(b"x", 0).unwrap();
        let report = copy(&src, &dst, &fast.clone().retries(3), &mut |_| {}).unwrap();
        assert_eq!(report.progress.retried, 3);
        assert_eq!(dst.to_vec().unwrap(), data);
        dst.inject(Fault::range(FaultOp::Write, 2 << 20, 1).times(1));
        let report = copy(&sparse, &dst, &fast.clone().retries(1), &mut |_| {}).unwrap();
        assert_eq!(report.progress.retried, 1);
        assert_eq!(dst.to_vec().unwrap(), sparse.to_vec().unwrap());
        // More failures than retries: the error, with what was done.
        src.inject(Fault::read_at(2 << 20).times(3));
        let failed = copy(&src, &dst, &fast.clone().retries(2), &mut |_| {}).unwrap_err();
        assert!(matches!(failed.error, Error::Injected { .. }), "{failed}");
        assert_eq!(failed.report.progress.retried, 2);
        // Errors that cannot heal are not retried.
        src.clear_faults();
        let small = MemoryDisk::new(100);
        let failed = copy(&src, &small, &fast.retries(3), &mut |_| {}).unwrap_err();
        assert_eq!(failed.report.progress.retried, 0);
    }

    #[test]
    fn partly_zero_buffers_keep_the_destination_sparse() {
        let mut data = pattern(8 * CHUNK_SIZE as usize, 3);
        data[CHUNK_SIZE as usize..3 * CHUNK_SIZE as usize].fill(0);
        let src = MemoryDisk::new(data.len() as u64);
        src.write_at(&data, 0).unwrap(); // allocated everywhere: extents cannot help
        let dst = MemoryDisk::new(data.len() as u64);
        let options = CopyOptions::default().request_size(4 * CHUNK_SIZE as usize);
        let report = copy(&src, &dst, &options, &mut |_| {}).unwrap();
        assert_eq!(report.progress.zeroed, 2 * CHUNK_SIZE);
        assert_eq!(report.progress.written, 6 * CHUNK_SIZE);
        assert_eq!(dst.allocated_bytes(), 6 * CHUNK_SIZE);
        assert_eq!(dst.to_vec().unwrap(), data);
    }

    #[test]
    fn normalise_keeps_requests_aligned() {
        let e = [
            Extent {
                offset: 0,
                length: 1000,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: 1000,
                length: 9000,
                kind: ExtentKind::Hole,
            },
            Extent {
                offset: 10000,
                length: 100,
                kind: ExtentKind::Data,
            },
        ];
        let n = normalise(&e, 0, 10100, 4096);
        assert_eq!(
            n,
            vec![
                Extent {
                    offset: 0,
                    length: 4096,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 4096,
                    length: 4096,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: 8192,
                    length: 1908,
                    kind: ExtentKind::Data
                },
            ]
        );
    }

    #[cfg(feature = "mock")]
    #[test]
    fn a_short_mocked_source_cannot_fake_success() {
        use crate::{DiskInfo, MockDisk};
        let mut src = MockDisk::new();
        src.expect_info().returning(|| {
            Ok(DiskInfo {
                can_extents: true,
                ..DiskInfo::new(1 << 20)
            })
        });
        // A broken backend that describes only half the disk: the rest is copied as data.
        src.expect_allocated_extents().returning(|offset, _| {
            Ok(vec![Extent {
                offset,
                length: 1 << 19,
                kind: ExtentKind::Hole,
            }])
        });
        src.expect_max_in_flight().returning(|| 1);
        src.expect_submit_read()
            .returning(|_, buf, done| done(Ok(buf)));
        let dst = MemoryDisk::new(1 << 20);
        let report = copy(
            &src,
            &dst,
            &CopyOptions::default().detect_zeroes(false),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.progress.done, 1 << 20);
        assert_eq!(report.progress.read, 1 << 19);
    }

    proptest! {
        /// An incremental copy that hashes only the changed blocks gives the hash of the whole
        /// source read again, for hash blocks smaller than, equal to and larger than the
        /// bitmap's granularity, and copies the source exactly.
        #[test]
        fn incremental_hashes_equal_whole_disk_hashes(
            writes in proptest::collection::vec((0u64..(1 << 20), 1usize..20_000, any::<u8>()), 0..10),
            shift in prop_oneof![Just(12u32), Just(16), Just(18)],
            threads in 1usize..3,
        ) {
            let size = 1u64 << 20;
            let spec = BlkhashSpec::new(crate::blkhash::BlkhashAlgorithm::Sha256, 1 << shift).unwrap();
            let vm = MemoryDisk::with_data(&pattern(size as usize, 9));
            vm.write_zeroes(300_000, 200_000).unwrap();
            vm.add_dirty_bitmap("b").unwrap();
            let backup = MemoryDisk::new(size);
            let options = CopyOptions::default().threads(threads).request_size(64 << 10);
            let full = BlkHasher::recording(spec, size).unwrap();
            copy_hashing(&vm, &backup, &options, &full, &mut |_| {}).unwrap();
            let (first, digests) = full.finish_with_digests().unwrap();
            prop_assert_eq!(first, crate::blkhash::checksum(&vm, spec, &options, &mut |_| {}).unwrap());
            for (at, len, value) in writes {
                let len = (len as u64).min(size - at);
                if value % 4 == 0 {
                    vm.write_zeroes(at, len).unwrap();
                } else {
                    vm.write_at(&vec![value; len as usize], at).unwrap();
                }
            }
            let changes = vm.dirty_bitmap_handle("b").unwrap();
            let next = BlkHasher::resume(digests);
            copy_changed_hashing(&changes, &backup, &options, &next, &mut |_| {}).unwrap();
            let (hash, _) = next.finish_with_digests().unwrap();
            prop_assert_eq!(hash, crate::blkhash::checksum(&vm, spec, &options, &mut |_| {}).unwrap());
            prop_assert_eq!(backup.to_vec().unwrap(), vm.to_vec().unwrap());
        }
    }

    #[test]
    fn a_given_hasher_must_fit_the_copy() {
        let src = MemoryDisk::new(1 << 16);
        let dst = MemoryDisk::new(1 << 16);
        let spec = BlkhashSpec::default();
        let wrong = BlkHasher::new(spec, 1 << 15);
        let e = copy_hashing(&src, &dst, &CopyOptions::default(), &wrong, &mut |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("block hasher is for 32768 bytes"),
            "{e}"
        );
        let right = BlkHasher::new(spec, 1 << 16);
        let twice = CopyOptions::default().blkhash(Some(spec));
        assert!(copy_hashing(&src, &dst, &twice, &right, &mut |_| {}).is_err());
    }

    proptest! {
        #[test]
        fn zero_runs_partition_the_buffer(zeros in proptest::collection::vec(any::<bool>(), 0..20), tail in 0usize..100) {
            let mut buf = Vec::new();
            for z in &zeros {
                buf.extend(std::iter::repeat_n(u8::from(!z), 64));
            }
            buf.extend(std::iter::repeat_n(1u8, tail));
            let runs = zero_runs(&buf, 64);
            let mut pos = 0;
            for (s, e, zero) in runs {
                prop_assert_eq!(s, pos);
                prop_assert!(e > s);
                prop_assert_eq!(is_zero(&buf[s..e]), zero);
                pos = e;
            }
            prop_assert_eq!(pos, buf.len());
        }

        #[test]
        fn any_sparse_layout_copies_exactly(
            size in 1u64..(8 * CHUNK_SIZE),
            writes in proptest::collection::vec((0u64..(8 * CHUNK_SIZE), 1usize..20000, any::<u8>()), 0..6),
            request in 1usize..100_000,
            in_flight in 1usize..8,
            dest_zero in any::<bool>(),
        ) {
            let src = MemoryDisk::new(size);
            for (off, len, seed) in writes {
                let off = off % size;
                let len = len.min((size - off) as usize);
                src.write_at(&pattern(len, seed), off).unwrap();
            }
            let dst = MemoryDisk::new(size);
            let options = CopyOptions::default().request_size(request).requests_in_flight(in_flight).destination_is_zero(dest_zero);
            let report = copy(&src, &dst, &options, &mut |_| {}).unwrap();
            prop_assert_eq!(report.progress.done, size);
            prop_assert_eq!(dst.to_vec().unwrap(), src.to_vec().unwrap());
        }
    }
}
