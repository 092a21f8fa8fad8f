//! What the Linux backend keeps between updates (open files, the CPU rate, where the cgroups
//! are, which optional files exist) and when it looks them up again, on small trees written
//! here and changed between updates.
#![cfg(feature = "linux")]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_stats::linux::LinuxGuestStats;
use guest_stats::{Error, GuestStats, SessionId, Stat};

const BOOT_A: &str = "90dcb52c-27a6-4d94-88de-0bba2c0e4be9\n";
const BOOT_B: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427\n";
const GIB: u64 = 1 << 30;

/// A minimal Linux tree in a fresh temporary directory, removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Tree {
        let dir =
            std::env::temp_dir().join(format!("guest-stats-refresh-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let tree = Tree(dir);
        tree.write("proc/stat", "cpu 10 0 5 100 0 0 0 2\nbtime 1700000000\n");
        tree.write("proc/uptime", "12.50 20.00\n");
        tree.write("proc/meminfo", "MemTotal: 4096 kB\nActive: 2048 kB\n");
        tree.write("proc/cpuinfo", "processor\t: 0\ncpu MHz\t\t: 1000.000\n");
        tree
    }

    /// Writes in place (same inode), as the kernel's files change.
    fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.0.join(relative)
    }

    fn with_cgroup2(self, cgroup: &str) -> Tree {
        self.write(
            "proc/self/mountinfo",
            "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n",
        );
        self.write("proc/self/cgroup", &format!("0::{cgroup}\n"));
        fs::create_dir_all(self.path("sys/fs/cgroup")).unwrap();
        self
    }

    fn stats(&self) -> LinuxGuestStats {
        LinuxGuestStats::builder()
            .root(&self.0)
            .user_hz(100)
            .build()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn boot_id(text: &str) -> SessionId {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    let value = u128::from_str_radix(&hex, 16).unwrap();
    SessionId::new((value >> 64) as u64 ^ value as u64)
}

fn not_available(stats: &LinuxGuestStats, stat: Stat) -> bool {
    matches!(stats.stat(stat), Err(Error::NotAvailable { stat: s }) if s == stat)
}

#[test]
fn counters_are_read_afresh_on_every_update() {
    let tree = Tree::new("counters");
    tree.write("proc/sys/kernel/random/boot_id", BOOT_A);
    let mut stats = tree.stats();
    stats.update().unwrap();
    assert_eq!(stats.cpu_used_ms().unwrap(), 150);
    assert_eq!(stats.mem_active_mb().unwrap(), 2);
    // Longer contents than before: the kept file is read to its new end.
    tree.write(
        "proc/stat",
        "cpu 1000000 0 500000 100 0 0 0 7\nbtime 1700000000\n",
    );
    tree.write("proc/uptime", "99.99 20.00\n");
    tree.write("proc/meminfo", "MemTotal: 4096 kB\nActive: 3072 kB\n");
    stats.update().unwrap();
    assert_eq!(stats.cpu_used_ms().unwrap(), 15_000_000);
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 70);
    assert_eq!(stats.elapsed_ms().unwrap(), 99_990);
    assert_eq!(stats.mem_active_mb().unwrap(), 3);
}

#[test]
fn a_new_boot_id_looks_everything_up_again() {
    let tree = Tree::new("boot-id");
    tree.write("proc/sys/kernel/random/boot_id", BOOT_A);
    let mut stats = tree.stats();
    assert_eq!(stats.update().unwrap(), boot_id(BOOT_A));
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 1_000);

    // Within a boot the calibrated rate is kept.
    tree.write("proc/cpuinfo", "processor\t: 0\ncpu MHz\t\t: 2000.000\n");
    assert_eq!(stats.update().unwrap(), boot_id(BOOT_A));
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 1_000);

    // A new boot: the update reports the new session with the new boot's rate.
    tree.write("proc/sys/kernel/random/boot_id", BOOT_B);
    assert_eq!(stats.update().unwrap(), boot_id(BOOT_B));
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 2_000);
}

#[test]
fn without_a_boot_id_a_new_btime_looks_everything_up_again() {
    let tree = Tree::new("btime");
    let mut stats = tree.stats();
    assert_eq!(stats.update().unwrap(), SessionId::new(1_700_000_000));
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 1_000);
    tree.write("proc/cpuinfo", "processor\t: 0\ncpu MHz\t\t: 3000.000\n");
    tree.write("proc/stat", "cpu 10 0 5 100 0 0 0 2\nbtime 1700009999\n");
    assert_eq!(stats.update().unwrap(), SessionId::new(1_700_009_999));
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 3_000);
}

#[test]
fn a_moved_process_reads_its_new_cgroup() {
    let tree = Tree::new("moved").with_cgroup2("/a");
    tree.write("sys/fs/cgroup/a/memory.max", &GIB.to_string());
    tree.write("sys/fs/cgroup/b/memory.max", &(2 * GIB).to_string());
    let mut stats = tree.stats();
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 1_024);
    tree.write("proc/self/cgroup", "0::/b\n");
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 2_048);
}

