//! Remote disks kept as files in a datastore directory (`standin.datastoreDir`), as a user's
//! integration test sets the stand-in up: an image copied into the directory is the remote disk
//! `[datastore] folder/disk.vmdk`, and what is written through VDDK is in the file afterwards,
//! for the next process. Its own process: the stand-in's configuration is per InitEx.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use disk_transport::vddk::VddkTransport;
use disk_transport::{ConnectParams, Disk, OpenFlags};
use vddk_support::{Fixture, PASSWORD};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn remote(vm: &str) -> disk_transport::ConnectParamsBuilder {
    ConnectParams::builder()
        .server("vc.example")
        .user_password("admin", PASSWORD)
        .vm(vm)
}

#[test]
fn remote_disks_are_files_in_the_datastore_directory() {
    let fixture = Fixture::with_datastores("");
    let vddk = VddkTransport::new(&fixture.options()).unwrap();
    // A raw image put into the datastore directory is the remote disk `[ds1] vm-a/vm-a.vmdk`.
    let dir = fixture.datastores.join("ds1/vm-a");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("vm-a.vmdk");
    let golden = pattern(1 << 20, 3);
    std::fs::write(&image, &golden).unwrap();
    let params = remote("moref=vm-datastore").read_write().build().unwrap();
    let connection = vddk.connect_vddk(&params).unwrap();
    let disk = connection
        .open_disk("[ds1] vm-a/vm-a.vmdk", OpenFlags::read_write())
        .unwrap();
    assert_eq!(disk.info().unwrap().capacity, 1 << 20);
    let mut back = vec![0; 1 << 20];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == golden, "the remote disk does not read as its file");
    disk.write_at(&[0xEE; 4096], 65536).unwrap();
    disk.flush().unwrap();
    disk.close().unwrap();
    // What was written is in the file, for the next process (or this one) to read.
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[65536..65536 + 4096].iter().all(|&b| b == 0xEE));
    assert!(on_disk[..65536] == golden[..65536]);
    // Missing files and names outside the directory are VDDK's file-not-found.
    for name in [
        "[ds1] vm-a/missing.vmdk",
        "[ds1] ../../escape.vmdk",
        "no-datastore.vmdk",
    ] {
        let err = connection
            .open_disk(name, OpenFlags::read_only())
            .unwrap_err();
        assert_eq!(err.vix_code(), Some(4), "{name}: {err}");
    }
    connection.disconnect().unwrap();
    let stats = fixture.stats();
    assert_eq!(stats["open_handles"], 0, "{stats}");
    assert_eq!(stats["open_connections"], 0, "{stats}");
    assert!(
        stats["violations"].as_object().unwrap().is_empty(),
        "{stats}"
    );
}
