//! The tokio client against scripted monitors: replies out of order reach their own callers,
//! a late reply after a timeout is dropped without harm, a disconnect reaches every waiting
//! caller and every subscription, and events are bounded per subscription.
#![cfg(feature = "tokio")]

use std::sync::Arc;
use std::time::Duration;

use qmp_proto::{AsyncClient, ClientConfig, Error, EventFilter};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 13, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.13+ds-0+deb13u1\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// Accepts one connection, greets, answers the negotiation, then hands over.
async fn serve<F, Fut>(script: F) -> (tempfile::TempDir, String)
where
    F: FnOnce(BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _): (UnixStream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        write.write_all(GREETING).await.unwrap();
        let negotiation = next_request(&mut reader).await.unwrap();
        write
            .write_all(
                format!("{{\"return\": {{}}, \"id\": {}}}\r\n", negotiation["id"]).as_bytes(),
            )
            .await
            .unwrap();
        script(reader, write).await;
    });
    (dir, format!("qmp+unix://{}", path.display()))
}

async fn next_request(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).unwrap()),
    }
}

fn config() -> ClientConfig {
    ClientConfig::default()
        .handshake_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn replies_out_of_order_reach_their_callers() {
    let (_dir, address) = serve(|mut reader, mut write| async move {
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(next_request(&mut reader).await.unwrap());
        }
        // Answer in reverse order, each with its command's name, an event in between.
        for request in requests.iter().rev() {
            let reply = json!({"return": request["execute"], "id": request["id"]});
            write
                .write_all(format!("{reply}\r\n{{\"event\": \"TICK\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\r\n").as_bytes())
                .await
                .unwrap();
        }
        let _ = next_request(&mut reader).await;
    })
    .await;
    let client = Arc::new(AsyncClient::connect(&address, config()).await.unwrap());
    let mut ticks = client
        .subscribe(EventFilter::names(["TICK"]))
        .await
        .unwrap();
    let calls = ["query-a", "query-b", "query-c"].map(|name| {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.execute(name, None, None).await })
    });
    for (call, name) in calls.into_iter().zip(["query-a", "query-b", "query-c"]) {
        assert_eq!(call.await.unwrap().unwrap(), json!(name));
    }
    for _ in 0..3 {
        let tick = ticks.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(tick.event, "TICK");
    }
    assert_eq!(ticks.next(Duration::from_millis(20)).await.unwrap(), None);
}

#[tokio::test]
async fn a_timeout_leaves_the_connection_usable_and_drops_the_late_reply() {
    let (_dir, address) = serve(|mut reader, mut write| async move {
        let slow = next_request(&mut reader).await.unwrap();
        let fast = next_request(&mut reader).await.unwrap();
        // The slow one's answer comes after its caller gave up, then the fast one's.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for request in [slow, fast] {
            let reply = json!({"return": request["execute"], "id": request["id"]});
            write
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
        let _ = next_request(&mut reader).await;
    })
    .await;
    let client = AsyncClient::connect(&address, config()).await.unwrap();
    let slow = client.execute("slow", None, Some(Duration::from_millis(100)));
    let fast = client.execute("fast", None, Some(Duration::from_secs(5)));
    let (slow, fast) = tokio::join!(slow, fast);
    assert!(
        matches!(&slow, Err(Error::Timeout { command, .. }) if command == "slow"),
        "{slow:?}"
    );
    assert_eq!(fast.unwrap(), json!("fast"));
}

#[tokio::test]
async fn a_disconnect_reaches_every_caller_and_subscription() {
    let (_dir, address) = serve(|mut reader, write| async move {
        let _ = next_request(&mut reader).await;
        let _ = next_request(&mut reader).await;
        drop(write);
        drop(reader);
    })
    .await;
    let client = AsyncClient::connect(&address, config()).await.unwrap();
    let mut events = client.subscribe(EventFilter::All).await.unwrap();
    let (a, b) = tokio::join!(
        client.execute("blockdev-backup", None, None),
        client.execute("query-jobs", None, None)
    );
    for (result, name) in [(a, "blockdev-backup"), (b, "query-jobs")] {
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("QEMU monitor connection closed while waiting for the reply to {name}")
        );
    }
    assert!(events.next(Duration::from_secs(5)).await.is_err());
    assert!(matches!(
        client.execute("query-status", None, None).await,
        Err(Error::Disconnected { .. })
    ));
}

#[tokio::test]
async fn an_event_flood_is_bounded_per_subscription() {
    let (_dir, address) = serve(|mut reader, mut write| async move {
        let request = next_request(&mut reader).await.unwrap();
        for i in 0..100 {
            let event = json!({"event": "FLOOD", "data": {"n": i}, "timestamp": {"seconds": 1, "microseconds": 0}});
            write.write_all(format!("{event}\r\n").as_bytes()).await.unwrap();
        }
        let reply = json!({"return": {}, "id": request["id"]});
        write.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
        let _ = next_request(&mut reader).await;
    })
    .await;
    let client = AsyncClient::connect(&address, config().event_buffer(10))
        .await
        .unwrap();
    let mut flood = client
        .subscribe(EventFilter::names(["FLOOD"]))
        .await
        .unwrap();
    client.execute("stop", None, None).await.unwrap();
    match flood.next(Duration::from_secs(1)).await {
        Err(Error::EventOverflow {
            capacity: 10,
            dropped: 90,
        }) => {}
        other => panic!("expected 90 dropped, got {other:?}"),
    }
    for n in 0..10 {
        let event = flood.next(Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(event.data["n"], n);
    }
}
