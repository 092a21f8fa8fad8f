//! The guest monitor and its metrics against fake agents on real Unix sockets (served one
//! client at a time, as QEMU serves a chardev), hung and dead guests, and a channel another
//! client holds.
#![cfg(all(feature = "agent", feature = "exporter"))]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmsdk::agent::fake::{AgentRelease, FakeAgent, FakeSocket, Fault};
use vmsdk::agent::monitor::{Connection, Guest, GuestMonitor, PollStatus};
use vmsdk::agent::types::GuestFilesystemInfo;
use vmsdk::prometheus::prometheus_client::registry::Registry;
use vmsdk::prometheus::{Exporter, Format, GuestCollector};

/// A socket that accepts every client and never answers (a guest whose agent hangs, or a
/// guest still in its firmware). The connections stay open as long as the value lives.
struct HungGuest {
    path: PathBuf,
}

impl HungGuest {
    fn new(path: PathBuf) -> HungGuest {
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        HungGuest { path }
    }
}

/// A socket file nobody listens on (a stopped VM whose socket was left behind).
fn dead_guest(path: &Path) -> String {
    drop(UnixListener::bind(path).unwrap());
    path.display().to_string()
}

fn uri(path: &Path) -> String {
    format!("qga+unix://{}", path.display())
}

fn encode(monitor: &GuestMonitor) -> String {
    let mut registry = Registry::default();
    GuestCollector::new(monitor.clone()).register(&mut registry);
    Format::Text.encode(&registry).unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
}

fn families(text: &str, guest: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&format!("guest=\"{guest}\"")))
        .map(|l| l.split('{').next().unwrap().to_owned())
        .collect();
    names.dedup();
    names
}

#[test]
fn each_release_exports_what_it_has_and_nothing_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let mut sockets: Vec<FakeSocket> = Vec::new();
    let mut builder = GuestMonitor::builder();
    for (name, fake) in [
        ("v2-11", FakeAgent::linux_release(AgentRelease::Qemu2_11)),
        ("v7-2", FakeAgent::linux_release(AgentRelease::Qemu7_2)),
        ("v10-0", FakeAgent::linux_release(AgentRelease::Qemu10_0)),
        ("windows", FakeAgent::windows()),
    ] {
        let socket = fake
            .listen_unix(dir.path().join(format!("{name}.qga")))
            .unwrap();
        builder = builder.guest(Guest::new(name, &uri(socket.path())).unwrap());
        sockets.push(socket);
    }
    let monitor = builder.build().unwrap();
    let text = encode(&monitor);

    for guest in ["v2-11", "v7-2", "v10-0", "windows"] {
        assert_eq!(
            sample(&text, &format!("vmsdk_guest_up{{guest=\"{guest}\"}}")),
            Some(1.0),
            "{text}"
        );
    }
    assert!(text.contains("vmsdk_guest_agent_info{guest=\"v2-11\",version=\"2.11.1\"} 1"));
    assert!(text.contains("vmsdk_guest_agent_info{guest=\"v7-2\",version=\"7.2.22\"} 1"));

    // 10.0: load, and the privileged size beside the unprivileged capacity.
    let fs = "{guest=\"v10-0\",device=\"vda1\",mountpoint=\"/\",fstype=\"ext4\"}";
    assert_eq!(
        sample(&text, "vmsdk_guest_load1{guest=\"v10-0\"}"),
        Some(0.08)
    );
    assert_eq!(
        sample(&text, &format!("vmsdk_guest_filesystem_size_bytes{fs}")),
        Some(10_968_498_176.0)
    );
    assert_eq!(
        sample(&text, &format!("vmsdk_guest_filesystem_avail_bytes{fs}")),
        Some((10_434_273_280u64 - 1_234_567_168) as f64)
    );
    assert_eq!(
        sample(&text, &format!("vmsdk_guest_filesystem_used_bytes{fs}")),
        Some(1_234_567_168.0)
    );
    assert_eq!(
        sample(&text, &format!("vmsdk_guest_filesystem_free_bytes{fs}")),
        Some((10_968_498_176u64 - 1_234_567_168) as f64)
    );
    assert_eq!(
        sample(
            &text,
            "vmsdk_guest_cpu_seconds_total{guest=\"v10-0\",cpu=\"1\",mode=\"steal\"}"
        ),
        Some(0.18)
    );
    assert_eq!(
        sample(
            &text,
            "vmsdk_guest_disk_read_bytes_total{guest=\"v10-0\",device=\"vda\"}"
        ),
        Some(402_184.0 * 512.0)
    );
    assert_eq!(
        sample(
            &text,
            "vmsdk_guest_network_receive_bytes_total{guest=\"v10-0\",device=\"eth0\"}"
        ),
        Some(26_688_598.0)
    );

    // 7.2: no load (10.0), size is the unprivileged capacity, no free (9.1).
    let v7 = families(&text, "v7-2");
    assert!(
        !v7.iter().any(|f| f.starts_with("vmsdk_guest_load")),
        "{v7:?}"
    );
    assert!(!v7.contains(&"vmsdk_guest_filesystem_free_bytes".to_owned()));
    assert_eq!(
        sample(
            &text,
            "vmsdk_guest_filesystem_size_bytes{guest=\"v7-2\",device=\"vda1\",mountpoint=\"/\",fstype=\"ext4\"}"
        ),
        Some(10_434_273_280.0)
    );
    assert!(v7.contains(&"vmsdk_guest_cpu_seconds_total".to_owned()));

    // 2.11: no sizes in fsinfo (3.0), no cpustats or diskstats (7.1), no load: left out.
    let v2 = families(&text, "v2-11");
    for absent in [
        "vmsdk_guest_filesystem_size_bytes",
        "vmsdk_guest_cpu_seconds_total",
        "vmsdk_guest_disk_reads_completed_total",
        "vmsdk_guest_load1",
    ] {
        assert!(!v2.contains(&absent.to_owned()), "{absent} in {v2:?}");
    }
    assert!(v2.contains(&"vmsdk_guest_network_receive_bytes_total".to_owned()));
    assert!(v2.contains(&"vmsdk_guest_os_info".to_owned()));

    // Windows: no cpustats or diskstats (Linux only), no privileged size.
    let windows = families(&text, "windows");
    assert!(!windows.contains(&"vmsdk_guest_cpu_seconds_total".to_owned()));
    assert!(!windows.contains(&"vmsdk_guest_disk_reads_completed_total".to_owned()));
    assert!(windows.contains(&"vmsdk_guest_filesystem_size_bytes".to_owned()));
    assert!(text.contains("vmsdk_guest_os_info{guest=\"windows\",id=\"mswindows\""));
}

