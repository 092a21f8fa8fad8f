//! What the VDDK backend itself costs per request: reads and writes through the real `dlopen`
//! path into the stand-in `libvixDiskLib.so` (a memcpy behind a mutex), synchronously and with
//! asynchronous submissions, and a whole-disk copy with the copy engine. VDDK's own cost on a
//! real host (milliseconds per NFC round trip) dwarfs these numbers; they show the SDK adds
//! little.
//!
//! ```text
//! cargo bench -p disk-transport --bench vddk_standin
//! DT_BENCH_MIB=256 DT_BENCH_RUNS=5 cargo bench -p disk-transport --bench vddk_standin
//! ```

#[cfg(all(feature = "vddk", target_os = "linux"))]
#[path = "../tests/vddk_support/mod.rs"]
mod vddk_support;

#[cfg(all(feature = "vddk", target_os = "linux"))]
fn main() {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use disk_transport::copy::{copy, CopyOptions};
    use disk_transport::null::NullDisk;
    use disk_transport::vddk::VddkTransport;
    use disk_transport::{ConnectParams, DiskTransport, OpenFlags};

    let mib: u64 = std::env::var("DT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let runs: usize = std::env::var("DT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let size = mib << 20;
    // The stand-in without artificial delays or per-call statistics files: what remains is the
    // SDK's own overhead plus a memcpy.
    let fixture = vddk_support::Fixture::new("");
    std::fs::write(&fixture.config, "standin.delayUs = 0\n").unwrap();
    let vddk = VddkTransport::new(&fixture.options()).expect("load the stand-in");
    let connection = vddk
        .connect(&ConnectParams::builder().read_write().build().unwrap())
        .unwrap();
    let disk = connection
        .open(&format!("bench?size={size}"), OpenFlags::read_write())
        .unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    for offset in (0..size).step_by(1 << 20) {
        disk.write_at(&block, offset).unwrap();
    }

    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let report = |name: &str, request: u64, times: Vec<Duration>| {
        let t = median(times);
        let requests = size / request;
        println!(
            "{name:<34} {:>8.0} MiB/s  {:>7.1} µs/request ({requests} requests of {} KiB, median of {runs})",
            mib as f64 / t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / requests as f64,
            request >> 10
        );
    };

    for request in [4096u64, 65536, 1 << 20] {
        let mut buf = vec![0u8; request as usize];
        let times = (0..runs)
            .map(|_| {
                let started = Instant::now();
                for offset in (0..size).step_by(request as usize) {
                    disk.read_at(&mut buf, offset).unwrap();
                }
                started.elapsed()
            })
            .collect();
        report("read_at (VixDiskLib_Read)", request, times);
    }

    for request in [65536u64, 1 << 20] {
        let times = (0..runs)
            .map(|_| {
                let (tx, rx) = mpsc::channel::<disk_transport::Result<()>>();
                let started = Instant::now();
                let mut in_flight = 0;
                for offset in (0..size).step_by(request as usize) {
                    if in_flight == disk.max_in_flight() {
                        rx.recv().unwrap().unwrap();
                        in_flight -= 1;
                    }
                    let tx = tx.clone();
                    disk.submit_read(
                        offset,
                        vec![0; request as usize],
                        Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
                    );
                    in_flight += 1;
                }
                for _ in 0..in_flight {
                    rx.recv().unwrap().unwrap();
                }
                started.elapsed()
            })
            .collect();
        report("submit_read (VixDiskLib_ReadAsync)", request, times);
    }

    let times = (0..runs)
        .map(|_| {
            let started = Instant::now();
            copy(
                disk.as_ref(),
                &NullDisk::new(size),
                &CopyOptions::default(),
                &mut |_| {},
            )
            .unwrap();
            started.elapsed()
        })
        .collect();
    report("copy engine to a null sink", 256 << 10, times);
    for call in disk_transport::vddk::call_stats().iter().take(5) {
        println!(
            "  {:<34} {:>8} calls {:>10.1} ms",
            call.function,
            call.calls,
            call.total.as_secs_f64() * 1e3
        );
    }
}

#[cfg(not(all(feature = "vddk", target_os = "linux")))]
fn main() {
    println!("the VDDK benchmark needs the `vddk` feature on Linux");
}
