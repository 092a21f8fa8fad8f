//! Detection on fixture trees: one directory per hypervisor, container and confidential-VM kind,
//! each holding the files the probes read (DMI, procfs, sysfs, device tree, a `cpuid` recording
//! with MSR lines) and an `expected` file with the answer `systemd-detect-virt --vm`,
//! `--container` and `--cvm` give on such a machine (a missing `cvm=` line means `none`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use vmsdk::detect::{ConfidentialVm, Container, Detector, Hypervisor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

type Expected = (
    Option<Hypervisor>,
    Option<Container>,
    Option<ConfidentialVm>,
);

fn expected(dir: &Path) -> Expected {
    let text = fs::read_to_string(dir.join("expected")).expect("fixture has an expected file");
    let mut vm = None;
    let mut container = None;
    let mut cvm = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("vm" | "container" | "cvm", "none")) => {}
            Some(("vm", word)) => vm = Some(word.parse().expect("a hypervisor word")),
            Some(("container", word)) => container = Some(word.parse().expect("a container word")),
            Some(("cvm", word)) => cvm = Some(word.parse().expect("a confidential-VM word")),
            _ => panic!("bad line `{line}` in {}", dir.display()),
        }
    }
    (vm, container, cvm)
}

#[test]
fn every_fixture_tree_gives_its_expected_answer() {
    let mut failures = Vec::new();
    let mut seen_vms = BTreeSet::new();
    let mut seen_containers = BTreeSet::new();
    let mut seen_cvms = BTreeSet::new();
    let mut count = 0;
    for entry in fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        count += 1;
        let (vm, container, cvm) = expected(&dir);
        let detection = Detector::new().with_root(&dir).unwrap().detect();
        if detection.vm != vm || detection.container != container || detection.cvm != cvm {
            failures.push(format!(
                "{}: expected vm={vm:?} container={container:?} cvm={cvm:?}, got vm={:?} container={:?} cvm={:?}\n  evidence: {:#?}\n  cvm evidence: {:#?}",
                dir.file_name().unwrap().to_string_lossy(),
                detection.vm,
                detection.container,
                detection.cvm,
                detection.vm_evidence,
                detection.cvm_evidence
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
        if cvm.is_some() {
            assert!(
                detection.cvm_evidence.iter().any(|e| e.decisive),
                "{}: no decisive confidential-VM evidence",
                dir.display()
            );
        }
        seen_vms.extend(vm);
        seen_containers.extend(container);
        seen_cvms.extend(cvm);
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
    let missing_cvms: Vec<_> = ConfidentialVm::ALL
        .iter()
        .filter(|c| !seen_cvms.contains(c))
        .collect();
    assert!(missing_cvms.is_empty(), "no fixture for {missing_cvms:?}");
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
