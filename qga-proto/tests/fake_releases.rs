//! The fake agent built as qemu-ga 2.11, 7.2 and 10.0, through the real clients: each
//! release's command set, reply members, argument forms and error texts, and how the client
//! tells a too-old agent from a command the guest's platform lacks. (7.2 and 10.0 are also
//! compared with the real agents by `vmsdk-tests`' differential test; 2.11 here with its
//! protocol reference, seed 004.)
#![cfg(feature = "tokio")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use qga_proto::cmd::{GuestExecArgs, COMMANDS};
use qga_proto::fake::{AgentRelease, FakeAgent};
use qga_proto::types::GuestExecCaptureOutputMode;
use qga_proto::{ClientConfig, Error, ErrorClass, GuestAgent, GuestAgentExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn quick() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(2))
        .sync_timeout(Duration::from_secs(1))
}

fn data_lines(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn each_release_lists_its_own_commands() -> qga_proto::Result<()> {
    let reference_2_11: BTreeSet<String> = data_lines("commands-2.11.txt").into_iter().collect();
    for &release in AgentRelease::ALL {
        let info = FakeAgent::linux_release(release)
            .connect_async_with(quick())
            .info()
            .await?;
        assert_eq!(info.version, release.version());
        let listed: BTreeSet<String> = info
            .supported_commands
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let enabled: BTreeSet<&str> = info
            .supported_commands
            .iter()
            .filter(|c| c.enabled)
            .map(|c| c.name.as_str())
            .collect();
        match release {
            AgentRelease::Qemu2_11 => assert_eq!(listed, reference_2_11),
            AgentRelease::Qemu7_2 => {
                // Debian's 7.2.22 lists 42: the 10.0 set without route and load, and the
                // Windows-only guest-get-devices as a disabled stub.
                assert_eq!(listed.len(), 42);
                assert!(!listed.contains("guest-network-get-route"));
                assert!(!listed.contains("guest-get-load"));
                assert!(listed.contains("guest-get-devices"));
                assert!(!enabled.contains("guest-get-devices"));
            }
            _ => {
                // 10.0.13 lists 43: every command of the reference but guest-get-devices.
                let all: BTreeSet<String> = COMMANDS
                    .iter()
                    .map(|c| c.name.to_owned())
                    .filter(|n| n != "guest-get-devices")
                    .collect();
                assert_eq!(listed, all);
                assert_eq!(enabled.len(), 43);
            }
        }
    }
    Ok(())
}

/// Object keys of `value`, recursively, as `path.key`.
fn keys(value: &Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.insert(format!("{path}{k}"));
                keys(v, &format!("{path}{k}."), out);
            }
        }
        Value::Array(items) => {
            for item in items {
                keys(item, path, out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn reply_members_follow_the_release() -> qga_proto::Result<()> {
    let members: BTreeMap<String, BTreeSet<String>> = data_lines("members-2.11.txt")
        .iter()
        .map(|line| {
            let mut words = line.split_whitespace().map(str::to_owned);
            let object = words.next().unwrap();
            (object, words.collect())
        })
        .collect();
    async fn fsinfo(release: AgentRelease) -> qga_proto::Result<BTreeSet<String>> {
        let agent = FakeAgent::linux_release(release).connect_async_with(quick());
        let raw = agent.execute_raw("guest-get-fsinfo", None).await?;
        let mut found = BTreeSet::new();
        keys(&raw, "", &mut found);
        Ok(found)
    }

    // 2.11: only the members its reference has.
    let found = fsinfo(AgentRelease::Qemu2_11).await?;
    let mut allowed: BTreeSet<String> = members["GuestFilesystemInfo"].clone();
    for m in &members["GuestDiskAddress"] {
        allowed.insert(format!("disk.{m}"));
    }
    for m in &members["GuestPCIAddress"] {
        allowed.insert(format!("disk.pci-controller.{m}"));
    }
    assert!(found.is_subset(&allowed), "{found:?} beyond {allowed:?}");
    assert!(found.contains("disk.bus-type"));

    // 7.2 adds the usage (3.0) and disk device (3.1); 10.0 the privileged capacity (9.1).
    let found = fsinfo(AgentRelease::Qemu7_2).await?;
    assert!(found.contains("used-bytes") && found.contains("disk.dev"));
    assert!(!found.contains("total-bytes-privileged"));
    let found = fsinfo(AgentRelease::Qemu10_0).await?;
    assert!(found.contains("total-bytes-privileged"));
    Ok(())
}

#[tokio::test]
async fn too_old_and_not_on_this_platform_are_told_apart() -> qga_proto::Result<()> {
    let v2_11 = FakeAgent::linux_release(AgentRelease::Qemu2_11).connect_async_with(quick());
    let err = v2_11.disks().await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::CommandNotSupported {
                since: Some((5, 2)),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the guest agent (version 2.11.1) predates command guest-get-disks, which QEMU 5.2 \
         added; upgrade qemu-ga in the guest"
    );

    let v7_2 = FakeAgent::linux_release(AgentRelease::Qemu7_2).connect_async_with(quick());
    let err = v7_2.load().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandNotSupported {
                since: Some((10, 0)),
                ..
            }
        ),
        "{err}"
    );
    // 7.2 lists the Windows-only command as a disabled stub: not the administrator's doing.
    let err = v7_2.devices().await.unwrap_err();
    assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");

    // 10.0 leaves it out altogether; the advice is the same, and it is not "upgrade".
    let v10 = FakeAgent::linux_release(AgentRelease::Qemu10_0).connect_async_with(quick());
    let err = v10.devices().await.unwrap_err();
    assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("only in its builds for Windows guests"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("upgrade qemu-ga in the guest"),
        "{err}"
    );
    assert!(err.is_unsupported());
    Ok(())
}

#[tokio::test]
async fn capture_modes_before_and_after_8_1() -> qga_proto::Result<()> {
    let script = |mode| {
        GuestExecArgs::new("/bin/sh")
            .args(["-c", "exit 0"])
            .capture_mode(mode)
    };
    for release in [AgentRelease::Qemu2_11, AgentRelease::Qemu7_2] {
        let fake = FakeAgent::linux_release(release);
        fake.state()
            .program("/bin/both", |_| qga_proto::fake::ExecOutcome {
                exitcode: Some(0),
                stdout: b"out\n".to_vec(),
                stderr: b"err\n".to_vec(),
                ..Default::default()
            });
        let agent = fake.clone().connect_async_with(quick());
        // `separated` goes out as the boolean every release takes.
        let out = agent
            .exec_wait(
                GuestExecArgs::new("/bin/both").capture_mode(GuestExecCaptureOutputMode::Separated),
                Some(Duration::from_secs(5)),
            )
            .await?;
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        // `merged` has no boolean form: refused before sending, never sent wrong.
        let before = fake.state().requests.len();
        let err = agent
            .exec(script(GuestExecCaptureOutputMode::Merged))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::ArgumentNotSupported { since: (8, 1), .. }),
            "{err}"
        );
        assert_eq!(fake.state().requests.len(), before);
        // Without the client's check, the agent's own refusal.
        let unchecked = fake
            .clone()
            .connect_async_with(quick().check_capabilities(false));
        let err = unchecked
            .exec(script(GuestExecCaptureOutputMode::Merged))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest agent error (GenericError): Invalid parameter type for 'capture-output', \
             expected: boolean"
        );
    }
    let fake = FakeAgent::linux_release(AgentRelease::Qemu10_0);
    fake.state()
        .program("/bin/both", |_| qga_proto::fake::ExecOutcome {
            exitcode: Some(0),
            stdout: b"out\n".to_vec(),
            stderr: b"err\n".to_vec(),
            ..Default::default()
        });
    let agent = fake.connect_async_with(quick());
    let out = agent
        .exec_wait(
            GuestExecArgs::new("/bin/both").capture_mode(GuestExecCaptureOutputMode::Merged),
            Some(Duration::from_secs(5)),
        )
        .await?;
    assert_eq!(out.stdout, b"out\nerr\n");
    assert!(out.stderr.is_empty());
    Ok(())
}

