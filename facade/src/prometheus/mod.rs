//! Prometheus metrics encoded by the official `prometheus-client` crate: the guest statistics
//! of this VM (feature `stats`) and the guest agent metrics of many guests on a host (feature
//! `agent`).
//!
//! For the statistics of this VM, three ways in, from the most to the least integrated:
//!
//! - [`StatsCollector`][link-stats-collector]: a `prometheus-client`
//!   [`Collector`](prometheus_client::collector::Collector) for the [`Registry`] your program
//!   already serves. Each encode of the registry takes a fresh sample, so a scrape always sees
//!   current values and the rates since the previous scrape.
//! - [`Endpoint`][link-endpoint]: the answer to a `/metrics` request, for the HTTP server you
//!   already run (axum, hyper, actix, ...): give it the request's `Accept` header, send back
//!   the status, `Content-Type` and body it returns.
//! - [`Exporter`][link-exporter] (feature `exporter`): a ready `/metrics` server on tiny_http,
//!   the one `vmsdk stats --listen` runs.
//!
//! [`render`][link-render] gives one exposition of a statistics snapshot as a string (what
//! `vmsdk stats --format prometheus` prints; node_exporter's textfile collector reads it too).
//!
//! For the guests of a host, [`GuestCollector`][link-guest-collector] turns the answers of a
//! [`GuestMonitor`][link-guest-monitor]'s scrape into `vmsdk_guest_*` metrics (named after
//! node_exporter's), and the exporter serves them with Prometheus' multi-target `/probe`
//! (`vmsdk guests --listen`).
//!
//! # Names
//!
//! Metric names follow Prometheus conventions rather than the vSphere API's units: times are
//! exported in seconds, memory in bytes and processor speeds in hertz, and monotonically
//! growing statistics (`cpu_used_ms`, `cpu_stolen_ms`, `elapsed_ms`, ...) are counters with a
//! `_total` suffix. So `cpu_stolen_ms` becomes `vmsdk_cpu_stolen_seconds_total` and
//! `mem_ballooned_mb` becomes `vmsdk_mem_ballooned_bytes`. Every statistic carries a `backend`
//! label (`vmware`, `linux`, `fake`); the text statistic (the resource pool path) is an info
//! metric with the value in a label. Statistics the backend cannot give are left out rather
//! than exported as zero.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `vmsdk_session_info{backend, session_id}` | info | the statistics session: counters restart when it changes |
//! | `vmsdk_<statistic>_<unit>[_total]{backend}` | counter or gauge | one per available statistic |
//! | `vmsdk_interval_seconds` | gauge | how long the interval of the rates below was |
//! | `vmsdk_interval_cpu_used_ratio` | gauge | CPU time used in the interval ÷ its length (1 = one CPU busy throughout) |
//! | `vmsdk_interval_cpu_stolen_ratio` | gauge | CPU time stolen in the interval ÷ its length |
//! | `vmsdk_interval_effective_cpu_hertz` | gauge | host processor speed × used ÷ elapsed |
//! | `vmsdk_session_changes_total` | counter | session changes seen (vMotion, suspend/resume, snapshot revert) |
//! | `vmsdk_stats_up` | gauge | 1 when the last update of the statistics succeeded, else 0 |
//!
//! The interval metrics are those of [`Sampler`][link-sampler]: they cover the time
//! since the previous scrape and are left out when there is none, or when the session changed
//! in between (counters of two sessions cannot be subtracted). Prometheus can also compute
//! rates itself from the counters: `rate(vmsdk_cpu_stolen_seconds_total[5m])`.
//!
//! # Formats
//!
//! [`Format::negotiate`] picks the format from the scraper's `Accept` header: OpenMetrics 1.0,
//! which Prometheus 2 and 3 ask for first (`# UNIT` lines, counter families without the
//! `_total` suffix, a final `# EOF`), or the Prometheus text format 0.0.4 for every other
//! scraper. [`Format::content_type`] is the exact `Content-Type` to send with it: Prometheus 3
//! refuses a scrape without a valid one.
//!
//! ```
//! # #[cfg(feature = "stats")] {
//! use vmsdk::guest_stats::fake::FakeGuestStats;
//! use vmsdk::prometheus::{Endpoint, Format};
//!
//! let endpoint = Endpoint::builder()
//!     .label("vm", "db-1")?
//!     .build(FakeGuestStats::example())?;
//! // What Prometheus 3 sends:
//! let accept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
//!               text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
//! let scrape = endpoint.scrape(Some(accept));
//! assert_eq!(scrape.status, 200);
//! assert_eq!(scrape.content_type, Format::OpenMetrics.content_type());
//! assert!(scrape.body.contains("# UNIT vmsdk_cpu_stolen_seconds seconds"));
//! assert!(scrape.body.contains("vmsdk_cpu_stolen_seconds_total{vm=\"db-1\",backend=\"fake\"}"));
//! assert!(scrape.body.ends_with("# EOF\n"));
//! # }
//! # Ok::<(), vmsdk::Error>(())
//! ```

