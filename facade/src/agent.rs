//! QEMU guest agents by URI: real ones over a Unix socket, TCP or a character device, and the
//! fake.

use std::time::Duration;

use qga_proto::{Address, AsyncClient, ClientConfig, GuestAgent, Result};

/// Connects to the guest agent at `uri` with the default settings (10 s per call):
///
/// * `qga+unix:///run/libvirt/qemu/…/org.qemu.guest_agent.0` — QEMU's host-side socket
///   (libvirt, Proxmox `/var/run/qemu-server/VMID.qga`, or `qemu-ga -m unix-listen`);
/// * `qga+tcp://127.0.0.1:4444` — a TCP chardev;
/// * `qga+serial:///dev/virtio-ports/org.qemu.guest_agent.0` — a character device;
/// * a bare absolute path: under `/dev` a character device, elsewhere a socket.
///
/// Must be called inside a tokio runtime.
pub async fn connect(uri: &str) -> Result<Box<dyn GuestAgent>> {
    connect_with(uri, ClientConfig::default()).await
}

/// [`connect`] with explicit client settings.
pub async fn connect_with(uri: &str, config: ClientConfig) -> Result<Box<dyn GuestAgent>> {
    let address = Address::parse(uri)?;
    Ok(Box::new(
        AsyncClient::connect_address(&address, config).await?,
    ))
}

/// A fake agent resembling qemu-ga on a Linux guest, reached through the real client code over
/// an in-memory stream. Must be called inside a tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qga_proto::Error> {
/// let agent = vmsdk::agent::fake();
/// let info = agent.info().await?;
/// assert!(info.supported_commands.iter().any(|c| c.name == "guest-ping"));
/// # Ok(())
/// # }
/// ```
pub fn fake() -> Box<dyn GuestAgent> {
    let config = ClientConfig::default().timeout(Duration::from_secs(5));
    Box::new(qga_proto::fake::FakeAgent::linux().connect_async_with(config))
}
