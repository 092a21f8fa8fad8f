//! One connection of the fake agent: splits the request stream the way
//! QEMU's JSON streamer does (no newline needed, 0xFF resets), checks the
//! request envelope and arguments with qemu-ga's error texts, and dispatches.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{FakeShared, Fault, Response};
use crate::cmd::{self, ParamKind};
use crate::wire::SENTINEL;

/// QEMU's JSON parser refuses objects beyond 64 MiB.
const MAX_REQUEST: usize = 64 * 1024 * 1024;

/// What the server loop must do next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    Bytes(Vec<u8>),
    Delay(Duration),
    Close,
    Hang,
}

/// Request splitter and dispatcher state of one connection.
#[derive(Debug)]
pub(crate) struct Connection {
    shared: FakeShared,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    hung: bool,
}

impl Connection {
    pub fn new(shared: FakeShared) -> Self {
        Connection {
            shared,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escape: false,
            hung: false,
        }
    }

    fn reset_lexer(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
    }

    /// Feeds received bytes; returns what to send back.
    pub fn receive(&mut self, data: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        if self.hung {
            return out;
        }
        for &b in data {
            if b == SENTINEL {
                // The lexer rejects the byte and reports the token it was in.
                let stray = if self.in_string {
                    let start = self.buf.iter().rposition(|&c| c == b'"').unwrap_or(0);
                    String::from_utf8_lossy(&self.buf[start..]).into_owned()
                } else {
                    String::new()
                };
                self.reset_lexer();
                let release = self.shared.lock().release;
                out.push(Output::Bytes(error_line(
                    None,
                    "GenericError",
                    &release.parse_error(&format!("stray '{stray}\u{FFFD}'")),
                )));
                continue;
            }
            if self.depth == 0 && self.buf.is_empty() && b.is_ascii_whitespace() {
                continue;
            }
            if self.buf.len() >= MAX_REQUEST {
                self.reset_lexer();
                out.push(Output::Bytes(error_line(
                    None,
                    "GenericError",
                    "JSON parse error, request too large",
                )));
                continue;
            }
            self.buf.push(b);
            let mut complete = false;
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    complete = self.depth == 0;
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        if self.depth == 0 {
                            complete = true;
                        } else {
                            self.depth -= 1;
                            complete = self.depth == 0;
                        }
                    }
                    _ if self.depth == 0 && (b.is_ascii_whitespace() || b == b',') => {
                        complete = true
                    }
                    _ => {}
                }
            }
            if complete {
                let request = std::mem::take(&mut self.buf);
                self.reset_lexer();
                out.extend(self.handle(&request));
                if self.hung {
                    break;
                }
            }
        }
        out
    }

    fn handle(&mut self, raw: &[u8]) -> Vec<Output> {
        let text = raw.trim_ascii();
        let release = self.shared.lock().release;
        let value: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(_) => {
                let shown = String::from_utf8_lossy(text);
                return vec![Output::Bytes(error_line(
                    None,
                    "GenericError",
                    &release.parse_error(&format!("stray '{shown}'")),
                ))];
            }
        };
        if release.legacy_dispatcher() {
            if let Some(refusal) = legacy_envelope_error(&value) {
                return vec![Output::Bytes(error_line(None, "GenericError", &refusal))];
            }
        }
        let Value::Object(mut request) = value else {
            return vec![Output::Bytes(error_line(
                None,
                "GenericError",
                "QMP input must be a JSON object",
            ))];
        };
        let id = request.remove("id");
        let reply_err =
            |class: &str, desc: &str| vec![Output::Bytes(error_line(id.as_ref(), class, desc))];
        let name = match request.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return reply_err(
                    "GenericError",
                    "QMP input member 'execute' must be a string",
                )
            }
            None => {
                if request.contains_key("exec-oob") {
                    return reply_err("GenericError", "QMP input member 'exec-oob' is unexpected");
                }
                return reply_err("GenericError", "QMP input lacks member 'execute'");
            }
        };
        let args = match request.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return reply_err(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                )
            }
        };
        if let Some(extra) = request.keys().next() {
            return reply_err(
                "GenericError",
                &format!("QMP input member '{extra}' is unexpected"),
            );
        }

        let (fault, response) = {
            let mut state = self.shared.lock();
            state.requests.push(name.clone());
            let fault = state.take_fault(&name);
            let response = if matches!(fault, Some(Fault::Disconnect) | Some(Fault::Hang)) {
                // The agent never got to run it.
                Response::NoReply
            } else {
                dispatch(&mut state, &name, args)
            };
            (fault, response)
        };

        let mut out = Vec::new();
        let reply = match response {
            Response::Return(v) => {
                let mut line = Vec::new();
                if name == <cmd::GuestSyncDelimited as cmd::Command>::NAME {
                    line.push(SENTINEL);
                }
                line.extend(return_line(id.as_ref(), v));
                Some(line)
            }
            Response::Error { class, desc } => Some(error_line(id.as_ref(), &class, &desc)),
            Response::NoReply => None,
        };
        match fault {
            None => out.extend(reply.map(Output::Bytes)),
            Some(Fault::Garbage(bytes)) => {
                out.push(Output::Bytes(bytes));
                out.extend(reply.map(Output::Bytes));
            }
            Some(Fault::ReplaceReply(bytes)) => out.push(Output::Bytes(bytes)),
            Some(Fault::StaleReply(v)) => {
                out.push(Output::Bytes(return_line(None, v)));
                out.extend(reply.map(Output::Bytes));
            }
            Some(Fault::Delay(d)) => {
                out.push(Output::Delay(d));
                out.extend(reply.map(Output::Bytes));
            }
            Some(Fault::DropReply) => {}
            Some(Fault::Disconnect) => out.push(Output::Close),
            Some(Fault::Hang) => {
                self.hung = true;
                out.push(Output::Hang);
            }
        }
        out
    }
}

