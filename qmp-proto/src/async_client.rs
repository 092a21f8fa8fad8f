//! The tokio client (feature `tokio`): one monitor connection shared by many tasks.
//!
//! A driver task owns the connection and the sans-I/O [`Session`]. Callers hand it their
//! command and wait for their own reply, matched by id; commands of several tasks are in
//! flight together. Each call has a deadline: when it passes, the caller gets
//! [`Error::Timeout`] and the late reply, if it comes, is dropped by its id. Events go to
//! [`EventStream`]s, each with a bounded buffer whose overflow is reported, never grown.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::address::Address;
use crate::cmd::{Command, JobComplete, JobDismiss, JobFinalize, JobId, QueryJobs};
use crate::error::{connect_failed, Error, Result};
use crate::job::{JobOptions, JobStep, JobTracker};
use crate::monitor::{check_command, decode, encode_arguments};
use crate::session::{ClientConfig, EventFilter, Handshake, RequestId, Session, SubscriptionId};
use crate::types::JobInfo;
use crate::wire::{Event, Greeting};

/// A byte stream the async client can run on.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

const READ_CHUNK: usize = 64 * 1024;

/// The async QMP client.
///
/// Share it between tasks (`Arc<AsyncClient>`): every call goes out at once on the one
/// connection and waits for its own reply, within its own deadline. The driver task is
/// spawned on the runtime that runs [`AsyncClient::connect`] and ends when the client is
/// dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qmp_proto::Error> {
/// use qmp_proto::{cmd, AsyncClient, ClientConfig, EventFilter};
///
/// let qemu = AsyncClient::connect("qmp+unix:///run/qemu/vm.qmp", ClientConfig::default()).await?;
/// let mut stops = qemu.subscribe(EventFilter::names(["STOP"])).await?;
/// let (status, jobs) = tokio::join!(qemu.call::<cmd::QueryStatus>(&()), qemu.call::<cmd::QueryJobs>(&()));
/// println!("{} with {} jobs", status?.status, jobs?.len());
/// qemu.call::<cmd::Stop>(&()).await?;
/// let stop = stops.next(std::time::Duration::from_secs(5)).await?;
/// assert!(stop.is_some());
/// # Ok(()) }
/// ```
pub struct AsyncClient {
    greeting: Greeting,
    oob: bool,
    config: ClientConfig,
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient")
            .field("qemu", &self.greeting.version.qemu)
            .field("oob", &self.oob)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a caller asks of the driver.
enum Request {
    Call {
        name: String,
        arguments: Option<Value>,
        oob: bool,
        deadline: Instant,
        timeout: Duration,
        reply: oneshot::Sender<Result<Value>>,
    },
    Subscribe {
        filter: EventFilter,
        queue: Arc<EventQueue>,
        reply: oneshot::Sender<SubscriptionId>,
    },
    Unsubscribe(SubscriptionId),
}

/// A waiting caller.
struct Waiter {
    name: String,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Result<Value>>,
}

/// The events of one subscription, shared by the driver and the [`EventStream`].
#[derive(Debug)]
struct EventQueue {
    state: Mutex<QueueState>,
    ready: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<Event>,
    dropped: u64,
    /// The connection's end, once it has ended.
    closed: Option<String>,
}

impl EventQueue {
    fn push(&self, event: Event) {
        let mut state = lock(&self.state);
        if state.events.len() >= self.capacity {
            state.dropped += 1;
        } else {
            state.events.push_back(event);
        }
        drop(state);
        self.ready.notify_one();
    }

    fn count_dropped(&self, dropped: u64) {
        lock(&self.state).dropped += dropped;
        self.ready.notify_one();
    }

