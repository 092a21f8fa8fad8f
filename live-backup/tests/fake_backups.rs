//! Backups of the fake VM into a backup directory: the scenarios the real-QEMU tests run
//! (full, incremental after incremental, two disks, writes during the backup, a crash matrix,
//! lost and inconsistent checkpoints), checked byte for byte against the disks' contents at
//! each checkpoint.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use live_backup::fake::{FakeFault, FakeVm};
use live_backup::{BackupDir, BackupOptions, BackupSource, BeginRequest, Error, PointKind};

const MIB: u64 = 1 << 20;

/// The disks' contents at the moment of the next backup, captured inside it.
type Captured = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Captures every disk at the next backup's moment, then lets the guest write `after`
/// (node, offset, byte) while the backup reads.
fn capture_next(vm: &FakeVm, after: Vec<(&'static str, u64, u8)>) -> Captured {
    let captured: Captured = Arc::default();
    let out = captured.clone();
    vm.during_next_backup(move |vm| {
        let mut out = out.lock().unwrap();
        for node in ["vda", "vdb"] {
            if let Some(disk) = vm.disk(node) {
                out.push((node.to_owned(), disk.to_vec().unwrap()));
            }
        }
        for (node, offset, byte) in &after {
            vm.guest_write(node, *offset, &[*byte; 4096]).unwrap();
        }
    });
    captured
}

fn restored(dir: &BackupDir, node: &str, point: u32) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("restored.img");
    dir.restore(
        Some(node),
        Some(point),
        path.to_str().unwrap(),
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

fn two_disk_vm() -> FakeVm {
    let vm = FakeVm::new("vm1")
        .with_disk("vda", 8 * MIB)
        .with_disk("vdb", 4 * MIB);
    vm.guest_write("vda", 0, &[1; 65536]).unwrap();
    vm.guest_write("vdb", 3 * MIB, &[2; 4096]).unwrap();
    vm
}

fn backup(
    vm: &FakeVm,
    dir: &BackupDir,
    options: &BackupOptions,
) -> live_backup::Result<live_backup::BackupReport> {
    dir.create(&mut vm.clone(), None, options, &mut |_| {})
}

#[test]
fn every_point_restores_to_the_disks_at_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    let mut at = Vec::new();
    let writes_during = [
        vec![("vda", 0, 9u8), ("vdb", 0, 9)],
        vec![("vda", 5 * MIB, 8)],
        vec![("vdb", MIB, 7)],
    ];
    for (round, during) in writes_during.into_iter().enumerate() {
        let captured = capture_next(&vm, during);
        let report = backup(&vm, &dir, &BackupOptions::new()).unwrap();
        assert_eq!(report.point.number as usize, round + 1);
        let kind = if round == 0 {
            PointKind::Full
        } else {
            PointKind::Incremental
        };
        assert_eq!(report.point.kind, kind);
        at.push(captured.lock().unwrap().clone());
        // The guest writes between backups: a changed range, a zeroed one.
        vm.guest_write("vda", (round as u64 + 1) * MIB, &[0x40 + round as u8; 8192])
            .unwrap();
        vm.guest_write("vda", 0, &[0; 4096]).unwrap();
    }
    for (i, disks) in at.iter().enumerate() {
        for (node, contents) in disks {
            assert_eq!(
                &restored(&dir, node, i as u32 + 1),
                contents,
                "point {} of {node}",
                i + 1
            );
        }
    }
    let checked = dir.verify(&mut |_| {}).unwrap();
    assert_eq!(checked.len(), 6);
    // Incremental points hold only what changed.
    let manifest = dir.manifest().unwrap().unwrap();
    assert!(manifest.points[1].disks[0].bytes_copied < MIB);
    // Only the last checkpoint stays on the VM.
    let names: Vec<_> = vm
        .clone()
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [manifest.points[2].checkpoint.clone()]);
    // Files 0600, the directory 0700.
    assert_eq!(
        std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", entry.file_name());
    }
}

