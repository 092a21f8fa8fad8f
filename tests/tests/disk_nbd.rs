//! disk-transport's NBD client and copy engine against real servers: qemu-nbd and nbdkit
//! (with its error and delay filters), checked with sha256 and `nbdinfo --map`.
//!
//! Every test runs against each peer generation ([`Generation::selected`]): Debian 12's
//! qemu-nbd 7.2, nbdkit 1.32 and nbdinfo 1.14 on the machine, and Debian 13's qemu-nbd 10.0,
//! nbdkit 1.42 and nbdinfo 1.22 in the peer root; each prints the versions it ran.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use disk_transport::blkhash::{checksum, BlkhashSpec};
use disk_transport::copy::{copy, copy_changed, CopyOptions};
use disk_transport::file::FileDisk;
use disk_transport::memory::MemoryDisk;
use disk_transport::nbd::{NbdDisk, NbdOptions};
use disk_transport::{open_uri, Disk, Error, ExtentKind, NbdAddress, OpenFlags};
use vmsdk_tests::disk::{
    merge_map, nbdinfo_map_in, random_bytes, random_image, sha256, sha256_file, sparse_image,
    NbdServer,
};
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;

fn options(server: &NbdServer, export: &str) -> NbdOptions {
    NbdOptions::new(NbdAddress::Unix(server.socket().to_owned()))
        .export(export)
        .timeout(Duration::from_secs(10))
}

/// Copies `image` out through qemu-nbd into a new file, then back into a writable qemu-nbd
/// export, checking sha256 both ways.
/// qemu-nbd rounds sizes up to 512 bytes, so odd sizes are served by nbdkit.
fn serve(
    generation: Generation,
    image: &std::path::Path,
    read_only: bool,
    nbdkit: bool,
) -> Option<(NbdServer, &'static str)> {
    let path = image.to_str().unwrap();
    let g = generation;
    match (nbdkit, read_only) {
        (false, true) => NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", path]).map(|s| (s, "disk")),
        (false, false) => NbdServer::qemu_nbd_in(g, &["-f", "raw", path]).map(|s| (s, "disk")),
        (true, true) => NbdServer::nbdkit_in(g, &["-r", "file", path]).map(|s| (s, "")),
        (true, false) => NbdServer::nbdkit_in(g, &["file", path]).map(|s| (s, "")),
    }
}

fn round_trip(
    generation: Generation,
    image: &std::path::Path,
    dir: &std::path::Path,
    connections: usize,
    structured: bool,
    nbdkit: bool,
) {
    let expected = sha256_file(image);
    let size = std::fs::metadata(image).unwrap().len();
    let Some((server, export)) = serve(generation, image, true, nbdkit) else {
        return;
    };
    let src = NbdDisk::connect(
        &options(&server, export)
            .connections(connections)
            .structured_replies(structured),
    )
    .unwrap();
    assert_eq!(src.info().unwrap().capacity, size);
    let out = dir.join("out.img");
    let dst = FileDisk::create(&out, size).unwrap();
    let report = copy(
        &src,
        &dst,
        &CopyOptions::default().destination_is_zero(true),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.progress.done, size);
    eprintln!("export → file: {report:?}");
    drop(dst);
    assert_eq!(sha256_file(&out), expected, "export → file");
    drop(src);
    drop(server);

    // And back: file → writable export (pre-filled with garbage so zeroing is checked).
    let back = dir.join("back.img");
    let garbage: Vec<(u64, usize)> = (0..8)
        .map(|i| (size / 8 * i, 65536.min(size as usize / 8)))
        .collect();
    sparse_image(&back, size, &garbage);
    let Some((server, export)) = serve(generation, &back, false, nbdkit) else {
        return;
    };
    let src = FileDisk::open(&out, &Default::default()).unwrap();
    let dst = NbdDisk::connect(&options(&server, export).connections(connections)).unwrap();
    let report = copy(&src, &dst, &CopyOptions::default(), &mut |_| {}).unwrap();
    eprintln!("file → export: {report:?}");
    drop(dst);
    drop(server);
    assert_eq!(sha256_file(&back), expected, "file → export");
}

