//! Benchmark: a live backup with vmsdk (pull: fleecing, NBD, the copy engine, qcow2 written
//! and hashed as it is read) against QEMU's own push-mode `blockdev-backup` into a qcow2 target
//! on the same filesystem, full and incremental (5 % of the disk changed in scattered 64 KiB
//! writes); then the restore of a four-point chain into an NBD export (qemu-nbd of a raw
//! file) against `nbdcopy --flush` from `qemu-nbd -r -f qcow2 NODE.4.qcow2` into the same
//! export (both flush the target at the end).
//!
//! Each run takes the full backups, then two incrementals with each tool, each after 5 % of
//! the disk changed: vmsdk's first as a user gets it, also recording the point's block hash
//! (BLAKE3 of every changed 64 KiB block, work push does not do), its second without the
//! block hash (`BackupOptions::hash_incrementals(false)`): the same work as push, the changed
//! clusters copied into a new qcow2 and synced.
//! Every run is printed (wall time, this process's CPU time, QEMU's or the qemu-nbds' CPU
//! time), then the medians; vmsdk and the peer alternate which goes first.
//!
//! ```sh
//! cargo run --release -p vmsdk-tests --example bench_live_backup -- [SIZE_MIB] [DIR] [RUNS] [QEMU]
//! ```
//!
//! `VMSDK_BENCH_BLKHASH=sha256/64k` makes vmsdk record that block hash instead of its default
//! (`blake3/64k`).
//!
//! Defaults: 1024 MiB in /dev/shm (page-cached), 3 runs, QEMU `host` (the machine's, Debian
//! 12's 7.2); `trixie` runs Debian 13's QEMU 10.0 from the peer root (`cargo xtask peer-root`,
//! or `$VMSDK_TRIXIE_ROOT`) as the tests do, with DIR mounted into the root. Also needs the
//! machine's qemu-img, qemu-nbd and nbdcopy (the restore compares on the machine's). Starts its
//! own QEMU (`-S`, no guest) and qemu-nbds, and kills them by PID at the end. Peak space:
//! about five times SIZE (use a disk directory such as /var/tmp for 4 GiB).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use live_backup::qemu::QemuSource;
use live_backup::BackupSource;
use live_backup::{BackupDir, BackupOptions};
use qmp_proto::cmd::{
    BlockDirtyBitmap, BlockDirtyBitmapAddArgs, BlockDirtyBitmapRemove, BlockdevAdd,
    BlockdevBackupArgs, BlockdevCreate, BlockdevCreateArgs, BlockdevDel, BlockdevDelArgs,
    Command as QmpCommand, HumanMonitorCommand, HumanMonitorCommandArgs, Transaction,
    TransactionAction, TransactionArgs,
};
use qmp_proto::types::{BlockdevCreateOptions, BlockdevOptions, SyncMode};
use qmp_proto::{JobOptions, Monitor, MonitorExt};
use vmsdk_tests::peers::Generation;
use vmsdk_tests::qemu_vm::QemuVm;

/// User + system CPU seconds of process `pid` ("self" for this one), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after = &stat[stat.rfind(')').expect("stat has a comm field") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the comm field.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), asked once.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let out = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// A qemu-nbd, killed by its PID however `main` ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The benchmark's directory (GiBs of images), removed however `main` ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Measure {
    wall: f64,
    ours: f64,
    qemu: f64,
}

fn measure(qemu_pid: &str, f: impl FnOnce()) -> Measure {
    let (o0, q0, t0) = (cpu_seconds("self"), cpu_seconds(qemu_pid), Instant::now());
    f();
    Measure {
        wall: t0.elapsed().as_secs_f64(),
        ours: cpu_seconds("self") - o0,
        qemu: cpu_seconds(qemu_pid) - q0,
    }
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("run a tool");
    assert!(status.success(), "{cmd:?} failed");
}

fn call<C: QmpCommand>(monitor: &mut impl Monitor, args: &C::Args) -> C::Returns {
    monitor
        .call::<C>(args)
        .unwrap_or_else(|e| panic!("{}: {e}", C::NAME))
}

/// Starts a job with `start` and follows it to its end (qmp-proto's job helper: from the
/// events, its own error, dismissed).
fn job<C: QmpCommand>(monitor: &mut impl Monitor, id: &str, args: &C::Args) {
    monitor
        .run_job(id, &JobOptions::default(), |m| m.call::<C>(args).map(drop))
        .unwrap_or_else(|e| panic!("job {id}: {e}"));
}

