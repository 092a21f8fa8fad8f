//! The real clients against the fake agent: every typed method, helpers,
//! capability checks, silent commands, and desync faults.
#![cfg(feature = "tokio")]

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use qga_proto::cmd::{self, COMMANDS};
use qga_proto::fake::{FakeAgent, FakeEvent, Fault, Response};
use qga_proto::types::*;
use qga_proto::{ClientConfig, Error, ErrorClass, GuestAgent, GuestAgentExt};
use serde_json::{json, Value};

fn quick() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_millis(500))
        .sync_timeout(Duration::from_millis(500))
        .no_reply_grace(Duration::from_millis(100))
}

/// Records command names instead of sending them.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

#[async_trait]
impl GuestAgent for Recorder {
    async fn execute_raw(&self, name: &str, _args: Option<Value>) -> qga_proto::Result<Value> {
        self.0.lock().unwrap().push(name.to_owned());
        Err(Error::Protocol {
            detail: "recorder".into(),
        })
    }
}

#[tokio::test]
async fn every_command_has_a_typed_method() {
    let r = Recorder::default();
    let a: &dyn GuestAgent = &r;
    let _ = a.sync_delimited(1).await;
    let _ = a.sync(1).await;
    let _ = a.ping().await;
    let _ = a.time().await;
    let _ = a.set_time(None).await;
    let _ = a.info().await;
    let _ = a.shutdown(None).await;
    let _ = a.file_open("/x", None).await;
    let _ = a.file_close(1).await;
    let _ = a.file_read(1, None).await;
    let _ = a.file_write(1, vec![]).await;
    let _ = a.file_seek(1, 0, GuestFileWhence::Value(0)).await;
    let _ = a.file_flush(1).await;
    let _ = a.fsfreeze_status().await;
    let _ = a.fsfreeze_freeze().await;
    let _ = a.fsfreeze_freeze_list(None).await;
    let _ = a.fsfreeze_thaw().await;
    let _ = a.fstrim(None).await;
    let _ = a.suspend_disk().await;
    let _ = a.suspend_ram().await;
    let _ = a.suspend_hybrid().await;
    let _ = a.network_interfaces().await;
    let _ = a.vcpus().await;
    let _ = a.set_vcpus(vec![]).await;
    let _ = a.disks().await;
    let _ = a.fsinfo().await;
    let _ = a.set_user_password("u", Password::new("p"), false).await;
    let _ = a.memory_blocks().await;
    let _ = a.set_memory_blocks(vec![]).await;
    let _ = a.memory_block_info().await;
    let _ = a.exec_status(1).await;
    let _ = a.exec(cmd::GuestExecArgs::new("/bin/true")).await;
    let _ = a.host_name().await;
    let _ = a.users().await;
    let _ = a.timezone().await;
    let _ = a.osinfo().await;
    let _ = a.devices().await;
    let _ = a.ssh_authorized_keys("u").await;
    let _ = a.ssh_add_authorized_keys("u", vec![], None).await;
    let _ = a.ssh_remove_authorized_keys("u", vec![]).await;
    let _ = a.diskstats().await;
    let _ = a.cpustats().await;
    let _ = a.load().await;
    let _ = a.network_routes().await;
    let called: BTreeSet<String> = r.0.lock().unwrap().iter().cloned().collect();
    let all: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
    assert_eq!(called, all);
}

