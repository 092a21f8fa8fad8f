//! What one update costs: decoding guestlib replies, the whole VMware client stack against the
//! simulated host (so: the Rust side of an update, without the hypervisor's own time), and the
//! Linux backend reading a fixture tree.
//!
//! `cargo bench -p guest-stats --bench stats`

use std::path::PathBuf;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use guest_stats::linux::LinuxGuestStats;
use guest_stats::vmware::guestlib::{self, GuestlibInfo};
use guest_stats::vmware::sim::SimHost;
use guest_stats::vmware::VmwareGuestStats;
use guest_stats::{GuestStats, SessionId, Stat, StatValue};

fn full_info() -> GuestlibInfo {
    Stat::ALL.iter().enumerate().fold(
        GuestlibInfo::new(3, SessionId::new(0x5a17)),
        |info, (index, &stat)| {
            let value = if stat == Stat::ResourcePoolPath {
                StatValue::Text("/Datacenter/host/Cluster/Resources/prod".into())
            } else {
                StatValue::U64(index as u64 * 1_000)
            };
            info.with(stat, Some(value))
        },
    )
}

fn decoders(c: &mut Criterion) {
    let v3 = guestlib::encode_v3(&full_info());
    let v2 = guestlib::encode_v2(&full_info());
    c.bench_function("decode_v3 (36 statistics)", |b| {
        b.iter(|| guestlib::decode_v3(black_box(&v3)).unwrap())
    });
    c.bench_function("decode_v2 (669 bytes)", |b| {
        b.iter(|| guestlib::decode_v2(black_box(&v2)).unwrap())
    });
}

fn vmware_update(c: &mut Criterion) {
    let mut high_bandwidth =
        VmwareGuestStats::with_backdoor(SimHost::guestlib(vec![full_info()], 3));
    c.bench_function("vmware update, simulated host, high bandwidth", |b| {
        b.iter(|| high_bandwidth.update().unwrap())
    });
    let mut low_bandwidth = VmwareGuestStats::with_backdoor(
        SimHost::guestlib(vec![full_info()], 3).without_high_bandwidth(),
    );
    c.bench_function("vmware update, simulated host, 4 bytes a call", |b| {
        b.iter(|| low_bandwidth.update().unwrap())
    });
}

fn linux_update(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/xen-hvm-cgroup2");
    let mut fixture = LinuxGuestStats::with_root(root);
    c.bench_function("linux update + snapshot, fixture tree", |b| {
        b.iter(|| {
            fixture.update().unwrap();
            fixture.snapshot().unwrap()
        })
    });
    let mut live = LinuxGuestStats::new();
    if live.update().is_ok() {
        // The floor: only read and split the two files every Linux backend must read.
        c.bench_function("baseline: read + split /proc/stat and /proc/meminfo", |b| {
            b.iter(|| {
                let mut fields = 0usize;
                for path in ["/proc/stat", "/proc/meminfo"] {
                    let text = std::fs::read_to_string(path).unwrap();
                    for line in text.lines() {
                        fields += line
                            .split_whitespace()
                            .filter_map(|f| f.parse::<u64>().ok())
                            .count();
                    }
                }
                black_box(fields)
            })
        });
        c.bench_function("linux update + snapshot, this machine", |b| {
            b.iter(|| {
                live.update().unwrap();
                live.snapshot().unwrap()
            })
        });
        // What an update costs when the refresh interval has passed (open files kept).
        let mut refreshing = LinuxGuestStats::builder()
            .refresh_interval(std::time::Duration::from_nanos(1))
            .build();
        c.bench_function(
            "linux update + snapshot, this machine, refresh interval passed",
            |b| {
                b.iter(|| {
                    refreshing.update().unwrap();
                    refreshing.snapshot().unwrap()
                })
            },
        );
        // What an update costs when it looks everything up again (the first update, a new
        // session, and once every refresh interval).
        let mut cold = LinuxGuestStats::builder()
            .refresh_interval(std::time::Duration::ZERO)
            .build();
        c.bench_function(
            "linux update + snapshot, this machine, everything looked up",
            |b| {
                b.iter(|| {
                    cold.update().unwrap();
                    cold.snapshot().unwrap()
                })
            },
        );
    }
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, decoders, vmware_update, linux_update);
}
use group::benches;
criterion_main!(benches);
