//! The crash matrix of `vmsdk backup create`, with real signals to the CLI, against a running
//! QEMU (7.2 on the machine, 10.0 in the Debian 13 root; the VM runs, its firmware finding
//! nothing to boot).
//!
//! The CLI's test hook `VMSDK_TEST_PAUSE_AT=PHASE` stops it deterministically in a phase:
//! `checkpoint` (after the transaction, the views exported), `copy` (mid-copy of the first
//! disk) and `stored` (the point in the manifest, before the views are torn down and the
//! replaced checkpoint removed). There it is killed with SIGKILL, and then: the VM still runs
//! with writable disks (a `qemu-io` write succeeds), the chain still verifies,
//! `vmsdk backup cleanup --qmp URI DIR` removes every leftover (exports, jobs, scratch nodes
//! and files, half-made checkpoints, partial images), and the next backup restores byte for
//! byte; `cleanup` without DIR already removes the half-made checkpoint (marked pending),
//! never a stored one. Ctrl-C (SIGINT) in every phase (`checkpoint`, `copy`, `hash` (the
//! read-back of a point whose previous block digests are gone), `stored`) exits 130 and leaves nothing behind: before `stored` the chain as it was, at
//! `stored` the new point complete. A `cleanup` while a backup is paused (alive) is refused
//! and leaves it alone.
//! QEMU killed (SIGKILL, by PID) while the CLI copies: the CLI exits 1 saying the backup
//! could not be ended in QEMU, the chain is as it was, and QEMU started again on the same
//! images gets a full backup (`--full-if-needed`) that `qemu-img compare` finds equal to them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qemu_vm::QemuVm;

const MIB: u64 = 1 << 20;
const PAUSED: &str = "vmsdk: test hook: paused at";

fn vmsdk(args: &[&str]) -> Output {
    let binary = vmsdk_tests::vmsdk_binary().expect("the vmsdk binary");
    Command::new(binary).args(args).output().expect("run vmsdk")
}

fn ok(args: &[&str]) -> String {
    let out = vmsdk(args);
    vmsdk_tests::assert_success(&out, format_args!("vmsdk {args:?}"));
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `vmsdk args` with the pause hook at `phase` and returns it once it has paused there.
fn paused_at(args: &[&str], phase: &str) -> (Child, mpsc::Receiver<String>) {
    let binary = vmsdk_tests::vmsdk_binary().expect("the vmsdk binary");
    let mut child = Command::new(binary)
        .args(args)
        .env("VMSDK_TEST_PAUSE_AT", phase)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmsdk");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with(PAUSED) => {
                assert_eq!(line, format!("{PAUSED} {phase}"));
                return (child, rx);
            }
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "vmsdk did not pause at {phase} ({e}; {status:?}): {}",
                    seen.join("\n")
                );
            }
        }
    }
}

/// Names of what vmsdk made in QEMU and `scratch`/`dir` that a finished backup does not keep:
/// exports, jobs, `vmsdk-` nodes, bitmaps other than `keep`, scratch images, partial images.
fn leftovers(vm: &QemuVm, scratch: &Path, dir: &Path, keep: &str) -> Vec<String> {
    let mut found = vm.vmsdk_leftovers(keep);
    for d in [scratch, dir] {
        for entry in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("vmsdk-scratch-") || name.ends_with(".part") {
                found.push(format!("file {name}"));
            }
        }
    }
    found
}

