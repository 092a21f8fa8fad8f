//! Opening a disk from a URI.
//!
//! | URI | backend |
//! |---|---|
//! | `mem://NAME?size=1G` | [`memory`](crate::memory): the process-wide disk `NAME`, created with `size` on first use |
//! | `file:///path/disk.img`, `/path/disk.img`, `disk.img` | `file`; `?direct=1` opens with `O_DIRECT` |
//! | `disk.qcow2`, `file:///path/disk.qcow2`, `qcow2:NAME`, `qcow2:file:///NAME` | `qcow2`: a qcow2 image; a name ending in `.qcow2` is one, `qcow2:` says so for any name |
//! | `raw:NAME`, `raw:file:///NAME` | `file`: a raw image whatever its name (`raw:backup.qcow2`) |
//! | `null:` | [`null`](crate::null): discards writes, reads zeros (as nbdcopy's `null:`) |
//! | `vddk://USER@SERVER[:PORT]/DISK?vm=moref=vm-16&...`, `vddk:///path/local.vmdk` | `vddk` (see [`VddkUri`]) |
//! | `nbd://HOST[:PORT]/[EXPORT]` | `nbd` over TCP (port 10809 by default), as libnbd writes it |
//! | `nbd+unix:///[EXPORT]?socket=PATH` | `nbd` over a Unix socket |
//! | `nbds://[USER@]HOST[:PORT]/[EXPORT]`, `nbds+unix://[USER@]/[EXPORT]?socket=PATH` | `nbd` over TLS (feature `tls`) |
//!
//! NBD URIs mean what they mean to libnbd (`nbdinfo`, `nbdcopy`). `nbds` URIs take libnbd's TLS
//! parameters:
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `tls-certificates=DIR` | X.509: `ca-cert.pem`, optional `client-cert.pem` + `client-key.pem`, optional `ca-crl.pem` | `$HOME/.pki/libnbd`, `$HOME/.config/pki/libnbd` (root: `/etc/pki/libnbd`), else the system's CAs |
//! | `tls-psk-file=FILE` | PSK instead of X.509: lines `USER:HEXKEY` as `psktool` writes them; the user is the URI's user part | the local login name |
//! | `tls-hostname=NAME` | the name the server certificate must carry | the URI's host (none over a Unix socket) |
//! | `tls-verify-peer=BOOL` | verify the server's certificate | true over TCP; over a Unix socket only when a `tls-hostname` is given |
//!
//! This crate adds `timeout=SECONDS`, `dirty-bitmap=NAME` and `connections=N` (multi-conn, used
//! only when the server advertises it). Any other parameter is an error that names it, and so is
//! a TLS parameter on a plaintext `nbd` URI: a URI never means less than it says.
//! `nbd+vsock://` is recognised and refused with a clear error.
//!
//! The format of a local image comes from its name or URI, never from its contents: a raw
//! image whose guest wrote a qcow2 header into its first sector stays raw (the classic
//! format-probing hole), and a `.qcow2` name on a file that is not qcow2 is an error.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, OpenFlags, Result};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddress {
    /// TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// The TLS settings of an `nbds` URI (libnbd's query parameters); see the [module docs](self).
/// Values are as written in the URI; defaults are applied when connecting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NbdTls {
    /// `tls-certificates=DIR`: the X.509 directory.
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file=FILE`: use a pre-shared key from this file instead of certificates.
    pub psk_file: Option<PathBuf>,
    /// The URI's user part: the PSK identity.
    pub username: Option<String>,
    /// `tls-hostname=NAME`: the name to verify the server's certificate against.
    pub hostname: Option<String>,
    /// `tls-verify-peer=BOOL`, if given.
    pub verify_peer: Option<bool>,
}

/// The environment variable holding the password of a `vddk://USER@…` URI.
pub const VDDK_PASSWORD_ENV: &str = "VMSDK_VDDK_PASSWORD";

/// A `vddk://` URI: a VMware virtual disk reached through VDDK (libvixDiskLib loaded at run
/// time).
///
/// ```text
/// vddk://USER@SERVER[:PORT]/DISK-PATH?vm=moref=vm-16&snapshot=snapshot-47&thumbprint=AA:..:99
///        &transports=nbdssl:nbd&libdir=/opt/vmware-vix-disklib-distrib&config=/etc/vddk.conf
///        &nfc-port=902
/// vddk:///path/to/local.vmdk?libdir=/opt/vmware-vix-disklib-distrib
/// ```
///
/// The disk path is percent-encoded (`%5Bdatastore1%5D%20vm%2Fvm.vmdk` for
/// `[datastore1] vm/vm.vmdk`). The password never goes in the URI, where shell history and
/// logs would keep it: [`VddkUri::target`] takes it from [`VDDK_PASSWORD_ENV`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VddkUri {
    /// vCenter or ESXi host; `None` for a local file.
    pub server: Option<String>,
    /// Its port.
    pub port: Option<u16>,
    /// The user name (the password comes from the environment).
    pub user: Option<String>,
    /// The disk path as VDDK takes it.
    pub path: String,
    /// `vm=`: the VM (`moref=vm-16`).
    pub vm: Option<String>,
    /// `snapshot=`: the snapshot's MoRef.
    pub snapshot: Option<String>,
    /// `thumbprint=`: the server's SSL thumbprint (validated).
    pub thumbprint: Option<String>,
    /// `transports=`: colon-separated transport modes (validated).
    pub transports: Option<String>,
    /// `libdir=`: where VDDK is installed.
    pub libdir: Option<String>,
    /// `config=`: a VDDK configuration file.
    pub config: Option<String>,
    /// `nfc-port=`: the NFC host port.
    pub nfc_port: Option<u16>,
}

/// What a `vddk://` URI says, ready to connect: parameters and the disk to open.
#[derive(Debug, Clone)]
pub struct VddkTarget {
    /// The connection parameters (credentials redacted in `Debug`).
    pub params: crate::ConnectParams,
    /// The disk path as VDDK takes it.
    pub path: String,
}

