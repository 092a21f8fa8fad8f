//! Built-in behaviour of every command of the fake agent.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::state::{ExecRequest, FakeProcess, OpenFile};
use super::{FakeEvent, FakeState, Response};
use crate::types::*;

/// qemu-ga's cap on `guest-file-read` counts.
const MAX_READ: i64 = 48 * 1024 * 1024;
/// qemu-ga's cap on captured output per stream.
const MAX_CAPTURE: usize = 16 * 1024 * 1024;

fn int(args: &Map<String, Value>, key: &str) -> Option<i64> {
    args.get(key).and_then(Value::as_i64)
}

fn string<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn strings(args: &Map<String, Value>, key: &str) -> Vec<String> {
    args.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(args: &Map<String, Value>, key: &str) -> Result<Vec<u8>, Response> {
    let text = string(args, key).unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| {
            Response::generic("Guest agent command failed, error was 'Invalid base64 data'")
        })
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn handle_not_found(handle: i64) -> Response {
    Response::generic(format!("handle '{handle}' has not been found"))
}

fn user_lookup_failed(user: &str) -> Response {
    // qemu-ga prints errno after getpwnam(), which is 0 for an unknown user.
    Response::generic(format!("failed to lookup user '{user}': Success"))
}

/// Runs the built-in implementation of `name`. Arguments are already checked
/// against the command's parameter list.
pub(crate) fn run(state: &mut FakeState, name: &str, args: &Map<String, Value>) -> Response {
    match name {
        "guest-sync" | "guest-sync-delimited" => {
            Response::Return(json!(int(args, "id").unwrap_or(0)))
        }
        "guest-ping" => Response::Return(json!({})),
        "guest-get-time" => Response::Return(json!(now_ns().saturating_add(state.clock_offset_ns))),
        "guest-set-time" => {
            if let Some(t) = int(args, "time") {
                state.clock_offset_ns = t.saturating_sub(now_ns());
            }
            Response::Return(json!({}))
        }
        "guest-info" => Response::ok(GuestAgentInfo {
            version: state.version.clone(),
            supported_commands: state
                .commands
                .iter()
                .map(|c| GuestAgentCommandInfo {
                    name: c.name.clone(),
                    enabled: c.enabled
                        && (!state.frozen || super::FROZEN_ALLOWED.contains(&c.name.as_str())),
                    success_response: c.success_response,
                })
                .collect(),
        }),
        "guest-shutdown" => {
            let mode = string(args, "mode").unwrap_or("powerdown");
            if !matches!(mode, "halt" | "powerdown" | "reboot") {
                return Response::generic(format!(
                    "Parameter 'mode' expects halt|powerdown|reboot, not '{mode}'"
                ));
            }
            state.events.push(FakeEvent::Shutdown(mode.to_owned()));
            Response::NoReply
        }
        "guest-suspend-disk" => {
            state.events.push(FakeEvent::SuspendDisk);
            Response::NoReply
        }
        "guest-suspend-ram" => {
            state.events.push(FakeEvent::SuspendRam);
            Response::NoReply
        }
        "guest-suspend-hybrid" => {
            state.events.push(FakeEvent::SuspendHybrid);
            Response::NoReply
        }
        "guest-file-open" => file_open(state, args),
        "guest-file-close" => {
            let handle = int(args, "handle").unwrap_or(-1);
            match state.open_files.remove(&handle) {
                Some(_) => Response::Return(json!({})),
                None => handle_not_found(handle),
            }
        }
        "guest-file-read" => file_read(state, args),
        "guest-file-write" => file_write(state, args),
        "guest-file-seek" => file_seek(state, args),
        "guest-file-flush" => {
            let handle = int(args, "handle").unwrap_or(-1);
            if state.open_files.contains_key(&handle) {
                Response::Return(json!({}))
            } else {
                handle_not_found(handle)
            }
        }
        "guest-fsfreeze-status" => Response::ok(if state.frozen {
            GuestFsfreezeStatus::Frozen
        } else {
            GuestFsfreezeStatus::Thawed
        }),
        "guest-fsfreeze-freeze" => {
            state.frozen = true;
            Response::Return(json!(state.filesystems.len()))
        }
        "guest-fsfreeze-freeze-list" => {
            let count = match args.get("mountpoints").and_then(Value::as_array) {
                None => state.filesystems.len(),
                Some(list) => state
                    .filesystems
                    .iter()
                    .filter(|fs| list.iter().any(|m| m.as_str() == Some(&fs.mountpoint)))
                    .count(),
            };
            state.frozen = count > 0;
            Response::Return(json!(count))
        }
        "guest-fsfreeze-thaw" => {
            let count = if state.frozen {
                state.filesystems.len()
            } else {
                0
            };
            state.frozen = false;
            Response::Return(json!(count))
        }
        "guest-fstrim" => Response::ok(GuestFilesystemTrimResponse {
            paths: state
                .filesystems
                .iter()
                .map(|fs| GuestFilesystemTrimResult {
                    path: fs.mountpoint.clone(),
                    error: None,
                    trimmed: Some(0),
                    minimum: Some(int(args, "minimum").unwrap_or(0)),
                })
                .collect(),
        }),
        "guest-network-get-interfaces" => Response::ok(&state.interfaces),
        "guest-network-get-route" => Response::ok(&state.routes),
        "guest-get-vcpus" => Response::ok(&state.vcpus),
        "guest-set-vcpus" => set_vcpus(state, args),
        "guest-get-disks" => Response::ok(&state.disks),
        "guest-get-fsinfo" => Response::ok(&state.filesystems),
        "guest-get-diskstats" => Response::ok(&state.diskstats),
        "guest-get-cpustats" => Response::ok(&state.cpustats),
        "guest-get-load" => Response::ok(&state.load),
        "guest-get-memory-blocks" => Response::ok(&state.memory_blocks),
        "guest-get-memory-block-info" => Response::ok(GuestMemoryBlockInfo {
            size: state.memory_block_size,
        }),
        "guest-set-memory-blocks" => set_memory_blocks(state, args),
        "guest-set-user-password" => {
            let user = string(args, "username").unwrap_or_default().to_owned();
            let password = match unb64(args, "password") {
                Ok(p) => p,
                Err(e) => return e,
            };
            let crypted = args
                .get("crypted")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let Some(account) = state.accounts.get_mut(&user) else {
                return Response::generic(format!(
                    "child process has failed to set user password: user '{user}' does not exist"
                ));
            };
            account.password = Some((Password::new(String::from_utf8_lossy(&password)), crypted));
            Response::Return(json!({}))
        }
        "guest-exec" => exec(state, args),
        "guest-exec-status" => exec_status(state, args),
        "guest-get-host-name" => Response::ok(GuestHostName {
            host_name: state.host_name.clone(),
        }),
        "guest-get-users" => Response::ok(&state.users),
        "guest-get-timezone" => Response::ok(&state.timezone),
        "guest-get-osinfo" => Response::ok(&state.osinfo),
        "guest-get-devices" => Response::ok(&state.devices),
        "guest-ssh-get-authorized-keys" => {
            let user = string(args, "username").unwrap_or_default();
            match state.accounts.get(user) {
                Some(a) => Response::ok(GuestAuthorizedKeys {
                    keys: a.authorized_keys.clone(),
                }),
                None => user_lookup_failed(user),
            }
        }
        "guest-ssh-add-authorized-keys" => {
            let user = string(args, "username").unwrap_or_default().to_owned();
            let keys = strings(args, "keys");
            let reset = args.get("reset").and_then(Value::as_bool).unwrap_or(false);
            let Some(account) = state.accounts.get_mut(&user) else {
                return user_lookup_failed(&user);
            };
            if reset {
                account.authorized_keys.clear();
            }
            for k in keys {
                if !account.authorized_keys.contains(&k) {
                    account.authorized_keys.push(k);
                }
            }
            Response::Return(json!({}))
        }
        "guest-ssh-remove-authorized-keys" => {
            let user = string(args, "username").unwrap_or_default().to_owned();
            let keys = strings(args, "keys");
            let Some(account) = state.accounts.get_mut(&user) else {
                return user_lookup_failed(&user);
            };
            account.authorized_keys.retain(|k| !keys.contains(k));
            Response::Return(json!({}))
        }
        other => Response::error(
            "CommandNotFound",
            format!("The command {other} has not been found"),
        ),
    }
}

fn file_open(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let path = string(args, "path").unwrap_or_default().to_owned();
    let mode = string(args, "mode").unwrap_or("r");
    let flags: String = mode.chars().filter(|&c| c != 'b').collect();
    let (readable, writable, append, create, truncate) = match flags.as_str() {
        "r" => (true, false, false, false, false),
        "r+" => (true, true, false, false, false),
        "w" => (false, true, false, true, true),
        "w+" => (true, true, false, true, true),
        "a" => (false, true, true, true, false),
        "a+" => (true, true, true, true, false),
        _ => return Response::generic(format!("invalid file open mode '{mode}'")),
    };
    let exists = state.files.contains_key(&path);
    if !exists && !create {
        return Response::generic(format!(
            "failed to open file '{path}' (mode: '{mode}'): No such file or directory"
        ));
    }
    if !exists || truncate {
        let parent_ok = match path.rsplit_once('/') {
            Some(("", _)) => true,
            Some((dir, _)) => {
                state
                    .files
                    .keys()
                    .any(|f| f.starts_with(&format!("{dir}/")))
                    || dir == "/tmp"
            }
            None => false,
        };
        if !parent_ok {
            return Response::generic(format!(
                "failed to open file '{path}' (mode: '{mode}'): No such file or directory"
            ));
        }
        state.files.insert(path.clone(), Vec::new());
    }
    let handle = state.next_handle;
    state.next_handle += 1;
    state.open_files.insert(
        handle,
        OpenFile {
            path,
            position: 0,
            readable,
            writable,
            append,
        },
    );
    Response::Return(json!(handle))
}

fn file_read(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let handle = int(args, "handle").unwrap_or(-1);
    let count = int(args, "count").unwrap_or(4096);
    let Some(file) = state.open_files.get_mut(&handle) else {
        return handle_not_found(handle);
    };
    if !(0..=MAX_READ).contains(&count) {
        return Response::generic(format!("value '{count}' is invalid for argument count"));
    }
    if !file.readable {
        return Response::generic("failed to read file: Bad file descriptor");
    }
    let data = state
        .files
        .get(&file.path)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let start = (file.position as usize).min(data.len());
    let end = start.saturating_add(count as usize).min(data.len());
    let chunk = &data[start..end];
    file.position = end as u64;
    let eof = (chunk.len() as i64) < count;
    Response::Return(json!({"count": chunk.len(), "buf-b64": b64(chunk), "eof": eof}))
}

fn file_write(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let handle = int(args, "handle").unwrap_or(-1);
    let Some(file) = state.open_files.get_mut(&handle) else {
        return handle_not_found(handle);
    };
    let data = match unb64(args, "buf-b64") {
        Ok(d) => d,
        Err(e) => return e,
    };
    let count = int(args, "count").unwrap_or(data.len() as i64);
    if count < 0 || count as usize > data.len() {
        return Response::generic(format!("value '{count}' is invalid for argument count"));
    }
    if !file.writable {
        return Response::generic("failed to write to file: Bad file descriptor");
    }
    let contents = state.files.entry(file.path.clone()).or_default();
    if file.append {
        file.position = contents.len() as u64;
    }
    let start = file.position as usize;
    let end = start + count as usize;
    if contents.len() < end {
        contents.resize(end, 0);
    }
    contents[start..end].copy_from_slice(&data[..count as usize]);
    file.position = end as u64;
    Response::Return(json!({"count": count, "eof": false}))
}

fn file_seek(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let handle = int(args, "handle").unwrap_or(-1);
    let offset = int(args, "offset").unwrap_or(0);
    let Some(file) = state.open_files.get_mut(&handle) else {
        return handle_not_found(handle);
    };
    let base = match args.get("whence") {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => 0,
            Some(1) => file.position as i64,
            Some(2) => state.files.get(&file.path).map_or(0, |d| d.len() as i64),
            _ => return Response::generic(format!("invalid whence code {n}")),
        },
        Some(Value::String(s)) => match s.as_str() {
            "set" => 0,
            "cur" => file.position as i64,
            "end" => state.files.get(&file.path).map_or(0, |d| d.len() as i64),
            other => {
                return Response::generic(format!(
                    "Parameter 'whence' does not accept value '{other}'"
                ))
            }
        },
        _ => return Response::generic("Parameter 'whence' is missing"),
    };
    match base.checked_add(offset) {
        Some(pos) if pos >= 0 => {
            file.position = pos as u64;
            Response::Return(json!({"position": pos, "eof": false}))
        }
        _ => Response::generic("failed to seek file: Invalid argument"),
    }
}

