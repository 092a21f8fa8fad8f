//! The crate's one error type.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while connecting to, opening, reading or writing a disk.
///
/// Native codes are kept where a backend has them: [`Error::Vix`] carries the 64-bit
/// `VixError` of VDDK and [`Error::Nbd`] the errno an NBD server sent, so a user who knows the C
/// APIs recognises every failure. Messages name the offset and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with what was being done and where.
    #[error("{op}{at}", at = fmt_offset(*offset))]
    Io {
        /// What was being done ("read", "connect to /run/nbd.sock", ...).
        op: String,
        /// Byte offset on the disk, when the operation had one.
        offset: Option<u64>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A VDDK call failed. `code` is the full `VixError`; [`Error::vix_code`] masks it. The
    /// text gives the code once and, where one exists, a hint ([`vix_hint`]): `VDDK
    /// VixDiskLib_ConnectEx failed: Authentication failed (VixError 35); check the user name …`.
    #[error("VDDK {function} failed: {message} (VixError {}){}", fmt_vix_code(*code), fmt_hint(*code))]
    Vix {
        /// The VDDK function that failed, e.g. `VixDiskLib_Open`.
        function: String,
        /// The raw 64-bit `VixError` (upper bits may carry extra data).
        code: u64,
        /// The text of `VixDiskLib_GetErrorText`, without the code some libraries append.
        message: String,
    },
    /// An NBD server answered a request with an error.
    #[error("NBD server failed {command} of {length} bytes at offset {offset}: {} (errno {errno}){}",
        nbd_errno_name(*errno), fmt_message(message))]
    Nbd {
        /// The command (`read`, `write`, `flush`, `trim`, `write-zeroes`, `block-status`).
        command: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// The NBD error value (EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28, ...).
        errno: u32,
        /// The human-readable message of a structured error chunk, if the server sent one.
        message: String,
    },
    /// The peer broke the NBD protocol; the connection is unusable afterwards.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The NBD handshake failed (option refused, export unknown, TLS required, ...).
    #[error("NBD handshake failed: {0}")]
    Handshake(String),
    /// An operation did not complete in time. The connection is closed afterwards.
    #[error("{what}{at} did not complete within {after:?} (is the server alive? raise the timeout if it is just slow)",
        at = fmt_offset(*offset))]
    Timeout {
        /// What timed out.
        what: String,
        /// Offset of the oldest request still waiting, if any.
        offset: Option<u64>,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection was lost while a request was outstanding.
    #[error("connection lost during {command}{at}: {reason}", at = fmt_offset(*offset))]
    Disconnected {
        /// The command that was waiting.
        command: &'static str,
        /// Its offset, if it had one.
        offset: Option<u64>,
        /// Why the connection ended.
        reason: String,
    },
    /// A request reaches past the end of the disk.
    #[error("{length} bytes at offset {offset} reach past the end of the disk ({capacity} bytes)")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// A request is not aligned as the backend requires (O_DIRECT, sector-based APIs, NBD
    /// minimum block size).
    #[error("{length} bytes at offset {offset} are not aligned to {alignment} bytes ({why})")]
    Unaligned {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Required alignment.
        alignment: u64,
        /// Which rule demands it.
        why: &'static str,
    },
    /// A write was attempted on something opened or connected read-only.
    #[error("{0} is read-only (the connection or the open flags are read-only)")]
    ReadOnly(String),
    /// A disk, export or library was not found.
    #[error("not found: {0}")]
    NotFound(String),
    /// A disk URI could not be understood.
    #[error("invalid disk URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connection parameters are incomplete or contradictory.
    #[error("invalid connection parameters: {0}")]
    InvalidParams(String),
    /// An InitEx configuration file has an error.
    #[error("config{}:{line}: {message}", fmt_path(path))]
    Config {
        /// The file, if read from one.
        path: Option<std::path::PathBuf>,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No transport mode can serve this connection; each candidate says why it was rejected.
    #[error("no usable transport mode: {}", fmt_rejections(.0))]
    NoTransport(Vec<(crate::TransportMode, String)>),
    /// SAN transport was chosen for a disk on local storage: VDDK would let the connection
    /// succeed and fail every write later.
    #[error("SAN transport cannot write to a disk on local storage; pass \"nbdssl\" or \"nbd\" as the transport modes, or connect read-only")]
    SanOnLocalStorage,
    /// The backend does not provide this operation.
    #[error("{0} is not supported by this backend")]
    Unsupported(String),
    /// The caller cancelled the operation (a [`CancelToken`](crate::copy::CancelToken) of a
    /// copy). Whatever completed before stays done; nothing was left half-written.
    #[error("cancelled")]
    Cancelled,
    /// A stream copied onto a disk ([`stream::copy_from_stream`](crate::stream::copy_from_stream))
    /// holds more bytes than the disk. The disk was written up to its end.
    #[error("{stream} holds more than the destination's {capacity} bytes (the destination was written up to its end; give a larger one)")]
    StreamTooLong {
        /// The stream ("standard input").
        stream: String,
        /// The destination's size in bytes.
        capacity: u64,
    },
    /// A stream moved no data for the copy's stall timeout: the program at its other end
    /// neither wrote nor read.
    #[error("{stream} moved no data for {after:?} (is the program at the other end of the pipe stalled? raise the stall timeout if it is just slow)")]
    StreamStalled {
        /// The stream ("standard input", "standard output").
        stream: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// A disk image was to be written to a terminal ([`stream::StreamSink::stdout`](crate::stream::StreamSink::stdout)),
    /// which nbdcopy refuses too.
    #[error("{stream} is a terminal: refusing to write a disk image to it (redirect it to a file or pipe it into a program)")]
    StreamIsTerminal {
        /// The stream ("standard output").
        stream: String,
    },
    /// A server accepted the connection but sent no NBD greeting before the handshake's
    /// deadline: almost always a server that serves one client at a time and is busy with
    /// another (the new connection waits in its listen backlog).
    #[error(
        "NBD server {server} accepted the connection but sent no greeting within {after:?}: \
        it is most likely serving its client limit already (qemu-nbd serves one client at a \
        time unless started with -e N / --shared=N; QEMU's nbd-server-start and nbdkit may set \
        max-connections): close the other client or allow more connections"
    )]
    NoGreeting {
        /// The server's address (`unix:/path` or `host:port`).
        server: String,
        /// How long the client waited: the real bound that expired.
        after: Duration,
    },
    /// Reading what changed since a checkpoint from a handle that was opened without a dirty
    /// bitmap.
    #[error(
        "{what} was opened without a dirty bitmap, so it cannot say what changed: open it \
        with one ({how})"
    )]
    NoDirtyBitmap {
        /// The handle ("this NBD export", "this memory disk handle").
        what: String,
        /// How to open one with a bitmap for this backend.
        how: String,
    },
    /// Two disks that must have the same size (or the destination at least the source's) do
    /// not.
    #[error(
        "{what}: the source has {source_size} bytes, the destination {destination_size} \
        bytes ({hint})"
    )]
    SizeMismatch {
        /// Which operation needs which sizes.
        what: String,
        /// The source's size in bytes.
        source_size: u64,
        /// The destination's size in bytes.
        destination_size: u64,
        /// What to do about it.
        hint: String,
    },
    /// A disk image is not of the format its name or URI says, is damaged, or uses a feature
    /// this crate does not implement (qcow2: an external data file, extended L2 entries, zstd,
    /// encryption, a dirty or corrupt bit). Nothing was read from or written to it.
    #[error("{path}: {reason}")]
    Format {
        /// The image file.
        path: String,
        /// What is wrong, and what to do where something can be done.
        reason: String,
    },
    /// A failure injected by the [`memory`](crate::memory) fake.
    #[error("injected {op} failure at offset {offset}")]
    Injected {
        /// The operation that failed.
        op: &'static str,
        /// The first faulty byte the request touched: the larger of the request's offset and
        /// the start of the [`Fault`](crate::memory::Fault)'s range (the bad sector itself, as
        /// a disk reports it), so a request starting before the fault names the fault's
        /// offset. 0 for a flush.
        offset: u64,
    },
}

