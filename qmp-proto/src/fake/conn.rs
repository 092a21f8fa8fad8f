//! One connection of the fake monitor: the greeting, capability negotiation, a request
//! splitter that cuts the byte stream the way QEMU's JSON streamer does (objects need no
//! newline, single-quoted strings are strings, a control character or 0xFF resets), the
//! envelope checks with QEMU's texts, dispatch, and the events queued since the last look.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{FakeShared, Fault, Response};

/// QEMU's JSON parser refuses tokens beyond 64 MiB...
const MAX_REQUEST: usize = 64 * 1024 * 1024;
/// ...and nesting beyond 1024.
const MAX_NESTING: usize = 1024;

/// What the server loop must do next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    Bytes(Vec<u8>),
    Delay(Duration),
    Close,
    Hang,
}

/// Splitter, negotiation and event cursor of one connection.
#[derive(Debug)]
pub(crate) struct Connection {
    shared: FakeShared,
    buf: Vec<u8>,
    depth: usize,
    quote: Option<u8>,
    escape: bool,
    negotiated: bool,
    oob: bool,
    /// Sequence number of the next event this connection has not sent.
    cursor: u64,
    hung: bool,
}

impl Connection {
    pub fn new(shared: FakeShared) -> Self {
        Connection {
            shared,
            buf: Vec::new(),
            depth: 0,
            quote: None,
            escape: false,
            negotiated: false,
            oob: false,
            cursor: 0,
            hung: false,
        }
    }

    /// The greeting QEMU sends on connect.
    pub fn greeting(&self) -> Vec<u8> {
        let release = self.shared.lock().release;
        let (major, minor, micro) = release.version();
        line(
            &json!({"QMP": {"version": {"qemu": {"micro": micro, "minor": minor, "major": major},
            "package": release.package()}, "capabilities": ["oob"]}}),
        )
    }

    fn reset_lexer(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.quote = None;
        self.escape = false;
    }

    /// Events queued since the last call, as wire lines (none before negotiation).
    pub fn pending_events(&mut self) -> Vec<u8> {
        if !self.negotiated || self.hung {
            return Vec::new();
        }
        let state = self.shared.lock();
        let mut out = Vec::new();
        for ev in state.events.iter().filter(|e| e.seq >= self.cursor) {
            out.extend(event_line(&ev.name, ev.data.as_ref()));
        }
        self.cursor = state.next_event;
        out
    }

