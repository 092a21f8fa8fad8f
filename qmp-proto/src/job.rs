//! Running a job to its end from the events.

use std::time::{Duration, Instant};

use crate::cmd::{
    BlockJobCancel, BlockJobCancelArgs, JobComplete, JobDismiss, JobFinalize, JobId, QueryJobs,
};
use crate::error::{Error, Result};
use crate::events::{self, BlockJobEnded, JobStatusChange};
use crate::monitor::{Monitor, MonitorExt};
use crate::session::{EventFilter, SubscriptionId};
use crate::types::{JobInfo, JobStatus};
use crate::wire::Event;

/// How [`MonitorExt::run_job`] treats a job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobOptions {
    /// Longest wait for the job's end (default 1 hour). The job keeps running in QEMU
    /// when the wait ends.
    pub timeout: Duration,
    /// Send `job-finalize` when the job waits in `pending` (auto-finalize off; default on).
    pub finalize: bool,
    /// Send `job-dismiss` once the job has concluded and its error was read (default on).
    pub dismiss: bool,
    /// Send `job-complete` when the job is `ready` (default on): a mirror, or a commit of the
    /// active layer, then ends as it would on your own `job-complete`. Off, the helper keeps
    /// waiting while such a job stays `ready`, until [`timeout`](Self::timeout).
    pub complete: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            timeout: Duration::from_secs(3600),
            finalize: true,
            dismiss: true,
            complete: true,
        }
    }
}

impl JobOptions {
    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets [`finalize`](Self::finalize).
    pub fn finalize(mut self, on: bool) -> Self {
        self.finalize = on;
        self
    }

    /// Sets [`dismiss`](Self::dismiss).
    pub fn dismiss(mut self, on: bool) -> Self {
        self.dismiss = on;
        self
    }

    /// Sets [`complete`](Self::complete).
    pub fn complete(mut self, on: bool) -> Self {
        self.complete = on;
        self
    }
}

/// What the helper sends on a job's status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStep {
    /// `job-finalize`, if `query-jobs` shows the job still `pending`.
    Finalize,
    /// `job-complete`.
    Complete,
}

/// What the events have told about one job so far. Shared by the blocking helper and the
/// tokio client's, so both read the same meaning into the same events.
#[derive(Debug)]
pub(crate) struct JobTracker {
    job: String,
    status: Option<JobStatus>,
    cancelled: bool,
    completion_error: Option<String>,
    /// `job-complete` was asked for: a job that is `ready` again later (after `standby`) is
    /// completing already, and a second `job-complete` would fail.
    complete_sent: bool,
}

impl JobTracker {
    pub(crate) fn new(job: &str) -> Self {
        JobTracker {
            job: job.to_owned(),
            status: None,
            cancelled: false,
            completion_error: None,
            complete_sent: false,
        }
    }

    /// The job's id.
    pub(crate) fn job(&self) -> &str {
        &self.job
    }

    /// The events a tracker needs.
    pub(crate) fn filter() -> EventFilter {
        EventFilter::names(events::JOB_EVENTS.iter().copied())
    }