#[test]
fn hung_and_dead_guests_cost_their_deadline_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = FakeAgent::linux()
        .listen_unix(dir.path().join("ok.qga"))
        .unwrap();
    let hung = HungGuest::new(dir.path().join("hung.qga"));
    let dead = dead_guest(&dir.path().join("dead.qga"));
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("ok", &uri(healthy.path())).unwrap())
        .guest(Guest::new("hung", &uri(&hung.path)).unwrap())
        .guest(Guest::new("dead", &dead).unwrap())
        .guest(Guest::new("missing", "qga+unix:///nonexistent/vmsdk/missing.qga").unwrap())
        .guest_deadline(Duration::from_millis(800))
        .build()
        .unwrap();
    let started = Instant::now();
    let reports = monitor.scrape_blocking();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let by_name = |name: &str| reports.iter().find(|r| r.name == name).unwrap();
    assert!(by_name("ok").is_up());
    let hung = by_name("hung");
    assert_eq!(hung.status, PollStatus::Down);
    let why = hung.error.as_deref().unwrap();
    assert!(why.contains("did not answer guest-sync"), "{why}");
    assert!(why.contains("serves one at a time"), "{why}");
    let dead = by_name("dead");
    assert_eq!(dead.status, PollStatus::Down);
    assert!(
        dead.error
            .as_deref()
            .unwrap()
            .contains("Connection refused"),
        "{dead:?}"
    );
    assert!(by_name("missing")
        .error
        .as_deref()
        .unwrap()
        .contains("No such file"));

    let text = encode(&monitor);
    assert_eq!(sample(&text, "vmsdk_guest_up{guest=\"hung\"}"), Some(0.0));
    assert_eq!(sample(&text, "vmsdk_guest_up{guest=\"ok\"}"), Some(1.0));
    assert!(
        families(&text, "hung")
            == [
                "vmsdk_guest_up",
                "vmsdk_guest_scrape_duration_seconds",
                "vmsdk_guest_skipped"
            ],
        "{text}"
    );
}

