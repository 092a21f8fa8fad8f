//! Streams as copy endpoints: standard input as a source, standard output as a destination,
//! named `-` as nbdcopy names them, so a backup can go into a compressor or over ssh
//! (`vmsdk disk copy nbd://host/disk - | zstd > disk.zst`) and come back
//! (`zstdcat disk.zst | vmsdk disk copy - nbd://host/disk`).
//!
//! A stream is not a [`Disk`]: it cannot seek and its length is known only when it ends. The
//! copies here take the sequential path a stream needs, apart from the parallel engine of
//! [`copy`](crate::copy):
//!
//! - [`copy_to_stream`] reads the source in order (several reads in flight, put back in order)
//!   and writes every byte: holes and zero extents are not read but written as zeros, since a
//!   pipe cannot skip them.
//! - [`copy_from_stream`] reads the stream until it ends and writes it from offset 0 of a
//!   destination whose size is already known (an NBD export, an existing file or device).
//!   A stream that ends early is fine, as with nbdcopy: the rest of the destination is left
//!   as it was and [`CopyProgress::total`] becomes the stream's length. A stream longer than the
//!   destination fails with [`Error::StreamTooLong`] once the destination is full; nothing is
//!   dropped silently.
//!
//! Standard output redirected into a file or onto a device can seek after all:
//! `stdout_as_disk` (feature `file`) opens it as a disk for the parallel engine, so holes stay holes there
//! (as nbdcopy does).
//!
//! The stream is read or written on a thread of its own, so the copy can give up on a stalled
//! pipe: when no data moves for [`CopyOptions::stall_timeout`] the copy fails with
//! [`Error::StreamStalled`]. (The stream's thread may stay blocked in its `read`/`write` until the
//! other end moves or the process exits; it does nothing after that.) A reader that closed
//! the pipe early fails the copy with an [`Error::Io`] of kind
//! [`BrokenPipe`](std::io::ErrorKind::BrokenPipe) that says so.
//!
//! ```
//! use disk_transport::copy::CopyOptions;
//! use disk_transport::memory::MemoryDisk;
//! use disk_transport::stream::{copy_from_stream, copy_to_stream, StreamSink, StreamSource};
//! use disk_transport::Disk;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let disk = MemoryDisk::new(4 << 20); // sparse: one data chunk, holes around it
//! disk.write_at(b"some data", 1 << 20)?;
//! let (sink, bytes) = StreamSink::to_vec();
//! copy_to_stream(&disk, sink, &CopyOptions::default(), &mut |_| {})?;
//! assert_eq!(*bytes.lock().unwrap(), disk.to_vec()?); // every byte, holes as zeros
//!
//! let restored = MemoryDisk::new(4 << 20);
//! let stream = StreamSource::new("a backup", std::io::Cursor::new(disk.to_vec()?));
//! copy_from_stream(stream, &restored, &CopyOptions::default(), &mut |_| {})?;
//! assert_eq!(restored.to_vec()?, disk.to_vec()?);
//! # Ok(())
//! # }
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::blkhash::BlkHasher;
use crate::copy::{is_zero, CopyError, CopyOptions, CopyProgress, CopyReport, CopyResult};
use crate::{Disk, Error, Result};

/// The name that stands for standard input as a copy source and standard output as a copy
/// destination, as nbdcopy takes it.
pub const STDIO: &str = "-";

/// Whether `uri` names a standard stream ([`STDIO`]) rather than a disk.
pub fn is_stdio(uri: &str) -> bool {
    uri == STDIO
}

/// How often waits look at the cancel token and at the other thread.
const POLL: Duration = Duration::from_millis(50);
/// Chunks queued between the stream's thread and the copy.
const QUEUE_CHUNKS: usize = 16;
/// The zeros written for a hole, a piece at a time.
const ZERO_PIECE: usize = 1 << 20;
/// Extents asked of the source at a time.
const EXTENT_WINDOW: u64 = 1 << 30;

