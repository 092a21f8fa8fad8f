//! Desync suite: the same channel faults against the real qemu-ga of both generations (7.2 on
//! the machine, 10.0 in the Debian 13 root) and the fake agent built as each release. Every
//! scenario ends with the client usable again or a clear error, never a hang.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use qga_proto::fake::{AgentRelease, FakeAgent, Fault};
use qga_proto::{AsyncClient, BoxedStream, ClientConfig, Error, ErrorClass, GuestAgent};
use tokio::io::AsyncWriteExt;
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qga::{QemuGa, BLOCKED_RPCS};

fn config() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(2))
        .sync_timeout(Duration::from_millis(700))
        .sync_attempts(1)
        .no_reply_grace(Duration::from_millis(200))
}

/// Upper bound for any single call in this suite: a hang guard, not a benchmark.
const HANG_GUARD: Duration = Duration::from_secs(15);

type Connect = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<BoxedStream>> + Send>> + Send + Sync,
>;

/// One end of the agent channel, real or fake.
enum Peer {
    Real(QemuGa),
    Fake(FakeAgent),
}

impl Peer {
    fn connector(&self) -> Connect {
        match self {
            Peer::Real(qga) => {
                let socket = qga.socket();
                Box::new(move || {
                    let socket = socket.clone();
                    Box::pin(async move {
                        Ok(Box::new(tokio::net::UnixStream::connect(socket).await?) as BoxedStream)
                    })
                })
            }
            Peer::Fake(fake) => {
                let fake = fake.clone();
                Box::new(move || {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let agent = fake.clone();
                    tokio::spawn(async move { agent.serve_async(server).await });
                    Box::pin(async move { Ok(Box::new(client) as BoxedStream) })
                })
            }
        }
    }

    async fn raw(&self) -> BoxedStream {
        (self.connector())().await.expect("connect to agent")
    }

    fn client(&self, stream: BoxedStream, config: ClientConfig) -> AsyncClient<BoxedStream> {
        let connect = self.connector();
        AsyncClient::with_config(stream, config).with_reconnect(connect)
    }

    fn name(&self) -> &'static str {
        match self {
            Peer::Real(_) => "qemu-ga",
            Peer::Fake(_) => "fake",
        }
    }

    /// Makes the agent stop answering (SIGSTOP for the real one, a long delay
    /// for the fake).
    fn freeze(&self) {
        match self {
            Peer::Real(qga) => qga.signal("STOP"),
            Peer::Fake(fake) => {
                fake.fault(Fault::Delay(Duration::from_millis(1500)));
            }
        }
    }

    fn thaw(&self) {
        if let Peer::Real(qga) = self {
            qga.signal("CONT");
        }
    }

    fn after_scenario(&mut self) {
        if let Peer::Real(qga) = self {
            qga.ensure_running();
        }
    }
}

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

async fn assert_usable(peer: &str, client: &AsyncClient<BoxedStream>) {
    bounded("ping", client.ping())
        .await
        .unwrap_or_else(|e| panic!("{peer}: client unusable: {e}"));
    let host = bounded("host-name", client.host_name())
        .await
        .unwrap_or_else(|e| panic!("{peer}: {e}"));
    assert!(!host.host_name.is_empty());
}

/// What `release` answers to a command its administrator disabled.
fn disabled_reply(release: AgentRelease, command: &str) -> (ErrorClass, String) {
    match release {
        AgentRelease::Qemu2_11 => (
            ErrorClass::GenericError,
            format!("The command {command} has been disabled for this instance"),
        ),
        AgentRelease::Qemu7_2 => (
            ErrorClass::CommandNotFound,
            format!("Command {command} has been disabled"),
        ),
        _ => (
            ErrorClass::CommandNotFound,
            format!("Command {command} has been disabled: the command is not allowed"),
        ),
    }
}

fn release_of(version: &str) -> AgentRelease {
    if version.starts_with("7.2") {
        AgentRelease::Qemu7_2
    } else if version.starts_with("10.0") {
        AgentRelease::Qemu10_0
    } else {
        panic!("no release known for qemu-ga {version}")
    }
}

