//! Copying any [`Disk`] to any other, fast.
//!
//! A few worker threads ([`CopyOptions::threads`], one per CPU by default) pull request-sized
//! pieces from a shared plan and keep [`CopyOptions::requests_in_flight`] reads and writes going
//! through [`Disk::submit_read`]/[`Disk::submit_write`]: a completed read is handed straight to
//! the destination, a completed write frees its buffer for the next read. The calling thread
//! only sums progress and calls the callback; workers report to it every 50 ms rather than per
//! request, so it does not wake for every completion. Ranges the source reports as zero or holes ([`Disk::allocated_extents`]) are never read; they are zeroed on the
//! destination (`write_zeroes`, cheap on NBD and files), or skipped entirely when the caller
//! knows the destination is already zero. Read buffers that turn out all-zero are zeroed the
//! same way, keeping the destination sparse.
//!
//! Failures stop the copy with the first error, which names the offset; the copy never reports
//! success for fewer bytes than the source has.
//!
//! ```
//! use disk_transport::copy::{copy, CopyOptions};
//! use disk_transport::memory::MemoryDisk;
//! use disk_transport::Disk;
//!
//! # fn main() -> disk_transport::Result<()> {
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::types::{push_range, Extent, ExtentKind};
use crate::{Disk, Error, Result};

/// How to copy; chain the setters on [`CopyOptions::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    request_size: usize,
    requests_in_flight: usize,
    extents: bool,
    detect_zeroes: bool,
    destination_is_zero: bool,
    flush: bool,
    stall_timeout: Duration,
    threads: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            request_size: 256 * 1024,
            requests_in_flight: 64,
            extents: true,
            detect_zeroes: true,
            destination_is_zero: false,
            flush: true,
            stall_timeout: Duration::from_secs(120),
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
        }
    }
}

impl CopyOptions {
    /// Bytes per read/write request (default 256 KiB; rounded to the disks' block sizes and
    /// capped by their maximum request sizes).
    pub fn request_size(mut self, bytes: usize) -> Self {
        self.request_size = bytes.max(1);
        self
    }
    /// Requests kept in flight (default 64).
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
    /// zero ranges instead of zeroing them (default off).
    pub fn destination_is_zero(mut self, yes: bool) -> Self {
        self.destination_is_zero = yes;
        self
    }
    /// Flush the destination at the end (default on).
    pub fn flush(mut self, on: bool) -> Self {
        self.flush = on;
        self
    }
    /// Copying threads (default: the number of CPUs, at most 4). Each drives its share of the
    /// requests in flight; more than one lets reading, writing and zero-detection of different
    /// requests run on different cores.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }
    /// Give up if no request completes for this long (default 120 s; backends have their own,
    /// shorter timeouts).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }
}

/// Progress so far, passed to the callback as requests complete (about every 50 ms per copying
/// thread, and at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CopyProgress {
    /// Source size in bytes.
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
}

impl CopyProgress {
    fn add(&mut self, delta: &CopyProgress) {
        self.done += delta.done;
        self.read += delta.read;
        self.written += delta.written;
        self.zeroed += delta.zeroed;
        self.skipped += delta.skipped;
    }
}

/// What a finished copy did.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CopyReport {
    /// Final counters.
    pub progress: CopyProgress,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl CopyReport {
    /// Throughput over the whole source size, in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.progress.total as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum Event {
    Read(u64, Result<Vec<u8>>),
    Written(Result<Vec<u8>>),
}

/// Extents window queried at a time, so huge disks need no huge extent lists.
const EXTENT_WINDOW: u64 = 1 << 30;
/// Largest single zeroing request issued by the engine.
const MAX_ZERO_REQUEST: u64 = 1 << 30;