#[test]
fn copies_random_sparse_and_odd_sized_images_both_ways() {
    for_each_generation(&["qemu-nbd", "nbdkit"], copy_both_ways);
}

fn copy_both_ways(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let random = dir.path().join("random.img");
    random_image(&random, 8 * MIB as usize, 1);
    round_trip(g, &random, dir.path(), 1, true, false);
    round_trip(g, &random, dir.path(), 1, true, true);

    let sparse = dir.path().join("sparse.img");
    sparse_image(
        &sparse,
        256 * MIB,
        &[
            (0, 4096),
            (3 * MIB + 512, 70_000),
            (100 * MIB, 5 * MIB as usize),
            (256 * MIB - 4096, 4096),
        ],
    );
    round_trip(g, &sparse, dir.path(), 1, true, false);

    // Odd size: not a multiple of 512, data in the unaligned tail.
    let odd = dir.path().join("odd.img");
    sparse_image(&odd, 5 * MIB + 4097, &[(MIB, 1000), (5 * MIB, 4097)]);
    round_trip(g, &odd, dir.path(), 1, true, true);
}

#[test]
fn copies_with_multi_conn_and_with_simple_replies() {
    for_each_generation(&["qemu-nbd", "nbdkit"], multi_conn_and_simple_replies);
}

fn multi_conn_and_simple_replies(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("random.img");
    sparse_image(
        &image,
        64 * MIB,
        &[(0, 8 * MIB as usize), (40 * MIB + 7, 123_457)],
    );
    round_trip(g, &image, dir.path(), 2, true, false);
    round_trip(g, &image, dir.path(), 2, true, true);
    round_trip(g, &image, dir.path(), 1, false, false);
}

#[test]
fn block_status_matches_nbdinfo_map() {
    for_each_generation(&["qemu-nbd", "nbdkit", "nbdinfo"], block_status_vs_nbdinfo);
}

fn block_status_vs_nbdinfo(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("sparse.img");
    sparse_image(
        &image,
        64 * MIB,
        &[
            (MIB, 4096),
            (10 * MIB, 3 * MIB as usize),
            (63 * MIB, MIB as usize),
        ],
    );
    let path = image.to_str().unwrap();
    let servers = [
        NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", path]),
        NbdServer::nbdkit_in(g, &["-r", "file", path]),
    ];
    for server in servers.into_iter().flatten() {
        let Some(expected) = nbdinfo_map_in(g, &server.uri(), None) else {
            return;
        };
        let disk = open_uri(&server.uri(), OpenFlags::read_only()).unwrap();
        assert!(disk.info().unwrap().can_extents);
        let ours: Vec<(u64, u64, u32)> = disk
            .allocated_extents(0, 64 * MIB)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.kind.nbd_flags()))
            .collect();
        assert_eq!(ours, merge_map(&expected), "server {}", server.uri());
        // A window in the middle of an extent starts and ends exactly at the window.
        let part = disk.allocated_extents(10 * MIB + 5, MIB).unwrap();
        assert_eq!(part.first().unwrap().offset, 10 * MIB + 5);
        assert_eq!(part.last().unwrap().end(), 11 * MIB + 5);
        assert!(part.iter().all(|e| e.kind == ExtentKind::Data));
    }
}

#[test]
fn dirty_bitmap_extents_match_nbdinfo() {
    for_each_generation(
        &["qemu-img", "qemu-nbd", "nbdinfo"],
        dirty_bitmap_vs_nbdinfo,
    );
}

