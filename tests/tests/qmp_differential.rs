//! The QMP differential test: the scripts in `qmp-proto/tests/fixtures/scripts/` run on the raw
//! wire against real QEMU — 7.2 on the machine (Debian 12) and 10.0 in the Debian 13 peer root —
//! and against `qmp_proto::fake::FakeMonitor` built as the same release; after normalisation
//! (see `vmsdk_tests::qmp::normalize`) every reply and event must agree.
//!
//! `fake_matches_recorded_transcripts` needs no QEMU: it replays the scripts against the fake
//! and compares with the transcripts recorded from real QEMU under
//! `qmp-proto/tests/fixtures/transcripts/`. Record them again with
//! `VMSDK_QMP_RECORD=1 cargo test -p vmsdk-tests --test qmp_differential qemu_and_fake_agree`.

use serde_json::Value;
use vmsdk_tests::peers::{announce, peer_version, Generation};
use vmsdk_tests::qmp::{
    fake_for, first_difference, normalize, release_of, run_script, scripts, transcript_path,
    QemuPeer,
};

use qmp_proto::fake::QemuRelease;

fn run_fake(name: &str, script: &vmsdk_tests::qmp::Script, release: QemuRelease) -> Value {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fake = fake_for(script, release, dir.path());
    let stream = fake.connect_stream().expect("connect to the fake monitor");
    let transcript = run_script(stream, script, dir.path())
        .unwrap_or_else(|e| panic!("script {name} against the fake {release}: {e}"));
    normalize(&transcript, dir.path())
}

#[test]
fn fake_matches_recorded_transcripts() {
    let mut failures = Vec::new();
    for (name, script) in scripts() {
        for &release in QemuRelease::ALL {
            let path = transcript_path(&name, release);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (record it: VMSDK_QMP_RECORD=1 cargo test -p vmsdk-tests --test \
                     qmp_differential qemu_and_fake_agree)",
                    path.display()
                )
            });
            let recorded: Value = serde_json::from_str(&text).expect("transcript is JSON");
            let fake = run_fake(&name, &script, release);
            if let Some(diff) = first_difference(
                &format!("recorded {release}"),
                &recorded,
                &format!("fake {release}"),
                &fake,
            ) {
                failures.push(format!("script {name}: {diff}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn qemu_and_fake_agree() {
    let record = std::env::var_os("VMSDK_QMP_RECORD").is_some();
    let mut failures = Vec::new();
    for generation in Generation::selected() {
        if !generation.available() {
            continue;
        }
        let release = release_of(generation);
        announce(generation, &["qemu-system-x86_64", "qemu-img"]);
        if let Some(version) = peer_version(generation, "qemu-system-x86_64") {
            let (major, minor, _) = release.version();
            assert!(
                version.contains(&format!("version {major}.{minor}.")),
                "{generation}'s QEMU is not {release}: {version}"
            );
        }
        for (name, script) in scripts() {
            let dir = tempfile::tempdir().expect("temporary directory");
            let Some(qemu) = QemuPeer::start(generation, &script, dir.path()) else {
                continue;
            };
            let real = run_script(qemu.connect(), &script, dir.path())
                .unwrap_or_else(|e| panic!("script {name} against QEMU ({generation}): {e}"));
            drop(qemu);
            let real = normalize(&real, dir.path());
            if record {
                let path = transcript_path(&name, release);
                std::fs::create_dir_all(path.parent().unwrap()).expect("create fixtures dir");
                let mut text = serde_json::to_string_pretty(&real).expect("serialise");
                text.push('\n');
                std::fs::write(&path, text).expect("write transcript");
                eprintln!("recorded {}", path.display());
            }
            let fake = run_fake(&name, &script, release);
            let replies = real["replies"].as_array().map_or(0, Vec::len);
            let events = real["events"].as_array().map_or(0, Vec::len);
            match first_difference(
                &format!("QEMU {release} ({generation})"),
                &real,
                &format!("fake {release}"),
                &fake,
            ) {
                Some(diff) => failures.push(format!("script {name}: {diff}")),
                None => eprintln!(
                    "script {name}: {replies} replies and {events} events agree with {release}"
                ),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
