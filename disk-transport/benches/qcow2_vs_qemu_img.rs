//! qcow2 against qemu-img, each tool run as a whole process under GNU time: seconds, the
//! speed ratio, peak RSS, CPU seconds of the tool and of the NBD server.
//!
//! ```text
//! cargo bench -p disk-transport --bench qcow2_vs_qemu_img             # 2 GiB, 2 runs each
//! DT_BENCH_MIB=512 DT_BENCH_RUNS=3 cargo bench -p disk-transport --bench qcow2_vs_qemu_img
//! VMSDK_BIN=/path/to/vmsdk cargo bench ...                             # skip building vmsdk
//! ```
//!
//! Cases, with equal work (every destination deleted before each run, so each tool creates
//! it; both flush at the end: vmsdk always does, qemu-img runs with `-t writeback`, whose
//! close flushes):
//! - one `qemu-nbd -r -t -e 8` export of a page-cached image in /dev/shm (random data, a
//!   quarter of it holes: every fourth 4 MiB) into a new qcow2 on tmpfs, then on disk
//!   (`/var/tmp`): `vmsdk disk copy URI out.qcow2` against `qemu-img convert -W -m 16 -O qcow2
//!   URI out.qcow2`. Goal: ≥ 1.25× qemu-img's speed, peak RSS ≤ its.
//! - reading a four-deep chain (a qcow2 of the same image and three overlays, each rewriting
//!   an eighth of the disk) into a raw file on tmpfs: `vmsdk disk copy top.qcow2 out.raw`
//!   against `qemu-img convert -O raw top.qcow2 out.raw`. Goal: ≥ 1.0×.
//!
//! Every output is checked afterwards (outside the timing): `qemu-img check` exit 0 and
//! `qemu-img compare` equal to the source. Each case starts with one untimed run of each tool:
//! the first run of a case writing into tmpfs took 2.3 to 5.1 s where the later ones took 1.3,
//! and that run was always vmsdk's. Nothing of a process carries over to the next run, only the
//! kernel's state does (which memory is free; a VM with free page reporting, like the one these
//! figures came from, gives freed memory back to its host and faults it in again on first
//! use), so that cost was the order's, not the tool's. The timed runs of the tools are then
//! interleaved, which tool goes first alternating from run to run. The load average before
//! and after each case is printed (the machine may be shared). Needs qemu-img, qemu-io,
//! qemu-nbd and GNU time (`apt-get install qemu-utils time`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{load_average, median};

const GNU_TIME: &str = "/usr/bin/time";
const MIB: u64 = 1 << 20;
const GOAL_WRITE: f64 = 1.25;
const GOAL_CHAIN: f64 = 1.0;

