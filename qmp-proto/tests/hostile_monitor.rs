//! The blocking client against monitors that misbehave: each scripted server below breaks the
//! protocol one way, and the client must end with a clear error within its bound, never hang,
//! panic or buffer without limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmp_proto::cmd::{BlockExportAdd, BlockExportAddArgs, QueryStatus};
use qmp_proto::{Client, ClientConfig, Error, EventFilter, Monitor, MonitorExt};
use serde_json::Value;

const GREETING_7_2: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// A listening socket whose first connection `script` serves on a thread.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    thread: Option<JoinHandle<Vec<Value>>>,
}

impl Server {
    /// `script` gets the connection and returns the requests it read, for the test to check.
    fn start(script: impl FnOnce(UnixStream) -> Vec<Value> + Send + 'static) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            script(stream)
        });
        Server {
            _dir: dir,
            path,
            thread: Some(thread),
        }
    }

    fn address(&self) -> String {
        format!("qmp+unix://{}", self.path.display())
    }

    fn requests(mut self) -> Vec<Value> {
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Reads one request line.
fn read_request(reader: &mut BufReader<UnixStream>) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).expect("the client sends JSON")),
    }
}

/// Greets, answers `qmp_capabilities`, and hands over the reader and the requests so far.
fn negotiate(
    stream: UnixStream,
    greeting: &str,
) -> (BufReader<UnixStream>, UnixStream, Vec<Value>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer.write_all(greeting.as_bytes()).unwrap();
    let negotiation = read_request(&mut reader).expect("qmp_capabilities");
    assert_eq!(negotiation["execute"], "qmp_capabilities");
    writer
        .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", negotiation["id"]).as_bytes())
        .unwrap();
    (reader, writer, vec![negotiation])
}

fn config() -> ClientConfig {
    ClientConfig::default()
        .handshake_timeout(Duration::from_millis(500))
        .timeout(Duration::from_millis(500))
}

/// Far above every bound the tests set, far below a hang.
const BOUND: Duration = Duration::from_secs(10);

#[test]
fn a_socket_that_never_greets_times_out() {
    let server = Server::start(|stream| {
        // Holds the connection open without a word until the client gives up.
        let mut sink = Vec::new();
        let _ = (&stream).read_to_end(&mut sink);
        Vec::new()
    });
    let started = Instant::now();
    let err = Client::connect(&server.address(), config()).unwrap_err();
    assert!(matches!(err, Error::GreetingTimeout { .. }), "{err}");
    assert!(err.to_string().contains("500 ms"), "{err}");
    assert!(started.elapsed() < BOUND);
    drop(server.requests());
}

#[test]
fn garbage_instead_of_a_greeting_is_a_protocol_error() {
    let server = Server::start(|mut stream| {
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
        std::thread::sleep(Duration::from_millis(200));
        Vec::new()
    });
    let err = Client::connect(&server.address(), config()).unwrap_err();
    match &err {
        Error::Protocol { detail } => assert!(detail.contains("SSH-2.0"), "{detail}"),
        other => panic!("{other}"),
    }
    server.requests();
}

#[test]
fn a_cut_json_object_then_close_is_a_disconnect_naming_the_command() {
    let server = Server::start(|stream| {
        let (mut reader, mut writer, mut seen) = negotiate(stream, GREETING_7_2);
        seen.push(read_request(&mut reader).unwrap());
        let _ = writer.write_all(b"{\"return\": {\"status\": \"runn");
        seen
    });
    let mut client = Client::connect(&server.address(), config()).unwrap();
    let err = client.call::<QueryStatus>(&()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "QEMU monitor connection closed while waiting for the reply to query-status"
    );
    // The connection is over: every later call says so at once.
    assert!(matches!(
        client.execute_raw("query-version", None),
        Err(Error::Disconnected { .. })
    ));
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn a_64_mib_reply_is_refused_without_being_held() {
    let server = Server::start(|stream| {
        let (mut reader, mut writer, mut seen) = negotiate(stream, GREETING_7_2);
        let request = read_request(&mut reader).unwrap();
        let id = request["id"].clone();
        seen.push(request);
        // 64 MiB of one JSON string, written until the client stops reading.
        let _ = writer.write_all(b"{\"return\": \"");
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..64 {
            if writer.write_all(&chunk).is_err() {
                return seen;
            }
        }
        let _ = writer.write_all(format!("\", \"id\": {id}}}\r\n").as_bytes());
        seen
    });
    let mut client = Client::connect(&server.address(), config().timeout(BOUND)).unwrap();
    let started = Instant::now();
    let err = client.execute_raw("query-qmp-schema", None).unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { limit } if limit == 10 << 20),
        "{err}"
    );
    assert!(started.elapsed() < BOUND);
    drop(client);
    server.requests();
}

