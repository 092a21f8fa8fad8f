//! qga-proto's clients against real `qemu-ga`: Debian 12's 7.2 on the machine and Debian 13's
//! 10.0 in the peer root, each started unprivileged with every state-changing RPC blocked.
//! Every read-only command of the 10.0 reference, file I/O, exec with its capture modes, and
//! many callers pipelined on one connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use qga_proto::cmd::{self, Command};
use qga_proto::fake::AgentRelease;
use qga_proto::types::*;
use qga_proto::{AsyncClient, Client, ClientConfig, Error, ErrorClass, GuestAgent, GuestAgentExt};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::qga::QemuGa;

fn config() -> ClientConfig {
    ClientConfig::default()
        .timeout(Duration::from_secs(10))
        .sync_timeout(Duration::from_secs(3))
}

/// Runs `body` against the agent of every selected generation (a missing one is skipped with
/// a notice, and fails under `CI=true`), on a runtime of its own.
fn with_each_agent<F, Fut>(body: F)
where
    F: Fn(QemuGa) -> Fut,
    Fut: Future<Output = ()>,
{
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(agent) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", agent.version());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(body(agent));
    });
}

/// The fake's release matching a real agent's version.
fn release_of(version: &str) -> AgentRelease {
    if version.starts_with("7.2") {
        AgentRelease::Qemu7_2
    } else if version.starts_with("10.0") {
        AgentRelease::Qemu10_0
    } else {
        panic!("no fake release for qemu-ga {version}")
    }
}

