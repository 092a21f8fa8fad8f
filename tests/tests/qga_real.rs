//! qga-proto's clients against a real `qemu-ga` (Debian's qemu-guest-agent),
//! started unprivileged with every state-changing RPC blocked.

use std::time::Duration;

use qga_proto::cmd::{self, Command};
use qga_proto::types::*;
use qga_proto::{AsyncClient, Client, ClientConfig, Error, ErrorClass, GuestAgent, GuestAgentExt};
use vmsdk_tests::qga::QemuGa;

fn config() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(10))
        .sync_timeout(Duration::from_secs(3))
}

/// Commands whose data depends on the machine (sysfs, udev, mounts): they
/// must come back decoded or as an agent error, never as a channel error.
fn decoded_or_agent_error<T: std::fmt::Debug>(what: &str, r: qga_proto::Result<T>) {
    match r {
        Ok(_) => {}
        Err(e @ Error::Agent { .. }) => eprintln!("{what}: agent error on this machine: {e}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[tokio::test]
async fn async_client_runs_every_read_only_command() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start() else {
        return Ok(());
    };
    let agent: Box<dyn GuestAgent> =
        Box::new(AsyncClient::connect_unix(qga.socket(), config()).await?);

    let info = agent.info().await?;
    assert!(
        info.version.starts_with(char::is_numeric),
        "{}",
        info.version
    );
    for blocked in vmsdk_tests::qga::BLOCKED_RPCS {
        assert!(!info.is_enabled(blocked), "{blocked} must be disabled");
    }
    agent.ping().await?;
    assert_eq!(agent.sync(-42).await?, -42);
    assert_eq!(agent.sync_delimited(4242).await?, 4242);
    assert!(agent.time().await? > 1_600_000_000_000_000_000);
    let _zone: GuestTimezone = agent.timezone().await?;
    assert!(!agent.host_name().await?.host_name.is_empty());
    let os = agent.osinfo().await?;
    assert!(os.kernel_release.is_some());
    let _users: Vec<GuestUser> = agent.users().await?;
    let ifs = agent.network_interfaces().await?;
    assert!(ifs.iter().any(|i| i.name == "lo"));
    assert!(!agent.vcpus().await?.is_empty());
    assert_eq!(agent.fsfreeze_status().await?, GuestFsfreezeStatus::Thawed);
    decoded_or_agent_error("fsinfo", agent.fsinfo().await);
    decoded_or_agent_error("disks", agent.disks().await);
    decoded_or_agent_error("diskstats", agent.diskstats().await);
    decoded_or_agent_error("cpustats", agent.cpustats().await);
    decoded_or_agent_error("memory-blocks", agent.memory_blocks().await);
    decoded_or_agent_error("memory-block-info", agent.memory_block_info().await);

    // Commands this agent lacks or has disabled are refused before sending.
    for (name, result) in [
        (
            "guest-ssh-get-authorized-keys",
            agent.ssh_authorized_keys("nobody").await.map(drop),
        ),
        ("guest-get-devices", agent.devices().await.map(drop)),
    ] {
        // Disabled by -b (or, for the Windows-only guest-get-devices, by 7.2
        // itself; 9.1+ compiles it out): refused locally either way.
        assert!(
            matches!(
                result,
                Err(Error::CommandDisabled { .. } | Error::CommandNotSupported { .. })
            ),
            "{name}: {result:?}"
        );
    }
    if info.command("guest-get-load").is_none() {
        assert!(matches!(
            agent.load().await,
            Err(Error::CommandNotSupported { .. })
        ));
    }
    if info.command("guest-network-get-route").is_none() {
        assert!(matches!(
            agent.network_routes().await,
            Err(Error::CommandNotSupported { .. })
        ));
    }
    Ok(())
}

#[test]
fn blocking_client_runs_read_only_commands() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start() else {
        return Ok(());
    };
    let mut client = Client::connect_unix(qga.socket(), config())?;
    let info = client.call::<cmd::GuestInfo>(&())?;
    assert!(info.is_enabled("guest-get-osinfo"));
    client.call::<cmd::GuestPing>(&())?;
    assert_eq!(
        client.call::<cmd::GuestSync>(&cmd::GuestSyncArgs { id: 99 })?,
        99
    );
    assert!(!client
        .call::<cmd::GuestGetHostName>(&())?
        .host_name
        .is_empty());
    assert!(client.call::<cmd::GuestGetOsinfo>(&())?.machine.is_some());
    assert!(client.call::<cmd::GuestGetTime>(&())? > 0);
    client.call::<cmd::GuestGetTimezone>(&())?;
    client.call::<cmd::GuestGetUsers>(&())?;
    client.call::<cmd::GuestNetworkGetInterfaces>(&())?;
    client.call::<cmd::GuestGetVcpus>(&())?;
    client.call::<cmd::GuestFsfreezeStatus>(&())?;
    decoded_or_agent_error("fsinfo", client.call::<cmd::GuestGetFsinfo>(&()));
    decoded_or_agent_error("disks", client.call::<cmd::GuestGetDisks>(&()));
    decoded_or_agent_error("diskstats", client.call::<cmd::GuestGetDiskstats>(&()));
    decoded_or_agent_error("cpustats", client.call::<cmd::GuestGetCpustats>(&()));
    decoded_or_agent_error(
        "memory-blocks",
        client.call::<cmd::GuestGetMemoryBlocks>(&()),
    );
    decoded_or_agent_error(
        "memory-block-info",
        client.call::<cmd::GuestGetMemoryBlockInfo>(&()),
    );
    assert_eq!(
        client.call::<cmd::GuestSyncDelimited>(&cmd::GuestSyncArgs { id: 7 })?,
        7
    );
    let caps = client.capabilities()?.expect("guest-info is cached");
    assert_eq!(caps.version, info.version);
    if caps.command("guest-get-load").is_none() {
        let err = client.call::<cmd::GuestGetLoad>(&()).unwrap_err();
        assert!(matches!(err, Error::CommandNotSupported { .. }), "{err}");
    }
    if caps.command("guest-network-get-route").is_none() {
        let err = client.call::<cmd::GuestNetworkGetRoute>(&()).unwrap_err();
        assert!(matches!(err, Error::CommandNotSupported { .. }), "{err}");
    }
    // Windows-only: disabled on 7.2, compiled out since 9.1; refused locally either way.
    let err = client.call::<cmd::GuestGetDevices>(&()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandDisabled { .. } | Error::CommandNotSupported { .. }
        ),
        "{err}"
    );
    let raw = client.execute_raw("guest-get-host-name", None)?;
    assert!(raw["host-name"].is_string());
    let err = client
        .call::<cmd::GuestShutdown>(&cmd::GuestShutdownArgs::default())
        .unwrap_err();
    assert!(
        matches!(err, Error::CommandDisabled { .. }),
        "refused locally, never sent: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn files_open_read_write_seek_close() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start() else {
        return Ok(());
    };
    let agent = AsyncClient::connect_unix(qga.socket(), config()).await?;
    let sample = qga.put_file("sample.txt", b"hello qga test file\n");
    let path = sample.to_str().unwrap();

    let h = agent.file_open(path, None).await?;
    assert!(h >= 1000, "qemu-ga handles count from 1000: {h}");
    let head = agent.file_read(h, Some(5)).await?;
    assert_eq!(
        (head.count, head.buf_b64.0.as_slice(), head.eof),
        (5, &b"hello"[..], false)
    );
    assert_eq!(agent.file_position(h).await?, 5);
    let pos = agent
        .file_seek(h, -5, GuestFileWhence::Name(QGASeek::End))
        .await?;
    assert_eq!(pos.position, 15);
    assert_eq!(agent.file_read(h, None).await?.buf_b64.0, b"file\n");
    let eof = agent.file_read(h, None).await?;
    assert!(eof.eof && eof.count == 0);
    agent.file_close(h).await?;
    let err = agent.file_read(h, None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("guest agent error (GenericError): handle '{h}' has not been found")
    );

    let out = qga.files_dir().join("written.bin");
    let data: Vec<u8> = (0..(qga_proto::FILE_CHUNK + 4097))
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    agent.write_file(out.to_str().unwrap(), &data).await?;
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(agent.read_file(out.to_str().unwrap()).await?, data);

    let missing = qga.files_dir().join("missing");
    let err = agent
        .file_open(missing.to_str().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("guest agent error (GenericError): failed to open file '{}' (mode: 'r'): No such file or directory", missing.display())
    );
    // Blocking client too; qemu-ga serves one client at a time on unix-listen.
    drop(agent);
    let mut client = Client::connect_unix(qga.socket(), config())?;
    assert_eq!(client.read_file(path)?, b"hello qga test file\n");
    client.write_file(out.to_str().unwrap(), b"short")?;
    assert_eq!(std::fs::read(&out).unwrap(), b"short");
    Ok(())
}

