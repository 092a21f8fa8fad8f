//! Full-then-incremental backups with the `vmsdk` tool, end to end and without a VM: a qcow2
//! image with a persistent dirty bitmap (`qemu-img bitmap --add`), writes after the bitmap was
//! added (through qemu-io, and through a writable qemu-nbd export), exported with
//! `qemu-nbd -B NAME`. The incremental copy must make the full copy equal to the image now
//! (sha256), `vmsdk disk map --dirty-bitmap` must print what the generation's
//! `nbdinfo --map=qemu:dirty-bitmap:NAME` prints, and wrong destinations, missing bitmaps and
//! servers without the context must fail before any byte is written. Ctrl-C stops a copy
//! within a second with status 130.
//!
//! Every test runs against each peer generation (Debian 12's qemu 7.2 and libnbd 1.14 on the
//! machine, Debian 13's qemu 10.0 and libnbd 1.22 in the peer root) and prints the versions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use disk_transport::copy::{copy_changed, CopyOptions};
use disk_transport::nbd::{NbdDisk, NbdOptions};
use disk_transport::{Disk, NbdAddress};
use vmsdk_tests::disk::{nbd_tool, sha256, sha256_file, NbdServer};
use vmsdk_tests::peers::{for_each_generation, Generation, PeerCommand};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// Runs a peer tool to success.
fn peer(generation: Generation, program: &str, args: &[&str]) -> Option<Output> {
    let out = generation
        .command(program, "qemu-utils")?
        .args(args)
        .output();
    vmsdk_tests::assert_success(
        &out,
        format_args!("{program} {args:?} ({generation}) failed"),
    );
    Some(out)
}

fn vmsdk(args: &[&str]) -> Option<Output> {
    let binary = vmsdk_tests::vmsdk_binary()?;
    Some(Command::new(binary).args(args).output().expect("run vmsdk"))
}

fn vmsdk_ok(args: &[&str]) -> Option<String> {
    let out = vmsdk(args)?;
    vmsdk_tests::assert_success(&out, format_args!("vmsdk {args:?} failed"));
    Some(String::from_utf8(out.stdout).expect("UTF-8"))
}

fn vmsdk_fails(args: &[&str]) -> Option<String> {
    let out = vmsdk(args)?;
    assert!(!out.status.success(), "vmsdk {args:?} succeeded");
    Some(String::from_utf8(out.stderr).expect("UTF-8"))
}

/// The image's contents now, as qemu-img of the same generation reads them.
fn image_sha256(generation: Generation, image: &Path, dir: &Path) -> Option<String> {
    let raw = dir.join("now.raw");
    peer(
        generation,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    )?;
    let sum = sha256_file(&raw);
    std::fs::remove_file(&raw).unwrap();
    Some(sum)
}

