//! Confidential-VM detection (`systemd-detect-virt --cvm`) on the `cvm-*` fixture trees and on
//! trees built here: which signal decides, what an unreadable MSR gives, and the MSR read through
//! a real (sparse) `<root>/dev/cpu/0/msr` file.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmsdk::detect::{
    ConfidentialVm, CpuidReader, CpuidResult, Detector, Evidence, RecordedCpuid,
    MSR_AMD64_SEV_STATUS,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cvm_of(root: &Path) -> (Option<ConfidentialVm>, Vec<Evidence>) {
    Detector::new().with_root(root).unwrap().detect_cvm()
}

fn decisive(evidence: &[Evidence]) -> Vec<&str> {
    evidence
        .iter()
        .filter(|e| e.decisive)
        .map(|e| e.source.as_str())
        .collect()
}

fn find<'a>(evidence: &'a [Evidence], source: &str) -> Option<&'a Evidence> {
    evidence.iter().find(|e| e.source == source)
}

#[test]
fn sev_words_come_from_the_highest_sev_status_bit() {
    for (tree, word) in [
        ("cvm-sev", ConfidentialVm::Sev),
        ("cvm-sev-es", ConfidentialVm::SevEs),
        ("cvm-sev-snp", ConfidentialVm::SevSnp),
    ] {
        let (cvm, evidence) = cvm_of(&fixture(tree));
        assert_eq!(cvm, Some(word), "{tree}: {evidence:#?}");
        assert_eq!(decisive(&evidence), ["msr:0xc0010131"], "{tree}");
        let msr = find(&evidence, "msr:0xc0010131").unwrap();
        assert_eq!(msr.indicates.as_deref(), Some(word.as_str()));
        assert!(msr.observed.contains("SEV_STATUS = 0x"), "{}", msr.observed);
    }
}

#[test]
fn an_unreadable_msr_gives_none_and_says_why() {
    let (cvm, evidence) = cvm_of(&fixture("cvm-sev-msr-missing"));
    assert_eq!(cvm, None);
    let msr = find(&evidence, "msr:0xc0010131").expect("the MSR attempt is evidence");
    assert!(msr.observed.contains("unreadable"), "{}", msr.observed);
    assert!(msr.observed.contains("cannot open"), "{}", msr.observed);
    assert!(msr.observed.contains("dev/cpu/0/msr"), "{}", msr.observed);
    assert!(!msr.decisive);
    // SEV itself was advertised: that is what made the MSR matter.
    let leaf = find(&evidence, "cpuid:0x8000001f").unwrap();
    assert_eq!(leaf.observed, "eax bit 1 (SEV) = 1");

    // An empty device file: the 8-byte pread comes back short, which systemd treats as zero.
    let (cvm, evidence) = cvm_of(&fixture("cvm-sev-msr-short-read"));
    assert_eq!(cvm, None);
    let msr = find(&evidence, "msr:0xc0010131").unwrap();
    assert!(
        msr.observed.contains("short read of 0 bytes"),
        "{}",
        msr.observed
    );

    // A readable register with no SEV bit set is none as well, for another reason.
    let (cvm, evidence) = cvm_of(&fixture("cvm-sev-status-zero"));
    assert_eq!(cvm, None);
    assert!(find(&evidence, "msr:0xc0010131")
        .unwrap()
        .observed
        .starts_with("SEV_STATUS = 0x0"));
}

/// Copies a fixture's `cpuid` recording (leaves only) into a new tree whose SEV_STATUS lives in
/// a sparse `dev/cpu/0/msr`, as the msr driver presents it: 8 bytes at offset 0xc0010131.
fn tree_with_msr_device(status: Option<u64>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let recording = fs::read_to_string(fixture("cvm-sev-msr-missing").join("cpuid")).unwrap();
    assert!(
        !recording.contains("msr"),
        "the source recording has no MSR lines"
    );
    fs::write(dir.path().join("cpuid"), recording).unwrap();
    let device = dir.path().join("dev/cpu/0/msr");
    fs::create_dir_all(device.parent().unwrap()).unwrap();
    let file = fs::File::create(&device).unwrap();
    if let Some(status) = status {
        file.write_all_at(&status.to_le_bytes(), u64::from(MSR_AMD64_SEV_STATUS))
            .unwrap();
    }
    dir
}

