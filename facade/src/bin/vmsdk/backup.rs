//! `vmsdk backup`: live backups of running QEMU VMs into qcow2 chains, listed, verified,
//! restored; leftovers of interrupted backups cleaned up.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use disk_transport::blkhash::BlkhashSpec;
use indicatif::{ProgressBar, ProgressStyle};
use vmsdk::backup::qemu::QemuSource;
use vmsdk::backup::quiesce::AgentQuiesce;
use vmsdk::backup::{
    BackupDir, BackupOptions, BackupSource, Error as BackupError, Manifest, Progress, Quiesce,
};
use vmsdk::disk::copy::{CancelToken, CopyOptions};

use crate::CliResult;

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back up a running QEMU VM into DIR: full when DIR holds no chain, else what changed
    /// since its last point. Ctrl-C stops it, removes what it made in QEMU and exits 130.
    Create {
        /// The VM's QMP socket: qmp+unix:///run/vm1.qmp, qmp+tcp://127.0.0.1:4444.
        #[arg(long, value_name = "URI")]
        qmp: String,
        /// The guest agent, to freeze the guest's filesystems around the checkpoint
        /// (application-consistent): qga+unix:///run/vm1-qga.sock. Without an answer within
        /// 10 s the backup is crash-consistent, with a warning.
        #[arg(long, value_name = "URI")]
        agent: Option<String>,
        /// Back up only this disk (a block node name; repeat for more). Default: every
        /// writable disk.
        #[arg(long = "disk", value_name = "NODE")]
        disks: Vec<String>,
        /// Take a full backup even when an incremental one is possible.
        #[arg(long)]
        full: bool,
        /// Take a full backup, and say why, when an incremental one is impossible (the last
        /// checkpoint missing or broken on a disk) instead of failing.
        #[arg(long)]
        full_if_needed: bool,
        /// The block hash every point records, as nbdcopy's --blkhash takes it (sha256/64k:
        /// the hash `nbdcopy --blkhash` of a restored disk prints). Default: an incremental
        /// point keeps its chain's, a new chain takes blake3/64k (2.5 times SHA-256's speed).
        #[arg(long, value_name = "SPEC")]
        blkhash: Option<BlkhashSpec>,
        /// Where the scratch images and the NBD socket go; QEMU must be able to write there
        /// (default /var/tmp/vmsdk-scratch-<the QMP address>). It holds the old contents of
        /// what the guest overwrites while the backup reads: with less than 16 MiB free the
        /// backup does not begin, and when it runs full (1 MiB left, or a guest write failing)
        /// the backup stops and the VM writes on.
        #[arg(long, value_name = "DIR")]
        scratch_dir: Option<PathBuf>,
        /// Serve the views over TLS: QEMU's X.509 credentials (ca-cert.pem, server-cert.pem,
        /// server-key.pem) in this directory.
        #[arg(long, value_name = "DIR", requires = "tls_client_dir")]
        tls_server_dir: Option<PathBuf>,
        /// The CA (ca-cert.pem) that verifies QEMU's certificate, with --tls-server-dir.
        #[arg(long, value_name = "DIR", requires = "tls_server_dir")]
        tls_client_dir: Option<PathBuf>,
        /// The name QEMU's certificate must carry (default localhost).
        #[arg(long, value_name = "NAME", default_value = "localhost")]
        tls_hostname: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        /// The backup directory (created 0700).
        dir: PathBuf,
    },
    /// List the points of DIR's chain (and, with --qmp, the VM's vmsdk checkpoints).
    List {
        /// Also list the checkpoints on this VM, with their disks and state.
        #[arg(long, value_name = "URI")]
        qmp: Option<String>,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// The backup directory.
        dir: PathBuf,
    },
    /// Check every point: its images open and read through their chain, and read as the
    /// block hash recorded when it was taken. Exit 1 when a check fails.
    Verify {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        /// The backup directory.
        dir: PathBuf,
    },
    /// Restore a disk at a point into DEST: a file (created when missing) or an NBD URI.
    Restore {
        /// The disk (needed when the backup holds more than one).
        #[arg(long, value_name = "NODE")]
        disk: Option<String>,
        /// The point: 1 is the first (full) backup. Default: the latest.
        #[arg(long, value_name = "N")]
        point: Option<u32>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        /// The backup directory.
        dir: PathBuf,
        /// Where to: a path or a disk URI (nbd://, nbd+unix://, ...).
        dest: String,
    },
    /// Remove what interrupted backups left in QEMU: exports, jobs, scratch nodes and files,
    /// and checkpoints half-made by a killed backup (marked pending until its data was
    /// written; never a stored one); with DIR, also the checkpoints of DIR's chain that no
    /// point records and DIR's partial images. A backup of the VM still running (its
    /// scratch directory's lock held) is left alone: an error.
    Cleanup {
        /// The VM's QMP socket.
        #[arg(long, value_name = "URI")]
        qmp: String,
        /// The scratch directory the backups used (default as for create).
        #[arg(long, value_name = "DIR")]
        scratch_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The backup directory whose chain's leftovers to remove too.
        dir: Option<PathBuf>,
    },
}

