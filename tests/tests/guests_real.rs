//! Host-side guest monitoring against real agents: qemu-ga 7.2 (Debian 12, on the machine)
//! and 10.0 (Debian 13 peer root), each unprivileged with every state-changing RPC blocked,
//! beside a hung guest (a socket that accepts and never answers) and a dead one (no
//! listener); and a real Prometheus scraping `vmsdk guests --listen` through `/probe`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmsdk::agent::fake::{AgentRelease, FakeAgent};
use vmsdk::agent::monitor::{Guest, GuestMonitor, PollStatus};
use vmsdk::prometheus::prometheus_client::registry::Registry;
use vmsdk::prometheus::{Format, GuestCollector};
use vmsdk_tests::http::{api, encode, free_port, wait_for, Reaped};
use vmsdk_tests::peers::{for_each_generation, Generation};
use vmsdk_tests::qga::QemuGa;
use vmsdk_tests::{require_program, vmsdk_binary};

/// A socket that accepts every client and never answers.
fn hung_guest(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
}

/// A socket file nobody listens on.
fn dead_guest(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
}

/// Every selected generation's agent, started; their names are `qga-<generation>`.
fn start_agents() -> Vec<(String, QemuGa)> {
    let mut agents = Vec::new();
    for_each_generation(&["qemu-ga"], |generation| {
        if let Some(agent) = QemuGa::start_in(generation) {
            eprintln!("running against {}", agent.version());
            agents.push((format!("qga-{}", generation.name()), agent));
        }
    });
    agents
}

fn release_of(version: &str) -> AgentRelease {
    if version.starts_with("7.2") {
        AgentRelease::Qemu7_2
    } else if version.starts_with("10.0") {
        AgentRelease::Qemu10_0
    } else {
        panic!("no fake release for qemu-ga {version}")
    }
}

