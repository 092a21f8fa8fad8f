//! `vmsdk stats`: the guest statistics of this VM, once, per interval, or served over HTTP.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Args, ValueEnum};
use guest_stats::{GuestStats, Interval, Sampler, Snapshot, StatValue};
use vmsdk::{prometheus, Platform};

use crate::CliResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object (one per line with --watch).
    Json,
    /// The Prometheus text exposition format.
    Prometheus,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Print per-interval rates (CPU used %, stolen %) every INTERVAL (e.g. 1s, 500ms, 2m).
    #[arg(long, value_name = "INTERVAL", value_parser = parse_duration, conflicts_with = "listen")]
    watch: Option<Duration>,
    /// With --watch: stop after this many intervals.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
    /// Serve the statistics at http://ADDR/metrics in the Prometheus format.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

/// Parses `1s`, `250ms`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 1s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}` (use ms, s or m)"
            ))
        }
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn run(platform: &Platform, args: &StatsArgs) -> CliResult {
    let stats = platform.guest_stats()?;
    if let Some(addr) = args.listen {
        return serve(stats, addr);
    }
    if let Some(interval) = args.watch {
        return watch(stats, interval, args.count, args.format);
    }
    let mut stats = stats;
    stats.update()?;
    let snapshot = stats.snapshot()?;
    match args.format {
        Format::Table => print!("{}", table(&snapshot)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
        Format::Prometheus => print!("{}", prometheus::render(&snapshot)),
    }
    Ok(ExitCode::SUCCESS)
}

fn table(snapshot: &Snapshot) -> String {
    let mut out = format!(
        "backend {}, session {}\n{:<26} {:>16}  {:<7} {}\n",
        snapshot.backend, snapshot.session_id, "STATISTIC", "VALUE", "UNIT", "DESCRIPTION"
    );
    for (stat, value) in snapshot.iter() {
        let shown = match value {
            Some(StatValue::U64(n)) => n.to_string(),
            Some(other) => other.to_string(),
            None => "n/a".to_owned(),
        };
        out.push_str(&format!(
            "{:<26} {:>16}  {:<7} {}\n",
            stat.name(),
            shown,
            stat.unit().to_string(),
            stat.description()
        ));
    }
    out
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn watch(
    stats: Box<dyn GuestStats>,
    interval: Duration,
    count: Option<u64>,
    format: Format,
) -> CliResult {
    let mut sampler = Sampler::new(stats);
    let mut stdout = std::io::stdout().lock();
    if format == Format::Table {
        writeln!(
            stdout,
            "{:<20} {:>9} {:>9} {:>11}  note",
            "SESSION", "USED %", "STOLEN %", "EFF. MHz"
        )?;
    }
    let mut printed = 0u64;
    // The first sample only sets the baseline; rates start with the second.
    sampler.sample()?;
    while count.is_none_or(|n| printed < n) {
        std::thread::sleep(interval);
        let sample = sampler.sample()?;
        print_interval(&mut stdout, &sample, format)?;
        printed += 1;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_interval(out: &mut impl std::io::Write, sample: &Interval, format: Format) -> CliResult {
    let note = if sample.session_changed {
        "session changed (vMotion, suspend/resume or snapshot revert): rates restart"
    } else {
        ""
    };
    match format {
        Format::Table => {
            let line = format!(
                "{:<20} {:>9} {:>9} {:>11}  {note}",
                sample.snapshot.session_id.to_string(),
                percent(sample.cpu_used_percent),
                percent(sample.cpu_stolen_percent),
                percent(sample.effective_cpu_mhz),
            );
            writeln!(out, "{}", line.trim_end())?;
        }
        Format::Json => {
            let line = serde_json::to_string(sample)?;
            writeln!(out, "{line}")?;
        }
        Format::Prometheus => write!(out, "{}", prometheus::render(&sample.snapshot))?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Serves `/metrics` until killed; every scrape takes a fresh update.
fn serve(stats: Box<dyn GuestStats>, addr: SocketAddr) -> CliResult {
    let server =
        tiny_http::Server::http(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    println!("serving http://{bound}/metrics");
    std::io::stdout().flush()?;
    let stats = Mutex::new(stats);
    let content_type = tiny_http::Header::from_bytes("Content-Type", prometheus::CONTENT_TYPE)
        .map_err(|()| "bad content type header")?;
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("").to_owned();
        let response = match (request.method(), path.as_str()) {
            (tiny_http::Method::Get, "/metrics") => {
                let body = scrape(&stats);
                match body {
                    Ok(text) => {
                        tiny_http::Response::from_string(text).with_header(content_type.clone())
                    }
                    Err(error) => {
                        tiny_http::Response::from_string(format!("{error}\n")).with_status_code(503)
                    }
                }
            }
            (tiny_http::Method::Get, "/") => {
                tiny_http::Response::from_string("vmsdk guest statistics exporter: see /metrics\n")
            }
            _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
        };
        // A scraper that hung up early is its own problem; keep serving the others.
        let _ = request.respond(response);
    }
    Ok(ExitCode::SUCCESS)
}

fn scrape(stats: &Mutex<Box<dyn GuestStats>>) -> Result<String, guest_stats::Error> {
    // A panic while holding the lock cannot leave the stats half-updated in a way that matters:
    // the next update replaces everything.
    let mut stats = stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stats.update()?;
    Ok(prometheus::render(&stats.snapshot()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
