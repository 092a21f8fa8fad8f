//! The commands the fake monitor answers: argument checks in schema order with QEMU's texts,
//! then the state change. `transaction` applies its actions to a copy of the state and keeps
//! it only when every action succeeded, as QEMU's transactions are all-or-nothing.

use serde_json::{json, Map, Value};

use super::state::{FakeState, JobStatus, QResult, QmpError, RunState};
use super::Response;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    Obj,
    Arr,
    /// A string or an object (a `BlockdevRef`, a merge source).
    Any,
    /// Any JSON value (`qom-set`'s `value`).
    Anything,
    /// A `BlockdevRef` or `null` (a `backing`).
    RefOrNull,
}

#[derive(Debug, Clone, Copy)]
struct Param(&'static str, Kind, bool);

const fn req(name: &'static str, kind: Kind) -> Param {
    Param(name, kind, false)
}
const fn opt(name: &'static str, kind: Kind) -> Param {
    Param(name, kind, true)
}

use Kind::*;

const NODE_NAME: &[Param] = &[req("node", Str), req("name", Str)];
const BITMAP_ADD: &[Param] = &[
    req("node", Str),
    req("name", Str),
    opt("granularity", Int),
    opt("persistent", Bool),
    opt("disabled", Bool),
];
const BITMAP_MERGE: &[Param] = &[req("node", Str), req("target", Str), req("bitmaps", Arr)];
const BACKUP: &[Param] = &[
    opt("job-id", Str),
    req("device", Str),
    req("target", Str),
    req("sync", Str),
    opt("speed", Int),
    opt("bitmap", Str),
    opt("bitmap-mode", Str),
    opt("compress", Bool),
    opt("on-source-error", Str),
    opt("on-target-error", Str),
    opt("auto-finalize", Bool),
    opt("auto-dismiss", Bool),
    opt("filter-node-name", Str),
    opt("x-perf", Obj),
];

/// The commands the fake knows (also what `query-commands` lists).
pub(crate) const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-version",
    "query-block",
    "query-named-block-nodes",
    "query-blockstats",
    "query-jobs",
    "query-block-jobs",
    "query-block-exports",
    "query-balloon",
    "blockdev-add",
    "blockdev-del",
    "blockdev-create",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "transaction",
    "blockdev-backup",
    "block-job-cancel",
    "job-cancel",
    "job-dismiss",
    "job-finalize",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "stop",
    "cont",
    "balloon",
    "qom-get",
    "qom-set",
    "human-monitor-command",
];

fn kind_ok(kind: Kind, v: &Value) -> bool {
    match kind {
        Str => v.is_string(),
        Int => v.is_i64() || v.is_u64(),
        Bool => v.is_boolean(),
        Obj => v.is_object(),
        Arr => v.is_array(),
        Any => v.is_string() || v.is_object(),
        Anything => true,
        RefOrNull => v.is_string() || v.is_object() || v.is_null(),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Str => "string",
        Int => "integer",
        Bool => "boolean",
        Obj => "object",
        Arr => "array",
        Any => "BlockdevRef",
        RefOrNull => "BlockdevRefOrNull",
        Anything => "any",
    }
}

/// Checks `args` against `params` in schema order: missing, then wrong type, then extra.
fn check(args: &Map<String, Value>, params: &[Param]) -> QResult<()> {
    check_at(args, params, "")
}

/// [`check`] for a nested object: QEMU names members by their path (`actions[0].data.node`).
fn check_at(args: &Map<String, Value>, params: &[Param], prefix: &str) -> QResult<()> {
    for p in params {
        match args.get(p.0) {
            None if !p.2 => {
                return Err(QmpError::generic(format!(
                    "Parameter '{prefix}{}' is missing",
                    p.0
                )))
            }
            Some(v) if !kind_ok(p.1, v) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{prefix}{}', expected: {}",
                    p.0,
                    kind_name(p.1)
                )))
            }
            _ => {}
        }
    }
    if let Some(extra) = args
        .keys()
        .find(|k| !params.iter().any(|p| p.0 == k.as_str()))
    {
        let extra = format!("{prefix}{extra}");
        return Err(QmpError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(())
}

fn s<'a>(args: &'a Map<String, Value>, key: &str) -> &'a str {
    args.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn b(args: &Map<String, Value>, key: &str, default: bool) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn enum_value(args: &Map<String, Value>, key: &str, allowed: &[&str]) -> QResult<()> {
    match args.get(key).and_then(Value::as_str) {
        Some(v) if !allowed.contains(&v) => Err(QmpError::generic(format!(
            "Parameter '{key}' does not accept value '{v}'"
        ))),
        _ => Ok(()),
    }
}

