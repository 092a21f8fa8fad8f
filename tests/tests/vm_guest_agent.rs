//! The host half of `cargo xtask vm-test`: qga-proto's clients against the Debian qemu-ga running
//! inside a QEMU guest, through the real virtio-serial path (QEMU chardev socket → virtio-serial
//! port → the guest's `/dev/virtio-ports/org.qemu.guest_agent.0`), and QEMU's QMP socket.
//!
//! The steps share one agent and end by shutting the guest down, so they run in order from this
//! program's own `main` (the test has `harness = false`) rather than as parallel `#[test]`s.
//! Without a VM (`VMSDK_VM_QGA_SOCKET` unset) it only says how to run it: `cargo xtask vm-test`
//! boots the VM and sets these variables:
//!
//! * `VMSDK_VM_QGA_SOCKET`, `VMSDK_VM_QMP_SOCKET`: the chardev and QMP sockets;
//! * `VMSDK_VM_KERNEL_RELEASE`: the kernel the guest booted;
//! * `VMSDK_VM_QGA_VERSION`: `qemu-ga -V` of the agent put into the guest;
//! * `VMSDK_VM_SOCKET_DIR`: a private directory for the NBD server's socket;
//! * `VMSDK_VM_DISK_SIZE`: the size of the guest's zero-filled virtio disk (node `disk0`);
//! * `VMSDK_VM_CPUS`: the number of vCPUs QEMU gave the guest;
//! * `VMSDK_VM_VMSDK_BIN`: the `vmsdk` CLI, whose `agent` command is run against the guest.
//! * `VMSDK_VM_DATA_NODE`: the node of the guest's qcow2 data disk (ext4 mounted at `/data`,
//!   written to all the time by the guest), which the live-backup step backs up.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qga_proto::cmd::{self, GuestExecArgs, GuestShutdownArgs};
use qga_proto::types::{GuestDiskBusType, GuestShutdownMode};
use qga_proto::{AsyncClient, Client, ClientConfig, GuestAgent, GuestAgentExt};
use qmp_proto::cmd::{
    self as qmp_cmd, BlockDirtyBitmap, BlockDirtyBitmapAddArgs, BlockExportAddArgs,
    BlockExportDelArgs, NbdServerStartArgs, TransactionAction, TransactionArgs,
};
use qmp_proto::types::RunState;
use qmp_proto::{EventFilter, Monitor, MonitorExt};
use serde_json::{json, Value};

type Step = Result<String, String>;

/// The role a child copy of this program plays in the resync step.
const KILLED_CLIENT_ARG: &str = "--killed-client";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == KILLED_CLIENT_ARG) {
        return match args.get(at + 1) {
            Some(socket) => killed_client(Path::new(socket)),
            None => ExitCode::from(2),
        };
    }
    // The expectations' own arithmetic, checked with or without a VM.
    if let Err(e) = check_expectations() {
        println!("vm_guest_agent: {e}");
        return ExitCode::FAILURE;
    }
    let Some(env) = Env::from_environment() else {
        // libtest-style arguments (e.g. `--list` from tooling) need no answer here.
        println!(
            "vm_guest_agent: skipped; it needs a running VM and is run by `cargo xtask vm-test`"
        );
        return ExitCode::SUCCESS;
    };
    let mut failed = 0;
    let mut run = |name: &str, step: &dyn Fn(&Env) -> Step| {
        let started = Instant::now();
        let outcome = step(&env);
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(detail) => println!("vm_guest_agent: {name} ok in {secs:.1} s ({detail})"),
            Err(detail) => {
                failed += 1;
                println!("vm_guest_agent: {name} FAILED after {secs:.1} s: {detail}");
            }
        }
    };
    run("qmp: VM running", &qmp_running);
    run("blocking client: first contact and guest-info", &guest_info);
    run("blocking client: guest-get-osinfo and host name", &osinfo);
    run(
        "blocking client: guest-exec with captured output",
        &exec_blocking,
    );
    run("async client: exec_wait", &exec_async);
    run(
        "vmsdk agent CLI: osinfo and cpustats over qga+unix://",
        &cli_agent,
    );
    run(
        "resync after a client killed mid-command",
        &resync_after_kill,
    );
    // Before the raw-bitmap step below, whose `vmsdk-backup` bitmaps on disk0 stay behind.
    run(
        "live backup: full then incremental, frozen through the guest's qemu-ga, restored, fsck",
        &live_backup_frozen,
    );
    run(
        "incremental backup: dirty bitmap + QEMU NBD export + disk-transport",
        &incremental_backup,
    );
    run(
        "async client: file round trip, disks, disk stats, vCPUs",
        &guest_view_async,
    );
    // Last: the guest is gone afterwards.
    run("guest-shutdown, then QEMU's SHUTDOWN event", &shutdown);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        println!("vm_guest_agent: {failed} step(s) failed");
        ExitCode::FAILURE
    }
}

