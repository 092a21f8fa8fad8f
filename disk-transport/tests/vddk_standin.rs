//! The VDDK backend against the stand-in `libvixDiskLib.so`, through the real `dlopen` path.
//!
//! All tests of this file share one process and therefore one InitEx; they use distinct disk
//! names and VM MoRefs so their counters in the stand-in do not mix.
#![cfg(all(feature = "vddk", target_os = "linux"))]

mod vddk_support;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use disk_transport::vddk::{LogLevel, VddkOptions, VddkTransport};
use disk_transport::{
    AdapterType, ConnectParams, Disk, DiskTransport, Error, Extent, ExtentKind, OpenFlags,
    Thumbprint, TransportMode,
};
use vddk_support::{count, logs, shared, PASSWORD};

fn local_rw() -> ConnectParams {
    ConnectParams::builder().read_write().build().unwrap()
}

fn remote(vm: &str) -> disk_transport::ConnectParamsBuilder {
    ConnectParams::builder()
        .server("vc.example")
        .user_password("admin", PASSWORD)
        .vm(vm)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn init_ex_runs_once_and_lists_transport_modes() {
    let (fixture, vddk) = shared();
    // More transports from several threads share the one initialised library.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let options = fixture.options();
            std::thread::spawn(move || VddkTransport::new(&options).map(|t| t.library().clone()))
        })
        .collect();
    for h in handles {
        assert_eq!(&h.join().unwrap().unwrap(), vddk.library());
    }
    let stats = fixture.stats();
    assert_eq!(count(&stats["calls"]["VixDiskLib_InitEx"]), 1, "{stats}");
    assert_eq!(count(&stats["violations"]["init_twice"]), 0);
    assert_eq!(
        stats["libdir"].as_str().unwrap(),
        std::fs::canonicalize(&fixture.libdir)
            .unwrap()
            .to_str()
            .unwrap()
    );

    let info = vddk.library();
    assert_eq!(info.version, Some(8));
    assert!(info.path.ends_with("lib64/libvixDiskLib.so.8"), "{info:?}");
    assert_eq!(vddk.name(), "vddk");
    assert_eq!(vddk.transport_modes_text(), "file:san:hotadd:nbdssl:nbd");
    assert_eq!(
        vddk.transport_modes(),
        vec![
            TransportMode::File,
            TransportMode::San,
            TransportMode::HotAdd,
            TransportMode::NbdSsl,
            TransportMode::Nbd
        ]
    );
    assert_eq!(disk_transport::vddk::loaded_library().as_ref(), Some(info));
    assert_eq!(
        disk_transport::vddk::find_library(Some(&fixture.libdir)),
        Some((fixture.libdir.join("lib64/libvixDiskLib.so.8"), Some(8)))
    );
    assert_eq!(
        disk_transport::vddk::find_library(Some(std::path::Path::new("/nonexistent"))),
        None
    );
}

#[test]
fn log_callbacks_format_the_va_list() {
    let (fixture, _) = shared();
    let logs = logs().lock().unwrap().clone();
    let expected = format!(
        "VixDiskLib: stand-in initialised (API 6.5), libDir {}, connect params 128 bytes",
        std::fs::canonicalize(&fixture.libdir).unwrap().display()
    );
    assert!(
        logs.iter()
            .any(|(level, m)| *level == LogLevel::Log && *m == expected),
        "no {expected:?} in {logs:?}"
    );
    // 10 000 characters arrive truncated to the 8 KiB buffer, not lost and not overflowing.
    let long = logs
        .iter()
        .find(|(_, m)| m.starts_with("long message: "))
        .expect("long message");
    assert_eq!(long.1.len(), 8191);
    assert!(long.1.ends_with("xxxx"));
}

