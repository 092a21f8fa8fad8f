//! A backup written against `vmsdk::disk::vddk` alone, as a VDDK developer moving from C writes
//! it, run through the real `dlopen` path into the stand-in `libvixDiskLib.so` built from this
//! workspace: the configuration is checked before InitEx, then PrepareForAccess, ConnectEx with
//! a snapshot, Open of a remote disk kept as a file in the stand-in's datastore directory, a
//! sparse copy to a local file, Close, Disconnect and EndAccess with their errors, Cleanup and
//! Exit. The stand-in's counters say every call happened once, in VDDK's order, by its rules.
//! Its own process: InitEx runs once per process.
#![cfg(target_os = "linux")]

use std::path::Path;

use vmsdk::disk::copy::{copy, CopyOptions};
use vmsdk::disk::vddk::{
    self, ConnectParams, DiskTransport, LogLevel, Thumbprint, TransportMode, VddkOptions,
};
use vmsdk::disk::{Disk, OpenFlags};
use vmsdk_tests::vddk_standin_libdir;

const PASSWORD: &str = "facade secret";

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the stand-in's counters"))
        .expect("JSON counters")
}

#[test]
fn a_backup_through_the_facade_runs_vddks_whole_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastores/ds1/vm-42");
    std::fs::create_dir_all(&datastore).unwrap();
    // A 4 MiB disk with data in two places and holes elsewhere.
    let image = datastore.join("vm-42.vmdk");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x5A; 65536], 0).unwrap();
    file.write_all_at(&[0xC3; 4096], 3 << 20).unwrap();
    drop(file);

    let stats_path = dir.path().join("stats.json");
    let conf = dir.path().join("vddk.conf");
    std::fs::write(
        &conf,
        format!(
            "vixDiskLib.nfc.ReadTimeoutMs = 60000\n\
             standin.statsFile = \"{}\"\n\
             standin.datastoreDir = \"{}\"\n\
             standin.password = \"{PASSWORD}\"\n",
            stats_path.display(),
            dir.path().join("datastores").display()
        ),
    )
    .unwrap();
    // The same check the transport runs before InitEx: nothing to warn about here.
    assert!(vddk::check_config(&conf, true).unwrap().is_empty());

    let warnings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&warnings);
    let vddk = vddk::transport(
        &VddkOptions::new()
            .libdir(vddk_standin_libdir())
            .config_path(&conf)
            .strict_config(true)
            .log_hook(move |level, message| {
                if level != LogLevel::Log {
                    seen.lock().unwrap().push(message.to_owned());
                }
            }),
    )
    .unwrap();
    eprintln!(
        "peer: the stand-in libvixDiskLib.so.{} at {}",
        vddk.library().version.unwrap_or(0),
        vddk.library().path.display()
    );

    let params = ConnectParams::builder()
        .server("vcenter.example")
        .thumbprint(
            Thumbprint::new("AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD").unwrap(),
        )
        .user_password("backup@vsphere.local", PASSWORD)
        .vm("moref=vm-42")
        .snapshot("snapshot-7")
        .transport_modes([TransportMode::HotAdd, TransportMode::NbdSsl])
        .build()
        .unwrap();
    assert_eq!(
        vddk.plan(&params).unwrap(),
        [TransportMode::HotAdd, TransportMode::NbdSsl]
    );

    let access = vddk.prepare_for_access(&params, "facade-backup").unwrap();
    let connection = vddk.connect_vddk(&params).unwrap();
    assert_eq!(
        connection.planned_transports(),
        [TransportMode::HotAdd, TransportMode::NbdSsl]
    );
    let disk = connection
        .open_disk("[ds1] vm-42/vm-42.vmdk", OpenFlags::read_only())
        .unwrap();
    let info = disk.info().unwrap();
    assert_eq!(info.capacity, 4 << 20);
    assert_eq!(info.transport_mode, Some(TransportMode::HotAdd));

    let backup_path = dir.path().join("backup.img");
    let (backup, _) =
        vmsdk::disk::open_or_create(backup_path.to_str().unwrap(), info.capacity).unwrap();
    let report = copy(&disk, backup.as_ref(), &CopyOptions::default(), &mut |_| {}).unwrap();
    drop(backup);
    assert_eq!(
        std::fs::read(&backup_path).unwrap(),
        std::fs::read(&image).unwrap()
    );
    // Sparse: only the two 64 KiB chunks with data were read from VDDK, and at most those
    // written.
    assert_eq!(report.progress.read, 2 * 65536, "{report:?}");
    assert!(report.progress.written <= 2 * 65536, "{report:?}");

    disk.close().unwrap();
    connection.disconnect().unwrap();
    access.end().unwrap();
    assert_eq!(vddk.cleanup(&params).unwrap().remaining, 0);
    drop(vddk);
    vddk::shutdown().unwrap();

    let stats = stats(&stats_path);
    assert_eq!(stats["violations"], serde_json::json!({}), "{stats}");
    for (function, times) in [
        ("VixDiskLib_InitEx", 1),
        ("VixDiskLib_PrepareForAccess", 1),
        ("VixDiskLib_ConnectEx", 1),
        ("VixDiskLib_Open", 1),
        ("VixDiskLib_Close", 1),
        ("VixDiskLib_Disconnect", 1),
        ("VixDiskLib_EndAccess", 1),
        ("VixDiskLib_Cleanup", 1),
        ("VixDiskLib_Exit", 1),
    ] {
        assert_eq!(stats["calls"][function], times, "{function}: {stats}");
    }
    assert_eq!(
        stats["access"]["facade-backup"],
        serde_json::json!({"prepared": 1, "ended": 1})
    );
    let connect = &stats["connects"]["moref=vm-42"];
    assert_eq!(connect["snapshot"], "snapshot-7", "{stats}");
    assert_eq!(connect["transports"], "hotadd:nbdssl", "{stats}");
    assert_eq!(connect["read_only"], true, "{stats}");
    assert_eq!(stats["open_handles"], 0);
    assert_eq!(stats["open_connections"], 0);
    assert!(
        warnings.lock().unwrap().is_empty(),
        "{:?}",
        warnings.lock().unwrap()
    );
}
