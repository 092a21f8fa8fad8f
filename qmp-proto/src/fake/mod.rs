//! A fake QEMU monitor for tests: stateful, modelled on QEMU 7.2 and 10.0, and speaking the
//! real QMP wire (greeting, `qmp_capabilities`, commands with ids, events) over an in-memory
//! stream or a real Unix socket, so the code under test runs a real client.
//!
//! What it models, with QEMU's error classes and texts (captured from Debian's QEMU 7.2.22
//! and 10.0.13, see `qmp-proto/tests/fixtures/`; the `vmsdk-tests` differential test runs the
//! same scripts against both QEMUs and this fake):
//!
//! - the run state (`prelaunch` → `cont` → `running` ⇄ `stop`, with `STOP`/`RESUME` events);
//! - block nodes from `blockdev-add` (`null-co`, `raw`, `qcow2` over `file` with an optional
//!   backing node) whose data are [`MemoryDisk`]s: image files are registered with
//!   [`FakeMonitorBuilder::image`], or created by `blockdev-create` jobs;
//! - dirty bitmaps per node (granularity, recording, persistent on qcow2 only, busy while an
//!   export or a job uses them) and the whole `block-dirty-bitmap-*` family;
//! - `transaction`, all-or-nothing;
//! - `blockdev-backup` jobs with their `JOB_STATUS_CHANGE` / `BLOCK_JOB_*` events, `query-jobs`,
//!   cancel, finalize and dismiss. `sync: none` keeps running and gives a real point-in-time
//!   view: a guest write ([`FakeMonitor::guest_write`]) to the source first copies the old
//!   clusters to the target (copy-before-write). `full` and `incremental` copy at once.
//! - the NBD server and its exports (`block-export-add` checks names, bitmaps, the
//!   read-only-export rule): state only by default; with [`FakeMonitorBuilder::serve_nbd`]
//!   `nbd-server-start` listens on its Unix socket and serves the exports over NBD (structured
//!   replies, `base:allocation`, `qemu:dirty-bitmap:NAME`), so a backup tool reads them with
//!   its real NBD client. [`FakeMonitor::export_disk`] reads them without NBD;
//! - the balloon (`query-balloon`, `balloon`, `qom-get` of `guest-stats`), per-node
//!   `query-blockstats`, and `human-monitor-command` (`info status`, `qemu-io NODE "write -P
//!   pattern offset length"`).
//!
//! It has no guest devices (`query-block` is empty) and no CPUs.
//!
//! Testing your own code against it, through the real client:
//!
//! ```
//! use disk_transport::memory::MemoryDisk;
//! use qmp_proto::cmd::{
//!     BlockDirtyBitmapAdd, BlockDirtyBitmapAddArgs, QueryNamedBlockNodes, QueryNamedBlockNodesArgs,
//! };
//! use qmp_proto::fake::{FakeMonitor, ImageFormat, QemuRelease};
//! use qmp_proto::{ErrorClass, Monitor, MonitorExt};
//!
//! /// Code under test: the dirty bitmaps of every node, as `(node, bitmap, dirty bytes)`.
//! fn bitmaps(monitor: &mut impl Monitor) -> qmp_proto::Result<Vec<(String, String, u64)>> {
//!     let nodes = monitor.call::<QueryNamedBlockNodes>(&QueryNamedBlockNodesArgs::flat())?;
//!     Ok(nodes
//!         .into_iter()
//!         .flat_map(|n| {
//!             let node = n.node_name.unwrap_or_default();
//!             n.dirty_bitmaps.unwrap_or_default().into_iter().filter_map(move |b| {
//!                 Some((node.clone(), b.name?, b.count))
//!             })
//!         })
//!         .collect())
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let fake = FakeMonitor::builder()
//!     .release(QemuRelease::V7_2)
//!     .image("/images/vm.qcow2", ImageFormat::Qcow2, MemoryDisk::new(64 << 20))
//!     .build();
//! let mut qemu = fake.connect()?;
//! assert_eq!(qemu.greeting().version.qemu.major, 7);
//! qemu.execute_raw(
//!     "blockdev-add",
//!     Some(serde_json::json!({"driver": "qcow2", "node-name": "vda",
//!         "file": {"driver": "file", "filename": "/images/vm.qcow2"}})),
//! )?;
//! qemu.call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("vda", "b0"))?;
//! fake.guest_write("vda", &[0xab; 4096], 1 << 20)?; // the guest writes
//! assert_eq!(bitmaps(&mut qemu)?, [("vda".to_owned(), "b0".to_owned(), 65536)]);
//!
//! // QEMU's own refusal, with its class and text.
//! let err = qemu
//!     .call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("vda", "b0"))
//!     .unwrap_err();
//! assert_eq!(err.class(), Some(&ErrorClass::GenericError));
//! assert!(err.to_string().contains("Bitmap already exists: b0"));
//! # Ok(()) }
//! ```