#[tokio::test]
async fn read_only_commands_through_dyn_agent() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent: Box<dyn GuestAgent> = Box::new(fake.clone().connect_async_with(quick()));
    agent.ping().await?;
    assert_eq!(agent.sync(-42).await?, -42);
    assert_eq!(agent.sync_delimited(77).await?, 77);
    let info = agent.info().await?;
    assert_eq!(info.version, "10.0.13");
    assert!(info.command("guest-get-devices").is_none());
    assert!(agent.time().await? > 1_600_000_000_000_000_000);
    assert_eq!(agent.host_name().await?.host_name, "fake-guest");
    assert_eq!(agent.timezone().await?.zone.as_deref(), Some("UTC"));
    assert_eq!(agent.osinfo().await?.id.as_deref(), Some("debian"));
    assert_eq!(agent.users().await?.len(), 1);
    assert_eq!(agent.network_interfaces().await?[0].name, "lo");
    assert_eq!(
        agent.network_routes().await?[0].gateway.as_deref(),
        Some("192.0.2.1")
    );
    assert_eq!(agent.fsinfo().await?[0].mountpoint, "/");
    assert_eq!(agent.disks().await?[0].name, "/dev/vda");
    assert_eq!(agent.diskstats().await?[0].major, 254);
    assert_eq!(agent.cpustats().await?.len(), 2);
    assert!(agent.load().await?.load1m >= 0.0);
    assert_eq!(agent.vcpus().await?.len(), 2);
    assert_eq!(agent.memory_blocks().await?.len(), 8);
    assert_eq!(agent.memory_block_info().await?.size, 128 << 20);
    assert_eq!(agent.fsfreeze_status().await?, GuestFsfreezeStatus::Thawed);
    assert_eq!(agent.ssh_authorized_keys("debian").await?.keys.len(), 1);
    // Missing commands fail before anything is sent.
    let before = fake.state().requests.len();
    let err = agent.devices().await.unwrap_err();
    assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");
    assert_eq!(fake.state().requests.len(), before);
    Ok(())
}

#[tokio::test]
async fn state_changing_commands_change_the_fake() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent = fake.clone().connect_async_with(quick());
    agent.set_time(Some(1_000_000_000)).await?;
    assert!(agent.time().await? < 2_000_000_000);
    assert_eq!(
        agent
            .set_vcpus(vec![GuestLogicalProcessor {
                logical_id: 1,
                online: false,
                can_offline: None
            }])
            .await?,
        1
    );
    assert!(!agent.vcpus().await?[1].online);
    let err = agent
        .set_vcpus(vec![GuestLogicalProcessor {
            logical_id: 0,
            online: false,
            can_offline: None,
        }])
        .await;
    assert!(matches!(
        err,
        Err(Error::Agent {
            class: ErrorClass::GenericError,
            ..
        })
    ));
    let res = agent
        .set_memory_blocks(vec![GuestMemoryBlock {
            phys_index: 99,
            online: false,
            can_offline: None,
        }])
        .await?;
    assert_eq!(res[0].response, GuestMemoryBlockResponseType::NotFound);
    agent
        .set_user_password("debian", Password::new("s3cret"), false)
        .await?;
    assert_eq!(
        fake.state().accounts["debian"]
            .password
            .as_ref()
            .unwrap()
            .0
            .expose(),
        "s3cret"
    );
    agent
        .ssh_add_authorized_keys("root", vec!["ssh-ed25519 AAAA k".into()], None)
        .await?;
    let keys = fake.state().accounts["debian"].authorized_keys.clone();
    agent.ssh_remove_authorized_keys("debian", keys).await?;
    assert!(agent.ssh_authorized_keys("debian").await?.keys.is_empty());
    let err = agent.ssh_authorized_keys("nobody-here").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest agent error (GenericError): failed to lookup user 'nobody-here': Success"
    );
    assert_eq!(agent.fstrim(None).await?.paths[0].path, "/");
    Ok(())
}

#[tokio::test]
async fn silent_commands_return_after_the_grace_period() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent = fake.clone().connect_async_with(quick());
    agent.shutdown(Some(GuestShutdownMode::Reboot)).await?;
    agent.suspend_ram().await?;
    assert_eq!(
        fake.state().events,
        vec![FakeEvent::Shutdown("reboot".into()), FakeEvent::SuspendRam]
    );
    // An error line within the grace period is reported.
    let err = agent
        .shutdown(Some(GuestShutdownMode::Other("sideways".into())))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::GenericError));
    // Disabled: refused before sending.
    fake.state().disable("guest-suspend-disk");
    let agent = fake.clone().connect_async_with(quick());
    assert!(matches!(
        agent.suspend_disk().await,
        Err(Error::CommandDisabled { .. })
    ));
    agent.ping().await
}

