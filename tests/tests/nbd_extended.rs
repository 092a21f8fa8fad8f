//! Extended headers, FUA and fast zero against real servers.
//!
//! - qemu-nbd 10 (Debian 13) offers `NBD_OPT_EXTENDED_HEADERS`: the client negotiates it, maps
//!   a sparse image larger than 4 GiB with 64-bit block status exactly as `nbdinfo --map`
//!   prints it (also through `vmsdk disk map`), and zeroes more than 4 GiB; qemu-nbd 7.2 and
//!   nbdkit (1.32, 1.42) lack it and get compact headers, with the same results.
//! - nbdkit's log filter shows FUA on writes when asked and `FAST_ZERO` requests, and its
//!   nozero filter makes fast zeroing fail over to the slow way as the spec describes.

use std::path::Path;
use std::process::Command;

use disk_transport::nbd::{NbdDisk, NbdOptions};
use disk_transport::{open_uri, Disk, NbdAddress, OpenFlags};
use vmsdk_tests::disk::{merge_map, nbd_tool, nbdinfo_map_in, sparse_image, NbdServer};
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A sparse 6 GiB image with data on both sides of 4 GiB and right at the end.
fn big_sparse_image(path: &Path) -> u64 {
    let size = 6 * GIB;
    sparse_image(
        path,
        size,
        &[
            (0, 65536),
            (GIB + 4096, 200_000),
            (4 * GIB - 65536, 131_072),
            (5 * GIB + 12_345 * 512, 1 << 20),
            (size - 4096, 4096),
        ],
    );
    size
}

fn map_text(extents: &[(u64, u64, u32)]) -> String {
    let describe = |f: u32| match f {
        0 => "data",
        1 => "hole",
        2 => "zero",
        _ => "hole,zero",
    };
    extents
        .iter()
        .map(|(o, l, f)| format!("{o:>10}  {l:>10}  {f:>3}  {}\n", describe(*f)))
        .collect()
}

#[test]
fn a_sparse_image_beyond_4_gib_maps_as_nbdinfo_maps_it() {
    for_each_generation(&["qemu-nbd", "nbdinfo"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("big.img");
        let size = big_sparse_image(&image);
        let Some(server) =
            NbdServer::qemu_nbd_in(generation, &["-r", "-f", "raw", image.to_str().unwrap()])
        else {
            return;
        };
        eprintln!("{}", server.version());
        let disk = NbdDisk::connect(
            &NbdOptions::new(NbdAddress::Unix(server.socket().to_owned())).export("disk"),
        )
        .unwrap();
        let info = disk.export_info();
        eprintln!(
            "negotiated: extended headers {}, structured replies {}",
            info.extended_headers, info.structured_replies
        );
        // qemu 8.2+ offers extended headers, 7.2 does not.
        assert_eq!(
            info.extended_headers,
            generation == Generation::Trixie,
            "{info:?}"
        );
        let ours: Vec<(u64, u64, u32)> = disk
            .allocated_extents(0, size)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.kind.nbd_flags()))
            .collect();
        assert_eq!(ours.last().map(|e| e.0 + e.1), Some(size));
        assert!(ours.iter().any(|e| e.0 > 4 * GIB && e.2 == 0), "{ours:?}");
        drop(disk);
        let Some(theirs) = nbdinfo_map_in(generation, &server.uri(), None) else {
            return;
        };
        assert_eq!(ours, merge_map(&theirs), "map differs from nbdinfo --map");

        // The command line prints it as nbdinfo does, byte for byte.
        let Some(vmsdk) = vmsdk_tests::vmsdk_binary() else {
            return;
        };
        let out = Command::new(vmsdk)
            .args(["disk", "map"])
            .arg(server.uri())
            .output()
            .unwrap();
        vmsdk_tests::assert_success(&out, "vmsdk disk map");
        let printed = String::from_utf8(out.stdout).unwrap();
        let Some(nbdinfo) = nbd_tool(generation, "nbdinfo") else {
            return;
        };
        let reference = nbdinfo.arg("--map").arg(server.uri()).output();
        let reference = String::from_utf8(reference.stdout).unwrap();
        if merge_map(&theirs) == theirs {
            assert_eq!(
                printed, reference,
                "vmsdk disk map differs from nbdinfo --map"
            );
        } else {
            // nbdinfo prints the server's extents unmerged; vmsdk merges neighbours.
            assert_eq!(printed, map_text(&merge_map(&theirs)));
        }
    });
}