/// What the QEMU 2.x agent answers to a request envelope it refuses: anything but an object
/// is "Invalid JSON syntax", an object without `execute` is not a command at all, and the
/// dispatcher knows only `execute` and `arguments` (so a request `id` is refused).
fn legacy_envelope_error(request: &Value) -> Option<String> {
    let Value::Object(map) = request else {
        return Some("Invalid JSON syntax".to_owned());
    };
    if !map.contains_key("execute") {
        return Some("this feature or command is not currently supported".to_owned());
    }
    map.iter().find_map(|(key, value)| match key.as_str() {
        "execute" if !value.is_string() => {
            Some("QMP input object member 'execute' expects 'string'".to_owned())
        }
        "arguments" if !value.is_object() => {
            Some("QMP input object member 'arguments' expects 'object'".to_owned())
        }
        "execute" | "arguments" => None,
        other => Some(format!("QMP input object member '{other}' is unexpected")),
    })
}

fn return_line(id: Option<&Value>, v: Value) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("return".into(), v);
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    line.push(b'\n');
    line
}

pub(crate) fn error_line(id: Option<&Value>, class: &str, desc: &str) -> Vec<u8> {
    let mut err = Map::new();
    err.insert("class".into(), Value::from(class));
    err.insert("desc".into(), Value::from(desc));
    let mut obj = Map::new();
    obj.insert("error".into(), Value::Object(err));
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    line.push(b'\n');
    line
}

fn kind_matches(kind: ParamKind, v: &Value) -> bool {
    match kind {
        ParamKind::Int => v.is_i64() || v.is_u64(),
        ParamKind::Str => v.is_string(),
        ParamKind::Bool => v.is_boolean(),
        ParamKind::Array => v.is_array(),
        ParamKind::IntOrStr => v.is_i64() || v.is_string(),
        ParamKind::BoolOrStr => v.is_boolean() || v.is_string(),
    }
}

fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Int => "integer",
        ParamKind::Str => "string",
        ParamKind::Bool => "boolean",
        ParamKind::Array => "array",
        ParamKind::IntOrStr => "GuestFileWhence",
        ParamKind::BoolOrStr => "GuestExecCaptureOutput",
    }
}

