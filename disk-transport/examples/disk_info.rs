//! Prints what a disk is and which ranges hold data.
//!
//! ```text
//! cargo run -p disk-transport --example disk_info -- nbd+unix:///disk?socket=/tmp/nbd.sock
//! cargo run -p disk-transport --example disk_info -- /var/lib/images/vm.img
//! ```

use std::io::Write;

use disk_transport::{open_uri, OpenFlags};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let uri = std::env::args()
        .nth(1)
        .ok_or("usage: disk_info URI (nbd://HOST/EXPORT, nbd+unix:///EXPORT?socket=PATH, file:///PATH, mem://NAME?size=1G)")?;
    let disk = open_uri(&uri, OpenFlags::read_only())?;
    let info = disk.info()?;
    // Write through a locked handle so `disk_info ... | head` ends quietly on a closed pipe.
    let mut out = std::io::stdout().lock();
    let result = (|| -> std::io::Result<()> {
        writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
        for extent in disk
            .allocated_extents(0, info.capacity)
            .map_err(std::io::Error::other)?
        {
            let kind = serde_json::to_value(extent.kind)?;
            writeln!(
                out,
                "{:>14} {:>14} {}",
                extent.offset,
                extent.length,
                kind.as_str().unwrap_or("?")
            )?;
        }
        Ok(())
    })();
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
