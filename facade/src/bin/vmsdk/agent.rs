//! `vmsdk agent [URI] COMMAND`: the QEMU guest agent's read-only commands, typed, plus raw JSON
//! as `virsh qemu-agent-command` takes it.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use std::io::Write as _;

use qga_proto::cmd::GuestExecArgs;
use qga_proto::types::GuestExecCaptureOutputMode;
use qga_proto::{GuestAgent, GuestAgentExt};
use serde::Serialize;
use vmsdk::BackendChoice;

use crate::CliResult;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// [URI] COMMAND [ARGS]: the agent address (qga+unix:///path, qga+tcp://host:port,
    /// qga+serial:///dev/...; omitted with --backend fake) and the command.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    words: Vec<String>,
}

/// The commands, parsed from the words after the optional URI.
#[derive(Debug, Parser)]
#[command(name = "vmsdk agent [URI]", no_binary_name = true)]
struct Invocation {
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Agent version and its commands (enabled or not).
    Info,
    /// Check that the agent answers.
    Ping,
    /// Operating system identification.
    Osinfo,
    /// Host name of the guest.
    Hostname,
    /// Guest time (nanoseconds since the epoch).
    Time,
    /// Guest time zone.
    Timezone,
    /// Logged-in users.
    Users,
    /// Mounted file systems with usage.
    Fsinfo,
    /// Network interfaces and addresses.
    Interfaces,
    /// Routing table.
    Routes,
    /// Virtual CPUs.
    Vcpus,
    /// Disks.
    Disks,
    /// Per-disk I/O statistics.
    Diskstats,
    /// Per-CPU time statistics.
    Cpustats,
    /// Load averages.
    Load,
    /// Memory blocks.
    MemoryBlocks,
    /// Memory block size.
    MemoryBlockInfo,
    /// PCI devices (Windows guests).
    Devices,
    /// File system freeze state.
    FsfreezeStatus,
    /// Run a program in the guest, wait for it, and print its output; exits with its code.
    Exec {
        /// Seconds to wait for the program to exit.
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
        /// Feed this text to the program's standard input.
        #[arg(long)]
        input: Option<String>,
        /// What to capture: separated (stdout and stderr apart), merged (both into stdout),
        /// stdout, stderr or none. Modes other than separated and none need qemu-ga 8.1.
        #[arg(long, default_value = "separated",
              value_parser = ["none", "stdout", "stderr", "separated", "merged"])]
        capture: String,
        /// The program (a path or a name the agent finds in its PATH).
        program: String,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a guest file (read through guest-file-open/read/close).
    Cat {
        /// The file's path in the guest.
        path: String,
    },
    /// Send a raw command: '{"execute":"guest-info"}' (the reply's "return" is printed).
    Raw {
        /// The JSON request.
        json: String,
    },
}

impl AgentCommand {
    /// Whether `word` is a command name, so that it is not taken for a URI.
    fn is_command(word: &str) -> bool {
        use clap::CommandFactory;
        word.starts_with('-')
            || Invocation::command()
                .get_subcommands()
                .any(|c| c.get_name() == word || word == "help")
    }
}

/// What a command produced: JSON to print, or bytes and an exit code (exec, cat).
enum Outcome {
    Json(serde_json::Value),
    Output {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        code: u8,
    },
}

fn to_json(value: impl Serialize) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(value)
}