struct Env {
    qga_socket: PathBuf,
    qmp_socket: PathBuf,
    kernel_release: String,
    qga_version: String,
    /// Where the NBD server's socket may go (short path).
    socket_dir: PathBuf,
    /// vCPUs QEMU gave the guest.
    cpus: usize,
    /// The `vmsdk` CLI built for the host.
    vmsdk: PathBuf,
    /// Size of the guest's virtio disk (`/dev/vda`), exported over NBD.
    disk_size: u64,
    /// The node of the guest's qcow2 data disk, ext4 at `/data`, written to by the guest.
    data_node: String,
}

impl Env {
    fn from_environment() -> Option<Env> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Env {
            qga_socket: var("VMSDK_VM_QGA_SOCKET")?.into(),
            qmp_socket: var("VMSDK_VM_QMP_SOCKET")?.into(),
            kernel_release: var("VMSDK_VM_KERNEL_RELEASE")?,
            qga_version: var("VMSDK_VM_QGA_VERSION")?,
            socket_dir: var("VMSDK_VM_SOCKET_DIR")?.into(),
            disk_size: var("VMSDK_VM_DISK_SIZE")?.parse().ok()?,
            cpus: var("VMSDK_VM_CPUS")?.parse().ok()?,
            vmsdk: var("VMSDK_VM_VMSDK_BIN")?.into(),
            data_node: var("VMSDK_VM_DATA_NODE")?,
        })
    }

    /// The agent came up moments ago in an emulated guest: allow slow first answers.
    fn config() -> ClientConfig {
        ClientConfig::default()
            .timeout(Duration::from_secs(30))
            .sync_timeout(Duration::from_secs(10))
            .sync_attempts(6)
            .no_reply_grace(Duration::from_secs(3))
    }

    /// A QMP client on QEMU's monitor socket (one client at a time: QEMU serves one).
    fn monitor(&self) -> Result<qmp_proto::Client<UnixStream>, String> {
        qmp_proto::Client::connect_unix(
            &self.qmp_socket,
            qmp_proto::ClientConfig::default().timeout(Duration::from_secs(30)),
        )
        .map_err(|e| format!("QMP: {e}"))
    }

    fn client(&self) -> Result<Client<UnixStream>, String> {
        Client::connect_unix(&self.qga_socket, Env::config())
            .map_err(|e| format!("connect {}: {e}", self.qga_socket.display()))
    }
}

fn qmp_running(env: &Env) -> Step {
    let mut qmp = env.monitor()?;
    let status = qmp
        .call::<qmp_cmd::QueryStatus>(&())
        .map_err(|e| format!("query-status: {e}"))?;
    match status.status {
        RunState::Running if status.running => Ok(format!(
            "query-status: {} (QEMU {})",
            status.status,
            qmp.greeting().version.qemu
        )),
        _ => Err(format!("the VM is not running: {status:?}")),
    }
}

fn guest_info(env: &Env) -> Step {
    let mut client = env.client()?;
    let info = client
        .call::<cmd::GuestInfo>(&())
        .map_err(|e| format!("guest-info: {e}"))?;
    if !env.qga_version.ends_with(&info.version) || info.version.is_empty() {
        return Err(format!(
            "guest-info version {:?}, but the agent put in the guest says {:?}",
            info.version, env.qga_version
        ));
    }
    for name in [
        "guest-exec",
        "guest-exec-status",
        "guest-get-osinfo",
        "guest-shutdown",
    ] {
        match info.command(name) {
            Some(command) if command.enabled => {}
            other => return Err(format!("{name} is not enabled: {other:?}")),
        }
    }
    let shutdown = info.command("guest-shutdown").map(|c| c.success_response);
    if shutdown != Some(false) {
        return Err(format!(
            "guest-shutdown should be declared without a success response, got {shutdown:?}"
        ));
    }
    Ok(format!(
        "qemu-ga {} with {} commands",
        info.version,
        info.supported_commands.len()
    ))
}

