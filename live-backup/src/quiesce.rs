//! Application consistency: the guest's filesystems frozen around the checkpoint moment only,
//! thawed on every path.

use std::fmt;
use std::time::{Duration, Instant};

/// Something that can hold the guest's writes still for a moment: the QEMU guest agent's
/// `guest-fsfreeze-freeze`/`-thaw` ([`AgentQuiesce`], feature `agent`), VMware Tools'
/// quiescing, a test double.
///
/// Errors are strings because a failed freeze is not a failed backup: the backup goes on
/// crash-consistent and reports the reason as a warning.
pub trait Quiesce: Send + fmt::Debug {
    /// Freezes the guest's filesystems. An error (no agent, no answer in time, a refusal)
    /// makes the backup crash-consistent.
    fn freeze(&mut self) -> std::result::Result<(), String>;

    /// Thaws them. Called after every freeze attempt, also a failed one (a freeze that timed
    /// out may still have frozen the guest).
    fn thaw(&mut self) -> std::result::Result<(), String>;
}

/// The moment a source takes its checkpoint, with the guest frozen around it when a
/// [`Quiesce`] is given. Dropping it thaws, so an error or a panic between freeze and thaw
/// never leaves the guest frozen.
#[must_use = "dropping the window thaws at once"]
pub struct FreezeWindow<'a> {
    quiesce: Option<&'a mut dyn Quiesce>,
    frozen_at: Option<Instant>,
    warnings: Vec<String>,
}

impl fmt::Debug for FreezeWindow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreezeWindow")
            .field("frozen", &self.frozen_at.is_some())
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl<'a> FreezeWindow<'a> {
    /// Freezes through `quiesce`, if given. A failed freeze is a warning; the guest is thawed
    /// at once in case the freeze half-happened.
    pub fn enter(quiesce: Option<&'a mut dyn Quiesce>) -> Self {
        let mut window = FreezeWindow {
            quiesce,
            frozen_at: None,
            warnings: Vec::new(),
        };
        if let Some(q) = window.quiesce.as_deref_mut() {
            match q.freeze() {
                Ok(()) => window.frozen_at = Some(Instant::now()),
                Err(why) => {
                    window.warnings.push(format!(
                        "the guest's filesystems were not frozen ({why}): the backup is \
                         crash-consistent"
                    ));
                    let _ = q.thaw();
                    window.quiesce = None;
                }
            }
        }
        window
    }

    /// Whether the guest is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.frozen_at.is_some()
    }

    /// Thaws; returns how long the guest was frozen (`None` when it was not) and the
    /// warnings of the freeze and the thaw.
    pub fn leave(mut self) -> (Option<Duration>, Vec<String>) {
        let frozen = self.thaw();
        (frozen, std::mem::take(&mut self.warnings))
    }

    fn thaw(&mut self) -> Option<Duration> {
        let started = self.frozen_at.take()?;
        let q = self.quiesce.take()?;
        let mut result = q.thaw();
        if result.is_err() {
            // Once more: a guest left frozen is the one outcome worse than a failed backup.
            result = q.thaw();
        }
        let frozen = started.elapsed();
        if let Err(why) = result {
            self.warnings.push(format!(
                "thawing the guest's filesystems failed twice ({why}): check the guest \
                 (guest-fsfreeze-status) and thaw it by hand"
            ));
            tracing::error!("thawing the guest failed: {why}");
        }
        Some(frozen)
    }
}

impl Drop for FreezeWindow<'_> {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Quiescing through the QEMU guest agent (a blocking [`qga_proto::Client`]):
/// `guest-fsfreeze-freeze` within a bound, `guest-fsfreeze-thaw` after.
///
/// An agent that is absent, does not answer within the bound or refuses (no
/// `guest-fsfreeze-*` support, already frozen) gives a warning and a crash-consistent backup.
/// Never point it at a qemu-ga whose guest you do not mean to freeze.
#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub struct AgentQuiesce<S: qga_proto::Transport> {
    client: qga_proto::Client<S>,
    timeout: Duration,
}

#[cfg(feature = "agent")]
impl<S: qga_proto::Transport> fmt::Debug for AgentQuiesce<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentQuiesce")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "agent")]
impl<S: qga_proto::Transport> AgentQuiesce<S> {
    /// Freezes through `client`, waiting at most `timeout` for the agent's answer to each
    /// freeze and thaw (10 s is a good bound: fsfreeze hooks in the guest run inside it).
    pub fn new(client: qga_proto::Client<S>, timeout: Duration) -> Self {
        AgentQuiesce { client, timeout }
    }

