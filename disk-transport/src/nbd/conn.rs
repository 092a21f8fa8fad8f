//! One NBD connection in the transmission phase: requests are written by the calling thread,
//! replies are read by one reader thread that matches them to requests by cookie, so any
//! number of requests can be in flight. A *driven* connection ([`Conn::start_driven`]) has no
//! reader thread: the one thread that owns its [`Driver`] reads the replies and runs the
//! completions itself, so a completion costs no hand-over between threads.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, chunk, ReplyHeader};
use crate::{Error, Result};

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Socket::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    /// A second descriptor of the socket, for waiting on it.
    pub fn clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(match self.try_clone()? {
            Socket::Tcp(s) => s.into(),
            Socket::Unix(s) => s.into(),
        })
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection's byte stream: the socket itself, or a TLS session on it.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(Socket),
    #[cfg(feature = "tls")]
    Tls(crate::tls::TlsStream<Socket>),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(s) => Stream::Plain(s.try_clone()?),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Stream::Tls(s.handle()),
        })
    }
    pub fn set_timeouts(
        &mut self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_timeouts(read, write),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.set_timeouts(read, write);
                Ok(())
            }
        }
    }
    pub fn shutdown(&self) {
        match self {
            Stream::Plain(s) => s.shutdown(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.shutdown(),
        }
    }
    /// Sends TLS `close_notify` on an encrypted stream (nothing on a plain one).
    pub fn close_notify(&self) {
        match self {
            Stream::Plain(_) => {}
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.close_notify(),
        }
    }
    /// The TLS protocol and cipher, if the stream is encrypted.
    pub fn tls_description(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Some(s.description().to_owned()),
        }
    }
}

impl super::handshake::Timed for Stream {
    fn set_wait(&mut self, wait: Duration) -> io::Result<()> {
        self.set_timeouts(Some(wait), Some(wait))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How replies are framed on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyStyle {
    /// Simple replies only (no structured replies negotiated).
    Simple,
    /// Structured replies (20-byte chunk headers); simple replies for non-reads.
    Structured,
    /// Extended headers: 32-byte requests and reply chunks, 64-bit lengths.
    Extended,
}

/// The text of a protocol error, without the error's own prefix (which the final error adds).
fn protocol_text(e: Error) -> String {
    match e {
        Error::Protocol(msg) => msg,
        other => other.to_string(),
    }
}

/// An NBD command this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn code(self) -> u16 {
        match self {
            Command::Read => proto::cmd::READ,
            Command::Write => proto::cmd::WRITE,
            Command::Flush => proto::cmd::FLUSH,
            Command::Trim => proto::cmd::TRIM,
            Command::WriteZeroes => proto::cmd::WRITE_ZEROES,
            Command::BlockStatus => proto::cmd::BLOCK_STATUS,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write-zeroes",
            Command::BlockStatus => "block-status",
        }
    }
}

/// What a completed request hands back.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The read data, or the written buffer returned for reuse.
    pub buf: Option<Vec<u8>>,
    /// Block status chunks: context id and (length, status) descriptors.
    pub block_status: Vec<(u32, Vec<(u64, u64)>)>,
}

pub(crate) type Done = Box<dyn FnOnce(Result<Outcome>) + Send>;

struct Pending {
    command: Command,
    offset: u64,
    length: u64,
    buf: Option<Vec<u8>>,
    covered: Vec<(u64, u64)>,
    error: Option<Error>,
    block_status: Vec<(u32, Vec<(u64, u64)>)>,
    issued: Instant,
    done: Done,
}

impl Pending {
    fn complete(mut self, result: Result<()>) {
        let done = self.done;
        let outcome = result.map(|()| Outcome {
            buf: self.buf.take(),
            block_status: std::mem::take(&mut self.block_status),
        });
        done(outcome);
    }
}

/// Requests by cookie. A request with a payload belongs to two parties: the writer (until the
/// payload is sent, because it holds the buffer) and the reader (until the reply arrives);
/// whichever finishes second completes it. `unsent`, `early` and `returned` hand it over; all
/// are changed only under the table lock and never removed temporarily.
#[derive(Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    /// Requests whose payload is still being written.
    unsent: HashSet<u64>,
    /// Replied requests whose payload was still being written, with their result.
    early: HashMap<u64, (Pending, Result<()>)>,
    /// Payload buffers handed back by the writer, for the reader to return on completion.
    returned: HashMap<u64, Vec<u8>>,
    /// Why the connection is gone; set once, then no request is accepted.
    dead: Option<String>,
}

/// State shared by the writers and the reader thread of one connection.
pub(crate) struct Shared {
    table: Mutex<Table>,
    style: ReplyStyle,
    timeout: Duration,
    closing: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection.
pub(crate) struct Conn {
    writer: Mutex<Stream>,
    control: Stream,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("style", &self.shared.style)
            .field("in_flight", &self.shared.lock().pending.len())
            .finish()
    }
}