impl VddkUri {
    /// The connection parameters and disk path; `password` is needed when the URI names a
    /// user (take it from [`VDDK_PASSWORD_ENV`]).
    pub fn target(&self, flags: OpenFlags, password: Option<String>) -> Result<VddkTarget> {
        let uri = "vddk://";
        let mut builder = crate::ConnectParams::builder().read_only(flags.read_only);
        if let Some(server) = &self.server {
            builder = builder.server(server.clone());
        }
        if let Some(port) = self.port {
            builder = builder.port(port);
        }
        if let Some(user) = &self.user {
            let password = password.ok_or_else(|| {
                invalid(
                    uri,
                    format!("set {VDDK_PASSWORD_ENV} to the password of user {user:?}"),
                )
            })?;
            builder = builder.user_password(user.clone(), crate::Secret::new(password));
        }
        if let Some(v) = &self.vm {
            builder = builder.vm(v.clone());
        }
        if let Some(v) = &self.snapshot {
            builder = builder.snapshot(v.clone());
        }
        if let Some(v) = &self.thumbprint {
            builder = builder.thumbprint(crate::Thumbprint::new(v)?);
        }
        if let Some(v) = &self.transports {
            builder = builder.transport_modes(crate::parse_transport_modes(v)?);
        }
        if let Some(v) = &self.libdir {
            builder = builder.libdir(v.clone());
        }
        if let Some(v) = &self.config {
            builder = builder.config_path(v.clone());
        }
        if let Some(v) = self.nfc_port {
            builder = builder.nfc_host_port(v);
        }
        Ok(VddkTarget {
            params: builder.build()?,
            path: self.path.clone(),
        })
    }
}

fn parse_vddk(uri: &str, authority: &str, path: &str, query: &str) -> Result<VddkUri> {
    let mut v = VddkUri {
        server: None,
        port: None,
        user: None,
        path: String::new(),
        vm: None,
        snapshot: None,
        thumbprint: None,
        transports: None,
        libdir: None,
        config: None,
        nfc_port: None,
    };
    if authority.is_empty() {
        // A local file: keep the leading slash.
        v.path = percent_decode(uri, path)?;
    } else {
        let host_port = match authority.rsplit_once('@') {
            Some((user, host)) => {
                v.user = Some(percent_decode(uri, user)?);
                host
            }
            None => authority,
        };
        let (host, port) = split_host_port_opt(uri, host_port)?;
        v.server = Some(host);
        v.port = port;
        v.path = percent_decode(uri, path.trim_start_matches('/'))?;
    }
    if v.path.is_empty() || v.path == "/" {
        return Err(invalid(uri, "no disk path after the server"));
    }
    // Values are taken as written after percent-decoding; `vm=moref=vm-16` keeps its `=`.
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(uri, value)?;
        match key {
            "vm" => {
                crate::check_vm_spec(&value)?;
                v.vm = Some(value)
            }
            "snapshot" => {
                crate::check_snapshot_moref(&value)?;
                v.snapshot = Some(value)
            }
            "thumbprint" => {
                crate::Thumbprint::new(&value)?;
                v.thumbprint = Some(value)
            }
            "transports" => {
                crate::parse_transport_modes(&value)?;
                v.transports = Some(value)
            }
            "libdir" => v.libdir = Some(value),
            "config" => v.config = Some(value),
            "nfc-port" => {
                v.nfc_port = Some(
                    value
                        .parse()
                        .map_err(|_| invalid(uri, format!("nfc-port `{value}` is not a port")))?,
                )
            }
            other => {
                return Err(invalid(
                    uri,
                    format!(
                        "unknown parameter `{other}` (vddk URIs take vm, snapshot, thumbprint, \
                         transports, libdir, config, nfc-port)"
                    ),
                ))
            }
        }
    }
    Ok(v)
}

/// A parsed disk URI; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiskUri {
    /// `mem://NAME?size=SIZE`.
    Memory {
        /// Disk name.
        name: String,
        /// Size in bytes, needed when the disk does not exist yet.
        size: Option<u64>,
    },
    /// `file:///PATH`.
    File {
        /// Path of the image or block device.
        path: PathBuf,
        /// Open with `O_DIRECT`.
        direct: bool,
    },
    /// A qcow2 image: a path or `file://` URI ending in `.qcow2`, or `qcow2:NAME`.
    Qcow2 {
        /// Path of the image.
        path: PathBuf,
    },
    /// `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://`.
    Nbd {
        /// The server.
        address: NbdAddress,
        /// Export name ("" is the default export).
        export: String,
        /// TLS settings for `nbds` URIs; `None` for plaintext `nbd`.
        tls: Option<NbdTls>,
        /// Per-request timeout, if given.
        timeout: Option<Duration>,
        /// A `qemu:dirty-bitmap:NAME` context to negotiate, if given.
        dirty_bitmap: Option<String>,
        /// Connections to open when the server allows multi-conn (1 if not given).
        connections: Option<usize>,
    },
    /// `null:` (or `null:?size=SIZE`): the sink that discards writes and reads zeros.
    Null {
        /// Size in bytes, if given (a copy destination takes the source's).
        size: Option<u64>,
    },
    /// `vddk://`.
    Vddk(VddkUri),
}

fn invalid(uri: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUri {
        uri: uri.to_owned(),
        reason: reason.into(),
    }
}