async fn run_suite(mut peer: Peer, release: AgentRelease) {
    let name = peer.name();

    // 1. Half a request left by an earlier client.
    let mut raw = peer.raw().await;
    raw.write_all(b"{\"execute\": \"guest-get-osi")
        .await
        .unwrap();
    let client = peer.client(raw, config());
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();

    // 2. A stray 0xFF (the agent answers it with a parse error line).
    let mut raw = peer.raw().await;
    raw.write_all(&[0xFF]).await.unwrap();
    let client = peer.client(raw, config());
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();

    // 3. A reply an earlier client never read.
    let mut raw = peer.raw().await;
    raw.write_all(b"{\"execute\":\"guest-info\"}\n{\"execute\":\"guest-get-osinfo\"}")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = peer.client(raw, config());
    let info = bounded("info", client.info()).await.unwrap();
    assert!(!info.version.is_empty());
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();

    // 4. An agent that does not answer: a bounded, clear error; usable once it answers again.
    let client = peer.client(peer.raw().await, config());
    assert_usable(name, &client).await;
    client.resync().await.unwrap();
    peer.freeze();
    let started = Instant::now();
    let err = bounded("frozen agent", client.resync()).await.unwrap_err();
    assert!(matches!(err, Error::SyncTimeout { .. }), "{name}: {err}");
    assert!(err.to_string().contains("is qemu-ga running in the guest?"));
    assert!(started.elapsed() < HANG_GUARD);
    peer.thaw();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();

    // 5. The agent restarts in the middle of a call.
    let client = peer.client(peer.raw().await, config());
    assert_usable(name, &client).await;
    match &mut peer {
        Peer::Real(qga) => {
            qga.signal("STOP");
            let call = client.host_name();
            let restart = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                qga.restart();
            };
            let (result, ()) =
                bounded("call during restart", async { tokio::join!(call, restart) }).await;
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::Disconnected { .. } | Error::Timeout { .. }),
                "{name}: {err}"
            );
        }
        Peer::Fake(fake) => {
            fake.fault_on("guest-get-host-name", Fault::Disconnect);
            let err = bounded("call during restart", client.host_name())
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Disconnected { .. }), "{name}: {err}");
        }
    }
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();

    // 6. A disabled command: refused locally, or the agent's own error when checks are off.
    // A read-only command the test agents block (2.11 predates it: the fake alone runs as
    // 2.11, so a state-changing one stands in there).
    let (disabled, args) = if release == AgentRelease::Qemu2_11 {
        ("guest-set-time", serde_json::json!({}))
    } else {
        (
            "guest-ssh-get-authorized-keys",
            serde_json::json!({"username": "nobody"}),
        )
    };
    let client = peer.client(peer.raw().await, config());
    let err = bounded("disabled", client.execute_raw(disabled, Some(args.clone())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::CommandDisabled { .. }),
        "{name}: {err}"
    );
    assert_usable(name, &client).await;
    drop(client);
    let client = peer.client(peer.raw().await, config().check_capabilities(false));
    let err = bounded("disabled", client.execute_raw(disabled, Some(args)))
        .await
        .unwrap_err();
    match &err {
        Error::Agent { class, desc } => {
            assert_eq!(
                (class.clone(), desc.clone()),
                disabled_reply(release, disabled)
            );
        }
        other => panic!("{name}: {other}"),
    }
    assert!(err.is_unsupported());
    assert_usable(name, &client).await;

    // 7. An unknown command.
    let err = bounded("unknown", client.execute_raw("guest-no-such-command", None))
        .await
        .unwrap_err();
    assert_eq!(
        err.class(),
        Some(&ErrorClass::CommandNotFound),
        "{name}: {err}"
    );
    assert!(err
        .to_string()
        .ends_with("The command guest-no-such-command has not been found"));
    drop(client);
    let client = peer.client(peer.raw().await, config());
    let err = bounded("unknown", client.execute_raw("guest-no-such-command", None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::CommandNotSupported { .. }),
        "{name}: {err}"
    );
    assert_usable(name, &client).await;
    drop(client);
    peer.after_scenario();
}