struct Planner<'a> {
    src: &'a dyn Disk,
    align: u64,
    request: u64,
    use_extents: bool,
    /// Ranges still to plan, in order.
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
            let Some(range) = self.ranges.front_mut() else {
                return Ok(None);
            };
            let start = range.0;
            let length = range.1.min(EXTENT_WINDOW);
            range.0 += length;
            range.1 -= length;
            if range.1 == 0 {
                self.ranges.pop_front();
            }
            let extents = if self.use_extents {
                self.src.allocated_extents(start, length)?
            } else {
                vec![Extent {
                    offset: start,
                    length,
                    kind: ExtentKind::Data,
                }]
            };
            self.queue = normalise(&extents, start, length, self.align).into();
        }
    }
}

/// Checks, widens to `align`, sorts and merges the ranges to copy.
fn plan_ranges(
    ranges: Option<&[(u64, u64)]>,
    size: u64,
    align: u64,
) -> Result<VecDeque<(u64, u64)>> {
    let Some(ranges) = ranges else {
        return Ok(if size == 0 {
            VecDeque::new()
        } else {
            VecDeque::from([(0, size)])
        });
    };
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(offset, length) in ranges {
        crate::check_range(offset, length, size)?;
        if length == 0 {
            continue;
        }
        let start = offset / align * align;
        let end = (offset + length).next_multiple_of(align).min(size);
        spans.push((start, end));
    }
    spans.sort_unstable();
    let mut merged: VecDeque<(u64, u64)> = VecDeque::new();
    for (start, end) in spans {
        match merged.back_mut() {
            Some(last) if start <= last.0 + last.1 => {
                last.1 = last.1.max(end - last.0);
            }
            _ => merged.push_back((start, end - start)),
        }
    }
    Ok(merged)
}

/// Makes extents cover `[start, start + length)` exactly, and shrinks zero extents to
/// `align` boundaries (the partial blocks become data), so every request is aligned.
fn normalise(extents: &[Extent], start: u64, length: u64, align: u64) -> Vec<Extent> {
    let end = start + length;
    let mut out = Vec::new();
    let mut pos = start;
    for e in extents {
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

/// Copies all of `src` onto the start of `dst`; see the [module docs](self).
pub fn copy(
    src: &dyn Disk,
    dst: &dyn Disk,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> Result<CopyReport> {
    copy_ranges(src, dst, None, options, progress)
}

/// Copies only the given `(offset, length)` ranges of `src` to the same offsets of `dst` —
/// an incremental backup from the dirty ranges of a changed-block bitmap
/// ([`NbdDisk::dirty_extents`](crate::nbd::NbdDisk::dirty_extents) or VDDK's changed areas).
/// `None` copies everything. Ranges are widened to the disks' block size, sorted and merged;
/// [`CopyProgress::total`] is the sum of their lengths.
///
/// ```
/// use disk_transport::copy::{copy_ranges, CopyOptions};
/// use disk_transport::memory::MemoryDisk;
/// use disk_transport::Disk;
///
/// # fn main() -> disk_transport::Result<()> {
/// let vm = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// let backup = MemoryDisk::with_data(&[1u8; 1 << 20]);
/// vm.write_at(&[2u8; 4096], 65536)?; // changed since the last backup
/// let changed = [(65536, 4096)];
/// let report = copy_ranges(&vm, &backup, Some(&changed), &CopyOptions::default(), &mut |_| {})?;
/// assert_eq!(report.progress.total, 4096);
/// assert_eq!(backup.to_vec()?, vm.to_vec()?);
/// # Ok(())
/// # }
/// ```
pub fn copy_ranges(
    src: &dyn Disk,
    dst: &dyn Disk,
    ranges: Option<&[(u64, u64)]>,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> Result<CopyReport> {
    let started = Instant::now();
    let sinfo = src.info()?;
    let dinfo = dst.info()?;
    if dinfo.read_only {
        return Err(Error::ReadOnly("the copy destination".into()));
    }
    if dinfo.capacity < sinfo.capacity {
        return Err(Error::InvalidParams(format!(
            "the destination ({} bytes) is smaller than the source ({} bytes)",
            dinfo.capacity, sinfo.capacity
        )));
    }
    let align = u64::from(sinfo.min_block_size.max(dinfo.min_block_size).max(1));
    let max_request = u64::from(sinfo.max_request_size.min(dinfo.max_request_size)).max(align);
    let request = (options.request_size as u64)
        .max(u64::from(
            sinfo.preferred_block_size.max(dinfo.preferred_block_size),
        ))
        .min(max_request)
        / align
        * align;
    let threads = options.threads.max(1);
    let per_thread = options.requests_in_flight.max(1).div_ceil(threads);

    let ranges = plan_ranges(ranges, sinfo.capacity, align)?;
    let total = ranges.iter().map(|r| r.1).sum();
    let planner = Mutex::new(Planner {
        src,
        align,
        request: request.max(align),
        use_extents: options.extents && sinfo.can_extents,
        ranges,
        queue: VecDeque::new(),
    });
    let shared = WorkerShared {
        planner,
        sparse_block: align.max(4096) as usize,
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
                if let Err(e) = worker(src, dst, shared, per_thread, options, &delta_tx) {
                    shared.fail(e);
                }
            });
        }
        drop(delta_tx);
        // Every worker ends (its waits have deadlines), and with it the channel.
        for delta in delta_rx {
            p.add(&delta);
            progress(&p);
        }
    });
    if let Some(e) = shared
        .first_error
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        return Err(e);
    }
    if p.done != p.total {
        return Err(Error::Protocol(format!(
            "copy finished {} of {} bytes; refusing to report success",
            p.done, p.total
        )));
    }
    if options.flush {
        dst.flush()?;
    }
    Ok(CopyReport {
        progress: p,
        elapsed: started.elapsed(),
    })
}