/// Commands whose data depends on the machine (sysfs, udev, mounts): they
/// must come back decoded or as an agent error, never as a channel error.
fn decoded_or_agent_error<T: std::fmt::Debug>(what: &str, r: qga_proto::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e @ Error::Agent { .. }) => {
            eprintln!("{what}: agent error on this machine: {e}");
            None
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

fn check_routes(routes: &[GuestNetworkRoute]) {
    for route in routes {
        assert!(matches!(route.version, 4 | 6), "{route:?}");
        if route.version == 6 {
            // 9.1 sends the IPv6 prefix lengths as strings.
            for len in [&route.desprefixlen, &route.srcprefixlen]
                .into_iter()
                .flatten()
            {
                let bits: u32 = len.parse().unwrap_or_else(|_| panic!("{route:?}"));
                assert!(bits <= 128, "{route:?}");
            }
        } else {
            assert!(route.mask.is_some(), "{route:?}");
        }
    }
}

#[test]
fn async_client_runs_every_read_only_command() {
    with_each_agent(|qga| async move {
        let agent: Box<dyn GuestAgent> = Box::new(
            AsyncClient::connect_unix(qga.socket(), config())
                .await
                .expect("connect"),
        );
        let info = agent.info().await.expect("guest-info");
        let release = release_of(&info.version);
        for blocked in vmsdk_tests::qga::BLOCKED_RPCS {
            assert!(!info.is_enabled(blocked), "{blocked} must be disabled");
        }
        agent.ping().await.expect("ping");
        assert_eq!(agent.sync(-42).await.expect("sync"), -42);
        assert_eq!(agent.sync_delimited(4242).await.expect("sync"), 4242);
        assert!(agent.time().await.expect("time") > 1_600_000_000_000_000_000);
        let _zone: GuestTimezone = agent.timezone().await.expect("timezone");
        assert!(!agent.host_name().await.expect("host").host_name.is_empty());
        assert!(agent
            .osinfo()
            .await
            .expect("osinfo")
            .kernel_release
            .is_some());
        let _users: Vec<GuestUser> = agent.users().await.expect("users");
        let ifs = agent.network_interfaces().await.expect("interfaces");
        assert!(ifs.iter().any(|i| i.name == "lo"));
        assert!(!agent.vcpus().await.expect("vcpus").is_empty());
        assert_eq!(
            agent.fsfreeze_status().await.expect("status"),
            GuestFsfreezeStatus::Thawed
        );
        let filesystems = decoded_or_agent_error("fsinfo", agent.fsinfo().await);
        decoded_or_agent_error("disks", agent.disks().await);
        decoded_or_agent_error("diskstats", agent.diskstats().await);
        decoded_or_agent_error("cpustats", agent.cpustats().await);
        decoded_or_agent_error("memory-blocks", agent.memory_blocks().await);
        decoded_or_agent_error("memory-block-info", agent.memory_block_info().await);

        let sized = filesystems
            .unwrap_or_default()
            .into_iter()
            .filter(|fs| fs.total_bytes.is_some())
            .collect::<Vec<_>>();
        match release {
            AgentRelease::Qemu10_0 => {
                let load = agent.load().await.expect("guest-get-load (10.0)");
                assert!(load.load1m >= 0.0 && load.load15m >= 0.0, "{load:?}");
                let routes = agent.network_routes().await.expect("route (9.1)");
                check_routes(&routes);
                // 9.1: the capacity for privileged users, beside the unprivileged one.
                assert!(
                    sized.iter().all(|fs| fs.total_bytes_privileged.is_some()),
                    "{sized:?}"
                );
            }
            _ => {
                for (name, result) in [
                    ("guest-get-load", agent.load().await.map(drop)),
                    (
                        "guest-network-get-route",
                        agent.network_routes().await.map(drop),
                    ),
                ] {
                    assert!(
                        matches!(
                            result,
                            Err(Error::CommandNotSupported { since: Some(_), .. })
                        ),
                        "{name}: {result:?}"
                    );
                }
                assert!(sized.iter().all(|fs| fs.total_bytes_privileged.is_none()));
            }
        }

        // Disabled by -b: refused locally, with the configuration as the remedy.
        let err = agent.ssh_authorized_keys("nobody").await.unwrap_err();
        assert!(matches!(err, Error::CommandDisabled { .. }), "{err}");
        // Windows-only: a disabled stub in 7.2, left out since 9.1; no upgrade helps either way.
        let err = agent.devices().await.unwrap_err();
        assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");
        assert!(!err.to_string().contains("upgrade"), "{err}");
    });
}

#[test]
fn blocking_client_runs_every_read_only_command() {
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        let mut client = Client::connect_unix(qga.socket(), config()).expect("connect");
        let info = client.call::<cmd::GuestInfo>(&()).expect("info");
        assert!(info.is_enabled("guest-get-osinfo"));
        client.call::<cmd::GuestPing>(&()).expect("ping");
        assert_eq!(
            client
                .call::<cmd::GuestSync>(&cmd::GuestSyncArgs { id: 99 })
                .expect("sync"),
            99
        );
        assert!(!client
            .call::<cmd::GuestGetHostName>(&())
            .expect("host")
            .host_name
            .is_empty());
        assert!(client
            .call::<cmd::GuestGetOsinfo>(&())
            .expect("os")
            .machine
            .is_some());
        assert!(client.call::<cmd::GuestGetTime>(&()).expect("time") > 0);
        client.call::<cmd::GuestGetTimezone>(&()).expect("zone");
        client.call::<cmd::GuestGetUsers>(&()).expect("users");
        client
            .call::<cmd::GuestNetworkGetInterfaces>(&())
            .expect("interfaces");
        client.call::<cmd::GuestGetVcpus>(&()).expect("vcpus");
        client
            .call::<cmd::GuestFsfreezeStatus>(&())
            .expect("status");
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
            client
                .call::<cmd::GuestSyncDelimited>(&cmd::GuestSyncArgs { id: 7 })
                .expect("sync"),
            7
        );
        let caps = client
            .capabilities()
            .expect("caps")
            .expect("guest-info is cached");
        assert_eq!(caps.version, info.version);
        match release_of(&caps.version) {
            AgentRelease::Qemu10_0 => {
                let load = client.call::<cmd::GuestGetLoad>(&()).expect("load");
                assert!(load.load5m >= 0.0);
                check_routes(
                    &client
                        .call::<cmd::GuestNetworkGetRoute>(&())
                        .expect("routes"),
                );
            }
            _ => {
                let err = client.call::<cmd::GuestGetLoad>(&()).unwrap_err();
                assert!(matches!(err, Error::CommandNotSupported { .. }), "{err}");
                let err = client.call::<cmd::GuestNetworkGetRoute>(&()).unwrap_err();
                assert!(matches!(err, Error::CommandNotSupported { .. }), "{err}");
            }
        }
        let err = client.call::<cmd::GuestGetDevices>(&()).unwrap_err();
        assert!(matches!(err, Error::CommandUnavailable { .. }), "{err}");
        let raw = client
            .execute_raw("guest-get-host-name", None)
            .expect("raw");
        assert!(raw["host-name"].is_string());
        let err = client
            .call::<cmd::GuestShutdown>(&cmd::GuestShutdownArgs::default())
            .unwrap_err();
        assert!(
            matches!(err, Error::CommandDisabled { .. }),
            "refused locally, never sent: {err}"
        );
    });
}

