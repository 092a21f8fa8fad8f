//! `vmsdk detect` on this very machine gives the words and exit codes of systemd-detect-virt.

use std::process::Command;

use vmsdk_tests::{require_program, vmsdk_binary};

/// Runs a detector and returns (stdout word, exit code).
fn run(program: &str, args: &[&str]) -> (String, i32) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {program}: {e}"));
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        out.status.code().expect("exited normally"),
    )
}

#[test]
fn vmsdk_detect_agrees_with_systemd_detect_virt() {
    let Some(systemd) = require_program("systemd-detect-virt", "systemd") else {
        return;
    };
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let systemd = systemd.to_str().unwrap().to_owned();
    let vmsdk = vmsdk.to_str().unwrap();
    for args in [&[][..], &["--vm"], &["--container"]] {
        let theirs = run(&systemd, args);
        let ours = run(vmsdk, &[&["detect"][..], args].concat());
        assert_eq!(ours, theirs, "vmsdk detect {args:?} vs systemd-detect-virt");
        // -q: same exit code, no output.
        let mut quiet = args.to_vec();
        quiet.push("--quiet");
        let (text, code) = run(vmsdk, &[&["detect"][..], &quiet].concat());
        assert!(text.is_empty());
        assert_eq!(code, theirs.1);
    }
}

#[test]
fn json_output_carries_the_answer_and_its_evidence() {
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let out = Command::new(vmsdk)
        .args(["detect", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let detection = vmsdk::detect();
    assert_eq!(json["virtualization"], detection.virtualization());
    assert_eq!(json["vm"], serde_json::to_value(detection.vm).unwrap());
    let evidence = json["vm_evidence"].as_array().unwrap();
    if detection.vm.is_some() {
        assert!(evidence.iter().any(|e| e["decisive"] == true));
    }
}
