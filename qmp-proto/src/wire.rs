//! Sans-I/O framing of QMP: the greeting, request encoding and a streaming decoder of the
//! monitor's messages.
//!
//! QEMU sends one JSON object per message, each ending in CRLF (`docs/interop/qmp-spec.rst`):
//! the greeting (`{"QMP": …}`), replies (`{"return": …, "id": …}` or `{"error": …, "id": …}`)
//! and events (`{"event": …, "data": …, "timestamp": …}`). [`Decoder`] turns bytes, in whatever
//! chunks they arrive, into [`Message`]s and never holds more than the message size limit plus
//! one chunk: a longer message is skipped to its end and reported as
//! [`WireError::Oversized`].
//!
//! # What is shared with the guest agent's wire, and what is not
//!
//! QGA and QMP both send QAPI JSON, but their framing differs where it matters: the agent's
//! replies carry no events and no greeting, the agent resynchronises with a `0xFF` sentinel and
//! `guest-sync-delimited`, and a client must skip stale replies of earlier clients. QMP has a
//! greeting and a capability negotiation instead, interleaves events with replies, and a
//! connection belongs to one client from its start, so anything unexpected is an error rather
//! than something to skip. What really is the same (a JSON object per line, `return`/`error`
//! with `class`/`desc`) is a few lines; this crate keeps its own rather than making every QMP
//! user build the agent crate.
//!
//! ```
//! use qmp_proto::wire::{Decoder, Message};
//!
//! let mut decoder = Decoder::new();
//! for chunk in [&b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, "[..],
//!               &b"\"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n{\"return\": {}, \"id\": 1}\r\n"[..]] {
//!     decoder.push(chunk);
//! }
//! match decoder.next_message() {
//!     Some(Ok(Message::Greeting(g))) => assert_eq!(g.version.qemu.to_string(), "7.2.0"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert!(matches!(decoder.next_message(), Some(Ok(Message::Reply(_)))));
//! assert!(decoder.next_message().is_none());
//! ```

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, ErrorClass};

/// Default limit for one message from the monitor: 10 MiB. The largest replies of a busy VM
/// (`query-qmp-schema`, `query-named-block-nodes` with deep backing chains) stay well below.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;

/// Longest excerpt of a bad message kept in [`WireError::Invalid`].
const EXCERPT_LEN: usize = 200;

/// A QEMU version, `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major release.
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Micro release (`.50` and above are development snapshots of the next release).
    pub micro: u32,
}

impl QemuVersion {
    /// A version.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// Whether this QEMU has what release `(major, minor)` added. A development snapshot
    /// (`x.y.50` and above) counts as the release it leads to.
    pub fn at_least(&self, (major, minor): (u32, u32)) -> bool {
        let (mut own_major, mut own_minor) = (self.major, self.minor);
        if self.micro >= 50 {
            // The tree after x.y is numbered x.y.50 and becomes the next release: since 4.0
            // a year's third release (x.2) is followed by (x+1).0; 2.12 led to 3.0, 3.1 to 4.0.
            (own_major, own_minor) = match (own_major, own_minor) {
                (2, 12) | (3, 1) => (own_major + 1, 0),
                (m, 2) if m >= 4 => (m + 1, 0),
                (m, n) => (m, n + 1),
            };
        }
        (own_major, own_minor) >= (major, minor)
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The version object of the greeting (and of `query-version`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The upstream version.
    pub qemu: QemuVersion,
    /// The distribution's package version, e.g. `Debian 1:7.2+dfsg-7+deb12u7` (may be empty).
    #[serde(default)]
    pub package: String,
}

/// A capability the monitor offers in its greeting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// Out-of-band execution (`exec-oob`), QEMU 3.0 and later (but not Proxmox's QEMU).
    Oob,
    /// A capability this crate does not know, kept verbatim.
    Other(String),
}

impl Capability {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Capability::Oob => "oob",
            Capability::Other(s) => s,
        }
    }
}

