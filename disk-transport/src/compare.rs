//! Comparing two disks, extent-aware (what `qemu-img compare` does): verifying a restore, or a
//! backup against its source.
//!
//! Ranges both disks report as zero or holes ([`Disk::allocated_extents`]) are not read at all;
//! a range one disk reports as zero is read on the other side only and checked for zeros; the
//! rest is read from both and compared. When the sizes differ, the larger disk's tail must read
//! as zeros (as `qemu-img compare` without `-s`). Reads are pipelined like the
//! [`copy`](crate::copy) engine's, by the same [`CopyOptions`] (request size, requests in flight,
//! threads, extents, stall timeout, cancel token); the first difference (the lowest offset) is
//! reported exactly, whatever order the reads complete in.
//!
//! ```
//! use disk_transport::compare::compare;
//! use disk_transport::copy::CopyOptions;
//! use disk_transport::memory::MemoryDisk;
//! use disk_transport::Disk;
//!
//! # fn main() -> disk_transport::Result<()> {
//! let a = MemoryDisk::new(1 << 30);
//! a.write_at(b"hello", 4096)?;
//! let b = MemoryDisk::new(1 << 30);
//! b.write_at(b"hello", 4096)?;
//! let same = compare(&a, &b, &CopyOptions::default())?;
//! assert!(same.identical());
//! assert_eq!(same.read, 2 * disk_transport::memory::CHUNK_SIZE); // the holes were not read
//! b.write_at(b"J", 4096)?;
//! assert_eq!(compare(&a, &b, &CopyOptions::default())?.first_difference, Some(4096));
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::copy::{is_zero, CopyOptions};
use crate::types::{Extent, ExtentKind};
use crate::{Disk, Error, Result};

/// Extents window queried at a time.
const WINDOW: u64 = 1 << 30;
/// How often a waiting worker looks at the cancel token.
const POLL: Duration = Duration::from_millis(50);

/// What [`compare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// Size of the first disk in bytes.
    pub size_a: u64,
    /// Size of the second disk in bytes.
    pub size_b: u64,
    /// The offset of the first byte that differs (reading past a disk's end counts as zeros),
    /// or `None` when the contents are equal.
    pub first_difference: Option<u64>,
    /// Bytes read from both disks together; ranges both report as zero are not read.
    pub read: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl Comparison {
    /// Whether the contents are equal (the sizes may differ when the tail of the larger disk
    /// reads as zeros; check [`size_a`](Self::size_a) and [`size_b`](Self::size_b) for a
    /// strict comparison).
    pub fn identical(&self) -> bool {
        self.first_difference.is_none()
    }
}

/// A piece to check: which sides must be read (a side not read reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    offset: u64,
    length: u64,
    read_a: bool,
    read_b: bool,
}

/// Whether `[offset, offset + length)` of a disk of `size` bytes reads as zeros, per extents.
fn zero_map(
    disk: &dyn Disk,
    size: u64,
    use_extents: bool,
    start: u64,
    end: u64,
) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let inside = end.min(size);
    if start < inside {
        if use_extents {
            out = disk.allocated_extents(start, inside - start)?;
        } else {
            out.push(Extent {
                offset: start,
                length: inside - start,
                kind: ExtentKind::Data,
            });
        }
    }
    if end > size.max(start) {
        let from = size.max(start);
        out.push(Extent {
            offset: from,
            length: end - from,
            kind: ExtentKind::Hole,
        });
    }
    Ok(out)
}

/// Whether `offset` lies in a zero extent of `extents` (sorted, covering the window; a gap
/// counts as data), and where that extent ends.
fn kind_at(extents: &[Extent], offset: u64, end: u64) -> (bool, u64) {
    let i = extents.partition_point(|e| e.end() <= offset);
    match extents.get(i) {
        Some(e) if e.offset <= offset => (e.kind.reads_as_zero(), e.end().min(end)),
        Some(e) => (false, e.offset.min(end)),
        None => (false, end),
    }
}

struct Planner<'a> {
    a: &'a dyn Disk,
    b: &'a dyn Disk,
    size_a: u64,
    size_b: u64,
    extents_a: bool,
    extents_b: bool,
    request: u64,
    next_window: u64,
    end: u64,
    queue: VecDeque<Piece>,
}

impl Planner<'_> {
    fn next(&mut self) -> Result<Option<Piece>> {
        loop {
            if let Some(piece) = self.queue.pop_front() {
                return Ok(Some(piece));
            }
            if self.next_window >= self.end {
                return Ok(None);
            }
            let start = self.next_window;
            let stop = (start + WINDOW).min(self.end);
            self.next_window = stop;
            let za = zero_map(self.a, self.size_a, self.extents_a, start, stop)?;
            let zb = zero_map(self.b, self.size_b, self.extents_b, start, stop)?;
            let mut pos = start;
            while pos < stop {
                let (a_zero, a_end) = kind_at(&za, pos, stop);
                let (b_zero, b_end) = kind_at(&zb, pos, stop);
                let seg_end = a_end.min(b_end).max(pos + 1);
                if !(a_zero && b_zero) {
                    let mut at = pos;
                    while at < seg_end {
                        let length = (seg_end - at).min(self.request);
                        self.queue.push_back(Piece {
                            offset: at,
                            length,
                            read_a: !a_zero,
                            read_b: !b_zero,
                        });
                        at += length;
                    }
                }
                pos = seg_end;
            }
        }
    }
}

