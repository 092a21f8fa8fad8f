//! One connection, many callers: the async client pipelines requests from concurrent tasks,
//! matches each reply to its caller by id, bounds what is in flight, and keeps every caller's
//! own timeout; a timeout, a garbled or lost reply, or a broken connection gives the callers
//! concerned a clear error and the others their own replies, never someone else's.
#![cfg(feature = "tokio")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use qga_proto::fake::{AgentRelease, FakeAgent, Fault};
use qga_proto::{AsyncClient, ClientConfig, Error, GuestAgent};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

fn quick() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(3))
        .sync_timeout(Duration::from_secs(1))
        .no_reply_grace(Duration::from_millis(100))
}

/// `count` concurrent `guest-sync` calls with distinct ids; each must get its own id back.
async fn echo_storm<A: GuestAgent + ?Sized + 'static>(agent: Arc<A>, count: i64) -> Vec<Error> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let id = 1_000_000 + i;
                match agent.sync(id).await {
                    Ok(echoed) => {
                        assert_eq!(echoed, id, "a caller got another caller's reply");
                        None
                    }
                    Err(e) => Some(e),
                }
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("task"));
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_connection_and_get_their_own_replies() {
    let fake = FakeAgent::linux();
    let agent = Arc::new(fake.clone().connect_async_with(quick()));
    let errors = echo_storm(agent.clone(), 500).await;
    assert!(errors.is_empty(), "{errors:?}");
    // One handshake, one guest-info, then the 500 calls: nothing was resent.
    let requests = fake.state().requests.clone();
    assert_eq!(requests.iter().filter(|r| *r == "guest-sync").count(), 500);
    assert_eq!(
        requests
            .iter()
            .filter(|r| *r == "guest-sync-delimited")
            .count(),
        1
    );
}

/// The test plays the agent: answers the handshake, then collects requests.
struct ScriptedAgent {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
}

impl ScriptedAgent {
    fn new(stream: DuplexStream) -> Self {
        let (read, writer) = tokio::io::split(stream);
        ScriptedAgent {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// The next request (a leading 0xFF dropped), or `None` when none arrives within `wait`.
    async fn request(&mut self, wait: Duration) -> Option<Value> {
        let mut line = Vec::new();
        tokio::time::timeout(wait, self.reader.read_until(b'\n', &mut line))
            .await
            .ok()?
            .expect("read");
        let start = line.iter().position(|&b| b != 0xFF).unwrap_or(line.len());
        Some(serde_json::from_slice(&line[start..]).expect("a JSON request"))
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Answers a `guest-sync` request with its id echoed.
    async fn answer(&mut self, request: &Value) {
        let reply = json!({"return": request["arguments"]["id"], "id": request["id"]});
        self.send(format!("{reply}\n").as_bytes()).await;
    }

    /// Answers the client's `0xFF` + `guest-sync-delimited` like qemu-ga.
    async fn handshake(&mut self) {
        let sync = self
            .request(Duration::from_secs(2))
            .await
            .expect("handshake");
        assert_eq!(sync["execute"], "guest-sync-delimited", "{sync}");
        let id = sync["arguments"]["id"].clone();
        self.send(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n")
            .await;
        self.send(&[0xFF]).await;
        self.send(format!("{{\"return\": {id}}}\n").as_bytes())
            .await;
    }
}

#[tokio::test]
async fn in_flight_requests_are_bounded_and_matched_by_id() {
    let (client_end, agent_end) = tokio::io::duplex(1 << 20);
    let client = Arc::new(AsyncClient::with_config(
        client_end,
        quick().check_capabilities(false).max_in_flight(4),
    ));
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.sync(i).await })
        })
        .collect();
    let mut agent = ScriptedAgent::new(agent_end);
    agent.handshake().await;