/// The metric family names of `guest` in a text exposition.
fn families(text: &str, guest: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&format!("guest=\"{guest}\"")))
        .map(|l| l.split('{').next().unwrap().to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_monitor_reads_real_agents_beside_hung_and_dead_guests() {
    let agents = start_agents();
    if agents.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    hung_guest(&dir.path().join("hung.qga"));
    dead_guest(&dir.path().join("dead.qga"));
    let mut builder = GuestMonitor::builder().guest_deadline(Duration::from_secs(2));
    for (name, agent) in &agents {
        builder = builder.guest(Guest::new(name, &agent.socket().display().to_string()).unwrap());
    }
    // The fakes of the same releases, for a differential check of what gets exported.
    let mut fakes = Vec::new();
    let monitor_of_real = builder
        .guest(Guest::new("hung", &dir.path().join("hung.qga").display().to_string()).unwrap())
        .guest(Guest::new("dead", &dir.path().join("dead.qga").display().to_string()).unwrap())
        .build()
        .unwrap();

    let started = Instant::now();
    let reports = monitor_of_real.scrape_blocking();
    let took = started.elapsed();
    eprintln!("scrape of {} guests took {took:?}", reports.len());
    assert!(took < Duration::from_secs(4), "{took:?}");
    for report in &reports {
        eprintln!(
            "{}: {:?} in {:.3} s {}",
            report.name,
            report.status,
            report.duration_seconds,
            report.error.as_deref().unwrap_or("")
        );
    }
    let by_name = |name: &str| reports.iter().find(|r| r.name == name).unwrap();
    assert_eq!(by_name("hung").status, PollStatus::Down);
    assert!(by_name("hung")
        .error
        .as_deref()
        .unwrap()
        .contains("guest-sync"));
    assert_eq!(by_name("dead").status, PollStatus::Down);

    let text = {
        let mut registry = Registry::default();
        GuestCollector::new(monitor_of_real.clone()).register(&mut registry);
        Format::Text.encode(&registry).unwrap()
    };
    for (name, agent) in &agents {
        let report = by_name(name);
        assert!(report.is_up(), "{report:?}");
        let data = report.data.as_ref().unwrap();
        assert!(
            agent.version().ends_with(&data.version),
            "{} vs {}",
            agent.version(),
            data.version
        );
        let release = release_of(&data.version);
        // Machine-dependent commands either answered or are named as failures, never silent.
        for (command, present) in [
            ("guest-get-fsinfo", data.filesystems.is_some()),
            ("guest-get-cpustats", data.cpus.is_some()),
            ("guest-get-diskstats", data.disks.is_some()),
        ] {
            assert!(
                present || data.failures.iter().any(|(c, _)| c == command),
                "{name}: {command} neither answered nor failed: {data:?}"
            );
        }
        for fs in data.filesystems.iter().flatten() {
            if let (Some(total), Some(used)) = (fs.total_bytes, fs.used_bytes) {
                assert!(used <= total, "{fs:?}");
                if let Some(privileged) = fs.total_bytes_privileged {
                    assert!(privileged >= total, "{fs:?}");
                }
            }
        }
        assert!(data.interfaces.iter().flatten().any(|i| i.name == "lo"));
        let exported = families(&text, name);
        eprintln!("{name} exports {exported:?}");
        assert!(exported.contains(&"vmsdk_guest_agent_info".to_owned()));
        assert!(exported.contains(&"vmsdk_guest_os_info".to_owned()));
        // Load: only 10.0 has guest-get-load; on 7.2 it is left out, not zero, and not a failure.
        let has_load = exported.contains(&"vmsdk_guest_load1".to_owned());
        assert_eq!(has_load, release == AgentRelease::Qemu10_0, "{exported:?}");
        assert!(!data.failures.iter().any(|(c, _)| c == "guest-get-load"));
        if data
            .filesystems
            .iter()
            .flatten()
            .any(|f| f.total_bytes.is_some())
        {
            assert_eq!(
                exported.contains(&"vmsdk_guest_filesystem_free_bytes".to_owned()),
                release == AgentRelease::Qemu10_0,
                "total-bytes-privileged came with 9.1: {exported:?}"
            );
        }

        // The fake of the same release exports the same families where the machine's data
        // does not decide (agent, OS, load, CPU, network).
        let fake = FakeAgent::linux_release(release)
            .listen_unix(dir.path().join(format!("fake-{name}.qga")))
            .unwrap();
        let fake_monitor = GuestMonitor::builder()
            .guest(Guest::new(name, &fake.path().display().to_string()).unwrap())
            .build()
            .unwrap();
        let mut registry = Registry::default();
        GuestCollector::new(fake_monitor).register(&mut registry);
        let fake_text = Format::Text.encode(&registry).unwrap();
        let fake_exported = families(&fake_text, name);
        for family in [
            "vmsdk_guest_up",
            "vmsdk_guest_agent_info",
            "vmsdk_guest_os_info",
            "vmsdk_guest_load1",
            "vmsdk_guest_network_receive_bytes_total",
        ] {
            assert_eq!(
                exported.contains(&family.to_owned()),
                fake_exported.contains(&family.to_owned()),
                "{family}: real {exported:?}, fake {fake_exported:?}"
            );
        }
        if data.cpus.is_some() {
            assert!(fake_exported.contains(&"vmsdk_guest_cpu_seconds_total".to_owned()));
            assert!(exported.contains(&"vmsdk_guest_cpu_seconds_total".to_owned()));
        }
        fakes.push(fake);
    }
}

#[test]
fn a_poll_leaves_the_real_agent_free_for_the_next_client() {
    for_each_generation(&["qemu-ga"], |generation: Generation| {
        let Some(agent) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", agent.version());
        let monitor = GuestMonitor::builder()
            .guest(Guest::new("vm", &agent.socket().display().to_string()).unwrap())
            .guest_deadline(Duration::from_secs(2))
            .build()
            .unwrap();
        // Polls in a row, each on a fresh connection closed at once: the agent (which, like
        // QEMU's chardev, serves one client at a time) answers every one.
        for _ in 0..5 {
            let report = &monitor.scrape_blocking()[0];
            assert!(report.is_up(), "{report:?}");
        }
        let mut client = vmsdk::qga_proto::Client::connect_unix(
            agent.socket(),
            vmsdk::agent::ClientConfig::monitoring(Duration::from_secs(2)),
        )
        .expect("another client connects after the polls");
        client
            .call::<vmsdk::qga_proto::cmd::GuestPing>(&())
            .expect("and is served");
    });
}

#[test]
fn prometheus_probes_every_guest_and_queries_a_filesystem_ratio() {
    let Some(prometheus) = require_program("prometheus", "prometheus") else {
        return;
    };
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let version = Command::new(&prometheus).arg("--version").output().unwrap();
    println!(
        "peer: {}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("prometheus")
    );
    let agents = start_agents();
    let dir = tempfile::tempdir().unwrap();
    // A fake 10.0 guest too, so that the ratio is there whatever this machine's mounts give
    // the real agents; and a hung one, which must not fail the scrape of the others.
    let fake = FakeAgent::linux()
        .listen_unix(dir.path().join("fake.qga"))
        .unwrap();
    hung_guest(&dir.path().join("hung.qga"));
    let mut guests: Vec<(String, PathBuf)> = agents
        .iter()
        .map(|(name, agent)| (name.clone(), agent.socket()))
        .collect();
    guests.push(("fake".to_owned(), fake.path().to_owned()));
    guests.push(("hung".to_owned(), dir.path().join("hung.qga")));

    let mut command = Command::new(&vmsdk);
    command.args(["guests", "--listen", "127.0.0.1:0", "--deadline", "1s"]);
    command.args(["--label", "host=prometheus-peer-test"]);
    for (name, path) in &guests {
        command
            .arg("--guest")
            .arg(format!("{name}={}", path.display()));
    }
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _exporter = Reaped(child);
    let mut banner = String::new();
    BufReader::new(stdout).read_line(&mut banner).unwrap();
    let exporter: SocketAddr = banner
        .split_whitespace()
        .nth(1)
        .and_then(|url| url.strip_prefix("http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("unexpected banner {banner:?}"));

    // The multi-target pattern: one target per guest, its name as ?target=.
    let targets = guests
        .iter()
        .map(|(name, _)| format!("'{name}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 3s\n  scrape_timeout: 3s\n\
             scrape_configs:\n  - job_name: guests\n    metrics_path: /probe\n\
             \x20   static_configs:\n      - targets: [{targets}]\n\
             \x20   relabel_configs:\n\
             \x20     - source_labels: [__address__]\n        target_label: __param_target\n\
             \x20     - source_labels: [__param_target]\n        target_label: instance\n\
             \x20     - target_label: __address__\n        replacement: '{exporter}'\n"
        ),
    )
    .unwrap();
    let api_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={api_addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _server = Reaped(server);

    // Every target is healthy: a hung guest is a guest that is down, not a failed scrape.
    let active = wait_for("every target healthy", Duration::from_secs(60), || {
        let data = api(api_addr, "/api/v1/targets")?;
        let active = data["activeTargets"].as_array()?.clone();
        (active.len() == guests.len() && active.iter().all(|t| t["health"] == "up"))
            .then_some(active)
    });
    for target in &active {
        assert_eq!(target["lastError"], "", "{target}");
    }

    let query = |q: &str| {
        let q = encode(q);
        move || {
            let data = api(api_addr, &format!("/api/v1/query?query={q}"))?;
            let result = data["result"].as_array()?.clone();
            (!result.is_empty()).then_some(result)
        }
    };
    let up = wait_for(
        "vmsdk_guest_up of every guest",
        Duration::from_secs(30),
        || query("vmsdk_guest_up")().filter(|r| r.len() == guests.len()),
    );
    for sample in &up {
        let guest = sample["metric"]["guest"].as_str().unwrap();
        let value = sample["value"][1].as_str().unwrap();
        assert_eq!(sample["metric"]["host"], "prometheus-peer-test");
        assert_eq!(sample["metric"]["instance"], guest, "{sample}");
        assert_eq!(value, if guest == "hung" { "0" } else { "1" }, "{sample}");
    }

    // A filesystem ratio, computed by Prometheus from two exported families.
    let ratios = wait_for(
        "a filesystem usage ratio",
        Duration::from_secs(30),
        query("1 - vmsdk_guest_filesystem_avail_bytes / vmsdk_guest_filesystem_size_bytes"),
    );
    eprintln!("{} filesystem ratios", ratios.len());
    let fake_root = ratios
        .iter()
        .find(|r| r["metric"]["guest"] == "fake" && r["metric"]["mountpoint"] == "/")
        .expect("the fake guest's root filesystem");
    let ratio: f64 = fake_root["value"][1].as_str().unwrap().parse().unwrap();
    let expected = 1.0 - (10_434_273_280.0 - 1_234_567_168.0) / 10_968_498_176.0;
    assert!((ratio - expected).abs() < 1e-9, "{ratio} vs {expected}");
    for ratio in &ratios {
        let value: f64 = ratio["value"][1].as_str().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&value), "{ratio}");
    }
}

/// The guest exposition of every fake release and a down guest, through the strict
/// OpenMetrics parser and both text 0.0.4 parsers. (The strict parser wants one label set per
/// family, so every guest gets the same labels here; Prometheus itself accepts guests with
/// labels of their own.)
#[test]
fn the_guest_exposition_parses_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let mut sockets = Vec::new();
    let mut builder = GuestMonitor::builder().guest_deadline(Duration::from_secs(1));
    for (i, release) in AgentRelease::ALL.iter().enumerate() {
        let socket = FakeAgent::linux_release(*release)
            .listen_unix(dir.path().join(format!("{i}.qga")))
            .unwrap();
        builder = builder.guest(
            Guest::new(format!("v{i}"), &socket.path().display().to_string())
                .unwrap()
                .label("tenant", "a \"quoted\" name"),
        );
        sockets.push(socket);
    }
    let windows = FakeAgent::windows()
        .listen_unix(dir.path().join("win.qga"))
        .unwrap();
    dead_guest(&dir.path().join("dead.qga"));
    let monitor = builder
        .guest(
            Guest::new("win", &windows.path().display().to_string())
                .unwrap()
                .label("tenant", "b"),
        )
        .guest(
            Guest::new("dead", &dir.path().join("dead.qga").display().to_string())
                .unwrap()
                .label("tenant", "c"),
        )
        .build()
        .unwrap();
    let mut registry = Registry::default();
    GuestCollector::new(monitor).register(&mut registry);

    let om = Format::OpenMetrics.encode(&registry).unwrap();
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&om)
        .unwrap_or_else(|e| panic!("{e:?} in\n{om}"));
    let cpu = &exposition.families["vmsdk_guest_cpu_seconds"];
    assert_eq!(
        cpu.family_type,
        openmetrics_parser::OpenMetricsType::Counter
    );
    assert_eq!(cpu.unit, "seconds");
    let size = &exposition.families["vmsdk_guest_filesystem_size_bytes"];
    assert_eq!(size.unit, "bytes");
    assert!(exposition.families.contains_key("vmsdk_guest_os"));

    let text = Format::Text.encode(&registry).unwrap();
    openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let up: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "vmsdk_guest_up")
        .collect();
    assert_eq!(up.len(), AgentRelease::ALL.len() + 2);
}

