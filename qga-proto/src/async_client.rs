//! The async client (feature `tokio`).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};

use crate::address::Address;
use crate::agent::GuestAgent;
use crate::cmd::{self, Command};
use crate::error::{connect_failed, Error, Result};
use crate::session::{Await, Caps, ClientConfig, Session, Step};
use crate::transport::AsyncCharDevice;
use crate::types::GuestAgentInfo;

/// A byte stream the async client can run on.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A type-erased stream, for clients whose channel is chosen at run time.
pub type BoxedStream = Box<dyn AsyncStream>;

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;
type Connector<S> = Box<dyn Fn() -> ConnectFuture<S> + Send + Sync>;

const READ_CHUNK: usize = 64 * 1024;

/// Async guest agent client over any tokio byte stream.
///
/// Every call is bounded by [`ClientConfig::timeout`]. Before the first
/// command, and after any timeout, garbled reply or cancelled call, the client
/// re-synchronises with `0xFF` + `guest-sync-delimited` and a random id, so
/// stale data from earlier clients or calls never reaches a caller. Calls are
/// serialised (the agent answers strictly in order); the client can be shared
/// between tasks behind an `Arc`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qga_proto::Error> {
/// use qga_proto::{cmd, GuestAgent, GuestAgentExt};
///
/// let client = qga_proto::fake::FakeAgent::linux().connect_async();
/// let host = client.host_name().await?;
/// let same = client.call::<cmd::GuestGetHostName>(&()).await?;
/// assert_eq!(host, same);
/// # Ok(()) }
/// ```
pub struct AsyncClient<S: AsyncStream + 'static> {
    inner: Mutex<Inner<S>>,
}

struct Inner<S: AsyncStream + 'static> {
    stream: Option<S>,
    session: Session,
    connector: Option<Connector<S>>,
    buf: Vec<u8>,
}

impl<S: AsyncStream + 'static> std::fmt::Debug for AsyncClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient").finish_non_exhaustive()
    }
}

impl<S: AsyncStream + 'static> AsyncClient<S> {
    /// A client on an already connected stream, with default settings.
    pub fn new(stream: S) -> Self {
        Self::with_config(stream, ClientConfig::default())
    }

    /// A client on an already connected stream.
    pub fn with_config(stream: S, config: ClientConfig) -> Self {
        AsyncClient {
            inner: Mutex::new(Inner {
                stream: Some(stream),
                session: Session::new(config),
                connector: None,
                buf: vec![0; READ_CHUNK],
            }),
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
        this.inner.get_mut().connector = Some(Box::new(move || Box::pin(connect())));
        this
    }

    /// The settings in force.
    pub async fn config(&self) -> ClientConfig {
        self.inner.lock().await.session.config.clone()
    }

    /// Changes the settings; takes effect with the next call.
    pub async fn set_config(&self, config: ClientConfig) {
        let mut inner = self.inner.lock().await;
        if inner.session.decoder.max_reply_size() != config.max_reply_size {
            inner.session.decoder =
                crate::wire::Decoder::with_max_reply_size(config.max_reply_size);
            inner.session.in_sync = false;
        }
        inner.session.config = config;
    }

    /// Closes the channel. If a call was left unfinished (timeout, cancelled
    /// call, silent command), replies still in flight are read first for up
    /// to [`DRAIN_TIME`](crate::DRAIN_TIME): qemu-ga 7.2 exits when a
    /// client closes a Unix socket with replies unread. Prefer this to a
    /// plain drop when talking to such agents.
    pub async fn close(mut self) {
        let inner = self.inner.get_mut();
        if inner.session.in_sync {
            return;
        }
        let deadline = Instant::now() + crate::DRAIN_TIME;
        let Inner { stream, buf, .. } = inner;
        if let Some(mut stream) = stream.take() {
            while let Ok(Ok(n)) = timeout_at(deadline, stream.read(buf)).await {
                if n == 0 {
                    break;
                }
            }
        }
    }

    /// Forces a re-synchronisation now.
    pub async fn resync(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        inner.session.in_sync = false;
        inner.ready().await
    }

    /// `guest-info` as cached by the capability check (fetched if needed), or
    /// `None` when checks are off or the agent refused `guest-info`.
    pub async fn capabilities(&self) -> Result<Option<GuestAgentInfo>> {
        let mut inner = self.inner.lock().await;
        inner.ready().await?;
        if let Caps::Unknown = inner.session.caps {
            let t = inner.session.config.timeout;
            inner.fetch_caps(t).await?;
        }
        Ok(match &inner.session.caps {
            Caps::Known(info) => Some(info.clone()),
            _ => None,
        })
    }

    /// Sends `name` with `args`, waiting at most `timeout` (or the configured
    /// timeout) for the reply.
    pub async fn execute(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let mut inner = self.inner.lock().await;
        let timeout = timeout.unwrap_or(inner.session.config.timeout);
        inner.execute(name, args.as_ref(), timeout).await
    }

    /// Typed call of command `C`.
    pub async fn call<C: Command>(&self, args: &C::Args) -> Result<C::Returns> {
        crate::agent::call::<C, _>(self, args).await
    }
}