/// Looks the command up and runs it (a programmed handler first).
pub(crate) fn dispatch(state: &mut FakeState, name: &str, args: Map<String, Value>) -> Response {
    if let Some(handler) = state.handlers.get(name).cloned() {
        return handler(state, &Value::Object(args));
    }
    match run(state, name, &args) {
        Ok(v) => Response::Return(v),
        Err(e) => Response::error(e.class, e.desc),
    }
}

fn run(state: &mut FakeState, name: &str, args: &Map<String, Value>) -> QResult<Value> {
    let empty = json!({});
    match name {
        "query-commands" => {
            check(args, &[])?;
            let mut names: Vec<&str> = COMMANDS.to_vec();
            names.extend(state.handlers.keys().map(String::as_str));
            Ok(Value::Array(
                names.into_iter().map(|n| json!({"name": n})).collect(),
            ))
        }
        "query-status" => {
            check(args, &[])?;
            let mut m = Map::new();
            m.insert("status".into(), json!(state.run_state.as_str()));
            if state.release.has_singlestep() {
                m.insert("singlestep".into(), json!(false));
            }
            m.insert(
                "running".into(),
                json!(state.run_state == RunState::Running),
            );
            Ok(Value::Object(m))
        }
        "query-version" => {
            check(args, &[])?;
            let (major, minor, micro) = state.release.version();
            Ok(
                json!({"qemu": {"micro": micro, "minor": minor, "major": major},
                "package": state.release.package()}),
            )
        }
        // The fake has no guest devices: no BlockBackends.
        "query-block" => {
            check(args, &[])?;
            Ok(json!([]))
        }
        "query-named-block-nodes" => {
            check(args, &[opt("flat", Bool)])?;
            Ok(state.named_block_nodes())
        }
        "query-blockstats" => {
            check(args, &[opt("query-nodes", Bool)])?;
            if b(args, "query-nodes", false) {
                Ok(state.blockstats())
            } else {
                Ok(json!([]))
            }
        }
        "query-jobs" => {
            check(args, &[])?;
            Ok(state.jobs_json())
        }
        "query-block-jobs" => {
            check(args, &[])?;
            Ok(state.block_jobs_json())
        }
        "query-block-exports" => {
            check(args, &[])?;
            Ok(state.exports_json())
        }
        "query-balloon" => {
            check(args, &[])?;
            let balloon = state.balloon.as_ref().ok_or_else(no_balloon)?;
            Ok(json!({"actual": balloon.actual}))
        }
        "balloon" => {
            check(args, &[req("value", Int)])?;
            let value = args.get("value").and_then(Value::as_u64).unwrap_or(0);
            let balloon = state.balloon.as_mut().ok_or_else(no_balloon)?;
            if value == 0 {
                return Err(QmpError::generic("Parameter 'value' expects a size"));
            }
            // The guest driver follows the target at once in the fake.
            balloon.actual = value;
            state.emit("BALLOON_CHANGE", Some(json!({"actual": value})));
            Ok(empty)
        }
        "blockdev-add" => {
            blockdev_add_check(args)?;
            state.open_node(args, true)?;
            Ok(empty)
        }
        "blockdev-del" => {
            check(args, &[req("node-name", Str)])?;
            state.delete_node(s(args, "node-name"))?;
            Ok(empty)
        }
        "blockdev-create" => {
            check(args, &[req("job-id", Str), req("options", Obj)])?;
            let options = args.get("options").and_then(Value::as_object).cloned();
            state.start_create(s(args, "job-id"), &options.unwrap_or_default())?;
            Ok(empty)
        }
        "block-dirty-bitmap-add"
        | "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-merge"
        | "blockdev-backup" => {
            check_action(name, args, "")?;
            action(state, name, args)?;
            Ok(empty)
        }
        "transaction" => {
            check(args, &[req("actions", Arr), opt("properties", Obj)])?;
            let actions = args
                .get("actions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            // QEMU parses every action before it runs any: argument errors come first.
            let mut parsed = Vec::new();
            for (i, a) in actions.iter().enumerate() {
                let Some(a) = a.as_object() else {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'actions[{i}]', expected: object"
                    )));
                };
                check_at(
                    a,
                    &[req("type", Str), req("data", Obj)],
                    &format!("actions[{i}]."),
                )?;
                let ty = s(a, "type");
                const OTHER_QEMU_ACTIONS: &[&str] = &[
                    "abort",
                    "blockdev-snapshot",
                    "blockdev-snapshot-internal-sync",
                    "blockdev-snapshot-sync",
                    "drive-backup",
                ];
                if OTHER_QEMU_ACTIONS.contains(&ty) {
                    return Err(QmpError::generic(format!(
                        "fake monitor: transaction action '{ty}' is not modelled"
                    )));
                }
                if !ACTIONS.contains(&ty) {
                    return Err(QmpError::generic(format!(
                        "Parameter 'type' does not accept value '{ty}'"
                    )));
                }
                let data = a
                    .get("data")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                check_action(ty, &data, &format!("actions[{i}].data."))?;
                parsed.push((ty.to_owned(), data));
            }
            let mut trial = state.clone();
            for (ty, data) in &parsed {
                action(&mut trial, ty, data)?;
            }
            // All-or-nothing: the trial state (with its events) becomes the state.
            let requests = std::mem::take(&mut state.requests);
            let faults = std::mem::take(&mut state.faults);
            *state = trial;
            state.requests = requests;
            state.faults = faults;
            Ok(empty)
        }
        "block-job-cancel" | "job-cancel" => {
            let key = if name == "job-cancel" { "id" } else { "device" };
            if name == "job-cancel" {
                check(args, &[req("id", Str)])?;
            } else {
                check(args, &[req("device", Str), opt("force", Bool)])?;
            }
            let id = s(args, key);
            if state.job(id).is_none() {
                return Err(if name == "job-cancel" {
                    QmpError::generic("Job not found")
                } else {
                    QmpError {
                        class: "DeviceNotActive",
                        desc: format!("Block job '{id}' not found"),
                    }
                });
            }
            state.job_verb(
                id,
                "cancel",
                &[
                    JobStatus::Created,
                    JobStatus::Running,
                    JobStatus::Paused,
                    JobStatus::Ready,
                    JobStatus::Waiting,
                    JobStatus::Pending,
                ],
            )?;
            state.cancel_job(id);
            Ok(empty)
        }
        "job-dismiss" => {
            check(args, &[req("id", Str)])?;
            let id = s(args, "id");
            state.job_verb(id, "dismiss", &[JobStatus::Concluded])?;
            state.dismiss(id);
            Ok(empty)
        }
        "job-finalize" => {
            check(args, &[req("id", Str)])?;
            let id = s(args, "id");
            state.job_verb(id, "finalize", &[JobStatus::Pending])?;
            state.finalize_job(id);
            Ok(empty)
        }
        "nbd-server-start" => {
            check(
                args,
                &[
                    req("addr", Obj),
                    opt("tls-creds", Str),
                    opt("tls-authz", Str),
                    opt("max-connections", Int),
                ],
            )?;
            if state.nbd_server.is_some() {
                return Err(QmpError::generic("NBD server already running"));
            }
            let addr = args.get("addr").cloned().unwrap_or_default();
            if state.serve_nbd {
                let path = match (addr["type"].as_str(), addr["data"]["path"].as_str()) {
                    (Some("unix"), Some(path)) => std::path::PathBuf::from(path),
                    _ => {
                        return Err(QmpError::generic(
                            "fake monitor: its NBD server listens on Unix sockets only",
                        ))
                    }
                };
                let shared = state
                    .me
                    .as_ref()
                    .and_then(std::sync::Weak::upgrade)
                    .map(super::FakeShared)
                    .ok_or_else(|| QmpError::generic("fake monitor: its state is gone"))?;
                let listener =
                    super::nbd::NbdListener::start(path.clone(), shared).map_err(|e| {
                        QmpError::generic(format!(
                            "Failed to bind socket to {}: {e}",
                            path.display()
                        ))
                    })?;
                state.nbd_listener = Some(listener);
            }
            state.nbd_server = Some(addr);
            Ok(empty)
        }
        "nbd-server-stop" => {
            check(args, &[])?;
            if state.nbd_server.is_none() {
                return Err(QmpError::generic("NBD server not running"));
            }
            let ids: Vec<String> = state.exports.iter().map(|e| e.id.clone()).collect();
            for id in ids {
                state.export_del(&id)?;
            }
            state.nbd_server = None;
            state.nbd_listener = None;
            Ok(empty)
        }
        "block-export-add" => {
            check(
                args,
                &[
                    req("type", Str),
                    req("id", Str),
                    opt("fixed-iothread", Bool),
                    opt("iothread", Str),
                    req("node-name", Str),
                    opt("writable", Bool),
                    opt("writethrough", Bool),
                    opt("name", Str),
                    opt("description", Str),
                    opt("bitmaps", Arr),
                    opt("allocation-depth", Bool),
                ],
            )?;
            enum_value(
                args,
                "type",
                &["nbd", "vhost-user-blk", "fuse", "vduse-blk"],
            )?;
            if s(args, "type") != "nbd" {
                return Err(QmpError::generic(format!(
                    "fake monitor: block export type '{}' is not modelled",
                    s(args, "type")
                )));
            }
            let mut bitmaps = Vec::new();
            for v in args
                .get("bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match v {
                    Value::String(name) => bitmaps.push(name.clone()),
                    Value::Object(o) => bitmaps.push(s(o, "name").to_owned()),
                    _ => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
                        ))
                    }
                }
            }
            state.export_add(
                s(args, "id"),
                s(args, "node-name"),
                args.get("name").and_then(Value::as_str),
                b(args, "writable", false),
                &bitmaps,
            )?;
            Ok(empty)
        }
        "block-export-del" => {
            check(args, &[req("id", Str), opt("mode", Str)])?;
            state.export_del(s(args, "id"))?;
            Ok(empty)
        }
        "stop" => {
            check(args, &[])?;
            if state.run_state == RunState::Running {
                state.run_state = RunState::Paused;
                state.emit("STOP", None);
            }
            Ok(empty)
        }
        "cont" => {
            check(args, &[])?;
            if state.run_state != RunState::Running {
                state.run_state = RunState::Running;
                state.emit("RESUME", None);
            }
            Ok(empty)
        }
        "qom-get" => {
            check(args, &[req("path", Str), req("property", Str)])?;
            qom_get(state, s(args, "path"), s(args, "property"))
        }
        "qom-set" => {
            check(
                args,
                &[
                    req("path", Str),
                    req("property", Str),
                    req("value", Anything),
                ],
            )?;
            let (path, property) = (s(args, "path"), s(args, "property"));
            let balloon = state
                .balloon
                .as_mut()
                .filter(|b| b.path == path && property == "guest-stats-polling-interval");
            match (balloon, args.get("value").and_then(Value::as_u64)) {
                (Some(b), Some(v)) => {
                    b.polling_interval = v;
                    Ok(empty)
                }
                _ => {
                    qom_get(state, path, property)?;
                    Err(QmpError::generic(format!(
                        "fake monitor: qom-set of '{path}' '{property}' is not modelled"
                    )))
                }
            }
        }
        "human-monitor-command" => {
            check(args, &[req("command-line", Str), opt("cpu-index", Int)])?;
            Ok(json!(hmp(state, s(args, "command-line"))))
        }
        _ => Err(QmpError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        }),
    }
}