/// The reading half of a connection's stream: a read waits at most a tick, so the reader checks
/// deadlines every tick; a write (of a TLS record the read caused) waits up to the timeout.
fn reader_half(stream: &Stream, timeout: Duration) -> Result<Stream> {
    let mut reader = stream
        .try_clone()
        .map_err(|e| Error::io("clone NBD socket", None, e))?;
    reader
        .set_timeouts(Some(tick(timeout)), Some(timeout))
        .map_err(|e| Error::io("set NBD socket timeouts", None, e))?;
    Ok(reader)
}

/// How often an idle reader wakes to check deadlines.
fn tick(timeout: Duration) -> Duration {
    timeout.clamp(Duration::from_millis(10), Duration::from_millis(500))
}

impl Conn {
    /// Starts the transmission phase on a negotiated stream.
    pub fn start(stream: Stream, style: ReplyStyle, timeout: Duration) -> Result<Conn> {
        let reader_stream = reader_half(&stream, timeout)?;
        let (conn, shared) = Conn::writer_side(stream, style, timeout)?;
        let handle = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || run_reader(reader_stream, &shared))
            .map_err(|e| Error::io("start NBD reader thread", None, e))?;
        *conn.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(conn)
    }

    /// Starts the transmission phase on a negotiated plaintext stream without a reader thread:
    /// replies are read, and completions run, only inside [`Driver::drive`] on the thread that
    /// owns the driver. A TLS stream is refused: OpenSSL may hold decrypted bytes that waiting on
    /// the socket cannot see.
    pub fn start_driven(
        stream: Stream,
        style: ReplyStyle,
        timeout: Duration,
    ) -> Result<(Conn, Driver)> {
        let poll_fd = match &stream {
            Stream::Plain(socket) => socket
                .clone_fd()
                .map_err(|e| Error::io("clone NBD socket", None, e))?,
            #[cfg(feature = "tls")]
            Stream::Tls(_) => {
                return Err(Error::Unsupported(
                    "a driven NBD connection over TLS".into(),
                ))
            }
        };
        // A reply the socket said had begun is read whole, within the same bounds as on a
        // threaded connection.
        let reader_stream = reader_half(&stream, timeout)?;
        let (conn, shared) = Conn::writer_side(stream, style, timeout)?;
        let driver = Driver {
            inner: Some(BufReader::with_capacity(READ_BUFFER, reader_stream)),
            fd: poll_fd,
            shared,
            last_check: Instant::now(),
        };
        Ok((conn, driver))
    }

    /// The writing half shared by both kinds of connection.
    fn writer_side(
        mut stream: Stream,
        style: ReplyStyle,
        timeout: Duration,
    ) -> Result<(Conn, Arc<Shared>)> {
        let control = stream
            .try_clone()
            .map_err(|e| Error::io("clone NBD socket", None, e))?;
        stream
            .set_timeouts(Some(tick(timeout)), Some(timeout))
            .map_err(|e| Error::io("set NBD socket timeouts", None, e))?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            style,
            timeout,
            closing: AtomicBool::new(false),
        });
        let conn = Conn {
            writer: Mutex::new(stream),
            control,
            shared: shared.clone(),
            next_cookie: AtomicU64::new(1),
            reader: Mutex::new(None),
        };
        Ok((conn, shared))
    }

    /// Sends a request; `done` is called exactly once, from the reader thread or from here.
    /// `length` must fit 32 bits unless extended headers are in use.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Vec<u8>>,
        read_buf: Option<Vec<u8>>,
        done: Done,
    ) {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            command,
            offset,
            length,
            buf: read_buf,
            covered: Vec::new(),
            error: None,
            block_status: Vec::new(),
            issued: Instant::now(),
            done,
        };
        {
            let mut table = self.shared.lock();
            if let Some(reason) = &table.dead {
                let reason = reason.clone();
                drop(table);
                (pending.done)(Err(Error::Disconnected {
                    command: command.name(),
                    offset: Some(offset),
                    reason,
                }));
                return;
            }
            table.pending.insert(cookie, pending);
            if payload.is_some() {
                table.unsent.insert(cookie);
            }
        }
        let mut header = [0u8; 32];
        let header: &[u8] = if self.shared.style == ReplyStyle::Extended {
            // The length of a write is its payload's, and says so.
            let flags = if payload.is_some() {
                flags | proto::cflag::PAYLOAD_LEN
            } else {
                flags
            };
            header = proto::encode_request_ext(flags, command.code(), cookie, offset, length);
            &header
        } else {
            debug_assert!(length <= u64::from(u32::MAX));
            header[..28].copy_from_slice(&proto::encode_request(
                flags,
                command.code(),
                cookie,
                offset,
                length as u32,
            ));
            &header[..28]
        };
        let sent = {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_request(&mut writer, header, payload.as_deref().unwrap_or(&[]))
        };
        match sent {
            Ok(()) => {
                let Some(buf) = payload else { return };
                let mut table = self.shared.lock();
                table.unsent.remove(&cookie);
                if let Some((mut p, result)) = table.early.remove(&cookie) {
                    drop(table);
                    p.buf = Some(buf);
                    p.complete(result);
                } else if table.dead.is_none() {
                    table.returned.insert(cookie, buf);
                }
            }
            Err(e) => {
                // The stream is out of step now: end the connection; the reader fails every
                // request still waiting, this one included.
                let reason = if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    format!(
                        "sending {} at offset {offset} did not finish within {:?}",
                        command.name(),
                        self.shared.timeout
                    )
                } else {
                    format!("sending {} at offset {offset} failed: {e}", command.name())
                };
                self.kill(reason);
            }
        }
    }

    /// Ends the connection: no new requests, every waiting request fails with `reason`.
    pub fn kill(&self, reason: String) {
        {
            let mut table = self.shared.lock();
            if table.dead.is_none() {
                table.dead = Some(reason);
            }
        }
        self.control.shutdown();
    }

    /// Whether the connection has ended, and why.
    pub fn dead_reason(&self) -> Option<String> {
        self.shared.lock().dead.clone()
    }

    /// Sends `NBD_CMD_DISC` and stops the reader.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if self.dead_reason().is_none() {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = if self.shared.style == ReplyStyle::Extended {
                writer.write_all(&proto::encode_request_ext(0, proto::cmd::DISC, 0, 0, 0))
            } else {
                writer.write_all(&proto::encode_request(0, proto::cmd::DISC, 0, 0, 0))
            };
            writer.close_notify();
        }
        self.kill("the connection was closed by the client".into());
        if let Some(handle) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_request(w: &mut Stream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut h = 0;
    let mut p = 0;
    while h < header.len() || p < payload.len() {
        let slices = [IoSlice::new(&header[h..]), IoSlice::new(&payload[p..])];
        let n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_header = n.min(header.len() - h);
        h += from_header;
        p += n - from_header;
    }
    Ok(())
}