    /// Takes one event in; returns what to send for it, as `options` ask.
    pub(crate) fn observe(
        &mut self,
        event: &Event,
        options: &JobOptions,
    ) -> Result<Option<JobStep>> {
        match event.event.as_str() {
            events::JOB_STATUS_CHANGE => {
                let change: JobStatusChange = event.data_as()?;
                if change.id != self.job {
                    return Ok(None);
                }
                let step = match change.status {
                    JobStatus::Pending if options.finalize => Some(JobStep::Finalize),
                    JobStatus::Ready if options.complete && !self.complete_sent => {
                        self.complete_sent = true;
                        Some(JobStep::Complete)
                    }
                    _ => None,
                };
                self.status = Some(change.status);
                Ok(step)
            }
            events::BLOCK_JOB_COMPLETED | events::BLOCK_JOB_CANCELLED => {
                let ended: BlockJobEnded = event.data_as()?;
                if ended.device == self.job {
                    if event.event == events::BLOCK_JOB_CANCELLED {
                        self.cancelled = true;
                    } else {
                        self.completion_error = ended.error;
                    }
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Whether the job will not change any more.
    pub(crate) fn is_over(&self) -> bool {
        self.status.as_ref().is_some_and(JobStatus::is_final)
    }

    pub(crate) fn timed_out(&self, timeout: Duration) -> Error {
        Error::JobTimeout {
            job: self.job.clone(),
            status: self
                .status
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "no status change seen".to_owned()),
            timeout,
        }
    }

    /// Whether a job that entered `pending` still waits for `job-finalize`, from `query-jobs`.
    /// A job with auto-finalize passes `pending` and finalizes itself in the same main-loop
    /// turn, so it is never still pending when QEMU reads the next command.
    pub(crate) fn waits_for_finalize(&self, jobs: &[JobInfo]) -> bool {
        jobs.iter()
            .any(|j| j.id == self.job && j.status == JobStatus::Pending)
    }

    /// This job's entry of `query-jobs`, and whether to dismiss it.
    pub(crate) fn entry(
        &self,
        jobs: Vec<JobInfo>,
        options: &JobOptions,
    ) -> (Option<JobInfo>, bool) {
        let info = jobs.into_iter().find(|j| j.id == self.job);
        let dismiss = options.dismiss
            && info
                .as_ref()
                .is_some_and(|j| j.status == JobStatus::Concluded);
        (info, dismiss)
    }

    /// The outcome: the job's own error from `query-jobs` (it has it until the job is
    /// dismissed; a job that dismissed itself only told it in `BLOCK_JOB_COMPLETED`).
    pub(crate) fn outcome(self, info: Option<JobInfo>) -> Result<Option<JobInfo>> {
        if self.cancelled {
            return Err(Error::JobCancelled { job: self.job });
        }
        let error = info
            .as_ref()
            .and_then(|j| j.error.clone())
            .or(self.completion_error);
        match error {
            Some(error) => Err(Error::JobFailed {
                job: self.job,
                error,
            }),
            None => Ok(info),
        }
    }
}

pub(crate) fn run_job<M, F>(
    monitor: &mut M,
    job: &str,
    options: &JobOptions,
    start: F,
) -> Result<Option<JobInfo>>
where
    M: Monitor + ?Sized,
    F: FnOnce(&mut M) -> Result<()>,
{
    let subscription = monitor.subscribe(JobTracker::filter())?;
    let outcome = start(monitor).and_then(|()| follow(monitor, subscription, job, options));
    // The subscription's end cannot fail in a way that matters more than the job's outcome.
    let _ = monitor.unsubscribe(subscription);
    outcome
}

fn follow<M: Monitor + ?Sized>(
    monitor: &mut M,
    subscription: SubscriptionId,
    job: &str,
    options: &JobOptions,
) -> Result<Option<JobInfo>> {
    let deadline = Instant::now() + options.timeout;
    let mut tracker = JobTracker::new(job);
    while !tracker.is_over() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(event) = monitor.next_event(subscription, remaining)? else {
            return Err(tracker.timed_out(options.timeout));
        };
        match tracker.observe(&event, options)? {
            Some(JobStep::Finalize)
                if tracker.waits_for_finalize(&monitor.call::<QueryJobs>(&())?) =>
            {
                monitor.call::<JobFinalize>(&JobId::new(tracker.job()))?;
            }
            Some(JobStep::Complete) => {
                monitor.call::<JobComplete>(&JobId::new(tracker.job()))?;
            }
            Some(JobStep::Finalize) | None => {}
        }
    }
    let (info, dismiss) = tracker.entry(monitor.call::<QueryJobs>(&())?, options);
    if dismiss {
        monitor.call::<JobDismiss>(&JobId::new(tracker.job()))?;
    }
    tracker.outcome(info)
}

pub(crate) fn cancel_block_job<M: Monitor + ?Sized>(
    monitor: &mut M,
    job: &str,
    options: &JobOptions,
) -> Result<()> {
    let cancel = |m: &mut M| {
        m.call::<BlockJobCancel>(&BlockJobCancelArgs::new(job).force(true))
            .map(drop)
    };
    match run_job(monitor, job, options, cancel) {
        Ok(_) | Err(Error::JobCancelled { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(job: &str, status: &str) -> Event {
        Event {
            event: events::JOB_STATUS_CHANGE.to_owned(),
            data: serde_json::json!({ "id": job, "status": status }),
            timestamp: Default::default(),
        }
    }

    /// A mirror that is `ready`, paused into `standby` and `ready` again while completing is
    /// asked to complete once; finalize is asked in `pending`; other jobs' events are ignored.
    #[test]
    fn steps_follow_the_status_changes() {
        let options = JobOptions::default();
        let mut tracker = JobTracker::new("m");
        let steps: Vec<Option<JobStep>> = [
            ("m", "created"),
            ("m", "running"),
            ("other", "ready"),
            ("m", "ready"),
            ("m", "standby"),
            ("m", "ready"),
            ("m", "waiting"),
            ("m", "pending"),
            ("m", "concluded"),
        ]
        .iter()
        .map(|(job, s)| tracker.observe(&status(job, s), &options).unwrap())
        .collect();
        use JobStep::{Complete, Finalize};
        assert_eq!(
            steps,
            [
                None,
                None,
                None,
                Some(Complete),
                None,
                None,
                None,
                Some(Finalize),
                None
            ]
        );
        assert!(tracker.is_over());

        let mut waiting = JobTracker::new("m");
        let options = JobOptions::default().complete(false).finalize(false);
        for s in ["ready", "pending"] {
            assert_eq!(waiting.observe(&status("m", s), &options).unwrap(), None);
        }
    }
}
