//! The crate's error type and QMP's error classes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `class` of an error QEMU sends (`qapi/error.json`).
///
/// QEMU has sent the same five classes since 2.x; a class this crate does not know (a newer
/// release, a downstream build) is kept verbatim in [`ErrorClass::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Every error that has no class of its own; `desc` says what went wrong.
    GenericError,
    /// The command does not exist (or is not allowed in this state, e.g. before
    /// `qmp_capabilities`).
    CommandNotFound,
    /// A device exists but is not active (a balloon without a driver).
    DeviceNotActive,
    /// The device (node, job, export) named in the arguments does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
    /// A class this crate does not know, kept verbatim.
    Other(String),
}

impl ErrorClass {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }
}

impl From<&str> for ErrorClass {
    fn from(s: &str) -> Self {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            other => ErrorClass::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorClass::from(s.as_str()))
    }
}

/// Everything that can go wrong talking to a QEMU monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with an error object; `class` and `desc` are QEMU's own.
    #[error("QEMU refused {command} ({class}): {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// QAPI error class.
        class: ErrorClass,
        /// QEMU's description.
        desc: String,
    },
    /// The monitor sent no greeting within the handshake deadline.
    #[error("QEMU monitor sent no greeting within {} (is this a QMP socket, `-qmp`/`-chardev …,server=on` with `-mon mode=control`? A human monitor or another protocol stays silent or says something else)", fmt_duration(*.timeout))]
    GreetingTimeout {
        /// How long the client waited.
        timeout: Duration,
    },
    /// The QEMU version of the greeting predates the command; nothing was sent.
    #[error("QEMU {qemu} predates {command}, which QEMU {}.{} added", .since.0, .since.1)]
    CommandNotSupported {
        /// The command.
        command: String,
        /// The QEMU version of the greeting.
        qemu: String,
        /// The release that added it, `(major, minor)`.
        since: (u32, u32),
    },
    /// An argument the QEMU of the greeting does not accept yet; nothing was sent.
    #[error("QEMU {qemu} does not accept {argument} of {command}, which QEMU {}.{} added{}", .since.0, .since.1, .advice.map(|a| format!("; {a}")).unwrap_or_default())]
    ArgumentNotSupported {
        /// The command.
        command: String,
        /// The argument.
        argument: &'static str,
        /// The QEMU version of the greeting.
        qemu: String,
        /// The release that added it.
        since: (u32, u32),
        /// What works with this QEMU instead, when there is something.
        advice: Option<&'static str>,
    },
    /// The caller asked for out-of-band execution but the monitor does not offer the `oob`
    /// capability (QEMU before 3.0, Proxmox's QEMU, or it was not requested at negotiation).
    #[error("out-of-band execution of {command} needs the 'oob' capability, which this monitor {}", if *.offered { "offers but the client did not enable (ClientConfig::oob)" } else { "does not offer" })]
    OobUnavailable {
        /// The command.
        command: String,
        /// Whether the greeting offered it.
        offered: bool,
    },
    /// QEMU did not answer a command in time. The command may still run in QEMU; its late
    /// reply is recognised by its id and dropped, and the connection stays usable.
    #[error("QEMU did not answer {command} within {}", fmt_duration(*.timeout))]
    Timeout {
        /// The command.
        command: String,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The monitor connection closed (QEMU exited, or another client took the socket).
    #[error("QEMU monitor connection closed{}", .command.as_ref().map(|c| format!(" while waiting for the reply to {c}")).unwrap_or_default())]
    Disconnected {
        /// The command in flight, if any.
        command: Option<String>,
    },
    /// One message from the monitor exceeded the size limit; it was discarded without being
    /// held in memory and the connection is closed.
    #[error("QEMU monitor sent a message larger than the limit of {limit} bytes (raise ClientConfig::max_message_size)")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The monitor sent something that is not QMP: not JSON, not an object, a reply with no
    /// command waiting for it, a second greeting. The connection is closed.
    #[error("QMP protocol error: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// More events arrived for a subscription than its buffer holds; the newest were
    /// dropped. The subscription keeps delivering from here on.
    #[error("{dropped} QMP event(s) dropped: the subscription's buffer of {capacity} was full (read events sooner or raise ClientConfig::event_buffer)")]
    EventOverflow {
        /// The buffer's capacity.
        capacity: usize,
        /// How many events were dropped.
        dropped: u64,
    },
    /// The subscription does not exist (it was removed, or belongs to another client).
    #[error("no such event subscription")]
    NoSuchSubscription,
    /// A block job or job ended with an error of its own.
    #[error("job {job} ended with an error: {error}")]
    JobFailed {
        /// The job's id.
        job: String,
        /// The job's own error, as `query-jobs` or the completion event report it.
        error: String,
    },
    /// A job was cancelled before it completed.
    #[error("job {job} was cancelled")]
    JobCancelled {
        /// The job's id.
        job: String,
    },
    /// A job did not reach its end in time (it keeps running in QEMU).
    #[error("job {job} did not finish within {} (last status: {status})", fmt_duration(*.timeout))]
    JobTimeout {
        /// The job's id.
        job: String,
        /// The last status seen.
        status: String,
        /// How long the helper waited.
        timeout: Duration,
    },
    /// The monitor could not be reached: no socket at the path, nobody listening, no
    /// permission, or no answer within the connect timeout.
    #[error("cannot connect to the QEMU monitor at {address}")]
    Connect {
        /// The address, as `qmp+unix:///path` or `qmp+tcp://host:port`.
        address: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The reply was valid JSON but not of the shape the command returns.
    #[error("unexpected reply to {command}")]
    Decode {
        /// The command.
        command: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// The arguments could not be encoded.
    #[error("cannot encode the arguments of {command}: {detail}")]
    Encode {
        /// The command.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// An address such as `qmp+unix:///path` could not be understood.
    #[error("invalid QMP address '{address}': {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error on the monitor connection.
    #[error("I/O error on the QEMU monitor connection")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// QEMU's error class, for [`Error::Qmp`].
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }

    /// Whether QEMU lacks the command: it said `CommandNotFound`, or the greeting's version
    /// told the client beforehand.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Error::CommandNotSupported { .. }
                | Error::ArgumentNotSupported { .. }
                | Error::OobUnavailable { .. }
                | Error::Qmp {
                    class: ErrorClass::CommandNotFound,
                    ..
                }
        )
    }

    /// Whether the connection can no longer be used: every later call fails with the same
    /// error, so connect again. A [`Timeout`](Error::Timeout) is not one: the connection
    /// stays usable and the late reply is dropped.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::GreetingTimeout { .. }
                | Error::Disconnected { .. }
                | Error::MessageTooLarge { .. }
                | Error::Protocol { .. }
                | Error::Connect { .. }
                | Error::Io(_)
        )
    }

    /// A copy for a second caller (the connection's fatal error goes to every waiting call).
    /// I/O errors keep their kind and text.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::GreetingTimeout { timeout } => Error::GreetingTimeout { timeout: *timeout },
            Error::Timeout { command, timeout } => Error::Timeout {
                command: command.clone(),
                timeout: *timeout,
            },
            Error::Disconnected { command } => Error::Disconnected {
                command: command.clone(),
            },
            Error::MessageTooLarge { limit } => Error::MessageTooLarge { limit: *limit },
            Error::Protocol { detail } => Error::Protocol {
                detail: detail.clone(),
            },
            Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
            other => Error::Protocol {
                detail: other.to_string(),
            },
        }
    }
}