/// Why the reader stopped.
enum Stop {
    Eof,
    Closed,
    Timeout { command: &'static str, offset: u64 },
    Io(io::Error),
    Protocol(String),
}

struct ReplyReader<'a, R> {
    inner: BufReader<R>,
    shared: &'a Shared,
    /// Issue time of a request taken out of the table while its data is read.
    in_hand: Option<(Instant, &'static str, u64)>,
}

impl<R: Read> ReplyReader<'_, R> {
    fn fill(&mut self, buf: &mut [u8]) -> std::result::Result<(), Stop> {
        let mut pos = 0;
        while pos < buf.len() {
            match self.inner.read(&mut buf[pos..]) {
                Ok(0) => return Err(Stop::Eof),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.check_deadline()?
                }
                Err(e) => return Err(Stop::Io(e)),
            }
        }
        Ok(())
    }

    fn check_deadline(&self) -> std::result::Result<(), Stop> {
        if self.shared.closing.load(Ordering::SeqCst) {
            return Err(Stop::Closed);
        }
        let table = self.shared.lock();
        if table.dead.is_some() {
            return Err(Stop::Closed);
        }
        let oldest = table
            .pending
            .values()
            .map(|p| (p.issued, p.command.name(), p.offset))
            .chain(self.in_hand)
            .min_by_key(|(issued, _, _)| *issued);
        if let Some((issued, command, offset)) = oldest {
            if issued.elapsed() > self.shared.timeout {
                return Err(Stop::Timeout { command, offset });
            }
        }
        Ok(())
    }

    /// After ESHUTDOWN: requests in flight still get their replies, new ones fail at once.
    fn refuse_new_requests(&self) {
        self.shared
            .lock()
            .dead
            .get_or_insert_with(|| "the server is shutting down (ESHUTDOWN)".to_owned());
    }

    fn take(&mut self, cookie: u64) -> std::result::Result<Pending, Stop> {
        let p = self
            .shared
            .lock()
            .pending
            .remove(&cookie)
            .ok_or_else(|| Stop::Protocol(format!("reply for unknown cookie {cookie}")))?;
        self.in_hand = Some((p.issued, p.command.name(), p.offset));
        Ok(p)
    }

    fn put_back(&mut self, cookie: u64, p: Pending) {
        self.in_hand = None;
        self.shared.lock().pending.insert(cookie, p);
    }

    /// Completes a request whose final reply arrived.
    fn finish(&mut self, cookie: u64, mut p: Pending, result: Result<()>) {
        self.in_hand = None;
        let mut table = self.shared.lock();
        if table.unsent.contains(&cookie) {
            // The writer still owns the payload; it completes the request when done.
            table.early.insert(cookie, (p, result));
            return;
        }
        if let Some(buf) = table.returned.remove(&cookie) {
            p.buf = Some(buf);
        }
        drop(table);
        p.complete(result);
    }

    fn one_reply(&mut self) -> std::result::Result<(), Stop> {
        let mut magic = [0u8; 4];
        self.fill(&mut magic)?;
        let magic = u32::from_be_bytes(magic);
        let extended = self.shared.style == ReplyStyle::Extended;
        let rest_len = proto::reply_header_rest_len(magic, extended)
            .map_err(|e| Stop::Protocol(protocol_text(e)))?;
        let mut rest = [0u8; 28];
        self.fill(&mut rest[..rest_len])?;
        let header = proto::parse_reply_header(magic, &rest[..rest_len], extended)
            .map_err(|e| Stop::Protocol(protocol_text(e)))?;
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = self.take(cookie)?;
                if error == ESHUTDOWN {
                    self.refuse_new_requests();
                }
                if error != 0 {
                    let e = nbd_error(&p, error, String::new());
                    self.finish(cookie, p, Err(e));
                    return Ok(());
                }
                if p.command == Command::Read {
                    if self.shared.style != ReplyStyle::Simple {
                        return Err(Stop::Protocol(
                            "simple reply with data to a read after structured replies were negotiated".into(),
                        ));
                    }
                    let length = p.length as usize;
                    let mut buf = p.buf.take().unwrap_or_default();
                    buf.resize(length, 0);
                    let r = self.fill(&mut buf[..length]);
                    p.buf = Some(buf);
                    if let Err(stop) = r {
                        let e = stop_error(&stop, self.shared.timeout, "read", p.offset);
                        p.complete(Err(e));
                        return Err(stop);
                    }
                }
                self.finish(cookie, p, Ok(()));
                Ok(())
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
                // The request's offset, echoed by extended chunks; the cookie already names the
                // request, and data chunks carry their own offsets.
                offset: _,
            } => {
                let mut p = self.take(cookie)?;
                let r = self.chunk(&mut p, kind, length);
                if let Err(stop) = r {
                    let e = stop_error(&stop, self.shared.timeout, p.command.name(), p.offset);
                    self.in_hand = None;
                    p.complete(Err(e));
                    return Err(stop);
                }
                if flags & chunk::FLAG_DONE == 0 {
                    self.put_back(cookie, p);
                    return Ok(());
                }
                let result = match p.error.take() {
                    Some(e) => Err(e),
                    None if p.command == Command::Read => {
                        match proto::check_coverage(&mut p.covered, p.length) {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                let text = protocol_text(e);
                                p.complete(Err(Error::Protocol(text.clone())));
                                self.in_hand = None;
                                return Err(Stop::Protocol(text));
                            }
                        }
                    }
                    None => Ok(()),
                };
                self.finish(cookie, p, result);
                Ok(())
            }
        }
    }

    fn payload(&mut self, length: u64, max: u32) -> std::result::Result<Vec<u8>, Stop> {
        if length > u64::from(max) {
            return Err(Stop::Protocol(format!(
                "reply chunk of {length} bytes exceeds the limit of {max}"
            )));
        }
        let mut v = vec![0u8; length as usize];
        self.fill(&mut v)?;
        Ok(v)
    }

    fn chunk(&mut self, p: &mut Pending, kind: u16, length: u64) -> std::result::Result<(), Stop> {
        let protocol = |e: Error| Stop::Protocol(protocol_text(e));
        let extended = self.shared.style == ReplyStyle::Extended;
        match kind {
            chunk::NONE => {
                if length != 0 {
                    return Err(Stop::Protocol("NONE chunk with a payload".into()));
                }
            }
            chunk::OFFSET_DATA => {
                if p.command != Command::Read || length < 8 {
                    return Err(Stop::Protocol(format!(
                        "OFFSET_DATA chunk of {length} bytes in reply to {}",
                        p.command.name()
                    )));
                }
                let mut off = [0u8; 8];
                self.fill(&mut off)?;
                let offset = u64::from_be_bytes(off);
                let data_len = length - 8;
                proto::check_chunk_range(p.offset, p.length, offset, data_len).map_err(protocol)?;
                let rel = (offset - p.offset) as usize;
                let mut buf = p.buf.take().unwrap_or_default();
                if buf.len() < p.length as usize {
                    buf.resize(p.length as usize, 0);
                }
                let r = self.fill(&mut buf[rel..rel + data_len as usize]);
                p.buf = Some(buf);
                r?;
                p.covered.push((rel as u64, data_len));
            }
            chunk::OFFSET_HOLE => {
                if p.command != Command::Read {
                    return Err(Stop::Protocol(
                        "OFFSET_HOLE chunk in reply to a non-read".into(),
                    ));
                }
                let payload = self.payload(length, 12)?;
                let (offset, size) = proto::parse_hole(&payload).map_err(protocol)?;
                proto::check_chunk_range(p.offset, p.length, offset, u64::from(size))
                    .map_err(protocol)?;
                let rel = (offset - p.offset) as usize;
                let buf = p.buf.get_or_insert_with(Vec::new);
                if buf.len() < p.length as usize {
                    buf.resize(p.length as usize, 0);
                }
                buf[rel..rel + size as usize].fill(0);
                p.covered.push((rel as u64, u64::from(size)));
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                if p.command != Command::BlockStatus {
                    return Err(Stop::Protocol(
                        "BLOCK_STATUS chunk in reply to another command".into(),
                    ));
                }
                if (kind == chunk::BLOCK_STATUS_EXT) != extended {
                    return Err(Stop::Protocol(if extended {
                        "32-bit BLOCK_STATUS chunk although extended headers were negotiated".into()
                    } else {
                        "BLOCK_STATUS_EXT chunk although extended headers were not negotiated"
                            .into()
                    }));
                }
                let status = if extended {
                    let payload = self.payload(length, proto::MAX_BLOCK_STATUS_EXT_PAYLOAD)?;
                    proto::parse_block_status_ext(&payload).map_err(protocol)?
                } else {
                    let payload = self.payload(length, proto::MAX_BLOCK_STATUS_PAYLOAD)?;
                    let (id, d) = proto::parse_block_status(&payload).map_err(protocol)?;
                    (
                        id,
                        d.into_iter()
                            .map(|(l, f)| (u64::from(l), u64::from(f)))
                            .collect(),
                    )
                };
                if p.block_status.iter().any(|(id, _)| *id == status.0) {
                    return Err(Stop::Protocol(format!(
                        "two BLOCK_STATUS chunks for context {} in one reply",
                        status.0
                    )));
                }
                p.block_status.push(status);
            }
            k if k & chunk::ERROR_BIT != 0 => {
                let payload = self.payload(length, proto::MAX_ERROR_PAYLOAD)?;
                let parsed = proto::parse_error_chunk(k, &payload).map_err(protocol)?;
                if parsed.errno == ESHUTDOWN {
                    self.refuse_new_requests();
                }
                if p.error.is_none() {
                    let mut e = nbd_error(p, parsed.errno, parsed.message);
                    if let (Error::Nbd { offset, .. }, Some(at)) = (&mut e, parsed.offset) {
                        *offset = at;
                    }
                    p.error = Some(e);
                }
            }
            other => {
                return Err(Stop::Protocol(format!("unknown reply chunk type {other}")));
            }
        }
        Ok(())
    }
}

