//! The backend against a library with only what every supported VDDK (6.5) exports: the
//! stand-in built with `VDDK_STANDIN_MINIMAL=1`, installed as `libvixDiskLib.so.6`. Every optional
//! function is absent, so each fallback runs: connection parameters allocated by the SDK, no
//! extents, synchronous submissions, the 6.x `VixDiskLibInfo` without sector sizes, and clear
//! "not supported" errors for what cannot be emulated.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use std::sync::mpsc;

use disk_transport::vddk::VddkTransport;
use disk_transport::{ConnectParams, DiskTransport, Error, Extent, ExtentKind, OpenFlags};
use vddk_support::{count, minimal_standin_library, Fixture, PASSWORD};

#[test]
fn optional_functions_may_be_missing() {
    let fixture = Fixture::with_library(&minimal_standin_library(), "libvixDiskLib.so.6", "");
    let vddk = VddkTransport::new(&fixture.options()).unwrap();
    assert_eq!(vddk.library().version, Some(6));

    let connection = vddk
        .connect(&ConnectParams::builder().read_write().build().unwrap())
        .unwrap();
    let disk = connection
        .open("old?size=1048576&phys=4096", OpenFlags::read_write())
        .unwrap();
    let info = disk.info().unwrap();
    // VDDK 6 structs end before the sector sizes: they are not read.
    assert_eq!(
        (info.logical_sector_size, info.physical_sector_size),
        (512, 512)
    );
    assert!(!info.can_extents);
    assert_eq!(
        disk.allocated_extents(0, info.capacity).unwrap(),
        vec![Extent {
            offset: 0,
            length: 1 << 20,
            kind: ExtentKind::Data
        }]
    );

    // Submissions fall back to synchronous calls, completed before they return.
    assert_eq!(disk.max_in_flight(), 1);
    let (tx, rx) = mpsc::channel();
    disk.submit_write(
        4096,
        vec![9; 4096],
        Box::new(move |r| tx.send(r.map(|b| b.len())).unwrap()),
    );
    assert_eq!(rx.try_recv().unwrap().unwrap(), 4096);
    let mut back = vec![0u8; 4096];
    disk.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, vec![9; 4096]);
    disk.flush().unwrap();

    let unsupported = |e: Error, what: &str| {
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains(what)),
            "{e:?}"
        );
    };
    unsupported(
        disk.metadata_keys().unwrap_err(),
        "VixDiskLib_GetMetadataKeys",
    );
    let remote = ConnectParams::builder()
        .server("vc.example")
        .user_password("admin", PASSWORD)
        .vm("moref=vm-old")
        .build()
        .unwrap();
    unsupported(
        vddk.prepare_for_access(&remote, "old").unwrap_err(),
        "VixDiskLib_PrepareForAccess",
    );
    unsupported(vddk.cleanup(&remote).unwrap_err(), "VixDiskLib_Cleanup");

    // A remote connection with parameters the SDK allocated itself reaches the library intact.
    vddk.connect(&remote).unwrap();
    drop(disk);
    drop(connection);
    let stats = fixture.stats();
    assert_eq!(stats["connects"]["moref=vm-old"]["user"], "admin");
    assert_eq!(
        stats["connects"]["moref=vm-old"]["password_len"],
        PASSWORD.len()
    );
    assert_eq!(
        count(&stats["calls"]["VixDiskLib_AllocateConnectParams"]),
        0
    );
    assert_eq!(stats["open_handles"], 0);
    assert_eq!(stats["open_connections"], 0);
    assert_eq!(
        stats["violations"].as_object().map_or(0, |v| v.len()),
        0,
        "{stats}"
    );
}
