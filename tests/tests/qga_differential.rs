//! Differential test: the fake agent built as a release (`FakeAgent::linux_release`) against the
//! real qemu-ga of that release — Debian 12's 7.2 on the machine, Debian 13's 10.0 in the peer
//! root. Same command table (guest-info), same result shapes, error classes and error texts,
//! same answers to malformed request envelopes. This is what keeps each fake release honest.

use std::time::Duration;

use qga_proto::fake::{AgentRelease, FakeAgent};
use qga_proto::types::GuestAgentInfo;
use qga_proto::{AsyncClient, ClientConfig, GuestAgent};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qga::{QemuGa, BLOCKED_RPCS};

const SAMPLE: &[u8] = b"hello qga test file\n";

fn release_of(version: &str) -> AgentRelease {
    if version.starts_with("7.2") {
        AgentRelease::Qemu7_2
    } else if version.starts_with("10.0") {
        AgentRelease::Qemu10_0
    } else {
        panic!("no fake release for qemu-ga {version}")
    }
}

/// A result reduced to what must agree between agents: the JSON shape of a
/// return value (object keys, value kinds) or the error class and text.
fn shape(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(_) => "number".into(),
        Value::String(_) => "string".into(),
        Value::Array(a) => format!("array[{}]", a.first().map(shape).unwrap_or_default()),
        Value::Object(m) => {
            let mut keys: Vec<String> =
                m.iter().map(|(k, v)| format!("{k}:{}", shape(v))).collect();
            keys.sort();
            format!("{{{}}}", keys.join(","))
        }
    }
}

fn outcome(r: qga_proto::Result<Value>, exact: bool) -> String {
    match r {
        Ok(v) if exact => format!("ok {v}"),
        Ok(v) => format!("ok {}", shape(&v)),
        Err(qga_proto::Error::Agent { class, desc }) => format!("err {class}: {desc}"),
        Err(e) => panic!("channel error in the differential session: {e}"),
    }
}

