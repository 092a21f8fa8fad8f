//! Sans-I/O framing of the guest agent protocol.
//!
//! Requests are JSON objects; [`encode_request`] writes one per line.
//! Replies are one JSON object per line; the reply to `guest-sync-delimited`
//! is preceded by a single `0xFF` byte, which never occurs in UTF-8 JSON and
//! therefore marks a point where the reader can drop whatever partial or
//! stale data it holds. [`Decoder`] turns bytes, in whatever chunks they
//! arrive, into [`Frame`]s and never holds more than the configured reply
//! size limit plus one chunk.
//!
//! ```
//! use qga_proto::wire::{Decoder, Frame};
//!
//! let mut decoder = Decoder::new();
//! // The agent answers a stray 0xFF with a parse error, then the sentinel reply.
//! for chunk in [&b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON pa"[..],
//!               &b"rse error\"}}\n\xff{\"return\": 42}\n"[..]] {
//!     decoder.push(chunk);
//! }
//! assert!(matches!(decoder.next_frame(), Some(Frame::Reply(r)) if r.outcome.is_err()));
//! assert_eq!(decoder.next_frame(), Some(Frame::Delimiter));
//! match decoder.next_frame() {
//!     Some(Frame::Reply(r)) => assert_eq!(r.outcome, Ok(serde_json::json!(42))),
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(decoder.next_frame(), None);
//! ```

use std::collections::VecDeque;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, ErrorClass};

/// The sentinel byte of `guest-sync-delimited`.
pub const SENTINEL: u8 = 0xFF;

/// Default limit for one reply line: 10 MiB, as libvirt uses.
pub const DEFAULT_MAX_REPLY_SIZE: usize = 10 * 1024 * 1024;

/// Longest excerpt of a bad line kept in [`Frame::Invalid`].
const EXCERPT_LEN: usize = 200;

/// Encodes one request: `{"execute":NAME,"arguments":ARGS,"id":ID}` and a newline.
///
/// `arguments` is left out when `args` serialises to `null` (the `()` of
/// commands without arguments) or to an empty object.
pub fn encode_request<A: Serialize + ?Sized>(
    name: &str,
    args: &A,
    id: Option<&Value>,
) -> Result<Vec<u8>, Error> {
    let args = serde_json::to_value(args).map_err(|source| Error::Encode {
        command: name.to_owned(),
        source,
    })?;
    encode_request_value(name, &args, id)
}

/// Like [`encode_request`] for arguments that are already a JSON value.
pub fn encode_request_value(
    name: &str,
    args: &Value,
    id: Option<&Value>,
) -> Result<Vec<u8>, Error> {
    let encode_err = |source| Error::Encode {
        command: name.to_owned(),
        source,
    };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"execute\":");
    serde_json::to_writer(&mut out, name).map_err(encode_err)?;
    match args {
        Value::Null => {}
        Value::Object(map) if map.is_empty() => {}
        Value::Object(_) => {
            out.extend_from_slice(b",\"arguments\":");
            serde_json::to_writer(&mut out, args).map_err(encode_err)?;
        }
        other => {
            return Err(Error::Protocol {
                detail: format!(
                    "arguments of {name} must be a JSON object, not {}",
                    json_kind(other)
                ),
            })
        }
    }
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        serde_json::to_writer(&mut out, id).map_err(encode_err)?;
    }
    out.extend_from_slice(b"}\n");
    Ok(out)
}

/// Encodes the synchronisation request: a `0xFF` byte (so the agent drops any
/// half-received request of an earlier client) followed by
/// `guest-sync-delimited` with `id`.
pub fn encode_sync_delimited(id: i64) -> Vec<u8> {
    let mut out = vec![SENTINEL];
    out.extend_from_slice(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
            .as_bytes(),
    );
    out
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An error object sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentError {
    /// QAPI error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Self {
        Error::Agent {
            class: e.class,
            desc: e.desc,
        }
    }
}

/// One reply line.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The request's `id`, echoed by the agent when the request had one.
    pub id: Option<Value>,
    /// `return` value or `error` object.
    pub outcome: Result<Value, AgentError>,
}

