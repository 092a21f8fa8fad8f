//! Copies the same NBD exports with `nbdcopy` (Debian 12's 1.14 on the machine, Debian 13's
//! 1.22 in the peer root) and `vmsdk disk copy`, each run as a whole process under GNU time,
//! and prints seconds, MB/s, the speed ratio to each nbdcopy, peak RSS and CPU time. Also
//! `vmsdk disk checksum` against `nbdcopy-1.24 --blkhash … null:`.
//!
//! ```text
//! cargo bench -p disk-transport --bench copy_vs_nbdcopy            # 2 GiB images, 3 runs
//! DT_BENCH_MIB=512 DT_BENCH_RUNS=5 cargo bench -p disk-transport --bench copy_vs_nbdcopy
//! DT_BENCH_ONLY=null,checksum cargo bench ...   # cases whose title contains a word
//! VMSDK_BIN=/path/to/vmsdk cargo bench ...                          # skip building vmsdk
//! ```
//!
//! Equal work: every tool flushes the destination at the end (vmsdk always does; nbdcopy gets
//! `--flush`), every destination file is deleted before each run so each tool creates it, and
//! sources are page-cached images in /dev/shm.
//!
//! Servers, each of both generations where the peer root (`cargo xtask peer-root`, under
//! `<target>/peer-root/trixie` or `$VMSDK_TRIXIE_ROOT`) exists: qemu-nbd 7.2 and 10.0 (`-r -t -e
//! 8`, so multi-conn clients may open several connections) serving a fully random image and a
//! half-sparse one (random first half, a hole after), each copied to `null:`, to a file on tmpfs
//! and to a file on disk (`/var/tmp`); nbdkit 1.32 and 1.42's file plugin behind the delay
//! filter, 1 ms per read (latency bound: requests in flight and connections decide); and for
//! the checksums, qemu-nbd 10.0 serving 1 GiB images.
//!
//! Programs of the peer root run as the test harness runs them (`tests/src/peers.rs`): in a
//! private mount namespace (`unshare`), with `/proc`, `/sys`, `/dev` and the bench's scratch
//! directories bind-mounted into the root, then `chroot`; the namespace and its mounts vanish
//! with the process. Every tool is timed by GNU time (`%e %M %U %S`, 10 ms resolution) running
//! next to it — inside the root for its programs (a copy of the machine's `/usr/bin/time` in
//! the scratch directory) — so the namespace set-up is not counted against nbdcopy 1.22.
//! Runs of the tools are interleaved (A, B, C, A, B, C, ...) so that load from other jobs
//! spreads over all of them; the load average before and after each case is printed. Beside
//! each tool's own CPU seconds, `server s` is what the NBD server (all its threads, from
//! `/proc/PID/stat`) spent during that tool's runs: on two CPUs the server's share bounds how
//! much faster any client can be.
//! Needs qemu-nbd, nbdkit, nbdcopy and GNU time (`apt-get install qemu-utils nbdkit libnbd-bin
//! time`); missing tools or a missing root skip their cases with a message. Run as root (the
//! peer root needs mounts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{load_average, median};

/// Where GNU time lives on Debian.
const GNU_TIME: &str = "/usr/bin/time";

/// Goals from the issue ("A faster engine"), as times nbdcopy 1.22's speed.
const GOAL_COPY: f64 = 1.25;
const GOAL_DELAY: f64 = 1.1;
const GOAL_CHECKSUM: f64 = 1.0;

/// Builds the private mounts and `exec`s chroot (as `tests/src/peers.rs` does). Arguments: the
/// root, the number of bind mounts, those directories, then chroot's own arguments.
const CHROOT_SCRIPT: &str = r#"set -e
root=$1; n=$2; shift 2
for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
while [ "$n" -gt 0 ]; do
  p=$1; shift; n=$((n - 1))
  mkdir -p "$root$p"
  mount --bind "$p" "$root$p"
done
exec chroot "$@""#;

/// Where a program comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Generation {
    /// Debian 12, installed on the machine.
    Host,
    /// Debian 13, in the peer root.
    Trixie,
}