/// The guest writes `pattern` at `offset` (64 KiB) through its device.
fn guest_write(monitor: &mut impl Monitor, offset: u64, pattern: u8) {
    let hmp = format!(
        "qemu-io -d /machine/peripheral/vda-dev/virtio-backend \"write -P {pattern} {offset} 64k\""
    );
    call::<HumanMonitorCommand>(monitor, &HumanMonitorCommandArgs::new(hmp));
}

/// QEMU's push backup of `vda` into a new qcow2 at `path` (`sync` full or incremental).
fn push(
    monitor: &mut impl Monitor,
    path: &Path,
    size: u64,
    sync: SyncMode,
    tag: &str,
    bitmap: &str,
) {
    std::fs::File::create(path).unwrap();
    let file = format!("push-file-{tag}");
    let node = format!("push-{tag}");
    call::<BlockdevAdd>(
        monitor,
        &BlockdevOptions::file(&file, path.to_string_lossy()),
    );
    let create = BlockdevCreateArgs {
        job_id: format!("push-create-{tag}"),
        options: BlockdevCreateOptions::qcow2(&file, size),
    };
    job::<BlockdevCreate>(monitor, &create.job_id.clone(), &create);
    call::<BlockdevAdd>(monitor, &BlockdevOptions::qcow2(&node, &file));
    let id = format!("push-job-{tag}");
    let mut backup = BlockdevBackupArgs::new(&id, "vda", &node, sync.clone());
    let mut actions = Vec::new();
    if sync == SyncMode::Full {
        actions.push(TransactionAction::BlockDirtyBitmapAdd(
            BlockDirtyBitmapAddArgs::new("vda", bitmap).persistent(false),
        ));
    } else {
        backup = backup.bitmap(bitmap);
    }
    actions.push(TransactionAction::BlockdevBackup(backup));
    job::<Transaction>(monitor, &id, &TransactionArgs::new(actions));
    for node in [node, file] {
        call::<BlockdevDel>(monitor, &BlockdevDelArgs { node_name: node });
    }
}

/// The load average now (1, 5, 15 minutes).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The runs of one row of the table.
#[derive(Default)]
struct Row {
    runs: Vec<Measure>,
}

impl Row {
    fn medians(&self) -> (f64, f64, f64) {
        let pick =
            |f: fn(&Measure) -> f64| median(&mut self.runs.iter().map(f).collect::<Vec<_>>());
        (pick(|m| m.wall), pick(|m| m.ours), pick(|m| m.qemu))
    }
}

/// 5 % of the disk in scattered 64 KiB writes through the guest's device, then a flush of
/// the device. Unflushed, the writes sit in the host's page cache as the disk image's dirty
/// pages, and whichever backup runs next pays for writing them out: QEMU 10.0 flushes the
/// disk when a backup job's filter leaves it (100 to 450 ms on /var/tmp after 200 MiB of
/// writes), for push and pull alike.
fn scatter_writes(monitor: &mut impl Monitor, size: u64, x: &mut u64, pattern: u8) {
    let writes = size / 20 / 65536;
    let clusters = size / 65536;
    for _ in 0..writes {
        *x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (*x >> 11) % clusters * 65536;
        guest_write(monitor, offset, pattern);
    }
    let hmp = "qemu-io -d /machine/peripheral/vda-dev/virtio-backend flush";
    call::<HumanMonitorCommand>(monitor, &HumanMonitorCommandArgs::new(hmp));
}

/// A qemu-nbd serving `image` on `socket`, killed by PID on drop.
fn qemu_nbd(args: &[&str], image: &Path, socket: &Path) -> KillOnDrop {
    let child = Command::new("qemu-nbd")
        .args(args)
        .arg("-k")
        .arg(socket)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    KillOnDrop(child)
}

