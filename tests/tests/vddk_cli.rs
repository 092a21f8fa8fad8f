//! `vmsdk disk` on `vddk://` URIs, through the real dlopen path into the stand-in
//! libvixDiskLib built from this workspace.

use std::process::Command;

use vmsdk_tests::{vddk_standin_libdir, vmsdk_binary};

#[test]
fn disk_info_and_copy_through_vddk() {
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let libdir = vddk_standin_libdir();
    let libdir = libdir.to_str().unwrap();
    // The stand-in keys disks by path and takes their size from it (`?` encoded as %3F).
    let uri = format!("vddk:///cli-disk%3Fsize%3D1048576?libdir={libdir}");
    let out = Command::new(&vmsdk)
        .args(["disk", "info", "--json", &uri])
        .output()
        .unwrap();
    vmsdk_tests::assert_success(&out, "vmsdk disk info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["capacity"], 1_048_576);
    assert_eq!(info["read_only"], true);

    // Copy the VDDK disk to a file: every byte arrives, and the run reports what it did.
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("copy.img");
    let out = Command::new(&vmsdk)
        .args(["disk", "copy", "--no-progress", &uri, dst.to_str().unwrap()])
        .output()
        .unwrap();
    vmsdk_tests::assert_success(&out, "vmsdk disk copy");
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1_048_576);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("copied 1048576 bytes"));

    // A library directory without VDDK is a clear error naming where it looked.
    let empty = tempfile::tempdir().unwrap();
    let uri = format!(
        "vddk:///cli-disk%3Fsize%3D4096?libdir={}",
        empty.path().display()
    );
    let out = Command::new(&vmsdk)
        .args(["disk", "info", &uri])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("libvixDiskLib"), "{message}");

    // The InitEx configuration named by `config=` is checked before InitEx, by the same code a
    // library user runs: a misspelt key is a warning on stderr naming the key it resembles (the
    // disk still opens), an out-of-range value an error naming the file, line and key.
    let conf = dir.path().join("vddk.conf");
    std::fs::write(
        &conf,
        "vixDiskLib.nfc.LogLevel = 1\nvixDiskLib.nfc.ReadTimoutMs = 60000\n",
    )
    .unwrap();
    let uri = format!(
        "vddk:///cli-disk%3Fsize%3D1048576?libdir={libdir}&config={}",
        conf.display()
    );
    let out = Command::new(&vmsdk)
        .args(["disk", "info", "--json", &uri])
        .output()
        .unwrap();
    vmsdk_tests::assert_success(&out, "vmsdk disk info with a misspelt key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "vmsdk: warning: VDDK configuration {}:2: unknown key vixDiskLib.nfc.ReadTimoutMs; \
             did you mean vixDiskLib.nfc.ReadTimeoutMs?",
            conf.display()
        )),
        "{stderr}"
    );
    // Nothing else in the log: the stand-in's old 8 KiB test message is opt-in now.
    assert!(!stderr.contains("long message"), "{stderr}");

    std::fs::write(&conf, "vixDiskLib.transport.LogLevel = 9\n").unwrap();
    let out = Command::new(&vmsdk)
        .args(["disk", "info", &uri])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:1:", conf.display()))
            && stderr.contains("vixDiskLib.transport.LogLevel must be from 0 to 6, found 9"),
        "{stderr}"
    );

    // A VM given without `moref=` is refused before anything is loaded, with the expected form.
    let out = Command::new(&vmsdk)
        .args([
            "disk",
            "info",
            &format!("vddk://root@esx.example/%5Bds1%5D%20vm%2Fvm.vmdk?vm=vm-16&libdir={libdir}"),
        ])
        .env("VMSDK_VDDK_PASSWORD", "unused")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("write moref=vm-16"), "{stderr}");
}