#[test]
fn a_failed_backup_leaves_the_chain_and_the_next_one_is_correct() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let manifest = std::fs::read(dir.path().join("manifest.json")).unwrap();
    let files = |dir: &BackupDir| {
        let mut v: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = files(&dir);

    // An NBD error on the view; a refused transaction; a session left by a killed process.
    vm.guest_write("vdb", 0, &[5; 4096]).unwrap();
    vm.inject(FakeFault::ViewRead {
        node: "vdb".into(),
        offset: 0,
    });
    let e = backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    assert!(matches!(e, Error::Copy { .. }), "{e}");
    assert_eq!(
        std::fs::read(dir.path().join("manifest.json")).unwrap(),
        manifest
    );
    assert_eq!(files(&dir), before, "no partial image left");
    // The same with the session's end failing too (QEMU gone): the error says so and keeps
    // the copy's error as its source; the chain is as it was, and the next backup's cleanup
    // removes what the session left.
    vm.inject(FakeFault::Abort);
    let e = backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    assert!(
        matches!(&e, Error::NotTornDown { source, .. } if matches!(**source, Error::Copy { .. })),
        "{e}"
    );
    assert!(!e.is_cancelled());
    assert!(e.to_string().contains("monitor connection closed"), "{e}");
    assert!(
        !vm.leftovers().is_empty(),
        "the failed teardown left the session"
    );
    assert_eq!(
        std::fs::read(dir.path().join("manifest.json")).unwrap(),
        manifest
    );
    assert_eq!(files(&dir), before, "no partial image left");
    vm.inject(FakeFault::Begin);
    backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    let chain = dir.manifest().unwrap().unwrap();
    let mut killed_process = vm.clone();
    let killed = killed_process
        .begin(
            &BeginRequest::full(chain.checkpoint_prefix() + "2", vec!["vda".into()])
                .since(chain.points[0].checkpoint.clone()),
            None,
        )
        .unwrap();
    std::mem::forget(killed);
    assert!(!vm.leftovers().is_empty());

    // Leftovers are removed at the start of the next backup, even one that then refuses:
    // vdb is in the chain but would not be backed up, which needs a full backup.
    let report = backup(&vm, &dir, &BackupOptions::new().disk("vda"));
    assert!(
        matches!(report, Err(Error::IncrementalImpossible { .. })),
        "{report:?}"
    );
    assert!(vm.leftovers().is_empty(), "cleanup ran first");
    // And the half-made checkpoint, still pending: recognised without the manifest.
    let half_made = chain.checkpoint_prefix() + "2";
    let names: Vec<String> = vm
        .clone()
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(!names.contains(&half_made), "{names:?}");
    // The same disks behind a VM without the injected NBD error: the next backup is a
    // correct incremental one.
    let vm2 = FakeVm::new("vm1")
        .with_memory_disk("vda", vm.disk("vda").unwrap())
        .with_memory_disk("vdb", vm.disk("vdb").unwrap());
    let captured = capture_next(&vm2, vec![]);
    let report = backup(&vm2, &dir, &BackupOptions::new()).unwrap();
    assert_eq!(report.point.kind, PointKind::Incremental);
    for (node, contents) in captured.lock().unwrap().iter() {
        assert_eq!(&restored(&dir, node, 2), contents, "{node}");
    }
    dir.verify(&mut |_| {}).unwrap();
}

#[test]
fn lost_and_inconsistent_checkpoints_need_a_full_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    let first = backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let checkpoint = first.point.checkpoint.clone();

    vm.make_inconsistent("vdb", &checkpoint);
    let e = backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("inconsistent") && text.contains("vdb") && text.contains("--full"),
        "{text}"
    );
    let report = backup(&vm, &dir, &BackupOptions::new().full_if_needed(true)).unwrap();
    assert_eq!(report.point.kind, PointKind::Full);
    assert!(report
        .point
        .full_reason
        .as_deref()
        .unwrap()
        .contains("inconsistent"));

    vm.lose_checkpoint("vda", &report.point.checkpoint).unwrap();
    let e = backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    assert!(e.to_string().contains("missing on disk vda"), "{e}");
    let report = backup(&vm, &dir, &BackupOptions::new().full(true)).unwrap();
    assert_eq!(report.point.kind, PointKind::Full);
    assert_eq!(report.point.number, 3);
    for node in ["vda", "vdb"] {
        assert_eq!(
            restored(&dir, node, 3),
            vm.disk(node).unwrap().to_vec().unwrap()
        );
    }
}

