//! Per-interval rates from counters, restarted when the session changes.

use serde::{Deserialize, Serialize};

use crate::{GuestStats, Result, SessionId, Snapshot, Stat};

/// What one [`Sampler::sample`] saw: the snapshot, and the rates since the previous sample of
/// the same session.
///
/// Serialises to one JSON object: `snapshot` holds every statistic, the rates sit beside it
/// (`null` when there is no rate for this interval).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Interval {
    /// All statistics of this update.
    pub snapshot: Snapshot,
    /// Whether the session differs from the previous sample's (always `false` for the first
    /// sample). When it is `true` the rates are `None`: counters of two sessions cannot be
    /// subtracted.
    pub session_changed: bool,
    /// Elapsed milliseconds since the previous sample (from `elapsed_ms`).
    pub elapsed_delta_ms: Option<u64>,
    /// CPU milliseconds used since the previous sample.
    pub cpu_used_delta_ms: Option<u64>,
    /// CPU milliseconds stolen since the previous sample.
    pub cpu_stolen_delta_ms: Option<u64>,
    /// Used CPU time as a percentage of elapsed time (100 % = one CPU busy the whole interval,
    /// so a busy 4-CPU guest reads up to 400 %).
    pub cpu_used_percent: Option<f64>,
    /// Stolen CPU time as a percentage of elapsed time (same scale as `cpu_used_percent`).
    pub cpu_stolen_percent: Option<f64>,
    /// Estimated effective CPU speed in MHz: host MHz × used ÷ elapsed (the guide's recipe).
    pub effective_cpu_mhz: Option<f64>,
}

/// Turns the counters of a [`GuestStats`] into per-interval rates.
///
/// Each [`sample`](Sampler::sample) updates the source and compares with the previous sample.
/// A session change (vMotion, suspend/resume, snapshot revert), a counter that went backwards,
/// or an elapsed time that did not move all restart the baseline instead of producing a bogus
/// rate.
///
/// ```
/// use guest_stats::fake::{FakeGuestStats, FakeSample};
/// use guest_stats::{Sampler, SessionId, Stat};
///
/// let sample = |elapsed: u64, stolen: u64| {
///     FakeSample::new().with(Stat::ElapsedMs, elapsed).with(Stat::CpuStolenMs, stolen)
/// };
/// let fake = FakeGuestStats::builder()
///     .sample(sample(1_000, 0))
///     .sample(sample(2_000, 50))
///     .session(SessionId::new(2))
///     .sample(sample(100, 0))
///     .build();
/// let mut sampler = Sampler::new(fake);
///
/// assert_eq!(sampler.sample()?.cpu_stolen_percent, None); // no baseline yet
/// assert_eq!(sampler.sample()?.cpu_stolen_percent, Some(5.0));
/// let after_move = sampler.sample()?;
/// assert!(after_move.session_changed);
/// assert_eq!(after_move.cpu_stolen_percent, None);
/// # Ok::<(), guest_stats::Error>(())
/// ```
#[derive(Debug)]
pub struct Sampler<G> {
    source: G,
    previous: Option<Snapshot>,
}

impl<G: GuestStats> Sampler<G> {
    /// A sampler over `source`, with no baseline yet.
    pub fn new(source: G) -> Sampler<G> {
        Sampler {
            source,
            previous: None,
        }
    }

    /// The statistics source.
    pub fn source(&self) -> &G {
        &self.source
    }

    /// The statistics source, mutably (updating it directly does not disturb the sampler: only
    /// [`sample`](Sampler::sample) moves the baseline).
    pub fn source_mut(&mut self) -> &mut G {
        &mut self.source
    }

    /// Gives the source back.
    pub fn into_inner(self) -> G {
        self.source
    }

    /// Forgets the baseline, so the next sample has no rates.
    pub fn reset(&mut self) {
        self.previous = None;
    }

    /// The session of the baseline, if there is one.
    pub fn session_id(&self) -> Option<SessionId> {
        self.previous.as_ref().map(|snapshot| snapshot.session_id)
    }

    /// Updates the source and returns the snapshot with the rates since the previous sample.
    ///
    /// If the update fails the baseline is dropped (the C API invalidates data on a failed
    /// update too), and the error is returned.
    pub fn sample(&mut self) -> Result<Interval> {
        let snapshot = match self.source.update().and_then(|_| self.source.snapshot()) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                self.previous = None;
                return Err(error);
            }
        };
        let previous = self.previous.replace(snapshot.clone());
        let session_changed = previous
            .as_ref()
            .is_some_and(|previous| previous.session_id != snapshot.session_id);
        let baseline = previous.filter(|previous| previous.session_id == snapshot.session_id);
        Ok(Interval::between(
            baseline.as_ref(),
            snapshot,
            session_changed,
        ))
    }
}

impl Interval {
    fn between(previous: Option<&Snapshot>, snapshot: Snapshot, session_changed: bool) -> Interval {
        let delta = |stat: Stat| -> Option<u64> {
            let before = previous?.value(stat)?.as_u64()?;
            let now = snapshot.value(stat)?.as_u64()?;
            now.checked_sub(before)
        };
        let elapsed = delta(Stat::ElapsedMs).filter(|&elapsed| elapsed > 0);
        let used = elapsed.and(delta(Stat::CpuUsedMs));
        let stolen = elapsed.and(delta(Stat::CpuStolenMs));
        let percent = |part: Option<u64>| Some(part? as f64 * 100.0 / elapsed? as f64);
        let effective_cpu_mhz = snapshot
            .host_processor_speed_mhz
            .zip(used)
            .zip(elapsed)
            .map(|((mhz, used), elapsed)| mhz as f64 * used as f64 / elapsed as f64);
        Interval {
            session_changed,
            elapsed_delta_ms: elapsed,
            cpu_used_delta_ms: used,
            cpu_stolen_delta_ms: stolen,
            cpu_used_percent: percent(used),
            cpu_stolen_percent: percent(stolen),
            effective_cpu_mhz,
            snapshot,
        }
    }
}