    /// The client back.
    pub fn into_inner(self) -> qga_proto::Client<S> {
        self.client
    }
}

#[cfg(feature = "agent")]
impl AgentQuiesce<Box<dyn qga_proto::Transport>> {
    /// Connects to the agent at `address` (`qga+unix:///run/qga.sock`, ...), bounding the
    /// connection and every command by `timeout`.
    pub fn connect(address: &str, timeout: Duration) -> qga_proto::Result<Self> {
        let config = qga_proto::ClientConfig::default()
            .timeout(timeout)
            .sync_timeout(timeout);
        Ok(Self::new(
            qga_proto::Client::connect(address, config)?,
            timeout,
        ))
    }
}

#[cfg(feature = "agent")]
impl<S: qga_proto::Transport> Quiesce for AgentQuiesce<S> {
    fn freeze(&mut self) -> std::result::Result<(), String> {
        let frozen = self
            .client
            .execute_with_timeout("guest-fsfreeze-freeze", None, self.timeout)
            .map_err(|e| format!("guest agent: {e}"))?;
        // The agent answers with the number of filesystems it froze. None frozen (no
        // filesystem it can freeze is mounted) must not pass for an application-consistent
        // point.
        match frozen.as_u64() {
            Some(0) => Err("guest agent: guest-fsfreeze-freeze froze no filesystem".to_owned()),
            Some(_) => Ok(()),
            None => Err(format!(
                "guest agent: guest-fsfreeze-freeze answered {frozen}, not a count of \
                 filesystems"
            )),
        }
    }

    fn thaw(&mut self) -> std::result::Result<(), String> {
        self.client
            .execute_with_timeout("guest-fsfreeze-thaw", None, self.timeout)
            .map(drop)
            .map_err(|e| format!("guest agent: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        refuse_freeze: bool,
        refuse_thaw: u32,
    }

    impl Quiesce for Recorder {
        fn freeze(&mut self) -> std::result::Result<(), String> {
            self.calls.push("freeze");
            if self.refuse_freeze {
                Err("no answer within 1s".into())
            } else {
                Ok(())
            }
        }
        fn thaw(&mut self) -> std::result::Result<(), String> {
            self.calls.push("thaw");
            if self.refuse_thaw > 0 {
                self.refuse_thaw -= 1;
                Err("thaw refused".into())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn thaws_on_leave_on_drop_and_after_a_failed_freeze() {
        let mut q = Recorder::default();
        let window = FreezeWindow::enter(Some(&mut q));
        assert!(window.is_frozen());
        let (frozen, warnings) = window.leave();
        assert!(frozen.is_some() && warnings.is_empty());
        assert_eq!(q.calls, ["freeze", "thaw"]);

        let mut q = Recorder::default();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _window = FreezeWindow::enter(Some(&mut q));
            panic!("the transaction failed");
        }));
        assert!(result.is_err());
        assert_eq!(q.calls, ["freeze", "thaw"]);

        let mut q = Recorder {
            refuse_freeze: true,
            ..Recorder::default()
        };
        let (frozen, warnings) = FreezeWindow::enter(Some(&mut q)).leave();
        assert_eq!(frozen, None);
        assert!(warnings[0].contains("crash-consistent"), "{warnings:?}");
        assert_eq!(q.calls, ["freeze", "thaw"], "thawed in case it half-froze");

        let mut q = Recorder {
            refuse_thaw: 1,
            ..Recorder::default()
        };
        let (frozen, warnings) = FreezeWindow::enter(Some(&mut q)).leave();
        assert!(frozen.is_some() && warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            q.calls,
            ["freeze", "thaw", "thaw"],
            "a failed thaw is retried"
        );

        let (frozen, warnings) = FreezeWindow::enter(None).leave();
        assert!(frozen.is_none() && warnings.is_empty());
    }

    #[cfg(feature = "agent")]
    #[test]
    fn the_fake_agent_freezes_and_thaws() {
        let fake = qga_proto::fake::FakeAgent::linux();
        let client = fake.clone().connect_blocking().unwrap();
        let mut quiesce = AgentQuiesce::new(client, Duration::from_secs(5));
        let window = FreezeWindow::enter(Some(&mut quiesce));
        assert!(window.is_frozen());
        assert!(fake.state().frozen);
        let (frozen, warnings) = window.leave();
        assert!(frozen.is_some() && warnings.is_empty(), "{warnings:?}");
        assert!(!fake.state().frozen);
    }
}