/// The image, its bitmap and its writes are made by the generation's own qemu-img and qemu-io.
fn dirty_bitmap_vs_nbdinfo(g: Generation) {
    let (Some(qemu_img), Some(qemu_io)) = (
        g.command("qemu-img", "qemu-utils"),
        g.command("qemu-io", "qemu-utils"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let run = |program: &vmsdk_tests::peers::PeerCommand, args: &[&str]| {
        let out = program.clone().args(args).output();
        vmsdk_tests::assert_success(&out, format_args!("{args:?}"));
    };
    let path = image.to_str().unwrap();
    run(&qemu_img, &["create", "-q", "-f", "qcow2", path, "64M"]);
    run(&qemu_io, &["-c", "write -P 1 0 1M", path]);
    run(&qemu_img, &["bitmap", "--add", path, "b0"]);
    run(
        &qemu_io,
        &["-c", "write -P 2 8M 128k", "-c", "write -P 3 32M 64k", path],
    );
    let Some(server) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", "-B", "b0", path]) else {
        return;
    };
    let disk = NbdDisk::connect(&options(&server, "disk").dirty_bitmap("b0")).unwrap();
    let dirty: Vec<(u64, u64, u32)> = disk
        .dirty_extents(0, 64 * MIB)
        .unwrap()
        .iter()
        .map(|d| (d.offset, d.length, u32::from(d.dirty)))
        .collect();
    let Some(expected) = nbdinfo_map_in(g, &server.uri(), Some("qemu:dirty-bitmap:b0")) else {
        return;
    };
    assert_eq!(dirty, merge_map(&expected));
    assert!(dirty.iter().any(|&(o, _, d)| d == 1 && o <= 8 * MIB));

    // Incremental backup: the backup taken when the bitmap was added, plus the dirty ranges,
    // equals the disk now.
    let backup = MemoryDisk::new(64 * MIB);
    backup.write_at(&[1u8; MIB as usize], 0).unwrap();
    let changed: u64 = dirty
        .iter()
        .filter(|&&(_, _, d)| d == 1)
        .map(|&(_, l, _)| l)
        .sum();
    let report = copy_changed(&disk, &backup, &CopyOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(report.progress.total, changed);
    let mut now = vec![0u8; 64 * MIB as usize];
    disk.read_at(&mut now, 0).unwrap();
    assert_eq!(sha256(&backup.to_vec().unwrap()), sha256(&now));
    // Asking for a bitmap that does not exist is a clear handshake error.
    let err = NbdDisk::connect(&options(&server, "disk").dirty_bitmap("nope")).unwrap_err();
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"), "{err}");
}

#[test]
fn nbdkit_memory_read_write_zero_trim_flush() {
    for_each_generation(&["nbdkit"], nbdkit_memory);
}

fn nbdkit_memory(g: Generation) {
    let Some(server) = NbdServer::nbdkit_in(g, &["memory", "size=16M"]) else {
        return;
    };
    let disk = open_uri(&server.uri(), OpenFlags::read_write()).unwrap();
    // nbdkit 1.42 advertises block sizes (maximum 4 GiB - 1), 1.32 none: requests stay within
    // the protocol's 32 MiB either way.
    let info = disk.info().unwrap();
    assert!(info.max_request_size <= 32 << 20, "{info:?}");
    assert!(info.max_request_size >= MIB as u32, "{info:?}");
    let data = random_bytes(3 * MIB as usize + 4096, 5);
    disk.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    disk.read_at(&mut back, 4096).unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    disk.write_zeroes(MIB, MIB).unwrap();
    disk.read_at(&mut back[..MIB as usize], MIB).unwrap();
    assert!(back[..MIB as usize].iter().all(|&b| b == 0));
    disk.trim(2 * MIB, MIB).unwrap();
    disk.flush().unwrap();
    let extents = disk.allocated_extents(0, 16 * MIB).unwrap();
    assert_eq!(extents.last().unwrap().end(), 16 * MIB);
    // Out of range and read-only errors are local and clear.
    assert!(matches!(
        disk.read_at(&mut [0u8; 10], 16 * MIB - 5),
        Err(Error::OutOfRange { .. })
    ));
    let ro = open_uri(&server.uri(), OpenFlags::read_only()).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly(_))));
}

#[test]
fn unknown_export_and_missing_socket_are_clear_errors() {
    for_each_generation(&["qemu-nbd"], unknown_export_and_missing_socket);
}

