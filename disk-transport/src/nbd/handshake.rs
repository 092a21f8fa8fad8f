//! Fixed-newstyle negotiation as a sans-I/O state machine, and the loop that drives it over a
//! stream with an overall deadline.
//!
//! The machine says how many bytes it wants next ([`Handshake::wanted`]), takes exactly those
//! ([`Handshake::feed`]) and queues what to send ([`Handshake::take_output`]). It never trusts the
//! server: every reply length is checked against what its type may carry before a byte of the
//! payload is read, each option accepts only so many replies, and the driver bounds the whole
//! exchange by one deadline, so an endless stream of `NBD_REP_INFO` or a server dribbling one
//! byte at a time ends in a clear error.
//!
//! Order, as libnbd does it and the protocol asks: `STARTTLS` first when TLS is wanted (and
//! nothing negotiated before it is trusted after it), then `EXTENDED_HEADERS`, else
//! `STRUCTURED_REPLY`, then `SET_META_CONTEXT`, then `GO` (falling back to `EXPORT_NAME` on
//! servers from before `GO`).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::proto::{self, info, opt, rep, InfoReply};
use crate::{Error, Result};

/// Most replies accepted to one `NBD_OPT_GO` (qemu-nbd and nbdkit send two to four
/// `NBD_REP_INFO`).
pub(crate) const MAX_INFO_REPLIES: u32 = 32;
/// Most exports accepted from `NBD_OPT_LIST`.
pub(crate) const MAX_LIST_REPLIES: u32 = 65_536;
/// Most bytes accepted during a whole negotiation, replies to `NBD_OPT_LIST` included.
pub(crate) const MAX_HANDSHAKE_BYTES: u64 = 16 << 20;
/// Longest string the protocol allows (names, descriptions, messages).
const MAX_STRING: u32 = 4096;

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// What the server sent in `NBD_INFO_BLOCK_SIZE`, if it did (else defaults are in use).
    pub advertised_block: Option<(u32, u32, u32)>,
    pub structured: bool,
    pub extended: bool,
    pub tls: bool,
    pub base_allocation: Option<u32>,
    pub dirty_bitmap: Option<u32>,
    /// Names of the metadata contexts the server selected.
    pub contexts: Vec<String>,
    /// Whether the export was selected with the legacy `NBD_OPT_EXPORT_NAME`.
    pub export_name_fallback: bool,
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HandshakeRequest {
    pub export: String,
    pub structured: bool,
    pub extended: bool,
    pub extents: bool,
    pub dirty_bitmap: Option<String>,
    pub tls: bool,
    /// List the exports (`NBD_OPT_LIST`) instead of selecting one.
    pub list: bool,
}