#![cfg_attr(
    feature = "stats",
    doc = "",
    doc = "[link-stats-collector]: StatsCollector",
    doc = "[link-endpoint]: Endpoint",
    doc = "[link-render]: render",
    doc = "[link-sampler]: guest_stats::Sampler"
)]
#![cfg_attr(
    not(feature = "stats"),
    doc = "",
    doc = "[link-stats-collector]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.StatsCollector.html",
    doc = "[link-endpoint]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.Endpoint.html",
    doc = "[link-render]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/fn.render.html",
    doc = "[link-sampler]: https://docs.rs/guest-stats/latest/guest_stats/struct.Sampler.html"
)]
#![cfg_attr(feature = "exporter", doc = "", doc = "[link-exporter]: Exporter")]
#![cfg_attr(
    not(feature = "exporter"),
    doc = "",
    doc = "[link-exporter]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.Exporter.html"
)]
#![cfg_attr(
    feature = "agent",
    doc = "",
    doc = "[link-guest-collector]: GuestCollector",
    doc = "[link-guest-monitor]: crate::agent::monitor::GuestMonitor"
)]
#![cfg_attr(
    not(feature = "agent"),
    doc = "",
    doc = "[link-guest-collector]: https://docs.rs/vmsdk/latest/vmsdk/prometheus/struct.GuestCollector.html",
    doc = "[link-guest-monitor]: https://docs.rs/vmsdk/latest/vmsdk/agent/monitor/struct.GuestMonitor.html"
)]

#[cfg(feature = "stats")]
mod collector;
#[cfg(feature = "stats")]
mod endpoint;
#[cfg(feature = "exporter")]
mod exporter;
#[cfg(feature = "agent")]
mod guests;

use std::fmt;

#[cfg(feature = "stats")]
use guest_stats::{Snapshot, Stat, Unit};
use prometheus_client::registry::Registry;

#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub use self::collector::StatsCollector;
#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub use self::endpoint::{Endpoint, EndpointBuilder};
#[cfg(feature = "exporter")]
#[cfg_attr(docsrs, doc(cfg(feature = "exporter")))]
pub use self::exporter::{Exporter, RunningExporter, Stopper};
#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub use self::guests::GuestCollector;

/// The `prometheus-client` crate this module encodes with, re-exported so that your
/// [`Registry`] is of the same version as vmsdk's collectors'.
pub use prometheus_client;

/// The prefix of every metric name.
pub const PREFIX: &str = "vmsdk";

/// An exposition format, with its exact content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// OpenMetrics 1.0 text: `# UNIT` lines, counter families named without `_total`, `# EOF`.
    OpenMetrics,
    /// The Prometheus text exposition format 0.0.4.
    Text,
}

