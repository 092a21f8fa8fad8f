//! qmp-proto's blocking client against real QEMU: Debian 12's 7.2 on the machine and Debian
//! 13's 10.0 in the peer root, each started paused with no machine (`-S -machine none`) and a
//! QMP socket in the test's directory. Run state and events, block nodes, dirty bitmaps,
//! transactions, `blockdev-create` jobs, NBD exports, backup jobs with cancel and dismiss, and
//! QEMU's own error classes. Every QEMU is killed by PID when its test ends.

use std::time::Duration;

use qmp_proto::cmd::{self, *};
use qmp_proto::types::*;
use qmp_proto::{
    Client, ClientConfig, Error, ErrorClass, EventFilter, JobOptions, Monitor, MonitorExt,
};
use vmsdk_tests::peers::{for_each_generation, Generation};
use vmsdk_tests::qemu::Qemu;

fn config() -> ClientConfig {
    ClientConfig::default()
        .handshake_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
}

/// Runs `body` against a fresh QEMU of every selected generation (a missing one is skipped
/// with a notice, and fails under `CI=true`).
fn with_each_qemu(body: impl Fn(&Qemu, &mut Client)) {
    let ran = for_each_generation(&["qemu-system-x86_64"], |generation: Generation| {
        let Some(qemu) = Qemu::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qemu.version());
        let mut client = Client::connect(&qemu.address(), config()).expect("connect to QEMU");
        body(&qemu, &mut client);
    });
    eprintln!("generations run: {ran:?}");
}

fn nodes(client: &mut Client) -> Vec<BlockDeviceInfo> {
    client
        .call::<QueryNamedBlockNodes>(&QueryNamedBlockNodesArgs::flat())
        .expect("query-named-block-nodes")
}

fn bitmaps_of(client: &mut Client, node: &str) -> Vec<BlockDirtyInfo> {
    nodes(client)
        .into_iter()
        .find(|n| n.node_name.as_deref() == Some(node))
        .unwrap_or_else(|| panic!("node {node} missing"))
        .dirty_bitmaps
        .unwrap_or_default()
}

#[track_caller]
fn assert_qmp_error<T: std::fmt::Debug>(
    result: qmp_proto::Result<T>,
    class: ErrorClass,
    desc: &str,
) {
    match result {
        Err(Error::Qmp {
            class: got,
            desc: text,
            ..
        }) => {
            assert_eq!(got, class, "{text}");
            assert!(text.contains(desc), "{text:?} does not contain {desc:?}");
        }
        other => panic!("expected a {class} error, got {other:?}"),
    }
}

