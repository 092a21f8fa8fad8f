//! `vmsdk`: what hypervisor is this, what does it say about this VM, and the guest agent and
//! virtual disks of VMs, from one command line.

#![forbid(unsafe_code)]

mod detect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vmsdk", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Detect the hypervisor and container, like systemd-detect-virt (exit 1 when none).
    Detect(detect::DetectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Detect(args) => detect::run(&args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("vmsdk: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What a subcommand reports when it cannot do its job; printed as `vmsdk: <message>`.
type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;