fn osinfo(env: &Env) -> Step {
    let mut client = env.client()?;
    let os = client
        .call::<cmd::GuestGetOsinfo>(&())
        .map_err(|e| format!("guest-get-osinfo: {e}"))?;
    let expect = |what: &str, got: Option<&str>, want: &str| {
        if got == Some(want) {
            Ok(())
        } else {
            Err(format!("osinfo {what}: expected {want:?}, got {got:?}"))
        }
    };
    expect(
        "kernel-release",
        os.kernel_release.as_deref(),
        &env.kernel_release,
    )?;
    expect("id", os.id.as_deref(), "vmsdk-vm-test")?;
    expect("machine", os.machine.as_deref(), "x86_64")?;
    let host = client
        .call::<cmd::GuestGetHostName>(&())
        .map_err(|e| format!("guest-get-host-name: {e}"))?;
    if host.host_name != "vmsdk-vm-test" {
        return Err(format!("host name {:?}", host.host_name));
    }
    Ok(format!(
        "{} on {}, host {}",
        os.pretty_name.unwrap_or_default(),
        env.kernel_release,
        host.host_name
    ))
}

/// Starts a process and polls `guest-exec-status` until it exits (bounded).
fn exec_and_wait(
    client: &mut Client<UnixStream>,
    args: GuestExecArgs,
) -> Result<qga_proto::types::GuestExecStatus, String> {
    let pid = client
        .call::<cmd::GuestExec>(&args)
        .map_err(|e| format!("guest-exec: {e}"))?
        .pid;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client
            .call::<cmd::GuestExecStatus>(&cmd::GuestExecStatusArgs { pid })
            .map_err(|e| format!("guest-exec-status {pid}: {e}"))?;
        if status.exited {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!("guest process {pid} still running after 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exec_blocking(env: &Env) -> Step {
    let mut client = env.client()?;
    let echo = exec_and_wait(
        &mut client,
        GuestExecArgs::new("/bin/echo")
            .arg("hello from the guest")
            .capture(),
    )?;
    let stdout = echo.out_data.map(|d| d.into_bytes()).unwrap_or_default();
    if echo.exitcode != Some(0) || stdout != b"hello from the guest\n" {
        return Err(format!(
            "echo: exit {:?}, stdout {:?}",
            echo.exitcode,
            String::from_utf8_lossy(&stdout)
        ));
    }
    // A failing program is reported with its code, and stdin reaches it.
    let failing = exec_and_wait(
        &mut client,
        GuestExecArgs::new("/bin/sh")
            .args(["-c", "read line; echo \"got $line\" >&2; exit 3"])
            .input(b"vmsdk\n".to_vec())
            .capture(),
    )?;
    let stderr = failing.err_data.map(|d| d.into_bytes()).unwrap_or_default();
    if failing.exitcode != Some(3) || stderr != b"got vmsdk\n" {
        return Err(format!(
            "sh: exit {:?}, stderr {:?}",
            failing.exitcode,
            String::from_utf8_lossy(&stderr)
        ));
    }
    Ok("echo printed its argument; sh read stdin and exited 3".to_owned())
}

fn exec_async(env: &Env) -> Step {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let agent = AsyncClient::connect_unix(&env.qga_socket, Env::config())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let out = agent
            .exec_wait(
                GuestExecArgs::new("/bin/uname").arg("-r").capture(),
                Some(Duration::from_secs(60)),
            )
            .await
            .map_err(|e| format!("exec_wait uname -r: {e}"))?;
        let release = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.success() && release == env.kernel_release {
            Ok(format!("uname -r in the guest: {release}"))
        } else {
            Err(format!(
                "uname -r: exit {:?}, stdout {release:?}, expected {:?}",
                out.exitcode, env.kernel_release
            ))
        }
    })
}

