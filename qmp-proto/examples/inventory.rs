//! What a running QEMU has: its version and run state, its block nodes with their dirty
//! bitmaps, its jobs and its NBD exports; then the events it raises for a few seconds.
//!
//! ```sh
//! qemu-system-x86_64 -S -display none -machine none -qmp unix:/tmp/vm.qmp,server=on,wait=off &
//! cargo run -p qmp-proto --example inventory -- qmp+unix:///tmp/vm.qmp
//! ```

use std::time::Duration;

use qmp_proto::cmd::{self, QueryNamedBlockNodesArgs};
use qmp_proto::{Client, ClientConfig, EventFilter, Monitor, MonitorExt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(address) = std::env::args().nth(1) else {
        eprintln!("usage: inventory qmp+unix:///path/to/vm.qmp | qmp+tcp://host:port");
        std::process::exit(2);
    };
    let config = ClientConfig::default().timeout(Duration::from_secs(10));
    let mut qemu = Client::connect(&address, config)?;
    // Subscribe first: events raised while the queries below run are kept for us.
    let events = qemu.subscribe(EventFilter::All)?;

    let version = &qemu.greeting().version;
    println!("QEMU {} ({})", version.qemu, version.package);
    println!("state: {}", qemu.call::<cmd::QueryStatus>(&())?.status);

    println!("block nodes:");
    for node in qemu.call::<cmd::QueryNamedBlockNodes>(&QueryNamedBlockNodesArgs::flat())? {
        println!(
            "  {:<20} {:<8} {:>14} bytes  {}",
            node.node_name.as_deref().unwrap_or("-"),
            node.drv,
            node.image.virtual_size,
            node.file
        );
        for bitmap in node.dirty_bitmaps.unwrap_or_default() {
            println!(
                "      bitmap {:<16} {} dirty bytes, {} granularity{}{}",
                bitmap.name.unwrap_or_default(),
                bitmap.count,
                bitmap.granularity,
                if bitmap.recording { ", recording" } else { "" },
                if bitmap.persistent {
                    ", persistent"
                } else {
                    ""
                },
            );
        }
    }
    for job in qemu.call::<cmd::QueryJobs>(&())? {
        println!(
            "job {} ({}): {} {}/{}{}",
            job.id,
            job.kind,
            job.status,
            job.current_progress,
            job.total_progress,
            job.error
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default()
        );
    }
    // Exports came with QEMU 5.2: the typed call refuses an older QEMU before sending.
    match qemu.call::<cmd::QueryBlockExports>(&()) {
        Ok(exports) => {
            for export in exports {
                println!(
                    "export {} ({}) of {}",
                    export.id, export.kind, export.node_name
                );
            }
        }
        Err(e) if e.is_unsupported() => println!("exports: {e}"),
        Err(e) => return Err(e.into()),
    }

    println!("events for 3 s:");
    while let Some(event) = qemu.next_event(events, Duration::from_secs(3))? {
        println!("  {} {}", event.event, event.data);
    }
    Ok(())
}