#[tokio::test]
async fn files_stream_in_chunks_and_handles_start_at_1000() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    // Megabytes through base64 in a debug build on a busy machine: not a timing test.
    let agent = fake
        .clone()
        .connect_async_with(quick().timeout(Duration::from_secs(10)));
    let data: Vec<u8> = (0..(qga_proto::FILE_CHUNK * 2 + 123))
        .map(|i| (i % 251) as u8)
        .collect();
    agent.write_file("/tmp/blob", &data).await?;
    assert_eq!(agent.read_file("/tmp/blob").await?, data);
    let h = agent.file_open("/etc/hostname", None).await?;
    assert_eq!(h, 1002);
    let part = agent.file_read(h, Some(4)).await?;
    assert_eq!(
        (part.count, part.buf_b64.0.as_slice(), part.eof),
        (4, &b"fake"[..], false)
    );
    assert_eq!(agent.file_position(h).await?, 4);
    agent
        .file_seek(h, -1, GuestFileWhence::Name(QGASeek::End))
        .await?;
    assert_eq!(agent.file_read(h, None).await?.buf_b64.0, b"\n");
    agent.file_close(h).await?;
    let err = agent.file_read(h, None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest agent error (GenericError): handle '1002' has not been found"
    );
    let err = agent.file_open("/nonexistent/x", None).await.unwrap_err();
    assert!(err.to_string().contains("No such file or directory"));
    Ok(())
}

#[tokio::test]
async fn exec_waits_and_process_is_forgotten_after_exit() -> qga_proto::Result<()> {
    let agent = FakeAgent::linux().connect_async_with(quick());
    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/cat")
                .input("from-stdin\n")
                .capture(),
            None,
        )
        .await?;
    assert_eq!(out.stdout, b"from-stdin\n");
    assert!(out.success());
    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/sh").args(["-c", "kill -TERM $$"]),
            None,
        )
        .await?;
    assert_eq!(out.signal, Some(15));
    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("sleep").arg("0.05"),
            Some(Duration::from_secs(5)),
        )
        .await?;
    assert!(out.success());
    assert!(out.stdout.is_empty(), "no capture requested");
    let pid = out.pid;
    let err = agent.exec_status(pid).await.unwrap_err();
    // qemu-ga 10.0's text, format bug included.
    assert_eq!(
        err.to_string(),
        "guest agent error (GenericError): PID ld does not exist"
    );
    let err = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/sleep").arg("30"),
            Some(Duration::from_millis(50)),
        )
        .await;
    assert!(matches!(err, Err(Error::ExecTimeout { .. })));
    let err = agent
        .exec(cmd::GuestExecArgs::new("/nonexistent/bin"))
        .await
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("Failed to execute child process \u{201C}/nonexistent/bin\u{201D}"));
    Ok(())
}

#[tokio::test]
async fn freeze_guard_thaws() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent: std::sync::Arc<dyn GuestAgent> =
        std::sync::Arc::new(fake.clone().connect_async_with(quick()));
    let guard = qga_proto::freeze_filesystems(agent.clone(), None).await?;
    assert_eq!(guard.frozen(), 1);
    assert!(fake.state().frozen);
    // While frozen, other commands are disabled, as in qemu-ga.
    let err = agent
        .execute_raw("guest-get-osinfo", None)
        .await
        .unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert_eq!(guard.thaw().await?, 1);
    assert!(!fake.state().frozen);

    // Capabilities fetched while frozen must not outlive the thaw.
    let client = fake.clone().connect_async_with(quick());
    client.fsfreeze_freeze().await?;
    let frozen_caps = client.capabilities().await?.expect("guest-info");
    assert!(!frozen_caps.is_enabled("guest-get-osinfo"));
    assert!(matches!(
        client.osinfo().await,
        Err(Error::CommandDisabled { .. })
    ));
    client.fsfreeze_thaw().await?;
    assert_eq!(client.osinfo().await?.id.as_deref(), Some("debian"));
    {
        let _guard = qga_proto::freeze_filesystems(agent.clone(), Some(vec!["/".into()])).await?;
        assert!(fake.state().frozen);
    }
    // The dropped guard thaws in the background.
    for _ in 0..100 {
        if !fake.state().frozen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!fake.state().frozen);
    Ok(())
}

