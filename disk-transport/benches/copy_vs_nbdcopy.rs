//! Copies the same NBD exports with disk-transport's copy engine and with libnbd's `nbdcopy`
//! in one run, and prints the medians and the ratio.
//!
//! ```text
//! cargo bench -p disk-transport --bench copy_vs_nbdcopy            # 2 GiB images, 3 runs
//! DT_BENCH_MIB=512 DT_BENCH_RUNS=5 cargo bench -p disk-transport --bench copy_vs_nbdcopy
//! ```
//!
//! Cases (as in the project's research notes, §3.3): qemu-nbd serving a fully random image and a
//! half-sparse one, read into a null sink; and a local random file written into an nbdkit
//! memory export. Needs qemu-nbd, nbdkit and nbdcopy (`apt-get install qemu-utils nbdkit
//! libnbd-bin`); missing tools skip their cases with a message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk_transport::copy::{copy, CopyOptions};
use disk_transport::file::{FileDisk, FileOptions};
use disk_transport::nbd::{NbdDisk, NbdOptions};
use disk_transport::null::NullDisk;
use disk_transport::{Disk, NbdAddress};

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

fn nbdkit_memory(dir: &Path, size: u64) -> Server {
    let socket = dir.join("mem.sock");
    let mut c = Command::new("nbdkit");
    c.args(["-f", "--exit-with-parent", "-U"])
        .arg(&socket)
        .arg("memory")
        .arg(format!("size={size}"));
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

fn time_command(args: &[&str]) -> f64 {
    let t = Instant::now();
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run");
    assert!(status.success(), "{args:?} failed");
    t.elapsed().as_secs_f64()
}

fn time_ours(src: &dyn Disk, dst: &dyn Disk, options: &CopyOptions) -> f64 {
    let t = Instant::now();
    let report = copy(src, dst, options, &mut |_| {}).expect("copy");
    assert_eq!(report.progress.done, report.progress.total);
    t.elapsed().as_secs_f64()
}

fn report(case: &str, size: u64, nbdcopy: f64, ours: &[(&str, f64)]) {
    let mbs = |s: f64| size as f64 / s / 1e6;
    println!("{case}");
    println!(
        "  {:<34} {:>8.3} s {:>8.0} MB/s",
        "nbdcopy (defaults)",
        nbdcopy,
        mbs(nbdcopy)
    );
    for (name, t) in ours {
        println!(
            "  {:<34} {:>8.3} s {:>8.0} MB/s   nbdcopy/ours = {:.2}",
            name,
            t,
            mbs(*t),
            nbdcopy / t
        );
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
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.img");
    let sparse = dir.path().join("sparse.img");
    write_image(&full, size, size);
    write_image(&sparse, size, size / 2);
    println!(
        "{mib} MiB images, median of {runs} runs, {} CPUs",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    for (name, image) in [("random", &full), ("half sparse", &sparse)] {
        let server = qemu_nbd(dir.path(), image, &name.replace(' ', "-"));
        let uri = server.uri("disk");
        let nbdcopy = median(
            (0..runs)
                .map(|_| time_command(&["nbdcopy", &uri, "null:"]))
                .collect(),
        );
        let opts = |n| {
            NbdOptions::new(NbdAddress::Unix(server.socket.clone()))
                .export("disk")
                .read_only(true)
                .connections(n)
        };
        let one = NbdDisk::connect(&opts(1)).unwrap();
        let two = NbdDisk::connect(&opts(2)).unwrap();
        let null = NullDisk::new(size);
        let defaults = CopyOptions::default();
        let t1 = median(
            (0..runs)
                .map(|_| time_ours(&one, &null, &defaults))
                .collect(),
        );
        let t2 = median(
            (0..runs)
                .map(|_| time_ours(&two, &null, &defaults))
                .collect(),
        );
        report(
            &format!("qemu-nbd {name} image → null"),
            size,
            nbdcopy,
            &[
                ("disk-transport, 1 connection", t1),
                ("disk-transport, 2 connections", t2),
            ],
        );
    }

    if have("nbdkit") {
        let server = nbdkit_memory(dir.path(), size);
        let uri = server.uri("");
        // Warm-up: the first write pays for nbdkit's page allocation.
        time_command(&["nbdcopy", full.to_str().unwrap(), &uri]);
        let nbdcopy = median(
            (0..runs)
                .map(|_| time_command(&["nbdcopy", full.to_str().unwrap(), &uri]))
                .collect(),
        );
        let src = FileDisk::open(
            &full,
            &FileOptions {
                read_only: true,
                ..FileOptions::default()
            },
        )
        .unwrap();
        let opts = |n| NbdOptions::new(NbdAddress::Unix(server.socket.clone())).connections(n);
        let one = NbdDisk::connect(&opts(1)).unwrap();
        let two = NbdDisk::connect(&opts(2)).unwrap();
        let defaults = CopyOptions::default();
        let t1 = median(
            (0..runs)
                .map(|_| time_ours(&src, &one, &defaults))
                .collect(),
        );
        let t2 = median(
            (0..runs)
                .map(|_| time_ours(&src, &two, &defaults))
                .collect(),
        );
        report(
            "local random file → nbdkit memory",
            size,
            nbdcopy,
            &[
                ("disk-transport, 1 connection", t1),
                ("disk-transport, 2 connections", t2),
            ],
        );
    } else {
        println!("SKIPPED: nbdkit is needed for the write case (apt-get install nbdkit)");
    }
}
