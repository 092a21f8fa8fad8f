//! Differential test: one scripted session against the real qemu-ga and the
//! fake agent (given the same command table and the same file) must give the
//! same result shapes, error classes and error texts.

use std::time::Duration;

use qga_proto::fake::{FakeAgent, FakeCommand};
use qga_proto::types::GuestAgentInfo;
use qga_proto::{AsyncClient, ClientConfig, GuestAgent};
use serde_json::{json, Value};
use vmsdk_tests::qga::QemuGa;

const SAMPLE: &[u8] = b"hello qga test file\n";

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

/// The scripted session. `dir` is where SAMPLE lives as `sample.txt`.
async fn session(agent: &dyn GuestAgent, dir: &str) -> Vec<(String, String)> {
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
    step(
        "time",
        outcome(raw("guest-get-time", Value::Null).await, false),
    );
    step(
        "host-name",
        outcome(raw("guest-get-host-name", Value::Null).await, false),
    );
    step(
        "timezone",
        outcome(raw("guest-get-timezone", Value::Null).await, false),
    );
    step(
        "fsfreeze-status",
        outcome(raw("guest-fsfreeze-status", Value::Null).await, true),
    );
    step(
        "vcpus",
        outcome(raw("guest-get-vcpus", Value::Null).await, false),
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

    let pid = raw(
        "guest-exec",
        json!({"path": "/bin/echo", "arg": ["hello", "qga"], "capture-output": true}),
    )
    .await
    .expect("exec echo")["pid"]
        .as_i64()
        .expect("pid");
    let status = loop {
        let s = raw("guest-exec-status", json!({"pid": pid}))
            .await
            .expect("exec-status");
        if s["exited"] == json!(true) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    step("exec status", format!("{}", status));
    step(
        "exec status reaped",
        outcome(raw("guest-exec-status", json!({"pid": pid})).await, true),
    );
    step(
        "exec missing",
        outcome(
            raw("guest-exec", json!({"path": "/nonexistent/bin"})).await,
            true,
        ),
    );

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

#[tokio::test]
async fn fake_and_qemu_ga_agree() {
    let Some(qga) = QemuGa::start() else { return };
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
    let real_log = session(&real, &dir).await;
    drop(real);

    // The fake gets the real agent's command table and the same file.
    let fake = FakeAgent::linux();
    {
        let mut state = fake.state();
        state.commands = info
            .supported_commands
            .iter()
            .map(|c| FakeCommand {
                name: c.name.clone(),
                enabled: c.enabled,
                success_response: c.success_response,
            })
            .collect();
        state
            .files
            .insert(format!("{dir}/sample.txt"), SAMPLE.to_vec());
    }
    let fake_client = fake.clone().connect_async_with(config);
    let fake_log = session(&fake_client, &dir).await;

    for ((label, real_text), (_, fake_text)) in real_log.iter().zip(&fake_log) {
        assert_eq!(
            real_text, fake_text,
            "step '{label}' differs (left: qemu-ga {}, right: fake)",
            info.version
        );
    }
    assert_eq!(real_log.len(), fake_log.len());
}
