//! Block hashes of incremental live backups of a running QEMU (7.2 on the machine, 10.0 in the
//! Debian 13 root), computed from the changed blocks and the previous point's block digests:
//! for random scattered guest writes (512-byte aligned, so unaligned to the 64 KiB hash
//! blocks and bitmap granularity; data and zeroes; one while the backup reads), every point's
//! recorded hash equals the hash of the disk at its checkpoint, as vmsdk reads it whole and as
//! `nbdcopy --blkhash` (libnbd 1.24, in the Debian 13 root: the machine's 1.14 has no
//! `--blkhash`) reads the restored point; the chain is never read back to hash it.

use disk_transport::blkhash::{checksum, BlkhashSpec};
use disk_transport::memory::MemoryDisk;
use live_backup::qemu::QemuSource;
use live_backup::{BackupDir, BackupOptions, PointKind};
use vmsdk_tests::disk::nbd_tool;
use vmsdk_tests::peers::{for_each_generation, Generation};
use vmsdk_tests::qemu_vm::QemuVm;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn hash_of(data: &[u8], spec: BlkhashSpec) -> String {
    let disk = MemoryDisk::with_data(data);
    let hash = checksum(&disk, spec, &Default::default(), &mut |_| {}).unwrap();
    format!("{spec}:{}", hash.hex())
}

/// `nbdcopy-1.24 --blkhash=SPEC FILE null:` in the Debian 13 root; `None` where it is missing
/// (after a skip notice; a failure under CI).
fn nbdcopy_blkhash(file: &std::path::Path, spec: BlkhashSpec) -> Option<String> {
    let out = nbd_tool(Generation::Trixie, "nbdcopy-1.24")?
        .arg(format!("--blkhash={spec}"))
        .arg(file)
        .arg("null:")
        .output();
    vmsdk_tests::assert_success(&out, format_args!("nbdcopy --blkhash={spec}"));
    Some(format!(
        "{spec}:{}",
        String::from_utf8(out.stdout).unwrap().trim()
    ))
}

#[test]
fn incremental_hashes_of_a_running_vm_equal_the_whole_disk_hash() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &[("vda", SIZE)]) else {
            return;
        };
        eprintln!("{}", vm.version());
        vm.write("vda", 0, 3 * MIB, 0x11);
        // Two chains of one VM, each with its own bitmap: hash blocks equal to the bitmap's
        // granularity, and larger than it (changed ranges widened to whole hash blocks).
        let chains = [
            (BackupDir::new(tmp.path().join("a")), BlkhashSpec::default()),
            (
                BackupDir::new(tmp.path().join("b")),
                "sha1/1M".parse().unwrap(),
            ),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut at = [Vec::new(), Vec::new()];
        for round in 0..4u8 {
            for (c, (dir, spec)) in chains.iter().enumerate() {
                // Scattered changes, about 2 % of the disk.
                for _ in 0..8 {
                    let offset = next(SIZE / 512 - 128) * 512;
                    let length = (1 + next(127)) * 512;
                    if next(4) == 0 {
                        vm.write_zeroes("vda", offset, length);
                    } else {
                        vm.write("vda", offset, length, 0x40 + next(64) as u8);
                    }
                }
                let contents = vm.contents("vda");
                let during = next(SIZE / 4096) * 4096;
                let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
                let mut wrote = false;
                let mut phases = Vec::new();
                let report = dir
                    .create(
                        &mut source,
                        None,
                        &BackupOptions::new().blkhash(*spec),
                        &mut |p| {
                            phases.push(p.phase);
                            if !wrote && p.phase == "copy" {
                                wrote = true;
                                vm.write("vda", during, 4096, 0xee);
                            }
                        },
                    )
                    .unwrap();
                assert_eq!(report.point.kind == PointKind::Full, round == 0);
                assert!(
                    !phases.contains(&"hash"),
                    "chain {c} round {round}: read back"
                );
                let recorded = report.point.disks[0].blkhash.clone().unwrap();
                assert_eq!(
                    recorded,
                    hash_of(&contents, *spec),
                    "chain {c} round {round}"
                );
                eprintln!("chain {c} point {}: {recorded}", report.point.number);
                at[c].push(recorded);
            }
        }
        // Restored points, hashed by nbdcopy.
        for (c, (dir, spec)) in chains.iter().enumerate() {
            dir.verify(&mut |_| {}).unwrap();
            for (i, recorded) in at[c].iter().enumerate() {
                let out = tmp.path().join(format!("restored-{c}-{i}.img"));
                dir.restore(
                    None,
                    Some(i as u32 + 1),
                    out.to_str().unwrap(),
                    &Default::default(),
                    &mut |_| {},
                )
                .unwrap();
                if let Some(hash) = nbdcopy_blkhash(&out, *spec) {
                    assert_eq!(&hash, recorded, "nbdcopy of chain {c} point {}", i + 1);
                    eprintln!(
                        "nbdcopy 1.24 --blkhash of restored chain {c} point {}: same",
                        i + 1
                    );
                }
                std::fs::remove_file(&out).unwrap();
            }
        }
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
