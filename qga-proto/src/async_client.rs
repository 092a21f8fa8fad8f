//! The async client (feature `tokio`): one agent connection shared by many callers, with
//! requests pipelined.
//!
//! A driver task owns the connection. Callers hand it their command and wait for their own
//! reply. The driver numbers every request (`"id"`, echoed by qemu-ga since 3.0), writes up to
//! [`ClientConfig::max_in_flight`] of them without waiting, and matches each reply to its
//! caller by id. The agent answers strictly in order, so a reply with a later id also tells
//! that every earlier request lost its reply (replaced by a garbled line or an oversized
//! one): those callers get that error, never someone else's reply.
//!
//! After a timed-out call or a garbled line the driver re-synchronises: `0xFF` and
//! `guest-sync-delimited` go after the requests already in flight, whose replies are still
//! delivered; callers whose reply did not come before the agent's sync reply get a clear
//! error. New requests wait until the channel is in sync again.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::address::Address;
use crate::agent::GuestAgent;
use crate::cmd::{self, Command};
use crate::error::{connect_failed, Error, Result};
use crate::session::{random_id, Caps, ClientConfig, Session};
use crate::transport::AsyncCharDevice;
use crate::types::GuestAgentInfo;
use crate::wire::{self, Frame, Reply};

/// A byte stream the async client can run on.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A type-erased stream, for clients whose channel is chosen at run time.
pub type BoxedStream = Box<dyn AsyncStream>;

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;
type Connector<S> = Box<dyn Fn() -> ConnectFuture<S> + Send + Sync>;

const READ_CHUNK: usize = 64 * 1024;

/// How a QEMU 2.x agent refuses a request `id`.
const ID_REFUSED: &str = "QMP input object member 'id' is unexpected";

/// Async guest agent client over any tokio byte stream.
///
/// Share it between tasks (`Arc<AsyncClient<_>>`, or the `Arc<dyn GuestAgent>` the facade hands
/// out): calls from many tasks go out on the one connection without waiting for each other,
/// up to [`ClientConfig::max_in_flight`] at a time, and each caller gets its own reply. Every
/// call is bounded by its timeout ([`ClientConfig::timeout`] or the one given to
/// [`execute`](Self::execute)). Before the first command, after a reconnect, and after any
/// timeout or garbled reply, the client re-synchronises with `0xFF` + `guest-sync-delimited`
/// and a random id, so stale data from earlier clients or calls never reaches a caller.
///
/// The connection is served by a task spawned on the tokio runtime of the first call.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qga_proto::Error> {
/// use qga_proto::{cmd, GuestAgent, GuestAgentExt};
///
/// let client = qga_proto::fake::FakeAgent::linux().connect_async();
/// // Three commands in flight at once on one connection.
/// let (host, os, time) = tokio::join!(client.host_name(), client.osinfo(), client.time());
/// assert_eq!(host?, client.call::<cmd::GuestGetHostName>(&()).await?);
/// assert!(os?.pretty_name.is_some() && time? > 0);
/// # Ok(()) }
/// ```
pub struct AsyncClient<S: AsyncStream + 'static> {
    config: std::sync::Mutex<ClientConfig>,
    requests: mpsc::UnboundedSender<Request>,
    /// The driver until the first call spawns it.
    unstarted: std::sync::Mutex<Option<Driver<S>>>,
}

impl<S: AsyncStream + 'static> std::fmt::Debug for AsyncClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient")
            .field("config", &*lock(&self.config))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a caller asks of the driver.
enum Request {
    Call(Call),
    Capabilities(oneshot::Sender<Result<Option<GuestAgentInfo>>>),
    Resync(oneshot::Sender<Result<()>>),
    Configure(ClientConfig),
    Close(oneshot::Sender<()>),
}

struct Call {
    name: String,
    args: Option<Value>,
    timeout: Duration,
    deadline: Instant,
    reply: oneshot::Sender<Result<Value>>,
}