#[test]
fn local_disk_reads_writes_flushes_and_describes_itself() {
    let (fixture, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    assert!(!connection.read_only());
    let disk = connection
        .open("rw-basic?size=4194304&phys=4096", OpenFlags::read_write())
        .unwrap();
    let info = disk.info().unwrap();
    assert_eq!(info.capacity, 4 << 20);
    assert_eq!(info.logical_sector_size, 512);
    assert_eq!(info.physical_sector_size, 4096);
    assert_eq!(info.min_block_size, 512);
    assert_eq!(info.preferred_block_size, 4096);
    assert_eq!(info.transport_mode, Some(TransportMode::File));
    assert_eq!(info.adapter_type, AdapterType::ScsiLsilogic);
    assert_eq!(info.bios_geometry.unwrap().heads, 255);
    assert!(info.uuid.as_deref().unwrap().starts_with("60 00 c2"));
    assert!(!info.read_only);
    assert!(info.can_extents);

    let data = pattern(8192, 7);
    disk.write_at(&data, 65536).unwrap();
    let mut back = vec![0u8; 8192];
    disk.read_at(&mut back, 65536).unwrap();
    assert_eq!(back, data);

    // 3 MiB is split into VDDK calls of at most 2 MiB.
    let big = pattern(3 << 20, 1);
    disk.write_at(&big, 512 * 1024).unwrap();
    let mut big_back = vec![0u8; 3 << 20];
    disk.read_at(&mut big_back, 512 * 1024).unwrap();
    assert!(big_back == big);
    disk.flush().unwrap();

    assert!(matches!(
        disk.read_at(&mut [0u8; 100], 0),
        Err(Error::Unaligned { alignment: 512, .. })
    ));
    assert!(matches!(
        disk.write_at(&[0u8; 512], 100),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        disk.read_at(&mut [0u8; 1024], (4 << 20) - 512),
        Err(Error::OutOfRange { .. })
    ));
    disk.read_at(&mut [], 4 << 20).unwrap();

    let stats = fixture.stats();
    let d = &stats["disks"]["rw-basic"];
    assert_eq!(count(&d["writes"]), 1 + 2, "{d}");
    assert_eq!(count(&d["reads"]), 1 + 2, "{d}");
    assert_eq!(count(&d["queries"]), 1, "the extents probe: {d}");
    assert_eq!(count(&d["flushes"]), 1);
    assert_eq!(count(&d["opens"]), 1);
    // The SDK's own statistics of VDDK calls (shared by all tests of this process, hence >=).
    let calls = disk_transport::vddk::call_stats();
    let of = |f: &str| calls.iter().find(|c| c.function == f).cloned().unwrap();
    assert!(of("VixDiskLib_Read").calls >= 3);
    assert!(of("VixDiskLib_Read").bytes >= 8192 + (3 << 20));
    assert!(of("VixDiskLib_Write").bytes >= 8192 + (3 << 20));
    assert!(of("VixDiskLib_Open").calls >= 1 && of("VixDiskLib_InitEx").calls == 1);
    assert!(calls.windows(2).all(|w| w[0].total >= w[1].total));
    drop(disk);
    drop(connection);
    let stats = fixture.stats();
    assert_eq!(count(&stats["disks"]["rw-basic"]["closes"]), 1);
}

#[test]
fn read_only_connection_makes_every_open_read_only_and_writes_fail() {
    let (fixture, vddk) = shared();
    // Seed the disk through a read-write connection first.
    {
        let rw = vddk.connect(&local_rw()).unwrap();
        let disk = rw.open("ro-disk", OpenFlags::read_write()).unwrap();
        disk.write_at(&[0x5A; 512], 0).unwrap();
    }
    let connection = vddk.connect(&ConnectParams::local()).unwrap();
    assert!(connection.read_only());
    let disk = connection.open("ro-disk", OpenFlags::read_write()).unwrap();
    assert!(disk.info().unwrap().read_only);
    let err = disk.write_at(&[1; 512], 0).unwrap_err();
    assert!(
        matches!(err, Error::ReadOnly(ref what) if what == "ro-disk"),
        "{err}"
    );
    assert!(matches!(
        disk.write_metadata("k", "v"),
        Err(Error::ReadOnly(_))
    ));
    let (tx, rx) = mpsc::channel();
    disk.submit_write(0, vec![1; 512], Box::new(move |r| tx.send(r).unwrap()));
    assert!(matches!(rx.recv().unwrap(), Err(Error::ReadOnly(_))));
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5A; 512]);

    let stats = fixture.stats();
    let d = &stats["disks"]["ro-disk"];
    assert_eq!(count(&d["read_only_opens"]), 1, "{d}");
    assert_eq!(
        count(&d["writes"]),
        1,
        "only the seeding write reached the library: {d}"
    );
    assert_eq!(
        count(&d["rejected_writes"]),
        0,
        "rejected before calling VDDK: {d}"
    );

    // The flag reaches ConnectEx (a remote connection, so the record is this test's alone).
    let remote_ro = vddk
        .connect(&remote("moref=vm-ro").build().unwrap())
        .unwrap();
    assert!(remote_ro.read_only());
    assert_eq!(
        fixture.stats()["connects"]["moref=vm-ro"]["read_only"],
        true
    );
}