fn fake_like_the_test_agent(release: AgentRelease) -> FakeAgent {
    let fake = FakeAgent::linux_release(release);
    for rpc in BLOCKED_RPCS {
        fake.state().disable(rpc);
    }
    fake
}

#[tokio::test]
async fn desync_suite_against_the_fake() {
    for &release in AgentRelease::ALL {
        eprintln!("fake {release}");
        run_suite(Peer::Fake(fake_like_the_test_agent(release)), release).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn desync_suite_against_qemu_ga() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        runtime().block_on(async {
            let probe = AsyncClient::connect_unix(qga.socket(), config())
                .await
                .expect("connect");
            let release = release_of(&probe.info().await.expect("guest-info").version);
            probe.close().await;
            run_suite(Peer::Real(qga), release).await;
        });
    });
}

#[test]
fn blocking_client_recovers_on_a_dirty_channel_of_qemu_ga() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        blocking_recovery(&qga);
    });
}

fn blocking_recovery(qga: &QemuGa) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use qga_proto::cmd;
    use qga_proto::Client;

    // An earlier client left half a request, an unread reply and a stray 0xFF.
    let mut raw = UnixStream::connect(qga.socket()).expect("connect");
    raw.write_all(b"{\"execute\":\"guest-info\"}\n{\"execute\": \"guest-get-ti")
        .expect("write");
    raw.write_all(&[0xFF]).expect("write");
    std::thread::sleep(Duration::from_millis(100));
    let mut client = Client::with_config(raw, config());
    let host = client
        .call::<cmd::GuestGetHostName>(&())
        .expect("usable after resync");
    assert!(!host.host_name.is_empty());

    // A stopped agent: a bounded SyncTimeout, then usable once it runs again.
    qga.signal("STOP");
    let started = Instant::now();
    let err = client.resync().unwrap_err();
    assert!(matches!(err, Error::SyncTimeout { .. }), "{err}");
    assert!(started.elapsed() < HANG_GUARD);
    qga.signal("CONT");
    client
        .call::<cmd::GuestPing>(&())
        .expect("usable after the agent resumed");
    assert_eq!(
        client
            .call::<cmd::GuestSync>(&cmd::GuestSyncArgs { id: 31337 })
            .expect("sync"),
        31337
    );
}

/// qemu-ga 7.2 exits when a client closes with replies unread; closing a
/// client after a timed-out call reads the late replies first.
#[test]
fn closing_after_a_timeout_keeps_qemu_ga_alive() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        runtime().block_on(close_after_timeout(qga));
    });
}

async fn close_after_timeout(mut qga: QemuGa) {
    use qga_proto::Client;

    let short = config().timeout(Duration::from_millis(300));

    let client = AsyncClient::connect_unix(qga.socket(), short.clone())
        .await
        .expect("connect");
    client.ping().await.expect("ping");
    qga.signal("STOP");
    let err = client.host_name().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    qga.signal("CONT");
    client.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        qga.is_running(),
        "qemu-ga exited after the async client closed; log:\n{}",
        qga.log()
    );

    // A plain drop inside a runtime drains in the background.
    let client = AsyncClient::connect_unix(qga.socket(), short.clone())
        .await
        .expect("connect");
    client.ping().await.expect("ping");
    qga.signal("STOP");
    assert!(matches!(
        client.host_name().await,
        Err(Error::Timeout { .. })
    ));
    qga.signal("CONT");
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        qga.is_running(),
        "qemu-ga exited after the async client was dropped; log:\n{}",
        qga.log()
    );

    let mut client = Client::connect_unix(qga.socket(), short).expect("connect");
    client.execute_raw("guest-ping", None).expect("ping");
    qga.signal("STOP");
    assert!(matches!(
        client.execute_raw("guest-get-host-name", None),
        Err(Error::Timeout { .. })
    ));
    qga.signal("CONT");
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        qga.is_running(),
        "qemu-ga exited after the blocking client closed; log:\n{}",
        qga.log()
    );
}
