//! `vmsdk detect` on this very machine gives the words and exit codes of `systemd-detect-virt`,
//! for each generation: systemd 252 on the machine (Debian 12) and systemd 257 in the Debian 13
//! root.
//!
//! Like with like: Debian 13's `systemd-detect-virt` runs chrooted into the root (a private mount
//! namespace with `/proc`, `/sys`, `/dev` bind-mounted and fresh tmpfs on `/run` and `/tmp`, see
//! `vmsdk_tests::peers`). Its container view differs from the machine's: the machine's
//! `/.dockerenv` (this machine is a Docker-style sandbox) is not in the root and `/run` is empty,
//! so systemd 257 answers `none` for the container there while systemd 252 on the machine
//! answers `docker`. CPUID, `/sys` (DMI), `/proc` and `/dev/cpu/0/msr` are the machine's in both.
//! So `vmsdk detect` runs in the very same chroot (a copy of the binary bound into it, started
//! through the root's `env`) and is compared with the systemd of the same generation.
//!
//! The machine's `/.dockerenv` is deliberately not bound into the root: a file bind needs a
//! mount point, and one at the root's top level would stay behind in the shared root (only
//! `/tmp` and `/run` there are private tmpfs), turning every later run in it into `docker`.
//!
//! systemd 252 has no `--cvm` / `--list-cvm` (added in 254): those are compared where the
//! generation's systemd has them (257), and checked to be rejected where it does not.

use std::path::{Path, PathBuf};

use vmsdk_tests::peers::{announce, Generation, PeerCommand};
use vmsdk_tests::vmsdk_binary;

/// Words `vmsdk detect --list-cvm` knows that systemd gained after 257 (`cca`, arm64).
const CVM_WORDS_AFTER_257: &[&str] = &["cca"];

/// What one run printed and how it exited.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    stdout: String,
    code: i32,
}

