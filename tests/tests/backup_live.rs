//! Live backups of a running QEMU (7.2 on the machine, 10.0 in the Debian 13 root): the
//! QEMU backup source's lifecycle against the real block layer, with guest writes at known
//! moments through HMP's `qemu-io`: every view reads as the disk at its checkpoint, byte for
//! byte, and holds nothing written after it.

use std::time::Duration;

use disk_transport::copy::{CancelToken, CopyOptions};
use disk_transport::Disk;
use live_backup::qemu::QemuSource;
use live_backup::{BackupDir, BackupOptions, BackupSource, BeginRequest, PointKind};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qemu_vm::QemuVm;

const MIB: u64 = 1 << 20;

fn read_all(disk: &dyn Disk) -> Vec<u8> {
    let size = disk.info().unwrap().capacity as usize;
    let mut buf = vec![0u8; size];
    for (i, chunk) in buf.chunks_mut(4 << 20).enumerate() {
        disk.read_at(chunk, (i as u64) << 22).unwrap();
    }
    buf
}

#[test]
fn views_are_the_disks_at_their_checkpoints() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &[("vda", 16 * MIB), ("vdb", 8 * MIB)])
        else {
            return;
        };
        vm.write("vda", 0, 64 << 10, 0x11);
        vm.write("vdb", MIB, 64 << 10, 0x22);
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir())
            .unwrap()
            .job_timeout(Duration::from_secs(30));
        eprintln!("{source:?}");
        assert!(source.checkpoints().unwrap().is_empty());
        let disks = vec!["vda".to_owned(), "vdb".to_owned()];

        // Full: the views hold the disks at the moment, not what is written after it.
        let at_1 = (vm.contents("vda"), vm.contents("vdb"));
        let session = source
            .begin(&BeginRequest::full("vmsdk-t-1", disks.clone()), None)
            .unwrap();
        vm.write("vda", 0, 4096, 0x33);
        vm.write("vdb", MIB + 4096, 4096, 0x44);
        assert_eq!(read_all(session.open("vda").unwrap().as_ref()), at_1.0);
        assert_eq!(read_all(session.open("vdb").unwrap().as_ref()), at_1.1);
        session.finish().unwrap();
        let checkpoints = source.checkpoints().unwrap();
        assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
        assert_eq!(checkpoints[0].name, "vmsdk-t-1");
        checkpoints[0].check_usable_for(&disks).unwrap();

        // Incremental: the changes since checkpoint 1, up to checkpoint 2.
        vm.write("vda", 8 * MIB, 128 << 10, 0x55);
        let at_2 = (vm.contents("vda"), vm.contents("vdb"));
        let session = source
            .begin(
                &BeginRequest::full("vmsdk-t-2", disks.clone()).since("vmsdk-t-1"),
                None,
            )
            .unwrap();
        vm.write("vda", 12 * MIB, 4096, 0x66);
        let view = session.open("vda").unwrap();
        let dirty: Vec<_> = view
            .dirty_extents(0, 16 * MIB)
            .unwrap()
            .into_iter()
            .filter(|e| e.dirty)
            .collect();
        eprintln!("dirty since vmsdk-t-1: {dirty:?}");
        assert!(dirty
            .iter()
            .any(|e| e.offset <= 8 * MIB && e.end() >= 8 * MIB + (128 << 10)));
        assert!(
            dirty.iter().any(|e| e.offset == 0),
            "the write after checkpoint 1 at 0"
        );
        assert!(
            !dirty
                .iter()
                .any(|e| e.offset <= 12 * MIB && e.end() > 12 * MIB),
            "a write after checkpoint 2 is not in its changes"
        );
        assert_eq!(read_all(view.as_ref()), at_2.0);
        drop(view);
        session.finish().unwrap();
        source.remove_checkpoint("vmsdk-t-1").unwrap();
        let names: Vec<_> = source
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["vmsdk-t-2"]);

        // A session never ended (the process killed): cleanup removes what it left.
        let session = source
            .begin(
                &BeginRequest::full("vmsdk-t-3", disks.clone()).since("vmsdk-t-2"),
                None,
            )
            .unwrap();
        std::mem::forget(session);
        let report = source.cleanup().unwrap();
        eprintln!("cleanup: {report:?}");
        assert!(report.failed.is_empty(), "{report:?}");
        assert!(
            report.removed.iter().any(|r| r.starts_with("export")),
            "{report:?}"
        );
        assert!(
            report.removed.iter().any(|r| r.starts_with("job")),
            "{report:?}"
        );
        assert!(
            report.removed.iter().any(|r| r.starts_with("scratch node")),
            "{report:?}"
        );
        assert!(source.cleanup().unwrap().is_empty());
        // The guest's disks are writable and the VM carries on.
        vm.write("vda", 0, 4096, 0x77);
        source.remove_checkpoint("vmsdk-t-3").unwrap();
        eprintln!("{}", vm.version());
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}

