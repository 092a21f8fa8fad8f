//! A host-side exporter of guest agent metrics: every socket given is a guest (named after its
//! file), served at /metrics (every guest) and /probe?target=NAME (one) for Prometheus.
//!
//! ```sh
//! cargo run -p vmsdk --no-default-features --features agent,exporter --example guest_exporter \
//!     -- 127.0.0.1:9102 /var/run/qemu-server/*.qga
//! ```

use std::path::Path;
use std::time::Duration;

use vmsdk::agent::monitor::{Guest, GuestMonitor};
use vmsdk::prometheus::Exporter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().ok_or("usage: guest_exporter ADDR SOCKET...")?;
    let mut monitor = GuestMonitor::builder()
        .guest_deadline(Duration::from_secs(2)) // a hung agent costs 2 s, no more
        .scrape_deadline(Duration::from_secs(8)) // below Prometheus' 10 s scrape timeout
        .concurrency(16);
    for socket in args {
        let name = Path::new(&socket).file_stem().ok_or("a socket path")?;
        let guest = Guest::new(name.to_string_lossy(), &socket)?.label("host", "hv-1");
        monitor = monitor.guest(guest);
    }
    let exporter = Exporter::bind_guests(listen.as_str(), monitor.build()?)?;
    println!("serving http://{}/metrics", exporter.local_addr());
    exporter.serve();
    Ok(())
}
