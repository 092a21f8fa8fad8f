//! A portable monitoring agent: detects the hypervisor, picks the statistics backend that fits,
//! and prints CPU and memory pressure every interval, restarting its rates whenever the session
//! changes (vMotion, suspend/resume, snapshot revert).
//!
//! ```sh
//! cargo run -p vmsdk --example monitor                 # real backend for this machine
//! VMSDK_BACKEND=fake cargo run -p vmsdk --example monitor -- 0.2 5
//! ```
//!
//! Arguments: the interval in seconds (default 5) and how many reports to print (default: run
//! until stopped).

use std::time::Duration;

use vmsdk::guest_stats::{Interval, Sampler, Stat};
use vmsdk::Platform;

/// One report line; a monitoring agent would ship these to its backend instead.
fn report(interval: &Interval) -> String {
    let snapshot = &interval.snapshot;
    let mb = |stat| {
        snapshot
            .value(stat)
            .and_then(|v| v.as_u64())
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v} MB"))
    };
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}%"));
    if interval.session_changed {
        return format!(
            "session {} started: the VM moved, resumed or was reverted; rates restart",
            snapshot.session_id
        );
    }
    format!(
        "cpu used {} stolen {} | memory used {} ballooned {} swapped {}",
        pct(interval.cpu_used_percent),
        pct(interval.cpu_stolen_percent),
        mb(Stat::MemUsedMb),
        mb(Stat::MemBalloonedMb),
        mb(Stat::MemSwappedMb),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map_or(Ok(5.0), |a| a.parse())?;
    let reports: Option<u64> = args.next().map(|a| a.parse()).transpose()?;

    let platform = Platform::detect()?;
    let hypervisor = platform
        .detection()
        .vm
        .map_or_else(|| "bare metal".to_owned(), |h| h.to_string());
    let stats = platform.guest_stats()?;
    println!(
        "on {hypervisor}, statistics from the {} backend",
        stats.backend()
    );

    let mut sampler = Sampler::new(stats);
    sampler.sample()?; // the baseline
    let mut printed = 0;
    while reports.is_none_or(|n| printed < n) {
        std::thread::sleep(Duration::from_secs_f64(seconds));
        match sampler.sample() {
            Ok(interval) => println!("{}", report(&interval)),
            // A failed update is worth a line, not the end of the agent.
            Err(error) => eprintln!("update failed: {error}"),
        }
        printed += 1;
    }
    Ok(())
}