/// A byte stream to copy a disk image from: standard input ([`StreamSource::stdin`]), or any
/// reader ([`StreamSource::new`]: a decompressor, a socket, a child's output).
pub struct StreamSource {
    name: String,
    reader: Box<dyn Read + Send>,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl StreamSource {
    /// Reads `reader`; `name` says what it is in messages ("standard input").
    pub fn new(name: impl Into<String>, reader: impl Read + Send + 'static) -> Self {
        StreamSource {
            name: name.into(),
            reader: Box::new(reader),
        }
    }

    /// Standard input, read without Rust's buffering (through a duplicate of descriptor 0).
    pub fn stdin() -> Result<Self> {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate standard input", None, e))?;
        Ok(StreamSource::new("standard input", std::fs::File::from(fd)))
    }

    /// What the stream is, as messages name it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A byte stream to copy a disk image to: standard output ([`StreamSink::stdout`]), or any
/// writer ([`StreamSink::new`]: a compressor's input, a socket).
pub struct StreamSink {
    name: String,
    writer: Box<dyn Write + Send>,
}

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl StreamSink {
    /// Writes to `writer`; `name` says what it is in messages ("standard output").
    pub fn new(name: impl Into<String>, writer: impl Write + Send + 'static) -> Self {
        StreamSink {
            name: name.into(),
            writer: Box::new(writer),
        }
    }

    /// Standard output, written without Rust's line buffering (through a duplicate of
    /// descriptor 1). Refuses a terminal, as nbdcopy does: a disk image is not for a screen.
    pub fn stdout() -> Result<Self> {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            return Err(Error::StreamIsTerminal {
                stream: "standard output".into(),
            });
        }
        let fd = stdout
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate standard output", None, e))?;
        Ok(StreamSink::new("standard output", std::fs::File::from(fd)))
    }

    /// A sink that collects the bytes in memory, for tests: the sink and the shared buffer.
    pub fn to_vec() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = StreamSink::new("a buffer", SharedVec(Arc::clone(&bytes)));
        (sink, bytes)
    }

    /// What the stream is, as messages name it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Standard output as a disk, when it is a regular file or a block device
/// (`vmsdk disk copy SRC - > backup.img`), as nbdcopy treats it: the copy can then seek and
/// keep holes as holes. An empty file is given `size` bytes and reads as zeros (the
/// `bool`); a non-empty one keeps its size. `None` when standard output is a pipe, a
/// socket or a terminal: copy to [`StreamSink::stdout`] then. The file is reopened through
/// `/proc/self/fd/1` (without the `O_APPEND` a `>>` gives it, which would make every
/// write an append).
#[cfg(feature = "file")]
#[cfg_attr(docsrs, doc(cfg(feature = "file")))]
pub fn stdout_as_disk(size: u64) -> Result<Option<(Box<dyn Disk>, bool)>> {
    use std::os::unix::fs::FileTypeExt;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicate standard output", None, e))?;
    let metadata = std::fs::File::from(fd)
        .metadata()
        .map_err(|e| Error::io("look at standard output", None, e))?;
    let kind = metadata.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Ok(None);
    }
    let empty = kind.is_file() && metadata.len() == 0;
    let options = crate::file::FileOptions {
        create_size: Some(size),
        ..crate::file::FileOptions::default()
    };
    let disk = crate::file::FileDisk::open("/proc/self/fd/1", &options)?;
    Ok(Some((Box::new(disk), empty)))
}

struct SharedVec(Arc<Mutex<Vec<u8>>>);

impl Write for SharedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bounded queue between the copy and the stream's thread. Either side can end it: the
/// consumer or producer closes it, or the stream's thread leaves an error in it.
struct Queue<T> {
    state: Mutex<QueueState<T>>,
    changed: Condvar,
}

struct QueueState<T> {
    items: VecDeque<T>,
    /// No more items will be pushed (the producer finished) or taken (the consumer left).
    closed: bool,
    /// The stream's thread failed.
    error: Option<Error>,
    /// The stream's thread has finished everything it was given.
    drained: bool,
    /// Bytes the stream's thread has written (a writing copy's progress).
    written: u64,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
                error: None,
                drained: false,
                written: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn fail(&self, error: Error) {
        let mut state = self.lock();
        state.error.get_or_insert(error);
        state.closed = true;
        drop(state);
        self.changed.notify_all();
    }

    fn set_drained(&self) {
        self.lock().drained = true;
        self.changed.notify_all();
    }

    /// Waits (without a deadline: the stream's side) for room, then queues `item`. False when
    /// the other side left.
    fn push_unbounded(&self, item: T) -> bool {
        let mut state = self.lock();
        while state.items.len() >= QUEUE_CHUNKS && !state.closed {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            return false;
        }
        state.items.push_back(item);
        drop(state);
        self.changed.notify_all();
        true
    }

