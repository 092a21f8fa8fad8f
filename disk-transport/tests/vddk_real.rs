//! The backend against a real VDDK, the way nbdkit's `test-vddk-real.sh` does it: a VMDK made by
//! `qemu-img`, written and read back through VDDK's local `file` transport.
//!
//! VDDK is proprietary and cannot be installed by CI, so this test is ignored unless asked for:
//!
//! ```text
//! VDDK_LIBDIR=/opt/vmware-vix-disklib-distrib LD_LIBRARY_PATH=$VDDK_LIBDIR/lib64 \
//!     cargo test -p disk-transport --test vddk_real -- --ignored
//! ```
#![cfg(all(feature = "vddk", target_os = "linux"))]

use std::process::Command;

use disk_transport::vddk::{VddkOptions, VddkTransport};
use disk_transport::{ConnectParams, DiskTransport, OpenFlags, TransportMode};

#[test]
#[ignore = "needs a real VDDK: set VDDK_LIBDIR (and LD_LIBRARY_PATH) and pass --ignored"]
fn real_vddk_round_trip_on_a_local_vmdk() {
    let libdir = std::env::var_os("VDDK_LIBDIR")
        .expect("set VDDK_LIBDIR to the unpacked VDDK (the directory holding lib64/)");
    let dir = tempfile::tempdir().unwrap();
    let vmdk = dir.path().join("test.vmdk");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk"])
        .arg(&vmdk)
        .arg("10M")
        .status()
        .expect("qemu-img (Debian package qemu-utils) makes the test disk");
    assert!(status.success());
    let path = vmdk.to_str().unwrap();

    let vddk = VddkTransport::new(&VddkOptions::new().libdir(libdir)).unwrap();
    assert!(vddk.transport_modes().contains(&TransportMode::File));
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    {
        let connection = vddk
            .connect(&ConnectParams::builder().read_write().build().unwrap())
            .unwrap();
        let disk = connection.open(path, OpenFlags::read_write()).unwrap();
        let info = disk.info().unwrap();
        assert_eq!(info.capacity, 10 << 20);
        assert_eq!(info.transport_mode, Some(TransportMode::File));
        disk.write_at(&data, 1 << 20).unwrap();
        disk.flush().unwrap();
    }
    let connection = vddk.connect(&ConnectParams::local()).unwrap();
    let disk = connection.open(path, OpenFlags::read_only()).unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data);
    let extents = disk.allocated_extents(0, 10 << 20).unwrap();
    assert_eq!(extents.first().unwrap().offset, 0);
    assert_eq!(extents.last().unwrap().end(), 10 << 20);
    // Local VMDK extents are unreliable in VDDK (nbdkit-vddk-plugin(1): allocated data may be
    // reported as sparse), so only the shape of the map is checked.
    assert!(extents.windows(2).all(|w| w[0].end() == w[1].offset));
}