/// A qemu-nbd serving one image read-only on a Unix socket, killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(image: &Path, scratch: &Path) -> Server {
        let socket = scratch.join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "8", "-f", "raw", "-x", "disk", "-k"])
            .arg(&socket)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }

    /// CPU seconds the server spent so far (utime + stime of /proc/PID/stat).
    fn cpu_seconds(&self) -> f64 {
        common::process_cpu_seconds(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One timed run.
struct Sample {
    seconds: f64,
    rss_kib: u64,
    cpu: f64,
    server_cpu: f64,
}

fn run_ok(argv: &[String]) {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("run a tool");
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn measure(argv: &[String], scratch: &Path, server: Option<&Server>) -> Sample {
    let time_file = scratch.join("time.out");
    let _ = std::fs::remove_file(&time_file);
    let before = server.map_or(0.0, Server::cpu_seconds);
    let mut full = vec![
        GNU_TIME.to_owned(),
        "-f".into(),
        "%e %M %U %S".into(),
        "-o".into(),
        time_file.display().to_string(),
    ];
    full.extend(argv.iter().cloned());
    run_ok(&full);
    let server_cpu = server.map_or(0.0, Server::cpu_seconds) - before;
    let report = std::fs::read_to_string(&time_file).unwrap_or_default();
    let fields: Vec<f64> = report
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [seconds, rss, user, system] = fields[..] else {
        panic!("no GNU time report: {report:?}");
    };
    Sample {
        seconds,
        rss_kib: rss as u64,
        cpu: user + system,
        server_cpu,
    }
}

/// A tool: a name and its command line, with `{SRC}` and `{DST}` filled in per case.
struct Tool {
    name: &'static str,
    argv: Vec<String>,
}

/// Runs the tools interleaved `runs` times into `destination` (deleted before each run),
/// checks each tool's last output with `verify`, and prints the table and the goal.
#[allow(clippy::too_many_arguments)]
fn run_case(
    title: &str,
    bytes: u64,
    tools: &[Tool],
    destination: &Path,
    runs: usize,
    scratch: &Path,
    server: Option<&Server>,
    goal: f64,
    verify: &dyn Fn(&Path),
) {
    // One untimed run of each tool first: the first run of a case otherwise pays for the
    // kernel's first hand-out of the destination's memory (see the module docs).
    for tool in tools {
        let _ = std::fs::remove_file(destination);
        run_ok(&tool.argv);
    }
    let load_before = load_average();
    let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        // Which tool goes first alternates from run to run.
        let mut order: Vec<usize> = (0..tools.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let _ = std::fs::remove_file(destination);
            samples[i].push(measure(&tools[i].argv, scratch, server));
            if run + 1 == runs {
                verify(destination);
            }
        }
    }
    let _ = std::fs::remove_file(destination);
    println!(
        "\n{title}  (load average {load_before} before, {} after)",
        load_average()
    );
    println!(
        "  {:<10} {:>8} {:>7} {:>10} {:>8} {:>6} {:>9}  all runs (s)",
        "tool", "median s", "MB/s", "×qemu-img", "RSS MiB", "CPU s", "server s"
    );
    let medians: Vec<f64> = samples
        .iter()
        .map(|s| median(s.iter().map(|x| x.seconds).collect()))
        .collect();
    let reference = tools
        .iter()
        .position(|t| t.name == "qemu-img")
        .expect("qemu-img");
    for ((tool, runs), secs) in tools.iter().zip(&samples).zip(&medians) {
        let all: Vec<String> = runs.iter().map(|x| format!("{:.2}", x.seconds)).collect();
        println!(
            "  {:<10} {:>8.2} {:>7.0} {:>10.2} {:>8.1} {:>6.2} {:>9.2}  {}",
            tool.name,
            secs,
            bytes as f64 / secs.max(0.01) / 1e6,
            medians[reference] / secs.max(0.01),
            runs.iter().map(|x| x.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
            median(runs.iter().map(|x| x.cpu).collect()),
            median(runs.iter().map(|x| x.server_cpu).collect()),
            all.join(" ")
        );
    }
    let ours = tools.iter().position(|t| t.name == "vmsdk").expect("vmsdk");
    let ratio = medians[reference] / medians[ours].max(0.01);
    let rss = |i: usize| samples[i].iter().map(|x| x.rss_kib).max().unwrap_or(0);
    println!(
        "  goal ≥ {goal}× qemu-img, peak RSS ≤ its: speed {ratio:.3}× {}, RSS {} vs {} MiB {}",
        if ratio >= goal { "met" } else { "MISSED" },
        rss(ours) / 1024,
        rss(reference) / 1024,
        if rss(ours) <= rss(reference) {
            "met"
        } else {
            "MISSED"
        }
    );
    for tool in tools {
        let words: Vec<String> = tool
            .argv
            .iter()
            .map(|a| {
                if a.contains(['?', '&']) {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            })
            .collect();
        println!("  $ {}", words.join(" "));
    }
}

fn vmsdk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMSDK_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("this bench's path");
    let target = exe
        .ancestors()
        .find(|a| a.join("CACHEDIR.TAG").is_file())
        .expect("the target directory")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building the release vmsdk binary ...");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "vmsdk",
            "--features",
            "cli",
            "--bin",
            "vmsdk",
        ])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build -p vmsdk failed");
    target.join("release").join("vmsdk")
}

/// A raw image of `size` bytes: random data, every fourth 4 MiB left a hole.
fn source_image(path: &Path, size: u64) {
    use std::io::{Read, Write};
    let mut file = std::fs::File::create(path).expect("create the source");
    file.set_len(size).unwrap();
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    let mut chunk = vec![0u8; 4 * MIB as usize];
    let mut offset = 0;
    while offset < size {
        if (offset / (4 * MIB)) % 4 != 3 {
            random.read_exact(&mut chunk).unwrap();
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).unwrap();
            file.write_all(&chunk[..(size - offset).min(4 * MIB) as usize])
                .unwrap();
        }
        offset += 4 * MIB;
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn main() {
    // `cargo test --benches` runs this without --bench; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("qcow2_vs_qemu_img: run with `cargo bench` to measure");
        return;
    }
    let mib: u64 = std::env::var("DT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let runs: usize = std::env::var("DT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let size = mib * MIB;
    let vmsdk = s(&vmsdk_binary());
    let tmp = PathBuf::from(format!("/dev/shm/vmsdk-qcow2-bench-{}", std::process::id()));
    let disk = PathBuf::from(format!("/var/tmp/vmsdk-qcow2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&disk).unwrap();
    let source = tmp.join("source.raw");
    source_image(&source, size);
    println!(
        "qcow2 bench: {mib} MiB source (a quarter holes) in {}, {runs} runs per tool, {}",
        tmp.display(),
        String::from_utf8_lossy(
            &Command::new("qemu-img")
                .arg("--version")
                .output()
                .unwrap()
                .stdout
        )
        .lines()
        .next()
        .unwrap_or("")
    );
    let data_bytes = size - size / 4;

    let qemu_img_check = |image: &Path| {
        run_ok(&[
            "qemu-img".into(),
            "check".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            s(image),
        ]);
        run_ok(&[
            "qemu-img".into(),
            "compare".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            "raw".into(),
            s(image),
            s(&source),
        ]);
    };
    {
        let server = Server::start(&source, &tmp);
        let uri = server.uri();
        for (place, dir) in [("tmpfs", &tmp), ("disk (/var/tmp)", &disk)] {
            let out = dir.join("out.qcow2");
            let tools = [
                Tool {
                    name: "vmsdk",
                    argv: vec![
                        vmsdk.clone(),
                        "disk".into(),
                        "copy".into(),
                        "--no-progress".into(),
                        uri.clone(),
                        s(&out),
                    ],
                },
                Tool {
                    name: "qemu-img",
                    argv: [
                        "qemu-img",
                        "convert",
                        "-W",
                        "-m",
                        "16",
                        "-t",
                        "writeback",
                        "-f",
                        "raw",
                        "-O",
                        "qcow2",
                    ]
                    .iter()
                    .map(|w| (*w).to_owned())
                    .chain([uri.clone(), s(&out)])
                    .collect(),
                },
            ];
            run_case(
                &format!(
                    "qemu-nbd export → new qcow2 on {place} ({} MiB of data)",
                    data_bytes / MIB
                ),
                size,
                &tools,
                &out,
                runs,
                &tmp,
                Some(&server),
                GOAL_WRITE,
                &qemu_img_check,
            );
        }
    }

    // A four-deep chain: base plus three overlays, each rewriting an eighth of the disk in
    // 1 MiB pieces spread over it.
    let mut below = tmp.join("chain0.qcow2");
    run_ok(&[
        "qemu-img".into(),
        "convert".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "qcow2".into(),
        s(&source),
        s(&below),
    ]);
    for level in 1..=3u64 {
        let top = tmp.join(format!("chain{level}.qcow2"));
        run_ok(&[
            "qemu-img".into(),
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            below.file_name().unwrap().to_str().unwrap().into(),
            "-F".into(),
            "qcow2".into(),
            s(&top),
        ]);
        let mut argv = vec!["qemu-io".to_owned(), "-f".into(), "qcow2".into()];
        let mut offset = level * MIB;
        while offset + MIB <= size {
            argv.push("-c".into());
            argv.push(format!("write -P {} {offset} 1M", 16 + level));
            offset += 8 * MIB;
        }
        argv.push(s(&top));
        run_ok(&argv);
        below = top;
    }
    let out = tmp.join("out.raw");
    let check_raw = |raw: &Path| {
        run_ok(&[
            "qemu-img".into(),
            "compare".into(),
            "-q".into(),
            "-f".into(),
            "raw".into(),
            "-F".into(),
            "qcow2".into(),
            s(raw),
            s(&below),
        ]);
    };
    let tools = [
        Tool {
            name: "vmsdk",
            argv: vec![
                vmsdk.clone(),
                "disk".into(),
                "copy".into(),
                "--no-progress".into(),
                s(&below),
                s(&out),
            ],
        },
        Tool {
            name: "qemu-img",
            argv: [
                "qemu-img",
                "convert",
                "-t",
                "writeback",
                "-f",
                "qcow2",
                "-O",
                "raw",
            ]
            .iter()
            .map(|w| (*w).to_owned())
            .chain([s(&below), s(&out)])
            .collect(),
        },
    ];
    run_case(
        "four-deep qcow2 chain → raw on tmpfs",
        size,
        &tools,
        &out,
        runs,
        &tmp,
        None,
        GOAL_CHAIN,
        &check_raw,
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&disk);
}