#[test]
fn sev_status_is_read_with_pread_from_the_device_under_the_root() {
    for (status, word) in [
        (0x1, Some(ConfidentialVm::Sev)),
        (0x3, Some(ConfidentialVm::SevEs)),
        (0x7, Some(ConfidentialVm::SevSnp)),
        // Bits above 2 (other SEV features) do not name a word on their own.
        (0x18, None),
    ] {
        let tree = tree_with_msr_device(Some(status));
        let (cvm, evidence) = cvm_of(tree.path());
        assert_eq!(cvm, word, "SEV_STATUS {status:#x}: {evidence:#?}");
        let msr = find(&evidence, "msr:0xc0010131").unwrap();
        assert!(
            msr.observed.contains(&format!("SEV_STATUS = {status:#x}")),
            "{}",
            msr.observed
        );
        assert!(msr.observed.contains("dev/cpu/0/msr"), "{}", msr.observed);
    }
}

#[test]
fn the_msr_is_not_read_unless_cpuid_advertises_sev() {
    // The recording has SEV_STATUS = 7, but leaf 0x8000001F says no SEV (as on a plain KVM guest).
    let (cvm, evidence) = cvm_of(&fixture("cvm-amd-kvm-no-sev"));
    assert_eq!(cvm, None);
    assert!(find(&evidence, "msr:0xc0010131").is_none(), "{evidence:#?}");
    assert_eq!(
        find(&evidence, "cpuid:0x8000001f").unwrap().observed,
        "eax bit 1 (SEV) = 0"
    );
    // The Hyper-V fallback was tried and found KVM's signature instead.
    let hyperv = find(&evidence, "cpuid:0x40000000").unwrap();
    assert!(
        hyperv.observed.contains("no Hyper-V isolation leaves"),
        "{}",
        hyperv.observed
    );
}

#[test]
fn bare_metal_stops_at_the_hypervisor_bit() {
    let (cvm, evidence) = cvm_of(&fixture("cvm-amd-bare-metal-sev-host"));
    assert_eq!(cvm, None);
    assert_eq!(evidence.len(), 1, "{evidence:#?}");
    assert_eq!(evidence[0].source, "cpuid:0x00000001");
    assert_eq!(evidence[0].observed, "ecx bit 31 (hypervisor present) = 0");
}

#[test]
fn hyperv_isolation_leaves_decide_on_azure() {
    let (cvm, evidence) = cvm_of(&fixture("cvm-azure-sev-snp"));
    assert_eq!(cvm, Some(ConfidentialVm::SevSnp));
    assert_eq!(decisive(&evidence), ["cpuid:0x4000000c"]);
    assert_eq!(
        find(&evidence, "cpuid:0x4000000c").unwrap().observed,
        "isolation type = 2 (SNP)"
    );

    let (cvm, evidence) = cvm_of(&fixture("cvm-azure-tdx"));
    assert_eq!(cvm, Some(ConfidentialVm::Tdx));
    assert_eq!(decisive(&evidence), ["cpuid:0x4000000c"]);
    // Leaf 0x21 was looked at first and did not say TDX.
    let leaf21 = find(&evidence, "cpuid:0x00000021").unwrap();
    assert!(!leaf21.decisive);

    // VBS isolation is not a confidential VM; neither is the root partition; nor an SNP
    // isolation type on an Intel processor.
    for tree in [
        "cvm-azure-vbs",
        "cvm-hyperv-root-partition",
        "cvm-intel-hyperv-snp-type",
    ] {
        let (cvm, evidence) = cvm_of(&fixture(tree));
        assert_eq!(cvm, None, "{tree}: {evidence:#?}");
    }
}

#[test]
fn tdx_is_leaf_0x21s_signature() {
    let (cvm, evidence) = cvm_of(&fixture("cvm-tdx"));
    assert_eq!(cvm, Some(ConfidentialVm::Tdx));
    assert_eq!(decisive(&evidence), ["cpuid:0x00000021"]);
    assert_eq!(
        find(&evidence, "cpuid:0x00000021").unwrap().observed,
        "signature \"IntelTDX    \""
    );
}

/// A recording changed in one leaf.
fn with_leaf(recording: &RecordedCpuid, leaf: u32, f: impl Fn(&mut CpuidResult)) -> RecordedCpuid {
    let mut result = recording.cpuid(leaf, 0).unwrap();
    f(&mut result);
    recording.clone().with_leaf(leaf, result)
}

