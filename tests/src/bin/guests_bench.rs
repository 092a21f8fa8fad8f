//! Benchmark (not a test): one scrape of many guests' agents by `vmsdk guests`, and the
//! steady state of an exporter scraping them again and again.
//!
//! ```sh
//! cargo build --release -p vmsdk --features cli && cargo build --release -p vmsdk-tests --bin guests_bench
//! target/release/guests_bench [GUESTS] [HUNG] [RUNS] [REAL]   # default 200 20 5 20
//! ```
//!
//! The guests are fake agents (qemu-ga 10.0 on Debian, `FakeAgent::listen_unix`) on real Unix
//! sockets, each served one client at a time as QEMU serves a chardev, in a separate process
//! (this binary re-executed with `--serve`), so that the figures are the monitor's alone. Hung
//! guests accept and never answer. Figures:
//!
//! 1. `vmsdk guests --json` as a whole process, under GNU time (`/usr/bin/time -f '%e %U %S
//!    %M'`): wall, CPU (user + system) and peak RSS, with all guests healthy and with HUNG of
//!    them hung (deadline 1 s per guest); the scrape's own duration from its JSON.
//! 2. An exporter's steady state: one `GuestMonitor` in this process scraping RUNS times;
//!    wall and CPU per scrape from `/proc/self/stat`, peak RSS from `/proc/self/status`.
//! 3. Side by side with real agents: REAL qemu-ga 7.2 of the machine (unprivileged, state-
//!    changing RPCs blocked), scraped the same way, against as many fakes.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmsdk::agent::fake::FakeAgent;
use vmsdk::agent::monitor::{Guest, GuestMonitor, PollStatus};
use vmsdk_tests::qga::QemuGa;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        serve(
            Path::new(&args[2]),
            args[3].parse().unwrap(),
            args[4].parse().unwrap(),
        );
        return;
    }
    let number = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let (guests, hung, runs, real) = (number(1, 200), number(2, 20), number(3, 5), number(4, 20));
    let vmsdk = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("vmsdk");
    assert!(
        vmsdk.is_file(),
        "build the CLI first: cargo build --release -p vmsdk --features cli"
    );
    println!("{guests} fake guests (qemu-ga 10.0 fakes on Unix sockets, one client at a time), {hung} of them hung in the second case; {runs} runs; CPU count {}", std::thread::available_parallelism().map_or(0, |n| n.get()));

    for hung in [0, hung] {
        let farm = Farm::start(guests, hung);
        let pattern = format!("{}/*.qga", farm.dir.path().display());
        let mut walls = Vec::new();
        for _ in 0..runs {
            let (wall, cpu, rss, out) = timed(
                Command::new(&vmsdk)
                    .args(["guests", "--guests", &pattern, "--json"])
                    .args([
                        "--deadline",
                        "1s",
                        "--scrape-deadline",
                        "5s",
                        "--concurrency",
                        "64",
                    ]),
            );
            let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let reports = json["guests"].as_array().unwrap();
            let up = reports.iter().filter(|r| r["status"] == "up").count();
            assert_eq!(up, guests - hung, "every healthy guest is reported up");
            let scrape = json["scrape_seconds"].as_f64().unwrap();
            assert!(
                scrape < 5.0,
                "the scrape ends within its deadline: {scrape}"
            );
            walls.push((scrape, wall, cpu, rss));
        }
        walls.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (scrape, wall, cpu, rss) = walls[walls.len() / 2];
        println!(
            "vmsdk guests, {guests} guests, {hung} hung: scrape {scrape:.3} s; process wall {wall:.2} s, CPU {cpu:.2} s, peak RSS {} MiB (median of {runs})",
            rss / 1024
        );
    }

    // The steady state of an exporter: one monitor, scraped again and again.
    let farm = Farm::start(guests, 0);
    let monitor = GuestMonitor::builder()
        .guests(farm.guests())
        .guest_deadline(Duration::from_secs(1))
        .concurrency(64)
        .build()
        .unwrap();
    monitor.scrape_blocking();
    let mut figures = Vec::new();
    for _ in 0..runs {
        let (cpu_before, started) = (cpu_seconds(), Instant::now());
        let reports = monitor.scrape_blocking();
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        assert!(reports.iter().all(|r| r.status == PollStatus::Up));
        figures.push((wall, cpu));
    }
    figures.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (wall, cpu) = figures[figures.len() / 2];
    println!(
        "GuestMonitor::scrape_blocking, {guests} guests: wall {wall:.3} s, CPU {cpu:.3} s per scrape ({:.2} ms CPU per guest); this process's peak RSS {} MiB (median of {runs})",
        cpu * 1e3 / guests as f64,
        peak_rss_kib() / 1024
    );
    drop(farm);

    if real == 0 {
        return;
    }
    // Side by side: real agents against as many fakes, scraped the same way.
    let agents: Vec<QemuGa> = (0..real).filter_map(|_| QemuGa::start()).collect();
    if agents.is_empty() {
        println!("no qemu-ga on this machine: the comparison with real agents is skipped");
        return;
    }
    let real_guests = agents
        .iter()
        .enumerate()
        .map(|(i, a)| Guest::new(format!("real{i}"), &a.socket().display().to_string()).unwrap());
    let fakes = Farm::start(agents.len(), 0);
    for (what, guests) in [
        (agents[0].version(), real_guests.collect::<Vec<_>>()),
        ("fake qemu-ga 10.0".to_owned(), fakes.guests()),
    ] {
        let count = guests.len();
        let monitor = GuestMonitor::builder()
            .guests(guests)
            .guest_deadline(Duration::from_secs(2))
            .build()
            .unwrap();
        monitor.scrape_blocking();
        let mut figures = Vec::new();
        for _ in 0..runs {
            let (cpu_before, started) = (cpu_seconds(), Instant::now());
            let reports = monitor.scrape_blocking();
            figures.push((started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before));
            assert!(reports.iter().all(|r| r.is_up()), "{reports:?}");
        }
        figures.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (wall, cpu) = figures[figures.len() / 2];
        println!("{count} guests of {what}: wall {wall:.3} s, monitor CPU {cpu:.3} s per scrape (median of {runs})");
    }
}