/// Decodes the `%XX` escapes of `text`, a part of `uri` (named in the error).
pub fn percent_decode(uri: &str, text: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(uri, "bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid(uri, "escaped bytes are not UTF-8"))
}

/// Parses a size such as `4096`, `64K`, `1G`, `2GiB`, `1T` (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits_end].parse().ok()?;
    let shift = match text[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// The `size=` of a URI whose only parameter it is (`mem://`, `null:`); any other parameter is
/// an error naming it.
fn size_parameter(uri: &str, query: Vec<(String, String)>) -> Result<Option<u64>> {
    let mut size = None;
    for (k, v) in query {
        match k.as_str() {
            "size" => {
                size = Some(parse_size(&v).ok_or_else(|| {
                    invalid(uri, format!("size {v:?} is not a size like 1G or 4096"))
                })?)
            }
            other => return Err(invalid(uri, format!("unknown parameter {other:?}"))),
        }
    }
    Ok(size)
}

fn query_pairs(uri: &str, query: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for item in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        pairs.push((percent_decode(uri, k)?, percent_decode(uri, v)?));
    }
    Ok(pairs)
}

impl std::str::FromStr for DiskUri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<Self> {
        if uri.is_empty() {
            return Err(invalid(uri, "empty"));
        }
        if let Some(rest) = uri.strip_prefix("null:") {
            let query = match rest.strip_prefix('?') {
                Some(q) => Some(q),
                None if rest.is_empty() => None,
                None => return Err(invalid(uri, "null: takes only ?size=SIZE")),
            };
            let size = size_parameter(uri, query_pairs(uri, query)?)?;
            return Ok(DiskUri::Null { size });
        }
        if let Some(rest) = uri.strip_prefix("qcow2:") {
            return match rest.parse::<DiskUri>() {
                Ok(DiskUri::File {
                    path,
                    direct: false,
                })
                | Ok(DiskUri::Qcow2 { path }) => Ok(DiskUri::Qcow2 { path }),
                Ok(DiskUri::File { direct: true, .. }) => Err(invalid(
                    uri,
                    "qcow2 images are opened through the page cache (no direct=1)",
                )),
                _ => Err(invalid(uri, "qcow2: takes a path or a file:/// URI")),
            };
        }
        if let Some(rest) = uri.strip_prefix("raw:") {
            return match rest.parse::<DiskUri>() {
                Ok(DiskUri::Qcow2 { path }) => Ok(DiskUri::File {
                    path,
                    direct: false,
                }),
                Ok(file @ DiskUri::File { .. }) => Ok(file),
                _ => Err(invalid(uri, "raw: takes a path or a file:/// URI")),
            };
        }
        let parsed = Self::parse_any(uri)?;
        match parsed {
            DiskUri::File { path, direct } if is_qcow2_name(&path) => {
                if direct {
                    return Err(invalid(
                        uri,
                        "qcow2 images are opened through the page cache (no direct=1)",
                    ));
                }
                Ok(DiskUri::Qcow2 { path })
            }
            other => Ok(other),
        }
    }
}

impl DiskUri {
    /// Parses every form but the format prefixes and the `.qcow2` rule.
    fn parse_any(uri: &str) -> Result<Self> {
        // A path: absolute, or relative as people type it on a command line (`disk.img`).
        // Anything with a colon before its first slash is meant as a URI.
        let looks_like_uri = uri
            .find(':')
            .is_some_and(|colon| uri.find('/').is_none_or(|slash| colon < slash));
        if uri.starts_with('/') || !looks_like_uri {
            return Ok(DiskUri::File {
                path: PathBuf::from(uri),
                direct: false,
            });
        }
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            invalid(
                uri,
                "expected SCHEME://..., null: or a path (write ./NAME for a file whose name has \
                 a colon)",
            )
        })?;
        if scheme == "vddk" {
            let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            return parse_vddk(uri, authority, path, query).map(DiskUri::Vddk);
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let query = query_pairs(uri, query)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        match scheme {
            "mem" => {
                let name = percent_decode(uri, authority)?;
                if name.is_empty() {
                    return Err(invalid(uri, "missing disk name: mem://NAME?size=1G"));
                }
                let size = size_parameter(uri, query)?;
                Ok(DiskUri::Memory { name, size })
            }
            "file" => {
                if !authority.is_empty() && authority != "localhost" {
                    return Err(invalid(uri, "file URIs name a local path: file:///path"));
                }
                if path.is_empty() {
                    return Err(invalid(uri, "missing path"));
                }
                let mut direct = false;
                for (k, v) in query {
                    match k.as_str() {
                        "direct" => direct = matches!(v.as_str(), "" | "1" | "true" | "on"),
                        other => return Err(invalid(uri, format!("unknown parameter {other:?}"))),
                    }
                }
                Ok(DiskUri::File {
                    path: PathBuf::from(percent_decode(uri, path)?),
                    direct,
                })
            }
            "nbd" | "nbd+unix" | "nbds" | "nbds+unix" => {
                parse_nbd(uri, scheme, authority, path, query)
            }
            "nbd+vsock" | "nbds+vsock" => Err(invalid(uri, "NBD over vsock is not supported")),
            other => Err(invalid(
                uri,
                format!(
                    "unknown scheme {other:?} (expected file, nbd, nbd+unix, nbds, nbds+unix, \
                     mem, null or vddk)"
                ),
            )),
        }
    }
}

fn parse_bool(uri: &str, key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(
            uri,
            format!("{key}={value:?} is not a boolean (true or false)"),
        )),
    }
}

fn parse_nbd(
    uri: &str,
    scheme: &str,
    authority: &str,
    path: &str,
    query: Vec<(String, String)>,
) -> Result<DiskUri> {
    let unix = scheme.ends_with("+unix");
    let tls_wanted = scheme.starts_with("nbds");
    let export = percent_decode(uri, path.strip_prefix('/').unwrap_or(path))?;
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, rest)) => (Some(percent_decode(uri, user)?), rest),
        None => (None, authority),
    };
    let mut socket = None;
    let mut timeout = None;
    let mut dirty_bitmap = None;
    let mut connections = None;
    let mut tls = NbdTls {
        username: user,
        ..NbdTls::default()
    };
    let mut tls_params = Vec::new();
    for (k, v) in query {
        match k.as_str() {
            "socket" => socket = Some(PathBuf::from(v)),
            "timeout" => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e9)
                    .ok_or_else(|| invalid(uri, "timeout must be seconds > 0"))?;
                timeout = Some(Duration::from_secs_f64(secs));
            }
            "dirty-bitmap" => dirty_bitmap = Some(v),
            "connections" => {
                connections = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .ok_or_else(|| invalid(uri, "connections must be 1 to 16"))?,
                )
            }
            "tls-certificates" => tls.certificates = Some(PathBuf::from(&v)),
            "tls-psk-file" => tls.psk_file = Some(PathBuf::from(&v)),
            "tls-hostname" => {
                if v.is_empty() {
                    return Err(invalid(uri, "tls-hostname is empty"));
                }
                tls.hostname = Some(v.clone())
            }
            "tls-verify-peer" => tls.verify_peer = Some(parse_bool(uri, &k, &v)?),
            other => {
                return Err(invalid(
                    uri,
                    format!(
                        "unknown parameter {other:?} (NBD URIs take socket, tls-certificates, \
                         tls-psk-file, tls-hostname, tls-verify-peer, timeout, dirty-bitmap, \
                         connections)"
                    ),
                ))
            }
        }
        if k.starts_with("tls-") {
            tls_params.push(k);
        }
    }
    if !tls_wanted {
        if let Some(k) = tls_params.first() {
            return Err(invalid(
                uri,
                format!("{k} needs TLS: use nbds:// or nbds+unix:// instead of {scheme}://"),
            ));
        }
        if tls.username.is_some() {
            return Err(invalid(
                uri,
                format!(
                    "a user name is only used for TLS with a pre-shared key (nbds://USER@...), \
                     not with {scheme}://"
                ),
            ));
        }
    }
    if tls.certificates.is_some() && tls.psk_file.is_some() {
        return Err(invalid(
            uri,
            "give either tls-certificates or tls-psk-file, not both",
        ));
    }
    let address = if unix {
        if !host_port.is_empty() {
            return Err(invalid(
                uri,
                format!("{scheme} URIs have no host: {scheme}:///EXPORT?socket=PATH"),
            ));
        }
        NbdAddress::Unix(socket.ok_or_else(|| invalid(uri, "missing ?socket=PATH"))?)
    } else {
        if socket.is_some() {
            return Err(invalid(
                uri,
                format!("socket= belongs to {scheme}+unix:// URIs, not {scheme}://"),
            ));
        }
        let (host, port) = split_host_port(uri, host_port)?;
        NbdAddress::Tcp { host, port }
    };
    Ok(DiskUri::Nbd {
        address,
        export,
        tls: tls_wanted.then_some(tls),
        timeout,
        dirty_bitmap,
        connections,
    })
}

