//! A full backup the first time, incremental ones after: the changed-block flow of virtnbdbackup
//! or a vSphere backup, in a few lines of the library.
//!
//! ```text
//! # once: a persistent dirty bitmap starts recording writes at the time of the full backup
//! qemu-img bitmap --add vm.qcow2 since-backup
//! qemu-nbd -r -t -f qcow2 -B since-backup -k /tmp/nbd.sock vm.qcow2 &
//! cargo run -p disk-transport --example incremental_backup -- \
//!     'nbd+unix:///?socket=/tmp/nbd.sock' since-backup backup.img     # full: creates backup.img
//! # ... the VM writes ...
//! cargo run -p disk-transport --example incremental_backup -- \
//!     'nbd+unix:///?socket=/tmp/nbd.sock' since-backup backup.img     # incremental
//! ```
//!
//! A running VM exports the same with QMP (`block-dirty-bitmap-add`, then `nbd-server-start`
//! and `block-export-add` with `"bitmaps": ["since-backup"]`) or libvirt's pull-mode backup API.
//! Rolling the checkpoint forward (clearing or replacing the bitmap once a backup is safe) is the
//! hypervisor's part and not shown.

use std::path::Path;

use disk_transport::copy::{copy, copy_changed, CopyOptions, CopyProgress};
use disk_transport::file::{FileDisk, FileOptions};
use disk_transport::{open_uri, Disk, OpenFlags};

fn main() {
    if let Err(e) = run() {
        let mut line = e.to_string();
        let mut cause = e.source();
        while let Some(next) = cause {
            line = format!("{line}: {next}");
            cause = next.source();
        }
        eprintln!("error: {line}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, bitmap, backup] = args.as_slice() else {
        return Err("usage: incremental_backup NBD-URI BITMAP BACKUP-FILE".into());
    };
    let mut last = 0;
    let mut progress = |p: &CopyProgress| {
        let percent = p.done * 100 / p.total.max(1);
        if percent != last {
            last = percent;
            eprint!("\r{percent:3}%");
        }
    };

    let report = if !Path::new(backup).exists() {
        // Full: every allocated byte, into a new sparse file (so holes need no writing).
        let vm = open_uri(source, OpenFlags::read_only())?;
        let target = FileDisk::create(backup, vm.info()?.capacity)?;
        let options = CopyOptions::default().destination_is_zero(true);
        copy(vm.as_ref(), &target, &options, &mut progress)?
    } else {
        // Incremental: what the bitmap marks changed since the full backup, into the same file.
        let separator = if source.contains('?') { '&' } else { '?' };
        let vm = open_uri(
            &format!("{source}{separator}dirty-bitmap={bitmap}"),
            OpenFlags::read_only(),
        )?;
        let target = FileDisk::open(backup, &FileOptions::default())?;
        copy_changed(vm.as_ref(), &target, &CopyOptions::default(), &mut progress)?
    };
    let p = report.progress;
    eprintln!();
    println!(
        "{} bytes in {:.2?}: {} read, {} written, {} zeroed, {} skipped",
        p.total, report.elapsed, p.read, p.written, p.zeroed, p.skipped
    );
    Ok(())
}