fn set_vcpus(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let requested: Vec<GuestLogicalProcessor> =
        match serde_json::from_value(args.get("vcpus").cloned().unwrap_or_default()) {
            Ok(v) => v,
            Err(e) => return Response::generic(format!("Invalid parameter 'vcpus': {e}")),
        };
    let mut processed = 0;
    for req in &requested {
        let Some(cpu) = state
            .vcpus
            .iter_mut()
            .find(|c| c.logical_id == req.logical_id)
        else {
            if processed == 0 {
                return Response::generic(format!(
                    "Invalid parameter 'logical-id' ({})",
                    req.logical_id
                ));
            }
            break;
        };
        if !req.online && cpu.can_offline == Some(false) {
            if processed == 0 {
                return Response::generic(format!(
                    "logical processor #{} can't be offlined",
                    req.logical_id
                ));
            }
            break;
        }
        cpu.online = req.online;
        processed += 1;
    }
    Response::Return(json!(processed))
}

fn set_memory_blocks(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let requested: Vec<GuestMemoryBlock> =
        match serde_json::from_value(args.get("mem-blks").cloned().unwrap_or_default()) {
            Ok(v) => v,
            Err(e) => return Response::generic(format!("Invalid parameter 'mem-blks': {e}")),
        };
    let results: Vec<GuestMemoryBlockResponse> = requested
        .iter()
        .map(|req| {
            match state
                .memory_blocks
                .iter_mut()
                .find(|b| b.phys_index == req.phys_index)
            {
                None => GuestMemoryBlockResponse {
                    phys_index: req.phys_index,
                    response: GuestMemoryBlockResponseType::NotFound,
                    error_code: None,
                },
                Some(b) if !req.online && b.can_offline == Some(false) => {
                    GuestMemoryBlockResponse {
                        phys_index: req.phys_index,
                        response: GuestMemoryBlockResponseType::OperationFailed,
                        error_code: Some(16), // EBUSY
                    }
                }
                Some(b) => {
                    b.online = req.online;
                    GuestMemoryBlockResponse {
                        phys_index: req.phys_index,
                        response: GuestMemoryBlockResponseType::Success,
                        error_code: None,
                    }
                }
            }
        })
        .collect();
    Response::ok(results)
}

