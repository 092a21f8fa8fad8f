//! `vmsdk qmp URI COMMAND`: a running QEMU through its monitor (QMP): run state, block nodes,
//! jobs, NBD exports and dirty bitmaps as tables (or JSON), any command as raw JSON, and the
//! event stream.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use qmp_proto::cmd::{self, QueryNamedBlockNodesArgs};
use qmp_proto::{ClientConfig, EventFilter, Monitor, MonitorExt};
use serde::Serialize;
use vmsdk::BackendChoice;

use crate::CliResult;

#[derive(Debug, Args)]
pub struct QmpArgs {
    /// [URI] COMMAND [ARGS]: the monitor's address (qmp+unix:///path or qmp+tcp://host:port;
    /// omitted with --backend fake) and the command.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    words: Vec<String>,
}

/// The commands, parsed from the words after the URI.
#[derive(Debug, Parser)]
#[command(name = "vmsdk qmp URI", no_binary_name = true)]
struct Invocation {
    /// How long to wait for each reply (1s, 500ms, 2m or seconds).
    #[arg(long, default_value = "30s", value_parser = crate::stats::parse_duration)]
    reply_timeout: Duration,
    #[command(subcommand)]
    command: QmpCommand,
}

#[derive(Debug, Subcommand)]
enum QmpCommand {
    /// Run state: running, paused, prelaunch, ... and the QEMU version.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Block nodes: node name, driver, size, file and dirty bitmaps.
    Disks {
        /// Print JSON (query-named-block-nodes) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Jobs: id, type, status, progress and error.
    Jobs {
        /// Print JSON (query-jobs) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Block exports (NBD, FUSE, vhost-user-blk).
    Exports {
        /// Print JSON (query-block-exports) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Dirty bitmaps of every node: recording, persistent, busy, granularity, dirty bytes.
    Bitmaps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send any command; its reply's "return" is printed as JSON.
    Raw {
        /// The command, e.g. query-block.
        command: String,
        /// Its arguments as a JSON object, e.g. '{"flat": true}'.
        arguments: Option<String>,
    },
    /// Print events as JSON lines as they come.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (1s, 500ms, 2m or seconds); without it, wait for --count
        /// events or forever.
        #[arg(long, value_parser = crate::stats::parse_duration)]
        timeout: Option<Duration>,
    },
}

impl QmpCommand {
    /// Whether `word` is a command name (or an option), so that it is not taken for a URI.
    fn is_command(word: &str) -> bool {
        use clap::CommandFactory;
        word.starts_with('-')
            || word == "help"
            || Invocation::command()
                .get_subcommands()
                .any(|c| c.get_name() == word)
    }
}

pub fn run(backend: BackendChoice, args: &QmpArgs) -> CliResult {
    let (uri, rest) = match args.words.split_first() {
        Some((first, rest)) if !QmpCommand::is_command(first) => (Some(first.as_str()), rest),
        _ => (None, &args.words[..]),
    };
    let invocation = Invocation::try_parse_from(rest).map_err(|e| e.to_string())?;
    let config = ClientConfig::default().timeout(invocation.reply_timeout);
    // The fake is kept alive for as long as its client talks to it.
    let fake;
    let mut monitor: Box<dyn Monitor> = match (uri, backend) {
        (Some(uri), _) => vmsdk::qmp::connect_with(uri, config)?,
        (None, BackendChoice::Fake) => {
            fake = qmp_proto::fake::FakeMonitor::new();
            Box::new(fake.connect_with(config)?)
        }
        (None, _) => {
            return Err(
                "name the monitor: vmsdk qmp qmp+unix:///path/to/vm.qmp COMMAND \
                        (or --backend fake for the fake monitor)"
                    .into(),
            )
        }
    };
    match &invocation.command {
        QmpCommand::Status { json } => {
            let status = monitor.call::<cmd::QueryStatus>(&())?;
            let version = &monitor.greeting().version;
            if *json {
                let mut value = serde_json::to_value(&status)?;
                value["version"] = serde_json::to_value(version)?;
                print_json(&value)?;
            } else {
                println!("{}", status.status);
                println!(
                    "QEMU {}{}",
                    version.qemu,
                    if version.package.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", version.package)
                    }
                );
            }
        }
        QmpCommand::Disks { json } => {
            let nodes = monitor.call::<cmd::QueryNamedBlockNodes>(&flat_if_possible(&*monitor))?;
            if *json {
                print_json(&nodes)?;
            } else {
                let rows = nodes
                    .iter()
                    .map(|n| {
                        let bitmaps: Vec<&str> = n
                            .dirty_bitmaps
                            .iter()
                            .flatten()
                            .filter_map(|b| b.name.as_deref())
                            .collect();
                        vec![
                            n.node_name.clone().unwrap_or_default(),
                            n.drv.clone(),
                            n.image.virtual_size.to_string(),
                            if n.ro { "ro" } else { "rw" }.to_owned(),
                            n.file.clone(),
                            bitmaps.join(","),
                        ]
                    })
                    .collect();
                print_table(&["NODE", "DRIVER", "SIZE", "MODE", "FILE", "BITMAPS"], rows);
            }
        }
        QmpCommand::Jobs { json } => {
            let jobs = monitor.call::<cmd::QueryJobs>(&())?;
            if *json {
                print_json(&jobs)?;
            } else {
                let rows = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.id.clone(),
                            j.kind.to_string(),
                            j.status.to_string(),
                            format!("{}/{}", j.current_progress, j.total_progress),
                            j.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "TYPE", "STATUS", "PROGRESS", "ERROR"], rows);
            }
        }
        QmpCommand::Exports { json } => {
            let exports = monitor.call::<cmd::QueryBlockExports>(&())?;
            if *json {
                print_json(&exports)?;
            } else {
                let rows = exports
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.clone(),
                            e.kind.clone(),
                            e.node_name.clone(),
                            if e.shutting_down {
                                "shutting down"
                            } else {
                                "active"
                            }
                            .to_owned(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "TYPE", "NODE", "STATE"], rows);
            }
        }
        QmpCommand::Bitmaps { json } => {
            let nodes = monitor.call::<cmd::QueryNamedBlockNodes>(&flat_if_possible(&*monitor))?;
            let bitmaps: Vec<BitmapRow> = nodes
                .iter()
                .flat_map(|n| {
                    n.dirty_bitmaps.iter().flatten().map(move |b| BitmapRow {
                        node: n.node_name.clone().unwrap_or_default(),
                        name: b.name.clone().unwrap_or_default(),
                        recording: b.recording,
                        persistent: b.persistent,
                        busy: b.busy,
                        inconsistent: b.inconsistent.unwrap_or(false),
                        granularity: b.granularity,
                        dirty_bytes: b.count,
                    })
                })
                .collect();
            if *json {
                print_json(&bitmaps)?;
            } else {
                let yes = |on: bool| if on { "yes" } else { "no" }.to_owned();
                let rows = bitmaps
                    .iter()
                    .map(|b| {
                        vec![
                            b.node.clone(),
                            b.name.clone(),
                            yes(b.recording),
                            yes(b.persistent),
                            yes(b.busy),
                            yes(b.inconsistent),
                            b.granularity.to_string(),
                            b.dirty_bytes.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "NODE",
                        "BITMAP",
                        "RECORDING",
                        "PERSISTENT",
                        "BUSY",
                        "INCONSISTENT",
                        "GRANULARITY",
                        "DIRTY",
                    ],
                    rows,
                );
            }
        }
        QmpCommand::Raw { command, arguments } => {
            let arguments = match arguments {
                None => None,
                Some(text) => {
                    let value: serde_json::Value = serde_json::from_str(text)
                        .map_err(|e| format!("the arguments are not JSON: {e}"))?;
                    if !value.is_object() {
                        return Err(
                            "the arguments must be a JSON object, e.g. '{\"flat\": true}'".into(),
                        );
                    }
                    Some(value)
                }
            };
            print_json(&monitor.execute_raw(command, arguments)?)?;
        }
        QmpCommand::Events { count, timeout } => {
            let subscription = monitor.subscribe(EventFilter::All)?;
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                // Without a deadline, wait in slices so the loop stays responsive.
                let wait = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => Duration::from_secs(3600),
                };
                match monitor.next_event(subscription, wait)? {
                    Some(event) => {
                        println!("{}", serde_json::to_string(&event)?);
                        seen += 1;
                    }
                    None if deadline.is_some() => break,
                    None => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A bitmap row of `vmsdk qmp URI bitmaps --json`.
#[derive(Debug, Serialize)]
struct BitmapRow {
    node: String,
    name: String,
    recording: bool,
    persistent: bool,
    busy: bool,
    inconsistent: bool,
    granularity: u64,
    dirty_bytes: u64,
}

/// `flat` where the QEMU has it (5.0+), so each node is listed once without nested chains.
fn flat_if_possible(monitor: &dyn Monitor) -> QueryNamedBlockNodesArgs {
    if monitor.greeting().version.qemu.at_least((5, 0)) {
        QueryNamedBlockNodesArgs::flat()
    } else {
        QueryNamedBlockNodesArgs::default()
    }
}

fn print_json(value: &impl Serialize) -> CliResult<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `rows` under `headers` in columns as wide as their widest cell.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