fn split_host_port(uri: &str, authority: &str) -> Result<(String, u16)> {
    if authority.is_empty() {
        return Err(invalid(uri, "missing host: nbd://HOST[:PORT]/EXPORT"));
    }
    let (host, port) = split_host_port_opt(uri, authority)?;
    Ok((host, port.unwrap_or(10809)))
}

/// Splits `host[:port]` (IPv6 hosts in brackets).
fn split_host_port_opt(uri: &str, authority: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(uri, "unterminated [IPv6] host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = port
        .map(|p| {
            p.parse()
                .map_err(|_| invalid(uri, format!("port {p:?} is not a number 0-65535")))
        })
        .transpose()?;
    Ok((host.to_owned(), port))
}

/// Percent-encodes `text` for a URI part: everything but RFC 3986's unreserved characters
/// (and those in `keep`) becomes `%XX`, so [`percent_decode`] gives `text` back.
fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query value: `&`, `%`, `#`, `?` and the like escaped; `/`, `:`, `,`, `@` and `=` (a value
/// ends at the next `&`) kept readable.
fn query_value(text: &str) -> String {
    percent_encode(text, b"/:,@=")
}

/// Seconds as a URI's `timeout=` takes them: whole seconds plainly, else the shortest decimal
/// that reads back as the same [`Duration`].
fn format_seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        return duration.as_secs().to_string();
    }
    let mut text = format!("{}.{:09}", duration.as_secs(), duration.subsec_nanos());
    while text.ends_with('0') {
        text.pop();
    }
    text
}

/// Whether a local image is qcow2 by its name.
fn is_qcow2_name(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "qcow2")
}

/// A local path as a `file://` URI (absolute) or as itself (relative; `./` before it when it
/// would read as something else), without the format rule of names.
fn write_file_form(
    f: &mut fmt::Formatter<'_>,
    path: &std::path::Path,
    direct: bool,
) -> fmt::Result {
    let text = path.to_string_lossy();
    if path.is_absolute() {
        write!(f, "file://{}", percent_encode(&text, b"/"))?;
        if direct {
            f.write_str("?direct=1")?;
        }
        Ok(())
    } else if matches!(DiskUri::parse_any(&text), Ok(DiskUri::File { path: p, direct: false }) if p == path)
        && !text.starts_with("qcow2:")
        && !text.starts_with("raw:")
    {
        f.write_str(&text)
    } else {
        write!(f, "./{text}")
    }
}

/// Builds a URI's `?key=value&...` tail (nothing when there are no pairs).
fn write_query(f: &mut fmt::Formatter<'_>, pairs: &[(&str, String)]) -> fmt::Result {
    for (i, (key, value)) in pairs.iter().enumerate() {
        let separator = if i == 0 { '?' } else { '&' };
        write!(f, "{separator}{key}={}", query_value(value))?;
    }
    Ok(())
}

