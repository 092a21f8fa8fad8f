//! The blocking client.

use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::address::Address;
use crate::error::{connect_failed, Error, Result};
use crate::monitor::Monitor;
use crate::session::{ClientConfig, EventFilter, Handshake, Session, SubscriptionId};
use crate::transport::{tcp_connect, Transport};
use crate::wire::{Event, Greeting};

const READ_CHUNK: usize = 64 * 1024;

/// A blocking QMP client over any [`Transport`] (Unix socket, TCP, or `Box<dyn Transport>`).
///
/// Every step is bounded in time: the handshake by
/// [`ClientConfig::handshake_timeout`], each command by [`ClientConfig::timeout`] or its
/// own. Events arriving while a command waits are kept for their subscribers. A fatal fault
/// (the socket closed, a message too large, something that is not QMP) ends the connection:
/// every later call returns that error; connect again for a new one.
///
/// ```no_run
/// # fn main() -> Result<(), qmp_proto::Error> {
/// use qmp_proto::{Client, ClientConfig, MonitorExt, cmd};
///
/// let mut qemu = Client::connect("qmp+unix:///run/qemu/vm.qmp", ClientConfig::default())?;
/// println!("QEMU {}", qemu.greeting().version.qemu);
/// let status = qemu.call::<cmd::QueryStatus>(&())?;
/// println!("{}", status.status);
/// # Ok(()) }
/// ```
pub struct Client<S: Transport = Box<dyn Transport>> {
    stream: S,
    session: Session,
    greeting: Greeting,
    buf: Vec<u8>,
}

impl<S: Transport> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("qemu", &self.greeting.version.qemu)
            .field("oob", &self.session.oob_enabled())
            .field("in_flight", &self.session.in_flight())
            .field("fatal", &self.session.fatal())
            .finish_non_exhaustive()
    }
}

impl<S: Transport> Client<S> {
    /// Reads the greeting on a freshly connected `stream` and negotiates capabilities, within
    /// [`ClientConfig::handshake_timeout`].
    pub fn handshake(stream: S, config: ClientConfig) -> Result<Self> {
        let deadline = Instant::now() + config.handshake_timeout;
        let timeout = config.handshake_timeout;
        let mut io = Io {
            stream,
            buf: vec![0; READ_CHUNK],
        };
        let mut session = Session::new(config);
        loop {
            match session.poll_handshake()? {
                Handshake::Done => break,
                Handshake::Send(bytes) => {
                    if !io.write(&mut session, &bytes, deadline)? {
                        return Err(Error::GreetingTimeout { timeout });
                    }
                }
                Handshake::NeedBytes => {
                    if !io.read(&mut session, deadline) {
                        return Err(Error::GreetingTimeout { timeout });
                    }
                }
            }
        }
        let greeting = session.greeting().cloned().ok_or_else(|| Error::Protocol {
            detail: "handshake ended without a greeting".to_owned(),
        })?;
        Ok(Client {
            stream: io.stream,
            session,
            greeting,
            buf: io.buf,
        })
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The settings in force.
    pub fn config(&self) -> &ClientConfig {
        self.session.config()
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.session.oob_enabled()
    }

    /// The error that ended the connection, if one did.
    pub fn fatal(&self) -> Option<&Error> {
        self.session.fatal()
    }

    /// Sends `command` out of band (`exec-oob`); needs [`ClientConfig::oob`] and a monitor
    /// that offers it.
    pub fn execute_oob(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.exchange(command, arguments.as_ref(), timeout, true)
    }

    fn exchange(
        &mut self,
        command: &str,
        arguments: Option<&Value>,
        timeout: Duration,
        oob: bool,
    ) -> Result<Value> {
        let (id, bytes) = self.session.start_command(command, arguments, oob)?;
        let deadline = Instant::now() + timeout;
        let mut io = Io {
            stream: &mut self.stream,
            buf: std::mem::take(&mut self.buf),
        };
        let mut finished = io.write(&mut self.session, &bytes, deadline)?;
        let outcome = loop {
            if let Some(reply) = self.session.take_reply(id) {
                break reply;
            }
            if !finished || !io.read(&mut self.session, deadline) {
                self.session.abandon(id);
                break Err(Error::Timeout {
                    command: command.to_owned(),
                    timeout,
                });
            }
            finished = true;
        };
        self.buf = io.buf;
        outcome
    }
}

/// The stream and read buffer, apart from the session so both can be borrowed at once.
struct Io<T> {
    stream: T,
    buf: Vec<u8>,
}

impl<T: Transport> Io<T> {
    /// Reads once, within `deadline`, into the session. Returns `false` when the deadline
    /// passed with nothing read; a closed socket or an I/O error ends the session (which
    /// then reports it) and counts as progress.
    fn read(&mut self, session: &mut Session, deadline: Instant) -> bool {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            let result = self
                .stream
                .set_read_timeout(Some(remaining))
                .and_then(|()| self.stream.read(&mut self.buf));
            match result {
                Ok(0) => session.fail(Error::Disconnected { command: None }),
                Ok(n) => session.receive(&self.buf[..n]),
                Err(e) if is_timeout(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => session.fail(io_error(e)),
            }
            return true;
        }
    }

