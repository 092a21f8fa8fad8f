//! `vmsdk stats`: the guest statistics of this VM, once, per interval, or served over HTTP.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use guest_stats::{GuestStats, Interval, Sampler, Snapshot, StatValue};
use vmsdk::prometheus::{self, Endpoint, Exporter};
use vmsdk::{Hypervisor, Platform};

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
    /// Serve the statistics at http://ADDR/metrics for Prometheus (OpenMetrics or text 0.0.4,
    /// as the scraper asks), with the per-interval rates.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// With --listen: a label on every metric, e.g. --label vm=db-1 (repeatable).
    #[arg(long, value_name = "NAME=VALUE", requires = "listen", value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// Table: every statistic, also those this hypervisor does not give (shown as n/a).
    #[arg(long)]
    all: bool,
}

/// Parses `NAME=VALUE`.
pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("`{text}` is not NAME=VALUE"))
}

/// Parses `1s`, `250ms`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
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
        return serve(stats, addr, &args.label);
    }
    if let Some(interval) = args.watch {
        return watch(stats, interval, args.count, args.format);
    }
    let mut stats = stats;
    stats.update()?;
    let snapshot = stats.snapshot()?;
    match args.format {
        Format::Table if args.all => print!("{}", table(&snapshot)),
        Format::Table => print!("{}", first_table(&snapshot, platform.detection().vm)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
        Format::Prometheus => print!("{}", prometheus::render(&snapshot)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every statistic, `n/a` where there is no value (`--all`).
fn table(snapshot: &Snapshot) -> String {
    let mut out = table_header(snapshot);
    for (stat, value) in snapshot.iter() {
        out.push_str(&table_row(stat, value.as_ref()));
    }
    out
}

/// The statistics this machine gives, then one line on how many it does not and why.
fn first_table(snapshot: &Snapshot, hypervisor: Option<Hypervisor>) -> String {
    let mut out = table_header(snapshot);
    for (stat, value) in snapshot.available() {
        out.push_str(&table_row(stat, Some(&value)));
    }
    let missing = snapshot.iter().filter(|(_, value)| value.is_none()).count();
    if missing > 0 {
        out.push_str(&missing_line(missing, &snapshot.backend, hypervisor));
        out.push('\n');
    }
    out
}

/// Why `missing` statistics have no value here, in one line.
fn missing_line(missing: usize, backend: &str, hypervisor: Option<Hypervisor>) -> String {
    let statistics = if missing == 1 {
        "1 statistic is"
    } else {
        &format!("{missing} statistics are")
    };
    match backend {
        // Outside VMware the guest kernel gives CPU time, steal, balloon and memory figures;
        // reservations, limits, shares and the host's own figures only a VMware host knows.
        "linux" => {
            let place = hypervisor.map_or_else(|| "this machine".to_owned(), |h| h.to_string());
            format!("{statistics} VMware host figures; not available on {place}; --all lists them")
        }
        "vmware" => format!(
            "{statistics} not given by this VMware host (its version or configuration); --all \
             lists them"
        ),
        other => format!("{statistics} not given by the {other} backend; --all lists them"),
    }
}

fn table_header(snapshot: &Snapshot) -> String {
    format!(
        "backend {}, session {}\n{:<26} {:>16}  {:<7} {}\n",
        snapshot.backend, snapshot.session_id, "STATISTIC", "VALUE", "UNIT", "DESCRIPTION"
    )
}

fn table_row(stat: guest_stats::Stat, value: Option<&StatValue>) -> String {
    let shown = match value {
        Some(StatValue::U64(n)) => n.to_string(),
        Some(other) => other.to_string(),
        None => "n/a".to_owned(),
    };
    format!(
        "{:<26} {:>16}  {:<7} {}\n",
        stat.name(),
        shown,
        stat.unit().to_string(),
        stat.description()
    )
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

/// Serves `/metrics` until killed, through the library's exporter; every scrape takes a fresh
/// update and the rates since the previous one.
fn serve(stats: Box<dyn GuestStats>, addr: SocketAddr, labels: &[(String, String)]) -> CliResult {
    let mut endpoint = Endpoint::builder();
    for (name, value) in labels {
        endpoint = endpoint.label(name, value)?;
    }
    let exporter = Exporter::bind(addr, endpoint.build(stats)?)?;
    println!("serving http://{}/metrics", exporter.local_addr());
    std::io::stdout().flush()?;
    exporter.serve();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_table_leads_with_what_this_machine_gives() {
        use guest_stats::fake::{FakeGuestStats, FakeSample};
        use guest_stats::Stat;

        let mut stats = FakeGuestStats::constant(
            FakeSample::new()
                .with(Stat::CpuStolenMs, 42u64)
                .with(Stat::ElapsedMs, 1_000u64),
        );
        stats.update().unwrap();
        let mut snapshot = stats.snapshot().unwrap();
        snapshot.backend = "linux".to_owned();
        let text = first_table(&snapshot, Some(Hypervisor::Kvm));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[2].starts_with("elapsed_ms "), "{text}");
        assert!(lines[3].starts_with("cpu_stolen_ms "), "{text}");
        let missing = Stat::ALL.len() - 2;
        assert_eq!(
            lines[4],
            format!("{missing} statistics are VMware host figures; not available on kvm; --all lists them")
        );
        assert!(!text.contains("n/a"));
        // --all: every statistic, in the API's order.
        assert_eq!(table(&snapshot).lines().count(), Stat::ALL.len() + 2);
        assert_eq!(
            missing_line(1, "vmware", Some(Hypervisor::Vmware)),
            "1 statistic is not given by this VMware host (its version or configuration); --all lists them"
        );
        assert_eq!(
            missing_line(3, "linux", None),
            "3 statistics are VMware host figures; not available on this machine; --all lists them"
        );
    }

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
