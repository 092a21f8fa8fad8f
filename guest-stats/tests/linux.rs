//! The Linux backend on fixture trees captured from real machines or crafted from the kernel's
//! documented formats (see `tests/fixtures/README.md`), and once on this machine.
#![cfg(feature = "linux")]

use std::path::PathBuf;

use guest_stats::linux::LinuxGuestStats;
use guest_stats::{Error, GuestStats, Sampler, SessionId, Stat};

fn fixture(name: &str) -> LinuxGuestStats {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    // The fixtures carry no auxv: pin USER_HZ so the test does not depend on the fallback.
    LinuxGuestStats::builder().root(root).user_hz(100).build()
}

fn not_available(stats: &LinuxGuestStats, stat: Stat) -> bool {
    matches!(stats.stat(stat), Err(Error::NotAvailable { stat: s }) if s == stat)
}

/// Statistics only the host knows: never made up by this backend.
const HOST_ONLY: &[Stat] = &[
    Stat::MemMappedMb,
    Stat::MemOverheadMb,
    Stat::MemSwappedMb,
    Stat::MemSharedMb,
    Stat::MemSharedSavedMb,
    Stat::MemUsedMb,
    Stat::MemShares,
    Stat::ResourcePoolPath,
    Stat::CpuReservationMhz,
    Stat::HostCpuNumCores,
    Stat::HostCpuUsedMs,
    Stat::HostMemPhysMb,
    Stat::HostMemUsedMb,
];

#[test]
fn firecracker_capture() {
    let mut stats = fixture("firecracker-kvm-6.18");
    assert!(matches!(stats.cpu_used_ms(), Err(Error::NoInfo)));
    let session = stats.update().unwrap();
    assert_eq!(
        session,
        SessionId::new(0x90dc_b52c_27a6_4d94 ^ 0x88de_0bba_2c0e_4be9)
    );
    assert_eq!(stats.backend(), "linux");
    // cpu  61599 0 46119 92547 538 0 767 118 0 0  (USER_HZ 100: 10 ms a tick)
    assert_eq!(stats.cpu_used_ms().unwrap(), (61_599 + 46_119 + 767) * 10);
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 118 * 10);
    assert_eq!(stats.elapsed_ms().unwrap(), 1_008_860);
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 2596);
    assert_eq!(stats.mem_active_mb().unwrap(), 1_255_768 / 1024);
    assert_eq!(stats.mem_ballooned_mb().unwrap(), 0);
    // v1 memory cgroup at the page-counter maximum and cfs quota -1: no limits.
    assert!(not_available(&stats, Stat::MemLimitMb));
    assert!(not_available(&stats, Stat::CpuLimitMhz));
    // In the root cpu cgroup, shares mean nothing.
    assert!(not_available(&stats, Stat::CpuShares));
    assert!(not_available(&stats, Stat::MemTargetSizeMb));
    for &stat in HOST_ONLY {
        assert!(not_available(&stats, stat), "{stat}");
    }
    let snapshot = stats.snapshot().unwrap();
    assert_eq!(snapshot.backend, "linux");
    assert_eq!(snapshot.cpu_stolen_ms, Some(1_180));
    assert_eq!(snapshot.mem_limit_mb, None);
}

#[test]
fn xen_guest_with_cgroup2_service() {
    let mut stats = fixture("xen-hvm-cgroup2");
    stats.update().unwrap();
    // cpu  48213 120 15532 9301877 2210 0 811 35122 0 0
    assert_eq!(
        stats.cpu_used_ms().unwrap(),
        (48_213 + 120 + 15_532 + 811) * 10
    );
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 351_220);
    assert_eq!(stats.elapsed_ms().unwrap(), 47_035_610);
    // The Xen balloon: low_kb 1048576 + high_kb 0; target_kb 3145728.
    assert_eq!(stats.mem_ballooned_mb().unwrap(), 1_024);
    assert_eq!(stats.mem_target_size_mb().unwrap(), 3_072);
    // app.service: memory.max 2 GiB under an unlimited parent, memory.min 512 MiB,
    // cpu.max 1.5 CPUs of 2394 MHz, cpu.weight 200.
    assert_eq!(stats.mem_limit_mb().unwrap(), 2_048);
    assert_eq!(
        stats.mem_reservation_mb().unwrap(),
        0,
        "the parent's memory.min 0 bounds it"
    );
    assert_eq!(stats.cpu_limit_mhz().unwrap(), 3_591);
    assert_eq!(stats.cpu_shares().unwrap(), 200);
    assert_eq!(stats.host_processor_speed_mhz().unwrap(), 2_394);
}

