//! A pure-Rust NBD client.
//!
//! - Fixed-newstyle handshake with `NBD_OPT_GO` (falling back to `EXPORT_NAME` for old
//!   servers), export info and block-size constraints.
//! - Structured replies (falling back to simple replies), `base:allocation` block status for
//!   [`Disk::allocated_extents`], and `qemu:dirty-bitmap:NAME` for incremental backups
//!   ([`Disk::dirty_extents`], `?dirty-bitmap=NAME` in the URI).
//! - READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS; any number of requests in flight per
//!   connection: callers write requests, one reader thread per connection matches replies to
//!   them by cookie. [`Disk::submit_read`]/[`Disk::submit_write`] return at once, so the
//!   [`copy`](crate::copy) engine keeps 64 requests in flight from a single thread.
//! - Optional multi-conn ([`NbdOptions::connections`]) when the server advertises
//!   `CAN_MULTI_CONN`; requests are spread round-robin.
//! - Driven queues ([`Disk::driven_queue`]): on a multi-conn plaintext export, one more
//!   connection without a reader thread, whose replies are read, and completions run, by the
//!   one thread that drives it. The copy engine takes one per copying thread when its
//!   destination discards what it is given (`null:`); a server at its limit of clients leaves
//!   the connection unanswered, and after half a second the copy goes on through the disk's
//!   own connections.
//! - Every wait has a deadline ([`NbdOptions::timeout`], 30 s by default): a request without a
//!   reply in time fails with [`Error::Timeout`] naming its offset, the connection is closed, and
//!   every other waiting request fails too — never a hang, never a silent short read. TCP
//!   connects wait at most [`NbdOptions::connect_timeout`]; the handshake, every send and every
//!   reply at most [`NbdOptions::timeout`]. (Host names are resolved by the system resolver,
//!   under its own timeouts.)
//! - TLS (`nbds://`, feature `tls`), extended headers (64-bit lengths), FUA and FAST_ZERO.
//!
//! URIs as libnbd writes them are accepted by [`open_uri`](crate::open_uri):
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and `nbds://…`,
//! `nbds+unix://…` with TLS.
//!
//! ```no_run
//! use disk_transport::nbd::{NbdDisk, NbdOptions};
//! use disk_transport::{Disk, NbdAddress};
//!
//! # fn main() -> disk_transport::Result<()> {
//! let disk = NbdDisk::connect(
//!     &NbdOptions::new(NbdAddress::Unix("/run/nbd.sock".into())).export("disk").read_only(true),
//! )?;
//! for extent in disk.allocated_extents(0, disk.info()?.capacity)? {
//!     println!("{} {} {:?}", extent.offset, extent.length, extent.kind);
//! }
//! # Ok(())
//! # }
//! ```

mod conn;
mod handshake;
pub mod proto;
#[cfg(test)]
mod test_server;

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use conn::replay_reply_stream;
pub use conn::ReplyStyle;
use conn::{Command, Conn, Driver, Outcome, Socket, Stream};
use handshake::{Deadline, Event, Handshake, HandshakeRequest, Negotiated};
use proto::tflag;

use crate::types::{clip_extents, push_extent, DiskInfo, Extent, ExtentKind, ProtocolInfo};
use crate::uri::{NbdAddress, NbdTls};
use crate::{
    check_range, AccessGuard, CleanupStats, ConnectParams, Connection, Disk, DiskTransport,
    DrivenQueue, Error, OpenFlags, ReadCompletion, Result, TransportMode, WriteCompletion,
};

/// How to reach and use an NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    address: NbdAddress,
    export: String,
    read_only: bool,
    timeout: Duration,
    connect_timeout: Duration,
    dirty_bitmap: Option<String>,
    connections: usize,
    structured_replies: bool,
    extended_headers: bool,
    extents: bool,
    tls: Option<NbdTls>,
    fua: bool,
    handshake_timeout: Option<Duration>,
}

impl NbdOptions {
    /// Options for the default export at `address`.
    pub fn new(address: NbdAddress) -> Self {
        NbdOptions {
            address,
            export: String::new(),
            read_only: false,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            dirty_bitmap: None,
            connections: 1,
            structured_replies: true,
            extended_headers: true,
            extents: true,
            tls: None,
            fua: false,
            handshake_timeout: None,
        }
    }
    /// Export name ("" is the server's default export).
    pub fn export(mut self, export: impl Into<String>) -> Self {
        self.export = export.into();
        self
    }
    /// Refuse writes locally (the server may also be read-only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
    /// Longest wait for a reply, and for the handshake.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Longest wait for the TCP connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Also negotiate `qemu:dirty-bitmap:NAME` (fails if the server does not export it).
    pub fn dirty_bitmap(mut self, name: impl Into<String>) -> Self {
        self.dirty_bitmap = Some(name.into());
        self
    }
    /// Open up to `n` connections when the server advertises multi-conn (else one).
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }
    /// Ask for structured replies (default on; off forces simple replies and no extents).
    pub fn structured_replies(mut self, on: bool) -> Self {
        self.structured_replies = on;
        self
    }
    /// Ask for extended headers when the server offers them (default on): 64-bit lengths
    /// for zeroing, trimming and block status.
    pub fn extended_headers(mut self, on: bool) -> Self {
        self.extended_headers = on;
        self
    }
    /// Send every write, zero and trim with FUA (force unit access: the reply comes only once
    /// the data is durable) when the server advertises it; without it, [`Disk::flush`] makes
    /// writes durable. [`NbdDisk::write_fua`] asks for it per write.
    pub fn fua(mut self, on: bool) -> Self {
        self.fua = on;
        self
    }
    /// Longest the whole handshake (TLS included) may take, however the server trickles its
    /// replies (default: [`timeout`](Self::timeout)).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = Some(timeout);
        self
    }
    /// Ask for `base:allocation` (default on).
    pub fn extents(mut self, on: bool) -> Self {
        self.extents = on;
        self
    }
    /// Require TLS with these settings (an `nbds` URI's); the client never falls back to
    /// plaintext.
    pub fn tls(mut self, tls: NbdTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// What the server told about the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::tflag`).
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest read/write payload this client sends (≤ 32 MiB).
    pub max_payload: u32,
    /// Whether structured replies are in use.
    pub structured_replies: bool,
    /// Whether extended headers are in use (64-bit requests and block status).
    pub extended_headers: bool,
    /// The TLS session (protocol, cipher, how the peers authenticated), if any.
    pub tls: Option<String>,
    /// Whether `base:allocation` was negotiated.
    pub base_allocation: bool,
    /// Whether a dirty bitmap context was negotiated.
    pub dirty_bitmap: bool,
    /// The metadata contexts the server selected, by name.
    pub contexts: Vec<String>,
    /// The block sizes the server advertised (minimum, preferred, maximum payload), if it did.
    pub advertised_block_size: Option<(u32, u32, u32)>,
    /// Whether the export was selected with the legacy `NBD_OPT_EXPORT_NAME`.
    pub export_name_fallback: bool,
    /// Number of connections in use.
    pub connections: usize,
}

