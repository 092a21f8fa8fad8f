//! Property tests of the sans-I/O decoder and encoder.

use proptest::prelude::*;
use qga_proto::wire::{encode_request_value, Decoder, Frame, Reply, SENTINEL};
use qga_proto::ErrorClass;
use serde_json::{Map, Value};

fn frames_of(chunks: &[&[u8]], limit: usize) -> Vec<Frame> {
    let mut d = Decoder::with_max_reply_size(limit);
    let mut out = Vec::new();
    for c in chunks {
        d.push(c);
        while let Some(f) = d.next_frame() {
            out.push(f);
        }
        assert!(
            d.buffered() <= limit,
            "decoder holds {} bytes with a limit of {limit}",
            d.buffered()
        );
    }
    out
}

/// Splits `data` at the given cut points.
fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points {
        out.push(&data[start..p]);
        start = p;
    }
    out.push(&data[start..]);
    out
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[\\PC\u{FFFD}\n\"\\\\]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z-]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn reply() -> impl Strategy<Value = Reply> {
    let outcome = prop_oneof![
        json_value().prop_map(Ok),
        ("[A-Za-z]{1,16}", "\\PC{0,40}").prop_map(|(class, desc)| Err(
            qga_proto::wire::AgentError {
                class: ErrorClass::from(class.as_str()),
                desc
            }
        )),
    ];
    (prop::option::of(json_value()), outcome).prop_map(|(id, outcome)| Reply { id, outcome })
}

fn encode_reply(r: &Reply) -> Vec<u8> {
    let mut obj = Map::new();
    match &r.outcome {
        Ok(v) => {
            obj.insert("return".into(), v.clone());
        }
        Err(e) => {
            obj.insert(
                "error".into(),
                serde_json::json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    if let Some(id) = &r.id {
        obj.insert("id".into(), id.clone());
    }
    let mut line = serde_json::to_vec(&Value::Object(obj)).unwrap();
    line.push(b'\n');
    line
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any bytes in any chunking: no panic, bounded buffer, and the same
    /// frames as when fed in one piece.
    #[test]
    fn any_bytes_any_chunking(data in prop::collection::vec(any::<u8>(), 0..2048),
                              cuts in prop::collection::vec(any::<usize>(), 0..16),
                              limit in 1usize..512) {
        let whole = frames_of(&[&data], limit);
        let pieces = split(&data, &cuts);
        let chunked = frames_of(&pieces, limit);
        prop_assert_eq!(whole, chunked);
    }

    /// Replies encoded as the agent does decode to themselves, whatever the
    /// chunking, also after a sentinel and garbage.
    #[test]
    fn replies_round_trip(replies in prop::collection::vec(reply(), 1..8),
                          garbage in prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..64),
                          cuts in prop::collection::vec(any::<usize>(), 0..16)) {
        let mut bytes = garbage.clone();
        bytes.push(SENTINEL);
        for r in &replies {
            bytes.extend(encode_reply(r));
        }
        let pieces = split(&bytes, &cuts);
        let frames = frames_of(&pieces, 1 << 20);
        let pos = frames.iter().rposition(|f| *f == Frame::Delimiter).expect("delimiter");
        let decoded: Vec<Frame> = frames[pos + 1..].to_vec();
        let expected: Vec<Frame> = replies.into_iter().map(Frame::Reply).collect();
        prop_assert_eq!(decoded, expected);
    }

    /// Requests parse back to what was encoded.
    #[test]
    fn requests_round_trip(name in "[a-z-]{1,30}",
                           args in prop::collection::btree_map("[a-z-]{1,8}", json_value(), 0..5),
                           id in prop::option::of(json_value())) {
        let args = Value::Object(args.into_iter().collect());
        let bytes = encode_request_value(&name, &args, id.as_ref()).unwrap();
        prop_assert_eq!(bytes.last(), Some(&b'\n'));
        prop_assert!(!bytes.contains(&SENTINEL));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&v["execute"], &Value::String(name));
        if args.as_object().is_some_and(|m| !m.is_empty()) {
            prop_assert_eq!(&v["arguments"], &args);
        } else {
            prop_assert!(v.get("arguments").is_none());
        }
        prop_assert_eq!(v.get("id"), id.as_ref());
    }
}