impl<S: AsyncStream + 'static> Inner<S> {
    fn drop_connection(&mut self) {
        self.stream = None;
        self.session.reset_connection();
    }

    /// Connected, synchronised and (if configured) capabilities known.
    async fn ready(&mut self) -> Result<()> {
        if self.stream.is_none() {
            let Some(connect) = &self.connector else {
                return Err(Error::Disconnected { command: None });
            };
            let limit = self.session.config.sync_timeout;
            let stream = match tokio::time::timeout(limit, connect()).await {
                Ok(result) => result?,
                Err(_) => return Err(connect_timed_out(limit)),
            };
            self.session.reset_connection();
            self.stream = Some(stream);
        }
        if !self.session.in_sync {
            self.sync().await?;
        }
        if self.session.needs_caps() {
            let t = self.session.config.timeout;
            self.fetch_caps(t).await?;
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<()> {
        let limit = self.session.config.sync_timeout;
        let attempts = self.session.config.sync_attempts.max(1);
        for _ in 0..attempts {
            let (bytes, mut wait) = self.session.begin_sync();
            let deadline = Instant::now() + limit;
            match self.write(&bytes, deadline, "guest-sync-delimited").await {
                Ok(()) => {}
                Err(Error::Timeout { .. }) => continue,
                Err(e) => return Err(e),
            }
            match self
                .read_until(&mut wait, deadline, "guest-sync-delimited")
                .await?
            {
                Some(Step::Synced) => {
                    // A new sync may mean a restarted (maybe upgraded) agent.
                    self.session.caps = Caps::Unknown;
                    return Ok(());
                }
                _ => continue,
            }
        }
        Err(Error::SyncTimeout {
            timeout: limit,
            attempts,
        })
    }

    async fn fetch_caps(&mut self, timeout: Duration) -> Result<()> {
        let reply = self
            .exchange(<cmd::GuestInfo as Command>::NAME, None, timeout, true)
            .await;
        self.session.record_caps(reply)
    }

    async fn execute(
        &mut self,
        name: &str,
        args: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.ready().await?;
        let replies = self.session.check_command(name)?;
        let adapted = self.session.adapt_arguments(name, args)?;
        self.exchange(name, adapted.as_ref().or(args), timeout, replies)
            .await
    }

    async fn exchange(
        &mut self,
        name: &str,
        args: Option<&Value>,
        timeout: Duration,
        replies: bool,
    ) -> Result<Value> {
        let (bytes, mut wait, wait_for) =
            self.session.start_exchange(name, args, replies, timeout)?;
        let deadline = Instant::now() + wait_for;
        self.write(&bytes, deadline, name).await?;
        let outcome = self.read_until(&mut wait, deadline, name).await;
        self.session.conclude(name, outcome, replies, wait_for)
    }

    async fn write(&mut self, bytes: &[u8], deadline: Instant, command: &str) -> Result<()> {
        let budget = deadline.saturating_duration_since(Instant::now());
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Disconnected {
                command: Some(command.to_owned()),
            });
        };
        let result = timeout_at(deadline, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.drop_connection();
                Err(io_error(e, command))
            }
            Err(_) => {
                self.session.in_sync = false;
                Err(Error::Timeout {
                    command: command.to_owned(),
                    timeout: budget,
                })
            }
        }
    }

    /// Reads until `wait` completes; `Ok(None)` when `deadline` passes first.
    async fn read_until(
        &mut self,
        wait: &mut Await,
        deadline: Instant,
        command: &str,
    ) -> Result<Option<Step>> {
        loop {
            match self.session.poll(wait) {
                Step::Pending => {}
                step => return Ok(Some(step)),
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Error::Disconnected {
                    command: Some(command.to_owned()),
                });
            };
            match timeout_at(deadline, stream.read(&mut self.buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => {
                    self.drop_connection();
                    return Err(Error::Disconnected {
                        command: Some(command.to_owned()),
                    });
                }
                Ok(Ok(n)) => self.session.decoder.push(&self.buf[..n]),
                Ok(Err(e)) => {
                    self.drop_connection();
                    return Err(io_error(e, command));
                }
            }
        }
    }
}

impl<S: AsyncStream + 'static> Drop for AsyncClient<S> {
    fn drop(&mut self) {
        // Same as `close`, in the background: read late replies so that
        // qemu-ga 7.2 does not see the socket reset and exit.
        let inner = self.inner.get_mut();
        if inner.session.in_sync {
            return;
        }
        let (Some(mut stream), Ok(runtime)) =
            (inner.stream.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let deadline = Instant::now() + crate::DRAIN_TIME;
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) = timeout_at(deadline, stream.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
            }
        });
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

#[async_trait]
impl<S: AsyncStream + 'static> GuestAgent for AsyncClient<S> {
    async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value> {
        self.execute(name, args, None).await
    }
}

impl AsyncClient<UnixStream> {
    /// Connects to a Unix socket (QEMU's chardev socket or `qemu-ga -m unix-listen`);
    /// reconnects to the same path if the connection drops.
    pub async fn connect_unix(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let stream = bounded_connect(config.sync_timeout, UnixStream::connect(&path))
            .await
            .map_err(connect_failed(Address::Unix(path.clone())))?;
        Ok(Self::with_config(stream, config)
            .with_reconnect(move || UnixStream::connect(path.clone())))
    }
}

impl AsyncClient<TcpStream> {
    /// Connects to `host:port`; reconnects if the connection drops.
    pub async fn connect_tcp(addr: &str, config: ClientConfig) -> Result<Self> {
        let addr = addr.to_owned();
        let stream = bounded_connect(config.sync_timeout, TcpStream::connect(&addr))
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
        async fn open(address: Address) -> io::Result<BoxedStream> {
            Ok(match address {
                Address::Unix(p) => Box::new(UnixStream::connect(p).await?),
                Address::Tcp(hp) => Box::new(TcpStream::connect(hp).await?),
                Address::Serial(p) => Box::new(AsyncCharDevice::open(p)?),
            })
        }
        let stream = bounded_connect(config.sync_timeout, open(address.clone()))
            .await
            .map_err(connect_failed(address))?;
        let address = address.clone();
        Ok(Self::with_config(stream, config).with_reconnect(move || open(address.clone())))
    }
}