#[test]
fn hyperv_guest_does_not_trust_counters_hv_balloon_does_not_feed() {
    let mut stats = fixture("hyperv-gen2");
    stats.update().unwrap();
    assert!(not_available(&stats, Stat::MemBalloonedMb));
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 0);
    assert_eq!(
        stats.cpu_used_ms().unwrap(),
        (91_230 + 15 + 40_211 + 2_310) * 10
    );
    for stat in [
        Stat::MemLimitMb,
        Stat::MemReservationMb,
        Stat::CpuLimitMhz,
        Stat::CpuShares,
    ] {
        assert!(not_available(&stats, stat), "{stat}");
    }
}

#[test]
fn legacy_kvm_guest_with_virtio_balloon() {
    let mut stats = fixture("kvm-virtio-balloon-legacy");
    // No boot_id: the boot time identifies the boot.
    assert_eq!(stats.update().unwrap(), SessionId::new(1_763_500_000));
    // (262144 − 131072) pages of 4 KiB.
    assert_eq!(stats.mem_ballooned_mb().unwrap(), 512);
    assert!(not_available(&stats, Stat::HostProcessorSpeedMhz));
    assert!(not_available(&stats, Stat::CpuLimitMhz));
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 4_500);
}

#[test]
fn user_hz_override_scales_ticks() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kvm-virtio-balloon-legacy");
    let mut stats = LinuxGuestStats::builder().root(root).user_hz(250).build();
    stats.update().unwrap();
    assert_eq!(stats.cpu_stolen_ms().unwrap(), 450 * 4);
}

#[test]
fn missing_or_broken_files_are_clear_errors_and_drop_old_data() {
    let dir = std::env::temp_dir().join(format!("guest-stats-linux-{}", std::process::id()));
    let proc_dir = dir.join("proc");
    std::fs::create_dir_all(&proc_dir).unwrap();
    std::fs::write(proc_dir.join("stat"), "cpu 1 2 3 4 5 6 7 8\nbtime 5\n").unwrap();
    std::fs::write(proc_dir.join("uptime"), "1.00 1.00\n").unwrap();
    std::fs::write(proc_dir.join("meminfo"), "MemTotal: 1 kB\n").unwrap();
    let mut stats = LinuxGuestStats::builder().root(&dir).user_hz(100).build();
    assert!(stats.is_available());
    assert_eq!(stats.update().unwrap(), SessionId::new(5));

    std::fs::write(proc_dir.join("uptime"), "soon\n").unwrap();
    let error = stats.update().unwrap_err();
    assert!(matches!(error, Error::Parse { .. }), "{error:?}");
    assert!(error.to_string().contains("proc/uptime"), "{error}");
    assert!(matches!(stats.cpu_used_ms(), Err(Error::NoInfo)));

    std::fs::remove_file(proc_dir.join("uptime")).unwrap();
    let error = stats.update().unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert_eq!(error.code(), 1);
    std::fs::remove_dir_all(&dir).unwrap();

    let nowhere = LinuxGuestStats::with_root("/nonexistent/guest-stats-root");
    assert!(!nowhere.is_available());
}

/// This machine is a Linux guest: the backend must work on it and its values must hang
/// together across two updates.
#[test]
fn live_on_this_machine() {
    let mut stats = LinuxGuestStats::new();
    if !stats.is_available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "no /proc/stat on a CI machine"
        );
        eprintln!("skipping: /proc/stat not readable here");
        return;
    }
    let first = stats.update().unwrap();
    let used = stats.cpu_used_ms().unwrap();
    let elapsed = stats.elapsed_ms().unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    // Busy time over all CPUs cannot exceed elapsed time × CPUs (slack for tick rounding and
    // CPUs hot-plugged since boot).
    assert!(
        used <= (elapsed + 1_000) * cpus * 2,
        "used {used} elapsed {elapsed}"
    );

    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut sampler = Sampler::new(stats);
    sampler.sample().unwrap();
    let interval = sampler.sample().unwrap();
    assert_eq!(interval.snapshot.session_id, first);
    assert!(!interval.session_changed);
    assert!(interval.snapshot.elapsed_ms.unwrap() >= elapsed);
    assert!(interval.snapshot.cpu_used_ms.unwrap() >= used);
}
