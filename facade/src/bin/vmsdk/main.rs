//! `vmsdk`: what hypervisor is this, what does it say about this VM, and the guest agent and
//! virtual disks of VMs, from one command line.

#![forbid(unsafe_code)]

mod agent;
mod backup;
mod detect;
mod disk;
mod guests;
mod qmp;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vmsdk", version, about, propagate_version = true)]
struct Cli {
    /// Which backends to use: `auto` picks the real ones for this machine, `fake` the in-memory
    /// fakes (default: $VMSDK_BACKEND, else auto).
    #[arg(long, global = true, value_name = "auto|fake")]
    backend: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Detect the hypervisor and container, like systemd-detect-virt (exit 1 when none).
    Detect(detect::DetectArgs),
    /// Show the guest statistics of this VM (the vSphere Guest API set).
    Stats(stats::StatsArgs),
    /// Inspect and copy virtual disks (file, NBD, memory; VDDK where installed).
    Disk(disk::DiskArgs),
    /// Talk to a QEMU guest agent: read-only commands, typed, and raw JSON.
    Agent(agent::AgentArgs),
    /// The guest agents of many VMs on this host in one bounded scrape: a table, JSON, or
    /// Prometheus metrics (--listen).
    Guests(guests::GuestsArgs),
    /// Drive a running QEMU through its monitor (QMP): state, disks, jobs, exports, bitmaps,
    /// raw commands and events.
    Qmp(qmp::QmpArgs),
    /// Live backups of running QEMU VMs into qcow2 chains: create, list, verify, restore,
    /// cleanup.
    Backup(backup::BackupArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Detect(args) => detect::run(args),
        Command::Stats(args) => platform(&cli).and_then(|p| stats::run(&p, args)),
        // Disks and agents are named by URI: they need the backend choice, not detection.
        Command::Disk(args) => backend(&cli).and_then(|b| disk::run(b, args)),
        Command::Agent(args) => backend(&cli).and_then(|b| agent::run(b, args)),
        Command::Guests(args) => guests::run(args),
        Command::Qmp(args) => backend(&cli).and_then(|b| qmp::run(b, args)),
        Command::Backup(args) => backup::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("vmsdk: {}", describe(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, `outer: cause: root cause`: each error's message
/// leaves its source out (the Rust API guideline), so the chain is walked here. Errors with a
/// command-line remedy get it appended.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        // Transparent wrappers repeat their inner message; print each message once.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = next.source();
    }
    if let Some(vmsdk::Error::NoStatsBackend { .. }) = error.downcast_ref::<vmsdk::Error>() {
        line.push_str("; `--backend fake` shows the fake's statistics");
    }
    line
}

/// What a subcommand reports when it cannot do its job; printed as `vmsdk: <message>`.
type CliResult<T = ExitCode> = Result<T, Box<dyn std::error::Error>>;

/// The backend choice of `--backend`, else `VMSDK_BACKEND`, else auto.
fn backend(cli: &Cli) -> CliResult<vmsdk::BackendChoice> {
    Ok(match &cli.backend {
        Some(word) => word.parse()?,
        None => vmsdk::BackendChoice::from_env()?,
    })
}

/// The detected platform with the chosen backend family.
fn platform(cli: &Cli) -> CliResult<vmsdk::Platform> {
    Ok(vmsdk::Platform::builder().backend(backend(cli)?).build()?)
}