#[tokio::test]
async fn handlers_replace_behaviour_and_add_commands() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    fake.handler("guest-get-host-name", |_, _| {
        Response::ok(json!({"host-name": "scripted"}))
    });
    fake.handler("guest-vendor-thing", |_, args| {
        Response::Return(json!({"echo": args}))
    });
    let agent = fake.clone().connect_async_with(quick());
    assert_eq!(agent.host_name().await?.host_name, "scripted");
    let v = agent
        .execute_raw("guest-vendor-thing", Some(json!({"a": 1})))
        .await?;
    assert_eq!(v, json!({"echo": {"a": 1}}));
    Ok(())
}

#[tokio::test]
async fn desync_faults_leave_the_client_usable() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent = fake.clone().connect_async_with(quick());
    agent.ping().await?;

    // A stale reply in front of the real one: taken as the reply, since the
    // agent is FIFO; with ids on it is skipped.
    let with_ids = fake.clone().connect_async_with(quick().request_ids(true));
    fake.fault_on(
        "guest-get-host-name",
        Fault::StaleReply(json!({"host-name": "stale"})),
    );
    assert_eq!(with_ids.host_name().await?.host_name, "fake-guest");

    // Garbage in front of a reply: the reply still reaches its caller (it carries the
    // caller's id), and the channel is resynchronised.
    fake.fault_on(
        "guest-get-timezone",
        Fault::Garbage(b"\x00\x01 not json\n".to_vec()),
    );
    assert_eq!(agent.timezone().await?.offset, 0);
    // Garbage instead of a reply: a clear error, then a resync.
    fake.fault_on(
        "guest-get-timezone",
        Fault::ReplaceReply(b"\x00\x01 not json\n".to_vec()),
    );
    let err = agent.timezone().await.unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("guest-get-timezone"), "{err}");
    assert_eq!(agent.timezone().await?.offset, 0);

    // A late reply (agent busy): timeout, then the late reply is skipped.
    fake.fault_on("guest-get-users", Fault::Delay(Duration::from_millis(700)));
    assert!(matches!(agent.users().await, Err(Error::Timeout { .. })));
    assert_eq!(agent.host_name().await?.host_name, "fake-guest");

    // Reply never sent.
    fake.fault_on("guest-get-osinfo", Fault::DropReply);
    assert!(matches!(agent.osinfo().await, Err(Error::Timeout { .. })));
    agent.ping().await?;

    // The agent drops the connection: a clear error, then a reconnect.
    fake.fault_on("guest-get-vcpus", Fault::Disconnect);
    let err = agent.vcpus().await.unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");
    assert_eq!(agent.vcpus().await?.len(), 2);

    // A hung agent: bounded by the sync timeout.
    fake.fault_on("guest-get-fsinfo", Fault::Hang);
    assert!(matches!(agent.fsinfo().await, Err(Error::Timeout { .. })));
    let hung_agent = fake.clone();
    hung_agent.fault(Fault::Hang);
    let agent2 = fake.clone().connect_async_with(quick().sync_attempts(1));
    let err = agent2.ping().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest agent did not answer guest-sync within 500 ms (is qemu-ga running in the guest? is another client connected to the channel? QEMU's chardev socket serves one at a time)"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_reply_is_refused_and_recovered() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    fake.state()
        .files
        .insert("/big".into(), vec![b'x'; 64 * 1024]);
    let agent = fake
        .clone()
        .connect_async_with(quick().max_reply_size(16 * 1024));
    let h = agent.file_open("/big", None).await?;
    let err = agent.file_read(h, Some(64 * 1024)).await.unwrap_err();
    assert!(
        matches!(err, Error::ReplyTooLarge { limit: 16384 }),
        "{err}"
    );
    // The agent did read (the position moved); the channel is usable again.
    assert_eq!(agent.file_position(h).await?, 64 * 1024);
    agent.file_seek(h, 0, GuestFileWhence::Value(0)).await?;
    assert_eq!(agent.file_read(h, Some(1024)).await?.count, 1024);
    Ok(())
}