    /// Feeds received bytes; returns what to send back.
    pub fn receive(&mut self, data: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        for &b in data {
            if self.hung {
                break;
            }
            let control = b == 0xFF || (b < 0x20 && !b.is_ascii_whitespace());
            if control {
                // The lexer rejects the byte, reports it, and starts over.
                let had_input = !self.buf.is_empty();
                self.reset_lexer();
                if had_input || b == 0xFF {
                    out.push(Output::Bytes(error_line(
                        None,
                        "GenericError",
                        &format!("JSON parse error, stray '{}'", escape_byte(b)),
                    )));
                }
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
                    "JSON parse error, JSON token size limit exceeded",
                )));
                continue;
            }
            self.buf.push(b);
            let mut complete = false;
            if let Some(q) = self.quote {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == q {
                    self.quote = None;
                    complete = self.depth == 0;
                }
            } else {
                match b {
                    b'"' | b'\'' => self.quote = Some(b),
                    b'{' | b'[' => {
                        self.depth += 1;
                        if self.depth > MAX_NESTING {
                            self.reset_lexer();
                            out.push(Output::Bytes(error_line(
                                None,
                                "GenericError",
                                "JSON parse error, JSON nesting depth limit exceeded",
                            )));
                            continue;
                        }
                    }
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
            }
        }
        out
    }

    fn handle(&mut self, raw: &[u8]) -> Vec<Output> {
        let text = raw.trim_ascii();
        let value: Value = match parse_qemu_json(text) {
            Some(v) => v,
            None => {
                let shown = String::from_utf8_lossy(text);
                let word = shown.trim_end_matches(',');
                let desc = if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()) {
                    format!("JSON parse error, invalid keyword '{word}'")
                } else {
                    format!("JSON parse error, stray '{word}'")
                };
                return vec![Output::Bytes(error_line(None, "GenericError", &desc))];
            }
        };
        let Value::Object(mut request) = value else {
            return vec![Output::Bytes(error_line(
                None,
                "GenericError",
                "QMP input must be a JSON object",
            ))];
        };
        let id = request.remove("id");
        let error =
            |class: &str, desc: &str| vec![Output::Bytes(error_line(id.as_ref(), class, desc))];
        let (name, oob) = match (request.remove("execute"), request.remove("exec-oob")) {
            (Some(_), Some(_)) => {
                return error(
                    "GenericError",
                    "QMP input must have either member 'execute' or 'exec-oob'",
                )
            }
            (Some(Value::String(s)), None) => (s, false),
            (None, Some(Value::String(s))) if self.oob => (s, true),
            (None, Some(Value::String(_))) => {
                return error("GenericError", "QMP input member 'exec-oob' is unexpected")
            }
            (Some(_), None) => {
                return error(
                    "GenericError",
                    "QMP input member 'execute' must be a string",
                )
            }
            (None, Some(_)) => {
                return error(
                    "GenericError",
                    "QMP input member 'exec-oob' must be a string",
                )
            }
            (None, None) => {
                if let Some(extra) = request.keys().find(|k| *k != "arguments") {
                    return error(
                        "GenericError",
                        &format!("QMP input member '{extra}' is unexpected"),
                    );
                }
                return error("GenericError", "QMP input lacks member 'execute'");
            }
        };
        let args = match request.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return error(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                )
            }
        };
        if let Some(extra) = request.keys().next() {
            return error(
                "GenericError",
                &format!("QMP input member '{extra}' is unexpected"),
            );
        }
        if oob {
            return error(
                "GenericError",
                &format!("The command {name} does not support OOB"),
            );
        }

        // Negotiation mode: only qmp_capabilities.
        if name == "qmp_capabilities" {
            self.shared.lock().requests.push(name.clone());
            if self.negotiated {
                return error(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                );
            }
            let mut enable_oob = false;
            for (key, v) in &args {
                match (key.as_str(), v) {
                    ("enable", Value::Array(caps)) => {
                        for cap in caps {
                            match cap.as_str() {
                                Some("oob") => enable_oob = true,
                                Some(other) => {
                                    return error(
                                        "GenericError",
                                        &format!(
                                            "Parameter 'null' does not accept value '{other}'"
                                        ),
                                    )
                                }
                                None => return error(
                                    "GenericError",
                                    "Invalid parameter type for 'null', expected: QMPCapability",
                                ),
                            }
                        }
                    }
                    ("enable", _) => {
                        return error(
                            "GenericError",
                            "Invalid parameter type for 'enable', expected: array",
                        )
                    }
                    (other, _) => {
                        return error(
                            "GenericError",
                            &format!("Parameter '{other}' is unexpected"),
                        )
                    }
                }
            }
            self.negotiated = true;
            self.oob = enable_oob;
            self.cursor = self.shared.lock().next_event;
            return vec![Output::Bytes(return_line(id.as_ref(), json!({})))];
        }
        if !self.negotiated {
            self.shared.lock().requests.push(name.clone());
            return error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
        }

        let (fault, response) = {
            let mut state = self.shared.lock();
            state.requests.push(name.clone());
            let fault = state.take_fault(&name);
            let response = match &fault {
                Some(Fault::Disconnect) | Some(Fault::Hang) => None,
                Some(Fault::Error { class, desc }) => Some(Response::error(class, desc.clone())),
                _ => Some(super::commands::dispatch(&mut state, &name, args)),
            };
            (fault, response)
        };

        let reply = response.map(|r| match r {
            Response::Return(v) => return_line(id.as_ref(), v),
            Response::Error { class, desc } => error_line(id.as_ref(), &class, &desc),
        });
        let mut out = Vec::new();
        // Events the command raised go out before its reply, as in QEMU.
        let events = self.pending_events();
        let after = |conn: &mut Connection, out: &mut Vec<Output>| {
            conn.shared.lock().after_reply();
            let late = conn.pending_events();
            if !late.is_empty() {
                out.push(Output::Bytes(late));
            }
        };
        match fault {
            None | Some(Fault::Error { .. }) => {
                out.push(Output::Bytes([events, reply.unwrap_or_default()].concat()));
                after(self, &mut out);
            }
            Some(Fault::Garbage(bytes)) => {
                out.push(Output::Bytes(
                    [events, bytes, reply.unwrap_or_default()].concat(),
                ));
                after(self, &mut out);
            }
            Some(Fault::ReplaceReply(bytes)) => {
                out.push(Output::Bytes([events, bytes].concat()));
                after(self, &mut out);
            }
            Some(Fault::UnknownId(bogus)) => {
                let stray = return_line(Some(&bogus), json!({}));
                out.push(Output::Bytes(
                    [events, stray, reply.unwrap_or_default()].concat(),
                ));
                after(self, &mut out);
            }
            Some(Fault::Delay(d)) => {
                out.push(Output::Bytes(events));
                out.push(Output::Delay(d));
                out.extend(reply.map(Output::Bytes));
                after(self, &mut out);
            }
            Some(Fault::DropReply) => {
                out.push(Output::Bytes(events));
                after(self, &mut out);
            }
            Some(Fault::Disconnect) => out.push(Output::Close),
            Some(Fault::Hang) => {
                self.hung = true;
                out.push(Output::Hang);
            }
        }
        out.retain(|o| !matches!(o, Output::Bytes(b) if b.is_empty()));
        out
    }
}