/// `qemu-img` of `generation` with `args`; its output.
fn qemu_img(vm: &QemuVm, args: &[&str]) -> std::process::Output {
    vm.generation()
        .command("qemu-img", "qemu-utils")
        .expect("qemu-img of the VM's generation")
        .args(args)
        .output()
}

/// Every image of the chain passes `qemu-img check` (exit 0: no corruption, no leaks).
fn check_images(vm: &QemuVm, dir: &BackupDir) {
    let manifest = dir.manifest().unwrap().unwrap();
    for point in &manifest.points {
        for disk in &point.disks {
            let path = dir.path().join(&disk.file);
            let out = qemu_img(vm, &["check", "-q", "-f", "qcow2", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "qemu-img check {}: {}{}",
                disk.file,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Restores every point of every disk and compares it with what the disk held at the point's
/// checkpoint, byte for byte, and (qemu-img compare) with the point's chain as QEMU reads it.
fn check_restores(vm: &QemuVm, dir: &BackupDir, at: &[Vec<(String, Vec<u8>)>]) {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = dir.manifest().unwrap().unwrap();
    for (i, disks) in at.iter().enumerate() {
        let number = i as u32 + 1;
        for (node, contents) in disks {
            let out = tmp.path().join(format!("{node}-{number}.img"));
            let report = dir
                .restore(
                    Some(node),
                    Some(number),
                    out.to_str().unwrap(),
                    &Default::default(),
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(report.point, number);
            let restored = std::fs::read(&out).unwrap();
            assert!(
                restored == *contents,
                "point {number} of {node} differs from the disk at its checkpoint"
            );
            let image = dir
                .path()
                .join(&manifest.point(number).unwrap().disk(node).unwrap().file);
            let cmp = qemu_img(
                vm,
                &[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "qcow2",
                    out.to_str().unwrap(),
                    image.to_str().unwrap(),
                ],
            );
            assert!(
                cmp.status.success(),
                "qemu-img compare point {number} of {node}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
    }
}

/// A qcow2 image's contents, as qemu-img of `generation` converts it to raw.
fn image_contents(generation: vmsdk_tests::peers::Generation, image: &std::path::Path) -> Vec<u8> {
    let raw = image.with_extension("raw");
    let out = generation
        .command("qemu-img", "qemu-utils")
        .unwrap()
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output();
    vmsdk_tests::assert_success(&out, "qemu-img convert");
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// The disks' contents now, by the writes the test made.
fn snapshot(vm: &QemuVm) -> Vec<(String, Vec<u8>)> {
    ["vda", "vdb"]
        .iter()
        .map(|n| (n.to_string(), vm.contents(n)))
        .collect()
}

#[test]
fn chains_of_a_running_vm_restore_byte_for_byte_and_survive_crashes() {
    let ran = for_each_generation(&["qemu-system-x86_64", "qemu-img"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        let disks = [("vda", 32 * MIB), ("vdb", 16 * MIB)];
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &disks) else {
            return;
        };
        eprintln!("{}", vm.version());
        vm.write("vda", 0, MIB, 0x11);
        vm.write("vdb", 15 * MIB, 64 << 10, 0x12);
        let dir = BackupDir::new(tmp.path().join("backups"));
        let mut at = Vec::new();

        // Full, then incremental after incremental, the guest writing while each one reads.
        for round in 0..3u8 {
            at.push(snapshot(&vm));
            let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
            let mut wrote = false;
            let report = dir
                .create(&mut source, None, &BackupOptions::new(), &mut |_| {
                    if !wrote {
                        wrote = true;
                        vm.write("vda", u64::from(round) * MIB, 4096, 0xe0 + round);
                        vm.write("vdb", 0, 4096, 0xf0 + round);
                    }
                })
                .unwrap();
            assert!(wrote);
            eprintln!("point {}: {:?}", report.point.number, report.point.disks);
            let kind = if round == 0 {
                PointKind::Full
            } else {
                PointKind::Incremental
            };
            assert_eq!(report.point.kind, kind);
            // Between backups: new data, and zeroes over old data.
            vm.write(
                "vda",
                20 * MIB + u64::from(round) * MIB,
                256 << 10,
                0x30 + round,
            );
            vm.write_zeroes("vda", 0, 64 << 10);
        }
        let manifest = dir.manifest().unwrap().unwrap();
        assert!(
            manifest.points[2].disks[0].bytes_copied < 4 * MIB,
            "incrementals copy changes only"
        );
        dir.verify(&mut |_| {}).unwrap();
        check_images(&vm, &dir);
        check_restores(&vm, &dir, &at);

        // A backup cancelled half-way (Ctrl-C): the chain and the VM as they were.
        let before = std::fs::read(dir.path().join("manifest.json")).unwrap();
        let cancel = CancelToken::new();
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let options =
            BackupOptions::new().copy_options(CopyOptions::default().cancel(cancel.clone()));
        let e = dir
            .create(&mut source, None, &options, &mut |_| cancel.cancel())
            .unwrap_err();
        assert!(e.is_cancelled(), "{e}");
        assert_eq!(
            std::fs::read(dir.path().join("manifest.json")).unwrap(),
            before
        );
        assert!(source.cleanup().unwrap().is_empty(), "nothing left in QEMU");
        let names: Vec<_> = source
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, [manifest.points[2].checkpoint.clone()]);

        // Application-consistent: frozen (the fake agent; never a qemu-ga of this machine)
        // around the real transaction only. The frozen time is reported, not asserted.
        let agent = qga_proto::fake::FakeAgent::linux();
        let mut quiesce = live_backup::quiesce::AgentQuiesce::new(
            agent.clone().connect_blocking().unwrap(),
            Duration::from_secs(5),
        );
        vm.write("vdb", 2 * MIB, 4096, 0x55);
        at.push(snapshot(&vm));
        let report = dir
            .create(
                &mut source,
                Some(&mut quiesce),
                &BackupOptions::new(),
                &mut |_| {},
            )
            .unwrap();
        eprintln!(
            "point {} {} ({})",
            report.point.number,
            report.point.consistency,
            vm.version()
        );
        assert!(matches!(
            report.point.consistency,
            live_backup::Consistency::Application { .. }
        ));
        assert!(!agent.state().frozen);
        let manifest = dir.manifest().unwrap().unwrap();
        let before = std::fs::read(dir.path().join("manifest.json")).unwrap();

        // The NBD server goes away under the reads (an NBD error): the backup fails and
        // removes what it made; the chain stays.
        let mut stopped = false;
        let e = dir
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {
                if !stopped {
                    stopped = true;
                    vm.qmp_command("nbd-server-stop", serde_json::Value::Null);
                }
            })
            .unwrap_err();
        eprintln!("backup with its NBD server stopped: {e}");
        assert_eq!(
            std::fs::read(dir.path().join("manifest.json")).unwrap(),
            before
        );
        assert!(source.cleanup().unwrap().is_empty(), "nothing left in QEMU");

        // The exports removed under the copy (`block-export-del`, hard: QEMU drops the
        // connections): at the copy's first progress report the first disk's copy is under
        // way or just done, and the second disk's not begun. The backup fails with the NBD
        // error, removes what it made; the chain stays, the VM writes on.
        let mut removed_at = None;
        let e = dir
            .create(
                &mut source,
                None,
                &BackupOptions::new().full(true),
                &mut |p| {
                    if p.phase == "copy" && removed_at.is_none() {
                        removed_at = Some(format!("{} {}/{}", p.disk, p.done, p.total));
                        for i in 0..2 {
                            vm.qmp_command(
                                "block-export-del",
                                serde_json::json!({"id": format!("vmsdk-exp-{i}"), "mode": "hard"}),
                            );
                        }
                    }
                },
            )
            .unwrap_err();
        eprintln!("backup with its exports removed at {removed_at:?}: {e}");
        assert!(removed_at.is_some());
        assert!(
            matches!(
                e,
                live_backup::Error::Copy { .. } | live_backup::Error::Disk { .. }
            ),
            "an NBD error: {e}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("manifest.json")).unwrap(),
            before
        );
        assert!(source.cleanup().unwrap().is_empty(), "nothing left in QEMU");
        vm.write("vda", 3 * MIB, 4096, 0x3e);

        // vmsdk killed after its transaction: the next backup removes what it left and is a
        // correct incremental one.
        let killed = source
            .begin(
                &BeginRequest::full(
                    format!("{}5", manifest.checkpoint_prefix()),
                    vec!["vda".into(), "vdb".into()],
                )
                .since(manifest.points[3].checkpoint.clone()),
                None,
            )
            .unwrap();
        std::mem::forget(killed);
        drop(source);
        vm.write("vdb", 8 * MIB, 4096, 0x44);
        at.push(snapshot(&vm));
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let report = dir
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        assert_eq!(report.point.kind, PointKind::Incremental);
        assert!(!report.cleanup.removed.is_empty(), "{report:?}");
        // Its checkpoint, still marked pending, is recognised as half-made by QEMU's cleanup.
        assert!(
            report
                .cleanup
                .removed
                .iter()
                .any(|c| c.starts_with("checkpoint ")
                    && c.contains("-5 on ")
                    && c.ends_with("(half-made)")),
            "{report:?}"
        );
        drop(source);

        // QEMU killed during a backup: the backup fails, the chain stays; QEMU restarted on the
        // same images has lost the unsaved checkpoint, so only a full backup can follow.
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let e = dir
            .create(&mut source, None, &BackupOptions::new(), &mut |_| vm.kill())
            .unwrap_err();
        eprintln!("backup with QEMU killed: {e}");
        drop(source);
        let before = dir.manifest().unwrap().unwrap();
        assert_eq!(before.points.len(), 5);
        drop(vm);
        // What the killed QEMU left in its images (writes whose qcow2 metadata it had not
        // flushed are gone): read by qemu-img once a restarted QEMU has opened and closed them.
        QemuVm::start(g, tmp.path(), &disks).unwrap().quit();
        let model: Vec<(String, Vec<u8>)> = disks
            .iter()
            .map(|(node, _)| {
                (
                    node.to_string(),
                    image_contents(g, &tmp.path().join(format!("{node}.qcow2"))),
                )
            })
            .collect();
        let mut vm = QemuVm::start(g, tmp.path(), &disks).unwrap();
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let e = dir
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
            .unwrap_err();
        assert!(
            matches!(e, live_backup::Error::IncrementalImpossible { .. }),
            "{e}"
        );
        eprintln!("after QEMU was killed: {e}");
        let report = dir
            .create(
                &mut source,
                None,
                &BackupOptions::new().full_if_needed(true),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(report.point.kind, PointKind::Full);
        assert!(report.point.full_reason.is_some());
        dir.verify(&mut |_| {}).unwrap();
        check_images(&vm, &dir);
        at.push(model);
        check_restores(&vm, &dir, &at);
        // The VM runs on with writable disks, and the checkpoint, persistent, survives a
        // clean restart: the next backup is incremental.
        vm.write("vda", 0, 4096, 0x99);
        vm.quit();
        let vm = QemuVm::start(g, tmp.path(), &disks).unwrap();
        let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let report = dir
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        assert_eq!(report.point.kind, PointKind::Incremental);
        assert_eq!(report.point.number, 7);
        assert!(report.point.disks[0].bytes_copied <= 64 << 10, "{report:?}");
        drop(source);
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}

#[test]
fn views_served_over_tls() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &[("vda", 8 * MIB), ("vdb", 4 * MIB)])
        else {
            return;
        };
        let tls = vmsdk_tests::tls::TlsFiles::new();
        // QEMU (in the peer root, too) reads its credentials from inside the VM's directory.
        let server = tmp.path().join("tls-server");
        std::fs::create_dir(&server).unwrap();
        for file in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(tls.server_dir().join(file), server.join(file)).unwrap();
        }
        let dir = BackupDir::new(tmp.path().join("backups"));
        let options = BackupOptions::new().tls(true);
        let mut at = Vec::new();
        for round in 0..2u8 {
            vm.write("vda", u64::from(round) * MIB, 65536, 0x70 + round);
            vm.write("vdb", 0, 4096, 0x80 + round);
            at.push(snapshot(&vm));
            let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir())
                .unwrap()
                .tls_certificates(&server, tls.client_dir(), "localhost");
            let report = dir
                .create(&mut source, None, &options, &mut |_| {})
                .unwrap();
            eprintln!("point {} over TLS ({})", report.point.number, vm.version());
            assert!(
                source.cleanup().unwrap().is_empty(),
                "the TLS object went with the session"
            );
        }
        check_restores(&vm, &dir, &at);
        // Asked for TLS without certificates: a clear error before anything is made.
        let mut plain = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
        let e = dir
            .create(&mut plain, None, &options, &mut |_| {})
            .unwrap_err();
        assert!(e.to_string().contains("tls_certificates"), "{e}");
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