async fn call(agent: &dyn GuestAgent, command: &AgentCommand) -> CliResult<Outcome> {
    let value = match command {
        AgentCommand::Exec {
            wait,
            input,
            capture,
            program,
            args,
        } => {
            if !(wait.is_finite() && *wait > 0.0) {
                return Err("--wait must be a positive number of seconds".into());
            }
            let request =
                GuestExecArgs::new(program.as_str()).args(args.iter().map(String::as_str));
            // `separated` as the boolean every agent takes; the other modes by name (8.1+;
            // the client refuses them before sending to an older agent).
            let mut request = match GuestExecCaptureOutputMode::from(capture.as_str()) {
                GuestExecCaptureOutputMode::Separated => request.capture(),
                mode => request.capture_mode(mode),
            };
            if let Some(input) = input {
                request = request.input(input.as_bytes());
            }
            let output = agent
                .exec_wait(request, Some(Duration::from_secs_f64(*wait)))
                .await?;
            // Like a shell: the exit code, or 128 + the signal that ended the program.
            let code = match (output.exitcode, output.signal) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => 0,
            };
            return Ok(Outcome::Output {
                stdout: output.stdout,
                stderr: output.stderr,
                code: u8::try_from(code).unwrap_or(u8::MAX),
            });
        }
        AgentCommand::Cat { path } => {
            return Ok(Outcome::Output {
                stdout: agent.read_file(path).await?,
                stderr: Vec::new(),
                code: 0,
            })
        }
        AgentCommand::Info => to_json(agent.info().await?)?,
        AgentCommand::Ping => {
            agent.ping().await?;
            serde_json::json!({})
        }
        AgentCommand::Osinfo => to_json(agent.osinfo().await?)?,
        AgentCommand::Hostname => to_json(agent.host_name().await?)?,
        AgentCommand::Time => to_json(agent.time().await?)?,
        AgentCommand::Timezone => to_json(agent.timezone().await?)?,
        AgentCommand::Users => to_json(agent.users().await?)?,
        AgentCommand::Fsinfo => to_json(agent.fsinfo().await?)?,
        AgentCommand::Interfaces => to_json(agent.network_interfaces().await?)?,
        AgentCommand::Routes => to_json(agent.network_routes().await?)?,
        AgentCommand::Vcpus => to_json(agent.vcpus().await?)?,
        AgentCommand::Disks => to_json(agent.disks().await?)?,
        AgentCommand::Diskstats => to_json(agent.diskstats().await?)?,
        AgentCommand::Cpustats => to_json(agent.cpustats().await?)?,
        AgentCommand::Load => to_json(agent.load().await?)?,
        AgentCommand::MemoryBlocks => to_json(agent.memory_blocks().await?)?,
        AgentCommand::MemoryBlockInfo => to_json(agent.memory_block_info().await?)?,
        AgentCommand::Devices => to_json(agent.devices().await?)?,
        AgentCommand::FsfreezeStatus => to_json(agent.fsfreeze_status().await?)?,
        AgentCommand::Raw { json } => {
            let request: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| format!("the raw request is not JSON: {e}"))?;
            let name = request
                .get("execute")
                .and_then(|v| v.as_str())
                .ok_or("the raw request needs an \"execute\" member naming the command")?;
            agent
                .execute_raw(name, request.get("arguments").cloned())
                .await?
        }
    };
    Ok(Outcome::Json(value))
}

pub fn run(backend: BackendChoice, args: &AgentArgs) -> CliResult {
    let (uri, rest) = match args.words.split_first() {
        Some((first, rest)) if !AgentCommand::is_command(first) => (Some(first.as_str()), rest),
        _ => (None, &args.words[..]),
    };
    let invocation = Invocation::try_parse_from(rest).map_err(|e| e.to_string())?;
    if !(invocation.timeout.is_finite() && invocation.timeout > 0.0) {
        return Err("--timeout must be a positive number of seconds".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let agent: std::sync::Arc<dyn GuestAgent> = match (uri, backend) {
            (Some(uri), _) => {
                let config = qga_proto::ClientConfig::default()
                    .timeout(Duration::from_secs_f64(invocation.timeout));
                vmsdk::agent::connect_with(uri, config).await?
            }
            (None, BackendChoice::Fake) => vmsdk::agent::fake(),
            (None, _) => {
                return Err(
                    "name the agent: vmsdk agent qga+unix:///path/to/qga.sock COMMAND \
                     (or --backend fake for the fake agent)"
                        .into(),
                )
            }
        };
        call(agent.as_ref(), &invocation.command).await
    })?;
    match outcome {
        Outcome::Json(value) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Output {
            stdout,
            stderr,
            code,
        } => {
            std::io::stdout().write_all(&stdout)?;
            std::io::stderr().write_all(&stderr)?;
            Ok(ExitCode::from(code))
        }
    }
}
