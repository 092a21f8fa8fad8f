//! NBD over TLS (`nbds://`, `nbds+unix://`) against real servers, with certificates and
//! pre-shared keys the tests make themselves ([`TlsFiles`]):
//!
//! - qemu-nbd with `tls-creds-x509` (`verify-peer` on, its default, and off) and
//!   `tls-creds-psk`; nbdkit with `--tls=require` and certificates, `--tls-verify-peer`, and
//!   `--tls-psk`; over TCP and Unix sockets. Data round trips with equal checksums; block
//!   status as `nbdinfo --map` sees it through the same TLS export; dirty bitmaps.
//! - Failures are clear and prompt: unknown CA, wrong host name, expired certificate, missing
//!   client certificate, wrong key or user, a server without TLS when `nbds` was asked, a
//!   server requiring TLS when `nbd` was asked. No key ever shows in a message.
//!
//! Every test runs against each peer generation: Debian 12's qemu-nbd 7.2 / nbdkit 1.32 /
//! nbdinfo 1.14 on the machine and Debian 13's qemu-nbd 10.0 / nbdkit 1.42 / nbdinfo 1.22 in
//! the peer root.

use std::path::Path;
use std::time::{Duration, Instant};

use disk_transport::copy::{copy, CopyOptions};
use disk_transport::file::FileDisk;
use disk_transport::{open_uri, Disk, ExtentKind, OpenFlags};
use vmsdk_tests::disk::{
    merge_map, nbdinfo_map_in, random_bytes, sha256, sha256_file, sparse_image, NbdServer,
};
use vmsdk_tests::peers::for_each_generation;
use vmsdk_tests::tls::{TlsFiles, PSK_USER};

const MIB: u64 = 1 << 20;

/// How long a refused TLS connection may take at most: failures must be prompt.
const PROMPT: Duration = Duration::from_secs(5);

fn open(uri: &str) -> disk_transport::Result<Box<dyn Disk>> {
    open_uri(uri, OpenFlags::read_write())
}

/// The TLS part of a certificate URI for `dir`, verifying the host name `localhost` (the
/// certificate's) also over a Unix socket.
fn certs(dir: &Path) -> String {
    format!("tls-certificates={}&tls-hostname=localhost", dir.display())
}

fn unix_uri(server: &NbdServer, user: Option<&str>, tls: &str) -> String {
    let export = if server.uri().starts_with("nbd+unix:///disk") {
        "disk"
    } else {
        ""
    };
    let user = user.map(|u| format!("{u}@")).unwrap_or_default();
    format!(
        "nbds+unix://{user}/{export}?socket={}&{tls}",
        server.socket().display()
    )
}

fn qemu_x509(files_dir: &Path, verify_peer: bool) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={}",
        files_dir.display(),
        if verify_peer { "on" } else { "off" }
    )
}

fn qemu_psk(files: &TlsFiles) -> String {
    format!(
        "tls-creds-psk,id=tls0,endpoint=server,dir={}",
        files.psk_dir().display()
    )
}