impl Error {
    /// The VDDK error code with the upper bits masked (`VIX_ERROR_CODE(e) = e & 0xFFFF`), if this
    /// is a VDDK error.
    pub fn vix_code(&self) -> Option<u16> {
        match self {
            Error::Vix { code, .. } => Some((code & 0xFFFF) as u16),
            _ => None,
        }
    }

    /// The NBD errno, if the server reported an error.
    pub fn nbd_errno(&self) -> Option<u32> {
        match self {
            Error::Nbd { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the error leaves the connection unusable (timeouts, lost connections,
    /// protocol violations).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::NoGreeting { .. }
                | Error::Disconnected { .. }
                | Error::Protocol(_)
        )
    }

    /// Whether trying the same request again may succeed: an NBD server's `EIO` or `ENOMEM`,
    /// an interrupted or timed-out local I/O, an `EIO` from the kernel, a fault injected by the
    /// [`memory`](crate::memory) fake. Not: lost connections and protocol errors (the
    /// connection is gone), nor requests that are wrong in themselves (range, alignment,
    /// read-only, no space). The copy engine retries these when asked
    /// ([`CopyOptions::retries`](crate::copy::CopyOptions::retries)).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Nbd { errno, .. } => matches!(errno, 5 | 12),
            Error::Io { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                ) || source.raw_os_error() == Some(5)
            }
            Error::Injected { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn io(op: impl Into<String>, offset: Option<u64>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            offset,
            source,
        }
    }
}

/// VDDK error codes (the low 16 bits of a `VixError`) with their symbolic names, as
/// `vix.h` defines them, and the text `VixDiskLib_GetErrorText` gives for them. The in-memory
/// transport fails with these ([`memory::Refusal`](crate::memory::Refusal)).
pub mod vix {
    /// `VIX_E_FAIL`: unknown error (also a wrong thumbprint on a remote open).
    pub const E_FAIL: u64 = 1;
    /// `VIX_E_OUT_OF_MEMORY`.
    pub const E_OUT_OF_MEMORY: u64 = 2;
    /// `VIX_E_INVALID_ARG`.
    pub const E_INVALID_ARG: u64 = 3;
    /// `VIX_E_FILE_NOT_FOUND`.
    pub const E_FILE_NOT_FOUND: u64 = 4;
    /// `VIX_E_NOT_SUPPORTED`.
    pub const E_NOT_SUPPORTED: u64 = 6;
    /// `VIX_E_FILE_ERROR`.
    pub const E_FILE_ERROR: u64 = 7;
    /// `VIX_E_FILE_READ_ONLY`.
    pub const E_FILE_READ_ONLY: u64 = 11;
    /// `VIX_E_FILE_ACCESS_ERROR`.
    pub const E_FILE_ACCESS_ERROR: u64 = 13;
    /// `VIX_E_AUTHENTICATION_FAIL`: wrong user name or password.
    pub const E_AUTHENTICATION_FAIL: u64 = 35;
    /// `VIX_E_INVALID_HANDLE`.
    pub const E_INVALID_HANDLE: u64 = 1000;
    /// `VIX_E_DISK_OUTOFRANGE`.
    pub const E_DISK_OUTOFRANGE: u64 = 16007;

