//! Typed calls and multi-command helpers on top of any [`GuestAgent`].

use std::time::Duration;

use async_trait::async_trait;

use crate::agent::GuestAgent;
use crate::cmd::Command;
use crate::error::{Error, Result};
use crate::types::{GuestExecStatus, GuestFileWhence};

/// Chunk size of [`GuestAgentExt::read_file`] and [`GuestAgentExt::write_file`]:
/// 1 MiB of data is about 1.4 MB of base64, well under the 10 MiB reply limit.
pub const FILE_CHUNK: usize = 1024 * 1024;

/// Output of a guest process run to completion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// PID in the guest.
    pub pid: i64,
    /// Exit code after a normal exit.
    pub exitcode: Option<i64>,
    /// Signal (Linux) or exception code (Windows) after an abnormal exit.
    pub signal: Option<i64>,
    /// Captured stdout (empty without capture).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty without capture).
    pub stderr: Vec<u8>,
    /// Whether stdout hit the agent's capture limit.
    pub stdout_truncated: bool,
    /// Whether stderr hit the agent's capture limit.
    pub stderr_truncated: bool,
}

impl ExecOutput {
    /// Whether the process exited normally with code 0.
    pub fn success(&self) -> bool {
        self.exitcode == Some(0) && self.signal.is_none()
    }

    /// Builds the output from the final `guest-exec-status` reply.
    pub fn from_status(pid: i64, status: GuestExecStatus) -> Self {
        ExecOutput {
            pid,
            exitcode: status.exitcode,
            signal: status.signal,
            stdout: status.out_data.map(|d| d.0).unwrap_or_default(),
            stderr: status.err_data.map(|d| d.0).unwrap_or_default(),
            stdout_truncated: status.out_truncated.unwrap_or(false),
            stderr_truncated: status.err_truncated.unwrap_or(false),
        }
    }
}

/// Poll intervals for `guest-exec-status`: 10 ms doubling to 500 ms.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(Duration::from_millis(10))
    }

    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
        d
    }

    /// How long to sleep before polling process `pid` again, `elapsed` into a wait bounded
    /// by `timeout`: the next back-off step, cut short so the wait ends on time; once the
    /// time is up, the timeout error instead.
    pub(crate) fn pause(
        &mut self,
        pid: i64,
        elapsed: Duration,
        timeout: Option<Duration>,
    ) -> Result<Duration> {
        let pause = self.next();
        match timeout {
            Some(limit) if elapsed >= limit => Err(Error::ExecTimeout {
                pid,
                timeout: limit,
            }),
            Some(limit) => Ok(pause.min(limit - elapsed)),
            None => Ok(pause),
        }
    }
}

/// Typed calls and helpers for every [`GuestAgent`], including `dyn GuestAgent`.
#[async_trait]
pub trait GuestAgentExt: GuestAgent {
    /// Typed call of command `C`: `agent.call::<cmd::GuestGetOsinfo>(&()).await?`.
    async fn call<C: Command>(&self, args: &C::Args) -> Result<C::Returns>
    where
        C::Args: 'async_trait,
    {
        crate::agent::call::<C, Self>(self, args).await
    }

    /// Starts a process with `guest-exec`, polls `guest-exec-status` with
    /// back-off until it exits, and returns its decoded output. Add
    /// [`capture`](crate::cmd::GuestExecArgs::capture) to the arguments to collect
    /// stdout and stderr. `timeout` bounds the wait for the exit.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    async fn exec_wait(
        &self,
        args: crate::cmd::GuestExecArgs,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let pid = self.exec(args).await?.pid;
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(ExecOutput::from_status(pid, status));
            }
            let pause = backoff.pause(pid, started.elapsed(), timeout)?;
            tokio::time::sleep(pause).await;
        }
    }

    /// Reads a whole guest file through `guest-file-open`/`read`/`close`, in
    /// [`FILE_CHUNK`] pieces. The handle is closed even when a read fails.
    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let handle = self.file_open(path, Some("r".into())).await?;
        let mut data = Vec::new();
        let result = async {
            loop {
                let chunk = self.file_read(handle, Some(FILE_CHUNK as i64)).await?;
                data.extend_from_slice(&chunk.buf_b64.0);
                if chunk.eof || chunk.count == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        let closed = self.file_close(handle).await;
        result.and(closed).map(|()| data)
    }

    /// Creates or truncates a guest file and writes `data` in [`FILE_CHUNK`]
    /// pieces. The handle is closed even when a write fails.
    async fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let handle = self.file_open(path, Some("w".into())).await?;
        let result = async {
            for chunk in data.chunks(FILE_CHUNK) {
                let written = self.file_write(handle, chunk.to_vec()).await?;
                if written.count != chunk.len() as i64 {
                    return Err(Error::Protocol {
                        detail: format!(
                            "guest-file-write wrote {} of {} bytes",
                            written.count,
                            chunk.len()
                        ),
                    });
                }
            }
            self.file_flush(handle).await
        }
        .await;
        let closed = self.file_close(handle).await;
        result.and(closed)
    }

    /// Current position of a file handle (`guest-file-seek` by 0 from `cur`).
    async fn file_position(&self, handle: i64) -> Result<i64> {
        Ok(self
            .file_seek(handle, 0, GuestFileWhence::Value(1))
            .await?
            .position)
    }
}

