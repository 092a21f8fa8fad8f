//! The fake monitor through the crate's own client: typed commands, the job helper, events
//! raised while the client is idle, a real Unix socket, and every scripted fault ending in
//! the client error a misbehaving QEMU would give.
#![cfg(feature = "fake")]

use std::time::{Duration, Instant};

use disk_transport::memory::MemoryDisk;
use disk_transport::Disk;
use qmp_proto::cmd::{
    BlockDirtyBitmapAdd, BlockDirtyBitmapAddArgs, BlockdevBackup, BlockdevBackupArgs, QueryStatus,
};
use qmp_proto::fake::{FakeMonitor, Fault, ImageFormat, QemuRelease, Response};
use qmp_proto::types::SyncMode;
use qmp_proto::{ClientConfig, Error, ErrorClass, EventFilter, JobOptions, Monitor, MonitorExt};
use serde_json::json;

const SIZE: u64 = 8 << 20;

/// A QEMU 7.2 whose disk image holds `seed` at offset 0 (the guest's data before the test).
fn vm_with(seed: &[u8]) -> FakeMonitor {
    let disk = MemoryDisk::new(SIZE);
    disk.write_at(seed, 0).unwrap();
    FakeMonitor::builder()
        .release(QemuRelease::V7_2)
        .image("/vm/disk.qcow2", ImageFormat::Qcow2, disk)
        .image(
            "/vm/fleece.qcow2",
            ImageFormat::Qcow2,
            MemoryDisk::new(SIZE),
        )
        .build()
}

fn vm() -> FakeMonitor {
    vm_with(&[])
}

fn add_nodes(qemu: &mut impl Monitor) {
    qemu.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": "vda",
            "file": {"driver": "file", "filename": "/vm/disk.qcow2"}})),
    )
    .unwrap();
    qemu.execute_raw(
        "blockdev-add",
        Some(
            json!({"driver": "qcow2", "node-name": "fleece", "backing": "vda",
            "file": {"driver": "file", "filename": "/vm/fleece.qcow2"}}),
        ),
    )
    .unwrap();
}

#[test]
fn pull_backup_through_the_client_sees_the_point_in_time() {
    let fake = vm_with(&[1u8; 65536]);
    let mut qemu = fake.connect().unwrap();
    add_nodes(&mut qemu);
    // libvirt's pull backup: checkpoint bitmap and fleecing job in one transaction.
    qemu.execute_raw(
        "transaction",
        Some(json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": "cp1", "persistent": true}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "fleece", "name": "backup-vda", "disabled": true}},
            {"type": "blockdev-backup", "data": {"device": "vda", "target": "fleece", "sync": "none",
                "job-id": "backup-vda", "auto-dismiss": false}}]})),
    )
    .unwrap();
    qemu.execute_raw(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": "/run/nbd.sock"}}})),
    )
    .unwrap();
    qemu.execute_raw(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": "e0", "node-name": "fleece", "name": "vda",
            "writable": false, "bitmaps": ["backup-vda"]}),
        ),
    )
    .unwrap();
    // The guest keeps writing while the backup reads.
    fake.guest_write("vda", &[2u8; 4096], 0).unwrap();
    fake.guest_write("vda", &[3u8; 4096], 5 << 20).unwrap();

    let export = fake.export_disk("vda", Some("backup-vda")).unwrap();
    let mut buf = vec![0u8; 65536];
    export.read_at(&mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 1),
        "the export shows the data of the moment"
    );
    export.read_at(&mut buf, 5 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let extents = export.allocated_extents(0, SIZE).unwrap();
    assert_eq!(extents[0].length, 65536, "{extents:?}");
    assert!(export.write_at(&[0], 0).is_err(), "read-only export");
    // The checkpoint bitmap recorded both writes.
    assert_eq!(
        fake.state()
            .node("vda")
            .unwrap()
            .bitmap("cp1")
            .unwrap()
            .count(),
        2 * 65536
    );

    // Teardown as libvirt does it.
    qemu.cancel_block_job("backup-vda", &JobOptions::default())
        .unwrap();
    qemu.execute_raw("nbd-server-stop", None).unwrap();
    qemu.execute_raw("blockdev-del", Some(json!({"node-name": "fleece"})))
        .unwrap();
    assert!(fake.state().jobs().is_empty() && fake.state().exports().is_empty());
    assert!(export.read_at(&mut buf, 0).is_err(), "the export is gone");
    fake.state().check_invariants().unwrap();
}