impl ExportInfo {
    /// What the handshake `n` negotiated, for a client using `connections` connections.
    fn negotiated(n: &Negotiated, tls: Option<String>, connections: usize) -> Self {
        ExportInfo {
            size: n.size,
            flags: n.flags,
            min_block: n.min_block,
            preferred_block: n.preferred_block,
            max_payload: n.max_payload,
            structured_replies: n.structured,
            extended_headers: n.extended,
            tls,
            base_allocation: n.base_allocation.is_some(),
            dirty_bitmap: n.dirty_bitmap.is_some(),
            contexts: n.contexts.clone(),
            advertised_block_size: n.advertised_block,
            export_name_fallback: n.export_name_fallback,
            connections,
        }
    }

    /// What this says, as `nbdinfo` names it, for [`Disk::protocol`].
    pub fn protocol_info(&self, export: &str) -> ProtocolInfo {
        let has = |flag: u16| self.flags & flag != 0;
        ProtocolInfo {
            protocol: if self.export_name_fallback {
                "newstyle-fixed (NBD_OPT_EXPORT_NAME)".into()
            } else {
                "newstyle-fixed".into()
            },
            tls: self.tls.clone(),
            transmission: if self.extended_headers {
                "extended"
            } else if self.structured_replies {
                "structured"
            } else {
                "simple"
            }
            .into(),
            export: export.to_owned(),
            contexts: self.contexts.clone(),
            is_rotational: has(tflag::ROTATIONAL),
            is_read_only: has(tflag::READ_ONLY),
            can_block_status_payload: has(tflag::BLOCK_STATUS_PAYLOAD),
            can_cache: has(tflag::SEND_CACHE),
            can_df: has(tflag::SEND_DF),
            can_fast_zero: has(tflag::SEND_FAST_ZERO),
            can_flush: has(tflag::SEND_FLUSH),
            can_fua: has(tflag::SEND_FUA),
            can_multi_conn: has(tflag::CAN_MULTI_CONN),
            can_trim: has(tflag::SEND_TRIM),
            can_zero: has(tflag::SEND_WRITE_ZEROES),
            block_size_minimum: self.advertised_block_size.map(|b| b.0),
            block_size_preferred: self.advertised_block_size.map(|b| b.1),
            block_size_maximum: self.advertised_block_size.map(|b| b.2),
            connections: self.connections,
        }
    }
}

/// A dirty or clean range from `qemu:dirty-bitmap:NAME` (the crate's [`DirtyExtent`](crate::DirtyExtent)).
pub use crate::types::DirtyExtent;

/// An export a server offers ([`list_exports`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExportEntry {
    /// Export name, as given to [`NbdOptions::export`].
    pub name: String,
    /// Description, empty if the server gave none.
    pub description: String,
}

/// Lists the exports of the server at `address` (`NBD_OPT_LIST`, what `nbdinfo --list` shows).
/// Servers may refuse (policy); that is an [`Error::Handshake`].
pub fn list_exports(address: &NbdAddress, timeout: Duration) -> Result<Vec<ExportEntry>> {
    list(
        &NbdOptions::new(address.clone())
            .timeout(timeout)
            .connect_timeout(timeout),
    )
}

/// Lists the exports of the server `options` name, over TLS if they ask for it.
pub fn list(options: &NbdOptions) -> Result<Vec<ExportEntry>> {
    let tls = tls_config(options)?;
    let mut req = request(options);
    req.list = true;
    let (stream, event) = negotiate(options, req, tls.as_ref())?;
    stream.shutdown();
    match event {
        Event::Listed(exports) => Ok(exports
            .into_iter()
            .map(|(name, description)| ExportEntry { name, description })
            .collect()),
        _ => Err(Error::Protocol("NBD_OPT_LIST ended without a list".into())),
    }
}

/// Runs this client's side of the handshake against a recorded server byte stream (what the
/// client sends is discarded) and returns what it negotiated. For fuzzing and tests: any bytes
/// must end in `Ok` or a clear error, never a panic or a hang.
pub fn replay_handshake(
    server_bytes: &[u8],
    export: &str,
    dirty_bitmap: Option<&str>,
) -> Result<ExportInfo> {
    let mut options = NbdOptions::new(NbdAddress::Unix("replay".into())).export(export);
    if let Some(b) = dirty_bitmap {
        options = options.dirty_bitmap(b);
    }
    replay_handshake_with(server_bytes, &options)
}

/// Like [`replay_handshake`], asking for what `options` ask (TLS, extended headers, dirty
/// bitmap, ...). When TLS is asked and the server accepts `NBD_OPT_STARTTLS`, the replay goes
/// on as if the TLS session were up, so what follows is checked as it would be inside it.
pub fn replay_handshake_with(server_bytes: &[u8], options: &NbdOptions) -> Result<ExportInfo> {
    struct Replay<'a>(&'a [u8]);
    impl std::io::Read for Replay<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::io::Read::read(&mut self.0, buf)
        }
    }
    impl std::io::Write for Replay<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl handshake::Timed for Replay<'_> {
        fn set_wait(&mut self, _: Duration) -> std::io::Result<()> {
            Ok(())
        }
    }
    let deadline = Deadline::after(options.timeout);
    let mut hs = Handshake::new(request(options));
    let mut replay = Replay(server_bytes);
    loop {
        match handshake::drive(&mut hs, &mut replay, &deadline)? {
            Event::StartTls => {
                hs.tls_established();
            }
            Event::Done(n) => {
                let tls = n.tls.then(|| "replayed".to_owned());
                return Ok(ExportInfo::negotiated(&n, tls, 1));
            }
            Event::Listed(_) | Event::Continue => {
                return Err(Error::Protocol("the replay ended without an export".into()))
            }
        }
    }
}

/// An open NBD export; see the [module docs](self).
#[derive(Debug)]
pub struct NbdDisk {
    conns: Vec<Conn>,
    next: AtomicUsize,
    negotiated: Negotiated,
    read_only: bool,
    timeout: Duration,
    export: String,
    dirty_bitmap: Option<String>,
    fua: bool,
    /// The TLS session of the first connection, described.
    tls: Option<String>,
    /// How to open one more connection for a [`DrivenQueue`]: `None` over TLS or without
    /// multi-conn.
    queue_options: Option<NbdOptions>,
}

/// How long a [`DrivenQueue`]'s connection may take to connect and negotiate before the queue
/// is given up: a server answers a plaintext handshake in milliseconds, unless it is at its
/// limit of clients.
const QUEUE_HANDSHAKE: Duration = Duration::from_millis(500);

/// A [`DrivenQueue`] on a connection of its own, without a reader thread.
#[derive(Debug)]
struct NbdQueue {
    // Dropped first: sends NBD_CMD_DISC and shuts the socket, so the driver, dropped next,
    // fails what is still waiting as closed by the client.
    conn: Conn,
    driver: Driver,
    size: u64,
    min_block: u64,
    max_piece: u64,
}

impl DrivenQueue for NbdQueue {
    fn submit_read(&mut self, offset: u64, buf: Vec<u8>, done: ReadCompletion) {
        let length = buf.len() as u64;
        if let Err(e) = check_io(offset, length, self.size, self.min_block) {
            return done(Err(e));
        }
        if length > self.max_piece {
            return done(Err(Error::InvalidParams(format!(
                "a read of {length} bytes exceeds the server's largest request ({} bytes)",
                self.max_piece
            ))));
        }
        if length == 0 {
            return done(Ok(buf));
        }
        submit_read_on(&self.conn, offset, buf, done);
    }

    fn drive(&mut self, wait: Duration) -> usize {
        self.driver.drive(wait)
    }
}