/// Parses a request as QEMU does: JSON, also with single-quoted strings.
fn parse_qemu_json(text: &[u8]) -> Option<Value> {
    if let Ok(v) = serde_json::from_slice(text) {
        return Some(v);
    }
    if !text.contains(&b'\'') {
        return None;
    }
    // Rewrite single-quoted strings as double-quoted ones (escaping inner double quotes).
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut quote: Option<u8> = None;
    let mut escape = false;
    for &b in text {
        match quote {
            Some(q) if escape => {
                escape = false;
                if q == b'\'' && b == b'\'' {
                    out.pop();
                    out.push(b'\'');
                } else {
                    out.push(b);
                }
            }
            Some(_) if b == b'\\' => {
                escape = true;
                out.push(b);
            }
            Some(q) if b == q => {
                quote = None;
                out.push(b'"');
            }
            Some(b'\'') if b == b'"' => out.extend_from_slice(b"\\\""),
            Some(_) => out.push(b),
            None if b == b'\'' || b == b'"' => {
                quote = Some(b);
                out.push(b'"');
            }
            None => out.push(b),
        }
    }
    serde_json::from_slice(&out).ok()
}

fn escape_byte(b: u8) -> String {
    if b == 0xFF {
        "\\xff".to_owned()
    } else {
        format!("\\x{b:02x}")
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).unwrap_or_default();
    l.extend_from_slice(b"\r\n");
    l
}

fn return_line(id: Option<&Value>, v: Value) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("return".into(), v);
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    line(&Value::Object(obj))
}

pub(crate) fn error_line(id: Option<&Value>, class: &str, desc: &str) -> Vec<u8> {
    let mut obj = Map::new();
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    obj.insert("error".into(), json!({"class": class, "desc": desc}));
    line(&Value::Object(obj))
}

