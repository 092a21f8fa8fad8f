//! A server cannot hold the client: misbehaving NBD servers (written here, on Unix sockets)
//! meet the client's handshake bounds, in plaintext and inside TLS, through the library and
//! through `vmsdk disk info`.
//!
//! - endless `NBD_REP_INFO` replies to `NBD_OPT_GO` (libnbd 1.14 waits for ever here);
//! - a server that dribbles its replies one byte at a time, each byte well within the
//!   per-read timeout, so that only the overall handshake deadline can end it;
//! - a reply announcing a gigabyte of payload.
//!
//! Each must end promptly with an error that says what happened.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use disk_transport::nbd::proto::{self, opt, rep};
use disk_transport::{open_uri, OpenFlags};
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
use vmsdk_tests::tls::TlsFiles;

/// How long any of these failures may take.
const PROMPT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// `NBD_REP_INFO` for ever in answer to `NBD_OPT_GO`.
    EndlessInfo,
    /// Correct replies, one byte every 100 ms.
    Dribble,
    /// An `NBD_REP_INFO` header announcing 1 GiB.
    HugeReply,
}

fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn export_info() -> Vec<u8> {
    let mut p = 0u16.to_be_bytes().to_vec();
    p.extend_from_slice(&(1u64 << 20).to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p
}

/// Reads one option request; `None` when the client is gone.
fn read_option<S: Read>(s: &mut S) -> Option<u32> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).ok()?;
    Some(option)
}

/// Plays the misbehaving server on `s` (already past TLS, if any) until the client leaves.
fn misbehave<S: Read + Write>(s: &mut S, how: Misbehaviour) {
    let send = |s: &mut S, bytes: &[u8]| -> bool {
        match how {
            Misbehaviour::Dribble => bytes.iter().all(|b| {
                std::thread::sleep(Duration::from_millis(100));
                s.write_all(&[*b]).and_then(|()| s.flush()).is_ok()
            }),
            _ => s.write_all(bytes).and_then(|()| s.flush()).is_ok(),
        }
    };
    while let Some(option) = read_option(s) {
        let ok = match option {
            opt::GO => match how {
                Misbehaviour::EndlessInfo => {
                    let info = option_reply(opt::GO, rep::INFO, &export_info());
                    while s.write_all(&info).is_ok() {}
                    return;
                }
                Misbehaviour::HugeReply => {
                    let mut h = option_reply(opt::GO, rep::INFO, &[]);
                    h[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
                    send(s, &h)
                }
                Misbehaviour::Dribble => {
                    send(s, &option_reply(opt::GO, rep::INFO, &export_info()))
                        && send(s, &option_reply(opt::GO, rep::ACK, &[]))
                }
            },
            other => send(s, &option_reply(other, rep::ERR_UNSUP, &[])),
        };
        if !ok {
            return;
        }
    }
}

struct Hostile {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _thread: JoinHandle<()>,
}

/// Serves one client on a Unix socket; with `tls`, accepts `NBD_OPT_STARTTLS` and misbehaves
/// inside the TLS session.
fn serve(how: Misbehaviour, tls: Option<&Path>) -> Hostile {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hostile.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let acceptor = tls.map(|certs| {
        let mut a = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        a.set_certificate_chain_file(certs.join("server-cert.pem"))
            .unwrap();
        a.set_private_key_file(certs.join("server-key.pem"), SslFiletype::PEM)
            .unwrap();
        a.build()
    });
    let thread = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut greeting = proto::NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&3u16.to_be_bytes());
        let mut flags = [0u8; 4];
        if s.write_all(&greeting).is_err() || s.read_exact(&mut flags).is_err() {
            return;
        }
        match acceptor {
            None => misbehave(&mut s, how),
            Some(acceptor) => {
                if read_option(&mut s) != Some(opt::STARTTLS) {
                    return;
                }
                if s.write_all(&option_reply(opt::STARTTLS, rep::ACK, &[]))
                    .is_err()
                {
                    return;
                }
                if let Ok(mut tls) = acceptor.accept(s) {
                    misbehave(&mut tls, how);
                }
            }
        }
    });
    Hostile {
        socket,
        _dir: dir,
        _thread: thread,
    }
}

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

/// The URI of `server`, with `timeout` seconds for the handshake, over TLS when `certs`.
fn uri(server: &Hostile, timeout: u32, certs: Option<&Path>) -> String {
    match certs {
        None => format!(
            "nbd+unix:///?socket={}&timeout={timeout}",
            server.socket.display()
        ),
        Some(dir) => format!(
            "nbds+unix:///?socket={}&timeout={timeout}&tls-certificates={}&tls-hostname=localhost",
            server.socket.display(),
            dir.display()
        ),
    }
}

fn expect_prompt_failure(uri: &str, needles: &[&str]) {
    let start = Instant::now();
    let err = match open_uri(uri, OpenFlags::read_only()) {
        Ok(_) => panic!("{uri}: the misbehaving server was accepted"),
        Err(e) => chain(&e),
    };
    let took = start.elapsed();
    eprintln!("{uri}\n  failed in {took:.2?}: {err}");
    assert!(took < PROMPT, "took {took:?}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    assert!(err.matches("protocol error").count() <= 1, "{err}");
}

#[test]
fn endless_info_replies_end_promptly_in_plaintext_and_tls() {
    let files = TlsFiles::new();
    for certs in [None, Some(files.anonymous_client_dir())] {
        let server_certs = certs.as_ref().map(|_| files.server_dir());
        let server = serve(Misbehaviour::EndlessInfo, server_certs.as_deref());
        expect_prompt_failure(
            &uri(&server, 30, certs.as_deref()),
            &["NBD protocol error", "more than 32 replies to NBD_OPT_GO"],
        );
    }
}

#[test]
fn a_dribbling_server_meets_the_handshake_deadline() {
    let files = TlsFiles::new();
    for certs in [None, Some(files.anonymous_client_dir())] {
        let server_certs = certs.as_ref().map(|_| files.server_dir());
        let server = serve(Misbehaviour::Dribble, server_certs.as_deref());
        // Every byte comes within 100 ms, far inside the 2 s per-read timeout: only the
        // deadline of the whole handshake ends this.
        expect_prompt_failure(
            &uri(&server, 2, certs.as_deref()),
            &["NBD handshake did not complete within 2s"],
        );
    }
}

#[test]
fn a_gigabyte_reply_is_refused_before_it_is_read() {
    let files = TlsFiles::new();
    for certs in [None, Some(files.anonymous_client_dir())] {
        let server_certs = certs.as_ref().map(|_| files.server_dir());
        let server = serve(Misbehaviour::HugeReply, server_certs.as_deref());
        expect_prompt_failure(
            &uri(&server, 30, certs.as_deref()),
            &["NBD_REP_INFO", "1073741824 bytes"],
        );
    }
}

#[test]
fn vmsdk_disk_info_fails_promptly_on_endless_info_replies() {
    let Some(vmsdk) = vmsdk_tests::vmsdk_binary() else {
        return;
    };
    let server = serve(Misbehaviour::EndlessInfo, None);
    let start = Instant::now();
    let out = Command::new(vmsdk)
        .args(["disk", "info"])
        .arg(uri(&server, 30, None))
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("vmsdk disk info failed in {took:.2?}: {stderr}");
    assert!(!out.status.success());
    assert!(took < PROMPT, "took {took:?}");
    assert!(stderr.contains("more than 32 replies"), "{stderr}");
    assert_eq!(stderr.matches("protocol error").count(), 1, "{stderr}");
}
