//! `vmsdk stats` on this machine (a Linux guest) shows the numbers the kernel gives: each value
//! lies between what /proc/stat and /proc/meminfo say just before and just after the run.

use std::process::Command;

use vmsdk_tests::vmsdk_binary;

/// (used ms, stolen ms) from the aggregate `cpu` line of /proc/stat, with USER_HZ = 100 (the
/// value on every Linux architecture this SDK targets).
fn proc_stat_ms() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    let line = text.lines().find(|l| l.starts_with("cpu ")).unwrap();
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let used = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    (used * 10, ticks[7] * 10)
}

fn meminfo_mb(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text
        .lines()
        .find(|l| l.split(':').next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

#[test]
fn stats_match_procfs_read_around_the_same_moment() {
    let Some(vmsdk) = vmsdk_binary() else {
        return;
    };
    let (used_before, stolen_before) = proc_stat_ms();
    let active_before = meminfo_mb("Active");
    let out = Command::new(vmsdk)
        .args(["stats", "--format", "json"])
        .env_remove("VMSDK_BACKEND")
        .output()
        .unwrap();
    let (used_after, stolen_after) = proc_stat_ms();
    let active_after = meminfo_mb("Active");
    vmsdk_tests::assert_success(&out, "vmsdk stats failed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["backend"], "linux", "this machine is a Linux guest");

    let used = json["cpu_used_ms"].as_u64().unwrap();
    let stolen = json["cpu_stolen_ms"].as_u64().unwrap();
    assert!(
        (used_before..=used_after).contains(&used),
        "cpu_used_ms {used} outside [{used_before}, {used_after}]"
    );
    assert!(
        (stolen_before..=stolen_after).contains(&stolen),
        "cpu_stolen_ms {stolen} outside [{stolen_before}, {stolen_after}]"
    );
    // Memory moves both ways, so allow the spread of the two reads plus a little.
    let active = json["mem_active_mb"].as_u64().unwrap();
    let (low, high) = (
        active_before.min(active_after).saturating_sub(64),
        active_before.max(active_after) + 64,
    );
    assert!(
        (low..=high).contains(&active),
        "mem_active_mb {active} outside [{low}, {high}]"
    );
    // What procfs cannot tell stays unknown instead of being made up.
    for stat in [
        "cpu_reservation_mhz",
        "mem_shares",
        "resource_pool_path",
        "mem_overhead_mb",
    ] {
        assert!(
            json[stat].is_null(),
            "{stat} should be null, got {}",
            json[stat]
        );
    }
    let elapsed = json["elapsed_ms"].as_u64().unwrap();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(elapsed as f64 <= uptime * 1000.0 + 10.0);
}