    /// The text VDDK gives for `code` (its low 16 bits), or `None` for a code not listed here.
    pub fn text(code: u64) -> Option<&'static str> {
        Some(match code & 0xFFFF {
            E_FAIL => "Unknown error",
            E_OUT_OF_MEMORY => "Memory allocation failed",
            E_INVALID_ARG => "One of the parameters was invalid",
            E_FILE_NOT_FOUND => "A file was not found",
            E_NOT_SUPPORTED => "The operation is not supported",
            E_FILE_ERROR => "A file access error occurred on the host or guest operating system",
            E_FILE_READ_ONLY => "The file is write-protected",
            E_FILE_ACCESS_ERROR => "Insufficient permissions to access the file",
            E_AUTHENTICATION_FAIL => "Authentication failed",
            E_INVALID_HANDLE => "The handle is not a valid VIX object",
            E_DISK_OUTOFRANGE => "The sector is beyond the end of the disk",
            _ => return None,
        })
    }
}

/// What to check when VDDK fails with `code`, where the code alone leaves a user guessing.
///
/// ```
/// use disk_transport::{vix, vix_hint};
///
/// assert!(vix_hint(vix::E_AUTHENTICATION_FAIL).unwrap().contains("SSO domain"));
/// assert_eq!(vix_hint(vix::E_DISK_OUTOFRANGE), None);
/// ```
pub fn vix_hint(code: u64) -> Option<&'static str> {
    match code & 0xFFFF {
        vix::E_AUTHENTICATION_FAIL => Some(
            "check the user name with its SSO domain (administrator@vsphere.local, not \
             administrator; root for a standalone ESXi host) and the password",
        ),
        vix::E_FILE_NOT_FOUND => Some(
            "check the disk path: remote disks are named \"[datastore] folder/disk.vmdk\", \
             local ones by absolute path",
        ),
        vix::E_FILE_ACCESS_ERROR => {
            Some("the user needs the privileges of a backup role on the VM and its datastore")
        }
        _ => None,
    }
}

