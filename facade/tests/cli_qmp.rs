//! `vmsdk qmp URI ...` end to end against the fake QEMU monitor listening on a Unix socket, as
//! QEMU's `-qmp unix:PATH,server=on,wait=off` does: every table, the JSON forms, raw commands,
//! QEMU's refusals and the event stream.

#![cfg(feature = "cli")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use disk_transport::memory::MemoryDisk;
use qmp_proto::fake::{FakeMonitor, FakeServer, ImageFormat, QemuRelease};
use qmp_proto::Monitor;
use serde_json::json;

fn vmsdk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(args)
        .env_remove("VMSDK_BACKEND")
        .output()
        .expect("vmsdk runs")
}

fn stdout_ok(args: &[&str]) -> String {
    let out = vmsdk(args);
    assert!(
        out.status.success(),
        "vmsdk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A QEMU 7.2 with a qcow2 disk, a checkpoint bitmap with one dirty cluster, a fleecing
/// backup job and its NBD export, listening at `dir/qmp.sock`.
fn backup_in_progress(dir: &std::path::Path) -> (FakeMonitor, FakeServer, String) {
    let fake = FakeMonitor::builder()
        .release(QemuRelease::V7_2)
        .image(
            "/vm/vda.qcow2",
            ImageFormat::Qcow2,
            MemoryDisk::new(64 << 20),
        )
        .image(
            "/vm/fleece.qcow2",
            ImageFormat::Qcow2,
            MemoryDisk::new(64 << 20),
        )
        .build();
    let mut qemu = fake.connect().unwrap();
    for (command, arguments) in [
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "vda",
            "file": {"driver": "file", "filename": "/vm/vda.qcow2"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fleece", "backing": "vda",
            "file": {"driver": "file", "filename": "/vm/fleece.qcow2"}}),
        ),
        (
            "transaction",
            json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": "cp1", "persistent": true}},
            {"type": "blockdev-backup", "data": {"device": "vda", "target": "fleece", "sync": "none",
                "job-id": "backup-vda", "auto-dismiss": false}}]}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/run/nbd.sock"}}}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "fleece", "name": "vda"}),
        ),
    ] {
        qemu.execute_raw(command, Some(arguments)).unwrap();
    }
    fake.guest_write("vda", &[1; 4096], 1 << 20).unwrap();
    let server = fake.listen_unix(dir.join("qmp.sock")).unwrap();
    let uri = format!("qmp+unix://{}", server.path().display());
    (fake, server, uri)
}

#[test]
fn tables_and_json_show_the_monitor_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _server, uri) = backup_in_progress(dir.path());

    let status = stdout_ok(&["qmp", &uri, "status"]);
    assert_eq!(
        status,
        "prelaunch\nQEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
    );
    let status: serde_json::Value =
        serde_json::from_str(&stdout_ok(&["qmp", &uri, "status", "--json"])).unwrap();
    assert_eq!(status["singlestep"], false, "7.2 still reports singlestep");

    let disks = stdout_ok(&["qmp", &uri, "disks"]);
    let vda = disks.lines().find(|l| l.starts_with("vda ")).expect(&disks);
    assert!(
        vda.contains("qcow2") && vda.contains("67108864") && vda.contains("cp1"),
        "{disks}"
    );
    assert!(
        disks.lines().any(|l| l.contains("copy-before-write")),
        "the job's filter: {disks}"
    );

    let bitmaps = stdout_ok(&["qmp", &uri, "bitmaps"]);
    let cp1 = bitmaps.lines().find(|l| l.contains("cp1")).expect(&bitmaps);
    let cells: Vec<&str> = cp1.split_whitespace().collect();
    assert_eq!(
        cells,
        ["vda", "cp1", "yes", "yes", "no", "no", "65536", "65536"]
    );

    let jobs = stdout_ok(&["qmp", &uri, "jobs"]);
    assert!(
        jobs.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["backup-vda", "backup", "running", "0/67108864"]),
        "{jobs}"
    );

    let exports = stdout_ok(&["qmp", &uri, "exports"]);
    assert!(
        exports
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["e0", "nbd", "fleece", "active"]),
        "{exports}"
    );

    let raw: serde_json::Value =
        serde_json::from_str(&stdout_ok(&["qmp", &uri, "raw", "query-block-exports"])).unwrap();
    assert_eq!(
        raw,
        json!([{"id": "e0", "node-name": "fleece", "shutting-down": false, "type": "nbd"}])
    );
}

#[test]
fn refusals_carry_qemus_class_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _server, uri) = backup_in_progress(dir.path());
    let out = vmsdk(&[
        "qmp",
        &uri,
        "raw",
        "block-export-add",
        r#"{"type": "nbd", "id": "e1", "node-name": "vda", "name": "vdb", "bitmaps": ["cp1"]}"#,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Enabled bitmap 'cp1' incompatible with readonly export"),
        "{stderr}"
    );
    let out = vmsdk(&[
        "qmp",
        &uri,
        "raw",
        "blockdev-del",
        r#"{"node-name": "fleece"}"#,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Node fleece is in use"));
}

#[test]
fn events_are_printed_as_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _server, uri) = backup_in_progress(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(["qmp", &uri, "events", "--count", "2", "--timeout", "20s"])
        .env_remove("VMSDK_BACKEND")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tool subscribes after it connects: keep the VM busy until it has seen two events.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut qemu = fake.connect().unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vmsdk qmp events did not end");
        qemu.execute_raw("cont", None).unwrap();
        qemu.execute_raw("stop", None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let names: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names.len(), 2, "{out}");
    assert!(names.iter().all(|n| n == "RESUME" || n == "STOP"), "{out}");
}