#[tokio::test]
async fn cancelled_call_forces_resync() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let agent = fake.clone().connect_async_with(quick());
    agent.ping().await?;
    fake.fault_on(
        "guest-get-host-name",
        Fault::Delay(Duration::from_millis(200)),
    );
    let cancelled = tokio::time::timeout(Duration::from_millis(20), agent.host_name()).await;
    assert!(cancelled.is_err());
    // The reply of the cancelled call arrives later and must not be taken for this one.
    assert_eq!(agent.timezone().await?.zone.as_deref(), Some("UTC"));
    Ok(())
}

#[test]
fn blocking_client_against_the_fake() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    let mut client = fake.clone().connect_blocking_with(quick())?;
    assert_eq!(
        client.call::<cmd::GuestGetHostName>(&())?.host_name,
        "fake-guest"
    );
    let h = client.call::<cmd::GuestFileOpen>(&cmd::GuestFileOpenArgs::new("/tmp/f").mode("w+"))?;
    let w = client.call::<cmd::GuestFileWrite>(&cmd::GuestFileWriteArgs {
        handle: h,
        buf_b64: "abc".into(),
        count: None,
    })?;
    assert_eq!(w.count, 3);
    client.call::<cmd::GuestFileSeek>(&cmd::GuestFileSeekArgs::from_seek(
        h,
        std::io::SeekFrom::Start(0),
    ))?;
    assert_eq!(
        client
            .call::<cmd::GuestFileRead>(&cmd::GuestFileReadArgs {
                handle: h,
                count: None
            })?
            .buf_b64
            .0,
        b"abc"
    );
    client.call::<cmd::GuestShutdown>(&cmd::GuestShutdownArgs::default())?;
    assert_eq!(
        fake.state().events,
        vec![FakeEvent::Shutdown("powerdown".into())]
    );

    fake.fault_on(
        "guest-get-timezone",
        Fault::Delay(Duration::from_millis(700)),
    );
    assert!(matches!(
        client.call::<cmd::GuestGetTimezone>(&()),
        Err(Error::Timeout { .. })
    ));
    assert_eq!(client.call::<cmd::GuestGetTimezone>(&())?.offset, 0);
    fake.fault_on("guest-ping", Fault::Disconnect);
    assert!(matches!(
        client.call::<cmd::GuestPing>(&()),
        Err(Error::Disconnected { .. })
    ));
    client.call::<cmd::GuestPing>(&())?;
    fake.state().disable("guest-exec");
    client.resync()?;
    let err = client
        .call::<cmd::GuestExec>(&cmd::GuestExecArgs::new("/bin/true"))
        .unwrap_err();
    assert!(matches!(err, Error::CommandDisabled { .. }), "{err}");
    fake.state().enable("guest-exec");
    client.resync()?;
    let out = client.exec_wait(
        cmd::GuestExecArgs::new("/bin/echo")
            .args(["-n", "hi"])
            .capture(),
        Some(Duration::from_secs(5)),
    )?;
    assert_eq!(out.stdout, b"hi");
    client.write_file("/tmp/b", b"blocking")?;
    assert_eq!(client.read_file("/tmp/b")?, b"blocking");
    {
        let guard = client.freeze(None)?;
        assert_eq!(guard.frozen(), 1);
        assert!(fake.state().frozen);
    }
    assert!(!fake.state().frozen);
    Ok(())
}