#[test]
fn a_guest_still_busy_from_the_last_scrape_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = FakeAgent::linux()
        .listen_unix(dir.path().join("ok.qga"))
        .unwrap();
    let hung = HungGuest::new(dir.path().join("hung.qga"));
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("ok", &uri(healthy.path())).unwrap())
        .guest(Guest::new("hung", &uri(&hung.path)).unwrap())
        .guest_deadline(Duration::from_secs(4))
        .scrape_deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let first = monitor.scrape_blocking();
    assert!(first[0].is_up());
    assert_eq!(first[1].status, PollStatus::Down);
    assert!(first[1]
        .error
        .as_deref()
        .unwrap()
        .contains("scrape deadline"));
    let second = monitor.scrape_blocking();
    assert!(second[0].is_up(), "{:?}", second[0]);
    assert_eq!(second[1].status, PollStatus::Busy, "{:?}", second[1]);
    let text = encode(&monitor);
    assert_eq!(
        sample(&text, "vmsdk_guest_skipped{guest=\"hung\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "vmsdk_guest_skipped{guest=\"ok\"}"),
        Some(0.0)
    );
}

#[test]
fn the_fan_out_is_bounded_and_the_scrape_deadline_holds() {
    let dir = tempfile::tempdir().unwrap();
    // Agents that answer guest-info and then stall on guest-get-fsinfo (a stuck mount):
    // each poll holds its slot for the whole guest deadline.
    let stalled: Vec<FakeSocket> = (0..3)
        .map(|i| {
            let fake = FakeAgent::linux();
            fake.fault_on("guest-get-fsinfo", Fault::Hang);
            fake.listen_unix(dir.path().join(format!("stalled{i}.qga")))
                .unwrap()
        })
        .collect();
    let mut builder = GuestMonitor::builder()
        .concurrency(1)
        .guest_deadline(Duration::from_millis(400))
        .scrape_deadline(Duration::from_millis(600));
    for (i, socket) in stalled.iter().enumerate() {
        builder = builder.guest(Guest::new(format!("stalled{i}"), &uri(socket.path())).unwrap());
    }
    let monitor = builder.build().unwrap();
    let started = Instant::now();
    let reports = monitor.scrape_blocking();
    assert!(started.elapsed() < Duration::from_millis(1200));
    // One slot: the first guest is polled to its deadline, and what it answered before the
    // stall is kept; the second is still running at the scrape deadline; the third never got
    // the slot.
    let statuses: Vec<PollStatus> = reports.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [PollStatus::Up, PollStatus::Down, PollStatus::NotPolled],
        "{reports:#?}"
    );
    let first = reports[0].data.as_ref().unwrap();
    assert!(first.os.is_some() && first.host_name.is_some());
    assert!(first.filesystems.is_none());
    assert!(first
        .failures
        .iter()
        .any(|(command, _)| command == "guest-get-fsinfo"));
    assert!(reports[1]
        .error
        .as_deref()
        .unwrap()
        .contains("scrape deadline"));
}

#[test]
fn each_poll_closes_its_connection_so_other_clients_get_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAgent::linux();
    let socket = fake.listen_unix(dir.path().join("ok.qga")).unwrap();
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("ok", &uri(socket.path())).unwrap())
        .guest_deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    for _ in 0..3 {
        assert!(monitor.scrape_blocking()[0].is_up());
    }
    let infos = fake
        .state()
        .requests
        .iter()
        .filter(|r| *r == "guest-info")
        .count();
    assert_eq!(infos, 3, "one guest-info per poll, on its own connection");
    // The fake serves one client at a time: another tool gets it right after a poll.
    let mut other = qga_proto_client(socket.path());
    assert!(other.call_host_name().is_ok());
}

#[test]
fn a_kept_connection_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAgent::linux();
    let socket = fake.listen_unix(dir.path().join("ok.qga")).unwrap();
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("ok", &uri(socket.path())).unwrap())
        .connection(Connection::Keep)
        .build()
        .unwrap();
    for _ in 0..3 {
        assert!(monitor.scrape_blocking()[0].is_up());
    }
    let state = fake.state();
    let count = |name: &str| state.requests.iter().filter(|r| *r == name).count();
    // One connection: one handshake and one guest-info for three polls.
    assert_eq!(count("guest-sync-delimited"), 1, "{:?}", state.requests);
    assert_eq!(count("guest-info"), 1);
    assert_eq!(count("guest-get-fsinfo"), 3);
}