/// Sends raw request lines to a fake built as `release` and returns the reply lines.
async fn raw_exchange(release: AgentRelease, requests: &[&str]) -> Vec<Value> {
    let fake = FakeAgent::linux_release(release);
    for rpc in ["guest-exec", "guest-file-write"] {
        fake.state().disable(rpc);
    }
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move { fake.serve_async(server).await });
    let (read, mut write) = tokio::io::split(client);
    let mut lines = BufReader::new(read).lines();
    let mut replies = Vec::new();
    for request in requests {
        write.write_all(request.as_bytes()).await.unwrap();
        write.write_all(b"\n").await.unwrap();
        let line = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        replies.push(serde_json::from_str(&line).unwrap());
    }
    replies
}

#[tokio::test]
async fn error_texts_of_each_release() {
    let requests = [
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/true"}}"#,
        r#"{"execute":"guest-ping","id":7}"#,
        r#"[1]"#,
        r#"{"arguments":{}}"#,
        r#"{"execute":"guest-ping","foo":1}"#,
        r#"{"execute":"guest-exec-status","arguments":{"pid":1}}"#,
    ];
    let v2_11 = raw_exchange(AgentRelease::Qemu2_11, &requests).await;
    assert_eq!(
        v2_11,
        vec![
            json!({"error": {"class": "GenericError", "desc": "The command guest-exec has been disabled for this instance"}}),
            json!({"error": {"class": "GenericError", "desc": "QMP input object member 'id' is unexpected"}}),
            json!({"error": {"class": "GenericError", "desc": "Invalid JSON syntax"}}),
            json!({"error": {"class": "GenericError", "desc": "this feature or command is not currently supported"}}),
            json!({"error": {"class": "GenericError", "desc": "QMP input object member 'foo' is unexpected"}}),
            json!({"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}),
        ]
    );
    let v7_2 = raw_exchange(AgentRelease::Qemu7_2, &requests).await;
    assert_eq!(
        v7_2,
        vec![
            json!({"error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled"}}),
            json!({"return": {}, "id": 7}),
            json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
            json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}),
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}),
            json!({"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}),
        ]
    );
    let v10 = raw_exchange(AgentRelease::Qemu10_0, &requests).await;
    assert_eq!(
        v10[0],
        json!({"error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled: the command is not allowed"}})
    );
    assert_eq!(v10[1..5], v7_2[1..5]);
    assert_eq!(
        v10[5],
        json!({"error": {"class": "GenericError", "desc": "PID ld does not exist"}})
    );
}

#[tokio::test]
async fn the_client_works_with_every_release() -> qga_proto::Result<()> {
    for &release in AgentRelease::ALL {
        let fake = FakeAgent::linux_release(release);
        fake.state().disable("guest-exec");
        let agent = fake.clone().connect_async_with(quick());
        assert_eq!(agent.host_name().await?.host_name, "fake-guest");
        assert!(!agent.network_interfaces().await?.is_empty());
        assert_eq!(agent.read_file("/etc/hostname").await?, b"fake-guest\n");
        let err = agent
            .exec(GuestExecArgs::new("/bin/true"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::CommandDisabled { .. }),
            "{release}: {err}"
        );
        // The agent's own disabled error is recognised as "unsupported" in every release.
        let unchecked = fake.connect_async_with(quick().check_capabilities(false));
        let err = unchecked
            .exec(GuestExecArgs::new("/bin/true"))
            .await
            .unwrap_err();
        assert!(err.is_unsupported(), "{release}: {err}");
        if release == AgentRelease::Qemu2_11 {
            assert_eq!(err.class(), Some(&ErrorClass::GenericError));
        }
    }
    Ok(())
}