impl Format {
    /// The `Content-Type` to send with an exposition in this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format to answer a request with the `Accept` header `accept` (`None` when the
    /// request had none).
    ///
    /// The media range with the highest `q` that names a format wins, the first one on a tie:
    /// `application/openmetrics-text` (version 1.0.0 or 0.0.1, or none; the answer is always
    /// 1.0.0) for OpenMetrics, `text/plain` (version 0.0.4 or 1.0.0, or none), `text/*` and
    /// `*/*` for text 0.0.4. Requests that name neither, or no header at all, get text 0.0.4,
    /// which every scraper reads. The names are the same in every escaping scheme, so an
    /// `escaping` parameter changes nothing.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut quality = 1.0_f32;
            let mut version = None;
            for parameter in parts {
                let Some((key, value)) = parameter.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    // An unparsable weight makes the range unusable rather than preferred.
                    "q" => quality = value.parse().unwrap_or(0.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
            let format = match (media.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => {
                    Format::OpenMetrics
                }
                ("text/plain", None | Some("0.0.4" | "1.0.0")) | ("text/*" | "*/*", _) => {
                    Format::Text
                }
                _ => continue,
            };
            if quality > 0.0 && best.is_none_or(|(best_quality, _)| quality > best_quality) {
                best = Some((quality, format));
            }
        }
        best.map_or(Format::Text, |(_, format)| format)
    }

    /// Encodes every metric of `registry` in this format.
    ///
    /// Fails only when one of the registry's own metrics or collectors fails to encode;
    /// vmsdk's never do.
    pub fn encode(self, registry: &Registry) -> Result<String, fmt::Error> {
        let mut text = String::new();
        match self {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, registry)?,
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?
            }
        }
        Ok(text)
    }
}

/// One answer to a scrape: send it back as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scrape {
    /// The HTTP status: 200, or 503 when the statistics could not be updated.
    pub status: u16,
    /// The exact `Content-Type` header value.
    pub content_type: &'static str,
    /// The exposition, or the error for a 503.
    pub body: String,
    /// The format of the exposition (what the `Accept` header negotiated).
    pub format: Format,
}

impl Scrape {
    /// Encodes `registry` in the format `accept` (a request's `Accept` header) negotiates:
    /// 200 with the exposition, or 500 when one of the registry's metrics fails to encode.
    pub fn of_registry(registry: &Registry, accept: Option<&str>) -> Scrape {
        let format = Format::negotiate(accept);
        match format.encode(registry) {
            Ok(body) => Scrape {
                status: 200,
                content_type: format.content_type(),
                body,
                format,
            },
            Err(_) => Scrape::plain(500, "cannot encode the metrics\n".to_owned(), format),
        }
    }

    /// A plain-text answer (an error, an index page).
    pub(crate) fn plain(status: u16, body: String, format: Format) -> Scrape {
        Scrape {
            status,
            content_type: PLAIN_TEXT,
            body,
            format,
        }
    }
}

/// The content type of plain-text answers (errors, the index page).
pub(crate) const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// How one statistic appears as a metric.
#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metric {
    /// The name of its sample: `vmsdk_` prefixed, with the unit, and `_total` for counters.
    pub name: String,
    /// The name without prefix, unit and `_total`: `cpu_stolen`.
    pub stem: &'static str,
    /// The base unit the value is in and the name ends with: `seconds`, `bytes`, `hertz`.
    pub unit: Option<&'static str>,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Multiply the statistic by this to get the metric value in base units.
    pub scale: f64,
}

/// The metric a numeric statistic is exported as.
#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub fn metric_for(stat: Stat) -> Metric {
    let name = stat.name();
    let (stem, unit, scale) = match stat.unit() {
        Unit::Ms => (name.trim_end_matches("_ms"), Some("seconds"), 1e-3),
        Unit::Mb => (name.trim_end_matches("_mb"), Some("bytes"), 1024.0 * 1024.0),
        Unit::Mhz => (name.trim_end_matches("_mhz"), Some("hertz"), 1e6),
        _ => (name, None, 1.0),
    };
    let counter = stat.is_counter();
    Metric {
        name: format!(
            "{PREFIX}_{stem}{}{}",
            unit.map(|u| format!("_{u}")).unwrap_or_default(),
            if counter { "_total" } else { "" }
        ),
        stem,
        unit,
        kind: if counter { "counter" } else { "gauge" },
        scale,
    }
}

