//! The client session fed arbitrary server bytes after a valid handshake, with commands in
//! flight and a small event buffer: no panic, events stay within the buffer, and once the
//! connection has failed every command has an outcome (its reply, or the error), none waits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_proto::session::{ClientConfig, Handshake, Session};
use qmp_proto::EventFilter;

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

fuzz_target!(|data: &[u8]| {
    let mut session = Session::new(
        ClientConfig::default()
            .event_buffer(8)
            .max_message_size(4096)
            .oob(true),
    );
    session.receive(GREETING);
    let Ok(Handshake::Send(_)) = session.poll_handshake() else {
        panic!("no negotiation after a valid greeting")
    };
    session.receive(b"{\"return\": {}, \"id\": 0}\r\n");
    assert!(session.is_ready());
    let subscription = session.subscribe(EventFilter::All);
    let ids: Vec<u64> = ["query-status", "query-block", "query-jobs"]
        .iter()
        .map(|name| session.start_command(name, None, false).unwrap().0)
        .collect();
    for chunk in data.split(|&b| b == 0) {
        session.receive(chunk);
    }
    let mut events = 0;
    loop {
        match session.next_event(subscription) {
            Ok(Some(_)) => events += 1,
            Ok(None) => break,
            Err(qmp_proto::Error::EventOverflow { .. }) => {}
            Err(_) => break,
        }
    }
    assert!(events <= 8);
    if session.fatal().is_some() {
        for id in ids {
            assert!(session.take_reply(id).is_some());
        }
    }
});