/// Runs a process to its end and returns its final status.
async fn exec_status(agent: &dyn GuestAgent, args: Value) -> qga_proto::Result<Value> {
    let pid = agent.execute_raw("guest-exec", Some(args)).await?["pid"]
        .as_i64()
        .expect("pid");
    loop {
        let s = agent
            .execute_raw("guest-exec-status", Some(json!({"pid": pid})))
            .await?;
        if s["exited"] == json!(true) {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The scripted session. `dir` is where SAMPLE lives as `sample.txt`.
async fn session(
    agent: &dyn GuestAgent,
    dir: &str,
    release: AgentRelease,
) -> Vec<(String, String)> {
    let mut log = Vec::new();
    let mut step = |label: &str, text: String| log.push((label.to_owned(), text));
    let raw = |name: &'static str, args: Value| async move {
        agent
            .execute_raw(name, if args.is_null() { None } else { Some(args) })
            .await
    };

    step("ping", outcome(raw("guest-ping", Value::Null).await, true));
    step(
        "sync",
        outcome(raw("guest-sync", json!({"id": 5})).await, true),
    );
    step(
        "info",
        outcome(
            raw("guest-info", Value::Null)
                .await
                .map(|v| json!(v.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()))),
            true,
        ),
    );
    for (label, command) in [
        ("time", "guest-get-time"),
        ("host-name", "guest-get-host-name"),
        ("timezone", "guest-get-timezone"),
        ("vcpus", "guest-get-vcpus"),
        ("load", "guest-get-load"),
    ] {
        step(label, outcome(raw(command, Value::Null).await, false));
    }
    step(
        "fsfreeze-status",
        outcome(raw("guest-fsfreeze-status", Value::Null).await, true),
    );

    let missing = format!("{dir}/missing");
    let r = raw("guest-file-open", json!({"path": missing})).await;
    step("open missing", outcome(r, true).replace(dir, "<dir>"));
    let sample = format!("{dir}/sample.txt");
    let handle = raw("guest-file-open", json!({"path": sample, "mode": "r"}))
        .await
        .expect("open sample");
    let h = handle.as_i64().expect("handle is an integer");
    step("handle", format!("at least 1000: {}", h >= 1000));
    step(
        "read 5",
        outcome(
            raw("guest-file-read", json!({"handle": h, "count": 5})).await,
            true,
        ),
    );
    step(
        "seek end",
        outcome(
            raw(
                "guest-file-seek",
                json!({"handle": h, "offset": -5, "whence": "end"}),
            )
            .await,
            true,
        ),
    );
    step(
        "seek cur int",
        outcome(
            raw(
                "guest-file-seek",
                json!({"handle": h, "offset": 0, "whence": 1}),
            )
            .await,
            true,
        ),
    );
    step(
        "seek bad whence",
        outcome(
            raw(
                "guest-file-seek",
                json!({"handle": h, "offset": 0, "whence": "bogus"}),
            )
            .await,
            true,
        ),
    );
    step(
        "read rest",
        outcome(raw("guest-file-read", json!({"handle": h})).await, true),
    );
    step(
        "read eof",
        outcome(raw("guest-file-read", json!({"handle": h})).await, true),
    );
    step(
        "read too much",
        outcome(
            raw("guest-file-read", json!({"handle": h, "count": 50331649})).await,
            true,
        ),
    );
    step(
        "close",
        outcome(raw("guest-file-close", json!({"handle": h})).await, true),
    );
    let r = raw("guest-file-read", json!({"handle": h})).await;
    step(
        "read closed",
        outcome(r, true).replace(&h.to_string(), "<h>"),
    );

    let echo = json!({"path": "/bin/echo", "arg": ["hello", "qga"], "capture-output": true});
    let status = exec_status(agent, echo).await.expect("exec echo");
    step("exec status", format!("{status}"));
    let pid_gone = raw("guest-exec", json!({"path": "/bin/true"}))
        .await
        .expect("exec true")["pid"]
        .as_i64()
        .expect("pid");
    loop {
        let s = raw("guest-exec-status", json!({"pid": pid_gone}))
            .await
            .expect("status");
        if s["exited"] == json!(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step(
        "exec status reaped",
        outcome(
            raw("guest-exec-status", json!({"pid": pid_gone})).await,
            true,
        ),
    );
    step(
        "exec missing",
        outcome(
            raw("guest-exec", json!({"path": "/nonexistent/bin"})).await,
            true,
        ),
    );
    // Capture modes: strings since 8.1 (where `merged` joins both streams), booleans before.
    // (qemu-ga 10.0.13 can hang a process captured as `stdout` or `stderr` alone; not asked.)
    let both = |mode: Value| json!({"path": "/bin/sh", "arg": ["-c", "echo out; echo err >&2"], "capture-output": mode});
    let merged = exec_status(agent, both(json!("merged"))).await;
    step("exec merged", outcome(merged, true));
    let none = exec_status(agent, both(json!("none"))).await;
    step("exec none", outcome(none, true));
    step(
        "exec capture type",
        outcome(raw("guest-exec", both(json!(5))).await, true),
    );
    if release == AgentRelease::Qemu10_0 {
        step(
            "exec capture mode",
            outcome(raw("guest-exec", both(json!("sideways"))).await, true),
        );
    }

    step(
        "missing arg",
        outcome(raw("guest-sync", json!({})).await, true),
    );
    step(
        "wrong type",
        outcome(raw("guest-sync", json!({"id": "x"})).await, true),
    );
    step(
        "extra arg",
        outcome(raw("guest-ping", json!({"bogus": 1})).await, true),
    );
    step(
        "unknown",
        outcome(raw("guest-no-such-command", Value::Null).await, true),
    );
    for command in [
        "guest-get-devices",
        "guest-network-get-route",
        "guest-get-load",
    ] {
        let r = raw(command, Value::Null).await;
        step(command, outcome(r.map(|v| json!(shape(&v))), true));
    }
    step(
        "disabled",
        outcome(
            raw(
                "guest-ssh-get-authorized-keys",
                json!({"username": "nobody"}),
            )
            .await,
            true,
        ),
    );
    log
}

/// Writes `lines` (raw bytes each) to `stream` and reads one reply line after each.
async fn raw_replies<S: AsyncRead + AsyncWrite + Unpin>(stream: S, lines: &[&[u8]]) -> Vec<String> {
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut replies = Vec::new();
    for line in lines {
        write.write_all(line).await.expect("write");
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), read.read_until(b'\n', &mut reply))
            .await
            .expect("a reply within 5 s")
            .expect("read");
        // Key order is the agent's hash order: compare the parsed object.
        let start = reply.iter().position(|&b| b != 0xFF).unwrap_or(0);
        let value: Value = serde_json::from_slice(&reply[start..]).expect("a JSON reply");
        replies.push(format!("{}{value}", if start > 0 { "0xFF " } else { "" }));
    }
    replies
}

/// Request envelopes and framing the clients never produce: the agent's own answers.
const ENVELOPES: &[&[u8]] = &[
    b"[1, 2]\n",
    b"{\"arguments\": {}}\n",
    b"{\"execute\": \"guest-ping\", \"foo\": 1}\n",
    b"{\"execute\": 5}\n",
    b"{\"execute\": \"guest-ping\", \"arguments\": [1]}\n",
    b"{\"execute\": \"guest-ping\", \"id\": {\"a\": [1]}}\n",
    b"{\"execute\": \"guest-no-such\", \"id\": \"x-1\"}\n",
    b"{\"execute\": \"guest-ssh-get-authorized-keys\", \"arguments\": {\"username\": \"u\"}, \"id\": 9}\n",
    b"\xff",
    b"{\"execute\": \"guest-sync-delimited\", \"arguments\": {\"id\": 3}}\n",
];

/// A fake of `release` set up like the test agent: the same RPCs blocked, the same file.
fn fake_like(release: AgentRelease, dir: &str) -> FakeAgent {
    let fake = FakeAgent::linux_release(release);
    let mut state = fake.state();
    for rpc in BLOCKED_RPCS {
        state.disable(rpc);
    }
    state
        .files
        .insert(format!("{dir}/sample.txt"), SAMPLE.to_vec());
    drop(state);
    fake
}

fn run(body: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(body);
}

#[test]
fn each_fake_release_agrees_with_its_qemu_ga() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        run(async {
            qga.put_file("sample.txt", SAMPLE);
            let dir = qga.files_dir().to_str().expect("utf-8 path").to_owned();
            // Both agents answer everything themselves: no client-side refusal.
            let config = ClientConfig::default()
                .timeout(Duration::from_secs(10))
                .check_capabilities(false);

            let real = AsyncClient::connect_unix(qga.socket(), config.clone())
                .await
                .expect("connect to qemu-ga");
            let info: GuestAgentInfo = real.info().await.expect("guest-info");
            let release = release_of(&info.version);
            let real_log = session(&real, &dir, release).await;
            real.close().await;

            let fake = fake_like(release, &dir);
            let fake_client = fake.clone().connect_async_with(config);
            let fake_info = fake_client.info().await.expect("guest-info");
            assert_eq!(fake_info.version, info.version);
            // The command table: names, enabled, success-response, as sets.
            let table = |i: &GuestAgentInfo| {
                let mut t: Vec<String> = i
                    .supported_commands
                    .iter()
                    .map(|c| {
                        format!(
                            "{} enabled={} reply={}",
                            c.name, c.enabled, c.success_response
                        )
                    })
                    .collect();
                t.sort();
                t
            };
            assert_eq!(table(&fake_info), table(&info), "{release}: guest-info");
            let fake_log = session(&fake_client, &dir, release).await;
            for ((label, real_text), (_, fake_text)) in real_log.iter().zip(&fake_log) {
                assert_eq!(
                    real_text, fake_text,
                    "step '{label}' differs (left: qemu-ga {}, right: fake {release})",
                    info.version
                );
            }
            assert_eq!(real_log.len(), fake_log.len());

            // Envelopes, ids and the 0xFF sentinel, byte for byte (up to key order).
            let stream = tokio::net::UnixStream::connect(qga.socket())
                .await
                .expect("connect");
            let real_replies = raw_replies(stream, ENVELOPES).await;
            let (client_end, server_end) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move { fake.serve_async(server_end).await });
            let fake_replies = raw_replies(client_end, ENVELOPES).await;
            for ((request, real), fake) in ENVELOPES.iter().zip(&real_replies).zip(&fake_replies) {
                assert_eq!(
                    real,
                    fake,
                    "{release}: reply to {:?} differs",
                    String::from_utf8_lossy(request)
                );
            }
        });
    });
}
