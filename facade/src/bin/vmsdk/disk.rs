//! `vmsdk disk`: information, allocation map and copies of virtual disks named by URI.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use disk_transport::blkhash::BlkhashSpec;
use disk_transport::copy::{self, copy, copy_changed, CancelToken, CopyOptions, CopyProgress};
use disk_transport::stream::{
    copy_from_stream, copy_to_stream, is_stdio, stdout_as_disk, StreamSink, StreamSource,
};
use disk_transport::{Disk, DiskUri, Error, ExtentKind, OpenFlags};
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
        /// The disk: file:///path, NAME.qcow2 or qcow2:NAME, nbd://host/export,
        /// nbd+unix:///export?socket=PATH, mem://NAME (default with --backend fake: the fake
        /// demo disk).
        uri: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The allocation map: data, zero and hole extents (as `nbdinfo --map` prints them); with
    /// a dirty bitmap (--dirty-bitmap, or ?dirty-bitmap= in the URI) its clean and dirty
    /// extents instead (as `nbdinfo --map=qemu:dirty-bitmap:NAME`).
    Map {
        /// The disk URI (default with --backend fake: the fake demo disk).
        uri: Option<String>,
        /// Print JSON instead of text (nbdinfo's fields: offset, length, type, description).
        #[arg(long)]
        json: bool,
        /// Map this dirty bitmap of an NBD export (`qemu:dirty-bitmap:NAME`, exported with
        /// `qemu-nbd -B NAME` or QEMU's block-export-add).
        #[arg(long, value_name = "NAME")]
        dirty_bitmap: Option<String>,
    },
    /// Copy a disk to another, skipping holes, with many requests in flight.
    Copy {
        /// Source disk URI, or `-` for standard input (an image stream, e.g. from zstdcat or
        /// ssh: it fills the destination from its start until it ends).
        source: String,
        /// Destination: a disk URI, a path (a missing file is created at the source's size; a
        /// missing NAME.qcow2 as a qcow2 image whose holes stay unallocated),
        /// `null:` to discard the data (measures how fast the source reads), or `-` for
        /// standard output (every byte in order, holes as zeros: pipe it into a compressor or
        /// ssh; the summary then goes to standard error).
        destination: String,
        /// Incremental: write only what the source's dirty bitmap NAME marks changed into the
        /// destination, which must exist with the source's size (the previous full copy), or,
        /// with --backing, is created as a qcow2 overlay of the previous copy.
        #[arg(long, value_name = "NAME")]
        dirty_bitmap: Option<String>,
        /// Create the destination (a new NAME.qcow2, or qcow2:NAME) as a qcow2 overlay whose
        /// backing file is PREV (PREV.qcow2 is qcow2, other names raw): with --dirty-bitmap it
        /// holds only what changed, and the chain reads as the source.
        #[arg(long, value_name = "PREV")]
        backing: Option<String>,
        /// Bytes per request (default 524288, or 262144 when the destination is an NBD
        /// export).
        #[arg(long)]
        request_size: Option<usize>,
        /// Requests in flight at once.
        #[arg(long, default_value_t = copy::DEFAULT_REQUESTS_IN_FLIGHT)]
        requests: usize,
        /// NBD connections per disk when the server allows multi-conn (default: one over a
        /// plaintext Unix socket, else one per CPU, at most 4, as nbdcopy); a `connections=N`
        /// in the URI wins. Copying from a plaintext multi-conn export into `null:`, each
        /// copying thread also opens a connection of its own for its reads (see
        /// `Disk::driven_queue`).
        #[arg(long)]
        connections: Option<usize>,
        /// Copying threads (default: one per CPU, at most 4).
        #[arg(long)]
        threads: Option<usize>,
        /// Give up when no request completes for this many seconds.
        #[arg(long, default_value_t = copy::DEFAULT_STALL_TIMEOUT.as_secs())]
        stall_timeout: u64,
        /// Try a request that failed with a transient error (EIO from the server, an
        /// interrupted read) up to this many more times, waiting 1 s, 2 s, 4 s, ...
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Also flush the destination each time this many more bytes were written, 0 for
        /// only at the end (default: 268435456 into an NBD export, so the server never holds
        /// gigabytes unwritten; only at the end into files and images, which start their own
        /// write-back as they go).
        #[arg(long, value_name = "BYTES")]
        flush_every: Option<u64>,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Also compute the source's block hash, as `nbdcopy --blkhash` (default sha256/64k),
        /// and print it at the end.
        #[arg(long, value_name = "ALG[/SIZE]", num_args = 0..=1, require_equals = true,
              default_missing_value = "sha256/64k")]
        blkhash: Option<String>,
        /// Write the block hash to this file instead of standard output.
        #[arg(long, value_name = "FILE", requires = "blkhash")]
        blkhash_file: Option<std::path::PathBuf>,
    },
    /// The block hash of a disk, as `nbdcopy --blkhash DISK null:` prints it (md5, sha1,
    /// sha256, sha512 over blocks of SIZE; holes are not read; every core hashes), or with
    /// blake3, which nbdcopy lacks (live backups record blake3/64k by default).
    Checksum {
        /// The disk URI.
        uri: String,
        /// Algorithm and block size, as nbdcopy takes them: sha256, md5/4k, sha512/1M,
        /// blake3/64k.
        #[arg(long, value_name = "ALG[/SIZE]", default_value = "sha256/64k")]
        blkhash: String,
        /// Print JSON (algorithm, block size, disk size, digest) instead of the digest alone.
        #[arg(long)]
        json: bool,
        /// NBD connections when the server allows multi-conn (default: one over a plaintext
        /// Unix socket, else one per CPU, at most 4).
        #[arg(long)]
        connections: Option<usize>,
        /// Hashing threads (default: one per CPU, at most 4).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Compare the contents of two disks, as `qemu-img compare` does: ranges both report as
    /// holes are not read. Exit status 0 identical, 1 different, 2 a disk cannot be opened,
    /// 3 a read failed.
    Compare {
        /// First disk URI.
        first: String,
        /// Second disk URI.
        second: String,
        /// Disks of different sizes are different (else the longer one's tail must read as
        /// zeros).
        #[arg(short, long)]
        strict: bool,
        /// Print JSON (sizes, the first differing byte, bytes read) instead of qemu-img's text.
        #[arg(long)]
        json: bool,
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
        (Some(uri), _) => {
            // The URI path has no log hook: say here what the InitEx configuration check found.
            for warning in vmsdk::disk::vddk::uri_config_warnings(uri) {
                eprintln!("vmsdk: warning: VDDK configuration {warning}");
            }
            vmsdk::disk::open(uri, flags)
        }
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
        DiskCommand::Compare {
            first,
            second,
            strict,
            json,
        } => return compare(first, second, *strict, *json),
        DiskCommand::Info { uri, json } => {
            let disk = open(backend, uri.as_deref(), OpenFlags::read_only())?;
            let info = disk.info()?;
            // What the network protocol negotiated (NBD), as nbdinfo shows it.
            let protocol = disk.protocol();
            // A local image's format and backing chain, as `qemu-img info --backing-chain`.
            let image = uri.as_deref().map(image_format).transpose()?.flatten();
            if *json {
                let mut value = serde_json::to_value(&info)?;
                if let (Some(object), Some(p)) = (value.as_object_mut(), &protocol) {
                    object.insert("protocol".into(), serde_json::to_value(p)?);
                }
                if let (Some(object), Some(image)) = (value.as_object_mut(), &image) {
                    object.insert("format".into(), image.format.into());
                    object.insert("chain".into(), serde_json::to_value(&image.chain)?);
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                if let Some(image) = &image {
                    println!("{:<24} {}", "format", image.format);
                    for (depth, link) in image.chain.iter().enumerate() {
                        let cluster = link
                            .cluster_size
                            .map(|c| format!(", {c}-byte clusters"))
                            .unwrap_or_default();
                        println!(
                            "{:<24} {depth}: {} ({}, {} bytes{cluster})",
                            "chain",
                            link.path.display(),
                            link.format,
                            link.virtual_size
                        );
                    }
                }
                let mut fields = vec![serde_json::to_value(&info)?];
                if let Some(p) = &protocol {
                    println!(
                        "{:<24} {} {}, using {} packets",
                        "protocol",
                        p.protocol,
                        if p.tls.is_some() {
                            "with TLS"
                        } else {
                            "without TLS"
                        },
                        p.transmission
                    );
                    let mut value = serde_json::to_value(p)?;
                    if let Some(object) = value.as_object_mut() {
                        object.remove("protocol");
                        let contexts = p.contexts.join(", ");
                        object.insert("contexts".into(), contexts.into());
                    }
                    fields.push(value);
                }
                for value in &fields {
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
        }
        DiskCommand::Map {
            uri,
            json,
            dirty_bitmap,
        } => {
            let uri = match (uri, dirty_bitmap) {
                (Some(uri), Some(name)) => Some(with_dirty_bitmap(uri, name)?),
                (None, Some(_)) => {
                    return Err("--dirty-bitmap needs the URI of an NBD export".into())
                }
                (uri, None) => uri.clone(),
            };
            let disk = open(backend, uri.as_deref(), OpenFlags::read_only())?;
            let info = disk.info()?;
            // (offset, length, type, description) rows, as nbdinfo prints them.
            let rows: Vec<(u64, u64, u32, &str)> = if info.dirty_bitmap.is_some() {
                disk.dirty_extents(0, info.capacity)?
                    .iter()
                    .map(|e| {
                        let what = if e.dirty { "dirty" } else { "clean" };
                        (e.offset, e.length, e.nbd_flags(), what)
                    })
                    .collect()
            } else if let Some(path) = uri.as_deref().and_then(qcow2_path) {
                // qcow2: which image of the chain each range comes from, as qemu-img map.
                let image = vmsdk::disk::qcow2::Qcow2Disk::open_read_only(&path)?;
                let chain = image.chain();
                let map = image.map(0, info.capacity)?;
                print!("{}", format_depth_map(&map, &chain, *json)?);
                return Ok(ExitCode::SUCCESS);
            } else {
                disk.allocated_extents(0, info.capacity)?
                    .iter()
                    .map(|e| (e.offset, e.length, e.kind.nbd_flags(), describe(e.kind)))
                    .collect()
            };
            print!("{}", format_map(&rows, *json));
        }
        DiskCommand::Copy {
            source,
            destination,
            dirty_bitmap,
            backing,
            request_size,
            requests,
            connections,
            threads,
            stall_timeout,
            retries,
            flush_every,
            no_progress,
            blkhash,
            blkhash_file,
        } => {
            let blkhash: Option<BlkhashSpec> = blkhash.as_deref().map(str::parse).transpose()?;
            // The options both kinds of copy take from the command line.
            let mut options = CopyOptions::default()
                .requests_in_flight(*requests)
                .stall_timeout(Duration::from_secs(*stall_timeout))
                .retries(*retries)
                .blkhash(blkhash);
            if let Some(n) = threads {
                options = options.threads(*n);
            }
            if let Some(bytes) = request_size {
                options = options.request_size(*bytes);
            }
            if let Some(bytes) = flush_every {
                options = options.flush_every(*bytes);
            }
            if backing.is_some() && (is_stdio(source) || is_stdio(destination)) {
                return Err("--backing creates a qcow2 overlay: name a file, not `-`".into());
            }
            if is_stdio(source) || is_stdio(destination) {
                let stream = StreamCopy {
                    source,
                    destination,
                    incremental: dirty_bitmap.is_some(),
                    connections: *connections,
                    blkhash,
                    blkhash_file: blkhash_file.as_deref(),
                    no_progress: *no_progress,
                };
                return stream_copy(&stream, options);
            }
            let source = match dirty_bitmap {
                Some(name) => with_dirty_bitmap(source, name)?,
                None => source.clone(),
            };
            let source = with_connections(&source, *connections);
            let destination = with_connections(destination, *connections);
            let src = vmsdk::disk::open(&source, OpenFlags::read_only())?;
            let capacity = src.info()?.capacity;
            if dirty_bitmap.is_some() && backing.is_none() {
                if let Some(path) = missing_file(&destination) {
                    return Err(format!(
                        "{} does not exist: an incremental copy writes into the previous full copy",
                        path.display()
                    )
                    .into());
                }
            }
            let (dst, fresh): (Box<dyn Disk>, bool) = match backing {
                Some(previous) => {
                    if missing_file(&destination).is_none() {
                        return Err(format!(
                            "{destination} exists: --backing creates a new overlay"
                        )
                        .into());
                    }
                    let overlay =
                        disk_transport::factory::create_overlay(&destination, capacity, previous)?;
                    (Box::new(overlay), false)
                }
                None => vmsdk::disk::open_or_create(&destination, capacity)?,
            };
            let cancel = interrupt_token()?;
            let options = options.destination_is_zero(fresh).cancel(cancel);
            let bar = progress_bar(*no_progress, capacity)?;
            let mut on_progress = |p: &CopyProgress| {
                bar.set_length(p.total);
                bar.set_position(p.done);
            };
            let result = if dirty_bitmap.is_some() {
                copy_changed(src.as_ref(), dst.as_ref(), &options, &mut on_progress)
            } else {
                copy(src.as_ref(), dst.as_ref(), &options, &mut on_progress)
            };
            bar.finish_and_clear();
            let report = match result {
                Ok(report) => report,
                Err(failed) if matches!(failed.error, Error::Cancelled) => {
                    let p = failed.report.progress;
                    eprintln!(
                        "vmsdk: interrupted: copy stopped after {} of {} bytes ({:.1} %) in {:.2} s; \
                         the destination is incomplete",
                        p.done,
                        p.total,
                        p.done as f64 * 100.0 / p.total.max(1) as f64,
                        failed.report.elapsed.as_secs_f64()
                    );
                    return Ok(ExitCode::from(130));
                }
                Err(failed) => return Err(failed.into()),
            };
            let p = report.progress;
            let what = if dirty_bitmap.is_some() {
                format!("{} changed bytes of {capacity}", p.total)
            } else {
                format!("{} bytes", p.total)
            };
            let retried = if p.retried > 0 {
                format!(", {} requests retried", p.retried)
            } else {
                String::new()
            };
            println!(
                "copied {what} in {:.2} s ({:.1} MiB/s): {} read, {} written, {} zeroed, {} skipped{retried}",
                report.elapsed.as_secs_f64(),
                report.bytes_per_second() / (1024.0 * 1024.0),
                p.read,
                p.written,
                p.zeroed,
                p.skipped
            );
            if let Some(hash) = report.blkhash {
                match blkhash_file {
                    Some(path) => std::fs::write(path, format!("{hash}\n"))?,
                    None => println!("{hash}"),
                }
            }
        }
        DiskCommand::Checksum {
            uri,
            blkhash,
            json,
            connections,
            threads,
            no_progress,
        } => return checksum(uri, blkhash, *json, *connections, *threads, *no_progress),
    }
    Ok(ExitCode::SUCCESS)
}

/// `uri` with the NBD connections `--connections` asked for, or else with the default for
/// where it leads (`vmsdk::disk::default_connections`); a `connections=N` in it wins.
fn with_connections(uri: &str, asked: Option<usize>) -> String {
    let connections = asked.unwrap_or_else(|| vmsdk::disk::default_connections(uri));
    vmsdk::disk::with_default_connections(uri, connections)
}

/// What `vmsdk disk copy` was asked, when one side is `-`.
struct StreamCopy<'a> {
    source: &'a str,
    destination: &'a str,
    incremental: bool,
    connections: Option<usize>,
    blkhash: Option<BlkhashSpec>,
    blkhash_file: Option<&'a std::path::Path>,
    no_progress: bool,
}

/// `vmsdk disk copy - DST` and `vmsdk disk copy SRC -`, as nbdcopy takes them: standard input
/// fills an existing disk from its start until it ends; standard output gets every byte of the
/// source in order, holes as zeros. Standard output carries nothing but the image then: the
/// summary and the block hash go to standard error (or --blkhash-file).
fn stream_copy(args: &StreamCopy<'_>, options: CopyOptions) -> CliResult {
    if is_stdio(args.source) && is_stdio(args.destination) {
        return Err("`-` on both sides: copy standard input to standard output with cat".into());
    }
    if args.incremental {
        return Err(
            "--dirty-bitmap with `-`: an incremental copy writes the changed ranges at their \
                offsets, which a stream does not have; copy into a disk"
                .into(),
        );
    }
    let options = options.cancel(interrupt_token()?);
    let (result, capacity) = if is_stdio(args.source) {
        if args.blkhash.is_some() {
            return Err(
                "--blkhash of standard input: its size is known only when it ends; \
                hash the destination afterwards (vmsdk disk checksum)"
                    .into(),
            );
        }
        let destination = with_connections(args.destination, args.connections);
        let (dst, fresh) = if destination.starts_with(vmsdk::disk::NULL_SINK) {
            // Any length: the sink takes what comes.
            vmsdk::disk::open_or_create(&destination, i64::MAX as u64)?
        } else if let Some(path) = missing_file(&destination) {
            return Err(format!(
                "{} does not exist: a copy from standard input writes into an existing disk, \
                    since the stream's size is not known before it ends (create it with the \
                    image's size, e.g. truncate -s SIZE, or name an NBD export)",
                path.display()
            )
            .into());
        } else {
            (
                vmsdk::disk::open(&destination, OpenFlags::read_write())?,
                false,
            )
        };
        let capacity = dst.info()?.capacity;
        let source = StreamSource::stdin()?;
        let bar = progress_bar(args.no_progress, capacity)?;
        let result = copy_from_stream(
            source,
            dst.as_ref(),
            &options.destination_is_zero(fresh),
            &mut |p| bar.set_position(p.done),
        );
        bar.finish_and_clear();
        (result, capacity)
    } else {
        let source = with_connections(args.source, args.connections);
        let src = vmsdk::disk::open(&source, OpenFlags::read_only())?;
        let capacity = src.info()?.capacity;
        let bar = progress_bar(args.no_progress, capacity)?;
        // Redirected into a file or onto a device (`> backup.img`), standard output can seek:
        // the parallel engine copies into it and holes stay holes, as nbdcopy does.
        let result = match stdout_as_disk(capacity)? {
            Some((dst, fresh)) => copy(
                src.as_ref(),
                dst.as_ref(),
                &options.destination_is_zero(fresh),
                &mut |p| bar.set_position(p.done),
            ),
            None => copy_to_stream(src.as_ref(), StreamSink::stdout()?, &options, &mut |p| {
                bar.set_position(p.done)
            }),
        };
        bar.finish_and_clear();
        (result, capacity)
    };
    let report = match result {
        Ok(report) => report,
        Err(failed) if matches!(failed.error, Error::Cancelled) => {
            let p = failed.report.progress;
            eprintln!(
                "vmsdk: interrupted: copy stopped after {} bytes; the destination is incomplete",
                p.done
            );
            return Ok(ExitCode::from(130));
        }
        Err(failed) => return Err(failed.into()),
    };
    let p = report.progress;
    let what = if is_stdio(args.source) {
        "from standard input"
    } else {
        "to standard output"
    };
    eprintln!(
        "copied {} bytes {what} in {:.2} s ({:.1} MiB/s): {} read, {} written, {} zeroed, {} skipped",
        p.total,
        report.elapsed.as_secs_f64(),
        report.bytes_per_second() / (1024.0 * 1024.0),
        p.read,
        p.written,
        p.zeroed,
        p.skipped
    );
    if is_stdio(args.source)
        && p.total < capacity
        && !args.destination.starts_with(vmsdk::disk::NULL_SINK)
    {
        eprintln!(
            "vmsdk: standard input ended after {} bytes; the destination's other {} bytes were \
                left as they were",
            p.total,
            capacity - p.total
        );
    }
    if let Some(hash) = report.blkhash {
        match args.blkhash_file {
            Some(path) => std::fs::write(path, format!("{hash}\n"))?,
            // Standard output holds the image.
            None => eprintln!("{hash}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on standard error (hidden with `--no-progress`, and when it is no terminal).
fn progress_bar(hidden: bool, length: u64) -> CliResult<ProgressBar> {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(length)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .map_err(|e| e.to_string())?,
    );
    Ok(bar)
}

/// `vmsdk disk checksum`: the digest alone, as nbdcopy prints it.
fn checksum(
    uri: &str,
    spec: &str,
    json: bool,
    connections: Option<usize>,
    threads: Option<usize>,
    no_progress: bool,
) -> CliResult {
    let spec: BlkhashSpec = spec.parse()?;
    let uri = with_connections(uri, connections);
    let disk = vmsdk::disk::open(&uri, OpenFlags::read_only())?;
    let bar = progress_bar(no_progress, disk.info()?.capacity)?;
    let mut options = CopyOptions::default().cancel(interrupt_token()?);
    if let Some(n) = threads {
        options = options.threads(n);
    }
    let result = disk_transport::blkhash::checksum(disk.as_ref(), spec, &options, &mut |p| {
        bar.set_position(p.done)
    });
    bar.finish_and_clear();
    let hash = match result {
        Ok(hash) => hash,
        Err(failed) if matches!(failed.error, Error::Cancelled) => {
            let p = failed.report.progress;
            eprintln!(
                "vmsdk: interrupted: checksum stopped after {} of {} bytes",
                p.done, p.total
            );
            return Ok(ExitCode::from(130));
        }
        Err(failed) => return Err(failed.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&hash)?);
    } else {
        println!("{hash}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmsdk disk compare`, with qemu-img compare's messages and exit statuses.
fn compare(first: &str, second: &str, strict: bool, json: bool) -> CliResult {
    let open = |uri: &str| vmsdk::disk::open(uri, OpenFlags::read_only());
    let (a, b) = match (open(first), open(second)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmsdk: {}", crate::describe(&e));
            return Ok(ExitCode::from(2));
        }
    };
    let options = CopyOptions::default().cancel(interrupt_token()?);
    let c = match disk_transport::compare::compare(a.as_ref(), b.as_ref(), &options) {
        Ok(c) => c,
        Err(Error::Cancelled) => {
            eprintln!("vmsdk: interrupted: comparison stopped");
            return Ok(ExitCode::from(130));
        }
        Err(e) => {
            eprintln!("vmsdk: {}", crate::describe(&e));
            return Ok(ExitCode::from(3));
        }
    };
    let size_mismatch = c.size_a != c.size_b;
    let differ = c.first_difference.is_some() || (strict && size_mismatch);
    if json {
        let value = serde_json::json!({
            "identical": !differ,
            "size_a": c.size_a,
            "size_b": c.size_b,
            "first_difference": c.first_difference,
            "read": c.read,
            "seconds": c.elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if strict && size_mismatch {
        println!("Strict mode: Image size mismatch!");
    } else {
        if size_mismatch {
            println!("Warning: Image size mismatch!");
        }
        match c.first_difference {
            // qemu-img names the 512-byte sector holding the first difference.
            Some(at) => println!("Content mismatch at offset {}!", at / 512 * 512),
            None => println!("Images are identical."),
        }
    }
    Ok(if differ {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A local image's format and chain, for `disk info`.
struct ImageFormat {
    format: &'static str,
    chain: Vec<vmsdk::disk::qcow2::ChainLink>,
}

/// The format of the local image `uri` names (by its name, never its contents), with the
/// backing chain of a qcow2 image; `None` for other disks.
fn image_format(uri: &str) -> vmsdk::Result<Option<ImageFormat>> {
    Ok(match uri.parse::<DiskUri>() {
        Ok(DiskUri::Qcow2 { path }) => Some(ImageFormat {
            format: "qcow2",
            chain: vmsdk::disk::qcow2::Qcow2Disk::open_read_only(&path)?.chain(),
        }),
        Ok(DiskUri::File { .. }) => Some(ImageFormat {
            format: "raw",
            chain: Vec::new(),
        }),
        _ => None,
    })
}

/// The path of a qcow2 URI.
fn qcow2_path(uri: &str) -> Option<std::path::PathBuf> {
    match uri.parse::<DiskUri>() {
        Ok(DiskUri::Qcow2 { path }) => Some(path),
        _ => None,
    }
}

/// A qcow2 map: nbdinfo's columns plus the depth in the chain and its file (as
/// `qemu-img map` tells them); JSON adds `depth`, `present` and `file` to nbdinfo's fields.
fn format_depth_map(
    map: &[vmsdk::disk::qcow2::MapEntry],
    chain: &[vmsdk::disk::qcow2::ChainLink],
    json: bool,
) -> Result<String, serde_json::Error> {
    let file = |depth: u32| {
        chain
            .get(depth as usize)
            .map(|l| l.path.display().to_string())
            .unwrap_or_default()
    };
    let kind = |e: &vmsdk::disk::qcow2::MapEntry| {
        if e.data {
            ExtentKind::Data
        } else if e.present {
            ExtentKind::Zero
        } else {
            ExtentKind::Hole
        }
    };
    // Runs that differ only in where their data lies in the file are one row here.
    let mut merged: Vec<vmsdk::disk::qcow2::MapEntry> = Vec::new();
    for e in map {
        match merged.last_mut() {
            Some(last)
                if last.start + last.length == e.start
                    && (last.depth, last.present, kind(last)) == (e.depth, e.present, kind(e)) =>
            {
                last.length += e.length;
            }
            _ => merged.push(e.clone()),
        }
    }
    let map = &merged;
    if !json {
        return Ok(map
            .iter()
            .map(|e| {
                let k = kind(e);
                format!(
                    "{:>10}  {:>10}  {:>3}  {:<9}  depth {} {}\n",
                    e.start,
                    e.length,
                    k.nbd_flags(),
                    describe(k),
                    e.depth,
                    if e.present {
                        file(e.depth)
                    } else {
                        "(unallocated)".into()
                    }
                )
            })
            .collect());
    }
    let objects = map
        .iter()
        .map(|e| {
            let k = kind(e);
            serde_json::to_string(&serde_json::json!({
                "offset": e.start,
                "length": e.length,
                "type": k.nbd_flags(),
                "description": describe(k),
                "depth": e.depth,
                "present": e.present,
                "file": if e.present { Some(file(e.depth)) } else { None },
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("[\n{}\n]\n", objects.join(",\n")))
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

/// A map as `nbdinfo --map` prints it: `OFFSET  LENGTH  TYPE  DESCRIPTION` lines, or with
/// `json` nbdinfo's array of `{ "offset", "length", "type", "description" }` objects.
fn format_map(rows: &[(u64, u64, u32, &str)], json: bool) -> String {
    if !json {
        return rows
            .iter()
            .map(|(offset, length, kind, what)| {
                format!("{offset:>10}  {length:>10}  {kind:>3}  {what}\n")
            })
            .collect();
    }
    let objects: Vec<String> = rows
        .iter()
        .map(|(offset, length, kind, what)| {
            format!(
                "{{ \"offset\": {offset}, \"length\": {length}, \"type\": {kind}, \"description\": {}}}",
                serde_json::Value::from(*what)
            )
        })
        .collect();
    format!("[\n{}\n]\n", objects.join(",\n"))
}

/// `uri` with `dirty-bitmap=NAME` among its parameters. Dirty bitmaps are read over NBD; other
/// URIs, and NBD URIs naming another bitmap, are errors.
fn with_dirty_bitmap(uri: &str, name: &str) -> Result<String, String> {
    match uri.parse::<DiskUri>() {
        Ok(DiskUri::Nbd {
            dirty_bitmap: None, ..
        }) => {
            let separator = if uri.contains('?') { '&' } else { '?' };
            Ok(format!("{uri}{separator}dirty-bitmap={}", query_escape(name)))
        }
        Ok(DiskUri::Nbd {
            dirty_bitmap: Some(given),
            ..
        }) if given == name => Ok(uri.to_owned()),
        Ok(DiskUri::Nbd {
            dirty_bitmap: Some(given),
            ..
        }) => Err(format!(
            "the URI asks for dirty bitmap {given:?} and --dirty-bitmap for {name:?}"
        )),
        _ => Err(format!(
            "--dirty-bitmap {name} reads qemu:dirty-bitmap:{name} over NBD; {uri} is not an NBD URI \
             (export the disk with `qemu-nbd -B {name}` or QEMU's block-export-add and name it \
             nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
        )),
    }
}

/// Percent-escapes what cannot stand in a URI query value.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The path of a file URI (or bare path) that does not exist.
fn missing_file(uri: &str) -> Option<std::path::PathBuf> {
    let path = if uri.contains(':') {
        match uri.parse::<DiskUri>() {
            Ok(DiskUri::File { path, .. }) | Ok(DiskUri::Qcow2 { path }) => path,
            _ => return None,
        }
    } else {
        std::path::PathBuf::from(uri)
    };
    (!path.exists()).then_some(path)
}

/// A cancel token set by Ctrl-C (SIGINT): the copy stops within a second and says how far it
/// got. A second Ctrl-C ends the process at once, with status 130.
fn interrupt_token() -> std::io::Result<CancelToken> {
    use signal_hook::consts::SIGINT;
    let flag = Arc::new(AtomicBool::new(false));
    // The order matters: the exit is armed by the first signal, which sets the flag after it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGINT, Arc::clone(&flag))?;
    Ok(CancelToken::from(flag))
}
