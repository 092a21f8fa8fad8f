//! Copies the same NBD exports with `nbdcopy`, `qemu-img convert` and `vmsdk disk copy`, each
//! run as a whole process, and prints MB/s, the speed ratio to nbdcopy and each process's
//! peak RSS.
//!
//! ```text
//! cargo bench -p disk-transport --bench copy_vs_nbdcopy            # 2 GiB images, 3 runs
//! DT_BENCH_MIB=512 DT_BENCH_RUNS=5 cargo bench -p disk-transport --bench copy_vs_nbdcopy
//! VMSDK_BIN=/path/to/vmsdk cargo bench ...                          # skip building vmsdk
//! ```
//!
//! Before measuring, the bench builds the release `vmsdk` binary into the same target
//! directory (`cargo build --release -p vmsdk`), unless `VMSDK_BIN` names one.
//!
//! Cases (as in the project's research notes, §3.3), all read into a discarding sink (nbdcopy's
//! `null:`, qemu-img's `null-co` driver, vmsdk's `null:`) so that only the source side and the
//! copying program are measured:
//! - qemu-nbd (`-e 8`, so multi-conn clients may open several connections) serving a fully
//!   random image;
//! - the same for a half-sparse image (random first half, a hole after);
//! - nbdkit's file plugin behind the delay filter, 1 ms per read (`delay-read=1ms`): latency
//!   bound, so requests in flight and connections decide;
//! - and, writing for a change, a local random file into an nbdkit memory export.
//!
//! Runs of the three tools are interleaved (tool A, B, C, A, B, C, ...) so that load from other
//! jobs on the machine spreads over all of them; the load average before and after each case is
//! printed, and so is each tool's own CPU time (user + system), which load from other jobs
//! disturbs less than wall time. Peak RSS and CPU time come from `/usr/bin/time -f '%M %U %S'`
//! (Debian package `time`); without it those columns say `n/a`. Images live in /dev/shm when it
//! exists, so disk speed is not measured.
//! Needs qemu-nbd, qemu-img, nbdkit and nbdcopy (`apt-get install qemu-utils nbdkit
//! libnbd-bin time`); missing tools skip their cases or columns with a message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The goal from the issue: at least this many times nbdcopy's speed...
const GOAL_RATIO: f64 = 1.1;
/// ...with at most this much peak RSS.
const GOAL_RSS_KIB: u64 = 64 * 1024;
/// Where GNU time lives on Debian.
const GNU_TIME: &str = "/usr/bin/time";

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(mut command: Command, socket: PathBuf) -> Server {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_nbd(dir: &Path, image: &Path, tag: &str) -> Server {
    let socket = dir.join(format!("{tag}.sock"));
    let mut c = Command::new("qemu-nbd");
    c.args(["-r", "-t", "-e", "8", "-x", "disk", "-f", "raw", "-k"])
        .arg(&socket)
        .arg(image);
    Server::start(c, socket)
}

fn nbdkit(dir: &Path, tag: &str, args: &[&str]) -> Server {
    let socket = dir.join(format!("{tag}.sock"));
    let mut c = Command::new("nbdkit");
    c.args(["-f", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(args);
    Server::start(c, socket)
}

fn write_image(path: &Path, size: u64, random_bytes: u64) {
    use std::io::Write;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < random_bytes {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = (random_bytes - written).min(block.len() as u64) as usize;
        w.write_all(&block[..n]).unwrap();
        written += n as u64;
    }
    w.flush().unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One finished run of a tool.
struct Sample {
    seconds: f64,
    peak_rss_kib: Option<u64>,
    /// User plus system CPU seconds of the tool's process.
    cpu_seconds: Option<f64>,
}

/// Runs `argv` to completion under GNU time (when available), timing it.
fn measure(argv: &[String], scratch: &Path, gnu_time: bool) -> Sample {
    let rss_file = scratch.join("peak-rss");
    let mut command = if gnu_time {
        let mut c = Command::new(GNU_TIME);
        c.args(["-f", "%M %U %S", "-o"]).arg(&rss_file).args(argv);
        c
    } else {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    command.stdin(Stdio::null());
    let started = Instant::now();
    let output = command.output().expect("run the copy");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{} failed: {}",
        argv.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    // GNU time's last line is ours (a failing command adds one before it).
    let report = gnu_time
        .then(|| std::fs::read_to_string(&rss_file).ok())
        .flatten()
        .and_then(|s| s.lines().last().map(str::to_owned))
        .unwrap_or_default();
    let fields: Vec<&str> = report.split_whitespace().collect();
    let (peak_rss_kib, cpu_seconds) = match fields[..] {
        [rss, user, system] => (
            rss.parse().ok(),
            user.parse::<f64>()
                .ok()
                .zip(system.parse::<f64>().ok())
                .map(|(u, s)| u + s),
        ),
        _ => (None, None),
    };
    Sample {
        seconds,
        peak_rss_kib,
        cpu_seconds,
    }
}

/// A copying program and how it names a source, a destination and the null sink.
struct Tool {
    name: &'static str,
    program: String,
    leading: Vec<String>,
    null_sink: &'static str,
}

impl Tool {
    fn argv(&self, source: &str, destination: Option<&str>) -> Vec<String> {
        let mut v = vec![self.program.clone()];
        v.extend(self.leading.iter().cloned());
        v.push(source.to_owned());
        v.push(destination.unwrap_or(self.null_sink).to_owned());
        v
    }
}

/// Builds the release `vmsdk` binary into this bench's target directory and returns its path
/// (or `VMSDK_BIN` when set).
fn vmsdk_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VMSDK_BIN") {
        return Ok(path.into());
    }
    // This binary is TARGET/release/deps/copy_vs_nbdcopy-HASH.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or("cannot find the target directory")?
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
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p vmsdk failed: {status}"));
    }
    Ok(target.join("release").join("vmsdk"))
}

/// What every case shares.
struct Bench {
    tools: Vec<Tool>,
    size: u64,
    runs: usize,
    scratch: PathBuf,
    gnu_time: bool,
}

impl Bench {
    /// Copies `source` into `destination` (the null sink when `None`) with every tool, `runs`
    /// times each, interleaved, and prints the table.
    fn run_case(&self, title: &str, source: &str, destination: Option<&str>) {
        let Bench {
            tools,
            size,
            runs,
            scratch,
            gnu_time,
        } = self;
        let (size, runs, gnu_time) = (*size, *runs, *gnu_time);
        let load_before = load_average();
        let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
        for _ in 0..runs {
            for (tool, out) in tools.iter().zip(&mut samples) {
                out.push(measure(&tool.argv(source, destination), scratch, gnu_time));
            }
        }
        println!(
            "\n{title}  (load average {load_before} before, {} after)",
            load_average()
        );
        println!(
            "  {:<16} {:>9} {:>8} {:>10} {:>13} {:>7}  all runs (s)",
            "tool", "median s", "MB/s", "×nbdcopy", "peak RSS MiB", "CPU s"
        );
        let medians: Vec<f64> = samples
            .iter()
            .map(|s| median(s.iter().map(|x| x.seconds).collect()))
            .collect();
        let reference = tools
            .iter()
            .position(|t| t.name == "nbdcopy")
            .map(|i| medians[i]);
        for ((tool, runs), secs) in tools.iter().zip(&samples).zip(&medians) {
            let ratio = reference.map_or("n/a".to_owned(), |r| format!("{:.2}", r / secs));
            let rss = runs.iter().map(|x| x.peak_rss_kib).max().flatten();
            let cpu: Option<Vec<f64>> = runs.iter().map(|x| x.cpu_seconds).collect();
            let all: Vec<String> = runs.iter().map(|x| format!("{:.2}", x.seconds)).collect();
            println!(
                "  {:<16} {:>9.3} {:>8.0} {:>10} {:>13} {:>7}  {}",
                tool.name,
                secs,
                size as f64 / secs / 1e6,
                ratio,
                rss.map_or("n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
                cpu.map_or("n/a".to_owned(), |c| format!("{:.2}", median(c))),
                all.join(" ")
            );
            if tool.name == "vmsdk disk copy" {
                let fast = reference.is_some_and(|r| r / secs >= GOAL_RATIO);
                let lean = rss.is_some_and(|k| k <= GOAL_RSS_KIB);
                println!(
                    "  goal ≥ {GOAL_RATIO}× nbdcopy and ≤ {} MiB: speed {}, memory {}",
                    GOAL_RSS_KIB / 1024,
                    if fast { "met" } else { "MISSED" },
                    if lean { "met" } else { "MISSED" }
                );
            }
        }
        for tool in tools {
            println!(
                "  $ {}",
                tool.argv(source, destination)
                    .iter()
                    .map(|a| if a.contains(['{', '"', '?', '&']) {
                        format!("'{a}'")
                    } else {
                        a.clone()
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("copy_vs_nbdcopy: run with `cargo bench` to measure");
        return;
    }
    let mib: u64 = std::env::var("DT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let runs: usize = std::env::var("DT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let size = mib << 20;
    if !(have("qemu-nbd") && have("nbdcopy")) {
        println!(
            "SKIPPED: qemu-nbd and nbdcopy are needed (apt-get install qemu-utils libnbd-bin)"
        );
        return;
    }
    let vmsdk = match vmsdk_binary() {
        Ok(path) => path,
        Err(e) => {
            println!("SKIPPED: no vmsdk binary: {e}");
            return;
        }
    };
    let gnu_time = Path::new(GNU_TIME).exists();
    if !gnu_time {
        println!("note: {GNU_TIME} is missing (apt-get install time): no peak RSS column");
    }
    let mut tools = vec![Tool {
        name: "nbdcopy",
        program: "nbdcopy".into(),
        leading: Vec::new(),
        null_sink: "null:",
    }];
    if have("qemu-img") {
        tools.push(Tool {
            name: "qemu-img convert",
            program: "qemu-img".into(),
            leading: ["convert", "-n", "-f", "raw", "-O", "raw"]
                .map(String::from)
                .into(),
            null_sink: r#"json:{"file.driver":"null-co","file.size":"1E"}"#,
        });
    } else {
        println!("note: qemu-img is missing (apt-get install qemu-utils): no qemu-img rows");
    }
    tools.push(Tool {
        name: "vmsdk disk copy",
        program: vmsdk.display().to_string(),
        leading: ["disk", "copy", "--no-progress"].map(String::from).into(),
        null_sink: "null:",
    });

    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let full = dir.path().join("full.img");
    let sparse = dir.path().join("sparse.img");
    write_image(&full, size, size);
    write_image(&sparse, size, size / 2);
    println!(
        "{mib} MiB images in {}, median of {runs} interleaved runs, {} CPUs, MB/s = {size} \
         bytes / median s / 1e6, ×nbdcopy = nbdcopy's median s / the tool's",
        dir.path().display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let bench = Bench {
        tools,
        size,
        runs,
        scratch: dir.path().to_owned(),
        gnu_time,
    };

    for (name, image) in [("random", &full), ("half-sparse", &sparse)] {
        let server = qemu_nbd(dir.path(), image, name);
        bench.run_case(
            &format!("qemu-nbd {name} image → null"),
            &server.uri("disk"),
            None,
        );
    }

    if !have("nbdkit") {
        println!(
            "SKIPPED: nbdkit is needed for the delay and write cases (apt-get install nbdkit)"
        );
        return;
    }
    let image = full.display().to_string();
    let server = nbdkit(
        dir.path(),
        "delay",
        &["-r", "--filter=delay", "file", &image, "delay-read=1ms"],
    );
    bench.run_case(
        "nbdkit file random image, delay filter 1 ms per read → null",
        &server.uri(""),
        None,
    );
    drop(server);

    let server = nbdkit(dir.path(), "memory", &["memory", &format!("size={size}")]);
    let uri = server.uri("");
    // Warm-up: the first write pays for nbdkit's page allocation.
    measure(&bench.tools[0].argv(&image, Some(&uri)), dir.path(), false);
    bench.run_case("local random file → nbdkit memory", &image, Some(&uri));
}