/// The facade's `vmsdk agent` command against the same channel, as a user would type it.
fn cli_agent(env: &Env) -> Step {
    let uri = format!("qga+unix://{}", env.qga_socket.display());
    let run = |command: &str| -> Result<Value, String> {
        let out = Command::new(&env.vmsdk)
            .args(["agent", &uri, command])
            .output()
            .map_err(|e| format!("run {}: {e}", env.vmsdk.display()))?;
        if !out.status.success() {
            return Err(format!(
                "vmsdk agent {command}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("vmsdk agent {command} printed invalid JSON: {e}"))
    };
    let os = run("osinfo")?;
    if os["kernel-release"] != json!(env.kernel_release) {
        return Err(format!("vmsdk agent osinfo: {os}"));
    }
    let cpus = run("cpustats")?;
    let count = cpus.as_array().map_or(0, Vec::len);
    if count != env.cpus {
        return Err(format!(
            "vmsdk agent cpustats: {count} CPUs, expected {}: {cpus}",
            env.cpus
        ));
    }
    Ok(format!(
        "kernel-release {} and {count} CPU(s) of guest-get-cpustats",
        env.kernel_release
    ))
}

/// Typed reads of what the guest sees, through the async client: a file written and read back in
/// chunks, the virtio disk the backup step wrote to, its I/O counters, the vCPUs.
fn guest_view_async(env: &Env) -> Step {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let agent = AsyncClient::connect_unix(&env.qga_socket, Env::config())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // Several chunks, so the handle, offsets and base64 all matter.
        let data = pattern(99, qga_proto::FILE_CHUNK + 4321);
        agent
            .write_file("/tmp/vmsdk-round-trip", &data)
            .await
            .map_err(|e| format!("write_file: {e}"))?;
        let back = agent
            .read_file("/tmp/vmsdk-round-trip")
            .await
            .map_err(|e| format!("read_file: {e}"))?;
        if back != data {
            return Err(format!(
                "read back {} bytes, wrote {}; contents differ",
                back.len(),
                data.len()
            ));
        }

        let disks = agent.disks().await.map_err(|e| format!("guest-get-disks: {e}"))?;
        let vda = disks
            .iter()
            .find(|d| d.name.ends_with("vda"))
            .ok_or_else(|| format!("no vda among the guest's disks: {disks:?}"))?;
        let bus = vda.address.as_ref().map(|a| a.bus_type.clone());
        if bus != Some(GuestDiskBusType::Virtio) {
            return Err(format!("vda should sit on the virtio bus: {vda:?}"));
        }

        // The backup step wrote 80 KiB with dd (O_SYNC-free but fsync'ed): 160 sectors at least.
        let stats = agent
            .diskstats()
            .await
            .map_err(|e| format!("guest-get-diskstats: {e}"))?;
        let written = stats
            .iter()
            .find(|d| d.name == "vda")
            .and_then(|d| d.stats.write_sectors)
            .ok_or_else(|| format!("no write counter for vda: {stats:?}"))?;
        if written < 160 {
            return Err(format!("vda wrote {written} sectors, fewer than the guest's writes"));
        }

        let vcpus = agent.vcpus().await.map_err(|e| format!("guest-get-vcpus: {e}"))?;
        let online = vcpus.iter().filter(|c| c.online).count();
        if online != env.cpus {
            return Err(format!("{online} vCPUs online, QEMU was given {}", env.cpus));
        }
        Ok(format!(
            "{} bytes round-tripped; vda on virtio with {written} sectors written; {online} vCPU(s)",
            data.len()
        ))
    })
}

/// A client that sends one whole command and half of another, then is SIGKILLed before it
/// reads anything; the next client must resynchronise (0xFF + guest-sync-delimited) and work.
fn resync_after_kill(env: &Env) -> Step {
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(me)
        .arg(KILLED_CLIENT_ARG)
        .arg(&env.qga_socket)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the killed client: {e}"))?;
    let mut ready = String::new();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    // The child prints one line once its bytes are out; it exits on its own after 120 s.
    let read = BufReader::new(stdout).read_line(&mut ready);
    if read.is_err() || ready.trim() != "sent" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "the killed client never got its bytes out: {ready:?}"
        ));
    }
    // Let the agent start answering the whole command, then kill the client mid-exchange.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().map_err(|e| format!("kill: {e}"))?;
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;

    let mut client = env.client()?;
    client
        .call::<cmd::GuestPing>(&())
        .map_err(|e| format!("guest-ping after the kill: {e}"))?;
    let os = client
        .call::<cmd::GuestGetOsinfo>(&())
        .map_err(|e| format!("guest-get-osinfo after the kill: {e}"))?;
    if os.kernel_release.as_deref() != Some(env.kernel_release.as_str()) {
        return Err(format!("a stale reply leaked into the new session: {os:?}"));
    }
    Ok(format!(
        "client killed ({status}) with a reply pending and half a request in the agent; the next client synced and got ping + osinfo"
    ))
}