pub fn run(args: &BackupArgs) -> CliResult {
    match &args.command {
        BackupCommand::Create {
            qmp,
            agent,
            disks,
            full,
            full_if_needed,
            blkhash,
            scratch_dir,
            tls_server_dir,
            tls_client_dir,
            tls_hostname,
            json,
            no_progress,
            dir,
        } => {
            let scratch = scratch_dir.clone().unwrap_or_else(|| default_scratch(qmp));
            let mut source = QemuSource::connect(qmp, scratch)?;
            let tls = match (tls_server_dir, tls_client_dir) {
                (Some(server), Some(client)) => {
                    source = source.tls_certificates(server, client, tls_hostname.clone());
                    true
                }
                _ => false,
            };
            let mut quiesce = agent.as_deref().and_then(|uri| {
                match AgentQuiesce::connect(uri, Duration::from_secs(10)) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        eprintln!(
                            "vmsdk: warning: no guest agent at {uri} ({e}): the backup is \
                             crash-consistent"
                        );
                        None
                    }
                }
            });
            let cancel = interrupt_token()?;
            let mut options = BackupOptions::new()
                .full(*full)
                .full_if_needed(*full_if_needed)
                .tls(tls)
                .copy_options(CopyOptions::default().cancel(cancel.clone()));
            if let Some(spec) = blkhash {
                options = options.blkhash(*spec);
            }
            for disk in disks {
                options = options.disk(disk.clone());
            }
            let bar = progress_bar(*no_progress)?;
            let started = Instant::now();
            let mut pause = TestPause::from_env(cancel.clone());
            let result = BackupDir::new(dir).create(
                &mut source,
                quiesce.as_mut().map(|q| q as &mut dyn Quiesce),
                &options,
                &mut |p| {
                    show(&bar, p);
                    pause.at(p);
                },
            );
            bar.finish_and_clear();
            let report = match result {
                Ok(report) => report,
                Err(BackupError::Cancelled) => {
                    eprintln!(
                        "vmsdk: interrupted: the backup was stopped and what it made in QEMU \
                         removed; {} is as it was",
                        dir.display()
                    );
                    return Ok(ExitCode::from(130));
                }
                Err(e) if e.is_cancelled() => {
                    // Interrupted, and QEMU did not answer the teardown.
                    eprintln!("vmsdk: interrupted: {e}; {} is as it was", dir.display());
                    return Ok(ExitCode::from(130));
                }
                Err(e) => return Err(e.into()),
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let p = &report.point;
                let copied: u64 = p.disks.iter().map(|d| d.bytes_copied).sum();
                let disks: Vec<String> = p.disks.iter().map(|d| d.file.clone()).collect();
                println!(
                    "point {} ({:?}, {}) of {}: {copied} bytes copied in {:.2} s",
                    p.number,
                    p.kind,
                    p.consistency,
                    disks.join(", "),
                    started.elapsed().as_secs_f64()
                );
                if let Some(reason) = &p.full_reason {
                    println!("full backup because {reason}");
                }
                for line in p.warnings.iter().chain(&report.warnings) {
                    eprintln!("vmsdk: warning: {line}");
                }
                for line in &report.cleanup.removed {
                    eprintln!("vmsdk: removed a leftover of an interrupted backup: {line}");
                }
            }
            if cancel.is_cancelled() {
                // Ctrl-C after the point was stored: nothing was left to stop.
                eprintln!(
                    "vmsdk: interrupted after point {} was stored: it is complete, and what the \
                     backup made in QEMU removed",
                    report.point.number
                );
                return Ok(ExitCode::from(130));
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::List { qmp, json, dir } => {
            let manifest = BackupDir::new(dir)
                .manifest()?
                .ok_or_else(|| format!("{} holds no backup (no manifest.json)", dir.display()))?;
            let checkpoints = match qmp {
                Some(uri) => Some(QemuSource::connect(uri, default_scratch(uri))?.checkpoints()?),
                None => None,
            };
            if *json {
                let value = serde_json::json!({"manifest": manifest, "checkpoints": checkpoints});
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_manifest(&manifest);
                if let Some(checkpoints) = checkpoints {
                    println!("checkpoints on the VM:");
                    for c in checkpoints {
                        let disks: Vec<String> = c
                            .disks
                            .iter()
                            .map(|d| {
                                let state = d.unusable().unwrap_or("recording");
                                format!("{} ({state})", d.node)
                            })
                            .collect();
                        println!("  {}: {}", c.name, disks.join(", "));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Verify {
            json,
            no_progress,
            dir,
        } => {
            let bar = progress_bar(*no_progress)?;
            let result = BackupDir::new(dir).verify(&mut |p| show(&bar, p));
            bar.finish_and_clear();
            match result {
                Ok(checked) => {
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&checked)?);
                    } else {
                        for c in &checked {
                            println!(
                                "point {} {} ({}): ok {}",
                                c.number, c.disk, c.file, c.blkhash
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(BackupError::Verify { problems }) => {
                    if *json {
                        println!("{}", serde_json::json!({ "problems": problems }));
                    }
                    for p in &problems {
                        eprintln!("vmsdk: {p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            }
        }
        BackupCommand::Restore {
            disk,
            point,
            json,
            no_progress,
            dir,
            dest,
        } => {
            let bar = progress_bar(*no_progress)?;
            let options = CopyOptions::default().cancel(interrupt_token()?);
            let result =
                BackupDir::new(dir).restore(disk.as_deref(), *point, dest, &options, &mut |p| {
                    show(&bar, p)
                });
            bar.finish_and_clear();
            let report = match result {
                Ok(report) => report,
                Err(BackupError::Cancelled) => {
                    eprintln!("vmsdk: interrupted: {dest} is incomplete");
                    return Ok(ExitCode::from(130));
                }
                Err(e) => return Err(e.into()),
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "restored {} at point {} into {}: {} bytes written",
                    report.disk, report.point, report.destination, report.progress.written
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Cleanup {
            qmp,
            scratch_dir,
            json,
            dir,
        } => {
            let scratch = scratch_dir.clone().unwrap_or_else(|| default_scratch(qmp));
            let mut source = QemuSource::connect(qmp, scratch)?;
            let report = match dir {
                Some(dir) => BackupDir::new(dir).cleanup(&mut source)?,
                None => source.cleanup()?,
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.is_empty() {
                println!("nothing to clean up");
            } else {
                for line in &report.removed {
                    println!("removed {line}");
                }
                for line in &report.failed {
                    eprintln!("vmsdk: could not remove {line}");
                }
            }
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `/var/tmp/vmsdk-scratch-<the QMP address, made a file name>`: one scratch directory per VM.
fn default_scratch(qmp: &str) -> PathBuf {
    let name: String = qmp
        .trim_start_matches("qmp+")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new("/var/tmp").join(format!("vmsdk-scratch-{}", name.trim_matches('_')))
}

fn print_manifest(manifest: &Manifest) {
    let vm = manifest.vm.name.as_deref().unwrap_or("(unnamed VM)");
    println!(
        "{vm} ({}), chain {}: {} points",
        manifest.vm.hypervisor,
        manifest.chain,
        manifest.points.len()
    );
    for p in &manifest.points {
        let disks: Vec<String> = p
            .disks
            .iter()
            .map(|d| format!("{} {} ({} bytes copied)", d.node, d.file, d.bytes_copied))
            .collect();
        println!(
            "  {:>3}  {}  {:<11}  {}  {}",
            p.number,
            utc(p.finished_ms),
            format!("{:?}", p.kind).to_lowercase(),
            p.consistency,
            disks.join("; ")
        );
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn progress_bar(hidden: bool) -> CliResult<ProgressBar> {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:16} {bar:32} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|e| e.to_string())?,
    );
    Ok(bar)
}

fn show(bar: &ProgressBar, p: &Progress) {
    bar.set_message(format!("{} {}", p.disk, p.phase));
    bar.set_length(p.total);
    bar.set_position(p.done);
}

/// A test hook, for the crash tests: with `VMSDK_TEST_PAUSE_AT=PHASE` in the environment
/// (`checkpoint`: the point in time taken and exported; `copy`: the first progress report of
/// the first disk's copy, inside the copy, before its image is flushed; `hash`: the first
/// progress report of an incremental point's block hash, read back through its chain;
/// `stored`: the point in the manifest, before the session ends and the replaced checkpoint
/// goes), `backup create` prints `vmsdk: test hook: paused at PHASE` on standard error when it
/// gets there and waits, until it is killed, Ctrl-C sets the cancel token, or SIGUSR1 lets it
/// go on.
/// The copy's worker threads may keep reading while the copy is paused; the backup itself
/// goes no further. Not for production use: nothing but a test sets the variable.
struct TestPause {
    phase: Option<String>,
    cancel: CancelToken,
    /// Set by SIGUSR1: the backup goes on as if nothing happened (the test has meanwhile
    /// broken something under it, such as killing QEMU).
    resume: Arc<AtomicBool>,
}

impl TestPause {
    fn from_env(cancel: CancelToken) -> Self {
        let phase = std::env::var("VMSDK_TEST_PAUSE_AT").ok();
        let resume = Arc::new(AtomicBool::new(false));
        if phase.is_some() {
            // Only when a test asks to pause: otherwise SIGUSR1 keeps its default action.
            let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&resume));
        }
        TestPause {
            phase,
            cancel,
            resume,
        }
    }

    fn at(&mut self, p: &Progress) {
        let Some(phase) = &self.phase else { return };
        if phase != p.phase {
            return;
        }
        eprintln!("vmsdk: test hook: paused at {phase}");
        // Once: after Ctrl-C the backup goes on (and stops at the cancel token's next check).
        self.phase = None;
        while !self.cancel.is_cancelled() && !self.resume.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A cancel token set by Ctrl-C: the copy stops, the session is torn down, the command exits
/// 130. A second Ctrl-C ends the process at once (run `vmsdk backup cleanup` then).
fn interrupt_token() -> std::io::Result<CancelToken> {
    use signal_hook::consts::SIGINT;
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGINT, Arc::clone(&flag))?;
    Ok(CancelToken::from(flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_638_530_000), "2026-12-07 10:15:30 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn scratch_directories_differ_per_vm() {
        assert_eq!(
            default_scratch("qmp+unix:///run/vm1.qmp"),
            Path::new("/var/tmp/vmsdk-scratch-unix____run_vm1_qmp")
        );
        assert_ne!(
            default_scratch("qmp+unix:///run/vm1.qmp"),
            default_scratch("qmp+unix:///run/vm2.qmp")
        );
    }
}
