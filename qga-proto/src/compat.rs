//! What an agent of a given release and platform can run, from its `guest-info`: why a command
//! is refused before anything is sent, and arguments rewritten into the form an older agent
//! accepts (or refused with a clear error, never sent in a form it would misread).

use serde_json::Value;

use crate::cmd;
use crate::error::{Error, Result};
use crate::types::GuestAgentInfo;

/// The guest platform an agent was built for, as far as its command list tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Windows,
    Linux,
    Unknown,
}

/// Infers the platform: only Windows builds run `guest-get-devices`, only Linux builds the
/// commands available with `CONFIG_LINUX` alone.
fn platform(info: &GuestAgentInfo) -> Platform {
    if info.is_enabled("guest-get-devices") {
        return Platform::Windows;
    }
    let linux_only = cmd::COMMANDS
        .iter()
        .filter(|c| c.availability == "CONFIG_LINUX")
        .any(|c| info.is_enabled(c.name));
    if linux_only {
        Platform::Linux
    } else {
        Platform::Unknown
    }
}

/// Whether a build condition of the reference rules the command out on `platform`.
fn excluded_on(availability: &str, platform: Platform) -> bool {
    if availability.is_empty() {
        return false;
    }
    match platform {
        Platform::Linux => availability == "CONFIG_WIN32",
        Platform::Windows => !availability.contains("CONFIG_WIN32"),
        Platform::Unknown => false,
    }
}

/// Checks `name` against `info`: whether the agent answers it on success, or why it cannot
/// run it.
pub(crate) fn check_command(info: &GuestAgentInfo, name: &str) -> Result<bool> {
    // The handshake commands are answered even by agents that hide them.
    if name == <cmd::GuestSync as cmd::Command>::NAME
        || name == <cmd::GuestSyncDelimited as cmd::Command>::NAME
    {
        return Ok(true);
    }
    let spec = cmd::spec(name);
    let agent_version = || info.version.clone();
    match info.command(name) {
        Some(c) if c.enabled => Ok(c.success_response),
        Some(_) => match spec {
            // Before 9.1 an agent lists the commands its platform lacks as disabled.
            Some(s) if excluded_on(s.availability, platform(info)) => {
                Err(Error::CommandUnavailable {
                    command: name.to_owned(),
                    agent_version: agent_version(),
                    availability: s.availability.to_owned(),
                })
            }
            _ => Err(Error::CommandDisabled {
                command: name.to_owned(),
                agent_version: agent_version(),
            }),
        },
        None => {
            let Some(spec) = spec else {
                return Err(Error::CommandNotSupported {
                    command: name.to_owned(),
                    agent_version: agent_version(),
                    since: None,
                });
            };
            match info.version_numbers() {
                // New enough: since 9.1 the build leaves out what its platform lacks.
                Some(version) if version >= spec.since && !spec.availability.is_empty() => {
                    Err(Error::CommandUnavailable {
                        command: name.to_owned(),
                        agent_version: agent_version(),
                        availability: spec.availability.to_owned(),
                    })
                }
                Some(version) if version >= spec.since => Err(Error::CommandNotSupported {
                    command: name.to_owned(),
                    agent_version: agent_version(),
                    since: None,
                }),
                _ => Err(Error::CommandNotSupported {
                    command: name.to_owned(),
                    agent_version: agent_version(),
                    since: Some(spec.since),
                }),
            }
        }
    }
}

/// First release whose `guest-exec` takes a capture mode string (documented as 8.0, shipped
/// in 8.1).
const CAPTURE_MODES_SINCE: (u32, u32) = (8, 1);
/// First release whose `guest-file-seek` takes `set`/`cur`/`end` for `whence`.
const WHENCE_NAMES_SINCE: (u32, u32) = (2, 6);

