//! The peer-generation harness itself: programs of each generation run, see the test's own
//! directory at the same path, create sockets the test reaches, run as nobody when asked, and
//! leave no mount behind in the machine's namespace, also when many run at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vmsdk_tests::disk::nbd_tool;
use vmsdk_tests::peers::{announce, for_each_generation, peer_version, trixie_root, Generation};

/// Mount points of this (the machine's) namespace under the peer root.
fn mounts_under_root() -> Vec<String> {
    let root = trixie_root();
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    let prefix = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

#[test]
fn each_generation_reports_its_versions() {
    let ran = for_each_generation(
        &["qemu-ga", "qemu-nbd", "nbdkit", "nbdinfo"],
        |generation| {
            let qemu_nbd = peer_version(generation, "qemu-nbd").expect("qemu-nbd version");
            let nbdkit = peer_version(generation, "nbdkit").expect("nbdkit version");
            assert!(qemu_nbd.starts_with("qemu-nbd "), "{qemu_nbd}");
            assert!(nbdkit.starts_with("nbdkit 1."), "{nbdkit}");
            if generation == Generation::Trixie {
                // The generations differ: Debian 13 has qemu 10 and nbdkit 1.42.
                assert!(qemu_nbd.starts_with("qemu-nbd 10."), "{qemu_nbd}");
                assert!(nbdkit.starts_with("nbdkit 1.42"), "{nbdkit}");
                let nbdcopy = peer_version(generation, "nbdcopy-1.24").expect("nbdcopy 1.24");
                assert!(nbdcopy.starts_with("nbdcopy 1.24."), "{nbdcopy}");
                announce(
                    generation,
                    &["nbdcopy", "nbdcopy-1.24", "systemd-detect-virt"],
                );
            }
        },
    );
    eprintln!("generations run: {ran:?}");
}

#[test]
fn the_test_directory_is_shared_and_nothing_stays_mounted() {
    for_each_generation(&["nbdkit"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("from-host"), b"hello").unwrap();
        let sh = generation.command("sh", "dash").unwrap();
        let script = "cat \"$1/from-host\" && echo peer > \"$1/from-peer\" && id -u";
        let out = sh.arg("-c").arg(script).arg("sh").arg(dir.path()).output();
        vmsdk_tests::assert_success(&out, "sh in the peer root");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello0\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("from-peer")).unwrap(),
            "peer\n"
        );
        // As nobody, the same directory (made world-writable for the check).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = generation
            .command("sh", "dash")
            .unwrap()
            .as_nobody()
            .args(["-c", "id -u; id -G; touch \"$1/nobody\"", "sh"])
            .arg(dir.path())
            .output();
        assert!(out.status.success(), "{out:?}");
        if vmsdk_tests::running_as_root() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n65534\n");
            let owner = std::os::unix::fs::MetadataExt::uid(
                &std::fs::metadata(dir.path().join("nobody")).unwrap(),
            );
            assert_eq!(owner, 65534);
        }
        if generation == Generation::Trixie {
            // The peer saw the root's own files, not the machine's.
            let out = generation
                .command("cat", "coreutils")
                .unwrap()
                .arg("/etc/debian_version")
                .output();
            let version = String::from_utf8_lossy(&out.stdout);
            assert!(version.starts_with("13."), "{version}");
            assert!(mounts_under_root().is_empty(), "{:?}", mounts_under_root());
        }
    });
}