impl HandshakeRequest {
    /// A request for `export` with the client's defaults (structured replies, extended headers,
    /// `base:allocation`).
    pub fn new(export: &str) -> Self {
        HandshakeRequest {
            export: export.to_owned(),
            structured: true,
            extended: true,
            extents: true,
            dirty_bitmap: None,
            tls: false,
            list: false,
        }
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Send the output, then read [`Handshake::wanted`] bytes and feed them.
    Continue,
    /// The server accepted `NBD_OPT_STARTTLS`: do the TLS handshake on the socket now, then
    /// call [`Handshake::tls_established`].
    StartTls,
    /// The export is selected; the transmission phase starts after the output is sent.
    Done(Negotiated),
    /// The exports the server listed (after the output, an `NBD_OPT_ABORT`, is sent).
    Listed(Vec<(String, String)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    ReplyHeader(u32),
    ReplyPayload(u32, u32, u32),
    /// Waiting for the caller's TLS handshake.
    Tls,
    /// The 10 bytes (size, flags) after `NBD_OPT_EXPORT_NAME`, then maybe 124 zeroes.
    ExportName,
    ExportNameZeroes,
    Finished,
}

/// The client side of the handshake; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Handshake {
    req: HandshakeRequest,
    dirty_name: Option<String>,
    state: State,
    out: Vec<u8>,
    no_zeroes: bool,
    tls: bool,
    structured: bool,
    extended: bool,
    base_allocation: Option<u32>,
    dirty_bitmap: Option<u32>,
    contexts: Vec<String>,
    export: Option<(u64, u16)>,
    block: Option<(u32, u32, u32)>,
    listed: Vec<(String, String)>,
    /// Replies to the option in progress.
    replies: u32,
    /// Bytes received so far.
    received: u64,
    /// Size and flags from `EXPORT_NAME`.
    legacy: Option<(u64, u16)>,
    /// Bytes received when the TLS session came up.
    received_at_tls: Option<u64>,
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// The server requires TLS and the client did not ask for it.
fn tls_required() -> Error {
    Error::Handshake(
        "the server requires TLS: use nbds:// (or nbds+unix://) with tls-certificates= or \
         tls-psk-file="
            .into(),
    )
}

fn option_error(option: u32, reply: u32, payload: &[u8]) -> String {
    let message = String::from_utf8_lossy(payload);
    let message = message.trim();
    let name = proto::option_name(option);
    if message.is_empty() {
        format!("{name}: {}", proto::option_error_text(reply))
    } else {
        format!("{name}: {} ({message})", proto::option_error_text(reply))
    }
}

/// Largest payload a reply of this type may carry to this option.
fn max_payload(option: u32, reply: u32) -> u32 {
    match reply {
        rep::ACK => 0,
        rep::INFO if matches!(option, opt::GO | opt::INFO) => 2 + MAX_STRING,
        rep::META_CONTEXT if option == opt::SET_META_CONTEXT => 4 + MAX_STRING,
        rep::SERVER if option == opt::LIST => 4 + 2 * MAX_STRING,
        r if r & rep::ERR_BIT != 0 => MAX_STRING,
        // A reply type this option cannot get: refused once its header is seen.
        _ => 0,
    }
}

impl Handshake {
    /// A handshake that has not started; the server speaks first.
    pub fn new(req: HandshakeRequest) -> Self {
        let dirty_name = req
            .dirty_bitmap
            .as_ref()
            .map(|b| format!("qemu:dirty-bitmap:{b}"));
        Handshake {
            req,
            dirty_name,
            state: State::Greeting,
            out: Vec::new(),
            no_zeroes: false,
            tls: false,
            structured: false,
            extended: false,
            base_allocation: None,
            dirty_bitmap: None,
            contexts: Vec::new(),
            export: None,
            block: None,
            listed: Vec::new(),
            replies: 0,
            received: 0,
            legacy: None,
            received_at_tls: None,
        }
    }

    /// Whether the TLS session is up but the server has not answered anything inside it yet:
    /// a server that then hangs up refused the client after the TLS handshake (TLS 1.3 servers
    /// check client certificates only then).
    pub fn nothing_since_tls(&self) -> bool {
        self.received_at_tls == Some(self.received)
    }

    /// Whether the server has sent nothing at all, not even its greeting: a connection
    /// accepted into a listen backlog by a server already at its client limit.
    pub fn nothing_received(&self) -> bool {
        self.received == 0
    }

    /// Bytes to send now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// How many bytes [`feed`](Self::feed) takes next (0 when waiting for TLS or finished).
    pub fn wanted(&self) -> usize {
        match self.state {
            State::Greeting => 18,
            State::ReplyHeader(_) => 20,
            State::ReplyPayload(_, _, len) => len as usize,
            State::ExportName => 10,
            State::ExportNameZeroes => 124,
            State::Tls | State::Finished => 0,
        }
    }

    /// After [`Event::StartTls`]: the TLS session is up; negotiation starts over inside it.
    pub fn tls_established(&mut self) -> Event {
        debug_assert_eq!(self.state, State::Tls);
        self.tls = true;
        self.received_at_tls = Some(self.received);
        self.first_option()
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        self.out
            .extend_from_slice(&proto::encode_option(option, data));
        self.replies = 0;
        self.state = State::ReplyHeader(option);
    }

    /// The first option after the greeting (or after TLS is up).
    fn first_option(&mut self) -> Event {
        if self.req.tls && !self.tls {
            self.send_option(opt::STARTTLS, &[]);
        } else if self.req.list {
            self.send_option(opt::LIST, &[]);
        } else if self.req.structured && self.req.extended {
            self.send_option(opt::EXTENDED_HEADERS, &[]);
        } else {
            self.after_extended();
        }
        Event::Continue
    }

    fn after_extended(&mut self) {
        if self.req.structured && !self.extended {
            self.send_option(opt::STRUCTURED_REPLY, &[]);
        } else {
            self.after_structured();
        }
    }

    fn after_structured(&mut self) {
        let mut queries = Vec::new();
        if self.req.extents {
            queries.push("base:allocation");
        }
        if let Some(name) = &self.dirty_name {
            queries.push(name.as_str());
        }
        if self.structured && !queries.is_empty() {
            let data = proto::encode_meta_context(&self.req.export, &queries);
            self.send_option(opt::SET_META_CONTEXT, &data);
        } else {
            self.after_meta_context();
        }
    }

    fn after_meta_context(&mut self) {
        let data = proto::encode_go(&self.req.export, &[info::BLOCK_SIZE]);
        self.send_option(opt::GO, &data);
    }

    fn queries(&self) -> u32 {
        u32::from(self.req.extents) + u32::from(self.dirty_name.is_some())
    }

    /// Takes exactly [`wanted`](Self::wanted) bytes from the server.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Event> {
        if bytes.len() != self.wanted() {
            return Err(protocol(format!(
                "handshake fed {} bytes where {} were due",
                bytes.len(),
                self.wanted()
            )));
        }
        self.received += bytes.len() as u64;
        if self.received > MAX_HANDSHAKE_BYTES {
            return Err(protocol(format!(
                "the server sent more than {MAX_HANDSHAKE_BYTES} bytes during the handshake"
            )));
        }
        match self.state {
            State::Greeting => {
                let mut g = [0u8; 18];
                g.copy_from_slice(bytes);
                let greeting = proto::parse_greeting(&g)?;
                self.no_zeroes = greeting.flags & proto::FLAG_NO_ZEROES != 0;
                let client_flags = u32::from(proto::FLAG_FIXED_NEWSTYLE)
                    | if self.no_zeroes {
                        u32::from(proto::FLAG_NO_ZEROES)
                    } else {
                        0
                    };
                self.out.extend_from_slice(&client_flags.to_be_bytes());
                Ok(self.first_option())
            }
            State::ReplyHeader(option) => {
                let mut h = [0u8; 20];
                h.copy_from_slice(bytes);
                let header = proto::parse_option_reply_header(&h, option)?;
                self.replies += 1;
                let cap = match option {
                    opt::GO | opt::INFO => MAX_INFO_REPLIES,
                    opt::SET_META_CONTEXT => self.queries() + 1,
                    opt::LIST => MAX_LIST_REPLIES,
                    _ => 1,
                };
                if self.replies > cap {
                    return Err(protocol(format!(
                        "the server sent more than {cap} replies to {}",
                        proto::option_name(option)
                    )));
                }
                let max = max_payload(option, header.reply);
                if header.length > max {
                    return Err(protocol(format!(
                        "reply type {} of {} bytes to {} (at most {max} allowed)",
                        proto::reply_name(header.reply),
                        header.length,
                        proto::option_name(option)
                    )));
                }
                if header.length == 0 {
                    return self.reply(option, header.reply, &[]);
                }
                self.state = State::ReplyPayload(option, header.reply, header.length);
                Ok(Event::Continue)
            }
            State::ReplyPayload(option, reply, _) => self.reply(option, reply, bytes),
            State::ExportName => {
                let mut size = [0u8; 8];
                size.copy_from_slice(&bytes[..8]);
                self.legacy = Some((
                    u64::from_be_bytes(size),
                    u16::from_be_bytes([bytes[8], bytes[9]]),
                ));
                if self.no_zeroes {
                    self.finish_legacy()
                } else {
                    self.state = State::ExportNameZeroes;
                    Ok(Event::Continue)
                }
            }
            State::ExportNameZeroes => self.finish_legacy(),
            State::Tls | State::Finished => Err(protocol("handshake fed after it ended")),
        }
    }

    fn finish_legacy(&mut self) -> Result<Event> {
        self.state = State::Finished;
        let (size, flags) = self.legacy.unwrap_or_default();
        Ok(Event::Done(Negotiated {
            size,
            flags,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
            advertised_block: None,
            structured: self.structured,
            extended: false,
            tls: self.tls,
            base_allocation: None,
            dirty_bitmap: None,
            contexts: Vec::new(),
            export_name_fallback: true,
        }))
    }

    /// One complete option reply.
    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) -> Result<Event> {
        self.state = State::ReplyHeader(option);
        if reply == rep::ERR_TLS_REQD && !self.tls {
            return Err(tls_required());
        }
        match option {
            opt::STARTTLS => match reply {
                rep::ACK => {
                    self.state = State::Tls;
                    Ok(Event::StartTls)
                }
                r if r & rep::ERR_BIT != 0 => Err(Error::Handshake(format!(
                    "the server does not offer TLS ({}); not continuing without it",
                    option_error(option, r, payload)
                ))),
                other => Err(self.unexpected(option, other)),
            },
            opt::EXTENDED_HEADERS => {
                match reply {
                    rep::ACK => {
                        self.extended = true;
                        self.structured = true;
                    }
                    r if r & rep::ERR_BIT != 0 => {}
                    other => return Err(self.unexpected(option, other)),
                }
                self.after_extended();
                Ok(Event::Continue)
            }
            opt::STRUCTURED_REPLY => {
                match reply {
                    rep::ACK => self.structured = true,
                    rep::ERR_EXT_HEADER_REQD => {
                        return Err(Error::Handshake(
                            "the server requires extended headers, which it refused to \
                             negotiate"
                                .into(),
                        ))
                    }
                    r if r & rep::ERR_BIT != 0 => {}
                    other => return Err(self.unexpected(option, other)),
                }
                self.after_structured();
                Ok(Event::Continue)
            }
            opt::SET_META_CONTEXT => match reply {
                rep::META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(payload)?;
                    if self.contexts.contains(&name) {
                        return Err(protocol(format!(
                            "the server selected metadata context {name:?} twice"
                        )));
                    }
                    if name == "base:allocation" && self.req.extents {
                        self.base_allocation = Some(id);
                    } else if Some(&name) == self.dirty_name.as_ref() {
                        self.dirty_bitmap = Some(id);
                    } else {
                        return Err(protocol(format!(
                            "the server selected metadata context {name:?}, which was not asked \
                             for"
                        )));
                    }
                    self.contexts.push(name);
                    Ok(Event::Continue)
                }
                rep::ACK => {
                    self.check_dirty_bitmap()?;
                    self.after_meta_context();
                    Ok(Event::Continue)
                }
                r if r & rep::ERR_BIT != 0 => {
                    // No block status then; the export still works.
                    self.base_allocation = None;
                    self.dirty_bitmap = None;
                    self.contexts.clear();
                    self.check_dirty_bitmap()?;
                    self.after_meta_context();
                    Ok(Event::Continue)
                }
                other => Err(self.unexpected(option, other)),
            },
            opt::GO => match reply {
                rep::INFO => {
                    match proto::parse_info(payload)? {
                        InfoReply::Export { size, flags } => self.export = Some((size, flags)),
                        InfoReply::BlockSize {
                            minimum,
                            preferred,
                            maximum,
                        } => self.block = Some((minimum, preferred, maximum)),
                        InfoReply::Text(..) | InfoReply::Unknown(_) => {}
                    }
                    Ok(Event::Continue)
                }
                rep::ACK => self.finish_go(),
                rep::ERR_UNSUP if !self.extended => {
                    // A server from before NBD_OPT_GO: the legacy way, which cannot fail
                    // politely (the server just hangs up on an unknown export).
                    self.out.extend_from_slice(&proto::encode_option(
                        opt::EXPORT_NAME,
                        self.req.export.as_bytes(),
                    ));
                    self.state = State::ExportName;
                    Ok(Event::Continue)
                }
                rep::ERR_UNKNOWN => Err(Error::NotFound(format!(
                    "NBD export {:?}: {}",
                    self.req.export,
                    option_error(option, reply, payload)
                ))),
                r if r & rep::ERR_BIT != 0 => {
                    Err(Error::Handshake(option_error(option, r, payload)))
                }
                other => Err(self.unexpected(option, other)),
            },
            opt::LIST => match reply {
                rep::SERVER => {
                    self.listed.push(proto::parse_server_reply(payload)?);
                    Ok(Event::Continue)
                }
                rep::ACK => {
                    // The server may close without acknowledging the abort; either is fine.
                    self.out
                        .extend_from_slice(&proto::encode_option(opt::ABORT, &[]));
                    self.state = State::Finished;
                    Ok(Event::Listed(std::mem::take(&mut self.listed)))
                }
                r if r & rep::ERR_BIT != 0 => {
                    Err(Error::Handshake(option_error(option, r, payload)))
                }
                other => Err(self.unexpected(option, other)),
            },
            other => Err(protocol(format!(
                "reply to option {other}, which this client never sends"
            ))),
        }
    }

    fn unexpected(&self, option: u32, reply: u32) -> Error {
        protocol(format!(
            "unexpected reply {} to {}",
            proto::reply_name(reply),
            proto::option_name(option)
        ))
    }

    fn check_dirty_bitmap(&self) -> Result<()> {
        match (&self.dirty_name, self.dirty_bitmap) {
            (Some(name), None) => Err(Error::Handshake(format!(
                "the server does not offer {name}; export the bitmap (qemu-nbd -B NAME)"
            ))),
            _ => Ok(()),
        }
    }

    fn finish_go(&mut self) -> Result<Event> {
        let (size, flags) = self
            .export
            .ok_or_else(|| protocol("the server accepted NBD_OPT_GO without NBD_INFO_EXPORT"))?;
        if size > i64::MAX as u64 {
            return Err(protocol(format!(
                "export size {size} is larger than any disk can be"
            )));
        }
        self.state = State::Finished;
        let (min_block, preferred_block, max_payload) = self.block.unwrap_or((1, 4096, 32 << 20));
        Ok(Event::Done(Negotiated {
            size,
            flags,
            min_block,
            preferred_block,
            max_payload: max_payload.min(32 << 20).max(min_block),
            advertised_block: self.block,
            structured: self.structured,
            extended: self.extended,
            tls: self.tls,
            base_allocation: self.base_allocation,
            dirty_bitmap: self.dirty_bitmap,
            contexts: self.contexts.clone(),
            export_name_fallback: false,
        }))
    }
}