#[test]
fn a_cached_result_is_served_with_its_age() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAgent::linux();
    let socket = fake.listen_unix(dir.path().join("ok.qga")).unwrap();
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("ok", &uri(socket.path())).unwrap())
        .cache(Duration::from_secs(60))
        .build()
        .unwrap();
    let first = monitor.scrape_blocking();
    assert_eq!(first[0].age_seconds, Some(0.0));
    fake.state().filesystems = vec![GuestFilesystemInfo {
        name: "vdb".into(),
        mountpoint: "/data".into(),
        r#type: "xfs".into(),
        used_bytes: Some(1),
        total_bytes: Some(2),
        ..Default::default()
    }];
    std::thread::sleep(Duration::from_millis(50));
    let text = encode(&monitor);
    let age = sample(&text, "vmsdk_guest_result_age_seconds{guest=\"ok\"}").unwrap();
    assert!((0.05..5.0).contains(&age), "{age}");
    assert!(!text.contains("/data"), "served from the cache: {text}");
    let polls = fake
        .state()
        .requests
        .iter()
        .filter(|r| *r == "guest-info")
        .count();
    assert_eq!(polls, 1);
}

#[test]
fn a_channel_another_client_holds_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.qga");
    let listener = UnixListener::bind(&path).unwrap();
    // Fill the listen queue as a client holding QEMU's chardev does (QEMU queues one).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queued = runtime.block_on(async {
        let mut queued = Vec::new();
        loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return queued,
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 100_000);
        }
    });
    let monitor = GuestMonitor::builder()
        .guest(Guest::new("held", &uri(&path)).unwrap())
        .guest_deadline(Duration::from_millis(800))
        .build()
        .unwrap();
    let report = &monitor.scrape_blocking()[0];
    let why = report.error.as_deref().unwrap();
    assert!(why.contains("is busy"), "{why}");
    assert!(why.contains("serves one client at a time"), "{why}");
    runtime.block_on(async move { drop(queued) });
    drop(listener);
}

#[test]
fn names_and_labels_are_checked() {
    let guest = |name: &str| Guest::new(name, "qga+unix:///run/x.qga").unwrap();
    assert!(GuestMonitor::builder()
        .guest(guest("a"))
        .guest(guest("a"))
        .build()
        .is_err());
    for bad in ["guest", "mountpoint", "2x", "a-b", "__x"] {
        let error = GuestMonitor::builder()
            .guest(guest("a").label(bad, "v"))
            .build()
            .unwrap_err();
        assert!(error.to_string().contains(bad), "{error}");
    }
    assert!(Guest::new("", "qga+unix:///run/x.qga").is_err());
    assert!(Guest::new("a", "ftp://x").is_err());
}

#[test]
fn the_exporter_serves_every_guest_and_probes_one() {
    let dir = tempfile::tempdir().unwrap();
    let one = FakeAgent::linux()
        .listen_unix(dir.path().join("one.qga"))
        .unwrap();
    let two = FakeAgent::linux_release(AgentRelease::Qemu7_2)
        .listen_unix(dir.path().join("two.qga"))
        .unwrap();
    let monitor = GuestMonitor::builder()
        .guest(
            Guest::new("one", &uri(one.path()))
                .unwrap()
                .label("rack", "r1"),
        )
        .guest(
            Guest::new("two", &uri(two.path()))
                .unwrap()
                .label("rack", "r1"),
        )
        .build()
        .unwrap();
    let running = Exporter::bind_guests("127.0.0.1:0", monitor)
        .unwrap()
        .spawn()
        .unwrap();
    let addr = running.local_addr();
    let (status, body) = get(addr, "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        body.contains("vmsdk_guest_up{guest=\"one\",rack=\"r1\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("vmsdk_guest_up{guest=\"two\",rack=\"r1\"} 1"),
        "{body}"
    );

    let (status, body) = get(
        addr,
        "/probe?target=two",
        "Accept: application/openmetrics-text;version=1.0.0\r\nX-Prometheus-Scrape-Timeout-Seconds: 2\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("guest=\"two\""));
    assert!(!body.contains("guest=\"one\""));
    assert!(body.ends_with("# EOF\n"));

    assert_eq!(get(addr, "/probe?target=three", "").0, 404);
    assert_eq!(get(addr, "/probe", "").0, 400);
    assert_eq!(
        get(addr, "/probe?target=%zz", "").0,
        404,
        "a broken escape is kept as it is and names no guest"
    );
    let (status, index) = get(addr, "/", "");
    assert_eq!(status, 200);
    assert!(index.contains("/probe?target=NAME"));
}

fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\n{headers}\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// A blocking client of another tool, on the same socket.
fn qga_proto_client(path: &Path) -> OtherTool {
    OtherTool(
        vmsdk::qga_proto::Client::connect_unix(
            path,
            vmsdk::agent::ClientConfig::default().timeout(Duration::from_secs(2)),
        )
        .unwrap(),
    )
}

struct OtherTool(vmsdk::qga_proto::Client<UnixStream>);

impl OtherTool {
    fn call_host_name(&mut self) -> vmsdk::qga_proto::Result<String> {
        Ok(self
            .0
            .call::<vmsdk::qga_proto::cmd::GuestGetHostName>(&())?
            .host_name)
    }
}

/// A guest's QEMU monitor beside its agent: the balloon and its driver's statistics join the
/// guest's labels, also when the agent is down.
#[cfg(feature = "qmp")]
#[test]
fn the_monitor_adds_what_qemu_sees() {
    use qmp_proto::fake::FakeMonitor;

    let dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::linux()
        .listen_unix(dir.path().join("101.qga"))
        .unwrap();
    let qemu = FakeMonitor::builder().balloon("balloon0", 2 << 30).build();
    {
        let mut state = qemu.state();
        let balloon = state.balloon.as_mut().unwrap();
        balloon.stats.insert("stat-free-memory".into(), 1 << 30);
        balloon
            .stats
            .insert("stat-total-memory".into(), 2_000_000_000);
        balloon.stats.insert("stat-major-faults".into(), 42);
        balloon.last_update = 1_700_000_000;
    }
    let qmp = qemu.listen_unix(dir.path().join("101.qmp")).unwrap();
    // A second guest with no balloon reporting yet, and an agent that is down.
    let quiet = FakeMonitor::builder().balloon("balloon0", 1 << 30).build();
    let quiet_qmp = quiet.listen_unix(dir.path().join("102.qmp")).unwrap();
    dead_guest(&dir.path().join("102.qga"));

    let monitor = GuestMonitor::builder()
        .guest(
            Guest::new("101", &uri(agent.path()))
                .unwrap()
                .qmp(&qmp.path().display().to_string())
                .unwrap(),
        )
        .guest(
            Guest::new("102", &uri(&dir.path().join("102.qga")))
                .unwrap()
                .qmp(&format!("qmp+unix://{}", quiet_qmp.path().display()))
                .unwrap(),
        )
        .guest_deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let reports = monitor.scrape_blocking();
    let host = reports[0].host.as_ref().unwrap();
    assert!(host.up, "{host:?}");
    assert_eq!(host.balloon_bytes, Some(2 << 30));
    let stats = host.balloon_stats.as_ref().unwrap();
    assert_eq!(stats.get("stat-free-memory"), Some(&(1 << 30)));
    // Not reported by the guest: left out rather than u64::MAX.
    assert!(!stats.contains_key("stat-swap-in"), "{stats:?}");
    assert!(host.failures.is_empty(), "{:?}", host.failures);

    assert_eq!(reports[1].status, PollStatus::Down);
    let quiet_host = reports[1].host.as_ref().unwrap();
    assert_eq!(quiet_host.balloon_bytes, Some(1 << 30));
    assert_eq!(quiet_host.balloon_stats, None);

    let text = encode(&monitor);
    assert_eq!(
        sample(&text, "vmsdk_guest_qmp_up{guest=\"101\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "vmsdk_guest_balloon_actual_bytes{guest=\"101\"}"),
        Some((2u64 << 30) as f64)
    );
    assert_eq!(
        sample(&text, "vmsdk_guest_memory_free_bytes{guest=\"101\"}"),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(
        sample(
            &text,
            "vmsdk_guest_memory_major_faults_total{guest=\"101\"}"
        ),
        Some(42.0)
    );
    assert_eq!(sample(&text, "vmsdk_guest_up{guest=\"102\"}"), Some(0.0));
    assert_eq!(
        sample(&text, "vmsdk_guest_qmp_up{guest=\"102\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "vmsdk_guest_balloon_actual_bytes{guest=\"102\"}"),
        Some((1u64 << 30) as f64)
    );
    assert!(!families(&text, "102").contains(&"vmsdk_guest_memory_free_bytes".to_owned()));
}