impl<T: GuestAgent + ?Sized> GuestAgentExt for T {}

#[cfg(feature = "tokio")]
pub use self::freeze::{freeze_filesystems, FsFreezeGuard};

#[cfg(feature = "tokio")]
mod freeze {
    use std::sync::Arc;

    use crate::agent::GuestAgent;
    use crate::error::Result;

    /// Freezes guest filesystems (`guest-fsfreeze-freeze`, or `-freeze-list` with
    /// `mountpoints`) and returns a guard that thaws them.
    ///
    /// Call [`FsFreezeGuard::thaw`] to thaw and see the result. A guard dropped
    /// without it thaws in the background on the current tokio runtime (or a
    /// short-lived one of its own), because a frozen guest must not stay frozen
    /// when the caller bails out with `?`.
    pub async fn freeze_filesystems(
        agent: Arc<dyn GuestAgent>,
        mountpoints: Option<Vec<String>>,
    ) -> Result<FsFreezeGuard> {
        let frozen = match mountpoints {
            None => agent.fsfreeze_freeze().await?,
            Some(list) => agent.fsfreeze_freeze_list(Some(list)).await?,
        };
        Ok(FsFreezeGuard {
            agent: Some(agent),
            frozen,
        })
    }

    /// Thaws frozen filesystems when dropped; see [`freeze_filesystems`].
    #[must_use = "dropping the guard thaws the filesystems at once"]
    pub struct FsFreezeGuard {
        agent: Option<Arc<dyn GuestAgent>>,
        frozen: i64,
    }

    impl std::fmt::Debug for FsFreezeGuard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FsFreezeGuard")
                .field("frozen", &self.frozen)
                .field("armed", &self.agent.is_some())
                .finish()
        }
    }

    impl FsFreezeGuard {
        /// Number of filesystems the freeze reported.
        pub fn frozen(&self) -> i64 {
            self.frozen
        }

        /// Thaws now; returns the number of filesystems thawed.
        pub async fn thaw(mut self) -> Result<i64> {
            match self.agent.take() {
                Some(agent) => agent.fsfreeze_thaw().await,
                None => Ok(0),
            }
        }
    }

    impl Drop for FsFreezeGuard {
        fn drop(&mut self) {
            let Some(agent) = self.agent.take() else {
                return;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move {
                        let _ = agent.fsfreeze_thaw().await;
                    });
                }
                Err(_) => {
                    let _ = std::thread::Builder::new()
                        .name("qga-thaw".into())
                        .spawn(move || {
                            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                            {
                                let _ = rt.block_on(agent.fsfreeze_thaw());
                            }
                        });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_poll_pauses_double_up_to_the_cap_without_a_timeout() {
        let mut backoff = Backoff::new();
        let pauses: Vec<Duration> = (0..8)
            .map(|_| backoff.pause(7, Duration::from_secs(3600), None).unwrap())
            .collect();
        let expected = [10, 20, 40, 80, 160, 320, 500, 500].map(Duration::from_millis);
        assert_eq!(pauses, expected);
    }

    #[test]
    fn exec_poll_pause_ends_the_wait_on_time_then_times_out() {
        let limit = Duration::from_millis(100);
        let mut backoff = Backoff::new();
        let last = backoff.pause(7, Duration::from_millis(95), Some(limit));
        assert_eq!(last.unwrap(), Duration::from_millis(5));
        match backoff.pause(7, limit, Some(limit)) {
            Err(Error::ExecTimeout { pid: 7, timeout }) => assert_eq!(timeout, limit),
            other => panic!("expected ExecTimeout, got {other:?}"),
        }
    }
}