#[test]
fn greeting_status_version_and_run_state_events() {
    with_each_qemu(|qemu, client| {
        let greeting = client.greeting().clone();
        let version = client.call::<QueryVersion>(&()).unwrap();
        assert_eq!(version, greeting.version);
        assert!(
            qemu.version().contains(&version.qemu.to_string()),
            "{} vs {}",
            qemu.version(),
            version.qemu
        );
        assert!(greeting.offers_oob(), "upstream QEMU offers oob");
        assert!(!client.oob_enabled(), "oob stays off unless asked for");

        let status = client.call::<QueryStatus>(&()).unwrap();
        assert_eq!(status.status, RunState::Prelaunch);
        assert!(!status.running);
        // 10.0 dropped `singlestep` from query-status.
        assert_eq!(
            status.singlestep.is_some(),
            version.qemu.major < 10,
            "{status:?}"
        );

        // RESUME and STOP are raised while `cont` and `stop` run, before their replies: the
        // subscription keeps them.
        let run_state = client
            .subscribe(EventFilter::names(["STOP", "RESUME"]))
            .unwrap();
        let other = client.subscribe(EventFilter::names(["SHUTDOWN"])).unwrap();
        client.call::<Cont>(&()).unwrap();
        assert!(client.call::<QueryStatus>(&()).unwrap().running);
        client.call::<Stop>(&()).unwrap();
        assert_eq!(
            client.call::<QueryStatus>(&()).unwrap().status,
            RunState::Paused
        );
        let first = client
            .next_event(run_state, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        let second = client
            .next_event(run_state, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            (first.event.as_str(), second.event.as_str()),
            ("RESUME", "STOP")
        );
        assert!(first.timestamp.seconds > 1_600_000_000, "{first:?}");
        assert_eq!(
            client.next_event(other, Duration::from_millis(50)).unwrap(),
            None
        );

        // QEMU's own error classes come through with its text.
        assert_qmp_error(
            client.execute_raw("no-such-command", None),
            ErrorClass::CommandNotFound,
            "no-such-command",
        );
        assert_qmp_error(
            client.call::<QueryBalloon>(&()),
            ErrorClass::DeviceNotActive,
            "balloon",
        );
        assert_qmp_error(
            client.call::<QomGet>(&QomGetArgs::balloon_guest_stats("balloon0")),
            ErrorClass::DeviceNotFound,
            "balloon0",
        );
        let hmp = client
            .call::<HumanMonitorCommand>(&HumanMonitorCommandArgs::new("info status"))
            .unwrap();
        assert!(hmp.contains("paused"), "{hmp:?}");
        let commands = client.call::<QueryCommands>(&()).unwrap();
        for (name, _) in cmd::COMMANDS {
            assert!(
                commands.iter().any(|c| c.name == *name),
                "QEMU {} lacks {name}",
                version.qemu
            );
        }
    });
}

#[test]
fn block_nodes_and_dirty_bitmaps() {
    with_each_qemu(|_qemu, client| {
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("disk0", 64 << 20))
            .unwrap();
        let node = nodes(client)
            .into_iter()
            .find(|n| n.node_name.as_deref() == Some("disk0"))
            .expect("disk0 listed");
        assert_eq!(node.drv, "null-co");
        assert_eq!(node.image.virtual_size, 64 << 20);
        assert!(!node.ro);

        client
            .call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("disk0", "b0"))
            .unwrap();
        client
            .call::<BlockDirtyBitmapAdd>(
                &BlockDirtyBitmapAddArgs::new("disk0", "b1")
                    .granularity(1 << 20)
                    .disabled(true),
            )
            .unwrap();
        let bitmaps = bitmaps_of(client, "disk0");
        let b0 = bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some("b0"))
            .unwrap();
        let b1 = bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some("b1"))
            .unwrap();
        assert!(b0.recording && !b1.recording, "{bitmaps:?}");
        assert_eq!(b1.granularity, 1 << 20);
        assert_eq!((b0.count, b0.persistent, b0.busy), (0, false, false));

        // Merge by name and by node/name pair, then toggle and clear.
        client
            .call::<BlockDirtyBitmapMerge>(&BlockDirtyBitmapMergeArgs {
                node: "disk0".into(),
                target: "b1".into(),
                bitmaps: vec![
                    "b0".into(),
                    BitmapRef::Node {
                        node: "disk0".into(),
                        name: "b0".into(),
                    },
                ],
            })
            .unwrap();
        let b1 = BlockDirtyBitmap::new("disk0", "b1");
        client.call::<BlockDirtyBitmapEnable>(&b1).unwrap();
        assert!(bitmaps_of(client, "disk0").iter().all(|b| b.recording));
        client.call::<BlockDirtyBitmapDisable>(&b1).unwrap();
        client.call::<BlockDirtyBitmapClear>(&b1).unwrap();

        assert_qmp_error(
            client.call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("disk0", "b0")),
            ErrorClass::GenericError,
            "Bitmap already exists: b0",
        );
        assert_qmp_error(
            client.call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("nope", "b0")),
            ErrorClass::GenericError,
            "nope",
        );
        assert_qmp_error(
            client.call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new("disk0", "zz")),
            ErrorClass::GenericError,
            "Dirty bitmap 'zz' not found",
        );

        client
            .call::<BlockDirtyBitmapRemove>(&BlockDirtyBitmap::new("disk0", "b0"))
            .unwrap();
        client.call::<BlockDirtyBitmapRemove>(&b1).unwrap();
        assert!(bitmaps_of(client, "disk0").is_empty());

        let stats = client
            .call::<QueryBlockstats>(&QueryBlockstatsArgs {
                query_nodes: Some(true),
            })
            .unwrap();
        let disk = stats
            .iter()
            .find(|s| s.node_name.as_deref() == Some("disk0"))
            .expect("disk0 in query-blockstats");
        assert_eq!(disk.stats.wr_bytes, 0);
        assert!(
            client.call::<QueryBlock>(&()).unwrap().is_empty(),
            "no devices"
        );

        client
            .call::<BlockdevDel>(&BlockdevDelArgs {
                node_name: "disk0".into(),
            })
            .unwrap();
        assert!(nodes(client).is_empty());
    });
}