fn exec(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let path = string(args, "path").unwrap_or_default().to_owned();
    let input = match args.get("input-data") {
        Some(_) => match unb64(args, "input-data") {
            Ok(d) => d,
            Err(e) => return e,
        },
        None => Vec::new(),
    };
    // (stdout, stderr, merged)
    let capture = match args.get("capture-output") {
        None | Some(Value::Bool(false)) => (false, false, false),
        Some(Value::Bool(true)) => (true, true, false),
        Some(Value::String(mode)) => match GuestExecCaptureOutputMode::from(mode.as_str()) {
            GuestExecCaptureOutputMode::None => (false, false, false),
            GuestExecCaptureOutputMode::Stdout => (true, false, false),
            GuestExecCaptureOutputMode::Stderr => (false, true, false),
            GuestExecCaptureOutputMode::Separated => (true, true, false),
            GuestExecCaptureOutputMode::Merged => (true, false, true),
            GuestExecCaptureOutputMode::Other(m) => {
                return Response::generic(format!(
                    "Parameter 'capture-output' does not accept value '{m}'"
                ))
            }
        },
        Some(_) => {
            return Response::generic(
                "Invalid parameter type for 'capture-output', expected: GuestExecCaptureOutput",
            )
        }
    };
    let Some(program) = state.find_program(&path) else {
        return state.release.spawn_failed(&path);
    };
    let request = ExecRequest {
        path,
        args: strings(args, "arg"),
        env: strings(args, "env"),
        input,
    };
    let outcome = program(&request);
    let pid = state.next_pid;
    state.next_pid += 1;
    state.processes.insert(
        pid,
        FakeProcess {
            outcome,
            started: Instant::now(),
            capture,
        },
    );
    Response::ok(GuestExec { pid })
}