#[test]
fn checkpoints_of_other_chains_and_tools_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = two_disk_vm();
    vm.disk("vda")
        .unwrap()
        .add_dirty_bitmap("libvirt-1")
        .unwrap();
    let a = BackupDir::new(tmp.path().join("a"));
    let b = BackupDir::new(tmp.path().join("b"));
    backup(&vm, &a, &BackupOptions::new()).unwrap();
    backup(&vm, &b, &BackupOptions::new()).unwrap();
    vm.guest_write("vda", MIB, &[3; 4096]).unwrap();
    // Both chains go on incrementally: neither removed the other's checkpoint.
    assert_eq!(
        backup(&vm, &a, &BackupOptions::new()).unwrap().point.kind,
        PointKind::Incremental
    );
    assert_eq!(
        backup(&vm, &b, &BackupOptions::new()).unwrap().point.kind,
        PointKind::Incremental
    );
    assert!(vm
        .disk("vda")
        .unwrap()
        .dirty_bitmaps()
        .contains(&"libvirt-1".to_owned()));
    assert_eq!(vm.clone().checkpoints().unwrap().len(), 2);
}

#[test]
fn one_backup_of_a_directory_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    let dir2 = dir.clone();
    let vm2 = vm.clone();
    let inner = Arc::new(Mutex::new(None));
    let seen = inner.clone();
    vm.during_next_backup(move |_| {
        *seen.lock().unwrap() = Some(backup(&vm2, &dir2, &BackupOptions::new()).map(|_| ()));
    });
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let inner = inner.lock().unwrap().take().unwrap();
    assert!(matches!(inner, Err(Error::Busy { .. })), "{inner:?}");
}