#[test]
fn transactions_are_all_or_nothing() {
    with_each_qemu(|_qemu, client| {
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("disk0", 1 << 20))
            .unwrap();
        client
            .call::<Transaction>(&TransactionArgs::new(vec![
                TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAddArgs::new(
                    "disk0", "chk1",
                )),
                TransactionAction::BlockDirtyBitmapAdd(
                    BlockDirtyBitmapAddArgs::new("disk0", "view").disabled(true),
                ),
                TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMergeArgs {
                    node: "disk0".into(),
                    target: "view".into(),
                    bitmaps: vec!["chk1".into()],
                }),
            ]))
            .unwrap();
        let names = |client: &mut Client| {
            let mut names: Vec<String> = bitmaps_of(client, "disk0")
                .into_iter()
                .filter_map(|b| b.name)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(client), ["chk1", "view"]);

        // The second action fails (the bitmap exists), so the first is undone.
        assert_qmp_error(
            client.call::<Transaction>(&TransactionArgs::new(vec![
                TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAddArgs::new(
                    "disk0", "chk2",
                )),
                TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAddArgs::new(
                    "disk0", "chk1",
                )),
            ])),
            ErrorClass::GenericError,
            "Bitmap already exists: chk1",
        );
        assert_eq!(names(client), ["chk1", "view"]);
    });
}

#[test]
fn blockdev_create_runs_as_a_job_and_reports_its_error() {
    with_each_qemu(|qemu, client| {
        let path = qemu.dir().join("scratch.qcow2");
        let path = path.to_str().unwrap();
        let options = JobOptions::default().timeout(Duration::from_secs(60));
        client
            .run_job("create-file", &options, |m| {
                m.call::<BlockdevCreate>(&BlockdevCreateArgs {
                    job_id: "create-file".into(),
                    options: BlockdevCreateOptions::file(path, 0),
                })
                .map(drop)
            })
            .unwrap();
        client
            .call::<BlockdevAdd>(&BlockdevOptions::file("scratch-file", path))
            .unwrap();
        let info = client
            .run_job("create-qcow2", &options, |m| {
                m.call::<BlockdevCreate>(&BlockdevCreateArgs {
                    job_id: "create-qcow2".into(),
                    options: BlockdevCreateOptions::qcow2("scratch-file", 16 << 20),
                })
                .map(drop)
            })
            .unwrap()
            .expect("blockdev-create jobs wait for job-dismiss");
        assert_eq!(info.kind, JobType::Create);
        assert_eq!(info.status, JobStatus::Concluded);
        assert!(
            client.call::<QueryJobs>(&()).unwrap().is_empty(),
            "the helper dismissed the job"
        );
        client
            .call::<BlockdevAdd>(&BlockdevOptions::qcow2("scratch", "scratch-file"))
            .unwrap();
        let node = nodes(client)
            .into_iter()
            .find(|n| n.node_name.as_deref() == Some("scratch"))
            .unwrap();
        assert_eq!(node.image.format, "qcow2");
        assert_eq!(node.image.virtual_size, 16 << 20);
        assert_eq!(node.image.cluster_size, Some(65536));

        // The job fails in QEMU (the cluster size is checked when it runs): the helper
        // returns the job's own error from query-jobs and still dismisses it.
        let failed = client.run_job("bad-create", &options, |m| {
            m.call::<BlockdevCreate>(&BlockdevCreateArgs {
                job_id: "bad-create".into(),
                options: BlockdevCreateOptions::qcow2("scratch-file", 1 << 20)
                    .option("cluster-size", 1000),
            })
            .map(drop)
        });
        match failed {
            Err(Error::JobFailed { job, error }) => {
                assert_eq!(job, "bad-create");
                assert!(error.contains("luster size"), "{error}");
            }
            other => panic!("expected the job's error, got {other:?}"),
        }
        assert!(client.call::<QueryJobs>(&()).unwrap().is_empty());
    });
}