/// How to start programs of either generation.
struct Env {
    /// The Debian 13 root, when it exists.
    root: Option<PathBuf>,
    /// Directories programs in the root must see.
    binds: Vec<PathBuf>,
    /// GNU time for programs in the root (a copy inside a bound directory).
    root_time: PathBuf,
}

impl Env {
    /// `argv` as a command of `generation`, optionally under GNU time writing `time_file`.
    fn command(
        &self,
        generation: Generation,
        argv: &[String],
        time_file: Option<&Path>,
    ) -> Command {
        let mut full: Vec<String> = Vec::new();
        if let Some(file) = time_file {
            let time = match generation {
                Generation::Host => GNU_TIME.to_owned(),
                Generation::Trixie => self.root_time.display().to_string(),
            };
            full.extend([time, "-f".into(), "%e %M %U %S".into(), "-o".into()]);
            full.push(file.display().to_string());
        }
        full.extend(argv.iter().cloned());
        match generation {
            Generation::Host => {
                let mut c = Command::new(&full[0]);
                c.args(&full[1..]);
                c
            }
            Generation::Trixie => {
                let root = self.root.as_ref().expect("the peer root exists");
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--"])
                    .args(["sh", "-c", CHROOT_SCRIPT, "sh"])
                    .arg(root)
                    .arg(self.binds.len().to_string())
                    .args(&self.binds)
                    .arg(root)
                    .args(&full)
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
                    .env("LANG", "C.UTF-8");
                c
            }
        }
    }

    /// Whether `program` runs in `generation`.
    fn have(&self, generation: Generation, program: &str) -> bool {
        if generation == Generation::Trixie && self.root.is_none() {
            return false;
        }
        self.command(generation, &[program.to_owned(), "--version".into()], None)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The first line of `program --version` in `generation`.
    fn version(&self, generation: Generation, program: &str) -> String {
        self.command(generation, &[program.to_owned(), "--version".into()], None)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "?".into())
    }
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// CPU seconds the server has used so far, all its threads (its I/O workers too).
    fn cpu_seconds(&self) -> f64 {
        common::process_cpu_seconds(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The child is the server itself (unshare, sh and chroot exec), so this ends it and
        // with it its mount namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn qemu_nbd(env: &Env, generation: Generation, dir: &Path, image: &Path, tag: &str) -> Server {
    let socket = dir.join(format!("{tag}.sock"));
    let argv: Vec<String> = [
        "qemu-nbd", "-r", "-t", "-e", "8", "-x", "disk", "-f", "raw", "-k",
    ]
    .map(String::from)
    .into_iter()
    .chain([socket.display().to_string(), image.display().to_string()])
    .collect();
    Server::start(env.command(generation, &argv, None), socket)
}

fn nbdkit(env: &Env, generation: Generation, dir: &Path, tag: &str, args: &[&str]) -> Server {
    let socket = dir.join(format!("{tag}.sock"));
    let mut argv: Vec<String> = ["nbdkit", "-f", "--exit-with-parent", "-U"]
        .map(String::from)
        .into();
    argv.push(socket.display().to_string());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    Server::start(env.command(generation, &argv, None), socket)
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

/// One finished run of a tool.
struct Sample {
    seconds: f64,
    peak_rss_kib: u64,
    /// User plus system CPU seconds of the tool's process.
    cpu_seconds: f64,
    /// CPU seconds the NBD server spent meanwhile.
    server_cpu_seconds: f64,
    /// The tool's standard output (the checksum, for checksum runs).
    stdout: String,
}

/// A copying program: its generation, the words before the source and destination.
struct Tool {
    name: String,
    generation: Generation,
    leading: Vec<String>,
    /// Whether the destination follows the source (`vmsdk disk checksum` takes none).
    takes_destination: bool,
}

impl Tool {
    fn new(name: impl Into<String>, generation: Generation, leading: &[&str]) -> Tool {
        Tool {
            name: name.into(),
            generation,
            leading: leading.iter().map(|w| (*w).to_owned()).collect(),
            takes_destination: true,
        }
    }

    fn argv(&self, source: &str, destination: &str) -> Vec<String> {
        let mut v = self.leading.clone();
        v.push(source.to_owned());
        if self.takes_destination {
            v.push(destination.to_owned());
        }
        v
    }
}

/// Builds the release `vmsdk` binary into this bench's target directory and returns its path
/// (or `VMSDK_BIN` when set), with the target directory.
fn vmsdk_binary(target: &Path) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VMSDK_BIN") {
        return Ok(path.into());
    }
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
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p vmsdk failed: {status}"));
    }
    Ok(target.join("release").join("vmsdk"))
}

