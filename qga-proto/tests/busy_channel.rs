//! A channel another client holds: QEMU's chardev socket serves one client at a time, so a
//! connect finds its listen queue full (EAGAIN). Both clients retry within their connect
//! timeout and then say why, instead of "Resource temporarily unavailable (os error 11)".

#![cfg(feature = "tokio")]

use std::time::{Duration, Instant};

use qga_proto::{AsyncClient, Client, ClientConfig, Error};

/// A listening socket that never accepts, with its listen queue filled by idle connections
/// (what a QEMU chardev looks like while libvirt holds it). Returns the connections too: they
/// must stay open.
async fn full_socket(
    path: &std::path::Path,
) -> (tokio::net::UnixListener, Vec<tokio::net::UnixStream>) {
    let listener = tokio::net::UnixListener::bind(path).expect("bind");
    let mut queued = Vec::new();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("unexpected connect error {e}"),
        }
        assert!(queued.len() < 100_000, "the listen queue never filled");
    }
    (listener, queued)
}

fn config() -> ClientConfig {
    ClientConfig::default().connect_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn a_held_channel_is_reported_busy_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let (_listener, _queued) = full_socket(&path).await;

    let started = Instant::now();
    let error = AsyncClient::connect_unix(&path, config())
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, Error::ChannelBusy { .. }), "{error:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    let text = error.to_string();
    assert!(text.contains("is busy"), "{text}");
    assert!(text.contains("serves one client at a time"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");

    // The same through an address, as the facade connects.
    let address = format!("qga+unix://{}", path.display());
    let error = AsyncClient::connect(&address, config()).await.unwrap_err();
    assert!(matches!(error, Error::ChannelBusy { .. }), "{error:?}");

    // The blocking client would wait in the kernel forever; it gives up in time as well.
    let started = Instant::now();
    let error = Client::connect_unix(&path, config()).unwrap_err();
    assert!(matches!(error, Error::ChannelBusy { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_queue_that_frees_up_within_the_timeout_connects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let (listener, queued) = full_socket(&path).await;
    // The other client leaves after 100 ms: its queued connections are accepted and closed.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(queued);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => drop(stream),
                Err(_) => return,
            }
        }
    });
    let config = ClientConfig::default().connect_timeout(Duration::from_secs(5));
    AsyncClient::connect_unix(&path, config)
        .await
        .expect("connects once the queue has room");
}