    // While it is unknown whether the agent echoes ids: one request at a time.
    let first = agent
        .request(Duration::from_secs(2))
        .await
        .expect("first request");
    assert!(first["id"].is_u64(), "requests are numbered: {first}");
    assert!(agent.request(Duration::from_millis(200)).await.is_none());
    agent.answer(&first).await;
    // Ids echoed: 4 at once, no more until one is answered.
    let mut window = std::collections::VecDeque::new();
    for _ in 0..4 {
        window.push_back(
            agent
                .request(Duration::from_secs(2))
                .await
                .expect("request"),
        );
    }
    assert!(
        agent.request(Duration::from_millis(200)).await.is_none(),
        "more than max_in_flight requests on the wire"
    );
    // Answer in order of arrival, as the agent does; each answer lets one more in.
    for answered in 1..10 {
        let request = window.pop_front().expect("a request in flight");
        agent.answer(&request).await;
        if answered + window.len() < 9 {
            window.push_back(
                agent
                    .request(Duration::from_secs(2))
                    .await
                    .expect("request"),
            );
        }
        assert!(window.len() <= 4);
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.expect("task").expect("reply"), i as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_caller_does_not_cost_the_others_their_replies() {
    let fake = FakeAgent::linux();
    let client = Arc::new(fake.clone().connect_async_with(quick()));
    client.ping().await.expect("first call syncs");
    // The agent stalls 800 ms on guest-get-users; everything behind it waits too.
    fake.fault_on("guest-get-users", Fault::Delay(Duration::from_millis(800)));
    let impatient = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .execute("guest-get-users", None, Some(Duration::from_millis(300)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let patient = echo_storm(client.clone(), 50).await;
    assert!(patient.is_empty(), "{patient:?}");
    let err = impatient.await.expect("task").unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // The timeout resynchronised the channel behind the calls in flight.
    assert!(
        fake.state()
            .requests
            .iter()
            .filter(|r| *r == "guest-sync-delimited")
            .count()
            >= 2
    );
    assert_eq!(
        client.host_name().await.expect("usable").host_name,
        "fake-guest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_or_lost_reply_fails_only_its_caller() {
    for fault in [
        Fault::ReplaceReply(b"{\"return\": garbage\n".to_vec()),
        Fault::DropReply,
    ] {
        let fake = FakeAgent::linux();
        let client = Arc::new(fake.clone().connect_async_with(quick()));
        client.ping().await.expect("first call syncs");
        fake.fault_on("guest-get-timezone", fault.clone());
        let victim = {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (client.timezone().await, started.elapsed())
            })
        };
        let others = echo_storm(client.clone(), 100).await;
        assert!(others.is_empty(), "{fault:?}: {others:?}");
        let (result, waited) = victim.await.expect("task");
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{fault:?}: {err}");
        assert!(err.to_string().contains("guest-get-timezone"), "{err}");
        // Known as soon as a later reply arrived, not at the timeout.
        assert!(waited < Duration::from_secs(2), "{fault:?}: {waited:?}");
        assert_eq!(client.timezone().await.expect("usable").offset, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_goes_to_its_caller_alone() {
    let fake = FakeAgent::linux();
    fake.state()
        .files
        .insert("/big".into(), vec![b'x'; 64 * 1024]);
    let client = Arc::new(
        fake.clone()
            .connect_async_with(quick().max_reply_size(16 * 1024)),
    );
    let handle = client.file_open("/big", None).await.expect("open");
    let big = {
        let client = client.clone();
        tokio::spawn(async move { client.file_read(handle, Some(64 * 1024)).await })
    };
    let others = echo_storm(client.clone(), 50).await;
    assert!(others.is_empty(), "{others:?}");
    let err = big.await.expect("task").unwrap_err();
    assert!(
        matches!(err, Error::ReplyTooLarge { limit: 16384 }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_ends_the_calls_in_flight_and_the_next_reconnects() {
    let fake = FakeAgent::linux();
    let client = Arc::new(fake.clone().connect_async_with(quick()));
    client.ping().await.expect("first call syncs");
    fake.fault_on("guest-get-vcpus", Fault::Disconnect);
    let doomed = {
        let client = client.clone();
        tokio::spawn(async move { client.vcpus().await })
    };
    let err = doomed.await.expect("task").unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");
    let errors = echo_storm(client.clone(), 50).await;
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_leave_the_others_alone() {
    let fake = FakeAgent::linux();
    let client = Arc::new(fake.clone().connect_async_with(quick()));
    client.ping().await.expect("first call syncs");
    fake.fault_on(
        "guest-get-host-name",
        Fault::Delay(Duration::from_millis(200)),
    );
    let cancelled = tokio::time::timeout(Duration::from_millis(20), client.host_name()).await;
    assert!(cancelled.is_err());
    // The cancelled call's reply comes later and is nobody's.
    let errors = echo_storm(client.clone(), 50).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        client.timezone().await.expect("usable").zone.as_deref(),
        Some("UTC")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_refuses_ids_is_served_one_request_at_a_time() {
    // qemu-ga 2.11 refuses a request id: the client notices and sends plain requests.
    let fake = FakeAgent::linux_release(AgentRelease::Qemu2_11);
    let client = Arc::new(fake.clone().connect_async_with(quick()));
    let errors = echo_storm(client.clone(), 100).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(client.info().await.expect("info").version, "2.11.1");
    // Refused once (the probe), then never again.
    let refused = fake
        .state()
        .requests
        .iter()
        .filter(|r| *r == "guest-info")
        .count();
    assert!(refused <= 3, "guest-info sent {refused} times");
}
