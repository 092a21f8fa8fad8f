//! The trait every monitor connection implements, and the typed layer on top of it.

use std::time::Duration;

use serde_json::Value;

use crate::cmd::Command;
use crate::error::{Error, Result};
use crate::job::JobOptions;
use crate::session::{EventFilter, SubscriptionId};
use crate::types::JobInfo;
use crate::wire::{Event, Greeting};

/// A connection to a QEMU monitor in command mode: raw commands and event subscriptions.
///
/// [`crate::Client`] implements it over a socket; `MockMonitor` (feature `mock`) is mockall's
/// double of it. The typed commands, the version checks and the job helper live in
/// [`MonitorExt`], implemented for every `Monitor`, so a unit test that mocks this trait
/// exercises them too.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait Monitor: Send {
    /// The greeting QEMU sent on this connection (its version and capabilities).
    fn greeting(&self) -> &Greeting;

    /// Sends `command` with `arguments` (a JSON object, or `None`) and returns QEMU's `return`
    /// value, within the client's default timeout. Nothing is checked beforehand: this is the
    /// way to anything the typed commands do not cover.
    fn execute_raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value>;

    /// Like [`execute_raw`](Self::execute_raw) with its own timeout.
    fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value>;

    /// Starts keeping the events `filter` lets through, from now on, until
    /// [`unsubscribe`](Self::unsubscribe). Subscribe before the command that raises the events:
    /// events that arrive while a command waits for its reply are kept.
    fn subscribe(&mut self, filter: EventFilter) -> Result<SubscriptionId>;

    /// Ends a subscription.
    fn unsubscribe(&mut self, subscription: SubscriptionId) -> Result<()>;

    /// The subscription's next event, waiting at most `timeout` for one; `Ok(None)` when none
    /// came in time. A zero `timeout` waits for nothing: an event that has already arrived
    /// (read without blocking), else `Ok(None)` at once.
    fn next_event(
        &mut self,
        subscription: SubscriptionId,
        timeout: Duration,
    ) -> Result<Option<Event>>;
}

impl<M: Monitor + ?Sized> Monitor for Box<M> {
    fn greeting(&self) -> &Greeting {
        (**self).greeting()
    }
    fn execute_raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        (**self).execute_raw(command, arguments)
    }
    fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        (**self).execute_with_timeout(command, arguments, timeout)
    }
    fn subscribe(&mut self, filter: EventFilter) -> Result<SubscriptionId> {
        (**self).subscribe(filter)
    }
    fn unsubscribe(&mut self, subscription: SubscriptionId) -> Result<()> {
        (**self).unsubscribe(subscription)
    }
    fn next_event(
        &mut self,
        subscription: SubscriptionId,
        timeout: Duration,
    ) -> Result<Option<Event>> {
        (**self).next_event(subscription, timeout)
    }
}

/// Encodes typed arguments as the `arguments` object (`None` for commands without any).
pub(crate) fn encode_arguments<C: Command>(args: &C::Args) -> Result<Option<Value>> {
    let value = serde_json::to_value(args).map_err(|e| Error::Encode {
        command: C::NAME.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(match value {
        Value::Null => None,
        other => Some(other),
    })
}

/// Decodes a command's `return` value.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|source| Error::Decode {
        command: command.to_owned(),
        source,
    })
}

/// Checks typed command `C` with `args` against the QEMU of `greeting`: the command's first
/// release and the arguments' own ([`Command::check_arguments`]).
pub fn check_command<C: Command>(greeting: &Greeting, args: &C::Args) -> Result<()> {
    let qemu = &greeting.version.qemu;
    if !qemu.at_least(C::SINCE) {
        return Err(Error::CommandNotSupported {
            command: C::NAME.to_owned(),
            qemu: qemu.to_string(),
            since: C::SINCE,
        });
    }
    C::check_arguments(args, qemu)
}

/// Typed commands on any [`Monitor`].
pub trait MonitorExt: Monitor {
    /// Sends typed command `C`, after checking it against the QEMU of the greeting, and decodes
    /// its reply.
    fn call<C: Command>(&mut self, args: &C::Args) -> Result<C::Returns> {
        check_command::<C>(self.greeting(), args)?;
        let reply = self.execute_raw(C::NAME, encode_arguments::<C>(args)?)?;
        decode(C::NAME, reply)
    }

    /// Like [`call`](Self::call) with its own timeout.
    fn call_with_timeout<C: Command>(
        &mut self,
        args: &C::Args,
        timeout: Duration,
    ) -> Result<C::Returns> {
        check_command::<C>(self.greeting(), args)?;
        let reply = self.execute_with_timeout(C::NAME, encode_arguments::<C>(args)?, timeout)?;
        decode(C::NAME, reply)
    }

    /// Starts job `job` with `start` (a `blockdev-backup`, `blockdev-create`, a
    /// `transaction` ...) and follows it to its end from the events (`JOB_STATUS_CHANGE`,
    /// `BLOCK_JOB_*`), finalizing, completing (a `ready` mirror) and dismissing it as
    /// `options` say. The events are subscribed to before `start` runs, so none is missed
    /// however fast the job is.
    ///
    /// Returns the job's last `query-jobs` entry (`None` when it dismissed itself), or the
    /// job's own error ([`Error::JobFailed`], with `query-jobs`' `error` text),
    /// [`Error::JobCancelled`], or [`Error::JobTimeout`] when it outlives `options.timeout`.
    fn run_job<F>(&mut self, job: &str, options: &JobOptions, start: F) -> Result<Option<JobInfo>>
    where
        F: FnOnce(&mut Self) -> Result<()>,
    {
        crate::job::run_job(self, job, options, start)
    }

    /// Cancels block job `job` (`block-job-cancel` with `force`), waits until it has
    /// concluded and dismisses it.
    fn cancel_block_job(&mut self, job: &str, options: &JobOptions) -> Result<()> {
        crate::job::cancel_block_job(self, job, options)
    }
}

impl<M: Monitor + ?Sized> MonitorExt for M {}
