//! Benchmark (not a test): `vmsdk disk copy` against nbdcopy 1.22 into the same NBD-over-TLS
//! export, with a pre-shared key and with X.509 certificates.
//!
//! ```sh
//! cargo build --release -p vmsdk --features cli && cargo build --release -p vmsdk-tests --bin tls_copy_bench
//! target/release/tls_copy_bench [SIZE_MIB] [RUNS]      # default 1024 MiB, 1 run; 5 runs for a median
//! ```
//!
//! The source is a local file of random data; the destination is nbdkit 1.42's memory plugin
//! (Debian 13 peer root) behind `--tls=require`, reached over `nbds+unix://`, a fresh server
//! for every copy. Both tools flush the destination at the end (`vmsdk disk copy` always does;
//! nbdcopy is given `--flush`) and use their default connections and requests in flight. Wall
//! time, CPU time and peak RSS come from GNU time (`/usr/bin/time -f '%e %U %S %M'`) around
//! each process;
//! after each copy the export's SHA-256 is checked against the source's.

use std::path::Path;
use std::process::{Command, Stdio};

use disk_transport::{open_uri, OpenFlags};
use vmsdk_tests::disk::{nbd_tool, random_image, sha256_file, NbdServer};
use vmsdk_tests::peers::Generation;
use vmsdk_tests::tls::{TlsFiles, PSK_USER};

/// Wall seconds, CPU seconds (user + system) and peak RSS (KiB) of `command`, under GNU time.
fn timed(command: &Command) -> (f64, f64, u64) {
    let mut timed = Command::new("/usr/bin/time");
    timed.args(["-f", "%e %U %S %M"]).arg(command.get_program());
    timed.args(command.get_args());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let out = timed
        .stdout(Stdio::null())
        .output()
        .expect("run /usr/bin/time");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(out.status.success(), "{:?} failed:\n{stderr}", command);
    let mut it = last.split_whitespace();
    let mut number = || -> f64 { it.next().and_then(|v| v.parse().ok()).expect("time output") };
    let secs = number();
    let cpu = number() + number();
    let kib = number() as u64;
    (secs, cpu, kib)
}

/// The export's SHA-256, read back with vmsdk's own client.
fn export_sha(uri: &str, size: u64) -> String {
    let disk = open_uri(uri, OpenFlags::read_only()).expect("open the export to check it");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("back.img");
    let dst = disk_transport::file::FileDisk::create(&out, size).unwrap();
    disk_transport::copy::copy(
        disk.as_ref(),
        &dst,
        &disk_transport::copy::CopyOptions::default().destination_is_zero(true),
        &mut |_| {},
    )
    .expect("read the export back");
    drop(dst);
    sha256_file(&out)
}

fn server(files: &TlsFiles, psk: bool, size_mib: u64) -> NbdServer {
    let creds = if psk {
        format!("--tls-psk={}", files.psk_file().display())
    } else {
        format!("--tls-certificates={}", files.server_dir().display())
    };
    NbdServer::nbdkit_in(
        Generation::Trixie,
        &["--tls=require", &creds, "memory", &format!("{size_mib}M")],
    )
    .expect("nbdkit in the Debian 13 peer root (run `cargo xtask peer-root`)")
}

fn uri(files: &TlsFiles, server: &NbdServer, psk: bool) -> String {
    if psk {
        format!(
            "nbds+unix://{PSK_USER}@/?socket={}&tls-psk-file={}",
            server.socket().display(),
            files.psk_file().display()
        )
    } else {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}&tls-hostname=localhost",
            server.socket().display(),
            files.anonymous_client_dir().display()
        )
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().map_or(1024, |a| a.parse().expect("SIZE_MIB"));
    let runs: usize = args.next().map_or(1, |a| a.parse().expect("RUNS"));
    let exe = std::env::current_exe().unwrap();
    let vmsdk = exe.parent().unwrap().join("vmsdk");
    assert!(
        vmsdk.is_file(),
        "{} is missing: cargo build --release -p vmsdk --features cli",
        vmsdk.display()
    );
    let files = TlsFiles::new();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let source = dir.path().join("source.img");
    random_image(&source, (size_mib << 20) as usize, 42);
    let expected = sha256_file(&source);
    let bytes = (size_mib << 20) as f64;
    println!(
        "{}; vmsdk {}",
        Generation::Trixie.versions(&["nbdkit", "nbdcopy"]),
        vmsdk.display()
    );
    println!("source: {size_mib} MiB of random data; destination: nbdkit memory, --tls=require");
    println!(
        "{:<8} {:<8} {:>8} {:>10} {:>8} {:>12}",
        "tls", "tool", "seconds", "MB/s", "CPU s", "peak RSS"
    );
    for psk in [true, false] {
        let mode = if psk { "PSK" } else { "X.509" };
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (i, tool) in ["vmsdk", "nbdcopy"].into_iter().enumerate() {
                let server = server(&files, psk, size_mib);
                let uri = uri(&files, &server, psk);
                let command = if i == 0 {
                    let mut c = Command::new(&vmsdk);
                    c.args(["disk", "copy", "--no-progress"])
                        .arg(&source)
                        .arg(&uri);
                    c
                } else {
                    nbd_tool(Generation::Trixie, "nbdcopy")
                        .expect("nbdcopy in the peer root")
                        .arg("--flush")
                        .arg(Path::new(&source))
                        .arg(&uri)
                        .to_command()
                };
                let (secs, cpu, kib) = timed(&command);
                assert_eq!(
                    export_sha(&uri, size_mib << 20),
                    expected,
                    "{tool} copy differs"
                );
                times[i].push(secs);
                println!(
                    "{mode:<8} {tool:<8} {secs:>8.2} {:>10.1} {cpu:>8.2} {:>8} MiB",
                    bytes / secs / 1e6,
                    kib / 1024
                );
            }
        }
        // Runs of one tool spread widely on a shared machine: the median is the figure, the
        // best is shown beside it.
        let [ours, theirs] = times.map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[t.len() / 2], t[0])
        });
        println!(
            "{mode}: vmsdk / nbdcopy throughput ratio {:.2}x (median of {runs}; best {:.2}x)",
            theirs.0 / ours.0,
            theirs.1 / ours.1
        );
    }
}