mod bitmap;
mod commands;
mod conn;
mod export;
mod graph;
mod jobs;
mod nbd;
mod release;
mod state;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use disk_transport::memory::MemoryDisk;
use serde_json::Value;

use crate::{Client, ClientConfig};

pub use self::export::ExportDisk;
pub use self::release::QemuRelease;
pub use self::state::{
    Balloon, BlockExport, BlockNode, DirtyBitmap, FakeState, ImageFile, ImageFormat, Job, JobKind,
    JobStatus, RunState, DEFAULT_CLUSTER,
};

/// How often a serving loop looks for events raised outside a command (a guest write that
/// ends a job, [`FakeMonitor::emit_event`]).
const EVENT_POLL: Duration = Duration::from_millis(10);

/// What a programmed handler answers.
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
}

impl Response {
    /// An error response.
    pub fn error(class: &str, desc: impl Into<String>) -> Self {
        Response::Error {
            class: class.to_owned(),
            desc: desc.into(),
        }
    }

    /// A return value, serialised.
    pub fn ok<T: serde::Serialize>(value: T) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => Response::Return(v),
            Err(e) => Response::error(
                "GenericError",
                format!("fake monitor could not serialise its reply: {e}"),
            ),
        }
    }
}

/// A programmable command handler: gets the state and the `arguments` object.
pub type Handler = Arc<dyn Fn(&mut FakeState, &Value) -> Response + Send + Sync>;

/// A scripted misbehaviour, applied to one command.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Write these bytes before the reply.
    Garbage(Vec<u8>),
    /// Write these bytes instead of the reply.
    ReplaceReply(Vec<u8>),
    /// Write a reply for this id (one never sent) before the real reply.
    UnknownId(Value),
    /// Wait this long before replying (the monitor is single-threaded: later commands wait).
    Delay(Duration),
    /// Run the command but never send its reply.
    DropReply,
    /// Answer with this error instead of running the command.
    Error {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// Close the connection instead of running the command.
    Disconnect,
    /// Stop answering anything on this connection (a hung QEMU).
    Hang,
}

/// Queue of scripted faults: `(command or None for any, fault)`.
pub(crate) type FaultQueue = VecDeque<(Option<String>, Fault)>;

/// Shared handle to a fake monitor's state.
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

/// Builds a [`FakeMonitor`].
#[derive(Debug)]
pub struct FakeMonitorBuilder {
    state: FakeState,
}

impl FakeMonitorBuilder {
    /// The release to imitate (default: the newest, [`QemuRelease::V10_0`]).
    pub fn release(mut self, release: QemuRelease) -> Self {
        self.state.release = release;
        self
    }

    /// The initial run state (default: `prelaunch`, as with `-S`).
    pub fn run_state(mut self, run_state: RunState) -> Self {
        self.state.run_state = run_state;
        self
    }

    /// An image file `file` nodes can open at `path`.
    pub fn image(mut self, path: impl Into<String>, format: ImageFormat, disk: MemoryDisk) -> Self {
        self.state.add_image(path, format, disk);
        self
    }

    /// A virtio balloon device with QOM id `id` and `actual` bytes of guest memory.
    pub fn balloon(mut self, id: &str, actual: u64) -> Self {
        self.state.balloon = Some(Balloon {
            path: format!("/machine/peripheral/{id}"),
            actual,
            stats: Default::default(),
            last_update: 0,
            polling_interval: 0,
        });
        self
    }