/// NBD's ESHUTDOWN: the server is going away; the client must not send new requests.
const ESHUTDOWN: u32 = 108;

fn nbd_error(p: &Pending, errno: u32, message: String) -> Error {
    Error::Nbd {
        command: p.command.name(),
        offset: p.offset,
        length: p.length,
        errno,
        message,
    }
}

fn stop_error(stop: &Stop, timeout: Duration, command: &'static str, offset: u64) -> Error {
    match stop {
        Stop::Timeout { .. } => Error::Timeout {
            what: format!("NBD {command}"),
            offset: Some(offset),
            after: timeout,
        },
        Stop::Protocol(msg) => Error::Protocol(msg.clone()),
        other => Error::Disconnected {
            command,
            offset: Some(offset),
            reason: stop_reason(other, timeout),
        },
    }
}

fn stop_reason(stop: &Stop, timeout: Duration) -> String {
    match stop {
        Stop::Eof => "the server closed the connection".into(),
        Stop::Closed => "the connection was closed".into(),
        Stop::Timeout { command, offset } => {
            format!("{command} at offset {offset} got no reply within {timeout:?}")
        }
        Stop::Io(e) => format!("socket error: {e}"),
        Stop::Protocol(msg) => format!("protocol error: {msg}"),
    }
}

/// Bytes the reply reader buffers. Small on purpose: read data larger than the buffer goes
/// straight from the socket into the caller's buffer, and only what the buffer over-read around
/// a reply header (at most its size, twice per read reply) is copied a second time. 64 KiB here
/// copied up to half of every 256 KiB read twice; 4 KiB still batches hundreds of small replies.
const READ_BUFFER: usize = 4096;