impl<S: AsyncStream + 'static> AsyncClient<S> {
    /// A client on an already connected stream, with default settings.
    pub fn new(stream: S) -> Self {
        Self::with_config(stream, ClientConfig::default())
    }

    /// A client on an already connected stream.
    pub fn with_config(stream: S, config: ClientConfig) -> Self {
        let (requests, inbox) = mpsc::unbounded_channel();
        AsyncClient {
            config: std::sync::Mutex::new(config.clone()),
            requests,
            unstarted: std::sync::Mutex::new(Some(Driver::new(inbox, Some(stream), config))),
        }
    }

    /// Lets the client reconnect with `connect` when the channel closes (for
    /// example when `qemu-ga` restarts behind a `unix-listen` socket).
    pub fn with_reconnect<F, Fut>(self, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
    {
        let mut this = self;
        if let Some(driver) = this
            .unstarted
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            driver.connector = Some(Box::new(move || Box::pin(connect())));
        }
        this
    }

    /// The settings in force.
    pub async fn config(&self) -> ClientConfig {
        lock(&self.config).clone()
    }

    /// Changes the settings; takes effect with the next call.
    pub async fn set_config(&self, config: ClientConfig) {
        *lock(&self.config) = config.clone();
        let _ = self.send(Request::Configure(config));
    }

    /// Closes the channel. If a call was left unfinished (timeout, cancelled call, silent
    /// command), replies still in flight are read first for up to
    /// [`DRAIN_TIME`](crate::DRAIN_TIME): qemu-ga 7.2 exits when a client closes a Unix socket
    /// with replies unread. Dropping the client does the same in the background.
    pub async fn close(self) {
        if lock(&self.unstarted).is_some() {
            return;
        }
        let (ack, done) = oneshot::channel();
        if self.requests.send(Request::Close(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// Forces a re-synchronisation now.
    pub async fn resync(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Resync(reply))?;
        answer
            .await
            .unwrap_or(Err(Error::Disconnected { command: None }))
    }

    /// `guest-info` as cached by the capability check (fetched if needed), or
    /// `None` when the agent refused `guest-info`.
    pub async fn capabilities(&self) -> Result<Option<GuestAgentInfo>> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Capabilities(reply))?;
        answer
            .await
            .unwrap_or(Err(Error::Disconnected { command: None }))
    }

    /// Sends `name` with `args`, waiting at most `timeout` (or the configured
    /// timeout) for the reply. Calls from several tasks are in flight together.
    pub async fn execute(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let (timeout, slack) = {
            let config = lock(&self.config);
            let handshake = config
                .sync_timeout
                .saturating_mul(config.sync_attempts.max(1));
            (
                timeout.unwrap_or(config.timeout),
                config.no_reply_grace + handshake,
            )
        };
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Call(Call {
            name: name.to_owned(),
            args,
            timeout,
            deadline,
            reply,
        }))?;
        // The driver answers by the deadline (or the end of a handshake the call waits for);
        // this bound only guards against a driver that can no longer run (its runtime shut
        // down).
        let bound = deadline + slack + Duration::from_secs(1);
        match timeout_at(bound, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Disconnected {
                command: Some(name.to_owned()),
            }),
            Err(_) => Err(Error::Timeout {
                command: name.to_owned(),
                timeout,
            }),
        }
    }

    /// Typed call of command `C`.
    pub async fn call<C: Command>(&self, args: &C::Args) -> Result<C::Returns> {
        crate::agent::call::<C, _>(self, args).await
    }

    /// Hands `request` to the driver, spawning it on first use.
    fn send(&self, request: Request) -> Result<()> {
        if let Some(driver) = lock(&self.unstarted).take() {
            tokio::spawn(driver.run());
        }
        self.requests
            .send(request)
            .map_err(|_| Error::Disconnected { command: None })
    }
}

#[async_trait]
impl<S: AsyncStream + 'static> GuestAgent for AsyncClient<S> {
    async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
        self.execute(name, args, None).await
    }
}

// ---------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------

/// Work waiting to be written.
enum Job {
    Call(Call),
    Capabilities(oneshot::Sender<Result<Option<GuestAgentInfo>>>),
    /// `started` once the sync it asked for has been sent.
    Resync {
        reply: oneshot::Sender<Result<()>>,
        started: bool,
    },
}