    /// Makes `nbd-server-start` really listen on the Unix socket it names and serve the
    /// exports over NBD (default: the server and its exports are state only, and nothing is
    /// created on the file system). Read [`FakeMonitor::export_disk`] either way.
    pub fn serve_nbd(mut self, on: bool) -> Self {
        self.state.serve_nbd = on;
        self
    }

    /// The fake.
    pub fn build(self) -> FakeMonitor {
        let shared = Arc::new(Mutex::new(self.state));
        shared.lock().unwrap_or_else(|e| e.into_inner()).me = Some(Arc::downgrade(&shared));
        FakeMonitor {
            shared: FakeShared(shared),
        }
    }
}

/// A fake QEMU monitor; see the [module docs](self). Cloning gives another handle to the
/// same VM, so a test keeps one handle to script and inspect while clients use others.
#[derive(Clone, Debug)]
pub struct FakeMonitor {
    shared: FakeShared,
}

impl Default for FakeMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeMonitor {
    /// A QEMU 10.0 in `prelaunch` with no block nodes.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, starting from QEMU 10.0 in `prelaunch`.
    pub fn builder() -> FakeMonitorBuilder {
        FakeMonitorBuilder {
            state: FakeState::new(QemuRelease::V10_0),
        }
    }

    pub(crate) fn shared(&self) -> FakeShared {
        self.shared.clone()
    }

    /// Locks the state for inspection or changes.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.shared.lock()
    }

    /// Installs `handler` for command `name`, in place of the built-in one (or as a new
    /// command).
    pub fn handler<F>(&self, name: &str, handler: F) -> &Self
    where
        F: Fn(&mut FakeState, &Value) -> Response + Send + Sync + 'static,
    {
        self.state()
            .handlers
            .insert(name.to_owned(), Arc::new(handler));
        self
    }

    /// Applies `fault` to the next command after negotiation, whatever it is.
    pub fn fault(&self, fault: Fault) -> &Self {
        self.state().faults.push_back((None, fault));
        self
    }

    /// Applies `fault` to the next `name` command.
    pub fn fault_on(&self, name: &str, fault: Fault) -> &Self {
        self.state()
            .faults
            .push_back((Some(name.to_owned()), fault));
        self
    }

    /// Raises an event (to every negotiated connection).
    pub fn emit_event(&self, name: &str, data: Option<Value>) {
        self.state().emit(name, data);
    }

    /// A guest write through node `name`: as the guest's device writes, so a backup job
    /// reading the node first copies the old data to its target, and the node's recording
    /// bitmaps mark the written granules.
    pub fn guest_write(&self, node: &str, data: &[u8], offset: u64) -> Result<(), FakeError> {
        self.state()
            .guest_write(node, data, offset)
            .map_err(|e| FakeError(e.desc))
    }

    /// Reads what node `name` shows (through backing nodes, e.g. a fleecing overlay).
    pub fn guest_read(&self, node: &str, buf: &mut [u8], offset: u64) -> Result<(), FakeError> {
        self.state()
            .read(node, buf, offset)
            .map_err(|e| FakeError(e.desc))
    }

    /// The contents of export `name` (its NBD export name) as a read-only [`Disk`]
    /// (`disk_transport::Disk`), with `dirty_extents` from `bitmap` when given — what a
    /// client of the export would read, without NBD.
    ///
    /// [`Disk`]: disk_transport::Disk
    pub fn export_disk(&self, name: &str, bitmap: Option<&str>) -> Result<ExportDisk, FakeError> {
        ExportDisk::open(self.shared(), name, bitmap)
    }

    /// Serves one NBD client on `stream` (negotiation and transmission, as the server of
    /// [`FakeMonitorBuilder::serve_nbd`] does for each connection) until it disconnects; the
    /// exports are those of `block-export-add`. For socket pairs and in-memory streams; the
    /// caller bounds the stream's reads.
    pub fn serve_nbd_connection<S: Read + Write>(&self, stream: S) {
        let mut stream = nbd::Untimed(stream);
        let _ = nbd::serve(&mut stream, &self.shared());
    }

    /// Serves one connection on a blocking stream until it closes. Events raised outside a
    /// command are sent when the next command arrives; use [`FakeMonitor::serve_unix`] to
    /// get them as they happen.
    pub fn serve_blocking<S: Read + Write>(&self, mut stream: S) {
        let mut conn = conn::Connection::new(self.shared());
        if stream.write_all(&conn.greeting()).is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !write_outputs(&mut stream, &mut conn, &buf[..n]) {
                return;
            }
        }
    }

    /// Serves one connection on a Unix stream until it closes, sending events as they are
    /// raised.
    pub fn serve_unix(&self, mut stream: UnixStream) {
        let mut conn = conn::Connection::new(self.shared());
        if stream.set_read_timeout(Some(EVENT_POLL)).is_err()
            || stream.write_all(&conn.greeting()).is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if !write_outputs(&mut stream, &mut conn, &buf[..n]) {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let events = conn.pending_events();
                    if !events.is_empty() && stream.write_all(&events).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// A blocking [`Client`] connected to this fake (over a socket pair served by a
    /// background thread), past the handshake.
    pub fn connect(&self) -> crate::Result<Client<UnixStream>> {
        self.connect_with(ClientConfig::default())
    }

    /// Like [`connect`](Self::connect) with settings.
    pub fn connect_with(&self, config: ClientConfig) -> crate::Result<Client<UnixStream>> {
        Client::handshake(self.connect_stream()?, config)
    }

    /// A connected Unix stream served by a background thread: read the greeting, then
    /// speak QMP (or hand it to a client).
    pub fn connect_stream(&self) -> io::Result<UnixStream> {
        let (client, server) = UnixStream::pair()?;
        let fake = self.clone();
        std::thread::Builder::new()
            .name("qmp-fake-monitor".into())
            .spawn(move || fake.serve_unix(server))?;
        Ok(client)
    }

    /// Listens on a Unix socket at `path` (as `-qmp unix:PATH,server=on,wait=off`), serving
    /// every connection in a thread of its own, until the returned guard is dropped.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<FakeServer> {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let fake = self.clone();
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qmp-fake-listener".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop_flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let fake = fake.clone();
                    let _ = std::thread::Builder::new()
                        .name("qmp-fake-monitor".into())
                        .spawn(move || fake.serve_unix(stream));
                }
            })?;
        Ok(FakeServer {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

/// Writes what the connection answers to `data`; false when the connection must end.
fn write_outputs<S: Read + Write>(
    stream: &mut S,
    conn: &mut conn::Connection,
    data: &[u8],
) -> bool {
    for output in conn.receive(data) {
        match output {
            conn::Output::Bytes(b) => {
                if stream.write_all(&b).and_then(|()| stream.flush()).is_err() {
                    return false;
                }
            }
            conn::Output::Delay(d) => std::thread::sleep(d),
            conn::Output::Close => return false,
            conn::Output::Hang => {
                // Keep the channel open but never answer again.
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => return false,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => return false,
                    }
                }
            }
        }
    }
    true
}