fn no_balloon() -> QmpError {
    QmpError {
        class: "DeviceNotActive",
        desc: "No balloon device has been activated".into(),
    }
}

/// The commands that are also transaction actions.
const ACTIONS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
];

/// The argument checks of an action, with QEMU's member paths under `prefix`.
fn check_action(name: &str, args: &Map<String, Value>, prefix: &str) -> QResult<()> {
    match name {
        "block-dirty-bitmap-add" => check_at(args, BITMAP_ADD, prefix),
        "block-dirty-bitmap-merge" => {
            check_at(args, BITMAP_MERGE, prefix)?;
            for v in args
                .get("bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match v {
                    Value::String(_) => {}
                    // QEMU 7.2 and 10.0 name list elements 'null'.
                    Value::Object(o) => check_at(o, &[req("node", Str), req("name", Str)], "")?,
                    _ => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
                        ))
                    }
                }
            }
            Ok(())
        }
        "blockdev-backup" => {
            check_at(args, BACKUP, prefix)?;
            match args.get("sync").and_then(Value::as_str) {
                Some(v) if !["top", "full", "none", "incremental", "bitmap"].contains(&v) => {
                    // Enum values are refused by their member name alone, even nested.
                    Err(QmpError::generic(format!(
                        "Parameter 'sync' does not accept value '{v}'"
                    )))
                }
                _ => Ok(()),
            }
        }
        _ => check_at(args, NODE_NAME, prefix),
    }
}

