//! The statistics as `prometheus-client` metric families.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use guest_stats::{GuestStats, Interval, Sampler, Snapshot, StatValue, Unit as StatUnit};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{metric_for, PREFIX};

/// Adds vmsdk's guest statistics to a `prometheus-client` [`Registry`]: every encode of the
/// registry (every scrape) updates the statistics and adds the rates since the previous one.
///
/// The names are those of the [module](super) without their `vmsdk_` prefix, which
/// [`register`](StatsCollector::register) adds with a sub-registry; the registry's own
/// prefix and labels apply on top.
///
/// Session changes (vMotion, suspend/resume, snapshot revert) are handled as
/// [`Sampler`](guest_stats::Sampler) does: no rate spans two sessions, the
/// `session_info` metric shows the new session, and `session_changes_total` counts them. When
/// an update fails, only `stats_up 0` and `session_changes_total` are exported (the rest of
/// your registry is unaffected) and the error is logged through `tracing`; the next scrape
/// tries again.
///
/// ```
/// use vmsdk::guest_stats::fake::FakeGuestStats;
/// use vmsdk::prometheus::prometheus_client::encoding::text::encode;
/// use vmsdk::prometheus::prometheus_client::metrics::counter::Counter;
/// use vmsdk::prometheus::prometheus_client::registry::Registry;
/// use vmsdk::prometheus::StatsCollector;
///
/// // The registry your program already has, with its own metrics.
/// let mut registry = Registry::default();
/// let requests: Counter = Counter::default();
/// registry.register("myapp_requests", "Requests served", requests.clone());
///
/// // In production: vmsdk::Platform::detect()?.guest_stats()?
/// StatsCollector::new(FakeGuestStats::example()).register(&mut registry);
///
/// let mut text = String::new();
/// encode(&mut text, &registry)?;
/// assert!(text.contains("myapp_requests_total 0"));
/// assert!(text.contains("vmsdk_stats_up 1"));
/// assert!(text.contains("# TYPE vmsdk_cpu_stolen_seconds counter"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StatsCollector {
    state: Mutex<State>,
}

struct State {
    sampler: Sampler<Box<dyn GuestStats>>,
    session_changes: u64,
    last_error: Option<guest_stats::Error>,
}

impl fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("StatsCollector")
            .field("backend", &state.sampler.source().backend())
            .field("session", &state.sampler.session_id())
            .field("session_changes", &state.session_changes)
            .finish()
    }
}

impl StatsCollector {
    /// A collector over `stats` (for example [`Platform::guest_stats`](crate::Platform::guest_stats)).
    pub fn new(stats: impl GuestStats + 'static) -> StatsCollector {
        StatsCollector {
            state: Mutex::new(State {
                sampler: Sampler::new(Box::new(stats)),
                session_changes: 0,
                last_error: None,
            }),
        }
    }