/// A fake monitor listening on a Unix socket ([`FakeMonitor::listen_unix`]); dropping it
/// stops accepting and removes the socket (connections already open keep being served until
/// their clients close them).
#[derive(Debug)]
pub struct FakeServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An error of the fake's test-side API ([`FakeMonitor::guest_write`] and friends), with the
/// text QEMU would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeError(pub String);

impl std::fmt::Display for FakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FakeError {}

#[cfg(feature = "tokio")]
mod async_side {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

    use super::{conn, FakeMonitor, EVENT_POLL};

    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    impl FakeMonitor {
        /// Serves one connection on an async stream until it closes, sending events as they
        /// are raised.
        pub async fn serve_async<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) {
            let mut conn = conn::Connection::new(self.shared());
            if stream.write_all(&conn.greeting()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match tokio::time::timeout(EVENT_POLL, stream.read(&mut buf)).await {
                    Err(_) => {
                        let events = conn.pending_events();
                        if !events.is_empty() && stream.write_all(&events).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => n,
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

        /// An in-memory duplex stream served by a spawned task.
        ///
        /// # Panics
        ///
        /// Outside a tokio runtime (the serving task needs one).
        pub fn connect_duplex(&self) -> DuplexStream {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let fake = self.clone();
            tokio::spawn(async move { fake.serve_async(server).await });
            client
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