/// User + system CPU seconds of a finished child, from `/usr/bin/time -f "%U %S"`'s last
/// line of standard error.
fn time_child(cmd: &mut Command) -> f64 {
    let out = cmd.output().expect("run under /usr/bin/time");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    last.split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .sum()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let base = PathBuf::from(args.next().unwrap_or_else(|| "/dev/shm".into()));
    let runs: usize = args.next().map_or(3, |s| s.parse().expect("RUNS"));
    let generation = match args.next().as_deref() {
        None | Some("host") => Generation::Host,
        Some("trixie") => Generation::Trixie,
        Some(other) => panic!("QEMU: host or trixie, not {other}"),
    };
    let size = mib << 20;
    let dir = base.join(format!("vmsdk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _remove = RemoveOnDrop(dir.clone());

    // A disk of random data.
    let raw = dir.join("vda.raw");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&raw).unwrap());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&buf).unwrap();
        }
    }
    let image = dir.join("vda.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image));
    std::fs::remove_file(&raw).unwrap();

    // The tests' VM (`-S`, no guest; Debian 13's QEMU in its root with the directory mounted
    // in), with the image made above: its first monitor for the backup source, its second for
    // QEMU's push jobs and the guest's writes.
    let vm = QemuVm::start(generation, &dir, &[("vda", size)])
        .unwrap_or_else(|| panic!("no qemu-system-x86_64 in {generation}"));
    let pid = vm.pid().expect("QEMU runs").to_string();
    let mut source = QemuSource::connect(&vm.qmp_uri(), vm.scratch_dir()).unwrap();
    let mut monitor =
        qmp_proto::Client::connect_unix(vm.test_qmp(), qmp_proto::ClientConfig::default()).unwrap();
    let mut x: u64 = 12345;
    let load_before = load_average();
    let names = [
        "full: vmsdk pull (hashing as it reads)",
        "full: QEMU push sync=full",
        "5 %: vmsdk pull incremental",
        "5 %: QEMU push sync=incremental",
        "restore 4 points: vmsdk -> qemu-nbd",
        "restore 4 points: nbdcopy -> qemu-nbd",
        "5 % more: vmsdk, no block hash",
        "5 % more: QEMU push sync=incremental",
    ];
    let mut rows: Vec<Row> = names.iter().map(|_| Row::default()).collect();
    let mut last_dir = None;
    for r in 0..runs {
        let backups = BackupDir::new(dir.join(format!("ours-{r}")));
        let bitmap = format!("push-bitmap-{r}");
        let ours_first = r % 2 == 0;
        let push_full = dir.join(format!("push-full-{r}.qcow2"));
        // Three rounds: the full backups, 5 % changed, 5 % more changed.
        for round in 0..3usize {
            if round > 0 {
                scatter_writes(&mut monitor, size, &mut x, 7 + (2 * r + round) as u8);
            }
            // The last round's incremental leaves the block hash out: the same work as push.
            let mut options = BackupOptions::new().hash_incrementals(round < 2);
            if let Ok(spec) = std::env::var("VMSDK_BENCH_BLKHASH") {
                options = options.blkhash(
                    spec.parse()
                        .expect("VMSDK_BENCH_BLKHASH: a block hash spec"),
                );
            }
            for ours in [ours_first, !ours_first] {
                let row = [0, 2, 6][round] + usize::from(!ours);
                let mut phases = String::new();
                let m = if ours {
                    let started = Instant::now();
                    let mut last = "";
                    let mut copied_at = 0.0;
                    let m = measure(&pid, || {
                        backups
                            .create(&mut source, None, &options, &mut |p| {
                                let at = started.elapsed().as_secs_f64();
                                if p.phase != last {
                                    last = p.phase;
                                    phases.push_str(&format!(" {}@{at:.3}", p.phase));
                                }
                                if p.phase == "copy" && p.done == p.total {
                                    copied_at = at;
                                }
                            })
                            .unwrap();
                    });
                    phases.push_str(&format!(" (copied@{copied_at:.3})"));
                    m
                } else {
                    // Push's incrementals clear the bitmap: each copies one round's changes.
                    let (path, sync, tag) = if round > 0 {
                        (
                            dir.join(format!("push-inc-{r}-{round}.qcow2")),
                            SyncMode::Incremental,
                            format!("i{r}-{round}"),
                        )
                    } else {
                        (push_full.clone(), SyncMode::Full, format!("f{r}"))
                    };
                    let m = measure(&pid, || {
                        push(&mut monitor, &path, size, sync, &tag, &bitmap)
                    });
                    if round > 0 {
                        let _ = std::fs::remove_file(&path);
                    }
                    m
                };
                println!(
                    "run {r} {:<40} {:>7.2} s  vmsdk CPU {:>6.2} s  QEMU CPU {:>6.2} s {phases}",
                    names[row], m.wall, m.ours, m.qemu
                );
                rows[row].runs.push(m);
            }
        }
        // Neither chain's bitmap is needed again: fewer bitmaps for the guest's writes.
        call::<BlockDirtyBitmapRemove>(&mut monitor, &BlockDirtyBitmap::new("vda", &bitmap));
        let _ = std::fs::remove_file(&push_full);
        if r + 1 < runs {
            let manifest = backups.manifest().unwrap().unwrap();
            source
                .remove_checkpoint(&manifest.last().unwrap().checkpoint)
                .unwrap();
            std::fs::remove_dir_all(backups.path()).unwrap();
        } else {
            last_dir = Some(backups);
        }
    }

    // The last chain gets one more point: four in all, each with 5 % changed.
    let chain = last_dir.expect("at least one run");
    scatter_writes(&mut monitor, size, &mut x, 11);
    chain
        .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
        .unwrap();
    let manifest = chain.manifest().unwrap().unwrap();
    assert_eq!(manifest.points.len(), 4);
    let top = chain.path().join(&manifest.points[3].disks[0].file);
    let target = dir.join("restore-target.raw");
    for r in 0..runs {
        for ours in [r % 2 == 0, r % 2 != 0] {
            // A new sparse raw target for every run, served by a new qemu-nbd.
            std::fs::File::create(&target)
                .unwrap()
                .set_len(size)
                .unwrap();
            let target_sock = dir.join(format!("target-{r}-{ours}.sock"));
            let server = qemu_nbd(
                &["-f", "raw", "-e", "4", "-t", "--cache=writeback"],
                &target,
                &target_sock,
            );
            let server_pid = server.0.id().to_string();
            let target_uri = format!("nbd+unix:///?socket={}", target_sock.display());
            let m = if ours {
                measure(&server_pid, || {
                    chain
                        .restore(None, Some(4), &target_uri, &Default::default(), &mut |_| {})
                        .unwrap();
                })
            } else {
                let chain_sock = dir.join(format!("chain-{r}.sock"));
                let chain_server =
                    qemu_nbd(&["-r", "-f", "qcow2", "-e", "4", "-t"], &top, &chain_sock);
                let chain_pid = chain_server.0.id().to_string();
                let (q0, t0) = (
                    cpu_seconds(&chain_pid) + cpu_seconds(&server_pid),
                    Instant::now(),
                );
                // `--flush`: vmsdk's restore flushes the target at the end, and nbdcopy does
                // not unless asked; unflushed, its gigabytes of dirty pages were written back
                // during the next run, whichever tool that was.
                let nbdcopy_cpu = time_child(
                    Command::new("/usr/bin/time")
                        .args(["-f", "%U %S", "nbdcopy", "--flush"])
                        .arg(format!("nbd+unix:///?socket={}", chain_sock.display()))
                        .arg(&target_uri),
                );
                Measure {
                    wall: t0.elapsed().as_secs_f64(),
                    ours: nbdcopy_cpu,
                    qemu: cpu_seconds(&chain_pid) + cpu_seconds(&server_pid) - q0,
                }
            };
            let row = 4 + usize::from(!ours);
            println!(
                "run {r} {:<40} {:>7.2} s  tool CPU {:>6.2} s  qemu-nbd CPU {:>6.2} s",
                names[row], m.wall, m.ours, m.qemu
            );
            rows[row].runs.push(m);
            drop(server);
        }
    }
    let _ = std::fs::remove_file(&target);

    let qemu_version = source.monitor().greeting().version.qemu.to_string();
    println!(
        "\nlive backup of a {mib} MiB random qcow2 disk in {} (QEMU {qemu_version}, -S), {runs} runs; \
         load average before {load_before}, after {}",
        base.display(),
        load_average()
    );
    println!(
        "{:<40} {:>8} {:>10} {:>10} {:>8}",
        "medians", "wall s", "tool CPU", "QEMU CPU", "speed"
    );
    for i in [0, 1, 2, 3, 6, 7, 4, 5] {
        let name = names[i];
        let (wall, ours, qemu) = rows[i].medians();
        let (peer_wall, _, _) = rows[i | 1].medians();
        println!(
            "{name:<40} {wall:>8.2} {ours:>10.2} {qemu:>10.2} {:>7.2}x",
            peer_wall / wall
        );
    }
    drop(source);
    drop(vm);
}