fn unknown_export_and_missing_socket(g: Generation) {
    let Some(server) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", "/dev/null"]) else {
        return;
    };
    let err = NbdDisk::connect(&options(&server, "no-such-export")).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(err.to_string().contains("no-such-export"), "{err}");
    let err = open_uri(
        "nbd+unix:///disk?socket=/nonexistent/nbd.sock",
        OpenFlags::read_only(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/nbd.sock"), "{err}");
}

#[test]
fn server_errors_name_the_offset() {
    for_each_generation(&["nbdkit"], server_errors);
}

fn server_errors(g: Generation) {
    let Some(server) = NbdServer::nbdkit_in(
        g,
        &[
            "--filter=error",
            "pattern",
            "size=64M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    ) else {
        return;
    };
    let disk = NbdDisk::connect(&options(&server, "")).unwrap();
    let mut buf = vec![0u8; 65536];
    let err = disk.read_at(&mut buf, 3 * MIB).unwrap_err();
    assert_eq!(err.nbd_errno(), Some(5), "{err}");
    assert!(err.to_string().contains("offset 3145728"), "{err}");
    eprintln!("server error: {err}");
    // The connection survives a server error.
    let err = disk.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.nbd_errno(), Some(5));

    // A copy stops with that error instead of reporting success.
    let dst = MemoryDisk::new(64 * MIB);
    let err = copy(&disk, &dst, &CopyOptions::default(), &mut |_| {})
        .unwrap_err()
        .error;
    assert_eq!(err.nbd_errno(), Some(5), "{err}");
    assert!(err.to_string().contains("offset"), "{err}");
}

#[test]
fn a_stalled_server_times_out_instead_of_hanging() {
    for_each_generation(&["nbdkit"], stalled_server_times_out);
}

fn stalled_server_times_out(g: Generation) {
    let Some(server) =
        NbdServer::nbdkit_in(g, &["--filter=delay", "memory", "size=8M", "rdelay=30"])
    else {
        return;
    };
    let disk = NbdDisk::connect(&options(&server, "").timeout(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let err = disk.read_at(&mut [0u8; 4096], 8192).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                offset: Some(8192),
                ..
            }
        ),
        "{err}"
    );
    // Bounded, not a performance figure: the timeout is 1 s, a hang would be 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    // The connection is closed afterwards; later calls fail at once.
    let err = disk.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(
        matches!(err, Error::Disconnected { .. } | Error::Timeout { .. }),
        "{err}"
    );
}

#[test]
fn killing_the_server_mid_copy_fails_with_the_offset() {
    for_each_generation(&["nbdkit"], killed_server_mid_copy);
}

