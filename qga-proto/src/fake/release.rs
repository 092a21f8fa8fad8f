//! The qemu-ga releases the fake agent imitates, and what sets them apart on the wire.

use std::fmt;

use super::Response;

/// A qemu-ga release the fake can be built as ([`super::FakeAgent::linux_release`]): its
/// command set, the members of its replies and its error texts.
///
/// | | 2.11 | 7.2 | 10.0 |
/// |---|---|---|---|
/// | commands (Linux) | 35 | 42 (`guest-get-devices` listed disabled) | 43 (`guest-get-devices` left out; `guest-network-get-route`, `guest-get-load` added) |
/// | `guest-exec` `capture-output` | boolean | boolean | boolean or mode |
/// | `guest-get-fsinfo` | no `used-bytes`/`total-bytes`, no disk `dev`/`serial` | + those | + `total-bytes-privileged` |
/// | disabled command | `GenericError` "The command X has been disabled for this instance" | `CommandNotFound` "Command X has been disabled" | `CommandNotFound` "Command X has been disabled: the command is not allowed" |
/// | request `id` | refused ("QMP input object member 'id' is unexpected") | echoed | echoed |
/// | unparsable input | "Invalid JSON syntax" | "JSON parse error, …" | "JSON parse error, …" |
/// | program that cannot start | "Guest agent command failed, error was 'Failed to execute child process …'" | the same | "Failed to execute child process …" |
/// | unknown `guest-exec-status` pid | "Invalid parameter 'pid'" | "Invalid parameter 'pid'" | "PID ld does not exist" (sic) |
///
/// 7.2 and 10.0 are checked against Debian's qemu-ga 7.2.22 and 10.0.13 by the differential
/// tests of the `vmsdk-tests` package; 2.11 follows the 2.11 protocol reference (its command
/// set and members) and the dispatcher and agent sources of that era (its texts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum AgentRelease {
    /// qemu-ga 2.11 (Ubuntu 18.04), the oldest protocol a client may meet.
    Qemu2_11,
    /// qemu-ga 7.2 (Debian 12).
    Qemu7_2,
    /// qemu-ga 10.0 (Debian 13).
    Qemu10_0,
}

impl AgentRelease {
    /// Every release the fake knows, oldest first.
    pub const ALL: &'static [AgentRelease] = &[
        AgentRelease::Qemu2_11,
        AgentRelease::Qemu7_2,
        AgentRelease::Qemu10_0,
    ];

    /// The version `guest-info` reports.
    pub fn version(self) -> &'static str {
        match self {
            AgentRelease::Qemu2_11 => "2.11.1",
            AgentRelease::Qemu7_2 => "7.2.22",
            AgentRelease::Qemu10_0 => "10.0.13",
        }
    }

    /// `(major, minor)`, comparable with [`crate::cmd::Command::SINCE`].
    pub fn numbers(self) -> (u32, u32) {
        match self {
            AgentRelease::Qemu2_11 => (2, 11),
            AgentRelease::Qemu7_2 => (7, 2),
            AgentRelease::Qemu10_0 => (10, 0),
        }
    }

    /// Whether the release builds commands its platform lacks as stubs it lists disabled
    /// (before 9.1) rather than leaving them out.
    pub(crate) fn lists_platform_stubs(self) -> bool {
        self.numbers() < (9, 1)
    }

    /// Whether `capture-output` takes a mode string (8.1 and later).
    pub(crate) fn capture_modes(self) -> bool {
        self.numbers() >= (8, 1)
    }

    /// Whether `guest-get-fsinfo` reports used and total bytes and disks their `dev` (3.0/3.1).
    pub(crate) fn fs_usage(self) -> bool {
        self.numbers() >= (3, 1)
    }

    /// Whether `guest-get-fsinfo` reports `total-bytes-privileged` (9.1).
    pub(crate) fn privileged_bytes(self) -> bool {
        self.numbers() >= (9, 1)
    }

    /// Whether the dispatcher is the one of QEMU 2.x, which knows only `execute` and
    /// `arguments` (no request `id`) and reports unparsable input as "Invalid JSON syntax".
    pub(crate) fn legacy_dispatcher(self) -> bool {
        self.numbers() < (3, 0)
    }

    /// The reply to a disabled command (`frozen`: disabled because filesystems are frozen).
    pub(crate) fn disabled(self, name: &str, frozen: bool) -> Response {
        match self {
            AgentRelease::Qemu2_11 => Response::generic(format!(
                "The command {name} has been disabled for this instance"
            )),
            AgentRelease::Qemu7_2 => Response::error(
                "CommandNotFound",
                format!("Command {name} has been disabled"),
            ),
            AgentRelease::Qemu10_0 => {
                let reason = if frozen {
                    "the agent is in frozen state"
                } else {
                    "the command is not allowed"
                };
                Response::error(
                    "CommandNotFound",
                    format!("Command {name} has been disabled: {reason}"),
                )
            }
        }
    }

    /// The reply to `guest-exec-status` for a PID the agent does not know (never started,
    /// or already reported as exited).
    pub(crate) fn unknown_pid(self) -> Response {
        match self {
            // 10.0 lost the `%` of its PRId64 format: the text really reads "PID ld".
            AgentRelease::Qemu10_0 => Response::generic("PID ld does not exist"),
            _ => Response::generic("Invalid parameter 'pid'"),
        }
    }

    /// The reply to `guest-exec` of a program that cannot be started.
    pub(crate) fn spawn_failed(self, path: &str) -> Response {
        let glib = format!(
            "Failed to execute child process \u{201C}{path}\u{201D} (No such file or directory)"
        );
        match self {
            AgentRelease::Qemu10_0 => Response::generic(glib),
            _ => Response::generic(format!("Guest agent command failed, error was '{glib}'")),
        }
    }

    /// The text of an error about input that is not JSON; `detail` is the newer parser's.
    pub(crate) fn parse_error(self, detail: &str) -> String {
        if self.legacy_dispatcher() {
            "Invalid JSON syntax".to_owned()
        } else {
            format!("JSON parse error, {detail}")
        }
    }
}

impl fmt::Display for AgentRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qemu-ga {}", self.version())
    }
}
