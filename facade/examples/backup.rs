//! A nightly backup of a running QEMU VM: full the first time, then what changed since the
//! last point, into a directory of qcow2 chains; verified, and the latest point restorable
//! with `qemu-img convert` or `vmsdk backup restore`.
//!
//! ```sh
//! qemu-system-x86_64 ... -blockdev driver=qcow2,node-name=vda,... -qmp unix:/run/vm1.qmp,server=on,wait=off
//! cargo run -p vmsdk --features backup --example backup -- qmp+unix:///run/vm1.qmp /backups/vm1
//! ```

use vmsdk::backup::qemu::QemuSource;
use vmsdk::backup::{BackupDir, BackupOptions};

fn main() -> vmsdk::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(qmp), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: backup QMP-URI DIR");
        std::process::exit(2);
    };
    // Scratch images (QEMU's copy-before-write store) and the NBD socket: one dir per VM.
    let mut vm = QemuSource::connect(&qmp, format!("{dir}.scratch"))?;
    let dir = BackupDir::new(dir);
    // Incremental when possible; a full backup, with the reason, when the last checkpoint is
    // gone (the VM was killed, restarted from another image).
    let options = BackupOptions::new().full_if_needed(true);
    let report = dir.create(&mut vm, None, &options, &mut |p| {
        eprint!("\r{} {}: {}/{} bytes   ", p.disk, p.phase, p.done, p.total)
    })?;
    let point = &report.point;
    eprintln!(
        "\npoint {} ({:?}, {})",
        point.number, point.kind, point.consistency
    );
    if let Some(why) = &point.full_reason {
        eprintln!("full because {why}");
    }
    for disk in &point.disks {
        println!(
            "{}: {} ({} bytes copied)",
            disk.node, disk.file, disk.bytes_copied
        );
    }
    dir.verify(&mut |_| {})?;
    Ok(())
}