fn killed_client(socket: &Path) -> ExitCode {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return ExitCode::FAILURE;
    };
    if stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    let whole = b"{\"execute\": \"guest-get-fsinfo\"}\n";
    let half = b"{\"execute\": \"guest-get-osinfo\", \"argum";
    if stream
        .write_all(whole)
        .and_then(|()| stream.write_all(half))
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    println!("sent");
    let _ = std::io::stdout().flush();
    // Never read: the parent kills this process while the reply is outstanding.
    std::thread::sleep(Duration::from_secs(120));
    ExitCode::SUCCESS
}

fn shutdown(env: &Env) -> Step {
    // Subscribe to QEMU's events first, so the SHUTDOWN event cannot be missed.
    let mut qmp = env.monitor()?;
    let shutdowns = qmp
        .subscribe(EventFilter::names(["SHUTDOWN"]))
        .map_err(|e| format!("QMP: {e}"))?;
    let mut client = env.client()?;
    let started = Instant::now();
    let reply = client.call::<cmd::GuestShutdown>(&GuestShutdownArgs {
        mode: Some(GuestShutdownMode::Powerdown),
    });
    let returned = started.elapsed().as_secs_f64();
    // Whatever the client said, find out what the VM did.
    let event = match qmp.next_event(shutdowns, Duration::from_secs(60)) {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err("no SHUTDOWN event within 60 s".to_owned()),
        Err(e) => Err(format!("waiting for SHUTDOWN: {e}")),
    };
    match (reply, event) {
        (Ok(_), Ok(event)) if event.data["guest"] == json!(true) => Ok(format!(
            "client returned Ok after {returned:.1} s without a reply; QEMU reported SHUTDOWN {}",
            event.data
        )),
        (Ok(_), Ok(event)) => Err(format!(
            "SHUTDOWN was not initiated by the guest: {}",
            event.data
        )),
        (Ok(_), Err(e)) => Err(format!(
            "the client returned Ok after {returned:.1} s but the VM did not shut down: {e}"
        )),
        (Err(e), Ok(event)) => Err(format!(
            "the guest did power off (QEMU: SHUTDOWN {}), but the client returned an error after \
             {returned:.1} s: {e}. guest-shutdown has no reply on success, so the channel closing \
             within the grace period means it took effect",
            event.data
        )),
        (Err(e), Err(qmp_error)) => Err(format!("guest-shutdown: {e}; QMP: {qmp_error}")),
    }
}