fn killed_server_mid_copy(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    random_image(&image, 64 * MIB as usize, 3);
    // A slow server (2 ms per read) so the copy is surely in progress when it is killed.
    let Some(mut server) = NbdServer::nbdkit_in(
        g,
        &[
            "-r",
            "--filter=delay",
            "file",
            image.to_str().unwrap(),
            "rdelay=2ms",
        ],
    ) else {
        return;
    };
    let src = NbdDisk::connect(&options(&server, "").timeout(Duration::from_secs(5))).unwrap();
    let dst = MemoryDisk::new(64 * MIB);
    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    let killer = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill();
    });
    let t0 = Instant::now();
    let result = copy(
        &src,
        &dst,
        &CopyOptions::default().request_size(64 * 1024),
        &mut |p| {
            if p.done > 0 {
                started.store(true, Ordering::SeqCst);
            }
        },
    );
    killer.join().unwrap();
    let err = result
        .expect_err("a copy from a killed server must not succeed")
        .error;
    eprintln!("killed server: {err}");
    assert!(
        matches!(
            err,
            Error::Disconnected {
                offset: Some(_),
                ..
            } | Error::Io { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("offset"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn block_size_constraints_are_obeyed() {
    for_each_generation(&["nbdkit"], block_size_constraints);
}

fn block_size_constraints(g: Generation) {
    // The server refuses (EINVAL) any request breaking its advertised sizes.
    let Some(server) = NbdServer::nbdkit_in(
        g,
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=131072",
            "blocksize-error-policy=error",
        ],
    ) else {
        return;
    };
    let disk = NbdDisk::connect(&options(&server, "")).unwrap();
    let info = disk.info().unwrap();
    assert_eq!((info.min_block_size, info.max_request_size), (4096, 131072));
    // Large requests are split at the server's maximum.
    let data = random_bytes(3 * MIB as usize, 11);
    disk.write_at(&data, MIB).unwrap();
    let mut back = vec![0u8; data.len()];
    disk.read_at(&mut back, MIB).unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    // Block status of any range works: widened to 4096 for the server, clipped back.
    let extents = disk.allocated_extents(MIB + 100, 5000).unwrap();
    assert_eq!(extents.first().unwrap().offset, MIB + 100);
    assert_eq!(extents.last().unwrap().end(), MIB + 5100);
    // Unaligned requests are refused locally, naming the rule.
    let err = disk.read_at(&mut [0u8; 100], 4096).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unaligned {
                alignment: 4096,
                ..
            }
        ),
        "{err}"
    );
    // The copy engine rounds its request size to the constraints, both ways.
    let mem = MemoryDisk::new(8 * MIB);
    let options = CopyOptions::default().request_size(1_000_000);
    copy(&disk, &mem, &options, &mut |_| {}).unwrap();
    assert_eq!(
        sha256(&mem.to_vec().unwrap()[MIB as usize..4 * MIB as usize]),
        sha256(&data)
    );
    mem.write_at(&random_bytes(5000, 12), 7 * MIB).unwrap();
    copy(&mem, &disk, &options, &mut |_| {}).unwrap();
    let mut all = vec![0u8; 8 * MIB as usize];
    disk.read_at(&mut all, 0).unwrap();
    assert_eq!(sha256(&all), sha256(&mem.to_vec().unwrap()));
}

#[test]
fn a_failing_destination_stops_the_copy_with_the_offset() {
    for_each_generation(&["nbdkit"], failing_destination);
}

fn failing_destination(g: Generation) {
    let Some(server) = NbdServer::nbdkit_in(
        g,
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ],
    ) else {
        return;
    };
    let dst = NbdDisk::connect(&options(&server, "")).unwrap();
    let src = MemoryDisk::with_data(&random_bytes(16 * MIB as usize, 4));
    let err = copy(&src, &dst, &CopyOptions::default(), &mut |_| {})
        .unwrap_err()
        .error;
    assert_eq!(err.nbd_errno(), Some(28), "{err}");
    assert!(err.to_string().contains("ENOSPC"), "{err}");
    assert!(err.to_string().contains("offset"), "{err}");
}

#[test]
fn lists_exports_like_nbdinfo() {
    for_each_generation(&["qemu-nbd"], lists_exports);
}

fn lists_exports(g: Generation) {
    let Some(server) =
        NbdServer::qemu_nbd_in(g, &["-r", "-D", "the test disk", "-f", "raw", "/dev/null"])
    else {
        return;
    };
    let address = NbdAddress::Unix(server.socket().to_owned());
    let exports = disk_transport::nbd::list_exports(&address, Duration::from_secs(10)).unwrap();
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(exports[0].name, "disk");
    assert_eq!(exports[0].description, "the test disk");
    // The listing session ended cleanly: the server still serves the export.
    let disk = NbdDisk::connect(&options(&server, "disk")).unwrap();
    assert_eq!(disk.info().unwrap().capacity, 0);
}

#[test]
fn driven_queues_read_what_the_server_holds_and_a_capped_server_still_copies() {
    for_each_generation(&["qemu-nbd", "nbdkit"], driven_queues);
}