#[test]
fn extents_come_from_query_allocated_blocks() {
    let (fixture, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    // As nbdkit's regression test: three data chunks, a hole, and a 1536-byte tail that cannot
    // be queried (reported as data).
    let capacity = 262_144 + 1536;
    let disk = connection
        .open(&format!("extents?size={capacity}"), OpenFlags::read_write())
        .unwrap();
    disk.write_at(&[1; 512], 0).unwrap();
    disk.write_at(&[2; 512], 65536 + 4096).unwrap();
    disk.write_at(&[3; 512], 131072 + 65024).unwrap();
    let extents = disk.allocated_extents(0, capacity).unwrap();
    let ext = |offset, length, kind| Extent {
        offset,
        length,
        kind,
    };
    assert_eq!(
        extents,
        vec![
            ext(0, 196_608, ExtentKind::Data),
            ext(196_608, 65_536, ExtentKind::Hole),
            ext(262_144, 1536, ExtentKind::Data),
        ]
    );
    // A sub-range is clipped.
    assert_eq!(
        disk.allocated_extents(131_072 + 512, 131_072).unwrap(),
        vec![
            ext(131_584, 65_024, ExtentKind::Data),
            ext(196_608, 65_536, ExtentKind::Hole),
            ext(262_144, 512, ExtentKind::Data),
        ]
    );
    assert!(disk.allocated_extents(0, capacity + 1).is_err());
    assert!(disk.allocated_extents(10, 0).unwrap().is_empty());

    // Single-link opens report unallocated ranges, not holes: a parent may hold data.
    let single = connection
        .open(
            "extents",
            OpenFlags {
                single_link: true,
                ..OpenFlags::read_only()
            },
        )
        .unwrap();
    assert_eq!(
        single.allocated_extents(196_608, 65_536).unwrap(),
        vec![ext(196_608, 65_536, ExtentKind::Unallocated)]
    );

    // A read-only disk's map is fetched once (the probe plus one query), then served from memory.
    let before = count(&fixture.stats()["disks"]["extents"]["queries"]);
    let ro = connection.open("extents", OpenFlags::read_only()).unwrap();
    for (offset, length) in [(0, capacity), (65_536, 65_536), (196_608, 1024)] {
        assert_eq!(
            ro.allocated_extents(offset, length).unwrap(),
            disk.allocated_extents(offset, length).unwrap()
        );
    }
    let after_rw = count(&fixture.stats()["disks"]["extents"]["queries"]);
    assert_eq!(
        after_rw - before,
        1 + 1 + 3,
        "probe + one map + the three read-write queries"
    );

    // When the probe fails, everything is data.
    let no_map = connection
        .open("no-map?fail_query=6", OpenFlags::read_only())
        .unwrap();
    assert!(!no_map.info().unwrap().can_extents);
    assert_eq!(
        no_map.allocated_extents(0, 1 << 20).unwrap(),
        vec![ext(0, 1 << 20, ExtentKind::Data)]
    );
}

#[test]
fn errors_keep_the_vix_code_and_the_librarys_text() {
    let (fixture, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    let err = connection
        .open("missing?fail_open=4", OpenFlags::read_only())
        .unwrap_err();
    match &err {
        Error::Vix {
            function,
            code,
            message,
        } => {
            assert_eq!(*code, 4);
            assert!(
                function.starts_with("VixDiskLib_Open(\"missing?fail_open=4\")"),
                "{function}"
            );
            assert_eq!(message, "stand-in: A file was not found");
            // The code appears once, with the hint for a missing file.
            let text = err.to_string();
            assert_eq!(text.matches("VixError").count(), 1, "{text}");
            assert!(text.contains("[datastore] folder/disk.vmdk"), "{text}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.vix_code(), Some(4));
    // The library's warning about it went through the warn callback.
    assert!(logs()
        .lock()
        .unwrap()
        .iter()
        .any(|(l, m)| *l == LogLevel::Warning && m == "Open of missing failed: error 4"));

    let disk = connection
        .open("bad-sector?fail_read=8:16007", OpenFlags::read_only())
        .unwrap();
    let err = disk.read_at(&mut [0u8; 8192], 0).unwrap_err();
    assert_eq!(err.vix_code(), Some(16007));
    let text = err.to_string();
    assert!(
        text.contains(
            "VixDiskLib_Read(\"bad-sector?fail_read=8:16007\", startSector=0, numSectors=16)"
        ),
        "{text}"
    );
    assert!(text.contains("beyond the end of the disk"), "{text}");
    disk.read_at(&mut [0u8; 4096], 0).unwrap();
    disk.read_at(&mut [0u8; 4096], 8192).unwrap();

    let flaky = connection
        .open("no-flush?fail_flush=8", OpenFlags::read_write())
        .unwrap();
    assert_eq!(flaky.flush().unwrap_err().vix_code(), Some(8));

    // A wrong password: VIX_E_AUTHENTICATION_FAIL, and the password is nowhere in the error.
    let params = ConnectParams::builder()
        .server("vc.example")
        .user_password("admin", "wrong password 12345")
        .vm("moref=vm-autherr")
        .build()
        .unwrap();
    let err = vddk.connect(&params).unwrap_err();
    assert_eq!(err.vix_code(), Some(35));
    assert!(err.to_string().contains("Authentication failed"));
    assert!(!format!("{err} {err:?}").contains("wrong password"));

    // Every error text was freed again.
    let stats = fixture.eventually(|s| count(&s["live"]["error_texts"]) == 0);
    assert_eq!(count(&stats["live"]["error_texts"]), 0, "{stats}");
    assert_eq!(count(&stats["violations"]["locale_not_null"]), 0);
}

#[test]
fn transports_are_planned_and_passed_to_connect_ex() {
    let (fixture, vddk) = shared();
    let thumb = Thumbprint::new(&vec!["AB"; 20].join(":")).unwrap();
    let params = remote("moref=vm-sel1")
        .snapshot("snapshot-47")
        .thumbprint(thumb.clone())
        .port(8443)
        .nfc_host_port(902)
        .transport_modes([
            TransportMode::File,
            TransportMode::San,
            TransportMode::NbdSsl,
            TransportMode::Nbd,
        ])
        .read_write()
        .build()
        .unwrap();
    // `file` cannot reach an ESXi host: left out.
    assert_eq!(
        vddk.plan(&params).unwrap(),
        vec![
            TransportMode::San,
            TransportMode::NbdSsl,
            TransportMode::Nbd
        ]
    );
    let connection = vddk.connect(&params).unwrap();
    let disk = connection
        .open("[ds1] vm1/vm1.vmdk", OpenFlags::read_write())
        .unwrap();
    assert_eq!(
        disk.info().unwrap().transport_mode,
        Some(TransportMode::San)
    );
    let stats = fixture.stats();
    let c = &stats["connects"]["moref=vm-sel1"];
    assert_eq!(c["transports"], "san:nbdssl:nbd", "{c}");
    assert_eq!(c["snapshot"], "snapshot-47");
    assert_eq!(c["read_only"], false);
    assert_eq!(c["server"], "vc.example");
    assert_eq!(c["thumbprint"], thumb.as_str());
    assert_eq!(c["cred_type"], 1);
    assert_eq!(c["user"], "admin");
    assert_eq!(c["password_len"], PASSWORD.len());
    assert_eq!(c["port"], 8443);
    assert_eq!(c["nfc_host_port"], 902);

    // Without a snapshot only NBD remains (SAN, HotAdd and NBDSSL need one).
    let params = remote("moref=vm-sel2")
        .transport_modes([
            TransportMode::San,
            TransportMode::HotAdd,
            TransportMode::Nbd,
        ])
        .build()
        .unwrap();
    assert_eq!(vddk.plan(&params).unwrap(), vec![TransportMode::Nbd]);
    let connection = vddk.connect_vddk(&params).unwrap();
    assert_eq!(connection.planned_transports(), [TransportMode::Nbd]);
    let disk = connection
        .open_disk("[ds1] vm2/vm2.vmdk", OpenFlags::read_only())
        .unwrap();
    assert_eq!(disk.path(), "[ds1] vm2/vm2.vmdk");
    assert_eq!(disk.transport_mode_text(), Some("nbd"));
    assert_eq!(
        disk.info().unwrap().transport_mode,
        Some(TransportMode::Nbd)
    );
    assert_eq!(
        fixture.stats()["connects"]["moref=vm-sel2"]["transports"],
        "nbd"
    );

    // No list: VDDK's own default order applies (NULL is passed).
    let params = remote("moref=vm-sel3")
        .snapshot("snapshot-9")
        .build()
        .unwrap();
    assert_eq!(
        vddk.plan(&params).unwrap(),
        vec![
            TransportMode::San,
            TransportMode::HotAdd,
            TransportMode::NbdSsl,
            TransportMode::Nbd
        ]
    );
    vddk.connect(&params).unwrap();
    assert!(fixture.stats()["connects"]["moref=vm-sel3"]["transports"].is_null());

    // Nothing usable: an error before ConnectEx, explaining each rejection.
    let params = remote("moref=vm-sel4")
        .transport_modes([TransportMode::San])
        .build()
        .unwrap();
    match vddk.connect(&params).unwrap_err() {
        Error::NoTransport(reasons) => {
            assert_eq!(reasons.len(), 1);
            assert!(reasons[0].1.contains("snapshot"), "{reasons:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(fixture.stats()["connects"]["moref=vm-sel4"].is_null());
    let local_nbd = ConnectParams::builder()
        .transport_modes([TransportMode::Nbd])
        .build()
        .unwrap();
    assert!(matches!(
        vddk.connect(&local_nbd),
        Err(Error::NoTransport(_))
    ));
}

#[test]
fn session_cookies_go_as_sessionid_credentials() {
    let (fixture, vddk) = shared();
    let params = ConnectParams::builder()
        .server("vc.example")
        .vm("moref=vm-cookie")
        .credentials(disk_transport::Credentials::SessionId {
            cookie: "vmware_soap_session=\"52f3\"".into(),
            user: "admin".into(),
            key: PASSWORD.into(),
        })
        .build()
        .unwrap();
    let connection = vddk.connect(&params).unwrap();
    assert!(!format!("{connection:?} {params:?}").contains("52f3"));
    let c = &fixture.stats()["connects"]["moref=vm-cookie"];
    assert_eq!(c["cred_type"], 2, "{c}");
    assert_eq!(c["user"], "admin");
    assert_eq!(
        c["password_len"],
        PASSWORD.len(),
        "the key goes where VDDK expects it"
    );
}

#[test]
fn access_guard_ends_access_on_drop_on_panic_and_explicitly() {
    let (fixture, vddk) = shared();
    let params = remote("moref=vm-access").build().unwrap();

    drop(vddk.prepare_for_access(&params, "ident-drop").unwrap());

    let guard = vddk.prepare_for_access(&params, "ident-end").unwrap();
    assert_eq!(guard.identity(), "ident-end");
    guard.end().unwrap();

    let vddk2 = Arc::clone(vddk);
    let params2 = params.clone();
    let panicked = std::panic::catch_unwind(move || {
        let _guard = vddk2.prepare_for_access(&params2, "ident-panic").unwrap();
        let connection = vddk2.connect(&params2).unwrap();
        let _disk = connection
            .open("[ds1] access.vmdk", OpenFlags::read_only())
            .unwrap();
        panic!("the backup failed half-way");
    });
    assert!(panicked.is_err());

    // A failed PrepareForAccess gives no guard, so no EndAccess.
    let err = vddk
        .prepare_for_access(&params, "fail:prepare")
        .unwrap_err();
    assert_eq!(err.vix_code(), Some(1));
    // PrepareForAccess needs the VM.
    assert!(matches!(
        vddk.prepare_for_access(&ConnectParams::local(), "ident-local"),
        Err(Error::InvalidParams(_))
    ));

    let stats = fixture.stats();
    for id in ["ident-drop", "ident-end", "ident-panic"] {
        assert_eq!(
            stats["access"][id],
            serde_json::json!({"prepared": 1, "ended": 1}),
            "{id}"
        );
    }
    assert!(stats["access"]["fail:prepare"].is_null());
    assert_eq!(count(&stats["violations"]["unmatched_end_access"]), 0);
    // The disk opened before the panic was closed during unwinding.
    let d = &stats["disks"]["[ds1] access.vmdk"];
    assert_eq!(count(&d["opens"]), count(&d["closes"]), "{d}");
}

#[test]
fn passwords_never_reach_logs_or_debug_output() {
    let (_, vddk) = shared();
    let params = remote("moref=vm-redact").build().unwrap();
    let connection = vddk.connect(&params).unwrap();
    let logs = logs().lock().unwrap().clone();
    let line = logs
        .iter()
        .find(|(_, m)| m.starts_with("ConnectEx: logging in to vc.example"))
        .expect("the stand-in logs its login");
    assert_eq!(
        line.1,
        "ConnectEx: logging in to vc.example as admin with password <redacted>"
    );
    assert!(logs.iter().all(|(_, m)| !m.contains(PASSWORD)));
    let debug = format!("{params:?} {connection:?} {vddk:?}");
    assert!(!debug.contains(PASSWORD), "{debug}");
}

#[test]
fn asynchronous_requests_complete_on_a_worker_and_mix_safely_with_sync_calls() {
    let (fixture, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    for name in ["async-inline", "async-thread?async_delay_us=3000"] {
        let disk: Arc<dyn Disk> =
            Arc::from(connection.open(name, OpenFlags::read_write()).unwrap());
        assert_eq!(disk.max_in_flight(), 8);
        let (tx, rx) = mpsc::channel();
        for i in 0..8u64 {
            let tx = tx.clone();
            disk.submit_write(
                i * 4096,
                pattern(4096, i as u8),
                Box::new(move |r| tx.send((i, r.map(|b| b.len()))).unwrap()),
            );
        }
        // A synchronous read right away: the backend Waits first (VDDK forbids mixing).
        let mut first = vec![0u8; 4096];
        disk.read_at(&mut first, 0).unwrap();
        assert_eq!(first, pattern(4096, 0));
        for _ in 0..8 {
            let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(r.unwrap(), 4096);
        }
        // Completions may use the disk again (they run on their own thread).
        let (tx, rx) = mpsc::channel();
        let again = Arc::clone(&disk);
        disk.submit_read(
            4096,
            vec![0; 4096],
            Box::new(move |r| {
                let buf = r.unwrap();
                let mut direct = vec![0u8; 4096];
                again.read_at(&mut direct, 4096).unwrap();
                tx.send(buf == direct && buf == pattern(4096, 1)).unwrap();
            }),
        );
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "{name}");
    }
    // Errors of queued requests come back through the completion.
    let disk = connection
        .open(
            "async-fail?fail_read=8:16007&async_delay_us=1000",
            OpenFlags::read_only(),
        )
        .unwrap();
    let (tx, rx) = mpsc::channel();
    disk.submit_read(4096, vec![0; 1024], Box::new(move |r| tx.send(r).unwrap()));
    let err = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.vix_code(), Some(16007));
    assert!(err.to_string().contains("VixDiskLib_ReadAsync"), "{err}");
    // Misaligned submissions fail at once, through the completion too.
    let (tx, rx) = mpsc::channel();
    disk.submit_read(1, vec![0; 512], Box::new(move |r| tx.send(r).unwrap()));
    assert!(matches!(rx.recv().unwrap(), Err(Error::Unaligned { .. })));
    drop(disk);

    let stats = fixture.stats();
    assert_eq!(count(&stats["violations"]["mixed_mode"]), 0, "{stats}");
    assert_eq!(
        count(&stats["violations"]["close_with_outstanding"]),
        0,
        "{stats}"
    );
    assert!(count(&stats["disks"]["async-thread"]["async_writes"]) == 8);
}

#[test]
fn threading_rules_hold_under_concurrency() {
    let (fixture, vddk) = shared();
    // Many threads connect, open, do I/O and close at once: Open/Close must never overlap.
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let vddk = Arc::clone(vddk);
            std::thread::spawn(move || {
                for i in 0..6 {
                    let connection = vddk.connect(&local_rw()).unwrap();
                    let disk = connection
                        .open(&format!("mt-{t}-{i}"), OpenFlags::read_write())
                        .unwrap();
                    disk.write_at(&pattern(1024, t), 0).unwrap();
                    let mut back = vec![0u8; 1024];
                    disk.read_at(&mut back, 0).unwrap();
                    assert_eq!(back, pattern(1024, t));
                }
            })
        })
        .collect();
    // Meanwhile, four threads share one disk handle: calls on it must be serialised.
    let connection = vddk.connect(&local_rw()).unwrap();
    let shared_disk: Arc<dyn Disk> = Arc::from(
        connection
            .open("mt-shared", OpenFlags::read_write())
            .unwrap(),
    );
    let sharers: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = Arc::clone(&shared_disk);
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let offset = (t * 10 + i) * 512;
                    disk.write_at(&[t as u8 + 1; 512], offset).unwrap();
                    let mut b = [0u8; 512];
                    disk.read_at(&mut b, offset).unwrap();
                    assert_eq!(b, [t as u8 + 1; 512]);
                    disk.flush().unwrap();
                }
            })
        })
        .collect();
    for w in workers.into_iter().chain(sharers) {
        w.join().unwrap();
    }
    let stats = fixture.stats();
    let v = &stats["violations"];
    for rule in [
        "open_close_overlap",
        "handle_concurrency",
        "disconnect_with_open_handles",
        "bad_handle",
        "bad_connection",
    ] {
        assert_eq!(count(&v[rule]), 0, "{rule}: {stats}");
    }
}