/// The checkpoint of the chain's last point.
fn last_checkpoint(dir: &str) -> String {
    let list: Value = serde_json::from_str(&ok(&["backup", "list", "--json", dir])).unwrap();
    let points = list["manifest"]["points"].as_array().unwrap();
    points.last().unwrap()["checkpoint"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Restores the latest point of `disk` into a new file `restored-TAG-DISK.img` in `tmp`.
fn restore_latest(tmp: &Path, dir: &str, disk: &str, tag: &str) -> std::path::PathBuf {
    let dest = tmp.join(format!("restored-{tag}-{disk}.img"));
    let _ = std::fs::remove_file(&dest);
    ok(&[
        "backup",
        "restore",
        "--disk",
        disk,
        "--no-progress",
        dir,
        dest.to_str().unwrap(),
    ]);
    dest
}

/// The latest point of every disk restores to `vm`'s contents now.
fn latest_restores(vm: &QemuVm, tmp: &Path, dir: &str, disks: &[&str], tag: &str) {
    for disk in disks {
        let dest = restore_latest(tmp, dir, disk, tag);
        assert!(
            std::fs::read(&dest).unwrap() == vm.contents(disk),
            "{tag}: the latest point of {disk} restores the disk byte for byte"
        );
        std::fs::remove_file(&dest).unwrap();
    }
}

#[test]
fn sigkill_in_every_phase_and_ctrl_c_leave_the_vm_usable_and_the_next_backup_correct() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        if vmsdk_tests::vmsdk_binary().is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let disks = ["vda", "vdb"];
        // A running VM (its firmware finds no bootable disk and waits): every kill must leave
        // it running.
        let Some(mut vm) =
            QemuVm::start_booting(g, tmp.path(), &[("vda", 64 * MIB), ("vdb", 8 * MIB)])
        else {
            return;
        };
        let version = vm.version();
        eprintln!("{version}");
        let qmp = vm.qmp_uri();
        let scratch_path = vm.scratch_dir();
        let scratch = scratch_path.to_str().unwrap();
        let dir_path = tmp.path().join("backups");
        let dir = dir_path.to_str().unwrap();
        // Enough data that a full copy reports progress before it ends.
        vm.write("vda", 0, 48 * MIB, 0x31);
        vm.write("vdb", 0, MIB, 0x41);
        let create = |full: bool| {
            let mut args = vec![
                "backup",
                "create",
                "--qmp",
                &qmp,
                "--scratch-dir",
                scratch,
                "--no-progress",
            ];
            if full {
                args.push("--full");
            }
            args.push(dir);
            args.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let args = create(false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        let status = vm.qmp_command("query-status", Value::Null)["status"].clone();
        assert_eq!(status, "running");

        for (n, phase) in ["checkpoint", "copy", "stored"].into_iter().enumerate() {
            let n = n as u64;
            vm.write("vda", (8 + n) * MIB, 64 << 10, 0x50 + n as u8);
            vm.write("vdb", (2 + n) * MIB, 64 << 10, 0x60 + n as u8);
            // Mid-copy: a full copy, long enough that its first progress report is partial.
            let args = create(phase == "copy");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (mut child, _stderr) = paused_at(&args, phase);
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let what = format!("SIGKILL at {phase} ({version})");

            assert_eq!(
                vm.qmp_command("query-status", Value::Null)["status"],
                status,
                "{what}: the VM's run state"
            );
            // The disks are writable (the write asserts qemu-io's success).
            vm.write("vda", 16 * MIB + n * MIB, 64 << 10, 0x70 + n as u8);
            vm.write("vdb", 6 * MIB, 4096, 0x7a + n as u8);
            let verified = ok(&["backup", "verify", "--no-progress", dir]);
            assert!(
                !verified.is_empty() && verified.lines().all(|l| l.contains(": ok ")),
                "{what}: the chain verifies: {verified}"
            );

            let keep = last_checkpoint(dir);
            let before = leftovers(&vm, &scratch_path, &dir_path, &keep);
            assert!(
                !before.is_empty(),
                "{what}: the killed backup left something"
            );
            // Without DIR: everything in QEMU but the stored checkpoints (at `stored`, the
            // replaced one is still stored for all QEMU knows); the half-made checkpoint
            // (marked pending) goes.
            let cleaned: Value = serde_json::from_str(&ok(&[
                "backup",
                "cleanup",
                "--qmp",
                &qmp,
                "--scratch-dir",
                scratch,
                "--json",
            ]))
            .unwrap();
            assert_eq!(cleaned["failed"], json!([]), "{what}: {cleaned}");
            let left = leftovers(&vm, &scratch_path, &dir_path, &keep);
            let expected: Vec<String> = if phase == "stored" {
                let (chain, number) = keep.rsplit_once('-').unwrap();
                let replaced = format!("{chain}-{}", number.parse::<u32>().unwrap() - 1);
                disks
                    .iter()
                    .map(|d| format!("bitmap {replaced} on {d}"))
                    .collect()
            } else {
                vec![]
            };
            let mut in_qemu: Vec<String> = left
                .iter()
                .filter(|l| !l.starts_with("file "))
                .cloned()
                .collect();
            in_qemu.sort();
            assert_eq!(
                in_qemu, expected,
                "{what}: cleanup without DIR (before: {before:?}; cleanup: {cleaned})"
            );
            if phase != "stored" {
                let removed = cleaned["removed"].to_string();
                assert!(
                    removed.contains("(half-made)"),
                    "{what}: the half-made checkpoint was recognised: {cleaned}"
                );
            }
            let cleaned: Value = serde_json::from_str(&ok(&[
                "backup",
                "cleanup",
                "--qmp",
                &qmp,
                "--scratch-dir",
                scratch,
                "--json",
                dir,
            ]))
            .unwrap();
            assert_eq!(cleaned["failed"], json!([]), "{what}: {cleaned}");
            let after = leftovers(&vm, &scratch_path, &dir_path, &keep);
            assert!(
                after.is_empty(),
                "{what}: cleanup left {after:?} (before: {before:?}; cleanup: {cleaned})"
            );
            eprintln!("{what}: cleanup removed {before:?}");

            let args = create(false);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let text = ok(&args);
            assert!(text.contains("Incremental"), "{what}: {text}");
            latest_restores(&vm, tmp.path(), dir, &disks, phase);
        }

        // Ctrl-C in every phase: exit 130; before `stored` nothing left behind and the chain
        // as it was, at `stored` the new point complete. While paused (the backup alive),
        // `cleanup` refuses to touch it.
        for (n, phase) in ["checkpoint", "copy", "hash", "stored"]
            .into_iter()
            .enumerate()
        {
            let what = format!("Ctrl-C at {phase} ({version})");
            if phase == "hash" {
                // An incremental point is hashed from the blocks it copies and the previous
                // point's block digests; only without them (removed here) is it read back
                // whole, the `hash` phase.
                for entry in std::fs::read_dir(&dir_path).unwrap() {
                    let path = entry.unwrap().path();
                    if path.extension().is_some_and(|e| e == "blkdigests") {
                        std::fs::remove_file(path).unwrap();
                    }
                }
            }
            vm.write("vda", (20 + n as u64) * MIB, 64 << 10, 0x80 + n as u8);
            let points_before = last_checkpoint(dir);
            let args = create(phase == "copy");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (mut child, _stderr) = paused_at(&args, phase);
            if phase == "copy" {
                // Through the VM's second monitor: the backup holds the first, and QEMU serves
                // one client per monitor.
                vm.close_test_monitor();
                let second = vm.test_qmp_uri();
                let refused = vmsdk(&[
                    "backup",
                    "cleanup",
                    "--qmp",
                    &second,
                    "--scratch-dir",
                    scratch,
                ]);
                let stderr = String::from_utf8_lossy(&refused.stderr);
                assert!(
                    !refused.status.success() && stderr.contains("in use by another backup"),
                    "{what}: cleanup left the running backup alone: {stderr}"
                );
                let exports = vm.qmp_command("query-block-exports", Value::Null);
                assert_eq!(
                    exports.as_array().map(Vec::len),
                    Some(disks.len()),
                    "{what}: the running backup's exports are still there"
                );
            }
            let killed = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(killed.success());
            let code = child.wait().unwrap().code();
            assert_eq!(code, Some(130), "{what}: exit 130");
            let now = last_checkpoint(dir);
            if phase == "stored" {
                assert_ne!(now, points_before, "{what}: the new point is stored");
            } else {
                assert_eq!(now, points_before, "{what}: the chain as it was");
            }
            let left = leftovers(&vm, &scratch_path, &dir_path, &now);
            assert!(left.is_empty(), "{what}: torn down: {left:?}");
            let verified = ok(&["backup", "verify", "--no-progress", dir]);
            assert!(
                verified.lines().all(|l| l.contains(": ok ")),
                "{what}: the chain verifies: {verified}"
            );
            if phase == "stored" {
                latest_restores(&vm, tmp.path(), dir, &disks, "ctrl-c-at-stored");
            }
            eprintln!("{what}: exit 130, torn down");
        }
        let args = create(false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        latest_restores(&vm, tmp.path(), dir, &disks, "after-ctrl-c");

        // QEMU killed while the CLI copies (paused mid-copy, QEMU killed, then SIGUSR1 lets
        // the copy go on): the CLI fails with exit 1 within its bounds, writes nothing into
        // the chain, and the chain still verifies. QEMU started again on the same images has
        // lost the checkpoint (a killed QEMU stores no persistent bitmap), so the next backup,
        // with --full-if-needed, is a full one; it also removes the dead QEMU's scratch files.
        let what = format!("QEMU killed mid-copy ({version})");
        vm.write("vda", 30 * MIB, 64 << 10, 0x90);
        let points_before = last_checkpoint(dir);
        let args = create(true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut child, stderr) = paused_at(&args, "copy");
        vm.kill();
        let resumed = Command::new("kill")
            .args(["-USR1", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(resumed.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what}: vmsdk still runs after 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let said: Vec<String> = stderr.try_iter().collect();
        assert_eq!(status.code(), Some(1), "{what}: exit 1: {said:?}");
        assert!(
            said.iter()
                .any(|l| l.contains("could not be ended in the hypervisor")
                    && l.contains("connection")),
            "{what}: the error says QEMU did not answer the teardown: {said:?}"
        );
        eprintln!("{what}: vmsdk said {said:?}");
        assert_eq!(
            last_checkpoint(dir),
            points_before,
            "{what}: the chain as it was"
        );
        let partial: Vec<_> = std::fs::read_dir(&dir_path)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".part"))
            .collect();
        assert!(
            partial.is_empty(),
            "{what}: partial images left: {partial:?}"
        );
        let verified = ok(&["backup", "verify", "--no-progress", dir]);
        assert!(
            verified.lines().all(|l| l.contains(": ok ")),
            "{what}: the chain verifies: {verified}"
        );
        drop(vm);
        let vm =
            QemuVm::start_booting(g, tmp.path(), &[("vda", 64 * MIB), ("vdb", 8 * MIB)]).unwrap();
        let mut args = create(false);
        args.insert(args.len() - 1, "--full-if-needed".to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = ok(&args);
        assert!(
            text.contains("Full"),
            "{what}: the next backup is full: {text}"
        );
        let now = last_checkpoint(dir);
        let left = leftovers(&vm, &scratch_path, &dir_path, &now);
        assert!(left.is_empty(), "{what}: the next backup removed {left:?}");
        // The restarted VM's disk model starts empty: the restored points are compared with
        // the images themselves, by qemu-img, once QEMU has closed them.
        let restored: Vec<_> = disks
            .iter()
            .map(|disk| {
                (
                    disk,
                    restore_latest(tmp.path(), dir, disk, "after-qemu-killed"),
                )
            })
            .collect();
        vm.quit();
        for (disk, dest) in restored {
            let image = tmp.path().join(format!("{disk}.qcow2"));
            let out = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "qcow2"])
                .arg(&dest)
                .arg(&image)
                .output()
                .expect("run qemu-img compare");
            vmsdk_tests::assert_success(&out, format_args!("{what}: qemu-img compare of {disk}"));
        }
        eprintln!("{what}: exit 1, chain intact, next backup full and equal to the images");
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
