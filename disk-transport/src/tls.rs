//! TLS for the NBD client (`nbds://`, `nbds+unix://`), through the system's OpenSSL.
//!
//! Why OpenSSL: NBD servers (qemu-nbd, nbdkit) authenticate with X.509 certificates *or* with
//! pre-shared keys (PSK, GnuTLS `psktool` files). rustls has no external-PSK support in any
//! release, and a second TLS stack only for PSK would double what has to be trusted and
//! audited; BoringSSL does not expose TLS 1.3 external PSKs and s2n-tls speaks TLS 1.3 only.
//! OpenSSL does both kinds with TLS 1.2 and 1.3, verifies host names and IP addresses, loads
//! CRLs, and is on every Linux distribution, so the `tls` feature links the system library
//! (`libssl-dev` and `pkg-config` to build on Debian) instead of compiling a copy.
//!
//! Settings are libnbd's ([`NbdTls`]): a certificate directory with `ca-cert.pem` and optional
//! `client-cert.pem`, `client-key.pem`, `ca-crl.pem`; or a PSK file of `USER:HEXKEY` lines. The
//! PSK never leaves this module except into OpenSSL's callback, and no `Debug`, log or error
//! text shows it.
//!
//! One TLS session serves a reader thread and any number of writers: the socket is made
//! non-blocking, every OpenSSL call happens under one lock, and waiting for the socket
//! (`poll`) happens outside it, bounded by the caller's timeouts.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openssl::ssl::{
    ErrorCode, HandshakeError, MidHandshakeSslStream, SslConnector, SslFiletype, SslMethod,
    SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::X509VerifyResult;
use rustix::event::{PollFd, PollFlags, Timespec};

use crate::uri::{NbdAddress, NbdTls};
use crate::{Error, Result};

/// The user name libnbd uses for PSK when the URI has none: the local login name.
fn default_username() -> String {
    for var in ["LOGNAME", "USER"] {
        if let Ok(name) = std::env::var(var) {
            if !name.is_empty() {
                return name;
            }
        }
    }
    // No environment (a service): the name of the effective uid in /etc/passwd.
    let uid = rustix::process::geteuid().as_raw().to_string();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)? == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| "root".to_owned())
}

/// A pre-shared key: `Debug` never shows it.
#[derive(Clone)]
struct PskKey(Vec<u8>);

impl fmt::Debug for PskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for PskKey {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

fn tls_error(msg: impl Into<String>) -> Error {
    Error::Handshake(format!("TLS: {}", msg.into()))
}

/// Reads the key of `user` from a GnuTLS/psktool PSK file (`USER:HEXKEY` lines), as libnbd
/// does. Errors name the file and the user, never the key.
fn read_psk(file: &Path, user: &str) -> Result<PskKey> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| tls_error(format!("cannot read the PSK file {}: {e}", file.display())))?;
    let hex = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|line| {
            line.strip_prefix(user)
                .and_then(|rest| rest.strip_prefix(':'))
                .filter(|k| !k.is_empty())
        })
        .ok_or_else(|| {
            tls_error(format!(
                "the PSK file {} has no key for user {user:?} (the user is the URI's user part: \
                 nbds://USER@...)",
                file.display()
            ))
        })?;
    let bad = || {
        tls_error(format!(
            "the key of user {user:?} in {} is not hexadecimal",
            file.display()
        ))
    };
    if hex.len() % 2 != 0 || hex.len() > 2 * 256 {
        return Err(bad());
    }
    let mut key = PskKey(Vec::with_capacity(hex.len() / 2));
    for pair in hex.as_bytes().chunks_exact(2) {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        key.0.push(u8::from_str_radix(text, 16).map_err(|_| bad())?);
    }
    Ok(key)
}

/// libnbd's default certificate directories, in its order.
fn default_certificate_dirs() -> Vec<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return vec![PathBuf::from("/etc/pki/libnbd")];
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let home = PathBuf::from(home);
            vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")]
        }
        None => Vec::new(),
    }
}

