//! A scriptable, stateful [`GuestStats`] for unit tests of code that reads guest statistics.
//!
//! [`FakeGuestStats`] plays a script of [`FakeSample`]s: each [`update`](GuestStats::update)
//! moves to the next sample, so a test can drive counters over time, change the session (as a
//! vMotion would), make one statistic fail, or make an update fail. Its
//! [`backend`](GuestStats::backend) is `"fake"`, so its values are never mistaken for real ones.
//!
//! ```
//! use guest_stats::fake::{FakeGuestStats, FakeSample};
//! use guest_stats::{Error, GuestStats, SessionId, Stat};
//!
//! let mut stats = FakeGuestStats::builder()
//!     .session(SessionId::new(1))
//!     .sample(FakeSample::new().with(Stat::CpuStolenMs, 10u64))
//!     .update_error(Error::NotEnabled)
//!     .session(SessionId::new(2))
//!     .sample(FakeSample::new().with(Stat::CpuStolenMs, 3u64).with_error(Stat::MemLimitMb, Error::Other))
//!     .build();
//!
//! assert!(matches!(stats.cpu_stolen_ms(), Err(Error::NoInfo)));
//! assert_eq!(stats.update()?, SessionId::new(1));
//! assert_eq!(stats.cpu_stolen_ms()?, 10);
//! assert!(matches!(stats.mem_limit_mb(), Err(Error::NotAvailable { .. })));
//! assert!(matches!(stats.update(), Err(Error::NotEnabled)));
//! assert!(matches!(stats.cpu_stolen_ms(), Err(Error::NoInfo)));
//! assert_eq!(stats.update()?, SessionId::new(2));
//! assert!(matches!(stats.mem_limit_mb(), Err(Error::Other)));
//! # Ok::<(), Error>(())
//! ```

use std::collections::BTreeMap;

use crate::{Error, GuestStats, Result, SessionId, Stat, StatValue};

/// The values (and failures) of the statistics at one step of a [`FakeGuestStats`] script.
///
/// A statistic with neither a value nor an error is [`Error::NotAvailable`].
#[derive(Debug, Clone, Default)]
pub struct FakeSample {
    values: BTreeMap<Stat, StatValue>,
    errors: BTreeMap<Stat, Error>,
}

impl FakeSample {
    /// A sample with no statistics.
    pub fn new() -> FakeSample {
        FakeSample::default()
    }

    /// Sets the value of a statistic (and clears an error set for it).
    pub fn with(mut self, stat: Stat, value: impl Into<StatValue>) -> FakeSample {
        self.errors.remove(&stat);
        self.values.insert(stat, value.into());
        self
    }

    /// Makes reading a statistic fail with `error` (and clears a value set for it).
    pub fn with_error(mut self, stat: Stat, error: Error) -> FakeSample {
        self.values.remove(&stat);
        self.errors.insert(stat, error);
        self
    }

    /// The value set for a statistic.
    pub fn value(&self, stat: Stat) -> Option<&StatValue> {
        self.values.get(&stat)
    }

    fn read(&self, stat: Stat) -> Result<StatValue> {
        if let Some(error) = self.errors.get(&stat) {
            return Err(error.clone());
        }
        self.values
            .get(&stat)
            .cloned()
            .ok_or(Error::NotAvailable { stat })
    }
}

/// What [`FakeGuestStats::update`](GuestStats::update) does after the last step of its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EndOfScript {
    /// Stay on the last step: values stop changing.
    #[default]
    RepeatLast,
    /// Start again from the first step.
    Cycle,
}

#[derive(Debug, Clone)]
enum Step {
    Sample {
        session: SessionId,
        sample: FakeSample,
    },
    UpdateError(Error),
}

/// Builds a [`FakeGuestStats`] script step by step.
#[derive(Debug, Clone)]
pub struct FakeGuestStatsBuilder {
    session: SessionId,
    steps: Vec<Step>,
    end: EndOfScript,
}

impl FakeGuestStatsBuilder {
    /// Sets the session of the samples added after this call (the first session is `0x1`).
    /// Changing it between two samples is how a test simulates a vMotion, a suspend/resume or
    /// a snapshot revert.
    pub fn session(mut self, session: SessionId) -> FakeGuestStatsBuilder {
        self.session = session;
        self
    }

    /// Adds a step whose `update` succeeds with these values.
    pub fn sample(mut self, sample: FakeSample) -> FakeGuestStatsBuilder {
        self.steps.push(Step::Sample {
            session: self.session,
            sample,
        });
        self
    }

    /// Adds a step whose `update` fails with `error`. As in the C API, a failed update
    /// invalidates the data: accessors return [`Error::NoInfo`] until the next successful one.
    pub fn update_error(mut self, error: Error) -> FakeGuestStatsBuilder {
        self.steps.push(Step::UpdateError(error));
        self
    }

    /// Chooses what happens after the last step (default [`EndOfScript::RepeatLast`]).
    pub fn end_of_script(mut self, end: EndOfScript) -> FakeGuestStatsBuilder {
        self.end = end;
        self
    }

    /// The fake, before its first `update`. A script without steps makes every `update` fail
    /// with [`Error::NotEnabled`], like a host that refuses the Guest API.
    pub fn build(self) -> FakeGuestStats {
        FakeGuestStats {
            steps: self.steps,
            end: self.end,
            next: 0,
            current: None,
            updates: 0,
        }
    }
}

