//! A small portable monitoring agent: every second, print CPU steal and balloon size.
//!
//! Run it on the fake backend anywhere:
//!
//! ```text
//! cargo run -p guest-stats --example stats_sampler -- fake 5
//! ```
//!
//! or on the real thing: `linux` (any Linux guest) or `vmware` (a VMware guest).

use std::process::ExitCode;
use std::time::Duration;

use guest_stats::fake::FakeGuestStats;
use guest_stats::{Error, GuestStats, Sampler};

fn open(backend: &str) -> Result<Box<dyn GuestStats>, Box<dyn std::error::Error>> {
    Ok(match backend {
        "fake" => Box::new(FakeGuestStats::example()),
        #[cfg(feature = "linux")]
        "linux" => Box::new(guest_stats::linux::LinuxGuestStats::new()),
        #[cfg(feature = "vmware")]
        "vmware" => Box::new(guest_stats::vmware::VmwareGuestStats::open()?),
        other => {
            return Err(format!("unknown backend `{other}` (try fake, linux or vmware)").into())
        }
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("monitor: {error}");
            // EX_UNAVAILABLE, as vmware-toolbox-cmd exits when the Guest API is missing.
            ExitCode::from(69)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let backend = args.next().unwrap_or_else(|| "fake".to_owned());
    let rounds: u32 = args.next().map_or(Ok(5), |n| n.parse())?;

    let mut sampler = Sampler::new(open(&backend)?);
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let interval = match sampler.sample() {
            Ok(interval) => interval,
            // Report and carry on: a host can refuse one update and answer the next.
            Err(error) => {
                eprintln!("update failed (VMGuestLibError {}): {error}", error.code());
                continue;
            }
        };
        let snapshot = &interval.snapshot;
        if interval.session_changed {
            println!("session changed to {}: rates restart", snapshot.session_id);
        }
        let percent = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.1} %"));
        let balloon = sampler
            .source()
            .mem_ballooned_mb()
            .map(|mb| format!("{mb} MB"))
            .or_else(|error| match error {
                Error::NotAvailable { .. } => Ok("n/a".to_owned()),
                other => Err(other),
            })?;
        println!(
            "[{}] session {} cpu used {} stolen {} balloon {balloon}",
            snapshot.backend,
            snapshot.session_id,
            percent(interval.cpu_used_percent),
            percent(interval.cpu_stolen_percent),
        );
    }
    Ok(())
}