fn utf8_path<'a>(path: &'a Path, what: &str) -> Result<&'a str> {
    path.to_str()
        .ok_or_else(|| tls_error(format!("the {what} path {} is not UTF-8", path.display())))
}

/// How this client authenticates to the server, and whether it checks the server.
#[derive(Clone)]
pub(crate) struct TlsConfig {
    connector: SslConnector,
    /// Name sent as SNI and checked against the certificate.
    hostname: Option<String>,
    verify: bool,
    /// How the server is authenticated, for messages.
    mode: String,
    psk_user: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("hostname", &self.hostname)
            .field("verify", &self.verify)
            .field("psk_user", &self.psk_user)
            .finish_non_exhaustive()
    }
}

fn openssl_error(what: &str, e: openssl::error::ErrorStack) -> Error {
    tls_error(format!("{what}: {e}"))
}

/// Maps an OpenSSL error to one that says what was being done.
fn e(what: &str) -> impl FnOnce(openssl::error::ErrorStack) -> Error + '_ {
    move |err| openssl_error(what, err)
}

impl TlsConfig {
    /// Resolves libnbd's defaults for `tls` on a connection to `address`.
    pub fn new(tls: &NbdTls, address: &NbdAddress) -> Result<Self> {
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(e("set up OpenSSL"))?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(e("set the TLS version"))?;
        // TLS 1.3 suites: AES-128-GCM first, the fastest with hardware AES (AES-256-GCM and
        // ChaCha20 still offered).
        builder
            .set_ciphersuites(
                "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
            )
            .map_err(e("choose TLS 1.3 suites"))?;
        let hostname = tls.hostname.clone().or_else(|| match address {
            NbdAddress::Tcp { host, .. } => Some(host.clone()),
            NbdAddress::Unix(_) => None,
        });
        if let Some(file) = &tls.psk_file {
            let user = tls.username.clone().unwrap_or_else(default_username);
            let key = read_psk(file, &user)?;
            // PSK suites for TLS 1.2 (TLS 1.3 derives its suites from the PSK callback); the
            // (EC)DHE ones first, as GnuTLS servers prefer them.
            builder
                .set_cipher_list("ECDHEPSK:DHEPSK:PSK:!aNULL:!eNULL:!MD5:!3DES:!RC4:!SHA1")
                .map_err(e("choose PSK cipher suites"))?;
            // TLS 1.3 with an external PSK needs a SHA-256 suite; AES-GCM first (hardware AES
            // makes it several times faster than ChaCha20 here).
            builder
                .set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
                .map_err(e("choose TLS 1.3 PSK suites"))?;
            builder.set_verify(SslVerifyMode::NONE);
            let identity = user.clone().into_bytes();
            builder.set_psk_client_callback(move |_ssl, _hint, id_buf, psk_buf| {
                // The identity goes out NUL-terminated; both must fit OpenSSL's buffers.
                if identity.len() >= id_buf.len() || key.0.len() > psk_buf.len() {
                    return Ok(0);
                }
                id_buf[..identity.len()].copy_from_slice(&identity);
                id_buf[identity.len()] = 0;
                psk_buf[..key.0.len()].copy_from_slice(&key.0);
                Ok(key.0.len())
            });
            return Ok(TlsConfig {
                connector: builder.build(),
                hostname,
                verify: false,
                mode: format!("pre-shared key of user {user:?} from {}", file.display()),
                psk_user: Some(user),
            });
        }
        // X.509: the directory given, or libnbd's default ones, or the system's CAs.
        let dir = match &tls.certificates {
            Some(dir) => {
                if !dir.join("ca-cert.pem").is_file() {
                    return Err(tls_error(format!(
                        "tls-certificates={} has no ca-cert.pem (the CA that signed the \
                         server's certificate)",
                        dir.display()
                    )));
                }
                Some(dir.clone())
            }
            None => default_certificate_dirs()
                .into_iter()
                .find(|d| d.join("ca-cert.pem").is_file()),
        };
        let mode = match &dir {
            Some(dir) => {
                let ca = dir.join("ca-cert.pem");
                builder
                    .set_ca_file(&ca)
                    .map_err(e(&format!("load {}", ca.display())))?;
                let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
                if cert.is_file() && key.is_file() {
                    builder
                        .set_certificate_chain_file(&cert)
                        .map_err(e(&format!("load {}", cert.display())))?;
                    builder
                        .set_private_key_file(&key, SslFiletype::PEM)
                        .map_err(e(&format!("load {}", key.display())))?;
                    builder
                        .check_private_key()
                        .map_err(e("client-key.pem does not match client-cert.pem"))?;
                }
                let crl = dir.join("ca-crl.pem");
                if crl.is_file() {
                    let path = utf8_path(&crl, "CRL")?;
                    let store = builder.cert_store_mut();
                    store
                        .add_lookup(X509Lookup::file())
                        .map_err(e("set up CRL lookup"))?
                        .load_crl_file(path, SslFiletype::PEM)
                        .map_err(e(&format!("load {}", crl.display())))?;
                    store
                        .set_flags(X509VerifyFlags::CRL_CHECK)
                        .map_err(e("enable CRL checks"))?;
                }
                format!("X.509 certificates from {}", dir.display())
            }
            None => "X.509 with the system's CAs".to_owned(),
        };
        // libnbd: verified by default where there is a host name to verify (TCP, or a
        // tls-hostname); never over a Unix socket unless asked.
        let verify = tls.verify_peer.unwrap_or(hostname.is_some());
        builder.set_verify(if verify {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        Ok(TlsConfig {
            connector: builder.build(),
            hostname,
            verify,
            mode,
            psk_user: None,
        })
    }

    /// Whether the server's certificate is verified.
    #[cfg(test)]
    pub fn verifies_peer(&self) -> bool {
        self.verify
    }

    /// How the session authenticates, for `disk info`.
    pub fn describe(&self) -> String {
        let mut text = self.mode.clone();
        if self.psk_user.is_none() {
            text.push_str(match (&self.hostname, self.verify) {
                (Some(_), true) => ", server certificate and host name verified",
                (None, true) => ", server certificate verified (no host name to check)",
                (_, false) => ", server certificate not verified",
            });
        }
        text
    }

    fn failure(&self, e: &openssl::ssl::Error, verify: X509VerifyResult) -> Error {
        let mut text = format!("the TLS handshake with the server failed ({})", self.mode);
        if verify != X509VerifyResult::OK {
            text.push_str(&format!(
                ": the server's certificate did not verify: {}",
                verify.error_string()
            ));
            if let Some(host) = &self.hostname {
                if verify.as_raw() == 62 {
                    // X509_V_ERR_HOSTNAME_MISMATCH
                    text.push_str(&format!(
                        " (it is not issued for {host:?}; give the name it carries with \
                         tls-hostname=)"
                    ));
                }
            }
        } else {
            match e.ssl_error() {
                Some(stack) => text.push_str(&format!(": {stack}")),
                None => match e.io_error() {
                    Some(io) => text.push_str(&format!(": {io}")),
                    None => text.push_str(": the server closed the connection"),
                },
            }
            if self.psk_user.is_some() {
                text.push_str(" (wrong key or user name for this server?)");
            } else if self.verify {
                text.push_str(
                    " (does the server want a client certificate: client-cert.pem and \
                     client-key.pem in the certificate directory?)",
                );
            }
        }
        tls_error(text)
    }
}

/// Waits until `fd` is ready for `flags`, at most until `deadline` (forever with `None`).
fn wait_for(fd: &OwnedFd, flags: PollFlags, deadline: Option<Instant>) -> io::Result<()> {
    let mut fds = [PollFd::new(fd, flags)];
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    if left.is_some_and(|l| l.is_zero()) {
        return Err(io::ErrorKind::TimedOut.into());
    }
    let spec = left.map(|l| Timespec {
        tv_sec: l.as_secs() as _,
        tv_nsec: l.subsec_nanos() as _,
    });
    loop {
        match rustix::event::poll(&mut fds, spec.as_ref()) {
            Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Most encrypted bytes gathered before they go to the socket: a request of the copy
/// engine's default size, with its records' overhead, in one system call rather than one per
/// 16 KiB record.
const GATHER: usize = crate::copy::DEFAULT_REQUEST_SIZE + 64 * 1024;

/// The socket as OpenSSL sees it: records OpenSSL writes are gathered and sent together when
/// the caller drains them, or when the buffer is full. Reads go straight to the socket.
struct Gather<S> {
    socket: S,
    out: Vec<u8>,
    sent: usize,
}

impl<S: Write> Gather<S> {
    fn pending(&self) -> bool {
        self.sent < self.out.len()
    }

    /// Sends what the socket takes now; `Ok` also when some is left (the socket is full).
    fn drain(&mut self) -> io::Result<()> {
        while self.pending() {
            match self.socket.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(())
    }
}

impl<S: Read> Read for Gather<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.read(buf)
    }
}

impl<S: Write> Write for Gather<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() - self.sent + buf.len() > GATHER {
            self.drain()?;
            if self.out.len() - self.sent + buf.len() > GATHER {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        if self.sent > 0 && self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        if self.pending() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    }
}

/// Sends everything `gather` holds, waiting for the socket until `deadline`.
fn drain_all<S: Write>(
    gather: &mut Gather<S>,
    fd: &OwnedFd,
    deadline: Option<Instant>,
) -> io::Result<()> {
    loop {
        gather.drain()?;
        if !gather.pending() {
            return Ok(());
        }
        wait_for(fd, PollFlags::OUT, deadline)?;
    }
}

struct Inner<S> {
    ssl: Mutex<SslStream<Gather<S>>>,
    /// The socket, for waiting on it and shutting it down without the lock.
    fd: OwnedFd,
    /// The cipher and protocol, for `disk info`.
    description: String,
}

/// One TLS session; clones share it (one reader thread, many writers). Each handle has its
/// own timeouts; an operation that cannot finish in time fails with `TimedOut`.
pub(crate) struct TlsStream<S> {
    inner: Arc<Inner<S>>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("session", &self.inner.description)
            .finish_non_exhaustive()
    }
}

/// The largest payload of one TLS record: small writes are gathered up to this size.
const RECORD: usize = 16 * 1024;
/// How much of a payload joins its request header in one record.
const SMALL: usize = 4096;

impl<S: Read + Write> TlsStream<S> {
    /// Runs the TLS handshake on `socket` (whose descriptor `fd` is, duplicated), finishing
    /// by `deadline`. The socket is non-blocking from here on.
    pub fn connect(
        config: &TlsConfig,
        socket: S,
        fd: OwnedFd,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)
            .map_err(|e| Error::io("make the NBD socket non-blocking", None, e.into()))?;
        let mut configuration = config
            .connector
            .configure()
            .map_err(|e| openssl_error("set up the TLS session", e))?;
        configuration.set_verify_hostname(config.verify && config.hostname.is_some());
        configuration.set_use_server_name_indication(config.hostname.is_some());
        let expired = || Error::Timeout {
            what: "TLS handshake".into(),
            offset: None,
            after: timeout,
        };
        let socket = Gather {
            socket,
            out: Vec::with_capacity(GATHER),
            sent: 0,
        };
        let io_error = |e: io::Error| {
            if e.kind() == io::ErrorKind::TimedOut {
                expired()
            } else {
                Error::io("TLS handshake", None, e)
            }
        };
        let mut attempt = configuration.connect(config.hostname.as_deref().unwrap_or(""), socket);
        loop {
            let mut mid: MidHandshakeSslStream<Gather<S>> = match attempt {
                Ok(mut ssl) => {
                    // The client's last flight may still be gathered.
                    drain_all(ssl.get_mut(), &fd, Some(deadline)).map_err(io_error)?;
                    let description = format!(
                        "{} {}",
                        ssl.ssl().version_str(),
                        ssl.ssl().current_cipher().map_or("?", |c| c.name())
                    );
                    return Ok(TlsStream {
                        inner: Arc::new(Inner {
                            ssl: Mutex::new(ssl),
                            fd,
                            description,
                        }),
                        read_timeout: Some(timeout),
                        write_timeout: Some(timeout),
                    });
                }
                Err(HandshakeError::SetupFailure(e)) => {
                    return Err(openssl_error("set up the TLS session", e))
                }
                Err(HandshakeError::Failure(mid)) => {
                    return Err(config.failure(mid.error(), mid.ssl().verify_result()))
                }
                Err(HandshakeError::WouldBlock(mid)) => mid,
            };
            // What OpenSSL wrote goes out first; then wait for what it needs.
            drain_all(mid.get_mut(), &fd, Some(deadline)).map_err(io_error)?;
            if mid.error().code() != ErrorCode::WANT_WRITE {
                wait_for(&fd, PollFlags::IN, Some(deadline)).map_err(io_error)?;
            }
            attempt = mid.handshake();
        }
    }
}

impl<S> TlsStream<S> {
    fn lock(&self) -> MutexGuard<'_, SslStream<Gather<S>>> {
        self.inner.ssl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another handle on the same session.
    pub fn handle(&self) -> Self {
        TlsStream {
            inner: self.inner.clone(),
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        }
    }

    /// Sets this handle's timeouts (`None`: wait as long as it takes).
    pub fn set_timeouts(&mut self, read: Option<Duration>, write: Option<Duration>) {
        self.read_timeout = read;
        self.write_timeout = write;
    }

    /// Ends the session politely (TLS `close_notify`), so the server sees a clean end rather
    /// than a truncated stream. Best effort: it never waits for the server.
    pub fn close_notify(&self)
    where
        S: Read + Write,
    {
        let mut ssl = self.lock();
        let _ = ssl.shutdown();
        let _ = ssl.get_mut().drain();
    }

    /// Shuts the socket down, waking every handle that waits on it.
    pub fn shutdown(&self) {
        let _ = rustix::net::shutdown(self.inner.fd.as_fd(), rustix::net::Shutdown::Both);
    }

    /// Protocol version and cipher, e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384`.
    pub fn description(&self) -> &str {
        &self.inner.description
    }
}

/// What an OpenSSL call that did not complete needs, or its error.
fn retry_or_error(e: openssl::ssl::Error) -> io::Result<PollFlags> {
    match e.code() {
        ErrorCode::WANT_READ => Ok(PollFlags::IN),
        ErrorCode::WANT_WRITE => Ok(PollFlags::OUT),
        _ => Err(match e.into_io_error() {
            Ok(io) => io,
            Err(e) => io::Error::other(format!("TLS: {e}")),
        }),
    }
}

impl<S: Read + Write> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            let result = {
                let mut ssl = self.lock();
                let result = ssl.ssl_read(buf);
                // A read may make OpenSSL answer (a key update): send it on its way.
                if ssl.get_mut().pending() {
                    ssl.get_mut().drain()?;
                }
                result
            };
            let want = match result {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                // An EOF without close_notify: the server hung up.
                Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => return Ok(0),
                Err(e) => retry_or_error(e)?,
            };
            wait_for(&self.inner.fd, want, deadline)?;
        }
    }
}

