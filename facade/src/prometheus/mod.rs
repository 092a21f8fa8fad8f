//! Guest statistics in the Prometheus text exposition format (version 0.0.4).
//!
//! Metric names follow Prometheus conventions rather than the vSphere API's units: times are
//! exported in seconds and memory in bytes, processor speeds in hertz, and monotonically
//! growing statistics (`cpu_used_ms`, `cpu_stolen_ms`, `elapsed_ms`, ...) are counters with a
//! `_total` suffix. So `cpu_stolen_ms` becomes `vmsdk_cpu_stolen_seconds_total` and
//! `mem_ballooned_mb` becomes `vmsdk_mem_ballooned_bytes`. The text statistic (the resource pool
//! path) is an info metric with the value in a label. Statistics the backend cannot give are
//! left out rather than exported as zero.
//!
//! ```
//! use vmsdk::guest_stats::fake::FakeGuestStats;
//! use vmsdk::guest_stats::GuestStats;
//!
//! let mut stats = FakeGuestStats::example();
//! stats.update()?;
//! let text = vmsdk::prometheus::render(&stats.snapshot()?);
//! assert!(text.contains("# TYPE vmsdk_cpu_stolen_seconds_total counter"));
//! # Ok::<(), vmsdk::Error>(())
//! ```

use std::fmt::Write as _;

use guest_stats::{Snapshot, Stat, StatValue, Unit};

/// The content type of the exposition format, for HTTP responses.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How one statistic appears as a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// The metric name, `vmsdk_` prefixed.
    pub name: String,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Multiply the statistic by this to get the metric value in base units.
    pub scale: f64,
}

/// The metric a numeric statistic is exported as.
pub fn metric_for(stat: Stat) -> Metric {
    let name = stat.name();
    let (stem, unit_suffix, scale) = match stat.unit() {
        Unit::Ms => (name.trim_end_matches("_ms"), "_seconds", 1e-3),
        Unit::Mb => (name.trim_end_matches("_mb"), "_bytes", 1024.0 * 1024.0),
        Unit::Mhz => (name.trim_end_matches("_mhz"), "_hertz", 1e6),
        _ => (name, "", 1.0),
    };
    let counter = stat.is_counter();
    Metric {
        name: format!(
            "vmsdk_{stem}{unit_suffix}{}",
            if counter { "_total" } else { "" }
        ),
        kind: if counter { "counter" } else { "gauge" },
        scale,
    }
}

/// Escapes a label value: backslash, double quote and newline, as the format requires.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Escapes HELP text: backslash and newline.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Renders every available statistic of `snapshot`, plus a `vmsdk_session_info` metric that
/// names the backend and session (a changed session means the counters restarted).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let backend = escape_label(&snapshot.backend);
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        out,
        "# HELP vmsdk_session_info The statistics session; counters restart when it changes.\n\
         # TYPE vmsdk_session_info gauge\n\
         vmsdk_session_info{{backend=\"{backend}\",session_id=\"{}\"}} 1",
        snapshot.session_id
    );
    for (stat, value) in snapshot.available() {
        match value {
            StatValue::U64(number) => {
                let metric = metric_for(stat);
                let value = number as f64 * metric.scale;
                let _ = writeln!(
                    out,
                    "# HELP {name} {help} (vSphere {c}, {unit} scaled to base units)\n\
                     # TYPE {name} {kind}\n\
                     {name}{{backend=\"{backend}\"}} {value}",
                    name = metric.name,
                    help = escape_help(stat.description()),
                    c = stat.c_function(),
                    unit = stat.unit(),
                    kind = metric.kind,
                );
            }
            StatValue::Text(text) => {
                let name = format!("vmsdk_{}_info", stat.name());
                let _ = writeln!(
                    out,
                    "# HELP {name} {help} (vSphere {c})\n\
                     # TYPE {name} gauge\n\
                     {name}{{backend=\"{backend}\",value=\"{value}\"}} 1",
                    help = escape_help(stat.description()),
                    c = stat.c_function(),
                    value = escape_label(&text),
                );
            }
            // StatValue may grow; a kind this renderer does not know is left out.
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_base_units_and_counter_suffixes() {
        assert_eq!(
            metric_for(Stat::CpuStolenMs).name,
            "vmsdk_cpu_stolen_seconds_total"
        );
        assert_eq!(metric_for(Stat::CpuStolenMs).kind, "counter");
        assert_eq!(
            metric_for(Stat::MemBalloonedMb).name,
            "vmsdk_mem_ballooned_bytes"
        );
        assert_eq!(metric_for(Stat::MemBalloonedMb).kind, "gauge");
        assert_eq!(metric_for(Stat::CpuLimitMhz).name, "vmsdk_cpu_limit_hertz");
        assert_eq!(metric_for(Stat::CpuShares).name, "vmsdk_cpu_shares");
    }

    #[test]
    fn every_metric_name_is_unique_and_valid() {
        let mut names: Vec<String> = Stat::ALL.iter().map(|s| metric_for(*s).name).collect();
        for name in &names {
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