/// The fake guests, served by a child process.
struct Farm {
    dir: tempfile::TempDir,
    child: std::process::Child,
    names: Vec<(String, PathBuf)>,
}

impl Farm {
    fn start(guests: usize, hung: usize) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve")
            .arg(dir.path())
            .arg(guests.to_string())
            .arg(hung.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        let names = (0..guests)
            .map(|i| {
                (
                    format!("vm{i:04}"),
                    dir.path().join(format!("vm{i:04}.qga")),
                )
            })
            .collect();
        Farm { dir, child, names }
    }

    fn guests(&self) -> Vec<Guest> {
        self.names
            .iter()
            .map(|(name, path)| Guest::new(name, &path.display().to_string()).unwrap())
            .collect()
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child: `guests` sockets in `dir`, the last `hung` of them never answering.
fn serve(dir: &Path, guests: usize, hung: usize) {
    let mut sockets = Vec::new();
    for i in 0..guests {
        let path = dir.join(format!("vm{i:04}.qga"));
        if i >= guests - hung {
            let listener = UnixListener::bind(&path).unwrap();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for stream in listener.incoming().flatten() {
                    held.push(stream);
                }
            });
        } else {
            sockets.push(FakeAgent::linux().listen_unix(&path).unwrap());
        }
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Wall seconds, CPU seconds (user + system), peak RSS (KiB) and stdout of `command`.
fn timed(command: &mut Command) -> (f64, f64, u64, Vec<u8>) {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%e %U %S %M", "-o", "/dev/stderr"])
        .arg(command.get_program())
        .args(command.get_args());
    let out = timed.output().expect("run /usr/bin/time");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    let fields: Vec<f64> = line
        .split_whitespace()
        .map(|f| {
            f.parse()
                .unwrap_or_else(|_| panic!("GNU time said {stderr}"))
        })
        .collect();
    (
        fields[0],
        fields[1] + fields[2],
        fields[3] as u64,
        out.stdout,
    )
}

/// This process's CPU time (user + system) from `/proc/self/stat`, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which may hold spaces) start at its closing paren.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// This process's peak RSS (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
