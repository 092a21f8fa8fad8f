//! The blocking client.

use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::address::Address;
use crate::cmd::{self, Command};
use crate::error::{connect_failed, Error, Result};
use crate::ext::{Backoff, ExecOutput, FILE_CHUNK};
use crate::session::{decode, Await, Caps, ClientConfig, Session, Step};
use crate::transport::{CharDevice, Transport};
use crate::types::GuestAgentInfo;

type Connector<S> = Box<dyn FnMut() -> io::Result<S> + Send>;

const READ_CHUNK: usize = 64 * 1024;

/// How long closing a client whose last call was left unfinished keeps
/// reading late replies.
pub const DRAIN_TIME: Duration = Duration::from_millis(100);

/// Blocking guest agent client over any [`Transport`] (Unix socket, TCP,
/// character device, or `Box<dyn Transport>`).
///
/// Same guarantees as [`crate::AsyncClient`]: every call is bounded in time,
/// the channel is re-synchronised before the first command and after any
/// fault, missing or disabled commands fail before anything is sent. The
/// blocking client does not implement the async [`crate::GuestAgent`] trait
/// (that would block an executor); typed calls go through [`Client::call`]:
///
/// ```
/// # fn main() -> Result<(), qga_proto::Error> {
/// use qga_proto::cmd;
///
/// let mut client = qga_proto::fake::FakeAgent::linux().connect_blocking()?;
/// let os = client.call::<cmd::GuestGetOsinfo>(&())?;
/// assert_eq!(os.id.as_deref(), Some("debian"));
/// # Ok(()) }
/// ```
pub struct Client<S: Transport> {
    stream: Option<S>,
    session: Session,
    connector: Option<Connector<S>>,
    buf: Vec<u8>,
}

impl<S: Transport> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.stream.is_some())
            .field("in_sync", &self.session.in_sync)
            .field("config", &self.session.config)
            .finish_non_exhaustive()
    }
}

impl<S: Transport> Client<S> {
    /// A client on an already connected channel, with default settings.
    pub fn new(stream: S) -> Self {
        Self::with_config(stream, ClientConfig::default())
    }

    /// A client on an already connected channel.
    pub fn with_config(stream: S, config: ClientConfig) -> Self {
        Client {
            stream: Some(stream),
            session: Session::new(config),
            connector: None,
            buf: vec![0; READ_CHUNK],
        }
    }

    /// Lets the client reconnect with `connect` when the channel closes.
    pub fn with_reconnect(
        mut self,
        connect: impl FnMut() -> io::Result<S> + Send + 'static,
    ) -> Self {
        self.connector = Some(Box::new(connect));
        self
    }

    /// The settings in force.
    pub fn config(&self) -> &ClientConfig {
        &self.session.config
    }

    /// Changes the settings; takes effect with the next call.
    pub fn set_config(&mut self, config: ClientConfig) {
        if self.session.decoder.max_reply_size() != config.max_reply_size {
            self.session.decoder = crate::wire::Decoder::with_max_reply_size(config.max_reply_size);
            self.session.in_sync = false;
        }
        self.session.config = config;
    }

    /// Forces a re-synchronisation now.
    pub fn resync(&mut self) -> Result<()> {
        self.session.in_sync = false;
        self.ready()
    }

    /// Closes the channel. If a call was left unfinished (timeout, silent
    /// command), replies still in flight are read first for up to
    /// [`DRAIN_TIME`]: qemu-ga 7.2 exits when a client closes a Unix socket
    /// with replies unread. Dropping the client does the same.
    pub fn close(self) {
        drop(self);
    }

