//! The QMP differential test: the scripts in `qmp-proto/tests/fixtures/scripts/` run on the raw
//! wire against real QEMU — 7.2 on the machine (Debian 12) and 10.0 in the Debian 13 peer root —
//! and against `qmp_proto::fake::FakeMonitor` built as the same release; after normalisation
//! (see `vmsdk_tests::qmp::normalize`) every reply and event must agree.
//!
//! `fake_matches_recorded_transcripts` needs no QEMU: it replays the scripts against the fake
//! and compares with the transcripts recorded from real QEMU under
//! `qmp-proto/tests/fixtures/transcripts/`. Record them again with
//! `VMSDK_QMP_RECORD=1 cargo test -p vmsdk-tests --test qmp_differential qemu_and_fake_agree`.

use serde_json::Value;
use vmsdk_tests::peers::{announce, peer_version, Generation};
use vmsdk_tests::qmp::{
    fake_builder_for, fake_for, first_difference, normalize, release_of, run_script, scripts,
    transcript_path, QemuPeer,
};

use qmp_proto::fake::QemuRelease;

fn run_fake(name: &str, script: &vmsdk_tests::qmp::Script, release: QemuRelease) -> Value {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fake = fake_for(script, release, dir.path());
    let stream = fake.connect_stream().expect("connect to the fake monitor");
    let transcript = run_script(stream, script, dir.path())
        .unwrap_or_else(|e| panic!("script {name} against the fake {release}: {e}"));
    normalize(&transcript, dir.path())
}