    fn close(&self, why: String) {
        lock(&self.state).closed.get_or_insert(why);
        self.ready.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A subscription of an [`AsyncClient`]: the events its filter lets through, from the moment
/// of [`AsyncClient::subscribe`]. Dropping it ends the subscription.
#[derive(Debug)]
pub struct EventStream {
    id: SubscriptionId,
    queue: Arc<EventQueue>,
    requests: mpsc::UnboundedSender<Request>,
}

impl EventStream {
    /// The next event, waiting at most `timeout`; `Ok(None)` when none came in time. An
    /// overflow of the buffer is reported once ([`Error::EventOverflow`]) before the events
    /// that were kept; after the connection has ended and the kept events are read, its end
    /// is reported as [`Error::Disconnected`] or [`Error::Protocol`].
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.queue.ready.notified();
            {
                let mut state = lock(&self.queue.state);
                if state.dropped > 0 {
                    let dropped = std::mem::take(&mut state.dropped);
                    return Err(Error::EventOverflow {
                        capacity: self.queue.capacity,
                        dropped,
                    });
                }
                if let Some(event) = state.events.pop_front() {
                    return Ok(Some(event));
                }
                if let Some(why) = &state.closed {
                    return Err(Error::Protocol {
                        detail: format!("the monitor connection ended: {why}"),
                    });
                }
            }
            if timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Unsubscribe(self.id));
    }
}

impl AsyncClient {
    /// Connects to an address such as `qmp+unix:///run/qemu/vm.qmp` and does the handshake,
    /// all within [`ClientConfig::handshake_timeout`].
    pub async fn connect(address: &str, config: ClientConfig) -> Result<AsyncClient> {
        Self::connect_address(&Address::parse(address)?, config).await
    }

    /// Connects to a parsed [`Address`] and does the handshake.
    pub async fn connect_address(address: &Address, config: ClientConfig) -> Result<AsyncClient> {
        let deadline = Instant::now() + config.handshake_timeout;
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        match address {
            Address::Unix(path) => {
                let stream = timeout_at(deadline, UnixStream::connect(path))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
                    .map_err(connect_failed(address))?;
                Self::handshake(stream, config).await
            }
            Address::Tcp(hostport) => {
                let stream = timeout_at(deadline, TcpStream::connect(hostport.as_str()))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
                    .map_err(connect_failed(address))?;
                stream.set_nodelay(true).map_err(connect_failed(address))?;
                Self::handshake(stream, config).await
            }
        }
    }

    /// Connects to the Unix socket at `path` and does the handshake.
    pub async fn connect_unix(path: impl AsRef<Path>, config: ClientConfig) -> Result<AsyncClient> {
        Self::connect_address(&Address::Unix(path.as_ref().to_owned()), config).await
    }

    /// Reads the greeting on a freshly connected `stream`, negotiates capabilities within
    /// [`ClientConfig::handshake_timeout`], and starts the driver task on the current runtime.
    pub async fn handshake<S: AsyncStream + 'static>(
        stream: S,
        config: ClientConfig,
    ) -> Result<AsyncClient> {
        let timeout = config.handshake_timeout;
        let deadline = Instant::now() + timeout;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut session = Session::new(config.clone());
        let mut buf = vec![0; READ_CHUNK];
        loop {
            match session.poll_handshake()? {
                Handshake::Done => break,
                Handshake::Send(bytes) => {
                    match timeout_at(deadline, writer.write_all(&bytes)).await {
                        Err(_) => return Err(Error::GreetingTimeout { timeout }),
                        Ok(Err(e)) => session.fail(io_error(e)),
                        Ok(Ok(())) => {}
                    }
                }
                Handshake::NeedBytes => match timeout_at(deadline, reader.read(&mut buf)).await {
                    Err(_) => return Err(Error::GreetingTimeout { timeout }),
                    Ok(Ok(0)) => session.fail(Error::Disconnected { command: None }),
                    Ok(Ok(n)) => session.receive(&buf[..n]),
                    Ok(Err(e)) => session.fail(io_error(e)),
                },
            }
        }
        let greeting = session.greeting().cloned().ok_or_else(|| Error::Protocol {
            detail: "handshake ended without a greeting".to_owned(),
        })?;
        let oob = session.oob_enabled();
        let (requests, inbox) = mpsc::unbounded_channel();
        let driver = Driver {
            session,
            reader,
            writer,
            buf,
            inbox,
            waiters: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
        };
        tokio::spawn(driver.run());
        Ok(AsyncClient {
            greeting,
            oob,
            config,
            requests,
        })
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// The settings in force.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Sends `command` with `arguments` (a JSON object or `None`) and returns QEMU's `return`
    /// value, waiting at most `timeout` (default [`ClientConfig::timeout`]).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        self.exchange(command, arguments, timeout, false).await
    }

