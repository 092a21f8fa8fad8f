//! The user path the live-backup trials hit, against real qemu-nbd: errors that name the
//! likely cause, and URIs built (a dirty bitmap added) without string surgery.
//!
//! - A second client of a one-client qemu-nbd (`-e 1`, qemu-nbd's default) waits in the
//!   server's listen backlog: the error names the one-client server, `-e`, and the bound
//!   that really expired.
//! - A handle opened without a dirty bitmap says so, and how to open one.
//! - A `DiskUri` built with `with_dirty_bitmap` and printed with `Display` reads the bitmap
//!   that `qemu-nbd -B` exports, and `vmsdk::disk::open` takes a `Path`.
//!
//! Every test runs against each peer generation (Debian 12's qemu-nbd 7.2 / qemu-img 10.0 on
//! the machine, Debian 13's 10.0 in the peer root) and prints the versions.

use std::path::Path;
use std::time::{Duration, Instant};

use disk_transport::{Disk, DiskUri, Error, OpenFlags};
use vmsdk_tests::disk::NbdServer;
use vmsdk_tests::peers::{for_each_generation, Generation};

const MIB: u64 = 1 << 20;

fn qemu_img(generation: Generation, args: &[&str]) -> Option<()> {
    let out = generation
        .command("qemu-img", "qemu-utils")?
        .args(args)
        .output();
    vmsdk_tests::assert_success(&out, format_args!("qemu-img {args:?} ({generation})"));
    Some(())
}

fn ran_somewhere(ran: Vec<Generation>) {
    assert!(
        !ran.is_empty() || !vmsdk_tests::running_in_ci(),
        "no peer generation ran under CI=true"
    );
}

#[test]
fn second_client_of_a_one_client_server_names_the_limit() {
    let ran = for_each_generation(&["qemu-nbd"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
        // The harness passes `-e 8`; a later `-e 1` wins: one client at a time.
        let Some(server) =
            NbdServer::qemu_nbd_in(g, &["-e", "1", "-r", "-f", "raw", image.to_str().unwrap()])
        else {
            return;
        };
        let first = disk_transport::open_uri(&server.uri(), OpenFlags::read_only()).unwrap();
        let uri: DiskUri = server.uri().parse().unwrap();
        let uri = uri.with_timeout(Duration::from_secs(2)).unwrap();
        let started = Instant::now();
        let error = disk_transport::factory::open(&uri, OpenFlags::read_only()).unwrap_err();
        let waited = started.elapsed();
        eprintln!("second client after {waited:?}: {error}");
        assert!(
            matches!(error, Error::NoGreeting { after, .. } if after == Duration::from_secs(2)),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("qemu-nbd serves one client at a time"),
            "{text}"
        );
        assert!(text.contains("-e N"), "{text}");
        assert!(text.contains("within 2s"), "{text}");
        assert!(
            text.contains(&server.socket().display().to_string()),
            "{text}"
        );
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
            "the bound named is the bound waited: {waited:?}"
        );
        // The first client is unaffected, and once it leaves the next one gets in.
        let mut sector = [0u8; 512];
        first.read_at(&mut sector, 0).unwrap();
        drop(first);
        let again = disk_transport::factory::open(&uri, OpenFlags::read_only()).unwrap();
        assert_eq!(again.info().unwrap().capacity, MIB);
    });
    ran_somewhere(ran);
}

#[test]
fn dirty_bitmaps_by_built_uri_and_handles_without_one() {
    let ran = for_each_generation(&["qemu-nbd", "qemu-img"], |g| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let img = image.to_str().unwrap();
        let Some(()) = qemu_img(g, &["create", "-q", "-f", "qcow2", img, "8M"]) else {
            return;
        };
        qemu_img(g, &["bitmap", "--add", img, "b0"]).unwrap();
        // Write 64 KiB at 1 MiB after the bitmap was added (qemu-io stores the bitmap when it
        // closes the image; a killed qemu-nbd would leave it inconsistent).
        let out = g
            .command("qemu-io", "qemu-utils")
            .unwrap()
            .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img])
            .output();
        vmsdk_tests::assert_success(&out, format_args!("qemu-io ({g})"));
        let Some(server) = NbdServer::qemu_nbd_in(g, &["-r", "-f", "qcow2", "-B", "b0", img])
        else {
            return;
        };
        eprintln!("{}", server.version());

        // Without a bitmap: the error says the handle has none and how to get one.
        let plain = vmsdk::disk::open(server.uri(), OpenFlags::read_only()).unwrap();
        let error = plain.dirty_extents(0, 8 * MIB).unwrap_err();
        assert!(matches!(error, Error::NoDirtyBitmap { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("opened without a dirty bitmap")
                && text.contains("dirty-bitmap=NAME")
                && !text.contains("not supported by this backend"),
            "{text}"
        );

        // With one, added to the parsed URI and printed.
        let uri: DiskUri = server.uri().parse().unwrap();
        let uri = uri.with_dirty_bitmap("b0").unwrap();
        assert_eq!(uri.to_string(), format!("{}&dirty-bitmap=b0", server.uri()));
        let changes = vmsdk::disk::open(uri.to_string(), OpenFlags::read_only()).unwrap();
        let dirty: Vec<_> = changes
            .dirty_extents(0, 8 * MIB)
            .unwrap()
            .into_iter()
            .filter(|e| e.dirty)
            .collect();
        assert_eq!(dirty.len(), 1, "{dirty:?}");
        assert!(
            dirty[0].offset <= MIB && dirty[0].end() >= MIB + 65536,
            "{dirty:?}"
        );

        // A path opens as a file, whatever its name looks like.
        let odd = dir.path().join("nbd:odd.img");
        std::fs::write(&odd, vec![7u8; 4096]).unwrap();
        let disk = vmsdk::disk::open(Path::new(&odd), OpenFlags::read_only()).unwrap();
        assert_eq!(disk.info().unwrap().capacity, 4096);
    });
    ran_somewhere(ran);
}