/// The changed bytes the tool reported: `copied N changed bytes of SIZE ...`.
fn changed_bytes(summary: &str) -> u64 {
    summary
        .strip_prefix("copied ")
        .and_then(|s| s.split_once(" changed bytes of "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {summary:?}"))
}

/// `nbdinfo [--json] --map=qemu:dirty-bitmap:NAME URI` of `generation`, as text.
fn nbdinfo_dirty_map(generation: Generation, uri: &str, name: &str, json: bool) -> Option<String> {
    let mut command: PeerCommand = nbd_tool(generation, "nbdinfo")?;
    if json {
        command = command.arg("--json");
    }
    let out = command
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(uri)
        .output();
    vmsdk_tests::assert_success(&out, "nbdinfo");
    Some(String::from_utf8(out.stdout).unwrap())
}

fn dirty_total(uri: &str) -> u64 {
    let disk = disk_transport::open_uri(uri, disk_transport::OpenFlags::read_only()).unwrap();
    disk.dirty_extents(0, SIZE)
        .unwrap()
        .iter()
        .filter(|e| e.dirty)
        .map(|e| e.length)
        .sum()
}

#[test]
fn full_then_incremental_copies_equal_the_image() {
    let ran = for_each_generation(&["qemu-nbd", "qemu-img", "nbdinfo"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        let full = dir.path().join("full.img");
        let (img, full_s) = (image.to_str().unwrap(), full.to_str().unwrap());
        // The VM's disk before the full backup, and the checkpoint taken with it.
        let Some(_) = peer(g, "qemu-img", &["create", "-q", "-f", "qcow2", img, "64M"]) else {
            return;
        };
        peer(
            g,
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 4M",
                "-c",
                "write -P 9 40M 1M",
                "-c",
                "write -P 7 60M 2M",
                img,
            ],
        );
        peer(g, "qemu-img", &["bitmap", "--add", img, "b0"]);

        // The full backup, through an export of the image.
        {
            let Some(server) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", "-B", "b0", img])
            else {
                return;
            };
            let Some(summary) = vmsdk_ok(&["disk", "copy", "--no-progress", &server.uri(), full_s])
            else {
                return;
            };
            assert!(
                summary.starts_with(&format!("copied {SIZE} bytes")),
                "{summary}"
            );
            // Nothing changed yet: an incremental copy has nothing to do.
            let summary = vmsdk_ok(&[
                "disk",
                "copy",
                "--no-progress",
                "--dirty-bitmap",
                "b0",
                &server.uri(),
                full_s,
            ])
            .unwrap();
            assert_eq!(changed_bytes(&summary), 0, "{summary}");
        }
        let full_sum = sha256_file(&full);
        assert_eq!(Some(full_sum.clone()), image_sha256(g, &image, dir.path()));

        // The guest writes: overwrites, new data, zeroes over data, a discard, unaligned bytes.
        peer(
            g,
            "qemu-io",
            &[
                "-c",
                "write -P 2 8M 128k",
                "-c",
                "write -P 3 1M 64k",
                "-c",
                "write -z 40M 512k",
                "-c",
                "discard 61M 1M",
                "-c",
                "write -P 4 33554433 100",
                img,
            ],
        );
        let now = image_sha256(g, &image, dir.path()).unwrap();
        assert_ne!(now, full_sum);

        let server = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", "-B", "b0", img]).unwrap();
        let uri = server.uri();
        // The dirty map, as this generation's nbdinfo prints it, text and JSON; also when the
        // bitmap is named in the URI.
        for json in [false, true] {
            let expected = nbdinfo_dirty_map(g, &uri, "b0", json).unwrap();
            let mut args = vec!["disk", "map", "--dirty-bitmap", "b0", &uri];
            if json {
                args.insert(2, "--json");
            }
            assert_eq!(vmsdk_ok(&args).unwrap(), expected, "json: {json}");
            let in_uri = format!("{uri}&dirty-bitmap=b0");
            let mut args = vec!["disk", "map", &in_uri];
            if json {
                args.insert(2, "--json");
            }
            assert_eq!(vmsdk_ok(&args).unwrap(), expected, "json: {json}");
        }

        // Failures before any byte is written.
        let wrong_size = dir.path().join("wrong.img");
        std::fs::copy(&full, &wrong_size).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wrong_size)
            .unwrap()
            .set_len(SIZE + MIB)
            .unwrap();
        let before = sha256_file(&wrong_size);
        let err = vmsdk_fails(&[
            "disk",
            "copy",
            "--no-progress",
            "--dirty-bitmap",
            "b0",
            &uri,
            wrong_size.to_str().unwrap(),
        ])
        .unwrap();
        assert!(err.contains("source's size"), "{err}");
        assert_eq!(sha256_file(&wrong_size), before, "nothing written");
        let missing = dir.path().join("missing.img");
        let err = vmsdk_fails(&[
            "disk",
            "copy",
            "--dirty-bitmap",
            "b0",
            &uri,
            missing.to_str().unwrap(),
        ])
        .unwrap();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!missing.exists(), "an incremental copy creates no file");
        let err = vmsdk_fails(&["disk", "copy", "--dirty-bitmap", "nope", &uri, full_s]).unwrap();
        assert!(err.contains("qemu:dirty-bitmap:nope"), "{err}");
        let err = vmsdk_fails(&["disk", "map", "--dirty-bitmap", "nope", &uri]).unwrap();
        assert!(err.contains("qemu:dirty-bitmap:nope"), "{err}");
        assert_eq!(sha256_file(&full), full_sum, "nothing written");

        // The incremental copy: only the changed extents, and the backup equals the image.
        let summary = vmsdk_ok(&[
            "disk",
            "copy",
            "--no-progress",
            "--dirty-bitmap",
            "b0",
            &uri,
            full_s,
        ])
        .unwrap();
        eprintln!("{summary}");
        let changed = changed_bytes(&summary);
        assert_eq!(changed, dirty_total(&format!("{uri}&dirty-bitmap=b0")));
        assert!(changed < 4 * MIB, "{changed}");
        assert_eq!(sha256_file(&full), now);
    });
    assert!(!ran.is_empty() || !vmsdk_tests::running_in_ci());
}