#[test]
fn nbd_exports_with_bitmaps() {
    with_each_qemu(|qemu, client| {
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("disk0", 1 << 20))
            .unwrap();
        client
            .call::<BlockDirtyBitmapAdd>(&BlockDirtyBitmapAddArgs::new("disk0", "live"))
            .unwrap();
        client
            .call::<BlockDirtyBitmapAdd>(
                &BlockDirtyBitmapAddArgs::new("disk0", "frozen").disabled(true),
            )
            .unwrap();
        let socket = qemu.dir().join("nbd.sock");
        client
            .call::<NbdServerStart>(&NbdServerStartArgs::unix(socket.to_str().unwrap()))
            .unwrap();
        assert!(socket.exists());

        // Both releases refuse an enabled bitmap on a read-only export.
        assert_qmp_error(
            client.call::<BlockExportAdd>(&BlockExportAddArgs::nbd("e0", "disk0").bitmap("live")),
            ErrorClass::GenericError,
            "Enabled bitmap 'live' incompatible with readonly export",
        );
        client
            .call::<BlockExportAdd>(
                &BlockExportAddArgs::nbd("e0", "disk0")
                    .name("disk")
                    .bitmap("frozen")
                    .allocation_depth(true),
            )
            .unwrap();
        let exports = client.call::<QueryBlockExports>(&()).unwrap();
        assert_eq!(
            exports,
            [BlockExportInfo {
                id: "e0".into(),
                kind: "nbd".into(),
                node_name: "disk0".into(),
                shutting_down: false,
            }]
        );
        let bitmaps = bitmaps_of(client, "disk0");
        assert!(
            bitmaps
                .iter()
                .any(|b| b.name.as_deref() == Some("frozen") && b.busy),
            "an exported bitmap is busy: {bitmaps:?}"
        );

        let deleted = client
            .subscribe(EventFilter::names([
                qmp_proto::events::BLOCK_EXPORT_DELETED,
            ]))
            .unwrap();
        client
            .call::<BlockExportDel>(&BlockExportDelArgs::new("e0"))
            .unwrap();
        let event = client
            .next_event(deleted, Duration::from_secs(5))
            .unwrap()
            .expect("BLOCK_EXPORT_DELETED");
        let data: qmp_proto::events::BlockExportDeleted = event.data_as().unwrap();
        assert_eq!(data.id, "e0");
        assert!(client.call::<QueryBlockExports>(&()).unwrap().is_empty());
        client.call::<NbdServerStop>(&()).unwrap();
    });
}

#[test]
fn backup_job_sync_none_cancel_and_dismiss() {
    with_each_qemu(|_qemu, client| {
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("source", 64 << 20))
            .unwrap();
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("target", 64 << 20))
            .unwrap();
        let jobs = client
            .subscribe(EventFilter::names(
                qmp_proto::events::JOB_EVENTS.iter().copied(),
            ))
            .unwrap();
        // A sync=none backup copies only what the guest overwrites: it runs until cancelled.
        client
            .call::<Transaction>(&TransactionArgs::new(vec![
                TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAddArgs::new(
                    "source", "chk",
                )),
                TransactionAction::BlockdevBackup(
                    BlockdevBackupArgs::new("fleece", "source", "target", SyncMode::None)
                        .auto_dismiss(false),
                ),
            ]))
            .unwrap();
        let block_jobs = client.call::<QueryBlockJobs>(&()).unwrap();
        assert_eq!(block_jobs.len(), 1, "{block_jobs:?}");
        assert_eq!(block_jobs[0].device, "fleece");
        assert_eq!(block_jobs[0].kind, JobType::Backup);
        assert!(!block_jobs[0].auto_dismiss);
        let running = client
            .next_event(jobs, Duration::from_secs(5))
            .unwrap()
            .expect("JOB_STATUS_CHANGE");
        assert_eq!(running.event, "JOB_STATUS_CHANGE");

        client
            .cancel_block_job(
                "fleece",
                &JobOptions::default().timeout(Duration::from_secs(30)),
            )
            .unwrap();
        assert!(client.call::<QueryJobs>(&()).unwrap().is_empty());
        assert!(client.call::<QueryBlockJobs>(&()).unwrap().is_empty());
        assert_qmp_error(
            client.call::<BlockJobCancel>(&BlockJobCancelArgs::new("fleece")),
            ErrorClass::DeviceNotActive,
            "fleece",
        );
        assert_qmp_error(
            client.call::<JobDismiss>(&JobId::new("fleece")),
            ErrorClass::GenericError,
            "not found",
        );
    });
}