struct Shared<'a> {
    planner: Mutex<Planner<'a>>,
    /// The lowest differing offset found so far (`u64::MAX`: none).
    mismatch: AtomicU64,
    read: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    fn found(&self, offset: u64) {
        self.mismatch.fetch_min(offset, Ordering::SeqCst);
    }

    /// The next piece worth checking: pieces past a difference found already are not.
    fn next_piece(&self) -> Result<Option<Piece>> {
        if self.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let piece = self
            .planner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next()?;
        Ok(piece.filter(|p| p.offset < self.mismatch.load(Ordering::SeqCst)))
    }
}

/// A piece whose reads are in flight.
struct Pending {
    piece: Piece,
    a: Option<Vec<u8>>,
    b: Option<Vec<u8>>,
    waiting: u8,
}

/// Compares `a` and `b`; see the [module docs](self). Errors (a failed read, a timeout,
/// [`Error::Cancelled`]) end the comparison; a difference does not.
pub fn compare(a: &dyn Disk, b: &dyn Disk, options: &CopyOptions) -> Result<Comparison> {
    let started = Instant::now();
    let (ia, ib) = (a.info()?, b.info()?);
    let align = u64::from(ia.min_block_size.max(ib.min_block_size).max(1));
    let max_request = u64::from(ia.max_request_size.min(ib.max_request_size)).max(align);
    let request = (options.request_size_bytes() as u64)
        .min(max_request)
        .max(align)
        / align
        * align;
    let shared = Shared {
        planner: Mutex::new(Planner {
            a,
            b,
            size_a: ia.capacity,
            size_b: ib.capacity,
            extents_a: options.uses_extents() && ia.can_extents,
            extents_b: options.uses_extents() && ib.can_extents,
            request,
            next_window: 0,
            end: ia.capacity.max(ib.capacity),
            queue: VecDeque::new(),
        }),
        mismatch: AtomicU64::new(u64::MAX),
        read: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    };
    let threads = options.thread_count();
    let per_thread = options.in_flight().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let shared = &shared;
            scope.spawn(move || {
                if let Err(e) = worker(a, b, shared, per_thread, options) {
                    shared.fail(e);
                }
            });
        }
    });
    if let Some(e) = shared
        .first_error
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        return Err(e);
    }
    let mismatch = shared.mismatch.load(Ordering::SeqCst);
    Ok(Comparison {
        size_a: ia.capacity,
        size_b: ib.capacity,
        first_difference: (mismatch != u64::MAX).then_some(mismatch),
        read: shared.read.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
    })
}

/// The first offset within the piece where the two sides differ.
fn first_difference(piece: &Piece, a: Option<&[u8]>, b: Option<&[u8]>) -> Option<u64> {
    let at = match (a, b) {
        (Some(a), Some(b)) => {
            if a == b {
                return None;
            }
            // Find the block first (fast slice equality), then the byte.
            let block = a
                .chunks(4096)
                .zip(b.chunks(4096))
                .position(|(x, y)| x != y)?;
            let (x, y) = (&a[block * 4096..], &b[block * 4096..]);
            block * 4096 + x.iter().zip(y).position(|(p, q)| p != q)?
        }
        (Some(data), None) | (None, Some(data)) => {
            if is_zero(data) {
                return None;
            }
            data.iter().position(|&v| v != 0)?
        }
        (None, None) => return None,
    };
    Some(piece.offset + at as u64)
}