/// Prints the URI in the syntax of the [module docs](self), so that parsing the text gives the
/// same `DiskUri` back (names are percent-encoded where they need it). Two cases print
/// differently from what was parsed: a relative file path prints as the path (`./` before it
/// when it has a colon), without `?direct=1`, which only `file:///` URIs carry; and a path that
/// is not UTF-8 prints lossily. Nothing secret is in a `DiskUri` (VDDK passwords come from the
/// environment, TLS keys from files), so the text is safe to log.
///
/// ```
/// use disk_transport::DiskUri;
///
/// let uri: DiskUri = "nbd+unix:///vda?socket=/run/backup.sock".parse()?;
/// let uri = uri.with_dirty_bitmap("vmsdk-export-vda")?;
/// assert_eq!(
///     uri.to_string(),
///     "nbd+unix:///vda?socket=/run/backup.sock&dirty-bitmap=vmsdk-export-vda"
/// );
/// assert_eq!(uri.to_string().parse::<DiskUri>()?, uri);
/// # Ok::<(), disk_transport::Error>(())
/// ```
impl fmt::Display for DiskUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskUri::Memory { name, size } => {
                write!(f, "mem://{}", percent_encode(name, b""))?;
                let size = size.map(|s| ("size", s.to_string()));
                write_query(f, size.as_slice())
            }
            DiskUri::Null { size } => {
                f.write_str("null:")?;
                let size = size.map(|s| ("size", s.to_string()));
                write_query(f, size.as_slice())
            }
            DiskUri::File { path, direct } => {
                if is_qcow2_name(path) {
                    f.write_str("raw:")?;
                }
                write_file_form(f, path, *direct)
            }
            DiskUri::Qcow2 { path } => {
                if !is_qcow2_name(path) {
                    f.write_str("qcow2:")?;
                }
                write_file_form(f, path, false)
            }
            DiskUri::Nbd {
                address,
                export,
                tls,
                timeout,
                dirty_bitmap,
                connections,
            } => {
                let secure = if tls.is_some() { "s" } else { "" };
                let user = tls
                    .as_ref()
                    .and_then(|t| t.username.as_deref())
                    .map(|u| format!("{}@", percent_encode(u, b"")))
                    .unwrap_or_default();
                let mut pairs = Vec::new();
                match address {
                    NbdAddress::Unix(socket) => {
                        write!(f, "nbd{secure}+unix://{user}/")?;
                        pairs.push(("socket", socket.to_string_lossy().into_owned()));
                    }
                    NbdAddress::Tcp { host, port } => {
                        let host = if host.contains(':') {
                            format!("[{host}]")
                        } else {
                            host.clone()
                        };
                        write!(f, "nbd{secure}://{user}{host}:{port}/")?;
                    }
                }
                f.write_str(&percent_encode(export, b"/"))?;
                if let Some(tls) = tls {
                    if let Some(dir) = &tls.certificates {
                        pairs.push(("tls-certificates", dir.to_string_lossy().into_owned()));
                    }
                    if let Some(file) = &tls.psk_file {
                        pairs.push(("tls-psk-file", file.to_string_lossy().into_owned()));
                    }
                    if let Some(name) = &tls.hostname {
                        pairs.push(("tls-hostname", name.clone()));
                    }
                    if let Some(verify) = tls.verify_peer {
                        pairs.push(("tls-verify-peer", verify.to_string()));
                    }
                }
                if let Some(timeout) = timeout {
                    pairs.push(("timeout", format_seconds(*timeout)));
                }
                if let Some(bitmap) = dirty_bitmap {
                    pairs.push(("dirty-bitmap", bitmap.clone()));
                }
                if let Some(n) = connections {
                    pairs.push(("connections", n.to_string()));
                }
                write_query(f, &pairs)
            }
            DiskUri::Vddk(vddk) => {
                f.write_str("vddk://")?;
                match &vddk.server {
                    Some(server) => {
                        if let Some(user) = &vddk.user {
                            write!(f, "{}@", percent_encode(user, b""))?;
                        }
                        if server.contains(':') {
                            write!(f, "[{server}]")?;
                        } else {
                            f.write_str(server)?;
                        }
                        if let Some(port) = vddk.port {
                            write!(f, ":{port}")?;
                        }
                        write!(f, "/{}", percent_encode(&vddk.path, b""))?;
                    }
                    None => f.write_str(&percent_encode(&vddk.path, b"/"))?,
                }
                let mut pairs = Vec::new();
                let texts = [
                    ("vm", &vddk.vm),
                    ("snapshot", &vddk.snapshot),
                    ("thumbprint", &vddk.thumbprint),
                    ("transports", &vddk.transports),
                    ("libdir", &vddk.libdir),
                    ("config", &vddk.config),
                ];
                for (key, value) in texts {
                    if let Some(value) = value {
                        pairs.push((key, value.clone()));
                    }
                }
                if let Some(port) = vddk.nfc_port {
                    pairs.push(("nfc-port", port.to_string()));
                }
                write_query(f, &pairs)
            }
        }
    }
}

/// Building URIs without string surgery: start from a parsed URI or a constructor, add what
/// the backend should use, print it with `Display` or open it.
///
/// ```
/// use disk_transport::DiskUri;
/// use std::time::Duration;
///
/// let uri = DiskUri::nbd_unix("/run/vmsdk/backup.sock", "vda")
///     .with_dirty_bitmap("vmsdk-export-vda")?
///     .with_timeout(Duration::from_secs(20))?;
/// assert_eq!(
///     uri.to_string(),
///     "nbd+unix:///vda?socket=/run/vmsdk/backup.sock&timeout=20&dirty-bitmap=vmsdk-export-vda"
/// );
/// assert_eq!(uri.dirty_bitmap(), Some("vmsdk-export-vda"));
/// assert_eq!(DiskUri::file("/var/lib/images/vm.img").to_string(), "file:///var/lib/images/vm.img");
/// # Ok::<(), disk_transport::Error>(())
/// ```
impl DiskUri {
    /// A raw image file or block device (`file:///PATH`, or the path as given when relative).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        DiskUri::File {
            path: path.into(),
            direct: false,
        }
    }

    /// A qcow2 image (`qcow2:PATH`, or the path as it is when it ends in `.qcow2`).
    pub fn qcow2(path: impl Into<PathBuf>) -> Self {
        DiskUri::Qcow2 { path: path.into() }
    }

    /// A local image by its name: qcow2 when it ends in `.qcow2`, else raw ([`DiskUri::file`]).
    /// Its contents are never looked at.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        if is_qcow2_name(&path) {
            DiskUri::Qcow2 { path }
        } else {
            DiskUri::File {
                path,
                direct: false,
            }
        }
    }

    /// An NBD export on a Unix socket (`nbd+unix:///EXPORT?socket=PATH`).
    pub fn nbd_unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        DiskUri::Nbd {
            address: NbdAddress::Unix(socket.into()),
            export: export.into(),
            tls: None,
            timeout: None,
            dirty_bitmap: None,
            connections: None,
        }
    }

    /// An NBD export over TCP (`nbd://HOST:PORT/EXPORT`).
    pub fn nbd_tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Self {
        DiskUri::Nbd {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
            timeout: None,
            dirty_bitmap: None,
            connections: None,
        }
    }

    /// The process-wide in-memory disk `name` (`mem://NAME?size=SIZE`).
    pub fn memory(name: impl Into<String>, size: Option<u64>) -> Self {
        DiskUri::Memory {
            name: name.into(),
            size,
        }
    }

    /// The NBD settings of this URI, or an error saying that `what` needs NBD.
    fn nbd_settings(&mut self, what: &str) -> Result<NbdSettings<'_>> {
        let text = self.to_string();
        match self {
            DiskUri::Nbd {
                tls,
                timeout,
                dirty_bitmap,
                connections,
                ..
            } => Ok(NbdSettings {
                tls,
                timeout,
                dirty_bitmap,
                connections,
            }),
            DiskUri::Memory { name, .. } if what == "a dirty bitmap" => Err(invalid(
                &text,
                format!(
                    "memory disks take their dirty bitmaps through MemoryDisk::dirty_bitmap_handle \
                     (disk {name:?}), not through the URI"
                ),
            )),
            _ => Err(invalid(
                &text,
                format!("{what} is an NBD setting; this URI names no NBD export"),
            )),
        }
    }

    /// Reads the changes recorded by dirty bitmap `name` (`qemu:dirty-bitmap:NAME`) through
    /// [`Disk::dirty_extents`](crate::Disk::dirty_extents). NBD URIs only.
    pub fn with_dirty_bitmap(mut self, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(invalid(&self.to_string(), "the dirty bitmap name is empty"));
        }
        *self.nbd_settings("a dirty bitmap")?.dirty_bitmap = Some(name);
        Ok(self)
    }

    /// Waits at most `timeout` for each reply and for the handshake. NBD URIs only.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(invalid(&self.to_string(), "timeout must be more than 0 s"));
        }
        *self.nbd_settings("a timeout")?.timeout = Some(timeout);
        Ok(self)
    }

    /// Opens up to `n` connections (1 to 16) when the server allows multi-conn. NBD URIs only.
    pub fn with_connections(mut self, n: usize) -> Result<Self> {
        if !(1..=16).contains(&n) {
            return Err(invalid(&self.to_string(), "connections must be 1 to 16"));
        }
        *self.nbd_settings("connections")?.connections = Some(n);
        Ok(self)
    }

    /// Requires TLS with these settings (`nbds://`, `nbds+unix://`). NBD URIs only.
    pub fn with_tls(mut self, tls: NbdTls) -> Result<Self> {
        if tls.certificates.is_some() && tls.psk_file.is_some() {
            return Err(invalid(
                &self.to_string(),
                "give either TLS certificates or a PSK file, not both",
            ));
        }
        *self.nbd_settings("TLS")?.tls = Some(tls);
        Ok(self)
    }

    /// The dirty bitmap this URI asks for, if any.
    pub fn dirty_bitmap(&self) -> Option<&str> {
        match self {
            DiskUri::Nbd { dirty_bitmap, .. } => dirty_bitmap.as_deref(),
            _ => None,
        }
    }
}