#[cfg(feature = "agent")]
#[test]
fn frozen_around_the_checkpoint_or_crash_consistent_with_a_warning() {
    use live_backup::quiesce::AgentQuiesce;
    use live_backup::Consistency;
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    let agent = qga_proto::fake::FakeAgent::linux();
    let mut quiesce = AgentQuiesce::new(
        agent.clone().connect_blocking().unwrap(),
        Duration::from_secs(2),
    );
    let report = dir
        .create(
            &mut vm.clone(),
            Some(&mut quiesce),
            &BackupOptions::new(),
            &mut |_| {},
        )
        .unwrap();
    assert!(matches!(
        report.point.consistency,
        Consistency::Application { .. }
    ));
    assert!(!agent.state().frozen, "thawed");
    let requests = agent.state().requests.clone();
    let freeze = requests
        .iter()
        .position(|r| r == "guest-fsfreeze-freeze")
        .unwrap();
    let thaw = requests
        .iter()
        .position(|r| r == "guest-fsfreeze-thaw")
        .unwrap();
    assert!(freeze < thaw);

    // An agent that froze but did not answer in time: a warning, a crash-consistent backup,
    // and the guest thawed all the same.
    agent.fault_on("guest-fsfreeze-freeze", qga_proto::fake::Fault::DropReply);
    let report = dir
        .create(
            &mut vm.clone(),
            Some(&mut quiesce),
            &BackupOptions::new(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(report.point.consistency, Consistency::Crash);
    assert!(
        report.point.warnings[0].contains("crash-consistent"),
        "{report:?}"
    );
    assert!(
        !agent.state().frozen,
        "a freeze without an answer is thawed"
    );

    // An agent that froze nothing (no filesystem it can freeze is mounted): not an
    // application-consistent point.
    agent.state().filesystems.clear();
    let report = dir
        .create(
            &mut vm.clone(),
            Some(&mut quiesce),
            &BackupOptions::new(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(report.point.consistency, Consistency::Crash);
    assert!(
        report.point.warnings[0].contains("froze no filesystem"),
        "{report:?}"
    );
}

#[test]
fn incrementals_without_a_hash_still_verify_by_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    let options = BackupOptions::new().hash_incrementals(false);
    backup(&vm, &dir, &options).unwrap();
    vm.guest_write("vda", 2 * MIB, &[6; 4096]).unwrap();
    let report = backup(&vm, &dir, &options).unwrap();
    assert!(report.point.disks.iter().all(|d| d.blkhash.is_none()));
    let manifest = dir.manifest().unwrap().unwrap();
    assert!(
        manifest.points[0].disks.iter().all(|d| d.blkhash.is_some()),
        "full points keep theirs"
    );
    assert_eq!(dir.verify(&mut |_| {}).unwrap().len(), 4);
    assert_eq!(
        restored(&dir, "vda", 2),
        vm.disk("vda").unwrap().to_vec().unwrap()
    );
}

#[test]
fn cleanup_with_the_directory_removes_half_made_checkpoints_and_partial_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let chain = dir.manifest().unwrap().unwrap();
    let kept = chain.points[0].checkpoint.clone();
    // A process killed mid-copy: its session never ended, its checkpoint half-made, its
    // partial image written.
    let mut killed_process = vm.clone();
    let half_made = chain.checkpoint_prefix() + "2";
    let killed = killed_process
        .begin(
            &BeginRequest::full(half_made.clone(), vec!["vda".into(), "vdb".into()])
                .since(kept.clone()),
            None,
        )
        .unwrap();
    std::mem::forget(killed);
    let part = dir.path().join(".vda.2.qcow2.part");
    std::fs::write(&part, b"half a qcow2").unwrap();
    // Another chain's checkpoint is not this directory's to remove.
    let foreign = "vmsdk-0000beef-1";
    vm.clone()
        .begin(
            &BeginRequest::full(foreign.to_owned(), vec!["vda".into()]),
            None,
        )
        .unwrap()
        .finish()
        .unwrap();
    let names = |vm: &FakeVm| -> Vec<String> {
        vm.clone()
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect()
    };
    assert!(names(&vm).contains(&half_made));

    let report = dir.cleanup(&mut vm.clone()).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(
        report
            .removed
            .contains(&format!("checkpoint {half_made} (half-made)")),
        "{report:?}"
    );
    assert!(
        report.removed.contains(&format!("file {}", part.display())),
        "{report:?}"
    );
    assert!(vm.leftovers().is_empty());
    assert!(!part.exists());
    let mut left = names(&vm);
    left.sort();
    let mut want = vec![foreign.to_owned(), kept];
    want.sort();
    assert_eq!(left, want);
    // Nothing left twice.
    let again = dir.cleanup(&mut vm.clone()).unwrap();
    assert!(
        again.removed.is_empty() && again.failed.is_empty(),
        "{again:?}"
    );
    // And the next backup is a correct incremental one.
    vm.guest_write("vdb", MIB, &[3; 4096]).unwrap();
    let captured = capture_next(&vm, vec![]);
    let report = backup(&vm, &dir, &BackupOptions::new()).unwrap();
    assert_eq!(report.point.kind, PointKind::Incremental);
    for (node, contents) in captured.lock().unwrap().iter() {
        assert_eq!(&restored(&dir, node, 2), contents, "{node}");
    }
}

/// The block hash of `data`, read whole (the reference for the recorded ones).
fn hash_of(data: &[u8], spec: disk_transport::blkhash::BlkhashSpec) -> String {
    let disk = disk_transport::memory::MemoryDisk::with_data(data);
    let hash =
        disk_transport::blkhash::checksum(&disk, spec, &Default::default(), &mut |_| {}).unwrap();
    format!("{spec}:{}", hash.hex())
}

/// Incremental points are hashed from the blocks they copy and the previous point's block
/// digests, without reading the chain back ("hash" phase), and their hash is the hash of the
/// disk at the checkpoint: many random change patterns (unaligned, zeroed, written during the
/// backup), hash blocks smaller than, equal to and larger than the bitmap's 64 KiB.
#[test]
fn incremental_hashes_come_from_the_changed_blocks_and_equal_the_whole_disk_hash() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    for spec in ["sha256/64k", "md5/4k", "sha1/256k", "blake3/64k"] {
        let spec: disk_transport::blkhash::BlkhashSpec = spec.parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = BackupDir::new(tmp.path().join("backups"));
        let size = 4 * MIB + 12_345;
        let vm = FakeVm::new("vm1").with_disk("vda", size);
        vm.guest_write("vda", 0, &[3; 300_000]).unwrap();
        let options = BackupOptions::new().blkhash(spec);
        for round in 0..6 {
            for _ in 0..next(12) {
                let at = next(size);
                let len = (1 + next(100_000)).min(size - at) as usize;
                let byte = if next(4) == 0 { 0 } else { next(255) as u8 + 1 };
                vm.guest_write("vda", at, &vec![byte; len]).unwrap();
            }
            let during = vec![("vda", next(size - 4096), 0xee)];
            let captured = capture_next(&vm, during);
            let mut phases = Vec::new();
            let report = dir
                .create(&mut vm.clone(), None, &options, &mut |p| {
                    phases.push(p.phase)
                })
                .unwrap();
            assert_eq!(report.point.kind == PointKind::Full, round == 0);
            assert!(!phases.contains(&"hash"), "{spec} round {round}: read back");
            let at_checkpoint = &captured.lock().unwrap()[0].1;
            let disk = &report.point.disks[0];
            assert_eq!(
                disk.blkhash.as_deref(),
                Some(hash_of(at_checkpoint, spec).as_str()),
                "{spec} round {round}"
            );
            let digests = dir.path().join(disk.block_digests.as_ref().unwrap());
            let mode = std::fs::metadata(&digests).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(dir.verify(&mut |_| {}).unwrap().len(), 6);
    }
}

/// A new chain records BLAKE3 unless told otherwise; an incremental point told nothing keeps
/// its chain's hash (so it comes from the previous point's digests, not a read-back), and one
/// told another hash reads its chain back to record it.
#[test]
fn incremental_points_keep_their_chains_block_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = FakeVm::new("vm1").with_disk("vda", 2 * MIB);
    vm.guest_write("vda", 0, &[5; 100_000]).unwrap();
    let spec_of = |report: &live_backup::BackupReport| {
        let recorded = report.point.disks[0].blkhash.clone().unwrap();
        recorded.split_once(':').unwrap().0.to_owned()
    };
    let fresh = BackupDir::new(tmp.path().join("fresh"));
    let report = backup(&vm, &fresh, &BackupOptions::new()).unwrap();
    assert_eq!(spec_of(&report), live_backup::DEFAULT_BLKHASH.to_string());
    assert_eq!(spec_of(&report), "blake3/64k");

    let dir = BackupDir::new(tmp.path().join("sha256"));
    let sha256: disk_transport::blkhash::BlkhashSpec = "sha256/64k".parse().unwrap();
    let report = backup(&vm, &dir, &BackupOptions::new().blkhash(sha256)).unwrap();
    assert_eq!(spec_of(&report), "sha256/64k");
    for (round, (options, want, reads_back)) in [
        (BackupOptions::new(), "sha256/64k", false),
        (
            BackupOptions::new().blkhash(live_backup::DEFAULT_BLKHASH),
            "blake3/64k",
            true,
        ),
        (BackupOptions::new(), "blake3/64k", false),
    ]
    .into_iter()
    .enumerate()
    {
        vm.guest_write("vda", 70_000 * round as u64, &[9 + round as u8; 4096])
            .unwrap();
        let mut phases = Vec::new();
        let report = dir
            .create(&mut vm.clone(), None, &options, &mut |p| {
                phases.push(p.phase)
            })
            .unwrap();
        assert_eq!(report.point.kind, PointKind::Incremental);
        assert_eq!(spec_of(&report), want, "round {round}");
        assert_eq!(phases.contains(&"hash"), reads_back, "round {round}");
        let disk = vm.disk("vda").unwrap().to_vec().unwrap();
        let spec = want.parse().unwrap();
        assert_eq!(
            report.point.disks[0].blkhash.as_deref(),
            Some(hash_of(&disk, spec).as_str())
        );
    }
    assert!(dir.verify(&mut |_| {}).unwrap().iter().all(|v| v.ok));
}

/// Block digests that are damaged, truncated, missing or of another spec are never trusted:
/// the point is read back whole, and its hash is still right.
#[test]
fn damaged_block_digests_fall_back_to_reading_the_point_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = FakeVm::new("vm1").with_disk("vda", 2 * MIB);
    vm.guest_write("vda", 0, &[5; 100_000]).unwrap();
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    type Damage<'a> = (&'a str, &'a dyn Fn(&std::path::Path));
    let damages: [Damage<'_>; 4] = [
        ("flipped", &|p| {
            let mut b = std::fs::read(p).unwrap();
            b[40] ^= 0x80;
            std::fs::write(p, b).unwrap();
        }),
        ("truncated", &|p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 1]).unwrap();
        }),
        ("removed", &|p| std::fs::remove_file(p).unwrap()),
        // Intact, but not the recorded point's: another point's digests copied over.
        ("swapped", &|p| {
            let other = FakeVm::new("vm2").with_disk("vda", 2 * MIB);
            let scratch = tempfile::tempdir().unwrap();
            let odir = BackupDir::new(scratch.path().join("b"));
            let r = backup(&other, &odir, &BackupOptions::new()).unwrap();
            let name = r.point.disks[0].block_digests.clone().unwrap();
            std::fs::copy(odir.path().join(name), p).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let manifest = dir.manifest().unwrap().unwrap();
        let last = manifest.last().unwrap().disks[0]
            .block_digests
            .clone()
            .unwrap();
        damage(&dir.path().join(last));
        vm.guest_write("vda", MIB + 3, &[what.len() as u8; 5000])
            .unwrap();
        let mut phases = Vec::new();
        let report = dir
            .create(&mut vm.clone(), None, &BackupOptions::new(), &mut |p| {
                phases.push(p.phase)
            })
            .unwrap();
        assert!(phases.contains(&"hash"), "{what}: not read back");
        let now = vm.disk("vda").unwrap().to_vec().unwrap();
        assert_eq!(
            report.point.disks[0].blkhash.as_deref(),
            Some(hash_of(&now, live_backup::DEFAULT_BLKHASH).as_str()),
            "{what}"
        );
    }
    assert_eq!(dir.verify(&mut |_| {}).unwrap().len(), 5);
}