/// Rewrites `args` of `name` into a form the agent of `info` accepts: `None` when they go out
/// unchanged, the new arguments otherwise, or an error when the agent's release has no form
/// for what was asked.
///
/// - `guest-exec` `capture-output` modes (8.1+): before 8.1 `separated` becomes `true` and
///   `none` becomes `false`; `stdout`, `stderr` and `merged` have no boolean form.
/// - `guest-file-seek` `whence` names (2.6+): before 2.6 they become 0, 1 and 2.
///
/// Agents whose version is not `major.minor` get the arguments as given.
pub(crate) fn adapt_arguments(
    info: &GuestAgentInfo,
    name: &str,
    args: Option<&Value>,
) -> Result<Option<Value>> {
    let (Some(version), Some(Value::Object(map))) = (info.version_numbers(), args) else {
        return Ok(None);
    };
    match name {
        "guest-exec" if version < CAPTURE_MODES_SINCE => {
            let Some(Value::String(mode)) = map.get("capture-output") else {
                return Ok(None);
            };
            let flag = match mode.as_str() {
                "separated" => true,
                "none" => false,
                _ => {
                    return Err(Error::ArgumentNotSupported {
                        command: name.to_owned(),
                        argument: "capture-output",
                        value: format!("\"{mode}\""),
                        since: CAPTURE_MODES_SINCE,
                        agent_version: info.version.clone(),
                        advice: "capture stdout and stderr separately (the mode `separated`), \
                                 or upgrade qemu-ga in the guest",
                    })
                }
            };
            let mut map = map.clone();
            map.insert("capture-output".to_owned(), Value::Bool(flag));
            Ok(Some(Value::Object(map)))
        }
        "guest-file-seek" if version < WHENCE_NAMES_SINCE => {
            let Some(Value::String(whence)) = map.get("whence") else {
                return Ok(None);
            };
            let code = match whence.as_str() {
                "set" => 0,
                "cur" => 1,
                "end" => 2,
                // An unknown name: the agent's own error says what it accepts.
                _ => return Ok(None),
            };
            let mut map = map.clone();
            map.insert("whence".to_owned(), Value::from(code));
            Ok(Some(Value::Object(map)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(version: &str, commands: &[(&str, bool)]) -> GuestAgentInfo {
        serde_json::from_value(json!({
            "version": version,
            "supported_commands": commands
                .iter()
                .map(|(name, enabled)| json!({"name": name, "enabled": enabled, "success-response": true}))
                .collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn a_missing_command_is_too_new_or_left_out_of_the_build() {
        // qemu-ga 10.0 on Linux: guest-get-devices is compiled out.
        let linux10 = agent("10.0.13", &[("guest-get-cpustats", true)]);
        let err = check_command(&linux10, "guest-get-devices").unwrap_err();
        assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the guest agent (version 10.0.13) does not offer guest-get-devices on this guest: \
             qemu-ga has it only in its builds for Windows guests; upgrading qemu-ga does not \
             change that"
        );
        // qemu-ga 7.2 lacks guest-get-load: too old.
        let linux72 = agent("7.2.22", &[("guest-get-cpustats", true)]);
        let err = check_command(&linux72, "guest-get-load").unwrap_err();
        assert!(
            matches!(
                err,
                Error::CommandNotSupported {
                    since: Some((10, 0)),
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().ends_with("upgrade qemu-ga in the guest"));
        // A command this crate does not know.
        let err = check_command(&linux10, "guest-vendor-thing").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest agent (version 10.0.13) does not have command guest-vendor-thing"
        );
    }

    #[test]
    fn before_9_1_a_platform_gap_is_listed_disabled() {
        let linux72 = agent(
            "7.2.22",
            &[
                ("guest-get-cpustats", true),
                ("guest-get-devices", false),
                ("guest-exec", false),
            ],
        );
        assert!(matches!(
            check_command(&linux72, "guest-get-devices"),
            Err(Error::CommandUnavailable { .. })
        ));
        // Disabled by the administrator: the advice is the agent's configuration.
        assert!(matches!(
            check_command(&linux72, "guest-exec"),
            Err(Error::CommandDisabled { .. })
        ));
        // A Windows agent lists the Linux-only commands disabled.
        let win = agent(
            "108.0.2",
            &[("guest-get-devices", true), ("guest-get-cpustats", false)],
        );
        assert!(matches!(
            check_command(&win, "guest-get-cpustats"),
            Err(Error::CommandUnavailable { .. })
        ));
    }

    #[test]
    fn capture_modes_become_booleans_or_a_clear_error_before_8_1() {
        let old = agent("7.2.22", &[]);
        let separated = json!({"path": "/bin/true", "capture-output": "separated"});
        assert_eq!(
            adapt_arguments(&old, "guest-exec", Some(&separated)).unwrap(),
            Some(json!({"path": "/bin/true", "capture-output": true}))
        );
        let none = json!({"path": "/bin/true", "capture-output": "none"});
        assert_eq!(
            adapt_arguments(&old, "guest-exec", Some(&none)).unwrap(),
            Some(json!({"path": "/bin/true", "capture-output": false}))
        );
        let merged = json!({"path": "/bin/true", "capture-output": "merged"});
        let err = adapt_arguments(&old, "guest-exec", Some(&merged)).unwrap_err();
        assert!(matches!(
            err,
            Error::ArgumentNotSupported { since: (8, 1), .. }
        ));
        assert!(
            err.to_string().contains("capture-output \"merged\""),
            "{err}"
        );
        // 8.1 and later take the mode as it is; so do booleans everywhere.
        let new = agent("10.0.13", &[]);
        assert_eq!(
            adapt_arguments(&new, "guest-exec", Some(&merged)).unwrap(),
            None
        );
        let flag = json!({"path": "/bin/true", "capture-output": true});
        assert_eq!(
            adapt_arguments(&old, "guest-exec", Some(&flag)).unwrap(),
            None
        );
    }

    #[test]
    fn whence_names_become_codes_before_2_6() {
        let ancient = agent("2.5.0", &[]);
        let args = json!({"handle": 1000, "offset": 0, "whence": "end"});
        assert_eq!(
            adapt_arguments(&ancient, "guest-file-seek", Some(&args)).unwrap(),
            Some(json!({"handle": 1000, "offset": 0, "whence": 2}))
        );
        let modern = agent("2.11.1", &[]);
        assert_eq!(
            adapt_arguments(&modern, "guest-file-seek", Some(&args)).unwrap(),
            None
        );
    }
}
