//! A fake guest agent for tests: stateful, programmable, and speaking the real
//! wire protocol over an in-memory channel, so the code under test runs the
//! real client.
//!
//! [`FakeAgent::linux`] starts out like `qemu-ga` on a small Debian guest:
//! `guest-info` lists the Linux commands, the informational commands answer
//! with plausible data, files live in an in-memory filesystem (handles count
//! from 1000 as in qemu-ga), `guest-exec` runs a few canned programs
//! (`echo`, `cat`, `true`, `false`, `sleep`, `uname`, `sh -c` with `echo`, `cat`, `exit`) and forgets a
//! process after reporting its exit once, shutdown and suspend answer nothing.
//! Errors use qemu-ga's classes and texts.
//!
//! Testing your own code against it:
//!
//! ```
//! use qga_proto::{GuestAgent, Result};
//!
//! /// Code under test: works with any agent.
//! async fn guest_summary(agent: &dyn GuestAgent) -> Result<String> {
//!     let host = agent.host_name().await?.host_name;
//!     let os = agent.osinfo().await?;
//!     Ok(format!("{host}: {}", os.pretty_name.unwrap_or_else(|| "unknown OS".into())))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! use qga_proto::fake::{FakeAgent, Fault};
//!
//! let fake = FakeAgent::linux();
//! fake.state().host_name = "web-1".into();
//! // The first osinfo reply is garbled on the channel; the client copes.
//! fake.fault_on("guest-get-osinfo", Fault::ReplaceReply(b"\x00noise\n".to_vec()));
//!
//! let client = fake.clone().connect_async();
//! let summary = guest_summary(&client).await;
//! assert!(summary.is_err(), "garbage in place of a reply is reported, not swallowed");
//! assert_eq!(guest_summary(&client).await?, "web-1: Debian GNU/Linux 12 (bookworm)");
//! assert!(fake.state().requests.iter().any(|r| r == "guest-get-osinfo"));
//!
//! // Disabled commands fail before anything is sent.
//! fake.state().disable("guest-get-host-name");
//! let client = fake.clone().connect_async();
//! assert!(guest_summary(&client).await.unwrap_err().is_unsupported());
//! # Ok(()) }
//! ```

mod builtin;
mod conn;
mod release;
mod state;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

pub use self::release::AgentRelease;
pub use self::state::{
    Account, ExecOutcome, ExecRequest, FakeCommand, FakeEvent, FakeState, OpenFile, Program,
};
use crate::client::Client;
use crate::session::ClientConfig;

pub(crate) use self::state::FROZEN_ALLOWED;

/// What a handler answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": class, "desc": desc}}`.
    Error {
        /// Error class, e.g. `GenericError`.
        class: String,
        /// Description.
        desc: String,
    },
    /// Nothing at all (success of shutdown and suspend).
    NoReply,
}

impl Response {
    /// An error response.
    pub fn error(class: &str, desc: impl Into<String>) -> Self {
        Response::Error {
            class: class.to_owned(),
            desc: desc.into(),
        }
    }

    /// A `GenericError` response.
    pub fn generic(desc: impl Into<String>) -> Self {
        Response::error("GenericError", desc)
    }

    /// A return value, serialised.
    pub fn ok<T: serde::Serialize>(value: T) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => Response::Return(v),
            Err(e) => Response::generic(format!("fake agent could not serialise its reply: {e}")),
        }
    }
}

/// A programmable command handler: gets the state and the `arguments` object.
pub type Handler = Arc<dyn Fn(&mut FakeState, &Value) -> Response + Send + Sync>;

/// A scripted misbehaviour, applied to one request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Write these bytes before the reply.
    Garbage(Vec<u8>),
    /// Write these bytes instead of the reply (a reply garbled on the way).
    ReplaceReply(Vec<u8>),
    /// Write this stale `{"return": value}` line before the reply.
    StaleReply(Value),
    /// Wait this long before replying (the agent is single-threaded: later
    /// requests wait too).
    Delay(Duration),
    /// Run the command but never send its reply.
    DropReply,
    /// Close the connection instead of running the command.
    Disconnect,
    /// Stop answering anything on this connection (a hung agent).
    Hang,
}