impl From<&str> for Capability {
    fn from(s: &str) -> Self {
        match s {
            "oob" => Capability::Oob,
            other => Capability::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Capability {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Capability {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Capability::from(s.as_str()))
    }
}

/// The greeting QEMU sends when a client connects: `{"QMP": {"version": …, "capabilities": […]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities the client may enable with `qmp_capabilities`.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

impl Greeting {
    /// Whether the monitor offers out-of-band execution.
    pub fn offers_oob(&self) -> bool {
        self.capabilities.contains(&Capability::Oob)
    }

    /// The greeting as QEMU writes it, with its CRLF (for servers and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&serde_json::json!({ "QMP": self }))
            .expect("a greeting always serialises");
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// The time QEMU stamped on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous event: `{"event": NAME, "data": {…}, "timestamp": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event's name, e.g. `JOB_STATUS_CHANGE`.
    pub event: String,
    /// Its data (an empty object when QEMU sends none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU raised it.
    #[serde(default)]
    pub timestamp: Timestamp,
}

impl Event {
    /// Decodes the data into a typed struct (see [`crate::events`]).
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(self.data.clone()).map_err(|source| Error::Decode {
            command: format!("event {}", self.event),
            source,
        })
    }
}

/// An error object of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QmpError {
    /// QAPI error class.
    pub class: ErrorClass,
    /// QEMU's description.
    pub desc: String,
}

/// A reply to a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The `id` of the request, echoed; QEMU leaves it out when it could not parse the
    /// request (and so could not read its id).
    pub id: Option<Value>,
    /// `return` value or `error` object.
    pub outcome: Result<Value, QmpError>,
}

/// One message from the monitor.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// The greeting.
    Greeting(Greeting),
    /// A reply.
    Reply(Reply),
    /// An event.
    Event(Event),
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WireError {
    /// Not a QMP message: not JSON, not an object, or an object of no known kind.
    Invalid {
        /// Its start, lossily decoded.
        excerpt: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Longer than the limit; its bytes were discarded up to its end.
    Oversized {
        /// The limit.
        limit: usize,
    },
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Oversized { limit } => Error::MessageTooLarge { limit },
            WireError::Invalid { excerpt, reason } => Error::Protocol {
                detail: format!("{reason}: {excerpt:?}"),
            },
        }
    }
}

