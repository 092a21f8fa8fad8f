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
}