fn event_line(name: &str, data: Option<&Value>) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut obj = Map::new();
    obj.insert(
        "timestamp".into(),
        json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
    );
    obj.insert("event".into(), json!(name));
    if let Some(d) = data {
        obj.insert("data".into(), d.clone());
    }
    line(&Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeMonitor;

    fn bytes(out: Vec<Output>) -> Vec<u8> {
        out.into_iter()
            .filter_map(|o| match o {
                Output::Bytes(b) => Some(b),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn replies(out: Vec<Output>) -> Vec<Value> {
        bytes(out)
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn negotiation_gates_commands_and_events() {
        let fake = FakeMonitor::new();
        let mut c = Connection::new(fake.shared());
        let greeting: Value = serde_json::from_slice(&c.greeting()).unwrap();
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10);
        assert!(c.greeting().ends_with(b"\r\n"));
        let r = replies(c.receive(br#"{"execute":"query-status","id":1}"#));
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert_eq!(
            r[0]["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        // Events raised before negotiation are not sent to this monitor.
        fake.emit_event("RESUME", None);
        let r = replies(c.receive(
            br#"{"execute":"qmp_capabilities","id":2}{"execute":"qmp_capabilities","id":3}"#,
        ));
        assert_eq!(r[0], json!({"return": {}, "id": 2}));
        assert_eq!(r[1]["error"]["class"], "CommandNotFound");
        let r = replies(c.receive(b"{'execute': 'cont', 'id': 4}"));
        assert_eq!(r[0]["event"], "RESUME");
        assert_eq!(r[1], json!({"return": {}, "id": 4}));
    }

    #[test]
    fn envelope_errors_use_qemu_texts() {
        let mut c = Connection::new(FakeMonitor::new().shared());
        c.receive(br#"{"execute":"qmp_capabilities"}"#);
        let cases: &[(&[u8], &str)] = &[
            (b"[1]", "QMP input must be a JSON object"),
            (b"{\"exec\": 1}", "QMP input member 'exec' is unexpected"),
            (
                b"{\"execute\": \"query-status\", \"bogus\": 1}",
                "QMP input member 'bogus' is unexpected",
            ),
            (
                b"nonsense\n",
                "JSON parse error, invalid keyword 'nonsense'",
            ),
            (
                b"{\"execute\": \"foo\"}",
                "The command foo has not been found",
            ),
            (
                b"{\"exec-oob\": \"query-status\"}",
                "QMP input member 'exec-oob' is unexpected",
            ),
        ];
        for (req, desc) in cases {
            let r = replies(c.receive(req));
            assert_eq!(r.len(), 1, "{}", String::from_utf8_lossy(req));
            assert_eq!(r[0]["error"]["desc"], *desc);
        }
    }

    proptest::proptest! {
        /// Any bytes: the fake never panics and answers at most one line per input byte.
        #[test]
        fn any_bytes_never_panic(negotiate in proptest::prelude::any::<bool>(),
                                 data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut c = Connection::new(FakeMonitor::new().shared());
            if negotiate {
                c.receive(br#"{"execute":"qmp_capabilities"}"#);
            }
            let out = bytes(c.receive(&data));
            let lines = out.iter().filter(|&&b| b == b'\n').count();
            proptest::prop_assert!(lines <= data.len() * 2 + 1);
        }

        /// Well-formed requests in any chunking get one reply each, with their ids, in order.
        #[test]
        fn chunked_requests_get_one_reply_each(ids in proptest::collection::vec(0i64..1000, 1..8),
                                               cut in 1usize..40) {
            let mut c = Connection::new(FakeMonitor::new().shared());
            let mut stream = b"{\"execute\":\"qmp_capabilities\"}".to_vec();
            for id in &ids {
                stream.extend(format!(" {{\"execute\": \"query-status\", \"id\": {id}}}").into_bytes());
            }
            let mut out = Vec::new();
            for chunk in stream.chunks(cut) {
                out.extend(c.receive(chunk));
            }
            let r = replies(out);
            let echoed: Vec<i64> = r[1..].iter().map(|r| r["id"].as_i64().unwrap()).collect();
            proptest::prop_assert_eq!(echoed, ids);
        }
    }
}
