//! Property tests of the monitor-message decoder and the session: any chunking of a valid
//! stream decodes alike, and any bytes at all end in messages or clear errors with bounded
//! buffering, never a panic.

use proptest::prelude::*;
use qmp_proto::session::{ClientConfig, Handshake, Session};
use qmp_proto::wire::{self, Decoder, Event, Message, QmpError, Reply, Timestamp, WireError};
use qmp_proto::ErrorClass;
use serde_json::{json, Value};

fn drain(decoder: &mut Decoder) -> Vec<Result<Message, WireError>> {
    std::iter::from_fn(|| decoder.next_message()).collect()
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z-]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (json_value(), any::<u32>()).prop_map(|(v, id)| wire::encode_reply(&Reply {
            id: Some(json!(id)),
            outcome: Ok(v),
        })),
        ("[A-Za-z]{1,16}", "\\PC{0,20}", any::<u32>()).prop_map(|(class, desc, id)| {
            wire::encode_reply(&Reply {
                id: Some(json!(id)),
                outcome: Err(QmpError {
                    class: ErrorClass::from(class.as_str()),
                    desc,
                }),
            })
        }),
        ("[A-Z_]{1,20}", json_value(), any::<i32>()).prop_map(|(name, data, s)| {
            wire::encode_event(&Event {
                event: name,
                data,
                timestamp: Timestamp {
                    seconds: i64::from(s),
                    microseconds: 0,
                },
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// However the bytes of a valid stream are cut, the decoder yields the same messages.
    #[test]
    fn chunking_does_not_change_messages(
        messages in prop::collection::vec(message(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let stream: Vec<u8> = messages.concat();
        let mut whole = Decoder::new();
        whole.push(&stream);
        let expected = drain(&mut whole);
        prop_assert_eq!(expected.len(), messages.len());
        prop_assert!(expected.iter().all(Result::is_ok));

        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunked = Decoder::new();
        let mut start = 0;
        for p in points.into_iter().chain([stream.len()]) {
            chunked.push(&stream[start..p]);
            start = p;
        }
        prop_assert_eq!(drain(&mut chunked), expected);
        prop_assert_eq!(chunked.buffered(), 0);
    }

    /// Arbitrary bytes: no panic, and the decoder never holds more than its limit.
    #[test]
    fn arbitrary_bytes_stay_within_the_limit(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..12),
        limit in 1usize..256,
    ) {
        let mut decoder = Decoder::with_max_message_size(limit);
        for chunk in &chunks {
            decoder.push(chunk);
            prop_assert!(decoder.buffered() <= limit);
            for message in drain(&mut decoder) {
                if let Err(WireError::Oversized { limit: l }) = message {
                    prop_assert_eq!(l, limit);
                }
            }
        }
    }

    /// A session fed anything after a valid handshake either keeps working or ends with an
    /// error, after which no call is left waiting; it never panics.
    #[test]
    fn session_survives_arbitrary_server_bytes(
        junk in prop::collection::vec(prop_oneof![
            message(),
            prop::collection::vec(any::<u8>(), 0..64),
        ], 0..8),
    ) {
        let mut session = Session::new(ClientConfig::default().event_buffer(4));
        session.receive(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\r\n");
        let Handshake::Send(_) = session.poll_handshake().unwrap() else { panic!() };
        session.receive(b"{\"return\": {}, \"id\": 0}\r\n");
        prop_assert_eq!(session.poll_handshake().unwrap(), Handshake::Done);
        let sub = session.subscribe(qmp_proto::EventFilter::All);
        let (id, _) = session.start_command("query-status", None, false).unwrap();
        for bytes in &junk {
            session.receive(bytes);
        }
        session.receive(b"\r\n");
        let mut events = 0;
        while let Ok(Some(_)) = session.next_event(sub) {
            events += 1;
        }
        prop_assert!(events <= 4);
        if session.fatal().is_some() {
            prop_assert!(session.take_reply(id).is_some());
        }
    }
}