fn exec_status(state: &mut FakeState, args: &Map<String, Value>) -> Response {
    let pid = int(args, "pid").unwrap_or(-1);
    let Some(process) = state.processes.get(&pid) else {
        return state.release.unknown_pid();
    };
    if process.started.elapsed() < process.outcome.runtime {
        return Response::ok(GuestExecStatus {
            exited: false,
            exitcode: None,
            signal: None,
            out_data: None,
            err_data: None,
            out_truncated: None,
            err_truncated: None,
        });
    }
    // Like qemu-ga: the first report of the exit is the last.
    let Some(process) = state.processes.remove(&pid) else {
        return state.release.unknown_pid();
    };
    let (capture_out, capture_err, merged) = process.capture;
    let outcome = process.outcome;
    // qemu-ga reports a captured stream (and its truncation flag) only when
    // the process wrote something to it.
    let cap = |mut data: Vec<u8>| {
        let truncated = data.len() > MAX_CAPTURE;
        data.truncate(MAX_CAPTURE);
        (!data.is_empty()).then_some((Base64Data(data), truncated))
    };
    let (out, err) = if merged {
        let mut both = outcome.stdout;
        both.extend(outcome.stderr);
        (cap(both), None)
    } else {
        (
            capture_out.then(|| cap(outcome.stdout)).flatten(),
            capture_err.then(|| cap(outcome.stderr)).flatten(),
        )
    };
    Response::ok(GuestExecStatus {
        exited: true,
        exitcode: if outcome.signal.is_some() {
            None
        } else {
            Some(outcome.exitcode.unwrap_or(0))
        },
        signal: outcome.signal,
        out_truncated: out.as_ref().map(|(_, t)| *t),
        err_truncated: err.as_ref().map(|(_, t)| *t),
        out_data: out.map(|(d, _)| d),
        err_data: err.map(|(d, _)| d),
    })
}