impl<S: Read + Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.write_timeout.map(|t| Instant::now() + t);
        let written = loop {
            let result = {
                let mut ssl = self.lock();
                let result = ssl.ssl_write(buf);
                ssl.get_mut().drain()?;
                result
            };
            let want = match result {
                Ok(n) => break n,
                Err(e) => retry_or_error(e)?,
            };
            wait_for(&self.inner.fd, want, deadline)?;
        };
        // Written means handed to the kernel: nothing may wait in the gather buffer for a
        // next write that may never come.
        loop {
            let pending = {
                let mut ssl = self.lock();
                ssl.get_mut().drain()?;
                ssl.get_mut().pending()
            };
            if !pending {
                return Ok(written);
            }
            wait_for(&self.inner.fd, PollFlags::OUT, deadline)?;
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // A request header and its payload in one record where they fit, rather than a
        // record of 28 bytes followed by the data.
        let first = bufs.iter().position(|b| !b.is_empty());
        let Some(first) = first else { return Ok(0) };
        if bufs[first].len() >= RECORD || first + 1 >= bufs.len() {
            return self.write(&bufs[first]);
        }
        // The header and the start of the payload: one record of up to 4 KiB, so that only a
        // little is copied; the rest of the payload follows in full records.
        let limit = if bufs[first].len() < SMALL {
            SMALL
        } else {
            RECORD
        };
        let mut gathered = Vec::with_capacity(limit);
        for b in &bufs[first..] {
            let room = limit - gathered.len();
            gathered.extend_from_slice(&b[..b.len().min(room)]);
            if gathered.len() == limit {
                break;
            }
        }
        self.write(&gathered)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_are_read_as_libnbd_reads_them_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.psk");
        std::fs::write(&file, "bob:00ff\r\nalice:0123456789abcdef\nalicia:ff\n").unwrap();
        let key = read_psk(&file, "alice").unwrap();
        assert_eq!(key.0, vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(format!("{key:?}"), "<redacted>");
        assert_eq!(read_psk(&file, "bob").unwrap().0, vec![0, 255]);
        let e = read_psk(&file, "carol").unwrap_err().to_string();
        assert!(e.contains("no key for user \"carol\""), "{e}");
        std::fs::write(&file, "alice:0123zz\n").unwrap();
        let e = read_psk(&file, "alice").unwrap_err().to_string();
        assert!(e.contains("not hexadecimal") && !e.contains("0123"), "{e}");
    }

    #[test]
    fn configs_follow_libnbd_defaults_and_hide_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.psk");
        std::fs::write(&file, "alice:c0ffee\n").unwrap();
        let tcp = NbdAddress::Tcp {
            host: "localhost".into(),
            port: 10809,
        };
        let unix = NbdAddress::Unix("/s".into());
        let psk = NbdTls {
            psk_file: Some(file.clone()),
            username: Some("alice".into()),
            ..NbdTls::default()
        };
        let config = TlsConfig::new(&psk, &unix).unwrap();
        let shown = format!("{config:?} {}", config.describe());
        assert!(
            shown.contains("alice") && !shown.to_lowercase().contains("c0ffee"),
            "{shown}"
        );
        // A missing ca-cert.pem in a named directory is an error, not a silent fallback.
        let certs = NbdTls {
            certificates: Some(dir.path().to_owned()),
            ..NbdTls::default()
        };
        assert!(TlsConfig::new(&certs, &tcp)
            .unwrap_err()
            .to_string()
            .contains("ca-cert.pem"));
        // System CAs: verified over TCP, not over a Unix socket without a host name.
        let none = NbdTls {
            certificates: None,
            ..NbdTls::default()
        };
        assert!(TlsConfig::new(&none, &tcp).unwrap().verifies_peer());
        let config = TlsConfig::new(&none, &unix).unwrap();
        if config.mode.contains("system") {
            assert!(!config.verifies_peer());
        }
        let named = NbdTls {
            hostname: Some("server".into()),
            ..NbdTls::default()
        };
        assert!(TlsConfig::new(&named, &unix).unwrap().verifies_peer());
    }
}
