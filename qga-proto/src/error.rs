//! The crate's error type.

use std::time::Duration;

pub use crate::types::ErrorClass;

/// Turns an I/O failure while opening the channel into [`Error::Connect`] naming `address`.
pub(crate) fn connect_failed(address: impl std::fmt::Display) -> impl FnOnce(Error) -> Error {
    move |error| match error {
        Error::Io(source) => Error::Connect {
            address: address.to_string(),
            source,
        },
        other => other,
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent answered with an error object; `class` and `desc` are the agent's own.
    #[error("guest agent error ({class}): {desc}")]
    Agent {
        /// QAPI error class, e.g. `GenericError`, `CommandNotFound`.
        class: ErrorClass,
        /// The agent's human-readable description.
        desc: String,
    },
    /// The agent does not have this command because it predates it (or its version cannot
    /// tell); nothing was sent. Upgrading qemu-ga in the guest adds it.
    #[error("{}", not_supported(command, agent_version, *since))]
    CommandNotSupported {
        /// The command.
        command: String,
        /// Version the agent reported.
        agent_version: String,
        /// The QEMU release that added the command, when this crate knows it.
        since: Option<(u32, u32)>,
    },
    /// The agent is new enough for this command, but its build for this guest leaves it out
    /// (a Windows-only command on Linux, a Linux build without libudev, ...): since 9.1 such
    /// commands are missing from `guest-info`, older agents list them disabled. Nothing was
    /// sent, and no upgrade of qemu-ga adds the command on this guest.
    #[error("the guest agent (version {agent_version}) does not offer {command} on this guest: qemu-ga has it only {}; upgrading qemu-ga does not change that", availability_text(availability))]
    CommandUnavailable {
        /// The command.
        command: String,
        /// Version the agent reported.
        agent_version: String,
        /// The reference's build condition, e.g. `CONFIG_WIN32`.
        availability: String,
    },
    /// An argument value the agent's version does not accept (e.g. a `capture-output` mode
    /// other than `separated` or `none` before 8.1); nothing was sent.
    #[error("the guest agent (version {agent_version}) does not accept {argument} {value} of {command}, which QEMU {}.{} added; {advice}", .since.0, .since.1)]
    ArgumentNotSupported {
        /// The command.
        command: String,
        /// The parameter.
        argument: &'static str,
        /// The value given, as JSON.
        value: String,
        /// The QEMU release that added the value.
        since: (u32, u32),
        /// Version the agent reported.
        agent_version: String,
        /// What works with this agent instead.
        advice: &'static str,
    },
    /// `guest-info` says the command is disabled in this agent; nothing was sent.
    #[error("command {command} is disabled in the guest agent (version {agent_version}); enable it in the guest's qemu-ga configuration (--allow-rpcs/--block-rpcs)")]
    CommandDisabled {
        /// The command.
        command: String,
        /// Version the agent reported.
        agent_version: String,
    },
    /// The agent did not answer the synchronisation handshake in time.
    #[error("guest agent did not answer guest-sync within {} ({}is qemu-ga running in the guest? is another client connected to the channel? QEMU's chardev socket serves one at a time)", fmt_duration(.timeout.saturating_mul(*.attempts)), attempts_note(*.attempts, *.timeout))]
    SyncTimeout {
        /// How long the client waited for each attempt.
        timeout: Duration,
        /// How many handshakes the client sent before giving up.
        attempts: u32,
    },
    /// The agent did not answer a command in time. The channel is re-synchronised
    /// before the next command.
    #[error("guest agent did not answer {command} within {} (the guest may be busy or the agent hung)", fmt_duration(*.timeout))]
    Timeout {
        /// The command.
        command: String,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The connection to the agent closed.
    #[error("guest agent connection closed{}", .command.as_ref().map(|c| format!(" while waiting for the reply to {c}")).unwrap_or_default())]
    Disconnected {
        /// The command in flight, if any.
        command: Option<String>,
    },
    /// A reply exceeded the configured size limit and was discarded.
    #[error("guest agent reply larger than the limit of {limit} bytes (raise ClientConfig::max_reply_size or read in smaller chunks)")]
    ReplyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The agent sent something that is not a valid reply.
    #[error("garbled reply from the guest agent: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The channel to the agent could not be opened: no socket at the path, nobody listening,
    /// no permission, or no answer within the connect timeout.
    #[error("cannot connect to the guest agent at {address}")]
    Connect {
        /// The address, as `qga+unix:///path`, `qga+tcp://host:port` or `qga+serial:///dev/…`.
        address: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The Unix socket's listen queue stayed full for the whole connect timeout: another
    /// client holds the channel. QEMU's chardev socket serves one client at a time and queues
    /// one more (the operating system says "Resource temporarily unavailable", EAGAIN). On a
    /// libvirt host libvirt holds the agent socket for the domain's lifetime: go through
    /// libvirt (`virDomainGetGuestInfo`, `virsh qemu-agent-command`) or give the guest a
    /// second agent channel.
    #[error("the guest agent channel at {address} is busy: another client is connected and QEMU's chardev socket serves one client at a time (waited {}; on a libvirt host libvirt holds the agent socket: use libvirt's API or a second channel)", fmt_duration(*.waited))]
    ChannelBusy {
        /// The address, as `qga+unix:///path`.
        address: String,
        /// How long the connect was retried.
        waited: Duration,
    },
    /// The reply was valid JSON but did not have the shape the command returns.
    #[error("unexpected reply to {command}")]
    Decode {
        /// The command.
        command: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// The arguments could not be serialised.
    #[error("cannot encode the arguments of {command}")]
    Encode {
        /// The command.
        command: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// An address such as `qga+unix:///path` could not be understood.
    #[error("invalid guest agent address '{address}': {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A process started with `guest-exec` did not finish in time.
    #[error("guest process {pid} did not exit within {}", fmt_duration(*.timeout))]
    ExecTimeout {
        /// PID in the guest.
        pid: i64,
        /// How long the client waited.
        timeout: Duration,
    },
    /// An I/O error on the channel.
    #[error("I/O error on the guest agent channel")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the command is unavailable in this agent: unknown, too new for it, left out of
    /// its build or disabled, whether the client knew it beforehand or the agent said so.
    pub fn is_unsupported(&self) -> bool {
        match self {
            Error::CommandNotSupported { .. }
            | Error::CommandUnavailable { .. }
            | Error::CommandDisabled { .. } => true,
            Error::Agent { class, desc } => match class {
                ErrorClass::CommandNotFound => true,
                ErrorClass::Other(c) => c == "CommandDisabled",
                // QEMU 2.x reports a disabled command as a generic error.
                ErrorClass::GenericError => {
                    desc.starts_with("The command ")
                        && desc.ends_with(" has been disabled for this instance")
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// The agent's error class, for [`Error::Agent`].
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Error::Agent { class, .. } => Some(class),
            _ => None,
        }
    }

    /// Whether the error says nothing about the agent itself but the channel
    /// state is unknown (timeouts, disconnects, garbled replies).
    pub fn is_channel_error(&self) -> bool {
        matches!(
            self,
            Error::SyncTimeout { .. }
                | Error::Timeout { .. }
                | Error::Disconnected { .. }
                | Error::ReplyTooLarge { .. }
                | Error::Protocol { .. }
                | Error::Io(_)
        )
    }
}

/// `"2 attempts of 5 s; "` when the wait was split into several handshakes, else nothing.
fn attempts_note(attempts: u32, each: Duration) -> String {
    if attempts > 1 {
        format!("{attempts} attempts of {}; ", fmt_duration(each))
    } else {
        String::new()
    }
}

fn not_supported(command: &str, agent_version: &str, since: Option<(u32, u32)>) -> String {
    match since {
        Some((major, minor)) => format!(
            "the guest agent (version {agent_version}) predates command {command}, which QEMU \
             {major}.{minor} added; upgrade qemu-ga in the guest"
        ),
        None => {
            format!("the guest agent (version {agent_version}) does not have command {command}")
        }
    }
}

/// Words for a build condition of the reference.
fn availability_text(condition: &str) -> String {
    let platforms = match condition {
        "CONFIG_WIN32" => Some("Windows"),
        "CONFIG_LINUX" => Some("Linux"),
        "CONFIG_LINUX or CONFIG_WIN32" | "CONFIG_WIN32 or CONFIG_LINUX" => {
            Some("Linux and Windows")
        }
        "CONFIG_WIN32 or CONFIG_LINUX or CONFIG_FREEBSD" => Some("Linux, FreeBSD and Windows"),
        _ => None,
    };
    match platforms {
        Some(p) => format!("in its builds for {p} guests"),
        None if condition.is_empty() => "in some builds".to_owned(),
        None => format!("in builds with {condition}"),
    }
}

/// Formats a duration the way people write it: `5 s`, `250 ms`, `1.5 s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_timeout_message_tells_what_to_check() {
        // The default client configuration: two handshakes of 5 s each.
        let e = Error::SyncTimeout {
            timeout: Duration::from_secs(5),
            attempts: 2,
        };
        assert_eq!(
            e.to_string(),
            "guest agent did not answer guest-sync within 10 s (2 attempts of 5 s; is qemu-ga running in the guest? is another client connected to the channel? QEMU's chardev socket serves one at a time)"
        );
        let once = Error::SyncTimeout {
            timeout: Duration::from_millis(1500),
            attempts: 1,
        };
        assert_eq!(
            once.to_string(),
            "guest agent did not answer guest-sync within 1.5 s (is qemu-ga running in the guest? is another client connected to the channel? QEMU's chardev socket serves one at a time)"
        );
    }

    #[test]
    fn unsupported_covers_agent_and_client_side() {
        let agent = Error::Agent {
            class: ErrorClass::CommandNotFound,
            desc: "x".into(),
        };
        assert!(agent.is_unsupported());
        let generic = Error::Agent {
            class: ErrorClass::GenericError,
            desc: "x".into(),
        };
        assert!(!generic.is_unsupported());
        let disabled = Error::CommandDisabled {
            command: "guest-exec".into(),
            agent_version: "7.2".into(),
        };
        assert!(disabled.is_unsupported());
        assert!(disabled.to_string().contains("guest-exec"));
    }

    #[test]
    fn durations_format_readably() {
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(fmt_duration(Duration::from_secs(60)), "60 s");
    }
}
