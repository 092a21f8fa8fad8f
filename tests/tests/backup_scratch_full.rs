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
use serde_json::Value;
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
    let mut found = vm.vmsdk_leftovers(keep);
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

/// The checkpoint of the chain's last point.
fn last_checkpoint(dir: &BackupDir) -> String {
    dir.manifest()
        .unwrap()
        .unwrap()
        .last()
        .unwrap()
        .checkpoint
        .clone()
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
        let keep = last_checkpoint(&dir);

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

/// The guest of the test below: a boot sector (16-bit real mode, loaded at 0x7c00) that
/// polls sector 2048 (1 MiB) until it reads 0x47474747, then writes 16 MiB of 0x66 from
/// sector 16384 (8 MiB) on, 64 sectors a call, through BIOS int 13h extended writes: the
/// firmware's virtio-blk driver, so the disk's device, as a guest writes (the device's
/// `werror` applies, which HMP `qemu-io` skips). It reports on the debug console (port
/// 0xe9): `B` booted, `S` writing, `D` done, `F` a write failed. The bytes up to its data
/// (the rest of the sector is zero, then 0x55 0xaa), as GNU as (`as --32`, then
/// `ld -m elf_i386 -Ttext 0x7c00 --oformat binary`) makes them from:
///
/// ```text
///         .code16
///         .set GO_LBA, 2048
///         .set GO_DWORD, 0x47474747
///         .set FLOOD_LBA, 16384
///         .set FLOOD_CALLS, 512
///         .set FLOOD_PATTERN, 0x66
///         .globl _start
/// _start:
///         cli
///         xorw %ax, %ax
///         movw %ax, %ds
///         movw %ax, %es
///         movw %ax, %ss
///         movw $0x7c00, %sp
///         sti
///         movb %dl, drive
///         movb $'B', %al
///         outb %al, $0xe9
/// wait_go:
///         movw $1, dap_count
///         movw $0x8000, dap_off
///         movw $0, dap_seg
///         movl $GO_LBA, dap_lba
///         movw $dap, %si
///         movb $0x42, %ah
///         movb drive, %dl
///         int $0x13
///         cmpl $GO_DWORD, 0x8000
///         jne wait_go
///         movb $'S', %al
///         outb %al, $0xe9
///         movw $0x1000, %ax
///         movw %ax, %es
///         xorw %di, %di
///         movb $FLOOD_PATTERN, %al
///         movw $32768, %cx
///         rep stosb
///         xorw %ax, %ax
///         movw %ax, %es
///         movl $FLOOD_LBA, lba
///         movw $FLOOD_CALLS, %bx
/// write_loop:
///         movw $64, dap_count
///         movw $0, dap_off
///         movw $0x1000, dap_seg
///         movl lba, %eax
///         movl %eax, dap_lba
///         movw $dap, %si
///         movw $0x4300, %ax
///         movb drive, %dl
///         int $0x13
///         jc fail
///         addl $64, lba
///         decw %bx
///         jnz write_loop
///         movb $'D', %al
///         outb %al, $0xe9
/// halt:
///         cli
///         hlt
///         jmp halt
/// fail:
///         movb $'F', %al
///         outb %al, $0xe9
///         jmp halt
///         .align 4
/// dap:    .byte 16, 0
/// dap_count: .word 0
/// dap_off: .word 0
/// dap_seg: .word 0
/// dap_lba: .long 0, 0
/// lba:    .long 0
/// drive:  .byte 0
///         .org 510
///         .byte 0x55, 0xaa
/// ```
const BOOT_CODE: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xfb, 0x88, 0x16, 0xbc,
    0x7c, 0xb0, 0x42, 0xe6, 0xe9, 0xc7, 0x06, 0xaa, 0x7c, 0x01, 0x00, 0xc7, 0x06, 0xac, 0x7c, 0x00,
    0x80, 0xc7, 0x06, 0xae, 0x7c, 0x00, 0x00, 0x66, 0xc7, 0x06, 0xb0, 0x7c, 0x00, 0x08, 0x00, 0x00,
    0xbe, 0xa8, 0x7c, 0xb4, 0x42, 0x8a, 0x16, 0xbc, 0x7c, 0xcd, 0x13, 0x66, 0x81, 0x3e, 0x00, 0x80,
    0x47, 0x47, 0x47, 0x47, 0x75, 0xcf, 0xb0, 0x53, 0xe6, 0xe9, 0xb8, 0x00, 0x10, 0x8e, 0xc0, 0x31,
    0xff, 0xb0, 0x66, 0xb9, 0x00, 0x80, 0xf3, 0xaa, 0x31, 0xc0, 0x8e, 0xc0, 0x66, 0xc7, 0x06, 0xb8,
    0x7c, 0x00, 0x40, 0x00, 0x00, 0xbb, 0x00, 0x02, 0xc7, 0x06, 0xaa, 0x7c, 0x40, 0x00, 0xc7, 0x06,
    0xac, 0x7c, 0x00, 0x00, 0xc7, 0x06, 0xae, 0x7c, 0x00, 0x10, 0x66, 0xa1, 0xb8, 0x7c, 0x66, 0xa3,
    0xb0, 0x7c, 0xbe, 0xa8, 0x7c, 0xb8, 0x00, 0x43, 0x8a, 0x16, 0xbc, 0x7c, 0xcd, 0x13, 0x72, 0x11,
    0x66, 0x83, 0x06, 0xb8, 0x7c, 0x40, 0x4b, 0x75, 0xcf, 0xb0, 0x44, 0xe6, 0xe9, 0xfa, 0xf4, 0xeb,
    0xfc, 0xb0, 0x46, 0xe6, 0xe9, 0xeb, 0xf6, 0x90, 0x10, 0x00,
];
/// Where the guest looks for its go, and the pattern that says go.
const GO: (u64, u8) = (MIB, 0x47);
/// What the guest writes: 16 MiB of 0x66 from 8 MiB on.
const FLOOD: (u64, u64, u8) = (8 * MIB, 16 * MIB, 0x66);