/// Writes random data at a few places through `disk`, flushes, reads it all back, and returns
/// what the whole disk must now hold (starting from `before`).
fn write_and_verify(disk: &dyn Disk, mut before: Vec<u8>, seed: u64) -> Vec<u8> {
    let size = before.len() as u64;
    assert_eq!(disk.info().unwrap().capacity, size);
    for (i, (offset, length)) in [
        (0u64, 4096usize),
        (MIB + 512, 300_000),
        (size - 65536, 65536),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_bytes(length, seed + i as u64);
        disk.write_at(&data, offset).unwrap();
        before[offset as usize..offset as usize + length].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    let mut back = vec![0u8; size as usize];
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(
        sha256(&back),
        sha256(&before),
        "data read back over TLS differs"
    );
    before
}

/// Copies the whole export into a new local file with the copy engine and compares checksums.
fn copy_out_and_compare(disk: &dyn Disk, expected_sha: &str, dir: &Path) {
    let out = dir.join(format!("copy-{}.img", expected_sha.get(..8).unwrap_or("x")));
    let size = disk.info().unwrap().capacity;
    let dst = FileDisk::create(&out, size).unwrap();
    copy(
        disk,
        &dst,
        &CopyOptions::default().destination_is_zero(true),
        &mut |_| {},
    )
    .unwrap();
    dst.flush().unwrap();
    assert_eq!(sha256_file(&out), expected_sha, "copy over TLS differs");
}

/// The error and its sources, as a user sees them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Opens `uri`, expecting a failure within [`PROMPT`] whose message contains every needle;
/// returns the message.
fn refused(uri: &str, needles: &[&str]) -> String {
    let start = Instant::now();
    let err = match open(uri) {
        Ok(disk) => panic!("{uri} opened: {:?}", disk.protocol()),
        Err(e) => chain(&e),
    };
    let took = start.elapsed();
    eprintln!("  refused in {took:.2?}: {err}");
    assert!(took < PROMPT, "{uri}: the failure took {took:?}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{uri}: {err:?} lacks {needle:?}");
    }
    assert!(err.matches("NBD handshake failed").count() <= 1, "{err}");
    err
}

#[test]
fn qemu_nbd_x509_with_and_without_client_certificates_over_tcp_and_unix() {
    let files = TlsFiles::new();
    for_each_generation(&["qemu-nbd"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let start = random_bytes((8 * MIB) as usize, 11);
        std::fs::write(&image, &start).unwrap();
        let img = image.to_str().unwrap();

        // verify-peer=on (qemu's default): the client must present a certificate.
        let object = qemu_x509(&files.server_dir(), true);
        let Some((server, plain)) = NbdServer::qemu_nbd_tcp_in(
            generation,
            &["--object", &object, "--tls-creds", "tls0", "-f", "raw", img],
        ) else {
            return;
        };
        eprintln!("{}", server.version());
        let tcp = plain.replacen("nbd://", "nbds://", 1);
        let uri = format!("{tcp}?tls-certificates={}", files.client_dir().display());
        let disk = open(&uri).unwrap();
        let protocol = disk.protocol().unwrap();
        let session = protocol.tls.clone().unwrap();
        assert!(session.contains("host name verified"), "{session}");
        let expected = write_and_verify(disk.as_ref(), start.clone(), 100);
        copy_out_and_compare(disk.as_ref(), &sha256(&expected), dir.path());
        drop(disk);
        // Without a client certificate qemu-nbd refuses the session.
        refused(
            &format!(
                "{tcp}?tls-certificates={}",
                files.anonymous_client_dir().display()
            ),
            &["client certificate"],
        );
        // The server asked for TLS: a plaintext client gets the fix.
        refused(&plain, &["the server requires TLS: use nbds://"]);
        drop(server);
        assert_eq!(sha256_file(&image), sha256(&expected));

        // verify-peer=off: no client certificate needed; over a Unix socket.
        let object = qemu_x509(&files.server_dir(), false);
        let Some(server) = NbdServer::qemu_nbd_in(
            generation,
            &["--object", &object, "--tls-creds", "tls0", "-f", "raw", img],
        ) else {
            return;
        };
        let disk = open(&unix_uri(
            &server,
            None,
            &certs(&files.anonymous_client_dir()),
        ))
        .unwrap();
        let expected = write_and_verify(disk.as_ref(), expected, 200);
        drop(disk);
        drop(server);
        assert_eq!(sha256_file(&image), sha256(&expected));
    });
}

