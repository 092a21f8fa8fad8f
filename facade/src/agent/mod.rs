//! QEMU guest agents by URI: real ones over a Unix socket, TCP or a character device, and the
//! fake.
//!
//! The agent is reached asynchronously (tokio): call these inside a runtime. The handle is an
//! `Arc<dyn GuestAgent>`, so clone it into as many tasks as you like; a mock
//! ([`MockGuestAgent`], feature `mock`) or the [`fake`] fits the same type in your tests.
//!
//! ```
//! use std::sync::Arc;
//! use vmsdk::agent::{GuestAgent, GuestAgentExt};
//!
//! /// The code under test takes any agent: the real one, the fake, or a mock.
//! async fn hostname(agent: Arc<dyn GuestAgent>) -> vmsdk::Result<String> {
//!     Ok(agent.host_name().await?.host_name)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> vmsdk::Result<()> {
//! let agent = vmsdk::agent::fake();
//! assert!(!hostname(agent).await?.is_empty());
//! # Ok(())
//! # }
//! ```
//!
#![cfg_attr(
    feature = "mock",
    doc = "[`MockGuestAgent`]: crate::mock::MockGuestAgent"
)]
#![cfg_attr(not(feature = "mock"), doc = "[`MockGuestAgent`]: crate#features")]

pub mod monitor;

use std::sync::Arc;
use std::time::Duration;

/// The agent's reply types (`GuestFilesystemInfo`, `GuestOSInfo`, ...), each with `Default`
/// so that a test fixture names only the fields it cares about.
pub use qga_proto::types;

/// Fake agents for your tests: [`FakeAgent`](fake::FakeAgent) speaks the real wire protocol,
/// as qemu-ga 2.11, 7.2 or 10.0 ([`AgentRelease`](fake::AgentRelease)) on Linux or Windows,
/// with scripted faults (hangs, garbage, disconnects).
pub use qga_proto::fake;

pub use qga_proto::fake::FakeAgent;
pub use qga_proto::{Address, ClientConfig, GuestAgent, GuestAgentExt};

use crate::Result;

/// Connects to the guest agent at `uri` with [`ClientConfig::default()`]: each call waits up
/// to 30 s for its reply, and the `guest-sync` handshake that (re)synchronises the channel up
/// to 5 s per attempt, two attempts.
///
/// * `qga+unix:///run/libvirt/qemu/…/org.qemu.guest_agent.0` — QEMU's host-side socket
///   (libvirt, Proxmox `/var/run/qemu-server/VMID.qga`, or `qemu-ga -m unix-listen`);
/// * `qga+tcp://127.0.0.1:4444` — a TCP chardev;
/// * `qga+serial:///dev/virtio-ports/org.qemu.guest_agent.0` — a character device;
/// * a bare absolute path: under `/dev` a character device, elsewhere a socket.
///
/// A failure names the address and keeps the operating system's error as its source:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let error = vmsdk::agent::connect("qga+unix:///nonexistent/qga.sock").await.err().unwrap();
/// assert_eq!(
///     error.to_string(),
///     "cannot connect to the guest agent at qga+unix:///nonexistent/qga.sock"
/// );
/// assert!(std::error::Error::source(&error).is_some());
/// # }
/// ```
pub async fn connect(uri: &str) -> Result<Arc<dyn GuestAgent>> {
    connect_with(uri, ClientConfig::default()).await
}

/// [`connect`] with explicit client settings (timeouts, reply size limit, ...).
pub async fn connect_with(uri: &str, config: ClientConfig) -> Result<Arc<dyn GuestAgent>> {
    let address = Address::parse(uri)?;
    Ok(Arc::new(
        qga_proto::AsyncClient::connect_address(&address, config).await?,
    ))
}

/// A fake agent resembling qemu-ga on a Linux guest, reached through the real client code over
/// an in-memory stream. Must be called inside a tokio runtime. For other guests, versions or
/// scripted faults, build a [`FakeAgent`] yourself.
///
/// ```
/// use vmsdk::agent::GuestAgentExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> vmsdk::Result<()> {
/// let agent = vmsdk::agent::fake();
/// let info = agent.info().await?;
/// assert!(info.supported_commands.iter().any(|c| c.name == "guest-ping"));
/// # Ok(())
/// # }
/// ```
pub fn fake() -> Arc<dyn GuestAgent> {
    let config = ClientConfig::default().timeout(Duration::from_secs(5));
    Arc::new(FakeAgent::linux().connect_async_with(config))
}