/// A stream the handshake can bound: each read and write waits at most the given time.
pub(crate) trait Timed: Read + Write {
    /// Sets how long the next reads and writes may wait.
    fn set_wait(&mut self, wait: Duration) -> std::io::Result<()>;
}

/// The overall limit on a handshake, and what to call it in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub total: Duration,
}

impl Deadline {
    /// A deadline `total` from now.
    pub fn after(total: Duration) -> Self {
        Deadline {
            at: Instant::now() + total,
            total,
        }
    }

    /// Time left, or the timeout error.
    pub fn left(&self) -> Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.expired())
        } else {
            Ok(left)
        }
    }

    /// The error of an expired deadline.
    pub fn expired(&self) -> Error {
        Error::Timeout {
            what: "NBD handshake".into(),
            offset: None,
            after: self.total,
        }
    }
}

fn io_err(deadline: &Deadline, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => deadline.expired(),
        std::io::ErrorKind::UnexpectedEof => Error::Handshake(
            "the server closed the connection during negotiation (export limit reached, a \
             refused TLS handshake, or an unknown export?)"
                .into(),
        ),
        _ => Error::io("NBD handshake", None, e),
    }
}

/// Reads or writes with every call bounded by the deadline.
fn bounded<S: Timed, T>(
    s: &mut S,
    deadline: &Deadline,
    mut op: impl FnMut(&mut S) -> std::io::Result<T>,
) -> Result<T> {
    loop {
        let left = deadline.left()?;
        s.set_wait(left)
            .map_err(|e| Error::io("set NBD socket timeouts", None, e))?;
        match op(s) {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(deadline, e)),
        }
    }
}