fn driven_queues(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("random.img");
    random_image(&image, 16 * MIB as usize, 5);
    let bytes = std::fs::read(&image).unwrap();
    let path = image.to_str().unwrap();
    for (server, export) in [
        NbdServer::qemu_nbd_in(g, &["-r", "-f", "raw", path]).map(|s| (s, "disk")),
        NbdServer::nbdkit_in(g, &["-r", "file", path]).map(|s| (s, "")),
    ]
    .into_iter()
    .flatten()
    {
        let disk = NbdDisk::connect(&options(&server, export)).unwrap();
        let mut queue = disk
            .driven_queue()
            .unwrap()
            .unwrap_or_else(|| panic!("{} offers multi-conn: a queue", server.version()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reads: Vec<(u64, usize)> = (0..40)
            .map(|i| (i * 397 * 1024, 4096 + i as usize * 8192))
            .collect();
        for &(offset, length) in &reads {
            let tx = tx.clone();
            let me = std::thread::current().id();
            queue.submit_read(
                offset,
                vec![0; length],
                Box::new(move |r| {
                    assert_eq!(
                        std::thread::current().id(),
                        me,
                        "completed on the driving thread"
                    );
                    tx.send((offset, r)).unwrap()
                }),
            );
        }
        let mut got = 0;
        let until = Instant::now() + Duration::from_secs(20);
        while got < reads.len() {
            assert!(
                Instant::now() < until,
                "{}: reads left waiting",
                server.version()
            );
            queue.drive(Duration::from_millis(50));
            while let Ok((offset, r)) = rx.try_recv() {
                let buf = r.unwrap();
                let at = offset as usize;
                assert_eq!(
                    buf,
                    bytes[at..at + buf.len()],
                    "{} at {offset}",
                    server.version()
                );
                got += 1;
            }
        }
        eprintln!("{}: {got} reads on a driven queue", server.version());
    }

    // qemu-nbd taking two clients while it advertises multi-conn: a copy into a sink (the
    // copies that read on queues of their own) over both connections cannot open its queues
    // (the server leaves them unanswered) and must not wait for them long, nor read less.
    let Some(server) = NbdServer::qemu_nbd_in(g, &["-e", "2", "-r", "-f", "raw", path]) else {
        return;
    };
    let src = NbdDisk::connect(&options(&server, "disk").connections(2)).unwrap();
    assert!(src.info().unwrap().can_multi_conn);
    let spec = BlkhashSpec::default();
    let two_threads = CopyOptions::default().threads(2);
    let started = Instant::now();
    let read = checksum(&src, spec, &two_threads, &mut |_| {}).unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{}: a copy at the client limit took {took:?}",
        server.version()
    );
    let local = MemoryDisk::with_data(&bytes);
    let expected = checksum(&local, spec, &two_threads, &mut |_| {}).unwrap();
    assert_eq!(read, expected, "{}", server.version());
    eprintln!("{} capped at 2 clients: read in {took:?}", server.version());
}

#[test]
fn copies_over_tcp_loopback() {
    for_each_generation(&["qemu-nbd", "nbdinfo"], copy_over_tcp);
}

fn copy_over_tcp(g: Generation) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("tcp.img");
    sparse_image(
        &image,
        32 * MIB,
        &[(0, 4096), (7 * MIB + 11, 2 * MIB as usize)],
    );
    // The helper's readiness probe makes qemu-nbd log a failed negotiation; harmless.
    let Some((server, uri)) =
        NbdServer::qemu_nbd_tcp_in(g, &["-r", "-f", "raw", image.to_str().unwrap()])
    else {
        return;
    };
    // Two connections (qemu-nbd advertises multi-conn for read-only exports).
    let src = open_uri(&format!("{uri}?connections=2"), OpenFlags::read_only()).unwrap();
    assert!(src.info().unwrap().can_multi_conn);
    let out = dir.path().join("out.img");
    let dst = FileDisk::create(&out, 32 * MIB).unwrap();
    copy(
        src.as_ref(),
        &dst,
        &CopyOptions::default().destination_is_zero(true),
        &mut |_| {},
    )
    .unwrap();
    drop(dst);
    assert_eq!(sha256_file(&out), sha256_file(&image));
    let Some(expected) = nbdinfo_map_in(g, &uri, None) else {
        return;
    };
    let ours: Vec<(u64, u64, u32)> = src
        .allocated_extents(0, 32 * MIB)
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.length, e.kind.nbd_flags()))
        .collect();
    assert_eq!(ours, merge_map(&expected));
    drop(server);
}