    /// Registers this collector in a `vmsdk` sub-registry of `registry`, so its metrics are
    /// named `vmsdk_...` under the registry's own prefix, with the registry's labels.
    pub fn register(self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(self));
    }

    /// The error of the last update, if it failed; taking it clears it.
    pub fn take_error(&self) -> Option<guest_stats::Error> {
        self.lock().last_error.take()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic during an encode leaves at worst a stale baseline; the next sample replaces it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let mut state = self.lock();
        let sample = state.sampler.sample();
        let up = match sample {
            Ok(interval) => {
                if interval.session_changed {
                    state.session_changes += 1;
                }
                state.last_error = None;
                encode_snapshot(&mut encoder, &interval.snapshot)?;
                encode_rates(&mut encoder, &interval)?;
                1
            }
            Err(error) => {
                tracing::warn!(%error, "guest statistics update failed; exporting vmsdk_stats_up 0");
                state.last_error = Some(error);
                0
            }
        };
        ConstCounter::new(state.session_changes).encode(encoder.encode_descriptor(
            "session_changes",
            "Session changes seen since this collector started (vMotion, suspend/resume, \
             snapshot revert): counters restarted and no rate spans the change",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(up).encode(encoder.encode_descriptor(
            "stats_up",
            "1 when the last update of the guest statistics succeeded, 0 when it failed",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// The statistics of one snapshot, for a one-shot exposition.
#[derive(Debug)]
pub(super) struct SnapshotMetrics(pub(super) Snapshot);

impl Collector for SnapshotMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        encode_snapshot(&mut encoder, &self.0)
    }
}

/// `session_info` and one family per available statistic.
fn encode_snapshot(encoder: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> fmt::Result {
    let backend = snapshot.backend.as_str();
    Info::new([
        ("backend", backend.to_owned()),
        ("session_id", snapshot.session_id.to_string()),
    ])
    .encode(encoder.encode_descriptor(
        "session",
        "The statistics session; counters restart when it changes",
        None,
        MetricType::Info,
    )?)?;
    for (stat, value) in snapshot.available() {
        match value {
            StatValue::U64(number) => {
                let metric = metric_for(stat);
                let unit = metric.unit.map(|u| match u {
                    "seconds" => Unit::Seconds,
                    "bytes" => Unit::Bytes,
                    other => Unit::Other(other.to_owned()),
                });
                let help = if metric.unit.is_some() {
                    format!(
                        "{} (vSphere {}, {} scaled to base units)",
                        stat.description(),
                        stat.c_function(),
                        stat.unit()
                    )
                } else {
                    format!("{} (vSphere {})", stat.description(), stat.c_function())
                };
                let kind = if stat.is_counter() {
                    MetricType::Counter
                } else {
                    MetricType::Gauge
                };
                let mut family =
                    encoder.encode_descriptor(metric.stem, &help, unit.as_ref(), kind)?;
                let labels = [("backend", backend)];
                let sample = family.encode_family(&labels)?;
                // Whole numbers stay integers (bytes, hertz, counts); milliseconds become
                // fractional seconds, divided rather than multiplied by 1e-3 so that 1500 ms
                // is exactly the nearest double to 1.5 s.
                match (stat.unit(), stat.is_counter()) {
                    (StatUnit::Ms, true) => ConstCounter::new(seconds(number)).encode(sample)?,
                    (StatUnit::Ms, false) => ConstGauge::new(seconds(number)).encode(sample)?,
                    (_, true) => {
                        ConstCounter::new(scale_whole(number, metric.scale)).encode(sample)?
                    }
                    (_, false) => {
                        ConstGauge::new(scale_whole(number, metric.scale)).encode(sample)?
                    }
                }
            }
            StatValue::Text(text) => {
                let help = format!("{} (vSphere {})", stat.description(), stat.c_function());
                Info::new([("backend", backend.to_owned()), ("value", text)]).encode(
                    encoder.encode_descriptor(stat.name(), &help, None, MetricType::Info)?,
                )?;
            }
            // StatValue may grow; a kind this encoder does not know is left out.
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    Ok(())
}

/// Milliseconds as seconds.
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1e3
}

/// `number × scale` for the whole-number scales (1, 2^20, 10^6), saturating.
fn scale_whole(number: u64, scale: f64) -> u64 {
    // The scales are exact integers well inside u64.
    number.saturating_mul(scale as u64)
}

/// The per-interval gauges of `interval`, those it has.
fn encode_rates(encoder: &mut DescriptorEncoder<'_>, interval: &Interval) -> fmt::Result {
    let ratio = Unit::Other("ratio".to_owned());
    let hertz = Unit::Other("hertz".to_owned());
    let gauges: [(&str, &str, &Unit, Option<f64>); 4] = [
        (
            "interval",
            "Length of the interval the interval_* rates cover: the time since the previous \
             scrape, by the statistics' own clock",
            &Unit::Seconds,
            interval.elapsed_delta_ms.map(seconds),
        ),
        (
            "interval_cpu_used",
            "CPU time used in the interval divided by its length (1 = one CPU busy throughout)",
            &ratio,
            interval.cpu_used_percent.map(|p| p / 100.0),
        ),
        (
            "interval_cpu_stolen",
            "CPU time stolen by the hypervisor in the interval divided by its length",
            &ratio,
            interval.cpu_stolen_percent.map(|p| p / 100.0),
        ),
        (
            "interval_effective_cpu",
            "Effective CPU speed in the interval: host processor speed times used over elapsed",
            &hertz,
            interval.effective_cpu_mhz.map(|mhz| mhz * 1e6),
        ),
    ];
    for (name, help, unit, value) in gauges {
        if let Some(value) = value {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                Some(unit),
                MetricType::Gauge,
            )?)?;
        }
    }
    Ok(())
}