/// A [`GuestStats`] that plays a script; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct FakeGuestStats {
    steps: Vec<Step>,
    end: EndOfScript,
    next: usize,
    current: Option<(SessionId, FakeSample)>,
    updates: u64,
}

impl FakeGuestStats {
    /// Starts a script.
    pub fn builder() -> FakeGuestStatsBuilder {
        FakeGuestStatsBuilder {
            session: SessionId::new(1),
            steps: Vec::new(),
            end: EndOfScript::default(),
        }
    }

    /// A fake with one sample that is updated forever.
    pub fn constant(sample: FakeSample) -> FakeGuestStats {
        FakeGuestStats::builder().sample(sample).build()
    }

    /// A ready-made script of plausible values of a 4-vCPU VM on an ESXi host, for demos and
    /// `vmsdk stats --backend fake`.
    ///
    /// Sixty one-second samples: counters grow, the balloon inflates and deflates, and after
    /// thirty samples the session changes and elapsed time restarts, as after a vMotion. Then
    /// the script cycles (which is another session change). The values are invented, and
    /// [`backend`](GuestStats::backend) says `"fake"`.
    pub fn example() -> FakeGuestStats {
        const STEPS_PER_SESSION: u64 = 30;
        const STEP_MS: u64 = 1_000;
        let sessions = [
            (SessionId::new(0x5a17_e0c0_ffee_0001), 86_400_000u64),
            (SessionId::new(0x5a17_e0c0_ffee_0002), 0u64),
        ];
        let mut builder = FakeGuestStats::builder().end_of_script(EndOfScript::Cycle);
        for (session, start_elapsed) in sessions {
            builder = builder.session(session);
            for step in 0..STEPS_PER_SESSION {
                let elapsed = start_elapsed + step * STEP_MS;
                // Four vCPUs at ~35 % busy and ~2 % ready-but-not-scheduled.
                let used = elapsed * 4 * 35 / 100;
                let stolen = elapsed * 4 * 2 / 100 + step * step;
                let balloon = [0u64, 128, 256, 512, 512, 256, 128, 0][(step % 8) as usize];
                builder = builder.sample(
                    FakeSample::new()
                        .with(Stat::CpuReservationMhz, 1_000u64)
                        .with(Stat::CpuLimitMhz, 8_000u64)
                        .with(Stat::CpuShares, 4_000u64)
                        .with(Stat::CpuUsedMs, used)
                        .with(Stat::HostProcessorSpeedMhz, 2_600u64)
                        .with(Stat::MemReservationMb, 2_048u64)
                        .with(Stat::MemLimitMb, 8_192u64)
                        .with(Stat::MemShares, 81_920u64)
                        .with(Stat::MemMappedMb, 6_144 - balloon)
                        .with(Stat::MemActiveMb, 1_720 + step * 7)
                        .with(Stat::MemOverheadMb, 61u64)
                        .with(Stat::MemBalloonedMb, balloon)
                        .with(Stat::MemSwappedMb, 0u64)
                        .with(Stat::MemSharedMb, 410u64)
                        .with(Stat::MemSharedSavedMb, 380u64)
                        .with(Stat::MemUsedMb, 6_144 - balloon - 380)
                        .with(Stat::ElapsedMs, elapsed)
                        .with(
                            Stat::ResourcePoolPath,
                            "/fake-datacenter/host/fake-cluster/Resources/web",
                        )
                        .with(Stat::CpuStolenMs, stolen)
                        .with(Stat::MemTargetSizeMb, 8_192 - balloon)
                        .with(Stat::HostCpuNumCores, 32u64)
                        .with(Stat::HostMemPhysMb, 262_144u64)
                        .with(Stat::HostMemPhysFreeMb, 91_000u64)
                        .with(Stat::MemBalloonTargetMb, balloon)
                        .with(Stat::MemBalloonMaxMb, 5_242u64),
                );
            }
        }
        builder.build()
    }

    /// How many times `update` has been called (successful or not).
    pub fn update_count(&self) -> u64 {
        self.updates
    }

    fn current(&self) -> Result<&(SessionId, FakeSample)> {
        self.current.as_ref().ok_or(Error::NoInfo)
    }
}

impl GuestStats for FakeGuestStats {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn update(&mut self) -> Result<SessionId> {
        self.updates += 1;
        if self.steps.is_empty() {
            self.current = None;
            return Err(Error::NotEnabled);
        }
        if self.next >= self.steps.len() {
            self.next = match self.end {
                EndOfScript::RepeatLast => self.steps.len() - 1,
                EndOfScript::Cycle => 0,
            };
        }
        let step = self.steps[self.next].clone();
        self.next += 1;
        match step {
            Step::Sample { session, sample } => {
                self.current = Some((session, sample));
                Ok(session)
            }
            Step::UpdateError(error) => {
                self.current = None;
                Err(error)
            }
        }
    }

    fn session_id(&self) -> Result<SessionId> {
        Ok(self.current()?.0)
    }

    fn stat(&self, stat: Stat) -> Result<StatValue> {
        self.current()?.1.read(stat)
    }
}