/// The NBD-only fields of a [`DiskUri`], borrowed for the `with_*` builders.
struct NbdSettings<'a> {
    tls: &'a mut Option<NbdTls>,
    timeout: &'a mut Option<Duration>,
    dirty_bitmap: &'a mut Option<String>,
    connections: &'a mut Option<usize>,
}

/// What names a disk: a URI string (parsed as [`DiskUri`] parses it), a filesystem path
/// (always a local image, however it is spelled: a `Path` is never read as a URI; qcow2 when
/// its name ends in `.qcow2`, see [`DiskUri::local`]), or a `DiskUri`.
/// [`factory::open`](crate::factory::open) and `vmsdk::disk::open` take any of them.
pub trait IntoDiskUri {
    /// The parsed URI.
    fn into_disk_uri(self) -> Result<DiskUri>;
}

impl IntoDiskUri for DiskUri {
    fn into_disk_uri(self) -> Result<DiskUri> {
        Ok(self)
    }
}

impl IntoDiskUri for &DiskUri {
    fn into_disk_uri(self) -> Result<DiskUri> {
        Ok(self.clone())
    }
}

impl IntoDiskUri for &str {
    fn into_disk_uri(self) -> Result<DiskUri> {
        crate::factory::refuse_stream(self)?;
        self.parse()
    }
}

impl IntoDiskUri for String {
    fn into_disk_uri(self) -> Result<DiskUri> {
        self.as_str().into_disk_uri()
    }
}

impl IntoDiskUri for &String {
    fn into_disk_uri(self) -> Result<DiskUri> {
        self.as_str().into_disk_uri()
    }
}

impl IntoDiskUri for &std::path::Path {
    fn into_disk_uri(self) -> Result<DiskUri> {
        Ok(DiskUri::local(self))
    }
}

impl IntoDiskUri for PathBuf {
    fn into_disk_uri(self) -> Result<DiskUri> {
        Ok(DiskUri::local(self))
    }
}