#[test]
fn run_job_follows_a_full_backup_to_its_end() {
    let fake = vm_with(&[7u8; 512]);
    let mut qemu = fake.connect().unwrap();
    add_nodes(&mut qemu);
    qemu.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "null-co", "node-name": "sink", "size": SIZE})),
    )
    .unwrap();
    let args = BlockdevBackupArgs::new("full", "vda", "sink", SyncMode::Full).auto_dismiss(false);
    let info = qemu
        .run_job("full", &JobOptions::default(), |m| {
            m.call::<BlockdevBackup>(&args).map(drop)
        })
        .unwrap();
    assert_eq!(info.map(|i| i.current_progress), Some(SIZE));
    assert!(fake.state().jobs().is_empty(), "dismissed by the helper");
}

#[test]
fn events_raised_while_idle_reach_a_client_on_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeMonitor::new();
    let server = fake.listen_unix(dir.path().join("qmp.sock")).unwrap();
    let mut qemu = qmp_proto::Client::connect_unix(server.path(), ClientConfig::default()).unwrap();
    assert_eq!(qemu.greeting().version.qemu.major, 10);
    let sub = qemu
        .subscribe(EventFilter::names(["RESUME", "STOP"]))
        .unwrap();
    // Another monitor connection starts the VM; this one hears of it without asking.
    let mut other = fake.connect().unwrap();
    other.execute_raw("cont", None).unwrap();
    let event = qemu
        .next_event(sub, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "RESUME");
    fake.emit_event("STOP", None);
    let event = qemu
        .next_event(sub, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "STOP");
    let status = qemu.call::<QueryStatus>(&()).unwrap();
    assert!(status.running);
    assert_eq!(status.singlestep, None, "10.0 has no singlestep");
    drop(server);
    assert!(!dir.path().join("qmp.sock").exists());
}

#[test]
fn a_zero_timeout_takes_only_events_that_have_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeMonitor::new();
    let server = fake.listen_unix(dir.path().join("qmp.sock")).unwrap();
    let mut qemu = qmp_proto::Client::connect_unix(server.path(), ClientConfig::default()).unwrap();
    let sub = qemu.subscribe(EventFilter::names(["STOP"])).unwrap();
    assert!(qemu.next_event(sub, Duration::ZERO).unwrap().is_none());
    fake.emit_event("STOP", None);
    // The event crosses a real socket: poll until it is there (bounded).
    let mut event = None;
    for _ in 0..500 {
        event = qemu.next_event(sub, Duration::ZERO).unwrap();
        if event.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(event.expect("the event within 5 s").event, "STOP");
    assert!(qemu.next_event(sub, Duration::ZERO).unwrap().is_none());
    // The stream blocks again: a command's reply is waited for as before.
    let status = qemu.call::<QueryStatus>(&()).unwrap();
    assert!(!status.running, "the fake VM was never started");
}

#[test]
fn scripted_faults_end_in_clear_client_errors() {
    let fake = vm();
    let config = ClientConfig::default().timeout(Duration::from_millis(300));

    fake.fault_on(
        "query-status",
        Fault::Error {
            class: "DeviceNotActive".into(),
            desc: "scripted".into(),
        },
    );
    let mut qemu = fake.connect_with(config.clone()).unwrap();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::DeviceNotActive), "{err}");

    fake.fault_on("query-status", Fault::Delay(Duration::from_secs(2)));
    let started = Instant::now();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));

    fake.fault_on("query-status", Fault::Disconnect);
    let mut qemu = fake.connect_with(config.clone()).unwrap();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");

    fake.fault_on("query-status", Fault::Hang);
    let mut qemu = fake.connect_with(config.clone()).unwrap();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    fake.fault_on(
        "query-status",
        Fault::Garbage(b"\x01 not json }\r\n".to_vec()),
    );
    let mut qemu = fake.connect_with(config.clone()).unwrap();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");

    fake.fault_on("query-status", Fault::UnknownId(json!(987654)));
    let mut qemu = fake.connect_with(config.clone()).unwrap();
    let outcome = qemu.call::<QueryStatus>(&());
    assert!(
        matches!(outcome, Err(Error::Protocol { .. })),
        "a reply to an id never sent is an error: {outcome:?}"
    );

    fake.fault_on("query-status", Fault::DropReply);
    let mut qemu = fake.connect_with(config).unwrap();
    let err = qemu.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
}

#[test]
fn handlers_replace_commands_and_calls_are_recorded() {
    let fake = vm();
    fake.handler("query-status", |_, _| {
        Response::ok(json!({"status": "inmigrate", "running": false, "singlestep": false}))
    });
    let mut qemu = fake.connect().unwrap();
    let status = qemu.call::<QueryStatus>(&()).unwrap();
    assert_eq!(status.status.as_str(), "inmigrate");
    let err = qemu
        .call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("nope", "b"))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Cannot find device='nope' nor node-name='nope'"),
        "{err}"
    );
    let requests = fake.state().requests.clone();
    assert_eq!(
        requests,
        ["qmp_capabilities", "query-status", "block-dirty-bitmap-add"]
    );
}