impl Job {
    /// Answers the job with an error.
    fn fail(self, error: Error) {
        match self {
            Job::Call(call) => {
                let _ = call.reply.send(Err(error));
            }
            Job::Capabilities(reply) => {
                let _ = reply.send(Err(error));
            }
            Job::Resync { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// Who waits for a written request's reply.
enum Waiter {
    /// A caller; `None` once it has been answered (timed out): a late reply is dropped.
    Caller(Option<oneshot::Sender<Result<Value>>>),
    /// The capability cache (`guest-info`).
    Caps,
}

/// A request on the wire.
struct Pending {
    /// The request id, or `None` for agents that refuse ids.
    id: Option<u64>,
    command: String,
    waiter: Waiter,
    /// Sends nothing back on success (shutdown, suspend).
    silent: bool,
    deadline: Instant,
    timeout: Duration,
    /// The arguments, kept while it is not yet known whether the agent takes ids.
    resend: Option<Option<Value>>,
}

impl Pending {
    fn live(&self) -> bool {
        match &self.waiter {
            Waiter::Caller(reply) => reply.is_some(),
            Waiter::Caps => true,
        }
    }
}

/// Whether the agent echoes request ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ids {
    /// Not known yet: one request at a time until a reply tells.
    Probing,
    /// Replies carry the request's id: requests are pipelined.
    Echoed,
    /// The agent refuses or drops ids (QEMU 2.x): one request at a time, matched in order.
    Refused,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Nothing known about the channel: synchronise before the next request.
    Unsynced,
    /// Our `guest-sync-delimited` is on the way.
    Syncing {
        id: i64,
        deadline: Instant,
        after_delimiter: bool,
        attempts_left: u32,
    },
    /// In sync: requests may go out.
    Ready,
}

/// A line that was not a well-formed reply; handed to the caller whose reply it replaced.
#[derive(Debug, Clone)]
enum Garble {
    Invalid { excerpt: String, reason: String },
    Oversized { limit: usize },
}

struct Connection<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
}

struct Driver<S: AsyncStream + 'static> {
    inbox: mpsc::UnboundedReceiver<Request>,
    inbox_open: bool,
    session: Session,
    connector: Option<Connector<S>>,
    connection: Option<Connection<S>>,
    /// Bytes to write, and how many of them are written.
    out: Vec<u8>,
    out_done: usize,
    flush: bool,
    phase: Phase,
    ids: Ids,
    id_base: u64,
    next_id: u64,
    queue: VecDeque<Job>,
    pending: VecDeque<Pending>,
    /// The next reply without an id follows a sentinel that is not ours (FIFO matching only).
    skip_next: bool,
    want_sync: bool,
    garbled: Option<Garble>,
    /// Set by a close request or a dropped client: drain, then stop.
    closing: Option<Instant>,
    close_acks: Vec<oneshot::Sender<()>>,
}

enum Event {
    Request(Option<Request>),
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Timer,
}

impl<S: AsyncStream + 'static> Driver<S> {
    fn new(
        inbox: mpsc::UnboundedReceiver<Request>,
        stream: Option<S>,
        config: ClientConfig,
    ) -> Self {
        let mut driver = Driver {
            inbox,
            inbox_open: true,
            session: Session::new(config),
            connector: None,
            connection: None,
            out: Vec::new(),
            out_done: 0,
            flush: false,
            phase: Phase::Unsynced,
            ids: Ids::Probing,
            id_base: 0,
            next_id: 0,
            queue: VecDeque::new(),
            pending: VecDeque::new(),
            skip_next: false,
            want_sync: false,
            garbled: None,
            closing: None,
            close_acks: Vec::new(),
        };
        if let Some(stream) = stream {
            driver.attach(stream);
        }
        driver
    }