    /// Sends `command` out of band (`exec-oob`); needs [`ClientConfig::oob`] and a monitor
    /// that offers it.
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        self.exchange(command, arguments, timeout, true).await
    }

    /// Sends typed command `C`, after checking it against the QEMU of the greeting, and decodes
    /// its reply.
    pub async fn call<C: Command>(&self, args: &C::Args) -> Result<C::Returns> {
        check_command::<C>(&self.greeting, args)?;
        let reply = self
            .exchange(C::NAME, encode_arguments::<C>(args)?, None, false)
            .await?;
        decode(C::NAME, reply)
    }

    /// Starts keeping the events `filter` lets through, from now on.
    pub async fn subscribe(&self, filter: EventFilter) -> Result<EventStream> {
        let queue = Arc::new(EventQueue {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
            capacity: self.config.event_buffer.max(1),
        });
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Subscribe {
                filter,
                queue: Arc::clone(&queue),
                reply,
            })
            .map_err(|_| Error::Disconnected { command: None })?;
        let id = answer
            .await
            .map_err(|_| Error::Disconnected { command: None })?;
        Ok(EventStream {
            id,
            queue,
            requests: self.requests.clone(),
        })
    }

    /// Starts following job `job` from its events. Call it before the command that starts
    /// the job, then [`JobFollower::wait`]: no event is missed however fast the job is.
    pub async fn follow_job(&self, job: &str) -> Result<JobFollower> {
        Ok(JobFollower {
            tracker: JobTracker::new(job),
            events: self.subscribe(JobTracker::filter()).await?,
        })
    }

    async fn exchange(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Option<Duration>,
        oob: bool,
    ) -> Result<Value> {
        let timeout = timeout.unwrap_or(self.config.timeout);
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        let gone = || Error::Disconnected {
            command: Some(command.to_owned()),
        };
        self.requests
            .send(Request::Call {
                name: command.to_owned(),
                arguments,
                oob,
                deadline,
                timeout,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

struct Driver<S> {
    session: Session,
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    buf: Vec<u8>,
    inbox: mpsc::UnboundedReceiver<Request>,
    waiters: BTreeMap<RequestId, Waiter>,
    subscriptions: BTreeMap<SubscriptionId, Arc<EventQueue>>,
}

impl<S: AsyncStream> Driver<S> {
    async fn run(mut self) {
        loop {
            let next_deadline = self.waiters.values().map(|w| w.deadline).min();
            let connected = self.session.fatal().is_none();
            tokio::select! {
                request = self.inbox.recv() => match request {
                    Some(request) => self.handle(request).await,
                    // Every handle to the client is gone.
                    None => return,
                },
                read = self.reader.read(&mut self.buf), if connected => {
                    match read {
                        Ok(0) => self.session.fail(Error::Disconnected { command: None }),
                        Ok(n) => self.session.receive(&self.buf[..n]),
                        Err(e) => self.session.fail(io_error(e)),
                    }
                    self.deliver();
                }
                () = sleep_until(next_deadline.unwrap_or_else(far_future)), if next_deadline.is_some() => {
                    self.expire();
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Call {
                name,
                arguments,
                oob,
                deadline,
                timeout,
                reply,
            } => {
                let (id, bytes) = match self.session.start_command(&name, arguments.as_ref(), oob) {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                match timeout_at(deadline, self.writer.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.session.fail(io_error(e)),
                    Err(_) => self.session.fail(Error::Protocol {
                        detail: "a request could not be written in time; the stream is out of step"
                            .to_owned(),
                    }),
                }
                self.waiters.insert(
                    id,
                    Waiter {
                        name,
                        deadline,
                        timeout,
                        reply,
                    },
                );
                self.deliver();
            }
            Request::Subscribe {
                filter,
                queue,
                reply,
            } => {
                let id = self.session.subscribe(filter);
                if let Some(fatal) = self.session.fatal() {
                    queue.close(fatal.to_string());
                }
                self.subscriptions.insert(id, queue);
                let _ = reply.send(id);
            }
            Request::Unsubscribe(id) => {
                let _ = self.session.unsubscribe(id);
                self.subscriptions.remove(&id);
            }
        }
    }

    /// Hands out the replies and events the session has.
    fn deliver(&mut self) {
        let answered: Vec<RequestId> = self.waiters.keys().copied().collect();
        for id in answered {
            if let Some(outcome) = self.session.take_reply(id) {
                if let Some(waiter) = self.waiters.remove(&id) {
                    let _ = waiter.reply.send(outcome);
                }
            }
        }
        let fatal = self.session.fatal().map(ToString::to_string);
        for (&id, queue) in &self.subscriptions {
            loop {
                match self.session.next_event(id) {
                    Ok(Some(event)) => queue.push(event),
                    Ok(None) => break,
                    Err(Error::EventOverflow { dropped, .. }) => queue.count_dropped(dropped),
                    Err(_) => break,
                }
            }
            if let Some(why) = &fatal {
                queue.close(why.clone());
            }
        }
    }

    /// Answers the callers whose deadline passed.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<RequestId> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(waiter) = self.waiters.remove(&id) {
                self.session.abandon(id);
                let _ = waiter.reply.send(Err(Error::Timeout {
                    command: waiter.name,
                    timeout: waiter.timeout,
                }));
            }
        }
        self.deliver();
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

fn io_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Error::Disconnected { command: None },
        _ => Error::Io(e),
    }
}

/// A job followed from its events, from [`AsyncClient::follow_job`]: the tokio side of
/// [`MonitorExt::run_job`](crate::MonitorExt::run_job).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qmp_proto::Error> {
/// use qmp_proto::cmd::{BlockdevCreate, BlockdevCreateArgs};
/// use qmp_proto::types::BlockdevCreateOptions;
/// use qmp_proto::{AsyncClient, ClientConfig, JobOptions};
///
/// let qemu = AsyncClient::connect("qmp+unix:///run/qemu/vm.qmp", ClientConfig::default()).await?;
/// let job = qemu.follow_job("create").await?;
/// qemu.call::<BlockdevCreate>(&BlockdevCreateArgs {
///     job_id: "create".into(),
///     options: BlockdevCreateOptions::qcow2("scratch-file", 1 << 30),
/// }).await?;
/// job.wait(&qemu, &JobOptions::default()).await?; // the job's own error, if it failed
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct JobFollower {
    tracker: JobTracker,
    events: EventStream,
}

impl JobFollower {
    /// Follows the job to its end, finalizing, completing and dismissing it as `options` say;
    /// returns its last `query-jobs` entry (`None` when it dismissed itself) or its own error
    /// ([`Error::JobFailed`], [`Error::JobCancelled`], [`Error::JobTimeout`]).
    pub async fn wait(
        mut self,
        client: &AsyncClient,
        options: &JobOptions,
    ) -> Result<Option<JobInfo>> {
        let deadline = Instant::now() + options.timeout;
        while !self.tracker.is_over() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some(event) = self.events.next(remaining).await? else {
                return Err(self.tracker.timed_out(options.timeout));
            };
            match self.tracker.observe(&event, options)? {
                Some(JobStep::Finalize) => {
                    let jobs = client.call::<QueryJobs>(&()).await?;
                    if self.tracker.waits_for_finalize(&jobs) {
                        client
                            .call::<JobFinalize>(&JobId::new(self.tracker.job()))
                            .await?;
                    }
                }
                Some(JobStep::Complete) => {
                    client
                        .call::<JobComplete>(&JobId::new(self.tracker.job()))
                        .await?;
                }
                None => {}
            }
        }
        let (info, dismiss) = self
            .tracker
            .entry(client.call::<QueryJobs>(&()).await?, options);
        if dismiss {
            client
                .call::<JobDismiss>(&JobId::new(self.tracker.job()))
                .await?;
        }
        self.tracker.outcome(info)
    }
}