#[test]
fn fake_matches_recorded_transcripts() {
    let mut failures = Vec::new();
    for (name, script) in scripts() {
        for &release in QemuRelease::ALL {
            let path = transcript_path(&name, release);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (record it: VMSDK_QMP_RECORD=1 cargo test -p vmsdk-tests --test \
                     qmp_differential qemu_and_fake_agree)",
                    path.display()
                )
            });
            let recorded: Value = serde_json::from_str(&text).expect("transcript is JSON");
            let fake = run_fake(&name, &script, release);
            if let Some(diff) = first_difference(
                &format!("recorded {release}"),
                &recorded,
                &format!("fake {release}"),
                &fake,
            ) {
                failures.push(format!("script {name}: {diff}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn qemu_and_fake_agree() {
    let record = std::env::var_os("VMSDK_QMP_RECORD").is_some();
    let mut failures = Vec::new();
    for generation in Generation::selected() {
        if !generation.available() {
            continue;
        }
        let release = release_of(generation);
        announce(generation, &["qemu-system-x86_64", "qemu-img"]);
        if let Some(version) = peer_version(generation, "qemu-system-x86_64") {
            let (major, minor, _) = release.version();
            assert!(
                version.contains(&format!("version {major}.{minor}.")),
                "{generation}'s QEMU is not {release}: {version}"
            );
        }
        for (name, script) in scripts() {
            let dir = tempfile::tempdir().expect("temporary directory");
            let Some(qemu) = QemuPeer::start(generation, &script, dir.path()) else {
                continue;
            };
            let real = run_script(qemu.connect(), &script, dir.path())
                .unwrap_or_else(|e| panic!("script {name} against QEMU ({generation}): {e}"));
            drop(qemu);
            let real = normalize(&real, dir.path());
            if record {
                let path = transcript_path(&name, release);
                std::fs::create_dir_all(path.parent().unwrap()).expect("create fixtures dir");
                let mut text = serde_json::to_string_pretty(&real).expect("serialise");
                text.push('\n');
                std::fs::write(&path, text).expect("write transcript");
                eprintln!("recorded {}", path.display());
            }
            let fake = run_fake(&name, &script, release);
            let replies = real["replies"].as_array().map_or(0, Vec::len);
            let events = real["events"].as_array().map_or(0, Vec::len);
            match first_difference(
                &format!("{release} ({generation})"),
                &real,
                &format!("fake {release}"),
                &fake,
            ) {
                Some(diff) => failures.push(format!("script {name}: {diff}")),
                None => eprintln!(
                    "script {name}: {replies} replies and {events} events agree with {release}"
                ),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// libvirt's pull backup on real QEMU and on the fake, driven through `qmp_proto::Client`:
/// the guest writes through the backup's copy-before-write filter after the job started; the
/// NBD export of the fleecing overlay must still show the data of the moment, and its
/// `qemu:dirty-bitmap` the areas written since the checkpoint. Both exports are read over NBD
/// by disk-transport's client and by libnbd's `nbdinfo --map`; the fake's also through
/// `FakeMonitor::export_disk`; all must agree.
#[test]
fn fleecing_export_shows_the_point_in_time_like_qemu() {
    use disk_transport::{DirtyExtent, Disk, OpenFlags};
    use qmp_proto::{ClientConfig, Monitor};
    use serde_json::json;

    const SIZE: u64 = 64 << 20;
    const READ: usize = 2 << 20;

    /// The pull backup; returns the name QEMU gave the copy-before-write filter.
    fn pull_backup(qemu: &mut dyn Monitor, dir: &str) -> String {
        let mut run = |command: &str, arguments: serde_json::Value| {
            qemu.execute_raw(command, Some(arguments))
                .unwrap_or_else(|e| panic!("{command}: {e}"))
        };
        run(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "vda",
            "file": {"driver": "file", "filename": format!("{dir}/vda.qcow2")}}),
        );
        run(
            "human-monitor-command",
            json!({"command-line": "qemu-io vda \"write -P 0xab 0 131072\""}),
        );
        run(
            "block-dirty-bitmap-add",
            json!({"node": "vda", "name": "cp0"}),
        );
        run(
            "human-monitor-command",
            json!({"command-line": "qemu-io vda \"write -P 0x11 3145728 4096\""}),
        );
        run(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fleece", "backing": "vda",
            "file": {"driver": "file", "filename": format!("{dir}/fleece.qcow2")}}),
        );
        run(
            "transaction",
            json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": "cp1"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "fleece", "name": "backup-vda", "disabled": true}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "fleece", "target": "backup-vda",
                "bitmaps": [{"node": "vda", "name": "cp0"}]}},
            {"type": "blockdev-backup", "data": {"device": "vda", "target": "fleece", "sync": "none",
                "job-id": "backup-vda", "auto-dismiss": false}}]}),
        );
        let nodes = run("query-named-block-nodes", json!({"flat": true}));
        let filter = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["drv"] == "copy-before-write")
            .and_then(|n| n["node-name"].as_str())
            .expect("the backup's copy-before-write filter")
            .to_owned();
        // The guest writes (through the filter, as its device does) while the backup reads.
        for write in ["write -P 0xcd 0 65536", "write -P 0xee 1048576 4096"] {
            run(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io {filter} \"{write}\"")}),
            );
        }
        run(
            "nbd-server-start",
            json!({"addr": {"type": "unix",
            "data": {"path": format!("{dir}/nbd.sock")}}}),
        );
        run(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "fleece",
            "name": "vda", "writable": false, "bitmaps": ["backup-vda"]}),
        );
        filter
    }

    fn contents(disk: &dyn Disk) -> (Vec<u8>, Vec<DirtyExtent>) {
        let mut data = vec![0u8; READ];
        disk.read_at(&mut data, 0).unwrap();
        (data, disk.dirty_extents(0, SIZE).unwrap())
    }

    for generation in Generation::selected() {
        if !generation.available() {
            continue;
        }
        let release = release_of(generation);
        announce(generation, &["qemu-system-x86_64", "qemu-img"]);
        let script = vmsdk_tests::qmp::Script {
            description: "pull backup".into(),
            images: vec![
                vmsdk_tests::qmp::ScriptImage {
                    name: "vda.qcow2".into(),
                    format: "qcow2".into(),
                    size: SIZE,
                },
                vmsdk_tests::qmp::ScriptImage {
                    name: "fleece.qcow2".into(),
                    format: "qcow2".into(),
                    size: SIZE,
                },
            ],
            balloon: None,
            steps: Vec::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let Some(qemu) = QemuPeer::start(generation, &script, dir.path()) else {
            continue;
        };
        let mut client =
            qmp_proto::Client::handshake(qemu.connect(), ClientConfig::default()).unwrap();
        let dir_text = dir.path().to_string_lossy().into_owned();
        pull_backup(&mut client, &dir_text);
        let uri = format!(
            "nbd+unix:///vda?socket={}/nbd.sock&dirty-bitmap=backup-vda",
            dir_text
        );
        let export = disk_transport::open_uri(&uri, OpenFlags::read_only()).unwrap();
        let real = contents(&*export);
        drop(export);
        let real_map = match generation.command("nbdinfo", "libnbd-bin") {
            Some(nbdinfo) => {
                let out = nbdinfo
                    .arg("--map=qemu:dirty-bitmap:backup-vda")
                    .arg(uri.split_once("&dirty-bitmap").map_or(&*uri, |(u, _)| u))
                    .output();
                assert!(
                    out.status.success(),
                    "nbdinfo: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            }
            None => String::new(),
        };
        drop(client);
        drop(qemu);

        let fake_dir = tempfile::tempdir().unwrap();
        let fake = fake_builder_for(&script, release, fake_dir.path())
            .serve_nbd(true)
            .build();
        let mut client = fake.connect().unwrap();
        let fake_dir_text = fake_dir.path().to_string_lossy().into_owned();
        pull_backup(&mut client, &fake_dir_text);
        // The fake's export over its own NBD server, read by the same client...
        let fake_uri =
            format!("nbd+unix:///vda?socket={fake_dir_text}/nbd.sock&dirty-bitmap=backup-vda");
        let fake_export = disk_transport::open_uri(&fake_uri, OpenFlags::read_only()).unwrap();
        let fake_view = contents(&*fake_export);
        drop(fake_export);
        // ...and without NBD.
        let direct = contents(&fake.export_disk("vda", Some("backup-vda")).unwrap());
        assert!(
            direct == fake_view,
            "the fake's NBD server and export view disagree"
        );
        // libnbd's view of both exports, as a third client.
        if let Some(nbdinfo) = generation.command("nbdinfo", "libnbd-bin") {
            let map = |uri: &str| {
                let out = nbdinfo
                    .clone()
                    .arg("--map=qemu:dirty-bitmap:backup-vda")
                    .arg(uri.split_once("&dirty-bitmap").map_or(uri, |(u, _)| u))
                    .output();
                assert!(
                    out.status.success(),
                    "nbdinfo: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            };
            assert_eq!(
                map(&fake_uri),
                real_map,
                "nbdinfo --map of the fake's export ({release})"
            );
        }
        drop(client);
        drop(fake);

        // The data of the moment the transaction ran: 0xab in the first 128 KiB, 0x11 at 3 MiB
        // (outside the window read), zeros elsewhere; not the guest's later writes. The
        // exported bitmap is the checkpoint cp0: only the write after it (at 3 MiB).
        assert!(
            real.0[..131072].iter().all(|&b| b == 0xab),
            "{release}: not point-in-time"
        );
        assert!(real.0[131072..].iter().all(|&b| b == 0));
        let dirty: Vec<(u64, u64)> = real
            .1
            .iter()
            .filter(|e| e.dirty)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(dirty, [(3 << 20, 65536)], "{release}: {:?}", real.1);
        assert!(
            fake_view.0 == real.0,
            "fake {release}: the export's data differ from QEMU's"
        );
        assert_eq!(
            fake_view.1, real.1,
            "fake {release}: the dirty map differs from QEMU's"
        );
        eprintln!(
            "pull backup: {release} and its fake export the same point in time and dirty map \
             (nbdinfo --map: {:?})",
            real_map.trim()
        );
    }
}