    /// Starts afresh on a new connection.
    fn attach(&mut self, stream: S) {
        let (reader, writer) = tokio::io::split(stream);
        self.connection = Some(Connection { reader, writer });
        self.session.reset_connection();
        self.out.clear();
        self.out_done = 0;
        self.flush = false;
        self.phase = Phase::Unsynced;
        self.ids = Ids::Probing;
        // Ids no earlier client of this channel can have used: a stale reply never matches.
        self.id_base = (random_id() as u64) & ((1 << 52) - 1);
        self.next_id = 0;
        self.skip_next = false;
        self.want_sync = false;
        self.garbled = None;
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; READ_CHUNK];
        // One timer for the driver's life, moved when the next deadline moves.
        let mut timer = Box::pin(sleep_until(Instant::now()));
        let mut armed_for = None;
        loop {
            if let Some(until) = self.closing {
                if self.drained() || Instant::now() >= until {
                    break;
                }
            } else if self.connection.is_none() && !self.queue.is_empty() {
                self.reconnect().await;
                continue;
            }
            self.advance(Instant::now());
            let deadline = self.next_deadline();
            if armed_for != Some(deadline) {
                timer.as_mut().reset(deadline);
                armed_for = Some(deadline);
            }
            let event = self.next_event(&mut buf, timer.as_mut()).await;
            self.handle(event, &buf);
        }
        for ack in self.close_acks.drain(..) {
            let _ = ack.send(());
        }
    }

    /// Waits for the next thing to happen.
    async fn next_event(&mut self, buf: &mut [u8], timer: Pin<&mut tokio::time::Sleep>) -> Event {
        let Driver {
            inbox,
            inbox_open,
            connection,
            out,
            out_done,
            flush,
            ..
        } = self;
        let (reader, writer) = match connection.as_mut() {
            Some(c) => (Some(&mut c.reader), Some(&mut c.writer)),
            None => (None, None),
        };
        let reading = reader.is_some();
        let writing = writer.is_some() && (*out_done < out.len() || *flush);
        let read = async move {
            match reader {
                Some(r) => r.read(buf).await,
                None => std::future::pending().await,
            }
        };
        let pending_bytes = &out[*out_done..];
        let write = async move {
            match writer {
                Some(w) if !pending_bytes.is_empty() => Event::Wrote(w.write(pending_bytes).await),
                Some(w) => Event::Flushed(w.flush().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            request = inbox.recv(), if *inbox_open => Event::Request(request),
            event = write, if writing => event,
            read = read, if reading => Event::Read(read),
            () = timer => Event::Timer,
        }
    }

    fn handle(&mut self, event: Event, buf: &[u8]) {
        match event {
            Event::Request(Some(request)) => self.accept(request),
            Event::Request(None) => {
                // The client is gone: finish what is on the wire, then stop.
                self.inbox_open = false;
                self.begin_close();
            }
            Event::Read(Ok(0)) => self.disconnected(None),
            Event::Read(Ok(n)) => {
                self.session.decoder.push(&buf[..n]);
                while let Some(frame) = self.session.decoder.next_frame() {
                    self.on_frame(frame);
                }
            }
            Event::Read(Err(e)) | Event::Wrote(Err(e)) | Event::Flushed(Err(e)) => {
                self.disconnected(Some(e))
            }
            Event::Wrote(Ok(0)) => self.disconnected(None),
            Event::Wrote(Ok(n)) => {
                self.out_done += n;
                if self.out_done >= self.out.len() {
                    self.out.clear();
                    self.out_done = 0;
                    self.flush = true;
                }
            }
            Event::Flushed(Ok(())) => self.flush = false,
            Event::Timer => {}
        }
    }

    fn accept(&mut self, request: Request) {
        match request {
            Request::Call(call) => self.queue.push_back(Job::Call(call)),
            Request::Capabilities(reply) => self.queue.push_back(Job::Capabilities(reply)),
            Request::Resync(reply) => self.queue.push_back(Job::Resync {
                reply,
                started: false,
            }),
            Request::Configure(config) => {
                if self.session.decoder.max_reply_size() != config.max_reply_size {
                    self.session.decoder =
                        wire::Decoder::with_max_reply_size(config.max_reply_size);
                    self.want_sync = true;
                }
                self.session.config = config;
            }
            Request::Close(ack) => {
                self.close_acks.push(ack);
                self.begin_close();
            }
        }
    }

    fn begin_close(&mut self) {
        if self.closing.is_none() {
            self.closing = Some(Instant::now() + crate::DRAIN_TIME);
        }
        for job in self.queue.drain(..) {
            job.fail(Error::Disconnected { command: None });
        }
    }

    /// Nothing left on the wire that the agent might still answer.
    fn drained(&self) -> bool {
        self.connection.is_none()
            || (self.pending.is_empty()
                && self.phase == Phase::Ready
                && !self.want_sync
                && self.out.is_empty())
    }

    async fn reconnect(&mut self) {
        let Some(connect) = &self.connector else {
            for job in self.queue.drain(..) {
                job.fail(Error::Disconnected { command: None });
            }
            return;
        };
        let limit = self.session.config.connect_timeout;
        match tokio::time::timeout(limit, connect()).await {
            Ok(Ok(stream)) => self.attach(stream),
            Ok(Err(e)) => {
                for job in self.queue.drain(..) {
                    job.fail(Error::Io(io::Error::new(e.kind(), e.to_string())));
                }
            }
            Err(_) => {
                for job in self.queue.drain(..) {
                    job.fail(connect_timed_out(limit));
                }
            }
        }
    }

    /// The connection broke: every request on it ends here.
    fn disconnected(&mut self, error: Option<io::Error>) {
        self.connection = None;
        let mut error = error;
        for p in self.pending.drain(..) {
            let Waiter::Caller(Some(reply)) = p.waiter else {
                continue;
            };
            let result = if p.silent {
                // The guest went down or to sleep: what shutdown and suspend do on success.
                Ok(Value::Object(Default::default()))
            } else {
                Err(match error.take() {
                    Some(e) => io_error(e, &p.command),
                    None => Error::Disconnected {
                        command: Some(p.command.clone()),
                    },
                })
            };
            let _ = reply.send(result);
        }
        if let Phase::Syncing { .. } = self.phase {
            // A sync cut short fails the work that waited for it.
            for job in self.queue.drain(..) {
                job.fail(Error::Disconnected {
                    command: Some(<cmd::GuestSyncDelimited as Command>::NAME.to_owned()),
                });
            }
        }
        self.phase = Phase::Unsynced;
        self.session.reset_connection();
        self.out.clear();
        self.out_done = 0;
        self.flush = false;
        if self.connector.is_none() {
            for job in self.queue.drain(..) {
                job.fail(Error::Disconnected { command: None });
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        // While a handshake runs, its own bound ends the work waiting for it.
        let handshaking = matches!(self.phase, Phase::Syncing { .. });
        let queued = self.queue.iter().filter_map(|job| match job {
            Job::Call(call) if !handshaking => Some(call.deadline),
            _ => None,
        });
        let pending = self.pending.iter().filter(|p| p.live()).map(|p| p.deadline);
        let sync = match &self.phase {
            Phase::Syncing { deadline, .. } => Some(*deadline),
            _ => None,
        };
        queued
            .chain(pending)
            .chain(sync)
            .chain(self.closing)
            .min()
            .unwrap_or(far)
    }

    /// Requests the agent may answer at once (ids echoed) or one at a time.
    fn in_flight_limit(&self) -> usize {
        match self.ids {
            Ids::Echoed => self.session.config.max_in_flight.max(1),
            Ids::Probing | Ids::Refused => 1,
        }
    }

    /// Moves every state forward that time or a change made possible.
    fn advance(&mut self, now: Instant) {
        self.expire(now);
        if self.connection.is_none() || self.closing.is_some() {
            return;
        }
        match self.phase {
            Phase::Syncing { .. } => return,
            Phase::Unsynced => {
                if !self.queue.is_empty() || self.want_sync {
                    self.start_sync(now);
                }
                return;
            }
            Phase::Ready => {}
        }
        if self.want_sync {
            // Matched in order, a reply cannot be told from the answer to the 0xFF: wait
            // until nothing live is on the wire.
            if self.ids == Ids::Echoed || !self.pending.iter().any(Pending::live) {
                self.start_sync(now);
            }
            return;
        }
        if self
            .pending
            .iter()
            .any(|p| matches!(p.waiter, Waiter::Caps))
        {
            return;
        }
        while let Some(job) = self.queue.pop_front() {
            match job {
                Job::Resync {
                    reply,
                    started: false,
                } => {
                    self.queue.push_front(Job::Resync {
                        reply,
                        started: true,
                    });
                    self.start_sync(now);
                    return;
                }
                Job::Resync {
                    reply,
                    started: true,
                } => {
                    let _ = reply.send(Ok(()));
                }
                Job::Capabilities(reply) => {
                    if matches!(self.session.caps, Caps::Unknown) {
                        self.queue.push_front(Job::Capabilities(reply));
                        self.fetch_caps(now);
                        return;
                    }
                    let _ = reply.send(Ok(match &self.session.caps {
                        Caps::Known(info) => Some(info.clone()),
                        _ => None,
                    }));
                }
                Job::Call(call) => {
                    if call.reply.is_closed() {
                        continue;
                    }
                    if self.session.needs_caps() {
                        self.queue.push_front(Job::Call(call));
                        self.fetch_caps(now);
                        return;
                    }
                    let live = self.pending.iter().filter(|p| p.live()).count();
                    let silent_on_wire = self.pending.iter().any(|p| p.silent && p.live());
                    let replies = match self.session.check_command(&call.name) {
                        Ok(replies) => replies,
                        Err(e) => {
                            let _ = call.reply.send(Err(e));
                            continue;
                        }
                    };
                    // A command without a success reply goes out alone: only silence tells
                    // that it worked.
                    let blocked = silent_on_wire
                        || live >= self.in_flight_limit()
                        || (!replies && !self.pending.is_empty());
                    if blocked {
                        self.queue.push_front(Job::Call(call));
                        return;
                    }
                    self.write_call(call, replies, now);
                }
            }
        }
    }

    /// Answers what ran out of time.
    fn expire(&mut self, now: Instant) {
        if self.next_deadline() > now {
            return;
        }
        // Work waiting for a handshake is ended by the handshake's own bound, with the error
        // that says what is wrong (the agent does not answer at all).
        let handshaking = matches!(self.phase, Phase::Syncing { .. });
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for job in self.queue.drain(..) {
            match job {
                Job::Call(call) if call.deadline <= now && !handshaking => {
                    let _ = call.reply.send(Err(Error::Timeout {
                        command: call.name,
                        timeout: call.timeout,
                    }));
                }
                other => kept.push_back(other),
            }
        }
        self.queue = kept;

        let mut caps_lost = false;
        let mut silent_done = false;
        self.pending.retain_mut(|p| {
            if !p.live() || p.deadline > now {
                return true;
            }
            match &mut p.waiter {
                Waiter::Caller(reply) if p.silent => {
                    // No error within the grace period: the command was taken.
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(Value::Object(Default::default())));
                    }
                    silent_done = true;
                    false
                }
                Waiter::Caller(reply) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(Error::Timeout {
                            command: p.command.clone(),
                            timeout: p.timeout,
                        }));
                    }
                    true
                }
                Waiter::Caps => {
                    caps_lost = true;
                    p.waiter = Waiter::Caller(None);
                    true
                }
            }
        });
        let timed_out = self.pending.iter().any(|p| !p.live());
        if caps_lost {
            let timeout = self.session.config.timeout;
            for job in self.queue.drain(..) {
                job.fail(Error::Timeout {
                    command: <cmd::GuestInfo as Command>::NAME.to_owned(),
                    timeout,
                });
            }
        }
        if timed_out {
            self.want_sync = true;
        }
        if silent_done && self.pending.is_empty() {
            // The guest may be going down or to sleep: check the channel before the next call.
            self.phase = Phase::Unsynced;
        }

        if let Phase::Syncing {
            deadline,
            attempts_left,
            ..
        } = self.phase
        {
            if deadline <= now {
                if attempts_left > 0 && self.connection.is_some() {
                    self.send_sync(now, attempts_left - 1);
                } else {
                    let limit = self.session.config.sync_timeout;
                    let attempts = self.session.config.sync_attempts.max(1);
                    for job in self.queue.drain(..) {
                        job.fail(Error::SyncTimeout {
                            timeout: limit,
                            attempts,
                        });
                    }
                    self.phase = Phase::Unsynced;
                    self.want_sync = false;
                }
            }
        }
    }

    fn start_sync(&mut self, now: Instant) {
        let attempts = self.session.config.sync_attempts.max(1);
        self.want_sync = false;
        // A resync asked for is served by this one.
        if let Some(Job::Resync { started, .. }) = self.queue.front_mut() {
            *started = true;
        }
        self.send_sync(now, attempts - 1);
    }

    fn send_sync(&mut self, now: Instant, attempts_left: u32) {
        let id = random_id();
        self.out.extend_from_slice(&wire::encode_sync_delimited(id));
        // The agent answers in order: the sync waits behind what is already in flight.
        let behind = self
            .pending
            .iter()
            .filter(|p| p.live())
            .map(|p| p.deadline)
            .max()
            .unwrap_or(now)
            .max(now);
        self.phase = Phase::Syncing {
            id,
            deadline: behind + self.session.config.sync_timeout,
            after_delimiter: false,
            attempts_left,
        };
    }

    fn fetch_caps(&mut self, now: Instant) {
        let name = <cmd::GuestInfo as Command>::NAME;
        let timeout = self.session.config.timeout;
        self.push_request(name, None, Waiter::Caps, false, now + timeout, timeout);
    }

    fn write_call(&mut self, call: Call, replies: bool, now: Instant) {
        let Call {
            name,
            args,
            timeout,
            deadline,
            reply,
        } = call;
        let args = match self.session.adapt_arguments(&name, args.as_ref()) {
            Ok(Some(adapted)) => Some(adapted),
            Ok(None) => args,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let deadline = if replies {
            deadline
        } else {
            now + self.session.config.no_reply_grace
        };
        self.push_request(
            &name,
            args,
            Waiter::Caller(Some(reply)),
            !replies,
            deadline,
            timeout,
        );
    }

    /// Encodes a request, numbered unless the agent refuses ids, and queues its bytes.
    fn push_request(
        &mut self,
        name: &str,
        args: Option<Value>,
        waiter: Waiter,
        silent: bool,
        deadline: Instant,
        timeout: Duration,
    ) {
        let id = (self.ids != Ids::Refused).then(|| {
            self.next_id += 1;
            self.id_base + self.next_id
        });
        let encoded = wire::encode_request_value(
            name,
            args.as_ref().unwrap_or(&Value::Null),
            id.map(Value::from).as_ref(),
        );
        let bytes = match encoded {
            Ok(bytes) => bytes,
            Err(e) => {
                match waiter {
                    Waiter::Caller(Some(reply)) => {
                        let _ = reply.send(Err(e));
                    }
                    _ => self.session.caps = Caps::Unavailable,
                }
                return;
            }
        };
        self.out.extend_from_slice(&bytes);
        self.pending.push_back(Pending {
            id,
            command: name.to_owned(),
            waiter,
            silent,
            deadline,
            timeout,
            resend: (self.ids == Ids::Probing).then_some(args),
        });
    }

    fn on_frame(&mut self, frame: Frame) {
        if let Phase::Syncing {
            id,
            after_delimiter,
            ..
        } = &mut self.phase
        {
            let sync_id = *id;
            match frame {
                Frame::Delimiter => *after_delimiter = true,
                Frame::Reply(Reply {
                    id: None,
                    outcome: Ok(v),
                }) if *after_delimiter && v.as_i64() == Some(sync_id) => self.synced(),
                Frame::Reply(reply @ Reply { id: Some(_), .. }) => {
                    *after_delimiter = false;
                    self.on_numbered_reply(reply);
                }
                // The agent's answer to our 0xFF, stale replies, garbage: skipped.
                _ => *after_delimiter = false,
            }
            return;
        }
        match frame {
            Frame::Delimiter => {
                let expected = self
                    .pending
                    .iter()
                    .find(|p| p.live())
                    .is_some_and(|p| p.command == <cmd::GuestSyncDelimited as Command>::NAME);
                if self.ids != Ids::Echoed && !expected {
                    // A sentinel from an earlier client: the reply after it is stale.
                    self.skip_next = true;
                }
            }
            Frame::Reply(reply) if reply.id.is_some() => self.on_numbered_reply(reply),
            Frame::Reply(reply) => self.on_plain_reply(reply),
            Frame::Invalid { excerpt, reason } => {
                self.on_garble(Garble::Invalid { excerpt, reason })
            }
            Frame::Oversized { limit } => self.on_garble(Garble::Oversized { limit }),
        }
    }

    /// A reply carrying an id: its caller's, or stale.
    fn on_numbered_reply(&mut self, reply: Reply) {
        let Some(index) = reply
            .id
            .as_ref()
            .and_then(Value::as_u64)
            .and_then(|id| self.pending.iter().position(|p| p.id == Some(id)))
        else {
            return;
        };
        if self.ids == Ids::Probing {
            self.ids = Ids::Echoed;
        }
        // In order: everything before this request had its reply lost.
        for _ in 0..index {
            if let Some(lost) = self.pending.pop_front() {
                self.lost(lost, "before the agent answered a later request");
            }
        }
        if let Some(p) = self.pending.pop_front() {
            self.complete(p, reply.outcome.map_err(Error::from));
        }
    }

    /// A reply without an id: from an agent that does not number them, or stale.
    fn on_plain_reply(&mut self, reply: Reply) {
        match self.ids {
            Ids::Echoed => {}
            Ids::Probing | Ids::Refused if self.skip_next => self.skip_next = false,
            Ids::Probing => {
                let refused = matches!(&reply.outcome, Err(e) if e.desc == ID_REFUSED);
                self.ids = Ids::Refused;
                let Some(first) = self.pending.pop_front() else {
                    return;
                };
                if refused {
                    // The agent refused the id, not the command: send it again without one.
                    self.requeue(first);
                } else {
                    self.complete(first, reply.outcome.map_err(Error::from));
                }
            }
            Ids::Refused => {
                if let Some(first) = self.pending.pop_front() {
                    self.complete(first, reply.outcome.map_err(Error::from));
                }
            }
        }
    }

    /// Puts a request refused for its id back in front of the queue.
    fn requeue(&mut self, p: Pending) {
        let args = p.resend.flatten();
        match p.waiter {
            Waiter::Caps => {} // Asked again when the next job needs it.
            Waiter::Caller(Some(reply)) => self.queue.push_front(Job::Call(Call {
                name: p.command,
                args,
                timeout: p.timeout,
                deadline: p.deadline,
                reply,
            })),
            Waiter::Caller(None) => {}
        }
    }

    fn on_garble(&mut self, garble: Garble) {
        self.want_sync = true;
        if self.ids == Ids::Echoed {
            // Whose reply it was shows when a later reply or the sync arrives.
            self.garbled = Some(garble);
        } else if let Some(first) = self.pending.pop_front() {
            self.garbled = Some(garble);
            self.lost(first, "");
        }
    }

    /// Ends a request whose reply will not come.
    fn lost(&mut self, p: Pending, when: &str) {
        let error = match &self.garbled {
            Some(Garble::Invalid { excerpt, reason }) => Error::Protocol {
                detail: format!(
                    "{reason} while waiting for the reply to {}: {excerpt:?}",
                    p.command
                ),
            },
            Some(Garble::Oversized { limit }) => Error::ReplyTooLarge { limit: *limit },
            None => Error::Protocol {
                detail: format!("the agent's reply to {} never arrived {when}", p.command),
            },
        };
        match p.waiter {
            Waiter::Caller(Some(reply)) => {
                let result = if p.silent {
                    Ok(Value::Object(Default::default()))
                } else {
                    Err(error)
                };
                let _ = reply.send(result);
            }
            Waiter::Caller(None) => {}
            Waiter::Caps => self.want_sync = true,
        }
    }

    fn complete(&mut self, p: Pending, result: Result<Value>) {
        match p.waiter {
            Waiter::Caps => {
                if let Err(e) = self.session.record_caps(result) {
                    for job in self.queue.drain(..) {
                        job.fail(clone_error(&e));
                    }
                }
            }
            Waiter::Caller(reply) => {
                self.session.finished(&p.command, &result);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Our sync reply arrived: whatever was sent before it has been answered or never will be.
    fn synced(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            self.lost(p, "before the channel was resynchronised");
        }
        self.garbled = None;
        self.skip_next = false;
        self.want_sync = false;
        self.phase = Phase::Ready;
        // A new sync may mean a restarted (maybe upgraded) agent.
        self.session.caps = Caps::Unknown;
    }
}

/// A copy of an error for several waiters (I/O errors keep their kind and text).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
        Error::Decode { command, .. } => Error::Protocol {
            detail: format!("guest-info reply undecodable while fetching for {command}"),
        },
        other => Error::Protocol {
            detail: other.to_string(),
        },
    }
}

