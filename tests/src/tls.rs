//! Certificates and pre-shared keys for the NBD-over-TLS tests, made fresh by each test with
//! the system's OpenSSL: a CA, server certificates (valid for `localhost` and `127.0.0.1`, and
//! an expired one), a client certificate, a second CA nobody trusts, and psktool-style PSK
//! files. The directories are laid out as qemu-nbd, nbdkit and libnbd expect them
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`,
//! `keys.psk`).

use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

/// The user of the PSK files.
pub const PSK_USER: &str = "alice";

/// A certificate and its key.
struct Issued {
    cert: X509,
    key: PKey<Private>,
}

fn key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).expect("RSA key")).expect("PKey")
}

fn name(cn: &str) -> openssl::x509::X509Name {
    let mut n = X509NameBuilder::new().expect("name");
    n.append_entry_by_text("O", "vmsdk tests").expect("O");
    n.append_entry_by_text("CN", cn).expect("CN");
    n.build()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ca,
    Server,
    Client,
}

/// Issues a certificate for `cn` (self-signed when `issuer` is `None`), valid from `not_before`
/// to `not_after` (Unix seconds).
fn issue(
    cn: &str,
    kind: Kind,
    issuer: Option<&Issued>,
    serial: u32,
    validity: (i64, i64),
) -> Issued {
    let key = key();
    let mut b = X509Builder::new().expect("builder");
    b.set_version(2).expect("v3");
    let serial = Asn1Integer::from_bn(&BigNum::from_u32(serial).expect("bn")).expect("serial");
    b.set_serial_number(&serial).expect("serial");
    let subject = name(cn);
    b.set_subject_name(&subject).expect("subject");
    b.set_issuer_name(issuer.map_or(&subject, |i| i.cert.subject_name()))
        .expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::from_unix(validity.0 as _).expect("time"))
        .expect("not before");
    b.set_not_after(&Asn1Time::from_unix(validity.1 as _).expect("time"))
        .expect("not after");
    match kind {
        Kind::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
        }
        Kind::Server | Kind::Client => {
            b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .key_encipherment()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
            let mut eku = ExtendedKeyUsage::new();
            if kind == Kind::Server {
                eku.server_auth();
            } else {
                eku.client_auth();
            }
            b.append_extension(eku.build().expect("eku")).expect("eku");
        }
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(issuer.map(|i| i.cert.as_ref()), None))
        .expect("ski");
    b.append_extension(ski).expect("ski");
    if let Some(issuer) = issuer {
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&issuer.cert), None))
            .expect("aki");
        b.append_extension(aki).expect("aki");
    }
    if kind == Kind::Server {
        let san = SubjectAlternativeName::new()
            .dns(cn)
            .ip("127.0.0.1")
            .build(&b.x509v3_context(issuer.map(|i| i.cert.as_ref()), None))
            .expect("san");
        b.append_extension(san).expect("san");
    }
    let signer = issuer.map_or(&key, |i| &i.key);
    b.sign(signer, MessageDigest::sha256()).expect("sign");
    Issued {
        cert: b.build(),
        key,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn write(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create TLS dir");
    std::fs::write(dir.join(file), bytes).expect("write TLS file");
}

/// Every file the TLS tests need, in one temporary directory.
#[derive(Debug)]
pub struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    /// Makes a CA, the certificates and the PSK files.
    pub fn new() -> TlsFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let year = 365 * 24 * 3600;
        let valid = (now() - 3600, now() + year);
        let ca = issue(
            "vmsdk test CA",
            Kind::Ca,
            None,
            1,
            (now() - 3600, now() + 2 * year),
        );
        let other_ca = issue("someone else's CA", Kind::Ca, None, 1, valid);
        let server = issue("localhost", Kind::Server, Some(&ca), 2, valid);
        let expired = issue(
            "localhost",
            Kind::Server,
            Some(&ca),
            3,
            (now() - 2 * year, now() - year),
        );
        let client = issue("vmsdk client", Kind::Client, Some(&ca), 4, valid);
        let pem = |c: &X509| c.to_pem().expect("pem");
        let key_pem = |k: &PKey<Private>| k.private_key_to_pem_pkcs8().expect("key pem");
        for (sub, cert) in [("server", &server), ("expired", &expired)] {
            let d = root.join(sub);
            write(&d, "ca-cert.pem", &pem(&ca.cert));
            write(&d, "server-cert.pem", &pem(&cert.cert));
            write(&d, "server-key.pem", &key_pem(&cert.key));
        }
        let d = root.join("client");
        write(&d, "ca-cert.pem", &pem(&ca.cert));
        write(&d, "client-cert.pem", &pem(&client.cert));
        write(&d, "client-key.pem", &key_pem(&client.key));
        write(&root.join("client-anon"), "ca-cert.pem", &pem(&ca.cert));
        write(
            &root.join("client-other-ca"),
            "ca-cert.pem",
            &pem(&other_ca.cert),
        );
        let mut key = [0u8; 32];
        openssl::rand::rand_bytes(&mut key).expect("random key");
        let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        write(
            &root.join("psk"),
            "keys.psk",
            format!("{PSK_USER}:{}\n", hex(&key)).as_bytes(),
        );
        key[0] ^= 0xff;
        write(
            &root.join("psk-wrong"),
            "keys.psk",
            format!("{PSK_USER}:{}\n", hex(&key)).as_bytes(),
        );
        TlsFiles { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Server directory: CA, and a certificate for `localhost` / `127.0.0.1`.
    pub fn server_dir(&self) -> PathBuf {
        self.path("server")
    }
    /// Server directory whose certificate expired a year ago.
    pub fn expired_server_dir(&self) -> PathBuf {
        self.path("expired")
    }
    /// Client directory with the CA and a client certificate.
    pub fn client_dir(&self) -> PathBuf {
        self.path("client")
    }
    /// Client directory with the CA only.
    pub fn anonymous_client_dir(&self) -> PathBuf {
        self.path("client-anon")
    }
    /// Client directory that trusts another CA only.
    pub fn other_ca_client_dir(&self) -> PathBuf {
        self.path("client-other-ca")
    }
    /// Directory holding `keys.psk` (qemu-nbd's `tls-creds-psk` wants a directory).
    pub fn psk_dir(&self) -> PathBuf {
        self.path("psk")
    }
    /// The PSK file (`alice:HEXKEY`).
    pub fn psk_file(&self) -> PathBuf {
        self.path("psk/keys.psk")
    }
    /// A PSK file with another key for the same user.
    pub fn wrong_psk_file(&self) -> PathBuf {
        self.path("psk-wrong/keys.psk")
    }
    /// The key in [`psk_file`](Self::psk_file), hex, to check it never shows in messages.
    pub fn psk_hex(&self) -> String {
        let text = std::fs::read_to_string(self.psk_file()).expect("read PSK file");
        text.trim().split_once(':').expect("user:key").1.to_owned()
    }
}

impl Default for TlsFiles {
    fn default() -> Self {
        TlsFiles::new()
    }
}