/// Runs an action whose arguments [`check_action`] accepted.
fn action(state: &mut FakeState, name: &str, args: &Map<String, Value>) -> QResult<()> {
    match name {
        "block-dirty-bitmap-add" => state.bitmap_add(
            s(args, "node"),
            s(args, "name"),
            args.get("granularity").and_then(Value::as_u64),
            b(args, "persistent", false),
            b(args, "disabled", false),
        ),
        "block-dirty-bitmap-remove" => state.bitmap_remove(s(args, "node"), s(args, "name")),
        "block-dirty-bitmap-clear" => state.bitmap_clear(s(args, "node"), s(args, "name")),
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => state.bitmap_enable(
            s(args, "node"),
            s(args, "name"),
            name == "block-dirty-bitmap-enable",
        ),
        "block-dirty-bitmap-merge" => {
            let node = s(args, "node");
            let sources: Vec<(String, String)> = args
                .get("bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|v| match v {
                    Value::Object(o) => (s(o, "node").to_owned(), s(o, "name").to_owned()),
                    other => (
                        node.to_owned(),
                        other.as_str().unwrap_or_default().to_owned(),
                    ),
                })
                .collect();
            state.bitmap_merge(node, s(args, "target"), &sources)
        }
        "blockdev-backup" => {
            let sync = s(args, "sync");
            if sync == "top" {
                return Err(QmpError::generic(
                    "fake monitor: backup sync mode 'top' is not modelled",
                ));
            }
            let device = s(args, "device");
            let id = args.get("job-id").and_then(Value::as_str).unwrap_or(device);
            state.start_backup(
                id,
                device,
                s(args, "target"),
                sync,
                args.get("bitmap").and_then(Value::as_str),
                b(args, "auto-finalize", true),
                b(args, "auto-dismiss", true),
            )
        }
        _ => Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{name}'"
        ))),
    }
}