#[test]
fn writes_through_a_writable_export_are_backed_up_incrementally() {
    for_each_generation(&["qemu-nbd", "qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        let img = image.to_str().unwrap();
        let Some(_) = peer(g, "qemu-img", &["create", "-q", "-f", "qcow2", img, "64M"]) else {
            return;
        };
        peer(g, "qemu-io", &["-c", "write -P 5 0 8M", img]);
        peer(g, "qemu-img", &["bitmap", "--add", img, "b0"]);
        // A writable export with the bitmap: it records our writes while it runs.
        let Some(server) = NbdServer::qemu_nbd_in(g, &["-f", "qcow2", "-B", "b0", img]) else {
            return;
        };
        let address = NbdAddress::Unix(server.socket().to_owned());
        let writer = NbdDisk::connect(
            &NbdOptions::new(address.clone())
                .export("disk")
                .timeout(Duration::from_secs(10)),
        )
        .unwrap();
        let full = disk_transport::memory::MemoryDisk::new(SIZE);
        disk_transport::copy::copy(&writer, &full, &CopyOptions::default(), &mut |_| {}).unwrap();
        let data = vmsdk_tests::disk::random_bytes(300_000, 11);
        writer.write_at(&data, 20 * MIB + 4096).unwrap();
        writer.write_zeroes(2 * MIB, MIB).unwrap();
        writer.write_at(&data[..4096], SIZE - 4096).unwrap();
        writer.flush().unwrap();

        let reader = NbdDisk::connect(
            &NbdOptions::new(address)
                .export("disk")
                .read_only(true)
                .dirty_bitmap("b0")
                .timeout(Duration::from_secs(10)),
        )
        .unwrap();
        let report = copy_changed(&reader, &full, &CopyOptions::default(), &mut |_| {}).unwrap();
        eprintln!(
            "incremental through {}: {:?}",
            server.version(),
            report.progress
        );
        assert!(report.progress.total >= 300_000 + MIB + 4096);
        assert!(report.progress.total < 3 * MIB);
        let mut now = vec![0u8; SIZE as usize];
        reader.read_at(&mut now, 0).unwrap();
        assert_eq!(sha256(&full.to_vec().unwrap()), sha256(&now));
    });
}

#[test]
fn servers_without_the_bitmap_context_are_clear_errors() {
    for_each_generation(&["qemu-nbd", "nbdkit"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        let target = dir.path().join("target.img");
        let img = image.to_str().unwrap();
        let Some(_) = peer(g, "qemu-img", &["create", "-q", "-f", "qcow2", img, "16M"]) else {
            return;
        };
        peer(g, "qemu-img", &["bitmap", "--add", img, "b0"]);
        std::fs::File::create(&target)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        // qemu-nbd without -B: the bitmap exists in the image but is not exported.
        let Some(plain) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", img]) else {
            return;
        };
        // nbdkit has no qemu:dirty-bitmap contexts at all.
        let Some(nbdkit) = NbdServer::nbdkit_in(g, &["memory", "16M"]) else {
            return;
        };
        for uri in [plain.uri(), nbdkit.uri()] {
            let Some(err) = vmsdk_fails(&[
                "disk",
                "copy",
                "--dirty-bitmap",
                "b0",
                &uri,
                target.to_str().unwrap(),
            ]) else {
                return;
            };
            assert!(err.contains("does not offer qemu:dirty-bitmap:b0"), "{err}");
        }
        // A file is not an NBD export: the message says how to export one.
        let err = vmsdk_fails(&[
            "disk",
            "map",
            "--dirty-bitmap",
            "b0",
            target.to_str().unwrap(),
        ])
        .unwrap();
        assert!(err.contains("qemu-nbd -B b0"), "{err}");
        let untouched = std::fs::read(&target).unwrap();
        assert!(untouched.iter().all(|&b| b == 0), "nothing written");
    });
}

/// Waits until `path` holds at least `bytes` non-hole bytes (the copy is under way).
fn wait_for_progress(child: &mut std::process::Child, path: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let allocated = std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
        if allocated >= bytes {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the copy ended early: {status}");
        }
        assert!(Instant::now() < deadline, "the copy made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_stops_a_copy_within_a_second_with_status_130() {
    for_each_generation(&["nbdkit"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let target: PathBuf = dir.path().join("target.img");
        // A slow source: 1 GiB of non-zero data at 100 ms per read (tens of MB/s).
        let Some(server) =
            NbdServer::nbdkit_in(g, &["--filter=delay", "pattern", "size=1G", "rdelay=100ms"])
        else {
            return;
        };
        let Some(binary) = vmsdk_tests::vmsdk_binary() else {
            return;
        };
        let mut child = Command::new(binary)
            .args(["disk", "copy", "--no-progress", &server.uri()])
            .arg(&target)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_progress(&mut child, &target, 4 * MIB);
        let interrupted = Instant::now();
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        let took = interrupted.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("after Ctrl-C ({took:?}): {stderr}");
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert!(
            stderr.contains("interrupted: copy stopped after "),
            "{stderr}"
        );
        assert!(stderr.contains(" of 1073741824 bytes"), "{stderr}");
    });
}