#[tokio::test]
async fn exec_harmless_programs() -> qga_proto::Result<()> {
    let Some(qga) = QemuGa::start() else {
        return Ok(());
    };
    let agent = AsyncClient::connect_unix(qga.socket(), config()).await?;
    let limit = Some(Duration::from_secs(10));

    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/echo")
                .args(["hello", "qga"])
                .capture(),
            limit,
        )
        .await?;
    assert_eq!(out.stdout, b"hello qga\n");
    assert!(out.success());
    let err = agent.exec_status(out.pid).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest agent error (GenericError): Invalid parameter 'pid'"
    );

    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/sh")
                .args(["-c", "cat; echo err >&2; exit 3"])
                .input("from-stdin\n")
                .capture(),
            limit,
        )
        .await?;
    assert_eq!(
        (out.exitcode, out.stdout.as_slice(), out.stderr.as_slice()),
        (Some(3), &b"from-stdin\n"[..], &b"err\n"[..])
    );

    let out = agent
        .exec_wait(
            cmd::GuestExecArgs::new("/bin/sh").args(["-c", "kill -TERM $$"]),
            limit,
        )
        .await?;
    assert_eq!(out.signal, Some(15));

    let started = agent
        .exec(cmd::GuestExecArgs::new("/bin/sleep").arg("1"))
        .await?;
    assert!(!agent.exec_status(started.pid).await?.exited);
    let done = agent
        .exec_wait(cmd::GuestExecArgs::new("/bin/sleep").arg("0.2"), limit)
        .await?;
    assert!(done.success());
    // Reap the first sleeper so the agent holds nothing of ours.
    loop {
        if agent.exec_status(started.pid).await?.exited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let err = agent
        .exec(cmd::GuestExecArgs::new("/nonexistent/bin"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::GenericError));
    assert!(
        err.to_string().contains("Failed to execute child process"),
        "{err}"
    );

    drop(agent);
    let mut client = Client::connect_unix(qga.socket(), config())?;
    let out = client.exec_wait(
        cmd::GuestExecArgs::new("/bin/echo")
            .arg("blocking")
            .capture(),
        limit,
    )?;
    assert_eq!(out.stdout, b"blocking\n");
    assert_eq!(<cmd::GuestExec as Command>::NAME, "guest-exec");
    Ok(())
}
