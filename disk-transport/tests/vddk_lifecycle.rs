//! A whole VDDK session in one process, in order: InitEx, connections, disks, I/O, errors,
//! access guards — then every resource the library handed out must be back, every handle
//! closed, no rule broken, and `shutdown` must call `VixDiskLib_Exit` exactly once.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use disk_transport::vddk::{self, VddkTransport};
use disk_transport::{ConnectParams, DiskTransport, Error, OpenFlags};
use vddk_support::{count, Fixture, PASSWORD};

#[test]
fn session_releases_everything_and_exit_runs_once() {
    let fixture = Fixture::new("");
    let vddk = VddkTransport::new(&fixture.options()).unwrap();
    let remote = ConnectParams::builder()
        .server("vc.example")
        .user_password("admin", PASSWORD)
        .vm("moref=vm-life")
        .snapshot("snapshot-1")
        .build()
        .unwrap();
    {
        let access = vddk.prepare_for_access(&remote, "lifecycle").unwrap();
        let connection = vddk.connect(&remote).unwrap();
        let disk = connection
            .open("[ds] life.vmdk?size=1048576", OpenFlags::read_only())
            .unwrap();
        let info = disk.info().unwrap();
        disk.allocated_extents(0, info.capacity).unwrap();
        let mut buf = vec![0u8; 65536];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(connection
            .open("gone?fail_open=4", OpenFlags::read_only())
            .is_err());
        // The connection object may go first: the disk keeps the VDDK connection alive.
        drop(connection);
        disk.read_at(&mut buf, 65536).unwrap();
        // shutdown refuses while anything still uses the library.
        assert!(matches!(vddk::shutdown(), Err(Error::InvalidParams(_))));
        drop(disk);
        access.end().unwrap();
    }
    let stats = fixture.stats();
    assert_eq!(stats["open_connections"], 0, "{stats}");
    assert_eq!(stats["open_handles"], 0, "{stats}");
    for (what, n) in stats["live"].as_object().unwrap() {
        assert_eq!(n, 0, "{what} leaked: {stats}");
    }
    assert_eq!(
        stats["violations"].as_object().map_or(0, |v| v.len()),
        0,
        "{stats}"
    );
    let d = &stats["disks"]["[ds] life.vmdk"];
    assert_eq!(count(&d["opens"]), 1);
    assert_eq!(count(&d["closes"]), 1);
    assert_eq!(
        stats["access"]["lifecycle"],
        serde_json::json!({"prepared": 1, "ended": 1})
    );
    assert_eq!(
        count(&stats["calls"]["VixDiskLib_Disconnect"]),
        1,
        "{stats}"
    );

    // The transport itself holds the library too.
    assert!(vddk::shutdown().is_err());
    drop(vddk);
    vddk::shutdown().unwrap();
    let stats = fixture.stats();
    assert_eq!(count(&stats["calls"]["VixDiskLib_Exit"]), 1);
    assert_eq!(stats["initialised"], false);
    assert!(vddk::loaded_library().is_none());
    // VDDK cannot be initialised twice in a process.
    let err = VddkTransport::new(&fixture.options()).unwrap_err();
    assert!(
        err.to_string().contains("cannot be initialised again"),
        "{err}"
    );
    vddk::shutdown().unwrap();
}