fn worker(
    a: &dyn Disk,
    b: &dyn Disk,
    shared: &Shared<'_>,
    in_flight: usize,
    options: &CopyOptions,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<(usize, bool, Result<Vec<u8>>)>();
    let mut slots: Vec<Option<Pending>> = Vec::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut outstanding = 0usize;
    let mut source_done = false;
    let mut last_event = Instant::now();
    loop {
        if options.is_cancelled() {
            return Err(Error::Cancelled);
        }
        while !source_done && outstanding < in_flight {
            let Some(piece) = shared.next_piece()? else {
                source_done = true;
                break;
            };
            let slot = match slots.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            };
            let mut pending = Pending {
                piece,
                a: None,
                b: None,
                waiting: 0,
            };
            for (side_a, wanted, disk) in [(true, piece.read_a, a), (false, piece.read_b, b)] {
                if !wanted {
                    continue;
                }
                pending.waiting += 1;
                let mut buf = pool.pop().unwrap_or_default();
                buf.resize(piece.length as usize, 0);
                let tx = tx.clone();
                // The completion may run right here (synchronous backends): the slot must
                // exist first, so it is filled below from the channel like any other.
                disk.submit_read(
                    piece.offset,
                    buf,
                    Box::new(move |r| {
                        let _ = tx.send((slot, side_a, r));
                    }),
                );
                outstanding += 1;
            }
            slots[slot] = Some(pending);
        }
        if outstanding == 0 {
            return Ok(());
        }
        let waited = last_event.elapsed();
        if waited >= options.stall() {
            return Err(Error::Timeout {
                what: format!("compare ({outstanding} reads outstanding)"),
                offset: None,
                after: options.stall(),
            });
        }
        let Ok((slot, side_a, result)) = rx.recv_timeout((options.stall() - waited).min(POLL))
        else {
            continue;
        };
        last_event = Instant::now();
        outstanding -= 1;
        let buf = result?;
        shared.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let Some(pending) = slots[slot].as_mut() else {
            continue;
        };
        if side_a {
            pending.a = Some(buf);
        } else {
            pending.b = Some(buf);
        }
        pending.waiting -= 1;
        if pending.waiting > 0 {
            continue;
        }
        let done = slots[slot].take().expect("the slot was just filled");
        if let Some(at) = first_difference(&done.piece, done.a.as_deref(), done.b.as_deref()) {
            shared.found(at);
        }
        pool.extend(done.a);
        pool.extend(done.b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Fault, MemoryDisk, CHUNK_SIZE};
    use proptest::prelude::*;

    fn options() -> CopyOptions {
        CopyOptions::default().request_size(65536)
    }

    #[test]
    fn holes_are_not_read_and_differences_are_exact() {
        let a = MemoryDisk::new(1 << 40);
        let b = MemoryDisk::new(1 << 40);
        for disk in [&a, &b] {
            disk.write_at(&[7; 100_000], 5 << 30).unwrap();
        }
        let same = compare(&a, &b, &options()).unwrap();
        assert!(same.identical());
        assert_eq!(same.read, 2 * 2 * CHUNK_SIZE);
        // A zero written as data on one side only is no difference.
        b.write_at(&[0; 10], 100 << 30).unwrap();
        assert!(compare(&a, &b, &options()).unwrap().identical());
        // Two differences: the lower one is reported, to the byte.
        b.write_at(&[1], (700 << 30) + 3).unwrap();
        b.write_at(&[8], (5 << 30) + 77_777).unwrap();
        let diff = compare(&a, &b, &options()).unwrap();
        assert_eq!(diff.first_difference, Some((5 << 30) + 77_777));
        assert_eq!(
            compare(&b, &a, &options()).unwrap().first_difference,
            Some((5 << 30) + 77_777)
        );
    }

    #[test]
    fn a_longer_disk_must_end_in_zeros() {
        let a = MemoryDisk::with_data(&[3; 10_000]);
        let b = MemoryDisk::new(50_000);
        b.write_at(&[3; 10_000], 0).unwrap();
        let c = compare(&a, &b, &options()).unwrap();
        assert!(c.identical());
        assert_eq!((c.size_a, c.size_b), (10_000, 50_000));
        b.write_at(&[9], 40_000).unwrap();
        assert_eq!(
            compare(&a, &b, &options()).unwrap().first_difference,
            Some(40_000)
        );
        assert_eq!(
            compare(&b, &a, &options()).unwrap().first_difference,
            Some(40_000)
        );
    }

    #[test]
    fn read_errors_and_cancels_end_the_comparison() {
        let a = MemoryDisk::with_data(&[3; 1 << 20]);
        let b = MemoryDisk::with_data(&[3; 1 << 20]);
        b.inject(Fault::read_at(500_000));
        assert!(matches!(
            compare(&a, &b, &options()),
            Err(Error::Injected { .. })
        ));
        b.clear_faults();
        let token = crate::copy::CancelToken::new();
        token.cancel();
        assert!(matches!(
            compare(&a, &b, &options().cancel(token)),
            Err(Error::Cancelled)
        ));
        // Without extents everything is read, with the same answer.
        b.write_at(&[4], 1000).unwrap();
        let c = compare(&a, &b, &options().extents(false)).unwrap();
        assert_eq!(c.first_difference, Some(1000));
    }

    proptest! {
        #[test]
        fn agrees_with_a_byte_by_byte_comparison(
            size_a in 1u64..300_000,
            size_b in 1u64..300_000,
            writes in proptest::collection::vec((any::<bool>(), 0u64..300_000, 1usize..5000, any::<u8>()), 0..8),
            request in 512usize..70_000,
            threads in 1usize..4,
        ) {
            let (a, b) = (MemoryDisk::new(size_a), MemoryDisk::new(size_b));
            for (on_a, off, len, byte) in writes {
                let disk = if on_a { &a } else { &b };
                let off = off % disk.capacity();
                let len = len.min((disk.capacity() - off) as usize);
                disk.write_at(&vec![byte; len], off).unwrap();
            }
            let (va, vb) = (a.to_vec().unwrap(), b.to_vec().unwrap());
            let n = va.len().max(vb.len());
            let expected = (0..n).position(|i| va.get(i).copied().unwrap_or(0) != vb.get(i).copied().unwrap_or(0));
            let options = CopyOptions::default().request_size(request).threads(threads);
            let c = compare(&a, &b, &options).unwrap();
            prop_assert_eq!(c.first_difference, expected.map(|i| i as u64));
        }
    }
}