/// The boot disk of the test below: the boot sector, then 0x31 up to 32 MiB (data the
/// guest's writes overwrite, so the view must keep its old contents), zeros up to `size`.
fn boot_disk(size: u64) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    disk[..32 * MIB as usize].fill(0x31);
    disk[..512].fill(0);
    disk[..BOOT_CODE.len()].copy_from_slice(BOOT_CODE);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk
}

/// Waits up to `seconds` for `done`; false when it did not come.
fn wait_for(seconds: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

#[test]
fn a_guest_stopped_by_a_full_scratch_filesystem_is_continued() {
    let ran = for_each_generation(&["qemu-system-x86_64", "qemu-img"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path().join("scratch");
        let Some(_tmpfs) = Tmpfs::mount(&scratch, 8 * MIB) else {
            return;
        };
        // The boot disk, made before QEMU starts (the firmware reads it at once).
        let size = 64 * MIB;
        let mut expected = boot_disk(size);
        let raw = tmp.path().join("vda.raw");
        std::fs::write(&raw, &expected).unwrap();
        let Some(qemu_img) = g.command("qemu-img", "qemu-utils") else {
            return;
        };
        let out = qemu_img
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(tmp.path().join("vda.qcow2"))
            .output();
        vmsdk_tests::assert_success(&out, "qemu-img convert");
        std::fs::remove_file(&raw).unwrap();
        let Some(vm) = QemuVm::start_booting(g, tmp.path(), &[("vda", size)]) else {
            return;
        };
        let version = vm.version();
        eprintln!("{version}");
        let what = format!("a guest writing to a full scratch filesystem ({version})");
        assert!(
            wait_for(60, || vm.debug_console().contains('B')),
            "{what}: the guest booted: {:?}",
            vm.debug_console()
        );
        let status = |vm: &QemuVm| vm.qmp_command("query-status", Value::Null)["status"].clone();
        assert_eq!(status(&vm), "running");
        let dir = BackupDir::new(tmp.path().join("backups"));
        dir.create(&mut source(&vm), None, &BackupOptions::new(), &mut |_| {})
            .unwrap();

        // The guest writes 16 MiB over data while the backup's view is in place: its
        // device's write fails with ENOSPC, and QEMU stops the VM (werror=enospc).
        let mut stopped = None;
        let e = dir
            .create(&mut source(&vm), None, &BackupOptions::new(), &mut |p| {
                if p.phase == "checkpoint" && stopped.is_none() {
                    let go = vm.hmp(&format!(
                        "qemu-io -d /machine/peripheral/vda-dev/virtio-backend \"write -P {} {} 512\"",
                        GO.1, GO.0
                    ));
                    assert!(go.is_empty(), "{go}");
                    stopped = Some(wait_for(60, || status(&vm) == "io-error"));
                }
            })
            .unwrap_err();
        expected[GO.0 as usize..GO.0 as usize + 512].fill(GO.1);
        eprintln!("the backup: {e}");
        assert_eq!(
            stopped,
            Some(true),
            "{what}: QEMU stopped the VM on the guest's failed write (console {:?})",
            vm.debug_console()
        );
        assert!(
            matches!(e, Error::ScratchFull { .. })
                && e.to_string().contains(&scratch.display().to_string())
                && e.to_string()
                    .contains("guest write to disk vda failed with ENOSPC"),
            "{what}: the error names the scratch filesystem and the failed write: {e}"
        );
        // vmsdk gave its views up and continued the VM: the guest's write, retried, lands.
        assert!(
            wait_for(60, || vm.debug_console().contains('D')),
            "{what}: the guest finished writing: {:?} (run state {})",
            vm.debug_console(),
            status(&vm)
        );
        assert!(
            !vm.debug_console().contains('F'),
            "{what}: {:?}",
            vm.debug_console()
        );
        assert_eq!(status(&vm), "running", "{what}: the VM runs");
        let keep = last_checkpoint(&dir);
        assert_eq!(
            leftovers(&vm, &scratch, &keep),
            Vec::<String>::new(),
            "{what}"
        );
        let (at, length, pattern) = FLOOD;
        expected[at as usize..(at + length) as usize].fill(pattern);

        // The next backup holds the guest's writes; the chain verifies.
        dir.create(&mut source(&vm), None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
        assert!(!dir.verify(&mut |_| {}).unwrap().is_empty(), "{what}");
        let dest = tmp.path().join("restored.img");
        dir.restore(
            Some("vda"),
            None,
            dest.to_str().unwrap(),
            &CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert!(
            std::fs::read(&dest).unwrap() == expected,
            "{what}: the latest point restores the disk byte for byte"
        );
        eprintln!("{what}: the VM stopped on ENOSPC, was continued, its write landed");
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