#[test]
fn files_open_read_write_seek_close() {
    with_each_agent(|qga| async move {
        let agent = AsyncClient::connect_unix(qga.socket(), config())
            .await
            .expect("connect");
        let sample = qga.put_file("sample.txt", b"hello qga test file\n");
        let path = sample.to_str().unwrap();

        let h = agent.file_open(path, None).await.expect("open");
        assert!(h >= 1000, "qemu-ga handles count from 1000: {h}");
        let head = agent.file_read(h, Some(5)).await.expect("read");
        assert_eq!(
            (head.count, head.buf_b64.0.as_slice(), head.eof),
            (5, &b"hello"[..], false)
        );
        assert_eq!(agent.file_position(h).await.expect("tell"), 5);
        let pos = agent
            .file_seek(h, -5, GuestFileWhence::Name(QGASeek::End))
            .await
            .expect("seek");
        assert_eq!(pos.position, 15);
        assert_eq!(
            agent.file_read(h, None).await.expect("read").buf_b64.0,
            b"file\n"
        );
        let eof = agent.file_read(h, None).await.expect("read");
        assert!(eof.eof && eof.count == 0);
        agent.file_close(h).await.expect("close");
        let err = agent.file_read(h, None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("guest agent error (GenericError): handle '{h}' has not been found")
        );

        let out = qga.files_dir().join("written.bin");
        let data: Vec<u8> = (0..(qga_proto::FILE_CHUNK + 4097))
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        agent
            .write_file(out.to_str().unwrap(), &data)
            .await
            .expect("write");
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(
            agent.read_file(out.to_str().unwrap()).await.expect("read"),
            data
        );

        let missing = qga.files_dir().join("missing");
        let err = agent
            .file_open(missing.to_str().unwrap(), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "guest agent error (GenericError): failed to open file '{}' (mode: 'r'): No \
                 such file or directory",
                missing.display()
            )
        );
        // Blocking client too; qemu-ga serves one client at a time on unix-listen.
        agent.close().await;
        let mut client = Client::connect_unix(qga.socket(), config()).expect("connect");
        assert_eq!(
            client.read_file(path).expect("read"),
            b"hello qga test file\n"
        );
        client
            .write_file(out.to_str().unwrap(), b"short")
            .expect("write");
        assert_eq!(std::fs::read(&out).unwrap(), b"short");
    });
}

