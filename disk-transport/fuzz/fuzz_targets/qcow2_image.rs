//! Any bytes as a qcow2 image file: the header and its extensions, the L1 and L2 tables, the
//! refcount table and blocks, compressed clusters. Opening either fails with an error or gives
//! a disk whose reads, map and writes (on a copy) end with data or an error, never a panic,
//! a hang or an allocation the file's size does not bound.
#![no_main]

use disk_transport::qcow2::Qcow2Disk;
use disk_transport::Disk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("qcow2-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let image = dir.join("image.qcow2");
    if std::fs::write(&image, data).is_err() {
        return;
    }
    if let Ok(disk) = Qcow2Disk::open_read_only(&image) {
        exercise(&disk, false);
    }
    if let Ok(disk) = Qcow2Disk::open_read_write(&image) {
        exercise(&disk, true);
    }
    let _ = std::fs::remove_file(&image);
});

fn exercise(disk: &Qcow2Disk, write: bool) {
    let Ok(info) = disk.info() else { return };
    let size = info.capacity;
    let _ = disk.map(0, size);
    let _ = disk.allocated_extents(0, size);
    let mut buf = vec![0u8; size.min(256 << 10) as usize];
    let _ = disk.read_at(&mut buf, 0);
    let tail = size.min(4096) as usize;
    let _ = disk.read_at(&mut buf[..tail], size - tail as u64);
    if write {
        let n = size.min(70_000) as usize;
        let _ = disk.write_at(&vec![0xA5; n], size / 3 - (size / 3).min(n as u64));
        let _ = disk.write_zeroes(0, size.min(1 << 20));
        let _ = disk.trim(size / 2, size / 2);
        let _ = disk.flush();
        let _ = disk.read_at(&mut buf, 0);
    }
}