    /// Waits (without a deadline: the stream's side) for an item; `None` once closed and empty.
    fn pop_unbounded(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                drop(state);
                self.changed.notify_all();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The copy's side: waits until `ready` holds, the stream's thread failed, the copy was
    /// cancelled, or `stall` passed without it holding. A reading copy takes what the stream
    /// delivered before it failed (`items_first`); a writing one stops at once.
    fn wait_until(
        &self,
        options: &CopyOptions,
        stream: &str,
        items_first: bool,
        mut ready: impl FnMut(&mut QueueState<T>) -> bool,
    ) -> Result<std::sync::MutexGuard<'_, QueueState<T>>> {
        let deadline = Instant::now() + options.stall();
        let mut state = self.lock();
        loop {
            if items_first && !state.items.is_empty() && ready(&mut state) {
                return Ok(state);
            }
            if let Some(error) = state.error.take() {
                return Err(error);
            }
            if ready(&mut state) {
                return Ok(state);
            }
            if options.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::StreamStalled {
                    stream: stream.to_owned(),
                    after: options.stall(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, POLL.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What goes to a stream, in order.
enum Chunk {
    Data(Vec<u8>),
    Zeros(u64),
}

/// Calls the progress callback at most every [`POLL`], and at the end.
struct Reporter<'a> {
    callback: &'a mut dyn FnMut(&CopyProgress),
    last: Instant,
}

impl Reporter<'_> {
    fn maybe(&mut self, p: &CopyProgress) {
        if self.last.elapsed() >= POLL {
            (self.callback)(p);
            self.last = Instant::now();
        }
    }
}

fn stopped(error: Error, p: CopyProgress, started: Instant) -> CopyError {
    CopyError {
        error,
        report: Box::new(CopyReport {
            progress: p,
            elapsed: started.elapsed(),
            blkhash: None,
        }),
    }
}

fn write_error(name: &str, offset: u64, e: std::io::Error) -> Error {
    let op = if e.kind() == std::io::ErrorKind::BrokenPipe {
        format!("write to {name} (the reading end of the pipe was closed)")
    } else {
        format!("write to {name}")
    };
    Error::io(op, Some(offset), e)
}

/// The stream's thread of [`copy_to_stream`]: writes chunks in order until the queue closes.
fn write_stream(mut sink: StreamSink, queue: &Queue<Chunk>) {
    let zeros = vec![0u8; ZERO_PIECE];
    let mut offset = 0u64;
    while let Some(chunk) = queue.pop_unbounded() {
        let result = match &chunk {
            Chunk::Data(data) => sink.writer.write_all(data).map(|()| data.len() as u64),
            Chunk::Zeros(length) => {
                let mut left = *length;
                let mut result = Ok(*length);
                while left > 0 {
                    let piece = left.min(ZERO_PIECE as u64) as usize;
                    if let Err(e) = sink.writer.write_all(&zeros[..piece]) {
                        result = Err(e);
                        break;
                    }
                    left -= piece as u64;
                }
                result
            }
        };
        match result {
            Ok(n) => {
                offset += n;
                queue.lock().written = offset;
            }
            Err(e) => return queue.fail(write_error(&sink.name, offset, e)),
        }
    }
    if let Err(e) = sink.writer.flush() {
        return queue.fail(write_error(&sink.name, offset, e));
    }
    queue.set_drained();
}

/// The source's ranges in order, data split into request-sized pieces: `(offset, length,
/// reads as zero)`.
struct Pieces<'a> {
    src: &'a dyn Disk,
    size: u64,
    request: u64,
    use_extents: bool,
    /// Where the extents asked so far end.
    asked: u64,
    queue: VecDeque<(u64, u64, bool)>,
}

impl Pieces<'_> {
    fn next(&mut self) -> Result<Option<(u64, u64, bool)>> {
        while self.queue.is_empty() && self.asked < self.size {
            let length = (self.size - self.asked).min(EXTENT_WINDOW);
            let extents = if self.use_extents {
                self.src.allocated_extents(self.asked, length)?
            } else {
                Vec::new()
            };
            // Whatever the extents do not cover (none asked, a short answer) is read.
            let mut at = self.asked;
            let end = self.asked + length;
            for e in extents {
                let start = e.offset.max(at);
                let stop = e.end().min(end);
                if stop <= start {
                    continue;
                }
                self.push(at, start - at, false);
                self.push(start, stop - start, e.kind.reads_as_zero());
                at = stop;
            }
            self.push(at, end - at, false);
            self.asked = end;
        }
        Ok(self.queue.pop_front())
    }

    fn push(&mut self, mut offset: u64, length: u64, zero: bool) {
        let end = offset + length;
        if zero {
            if length > 0 {
                self.queue.push_back((offset, length, true));
            }
            return;
        }
        while offset < end {
            let piece = (end - offset).min(self.request);
            self.queue.push_back((offset, piece, false));
            offset += piece;
        }
    }
}

/// Copies all of `src`, in order, to the stream `sink`: what `nbdcopy SOURCE -` writes to
/// standard output. Holes and zero extents are not read but written as zeros. Several reads
/// are in flight ([`CopyOptions::requests_in_flight`]), put back in order before they are
/// written. [`CopyOptions::blkhash`] hashes the source on the way; [`CopyOptions::retries`]
/// retries failed reads as the engine does; zero detection and flushing do not apply to a
/// stream.
pub fn copy_to_stream(
    src: &dyn Disk,
    sink: StreamSink,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let info = src
        .info()
        .map_err(|e| stopped(e, CopyProgress::default(), started))?;
    let align = u64::from(info.min_block_size.max(1));
    let request = (options.request_size_bytes() as u64)
        .min(u64::from(info.max_request_size).max(align))
        .max(align)
        / align
        * align;
    let mut p = CopyProgress {
        total: info.capacity,
        ..CopyProgress::default()
    };
    let name = sink.name.clone();
    let queue = Arc::new(Queue::<Chunk>::new());
    let writer_queue = Arc::clone(&queue);
    std::thread::Builder::new()
        .name("stream-writer".into())
        .spawn(move || write_stream(sink, &writer_queue))
        .map_err(|e| stopped(Error::io("start the stream writer", None, e), p, started))?;
    let hasher = options
        .blkhash_spec()
        .map(|spec| BlkHasher::new(spec, info.capacity));
    let mut reporter = Reporter {
        callback: progress,
        last: Instant::now(),
    };
    let mut pieces = Pieces {
        src,
        size: info.capacity,
        request,
        use_extents: options.uses_extents() && info.can_extents,
        asked: 0,
        queue: VecDeque::new(),
    };
    let result = (|| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(u64, Result<Vec<u8>>)>();
        // Pieces by sequence number: read or zero, waiting for their turn.
        let mut ready: BTreeMap<u64, (u64, Chunk)> = BTreeMap::new();
        // The reads in flight by sequence number: offset, length, retries so far.
        let mut reading: BTreeMap<u64, (u64, u64, u32)> = BTreeMap::new();
        let submit = |seq: u64, offset: u64, length: u64| {
            let tx = tx.clone();
            src.submit_read(
                offset,
                vec![0u8; length as usize],
                Box::new(move |r| {
                    let _ = tx.send((seq, r));
                }),
            );
        };
        let mut submitted = 0u64;
        let mut emitted = 0u64;
        let mut planned_all = false;
        let limit = options.in_flight() as u64;
        let mut last_completion = Instant::now();
        loop {
            while !planned_all && submitted - emitted < limit {
                match pieces.next()? {
                    None => planned_all = true,
                    Some((offset, length, true)) => {
                        ready.insert(submitted, (offset, Chunk::Zeros(length)));
                        submitted += 1;
                    }
                    Some((offset, length, false)) => {
                        reading.insert(submitted, (offset, length, 0));
                        submit(submitted, offset, length);
                        submitted += 1;
                    }
                }
            }
            while let Some(entry) = ready.first_entry() {
                if *entry.key() != emitted {
                    break;
                }
                let (offset, chunk) = entry.remove();
                match &chunk {
                    Chunk::Data(data) => {
                        if let Some(h) = &hasher {
                            h.update(offset, data);
                        }
                        p.read += data.len() as u64;
                    }
                    Chunk::Zeros(length) => {
                        if let Some(h) = &hasher {
                            h.zeroes(offset, *length);
                        }
                    }
                }
                let mut state = queue.wait_until(options, &name, false, |s| {
                    s.items.len() < QUEUE_CHUNKS || s.closed
                })?;
                state.items.push_back(chunk);
                // Done is what reached the stream.
                (p.written, p.done) = (state.written, state.written);
                drop(state);
                queue.changed.notify_all();
                emitted += 1;
                reporter.maybe(&p);
            }
            if planned_all && emitted == submitted {
                break;
            }
            if options.is_cancelled() {
                return Err(Error::Cancelled);
            }
            match rx.recv_timeout(POLL) {
                Ok((seq, result)) => {
                    last_completion = Instant::now();
                    let (offset, length, attempt) = reading.remove(&seq).unwrap_or_default();
                    match result {
                        Ok(data) => {
                            ready.insert(seq, (offset, Chunk::Data(data)));
                        }
                        Err(e) if retry_after_backoff(options, &e, attempt)? => {
                            p.retried += 1;
                            reading.insert(seq, (offset, length, attempt + 1));
                            submit(seq, offset, length);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if last_completion.elapsed() >= options.stall() {
                        return Err(Error::Timeout {
                            what: "reading the copy source".into(),
                            offset: None,
                            after: options.stall(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Protocol("a read completion was lost".into()));
                }
            }
        }
        queue.close();
        drop(queue.wait_until(options, &name, false, |s| s.drained)?);
        Ok(())
    })();
    queue.close();
    let written = queue.lock().written;
    (p.written, p.done) = (written, written);
    (reporter.callback)(&p);
    if let Err(error) = result {
        return Err(stopped(error, p, started));
    }
    let blkhash = hasher
        .map(BlkHasher::finish)
        .transpose()
        .map_err(|e| stopped(e, p, started))?;
    Ok(CopyReport {
        progress: p,
        elapsed: started.elapsed(),
        blkhash,
    })
}

/// Whether a request that failed with `e` after `attempt` retries may be tried again
/// ([`CopyOptions::retries`], transient errors only), once the engine's backoff has passed.
fn retry_after_backoff(options: &CopyOptions, e: &Error, attempt: u32) -> Result<bool> {
    if attempt >= options.retry_limit() || !e.is_transient() {
        return Ok(false);
    }
    let until = Instant::now() + options.first_retry_delay() * 2u32.pow(attempt.min(4));
    loop {
        if options.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(true);
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// What the stream's thread of [`copy_from_stream`] hands over.
enum Incoming {
    /// The next bytes, in order (a full request unless the stream ended in it).
    Data(Vec<u8>),
    /// The stream ended.
    End,
}

/// `buf` as runs `(start, end, all zero)` of whole `block`s (the last may be shorter), with
/// neighbours of the same kind merged.
fn zero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, piece) in buf.chunks(block).enumerate() {
        let start = i * block;
        let zero = is_zero(piece);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = start + piece.len(),
            _ => runs.push((start, start + piece.len(), zero)),
        }
    }
    runs
}

/// Reads until `buf` is full or the stream ends; the bytes read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The stream's thread of [`copy_from_stream`]: reads request-sized chunks until the stream
/// ends, the destination is full (then one more byte must not come), or the queue closes.
fn read_stream(mut source: StreamSource, capacity: u64, request: u64, queue: &Queue<Incoming>) {
    let mut offset = 0u64;
    loop {
        let want = (capacity - offset).min(request) as usize;
        if want == 0 {
            let mut probe = [0u8; 1];
            match read_full(&mut source.reader, &mut probe) {
                Ok(0) => {
                    queue.push_unbounded(Incoming::End);
                }
                Ok(_) => queue.fail(Error::StreamTooLong {
                    stream: source.name.clone(),
                    capacity,
                }),
                Err(e) => queue.fail(Error::io(format!("read {}", source.name), Some(offset), e)),
            }
            return;
        }
        let mut buf = vec![0u8; want];
        match read_full(&mut source.reader, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                let ended = n < want;
                if n > 0 && !queue.push_unbounded(Incoming::Data(buf)) {
                    return;
                }
                offset += n as u64;
                if ended {
                    queue.push_unbounded(Incoming::End);
                    return;
                }
            }
            Err(e) => {
                return queue.fail(Error::io(format!("read {}", source.name), Some(offset), e))
            }
        }
    }
}

/// Copies the stream `source` onto `dst` from offset 0 until the stream ends: what
/// `nbdcopy - DESTINATION` does with standard input. The destination keeps its size: a shorter
/// stream leaves the rest of it as it was ([`CopyProgress::total`] ends as the stream's
/// length), a longer one fails with [`Error::StreamTooLong`] once the destination is full.
/// Several writes are in flight ([`CopyOptions::requests_in_flight`]); all-zero chunks are
/// zeroed rather than written ([`CopyOptions::detect_zeroes`]) or skipped
/// ([`CopyOptions::destination_is_zero`]); the destination is flushed at the end
/// ([`CopyOptions::flush`]) and on the way ([`CopyOptions::flush_every`]); failed writes
/// are retried as the engine retries them ([`CopyOptions::retries`]). A block hash needs the
/// size in advance, so [`CopyOptions::blkhash`] fails with [`Error::Unsupported`]: hash the
/// destination afterwards.
pub fn copy_from_stream(
    source: StreamSource,
    dst: &dyn Disk,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&CopyProgress),
) -> CopyResult {
    let started = Instant::now();
    let mut p = CopyProgress::default();
    if options.blkhash_spec().is_some() {
        let error = Error::Unsupported(format!(
            "a block hash of {} (its size is known only when it ends: hash the destination \
             afterwards)",
            source.name
        ));
        return Err(stopped(error, p, started));
    }
    let info = dst.info().map_err(|e| stopped(e, p, started))?;
    if info.read_only {
        return Err(stopped(
            Error::ReadOnly("the copy destination".into()),
            p,
            started,
        ));
    }
    let align = u64::from(info.min_block_size.max(1));
    let request = (options.request_size_bytes() as u64)
        .min(u64::from(info.max_request_size).max(align))
        .max(align)
        / align
        * align;
    p.total = info.capacity;
    let sparse_block = align.max(4096) as usize;
    let name = source.name.clone();
    let queue = Arc::new(Queue::<Incoming>::new());
    let reader_queue = Arc::clone(&queue);
    let capacity = info.capacity;
    std::thread::Builder::new()
        .name("stream-reader".into())
        .spawn(move || read_stream(source, capacity, request, &reader_queue))
        .map_err(|e| stopped(Error::io("start the stream reader", None, e), p, started))?;
    let mut reporter = Reporter {
        callback: progress,
        last: Instant::now(),
    };
    let mut flushes = options.flush_schedule(dst.protocol().is_some());
    let (tx, rx) = mpsc::channel::<(u64, u64, Result<Vec<u8>>)>();
    // Writes submitted and not yet taken back (a Cell: the completion closure takes them).
    let in_flight = std::cell::Cell::new(0usize);
    // With retries, a copy of each write in flight and its retry count, by offset: a failed
    // write's buffer does not come back.
    let kept: RefCell<HashMap<u64, (Vec<u8>, u32)>> = RefCell::new(HashMap::new());
    let submit = |at: u64, buf: Vec<u8>| {
        let tx = tx.clone();
        let length = buf.len() as u64;
        in_flight.set(in_flight.get() + 1);
        dst.submit_write(
            at,
            buf,
            Box::new(move |r| {
                let _ = tx.send((at, length, r));
            }),
        );
    };
    let result = (|| -> Result<()> {
        let mut offset = 0u64;
        let mut ended = false;
        // Takes one completed write: counts it, or returns its error.
        let complete = |p: &mut CopyProgress, wait: bool| -> Result<bool> {
            let (at, length, result) = if wait {
                match rx.recv_timeout(options.stall()) {
                    Ok(done) => done,
                    Err(_) => {
                        return Err(Error::Timeout {
                            what: "writing to the copy destination".into(),
                            offset: None,
                            after: options.stall(),
                        })
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(done) => done,
                    Err(_) => return Ok(false),
                }
            };
            in_flight.set(in_flight.get() - 1);
            let kept_copy = kept.borrow_mut().remove(&at);
            if let Err(e) = result {
                let Some((buf, attempt)) = kept_copy else {
                    return Err(e);
                };
                if !retry_after_backoff(options, &e, attempt)? {
                    return Err(e);
                }
                p.retried += 1;
                kept.borrow_mut().insert(at, (buf.clone(), attempt + 1));
                submit(at, buf);
                return Ok(true);
            }
            p.written += length;
            p.done += length;
            Ok(true)
        };
        while !ended {
            while complete(&mut p, false)? {}
            if in_flight.get() >= options.in_flight() {
                complete(&mut p, true)?;
                continue;
            }
            let mut state = queue.wait_until(options, &name, true, |s| !s.items.is_empty())?;
            let item = state.items.pop_front();
            drop(state);
            queue.changed.notify_all();
            let data = match item {
                Some(Incoming::Data(data)) => data,
                Some(Incoming::End) | None => {
                    ended = true;
                    continue;
                }
            };
            let length = data.len() as u64;
            p.read += length;
            // Zero blocks are zeroed (or skipped), the data between them written.
            let runs = if options.detects_zeroes() {
                zero_runs(&data, sparse_block)
            } else {
                vec![(0, data.len(), false)]
            };
            let whole = runs.len() == 1;
            let mut data = Some(data);
            for (start, end, zero) in runs {
                let at = offset + start as u64;
                let run = (end - start) as u64;
                if zero {
                    if options.destination_starts_zero() {
                        p.skipped += run;
                    } else {
                        dst.write_zeroes(at, run)?;
                        p.zeroed += run;
                    }
                    p.done += run;
                    continue;
                }
                let buf = match (whole, data.as_ref()) {
                    (true, _) => data.take().unwrap_or_default(),
                    (false, Some(all)) => all[start..end].to_vec(),
                    (false, None) => Vec::new(),
                };
                if options.retry_limit() > 0 {
                    kept.borrow_mut().insert(at, (buf.clone(), 0));
                }
                submit(at, buf);
            }
            offset += length;
            reporter.maybe(&p);
            if flushes.as_mut().is_some_and(|f| f.due(p.written)) {
                dst.flush()?;
            }
        }
        while in_flight.get() > 0 {
            complete(&mut p, true)?;
        }
        // The stream's length is what there was to copy.
        p.total = offset;
        if options.flushes() {
            dst.flush()?;
        }
        Ok(())
    })();
    queue.close();
    // Writes still in flight after a failure finish first (within the stall timeout), so what
    // the error says was written is written; a failed one is the better error.
    let mut result = result;
    let deadline = Instant::now() + options.stall();
    while in_flight.get() > 0 {
        let Ok((_, length, done)) =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            break;
        };
        in_flight.set(in_flight.get() - 1);
        match done {
            Ok(_) => (p.written, p.done) = (p.written + length, p.done + length),
            Err(e) if matches!(result, Err(Error::StreamTooLong { .. })) => result = Err(e),
            Err(_) => {}
        }
    }
    (reporter.callback)(&p);
    match result {
        Ok(()) => Ok(CopyReport {
            progress: p,
            elapsed: started.elapsed(),
            blkhash: None,
        }),
        Err(error) => Err(stopped(error, p, started)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkhash::{checksum, BlkhashSpec};
    use crate::memory::{Fault, MemoryDisk, CHUNK_SIZE};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// A sparse disk: data, a hole, a little data, a hole to the end.
    fn sparse_disk() -> MemoryDisk {
        let disk = MemoryDisk::new(8 * CHUNK_SIZE + 4096);
        disk.write_at(&pattern(CHUNK_SIZE as usize + 1000, 1), 0)
            .unwrap();
        disk.write_at(&pattern(5000, 2), 5 * CHUNK_SIZE + 300)
            .unwrap();
        disk
    }

    #[test]
    fn a_stream_gets_every_byte_in_order_holes_as_zeros() {
        let disk = sparse_disk();
        for options in [
            CopyOptions::default(),
            CopyOptions::default().extents(false),
            CopyOptions::default()
                .request_size(4096)
                .requests_in_flight(3),
        ] {
            let (sink, bytes) = StreamSink::to_vec();
            let report = copy_to_stream(&disk, sink, &options, &mut |_| {}).unwrap();
            assert!(*bytes.lock().unwrap() == disk.to_vec().unwrap());
            let p = report.progress;
            assert_eq!(
                (p.done, p.total, p.written),
                (disk.capacity(), disk.capacity(), disk.capacity())
            );
        }
        // With extents, holes are not read.
        let (sink, _) = StreamSink::to_vec();
        let report = copy_to_stream(&disk, sink, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert!(report.progress.read < disk.capacity() / 2, "{report:?}");
    }

    #[test]
    fn a_stream_copy_hashes_the_source_as_a_checksum_does() {
        let disk = sparse_disk();
        let spec: BlkhashSpec = "sha256/64k".parse().unwrap();
        let options = CopyOptions::default().blkhash(Some(spec));
        let (sink, _) = StreamSink::to_vec();
        let report = copy_to_stream(&disk, sink, &options, &mut |_| {}).unwrap();
        let expected = checksum(&disk, spec, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.blkhash, Some(expected));
    }

    #[test]
    fn a_source_read_error_stops_the_stream_and_names_the_offset() {
        let disk = sparse_disk();
        disk.inject(Fault::read_at(5 * CHUNK_SIZE + 300));
        let (sink, bytes) = StreamSink::to_vec();
        let failed = copy_to_stream(&disk, sink, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::Injected { .. }),
            "{}",
            failed.error
        );
        // What reached the stream is a prefix of the disk, never past the failure.
        let written = bytes.lock().unwrap().len() as u64;
        assert!(written <= 5 * CHUNK_SIZE + 300, "{written}");
        assert!(failed.report.progress.done <= 5 * CHUNK_SIZE + 300);
    }

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_a_clear_error() {
        let disk = sparse_disk();
        let sink = StreamSink::new("standard output", Closed);
        let failed = copy_to_stream(&disk, sink, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        let Error::Io { op, source, .. } = &failed.error else {
            panic!("{}", failed.error)
        };
        assert_eq!(source.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(op.contains("reading end of the pipe was closed"), "{op}");
        // Nothing reached the stream, and the report says so.
        assert_eq!(failed.report.progress.done, 0);
    }

    /// A writer or reader that blocks until released.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);
    impl Stuck {
        fn wait(&self) {
            let (lock, released) = &*self.0;
            let mut done = lock.lock().unwrap();
            while !*done {
                done = released.wait(done).unwrap();
            }
        }
    }
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            self.wait();
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Read for Stuck {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            self.wait();
            Ok(0)
        }
    }

    #[test]
    fn stalled_streams_time_out() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let options = CopyOptions::default().stall_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let sink = StreamSink::new("standard output", Stuck(Arc::clone(&release)));
        let failed = copy_to_stream(&sparse_disk(), sink, &options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::StreamStalled { ref stream, .. } if stream == "standard output"),
            "{}",
            failed.error
        );
        let source = StreamSource::new("standard input", Stuck(Arc::clone(&release)));
        let failed =
            copy_from_stream(source, &MemoryDisk::new(1 << 20), &options, &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::StreamStalled { ref stream, .. } if stream == "standard input"),
            "{}",
            failed.error
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
    }

    #[test]
    fn a_stream_flushes_its_destination_on_the_way_when_asked() {
        let data = pattern(8 << 20, 5);
        let dst = MemoryDisk::new(data.len() as u64);
        let source = StreamSource::new("standard input", std::io::Cursor::new(data.clone()));
        let options = CopyOptions::default().flush_every(1 << 20);
        copy_from_stream(source, &dst, &options, &mut |_| {}).unwrap();
        assert!(dst.to_vec().unwrap() == data);
        // Writes complete while the stream is read, so at least one flush came on the way
        // (and at most one per MiB), then the final one.
        let flushes = dst.flush_count();
        assert!((2..=9).contains(&flushes), "{flushes} flushes");
    }

    #[test]
    fn a_stream_fills_a_disk_from_the_start() {
        let data = sparse_disk().to_vec().unwrap();
        let dst = MemoryDisk::new(data.len() as u64);
        let source = StreamSource::new("standard input", std::io::Cursor::new(data.clone()));
        let report = copy_from_stream(source, &dst, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert!(dst.to_vec().unwrap() == data);
        let p = report.progress;
        assert_eq!(
            (p.total, p.done, p.read),
            (data.len() as u64, data.len() as u64, data.len() as u64)
        );
        // Zero chunks were zeroed, not written: the copy is as sparse as the source.
        assert!(p.zeroed > 0 && p.written < p.total / 2, "{p:?}");
    }

    #[test]
    fn a_short_stream_leaves_the_rest_and_a_long_one_fails() {
        let dst = MemoryDisk::with_data(&[9u8; 1 << 20]);
        let source = StreamSource::new("standard input", std::io::Cursor::new(pattern(1000, 3)));
        let report = copy_from_stream(source, &dst, &CopyOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(report.progress.total, 1000);
        let after = dst.to_vec().unwrap();
        assert!(after[..1000] == pattern(1000, 3)[..]);
        assert!(after[1000..].iter().all(|&b| b == 9));

        let dst = MemoryDisk::new(1 << 20);
        let long = pattern((1 << 20) + 1, 4);
        let source = StreamSource::new("standard input", std::io::Cursor::new(long.clone()));
        let failed =
            copy_from_stream(source, &dst, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::StreamTooLong { capacity, .. } if capacity == 1 << 20),
            "{}",
            failed.error
        );
        assert!(
            failed
                .error
                .to_string()
                .contains("standard input holds more than"),
            "{}",
            failed.error
        );
        assert!(dst.to_vec().unwrap() == long[..1 << 20]);
    }

    #[test]
    fn what_a_stream_cannot_do_is_refused_before_reading() {
        let spec: BlkhashSpec = "sha256".parse().unwrap();
        let source = StreamSource::new("standard input", std::io::Cursor::new(vec![1u8; 4096]));
        let failed = copy_from_stream(
            source,
            &MemoryDisk::new(4096),
            &CopyOptions::default().blkhash(Some(spec)),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(failed.error, Error::Unsupported(_)),
            "{}",
            failed.error
        );
        let source = StreamSource::new("standard input", std::io::Cursor::new(vec![1u8; 4096]));
        let read_only = MemoryDisk::new(4096).read_only_handle();
        let failed =
            copy_from_stream(source, &read_only, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::ReadOnly(_)),
            "{}",
            failed.error
        );
    }

    #[test]
    fn a_destination_write_error_stops_the_copy() {
        let dst = MemoryDisk::new(4 << 20);
        dst.inject(Fault::write_at(2 << 20));
        let source = StreamSource::new("standard input", std::io::Cursor::new(pattern(4 << 20, 5)));
        let failed =
            copy_from_stream(source, &dst, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::Injected { offset, .. } if offset == 2 << 20),
            "{}",
            failed.error
        );
        assert!(failed.report.progress.done < 4 << 20);
    }

    #[test]
    fn transient_errors_are_retried_when_asked() {
        let options = CopyOptions::default()
            .retries(2)
            .retry_delay(Duration::from_millis(1));
        // Reading for a stream: the failed piece is read again, in its place.
        let disk = sparse_disk();
        disk.inject(Fault::read_at(5 * CHUNK_SIZE + 300).times(2));
        let (sink, bytes) = StreamSink::to_vec();
        let report = copy_to_stream(&disk, sink, &options, &mut |_| {}).unwrap();
        assert_eq!(report.progress.retried, 2);
        assert!(*bytes.lock().unwrap() == disk.to_vec().unwrap());
        // Writing from a stream: the kept copy is written again.
        let data = pattern(4 << 20, 6);
        let dst = MemoryDisk::new(4 << 20);
        dst.inject(Fault::write_at(3 << 20).times(1));
        let source = StreamSource::new("standard input", std::io::Cursor::new(data.clone()));
        let report = copy_from_stream(source, &dst, &options, &mut |_| {}).unwrap();
        assert_eq!(report.progress.retried, 1);
        assert!(dst.to_vec().unwrap() == data);
        // Without retries, the first failure is final.
        dst.inject(Fault::write_at(3 << 20).times(1));
        let source = StreamSource::new("standard input", std::io::Cursor::new(data));
        let failed =
            copy_from_stream(source, &dst, &CopyOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(failed.error, Error::Injected { .. }),
            "{}",
            failed.error
        );
    }

    #[test]
    fn cancelling_stops_a_stream_copy() {
        let token = crate::copy::CancelToken::new();
        token.cancel();
        let options = CopyOptions::default().cancel(token);
        let (sink, _) = StreamSink::to_vec();
        let failed = copy_to_stream(&sparse_disk(), sink, &options, &mut |_| {}).unwrap_err();
        assert!(matches!(failed.error, Error::Cancelled), "{}", failed.error);
    }
}