fn connect_timed_out(limit: Duration) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "connecting to the guest agent channel timed out after {}",
            crate::error::fmt_duration(limit)
        ),
    ))
}

async fn bounded_connect<T>(
    limit: Duration,
    connect: impl Future<Output = io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, connect).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(connect_timed_out(limit)),
    }
}

/// How often a connect to a Unix socket whose listen queue is full is retried.
const BUSY_RETRY: Duration = Duration::from_millis(50);

/// Connects to the Unix socket at `path` within `limit`. A full listen queue (EAGAIN: QEMU's
/// chardev serves one client and queues one more) is retried every [`BUSY_RETRY`] and, when
/// it lasts, reported as [`Error::ChannelBusy`] rather than as "Resource temporarily
/// unavailable".
pub(crate) async fn connect_unix_within(path: &Path, limit: Duration) -> Result<UnixStream> {
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        match timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() + BUSY_RETRY >= deadline {
                    return Err(Error::ChannelBusy {
                        address: Address::Unix(path.to_owned()).to_string(),
                        waited: started.elapsed(),
                    });
                }
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Ok(Err(e)) => return Err(Error::Io(e)),
            Err(_) => return Err(connect_timed_out(limit)),
        }
    }
}

/// An error of a reconnect, as the `io::Error` the driver's connector returns.
fn into_io(error: Error) -> io::Error {
    match error {
        Error::Io(e) => e,
        other => io::Error::new(io::ErrorKind::WouldBlock, other.to_string()),
    }
}