#[test]
fn async_client_runs_calls_together_and_streams_events() {
    for_each_generation(&["qemu-system-x86_64"], |generation| {
        let Some(qemu) = Qemu::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qemu.version());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let client = qmp_proto::AsyncClient::connect(&qemu.address(), config())
                    .await
                    .unwrap();
                let mut run_state = client
                    .subscribe(EventFilter::names(["STOP", "RESUME"]))
                    .await
                    .unwrap();
                let flat = QueryNamedBlockNodesArgs::flat();
                let (status, version, nodes, jobs) = tokio::join!(
                    client.call::<QueryStatus>(&()),
                    client.call::<QueryVersion>(&()),
                    client.call::<QueryNamedBlockNodes>(&flat),
                    client.call::<QueryJobs>(&()),
                );
                assert_eq!(status.unwrap().status, RunState::Prelaunch);
                assert_eq!(version.unwrap(), client.greeting().version);
                assert!(nodes.unwrap().is_empty());
                assert!(jobs.unwrap().is_empty());
                client.call::<Cont>(&()).await.unwrap();
                client.call::<Stop>(&()).await.unwrap();
                let mut seen = Vec::new();
                for _ in 0..2 {
                    let event = run_state
                        .next(Duration::from_secs(5))
                        .await
                        .unwrap()
                        .unwrap();
                    seen.push(event.event);
                }
                assert_eq!(seen, ["RESUME", "STOP"]);
                let err = client
                    .execute("no-such-command", None, None)
                    .await
                    .unwrap_err();
                assert_eq!(err.class(), Some(&ErrorClass::CommandNotFound));

                // blockdev-create jobs followed from their events: a good one, then a failing
                // one whose own error comes back.
                let path = qemu.dir().join("async.qcow2");
                let path = path.to_str().unwrap();
                let options = JobOptions::default().timeout(Duration::from_secs(60));
                let job = client.follow_job("create-file").await.unwrap();
                client
                    .call::<BlockdevCreate>(&BlockdevCreateArgs {
                        job_id: "create-file".into(),
                        options: BlockdevCreateOptions::file(path, 0),
                    })
                    .await
                    .unwrap();
                let info = job.wait(&client, &options).await.unwrap().unwrap();
                assert_eq!(info.kind, JobType::Create);
                client
                    .call::<BlockdevAdd>(&BlockdevOptions::file("async-file", path))
                    .await
                    .unwrap();
                let job = client.follow_job("bad-create").await.unwrap();
                client
                    .call::<BlockdevCreate>(&BlockdevCreateArgs {
                        job_id: "bad-create".into(),
                        options: BlockdevCreateOptions::qcow2("async-file", 1 << 20)
                            .option("cluster-size", 1000),
                    })
                    .await
                    .unwrap();
                match job.wait(&client, &options).await {
                    Err(Error::JobFailed { error, .. }) => {
                        assert!(error.contains("luster size"), "{error}")
                    }
                    other => panic!("expected the job's error, got {other:?}"),
                }
                assert!(client.call::<QueryJobs>(&()).await.unwrap().is_empty());
                // A mirror, completed by the follower once it is ready.
                for node in ["mirror-source", "mirror-target"] {
                    client
                        .call::<BlockdevAdd>(&BlockdevOptions::null_co(node, 8 << 20))
                        .await
                        .unwrap();
                }
                let job = client.follow_job("async-mirror").await.unwrap();
                client
                    .execute(
                        "blockdev-mirror",
                        Some(serde_json::json!({
                            "job-id": "async-mirror", "device": "mirror-source",
                            "target": "mirror-target", "sync": "full",
                        })),
                        None,
                    )
                    .await
                    .unwrap();
                assert_eq!(job.wait(&client, &options).await.unwrap(), None);
                assert!(client.call::<QueryJobs>(&()).await.unwrap().is_empty());
            });
    });
}

#[test]
fn run_job_finalizes_a_pending_backup_and_returns_its_info() {
    with_each_qemu(|_qemu, client| {
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("source", 8 << 20))
            .unwrap();
        client
            .call::<BlockdevAdd>(&BlockdevOptions::null_co("target", 8 << 20))
            .unwrap();
        // auto-finalize off: the job waits in `pending` until the helper finalizes it.
        let info = client
            .run_job(
                "full",
                &JobOptions::default().timeout(Duration::from_secs(60)),
                |m| {
                    m.call::<BlockdevBackup>(
                        &BlockdevBackupArgs::new("full", "source", "target", SyncMode::Full)
                            .auto_finalize(false)
                            .auto_dismiss(false),
                    )
                    .map(drop)
                },
            )
            .unwrap()
            .expect("a job without auto-dismiss stays listed until dismissed");
        assert_eq!(info.kind, JobType::Backup);
        assert_eq!(info.status, JobStatus::Concluded);
        assert_eq!(info.current_progress, info.total_progress);
        assert_eq!(info.error, None);
        assert!(client.call::<QueryJobs>(&()).unwrap().is_empty());
    });
}