/// A real QEMU (7.2 and 10.0) beside a guest's agent: the balloon's size and the drive's
/// counters from its monitor join the guest's labels. QEMU runs paused with no guest, so the
/// balloon driver never reports statistics: they are left out, not zero.
#[test]
fn a_real_qemu_monitor_adds_balloon_and_block_statistics() {
    for_each_generation(&["qemu-system-x86_64"], |generation: Generation| {
        let images = tempfile::tempdir().unwrap();
        let image = images.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let drive = format!("if=none,id=drive0,format=raw,file={}", image.display());
        let Some(qemu) = vmsdk_tests::qemu::Qemu::start_with(
            generation,
            &[
                "-machine",
                "q35",
                "-m",
                "128",
                "-device",
                "virtio-balloon-pci,id=balloon0",
                "-drive",
                &drive,
                "-device",
                "virtio-blk-pci,drive=drive0",
            ],
        ) else {
            return;
        };
        let agent = FakeAgent::linux()
            .listen_unix(images.path().join("agent.qga"))
            .unwrap();
        let monitor = GuestMonitor::builder()
            .guest(
                Guest::new("vm", &agent.path().display().to_string())
                    .unwrap()
                    .qmp(&qemu.address())
                    .unwrap(),
            )
            .guest_deadline(Duration::from_secs(3))
            .build()
            .unwrap();
        let report = &monitor.scrape_blocking()[0];
        let host = report.host.as_ref().unwrap();
        eprintln!("{host:?}");
        assert!(host.up, "{host:?}");
        assert_eq!(host.balloon_bytes, Some(128 << 20));
        assert_eq!(host.balloon_stats, None);
        assert!(host.failures.is_empty(), "{:?}", host.failures);
        let block = host.block.as_ref().unwrap();
        assert!(
            block.iter().any(|(drive, _)| drive == "drive0"),
            "{block:?}"
        );

        let mut registry = Registry::default();
        GuestCollector::new(monitor.clone()).register(&mut registry);
        let text = Format::Text.encode(&registry).unwrap();
        assert!(text.contains("vmsdk_guest_qmp_up{guest=\"vm\"} 1"));
        assert!(text.contains(&format!(
            "vmsdk_guest_balloon_actual_bytes{{guest=\"vm\"}} {}",
            128u64 << 20
        )));
        assert!(
            text.contains("vmsdk_guest_block_read_bytes_total{guest=\"vm\",drive=\"drive0\"} 0")
        );
        assert!(!text.contains("vmsdk_guest_memory_free_bytes"));
        // The monitor is free again for QEMU's other clients after the poll.
        let again = &monitor.scrape_blocking()[0];
        assert!(again.host.as_ref().unwrap().up);
    });
}
