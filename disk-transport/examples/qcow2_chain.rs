//! A backup chain in qcow2: a full copy of a disk, then an incremental one holding only what
//! changed, as an overlay backed by the full copy. Every QEMU tool reads the result
//! (`qemu-img info --backing-chain`, `qemu-img compare`, a VM booting from it).
//!
//! ```text
//! cargo run -p disk-transport --example qcow2_chain -- /tmp/chain
//! qemu-img check /tmp/chain/inc1.qcow2 && qemu-img map /tmp/chain/inc1.qcow2
//! ```

use disk_transport::copy::{copy, copy_changed, CopyOptions};
use disk_transport::memory::MemoryDisk;
use disk_transport::qcow2::{BackingFormat, CreateOptions, Qcow2Disk};
use disk_transport::Disk;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: qcow2_chain DIRECTORY (created, must not hold full.qcow2 or inc1.qcow2)")?;
    std::fs::create_dir_all(&dir)?;
    let dir = std::path::Path::new(&dir);

    // The VM's disk (in memory here; an NBD export of a running VM in real life) and a
    // dirty bitmap started with the full backup.
    let vm = MemoryDisk::new(1 << 30);
    vm.write_at(&[0x55; 1 << 20], 0)?;
    vm.write_at(&[0xAA; 1 << 20], 512 << 20)?;
    vm.add_dirty_bitmap("since-full")?;

    let size = vm.info()?.capacity;
    let full = Qcow2Disk::create(dir.join("full.qcow2"), &CreateOptions::new(size))?;
    let options = CopyOptions::default().destination_is_zero(true);
    let report = copy(&vm, &full, &options, &mut |_| {}).map_err(|e| e.error)?;
    println!(
        "full: {} bytes written into full.qcow2",
        report.progress.written
    );
    drop(full);

    // The guest writes; the incremental backup is an overlay of full.qcow2 (named relative to
    // the overlay's directory) holding only the clusters the bitmap marks.
    vm.write_at(b"a changed sector", 700 << 20)?;
    let changes = vm.dirty_bitmap_handle("since-full")?;
    let inc = Qcow2Disk::create(
        dir.join("inc1.qcow2"),
        &CreateOptions::new(size).backing("full.qcow2", BackingFormat::Qcow2),
    )?;
    let report =
        copy_changed(&changes, &inc, &CopyOptions::default(), &mut |_| {}).map_err(|e| e.error)?;
    println!(
        "incremental: {} changed bytes into inc1.qcow2",
        report.progress.written
    );

    // Reading the overlay reads the chain; the map says which image holds what.
    let mut check = [0u8; 16];
    inc.read_at(&mut check, 700 << 20)?;
    assert_eq!(&check, b"a changed sector");
    for entry in inc.map(0, size)? {
        if entry.present {
            let file = &inc.chain()[entry.depth as usize].path;
            println!(
                "{:>12} {:>10} {:<5} from {}",
                entry.start,
                entry.length,
                if entry.data { "data" } else { "zero" },
                file.display()
            );
        }
    }
    Ok(())
}