/// Drops the ` (VixError N)` or `(N)` some libraries append to their text of `code`, so an
/// error gives the code once.
#[cfg_attr(not(all(feature = "vddk", unix)), allow(dead_code))]
pub(crate) fn strip_vix_code(message: &str, code: u64) -> String {
    let message = message.trim();
    for masked in [code & 0xFFFF, code] {
        for suffix in [format!("(VixError {masked})"), format!("({masked})")] {
            if let Some(rest) = message.strip_suffix(suffix.as_str()) {
                return rest.trim_end().to_owned();
            }
        }
    }
    message.to_owned()
}

fn fmt_vix_code(code: u64) -> String {
    if code > 0xFFFF {
        format!("{}, raw {code:#x}", code & 0xFFFF)
    } else {
        code.to_string()
    }
}

fn fmt_hint(code: u64) -> String {
    vix_hint(code)
        .map(|hint| format!("; {hint}"))
        .unwrap_or_default()
}

/// The symbolic name of an NBD error value as the protocol defines it.
pub fn nbd_errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "success",
        1 => "EPERM: operation not permitted",
        5 => "EIO: input/output error",
        12 => "ENOMEM: out of memory",
        22 => "EINVAL: invalid argument",
        28 => "ENOSPC: no space left",
        75 => "EOVERFLOW: value too large",
        95 => "ENOTSUP: not supported",
        108 => "ESHUTDOWN: server is shutting down",
        _ => "unknown error",
    }
}

fn fmt_offset(offset: Option<u64>) -> String {
    offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default()
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn fmt_path(path: &Option<std::path::PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

fn fmt_rejections(rejections: &[(crate::TransportMode, String)]) -> String {
    if rejections.is_empty() {
        return "no candidates".to_owned();
    }
    rejections
        .iter()
        .map(|(mode, why)| format!("{mode}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vix_code_masks_upper_bits() {
        let e = Error::Vix {
            function: "VixDiskLib_Open".into(),
            code: (7 << 32) | 16007,
            message: "out of range".into(),
        };
        assert_eq!(e.vix_code(), Some(16007));
        assert_eq!(
            e.to_string(),
            "VDDK VixDiskLib_Open failed: out of range (VixError 16007, raw 0x700003e87)"
        );
    }

    #[test]
    fn vix_errors_give_the_code_once_and_a_hint() {
        let message = strip_vix_code("stand-in: Authentication failed (VixError 35)", 35);
        assert_eq!(message, "stand-in: Authentication failed");
        assert_eq!(
            strip_vix_code("Cannot connect to host", 1),
            "Cannot connect to host"
        );
        assert_eq!(strip_vix_code("Unknown error (1)", 1), "Unknown error");
        let e = Error::Vix {
            function: "VixDiskLib_ConnectEx".into(),
            code: vix::E_AUTHENTICATION_FAIL,
            message,
        };
        let text = e.to_string();
        assert_eq!(text.matches("35").count(), 1, "{text}");
        assert!(text.starts_with("VDDK VixDiskLib_ConnectEx failed: stand-in: Authentication failed (VixError 35); check the user name with its SSO domain"), "{text}");
        assert_eq!(
            vix::text(vix::E_AUTHENTICATION_FAIL),
            Some("Authentication failed")
        );
        assert_eq!(vix::text(12345), None);
    }

    #[test]
    fn nbd_error_names_offset_and_errno() {
        let e = Error::Nbd {
            command: "read",
            offset: 4096,
            length: 512,
            errno: 5,
            message: "bad sector".into(),
        };
        let text = e.to_string();
        assert!(text.contains("offset 4096"), "{text}");
        assert!(text.contains("EIO"), "{text}");
        assert!(text.contains("bad sector"), "{text}");
        assert_eq!(e.nbd_errno(), Some(5));
        assert!(!e.is_fatal());
    }

    #[test]
    fn timeout_is_fatal_and_says_what_to_do() {
        let e = Error::Timeout {
            what: "NBD read".into(),
            offset: Some(1 << 20),
            after: Duration::from_secs(2),
        };
        assert!(e.is_fatal());
        assert!(e.to_string().contains("offset 1048576"));
        assert!(e.to_string().contains("raise the timeout"));
    }
}