#[test]
fn qemu_nbd_psk_round_trips() {
    let files = TlsFiles::new();
    for_each_generation(&["qemu-nbd"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let start = random_bytes((4 * MIB) as usize, 21);
        std::fs::write(&image, &start).unwrap();
        let object = qemu_psk(&files);
        let Some(server) = NbdServer::qemu_nbd_in(
            generation,
            &[
                "--object",
                &object,
                "--tls-creds",
                "tls0",
                "-f",
                "raw",
                image.to_str().unwrap(),
            ],
        ) else {
            return;
        };
        eprintln!("{}", server.version());
        let psk = format!("tls-psk-file={}", files.psk_file().display());
        let disk = open(&unix_uri(&server, Some(PSK_USER), &psk)).unwrap();
        let session = disk.protocol().unwrap().tls.unwrap();
        assert!(session.contains("pre-shared key"), "{session}");
        let expected = write_and_verify(disk.as_ref(), start, 300);
        copy_out_and_compare(disk.as_ref(), &sha256(&expected), dir.path());
        drop(disk);
        // A wrong key, and a user the server does not know.
        let wrong = format!("tls-psk-file={}", files.wrong_psk_file().display());
        let err = refused(
            &unix_uri(&server, Some(PSK_USER), &wrong),
            &["wrong key or user name"],
        );
        assert!(!err.contains(&files.psk_hex()));
        let bob = dir.path().join("bob.psk");
        std::fs::write(&bob, format!("bob:{}\n", files.psk_hex())).unwrap();
        let err = refused(
            &unix_uri(
                &server,
                Some("bob"),
                &format!("tls-psk-file={}", bob.display()),
            ),
            &["wrong key or user name"],
        );
        assert!(!err.contains(&files.psk_hex()), "{err}");
        // A user missing from the local file is named before connecting.
        refused(
            &unix_uri(&server, Some("carol"), &psk),
            &["no key for user \"carol\""],
        );
        drop(server);
        assert_eq!(sha256_file(&image), sha256(&expected));
    });
}

#[test]
fn nbdkit_certificates_verify_peer_and_psk() {
    let files = TlsFiles::new();
    for_each_generation(&["nbdkit"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let server_dir = format!("--tls-certificates={}", files.server_dir().display());
        // --tls=require with certificates: the client verifies the server only.
        let Some(server) =
            NbdServer::nbdkit_in(generation, &["--tls=require", &server_dir, "memory", "8M"])
        else {
            return;
        };
        eprintln!("{}", server.version());
        let disk = open(&unix_uri(
            &server,
            None,
            &certs(&files.anonymous_client_dir()),
        ))
        .unwrap();
        let expected = write_and_verify(disk.as_ref(), vec![0; (8 * MIB) as usize], 400);
        copy_out_and_compare(disk.as_ref(), &sha256(&expected), dir.path());
        drop(disk);
        refused(&server.uri(), &["the server requires TLS: use nbds://"]);
        drop(server);

        // --tls-verify-peer: a client certificate from the CA is required.
        let Some(server) = NbdServer::nbdkit_in(
            generation,
            &[
                "--tls=require",
                &server_dir,
                "--tls-verify-peer",
                "memory",
                "8M",
            ],
        ) else {
            return;
        };
        let disk = open(&unix_uri(&server, None, &certs(&files.client_dir()))).unwrap();
        write_and_verify(disk.as_ref(), vec![0; (8 * MIB) as usize], 500);
        drop(disk);
        refused(
            &unix_uri(&server, None, &certs(&files.anonymous_client_dir())),
            &["client certificate"],
        );
        drop(server);

        // --tls-psk.
        let psk_arg = format!("--tls-psk={}", files.psk_file().display());
        let Some(server) =
            NbdServer::nbdkit_in(generation, &["--tls=require", &psk_arg, "memory", "8M"])
        else {
            return;
        };
        let psk = format!("tls-psk-file={}", files.psk_file().display());
        let disk = open(&unix_uri(&server, Some(PSK_USER), &psk)).unwrap();
        write_and_verify(disk.as_ref(), vec![0; (8 * MIB) as usize], 600);
        drop(disk);
        let wrong = format!("tls-psk-file={}", files.wrong_psk_file().display());
        let err = refused(
            &unix_uri(&server, Some(PSK_USER), &wrong),
            &["wrong key or user name"],
        );
        assert!(!err.contains(&files.psk_hex()), "{err}");
    });
}