/// The reader thread: parses replies until the connection ends, then fails every request
/// still waiting, so no caller waits forever.
pub(crate) fn run_reader<R: Read>(stream: R, shared: &Shared) {
    let mut reader = ReplyReader {
        inner: BufReader::with_capacity(READ_BUFFER, stream),
        shared,
        in_hand: None,
    };
    // Deadlines are checked when the socket is idle, and also every tick while replies keep
    // coming, so a request the server never answers fails even on a busy connection.
    let tick = tick(shared.timeout);
    let mut last_check = Instant::now();
    let stop = loop {
        if let Err(stop) = reader.one_reply() {
            break stop;
        }
        if last_check.elapsed() >= tick {
            last_check = Instant::now();
            if let Err(stop) = reader.check_deadline() {
                break stop;
            }
        }
    };
    fail_waiting(shared, &stop);
}

/// Ends a connection whose reader stopped: every request still waiting fails, with the reason
/// that explains best.
fn fail_waiting(shared: &Shared, stop: &Stop) {
    let drained: Vec<Pending> = {
        let mut table = shared.lock();
        let reason = match (&table.dead, stop) {
            // Our own kill (a failed send, a close) explains better than the EOF it caused.
            (Some(reason), Stop::Eof | Stop::Closed | Stop::Io(_)) => reason.clone(),
            _ => stop_reason(stop, shared.timeout),
        };
        table.dead.get_or_insert(reason);
        table.unsent.clear();
        table.returned.clear();
        let early: Vec<Pending> = table.early.drain().map(|(_, (p, _))| p).collect();
        table.pending.drain().map(|(_, p)| p).chain(early).collect()
    };
    let reason = shared.lock().dead.clone().unwrap_or_default();
    for p in drained {
        let e = match stop {
            Stop::Timeout { .. } => Error::Timeout {
                what: format!("NBD {}", p.command.name()),
                offset: Some(p.offset),
                after: shared.timeout,
            },
            Stop::Protocol(msg) => Error::Protocol(msg.clone()),
            _ => Error::Disconnected {
                command: p.command.name(),
                offset: Some(p.offset),
                reason: reason.clone(),
            },
        };
        p.complete(Err(e));
    }
}