struct WorkerShared<'a> {
    planner: Mutex<Planner<'a>>,
    /// Granularity of zero detection in read buffers.
    sparse_block: usize,
    stop: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

impl WorkerShared<'_> {
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(e);
    }

    fn next_piece(&self) -> Result<Option<Extent>> {
        if self.stop.load(Ordering::SeqCst) {
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

/// One copying thread: pulls pieces from the shared planner and keeps up to `in_flight` of
/// them moving, sending progress deltas to the coordinating thread.
fn worker(
    src: &dyn Disk,
    dst: &dyn Disk,
    shared: &WorkerShared<'_>,
    in_flight: usize,
    options: &CopyOptions,
    deltas: &mpsc::Sender<CopyProgress>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Event>();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut outstanding = 0usize;
    let mut first_error: Option<Error> = None;
    let mut source_done = false;
    let mut unreported = Unreported {
        sum: CopyProgress::default(),
        since: Instant::now(),
        to: deltas,
    };
    let zero_range = |offset: u64, length: u64| -> Result<CopyProgress> {
        let mut d = CopyProgress {
            done: length,
            ..CopyProgress::default()
        };
        if options.destination_is_zero {
            d.skipped = length;
        } else {
            dst.write_zeroes(offset, length)?;
            d.zeroed = length;
        }
        Ok(d)
    };
    loop {
        while first_error.is_none() && !source_done && outstanding < in_flight {
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
                match zero_range(piece.offset, piece.length) {
                    Ok(d) => {
                        unreported.add(d);
                    }
                    Err(e) => first_error = Some(e),
                }
                continue;
            }
            let mut buf = pool.pop().unwrap_or_default();
            buf.resize(piece.length as usize, 0);
            let tx = tx.clone();
            let offset = piece.offset;
            src.submit_read(
                offset,
                buf,
                Box::new(move |r| {
                    let _ = tx.send(Event::Read(offset, r));
                }),
            );
            outstanding += 1;
        }
        if first_error.is_some() {
            shared.stop.store(true, Ordering::SeqCst);
        }
        if outstanding == 0 {
            break;
        }
        let event = match rx.recv_timeout(options.stall_timeout) {
            Ok(event) => event,
            Err(_) => {
                return Err(first_error.unwrap_or(Error::Timeout {
                    what: format!("copy ({outstanding} requests outstanding)"),
                    offset: None,
                    after: options.stall_timeout,
                }))
            }
        };
        match event {
            Event::Read(offset, Ok(buf)) => {
                let length = buf.len() as u64;
                if first_error.is_some() || shared.stop.load(Ordering::SeqCst) {
                    outstanding -= 1;
                    pool.push(buf);
                    continue;
                }
                let runs = if options.detect_zeroes {
                    zero_runs(&buf, shared.sparse_block)
                } else {
                    Vec::new()
                };
                if runs.iter().any(|r| r.2) {
                    // All or part of the buffer is zero: zero (or skip) those blocks and write
                    // the rest, keeping the destination as sparse as the data allows. Mixed
                    // buffers are rare (edges of data), so they are written synchronously.
                    outstanding -= 1;
                    let mut d = CopyProgress {
                        read: length,
                        ..CopyProgress::default()
                    };
                    for (start, end, zero) in runs {
                        let at = offset + start as u64;
                        let n = (end - start) as u64;
                        let step = if zero {
                            zero_range(at, n).map(|z| {
                                d.zeroed += z.zeroed;
                                d.skipped += z.skipped;
                            })
                        } else {
                            dst.write_at(&buf[start..end], at).map(|()| d.written += n)
                        };
                        if let Err(e) = step {
                            first_error = Some(e);
                            break;
                        }
                        d.done += n;
                    }
                    pool.push(buf);
                    unreported.add(d);
                    continue;
                }
                unreported.add(CopyProgress {
                    read: length,
                    ..CopyProgress::default()
                });
                let tx = tx.clone();
                dst.submit_write(
                    offset,
                    buf,
                    Box::new(move |r| {
                        let _ = tx.send(Event::Written(r));
                    }),
                );
            }
            Event::Written(Ok(buf)) => {
                outstanding -= 1;
                unreported.add(CopyProgress {
                    written: buf.len() as u64,
                    done: buf.len() as u64,
                    ..CopyProgress::default()
                });
                pool.push(buf);
            }
            Event::Read(_, Err(e)) | Event::Written(Err(e)) => {
                outstanding -= 1;
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Fault, MemoryDisk, CHUNK_SIZE};
    use proptest::prelude::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
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
        let err = copy(&src, &dst, &CopyOptions::default(), &mut |_| {}).unwrap_err();
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
    fn ranges_are_widened_sorted_and_merged() {
        let r = plan_ranges(
            Some(&[(9000, 10), (0, 100), (4000, 200), (10_000, 0)]),
            10_000,
            4096,
        )
        .unwrap();
        assert_eq!(r, VecDeque::from([(0, 10_000)]));
        let r = plan_ranges(Some(&[(20_000, 1), (0, 1)]), 30_000, 4096).unwrap();
        assert_eq!(r, VecDeque::from([(0, 4096), (16384, 4096)]));
        assert!(plan_ranges(Some(&[(9999, 2)]), 10_000, 1).is_err());
        assert_eq!(plan_ranges(None, 0, 1).unwrap(), VecDeque::new());
        let src = MemoryDisk::with_data(&pattern(1 << 20, 1));
        let dst = MemoryDisk::new(1 << 20);
        let report = copy_ranges(
            &src,
            &dst,
            Some(&[(100_000, 10), (5, 5)]),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.progress.total, 15);
        let (s, d) = (src.to_vec().unwrap(), dst.to_vec().unwrap());
        assert_eq!(&d[100_000..100_010], &s[100_000..100_010]);
        assert_eq!(&d[5..10], &s[5..10]);
        assert!(d[..5].iter().all(|&b| b == 0));
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