/// The target directory: this binary is TARGET/release/deps/copy_vs_nbdcopy-HASH.
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .find(|a| a.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

/// What every case shares.
struct Bench {
    env: Env,
    runs: usize,
    scratch: PathBuf,
    /// Words a case title must contain one of (`DT_BENCH_ONLY`), empty for all.
    only: Vec<String>,
}

impl Bench {
    fn wanted(&self, title: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| title.contains(w.as_str()))
    }

    /// Runs `argv` of `generation` to completion under GNU time.
    fn measure(&self, generation: Generation, argv: &[String], server: &Server) -> Sample {
        let time_file = self.scratch.join("time.out");
        let _ = std::fs::remove_file(&time_file);
        let server_before = server.cpu_seconds();
        let output = self
            .env
            .command(generation, argv, Some(&time_file))
            .stdin(Stdio::null())
            .output()
            .expect("run the tool");
        let server_cpu_seconds = server.cpu_seconds() - server_before;
        assert!(
            output.status.success(),
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        // GNU time's last line is ours (a failing command adds one before it).
        let report = std::fs::read_to_string(&time_file).unwrap_or_default();
        let fields: Vec<f64> = report
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let [seconds, rss, user, system] = fields[..] else {
            panic!("no GNU time report for {}: {report:?}", argv.join(" "));
        };
        Sample {
            seconds,
            peak_rss_kib: rss as u64,
            cpu_seconds: user + system,
            server_cpu_seconds,
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        }
    }

    /// Runs every tool `runs` times, interleaved, on `source` → `destination` (a path to
    /// delete before each run, or `null:`), and prints the table with the goal against the
    /// newest nbdcopy in `tools`.
    fn run_case(
        &self,
        title: &str,
        size: u64,
        tools: &[Tool],
        (server, export): (&Server, &str),
        destination: &str,
        goal: f64,
    ) {
        let source = &server.uri(export);
        if !self.wanted(title) {
            return;
        }
        let load_before = load_average();
        let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
        for _ in 0..self.runs {
            for (tool, out) in tools.iter().zip(&mut samples) {
                if destination != "null:" {
                    let _ = std::fs::remove_file(destination);
                }
                out.push(self.measure(tool.generation, &tool.argv(source, destination), server));
            }
        }
        if destination != "null:" {
            let _ = std::fs::remove_file(destination);
        }
        println!(
            "\n{title}  (load average {load_before} before, {} after)",
            load_average()
        );
        let medians: Vec<f64> = samples
            .iter()
            .map(|s| median(s.iter().map(|x| x.seconds).collect()))
            .collect();
        let references: Vec<(usize, &Tool)> = tools
            .iter()
            .enumerate()
            .filter(|(_, t)| t.name.starts_with("nbdcopy"))
            .collect();
        print!("  {:<22} {:>8} {:>7}", "tool", "median s", "MB/s");
        for (_, r) in &references {
            print!(" {:>13}", format!("×{}", r.name));
        }
        println!(
            " {:>9} {:>6} {:>9}  all runs (s)",
            "RSS MiB", "CPU s", "server s"
        );
        for ((tool, runs), secs) in tools.iter().zip(&samples).zip(&medians) {
            print!(
                "  {:<22} {:>8.2} {:>7.0}",
                tool.name,
                secs,
                size as f64 / secs.max(0.01) / 1e6
            );
            for (i, _) in &references {
                print!(" {:>13.2}", medians[*i] / secs.max(0.01));
            }
            let rss = runs.iter().map(|x| x.peak_rss_kib).max().unwrap_or(0);
            let cpu = median(runs.iter().map(|x| x.cpu_seconds).collect());
            let server_cpu = median(runs.iter().map(|x| x.server_cpu_seconds).collect());
            let all: Vec<String> = runs.iter().map(|x| format!("{:.2}", x.seconds)).collect();
            println!(
                " {:>9.1} {:>6.2} {:>9.2}  {}",
                rss as f64 / 1024.0,
                cpu,
                server_cpu,
                all.join(" ")
            );
        }
        // The goal is against the newest nbdcopy in the case.
        let vmsdk = tools.iter().position(|t| t.name.starts_with("vmsdk"));
        let reference = references.last().map(|(i, _)| *i);
        if let (Some(v), Some(r)) = (vmsdk, reference) {
            let ratio = medians[r] / medians[v].max(0.01);
            let rss = |i: usize| samples[i].iter().map(|x| x.peak_rss_kib).max().unwrap_or(0);
            println!(
                "  goal ≥ {goal}× {} and peak RSS ≤ its: speed {:.3}× {}, RSS {} vs {} MiB {}",
                tools[r].name,
                ratio,
                if ratio >= goal { "met" } else { "MISSED" },
                rss(v) / 1024,
                rss(r) / 1024,
                if rss(v) <= rss(r) { "met" } else { "MISSED" }
            );
        }
        let outputs: Vec<&str> = samples
            .iter()
            .flat_map(|s| s.iter().map(|x| x.stdout.as_str()))
            .filter(|o| o.len() == 64 && o.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        if !outputs.is_empty() {
            assert!(
                outputs.iter().all(|o| *o == outputs[0]),
                "the tools disagree on the checksum: {outputs:?}"
            );
            println!("  every run printed the same digest {}", outputs[0]);
        }
        for tool in tools {
            let words: Vec<String> = tool
                .argv(source, destination)
                .iter()
                .map(|a| {
                    if a.contains(['?', '&']) {
                        format!("'{a}'")
                    } else {
                        a.clone()
                    }
                })
                .collect();
            let place = match tool.generation {
                Generation::Host => "",
                Generation::Trixie => "(peer root) ",
            };
            println!("  $ {place}{}", words.join(" "));
        }
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("copy_vs_nbdcopy: run with `cargo bench` to measure");
        return;
    }
    let env_number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mib = env_number("DT_BENCH_MIB", 2048);
    let runs = env_number("DT_BENCH_RUNS", 3).max(1) as usize;
    let size = mib << 20;
    let only: Vec<String> = std::env::var("DT_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if !Path::new(GNU_TIME).exists() {
        println!("SKIPPED: {GNU_TIME} is needed for times and peak RSS (apt-get install time)");
        return;
    }
    let Some(target) = target_dir() else {
        println!("SKIPPED: cannot find the target directory");
        return;
    };
    let vmsdk = match vmsdk_binary(&target) {
        Ok(path) => path,
        Err(e) => {
            println!("SKIPPED: no vmsdk binary: {e}");
            return;
        }
    };
    let root = std::env::var_os("VMSDK_TRIXIE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("peer-root/trixie"));
    let root = root.join("vmsdk-peer-root.stamp").is_file().then_some(root);
    if root.is_none() {
        println!("note: no peer root (cargo xtask peer-root): Debian 13 peers skipped");
    }

    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root_time = dir.path().join("gnu-time");
    std::fs::copy(GNU_TIME, &root_time).unwrap();
    let env = Env {
        root,
        binds: vec![dir.path().to_owned(), disk_dir.path().to_owned()],
        root_time,
    };
    let generations: Vec<Generation> = [Generation::Host, Generation::Trixie]
        .into_iter()
        .filter(|g| *g == Generation::Host || env.root.is_some())
        .collect();
    let gen_name = |g: Generation| match g {
        Generation::Host => "Debian 12",
        Generation::Trixie => "Debian 13",
    };

    let vmsdk_path = vmsdk.display().to_string();
    let vmsdk_copy = Tool::new(
        "vmsdk disk copy",
        Generation::Host,
        &[&vmsdk_path, "disk", "copy", "--no-progress"],
    );
    let mut tools: Vec<Tool> = Vec::new();
    for g in &generations {
        if env.have(*g, "nbdcopy") {
            let version = env.version(*g, "nbdcopy");
            let short = version.split_whitespace().nth(1).unwrap_or("?");
            let short = short.rsplit_once('.').map_or(short, |(a, _)| a);
            println!("{}: {version}", gen_name(*g));
            tools.push(Tool::new(
                format!("nbdcopy {short}"),
                *g,
                &["nbdcopy", "--flush"],
            ));
        }
    }
    if tools.is_empty() {
        println!("SKIPPED: nbdcopy is needed (apt-get install libnbd-bin)");
        return;
    }
    tools.push(vmsdk_copy);

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
        env,
        runs,
        scratch: dir.path().to_owned(),
        only,
    };
    let env = &bench.env;
    let tmpfs_out = dir.path().join("out.img").display().to_string();
    let disk_out = disk_dir.path().join("out.img").display().to_string();

    for g in &generations {
        if !env.have(*g, "qemu-nbd") {
            println!("SKIPPED: qemu-nbd of {} is missing", gen_name(*g));
            continue;
        }
        let server_version = env.version(*g, "qemu-nbd");
        for (name, image) in [("random", &full), ("half-sparse", &sparse)] {
            let server = qemu_nbd(env, *g, dir.path(), image, name);
            for (sink, destination) in [
                ("null:", "null:"),
                ("a file on tmpfs", tmpfs_out.as_str()),
                ("a file on disk", disk_out.as_str()),
            ] {
                bench.run_case(
                    &format!("{server_version}, {name} image → {sink}"),
                    size,
                    &tools,
                    (&server, "disk"),
                    destination,
                    GOAL_COPY,
                );
            }
        }
    }

    for g in &generations {
        if !env.have(*g, "nbdkit") {
            println!("SKIPPED: nbdkit of {} is missing", gen_name(*g));
            continue;
        }
        let title = format!(
            "{}, file plugin, delay filter 1 ms per read, random image → null:",
            env.version(*g, "nbdkit")
        );
        if !bench.wanted(&title) {
            continue;
        }
        let image = full.display().to_string();
        let server = nbdkit(
            env,
            *g,
            dir.path(),
            "delay",
            &["-r", "--filter=delay", "file", &image, "delay-read=1ms"],
        );
        bench.run_case(&title, size, &tools, (&server, ""), "null:", GOAL_DELAY);
    }

    // Checksums: 1 GiB images through qemu-nbd 10.0, against nbdcopy 1.24's --blkhash.
    let checksum_size = size.min(1 << 30);
    if env.root.is_none()
        || !env.have(Generation::Trixie, "nbdcopy-1.24")
        || !env.have(Generation::Trixie, "qemu-nbd")
    {
        println!("SKIPPED: checksums need nbdcopy-1.24 and qemu-nbd in the peer root");
        return;
    }
    let checksum_tools = [
        Tool::new(
            "nbdcopy 1.24 --blkhash",
            Generation::Trixie,
            &["nbdcopy-1.24", "--blkhash"],
        ),
        Tool {
            takes_destination: false,
            ..Tool::new(
                "vmsdk disk checksum",
                Generation::Host,
                &[&vmsdk_path, "disk", "checksum", "--no-progress"],
            )
        },
    ];
    let server_version = env.version(Generation::Trixie, "qemu-nbd");
    for (name, random) in [
        ("random", checksum_size),
        ("half-sparse", checksum_size / 2),
    ] {
        let title = format!(
            "checksum sha256/64k of a {} MiB {name} image through {server_version}",
            checksum_size >> 20
        );
        if !bench.wanted(&title) {
            continue;
        }
        let image = dir.path().join(format!("checksum-{name}.img"));
        write_image(&image, checksum_size, random);
        let server = qemu_nbd(env, Generation::Trixie, dir.path(), &image, "checksum");
        bench.run_case(
            &title,
            checksum_size,
            &checksum_tools,
            (&server, "disk"),
            "null:",
            GOAL_CHECKSUM,
        );
        drop(server);
        let _ = std::fs::remove_file(&image);
    }
}