#[test]
fn an_endless_event_stream_ends_in_a_timeout_and_a_bounded_buffer() {
    let server = Server::start(|stream| {
        let (mut reader, mut writer, mut seen) = negotiate(stream, GREETING_7_2);
        seen.push(read_request(&mut reader).unwrap());
        let event = b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"BLOCK_IO_ERROR\", \"data\": {\"device\": \"d\"}}\r\n";
        while writer.write_all(event).is_ok() {}
        seen
    });
    let mut client = Client::connect(&server.address(), config().event_buffer(16)).unwrap();
    let errors = client
        .subscribe(EventFilter::names(["BLOCK_IO_ERROR"]))
        .unwrap();
    let started = Instant::now();
    let err = client.call::<QueryStatus>(&()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("query-status"), "{err}");
    assert!(started.elapsed() < BOUND);
    // The subscription kept 16 events and counted the rest.
    match client.next_event(errors, Duration::ZERO) {
        Err(Error::EventOverflow {
            capacity: 16,
            dropped,
        }) => assert!(dropped > 0),
        other => panic!("expected an overflow, got {other:?}"),
    }
    for _ in 0..16 {
        let event = client.next_event(errors, Duration::ZERO).unwrap().unwrap();
        assert_eq!(event.event, "BLOCK_IO_ERROR");
    }
    drop(client);
    server.requests();
}

#[test]
fn a_disconnect_in_the_middle_of_a_command() {
    let server = Server::start(|stream| {
        let (mut reader, _writer, mut seen) = negotiate(stream, GREETING_7_2);
        seen.push(read_request(&mut reader).unwrap());
        seen
    });
    let mut client = Client::connect(&server.address(), config().timeout(BOUND)).unwrap();
    let err = client.execute_raw("blockdev-backup", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "QEMU monitor connection closed while waiting for the reply to blockdev-backup"
    );
    server.requests();
}

#[test]
fn a_reply_for_an_id_never_sent_is_a_protocol_error() {
    let server = Server::start(|stream| {
        let (mut reader, mut writer, mut seen) = negotiate(stream, GREETING_7_2);
        seen.push(read_request(&mut reader).unwrap());
        let _ = writer.write_all(b"{\"return\": {}, \"id\": 4711}\r\n");
        std::thread::sleep(Duration::from_millis(200));
        seen
    });
    let mut client = Client::connect(&server.address(), config()).unwrap();
    let err = client.call::<QueryStatus>(&()).unwrap_err();
    match &err {
        Error::Protocol { detail } => assert!(detail.contains("4711"), "{detail}"),
        other => panic!("{other}"),
    }
    server.requests();
}

#[test]
fn commands_newer_than_the_greeting_are_refused_before_sending() {
    let greeting_5_1 = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 1, \"major\": 5}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";
    let server = Server::start(move |stream| {
        let (mut reader, _writer, mut seen) = negotiate(stream, greeting_5_1);
        while let Some(request) = read_request(&mut reader) {
            seen.push(request);
        }
        seen
    });
    let mut client = Client::connect(&server.address(), config()).unwrap();
    let err = client
        .call::<BlockExportAdd>(&BlockExportAddArgs::nbd("e0", "disk0"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "QEMU 5.1.0 predates block-export-add, which QEMU 5.2 added"
    );
    drop(client);
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        1,
        "only qmp_capabilities was sent: {requests:?}"
    );
}

#[test]
fn oob_is_requested_only_when_offered_and_asked_for() {
    for (capabilities, asked, expect) in [
        ("[\"oob\"]", true, true),
        ("[\"oob\"]", false, false),
        ("[]", true, false),
    ] {
        let greeting = format!("{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 0, \"major\": 10}}, \"package\": \"\"}}, \"capabilities\": {capabilities}}}}}\r\n");
        let server = Server::start(move |stream| {
            let (_reader, _writer, seen) = negotiate(stream, &greeting);
            seen
        });
        let client = Client::connect(&server.address(), config().oob(asked)).unwrap();
        assert_eq!(client.oob_enabled(), expect);
        drop(client);
        let negotiation = &server.requests()[0];
        assert_eq!(
            negotiation.get("arguments").is_some(),
            expect,
            "{negotiation}"
        );
    }
}

#[test]
fn a_late_reply_after_a_timeout_is_dropped_and_the_connection_goes_on() {
    let server = Server::start(|stream| {
        let (mut reader, mut writer, mut seen) = negotiate(stream, GREETING_7_2);
        let slow = read_request(&mut reader).unwrap();
        // Answer only once the next request has come, i.e. after the caller gave up.
        let next = read_request(&mut reader).unwrap();
        for request in [&slow, &next] {
            let reply = format!(
                "{{\"return\": {}, \"id\": {}}}\r\n",
                request["execute"], request["id"]
            );
            let _ = writer.write_all(reply.as_bytes());
        }
        seen.push(slow);
        seen.push(next);
        seen
    });
    let mut client = Client::connect(&server.address(), config()).unwrap();
    let err = client
        .execute_with_timeout("query-block", None, Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(!err.is_connection_error());
    // The late reply to query-block comes first and is recognised by its id.
    assert_eq!(
        client.execute_raw("query-status", None).unwrap(),
        Value::from("query-status")
    );
    assert!(client.fatal().is_none());
    drop(client);
    server.requests();
}