    /// Reads once what has already arrived, without waiting, into the session. Returns
    /// `false` when nothing had; like [`read`](Self::read) otherwise. A transport without
    /// non-blocking reads waits the shortest read timeout instead.
    fn read_ready(&mut self, session: &mut Session) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return self.read(session, Instant::now() + Duration::from_millis(1));
        }
        let result = loop {
            match self.stream.read(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        // A stream left non-blocking would fail the next command's reads: that ends the
        // session.
        if let Err(e) = self.stream.set_nonblocking(false) {
            session.fail(io_error(e));
            return true;
        }
        match result {
            Ok(0) => session.fail(Error::Disconnected { command: None }),
            Ok(n) => session.receive(&self.buf[..n]),
            Err(e) if is_timeout(&e) => return false,
            Err(e) => session.fail(io_error(e)),
        }
        true
    }

    /// Writes all of `bytes` within `deadline`. Returns `Ok(false)` when the deadline passed
    /// first; a request cut in the middle leaves the stream unusable, so that also ends the
    /// session.
    fn write(&mut self, session: &mut Session, bytes: &[u8], deadline: Instant) -> Result<bool> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = self
            .stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| self.stream.write_all(bytes))
            .and_then(|()| self.stream.flush());
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_timeout(&e) => {
                session.fail(Error::Protocol {
                    detail: "a request could not be written in time; the stream is out of step"
                        .to_owned(),
                });
                Ok(false)
            }
            Err(e) => {
                session.fail(io_error(e));
                Ok(true)
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

fn io_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Error::Disconnected { command: None },
        _ => Error::Io(e),
    }
}

impl<S: Transport> Monitor for Client<S> {
    fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    fn execute_raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let timeout = self.session.config().timeout;
        self.exchange(command, arguments.as_ref(), timeout, false)
    }

    fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.exchange(command, arguments.as_ref(), timeout, false)
    }

    fn subscribe(&mut self, filter: EventFilter) -> Result<SubscriptionId> {
        Ok(self.session.subscribe(filter))
    }

    fn unsubscribe(&mut self, subscription: SubscriptionId) -> Result<()> {
        self.session.unsubscribe(subscription)
    }

    fn next_event(
        &mut self,
        subscription: SubscriptionId,
        timeout: Duration,
    ) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        let mut io = Io {
            stream: &mut self.stream,
            buf: std::mem::take(&mut self.buf),
        };
        let outcome = loop {
            match self.session.next_event(subscription) {
                Ok(None) => {}
                other => break other,
            }
            let progressed = if timeout.is_zero() {
                io.read_ready(&mut self.session)
            } else {
                io.read(&mut self.session, deadline)
            };
            if !progressed {
                break Ok(None);
            }
        };
        self.buf = io.buf;
        outcome
    }
}

impl Client<UnixStream> {
    /// Connects to the Unix socket at `path` and does the handshake.
    pub fn connect_unix(path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let path = path.as_ref();
        let stream =
            UnixStream::connect(path).map_err(connect_failed(Address::Unix(path.to_owned())))?;
        Self::handshake(stream, config)
    }
}

impl Client<TcpStream> {
    /// Connects to `host:port` and does the handshake; connecting counts against
    /// [`ClientConfig::handshake_timeout`].
    pub fn connect_tcp(addr: &str, config: ClientConfig) -> Result<Self> {
        let stream = tcp_connect(addr, config.handshake_timeout)
            .map_err(connect_failed(Address::Tcp(addr.to_owned())))?;
        Self::handshake(stream, config)
    }
}

impl Client<Box<dyn Transport>> {
    /// Connects to an address such as `qmp+unix:///run/qemu/vm.qmp` or
    /// `qmp+tcp://127.0.0.1:4444` and does the handshake.
    pub fn connect(address: &str, config: ClientConfig) -> Result<Self> {
        Self::connect_address(&Address::parse(address)?, config)
    }

    /// Connects to a parsed [`Address`] and does the handshake.
    pub fn connect_address(address: &Address, config: ClientConfig) -> Result<Self> {
        let stream: Box<dyn Transport> = match address {
            Address::Unix(p) => Box::new(UnixStream::connect(p).map_err(connect_failed(address))?),
            Address::Tcp(hp) => Box::new(
                tcp_connect(hp, config.handshake_timeout).map_err(connect_failed(address))?,
            ),
        };
        Self::handshake(stream, config)
    }
}