/// Shared handle to a fake agent's state.
#[derive(Clone, Debug)]
pub(crate) struct FakeShared(Arc<Mutex<FakeState>>);

impl FakeShared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panicking handler must not take the whole fake down with it.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A fake guest agent. Cloning gives another handle to the same state, so a
/// test keeps one handle to inspect and script while the client uses another.
#[derive(Clone, Debug)]
pub struct FakeAgent {
    shared: FakeShared,
}

impl FakeAgent {
    /// A fake that behaves like qemu-ga 10.0 on a Debian guest.
    pub fn linux() -> Self {
        Self::with_state(FakeState::linux())
    }

    /// A fake that behaves like `release` of qemu-ga on a Debian guest: that release's
    /// commands, reply members and error texts, for testing a tool against an old agent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), qga_proto::Error> {
    /// use qga_proto::fake::{AgentRelease, FakeAgent};
    /// use qga_proto::{Error, GuestAgent};
    ///
    /// let agent = FakeAgent::linux_release(AgentRelease::Qemu7_2).connect_async();
    /// assert_eq!(agent.info().await?.version, "7.2.22");
    /// // guest-get-load came with 10.0: refused before sending, with the advice to upgrade.
    /// assert!(matches!(agent.load().await, Err(Error::CommandNotSupported { .. })));
    /// # Ok(()) }
    /// ```
    pub fn linux_release(release: AgentRelease) -> Self {
        Self::with_state(FakeState::linux_release(release))
    }

    /// A fake that behaves like the virtio-win agent on a Windows guest.
    pub fn windows() -> Self {
        Self::with_state(FakeState::windows())
    }

    /// A fake with the given state.
    pub fn with_state(state: FakeState) -> Self {
        FakeAgent {
            shared: FakeShared(Arc::new(Mutex::new(state))),
        }
    }

    pub(crate) fn shared(&self) -> FakeShared {
        self.shared.clone()
    }

    /// Locks the state for inspection or changes.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.shared.lock()
    }

    /// Installs `handler` for command `name` (registering the command if new).
    pub fn handler<F>(&self, name: &str, handler: F) -> &Self
    where
        F: Fn(&mut FakeState, &Value) -> Response + Send + Sync + 'static,
    {
        let mut state = self.state();
        state.register(name, true);
        state.handlers.insert(name.to_owned(), Arc::new(handler));
        drop(state);
        self
    }

    /// Applies `fault` to the next request, whatever it is (including the
    /// client's own `guest-sync-delimited`).
    pub fn fault(&self, fault: Fault) -> &Self {
        self.state().faults.push_back((None, fault));
        self
    }

    /// Applies `fault` to the next request for command `name`.
    pub fn fault_on(&self, name: &str, fault: Fault) -> &Self {
        self.state()
            .faults
            .push_back((Some(name.to_owned()), fault));
        self
    }

    /// Serves one connection on a blocking stream until it closes.
    pub fn serve_blocking<S: Read + Write>(&self, mut stream: S) {
        let mut conn = conn::Connection::new(self.shared());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for output in conn.receive(&buf[..n]) {
                match output {
                    conn::Output::Bytes(b) => {
                        if stream.write_all(&b).and_then(|()| stream.flush()).is_err() {
                            return;
                        }
                    }
                    conn::Output::Delay(d) => std::thread::sleep(d),
                    conn::Output::Close => return,
                    conn::Output::Hang => {
                        // Keep the channel open but never answer again.
                        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                        return;
                    }
                }
            }
        }
    }

    /// Connects a blocking [`Client`] to this fake over a socket pair served by
    /// a background thread. Reconnects (after [`Fault::Disconnect`]) get a new
    /// connection to the same state.
    pub fn connect_blocking(self) -> std::io::Result<Client<UnixStream>> {
        self.connect_blocking_with(ClientConfig::default())
    }

    /// Like [`connect_blocking`](Self::connect_blocking) with settings.
    pub fn connect_blocking_with(
        self,
        config: ClientConfig,
    ) -> std::io::Result<Client<UnixStream>> {
        let open = move || -> std::io::Result<UnixStream> {
            let (client, server) = UnixStream::pair()?;
            let agent = self.clone();
            std::thread::Builder::new()
                .name("qga-fake-agent".into())
                .spawn(move || agent.serve_blocking(server))?;
            Ok(client)
        };
        let stream = open()?;
        Ok(Client::with_config(stream, config).with_reconnect(open))
    }
}