impl IntoDiskUri for &PathBuf {
    fn into_disk_uri(self) -> Result<DiskUri> {
        Ok(DiskUri::local(self.as_path()))
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_what_it_parses() {
        for text in [
            "mem://scratch?size=1048576",
            "mem://scratch",
            "null:",
            "null:?size=4096",
            "file:///var/lib/images/vm.img",
            "file:///var/lib/images/with%20space%3F.img?direct=1",
            "disk.img",
            "./a:b.img",
            "nbd://example.com:10809/disk",
            "nbd://[::1]:1234/",
            "nbd+unix:///my%20disk?socket=/tmp/s.sock&timeout=2.5&dirty-bitmap=b0&connections=2",
            "nbds://alice@host:10809/vda?tls-psk-file=/etc/keys.psk&tls-verify-peer=false",
            "nbds+unix:///vda?socket=/run/s.sock&tls-certificates=/etc/pki&tls-hostname=vm1",
            "vddk:///path/to/local.vmdk?libdir=/opt/vddk",
            "vddk://root@esx1:443/%5Bdatastore1%5D%20vm%2Fvm.vmdk?vm=moref=vm-16&snapshot=snapshot-47&transports=nbdssl:nbd&nfc-port=902",
        ] {
            let uri: DiskUri = text.parse().unwrap();
            assert_eq!(uri.to_string(), text, "{uri:?}");
            assert_eq!(uri.to_string().parse::<DiskUri>().unwrap(), uri);
        }
    }

    #[test]
    fn builders_refuse_what_the_backend_cannot_take() {
        let e = DiskUri::memory("m", Some(4096))
            .with_dirty_bitmap("b0")
            .unwrap_err();
        assert!(e.to_string().contains("dirty_bitmap_handle"), "{e}");
        let e = DiskUri::file("/x.img")
            .with_timeout(Duration::from_secs(1))
            .unwrap_err();
        assert!(e.to_string().contains("NBD setting"), "{e}");
        assert!(DiskUri::nbd_unix("/s", "x").with_dirty_bitmap("").is_err());
        assert!(DiskUri::nbd_unix("/s", "x").with_connections(17).is_err());
        assert!(DiskUri::nbd_unix("/s", "x")
            .with_timeout(Duration::ZERO)
            .is_err());
        // A path is a file, however it looks; a string may be a URI.
        let path = std::path::Path::new("nbd://host/x");
        assert_eq!(
            path.into_disk_uri().unwrap(),
            DiskUri::File {
                path: path.to_owned(),
                direct: false
            }
        );
        assert!(matches!(
            "nbd://host/x".into_disk_uri().unwrap(),
            DiskUri::Nbd { .. }
        ));
        assert!("-".into_disk_uri().is_err());
        assert_eq!(
            PathBuf::from("-").into_disk_uri().unwrap(),
            DiskUri::file("-")
        );
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[ -~é/?&=%#]{1,12}").unwrap()
    }

    fn nbd_uri() -> impl Strategy<Value = DiskUri> {
        (
            prop_oneof![
                "[a-z][a-z0-9.-]{0,10}".prop_map(|host| (Some(host), 10809u16)),
                Just((None, 0u16)),
            ],
            name(),
            proptest::option::of(1u64..100_000),
            proptest::option::of(name().prop_filter("non-empty", |n| !n.is_empty())),
            proptest::option::of(1usize..=16),
            proptest::option::of((proptest::option::of(name()), any::<bool>())),
        )
            .prop_map(|((host, port), export, millis, bitmap, connections, tls)| {
                let address = match host {
                    Some(host) => NbdAddress::Tcp { host, port },
                    None => NbdAddress::Unix(PathBuf::from("/run/x y&z.sock")),
                };
                DiskUri::Nbd {
                    address,
                    export,
                    tls: tls.map(|(hostname, verify)| NbdTls {
                        hostname: hostname.filter(|h| !h.is_empty()),
                        verify_peer: Some(verify),
                        psk_file: Some(PathBuf::from("/etc/k&=.psk")),
                        ..NbdTls::default()
                    }),
                    timeout: millis.map(Duration::from_millis),
                    dirty_bitmap: bitmap,
                    connections,
                }
            })
    }

    proptest! {
        /// Whatever a `DiskUri` holds, its text parses back to it.
        #[test]
        fn display_round_trips(uri in prop_oneof![
            nbd_uri(),
            (name(), proptest::option::of(any::<u64>()))
                .prop_map(|(name, size)| DiskUri::Memory { name, size }),
            ("/[ -~é]{1,20}", any::<bool>())
                .prop_map(|(path, direct)| DiskUri::File { path: PathBuf::from(path), direct }),
            proptest::option::of(any::<u64>()).prop_map(|size| DiskUri::Null { size }),
            ("/[ -~é]{1,12}(\\.qcow2)?", any::<bool>()).prop_map(|(path, qcow2)| if qcow2 {
                DiskUri::qcow2(path)
            } else {
                DiskUri::file(path)
            }),
        ]) {
            let text = uri.to_string();
            prop_assert_eq!(text.parse::<DiskUri>().unwrap(), uri, "{}", text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libnbd_uris() {
        assert_eq!(
            "nbd://example.com/disk".parse::<DiskUri>().unwrap(),
            DiskUri::Nbd {
                address: NbdAddress::Tcp {
                    host: "example.com".into(),
                    port: 10809
                },
                export: "disk".into(),
                tls: None,
                timeout: None,
                dirty_bitmap: None,
                connections: None,
            }
        );
        assert_eq!(
            "nbd://[::1]:1234".parse::<DiskUri>().unwrap(),
            DiskUri::Nbd {
                address: NbdAddress::Tcp {
                    host: "::1".into(),
                    port: 1234
                },
                export: "".into(),
                tls: None,
                timeout: None,
                dirty_bitmap: None,
                connections: None,
            }
        );
        assert_eq!(
            "nbd+unix:///my%20disk?socket=/tmp/s.sock&timeout=2.5&dirty-bitmap=b0&connections=2"
                .parse::<DiskUri>()
                .unwrap(),
            DiskUri::Nbd {
                address: NbdAddress::Unix("/tmp/s.sock".into()),
                export: "my disk".into(),
                tls: None,
                timeout: Some(Duration::from_millis(2500)),
                dirty_bitmap: Some("b0".into()),
                connections: Some(2),
            }
        );
        assert!("nbd+unix:///x".parse::<DiskUri>().is_err());
        assert!("nbd://h/?connections=0".parse::<DiskUri>().is_err());
        assert!("nbd://h/x?socket=/s".parse::<DiskUri>().is_err());
        assert!("nbd://h:99999/".parse::<DiskUri>().is_err());
        assert!("nbd://h/%zz".parse::<DiskUri>().is_err());
    }

    #[test]
    fn parses_libnbd_tls_uris() {
        assert_eq!(
            "nbds://alice@example.com:10810/disk?tls-psk-file=/k/keys.psk"
                .parse::<DiskUri>()
                .unwrap(),
            DiskUri::Nbd {
                address: NbdAddress::Tcp {
                    host: "example.com".into(),
                    port: 10810
                },
                export: "disk".into(),
                tls: Some(NbdTls {
                    psk_file: Some("/k/keys.psk".into()),
                    username: Some("alice".into()),
                    ..NbdTls::default()
                }),
                timeout: None,
                dirty_bitmap: None,
                connections: None,
            }
        );
        assert_eq!(
            "nbds+unix:///?socket=/tmp/s&tls-certificates=/certs&tls-hostname=srv&tls-verify-peer=false"
                .parse::<DiskUri>()
                .unwrap(),
            DiskUri::Nbd {
                address: NbdAddress::Unix("/tmp/s".into()),
                export: "".into(),
                tls: Some(NbdTls {
                    certificates: Some("/certs".into()),
                    hostname: Some("srv".into()),
                    verify_peer: Some(false),
                    ..NbdTls::default()
                }),
                timeout: None,
                dirty_bitmap: None,
                connections: None,
            }
        );
        assert!(matches!(
            "nbds://h".parse::<DiskUri>().unwrap(),
            DiskUri::Nbd { tls: Some(_), .. }
        ));
    }

    fn vddk(uri: &str) -> VddkUri {
        match uri.parse::<DiskUri>().unwrap() {
            DiskUri::Vddk(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vddk_uris_carry_every_parameter_and_hide_the_password() {
        let uri = "vddk://admin%40vsphere.local@esx1.example.com:902/\
                   %5Bdatastore1%5D%20vm1%2Fvm1.vmdk?vm=moref=vm-16&snapshot=snapshot-47\
                   &transports=nbdssl:nbd&libdir=/opt/vddk&nfc-port=9020";
        let target = vddk(uri)
            .target(OpenFlags::read_only(), Some("s3cret".into()))
            .unwrap();
        assert_eq!(target.path, "[datastore1] vm1/vm1.vmdk");
        let params = &target.params;
        assert_eq!(params.server(), Some("esx1.example.com"));
        assert_eq!(params.port(), Some(902));
        assert_eq!(params.nfc_host_port(), Some(9020));
        assert_eq!(params.vm(), Some("moref=vm-16"));
        assert_eq!(params.snapshot(), Some("snapshot-47"));
        assert_eq!(
            params.transport_modes_string().as_deref(),
            Some("nbdssl:nbd")
        );
        assert!(params.read_only());
        assert!(!format!("{target:?}").contains("s3cret"));
        // IPv6 servers keep their port; a local file keeps its absolute path.
        let v6 = vddk("vddk://u@[fd00::5]:902/d.vmdk?vm=moref=vm-1");
        assert_eq!(
            (v6.server.as_deref(), v6.port),
            (Some("fd00::5"), Some(902))
        );
        let local = vddk("vddk:///srv/disks/a.vmdk")
            .target(OpenFlags::read_write(), None)
            .unwrap();
        assert_eq!(local.path, "/srv/disks/a.vmdk");
        assert!(!local.params.is_remote() && !local.params.read_only());
        // A user without a password: the variable to set is named.
        let err = vddk("vddk://root@esx/disk.vmdk")
            .target(OpenFlags::read_only(), None)
            .unwrap_err();
        assert!(err.to_string().contains(VDDK_PASSWORD_ENV), "{err}");
        for (uri, needle) in [
            ("vddk://esx/d.vmdk?colour=red", "colour"),
            ("vddk://esx:http/d.vmdk", "http"),
            ("vddk://esx/", "no disk path"),
            ("vddk://esx/d.vmdk?transports=warp", "warp"),
            ("vddk://esx/%zz", "escape"),
        ] {
            let err = uri.parse::<DiskUri>().unwrap_err();
            assert!(err.to_string().contains(needle), "{uri}: {err}");
        }
    }

    #[test]
    fn null_and_relative_paths() {
        assert_eq!(
            "null:".parse::<DiskUri>().unwrap(),
            DiskUri::Null { size: None }
        );
        assert_eq!(
            "null:?size=1G".parse::<DiskUri>().unwrap(),
            DiskUri::Null {
                size: Some(1 << 30)
            }
        );
        assert!("null:x".parse::<DiskUri>().is_err());
        for path in [
            "disk.img",
            "backups/disk.img",
            "../d.img",
            "./a:b.img",
            "dir/a:b",
        ] {
            assert_eq!(
                path.parse::<DiskUri>().unwrap(),
                DiskUri::File {
                    path: path.into(),
                    direct: false
                }
            );
        }
        assert!("a:b.img".parse::<DiskUri>().is_err());
        assert!("".parse::<DiskUri>().is_err());
    }

    #[test]
    fn unknown_and_misplaced_parameters_are_named() {
        for (uri, needle) in [
            ("nbd://h/x?colour=red", "\"colour\""),
            ("nbd+unix:///x?socket=/s&tls-type=x509", "\"tls-type\""),
            ("nbd://h/x?tls-certificates=/c", "nbds://"),
            ("nbd+unix:///x?socket=/s&tls-psk-file=/k", "nbds"),
            ("nbd://bob@h/x", "user name"),
            ("nbds://h/x?tls-verify-peer=maybe", "tls-verify-peer"),
            ("nbds://h/x?tls-psk-file=/k&tls-certificates=/c", "not both"),
            ("nbds+unix://h/x?socket=/s", "no host"),
            ("mem://a?colour=red", "colour"),
            ("file:///a?colour=red", "colour"),
        ] {
            let err = uri.parse::<DiskUri>().unwrap_err().to_string();
            assert!(err.contains(needle), "{uri}: {err}");
        }
    }

    #[test]
    fn formats_come_from_names_and_prefixes() {
        let qcow2 = |p: &str| DiskUri::Qcow2 { path: p.into() };
        let raw = |p: &str| DiskUri::File {
            path: p.into(),
            direct: false,
        };
        for (text, want) in [
            ("backup.qcow2", qcow2("backup.qcow2")),
            ("/b/full.qcow2", qcow2("/b/full.qcow2")),
            ("file:///b/full.qcow2", qcow2("/b/full.qcow2")),
            ("qcow2:disk.img", qcow2("disk.img")),
            ("qcow2:file:///b/disk.img", qcow2("/b/disk.img")),
            ("qcow2:x.qcow2", qcow2("x.qcow2")),
            ("raw:backup.qcow2", raw("backup.qcow2")),
            ("raw:file:///b/x.qcow2", raw("/b/x.qcow2")),
            ("backup.qcow2.img", raw("backup.qcow2.img")),
        ] {
            assert_eq!(text.parse::<DiskUri>().unwrap(), want, "{text}");
            assert_eq!(want.to_string().parse::<DiskUri>().unwrap(), want, "{text}");
        }
        for bad in [
            "qcow2:",
            "qcow2:nbd://h/x",
            "file:///b/x.qcow2?direct=1",
            "qcow2:mem://x",
        ] {
            assert!(bad.parse::<DiskUri>().is_err(), "{bad}");
        }
        assert_eq!(DiskUri::local("a/b.qcow2"), qcow2("a/b.qcow2"));
        assert_eq!(DiskUri::local("a/b.img"), raw("a/b.img"));
    }

    #[test]
    fn parses_file_and_mem_uris() {
        assert_eq!(
            "file:///var/lib/d.img?direct=1".parse::<DiskUri>().unwrap(),
            DiskUri::File {
                path: "/var/lib/d.img".into(),
                direct: true
            }
        );
        assert_eq!(
            "/d.img".parse::<DiskUri>().unwrap(),
            DiskUri::File {
                path: "/d.img".into(),
                direct: false
            }
        );
        assert_eq!(
            "mem://a?size=2G".parse::<DiskUri>().unwrap(),
            DiskUri::Memory {
                name: "a".into(),
                size: Some(2 << 30)
            }
        );
        assert!("mem://a?size=lots".parse::<DiskUri>().is_err());
        assert!("ftp://x".parse::<DiskUri>().is_err());
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999P"), None);
    }

    #[test]
    fn mem_uris_share_one_disk() {
        use crate::open_uri;
        let a = open_uri("mem://uri-test-shared?size=1M", OpenFlags::read_write()).unwrap();
        a.write_at(b"hello", 100).unwrap();
        let b = open_uri("mem://uri-test-shared", OpenFlags::read_only()).unwrap();
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(b.write_at(b"x", 0).is_err());
        assert!(open_uri("mem://uri-test-shared?size=2M", OpenFlags::read_only()).is_err());
        assert!(open_uri("mem://uri-test-missing", OpenFlags::read_only()).is_err());
    }
}