#[tokio::test]
async fn tcp_and_unix_addresses_reach_a_fake_served_on_sockets() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();

    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?;
    let dir = std::env::temp_dir().join(format!("qga-proto-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("agent.sock");
    let _ = std::fs::remove_file(&sock);
    let unix = tokio::net::UnixListener::bind(&sock)?;
    let served = fake.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok((s, _)) = tcp.accept() => { let a = served.clone(); tokio::spawn(async move { a.serve_async(s).await }); }
                Ok((s, _)) = unix.accept() => { let a = served.clone(); tokio::spawn(async move { a.serve_async(s).await }); }
            }
        }
    });

    let by_tcp = qga_proto::AsyncClient::connect(&format!("qga+tcp://{tcp_addr}"), quick()).await?;
    assert_eq!(by_tcp.host_name().await?.host_name, "fake-guest");
    let by_unix =
        qga_proto::AsyncClient::connect(&format!("qga+unix://{}", sock.display()), quick()).await?;
    assert_eq!(by_unix.sync(9).await?, 9);

    let addr = tcp_addr.to_string();
    let sock2 = sock.clone();
    tokio::task::spawn_blocking(move || -> qga_proto::Result<()> {
        let mut c = qga_proto::Client::connect(&format!("tcp:{addr}"), quick())?;
        assert_eq!(c.call::<cmd::GuestGetTimezone>(&())?.offset, 0);
        let mut c = qga_proto::Client::connect(sock2.to_str().unwrap(), quick())?;
        c.call::<cmd::GuestPing>(&())?;
        Ok(())
    })
    .await
    .expect("blocking task")?;

    // Nothing listens here: a clear I/O error, no hang.
    let refused = qga_proto::AsyncClient::connect(
        &format!("qga+unix://{}", dir.join("nobody.sock").display()),
        quick(),
    )
    .await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn windows_fake_has_devices_and_no_linux_commands() -> qga_proto::Result<()> {
    let agent = FakeAgent::windows().connect_async_with(quick());
    let info = agent.info().await?;
    assert_eq!(info.version_numbers(), Some((108, 0)));
    let devices = agent.devices().await?;
    assert_eq!(
        devices[0].id,
        Some(GuestDeviceId::Pci(GuestDeviceIdPCI {
            vendor_id: 0x1af4,
            device_id: 0x1004
        }))
    );
    assert_eq!(agent.osinfo().await?.id.as_deref(), Some("mswindows"));
    assert_eq!(agent.fsinfo().await?[0].mountpoint, "C:\\");
    // Linux-only: left out of a Windows build, which no upgrade changes.
    assert!(matches!(
        agent.cpustats().await,
        Err(Error::CommandUnavailable { .. })
    ));
    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("cmd.exe")
                .args(["/c", "echo", "hi"])
                .capture(),
            None,
        )
        .await?;
    assert_eq!(out.stdout, b"hi\r\n");
    assert_eq!(
        agent
            .read_file("C:\\Windows\\System32\\drivers\\etc\\hosts")
            .await?,
        b"127.0.0.1 localhost\r\n"
    );
    Ok(())
}

/// A guest that powers off closes the channel before the grace period ends: for commands that
/// send nothing on success, that is success (QEMU's own shutdown path looks exactly like this).
#[tokio::test]
async fn silent_commands_succeed_when_the_guest_closes_the_channel() -> qga_proto::Result<()> {
    let fake = FakeAgent::linux();
    fake.fault_on("guest-shutdown", Fault::Disconnect);
    let agent = fake.clone().connect_async_with(quick());
    agent.shutdown(None).await?;

    let mut blocking = fake
        .clone()
        .connect_blocking_with(quick())
        .expect("fake agent over a socket pair");
    blocking.call::<cmd::GuestShutdown>(&cmd::GuestShutdownArgs::default())?;

    // A command that does reply still reports a closed channel as an error.
    fake.fault_on("guest-get-time", Fault::Disconnect);
    let agent = fake.clone().connect_async_with(quick());
    assert!(matches!(
        agent.time().await,
        Err(Error::Disconnected { .. })
    ));
    Ok(())
}