#[test]
fn a_server_socket_in_the_test_directory_is_reachable_and_killed_by_pid() {
    for_each_generation(&["nbdkit"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let nbdkit = generation.command("nbdkit", "nbdkit").unwrap();
        let mut child = nbdkit
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(["data", "data=\"hello\"", "size=512"])
            .spawn(Stdio::null(), Stdio::inherit());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no socket within 10 s");
            assert!(child.try_wait().unwrap().is_none(), "nbdkit exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The NBD greeting arrives through the bind-mounted directory. The socket's file
        // appears at bind(), a moment before nbdkit listens: until then a connect is refused.
        let mut stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    assert!(
                        Instant::now() < deadline,
                        "nbdkit did not listen within 10 s"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect to {}: {e}", socket.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut greeting = [0u8; 8];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"NBDMAGIC");
        let _ = stream.write_all(&[0; 4]);
        // The child's PID is the server's own (unshare, sh and chroot exec it).
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
        assert_eq!(comm.trim(), "nbdkit");
        child.kill().unwrap();
        child.wait().unwrap();
        if generation == Generation::Trixie {
            assert!(mounts_under_root().is_empty());
        }
    });
}

#[test]
fn many_concurrent_runs_share_nothing_and_leave_nothing() {
    if !Generation::selected().contains(&Generation::Trixie) || !Generation::Trixie.available() {
        return;
    }
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("n");
                let out = Generation::Trixie
                    .command("sh", "dash")
                    .unwrap()
                    .args([
                        "-c",
                        "echo $2 > \"$1\"; cat /proc/self/mountinfo | wc -l",
                        "sh",
                    ])
                    .arg(&file)
                    .arg(i.to_string())
                    .output();
                assert!(out.status.success(), "{out:?}");
                assert_eq!(
                    std::fs::read_to_string(&file).unwrap().trim(),
                    i.to_string()
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(mounts_under_root().is_empty(), "{:?}", mounts_under_root());
}

#[test]
fn nbdcopy_1_24_computes_the_known_blkhash() {
    if !Generation::selected().contains(&Generation::Trixie) {
        return;
    }
    let Some(nbdcopy) = nbd_tool(Generation::Trixie, "nbdcopy-1.24") else {
        return;
    };
    announce(Generation::Trixie, &["nbdcopy-1.24", "nbdkit"]);
    // nbdcopy runs nbdkit itself ([ CMD ]), both in the root; sha256 blkhash of "hello".
    let out = nbdcopy
        .args([
            "--blkhash",
            "[",
            "nbdkit",
            "data",
            "\"hello\"",
            "]",
            "null:",
        ])
        .output();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("337355fe"), "{text}");
}

/// Sends one command to an agent over a byte stream and returns the reply line.
fn agent_round_trip(stream: &mut (impl Read + Write), command: &str) -> String {
    stream.write_all(command.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        stream.read_exact(&mut byte).unwrap();
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}

#[test]
fn qemu_ga_of_each_generation_starts_blocked_and_unprivileged() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(agent) = vmsdk_tests::qga::QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("agent: {}", agent.version());
        let mut stream = UnixStream::connect(agent.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let info = agent_round_trip(&mut stream, "{\"execute\":\"guest-info\"}\n");
        let expected = match generation {
            Generation::Host => "\"version\": \"7.2.",
            Generation::Trixie => "\"version\": \"10.0.",
        };
        assert!(info.contains(expected), "{info}");
        // Every state-changing RPC is disabled.
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let commands = info["return"]["supported_commands"].as_array().unwrap();
        for blocked in vmsdk_tests::qga::BLOCKED_RPCS {
            if let Some(c) = commands.iter().find(|c| c["name"] == *blocked) {
                assert_eq!(c["enabled"], false, "{blocked} must be blocked");
            }
        }
        let pid = agent.pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if vmsdk_tests::running_as_root() {
            assert!(
                status
                    .lines()
                    .any(|l| l.starts_with("Uid:") && l.contains("65534")),
                "{status}"
            );
        }
    });
}

#[test]
fn qemu_ga_of_each_generation_answers_on_a_serial_line() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(agent) = vmsdk_tests::qga::QemuGa::start_serial_in(generation) else {
            return;
        };
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(agent.serial_path())
            .unwrap();
        // A pty has no read timeout: the exchange runs in a thread, bounded here.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(agent_round_trip(&mut tty, "{\"execute\":\"guest-ping\"}\n"));
        });
        let reply = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("qemu-ga answered guest-ping on the serial line within 10 s");
        assert_eq!(reply.trim(), "{\"return\": {}}");
    });
}