/// The reading half of a driven connection ([`Conn::start_driven`]), owned by one thread. Every
/// completion of the connection's requests runs inside [`drive`](Self::drive), on that thread;
/// requests still waiting when the driver is dropped fail as disconnected.
pub(crate) struct Driver {
    /// `None` once the connection has ended (every waiting request has failed by then).
    inner: Option<BufReader<Stream>>,
    /// The socket, to wait on it.
    fd: std::os::fd::OwnedFd,
    shared: Arc<Shared>,
    last_check: Instant,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("ended", &self.inner.is_none())
            .field("waiting", &self.shared.lock().pending.len())
            .finish()
    }
}

impl Driver {
    /// Waits at most `wait` for a reply, reads it and runs the completion it finishes here;
    /// returns how many replies it read, 0 or 1 (a read answered in several structured chunks
    /// takes one call per chunk). One at a time, so the owner gets back to submitting requests
    /// while the server still has work queued: reading up to 16 per call left the server idle.
    /// A reply the socket says has begun is read whole (bounded by the connection's timeout). A
    /// request older than the timeout, a broken stream or a protocol error end the connection:
    /// every waiting request then completes with the error, and later calls return 0 at once.
    pub fn drive(&mut self, wait: Duration) -> usize {
        let Some(inner) = self.inner.take() else {
            return 0;
        };
        let mut reader = ReplyReader {
            inner,
            shared: &self.shared,
            in_hand: None,
        };
        let result = drive_one(&mut reader, &self.fd, wait, &mut self.last_check);
        let inner = reader.inner;
        match result {
            Ok(read) => {
                self.inner = Some(inner);
                usize::from(read)
            }
            Err(stop) => {
                fail_waiting(&self.shared, &stop);
                0
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.inner.take().is_some() {
            fail_waiting(&self.shared, &Stop::Closed);
        }
    }
}

/// Reads one reply if one comes within `wait` (whether it did), then checks the deadlines once
/// a tick.
fn drive_one(
    reader: &mut ReplyReader<'_, Stream>,
    fd: &std::os::fd::OwnedFd,
    wait: Duration,
    last_check: &mut Instant,
) -> std::result::Result<bool, Stop> {
    let read = !reader.inner.buffer().is_empty() || readable(fd, wait).map_err(Stop::Io)?;
    if read {
        reader.one_reply()?;
    }
    if last_check.elapsed() >= tick(reader.shared.timeout) {
        *last_check = Instant::now();
        reader.check_deadline()?;
    }
    Ok(read)
}

/// Whether `fd` has bytes (or an end) to read within `wait`.
fn readable(fd: &std::os::fd::OwnedFd, wait: Duration) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let spec = Timespec {
        tv_sec: wait.as_secs().min(i64::MAX as u64) as _,
        tv_nsec: wait.subsec_nanos() as _,
    };
    match rustix::event::poll(&mut fds, Some(&spec)) {
        Ok(n) => Ok(n > 0),
        // A signal: report nothing yet; the caller drives again.
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Feeds `bytes` as a reply stream framed as `style` says to a reader expecting a few requests
/// (a read of 4096 bytes at cookie 1, a block status at cookie 2, a write at cookie 3, a flush
/// at cookie 4, all at offset 1 MiB) and returns how many completed successfully. Used by the
/// fuzz targets and property tests: any input must end in completions or errors, never a panic
/// or a hang.
///
/// # Panics
///
/// If a request is left waiting after the stream ends — a bug in the reader, which is what the
/// fuzz target looks for.
pub fn replay_reply_stream(bytes: &[u8], style: ReplyStyle) -> usize {
    let shared = Shared {
        table: Mutex::new(Table::default()),
        style,
        timeout: Duration::from_secs(1),
        closing: AtomicBool::new(false),
    };
    let ok = Arc::new(AtomicU64::new(0));
    {
        let mut table = shared.lock();
        for (cookie, command, length) in [
            (1u64, Command::Read, 4096u64),
            (2, Command::BlockStatus, 1 << 20),
            (3, Command::Write, 512),
            (4, Command::Flush, 0),
        ] {
            let ok = ok.clone();
            table.pending.insert(
                cookie,
                Pending {
                    command,
                    offset: 1 << 20,
                    length,
                    buf: (command == Command::Read).then(|| vec![0xEE; length as usize]),
                    covered: Vec::new(),
                    error: None,
                    block_status: Vec::new(),
                    issued: Instant::now(),
                    done: Box::new(move |r| {
                        if r.is_ok() {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    }),
                },
            );
        }
    }
    run_reader(bytes, &shared);
    let table = shared.lock();
    assert!(
        table.pending.is_empty() && table.early.is_empty(),
        "a request was left waiting"
    );
    drop(table);
    ok.load(Ordering::SeqCst) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk_bytes(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn ext_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(1u64 << 20).to_be_bytes());
        v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// The same replies as [`valid_stream`], with extended headers.
    fn valid_extended_stream() -> Vec<u8> {
        let mut s = Vec::new();
        let mut hole = ((1u64 << 20) + 2048).to_be_bytes().to_vec();
        hole.extend_from_slice(&2048u32.to_be_bytes());
        s.extend(ext_chunk(0, chunk::OFFSET_HOLE, 1, &hole));
        let mut data = (1u64 << 20).to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 2048]);
        s.extend(ext_chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, &data));
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&2u32.to_be_bytes());
        for (len, status) in [(5u64 << 30, 3u64), (1 << 20, 0)] {
            bs.extend_from_slice(&len.to_be_bytes());
            bs.extend_from_slice(&status.to_be_bytes());
        }
        s.extend(ext_chunk(chunk::FLAG_DONE, chunk::BLOCK_STATUS_EXT, 2, &bs));
        s.extend(ext_chunk(chunk::FLAG_DONE, chunk::NONE, 3, &[]));
        s.extend(ext_chunk(chunk::FLAG_DONE, chunk::NONE, 4, &[]));
        s
    }