#[test]
fn systemd_257s_bounds_are_kept() {
    let tdx: RecordedCpuid = fs::read_to_string(fixture("cvm-tdx").join("cpuid"))
        .unwrap()
        .parse()
        .unwrap();
    let detect = |recording: RecordedCpuid| {
        Detector::new()
            .with_root(fixture("cvm-tdx"))
            .unwrap()
            .with_cpuid(recording)
            .detect_cvm()
            .0
    };
    assert_eq!(detect(tdx.clone()), Some(ConfidentialVm::Tdx));
    // systemd 257 bounds leaf 0x21 by the highest *extended* leaf: a processor without
    // extended leaves is not looked at, even with a TDX signature in leaf 0x21.
    assert_eq!(detect(with_leaf(&tdx, 0x8000_0000, |r| r.eax = 0)), None);
    // A wrong vendor: neither SEV nor TDX is looked for.
    assert_eq!(
        detect(with_leaf(&tdx, 0, |r| r.ebx = u32::from_le_bytes(*b"Hygo"))),
        None
    );

    let azure: RecordedCpuid = fs::read_to_string(fixture("cvm-azure-sev-snp").join("cpuid"))
        .unwrap()
        .parse()
        .unwrap();
    let detect = |recording: RecordedCpuid| {
        Detector::new()
            .with_root(fixture("cvm-azure-sev-snp"))
            .unwrap()
            .with_cpuid(recording)
            .detect_cvm()
            .0
    };
    assert_eq!(detect(azure.clone()), Some(ConfidentialVm::SevSnp));
    // Hyper-V's highest leaf must lie in 0x40000005..=0x4000FFFF.
    assert_eq!(
        detect(with_leaf(&azure, 0x4000_0000, |r| r.eax = 0x4000_0004)),
        None
    );
    // AMD's highest extended leaf must reach 0x8000001F before anything else is looked at.
    assert_eq!(
        detect(with_leaf(&azure, 0x8000_0000, |r| r.eax = 0x8000_001e)),
        None
    );
}

#[test]
fn s390x_and_arm64_files_decide_without_cpuid() {
    let (cvm, evidence) = cvm_of(&fixture("cvm-protvirt"));
    assert_eq!(cvm, Some(ConfidentialVm::Protvirt));
    assert_eq!(decisive(&evidence), ["/sys/firmware/uv/prot_virt_guest"]);

    let (cvm, evidence) = cvm_of(&fixture("cvm-s390-not-protected"));
    assert_eq!(cvm, None);
    assert_eq!(
        find(&evidence, "/sys/firmware/uv/prot_virt_guest")
            .unwrap()
            .observed,
        "0"
    );

    let (cvm, evidence) = cvm_of(&fixture("cvm-cca"));
    assert_eq!(cvm, Some(ConfidentialVm::Cca));
    assert_eq!(decisive(&evidence), ["/sys/devices/platform/arm-cca-dev"]);

    // A tree with neither (an arm64 KVM guest) says what was missing.
    let (cvm, evidence) = cvm_of(&fixture("arm64-kvm-device-tree"));
    assert_eq!(cvm, None);
    assert!(evidence[0].observed.contains("neither"), "{evidence:#?}");
}

#[test]
fn words_round_trip_and_match_systemd_spelling() {
    let words: Vec<String> = ConfidentialVm::ALL.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        words,
        ["sev", "sev-es", "sev-snp", "tdx", "protvirt", "cca"]
    );
    for c in ConfidentialVm::ALL {
        assert_eq!(c.to_string().parse::<ConfidentialVm>().unwrap(), *c);
        assert_eq!(serde_json::to_string(c).unwrap(), format!("\"{c}\""));
        let back: ConfidentialVm = serde_json::from_str(&format!("\"{c}\"")).unwrap();
        assert_eq!(back, *c);
    }
    // "none" is the absence of a technology, not a word of its own.
    assert!("none".parse::<ConfidentialVm>().is_err());
}

#[test]
fn detection_carries_the_cvm_and_its_evidence() {
    let detection = Detector::new()
        .with_root(fixture("cvm-sev-snp"))
        .unwrap()
        .detect();
    assert_eq!(detection.cvm, Some(ConfidentialVm::SevSnp));
    assert_eq!(detection.vm.map(|h| h.to_string()).as_deref(), Some("kvm"));
    let json = serde_json::to_value(&detection).unwrap();
    assert_eq!(json["cvm"], "sev-snp");
    assert!(json["cvm_evidence"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["decisive"] == true && e["source"] == "msr:0xc0010131"));
    let back: vmsdk::Detection = serde_json::from_value(json).unwrap();
    assert_eq!(back, detection);
}

#[test]
fn a_capture_records_every_leaf_the_cvm_probe_reads() {
    let source: RecordedCpuid = fs::read_to_string(fixture("cvm-azure-tdx").join("cpuid"))
        .unwrap()
        .parse()
        .unwrap();
    let captured = RecordedCpuid::capture(&source);
    assert_eq!(captured, source);
    let text = captured.to_string();
    for leaf in ["0x00000000", "0x40000003", "0x4000000c", "0x80000000"] {
        assert!(
            text.contains(&format!("\n{leaf} ")),
            "{leaf} missing:\n{text}"
        );
    }
}