#[test]
fn cleanup_without_the_directory_removes_half_made_checkpoints_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let chain = dir.manifest().unwrap().unwrap();
    let stored = chain.points[0].checkpoint.clone();
    // Killed after its data was written, before the point was stored: no longer pending, so
    // only the directory knows it is not a point (the next backup into it removes it).
    let unmarked = chain.checkpoint_prefix() + "2";
    let mut killed_process = vm.clone();
    let session = killed_process
        .begin(
            &BeginRequest::full(unmarked.clone(), vec!["vda".into()]),
            None,
        )
        .unwrap();
    session.data_written().unwrap();
    std::mem::forget(session);
    // Killed mid-copy: pending.
    let half_made = chain.checkpoint_prefix() + "3";
    let mut killed_process = vm.clone();
    let session = killed_process
        .begin(
            &BeginRequest::full(half_made.clone(), vec!["vda".into()]),
            None,
        )
        .unwrap();
    std::mem::forget(session);

    let report = vm.clone().cleanup().unwrap();
    assert!(
        report
            .removed
            .contains(&format!("checkpoint {half_made} (half-made)")),
        "{report:?}"
    );
    let mut names: Vec<String> = vm
        .clone()
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    names.sort();
    assert_eq!(names, [stored.clone(), unmarked.clone()]);
    let report = backup(&vm, &dir, &BackupOptions::new()).unwrap();
    assert_eq!(report.point.kind, PointKind::Incremental);
    assert!(report.removed_checkpoints.contains(&unmarked), "{report:?}");
    let log = vm.log();
    let written = log.iter().rposition(|l| l == "data-written").unwrap();
    let finished = log.iter().rposition(|l| l == "finish").unwrap();
    assert!(
        written < finished,
        "the data is written before the session finishes: {log:?}"
    );
}