    #[test]
    fn extended_replies_complete_and_mixed_styles_fail() {
        assert_eq!(
            replay_reply_stream(&valid_extended_stream(), ReplyStyle::Extended),
            4
        );
        // Extended chunks without extended headers, and compact ones with them: errors.
        assert_eq!(
            replay_reply_stream(&valid_extended_stream(), ReplyStyle::Structured),
            0
        );
        assert_eq!(
            replay_reply_stream(&valid_stream(), ReplyStyle::Extended),
            0
        );
        // A 32-bit block status chunk under extended headers is refused.
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&(1u32 << 20).to_be_bytes());
        bs.extend_from_slice(&3u32.to_be_bytes());
        let s = ext_chunk(chunk::FLAG_DONE, chunk::BLOCK_STATUS, 2, &bs);
        assert_eq!(replay_reply_stream(&s, ReplyStyle::Extended), 0);
        // A payload length beyond any limit fails at once, without reading it.
        let mut huge = ext_chunk(chunk::FLAG_DONE, chunk::BLOCK_STATUS_EXT, 2, &[]);
        huge[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(replay_reply_stream(&huge, ReplyStyle::Extended), 0);
    }

    #[test]
    fn protocol_errors_are_named_once() {
        let shared = Shared {
            table: Mutex::new(Table::default()),
            style: ReplyStyle::Structured,
            timeout: Duration::from_secs(1),
            closing: AtomicBool::new(false),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        shared.lock().pending.insert(
            1,
            Pending {
                command: Command::Read,
                offset: 0,
                length: 4096,
                buf: Some(vec![0; 4096]),
                covered: Vec::new(),
                error: None,
                block_status: Vec::new(),
                issued: Instant::now(),
                done: Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            },
        );
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 2048]);
        run_reader(
            &chunk_bytes(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, &data)[..],
            &shared,
        );
        let text = rx.recv().unwrap().unwrap_err().to_string();
        assert_eq!(text.matches("protocol error").count(), 1, "{text}");
        assert!(text.contains("short read"), "{text}");
    }

    fn simple(error: u32, cookie: u64) -> Vec<u8> {
        let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    }

    /// A driven connection over one end of a socket pair that has sent two reads of 4096 bytes
    /// at 1 MiB (cookies 1 and 2), with `bytes` coming from the other end (closed after them
    /// when `close`). Drives it until both reads complete and returns their results; panics if
    /// that takes more than five seconds (a hang).
    fn drive_stream(bytes: &[u8], style: ReplyStyle, close: bool) -> Vec<Result<Vec<u8>>> {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let stream = Stream::Plain(Socket::Unix(ours));
        let (conn, mut driver) =
            Conn::start_driven(stream, style, Duration::from_millis(300)).unwrap();
        let done: Arc<Mutex<Vec<Result<Vec<u8>>>>> = Arc::default();
        for _ in 0..2 {
            let done = done.clone();
            conn.submit(
                Command::Read,
                0,
                1 << 20,
                4096,
                None,
                Some(vec![0xEE; 4096]),
                Box::new(move |r| {
                    done.lock()
                        .unwrap()
                        .push(r.map(|o| o.buf.unwrap_or_default()))
                }),
            );
        }
        peer.write_all(bytes).unwrap();
        // A peer kept open says nothing more: the reads still waiting must time out.
        let _silent_peer = (!close).then_some(peer);
        let until = Instant::now() + Duration::from_secs(5);
        while done.lock().unwrap().len() < 2 {
            assert!(Instant::now() < until, "driven reads left waiting");
            driver.drive(Duration::from_millis(20));
        }
        drop(conn);
        let results = std::mem::take(&mut *done.lock().unwrap());
        results
    }

    #[test]
    fn driven_connections_complete_replies_and_fail_on_silence() {
        let mut replies = Vec::new();
        for (cookie, fill) in [(2u64, 2u8), (1, 1)] {
            replies.extend(simple(0, cookie));
            replies.extend([fill; 4096]);
        }
        let results = drive_stream(&replies, ReplyStyle::Simple, false);
        let mut fills: Vec<u8> = results.into_iter().map(|r| r.unwrap()[4095]).collect();
        fills.sort_unstable();
        assert_eq!(fills, [1, 2]);
        // One reply, then nothing: the other read times out; nothing hangs.
        let results = drive_stream(&replies[..16 + 4096], ReplyStyle::Simple, false);
        assert!(results.iter().any(|r| r.is_ok()));
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(Error::Timeout { .. }))));
    }

    fn valid_stream() -> Vec<u8> {
        let mut s = Vec::new();
        // Read: data for the first half, a hole for the second, in reverse order.
        let mut hole = ((1u64 << 20) + 2048).to_be_bytes().to_vec();
        hole.extend_from_slice(&2048u32.to_be_bytes());
        s.extend(chunk_bytes(0, chunk::OFFSET_HOLE, 1, &hole));
        let mut data = (1u64 << 20).to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 2048]);
        s.extend(chunk_bytes(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, &data));
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&(1u32 << 20).to_be_bytes());
        bs.extend_from_slice(&3u32.to_be_bytes());
        s.extend(chunk_bytes(chunk::FLAG_DONE, chunk::BLOCK_STATUS, 2, &bs));
        s.extend(simple(0, 3));
        s.extend(chunk_bytes(chunk::FLAG_DONE, chunk::NONE, 4, &[]));
        s
    }

    #[test]
    fn a_valid_stream_completes_everything() {
        assert_eq!(
            replay_reply_stream(&valid_stream(), ReplyStyle::Structured),
            4
        );
    }

    #[test]
    fn short_reads_and_errors_fail_requests() {
        // Read reply covering only half: a protocol error, the rest fail too.
        let mut data = (1u64 << 20).to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 2048]);
        let s = chunk_bytes(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, &data);
        assert_eq!(replay_reply_stream(&s, ReplyStyle::Structured), 0);
        // An error chunk fails only its request.
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&0u16.to_be_bytes());
        let mut s = chunk_bytes(chunk::FLAG_DONE, chunk::ERROR, 1, &e);
        s.extend(simple(0, 4));
        assert_eq!(replay_reply_stream(&s, ReplyStyle::Structured), 1);
        // Truncated stream: nothing hangs.
        let v = valid_stream();
        for cut in [1, 10, 30, 2000, v.len() - 1] {
            assert!(replay_reply_stream(&v[..cut], ReplyStyle::Structured) < 4);
        }
    }

    #[test]
    fn simple_replies_carry_read_data_without_structured_replies() {
        let mut s = simple(0, 1);
        s.extend_from_slice(&[1u8; 4096]);
        s.extend(simple(0, 3));
        assert_eq!(replay_reply_stream(&s, ReplyStyle::Simple), 2);
        assert_eq!(replay_reply_stream(&s, ReplyStyle::Structured), 0);
    }

    proptest! {
        #[test]
        fn any_bytes_end_without_panic_or_hang(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = replay_reply_stream(&bytes, ReplyStyle::Structured);
            let _ = replay_reply_stream(&bytes, ReplyStyle::Simple);
            let _ = replay_reply_stream(&bytes, ReplyStyle::Extended);
        }

        #[test]
        fn driven_connections_end_any_bytes_without_panic_or_hang(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            style in prop_oneof![
                Just(ReplyStyle::Simple),
                Just(ReplyStyle::Structured),
                Just(ReplyStyle::Extended)
            ],
        ) {
            prop_assert_eq!(drive_stream(&bytes, style, true).len(), 2);
        }

        #[test]
        fn mutated_extended_streams_never_panic(pos in 0usize..2400, byte in any::<u8>()) {
            let mut v = valid_extended_stream();
            let pos = pos % v.len();
            v[pos] = byte;
            let _ = replay_reply_stream(&v, ReplyStyle::Extended);
        }

        #[test]
        fn mutated_valid_streams_never_panic(pos in 0usize..2200, byte in any::<u8>()) {
            let mut v = valid_stream();
            let pos = pos % v.len();
            v[pos] = byte;
            let _ = replay_reply_stream(&v, ReplyStyle::Structured);
        }
    }
}