    fn drain(&mut self) {
        if self.session.in_sync {
            return;
        }
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let deadline = Instant::now() + DRAIN_TIME;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
                return;
            }
            match stream.read(&mut self.buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// `guest-info` as cached by the capability check.
    pub fn capabilities(&mut self) -> Result<Option<GuestAgentInfo>> {
        self.ready()?;
        if let Caps::Unknown = self.session.caps {
            let t = self.session.config.timeout;
            self.fetch_caps(t)?;
        }
        Ok(match &self.session.caps {
            Caps::Known(info) => Some(info.clone()),
            _ => None,
        })
    }

    /// Sends `name` with `args` and returns the agent's `return` value.
    pub fn execute_raw(&mut self, name: &str, args: Option<Value>) -> Result<Value> {
        let t = self.session.config.timeout;
        self.execute(name, args.as_ref(), t)
    }

    /// Like [`execute_raw`](Self::execute_raw) with an explicit timeout.
    pub fn execute_with_timeout(
        &mut self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.execute(name, args.as_ref(), timeout)
    }

    /// Typed call of command `C`.
    pub fn call<C: Command>(&mut self, args: &C::Args) -> Result<C::Returns> {
        let args = serde_json::to_value(args).map_err(|source| Error::Encode {
            command: C::NAME.to_owned(),
            source,
        })?;
        let args = (!args.is_null()).then_some(args);
        let t = self.session.config.timeout;
        let reply = self.execute(C::NAME, args.as_ref(), t)?;
        if !C::SUCCESS_RESPONSE {
            return decode(C::NAME, Value::Object(Default::default()));
        }
        decode(C::NAME, reply)
    }

    /// Starts a process, polls `guest-exec-status` with back-off until it
    /// exits, and returns its decoded output; `timeout` bounds the wait.
    pub fn exec_wait(
        &mut self,
        args: cmd::GuestExecArgs,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let pid = self.call::<cmd::GuestExec>(&args)?.pid;
        let started = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let status = self.call::<cmd::GuestExecStatus>(&cmd::GuestExecStatusArgs { pid })?;
            if status.exited {
                return Ok(ExecOutput::from_status(pid, status));
            }
            let pause = backoff.pause(pid, started.elapsed(), timeout)?;
            std::thread::sleep(pause);
        }
    }