#[test]
fn exec_harmless_programs() {
    with_each_agent(|qga| async move {
        let agent = AsyncClient::connect_unix(qga.socket(), config())
            .await
            .expect("connect");
        let release = release_of(&agent.info().await.expect("info").version);
        let limit = Some(Duration::from_secs(10));

        let out = agent
            .exec_wait(
                cmd::GuestExecArgs::new("/bin/echo")
                    .args(["hello", "qga"])
                    .capture(),
                limit,
            )
            .await
            .expect("echo");
        assert_eq!(out.stdout, b"hello qga\n");
        assert!(out.success());
        // Reported once; then the agent has forgotten the process, in its own words.
        let err = agent.exec_status(out.pid).await.unwrap_err();
        let forgotten = match release {
            AgentRelease::Qemu10_0 => "PID ld does not exist",
            _ => "Invalid parameter 'pid'",
        };
        assert_eq!(
            err.to_string(),
            format!("guest agent error (GenericError): {forgotten}")
        );

        let out = agent
            .exec_wait(
                cmd::GuestExecArgs::new("/bin/sh")
                    .args(["-c", "cat; echo err >&2; exit 3"])
                    .input("from-stdin\n")
                    .capture(),
                limit,
            )
            .await
            .expect("sh");
        assert_eq!(
            (out.exitcode, out.stdout.as_slice(), out.stderr.as_slice()),
            (Some(3), &b"from-stdin\n"[..], &b"err\n"[..])
        );

        // Capture modes: `separated` works everywhere (sent as `true` before 8.1); `merged`
        // needs 8.1 and is refused before sending to an older agent.
        let both = || cmd::GuestExecArgs::new("/bin/sh").args(["-c", "echo out; echo err >&2"]);
        let out = agent
            .exec_wait(
                both().capture_mode(GuestExecCaptureOutputMode::Separated),
                limit,
            )
            .await
            .expect("separated");
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        let merged = agent
            .exec_wait(
                both().capture_mode(GuestExecCaptureOutputMode::Merged),
                limit,
            )
            .await;
        match release {
            AgentRelease::Qemu10_0 => {
                let out = merged.expect("merged");
                assert_eq!(out.stdout, b"out\nerr\n");
                assert!(out.stderr.is_empty());
                let out = agent
                    .exec_wait(both().capture_mode(GuestExecCaptureOutputMode::None), limit)
                    .await
                    .expect("none");
                assert!(out.stdout.is_empty() && out.success());
            }
            _ => {
                let err = merged.unwrap_err();
                assert!(
                    matches!(err, Error::ArgumentNotSupported { since: (8, 1), .. }),
                    "{err}"
                );
            }
        }

        let out = agent
            .exec_wait(
                cmd::GuestExecArgs::new("/bin/sh").args(["-c", "kill -TERM $$"]),
                limit,
            )
            .await
            .expect("kill");
        assert_eq!(out.signal, Some(15));

        let started = agent
            .exec(cmd::GuestExecArgs::new("/bin/sleep").arg("1"))
            .await
            .expect("sleep");
        assert!(!agent.exec_status(started.pid).await.expect("status").exited);
        let done = agent
            .exec_wait(cmd::GuestExecArgs::new("/bin/sleep").arg("0.2"), limit)
            .await
            .expect("sleep");
        assert!(done.success());
        // Reap the first sleeper so the agent holds nothing of ours.
        while !agent.exec_status(started.pid).await.expect("status").exited {
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

        agent.close().await;
        let mut client = Client::connect_unix(qga.socket(), config()).expect("connect");
        let out = client
            .exec_wait(
                cmd::GuestExecArgs::new("/bin/echo")
                    .arg("blocking")
                    .capture(),
                limit,
            )
            .expect("echo");
        assert_eq!(out.stdout, b"blocking\n");
        assert_eq!(<cmd::GuestExec as Command>::NAME, "guest-exec");
    });
}

#[test]
fn many_callers_pipelined_on_one_connection() {
    with_each_agent(|qga| async move {
        let agent = Arc::new(
            AsyncClient::connect_unix(qga.socket(), config())
                .await
                .expect("connect"),
        );
        let tasks: Vec<_> = (0..300i64)
            .map(|i| {
                let agent = agent.clone();
                tokio::spawn(async move {
                    match i % 3 {
                        0 => assert_eq!(agent.sync(i).await.expect("sync"), i),
                        1 => assert!(agent.time().await.expect("time") > 0),
                        _ => assert!(!agent.host_name().await.expect("host").host_name.is_empty()),
                    }
                })
            })
            .collect();
        // One caller whose patience runs out mid-stream: its timeout, and the resync after
        // it, cost the others nothing.
        let hasty = agent
            .execute("guest-get-fsinfo", None, Some(Duration::from_millis(1)))
            .await;
        if let Err(e) = &hasty {
            assert!(matches!(e, Error::Timeout { .. }), "{e}");
        }
        for task in tasks {
            task.await.expect("caller");
        }
        assert_eq!(agent.sync(77).await.expect("sync after the storm"), 77);
        drop(agent);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut qga = qga;
        assert!(qga.is_running(), "qemu-ga exited; log:\n{}", qga.log());
    });
}

/// `vmsdk agent URI devices` against a Linux agent: the command is not in its build, and the
/// message says so instead of advising an upgrade; `exec --capture merged` works from 8.1 and
/// is refused with the reason before.
#[test]
fn cli_tells_a_platform_gap_from_a_too_old_agent() {
    let Some(vmsdk) = vmsdk_tests::vmsdk_binary() else {
        return;
    };
    for_each_generation(&["qemu-ga"], |generation| {
        let Some(qga) = QemuGa::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qga.version());
        let uri = format!("qga+unix://{}", qga.socket().display());
        let run = |args: &[&str]| {
            std::process::Command::new(&vmsdk)
                .arg("agent")
                .arg(&uri)
                .args(args)
                .output()
                .expect("run vmsdk")
        };
        let out = run(&["devices"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("only in its builds for Windows guests"),
            "{stderr}"
        );
        assert!(!stderr.contains("upgrade qemu-ga in the guest"), "{stderr}");

        let out = run(&["load"]);
        let merged = run(&[
            "exec",
            "--capture",
            "merged",
            "/bin/sh",
            "-c",
            "echo out; echo err >&2",
        ]);
        if generation.name() == "host" {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("which QEMU 10.0 added; upgrade qemu-ga"),
                "{stderr}"
            );
            let stderr = String::from_utf8_lossy(&merged.stderr);
            assert!(!merged.status.success());
            assert!(stderr.contains("capture-output \"merged\""), "{stderr}");
        } else {
            vmsdk_tests::assert_success(&out, "vmsdk agent load");
            assert!(
                merged.status.success(),
                "{}",
                String::from_utf8_lossy(&merged.stderr)
            );
            assert_eq!(merged.stdout, b"out\nerr\n");
        }
    });
}
