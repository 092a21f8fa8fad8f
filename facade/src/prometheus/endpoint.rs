//! The answer to a `/metrics` request, without a server.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};

use guest_stats::GuestStats;
use prometheus_client::registry::Registry;

use super::{check_name, Format, Scrape, StatsCollector, PLAIN_TEXT, PREFIX};

/// Labels vmsdk puts on its own metrics, which a constant label may not shadow.
const OWN_LABELS: &[&str] = &["backend", "session_id", "value"];

/// The `/metrics` endpoint of a guest statistics exporter, for the HTTP server you run: each
/// [`scrape`](Endpoint::scrape) updates the statistics and answers in the format the
/// `Accept` header asks for, with your constant labels on every metric.
///
/// ```
/// use vmsdk::guest_stats::fake::FakeGuestStats;
/// use vmsdk::prometheus::{Endpoint, Format};
///
/// let endpoint = Endpoint::builder()
///     .label("instance_role", "database")?
///     .build(FakeGuestStats::example())?;
/// // In your handler: pass the request's Accept header, answer with what comes back.
/// let scrape = endpoint.scrape(Some("text/plain; version=0.0.4"));
/// assert_eq!((scrape.status, scrape.content_type), (200, Format::Text.content_type()));
/// assert!(scrape.body.contains("vmsdk_stats_up{instance_role=\"database\"} 1"));
/// # Ok::<(), vmsdk::Error>(())
/// ```
#[derive(Debug)]
pub struct Endpoint {
    registry: Registry,
    collector: Arc<StatsCollector>,
    /// One scrape at a time, so that the error taken after an encode is that encode's.
    scraping: Mutex<()>,
}

/// Options of an [`Endpoint`]: the metric name prefix and constant labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointBuilder {
    prefix: String,
    labels: Vec<(String, String)>,
}

impl Endpoint {
    /// Options, starting from the `vmsdk` prefix and no labels.
    pub fn builder() -> EndpointBuilder {
        EndpointBuilder {
            prefix: PREFIX.to_owned(),
            labels: Vec::new(),
        }
    }

    /// Updates the statistics and encodes them in the format `accept` (the request's `Accept`
    /// header) negotiates; see [`Format::negotiate`].
    pub fn scrape(&self, accept: Option<&str>) -> Scrape {
        let format = Format::negotiate(accept);
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(PoisonError::into_inner);
        let encoded = format.encode(&self.registry);
        let failed = |body: String| Scrape {
            status: 503,
            content_type: PLAIN_TEXT,
            body,
            format,
        };
        if let Some(error) = self.collector.take_error() {
            return failed(format!(
                "cannot update the guest statistics: {}\n",
                error_chain(&error)
            ));
        }
        match encoded {
            Ok(body) => Scrape {
                status: 200,
                content_type: format.content_type(),
                body,
                format,
            },
            Err(_) => failed("cannot encode the metrics\n".to_owned()),
        }
    }
}

/// An error and its sources, `: `-separated, for a one-line answer.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl EndpointBuilder {
    /// The prefix of every metric name instead of `vmsdk`: letters, digits and `_`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> crate::Result<Self> {
        let prefix = prefix.into();
        check_name("metric name prefix", &prefix)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Adds a constant label to every metric, e.g. `vm="db-1"`. The name is letters, digits and
    /// `_`, not starting with `__`, and not one of the labels vmsdk sets itself (`backend`,
    /// `session_id`, `value`) or a label added before.
    pub fn label(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> crate::Result<Self> {
        let name = name.into();
        check_name("label name", &name)?;
        if OWN_LABELS.contains(&name.as_str()) {
            return Err(crate::Error::InvalidMetricName {
                name,
                problem: "vmsdk sets this label itself".to_owned(),
            });
        }
        if self.labels.iter().any(|(n, _)| *n == name) {
            return Err(crate::Error::InvalidMetricName {
                name,
                problem: "this label was added already".to_owned(),
            });
        }
        self.labels.push((name, value.into()));
        Ok(self)
    }

    /// The endpoint over `stats` (for example
    /// [`Platform::guest_stats`](crate::Platform::guest_stats)).
    pub fn build(self, stats: impl GuestStats + 'static) -> crate::Result<Endpoint> {
        let collector = Arc::new(StatsCollector::new(stats));
        let labels = self
            .labels
            .into_iter()
            .map(|(name, value)| (Cow::Owned(name), Cow::Owned(value)));
        let mut registry = Registry::with_prefix_and_labels(self.prefix, labels);
        registry.register_collector(Box::new(Arc::clone(&collector)));
        Ok(Endpoint {
            registry,
            collector,
            scraping: Mutex::new(()),
        })
    }
}