fn io_error(e: io::Error, command: &str) -> Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::UnexpectedEof => Error::Disconnected {
            command: Some(command.to_owned()),
        },
        _ => Error::Io(e),
    }
}

impl AsyncClient<UnixStream> {
    /// Connects to a Unix socket (QEMU's chardev socket or `qemu-ga -m unix-listen`);
    /// reconnects to the same path if the connection drops.
    pub async fn connect_unix(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let limit = config.connect_timeout;
        let stream = connect_unix_within(&path, limit)
            .await
            .map_err(connect_failed(Address::Unix(path.clone())))?;
        Ok(Self::with_config(stream, config).with_reconnect(move || {
            let path = path.clone();
            async move { connect_unix_within(&path, limit).await.map_err(into_io) }
        }))
    }
}

impl AsyncClient<TcpStream> {
    /// Connects to `host:port`; reconnects if the connection drops.
    pub async fn connect_tcp(addr: &str, config: ClientConfig) -> Result<Self> {
        let addr = addr.to_owned();
        let stream = bounded_connect(config.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(connect_failed(Address::Tcp(addr.clone())))?;
        Ok(Self::with_config(stream, config)
            .with_reconnect(move || TcpStream::connect(addr.clone())))
    }
}

impl AsyncClient<AsyncCharDevice> {
    /// Opens a character device such as
    /// [`VIRTIO_PORT_PATH`](crate::address::VIRTIO_PORT_PATH).
    pub fn open_serial(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let device = AsyncCharDevice::open(&path)
            .map_err(Error::Io)
            .map_err(connect_failed(Address::Serial(path.as_ref().to_owned())))?;
        Ok(Self::with_config(device, config))
    }
}

impl AsyncClient<BoxedStream> {
    /// Connects to an [`Address`] (or a string such as `qga+unix:///run/qga.sock`).
    pub async fn connect(address: &str, config: ClientConfig) -> Result<Self> {
        Self::connect_address(&Address::parse(address)?, config).await
    }

    /// Connects to a parsed [`Address`].
    pub async fn connect_address(address: &Address, config: ClientConfig) -> Result<Self> {
        async fn open(address: Address, limit: Duration) -> Result<BoxedStream> {
            Ok(match address {
                Address::Unix(p) => Box::new(connect_unix_within(&p, limit).await?),
                Address::Tcp(hp) => Box::new(bounded_connect(limit, TcpStream::connect(hp)).await?),
                Address::Serial(p) => Box::new(AsyncCharDevice::open(p)?),
            })
        }
        let limit = config.connect_timeout;
        let stream = open(address.clone(), limit)
            .await
            .map_err(connect_failed(address))?;
        let address = address.clone();
        Ok(Self::with_config(stream, config).with_reconnect(move || {
            let address = address.clone();
            async move { open(address, limit).await.map_err(into_io) }
        }))
    }
}