/// The guest disk's node in QEMU and the bitmap that tracks its changes.
/// The `vmsdk` CLI's output, or its failure with what it printed.
fn run_vmsdk(env: &Env, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&env.vmsdk)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", env.vmsdk.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "vmsdk {}: {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            stderr.trim()
        ));
    }
    // A warning (e.g. a freeze that failed) is part of what the step reports.
    for line in stderr.lines() {
        println!("vm_guest_agent:   vmsdk {}: {line}", args[..2].join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many lines the guest's writer has appended to `/data/log` (one per synced tick).
fn guest_writes(client: &mut Client<UnixStream>) -> Result<u64, String> {
    let status = exec_and_wait(
        client,
        GuestExecArgs::new("/bin/sh")
            .arg("-c")
            .arg("grep -q ' /data ext4 rw' /proc/mounts && wc -l < /data/log")
            .capture(),
    )?;
    let out = status.out_data.map(|d| d.into_bytes()).unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    match (status.exitcode, text.trim().parse()) {
        (Some(0), Ok(lines)) => Ok(lines),
        _ => Err(format!(
            "/data is not a writable ext4 with the writer's log in the guest (exit {:?}): {text}",
            status.exitcode
        )),
    }
}

/// An application-consistent live backup as a user runs it, while the guest writes: `vmsdk
/// backup create` (full, then incremental) of the qcow2 data disk, the guest's ext4 frozen
/// through its real qemu-ga around each checkpoint and the frozen time printed; then `verify`,
/// `qemu-img check` of every image of the chain, both points restored to raw files and
/// `e2fsck -fn` clean on each (a filesystem caught mid-write would need its journal
/// replayed) and holding the writer's log as far as it was flushed. The guest must be thawed, running and still writing afterwards.
fn live_backup_frozen(env: &Env) -> Step {
    let work = env.socket_dir.join("lb");
    let dir = work.join("chain");
    // QEMU writes its scratch overlays there: a directory the peer root's QEMU sees too.
    let scratch = work.join("scratch");
    // The socket directory outlives one boot: start from no chain (a full backup) each time.
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| format!("remove {}: {e}", work.display()))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let qmp = format!("qmp+unix://{}", env.qmp_socket.display());
    let agent = format!("qga+unix://{}", env.qga_socket.display());

    let mut client = env.client()?;
    let before = guest_writes(&mut client)?;
    // What the backups' freeze covers: qemu-ga counts the filesystems it froze, and /data
    // (the only one on a block device here) must be among them. Thawed at once.
    let count = client.call::<cmd::GuestFsfreezeFreeze>(&());
    let thawed = client.call::<cmd::GuestFsfreezeThaw>(&());
    let count = count.map_err(|e| format!("guest-fsfreeze-freeze: {e}"))?;
    thawed.map_err(|e| format!("guest-fsfreeze-thaw: {e}"))?;
    if count < 1 {
        return Err(format!(
            "qemu-ga froze {count} filesystems: /data is not one it freezes"
        ));
    }
    drop(client);

    let mut frozen = Vec::new();
    for expected_kind in ["full", "incremental"] {
        let out = run_vmsdk(
            env,
            &[
                "backup",
                "create",
                "--qmp",
                &qmp,
                "--agent",
                &agent,
                "--disk",
                &env.data_node,
                "--scratch-dir",
                &scratch.to_string_lossy(),
                "--json",
                "--no-progress",
                &dir.to_string_lossy(),
            ],
        )?;
        let report: Value = serde_json::from_str(&out)
            .map_err(|e| format!("vmsdk backup create --json printed invalid JSON: {e}: {out}"))?;
        let point = &report["point"];
        if point["kind"] != json!(expected_kind) {
            return Err(format!("expected a {expected_kind} point: {point}"));
        }
        let consistency = &point["consistency"];
        let Some(ms) = consistency["frozen_ms"].as_u64() else {
            return Err(format!(
                "the {expected_kind} backup is not application-consistent: {consistency}; \
                 warnings {}",
                point["warnings"]
            ));
        };
        println!("vm_guest_agent:   {expected_kind} backup: guest frozen {ms} ms");
        frozen.push(format!("{expected_kind} {ms} ms"));
    }

    let mut client = env.client()?;
    let freeze = client
        .call::<cmd::GuestFsfreezeStatus>(&())
        .map_err(|e| format!("guest-fsfreeze-status: {e}"))?;
    if freeze != qga_proto::types::GuestFsfreezeStatus::Thawed {
        return Err(format!("the guest is left {freeze:?} after the backups"));
    }
    let after = guest_writes(&mut client)?;
    if after <= before {
        return Err(format!(
            "the guest's writer did not go on during the backups ({before} → {after} writes)"
        ));
    }
    drop(client);

    let verified = run_vmsdk(
        env,
        &["backup", "verify", "--no-progress", &dir.to_string_lossy()],
    )?;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json")).map_err(|e| format!("read manifest: {e}"))?,
    )
    .map_err(|e| format!("manifest.json: {e}"))?;
    let files: Vec<String> = manifest["points"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["disks"].as_array().into_iter().flatten())
        .filter_map(|d| d["file"].as_str().map(str::to_owned))
        .collect();
    if files.len() != 2 {
        return Err(format!("expected two images in the chain: {manifest}"));
    }
    for file in &files {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(dir.join(file))
            .output()
            .map_err(|e| format!("run qemu-img: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img check {file}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }
    let mut logged = Vec::new();
    for point in ["1", "2"] {
        let raw = work.join(format!("restored-{point}.raw"));
        run_vmsdk(
            env,
            &[
                "backup",
                "restore",
                "--point",
                point,
                "--no-progress",
                &dir.to_string_lossy(),
                &raw.to_string_lossy(),
            ],
        )?;
        let out = Command::new("/sbin/e2fsck")
            .args(["-f", "-n"])
            .arg(&raw)
            .output()
            .map_err(|e| format!("run e2fsck: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "e2fsck -fn of point {point} restored: {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // The freeze flushed the guest's page cache: the point holds at least every line the
        // writer had appended before the backups began.
        let out = Command::new("/sbin/debugfs")
            .args(["-R", "cat /log"])
            .arg(&raw)
            .output()
            .map_err(|e| format!("run debugfs: {e}"))?;
        let _ = std::fs::remove_file(&raw);
        let lines = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
        if !out.status.success() || lines < before || lines > after {
            return Err(format!(
                "point {point} holds {lines} lines of the writer's log, expected {before} to \
                 {after}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        logged.push(lines.to_string());
    }
    Ok(format!(
        "{count} filesystem(s) frozen for {} (qemu-ga {}); the writer's log at {before} lines before, {} at the points, \
         {after} after; {} points verified; qemu-img check and e2fsck -fn clean",
        frozen.join(", "),
        env.qga_version,
        logged.join(" and "),
        verified.lines().count()
    ))
}

const DISK_NODE: &str = "disk0";
const BITMAP: &str = "vmsdk-backup";
/// The bitmap's granularity: QEMU marks whole 64 KiB clusters dirty.
const GRANULARITY: u64 = 64 * 1024;

/// The incremental-backup flow of KVM backup tools: start a dirty bitmap, let the guest write,
/// export the disk with QEMU's NBD server, and read only the changed blocks with
/// disk-transport's NBD client through `qemu:dirty-bitmap:NAME`.
fn incremental_backup(env: &Env) -> Step {
    let mut qmp = env.monitor()?;
    let qmp_error = |what: &'static str| move |e: qmp_proto::Error| format!("{what}: {e}");
    qmp.call::<qmp_cmd::BlockDirtyBitmapAdd>(
        &BlockDirtyBitmapAddArgs::new(DISK_NODE, BITMAP).granularity(GRANULARITY as u32),
    )
    .map_err(qmp_error("block-dirty-bitmap-add"))?;

    // One write inside a cluster, one straddling two clusters, one cluster-sized and aligned.
    let writes: [(u64, usize); 3] = [
        (1024 * 1024, 64 * 1024),
        (16 * 1024 * 1024 + 4096, 8192),
        (40 * 1024 * 1024 - 4096, 8192),
    ];
    let mut client = env.client()?;
    let mut image = vec![0u8; env.disk_size as usize];
    for (index, &(offset, length)) in writes.iter().enumerate() {
        let data = pattern(index as u64 + 1, length);
        let status = exec_and_wait(
            &mut client,
            GuestExecArgs::new("/bin/dd")
                .arg("of=/dev/vda")
                .arg("bs=4096")
                .arg(format!("seek={}", offset / 4096))
                .arg("conv=notrunc,fsync")
                .input(data.clone())
                .capture(),
        )?;
        if status.exitcode != Some(0) {
            let stderr = status.err_data.map(|d| d.into_bytes()).unwrap_or_default();
            return Err(format!(
                "dd in the guest: exit {:?}: {}",
                status.exitcode,
                String::from_utf8_lossy(&stderr)
            ));
        }
        image[offset as usize..offset as usize + length].copy_from_slice(&data);
    }
    drop(client);

    // The checkpoint, as libvirt takes it: freeze this bitmap (an export needs a disabled one)
    // and, atomically, start the next so no later write goes untracked.
    qmp.call::<qmp_cmd::Transaction>(&TransactionArgs::new(vec![
        TransactionAction::BlockDirtyBitmapDisable(BlockDirtyBitmap::new(DISK_NODE, BITMAP)),
        TransactionAction::BlockDirtyBitmapAdd(
            BlockDirtyBitmapAddArgs::new(DISK_NODE, format!("{BITMAP}-next"))
                .granularity(GRANULARITY as u32),
        ),
    ]))
    .map_err(qmp_error("transaction"))?;

    let nbd_socket = env.socket_dir.join("nbd.sock");
    qmp.call::<qmp_cmd::NbdServerStart>(&NbdServerStartArgs::unix(nbd_socket.to_string_lossy()))
        .map_err(qmp_error("nbd-server-start"))?;
    qmp.call::<qmp_cmd::BlockExportAdd>(
        &BlockExportAddArgs::nbd("vmsdk-export", DISK_NODE)
            .name("vmsdk")
            .writable(false)
            .bitmap(BITMAP),
    )
    .map_err(qmp_error("block-export-add"))?;
    let verified = read_changed_blocks(&nbd_socket, &image, &writes);
    // Tear the export down whatever happened, so the shutdown step finds a quiet QEMU.
    let _ = qmp.call::<qmp_cmd::BlockExportDel>(&BlockExportDelArgs::new("vmsdk-export"));
    let _ = qmp.call::<qmp_cmd::NbdServerStop>(&());
    verified
}

fn read_changed_blocks(socket: &Path, image: &[u8], writes: &[(u64, usize)]) -> Step {
    use disk_transport::nbd::{NbdDisk, NbdOptions};
    use disk_transport::{Disk, NbdAddress};

    let disk = NbdDisk::connect(
        &NbdOptions::new(NbdAddress::Unix(socket.to_path_buf()))
            .export("vmsdk")
            .read_only(true)
            .dirty_bitmap(BITMAP)
            .timeout(Duration::from_secs(30)),
    )
    .map_err(|e| format!("NBD connect: {e}"))?;
    let info = disk.export_info();
    if info.size != image.len() as u64 || !info.dirty_bitmap {
        return Err(format!("unexpected export: {info:?}"));
    }
    let extents = disk
        .dirty_extents(0, info.size)
        .map_err(|e| format!("NBD block status: {e}"))?;
    let dirty: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.dirty)
        .map(|e| (e.offset, e.length))
        .collect();
    let expected = dirty_clusters(writes);
    if dirty != expected {
        return Err(format!(
            "dirty extents {dirty:?}, expected the clusters {expected:?} covering the writes"
        ));
    }
    let mut bytes = 0;
    for &(offset, length) in &dirty {
        let mut buf = vec![0u8; length as usize];
        disk.read_at(&mut buf, offset)
            .map_err(|e| format!("NBD read at {offset}: {e}"))?;
        let want = &image[offset as usize..(offset + length) as usize];
        if buf != want {
            let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "changed block at {offset} differs from what the guest wrote (first at +{at})"
            ));
        }
        bytes += length;
    }
    // The same through the copy engine, as a backup tool does it: the backup of the disk when
    // the bitmap started (all zeros) plus an incremental copy equals the disk now.
    let backup = disk_transport::memory::MemoryDisk::new(info.size);
    let options = disk_transport::copy::CopyOptions::default();
    let report = disk_transport::copy::copy_changed(&disk, &backup, &options, &mut |_| {})
        .map_err(|e| format!("incremental copy: {e}: {}", e.error))?;
    let restored = backup.to_vec().map_err(|e| e.to_string())?;
    if restored != image || report.progress.total != bytes {
        return Err(format!(
            "the incremental copy ({:?}) does not reproduce the guest's disk",
            report.progress
        ));
    }
    Ok(format!(
        "{} dirty extents, {} KiB of {} MiB read through qemu:dirty-bitmap:{BITMAP}, all equal to the guest's writes; copy_changed onto the zero backup reproduces the disk",
        dirty.len(),
        bytes / 1024,
        info.size / (1024 * 1024)
    ))
}

/// The granularity-aligned ranges a set of writes dirties, merged.
fn dirty_clusters(writes: &[GuestWrite]) -> Vec<Extent> {
    let mut clusters: Vec<u64> = writes
        .iter()
        .flat_map(|&(offset, length)| {
            let first = offset / GRANULARITY;
            let last = (offset + length as u64 - 1) / GRANULARITY;
            first..=last
        })
        .collect();
    clusters.sort_unstable();
    clusters.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for cluster in clusters {
        let start = cluster * GRANULARITY;
        match ranges.last_mut() {
            Some((offset, length)) if *offset + *length == start => *length += GRANULARITY,
            _ => ranges.push((start, GRANULARITY)),
        }
    }
    ranges
}

/// A guest write: offset and length in bytes.
type GuestWrite = (u64, usize);
/// A disk range: offset and length in bytes.
type Extent = (u64, u64);

/// The cluster arithmetic and the data pattern the backup step relies on.
fn check_expectations() -> Result<(), String> {
    let k = 1024;
    let cases: [(&[GuestWrite], &[Extent]); 4] = [
        // Inside one cluster; the whole cluster is dirty.
        (&[(4 * k, 8192)], &[(0, 64 * k)]),
        // Straddling a boundary: two clusters, merged into one extent.
        (&[(64 * k - 1, 2)], &[(0, 128 * k)]),
        // Exactly one cluster, and a far one: two extents, in order.
        (
            &[(1024 * k, 65536), (64 * k, 1)],
            &[(64 * k, 64 * k), (1024 * k, 64 * k)],
        ),
        // Overlapping writes count once.
        (&[(0, 10), (5, 10)], &[(0, 64 * k)]),
    ];
    for (writes, expected) in cases {
        let got = dirty_clusters(writes);
        if got != expected {
            return Err(format!(
                "dirty_clusters({writes:?}) = {got:?}, expected {expected:?}"
            ));
        }
    }
    let a = pattern(1, 4096);
    if a != pattern(1, 4096) || a == pattern(2, 4096) || a.iter().all(|&b| b == a[0]) {
        return Err("pattern() must be deterministic, differ per seed and not be constant".into());
    }
    Ok(())
}

/// Deterministic, incompressible-looking bytes (xorshift64), different per `seed`.
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
