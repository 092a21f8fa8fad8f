//! `vmsdk backup` end to end against a running QEMU (7.2 on the machine, 10.0 in the Debian 13
//! root): create (full, then incremental), list, verify, restore (into a file and into a
//! qemu-nbd export), cleanup; an agent that is
//! not there makes a crash-consistent backup with a warning.

use std::process::Output;

use vmsdk_tests::disk::NbdServer;
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qemu_vm::QemuVm;

const MIB: u64 = 1 << 20;

fn vmsdk(args: &[&str]) -> Option<Output> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    Some(
        std::process::Command::new(binary)
            .args(args)
            .output()
            .expect("run vmsdk"),
    )
}

fn ok(args: &[&str]) -> Option<String> {
    let out = vmsdk(args)?;
    vmsdk_tests::assert_success(&out, format_args!("vmsdk {args:?}"));
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn create_list_verify_restore_cleanup() {
    let ran = for_each_generation(&["qemu-system-x86_64"], |g| {
        if vmsdk_tests::vmsdk_binary().is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = QemuVm::start(g, tmp.path(), &[("vda", 16 * MIB)]) else {
            return;
        };
        eprintln!("{}", vm.version());
        let qmp = vm.qmp_uri();
        let scratch = vm.scratch_dir();
        let scratch = scratch.to_str().unwrap();
        let dir = tmp.path().join("backups");
        let dir_s = dir.to_str().unwrap();
        vm.write("vda", 0, MIB, 0x21);
        let at_1 = vm.contents("vda");
        let missing_agent = format!("qga+unix://{}", tmp.path().join("no-agent.sock").display());
        let out = vmsdk(&[
            "backup",
            "create",
            "--qmp",
            &qmp,
            "--agent",
            &missing_agent,
            "--scratch-dir",
            scratch,
            "--no-progress",
            "--json",
            dir_s,
        ])
        .unwrap();
        vmsdk_tests::assert_success(&out, "vmsdk backup create (full)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("crash-consistent"), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["point"]["number"], 1);
        assert_eq!(report["point"]["kind"], "full");

        vm.write("vda", 8 * MIB, 64 << 10, 0x22);
        let at_2 = vm.contents("vda");
        let text = ok(&[
            "backup",
            "create",
            "--qmp",
            &qmp,
            "--scratch-dir",
            scratch,
            "--no-progress",
            dir_s,
        ])
        .unwrap();
        assert!(
            text.starts_with("point 2 (Incremental, crash-consistent)"),
            "{text}"
        );

        let list = ok(&["backup", "list", "--qmp", &qmp, dir_s]).unwrap();
        assert!(
            list.contains("2 points") && list.contains("incremental"),
            "{list}"
        );
        assert!(
            list.contains("checkpoints on the VM") && list.contains("vda (recording)"),
            "{list}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["backup", "list", "--json", dir_s]).unwrap()).unwrap();
        assert_eq!(json["manifest"]["points"].as_array().unwrap().len(), 2);

        let verified = ok(&["backup", "verify", "--no-progress", dir_s]).unwrap();
        assert_eq!(
            verified.lines().filter(|l| l.contains(": ok ")).count(),
            2,
            "{verified}"
        );

        for (point, want) in [("1", &at_1), ("2", &at_2)] {
            let dest = tmp.path().join(format!("restored-{point}.img"));
            ok(&[
                "backup",
                "restore",
                "--disk",
                "vda",
                "--point",
                point,
                "--no-progress",
                dir_s,
                dest.to_str().unwrap(),
            ])
            .unwrap();
            assert!(
                std::fs::read(&dest).unwrap() == *want,
                "point {point} restores the disk at its checkpoint"
            );
            // `disk checksum` of the restored disk prints the hash the manifest recorded
            // (blake3/64k unless asked otherwise).
            let index = point.parse::<usize>().unwrap() - 1;
            let recorded = json["manifest"]["points"][index]["disks"][0]["blkhash"]
                .as_str()
                .unwrap()
                .to_owned();
            let (spec, hex) = recorded.split_once(':').unwrap();
            assert_eq!(spec, "blake3/64k");
            let printed = ok(&[
                "disk",
                "checksum",
                "--no-progress",
                "--blkhash",
                spec,
                dest.to_str().unwrap(),
            ])
            .unwrap();
            assert_eq!(printed.trim(), hex, "point {point}");
        }

        // Into an NBD export: a writable qemu-nbd of a raw image of the disk's size.
        let target = tmp.path().join("nbd-target.img");
        std::fs::write(&target, vec![0xffu8; (16 * MIB) as usize]).unwrap();
        if let Some(mut server) =
            NbdServer::qemu_nbd_in(g, &["-f", "raw", target.to_str().unwrap()])
        {
            ok(&[
                "backup",
                "restore",
                "--point",
                "2",
                "--no-progress",
                dir_s,
                &server.uri(),
            ])
            .unwrap();
            server.kill();
            assert!(
                std::fs::read(&target).unwrap() == at_2,
                "point 2 restored into an NBD export"
            );
        }

        // A bit flipped in a data cluster fails verify, with exit 1.
        let image = dir.join("vda.2.qcow2");
        let mut bytes = std::fs::read(&image).unwrap();
        let data = bytes
            .windows(4096)
            .position(|w| w.iter().all(|&b| b == 0x22))
            .expect("the incremental image holds the changed data");
        bytes[data + 100] ^= 0x01;
        std::fs::write(&image, &bytes).unwrap();
        let out = vmsdk(&["backup", "verify", "--no-progress", dir_s]).unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let clean = ok(&["backup", "cleanup", "--qmp", &qmp, "--scratch-dir", scratch]).unwrap();
        assert_eq!(clean.trim(), "nothing to clean up");
        vm.quit();
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}
