//! QEMU guest agents by URI: real ones over a Unix socket, TCP or a character device, and the
//! fake.
//!
//! The agent is reached asynchronously (tokio): call these inside a runtime. The handle is an
//! `Arc<dyn GuestAgent>`, so clone it into as many tasks as you like; a mock
//! ([`MockGuestAgent`][link-mock], feature `mock`) or the [`fake()`] fits the same type in your
//! tests; the reply types are in [`types`], each with `Default`, and the fake agents of every
//! release in [`fake`](mod@fake).
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
//! # Monitoring programs: a client per poll, or one kept
//!
//! QEMU's chardev socket (`-chardev socket,server=on`, Proxmox's `/var/run/qemu-server/VMID.qga`,
//! libvirt's channel socket) serves **one client at a time** and queues one more; a further
//! connect fails with EAGAIN, which the clients retry for
//! [`ClientConfig::connect_timeout`] (default 5 s) and then report as
//! [`qga_proto::Error::ChannelBusy`]. So a program that polls agents should connect per poll
//! and close at once, as Proxmox does, with [`ClientConfig::monitoring`] (one deadline split
//! into connect, one sync attempt and the replies) — what [`monitor::GuestMonitor`] does for
//! many guests in one bounded scrape. Keep one client only on a channel nobody else uses (a
//! second agent channel dedicated to monitoring, a test agent): it saves the connect and the
//! `guest-sync` handshake. On a libvirt host libvirt holds the agent socket for the domain's
//! whole life, and a direct connection is never served: go through libvirt
//! (`virDomainGetGuestInfo`, `virsh guestinfo`) or give the guest a second channel.

#![cfg_attr(feature = "mock", doc = "", doc = "[link-mock]: crate::mock")]
#![cfg_attr(
    not(feature = "mock"),
    doc = "",
    doc = "[link-mock]: https://docs.rs/vmsdk/latest/vmsdk/mock/index.html"
)]

pub mod monitor;

use std::sync::Arc;
use std::time::Duration;

/// The agent's reply types (`GuestFilesystemInfo`, `GuestOSInfo`, ...), each with `Default`
/// so that a test fixture names only the fields it cares about.
pub use qga_proto::types;

/// Fake agents for your tests: [`FakeAgent`] speaks the real wire protocol, as qemu-ga 2.11,
/// 7.2 or 10.0 ([`fake::AgentRelease`]) on Linux or Windows, with scripted faults (hangs,
/// garbage, disconnects), in memory or on a Unix socket served like QEMU's chardev
/// ([`FakeAgent::listen_unix`]).
pub use qga_proto::fake;

pub use qga_proto::fake::FakeAgent;
pub use qga_proto::{Address, ClientConfig, GuestAgent, GuestAgentExt};

use crate::Result;

/// Connects to the guest agent at `uri` with [`ClientConfig::default()`]: opening the channel
/// waits up to 5 s ([`ClientConfig::connect_timeout`]; a socket another client holds is
/// retried until then and reported as [`ChannelBusy`](qga_proto::Error::ChannelBusy)), each
/// call up to 30 s for its reply, and the `guest-sync` handshake that (re)synchronises the
/// channel up to 5 s per attempt, two attempts. A monitoring program polling many agents
/// wants [`ClientConfig::monitoring`] (see [`connect_with`]) or the [`monitor`].
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