#[test]
fn metadata_round_trips() {
    let (_, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    let disk = connection.open("meta", OpenFlags::read_write()).unwrap();
    let keys = disk.metadata_keys().unwrap();
    assert!(
        keys.contains(&"uuid".to_owned()) && keys.contains(&"adapterType".to_owned()),
        "{keys:?}"
    );
    assert_eq!(disk.read_metadata("adapterType").unwrap(), "lsilogic");
    // Longer than the first buffer: BUFFER_TOOSMALL, then a second call with the right size.
    let long = "v".repeat(1000);
    disk.write_metadata("backup.note", &long).unwrap();
    assert_eq!(disk.read_metadata("backup.note").unwrap(), long);
    assert!(disk
        .metadata_keys()
        .unwrap()
        .contains(&"backup.note".to_owned()));
    assert_eq!(
        disk.read_metadata("nope").unwrap_err().vix_code(),
        Some(16052)
    );
    assert!(matches!(
        disk.read_metadata("a\0b"),
        Err(Error::InvalidParams(_))
    ));
}

#[test]
fn cleanup_and_libdir_conflicts() {
    let (fixture, vddk) = shared();
    // Cleanup is per host: the VM is not passed (the stand-in rejects a vmxSpec).
    let params = remote("moref=vm-cleanup").build().unwrap();
    assert_eq!(
        vddk.cleanup(&params).unwrap(),
        disk_transport::CleanupStats::default()
    );
    assert!(count(&fixture.stats()["calls"]["VixDiskLib_Cleanup"]) >= 1);

    let err = VddkTransport::new(&VddkOptions::new().libdir("/somewhere/else")).unwrap_err();
    assert!(err.to_string().contains("once per process"), "{err}");
    let params = ConnectParams::builder()
        .libdir("/somewhere/else")
        .build()
        .unwrap();
    assert!(matches!(
        vddk.connect(&params),
        Err(Error::InvalidParams(_))
    ));
    // So is another InitEx configuration file; the one in use is fine.
    let other = fixture.libdir.join("other.conf");
    std::fs::write(&other, "").unwrap();
    let err = VddkTransport::new(&fixture.options().config_path(&other)).unwrap_err();
    assert!(err.to_string().contains("configuration"), "{err}");
    let same = VddkTransport::new(&fixture.options()).unwrap();
    assert_eq!(
        same.library().config_path.as_deref(),
        Some(std::fs::canonicalize(&fixture.config).unwrap().as_path())
    );
    // The same directory through the parameters is fine.
    let same = ConnectParams::builder()
        .libdir(&fixture.libdir)
        .build()
        .unwrap();
    let t = VddkTransport::from_params(&same).unwrap();
    t.connect(&same).unwrap();
    // A configuration file in the parameters that is not the one in force is an error at
    // connect time too, not silently ignored; the one in force is fine.
    let other_config = ConnectParams::builder()
        .config_path(&other)
        .build()
        .unwrap();
    let err = vddk.connect(&other_config).unwrap_err().to_string();
    assert!(
        err.contains("differs from the one VDDK was initialised with"),
        "{err}"
    );
    let same_config = ConnectParams::builder()
        .config_path(&fixture.config)
        .build()
        .unwrap();
    vddk.connect(&same_config).unwrap();
}

#[test]
fn close_and_disconnect_are_explicit_and_return_errors() {
    let (fixture, vddk) = shared();
    let connection = vddk.connect_vddk(&local_rw()).unwrap();
    let disk = connection
        .open_disk("explicit-close?size=65536", OpenFlags::read_write())
        .unwrap();
    disk.write_at(&[7; 512], 0).unwrap();
    // Disconnecting with a disk open is refused (VDDK closes disks first); the connection lives
    // on in the disk and ends when it closes.
    let err = connection.disconnect().unwrap_err().to_string();
    assert!(
        err.contains("1 disks opened on this connection are still open"),
        "{err}"
    );
    disk.close().unwrap();
    let stats = fixture.stats();
    assert_eq!(
        count(&stats["disks"]["explicit-close"]["closes"]),
        1,
        "{stats}"
    );

    let connection = vddk.connect_vddk(&local_rw()).unwrap();
    let disk = connection
        .open_disk("explicit-close", OpenFlags::read_only())
        .unwrap();
    let mut sector = [0; 512];
    disk.read_at(&mut sector, 0).unwrap();
    assert_eq!(sector, [7; 512]);
    disk.close().unwrap();
    connection.disconnect().unwrap();
    let stats = fixture.eventually(|s| count(&s["disks"]["explicit-close"]["closes"]) == 2);
    assert_eq!(
        count(&stats["disks"]["explicit-close"]["closes"]),
        2,
        "{stats}"
    );
    assert_eq!(
        count(&stats["violations"]["disconnect_with_open_handles"]),
        0
    );
    assert_eq!(
        count(&stats["violations"]["bad_handle"]),
        0,
        "closed once, not again on drop"
    );
}

#[test]
fn seeded_memory_disks_hold_the_seed_files_bytes() {
    let (fixture, vddk) = shared();
    // A memory disk seeded from a file holds its bytes; zero chunks stay unallocated.
    let seed = fixture.libdir.join("seed.img");
    let mut seeded = vec![0u8; 256 * 1024];
    seeded[128 * 1024..128 * 1024 + 1000].copy_from_slice(&pattern(1000, 9));
    std::fs::write(&seed, &seeded).unwrap();
    let connection = vddk.connect_vddk(&local_rw()).unwrap();
    let disk = connection
        .open_disk(
            &format!("seeded?seed={}", seed.display()),
            OpenFlags::read_only(),
        )
        .unwrap();
    assert_eq!(disk.info().unwrap().capacity, 256 * 1024);
    let mut back = vec![1u8; 256 * 1024];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == seeded);
    let data: Vec<_> = disk
        .allocated_extents(0, 256 * 1024)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, [(128 * 1024, 64 * 1024)]);
    let err = connection
        .open_disk(
            "seed-missing?seed=/nonexistent/seed.img",
            OpenFlags::read_only(),
        )
        .unwrap_err();
    assert_eq!(err.vix_code(), Some(4), "{err}");
}