#[test]
fn the_server_is_verified_and_refusals_are_clear_and_prompt() {
    let files = TlsFiles::new();
    for_each_generation(&["nbdkit", "qemu-nbd"], |generation| {
        let server_dir = format!("--tls-certificates={}", files.server_dir().display());
        let Some(server) =
            NbdServer::nbdkit_in(generation, &["--tls=require", &server_dir, "memory", "1M"])
        else {
            return;
        };
        // A CA that did not sign the server's certificate.
        refused(
            &unix_uri(&server, None, &certs(&files.other_ca_client_dir())),
            &["did not verify", "certificate"],
        );
        // A host name the certificate does not carry.
        refused(
            &unix_uri(
                &server,
                None,
                &format!(
                    "tls-certificates={}&tls-hostname=backup.example.com",
                    files.anonymous_client_dir().display()
                ),
            ),
            &["did not verify", "backup.example.com"],
        );
        // Over a Unix socket without a host name libnbd (and vmsdk) do not verify the server
        // unless asked; asked, an unknown CA fails.
        open(&format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            server.socket().display(),
            files.other_ca_client_dir().display()
        ))
        .unwrap();
        refused(
            &format!(
                "nbds+unix:///?socket={}&tls-certificates={}&tls-verify-peer=true",
                server.socket().display(),
                files.other_ca_client_dir().display()
            ),
            &["did not verify"],
        );
        drop(server);

        // An expired server certificate.
        let expired = format!(
            "--tls-certificates={}",
            files.expired_server_dir().display()
        );
        let Some(server) =
            NbdServer::nbdkit_in(generation, &["--tls=require", &expired, "memory", "1M"])
        else {
            return;
        };
        refused(
            &unix_uri(&server, None, &certs(&files.anonymous_client_dir())),
            &["did not verify", "expired"],
        );
        drop(server);

        // A server without TLS when nbds was asked: no plaintext fallback.
        let Some(server) = NbdServer::nbdkit_in(generation, &["memory", "1M"]) else {
            return;
        };
        refused(
            &unix_uri(&server, None, &certs(&files.anonymous_client_dir())),
            &["does not offer TLS"],
        );
        let Some(server) =
            NbdServer::qemu_nbd_in(generation, &["--image-opts", "driver=null-co,size=1M"])
        else {
            return;
        };
        refused(
            &unix_uri(&server, None, &certs(&files.anonymous_client_dir())),
            &["does not offer TLS"],
        );
    });
}

