//! A live backup whose scratch filesystem runs full, against a running QEMU (7.2 on the
//! machine, 10.0 in the Debian 13 root).
//!
//! The scratch directory is a small tmpfs (mounted by the test, which runs as root, and
//! unmounted by a guard even when the test panics). The backup's point-in-time view keeps the
//! old contents of every cluster the guest overwrites in a scratch image there; QEMU's
//! copy-before-write filter, which `blockdev-backup` inserts, fails the guest's write when
//! that image cannot grow (`on-cbw-error=break-guest-write`, the only mode `blockdev-backup`
//! has). The test shows it: a guest write (HMP `qemu-io`) larger than the tmpfs, made while
//! the backup reads, does not land (the next point restores without it). And: vmsdk gives its views up (the backup fails with an error naming the
//! scratch filesystem), the VM's run state is as before, the same write succeeds, nothing is
//! left in QEMU or the scratch directory, the chain verifies, and the next backup (the scratch
//! space free again) restores byte for byte. A scratch filesystem with less free space than a
//! backup needs to begin is refused before anything is made.

use std::path::{Path, PathBuf};
use std::process::Command;

use disk_transport::copy::CopyOptions;
use live_backup::qemu::QemuSource;
use live_backup::{BackupDir, BackupOptions, Error, PointKind};
use serde_json::{json, Value};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qemu_vm::QemuVm;

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` bytes mounted on a directory; unmounted (and the directory removed)
/// on drop, also when the test panics.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts it on `path` (created). `None` after a skip notice when this process may not
    /// mount (not root) outside CI; in CI that fails the test.
    fn mount(path: &Path, size: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                !vmsdk_tests::running_in_ci(),
                "mounting a tmpfs for the scratch directory failed (the test needs root): {why}"
            );
            eprintln!("SKIP: cannot mount a tmpfs (the test needs root): {why}");
            return None;
        }
        Some(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // QEMU, which may still hold a file there, is killed before (the VM is dropped
        // first); a lazy unmount if it is not.
        let done = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// What a backup leaves in QEMU and in `scratch` that a finished one does not: exports,
/// jobs, `vmsdk-` nodes, bitmaps other than `keep`, files.
fn leftovers(vm: &QemuVm, scratch: &Path, keep: &str) -> Vec<String> {
    let mut found = Vec::new();
    for export in vm
        .qmp_command("query-block-exports", Value::Null)
        .as_array()
        .unwrap()
    {
        found.push(format!("export {}", export["id"]));
    }
    for job in vm
        .qmp_command("query-jobs", Value::Null)
        .as_array()
        .unwrap()
    {
        found.push(format!("job {}", job["id"]));
    }
    let nodes = vm.qmp_command("query-named-block-nodes", json!({"flat": true}));
    for node in nodes.as_array().unwrap() {
        let name = node["node-name"].as_str().unwrap_or_default();
        if name.starts_with("vmsdk-") {
            found.push(format!("node {name}"));
        }
        for bitmap in node["dirty-bitmaps"].as_array().into_iter().flatten() {
            let bitmap = bitmap["name"].as_str().unwrap_or("(unnamed)");
            if bitmap != keep {
                found.push(format!("bitmap {bitmap} on {name}"));
            }
        }
    }
    for entry in std::fs::read_dir(scratch).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // The scratch directory's lock file stays (empty; a lock is on it only while a
        // backup runs).
        if name != "vmsdk.lock" {
            found.push(format!("file {name}"));
        }
    }
    found
}

/// The latest point of `disk` restores to what the VM's disk holds now.
fn latest_restores(vm: &QemuVm, dir: &BackupDir, tmp: &Path, disk: &str, what: &str) {
    let dest = tmp.join(format!("restored-{disk}.img"));
    let _ = std::fs::remove_file(&dest);
    dir.restore(
        Some(disk),
        None,
        dest.to_str().unwrap(),
        &CopyOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        std::fs::read(&dest).unwrap() == vm.contents(disk),
        "{what}: the latest point of {disk} restores the disk byte for byte"
    );
    std::fs::remove_file(&dest).unwrap();
}

fn source(vm: &QemuVm) -> QemuSource<qmp_proto::Client> {
    QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir())
        .unwrap()
        .min_scratch_free(4 * MIB)
}

#[test]
fn a_full_scratch_filesystem_fails_the_backup_not_the_vm() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        // Mounted before QEMU starts, so that QEMU in the peer root sees it too; dropped
        // after the VM (declared before it).
        let scratch = tmp.path().join("scratch");
        let Some(_tmpfs) = Tmpfs::mount(&scratch, 8 * MIB) else {
            return;
        };
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &[("vda", 64 * MIB)]) else {
            return;
        };
        assert_eq!(vm.scratch_dir(), scratch);
        let version = vm.version();
        eprintln!("{version}");
        // Data the guest will overwrite: the view must keep its old contents.
        vm.write("vda", 0, 32 * MIB, 0x31);
        let dir = BackupDir::new(tmp.path().join("backups"));
        dir.create(&mut source(&vm), None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        let status = vm.qmp_command("query-status", Value::Null)["status"].clone();
        let keep = dir
            .manifest()
            .unwrap()
            .unwrap()
            .last()
            .unwrap()
            .checkpoint
            .clone();

        // Too little free space to begin: refused before anything is made.
        let refused = dir
            .create(
                &mut source(&vm).min_scratch_free(64 * MIB),
                None,
                &BackupOptions::new(),
                &mut |_| {},
            )
            .unwrap_err();
        eprintln!("begin on 8 MiB of scratch space, 64 MiB asked: {refused}");
        assert!(
            matches!(refused, Error::ScratchFull { .. })
                && refused.to_string().contains(&scratch.display().to_string()),
            "{refused}"
        );
        assert_eq!(leftovers(&vm, &scratch, &keep), Vec::<String>::new());

        // The guest overwrites 16 MiB while the backup reads: more than the scratch
        // filesystem holds.
        vm.write("vda", 40 * MIB, MIB, 0x32);
        let mut wrote = false;
        let e = dir
            .create(&mut source(&vm), None, &BackupOptions::new(), &mut |p| {
                if p.phase == "copy" && !wrote {
                    wrote = true;
                    vm.write_expecting_failure("vda", 0, 16 * MIB, 0x33);
                }
            })
            .unwrap_err();
        assert!(wrote, "the copy reported progress");
        eprintln!("the backup: {e}");
        assert!(
            matches!(e, Error::ScratchFull { .. })
                && e.to_string().contains(&scratch.display().to_string()),
            "the error names the scratch filesystem: {e}"
        );
        let what = format!("full scratch filesystem ({version})");
        assert_eq!(
            vm.qmp_command("query-status", Value::Null)["status"],
            status,
            "{what}: the VM's run state"
        );
        assert_eq!(
            leftovers(&vm, &scratch, &keep),
            Vec::<String>::new(),
            "{what}: the failed backup removed what it made"
        );
        // The views are gone, and with them the filter: this write lands (the restore below
        // shows it, and that the 16 MiB one did not: QEMU's copy-before-write filter broke it,
        // on-cbw-error=break-guest-write).
        vm.write("vda", 0, MIB, 0x34);
        let verified = dir.verify(&mut |_| {}).unwrap();
        assert!(!verified.is_empty(), "{what}: the chain verifies");

        // The scratch space is free again: the next backup is a correct incremental one.
        let report = dir
            .create(&mut source(&vm), None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        assert_eq!(report.point.kind, PointKind::Incremental, "{what}");
        latest_restores(&vm, &dir, tmp.path(), "vda", &what);
        // And the write the filter broke, retried, lands too.
        vm.write("vda", 0, 16 * MIB, 0x33);
        dir.create(&mut source(&vm), None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        latest_restores(&vm, &dir, tmp.path(), "vda", &what);
        eprintln!("{what}: the backup failed with the scratch filesystem named, the VM wrote on");
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
