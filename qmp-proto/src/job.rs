//! Running a job to its end from the events.

use std::time::{Duration, Instant};

use crate::cmd::{BlockJobCancel, BlockJobCancelArgs, JobDismiss, JobFinalize, JobId, QueryJobs};
use crate::error::{Error, Result};
use crate::events::{self, BlockJobEnded, JobStatusChange};
use crate::monitor::{Monitor, MonitorExt};
use crate::session::EventFilter;
use crate::types::{JobInfo, JobStatus};

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
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            timeout: Duration::from_secs(3600),
            finalize: true,
            dismiss: true,
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
}

/// How a job ended, as far as the events tell.
#[derive(Debug, Default)]
struct Seen {
    status: Option<JobStatus>,
    cancelled: bool,
    completion_error: Option<String>,
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
    let subscription = monitor.subscribe(EventFilter::names(events::JOB_EVENTS.iter().copied()))?;
    let outcome = start(monitor).and_then(|()| follow(monitor, subscription, job, options));
    // The subscription's end cannot fail in a way that matters more than the job's outcome.
    let _ = monitor.unsubscribe(subscription);
    outcome
}

fn follow<M: Monitor + ?Sized>(
    monitor: &mut M,
    subscription: crate::session::SubscriptionId,
    job: &str,
    options: &JobOptions,
) -> Result<Option<JobInfo>> {
    let deadline = Instant::now() + options.timeout;
    let mut seen = Seen::default();
    loop {
        if seen.status.as_ref().is_some_and(JobStatus::is_final) {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(event) = monitor.next_event(subscription, remaining)? else {
            return Err(Error::JobTimeout {
                job: job.to_owned(),
                status: seen
                    .status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "no status change seen".to_owned()),
                timeout: options.timeout,
            });
        };
        match event.event.as_str() {
            events::JOB_STATUS_CHANGE => {
                let change: JobStatusChange = event.data_as()?;
                if change.id != job {
                    continue;
                }
                if change.status == JobStatus::Pending && options.finalize {
                    // A job with auto-finalize passes `pending` and finalizes itself in the
                    // same main-loop turn, so it is never still pending when QEMU reads the
                    // next command; one that is waits for us.
                    let waiting = monitor
                        .call::<QueryJobs>(&())?
                        .iter()
                        .any(|j| j.id == job && j.status == JobStatus::Pending);
                    if waiting {
                        monitor.call::<JobFinalize>(&JobId::new(job))?;
                    }
                }
                seen.status = Some(change.status);
            }
            events::BLOCK_JOB_COMPLETED | events::BLOCK_JOB_CANCELLED => {
                let ended: BlockJobEnded = event.data_as()?;
                if ended.device != job {
                    continue;
                }
                if event.event == events::BLOCK_JOB_CANCELLED {
                    seen.cancelled = true;
                } else {
                    seen.completion_error = ended.error;
                }
            }
            _ => {}
        }
    }
    // The job's own error: query-jobs has it until the job is dismissed; a job that
    // dismissed itself only told it in BLOCK_JOB_COMPLETED.
    let info = monitor
        .call::<QueryJobs>(&())?
        .into_iter()
        .find(|j| j.id == job);
    if options.dismiss
        && info
            .as_ref()
            .is_some_and(|j| j.status == JobStatus::Concluded)
    {
        monitor.call::<JobDismiss>(&JobId::new(job))?;
    }
    if seen.cancelled {
        return Err(Error::JobCancelled {
            job: job.to_owned(),
        });
    }
    let error = info
        .as_ref()
        .and_then(|j| j.error.clone())
        .or(seen.completion_error);
    match error {
        Some(error) => Err(Error::JobFailed {
            job: job.to_owned(),
            error,
        }),
        None => Ok(info),
    }
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