/// `blockdev-add`'s options: the common ones plus the driver's.
fn blockdev_add_check(args: &Map<String, Value>) -> QResult<()> {
    let common = [
        req("driver", Str),
        opt("node-name", Str),
        opt("discard", Str),
        opt("cache", Obj),
        opt("read-only", Bool),
        opt("auto-read-only", Bool),
        opt("force-share", Bool),
        opt("detect-zeroes", Str),
    ];
    check(
        &args
            .iter()
            .filter(|(k, _)| common.iter().any(|p| p.0 == k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        &common,
    )?;
    let specific: &[Param] = match s(args, "driver") {
        "null-co" => &[
            opt("size", Int),
            opt("latency-ns", Int),
            opt("read-zeroes", Bool),
        ],
        "file" => &[
            req("filename", Str),
            opt("pr-manager", Str),
            opt("locking", Str),
            opt("aio", Str),
            opt("aio-max-batch", Int),
            opt("drop-cache", Bool),
            opt("x-check-cache-dropped", Bool),
        ],
        "raw" => &[req("file", Any), opt("offset", Int), opt("size", Int)],
        "qcow2" => &[
            req("file", Any),
            opt("backing", RefOrNull),
            opt("lazy-refcounts", Bool),
            opt("pass-discard-request", Bool),
            opt("pass-discard-snapshot", Bool),
            opt("pass-discard-other", Bool),
            opt("discard-no-unref", Bool),
            opt("overlap-check", Any),
            opt("cache-size", Int),
            opt("l2-cache-size", Int),
            opt("l2-cache-entry-size", Int),
            opt("refcount-cache-size", Int),
            opt("cache-clean-interval", Int),
            opt("encrypt", Obj),
            opt("data-file", Any),
        ],
        _ => &[],
    };
    let rest: Map<String, Value> = args
        .iter()
        .filter(|(k, _)| !common.iter().any(|p| p.0 == k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !specific.is_empty() {
        check(&rest, specific)?;
    }
    Ok(())
}

fn qom_get(state: &FakeState, path: &str, property: &str) -> QResult<Value> {
    let device_missing = || QmpError {
        class: "DeviceNotFound",
        desc: format!("Device '{path}' not found"),
    };
    let no_property = |ty: &str| QmpError::generic(format!("Property '{ty}.{property}' not found"));
    if path == "/machine" {
        let ty = state.release.machine_type();
        return match property {
            "type" => Ok(json!(ty)),
            _ => Err(no_property(ty)),
        };
    }
    let balloon = state
        .balloon
        .as_ref()
        .filter(|b| b.path == path)
        .ok_or_else(device_missing)?;
    match property {
        "type" => Ok(json!("virtio-balloon-pci")),
        "guest-stats" => {
            let stats: Map<String, Value> = state
                .release
                .balloon_stats()
                .iter()
                .map(|name| {
                    let v = balloon.stats.get(*name).copied().unwrap_or(u64::MAX);
                    ((*name).to_owned(), json!(v))
                })
                .collect();
            Ok(json!({"stats": stats, "last-update": balloon.last_update}))
        }
        "guest-stats-polling-interval" => Ok(json!(balloon.polling_interval)),
        _ => Err(no_property("virtio-balloon-pci")),
    }
}

/// The human monitor: `info status`, and `qemu-io NODE "write|read ..."` (qemu-io prints its
/// own output on QEMU's stdout, so the reply is empty; a write really writes).
fn hmp(state: &mut FakeState, line: &str) -> String {
    let line = line.trim();
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "info" if rest.trim() == "status" => {
            let running = state.run_state == RunState::Running;
            let mut text = format!("VM status: {}", if running { "running" } else { "paused" });
            if !running && state.run_state != RunState::Paused {
                text.push_str(&format!(" ({})", state.run_state.as_str()));
            }
            text + "\r\n"
        }
        "qemu-io" => qemu_io(state, rest).unwrap_or_else(|e| format!("Error: {}\r\n", e.desc)),
        _ => format!("unknown command: '{cmd}'\r\n"),
    }
}

/// The largest `qemu-io write` the fake performs (it allocates the pattern in memory).
const MAX_QEMU_IO_WRITE: u64 = 64 << 20;

fn qemu_io(state: &mut FakeState, rest: &str) -> QResult<String> {
    let rest = rest.trim();
    let (device, command) = rest.split_once(' ').unwrap_or((rest, ""));
    let command = command.trim().trim_matches('"');
    let node = state
        .node(device)
        .ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='' nor node-name='{device}'"))
        })?
        .clone();
    let words: Vec<&str> = command.split_whitespace().collect();
    let (op, mut pattern, mut nums) = (words.first().copied().unwrap_or(""), 0xcdu8, Vec::new());
    let mut i = 1;
    while i < words.len() {
        if words[i] == "-P" && i + 1 < words.len() {
            let p = words[i + 1];
            pattern = p
                .strip_prefix("0x")
                .map_or_else(|| p.parse().ok(), |h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            i += 2;
        } else {
            nums.push(words[i].parse::<u64>().unwrap_or(u64::MAX));
            i += 1;
        }
    }
    match (op, nums.as_slice()) {
        ("write", [offset, len]) => {
            // A qemu-io write opens its own BlockBackend on the node, which a backup job's
            // copy-before-write filter does not share writes with.
            if let Some(filter) = state.jobs.iter().find_map(|j| match &j.kind {
                super::state::JobKind::Backup { source, filter, .. }
                    if j.is_live() && *source == node.name =>
                {
                    Some(filter.clone())
                }
                _ => None,
            }) {
                return Ok(format!(
                    "Permission conflict on node '{0}': permissions 'write' are both required by an unnamed block device (uses node '{0}' as 'root' child) and unshared by node '{filter}' (uses node '{0}' as 'file' child).\r\n",
                    node.name
                ));
            }
            if *len > MAX_QEMU_IO_WRITE {
                return Err(QmpError::generic(format!(
                    "fake monitor: qemu-io writes are limited to {MAX_QEMU_IO_WRITE} bytes"
                )));
            }
            let len = *len as usize;
            if offset
                .checked_add(len as u64)
                .is_none_or(|end| end > node.size)
            {
                // qemu-io reports this on QEMU's stdout, not in the reply.
                return Ok(String::new());
            }
            state.guest_write(&node.name, &vec![pattern; len], *offset)?;
            Ok(String::new())
        }
        // Reads and other qemu-io commands print on QEMU's stdout only.
        _ => Ok(String::new()),
    }
}