/// A fake agent served on a real Unix socket, one client at a time as QEMU's chardev socket
/// serves it ([`FakeAgent::listen_unix`]). Dropping it stops accepting and removes the
/// socket file; a client still connected is served until it leaves.
#[derive(Debug)]
pub struct FakeSocket {
    path: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeSocket {
    /// The socket's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for FakeSocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept so that the thread sees the flag; a full queue only delays that.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FakeAgent {
    /// Serves this fake on a Unix socket at `path`, as QEMU serves an agent's chardev socket
    /// (`-chardev socket,server=on,…`): one client at a time, the next one accepted when it
    /// leaves, so a second client waits in the listen queue exactly as with a real VM. For
    /// tests of host-side tools that take socket paths (a monitor of many guests, a CLI).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use qga_proto::{cmd, Client, ClientConfig};
    /// use qga_proto::fake::FakeAgent;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let socket = FakeAgent::linux().listen_unix(dir.path().join("101.qga"))?;
    /// let mut client = Client::connect_unix(socket.path(), ClientConfig::default())?;
    /// assert!(!client.call::<cmd::GuestGetHostName>(&())?.host_name.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<FakeSocket> {
        let path = path.as_ref().to_owned();
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent = self.clone();
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("qga-fake-socket".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        agent.serve_blocking(stream);
                    }
                }
            })?;
        Ok(FakeSocket { path, stop })
    }
}

#[cfg(feature = "tokio")]
mod async_side {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

    use super::{conn, FakeAgent};
    use crate::async_client::AsyncClient;
    use crate::session::ClientConfig;

    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    impl FakeAgent {
        /// Serves one connection on an async stream until it closes.
        pub async fn serve_async<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) {
            let mut conn = conn::Connection::new(self.shared());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for output in conn.receive(&buf[..n]) {
                    match output {
                        conn::Output::Bytes(b) => {
                            if stream.write_all(&b).await.is_err() || stream.flush().await.is_err()
                            {
                                return;
                            }
                        }
                        conn::Output::Delay(d) => tokio::time::sleep(d).await,
                        conn::Output::Close => return,
                        conn::Output::Hang => {
                            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                            return;
                        }
                    }
                }
            }
        }

        /// Connects an [`AsyncClient`] to this fake over an in-memory duplex
        /// stream served by a spawned task. Reconnects get a new connection
        /// to the same state.
        ///
        /// # Panics
        ///
        /// Outside a tokio runtime (the serving task needs one).
        pub fn connect_async(self) -> AsyncClient<DuplexStream> {
            self.connect_async_with(ClientConfig::default())
        }

        /// Like [`connect_async`](Self::connect_async) with settings.
        pub fn connect_async_with(self, config: ClientConfig) -> AsyncClient<DuplexStream> {
            let open = move || {
                let (client, server) = tokio::io::duplex(64 * 1024);
                let agent = self.clone();
                tokio::spawn(async move { agent.serve_async(server).await });
                client
            };
            let stream = open();
            AsyncClient::with_config(stream, config).with_reconnect(move || {
                let stream = open();
                async move { Ok(stream) }
            })
        }
    }
}

impl FakeState {
    pub(crate) fn take_fault(&mut self, name: &str) -> Option<Fault> {
        let index = self
            .faults
            .iter()
            .position(|(target, _)| target.as_deref().is_none_or(|t| t == name))?;
        self.faults.remove(index).map(|(_, f)| f)
    }
}

/// Queue type of scripted faults.
pub(crate) type FaultQueue = VecDeque<(Option<String>, Fault)>;