    /// Reads a whole guest file in [`FILE_CHUNK`] pieces; always closes the handle.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let handle =
            self.call::<cmd::GuestFileOpen>(&cmd::GuestFileOpenArgs::new(path).mode("r"))?;
        let mut data = Vec::new();
        let result = loop {
            match self.call::<cmd::GuestFileRead>(&cmd::GuestFileReadArgs {
                handle,
                count: Some(FILE_CHUNK as i64),
            }) {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk.buf_b64.0);
                    if chunk.eof || chunk.count == 0 {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let closed = self
            .call::<cmd::GuestFileClose>(&cmd::GuestFileHandleArgs { handle })
            .map(drop);
        result.and(closed).map(|()| data)
    }

    /// Creates or truncates a guest file and writes `data` in [`FILE_CHUNK`]
    /// pieces; always closes the handle.
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let handle =
            self.call::<cmd::GuestFileOpen>(&cmd::GuestFileOpenArgs::new(path).mode("w"))?;
        let mut result = Ok(());
        for chunk in data.chunks(FILE_CHUNK) {
            let args = cmd::GuestFileWriteArgs {
                handle,
                buf_b64: chunk.into(),
                count: None,
            };
            match self.call::<cmd::GuestFileWrite>(&args) {
                Ok(w) if w.count == chunk.len() as i64 => {}
                Ok(w) => {
                    result = Err(Error::Protocol {
                        detail: format!(
                            "guest-file-write wrote {} of {} bytes",
                            w.count,
                            chunk.len()
                        ),
                    });
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self
                .call::<cmd::GuestFileFlush>(&cmd::GuestFileHandleArgs { handle })
                .map(drop);
        }
        let closed = self
            .call::<cmd::GuestFileClose>(&cmd::GuestFileHandleArgs { handle })
            .map(drop);
        result.and(closed)
    }

    /// Freezes filesystems (all, or `mountpoints`); the guard thaws when dropped.
    pub fn freeze(&mut self, mountpoints: Option<Vec<String>>) -> Result<FreezeGuard<'_, S>> {
        let frozen = match mountpoints {
            None => self.call::<cmd::GuestFsfreezeFreeze>(&())?,
            Some(list) => {
                self.call::<cmd::GuestFsfreezeFreezeList>(&cmd::GuestFsfreezeFreezeListArgs {
                    mountpoints: Some(list),
                })?
            }
        };
        Ok(FreezeGuard {
            client: self,
            frozen,
            armed: true,
        })
    }

    fn drop_connection(&mut self) {
        self.stream = None;
        self.session.reset_connection();
    }

    fn ready(&mut self) -> Result<()> {
        if self.stream.is_none() {
            let Some(connect) = self.connector.as_mut() else {
                return Err(Error::Disconnected { command: None });
            };
            let stream = connect()?;
            self.session.reset_connection();
            self.stream = Some(stream);
        }
        if !self.session.in_sync {
            self.sync()?;
        }
        if self.session.needs_caps() {
            let t = self.session.config.timeout;
            self.fetch_caps(t)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        let limit = self.session.config.sync_timeout;
        let attempts = self.session.config.sync_attempts.max(1);
        for _ in 0..attempts {
            let (bytes, mut wait) = self.session.begin_sync();
            let deadline = Instant::now() + limit;
            match self.write(&bytes, deadline, "guest-sync-delimited") {
                Ok(()) => {}
                Err(Error::Timeout { .. }) => continue,
                Err(e) => return Err(e),
            }
            if let Some(Step::Synced) =
                self.read_until(&mut wait, deadline, "guest-sync-delimited")?
            {
                self.session.caps = Caps::Unknown;
                return Ok(());
            }
        }
        Err(Error::SyncTimeout {
            timeout: limit,
            attempts,
        })
    }

    fn fetch_caps(&mut self, timeout: Duration) -> Result<()> {
        let reply = self.exchange(<cmd::GuestInfo as Command>::NAME, None, timeout, true);
        self.session.record_caps(reply)
    }

    fn execute(&mut self, name: &str, args: Option<&Value>, timeout: Duration) -> Result<Value> {
        self.ready()?;
        let replies = self.session.check_command(name)?;
        let adapted = self.session.adapt_arguments(name, args)?;
        self.exchange(name, adapted.as_ref().or(args), timeout, replies)
    }

    fn exchange(
        &mut self,
        name: &str,
        args: Option<&Value>,
        timeout: Duration,
        replies: bool,
    ) -> Result<Value> {
        let (bytes, mut wait, wait_for) =
            self.session.start_exchange(name, args, replies, timeout)?;
        let deadline = Instant::now() + wait_for;
        self.write(&bytes, deadline, name)?;
        let outcome = self.read_until(&mut wait, deadline, name);
        self.session.conclude(name, outcome, replies, wait_for)
    }

    fn write(&mut self, bytes: &[u8], deadline: Instant, command: &str) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Disconnected {
                command: Some(command.to_owned()),
            });
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| stream.write_all(bytes))
            .and_then(|()| stream.flush());
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_timeout(&e) => {
                self.session.in_sync = false;
                Err(Error::Timeout {
                    command: command.to_owned(),
                    timeout: remaining,
                })
            }
            Err(e) => {
                self.drop_connection();
                Err(io_error(e, command))
            }
        }
    }

    fn read_until(
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
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Error::Disconnected {
                    command: Some(command.to_owned()),
                });
            };
            let result = stream
                .set_read_timeout(Some(remaining))
                .and_then(|()| stream.read(&mut self.buf));
            match result {
                Ok(0) => {
                    self.drop_connection();
                    return Err(Error::Disconnected {
                        command: Some(command.to_owned()),
                    });
                }
                Ok(n) => self.session.decoder.push(&self.buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.drop_connection();
                    return Err(io_error(e, command));
                }
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
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

/// Connects to the Unix socket at `path` within `limit`.
///
/// A blocking connect to a Unix socket whose listen queue is full waits until the server
/// accepts, without any bound: QEMU's chardev socket serves one client and queues one more, so
/// while another client holds it a third connect would hang. The connect runs on a helper
/// thread; when it has not completed within `limit` the channel is reported busy and the
/// thread, still waiting in the kernel, drops the stream as soon as it gets one.
pub(crate) fn unix_connect_within(path: &Path, limit: Duration) -> Result<UnixStream> {
    let (done, outcome) = std::sync::mpsc::sync_channel(1);
    let target = path.to_owned();
    std::thread::Builder::new()
        .name("qga-connect".into())
        .spawn(move || {
            let _ = done.send(UnixStream::connect(target));
        })
        .map_err(Error::Io)?;
    match outcome.recv_timeout(limit) {
        Ok(result) => result.map_err(Error::Io),
        Err(_) => Err(Error::ChannelBusy {
            address: Address::Unix(path.to_owned()).to_string(),
            waited: limit,
        }),
    }
}

impl<S: Transport> Drop for Client<S> {
    fn drop(&mut self) {
        self.drain();
    }
}

impl Client<UnixStream> {
    /// Connects to a Unix socket; reconnects to the same path if the connection drops.
    pub fn connect_unix(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let limit = config.connect_timeout;
        let stream = unix_connect_within(&path, limit)
            .map_err(connect_failed(Address::Unix(path.clone())))?;
        Ok(Self::with_config(stream, config).with_reconnect(move || {
            unix_connect_within(&path, limit).map_err(|e| match e {
                Error::Io(e) => e,
                other => io::Error::new(io::ErrorKind::WouldBlock, other.to_string()),
            })
        }))
    }
}

impl Client<TcpStream> {
    /// Connects to `host:port`; reconnects if the connection drops.
    pub fn connect_tcp(addr: &str, config: ClientConfig) -> Result<Self> {
        let addr = addr.to_owned();
        let limit = config.connect_timeout;
        let stream = tcp_connect(&addr, limit)
            .map_err(Error::Io)
            .map_err(connect_failed(Address::Tcp(addr.clone())))?;
        Ok(Self::with_config(stream, config).with_reconnect(move || tcp_connect(&addr, limit)))
    }
}

impl Client<CharDevice> {
    /// Opens a character device such as
    /// [`VIRTIO_PORT_PATH`](crate::address::VIRTIO_PORT_PATH).
    pub fn open_serial(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let device = CharDevice::open(&path)
            .map_err(Error::Io)
            .map_err(connect_failed(Address::Serial(path.as_ref().to_owned())))?;
        Ok(Self::with_config(device, config))
    }
}

impl Client<Box<dyn Transport>> {
    /// Connects to an address such as `qga+unix:///run/qga.sock`.
    pub fn connect(address: &str, config: ClientConfig) -> Result<Self> {
        Self::connect_address(&Address::parse(address)?, config)
    }

    /// Connects to a parsed [`Address`].
    pub fn connect_address(address: &Address, config: ClientConfig) -> Result<Self> {
        let limit = config.connect_timeout;
        let open = move |address: &Address| -> io::Result<Box<dyn Transport>> {
            Ok(match address {
                Address::Unix(p) => {
                    Box::new(unix_connect_within(p, limit).map_err(|e| match e {
                        Error::Io(e) => e,
                        other => io::Error::new(io::ErrorKind::WouldBlock, other.to_string()),
                    })?)
                }
                Address::Tcp(hp) => Box::new(tcp_connect(hp, limit)?),
                Address::Serial(p) => Box::new(CharDevice::open(p)?),
            })
        };
        let stream = open(address)
            .map_err(Error::Io)
            .map_err(connect_failed(address))?;
        let address = address.clone();
        Ok(Self::with_config(stream, config).with_reconnect(move || open(&address)))
    }
}

/// Frozen filesystems of a blocking [`Client`]; thaws when dropped.
#[must_use = "dropping the guard thaws the filesystems at once"]
#[derive(Debug)]
pub struct FreezeGuard<'a, S: Transport> {
    client: &'a mut Client<S>,
    frozen: i64,
    armed: bool,
}

impl<S: Transport> FreezeGuard<'_, S> {
    /// Number of filesystems the freeze reported.
    pub fn frozen(&self) -> i64 {
        self.frozen
    }

    /// Thaws now; returns the number of filesystems thawed.
    pub fn thaw(mut self) -> Result<i64> {
        self.armed = false;
        self.client.call::<cmd::GuestFsfreezeThaw>(&())
    }
}

impl<S: Transport> Drop for FreezeGuard<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            // Nobody is left to report a failure to; the agent's own freeze
            // timeout (Windows VSS) or the next thaw call recovers.
            let _ = self.client.call::<cmd::GuestFsfreezeThaw>(&());
        }
    }
}

/// Connects to `host:port`, trying each resolved address for at most `limit`.
fn tcp_connect(addr: &str, limit: Duration) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to no address"),
    );
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, limit.max(Duration::from_millis(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}