fn answer(command: PeerCommand) -> (Answer, String) {
    let out = command.output();
    (
        Answer {
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            code: out.status.code().expect("exited normally, not by a signal"),
        },
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The two detectors of one generation, run the same way.
struct Pair {
    generation: Generation,
    systemd: PeerCommand,
    /// `env <copy of vmsdk> detect`, in the generation's file system.
    vmsdk: PeerCommand,
}

impl Pair {
    /// Both detectors of `generation`.
    fn new(generation: Generation, vmsdk_copy: &Path) -> Option<Pair> {
        let systemd = generation.command("systemd-detect-virt", "systemd")?;
        // The root's own `env` starts our binary inside the chroot; the argument's directory is
        // bound into the root at the same path.
        let vmsdk = generation
            .command("env", "coreutils")?
            .arg(vmsdk_copy)
            .arg("detect");
        Some(Pair {
            generation,
            systemd,
            vmsdk,
        })
    }

    fn systemd(&self, args: &[&str]) -> (Answer, String) {
        answer(self.systemd.clone().args(args))
    }

    fn vmsdk(&self, args: &[&str]) -> Answer {
        let (ours, stderr) = answer(self.vmsdk.clone().args(args));
        assert!(
            stderr.is_empty(),
            "vmsdk detect {args:?} ({}) wrote to stderr: {stderr}",
            self.generation
        );
        ours
    }

    /// Compares one invocation, and its `--quiet` form (same exit code, nothing printed).
    fn compare(&self, args: &[&str]) {
        let (theirs, stderr) = self.systemd(args);
        let ours = self.vmsdk(args);
        assert_eq!(
            ours, theirs,
            "vmsdk detect {args:?} vs systemd-detect-virt ({}; its stderr: {stderr})",
            self.generation
        );
        eprintln!(
            "  {:<12} {:<24} exit {}  (same)",
            if args.is_empty() {
                "(plain)".to_owned()
            } else {
                args.join(" ")
            },
            theirs.stdout.replace('\n', " "),
            theirs.code
        );
        // `-q` first: systemd stops parsing options at --cvm, so `--cvm -q` still prints.
        let quiet: Vec<&str> = std::iter::once("--quiet")
            .chain(args.iter().copied())
            .collect();
        let (theirs_quiet, _) = self.systemd(&quiet);
        let ours_quiet = self.vmsdk(&quiet);
        assert_eq!(
            theirs_quiet,
            Answer {
                stdout: String::new(),
                code: theirs.code
            },
            "systemd-detect-virt {quiet:?} ({})",
            self.generation
        );
        assert_eq!(ours_quiet, theirs_quiet, "vmsdk detect {quiet:?}");
    }

    /// Whether this generation's systemd knows `--list-cvm` (254 and later).
    fn systemd_has_cvm(&self) -> bool {
        let (theirs, stderr) = self.systemd(&["--list-cvm"]);
        if theirs.code == 0 {
            return true;
        }
        assert!(
            stderr.contains("unrecognized option"),
            "systemd-detect-virt --list-cvm failed for another reason ({}): {stderr}",
            self.generation
        );
        let (theirs, stderr) = self.systemd(&["--cvm"]);
        assert_ne!(theirs.code, 0, "--cvm accepted where --list-cvm is not");
        assert!(stderr.contains("unrecognized option"), "{stderr}");
        false
    }
}

/// A copy of this build's `vmsdk` in a directory of its own, so the chroot sees only it.
fn vmsdk_copy(dir: &tempfile::TempDir) -> Option<PathBuf> {
    let built = vmsdk_binary()?;
    let copy = dir.path().join("vmsdk");
    std::fs::copy(&built, &copy).expect("copy the vmsdk binary");
    Some(copy)
}

#[test]
fn vmsdk_detect_agrees_with_systemd_detect_virt_of_each_generation() {
    let dir = tempfile::tempdir().unwrap();
    let Some(copy) = vmsdk_copy(&dir) else {
        return;
    };
    let mut ran = Vec::new();
    let mut cvm_compared = Vec::new();
    for generation in Generation::selected() {
        let Some(pair) = Pair::new(generation, &copy) else {
            continue;
        };
        eprintln!("=== generation {generation}");
        announce(generation, &["systemd-detect-virt"]);
        ran.push(generation);
        for args in [&[][..], &["--vm"], &["--container"]] {
            pair.compare(args);
        }
        // Both generations list `none` first, then the same VM and container words.
        let (theirs, _) = pair.systemd(&["--list"]);
        assert_eq!(pair.vmsdk(&["--list"]), theirs, "--list ({generation})");
        assert_eq!(theirs.stdout.lines().next(), Some("none"));
        eprintln!(
            "  --list       {} words  (same)",
            theirs.stdout.lines().count()
        );

        if !pair.systemd_has_cvm() {
            eprintln!("  --cvm, --list-cvm: this systemd has neither (added in 254); not compared");
            continue;
        }
        pair.compare(&["--cvm"]);
        let (theirs, _) = pair.systemd(&["--list-cvm"]);
        let ours = pair.vmsdk(&["--list-cvm"]);
        assert_eq!(ours.code, theirs.code);
        let their_words: Vec<&str> = theirs.stdout.lines().collect();
        let our_words: Vec<&str> = ours.stdout.lines().collect();
        // systemd's list is ours in the same order, less the words it gained later.
        let expected: Vec<&str> = our_words
            .iter()
            .copied()
            .filter(|w| their_words.contains(w) || !CVM_WORDS_AFTER_257.contains(w))
            .collect();
        assert_eq!(
            their_words, expected,
            "--list-cvm ({generation}): ours {our_words:?}"
        );
        let extra: Vec<&str> = our_words
            .iter()
            .copied()
            .filter(|w| !their_words.contains(w))
            .collect();
        eprintln!(
            "  --list-cvm   {} words  (same; vmsdk adds {extra:?}, which systemd gained after 257)",
            their_words.len()
        );
        cvm_compared.push(generation);
    }
    // Debian 13's systemd 257 has --cvm: when its generation ran, the CVM side was compared.
    if ran.contains(&Generation::Trixie) {
        assert!(
            cvm_compared.contains(&Generation::Trixie),
            "the CVM comparison did not run against systemd 257"
        );
    }
}

#[test]
fn json_output_carries_the_answer_and_its_evidence() {
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let out = std::process::Command::new(vmsdk)
        .args(["detect", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let detection = vmsdk::detect();
    assert_eq!(json["virtualization"], detection.virtualization());
    assert_eq!(json["vm"], serde_json::to_value(detection.vm).unwrap());
    assert_eq!(json["cvm"], serde_json::to_value(detection.cvm).unwrap());
    let evidence = json["vm_evidence"].as_array().unwrap();
    if detection.vm.is_some() {
        assert!(evidence.iter().any(|e| e["decisive"] == true));
    }
    // On an x86 machine the CVM probe always records at least the hypervisor bit it read.
    let cvm_evidence = json["cvm_evidence"].as_array().unwrap();
    assert!(!cvm_evidence.is_empty());
    if cfg!(target_arch = "x86_64") {
        assert_eq!(cvm_evidence[0]["source"], "cpuid:0x00000001");
    }
}

#[test]
fn cvm_json_on_this_machine_explains_its_answer() {
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let out = std::process::Command::new(vmsdk)
        .args(["detect", "--cvm", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (cvm, evidence) = vmsdk::Detector::new().detect_cvm();
    assert_eq!(json["cvm"], serde_json::to_value(cvm).unwrap());
    assert_eq!(json["evidence"], serde_json::to_value(&evidence).unwrap());
    assert_eq!(out.status.code(), Some(if cvm.is_some() { 0 } else { 1 }));
    eprintln!(
        "this machine: cvm {}; evidence:",
        cvm.map_or("none".to_owned(), |c| c.to_string())
    );
    for e in &evidence {
        eprintln!("  {}: {}", e.source, e.observed);
    }
}