#[test]
fn a_kept_file_that_fails_is_looked_up_again() {
    let tree = Tree::new("failing").with_cgroup2("/a");
    let limit = tree.path("sys/fs/cgroup/a/memory.max");
    tree.write("sys/fs/cgroup/a/memory.max", &GIB.to_string());
    let mut stats = tree.stats();
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 1_024);

    // The file the backend keeps open goes bad (as a removed cgroup's files do) while a new
    // one takes its path: the update looks the path up again instead of failing.
    let old = fs::OpenOptions::new().write(true).open(&limit).unwrap();
    replace(&limit, &(3 * GIB).to_string());
    old.set_len(0).unwrap();
    std::io::Write::write_all(&mut &old, b"gone").unwrap();
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 3_072);

    // A file that is bad when looked up afresh is still an error.
    tree.write("sys/fs/cgroup/a/memory.max", "lots\n");
    let error = stats.update().unwrap_err();
    assert!(matches!(error, Error::Parse { .. }), "{error:?}");
    assert!(error.to_string().contains("memory.max"), "{error}");
}

/// Replaces a file with a new one (a new inode), as `rename` over it does.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    fs::write(&staged, text).unwrap();
    fs::rename(staged, path).unwrap();
}

#[test]
fn a_missing_file_is_looked_for_again_after_the_refresh_interval() {
    let tree = Tree::new("interval").with_cgroup2("/a");
    fs::create_dir_all(tree.path("sys/fs/cgroup/a")).unwrap();
    let interval = Duration::from_millis(200);
    let mut stats = LinuxGuestStats::builder()
        .root(&tree.0)
        .user_hz(100)
        .refresh_interval(interval)
        .build();
    stats.update().unwrap();
    assert!(not_available(&stats, Stat::MemLimitMb));

    // The memory controller is enabled for the cgroup: its memory.max appears.
    tree.write("sys/fs/cgroup/a/memory.max", &GIB.to_string());
    std::thread::sleep(interval + Duration::from_millis(50));
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 1_024);
}

#[test]
fn a_zero_interval_sees_a_replaced_tree_at_once() {
    let tree = Tree::new("zero");
    let mut stats = LinuxGuestStats::builder()
        .root(&tree.0)
        .user_hz(100)
        .refresh_interval(Duration::ZERO)
        .build();
    stats.update().unwrap();
    assert!(not_available(&stats, Stat::MemBalloonedMb));
    replace(
        &tree.path("proc/meminfo"),
        "MemTotal: 4096 kB\nActive: 2048 kB\nBalloon: 1024 kB\n",
    );
    stats.update().unwrap();
    assert_eq!(stats.mem_ballooned_mb().unwrap(), 1);
    // A clone opens its own files and reads the same values.
    let mut clone = stats.clone();
    assert_eq!(clone.snapshot().unwrap(), stats.snapshot().unwrap());
    clone.update().unwrap();
    assert_eq!(clone.snapshot().unwrap(), stats.snapshot().unwrap());
    // Debug names the kept files, not the bytes last read.
    let debug = format!("{stats:?}");
    assert!(debug.contains("meminfo"), "{debug}");
    assert!(!debug.contains("Balloon: 1024"), "{debug}");
}

#[test]
fn the_cpu_rate_is_found_past_the_first_cpus() {
    let tree = Tree::new("cpuinfo");
    // A first CPU record longer than the part read first: the rate is still found.
    let flags = "fpu ".repeat(2_000);
    tree.write(
        "proc/cpuinfo",
        &format!("processor\t: 0\nflags\t\t: {flags}\ncpu MHz\t\t: 2394.454\n"),
    );
    let mut stats = tree.stats();
    stats.update().unwrap();
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 2_394);

    // The first CPU's rate, not one cut at the end of the part read first.
    let padding = "x".repeat(4_096 - "cpu MHz\t\t: 12".len() - 1);
    let tree = Tree::new("cpuinfo-cut");
    tree.write(
        "proc/cpuinfo",
        &format!("{padding}\ncpu MHz\t\t: 1234.000\n"),
    );
    let mut stats = tree.stats();
    stats.update().unwrap();
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 1_234);
}

#[test]
fn a_kept_file_that_fails_at_a_refresh_is_looked_up_again() {
    let tree = Tree::new("failing-refresh").with_cgroup2("/a");
    let limit = tree.path("sys/fs/cgroup/a/memory.max");
    tree.write("sys/fs/cgroup/a/memory.max", &GIB.to_string());
    // Every update is past the interval: files stay open, the rest is looked up again.
    let mut stats = LinuxGuestStats::builder()
        .root(&tree.0)
        .user_hz(100)
        .refresh_interval(Duration::from_nanos(1))
        .build();
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 1_024);
    let old = fs::OpenOptions::new().write(true).open(&limit).unwrap();
    replace(&limit, &(2 * GIB).to_string());
    old.set_len(0).unwrap();
    std::io::Write::write_all(&mut &old, b"gone").unwrap();
    stats.update().unwrap();
    assert_eq!(stats.mem_limit_mb().unwrap(), 2_048);
}