fn write_all_bounded<S: Timed>(s: &mut S, deadline: &Deadline, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        let n = bounded(s, deadline, |s| s.write(data))?;
        if n == 0 {
            return Err(io_err(deadline, std::io::ErrorKind::WriteZero.into()));
        }
        data = &data[n..];
    }
    bounded(s, deadline, |s| s.flush())
}

fn read_exact_bounded<S: Timed>(s: &mut S, deadline: &Deadline, buf: &mut [u8]) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        let n = bounded(s, deadline, |s| s.read(&mut buf[pos..]))?;
        if n == 0 {
            return Err(io_err(deadline, std::io::ErrorKind::UnexpectedEof.into()));
        }
        pos += n;
    }
    Ok(())
}

/// Runs the machine on `s` until it finishes or needs TLS; sends what it queued last.
pub(crate) fn drive<S: Timed>(hs: &mut Handshake, s: &mut S, deadline: &Deadline) -> Result<Event> {
    let mut buf = Vec::new();
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            write_all_bounded(s, deadline, &out)?;
        }
        let wanted = hs.wanted();
        if wanted == 0 {
            // Only StartTls or the end lead here, and they were returned already.
            return Err(protocol("handshake stalled"));
        }
        buf.resize(wanted, 0);
        read_exact_bounded(s, deadline, &mut buf)?;
        match hs.feed(&buf)? {
            Event::Continue => {}
            done => {
                let out = hs.take_output();
                if !out.is_empty() {
                    // The final NBD_OPT_ABORT after a list may meet a closed socket.
                    let sent = write_all_bounded(s, deadline, &out);
                    if !matches!(done, Event::Listed(_)) {
                        sent?;
                    }
                }
                return Ok(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::{tflag, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC};

    pub(crate) fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn greeting() -> Vec<u8> {
        let mut s = NBDMAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        s
    }

    fn export_info() -> Vec<u8> {
        let mut export = 0u16.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&(tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
        export
    }

    /// Feeds `server` to a machine in the chunks it asks for; StartTls is taken as done.
    fn run(req: HandshakeRequest, server: &[u8]) -> (Result<Event>, Vec<u8>) {
        let mut hs = Handshake::new(req);
        let mut sent = Vec::new();
        let mut at = 0;
        loop {
            sent.extend(hs.take_output());
            let n = hs.wanted();
            if at + n > server.len() {
                return (Err(protocol("out of bytes")), sent);
            }
            match hs.feed(&server[at..at + n]) {
                Ok(Event::Continue) => {}
                Ok(Event::StartTls) => {
                    assert_eq!(hs.tls_established(), Event::Continue);
                }
                other => {
                    sent.extend(hs.take_output());
                    return (other, sent);
                }
            }
            at += n;
        }
    }

    #[test]
    fn endless_info_replies_are_cut_off() {
        let mut s = greeting();
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        for _ in 0..1000 {
            s.extend(option_reply(opt::GO, rep::INFO, &export_info()));
        }
        let (r, _) = run(HandshakeRequest::new("disk"), &s);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("more than 32 replies to NBD_OPT_GO"), "{e}");
        assert_eq!(e.matches("protocol error").count(), 1, "{e}");
    }

    #[test]
    fn oversized_replies_are_refused_before_reading_them() {
        let mut s = greeting();
        let mut h = option_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]);
        h[16..20].copy_from_slice(&8000u32.to_be_bytes());
        s.extend(h);
        let (r, _) = run(HandshakeRequest::new("disk"), &s);
        assert!(r.unwrap_err().to_string().contains("at most 4096"));
        // An ACK carries nothing.
        let mut s = greeting();
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ACK, b"x"));
        assert!(run(HandshakeRequest::new("disk"), &s).0.is_err());
    }

    #[test]
    fn starttls_comes_first_and_everything_is_renegotiated_after_it() {
        let mut s = greeting();
        s.extend(option_reply(opt::STARTTLS, rep::ACK, &[]));
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ACK, &[]));
        let mut ctx = 1u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx));
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(option_reply(opt::GO, rep::INFO, &export_info()));
        s.extend(option_reply(opt::GO, rep::ACK, &[]));
        let req = HandshakeRequest {
            tls: true,
            ..HandshakeRequest::new("disk")
        };
        let (r, sent) = run(req, &s);
        let Ok(Event::Done(n)) = r else {
            panic!("{r:?}")
        };
        assert!(n.tls && n.extended && n.structured);
        assert_eq!(n.base_allocation, Some(1));
        assert_eq!(n.contexts, vec!["base:allocation".to_owned()]);
        // Client flags, then STARTTLS (option 5) before anything else.
        assert_eq!(&sent[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&sent[12..16], &opt::STARTTLS.to_be_bytes());
        assert_eq!(&sent[28..32], &opt::EXTENDED_HEADERS.to_be_bytes());
    }

    #[test]
    fn tls_refusals_are_explained_and_never_fall_back() {
        let mut s = greeting();
        s.extend(option_reply(opt::STARTTLS, rep::ERR_POLICY, &[]));
        let req = HandshakeRequest {
            tls: true,
            ..HandshakeRequest::new("")
        };
        let e = run(req, &s).0.unwrap_err().to_string();
        assert!(e.contains("does not offer TLS"), "{e}");
        let mut s = greeting();
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ERR_TLS_REQD, &[]));
        let e = run(HandshakeRequest::new(""), &s)
            .0
            .unwrap_err()
            .to_string();
        assert!(e.contains("the server requires TLS: use nbds://"), "{e}");
    }

    #[test]
    fn contexts_not_asked_for_or_repeated_are_refused() {
        let mut s = greeting();
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ACK, &[]));
        let mut ctx = 1u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"qemu:allocation-depth");
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx));
        let e = run(HandshakeRequest::new(""), &s)
            .0
            .unwrap_err()
            .to_string();
        assert!(e.contains("not asked for"), "{e}");
    }

    #[test]
    fn export_name_fallback_for_servers_before_go() {
        let mut s = greeting();
        s.extend(option_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
        s.extend(option_reply(opt::GO, rep::ERR_UNSUP, &[]));
        s.extend_from_slice(&(1u64 << 20).to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        let (r, sent) = run(HandshakeRequest::new("x"), &s);
        let Ok(Event::Done(n)) = r else {
            panic!("{r:?}")
        };
        assert!(n.export_name_fallback && !n.structured);
        assert_eq!(n.size, 1 << 20);
        assert!(sent.ends_with(b"x"));
    }
}