/// Send buffer asked for on Unix-socket connections.
const UNIX_SEND_BUFFER: usize = 4 << 20;

fn connect_stream(options: &NbdOptions, deadline: &Deadline) -> Result<Stream> {
    let connect_timeout = options.connect_timeout.min(deadline.left()?);
    match &options.address {
        NbdAddress::Tcp { host, port } => {
            let what = format!("connect to NBD server {host}:{port}");
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Error::io(what.clone(), None, e))?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, connect_timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)
                            .map_err(|e| Error::io(what.clone(), None, e))?;
                        return Ok(Stream::Plain(Socket::Tcp(s)));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(Error::io(
                what,
                None,
                last.unwrap_or_else(|| std::io::Error::other("host name has no addresses")),
            ))
        }
        NbdAddress::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| {
                Error::io(format!("connect to NBD socket {}", path.display()), None, e)
            })?;
            // A write's payload (256 KiB by default) is larger than the default send buffer
            // (208 KiB), so every write would block until the server had read part of it: a
            // sleep and a wake-up per request, about 15% of a copy into nbdkit's memory plugin.
            // The kernel caps the size at net.core.wmem_max and doubles it, so even a stock
            // system gets room for a whole request; a refusal only costs speed.
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, UNIX_SEND_BUFFER);
            Ok(Stream::Plain(Socket::Unix(s)))
        }
    }
}

/// The handshake request `options` make.
fn request(options: &NbdOptions) -> HandshakeRequest {
    HandshakeRequest {
        structured: options.structured_replies,
        extended: options.extended_headers,
        extents: options.extents,
        dirty_bitmap: options.dirty_bitmap.clone(),
        tls: options.tls.is_some(),
        ..HandshakeRequest::new(&options.export)
    }
}

#[cfg(feature = "tls")]
type TlsSetup = crate::tls::TlsConfig;
/// Without the `tls` feature there is nothing to set up; asking for TLS is an error.
#[cfg(not(feature = "tls"))]
#[derive(Debug)]
enum TlsSetup {}

/// The TLS settings of `options`, resolved once for all connections.
fn tls_config(options: &NbdOptions) -> Result<Option<TlsSetup>> {
    let Some(tls) = &options.tls else {
        return Ok(None);
    };
    #[cfg(feature = "tls")]
    {
        crate::tls::TlsConfig::new(tls, &options.address).map(Some)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Err(Error::Unsupported(
            "NBD over TLS (nbds://): disk-transport was built without the `tls` feature".into(),
        ))
    }
}