#[test]
fn zeroing_more_than_4_gib_and_writing_beyond_it() {
    for_each_generation(&["qemu-nbd"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("big.img");
        let size = big_sparse_image(&image);
        let Some(server) =
            NbdServer::qemu_nbd_in(generation, &["-f", "raw", image.to_str().unwrap()])
        else {
            return;
        };
        let disk = open_uri(&server.uri(), OpenFlags::read_write()).unwrap();
        let protocol = disk.protocol().unwrap();
        eprintln!("transmission: {}", protocol.transmission);
        // Data past 4 GiB survives a round trip.
        let data = vmsdk_tests::disk::random_bytes(1 << 20, 77);
        disk.write_at(&data, 4 * GIB + 3 * MIB).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        disk.read_at(&mut back, 4 * GIB + 3 * MIB).unwrap();
        assert_eq!(back, data);
        // 6 GiB of zeroes: one request with extended headers, two without.
        disk.write_zeroes(0, size).unwrap();
        disk.flush().unwrap();
        disk.read_at(&mut back, 4 * GIB + 3 * MIB).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let extents = disk.allocated_extents(0, size).unwrap();
        assert!(
            extents.iter().all(|e| e.kind.reads_as_zero()),
            "{extents:?}"
        );
        drop(disk);
        drop(server);
        // Where the data was, the image now holds zeroes.
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&image).unwrap();
        for offset in [
            0,
            GIB + 4096,
            4 * GIB - 65536,
            4 * GIB + 3 * MIB,
            size - 4096,
        ] {
            let mut buf = vec![0xffu8; 4096];
            file.read_exact_at(&mut buf, offset).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "data left at {offset}");
        }
    });
}

/// The lines of nbdkit's log filter for one command, e.g. `Write`.
fn log_lines(log: &Path, command: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!(" {command} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn fua_and_fast_zero_reach_nbdkit_as_asked() {
    for_each_generation(&["nbdkit"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.txt");
        let logfile = format!("logfile={}", log.display());
        let Some(server) =
            NbdServer::nbdkit_in(generation, &["--filter=log", "memory", "16M", &logfile])
        else {
            return;
        };
        eprintln!("{}", server.version());
        let address = NbdAddress::Unix(server.socket().to_owned());
        let disk = NbdDisk::connect(&NbdOptions::new(address.clone())).unwrap();
        let protocol = disk.protocol().unwrap();
        assert!(protocol.can_fua && protocol.can_fast_zero, "{protocol:?}");
        assert_eq!(protocol.transmission, "structured");
        disk.write_at(&[1u8; 4096], 0).unwrap();
        disk.write_fua(&[2u8; 4096], 4096).unwrap();
        assert!(disk.fast_zero(0, 16 * MIB).unwrap());
        drop(disk);
        let writes = log_lines(&log, "Write");
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(
            writes[0].contains("fua=0") && writes[1].contains("fua=1"),
            "{writes:?}"
        );
        let zeroes = log_lines(&log, "Zero");
        assert!(zeroes.iter().any(|l| l.contains("fast=1")), "{zeroes:?}");

        // A server whose zeroing is slow says so; nothing is zeroed and the caller falls back.
        let Some(slow) = NbdServer::nbdkit_in(
            generation,
            &[
                "--filter=nozero",
                "memory",
                "16M",
                "zeromode=emulate",
                "fastzeromode=slow",
            ],
        ) else {
            return;
        };
        let disk =
            NbdDisk::connect(&NbdOptions::new(NbdAddress::Unix(slow.socket().to_owned()))).unwrap();
        disk.write_at(&[5u8; 4096], 0).unwrap();
        assert!(!disk.fast_zero(0, 16 * MIB).unwrap());
        let mut back = [0u8; 4096];
        disk.read_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 5),
            "a refused fast zero changed data"
        );
        disk.write_zeroes(0, 16 * MIB).unwrap();
        disk.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(disk.allocated_extents(0, 4096).unwrap()[0]
            .kind
            .reads_as_zero());
    });
}
