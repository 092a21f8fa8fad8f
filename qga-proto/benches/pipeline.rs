//! `guest-get-time` round trips per second through one [`AsyncClient`] connection to a live
//! qemu-ga 10 over a Unix socket: one call at a time against many tasks pipelining theirs, in
//! one run.
//!
//! ```sh
//! cargo bench -p qga-proto --bench pipeline
//! ```
//!
//! The agent is Debian 13's qemu-ga 10.0 from the peer root `cargo xtask peer-root` builds
//! (`target/peer-root/trixie`, or `$VMSDK_TRIXIE_ROOT`), started as root in a private mount
//! namespace and chroot, as `nobody`, with every state-changing RPC blocked and only the
//! handshake, `guest-info` and `guest-get-time` allowed. `QGA_BENCH_SOCKET=/path` measures an
//! agent that is already running instead.

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qga_proto::{AsyncClient, ClientConfig, GuestAgent};
use tokio::net::UnixStream;

/// Calls per measured batch.
const BATCH: usize = 2000;
/// Tasks calling concurrently in the pipelined case.
const TASKS: usize = 64;

/// Everything that changes the machine: never reachable on the agent started here.
const BLOCKED: &str = "guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,\
guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-fstrim,guest-set-time,\
guest-set-vcpus,guest-set-memory-blocks,guest-set-user-password,guest-ssh-add-authorized-keys,\
guest-ssh-remove-authorized-keys,guest-file-open,guest-file-write,guest-exec";
const ALLOWED: &str = "guest-sync-delimited,guest-sync,guest-info,guest-ping,guest-get-time";

/// Bind mounts and chroot, in the private mount namespace `unshare` gives the agent.
const CHROOT: &str = r#"set -e
root=$1; dir=$2; shift 2
for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mkdir -p "$root$dir"
mount --bind "$dir" "$root$dir"
exec chroot --userspec=nobody:nogroup "$root" "$@""#;

/// A qemu-ga 10 of the Debian 13 root, killed by PID when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn trixie_root() -> PathBuf {
    std::env::var_os("VMSDK_TRIXIE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peer-root/trixie"))
}

fn start_agent() -> Result<Agent, String> {
    let root = trixie_root();
    let binary = root.join("usr/sbin/qemu-ga");
    if !binary.is_file() {
        return Err(format!(
            "no qemu-ga 10 at {} (build the root with `cargo xtask peer-root`, as root)",
            binary.display()
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("qga-bench-")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534))
        .map_err(|e| format!("chown {} to nobody (needs root): {e}", dir.path().display()))?;
    let socket = dir.path().join("qga.sock");
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            CHROOT,
            "sh",
        ])
        .arg(&root)
        .arg(dir.path())
        .arg("/usr/sbin/qemu-ga")
        .args(["-m", "unix-listen", "-p"])
        .arg(&socket)
        .arg("-t")
        .arg(dir.path())
        .arg(format!("--block-rpcs={BLOCKED}"))
        .arg(format!("--allow-rpcs={ALLOWED}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start unshare: {e}"))?;
    let mut agent = Agent {
        child,
        socket,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.socket.exists() {
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Err(format!("qemu-ga exited at start: {status}"));
        }
        if Instant::now() > deadline {
            return Err("qemu-ga did not create its socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(agent)
}

async fn one_at_a_time(client: &AsyncClient<UnixStream>, calls: usize) {
    for _ in 0..calls {
        client.time().await.expect("guest-get-time");
    }
}

async fn pipelined(client: &Arc<AsyncClient<UnixStream>>, calls: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let client = client.clone();
        let share = calls / TASKS + usize::from(task < calls % TASKS);
        tasks.spawn(async move { one_at_a_time(&client, share).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("caller task");
    }
}

fn round_trips(c: &mut Criterion) {
    let (_agent, socket) = match std::env::var_os("QGA_BENCH_SOCKET") {
        Some(socket) => (None, PathBuf::from(socket)),
        None => match start_agent() {
            Ok(agent) => {
                let socket = agent.socket.clone();
                (Some(agent), socket)
            }
            Err(why) => {
                eprintln!("pipeline benchmark skipped: {why}");
                return;
            }
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = ClientConfig::default().max_in_flight(TASKS);
    let client = Arc::new(
        rt.block_on(AsyncClient::connect_unix(&socket, config))
            .expect("connect to qemu-ga"),
    );
    let version = rt.block_on(client.info()).expect("guest-info").version;
    eprintln!("qemu-ga {version} at {}", socket.display());

    // A quick interleaved comparison for the summary line, beside criterion's figures.
    let mut ratios = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        rt.block_on(one_at_a_time(&client, BATCH));
        let serial = started.elapsed();
        let started = Instant::now();
        rt.block_on(pipelined(&client, BATCH));
        let piped = started.elapsed();
        ratios.push(serial.as_secs_f64() / piped.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    eprintln!(
        "pipelined / one at a time, {BATCH} guest-get-time calls, 5 interleaved rounds: median \
         {:.2}x (min {:.2}x, max {:.2}x)",
        ratios[2], ratios[0], ratios[4]
    );

    let mut group = c.benchmark_group(format!("guest-get-time round trips, qemu-ga {version}"));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("one at a time", |b| {
        b.iter(|| rt.block_on(one_at_a_time(&client, BATCH)))
    });
    group.bench_function(format!("pipelined, {TASKS} tasks"), |b| {
        b.iter(|| rt.block_on(pipelined(&client, BATCH)))
    });
    group.finish();
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
