//! `vmsdk guests` end to end, on fake agents served on real Unix sockets (Proxmox's layout).

#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmsdk::agent::fake::{AgentRelease, FakeAgent, FakeSocket};

/// 101 (qemu-ga 10.0), 102 (7.2) and 103, a socket nobody listens on.
fn host() -> (tempfile::TempDir, Vec<FakeSocket>) {
    let dir = tempfile::tempdir().unwrap();
    let sockets = vec![
        FakeAgent::linux()
            .listen_unix(dir.path().join("101.qga"))
            .unwrap(),
        FakeAgent::linux_release(AgentRelease::Qemu7_2)
            .listen_unix(dir.path().join("102.qga"))
            .unwrap(),
    ];
    drop(UnixListener::bind(dir.path().join("103.qga")).unwrap());
    (dir, sockets)
}

fn vmsdk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(args)
        .output()
        .expect("vmsdk runs")
}

#[test]
fn a_table_of_every_guest_once() {
    let (dir, _sockets) = host();
    let pattern = format!("{}/*.qga", dir.path().display());
    let out = vmsdk(&["guests", "--guests", &pattern, "--deadline", "1s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // A guest is down: the exit status says so.
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |guest: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{guest} ")))
            .unwrap_or_else(|| panic!("no {guest} in {text}"))
            .to_owned()
    };
    assert!(line("101").contains(" up "), "{text}");
    assert!(line("101").contains("10.0.13"), "{text}");
    assert!(line("101").contains("Debian GNU/Linux 12"), "{text}");
    assert!(line("101").contains("0.08"), "{text}");
    assert!(line("101").contains("% of 9.7G"), "{text}");
    assert!(line("102").contains("7.2.22"), "{text}");
    assert!(line("103").contains("down"), "{text}");
    assert!(line("103").contains("Connection refused"), "{text}");
    assert!(text.contains("2 of 3 guests up"), "{text}");
}

#[test]
fn json_and_named_guests() {
    let (dir, _sockets) = host();
    let web = format!("web={}", dir.path().join("101.qga").display());
    let out = vmsdk(&["guests", "--guest", &web, "--label", "host=hv-1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guest = &json["guests"][0];
    assert_eq!(guest["name"], "web");
    assert_eq!(guest["status"], "up");
    assert_eq!(guest["labels"][0], serde_json::json!(["host", "hv-1"]));
    assert_eq!(guest["data"]["version"], "10.0.13");
    assert_eq!(guest["data"]["filesystems"][0]["mountpoint"], "/");
    assert!(json["scrape_seconds"].as_f64().unwrap() < 3.0);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let out = vmsdk(&["guests"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guests"));
    let out = vmsdk(&["guests", "--guest", "a=ftp://x"]);
    assert!(!out.status.success());
    let out = vmsdk(&["guests", "--guest", "a=/x", "--label", "guest=x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`guest`"));
}

#[test]
fn listen_serves_metrics_and_probes() {
    let (dir, _sockets) = host();
    let pattern = format!("{}/*.qga", dir.path().display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(["guests", "--guests", &pattern, "--listen", "127.0.0.1:0"])
        .args(["--deadline", "1s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let addr = banner
        .split_whitespace()
        .nth(1)
        .and_then(|url| url.strip_prefix("http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{banner}"))
        .to_owned();
    let get = |path: &str| {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    let all = get("/metrics");
    assert!(all.contains("vmsdk_guest_up{guest=\"101\"} 1"), "{all}");
    assert!(all.contains("vmsdk_guest_up{guest=\"103\"} 0"), "{all}");
    let one = get("/probe?target=102");
    assert!(one.starts_with("HTTP/1.0 200"), "{one}");
    assert!(one.contains("vmsdk_guest_agent_info{guest=\"102\",version=\"7.2.22\"} 1"));
    assert!(!one.contains("guest=\"101\""));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn with_qmp_reads_the_monitor_beside_each_socket() {
    use qmp_proto::fake::FakeMonitor;

    let (dir, _sockets) = host();
    let qemu = FakeMonitor::builder().balloon("balloon0", 1 << 30).build();
    let _qmp = qemu.listen_unix(dir.path().join("101.qmp")).unwrap();
    let pattern = format!("{}/*.qga", dir.path().display());
    let out = vmsdk(&["guests", "--guests", &pattern, "--with-qmp", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guests = json["guests"].as_array().unwrap();
    let vm = guests.iter().find(|g| g["name"] == "101").unwrap();
    assert_eq!(vm["host"]["balloon_bytes"], 1u64 << 30, "{vm}");
    let other = guests.iter().find(|g| g["name"] == "102").unwrap();
    assert!(other.get("host").is_none(), "{other}");
    let out = vmsdk(&["guests", "--guest", "a=/x.qga", "--qmp", "b=/x.qmp"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest is named b"));
}
