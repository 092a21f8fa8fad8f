//! Backup chains with the `vmsdk` tool and qcow2, end to end and without a VM: a full copy of
//! a qemu-nbd export into `full.qcow2` (holes stay unallocated), incremental copies of what a
//! persistent dirty bitmap marks into overlays (`--dirty-bitmap B --backing PREV.qcow2`),
//! then a restore of the whole chain into a raw file. `qemu-img check` passes on every image
//! we wrote and `qemu-img compare` of the chain against the VM's disk is 0; `disk info` and
//! `disk map` show the format, the chain and the depth.
//!
//! Runs against each peer generation (qemu 7.2 on the machine, 10.0 in the Debian 13 root).

use std::path::Path;
use std::process::{Command, Output};

use disk_transport::qcow2::Qcow2Disk;
use vmsdk_tests::disk::NbdServer;
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;

fn peer(g: Generation, program: &str, args: &[&str]) -> Output {
    let out = g
        .command(program, "qemu-utils")
        .expect("checked by for_each_generation")
        .args(args)
        .output();
    vmsdk_tests::assert_success(&out, format_args!("{program} {args:?} ({g})"));
    out
}

fn vmsdk_ok(args: &[&str]) -> Option<String> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    let out = Command::new(binary).args(args).output().expect("run vmsdk");
    vmsdk_tests::assert_success(&out, format_args!("vmsdk {args:?}"));
    Some(String::from_utf8(out.stdout).unwrap())
}

fn vmsdk_fails(args: &[&str]) -> Option<String> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    let out = Command::new(binary).args(args).output().expect("run vmsdk");
    assert!(!out.status.success(), "vmsdk {args:?} succeeded");
    Some(String::from_utf8(out.stderr).unwrap())
}

fn check(g: Generation, image: &Path) {
    peer(
        g,
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
}

/// `qemu-img compare` of our chain against the VM's disk: identical.
fn compare(g: Generation, chain: &Path, vm: &Path) {
    peer(
        g,
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            chain.to_str().unwrap(),
            vm.to_str().unwrap(),
        ],
    );
}

/// Bytes the top image itself holds (depth 0, allocated).
fn own_bytes(image: &Path) -> u64 {
    let disk = Qcow2Disk::open_read_only(image).unwrap();
    let size = disk_transport::Disk::info(&disk).unwrap().capacity;
    disk.map(0, size)
        .unwrap()
        .iter()
        .filter(|e| e.depth == 0 && e.present)
        .map(|e| e.length)
        .sum()
}

#[test]
fn full_and_incremental_backups_form_a_qcow2_chain_that_restores() {
    for_each_generation(&["qemu-img", "qemu-nbd", "qemu-io"], |g| {
        let Some(_) = vmsdk_tests::vmsdk_binary() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vm = d.join("vm.qcow2");
        let vm_s = vm.to_str().unwrap();
        peer(g, "qemu-img", &["create", "-q", "-f", "qcow2", vm_s, "64M"]);
        peer(
            g,
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 4M",
                "-c",
                "write -P 9 40M 1M",
                "-c",
                "write -z 50M 1M",
                vm_s,
            ],
        );
        peer(g, "qemu-img", &["bitmap", "--add", vm_s, "b0"]);

        // The full backup.
        let full = d.join("full.qcow2");
        {
            let server = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", vm_s]).unwrap();
            let summary = vmsdk_ok(&[
                "disk",
                "copy",
                "--no-progress",
                &server.uri(),
                full.to_str().unwrap(),
            ])
            .unwrap();
            assert!(
                summary.starts_with(&format!("copied {} bytes", 64 * MIB)),
                "{summary}"
            );
        }
        check(g, &full);
        compare(g, &full, &vm);
        assert_eq!(own_bytes(&full), 5 * MIB, "holes stay unallocated");

        // Two incrementals, each of what its bitmap marks, each on top of the last.
        let mut previous = full.clone();
        for (level, (bitmap, writes)) in [
            ("b0", ["write -P 2 1M 64k", "write -P 3 30M 1M"]),
            ("b1", ["write -P 4 2M 4k", "write -z 40M 512k"]),
        ]
        .into_iter()
        .enumerate()
        {
            if level == 1 {
                peer(g, "qemu-img", &["bitmap", "--add", vm_s, "b1"]);
            }
            peer(g, "qemu-io", &["-c", writes[0], "-c", writes[1], vm_s]);
            let inc = d.join(format!("inc{}.qcow2", level + 1));
            {
                let server =
                    NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", "-B", bitmap, vm_s]).unwrap();
                let prev = previous.to_str().unwrap();
                let summary = vmsdk_ok(&[
                    "disk",
                    "copy",
                    "--no-progress",
                    "--dirty-bitmap",
                    bitmap,
                    "--backing",
                    prev,
                    &server.uri(),
                    inc.to_str().unwrap(),
                ])
                .unwrap();
                assert!(summary.contains("changed bytes"), "{summary}");
                // A second overlay onto an existing file is refused.
                let err = vmsdk_fails(&[
                    "disk",
                    "copy",
                    "--no-progress",
                    "--dirty-bitmap",
                    bitmap,
                    "--backing",
                    prev,
                    &server.uri(),
                    inc.to_str().unwrap(),
                ])
                .unwrap();
                assert!(err.contains("exists"), "{err}");
            }
            check(g, &inc);
            compare(g, &inc, &vm);
            let own = own_bytes(&inc);
            assert!(
                own > 0 && own <= 2 * MIB + 128 * 1024,
                "only what changed: {own}"
            );
            let disk = Qcow2Disk::open_read_only(&inc).unwrap();
            assert_eq!(
                disk.backing_file().unwrap().0,
                previous.file_name().unwrap().to_str().unwrap()
            );
            previous = inc;
        }

        // info and map show the chain.
        let top = d.join("inc2.qcow2");
        let info = vmsdk_ok(&["disk", "info", top.to_str().unwrap()]).unwrap();
        assert!(info.contains("format                   qcow2"), "{info}");
        assert!(
            info.contains("2: ") && info.contains("full.qcow2"),
            "{info}"
        );
        let map = vmsdk_ok(&["disk", "map", "--json", top.to_str().unwrap()]).unwrap();
        let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
        for depth in 0..3 {
            assert!(
                map.iter()
                    .any(|e| e["depth"] == depth && e["present"] == true),
                "{map:?}"
            );
        }

        // Restore: the whole chain into a raw file.
        let restored = d.join("restored.img");
        vmsdk_ok(&[
            "disk",
            "copy",
            "--no-progress",
            top.to_str().unwrap(),
            restored.to_str().unwrap(),
        ])
        .unwrap();
        peer(
            g,
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                restored.to_str().unwrap(),
                vm_s,
            ],
        );
    });
}
