//! Benchmark: a live backup with vmsdk (pull: fleecing, NBD, the copy engine, qcow2 written
//! and hashed back) against QEMU's own push-mode `blockdev-backup` into a qcow2 target on the
//! same filesystem, full and incremental (5 % of the disk changed in scattered 64 KiB
//! writes). Wall time, this process's CPU time and QEMU's CPU time, side by side.
//!
//! ```sh
//! cargo run --release -p live-backup --example bench_live_backup -- [SIZE_MIB] [DIR]
//! ```
//!
//! Defaults: 1024 MiB in /dev/shm (page-cached). Needs the machine's qemu-system-x86_64 and
//! qemu-img. Starts its own QEMU (`-S`, no guest) and kills it by PID at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use live_backup::qemu::QemuSource;
use live_backup::{BackupDir, BackupOptions};
use qmp_proto::cmd::{
    BlockDirtyBitmapAddArgs, BlockdevAdd, BlockdevBackupArgs, BlockdevCreate, BlockdevCreateArgs,
    BlockdevDel, BlockdevDelArgs, Command as QmpCommand, HumanMonitorCommand,
    HumanMonitorCommandArgs, Transaction, TransactionAction, TransactionArgs,
};
use qmp_proto::types::{BlockdevCreateOptions, BlockdevOptions, SyncMode};
use qmp_proto::{JobOptions, Monitor, MonitorExt};

/// User + system CPU seconds of process `pid` ("self" for this one), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after = &stat[stat.rfind(')').expect("stat has a comm field") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the comm field.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf CLK_TCK");
    let hz: f64 = String::from_utf8_lossy(&hz.stdout).trim().parse().unwrap();
    ticks / hz
}

/// QEMU, killed by its PID however `main` ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
fn push(monitor: &mut impl Monitor, path: &Path, size: u64, sync: SyncMode, tag: &str) {
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
            BlockDirtyBitmapAddArgs::new("vda", "push-bitmap").persistent(false),
        ));
    } else {
        backup = backup.bitmap("push-bitmap");
    }
    actions.push(TransactionAction::BlockdevBackup(backup));
    job::<Transaction>(monitor, &id, &TransactionArgs::new(actions));
    for node in [node, file] {
        call::<BlockdevDel>(monitor, &BlockdevDelArgs { node_name: node });
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let base = PathBuf::from(args.next().unwrap_or_else(|| "/dev/shm".into()));
    let size = mib << 20;
    let dir = base.join(format!("vmsdk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

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

    // Two monitors: one for the backup source, one for QEMU's push jobs and the writes.
    let qmp = dir.join("qmp.sock");
    let qmp2 = dir.join("qmp2.sock");
    let child: Child = Command::new("qemu-system-x86_64")
        .args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-machine",
            "pc,accel=tcg",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp2.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=vda-file",
            image.display()
        ))
        .args(["-blockdev", "driver=qcow2,file=vda-file,node-name=vda"])
        .args(["-device", "virtio-blk-pci,drive=vda,id=vda-dev"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let qemu = KillOnDrop(child);
    let pid = qemu.0.id().to_string();
    while !qmp2.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let uri = format!("qmp+unix://{}", qmp.display());
    let mut source = QemuSource::connect(&uri, dir.join("scratch")).unwrap();
    let mut monitor =
        qmp_proto::Client::connect_unix(&qmp2, qmp_proto::ClientConfig::default()).unwrap();
    let backups = BackupDir::new(dir.join("ours"));

    let ours_full = measure(&pid, || {
        backups
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
    });
    let push_full = measure(&pid, || {
        push(
            &mut monitor,
            &dir.join("push-full.qcow2"),
            size,
            SyncMode::Full,
            "f",
        )
    });

    // 5 % of the disk in scattered 64 KiB writes, through the guest's device.
    let writes = size / 20 / 65536;
    let clusters = size / 65536;
    let mut x: u64 = 12345;
    for _ in 0..writes {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (x >> 11) % clusters * 65536;
        guest_write(&mut monitor, offset, 7);
    }
    let ours_inc = measure(&pid, || {
        backups
            .create(&mut source, None, &BackupOptions::new(), &mut |_| {})
            .unwrap();
    });
    let push_inc = measure(&pid, || {
        push(
            &mut monitor,
            &dir.join("push-inc.qcow2"),
            size,
            SyncMode::Incremental,
            "i",
        )
    });
    // The same again (another 5 %), without reading the whole chain back for its hash.
    for _ in 0..writes {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (x >> 11) % clusters * 65536;
        guest_write(&mut monitor, offset, 9);
    }
    let ours_inc_nohash = measure(&pid, || {
        backups
            .create(
                &mut source,
                None,
                &BackupOptions::new().hash_incrementals(false),
                &mut |_| {},
            )
            .unwrap();
    });

    let qemu_version = source.monitor().greeting().version.qemu.to_string();
    println!(
        "live backup of a {mib} MiB random qcow2 disk in {} (QEMU {qemu_version}, -S)",
        base.display()
    );
    println!(
        "{:<38} {:>8} {:>10} {:>10} {:>8}",
        "", "wall s", "vmsdk CPU", "QEMU CPU", "speed"
    );
    for (name, m, peer) in [
        (
            "full: vmsdk pull (hashing as it reads)",
            &ours_full,
            &push_full,
        ),
        ("full: QEMU push sync=full", &push_full, &push_full),
        ("5 %: vmsdk pull incremental", &ours_inc, &push_inc),
        ("5 %: vmsdk, no hash read-back", &ours_inc_nohash, &push_inc),
        ("5 %: QEMU push sync=incremental", &push_inc, &push_inc),
    ] {
        println!(
            "{name:<38} {:>8.2} {:>10.2} {:>10.2} {:>7.2}x",
            m.wall,
            m.ours,
            m.qemu,
            peer.wall / m.wall
        );
    }
    drop(source);
    drop(qemu);
    std::fs::remove_dir_all(&dir).unwrap();
}