/// Upgrades the plaintext stream to TLS after the server accepted `NBD_OPT_STARTTLS`.
fn start_tls(
    stream: Stream,
    tls: Option<&TlsSetup>,
    deadline: &Deadline,
    timeout: Duration,
) -> Result<Stream> {
    let Some(config) = tls else {
        return Err(Error::Protocol(
            "TLS started although it was not asked for".into(),
        ));
    };
    #[cfg(feature = "tls")]
    {
        let Stream::Plain(socket) = stream else {
            return Err(Error::Protocol("NBD_OPT_STARTTLS accepted twice".into()));
        };
        let fd = socket
            .clone_fd()
            .map_err(|e| Error::io("clone NBD socket", None, e))?;
        let session = crate::tls::TlsStream::connect(config, socket, fd, deadline.at, timeout)?;
        Ok(Stream::Tls(session))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (stream, deadline, timeout);
        match *config {}
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The server's address as people write it: `unix:/run/nbd.sock`, `host:port`.
fn describe_address(address: &NbdAddress) -> String {
    match address {
        NbdAddress::Unix(path) => format!("unix:{}", path.display()),
        NbdAddress::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        NbdAddress::Tcp { host, port } => format!("{host}:{port}"),
    }
}

/// Connects and runs the whole handshake (TLS included) under one deadline.
fn negotiate(
    options: &NbdOptions,
    req: HandshakeRequest,
    tls: Option<&TlsSetup>,
) -> Result<(Stream, Event)> {
    let total = options.handshake_timeout.unwrap_or(options.timeout);
    let deadline = Deadline::after(total);
    let mut stream = connect_stream(options, &deadline)?;
    let mut hs = Handshake::new(req);
    loop {
        match handshake::drive(&mut hs, &mut stream, &deadline) {
            Ok(Event::StartTls) => {
                stream = start_tls(stream, tls, &deadline, options.timeout)?;
                hs.tls_established();
            }
            Ok(Event::Continue) => {
                return Err(Error::Protocol("the handshake stopped half-way".into()))
            }
            Ok(done) => return Ok((stream, done)),
            Err(e) => {
                let e = if hs.nothing_since_tls()
                    && matches!(e, Error::Io { .. } | Error::Handshake(_))
                {
                    let how = match &e {
                        Error::Io { .. } => format!(" ({})", error_chain(&e)),
                        _ => String::new(),
                    };
                    Error::Handshake(format!(
                        "TLS: the server ended the session right after the TLS handshake{how}; \
                         it may require a client certificate it trusts (client-cert.pem and \
                         client-key.pem in the tls-certificates directory)"
                    ))
                } else if matches!(e, Error::Timeout { .. }) && hs.nothing_received() {
                    Error::NoGreeting {
                        server: describe_address(&options.address),
                        after: total,
                    }
                } else {
                    e
                };
                // A refused option leaves the server waiting for the next one: say goodbye
                // properly (NBD_OPT_ABORT) rather than just hanging up. Best effort, briefly;
                // the error is what matters.
                if matches!(e, Error::NotFound(_) | Error::Handshake(_)) {
                    use std::io::Write;
                    let _ = stream.set_timeouts(
                        Some(Duration::from_millis(100)),
                        Some(Duration::from_millis(100)),
                    );
                    let _ = stream.write_all(&proto::encode_option(proto::opt::ABORT, &[]));
                }
                stream.shutdown();
                return Err(e);
            }
        }
    }
}

/// Negotiates one connection: the stream in the transmission phase, what the server said, the
/// TLS session described, and the reply style agreed.
fn negotiate_one(
    options: &NbdOptions,
    tls: Option<&TlsSetup>,
) -> Result<(Stream, Negotiated, Option<String>, ReplyStyle)> {
    let (stream, event) = negotiate(options, request(options), tls)?;
    let Event::Done(negotiated) = event else {
        return Err(Error::Protocol(
            "the handshake ended without an export".into(),
        ));
    };
    #[cfg(feature = "tls")]
    let session = stream.tls_description().map(|cipher| match tls {
        Some(config) => format!("{cipher}, {}", config.describe()),
        None => cipher,
    });
    #[cfg(not(feature = "tls"))]
    let session = stream.tls_description();
    let style = if negotiated.extended {
        ReplyStyle::Extended
    } else if negotiated.structured {
        ReplyStyle::Structured
    } else {
        ReplyStyle::Simple
    };
    Ok((stream, negotiated, session, style))
}

fn open_one(
    options: &NbdOptions,
    tls: Option<&TlsSetup>,
) -> Result<(Conn, Negotiated, Option<String>)> {
    let (stream, negotiated, session, style) = negotiate_one(options, tls)?;
    let conn = Conn::start(stream, style, options.timeout)?;
    Ok((conn, negotiated, session))
}

/// Refuses a further connection on which the server describes the export differently: requests
/// spread over both would see two different disks.
fn check_same_export(first: &Negotiated, other: &Negotiated) -> Result<()> {
    if other.size != first.size
        || other.flags != first.flags
        || other.extended != first.extended
        || other.contexts != first.contexts
    {
        return Err(Error::Protocol(
            "the server described the export differently on a second connection".into(),
        ));
    }
    Ok(())
}

/// Sends a read of `buf.len()` bytes at `offset` on `conn`; `done` gets the filled buffer.
fn submit_read_on(conn: &Conn, offset: u64, buf: Vec<u8>, done: ReadCompletion) {
    let length = buf.len() as u64;
    conn.submit(
        Command::Read,
        0,
        offset,
        length,
        None,
        Some(buf),
        Box::new(move |r| done(r.map(|o| o.buf.unwrap_or_default()))),
    );
}

/// Checks a request's range against the export's size and minimum block size.
fn check_io(offset: u64, length: u64, size: u64, min_block: u64) -> Result<()> {
    check_range(offset, length, size)?;
    let at_end = offset + length == size;
    if !offset.is_multiple_of(min_block) || (!length.is_multiple_of(min_block) && !at_end) {
        return Err(Error::Unaligned {
            offset,
            length,
            alignment: min_block,
            why: "the NBD server's minimum block size",
        });
    }
    Ok(())
}

impl NbdDisk {
    /// Connects and negotiates.
    pub fn connect(options: &NbdOptions) -> Result<Self> {
        let tls = tls_config(options)?;
        let (first, negotiated, session) = open_one(options, tls.as_ref())?;
        let mut conns = vec![first];
        if options.connections > 1 && negotiated.flags & tflag::CAN_MULTI_CONN != 0 {
            for _ in 1..options.connections {
                let (conn, other, _) = open_one(options, tls.as_ref())?;
                check_same_export(&negotiated, &other)?;
                conns.push(conn);
            }
        }
        // Driven queues open plaintext connections of their own, where the server takes
        // several; TLS ones stay threaded.
        let queue_options = (tls.is_none() && negotiated.flags & tflag::CAN_MULTI_CONN != 0)
            .then(|| options.clone());
        Ok(NbdDisk {
            conns,
            next: AtomicUsize::new(0),
            read_only: options.read_only || negotiated.flags & tflag::READ_ONLY != 0,
            negotiated,
            timeout: options.timeout,
            export: options.export.clone(),
            dirty_bitmap: options.dirty_bitmap.clone(),
            fua: options.fua,
            queue_options,
            tls: session,
        })
    }

    /// What the server told about the export.
    pub fn export_info(&self) -> ExportInfo {
        ExportInfo::negotiated(&self.negotiated, self.tls.clone(), self.conns.len())
    }

    /// Writes `buf` at `offset` with FUA: the call returns once the data is durable. Servers
    /// without FUA get a plain write followed by a flush, which gives the same guarantee.
    pub fn write_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, true)?;
        if !self.has(tflag::SEND_FUA) {
            self.call(Command::Flush, 0, 0, 0, None)?;
        }
        Ok(())
    }

    fn write_with(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_io(offset, buf.len() as u64)?;
        let piece = self.max_piece() as usize;
        let flags = self.fua_flag(fua);
        for (i, part) in buf.chunks(piece.max(1)).enumerate() {
            let at = offset + (i * piece) as u64;
            self.call(
                Command::Write,
                flags,
                at,
                part.len() as u64,
                Some(part.to_vec()),
            )?;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + length)` only if the server can do it faster than writing
    /// zeroes (`NBD_CMD_FLAG_FAST_ZERO`, for pre-zeroing a whole destination before a copy).
    /// Returns `false` — and changes nothing — when the server does not advertise fast zeroing
    /// or answers `ENOTSUP`, as the protocol describes; the caller then zeroes the slow way
    /// (or not at all). Other errors are errors.
    pub fn fast_zero(&self, offset: u64, length: u64) -> Result<bool> {
        self.check_writable()?;
        self.check_io(offset, length)?;
        if !self.has(tflag::SEND_FAST_ZERO) || !self.has(tflag::SEND_WRITE_ZEROES) {
            return Ok(false);
        }
        let flags = proto::cflag::FAST_ZERO | self.fua_flag(false);
        match self.ranged(Command::WriteZeroes, flags, offset, length) {
            Ok(()) => Ok(true),
            // The server would be slow: not zeroed (only the requests before, if any).
            Err(e) if e.nbd_errno() == Some(95) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn conn(&self) -> &Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    fn has(&self, flag: u16) -> bool {
        self.negotiated.flags & flag != 0
    }

    fn check_io(&self, offset: u64, length: u64) -> Result<()> {
        check_io(
            offset,
            length,
            self.negotiated.size,
            u64::from(self.negotiated.min_block),
        )
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            let why = if self.has(tflag::READ_ONLY) {
                " (the server exports it read-only)"
            } else {
                ""
            };
            return Err(Error::ReadOnly(format!(
                "NBD export {:?}{why}",
                self.export
            )));
        }
        Ok(())
    }

    /// Sends one request and waits for its outcome.
    fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Vec<u8>>,
    ) -> Result<Outcome> {
        let (tx, rx) = mpsc::channel();
        let read_buf = (command == Command::Read).then(|| vec![0u8; length as usize]);
        self.conn().submit(
            command,
            flags,
            offset,
            length,
            payload,
            read_buf,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        self.wait(&rx, command, offset)
    }

    fn wait(
        &self,
        rx: &mpsc::Receiver<Result<Outcome>>,
        command: Command,
        offset: u64,
    ) -> Result<Outcome> {
        // The reader thread enforces the timeout; the margin covers its polling interval.
        match rx.recv_timeout(self.timeout + Duration::from_secs(2)) {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: format!("NBD {}", command.name()),
                offset: Some(offset),
                after: self.timeout,
            }),
        }
    }

    /// Largest piece for one READ/WRITE, aligned to the minimum block size.
    fn max_piece(&self) -> u64 {
        let min = u64::from(self.negotiated.min_block);
        (u64::from(self.negotiated.max_payload) / min * min).max(min)
    }

    /// Largest effect length for TRIM/WRITE_ZEROES/BLOCK_STATUS: any length with extended
    /// headers; with compact headers 4 GiB - 1 MiB, so that the pieces of a larger request
    /// stay aligned (a server zeroes an unaligned piece's edges by writing zeroes, leaving
    /// data where a hole was asked for).
    fn max_effect(&self) -> u64 {
        let min = u64::from(self.negotiated.min_block);
        let limit = if self.negotiated.extended {
            u64::MAX
        } else {
            (1 << 32) - (1 << 20)
        };
        limit / min * min
    }

    fn ranged(&self, command: Command, flags: u16, offset: u64, length: u64) -> Result<()> {
        let mut done = 0;
        while done < length {
            let n = (length - done).min(self.max_effect());
            self.call(command, flags, offset + done, n, None)?;
            done += n;
        }
        Ok(())
    }

    /// The FUA flag for a write-type command when the caller asked for it and the server
    /// offers it.
    fn fua_flag(&self, asked: bool) -> u16 {
        if (asked || self.fua) && self.has(tflag::SEND_FUA) {
            proto::cflag::FUA
        } else {
            0
        }
    }

    /// Descriptors covering exactly `[offset, offset + length)`. Requests are widened to the
    /// server's minimum block size and answers clipped back, so any range may be asked.
    fn block_status(&self, context: u32, offset: u64, length: u64) -> Result<Vec<(u64, u64, u32)>> {
        check_range(offset, length, self.negotiated.size)?;
        let min = u64::from(self.negotiated.min_block);
        let end = offset + length;
        let mut out = Vec::new();
        // Everything before `covered` has been reported.
        let mut covered = offset;
        while covered < end {
            let start = covered / min * min;
            let stop = end.next_multiple_of(min).min(self.negotiated.size);
            let n = (stop - start).min(self.max_effect()).max(1);
            let outcome = self.call(Command::BlockStatus, 0, start, n, None)?;
            let descriptors = outcome
                .block_status
                .into_iter()
                .find(|(id, _)| *id == context)
                .map(|(_, d)| d)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "block status reply at offset {start} lacks the negotiated context {context}"
                    ))
                })?;
            let before = covered;
            let mut at = start;
            // Extents may be unaligned (nbdkit at an unaligned end of image) and the last may
            // reach past the request; both are clipped to what was asked.
            for (len, flags) in descriptors {
                let flags = flags as u32;
                let next = at.saturating_add(len);
                let (s, t) = (at.max(covered), next.min(end));
                if s < t {
                    out.push((s, t - s, flags));
                    covered = t;
                }
                at = next;
                if at >= end {
                    break;
                }
            }
            if covered == before {
                return Err(Error::Protocol(format!(
                    "block status at offset {start} made no progress"
                )));
            }
        }
        Ok(out)
    }

    /// Dirty and clean ranges from the negotiated `qemu:dirty-bitmap:NAME`
    /// ([`NbdOptions::dirty_bitmap`]); see [`Disk::dirty_extents`].
    fn dirty_block_status(&self, offset: u64, length: u64) -> Result<Vec<DirtyExtent>> {
        let context = self
            .negotiated
            .dirty_bitmap
            .ok_or_else(|| Error::NoDirtyBitmap {
                what: format!("NBD export {:?}", self.export),
                how: "?dirty-bitmap=NAME in the URI (DiskUri::with_dirty_bitmap), \
                      NbdOptions::dirty_bitmap; the server must export the bitmap (qemu-nbd -B \
                      NAME, block-export-add's bitmaps)"
                    .into(),
            })?;
        let mut out: Vec<DirtyExtent> = Vec::new();
        for (offset, length, flags) in self.block_status(context, offset, length)? {
            crate::types::push_dirty_extent(
                &mut out,
                DirtyExtent {
                    offset,
                    length,
                    dirty: flags & 1 != 0,
                },
            );
        }
        Ok(out)
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        for conn in &self.conns {
            conn.close();
        }
    }
}

impl Disk for NbdDisk {
    fn info(&self) -> Result<DiskInfo> {
        let n = &self.negotiated;
        let mut info = DiskInfo::new(n.size);
        info.min_block_size = n.min_block;
        info.preferred_block_size = n.preferred_block;
        info.max_request_size = n.max_payload;
        info.logical_sector_size = n.min_block.max(512);
        info.physical_sector_size = n.preferred_block.max(512);
        info.read_only = self.read_only;
        info.can_extents = n.base_allocation.is_some();
        info.can_multi_conn = self.has(tflag::CAN_MULTI_CONN);
        info.dirty_bitmap = self.dirty_bitmap.clone();
        Ok(info)
    }

    fn dirty_extents(&self, offset: u64, length: u64) -> Result<Vec<DirtyExtent>> {
        self.dirty_block_status(offset, length)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_io(offset, buf.len() as u64)?;
        let piece = self.max_piece() as usize;
        let (tx, rx) = mpsc::channel();
        let pieces = buf.len().div_ceil(piece.max(1));
        for i in 0..pieces {
            let start = i * piece;
            let len = piece.min(buf.len() - start);
            let tx = tx.clone();
            let at = offset + start as u64;
            self.conn().submit(
                Command::Read,
                0,
                at,
                len as u64,
                None,
                Some(vec![0u8; len]),
                Box::new(move |r| {
                    let _ = tx.send((start, r));
                }),
            );
        }
        drop(tx);
        let mut first_error = None;
        for _ in 0..pieces {
            match rx.recv_timeout(self.timeout + Duration::from_secs(2)) {
                Ok((start, Ok(outcome))) => {
                    let data = outcome.buf.unwrap_or_default();
                    buf[start..start + data.len()].copy_from_slice(&data);
                }
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: "NBD read".into(),
                        offset: Some(offset),
                        after: self.timeout,
                    })
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, false)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || !self.has(tflag::SEND_FLUSH) {
            // Nothing to flush: the server did not offer FLUSH (its writes are durable when
            // acknowledged), or nothing was written.
            return Ok(());
        }
        // With multi-conn one FLUSH covers writes completed on every connection.
        self.call(Command::Flush, 0, 0, 0, None).map(|_| ())
    }

    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.negotiated.size)?;
        let Some(context) = self.negotiated.base_allocation else {
            let mut v = Vec::new();
            push_extent(
                &mut v,
                Extent {
                    offset,
                    length,
                    kind: ExtentKind::Data,
                },
            );
            return Ok(v);
        };
        let mut extents = Vec::new();
        for (at, len, flags) in self.block_status(context, offset, length)? {
            push_extent(
                &mut extents,
                Extent {
                    offset: at,
                    length: len,
                    kind: ExtentKind::from_nbd_flags(flags),
                },
            );
        }
        Ok(clip_extents(&extents, offset, length))
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        self.check_io(offset, length)?;
        if self.has(tflag::SEND_WRITE_ZEROES) {
            return self.ranged(Command::WriteZeroes, self.fua_flag(false), offset, length);
        }
        let piece = self.max_piece().min(1 << 20) as usize;
        let zeros = vec![0u8; piece];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(piece as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        self.check_io(offset, length)?;
        if !self.has(tflag::SEND_TRIM) {
            return Ok(());
        }
        self.ranged(Command::Trim, self.fua_flag(false), offset, length)
    }

    fn submit_read(&self, offset: u64, buf: Vec<u8>, done: ReadCompletion) {
        let length = buf.len() as u64;
        if let Err(e) = self.check_io(offset, length) {
            return done(Err(e));
        }
        if length == 0 {
            return done(Ok(buf));
        }
        if length > self.max_piece() {
            let mut buf = buf;
            let r = self.read_at(&mut buf, offset).map(|()| buf);
            return done(r);
        }
        submit_read_on(self.conn(), offset, buf, done);
    }

    fn submit_write(&self, offset: u64, buf: Vec<u8>, done: WriteCompletion) {
        let length = buf.len() as u64;
        if let Err(e) = self
            .check_writable()
            .and_then(|()| self.check_io(offset, length))
        {
            return done(Err(e));
        }
        if length == 0 {
            return done(Ok(buf));
        }
        if length > self.max_piece() {
            let r = self.write_at(&buf, offset).map(|()| buf);
            return done(r);
        }
        self.conn().submit(
            Command::Write,
            self.fua_flag(false),
            offset,
            length,
            Some(buf),
            None,
            Box::new(move |r| done(r.map(|o| o.buf.unwrap_or_default()))),
        );
    }

    fn max_in_flight(&self) -> usize {
        64 * self.conns.len()
    }

    fn driven_queue(&self) -> Result<Option<Box<dyn DrivenQueue>>> {
        let Some(options) = &self.queue_options else {
            return Ok(None);
        };
        // A server may cap its clients below what it serves over multi-conn (qemu-nbd -e N):
        // the extra connection then waits unanswered in its backlog. A short handshake gives
        // up soon and the copy reads through the disk's own connections.
        let options = options
            .clone()
            .connect_timeout(QUEUE_HANDSHAKE)
            .handshake_timeout(QUEUE_HANDSHAKE);
        let (stream, negotiated, _, style) = negotiate_one(&options, None)?;
        check_same_export(&self.negotiated, &negotiated)?;
        let (conn, driver) = Conn::start_driven(stream, style, self.timeout)?;
        Ok(Some(Box::new(NbdQueue {
            conn,
            driver,
            size: self.negotiated.size,
            min_block: u64::from(self.negotiated.min_block),
            max_piece: self.max_piece(),
        })))
    }

    fn protocol(&self) -> Option<ProtocolInfo> {
        Some(self.export_info().protocol_info(&self.export))
    }
}

/// NBD as a [`DiskTransport`]: the connection parameters name the server
/// ([`ConnectParams::server`] is a host, or `unix:/path/to/socket`; the port defaults to
/// 10809) and [`Connection::open`] takes the export name.
///
/// The NBD protocol has no PrepareForAccess; those calls return [`Error::Unsupported`].
#[derive(Debug, Clone)]
pub struct NbdTransport {
    timeout: Duration,
    connections: usize,
}

impl Default for NbdTransport {
    fn default() -> Self {
        NbdTransport {
            timeout: Duration::from_secs(30),
            connections: 1,
        }
    }
}

impl NbdTransport {
    /// A transport with the default timeout (30 s) and one connection per disk.
    pub fn new() -> Self {
        NbdTransport::default()
    }
    /// Per-request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Connections per disk when the server allows multi-conn.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }
}

impl DiskTransport for NbdTransport {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn transport_modes(&self) -> Vec<TransportMode> {
        vec![TransportMode::Nbd]
    }

    fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>> {
        let server = params.server().ok_or_else(|| {
            Error::InvalidParams("NBD needs a server (a host name, or unix:/path/to/socket)".into())
        })?;
        let address = match server.strip_prefix("unix:") {
            Some(path) => NbdAddress::Unix(path.into()),
            None => NbdAddress::Tcp {
                host: server.to_owned(),
                port: params.port().unwrap_or(10809),
            },
        };
        Ok(Box::new(NbdConnection {
            address,
            read_only: params.read_only(),
            timeout: self.timeout,
            connections: self.connections,
        }))
    }

    fn prepare_for_access(&self, _params: &ConnectParams, _identity: &str) -> Result<AccessGuard> {
        Err(Error::Unsupported("PrepareForAccess over NBD".into()))
    }

    fn cleanup(&self, _params: &ConnectParams) -> Result<CleanupStats> {
        // An NBD client leaves no state on the server once its sockets are closed.
        Ok(CleanupStats::default())
    }
}

#[derive(Debug)]
struct NbdConnection {
    address: NbdAddress,
    read_only: bool,
    timeout: Duration,
    connections: usize,
}

impl Connection for NbdConnection {
    fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
        let flags = flags.effective(self.read_only);
        let options = NbdOptions::new(self.address.clone())
            .export(path)
            .read_only(flags.read_only)
            .timeout(self.timeout)
            .connections(self.connections);
        Ok(Box::new(NbdDisk::connect(&options)?))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::proto::*;
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// What qemu-nbd answers: structured replies, base:allocation, export info, block sizes.
    fn server_script() -> Vec<u8> {
        let mut s = NBDMAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        let mut ctx = 7u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx));
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        let mut export = 0u16.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(
            &(tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN).to_be_bytes(),
        );
        s.extend(option_reply(opt::GO, rep::INFO, &export));
        let mut block = 3u16.to_be_bytes().to_vec();
        for v in [1u32, 4096, 1 << 25] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        s.extend(option_reply(opt::GO, rep::INFO, &block));
        s.extend(option_reply(opt::GO, rep::ACK, &[]));
        s
    }

    #[test]
    fn negotiates_like_qemu_nbd() {
        let info = replay_handshake(&server_script(), "disk", None).unwrap();
        assert_eq!(info.size, 1 << 30);
        assert!(info.structured_replies && info.base_allocation);
        assert_eq!(
            (info.min_block, info.preferred_block, info.max_payload),
            (1, 4096, 1 << 25)
        );
        let err = replay_handshake(&server_script(), "disk", Some("b0")).unwrap_err();
        assert!(err.to_string().contains("qemu:dirty-bitmap:b0"));
    }

    #[test]
    fn unknown_export_and_tls_are_explained() {
        let mut s = server_script();
        let go = s.len() - 3 * 20 - 12 - 14;
        s.truncate(go);
        s.extend(option_reply(opt::GO, rep::ERR_UNKNOWN, b"no such export"));
        assert!(matches!(
            replay_handshake(&s, "x", None),
            Err(Error::NotFound(_))
        ));
        s.truncate(go);
        s.extend(option_reply(opt::GO, rep::ERR_TLS_REQD, b""));
        assert!(replay_handshake(&s, "x", None)
            .unwrap_err()
            .to_string()
            .contains("TLS"));
        for cut in [0, 5, 18, 30, go, s.len() - 1] {
            assert!(replay_handshake(&s[..cut], "x", None).is_err());
        }
    }

    /// Serves `data` with the shuffling test server on a Unix socket.
    fn shuffling_server(data: Vec<u8>, seed: u64) -> (tempfile::TempDir, NbdAddress) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                super::test_server::serve(stream, data, seed);
            }
        });
        (dir, NbdAddress::Unix(path))
    }

    #[test]
    fn out_of_order_split_replies_reassemble_exactly() {
        let size = 3 << 20;
        let mut data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(7) | 1).collect();
        data[(1 << 20)..(1 << 20) + 200_000].fill(0);
        let (_dir, address) = shuffling_server(data.clone(), 42);
        let disk =
            NbdDisk::connect(&NbdOptions::new(address).timeout(Duration::from_secs(10))).unwrap();
        // Many concurrent reads from several threads, of odd sizes.
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let disk = &disk;
                let data = &data;
                scope.spawn(move || {
                    for i in 0..40u64 {
                        let off = (t * 7919 + i * 104_729) % (size as u64 - 70_000);
                        let len = 1 + ((t + i) * 6151 % 70_000) as usize;
                        let mut buf = vec![0xEEu8; len];
                        disk.read_at(&mut buf, off).unwrap();
                        assert_eq!(&buf[..], &data[off as usize..off as usize + len]);
                    }
                });
            }
        });
        // The copy engine keeps 64 requests in flight through the shuffle.
        let dst = crate::memory::MemoryDisk::new(size as u64);
        crate::copy::copy(
            &disk,
            &dst,
            &crate::copy::CopyOptions::default().request_size(65536),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(dst.to_vec().unwrap(), data);
        // Writes (simple and structured acknowledgements), zeroing, extents.
        let (_dir2, address2) = shuffling_server(vec![0u8; size], 7);
        let target = NbdDisk::connect(&NbdOptions::new(address2)).unwrap();
        crate::copy::copy(
            &dst,
            &target,
            &crate::copy::CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let mut back = vec![0u8; size];
        target.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        let extents = target.allocated_extents(0, size as u64).unwrap();
        assert_eq!(extents.last().unwrap().end(), size as u64);
        assert!(extents.iter().any(|e| e.kind == ExtentKind::Hole));
        target.write_zeroes(0, 1 << 20).unwrap();
        target.read_at(&mut back[..4096], 4096).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
    }

    /// Serves `data` with multi-conn on every connection made, as `config` says otherwise;
    /// counts the connections.
    fn multi_conn_server(
        data: Vec<u8>,
        mut config: super::test_server::Config,
    ) -> (tempfile::TempDir, NbdAddress, Arc<AtomicUsize>) {
        config.flags |= tflag::CAN_MULTI_CONN;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let (data, config) = (data.clone(), config.clone());
                std::thread::spawn(move || {
                    super::test_server::serve_with(stream, data, n as u64 + 3, config)
                });
            }
        });
        (dir, NbdAddress::Unix(path), accepted)
    }

    #[test]
    fn driven_queues_complete_reads_on_the_driving_thread_only() {
        let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
        let (_dir, address, accepted) = multi_conn_server(data.clone(), Default::default());
        let disk =
            NbdDisk::connect(&NbdOptions::new(address).timeout(Duration::from_secs(10))).unwrap();
        let mut queue = disk
            .driven_queue()
            .unwrap()
            .expect("a queue on a multi-conn export");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one more connection for the queue"
        );
        type Done = (u64, std::thread::ThreadId, Result<Vec<u8>>);
        let done: Arc<Mutex<Vec<Done>>> = Arc::default();
        for i in 0..24u64 {
            let offset = i * 70_001;
            let done = done.clone();
            queue.submit_read(
                offset,
                vec![0xEE; 4096 + i as usize * 1000],
                Box::new(move |r| {
                    done.lock()
                        .unwrap()
                        .push((offset, std::thread::current().id(), r))
                }),
            );
        }
        // No reader thread: nothing completes until the queue is driven.
        std::thread::sleep(Duration::from_millis(100));
        assert!(done.lock().unwrap().is_empty());
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while done.lock().unwrap().len() < 24 && std::time::Instant::now() < until {
            queue.drive(Duration::from_millis(50));
        }
        let done = std::mem::take(&mut *done.lock().unwrap());
        assert_eq!(done.len(), 24);
        for (offset, thread, result) in done {
            assert_eq!(thread, std::thread::current().id());
            let buf = result.unwrap();
            let at = offset as usize;
            assert_eq!(buf, data[at..at + buf.len()], "read at {offset}");
        }
        // Bad requests complete at once, with the reason.
        let (tx, rx) = std::sync::mpsc::channel();
        queue.submit_read(
            data.len() as u64,
            vec![0; 512],
            Box::new(move |r| tx.send(r).unwrap()),
        );
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_dropped_queue_fails_its_waiting_reads_and_a_silent_server_times_out() {
        let (_dir, address, _) = multi_conn_server(vec![1u8; 1 << 20], Default::default());
        let disk = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
        let mut queue = disk.driven_queue().unwrap().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        queue.submit_read(0, vec![0; 4096], Box::new(move |r| tx2.send(r).unwrap()));
        drop(queue);
        let e = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, Error::Disconnected { .. }), "{e}");
        // The disk itself is unaffected.
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 1));

        // A server that never answers: the read fails once it is older than the timeout.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mute.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().flatten().enumerate() {
                // The disk's own connection answers; the queue's (the second) never does.
                let config = super::test_server::Config {
                    flags: tflag::CAN_MULTI_CONN,
                    mute_after: (n == 1).then_some(0),
                    ..Default::default()
                };
                std::thread::spawn(move || {
                    super::test_server::serve_with(stream, vec![1; 1 << 20], 5, config)
                });
            }
        });
        let timeout = Duration::from_millis(300);
        let disk =
            NbdDisk::connect(&NbdOptions::new(NbdAddress::Unix(path)).timeout(timeout)).unwrap();
        let mut queue = disk.driven_queue().unwrap().unwrap();
        queue.submit_read(0, vec![0; 4096], Box::new(move |r| tx.send(r).unwrap()));
        let started = std::time::Instant::now();
        let result = loop {
            if let Ok(result) = rx.try_recv() {
                break result;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the silent server's read never failed"
            );
            queue.drive(Duration::from_millis(20));
        };
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        assert!(started.elapsed() >= timeout);
        assert_eq!(queue.drive(Duration::ZERO), 0);
    }

    #[test]
    fn no_driven_queue_without_multi_conn_and_copies_into_a_sink_use_one_per_thread_with_it() {
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i / 4096 % 7) as u8).collect();
        let (_dir, address) = shuffling_server(data.clone(), 9);
        let disk = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
        assert!(disk.driven_queue().unwrap().is_none());

        let (_dir, address, accepted) = multi_conn_server(data.clone(), Default::default());
        let disk = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
        let dst = crate::memory::MemoryDisk::new(data.len() as u64);
        let options = crate::copy::CopyOptions::default()
            .threads(2)
            .request_size(65536);
        crate::copy::copy(&disk, &dst, &options, &mut |_| {}).unwrap();
        assert_eq!(dst.to_vec().unwrap(), data);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "a destination that stores data is written while the reader threads read on"
        );
        // Into a sink (what `checksum` and `null:` copy into) each copying thread reads its
        // own queue, and what it read is the export's data.
        let spec = crate::blkhash::BlkhashSpec::default();
        let read = crate::blkhash::checksum(&disk, spec, &options, &mut |_| {}).unwrap();
        let model = crate::memory::MemoryDisk::with_data(&data);
        let expected = crate::blkhash::checksum(&model, spec, &options, &mut |_| {}).unwrap();
        assert_eq!(read, expected);
        // A copy that reads nothing (the source is one hole) opens no queue, even into a sink.
        let (_dir, address, holes_accepted) =
            multi_conn_server(vec![0; 1 << 20], Default::default());
        let holes = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
        let report = crate::copy::copy(
            &holes,
            &crate::null::NullDisk::new(1 << 20),
            &options,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.progress.read, 0);
        assert_eq!(holes_accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "the disk's connection and a queue per thread"
        );
    }

    /// Serves `data` with the test server as `config` says; returns the request log too.
    fn configured_server(
        data: Vec<u8>,
        mut config: super::test_server::Config,
    ) -> (
        tempfile::TempDir,
        NbdAddress,
        std::sync::Arc<std::sync::Mutex<Vec<super::test_server::Logged>>>,
    ) {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        config.log = Some(log.clone());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                super::test_server::serve_with(stream, data, 9, config);
            }
        });
        (dir, NbdAddress::Unix(path), log)
    }

    fn logged(
        log: &std::sync::Mutex<Vec<super::test_server::Logged>>,
        command: u16,
    ) -> Vec<(u16, u64, u64)> {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == command)
            .map(|r| (r.1, r.2, r.3))
            .collect()
    }

    #[test]
    fn extended_headers_zero_trim_and_map_beyond_4_gib_in_one_request() {
        const GIB: u64 = 1 << 30;
        let size = 6 * GIB;
        let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
        for extended in [true, false] {
            let config = super::test_server::Config {
                extended,
                size: Some(size),
                ..Default::default()
            };
            let (_dir, address, log) = configured_server(data.clone(), config);
            let disk = NbdDisk::connect(&NbdOptions::new(address).timeout(Duration::from_secs(10)))
                .unwrap();
            assert_eq!(disk.export_info().extended_headers, extended);
            assert_eq!(
                disk.protocol().unwrap().transmission,
                if extended { "extended" } else { "structured" }
            );
            // Reads and writes (PAYLOAD_LEN checked by the server) through the shuffle.
            let mut back = vec![0u8; data.len()];
            disk.read_at(&mut back, 0).unwrap();
            assert_eq!(back, data);
            disk.write_at(&[7u8; 4096], 8192).unwrap();
            let extents = disk.allocated_extents(0, size).unwrap();
            assert_eq!(extents.last().unwrap().end(), size);
            assert_eq!(extents.last().unwrap().kind, ExtentKind::Hole);
            disk.write_zeroes(0, size).unwrap();
            disk.trim(0, size).unwrap();
            disk.read_at(&mut back[..65536], 0).unwrap();
            assert!(back[..65536].iter().all(|&b| b == 0));
            let zeroes = logged(&log, proto::cmd::WRITE_ZEROES);
            let trims = logged(&log, proto::cmd::TRIM);
            let status = logged(&log, proto::cmd::BLOCK_STATUS);
            if extended {
                // 6 GiB in one request each; block status asked for the whole disk at once.
                assert_eq!(zeroes, vec![(0, 0, size)]);
                assert_eq!(trims, vec![(0, 0, size)]);
                assert_eq!(status[0], (0, 0, size));
            } else {
                assert_eq!(zeroes.len(), 2, "{zeroes:?}");
                assert!(zeroes.iter().all(|z| z.2 <= u64::from(u32::MAX)));
                assert_eq!(zeroes.iter().map(|z| z.2).sum::<u64>(), size);
            }
            let writes = logged(&log, proto::cmd::WRITE);
            assert!(writes.iter().all(|w| w.0 & proto::cflag::FUA == 0));
        }
    }

    #[test]
    fn unaligned_extents_and_extents_past_the_request_are_clipped() {
        // Data in granules 0 and 2, an image end that is not a multiple of anything.
        let size = 3 * 65536 + 700;
        let mut data = vec![0u8; size];
        data[..65536].fill(1);
        data[2 * 65536..].fill(2);
        for extended in [false, true] {
            let config = super::test_server::Config {
                extended,
                min_block: Some(512),
                unaligned_extents: true,
                ..Default::default()
            };
            let (_dir, address, _log) = configured_server(data.clone(), config);
            let disk = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
            let all = disk.allocated_extents(0, size as u64).unwrap();
            let kinds: Vec<(u64, u64, ExtentKind)> =
                all.iter().map(|e| (e.offset, e.length, e.kind)).collect();
            assert_eq!(
                kinds,
                vec![
                    (0, 65536, ExtentKind::Data),
                    (65536, 65536, ExtentKind::Hole),
                    (2 * 65536, 65536 + 700, ExtentKind::Data),
                ]
            );
            // Any range, aligned or not, comes back exactly covered.
            for (offset, length) in [
                (1000u64, 70_000u64),
                (65536 - 300, 301),
                (size as u64 - 1, 1),
            ] {
                let part = disk.allocated_extents(offset, length).unwrap();
                assert_eq!(part.first().unwrap().offset, offset);
                assert_eq!(part.last().unwrap().end(), offset + length);
                assert!(part.windows(2).all(|w| w[0].end() == w[1].offset));
                for e in &part {
                    let expect = kinds
                        .iter()
                        .find(|k| k.0 <= e.offset && e.offset < k.0 + k.1)
                        .unwrap()
                        .2;
                    assert_eq!(e.kind, expect, "{offset}+{length}: {part:?}");
                }
            }
        }
    }

    #[test]
    fn fua_when_asked_and_advertised_and_flush_when_not() {
        for advertised in [true, false] {
            let config = super::test_server::Config {
                extended: true,
                flags: if advertised { tflag::SEND_FUA } else { 0 },
                ..Default::default()
            };
            let (_dir, address, log) = configured_server(vec![0u8; 1 << 20], config);
            let disk = NbdDisk::connect(&NbdOptions::new(address.clone())).unwrap();
            disk.write_at(&[1u8; 512], 0).unwrap();
            disk.write_fua(&[2u8; 512], 512).unwrap();
            let writes = logged(&log, proto::cmd::WRITE);
            let fua: Vec<bool> = writes
                .iter()
                .map(|w| w.0 & proto::cflag::FUA != 0)
                .collect();
            let flushes = logged(&log, proto::cmd::FLUSH).len();
            if advertised {
                assert_eq!((fua, flushes), (vec![false, true], 0));
            } else {
                assert_eq!((fua, flushes), (vec![false, false], 1));
            }
            drop(disk);
        }
        // NbdOptions::fua: every write, zero and trim.
        let config = super::test_server::Config {
            flags: tflag::SEND_FUA,
            ..Default::default()
        };
        let (_dir, address, log) = configured_server(vec![0u8; 1 << 20], config);
        let disk = NbdDisk::connect(&NbdOptions::new(address).fua(true)).unwrap();
        let (tx, rx) = mpsc::channel();
        disk.submit_write(0, vec![3u8; 4096], Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().unwrap();
        disk.write_zeroes(4096, 4096).unwrap();
        disk.trim(8192, 4096).unwrap();
        for command in [
            proto::cmd::WRITE,
            proto::cmd::WRITE_ZEROES,
            proto::cmd::TRIM,
        ] {
            let requests = logged(&log, command);
            assert!(
                !requests.is_empty() && requests.iter().all(|r| r.0 & proto::cflag::FUA != 0),
                "{command}: {requests:?}"
            );
        }
    }

    #[test]
    fn fast_zero_only_when_the_server_says_it_is_fast() {
        let data = vec![9u8; 1 << 20];
        for (flags, slow, expect_zeroed, expect_requests) in [
            (tflag::SEND_FAST_ZERO, false, true, 1),
            (tflag::SEND_FAST_ZERO, true, false, 1),
            (0, false, false, 0),
        ] {
            let config = super::test_server::Config {
                extended: true,
                flags,
                slow_zero: slow,
                ..Default::default()
            };
            let (_dir, address, log) = configured_server(data.clone(), config);
            let disk = NbdDisk::connect(&NbdOptions::new(address)).unwrap();
            assert_eq!(disk.fast_zero(0, 1 << 20).unwrap(), expect_zeroed);
            let requests = logged(&log, proto::cmd::WRITE_ZEROES);
            assert_eq!(requests.len(), expect_requests, "{requests:?}");
            assert!(requests.iter().all(|r| r.0 & proto::cflag::FAST_ZERO != 0));
            let mut back = vec![0u8; 4096];
            disk.read_at(&mut back, 0).unwrap();
            assert_eq!(back.iter().all(|&b| b == 0), expect_zeroed);
        }
    }

    proptest! {
        #[test]
        fn any_server_bytes_end_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = replay_handshake(&bytes, "", None);
            let mut script = server_script();
            script.truncate(18);
            script.extend_from_slice(&bytes);
            let _ = replay_handshake(&script, "", Some("b"));
        }

        #[test]
        fn mutated_scripts_end_cleanly(pos in 0usize..400, byte in any::<u8>()) {
            let mut s = server_script();
            let pos = pos % s.len();
            s[pos] = byte;
            let _ = replay_handshake(&s, "disk", None);
        }
    }
}