#[test]
fn a_full_scratch_space_fails_the_backup_and_leaves_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = BackupDir::new(tmp.path().join("backups"));
    let vm = two_disk_vm();
    backup(&vm, &dir, &BackupOptions::new()).unwrap();
    let manifest = std::fs::read(dir.path().join("manifest.json")).unwrap();
    vm.guest_write("vda", MIB, &[7; 4096]).unwrap();
    vm.inject(FakeFault::ScratchFull);
    let e = backup(&vm, &dir, &BackupOptions::new()).unwrap_err();
    assert!(matches!(e, Error::ScratchFull { .. }), "{e}");
    assert_eq!(
        std::fs::read(dir.path().join("manifest.json")).unwrap(),
        manifest,
        "the chain as it was"
    );
    assert!(vm.leftovers().is_empty(), "the session was aborted");
    let names: Vec<String> = vm
        .clone()
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        [dir.manifest().unwrap().unwrap().points[0]
            .checkpoint
            .clone()]
    );
    let captured = capture_next(&vm, vec![]);
    let report = backup(&vm, &dir, &BackupOptions::new()).unwrap();
    assert_eq!(report.point.kind, PointKind::Incremental);
    for (node, contents) in captured.lock().unwrap().iter() {
        assert_eq!(&restored(&dir, node, 2), contents, "{node}");
    }
}