/// Turns an I/O failure while opening the connection into [`Error::Connect`] naming `address`.
pub(crate) fn connect_failed(address: impl fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Connect {
        address: address.to_string(),
        source,
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
    fn classes_round_trip_and_keep_unknown_ones() {
        for c in [
            "GenericError",
            "CommandNotFound",
            "DeviceNotActive",
            "DeviceNotFound",
            "KVMMissingCap",
            "CommandDisabled",
        ] {
            let class = ErrorClass::from(c);
            assert_eq!(class.as_str(), c);
            assert_eq!(serde_json::to_value(&class).unwrap(), c);
        }
        assert_eq!(
            ErrorClass::from("CommandDisabled"),
            ErrorClass::Other("CommandDisabled".into())
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::GreetingTimeout {
            timeout: Duration::from_millis(1500),
        };
        assert!(e.to_string().contains("1.5 s"), "{e}");
        let e = Error::CommandNotSupported {
            command: "block-export-add".into(),
            qemu: "5.1.0".into(),
            since: (5, 2),
        };
        assert_eq!(
            e.to_string(),
            "QEMU 5.1.0 predates block-export-add, which QEMU 5.2 added"
        );
        assert!(e.is_unsupported());
        let e = Error::OobUnavailable {
            command: "migrate-pause".into(),
            offered: false,
        };
        assert!(e.to_string().ends_with("does not offer"), "{e}");
    }
}