/// What the decoder found in the byte stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// A `0xFF` sentinel: everything before it was dropped; the reply to
    /// `guest-sync-delimited` follows.
    Delimiter,
    /// A well-formed reply line.
    Reply(Reply),
    /// A line that is not a reply (not JSON, or JSON without `return`/`error`).
    Invalid {
        /// Start of the line, lossily decoded.
        excerpt: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A line longer than the limit; its bytes were discarded up to the next
    /// newline or sentinel.
    Oversized {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// Streaming reply decoder. Feed bytes with [`push`](Decoder::push), take
/// frames with [`next_frame`](Decoder::next_frame).
#[derive(Debug, Clone)]
pub struct Decoder {
    line: Vec<u8>,
    frames: VecDeque<Frame>,
    max_reply_size: usize,
    /// Set while skipping the rest of an oversized line.
    discarding: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder with the default 10 MiB reply limit.
    pub fn new() -> Self {
        Decoder::with_max_reply_size(DEFAULT_MAX_REPLY_SIZE)
    }

    /// A decoder that rejects reply lines longer than `limit` bytes.
    pub fn with_max_reply_size(limit: usize) -> Self {
        Decoder {
            line: Vec::new(),
            frames: VecDeque::new(),
            max_reply_size: limit.max(1),
            discarding: false,
        }
    }

    /// The reply size limit.
    pub fn max_reply_size(&self) -> usize {
        self.max_reply_size
    }

    /// Drops all buffered bytes and frames (after a reconnect).
    pub fn reset(&mut self) {
        self.line.clear();
        self.frames.clear();
        self.discarding = false;
    }

    /// Bytes of an incomplete line currently held.
    pub fn buffered(&self) -> usize {
        self.line.len()
    }

    /// Feeds bytes received from the agent.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let stop = data.iter().position(|&b| b == b'\n' || b == SENTINEL);
            let (chunk, delimiter) = match stop {
                Some(i) => (&data[..i], Some(data[i])),
                None => (data, None),
            };
            if !self.discarding {
                if self.line.len() + chunk.len() > self.max_reply_size {
                    self.line.clear();
                    self.discarding = true;
                    self.frames.push_back(Frame::Oversized {
                        limit: self.max_reply_size,
                    });
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            match delimiter {
                Some(b'\n') => {
                    if !self.discarding {
                        let line = std::mem::take(&mut self.line);
                        if let Some(frame) = parse_line(&line) {
                            self.frames.push_back(frame);
                        }
                    }
                    self.discarding = false;
                }
                Some(_) => {
                    // The sentinel resets the parser: whatever partial line came
                    // before it is stale by definition.
                    self.line.clear();
                    self.discarding = false;
                    self.frames.push_back(Frame::Delimiter);
                }
                None => {}
            }
            data = match stop {
                Some(i) => &data[i + 1..],
                None => &[],
            };
        }
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }
}

fn excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(EXCERPT_LEN)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Parses one complete line; blank lines yield nothing.
fn parse_line(line: &[u8]) -> Option<Frame> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    let invalid = |reason: String| {
        Some(Frame::Invalid {
            excerpt: excerpt(trimmed),
            reason,
        })
    };
    let value: Value = match serde_json::from_slice(trimmed) {
        Ok(v) => v,
        Err(e) => return invalid(format!("not JSON: {e}")),
    };
    let Value::Object(mut map) = value else {
        return invalid("not a JSON object".to_owned());
    };
    let id = map.remove("id");
    if let Some(ret) = map.remove("return") {
        return Some(Frame::Reply(Reply {
            id,
            outcome: Ok(ret),
        }));
    }
    match map.remove("error") {
        Some(Value::Object(err)) => {
            let class = match err.get("class") {
                Some(Value::String(c)) => ErrorClass::from(c.as_str()),
                _ => ErrorClass::GenericError,
            };
            let desc = match err.get("desc") {
                Some(Value::String(d)) => d.clone(),
                _ => String::new(),
            };
            Some(Frame::Reply(Reply {
                id,
                outcome: Err(AgentError { class, desc }),
            }))
        }
        Some(_) => invalid("'error' is not an object".to_owned()),
        None => invalid("neither 'return' nor 'error'".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(d: &mut Decoder) -> Vec<Frame> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn encodes_without_arguments_and_with_id() {
        assert_eq!(
            encode_request("guest-ping", &(), None).unwrap(),
            b"{\"execute\":\"guest-ping\"}\n"
        );
        let with_id = encode_request("guest-ping", &(), Some(&json!("abc-1"))).unwrap();
        assert_eq!(with_id, b"{\"execute\":\"guest-ping\",\"id\":\"abc-1\"}\n");
    }

    #[test]
    fn encodes_sync_with_leading_sentinel() {
        let bytes = encode_sync_delimited(123456789);
        assert_eq!(bytes[0], 0xFF);
        let v: Value = serde_json::from_slice(&bytes[1..]).unwrap();
        assert_eq!(
            v,
            json!({"execute": "guest-sync-delimited", "arguments": {"id": 123456789}})
        );
    }

    #[test]
    fn rejects_non_object_arguments() {
        assert!(encode_request("guest-ping", &5, None).is_err());
    }

    #[test]
    fn probe_transcript_of_flush_and_sync_decodes() {
        // Recorded from qemu-ga 7.2.22 (probe-7.2-basic.txt).
        let bytes = b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": 123456789}\n";
        let mut d = Decoder::new();
        d.push(bytes);
        let f = frames(&mut d);
        assert_eq!(f.len(), 3);
        assert!(matches!(
            &f[0],
            Frame::Reply(Reply {
                outcome: Err(AgentError {
                    class: ErrorClass::GenericError,
                    ..
                }),
                ..
            })
        ));
        assert_eq!(f[1], Frame::Delimiter);
        assert_eq!(
            f[2],
            Frame::Reply(Reply {
                id: None,
                outcome: Ok(json!(123456789))
            })
        );
    }

    #[test]
    fn sentinel_discards_partial_line() {
        let mut d = Decoder::new();
        d.push(b"{\"return\": {\"half");
        d.push(b"\xff{\"return\": 1}\n");
        assert_eq!(
            frames(&mut d),
            vec![
                Frame::Delimiter,
                Frame::Reply(Reply {
                    id: None,
                    outcome: Ok(json!(1))
                })
            ]
        );
    }

    #[test]
    fn echoes_id_and_two_replies_per_chunk() {
        let mut d = Decoder::new();
        d.push(b"{\"return\": {}, \"id\": 1}\n{\"return\": {}, \"id\": 2}\n");
        let f = frames(&mut d);
        assert_eq!(f.len(), 2);
        assert!(matches!(&f[1], Frame::Reply(Reply { id: Some(v), .. }) if v == &json!(2)));
    }

    #[test]
    fn oversized_line_is_skipped_and_decoding_resumes() {
        let mut d = Decoder::with_max_reply_size(16);
        d.push(b"{\"return\": \"0123456789abcdef\"}\n{\"return\": 1}\n");
        assert_eq!(
            frames(&mut d),
            vec![
                Frame::Oversized { limit: 16 },
                Frame::Reply(Reply {
                    id: None,
                    outcome: Ok(json!(1))
                })
            ]
        );
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn garbage_is_reported_not_fatal() {
        let mut d = Decoder::new();
        d.push(b"hello\n[1]\n{\"x\":1}\n\n{\"return\":2}\n");
        let f = frames(&mut d);
        assert_eq!(f.len(), 4);
        assert!(matches!(f[0], Frame::Invalid { .. }));
        assert!(matches!(f[1], Frame::Invalid { .. }));
        assert!(matches!(f[2], Frame::Invalid { .. }));
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let bytes = b"{\"return\": {\"a\": [1, 2]}}\n\xff{\"return\": 5}\n{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}\n";
        let mut whole = Decoder::new();
        whole.push(bytes);
        let mut single = Decoder::new();
        for b in bytes {
            single.push(std::slice::from_ref(b));
        }
        assert_eq!(frames(&mut whole), frames(&mut single));
    }
}
