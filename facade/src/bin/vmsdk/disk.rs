//! `vmsdk disk`: information, allocation map and copies of virtual disks named by URI.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use disk_transport::copy::{copy, CopyOptions};
use disk_transport::{Disk, ExtentKind, OpenFlags};
use indicatif::{ProgressBar, ProgressStyle};
use vmsdk::BackendChoice;

use crate::CliResult;

#[derive(Debug, Args)]
pub struct DiskArgs {
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Debug, Subcommand)]
enum DiskCommand {
    /// Size, sector sizes, geometry and capabilities of a disk.
    Info {
        /// The disk: file:///path, nbd://host/export, nbd+unix:///export?socket=PATH, mem://NAME
        /// (default with --backend fake: the fake demo disk).
        uri: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The allocation map: data, zero and hole extents (as `nbdinfo --map` prints them).
    Map {
        /// The disk URI (default with --backend fake: the fake demo disk).
        uri: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a disk to another, skipping holes, with many requests in flight.
    Copy {
        /// Source disk URI.
        source: String,
        /// Destination: a disk URI, a path (a missing file is created at the source's size), or
        /// `null:` to discard the data (measures how fast the source reads).
        destination: String,
        /// Bytes per request.
        #[arg(long, default_value_t = 256 * 1024)]
        request_size: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        requests: usize,
        /// NBD connections per disk when the server allows multi-conn (default: one per CPU,
        /// at most 4, as nbdcopy); a `connections=N` in the URI wins.
        #[arg(long)]
        connections: Option<usize>,
        /// Copying threads (default: one per CPU, at most 4).
        #[arg(long)]
        threads: Option<usize>,
        /// Give up when no request completes for this many seconds.
        #[arg(long, default_value_t = 60)]
        stall_timeout: u64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

/// The URI the fake backend uses when none is given: a sparse in-memory disk with a little data.
const FAKE_DISK_URI: &str = "mem://vmsdk-fake-disk?size=1G";

fn open(
    backend: BackendChoice,
    uri: Option<&str>,
    flags: OpenFlags,
) -> vmsdk::Result<Box<dyn Disk>> {
    match (uri, backend) {
        (Some(uri), _) => vmsdk::disk::open(uri, flags),
        (None, BackendChoice::Fake) => {
            let disk = vmsdk::disk::open(FAKE_DISK_URI, OpenFlags::read_write())?;
            // A boot sector and a little file system metadata, so info and map show a mix.
            let mut sector = vec![0u8; 512];
            sector[510] = 0x55;
            sector[511] = 0xaa;
            disk.write_at(&sector, 0)?;
            disk.write_at(&vec![0xa5; 1 << 20], 64 << 20)?;
            Ok(disk)
        }
        (None, _) => Err(disk_transport::Error::InvalidParams(
            "name a disk URI (file:///path, nbd://host/export, nbd+unix:///export?socket=PATH, \
             mem://NAME?size=SIZE), or use --backend fake for the demo disk"
                .to_owned(),
        )
        .into()),
    }
}

pub fn run(backend: BackendChoice, args: &DiskArgs) -> CliResult {
    match &args.command {
        DiskCommand::Info { uri, json } => {
            let disk = open(backend, uri.as_deref(), OpenFlags::read_only())?;
            let info = disk.info()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let value = serde_json::to_value(&info)?;
                for (key, field) in value.as_object().into_iter().flatten() {
                    let shown = match field {
                        serde_json::Value::Null => continue,
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    println!("{key:<24} {shown}");
                }
            }
        }
        DiskCommand::Map { uri, json } => {
            let disk = open(backend, uri.as_deref(), OpenFlags::read_only())?;
            let capacity = disk.info()?.capacity;
            let extents = disk.allocated_extents(0, capacity)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&extents)?);
            } else {
                for extent in extents {
                    println!(
                        "{:>10}  {:>10}  {:>3}  {}",
                        extent.offset,
                        extent.length,
                        extent.kind.nbd_flags(),
                        describe(extent.kind)
                    );
                }
            }
        }
        DiskCommand::Copy {
            source,
            destination,
            request_size,
            requests,
            connections,
            threads,
            stall_timeout,
            no_progress,
        } => {
            let connections = connections.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
            });
            let source = vmsdk::disk::with_default_connections(source, connections);
            let destination = vmsdk::disk::with_default_connections(destination, connections);
            let src = vmsdk::disk::open(&source, OpenFlags::read_only())?;
            let capacity = src.info()?.capacity;
            let (dst, fresh) = vmsdk::disk::open_or_create(&destination, capacity)?;
            let mut options = CopyOptions::default();
            if let Some(n) = threads {
                options = options.threads(*n);
            }
            let options = options
                .request_size(*request_size)
                .requests_in_flight(*requests)
                .destination_is_zero(fresh)
                .stall_timeout(Duration::from_secs(*stall_timeout));
            let bar = if *no_progress {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(capacity)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .map_err(|e| e.to_string())?,
            );
            let report = copy(src.as_ref(), dst.as_ref(), &options, &mut |p| {
                bar.set_position(p.done)
            });
            bar.finish_and_clear();
            let report = report?;
            let p = report.progress;
            println!(
                "copied {} bytes in {:.2} s ({:.1} MiB/s): {} read, {} written, {} zeroed, {} skipped",
                p.total,
                report.elapsed.as_secs_f64(),
                report.bytes_per_second() / (1024.0 * 1024.0),
                p.read,
                p.written,
                p.zeroed,
                p.skipped
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The description column of `nbdinfo --map`.
fn describe(kind: ExtentKind) -> &'static str {
    match kind {
        ExtentKind::Data => "data",
        ExtentKind::Zero => "zero",
        ExtentKind::Hole => "hole,zero",
        ExtentKind::Unallocated => "hole",
        _ => "unknown",
    }
}
