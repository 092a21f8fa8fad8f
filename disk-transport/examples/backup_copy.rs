//! Copies one disk to another with the pipelined, sparse-aware engine, showing progress —
//! the core of a backup tool.
//!
//! ```text
//! cargo run --release -p disk-transport --example backup_copy -- nbd+unix:///disk?socket=/tmp/nbd.sock /backups/disk.img
//! ```
//!
//! A destination path that does not exist is created as a sparse file of the source's size.

use std::io::Write;

use disk_transport::copy::{copy, CopyOptions};
use disk_transport::null::NullDisk;
use disk_transport::{open_uri, Disk, DiskUri, OpenFlags};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(from), Some(to)) = (args.next(), args.next()) else {
        return Err("usage: backup_copy SOURCE-URI DESTINATION-URI".into());
    };
    let src = open_uri(&from, OpenFlags::read_only())?;
    let size = src.info()?.capacity;
    let mut fresh = false;
    if let Ok(DiskUri::File { path, .. }) = to.parse::<DiskUri>() {
        if !path.exists() {
            disk_transport::file::FileDisk::create(&path, size)?;
            fresh = true;
        }
    }
    // `null:` discards everything, like nbdcopy's: it measures how fast the source reads.
    let dst: Box<dyn Disk> = if to == "null:" {
        Box::new(NullDisk::new(size))
    } else {
        open_uri(&to, OpenFlags::read_write())?
    };
    let options = CopyOptions::default().destination_is_zero(fresh);
    let mut last_percent = u64::MAX;
    let report = copy(src.as_ref(), dst.as_ref(), &options, &mut |p| {
        let percent = p.done * 100 / p.total.max(1);
        if percent != last_percent {
            last_percent = percent;
            eprint!("\r{percent:3}% ({} of {} bytes)", p.done, p.total);
            let _ = std::io::stderr().flush();
        }
    })?;
    eprintln!();
    println!(
        "copied {} bytes in {:.2?} ({:.0} MB/s): {} read, {} written, {} zeroed, {} skipped",
        report.progress.total,
        report.elapsed,
        report.bytes_per_second() / 1e6,
        report.progress.read,
        report.progress.written,
        report.progress.zeroed,
        report.progress.skipped
    );
    Ok(())
}