#[test]
fn block_status_and_dirty_bitmaps_over_tls_match_nbdinfo() {
    let files = TlsFiles::new();
    for_each_generation(&["qemu-nbd", "qemu-img", "nbdinfo"], |generation| {
        let Some(qemu_img) = generation.command("qemu-img", "qemu-utils") else {
            return;
        };
        let Some(qemu_io) = generation.command("qemu-io", "qemu-utils") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // A sparse raw image for base:allocation.
        let raw = dir.path().join("sparse.img");
        sparse_image(
            &raw,
            32 * MIB,
            &[(0, 65536), (5 * MIB, 1 << 20), (31 * MIB, 4096)],
        );
        // A qcow2 with a persistent bitmap and writes after it.
        let qcow2 = dir.path().join("inc.qcow2");
        let q = qcow2.to_str().unwrap();
        for command in [
            qemu_img.clone().args(["create", "-f", "qcow2", q, "16M"]),
            qemu_io
                .clone()
                .args(["-f", "qcow2", "-c", "write -P 1 0 4M", q]),
            qemu_img.clone().args(["bitmap", "--add", q, "b0"]),
            qemu_io.clone().args([
                "-f",
                "qcow2",
                "-c",
                "write -P 2 1M 64k",
                "-c",
                "write -P 3 8M 1M",
                q,
            ]),
        ] {
            let out = command.output();
            vmsdk_tests::assert_success(&out, "qemu-img or qemu-io");
        }
        let object = qemu_x509(&files.server_dir(), false);
        let tls = ["--object", &object, "--tls-creds", "tls0"];
        let mut args = tls.to_vec();
        args.extend(["-r", "-f", "raw", raw.to_str().unwrap()]);
        let Some(server) = NbdServer::qemu_nbd_in(generation, &args) else {
            return;
        };
        let uri = unix_uri(&server, None, &certs(&files.anonymous_client_dir()));
        let disk = open_uri(&uri, OpenFlags::read_only()).unwrap();
        let ours: Vec<(u64, u64, u32)> = disk
            .allocated_extents(0, 32 * MIB)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.kind.nbd_flags()))
            .collect();
        assert!(disk
            .allocated_extents(0, 32 * MIB)
            .unwrap()
            .iter()
            .any(|e| e.kind == ExtentKind::Hole));
        let Some(theirs) = nbdinfo_map_in(generation, &uri, None) else {
            return;
        };
        assert_eq!(
            ours,
            merge_map(&theirs),
            "map over TLS differs from nbdinfo --map"
        );
        drop(disk);
        drop(server);

        let mut args = tls.to_vec();
        args.extend(["-r", "-f", "qcow2", "-B", "b0", q]);
        let Some(server) = NbdServer::qemu_nbd_in(generation, &args) else {
            return;
        };
        let uri = format!(
            "{}&dirty-bitmap=b0",
            unix_uri(&server, None, &certs(&files.anonymous_client_dir()))
        );
        let disk = open_uri(&uri, OpenFlags::read_only()).unwrap();
        let dirty: Vec<(u64, u64)> = disk
            .dirty_extents(0, 16 * MIB)
            .unwrap()
            .into_iter()
            .filter(|e| e.dirty)
            .map(|e| (e.offset, e.length))
            .collect();
        // qcow2's bitmap granularity is 64 KiB.
        assert_eq!(dirty, vec![(MIB, 65536), (8 * MIB, MIB)]);
        let mut buf = vec![0u8; 65536];
        disk.read_at(&mut buf, MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 2));
    });
}

#[test]
fn vmsdk_disk_info_and_copy_over_tls() {
    let Some(vmsdk) = vmsdk_tests::vmsdk_binary() else {
        return;
    };
    let files = TlsFiles::new();
    for_each_generation(&["qemu-nbd"], |generation| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, random_bytes((2 * MIB) as usize, 31)).unwrap();
        let object = qemu_psk(&files);
        let Some(server) = NbdServer::qemu_nbd_in(
            generation,
            &[
                "--object",
                &object,
                "--tls-creds",
                "tls0",
                "-f",
                "raw",
                image.to_str().unwrap(),
            ],
        ) else {
            return;
        };
        let psk = format!("tls-psk-file={}", files.psk_file().display());
        let uri = unix_uri(&server, Some(PSK_USER), &psk);
        let out = std::process::Command::new(&vmsdk)
            .args(["disk", "info", "--json", &uri])
            .output()
            .unwrap();
        vmsdk_tests::assert_success(&out, "vmsdk disk info");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let protocol = &info["protocol"];
        eprintln!("{protocol}");
        assert!(protocol["tls"].as_str().unwrap().contains("pre-shared key"));
        assert_eq!(
            protocol["transmission"],
            if generation == vmsdk_tests::peers::Generation::Trixie {
                "extended"
            } else {
                "structured"
            }
        );
        assert_eq!(protocol["contexts"][0], "base:allocation");
        let text = std::process::Command::new(&vmsdk)
            .args(["disk", "info", &uri])
            .output()
            .unwrap();
        let text = String::from_utf8(text.stdout).unwrap();
        assert!(text.contains("with TLS, using"), "{text}");
        assert!(!text.contains(&files.psk_hex()), "{text}");
        // A copy out of the TLS export, checked.
        let copy = dir.path().join("copy.img");
        let out = std::process::Command::new(&vmsdk)
            .args(["disk", "copy", "--no-progress", &uri])
            .arg(&copy)
            .output()
            .unwrap();
        vmsdk_tests::assert_success(&out, "vmsdk disk copy");
        assert_eq!(sha256_file(&copy), sha256_file(&image));
    });
}