/// A mirror reaches `ready` and stays there until someone sends `job-complete`: the helper
/// does (by default) and the job ends; told not to, it waits until its timeout with the job
/// still `ready`, and is then cancelled.
#[test]
fn run_job_completes_a_ready_mirror() {
    with_each_qemu(|_qemu, client| {
        for node in ["source", "target", "source2", "target2"] {
            client
                .call::<BlockdevAdd>(&BlockdevOptions::null_co(node, 8 << 20))
                .unwrap();
        }
        let mirror = |job: &'static str, source: &'static str, target: &'static str| {
            move |m: &mut Client| {
                m.execute_raw(
                    "blockdev-mirror",
                    Some(serde_json::json!({
                        "job-id": job, "device": source, "target": target, "sync": "full",
                    })),
                )
                .map(drop)
            }
        };
        let options = JobOptions::default().timeout(Duration::from_secs(60));
        let ended = client
            .run_job("mirror", &options, mirror("mirror", "source", "target"))
            .unwrap();
        assert_eq!(ended, None, "a mirror dismisses itself once complete");
        assert!(client.call::<QueryJobs>(&()).unwrap().is_empty());

        let waiting = client.run_job(
            "mirror2",
            &options
                .clone()
                .complete(false)
                .timeout(Duration::from_secs(2)),
            mirror("mirror2", "source2", "target2"),
        );
        match waiting {
            Err(Error::JobTimeout { job, status, .. }) => {
                assert_eq!((job.as_str(), status.as_str()), ("mirror2", "ready"));
            }
            other => panic!("expected a timeout in ready, got {other:?}"),
        }
        client.cancel_block_job("mirror2", &options).unwrap();
        assert!(client.call::<QueryJobs>(&()).unwrap().is_empty());
    });
}

/// Runs `vmsdk ARGS`, returning its exit code, standard output and standard error.
fn vmsdk(args: &[&str]) -> Option<(i32, String, String)> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .expect("run vmsdk");
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    ))
}

