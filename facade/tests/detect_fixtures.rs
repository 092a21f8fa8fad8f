//! Detection on fixture trees: one directory per hypervisor and container kind, each holding the
//! files the probes read (DMI, procfs, sysfs, device tree, a `cpuid` recording) and an `expected`
//! file with the answer `systemd-detect-virt --vm` and `--container` give on such a machine.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use vmsdk::detect::{Container, Detector, Hypervisor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(dir: &Path) -> (Option<Hypervisor>, Option<Container>) {
    let text = fs::read_to_string(dir.join("expected")).expect("fixture has an expected file");
    let mut vm = None;
    let mut container = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("vm", "none")) | Some(("container", "none")) => {}
            Some(("vm", word)) => vm = Some(word.parse().expect("a hypervisor word")),
            Some(("container", word)) => container = Some(word.parse().expect("a container word")),
            _ => panic!("bad line `{line}` in {}", dir.display()),
        }
    }
    (vm, container)
}

#[test]
fn every_fixture_tree_gives_its_expected_answer() {
    let mut failures = Vec::new();
    let mut seen_vms = BTreeSet::new();
    let mut seen_containers = BTreeSet::new();
    let mut count = 0;
    for entry in fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        count += 1;
        let (vm, container) = expected(&dir);
        let detection = Detector::new().with_root(&dir).unwrap().detect();
        if detection.vm != vm || detection.container != container {
            failures.push(format!(
                "{}: expected vm={vm:?} container={container:?}, got vm={:?} container={:?}\n  evidence: {:#?}",
                dir.file_name().unwrap().to_string_lossy(),
                detection.vm,
                detection.container,
                detection.vm_evidence
            ));
        }
        // The answer must be backed by a decisive piece of evidence, not fall out of thin air.
        if vm.is_some() {
            assert!(
                detection.vm_evidence.iter().any(|e| e.decisive),
                "{}: no decisive VM evidence",
                dir.display()
            );
        }
        if container.is_some() {
            assert!(
                detection.container_evidence.iter().any(|e| e.decisive),
                "{}: no decisive container evidence",
                dir.display()
            );
        }
        seen_vms.extend(vm);
        seen_containers.extend(container);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(count >= 50, "only {count} fixture trees found");
    // Every word systemd-detect-virt --list knows has at least one fixture.
    let missing_vms: Vec<_> = Hypervisor::ALL
        .iter()
        .filter(|h| !seen_vms.contains(h))
        .collect();
    let missing_containers: Vec<_> = Container::ALL
        .iter()
        .filter(|c| !seen_containers.contains(c))
        .collect();
    assert!(missing_vms.is_empty(), "no fixture for {missing_vms:?}");
    assert!(
        missing_containers.is_empty(),
        "no fixture for {missing_containers:?}"
    );
}

#[test]
fn hyperv_signature_below_kvm_is_reported_as_kvm_with_both_leaves_in_evidence() {
    let dir = fixtures().join("kvm-hyperv-enlightened");
    let detection = Detector::new().with_root(&dir).unwrap().detect();
    assert_eq!(detection.vm, Some(Hypervisor::Kvm));
    let sources: Vec<_> = detection
        .vm_evidence
        .iter()
        .map(|e| (e.source.as_str(), e.indicates.as_deref(), e.decisive))
        .collect();
    assert!(sources.contains(&("cpuid:0x40000000", Some("microsoft"), false)));
    assert!(sources.contains(&("cpuid:0x40000100", Some("kvm"), true)));
}

#[test]
fn vmbus_devices_do_not_make_a_qemu_guest_hyperv() {
    let dir = fixtures().join("qemu-vmbus");
    let detection = Detector::new().with_root(&dir).unwrap().detect();
    assert_eq!(detection.vm, Some(Hypervisor::Qemu));
    let decisive: Vec<_> = detection
        .vm_evidence
        .iter()
        .filter(|e| e.decisive)
        .map(|e| e.source.as_str())
        .collect();
    assert_eq!(decisive, ["/sys/class/dmi/id/sys_vendor"]);
}

#[test]
fn pid1_container_variable_wins_and_empty_means_none() {
    let dir = fixtures().join("docker");
    let as_pid1 = Detector::new()
        .with_root(&dir)
        .unwrap()
        .with_pid1_container_env("systemd-nspawn");
    assert_eq!(as_pid1.detect().container, Some(Container::SystemdNspawn));
    let explicit_none = Detector::new()
        .with_root(&dir)
        .unwrap()
        .with_pid1_container_env("");
    assert_eq!(explicit_none.detect().container, None);
}

#[test]
fn words_round_trip_and_match_systemd_spelling() {
    for h in Hypervisor::ALL {
        assert_eq!(h.to_string().parse::<Hypervisor>().unwrap(), *h);
        let json = serde_json::to_string(h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
    }
    for c in Container::ALL {
        assert_eq!(c.to_string().parse::<Container>().unwrap(), *c);
    }
    assert_eq!(Hypervisor::VmOther.to_string(), "vm-other");
    assert_eq!(Container::SystemdNspawn.to_string(), "systemd-nspawn");
    assert!("hyperv".parse::<Hypervisor>().is_err());
}

#[test]
fn a_broken_cpuid_recording_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cpuid"), "0x1 nonsense\n").unwrap();
    let err = Detector::new().with_root(dir.path()).unwrap_err();
    assert_eq!(err.line, 1);
}