#[cfg(test)]
mod tests {
    use guest_stats::fake::{FakeGuestStats, FakeSample};
    use guest_stats::{SessionId, Stat};

    use super::*;

    fn sample(elapsed_ms: u64, stolen_ms: u64, used_ms: u64) -> FakeSample {
        FakeSample::new()
            .with(Stat::ElapsedMs, elapsed_ms)
            .with(Stat::CpuStolenMs, stolen_ms)
            .with(Stat::CpuUsedMs, used_ms)
            .with(Stat::MemBalloonedMb, 512u64)
            .with(Stat::HostProcessorSpeedMhz, 2000u64)
    }

    fn value(body: &str, name: &str) -> Option<f64> {
        body.lines()
            .find(|line| line.split(['{', ' ']).next() == Some(name))
            .and_then(|line| line.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn rates_cover_the_time_since_the_previous_scrape_and_restart_with_the_session() {
        let fake = FakeGuestStats::builder()
            .sample(sample(10_000, 100, 1_000))
            .sample(sample(20_000, 600, 6_000))
            .session(SessionId::new(7))
            .sample(sample(1_000, 0, 0))
            .sample(sample(3_000, 20, 1_000))
            .build();
        let endpoint = Endpoint::builder().build(fake).unwrap();
        let scrape = |_nth: u32| endpoint.scrape(None).body;
        let first = scrape(1);
        assert_eq!(value(&first, "vmsdk_stats_up"), Some(1.0));
        assert_eq!(
            value(&first, "vmsdk_interval_seconds"),
            None,
            "no baseline yet"
        );
        assert_eq!(value(&first, "vmsdk_cpu_stolen_seconds_total"), Some(0.1));
        assert_eq!(
            value(&first, "vmsdk_mem_ballooned_bytes"),
            Some(536870912.0)
        );

        let second = scrape(2);
        assert_eq!(value(&second, "vmsdk_interval_seconds"), Some(10.0));
        assert_eq!(
            value(&second, "vmsdk_interval_cpu_stolen_ratio"),
            Some(0.05)
        );
        assert_eq!(value(&second, "vmsdk_interval_cpu_used_ratio"), Some(0.5));
        assert_eq!(
            value(&second, "vmsdk_interval_effective_cpu_hertz"),
            Some(1e9)
        );
        assert_eq!(value(&second, "vmsdk_session_changes_total"), Some(0.0));

        let after_move = scrape(3);
        assert_eq!(value(&after_move, "vmsdk_interval_seconds"), None);
        assert_eq!(value(&after_move, "vmsdk_interval_cpu_stolen_ratio"), None);
        assert_eq!(value(&after_move, "vmsdk_session_changes_total"), Some(1.0));
        assert!(after_move.contains("session_id=\"0x7\""), "{after_move}");

        let fourth = scrape(4);
        assert_eq!(
            value(&fourth, "vmsdk_interval_cpu_stolen_ratio"),
            Some(0.01)
        );
    }

    #[test]
    fn a_failed_update_is_a_503_with_the_reason_and_the_next_scrape_recovers() {
        let fake = FakeGuestStats::builder()
            .update_error(guest_stats::Error::NotEnabled)
            .sample(sample(1_000, 0, 0))
            .build();
        let endpoint = Endpoint::builder().build(fake).unwrap();
        let failed = endpoint.scrape(None);
        assert_eq!(failed.status, 503);
        assert_eq!(failed.content_type, PLAIN_TEXT);
        assert!(
            failed
                .body
                .starts_with("cannot update the guest statistics: "),
            "{}",
            failed.body
        );
        let recovered = endpoint.scrape(None);
        assert_eq!(recovered.status, 200, "{}", recovered.body);
        assert_eq!(value(&recovered.body, "vmsdk_stats_up"), Some(1.0));
    }

    #[test]
    fn labels_and_prefix_apply_to_every_metric() {
        let endpoint = Endpoint::builder()
            .prefix("guest")
            .unwrap()
            .label("vm", "db \"1\"")
            .unwrap()
            .build(FakeGuestStats::example())
            .unwrap();
        let body = endpoint.scrape(Some("application/openmetrics-text")).body;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("guest_"), "{line}");
            assert!(line.contains("vm=\"db \\\"1\\\"\""), "{line}");
        }
    }

    #[test]
    fn bad_or_clashing_labels_are_refused() {
        assert!(Endpoint::builder().label("backend", "x").is_err());
        assert!(Endpoint::builder().label("a-b", "x").is_err());
        assert!(Endpoint::builder()
            .label("vm", "a")
            .unwrap()
            .label("vm", "b")
            .is_err());
        assert!(Endpoint::builder().prefix("").is_err());
        assert!(Endpoint::builder().prefix("vm sdk").is_err());
    }
}
