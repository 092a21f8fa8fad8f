//! The `vmsdk` binary end to end on the fake backend: formats, --watch and the HTTP exporter.

#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn vmsdk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(args)
        .env_remove("VMSDK_BACKEND")
        .output()
        .expect("vmsdk runs")
}

/// Runs `vmsdk` and insists that it succeeded, showing its stderr otherwise.
fn vmsdk_ok(args: &[&str]) -> std::process::Output {
    let out = vmsdk(args);
    assert!(
        out.status.success(),
        "vmsdk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn parse_exposition(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid exposition format")
}

#[test]
fn fake_stats_as_json_have_every_statistic_key() {
    let out = vmsdk_ok(&["--backend", "fake", "stats", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["backend"], "fake");
    for stat in guest_stats::Stat::ALL {
        assert!(
            json.get(stat.name()).is_some(),
            "no key for {}",
            stat.name()
        );
    }
    assert!(json["cpu_stolen_ms"].as_u64().is_some());
}

#[test]
fn fake_stats_table_leads_with_what_the_backend_gives_and_counts_the_rest() {
    let out = vmsdk_ok(&["--backend", "fake", "stats"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let json = vmsdk_ok(&["--backend", "fake", "stats", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let missing: Vec<&str> = guest_stats::Stat::ALL
        .iter()
        .map(|stat| stat.name())
        .filter(|name| json[name].is_null())
        .collect();
    assert!(
        !missing.is_empty(),
        "the example fake lacks some host figures"
    );
    let lines: Vec<&str> = text.lines().collect();
    // Header, one row per available statistic, then the one line about the rest.
    assert_eq!(
        lines.len(),
        2 + guest_stats::Stat::ALL.len() - missing.len() + 1,
        "{text}"
    );
    assert!(!text.contains("n/a"), "{text}");
    for name in &missing {
        assert!(
            !lines
                .iter()
                .any(|l| l.split_whitespace().next() == Some(*name)),
            "{name} listed: {text}"
        );
    }
    assert_eq!(
        lines.last().copied(),
        Some(
            format!(
                "{} statistics are not given by the fake backend; --all lists them",
                missing.len()
            )
            .as_str()
        )
    );
}

#[test]
fn fake_stats_table_with_all_names_every_statistic_with_its_unit() {
    let out = vmsdk_ok(&["--backend", "fake", "stats", "--all"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for stat in guest_stats::Stat::ALL {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(stat.name()))
            .unwrap_or_else(|| panic!("no row for {}", stat.name()));
        assert!(line.contains(&stat.unit().to_string()));
    }
}

#[test]
fn prometheus_output_parses_and_uses_base_units() {
    let out = vmsdk_ok(&["--backend", "fake", "stats", "--format", "prometheus"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let scrape = parse_exposition(&text);
    let json = vmsdk(&["--backend", "fake", "stats", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let stolen = scrape
        .samples
        .iter()
        .find(|s| s.metric == "vmsdk_cpu_stolen_seconds_total")
        .expect("stolen time exported");
    let prometheus_parse::Value::Counter(seconds) = stolen.value else {
        panic!("stolen time is a counter, got {:?}", stolen.value);
    };
    // Both runs start the fake from its first sample, so the values agree.
    assert_eq!(
        seconds,
        json["cpu_stolen_ms"].as_u64().unwrap() as f64 / 1000.0
    );
    assert!(text.contains("# HELP vmsdk_mem_ballooned_bytes "));
    assert_eq!(stolen.labels.get("backend"), Some("fake"));
}

#[test]
fn auto_backend_without_a_real_one_says_so_and_fails() {
    // On a machine whose real backend is missing from the build the message must say what to
    // do; on a machine with one, it must not pretend to be the fake.
    let out = vmsdk(&["stats", "--format", "json"]);
    if out.status.success() {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_ne!(json["backend"], "fake");
    } else {
        let message = String::from_utf8(out.stderr).unwrap();
        assert!(message.starts_with("vmsdk: "), "{message}");
    }
}

#[test]
fn watch_prints_the_requested_number_of_intervals_as_json_lines() {
    let out = vmsdk_ok(&[
        "--backend",
        "fake",
        "stats",
        "--watch",
        "10ms",
        "--count",
        "3",
        "--format",
        "json",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert!(line["cpu_used_percent"].as_f64().unwrap() > 0.0);
        assert_eq!(line["session_changed"], false);
    }
}

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    http_request(addr, "GET", path, "*/*")
}

fn http_request(addr: &str, method: &str, path: &str, accept: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[test]
fn listen_serves_metrics_over_http() {
    let child = Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(["--backend", "fake", "stats", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut exporter = Exporter(child);
    let mut first_line = String::new();
    BufReader::new(exporter.0.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let addr = first_line
        .trim()
        .strip_prefix("serving http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected banner {first_line:?}"))
        .to_owned();

    let (head, body) = http_get(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let first = parse_exposition(&body);
    assert!(first.samples.len() > 20);

    // Each scrape takes a fresh update: the fake's counters move between scrapes.
    let (_, body) = http_get(&addr, "/metrics");
    let second = parse_exposition(&body);
    let used = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .find(|m| m.metric == "vmsdk_cpu_used_seconds_total")
            .map(|m| format!("{:?}", m.value))
    };
    assert_ne!(used(&first), used(&second));

    let (head, _) = http_get(&addr, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // What Prometheus 2 asks for first: OpenMetrics, with its exact content type.
    let (head, body) = http_request(
        &addr,
        "GET",
        "/metrics",
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
         version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("# UNIT vmsdk_cpu_stolen_seconds seconds"));

    let (head, _) = http_request(&addr, "POST", "/metrics", "*/*");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
}

#[test]
fn listen_puts_the_given_labels_on_every_metric() {
    let child = Command::new(env!("CARGO_BIN_EXE_vmsdk"))
        .args(["--backend", "fake", "stats", "--listen", "127.0.0.1:0"])
        .args(["--label", "vm=db-1", "--label", "site=lab"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut exporter = Exporter(child);
    let mut first_line = String::new();
    BufReader::new(exporter.0.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let addr = first_line
        .trim()
        .strip_prefix("serving http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected banner {first_line:?}"))
        .to_owned();
    let (_, body) = http_get(&addr, "/metrics");
    let scrape = parse_exposition(&body);
    assert!(!scrape.samples.is_empty());
    for sample in &scrape.samples {
        assert_eq!(sample.labels.get("vm"), Some("db-1"), "{}", sample.metric);
        assert_eq!(sample.labels.get("site"), Some("lab"), "{}", sample.metric);
    }

    // A label vmsdk sets itself is refused with a clear message.
    let out = vmsdk(&[
        "--backend",
        "fake",
        "stats",
        "--listen",
        "127.0.0.1:0",
        "--label",
        "backend=x",
    ]);
    assert!(!out.status.success());
    let message = String::from_utf8(out.stderr).unwrap();
    assert!(
        message.contains("invalid Prometheus name `backend`: vmsdk sets this label itself"),
        "{message}"
    );
}

#[test]
fn the_monitor_example_runs_on_the_fakes() {
    // Examples are built by `cargo test`; the binary sits next to the test executables.
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().unwrap().parent().unwrap().join("examples");
    let monitor = examples.join("monitor");
    assert!(monitor.is_file(), "{} not built", monitor.display());
    // Example names share one directory across the workspace: make sure this is ours.
    assert!(
        std::fs::read(&monitor)
            .unwrap()
            .windows(b"statistics from the".len())
            .any(|w| w == b"statistics from the"),
        "{} is not facade's monitor example",
        monitor.display()
    );
    let out = Command::new(monitor)
        .args(["0.01", "3"])
        .env("VMSDK_BACKEND", "fake")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].ends_with("statistics from the fake backend"));
    for line in &lines[1..] {
        assert!(line.starts_with("cpu used "), "{line}");
        assert!(line.contains("memory used "), "{line}");
    }
}

#[test]
fn fake_disk_info_and_map_describe_the_demo_disk() {
    let out = vmsdk_ok(&["--backend", "fake", "disk", "info", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["capacity"], 1u64 << 30);
    let out = vmsdk(&["--backend", "fake", "disk", "map", "--json"]);
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let covered: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(covered, 1 << 30);
    assert!(extents.iter().any(|e| e["description"] == "data"));
    assert!(extents.iter().any(|e| e["description"] == "hole,zero"));
}

#[test]
fn disk_without_uri_on_the_real_backend_says_what_to_name() {
    let out = vmsdk(&["disk", "info"]);
    assert!(!out.status.success());
    let message = String::from_utf8(out.stderr).unwrap();
    assert!(message.contains("name a disk URI"), "{message}");
}

#[test]
fn disk_copy_of_a_sparse_file_creates_an_identical_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let file = std::fs::File::create(&src).unwrap();
    // 64 MiB, data at 5 MiB and an unaligned tail.
    file.set_len((64 << 20) + 777).unwrap();
    let data: Vec<u8> = (0..(1 << 20) + 4321).map(|i| (i * 7 % 251) as u8).collect();
    std::os::unix::fs::FileExt::write_at(&file, &data, 5 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, b"tail", (64 << 20) + 773).unwrap();
    drop(file);
    vmsdk_ok(&[
        "disk",
        "copy",
        "--no-progress",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    let map = vmsdk(&["disk", "map", "--json", dst.to_str().unwrap()]);
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    assert!(
        extents.iter().any(|e| e["description"] == "hole,zero"),
        "the copy kept the holes: {extents:?}"
    );
}

#[test]
fn disk_copy_to_null_reads_the_data_and_skips_the_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let file = std::fs::File::create(&src).unwrap();
    file.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, &[0x5a; 1 << 20], 4 << 20).unwrap();
    drop(file);
    let out = vmsdk_ok(&[
        "disk",
        "copy",
        "--no-progress",
        src.to_str().unwrap(),
        "null:",
    ]);
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(
        summary.contains(&format!("copied {} bytes", 16 << 20))
            && summary.contains(&format!("{} written", 1 << 20))
            && summary.contains(&format!("{} skipped", 15 << 20)),
        "{summary}"
    );
    // `null:` is a destination only.
    let out = vmsdk(&["disk", "info", "null:"]);
    assert!(!out.status.success());
}

#[test]
fn fake_agent_answers_typed_and_raw_commands_through_the_real_client() {
    let out = vmsdk_ok(&["--backend", "fake", "agent", "info"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let commands = info["supported_commands"].as_array().unwrap();
    assert!(commands.iter().any(|c| c["name"] == "guest-get-osinfo"));

    let out = vmsdk(&[
        "--backend",
        "fake",
        "agent",
        "raw",
        r#"{"execute":"guest-get-host-name"}"#,
    ]);
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reply["host-name"].as_str().is_some_and(|h| !h.is_empty()));

    // A command the agent lacks is refused with a message naming it.
    let out = vmsdk(&[
        "--backend",
        "fake",
        "agent",
        "raw",
        r#"{"execute":"guest-no-such-command"}"#,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest-no-such-command"));
}

#[test]
fn agent_without_an_address_on_the_real_backend_says_how_to_name_one() {
    let out = vmsdk(&["agent", "info"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("qga+unix://"));
}

#[test]
fn fake_agent_exec_and_cat_print_guest_output() {
    let out = vmsdk_ok(&[
        "--backend",
        "fake",
        "agent",
        "exec",
        "/bin/echo",
        "hello",
        "guest",
    ]);
    assert_eq!(out.stdout, b"hello guest\n");
    let out = vmsdk_ok(&["--backend", "fake", "agent", "cat", "/etc/hostname"]);
    assert_eq!(out.stdout, b"fake-guest\n");
    let out = vmsdk(&["--backend", "fake", "agent", "cat", "/no/such/file"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file"));
}