#[test]
fn vmsdk_qmp_command_line() {
    for_each_generation(&["qemu-system-x86_64"], |generation| {
        let Some(qemu) = Qemu::start_in(generation) else {
            return;
        };
        eprintln!("running against {}", qemu.version());
        let uri = qemu.address();
        let Some((code, out, _)) = vmsdk(&["qmp", &uri, "status"]) else {
            return;
        };
        assert_eq!(code, 0);
        assert!(out.starts_with("prelaunch\nQEMU "), "{out}");

        // Nodes and bitmaps made through `raw`, then listed as tables and as JSON.
        let (code, out, err) = vmsdk(&[
            "qmp",
            &uri,
            "raw",
            "blockdev-add",
            r#"{"driver": "null-co", "node-name": "disk0", "size": 1048576}"#,
        ])
        .unwrap();
        assert_eq!((code, out.trim()), (0, "{}"), "{err}");
        let (code, _, err) = vmsdk(&[
            "qmp",
            &uri,
            "raw",
            "block-dirty-bitmap-add",
            r#"{"node": "disk0", "name": "b0"}"#,
        ])
        .unwrap();
        assert_eq!(code, 0, "{err}");
        let (_, disks, _) = vmsdk(&["qmp", &uri, "disks"]).unwrap();
        let lines: Vec<&str> = disks.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{disks}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&row[..4], ["disk0", "null-co", "1048576", "rw"], "{disks}");
        assert_eq!(row.last(), Some(&"b0"), "{disks}");
        let (_, bitmaps, _) = vmsdk(&["qmp", &uri, "bitmaps", "--json"]).unwrap();
        let bitmaps: serde_json::Value = serde_json::from_str(&bitmaps).unwrap();
        assert_eq!(bitmaps[0]["node"], "disk0");
        assert_eq!(bitmaps[0]["name"], "b0");
        assert_eq!(bitmaps[0]["recording"], true);
        let (_, jobs, _) = vmsdk(&["qmp", &uri, "jobs", "--json"]).unwrap();
        assert_eq!(jobs.trim(), "[]");
        let (_, exports, _) = vmsdk(&["qmp", &uri, "exports"]).unwrap();
        assert_eq!(exports.trim(), "ID  TYPE  NODE  STATE");

        // QEMU's refusal is the message, exit code 1, as `vmsdk agent` does.
        let (code, _, err) = vmsdk(&["qmp", &uri, "raw", "no-such-command"]).unwrap();
        assert_eq!(code, 1);
        assert_eq!(
            err.trim(),
            "vmsdk: QEMU refused no-such-command (CommandNotFound): The command \
             no-such-command has not been found"
        );
        let (code, _, err) = vmsdk(&["qmp", &uri, "raw", "stop", "[1]"]).unwrap();
        assert_eq!(code, 1);
        assert!(err.contains("must be a JSON object"), "{err}");

        // Events of a run-state change made through the second monitor, as JSON lines.
        let events = {
            let uri = uri.clone();
            std::thread::spawn(move || {
                vmsdk(&["qmp", &uri, "events", "--count", "2", "--timeout", "20s"]).unwrap()
            })
        };
        let mut second = Client::connect(&qemu.second_address(), config()).unwrap();
        // The events client subscribes once connected; cont/stop until it has seen both.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !events.is_finished() && std::time::Instant::now() < deadline {
            second.call::<Cont>(&()).unwrap();
            second.call::<Stop>(&()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, out, err) = events.join().unwrap();
        assert_eq!(code, 0, "{err}");
        let names: Vec<String> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].to_string())
            .collect();
        assert_eq!(names.len(), 2, "{out}");
        assert!(
            names.iter().all(|n| n == "\"RESUME\"" || n == "\"STOP\""),
            "{out}"
        );
        let (code, out, _) = vmsdk(&["qmp", &uri, "events", "--timeout", "200ms"]).unwrap();
        assert_eq!(
            (code, out.as_str()),
            (0, ""),
            "a paused VM with no devices is quiet"
        );
        let (code, _, err) = vmsdk(&["qmp", "qmp+unix:///nonexistent/vm.qmp", "status"]).unwrap();
        assert_eq!(code, 1);
        assert!(
            err.starts_with(
                "vmsdk: cannot connect to the QEMU monitor at qmp+unix:///nonexistent/vm.qmp: "
            ),
            "{err}"
        );
    });
}

#[test]
fn vmsdk_qmp_on_the_fake_monitor() {
    let Some((code, out, err)) = vmsdk(&["--backend", "fake", "qmp", "status", "--json"]) else {
        return;
    };
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["status"], "prelaunch");
    assert!(
        status["version"]["qemu"]["major"].as_u64().is_some(),
        "{out}"
    );
    let (code, _, err) = vmsdk(&["qmp", "status"]).unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("name the monitor"), "{err}");
}

#[test]
fn balloon_size_and_guest_stats_through_qom_get() {
    for_each_generation(&["qemu-system-x86_64"], |generation| {
        // A machine with a balloon device; paused (-S), so no guest driver ever reports.
        let Some(qemu) = Qemu::start_with(
            generation,
            &[
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-m",
                "128",
                "-device",
                "virtio-balloon-pci,id=balloon0",
            ],
        ) else {
            return;
        };
        eprintln!("running against {}", qemu.version());
        let mut client = Client::connect(&qemu.address(), config()).unwrap();
        let balloon = client.call::<QueryBalloon>(&()).unwrap();
        assert_eq!(balloon.actual, 128 << 20);
        let stats = client
            .call::<QomGet>(&QomGetArgs::balloon_guest_stats("balloon0"))
            .unwrap();
        let stats: BalloonGuestStats = serde_json::from_value(stats).unwrap();
        // No guest driver has reported: never updated, every statistic QEMU's -1 (u64::MAX).
        assert_eq!(stats.last_update, 0, "{stats:?}");
        assert!(stats.stats.contains_key("stat-free-memory"), "{stats:?}");
        assert!(stats.stats.values().all(|v| *v == u64::MAX), "{stats:?}");
        assert_eq!(stats.reported("stat-free-memory"), None);
        let devices = client.call::<QueryBlock>(&()).unwrap();
        assert!(devices.is_empty(), "-nodefaults: no drives: {devices:?}");
    });
}