/// Renders every available statistic of `snapshot` in the text format 0.0.4, plus a
/// `vmsdk_session_info` metric that names the backend and session (a changed session means
/// the counters restarted). No rates: they need two samples (see [`StatsCollector`]).
///
/// ```
/// use vmsdk::guest_stats::fake::FakeGuestStats;
/// use vmsdk::guest_stats::GuestStats;
///
/// let mut stats = FakeGuestStats::example();
/// stats.update()?;
/// let text = vmsdk::prometheus::render(&stats.snapshot()?);
/// assert!(text.contains("# TYPE vmsdk_cpu_stolen_seconds_total counter"));
/// # Ok::<(), vmsdk::Error>(())
/// ```
#[cfg(feature = "stats")]
#[cfg_attr(docsrs, doc(cfg(feature = "stats")))]
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(collector::SnapshotMetrics(snapshot.clone())));
    // The snapshot's metrics write to a String and cannot fail.
    Format::Text.encode(&registry).unwrap_or_default()
}

/// Checks that `name` is a metric or label name in every Prometheus version: ASCII letters,
/// digits and `_`, not starting with a digit, and (for labels) not with the reserved `__`.
#[cfg_attr(not(feature = "stats"), allow(dead_code))]
pub(crate) fn check_name(kind: &'static str, name: &str) -> crate::Result<()> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    let problem = if !valid {
        format!("a {kind} is ASCII letters, digits and `_`, and does not start with a digit")
    } else if kind == "label name" && name.starts_with("__") {
        "label names starting with `__` are reserved for Prometheus".to_owned()
    } else {
        return Ok(());
    };
    Err(crate::Error::InvalidMetricName {
        name: name.to_owned(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "stats")]
    #[test]
    fn names_use_base_units_and_counter_suffixes() {
        let stolen = metric_for(Stat::CpuStolenMs);
        assert_eq!(stolen.name, "vmsdk_cpu_stolen_seconds_total");
        assert_eq!((stolen.stem, stolen.unit), ("cpu_stolen", Some("seconds")));
        assert_eq!(stolen.kind, "counter");
        assert_eq!(
            metric_for(Stat::MemBalloonedMb).name,
            "vmsdk_mem_ballooned_bytes"
        );
        assert_eq!(metric_for(Stat::MemBalloonedMb).kind, "gauge");
        assert_eq!(metric_for(Stat::CpuLimitMhz).name, "vmsdk_cpu_limit_hertz");
        assert_eq!(metric_for(Stat::CpuShares).name, "vmsdk_cpu_shares");
        assert_eq!(metric_for(Stat::CpuShares).unit, None);
    }

    #[cfg(feature = "stats")]
    #[test]
    fn every_metric_name_is_unique_and_valid() {
        let mut names: Vec<String> = Stat::ALL.iter().map(|s| metric_for(*s).name).collect();
        for name in &names {
            check_name("metric name", name).unwrap();
        }
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    /// The Accept headers real scrapers send, and what each gets.
    #[test]
    fn negotiation_follows_the_scrapers_preferences() {
        // Prometheus 3.x default scrape_protocols.
        let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
             application/openmetrics-text;version=0.0.1;q=0.4,\
             text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,\
             text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        // Prometheus 2.x before scrape_protocols existed.
        let prometheus2 = "application/openmetrics-text;version=1.0.0,\
             application/openmetrics-text;version=0.0.1;q=0.75,\
             text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        // Older 2.x.
        let prometheus2_old =
            "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for accept in [prometheus3, prometheus2, prometheus2_old] {
            assert_eq!(
                Format::negotiate(Some(accept)),
                Format::OpenMetrics,
                "{accept}"
            );
        }
        // Telegraf, curl, browsers, a missing header, a protobuf-only request.
        for accept in [
            Some("text/plain; version=0.0.4"),
            Some("*/*"),
            Some("text/html,application/xhtml+xml,*/*;q=0.8"),
            None,
            Some(""),
            Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"),
        ] {
            assert_eq!(Format::negotiate(accept), Format::Text, "{accept:?}");
        }
        // Weights decide, not order; q=0 and unknown versions are refusals.
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.3"
            )),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0,text/plain")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; Version=\"1.0.0\"")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn content_types_are_exact() {
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Text.content_type(),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        );
    }

    #[test]
    fn names_are_checked() {
        for good in ["vm", "_x", "host_name2"] {
            check_name("label name", good).unwrap();
        }
        for bad in ["", "2vm", "vm-name", "vm.name", "__reserved", "ü"] {
            let error = check_name("label name", bad).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("invalid Prometheus name `{bad}`: ")),
                "{error}"
            );
        }
    }
}