/// Looks the command up, checks it is enabled and its arguments, then runs it.
fn dispatch(state: &mut super::FakeState, name: &str, args: Map<String, Value>) -> Response {
    let Some(entry) = state.commands.iter().find(|c| c.name == name) else {
        return Response::error(
            "CommandNotFound",
            format!("The command {name} has not been found"),
        );
    };
    if !entry.enabled {
        return state.release.disabled(name, false);
    }
    if state.frozen && !super::FROZEN_ALLOWED.contains(&name) {
        return state.release.disabled(name, true);
    }
    if let Some(handler) = state.handlers.get(name).cloned() {
        return handler(state, &Value::Object(args));
    }
    if let Some(spec) = cmd::spec(name) {
        for p in spec.params {
            // Before 8.1 `capture-output` is a plain boolean.
            let kind = match (name, p.name) {
                ("guest-exec", "capture-output") if !state.release.capture_modes() => {
                    ParamKind::Bool
                }
                _ => p.kind,
            };
            match args.get(p.name) {
                None if !p.optional => {
                    return Response::error(
                        "GenericError",
                        format!("Parameter '{}' is missing", p.name),
                    )
                }
                Some(v) if !kind_matches(kind, v) => {
                    return Response::error(
                        "GenericError",
                        format!(
                            "Invalid parameter type for '{}', expected: {}",
                            p.name,
                            kind_name(kind)
                        ),
                    )
                }
                _ => {}
            }
        }
        if let Some(extra) = args
            .keys()
            .find(|k| !spec.params.iter().any(|p| p.name == k.as_str()))
        {
            return Response::error("GenericError", format!("Parameter '{extra}' is unexpected"));
        }
    }
    super::builtin::run(state, name, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAgent;

    fn bytes(out: Vec<Output>) -> Vec<u8> {
        out.into_iter()
            .filter_map(|o| match o {
                Output::Bytes(b) => Some(b),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn splits_requests_without_newlines_and_echoes_ids() {
        let mut c = Connection::new(FakeAgent::linux().shared());
        let out =
            bytes(c.receive(br#"{"execute":"guest-ping","id":1}{"execute":"guest-ping","id":2}"#));
        assert_eq!(out, b"{\"id\":1,\"return\":{}}\n{\"id\":2,\"return\":{}}\n");
    }

    #[test]
    fn stray_sentinel_is_answered_like_qemu_ga() {
        let mut c = Connection::new(FakeAgent::linux().shared());
        let out = bytes(c.receive(b"{\"execute\": \"guest-pi\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":2}}"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("{\"error\":{\"class\":\"GenericError\",\"desc\":\"JSON parse error, stray '\\\"guest-pi\u{FFFD}'\"}}\n"), "{text}");
        assert!(out.ends_with(b"\xff{\"return\":2}\n"));
    }

    #[test]
    fn envelope_and_argument_errors_use_qemu_texts() {
        let mut c = Connection::new(FakeAgent::linux().shared());
        let cases: &[(&[u8], &str)] = &[
            (b"[1,2]", "QMP input must be a JSON object"),
            (b"{\"arguments\": {}}", "QMP input lacks member 'execute'"),
            (
                b"{\"execute\": \"guest-ping\", \"foo\": 1}",
                "QMP input member 'foo' is unexpected",
            ),
            (
                b"{\"execute\": \"guest-sync\"}",
                "Parameter 'id' is missing",
            ),
            (
                b"{\"execute\": \"guest-sync\", \"arguments\": {\"id\": \"x\"}}",
                "Invalid parameter type for 'id', expected: integer",
            ),
            (
                b"{\"execute\": \"guest-ping\", \"arguments\": {\"bogus\": 1}}",
                "Parameter 'bogus' is unexpected",
            ),
            (
                b"{\"execute\": \"guest-no-such-command\"}",
                "The command guest-no-such-command has not been found",
            ),
        ];
        for (req, desc) in cases {
            let out = String::from_utf8(bytes(c.receive(req))).unwrap();
            assert!(out.contains(desc), "{out} lacks {desc}");
        }
    }

    proptest::proptest! {
        /// Any bytes: the fake never panics and never answers more lines than
        /// it could have received requests.
        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let mut c = Connection::new(FakeAgent::linux().shared());
            let out = bytes(c.receive(&data));
            let lines = out.iter().filter(|&&b| b == b'\n').count();
            proptest::prop_assert!(lines <= data.len());
        }

        /// Well-formed requests in any chunking get one reply each, in order.
        #[test]
        fn chunked_requests_get_one_reply_each(ids in proptest::collection::vec(0i64..1000, 1..8),
                                               cut in 1usize..40) {
            let mut c = Connection::new(FakeAgent::linux().shared());
            let mut stream = Vec::new();
            for id in &ids {
                stream.extend(format!(" {{\"execute\": \"guest-sync\", \"arguments\": {{\"id\": {id}}}}}\n").into_bytes());
            }
            let mut out = Vec::new();
            for chunk in stream.chunks(cut) {
                out.extend(bytes(c.receive(chunk)));
            }
            let replies: Vec<serde_json::Value> =
                out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
            let echoed: Vec<i64> = replies.iter().map(|r| r["return"].as_i64().unwrap()).collect();
            proptest::prop_assert_eq!(echoed, ids);
        }
    }
}