/// Encodes one command: `{"execute": NAME, "arguments": ARGS, "id": ID}` (`exec-oob` when
/// `oob`), ending in CRLF. `arguments` is left out when it is `None`, `null` or an empty
/// object; anything but an object is refused.
pub fn encode_command(
    name: &str,
    arguments: Option<&Value>,
    id: Option<&Value>,
    oob: bool,
) -> Result<Vec<u8>, Error> {
    let mut request = Map::new();
    let verb = if oob { "exec-oob" } else { "execute" };
    request.insert(verb.to_owned(), Value::String(name.to_owned()));
    match arguments {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) if map.is_empty() => {}
        Some(args @ Value::Object(_)) => {
            request.insert("arguments".to_owned(), args.clone());
        }
        Some(other) => {
            return Err(Error::Encode {
                command: name.to_owned(),
                detail: format!("arguments must be a JSON object, not {}", json_kind(other)),
            })
        }
    }
    if let Some(id) = id {
        request.insert("id".to_owned(), id.clone());
    }
    let mut out = serde_json::to_vec(&Value::Object(request)).map_err(|e| Error::Encode {
        command: name.to_owned(),
        detail: e.to_string(),
    })?;
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// Encodes a reply as QEMU writes it (for servers and tests).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut map = Map::new();
    match &reply.outcome {
        Ok(v) => {
            map.insert("return".to_owned(), v.clone());
        }
        Err(e) => {
            map.insert(
                "error".to_owned(),
                serde_json::json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    if let Some(id) = &reply.id {
        map.insert("id".to_owned(), id.clone());
    }
    let mut out = serde_json::to_vec(&Value::Object(map)).expect("a JSON map serialises");
    out.extend_from_slice(b"\r\n");
    out
}

/// Encodes an event as QEMU writes it (for servers and tests).
pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = serde_json::to_vec(event).expect("an event serialises");
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Streaming decoder of the monitor's messages. Feed bytes with [`push`](Decoder::push), take
/// messages with [`next_message`](Decoder::next_message).
#[derive(Debug, Clone)]
pub struct Decoder {
    line: Vec<u8>,
    messages: VecDeque<Result<Message, WireError>>,
    max_message_size: usize,
    /// Set while skipping the rest of an oversized message.
    discarding: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder with the default limit, [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub fn new() -> Self {
        Decoder::with_max_message_size(DEFAULT_MAX_MESSAGE_SIZE)
    }

    /// A decoder that rejects messages longer than `limit` bytes.
    pub fn with_max_message_size(limit: usize) -> Self {
        Decoder {
            line: Vec::new(),
            messages: VecDeque::new(),
            max_message_size: limit.max(1),
            discarding: false,
        }
    }

    /// The message size limit.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Bytes of an incomplete message currently held.
    pub fn buffered(&self) -> usize {
        self.line.len()
    }

    /// Decoded messages not yet taken.
    pub fn pending(&self) -> usize {
        self.messages.len()
    }

    /// Feeds bytes received from the monitor.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let stop = data.iter().position(|&b| b == b'\n');
            let chunk = match stop {
                Some(i) => &data[..i],
                None => data,
            };
            if !self.discarding {
                if self.line.len() + chunk.len() > self.max_message_size {
                    self.line = Vec::new();
                    self.discarding = true;
                    self.messages.push_back(Err(WireError::Oversized {
                        limit: self.max_message_size,
                    }));
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            match stop {
                Some(i) => {
                    if !self.discarding {
                        let line = std::mem::take(&mut self.line);
                        if let Some(message) = parse_message(&line) {
                            self.messages.push_back(message);
                        }
                    }
                    self.discarding = false;
                    data = &data[i + 1..];
                }
                None => data = &[],
            }
        }
    }

    /// The next complete message (or what is wrong with it), if any.
    pub fn next_message(&mut self) -> Option<Result<Message, WireError>> {
        self.messages.pop_front()
    }
}

fn excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(EXCERPT_LEN)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Parses one complete line; blank lines (and a lone CR) yield nothing.
pub(crate) fn parse_message(line: &[u8]) -> Option<Result<Message, WireError>> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    let invalid = |reason: String| {
        Some(Err(WireError::Invalid {
            excerpt: excerpt(trimmed),
            reason,
        }))
    };
    let value: Value = match serde_json::from_slice(trimmed) {
        Ok(v) => v,
        Err(e) => return invalid(format!("not JSON ({e})")),
    };
    let Value::Object(mut map) = value else {
        return invalid(format!(
            "{} where a JSON object was expected",
            json_kind(&value)
        ));
    };
    if let Some(ret) = map.remove("return") {
        return Some(Ok(Message::Reply(Reply {
            id: map.remove("id"),
            outcome: Ok(ret),
        })));
    }
    if let Some(err) = map.remove("error") {
        let Value::Object(err) = err else {
            return invalid("'error' is not an object".to_owned());
        };
        let class = match err.get("class") {
            Some(Value::String(c)) => ErrorClass::from(c.as_str()),
            _ => return invalid("'error' without a 'class' string".to_owned()),
        };
        let desc = match err.get("desc") {
            Some(Value::String(d)) => d.clone(),
            _ => String::new(),
        };
        return Some(Ok(Message::Reply(Reply {
            id: map.remove("id"),
            outcome: Err(QmpError { class, desc }),
        })));
    }
    if map.contains_key("event") {
        return match serde_json::from_value::<Event>(Value::Object(map)) {
            Ok(event) => Some(Ok(Message::Event(event))),
            Err(e) => invalid(format!("malformed event ({e})")),
        };
    }
    if let Some(qmp) = map.remove("QMP") {
        return match serde_json::from_value::<Greeting>(qmp) {
            Ok(greeting) => Some(Ok(Message::Greeting(greeting))),
            Err(e) => invalid(format!("malformed greeting ({e})")),
        };
    }
    invalid("neither a greeting, a reply nor an event".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn drain(d: &mut Decoder) -> Vec<Result<Message, WireError>> {
        std::iter::from_fn(|| d.next_message()).collect()
    }

    /// The greeting of the QEMU 7.2 on this machine, byte for byte.
    const GREETING_7_2: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n";

    #[test]
    fn decodes_a_real_greeting() {
        let mut d = Decoder::new();
        d.push(GREETING_7_2);
        let Some(Ok(Message::Greeting(g))) = d.next_message() else {
            panic!("no greeting")
        };
        assert_eq!(g.version.qemu, QemuVersion::new(7, 2, 22));
        assert_eq!(g.version.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        assert!(g.offers_oob());
        // The greeting encodes back to an equal greeting.
        let mut again = Decoder::new();
        again.push(&g.encode());
        assert_eq!(again.next_message(), Some(Ok(Message::Greeting(g))));
    }

    #[test]
    fn greeting_tolerates_unknown_capabilities_and_fields() {
        let mut d = Decoder::new();
        d.push(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 99}, \"package\": \"\", \"x-new\": 1}, \"capabilities\": [\"oob\", \"x-future\"], \"extra\": true}}\r\n");
        let Some(Ok(Message::Greeting(g))) = d.next_message() else {
            panic!("no greeting")
        };
        assert_eq!(
            g.capabilities,
            vec![Capability::Oob, Capability::Other("x-future".into())]
        );
    }

    #[test]
    fn encodes_commands_with_ids_and_oob() {
        assert_eq!(
            encode_command("query-status", None, Some(&json!(1)), false).unwrap(),
            b"{\"execute\":\"query-status\",\"id\":1}\r\n"
        );
        let args = json!({"node": "disk0", "name": "b0"});
        let bytes = encode_command("block-dirty-bitmap-add", Some(&args), None, true).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            json!({"exec-oob": "block-dirty-bitmap-add", "arguments": args})
        );
        assert!(matches!(
            encode_command("stop", Some(&json!([1])), None, false),
            Err(Error::Encode { .. })
        ));
    }

    #[test]
    fn replies_events_and_errors() {
        let mut d = Decoder::new();
        d.push(b"{\"return\": {}, \"id\": 1}\r\n{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n{\"id\": \"x\", \"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'd' not found\"}}\r\n");
        let m = drain(&mut d);
        assert_eq!(
            m[0],
            Ok(Message::Reply(Reply {
                id: Some(json!(1)),
                outcome: Ok(json!({}))
            }))
        );
        assert_eq!(
            m[1],
            Ok(Message::Event(Event {
                event: "STOP".into(),
                data: Value::Null,
                timestamp: Timestamp {
                    seconds: 1,
                    microseconds: 2
                }
            }))
        );
        assert_eq!(
            m[2],
            Ok(Message::Reply(Reply {
                id: Some(json!("x")),
                outcome: Err(QmpError {
                    class: ErrorClass::DeviceNotFound,
                    desc: "Device 'd' not found".into()
                })
            }))
        );
    }

    #[test]
    fn garbage_and_non_objects_are_reported() {
        let mut d = Decoder::new();
        d.push(b"hello\r\n[1]\r\n{\"x\":1}\r\n\r\n{\"error\": 5}\r\n");
        let m = drain(&mut d);
        assert_eq!(m.len(), 4);
        assert!(m
            .iter()
            .all(|r| matches!(r, Err(WireError::Invalid { .. }))));
    }

    #[test]
    fn oversized_message_is_skipped_without_being_held() {
        let mut d = Decoder::with_max_message_size(16);
        d.push(b"{\"return\": \"0123456789");
        assert_eq!(d.buffered(), 0, "the decoder dropped the bytes at once");
        d.push(b"abcdef0123456789\"}\r\n{\"return\": 1}\r\n");
        assert_eq!(
            drain(&mut d),
            vec![
                Err(WireError::Oversized { limit: 16 }),
                Ok(Message::Reply(Reply {
                    id: None,
                    outcome: Ok(json!(1))
                }))
            ]
        );
    }

    #[test]
    fn cut_message_stays_pending() {
        let mut d = Decoder::new();
        d.push(b"{\"return\": {\"half");
        assert!(d.next_message().is_none());
        assert_eq!(d.buffered(), 17);
    }

    #[test]
    fn versions_compare_with_development_snapshots() {
        assert!(QemuVersion::new(7, 2, 17).at_least((7, 1)));
        assert!(!QemuVersion::new(5, 1, 0).at_least((5, 2)));
        assert!(QemuVersion::new(5, 1, 50).at_least((5, 2)));
        assert!(QemuVersion::new(9, 2, 50).at_least((10, 0)));
        assert!(QemuVersion::new(10, 0, 0).at_least((7, 1)));
    }
}