#[test]
fn the_copy_engine_backs_up_a_vddk_disk_and_restores_onto_one() {
    use disk_transport::copy::{copy, CopyOptions};
    use disk_transport::memory::MemoryDisk;

    let (fixture, vddk) = shared();
    let connection = vddk.connect(&local_rw()).unwrap();
    // Completions arrive on the stand-in's threads after a delay, as over a network.
    let src = connection
        .open(
            "copy-src?size=4194304&async_delay_us=500",
            OpenFlags::read_write(),
        )
        .unwrap();
    src.write_at(&pattern(65536, 3), 0).unwrap();
    src.write_at(&pattern(131072, 4), 2 << 20).unwrap();

    let options = CopyOptions::default().request_size(65536);
    let backup = MemoryDisk::new(4 << 20);
    let report = copy(src.as_ref(), &backup, &options, &mut |_| {}).unwrap();
    // Only the allocated chunks were read.
    assert_eq!(report.progress.read, 65536 + 131072);
    let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    src.read_at(&mut a, 0).unwrap();
    backup.read_at(&mut b, 0).unwrap();
    assert!(a == b);

    // And back onto another VDDK disk.
    let dst = connection
        .open(
            "copy-dst?size=4194304&async_delay_us=500",
            OpenFlags::read_write(),
        )
        .unwrap();
    copy(&backup, dst.as_ref(), &options, &mut |_| {}).unwrap();
    dst.read_at(&mut a, 0).unwrap();
    assert!(a == b);

    let stats = fixture.stats();
    assert!(
        count(&stats["disks"]["copy-src"]["async_reads"]) >= 3,
        "{stats}"
    );
    assert!(
        count(&stats["disks"]["copy-dst"]["async_writes"]) >= 3,
        "{stats}"
    );
    assert!(count(&stats["disks"]["copy-dst"]["flushes"]) >= 1);
    for rule in ["mixed_mode", "handle_concurrency", "close_with_outstanding"] {
        assert_eq!(count(&stats["violations"][rule]), 0, "{rule}: {stats}");
    }
}
