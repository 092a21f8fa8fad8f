//! The crate's error type, keeping the numbers and texts of the C `VMGuestLibError` enum.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Stat;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The C API's `VMGuestLibError` codes, with the same numbers.
///
/// Every [`Error`] maps to one of these through [`Error::kind`], so a person who knows the
/// C API recognises each failure. [`ErrorCode::Success`] exists only so the table is complete
/// (it is what [`ErrorCode::from_code`] returns for `0`); no [`Error`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum ErrorCode {
    /// `VMGUESTLIB_ERROR_SUCCESS` (0).
    Success = 0,
    /// `VMGUESTLIB_ERROR_OTHER` (1).
    Other = 1,
    /// `VMGUESTLIB_ERROR_NOT_RUNNING_IN_VM` (2).
    NotRunningInVm = 2,
    /// `VMGUESTLIB_ERROR_NOT_ENABLED` (3).
    NotEnabled = 3,
    /// `VMGUESTLIB_ERROR_NOT_AVAILABLE` (4).
    NotAvailable = 4,
    /// `VMGUESTLIB_ERROR_NO_INFO` (5).
    NoInfo = 5,
    /// `VMGUESTLIB_ERROR_MEMORY` (6).
    Memory = 6,
    /// `VMGUESTLIB_ERROR_BUFFER_TOO_SMALL` (7).
    BufferTooSmall = 7,
    /// `VMGUESTLIB_ERROR_INVALID_HANDLE` (8).
    InvalidHandle = 8,
    /// `VMGUESTLIB_ERROR_INVALID_ARG` (9).
    InvalidArg = 9,
    /// `VMGUESTLIB_ERROR_UNSUPPORTED_VERSION` (10).
    UnsupportedVersion = 10,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Success,
        ErrorCode::Other,
        ErrorCode::NotRunningInVm,
        ErrorCode::NotEnabled,
        ErrorCode::NotAvailable,
        ErrorCode::NoInfo,
        ErrorCode::Memory,
        ErrorCode::BufferTooSmall,
        ErrorCode::InvalidHandle,
        ErrorCode::InvalidArg,
        ErrorCode::UnsupportedVersion,
    ];

    /// The number of the C enum.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code with the given C number, if there is one.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.get(usize::try_from(code).ok()?).copied()
    }

    /// The C constant's name, e.g. `VMGUESTLIB_ERROR_NO_INFO`.
    pub fn c_name(self) -> &'static str {
        match self {
            ErrorCode::Success => "VMGUESTLIB_ERROR_SUCCESS",
            ErrorCode::Other => "VMGUESTLIB_ERROR_OTHER",
            ErrorCode::NotRunningInVm => "VMGUESTLIB_ERROR_NOT_RUNNING_IN_VM",
            ErrorCode::NotEnabled => "VMGUESTLIB_ERROR_NOT_ENABLED",
            ErrorCode::NotAvailable => "VMGUESTLIB_ERROR_NOT_AVAILABLE",
            ErrorCode::NoInfo => "VMGUESTLIB_ERROR_NO_INFO",
            ErrorCode::Memory => "VMGUESTLIB_ERROR_MEMORY",
            ErrorCode::BufferTooSmall => "VMGUESTLIB_ERROR_BUFFER_TOO_SMALL",
            ErrorCode::InvalidHandle => "VMGUESTLIB_ERROR_INVALID_HANDLE",
            ErrorCode::InvalidArg => "VMGUESTLIB_ERROR_INVALID_ARG",
            ErrorCode::UnsupportedVersion => "VMGUESTLIB_ERROR_UNSUPPORTED_VERSION",
        }
    }

    /// The description of the code in the vSphere Guest SDK Programming Guide (Table 5), verbatim.
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::Success => "The function has completed successfully.",
            ErrorCode::Other => {
                "An error has occurred. No additional information about the type of error is available."
            }
            ErrorCode::NotRunningInVm => {
                "The program making this call is not running on a VMware virtual machine."
            }
            ErrorCode::NotEnabled => {
                "The vSphere Guest API is not enabled on this host, so these functions cannot be used. \
                 For information about how to enable the library, see \u{201c}Context Functions \u{201d} on page 9."
            }
            ErrorCode::NotAvailable => "The information requested is not available on this host.",
            ErrorCode::NoInfo => {
                "The handle data structure does not contain any information. You must call \
                 VMGuestLib_UpdateInfo to update the data structure."
            }
            ErrorCode::Memory => "There is not enough memory available to complete the call.",
            ErrorCode::BufferTooSmall => {
                "The buffer is too small to accommodate the function call. For example, when you call \
                 VMGuestLib_GetResourcePoolPath, if the path buffer is too small for the resulting \
                 resource pool path, the function returns this error. To resolve this error, allocate \
                 a larger buffer."
            }
            ErrorCode::InvalidHandle => {
                "The handle that you used is invalid. Make sure that you have the correct handle and \
                 that it is open. It might be necessary to create a new handle using \
                 VMGuestLib_OpenHandle."
            }
            ErrorCode::InvalidArg => {
                "One or more of the arguments passed to the function were invalid."
            }
            ErrorCode::UnsupportedVersion => "The host does not support the requested statistic.",
        }
    }

    /// The short text `VMGuestLib_GetErrorText` returns for the code (open-vm-tools' strings).
    pub fn error_text(self) -> &'static str {
        match self {
            ErrorCode::Success => "No error",
            ErrorCode::Other => "Other error",
            ErrorCode::NotRunningInVm => "VMware Guest API is not running in a Virtual Machine",
            ErrorCode::NotEnabled => "VMware Guest API is not enabled on the host",
            ErrorCode::NotAvailable => "This value is not available on this host",
            ErrorCode::NoInfo => "VMGuestLib_UpdateInfo() has not been called",
            ErrorCode::Memory => "There is not enough system memory",
            ErrorCode::BufferTooSmall => "The provided memory buffer is too small",
            ErrorCode::InvalidHandle => "The provided handle is invalid",
            ErrorCode::InvalidArg => "One or more arguments were invalid",
            ErrorCode::UnsupportedVersion => "Host does not support this request.",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Everything that can go wrong when reading guest statistics.
///
/// The first variants are the C API's `VMGuestLibError` codes: [`Error::code`] and
/// [`Error::kind`] give the number and the `VMGUESTLIB_ERROR_*` name, and
/// [`ErrorCode::description`] the guide's text verbatim, so a user of the C library recognises
/// each one. `Display` says what happened and what to do in this crate's terms. The other
/// variants are failures of a backend's own I/O, each reported with its C equivalent by
/// [`Error::code`] (usually `VMGUESTLIB_ERROR_OTHER`, which is what the C library says when its
/// transport fails).
///
/// ```
/// use guest_stats::fake::FakeGuestStats;
/// use guest_stats::{Error, GuestStats};
///
/// let stats = FakeGuestStats::example();
/// let error = stats.cpu_stolen_ms().unwrap_err(); // no update yet
/// assert!(matches!(error, Error::NoInfo));
/// assert_eq!(error.kind().c_name(), "VMGUESTLIB_ERROR_NO_INFO");
/// assert_eq!(error.to_string(), "no statistics yet: call GuestStats::update first (none has succeeded, or the last one failed)");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `VMGUESTLIB_ERROR_OTHER` (1): a failure the C API has no better code for.
    #[error("the statistics backend failed and has no more detail (VMGUESTLIB_ERROR_OTHER)")]
    Other,
    /// `VMGUESTLIB_ERROR_NOT_RUNNING_IN_VM` (2): the backend's hypervisor is not the one this
    /// program runs on (for the `vmware` backend: CPUID and DMI do not say VMware).
    #[error("not running in a VMware virtual machine, so the VMware backend cannot be used")]
    NotRunningInVm,
    /// `VMGUESTLIB_ERROR_NOT_ENABLED` (3): the host refuses the Guest API (the VMX option
    /// `isolation.tools.guestlibGetInfo.disable = "TRUE"`, or a host without it, such as
    /// Workstation or Fusion).
    #[error(
        "the vSphere Guest API is not enabled for this VM: the host refuses it (VMX option \
         isolation.tools.guestlibGetInfo.disable = \"TRUE\") or does not have it (Workstation, \
         Fusion); the Linux backend still reads what the guest kernel knows"
    )]
    NotEnabled,
    /// `VMGUESTLIB_ERROR_NOT_AVAILABLE` (4): this statistic has no value on this host (or this
    /// backend cannot know it).
    #[error("{stat} is not available from this backend on this host")]
    NotAvailable {
        /// The statistic that was asked for.
        stat: Stat,
    },
    /// `VMGUESTLIB_ERROR_NOT_AVAILABLE` (4) for a raw statistic of `guestlib.stat.get`
    /// (`VMGuestLib_StatGet`, `vmware-toolbox-cmd stat raw`), which has no [`Stat`].
    #[error("the raw statistic `{name}` is not available on this host")]
    RawStatNotAvailable {
        /// The statistic and its parameter as requested, e.g. `vnet 00:50:56:aa:bb:cc`.
        name: String,
    },
    /// `VMGUESTLIB_ERROR_NO_INFO` (5): [`GuestStats::update`](crate::GuestStats::update) has not
    /// succeeded yet (or the last one failed, which invalidates earlier data as in the C API).
    #[error(
        "no statistics yet: call GuestStats::update first (none has succeeded, or the last one \
         failed)"
    )]
    NoInfo,
    /// `VMGUESTLIB_ERROR_MEMORY` (6): an allocation failed. Rust aborts on allocation failure,
    /// so this crate never returns it; it exists so every C code has a variant.
    #[error("not enough memory to complete the call")]
    Memory,
    /// `VMGUESTLIB_ERROR_BUFFER_TOO_SMALL` (7). In C it also means the caller's buffer for the
    /// resource pool path was too small; Rust returns an owned `String`, so here it only means
    /// what `VMGuestLib_StatGet` uses it for: a raw statistic request longer than the 256
    /// bytes the host accepts.
    #[error("the raw statistic request is longer than the 256 bytes the host accepts")]
    BufferTooSmall,
    /// `VMGUESTLIB_ERROR_INVALID_HANDLE` (8): the handle is not usable. Rust's ownership makes a
    /// dangling handle impossible, so this crate never returns it; it exists so every C code
    /// has a variant.
    #[error("the statistics handle is invalid; open a new one")]
    InvalidHandle,
    /// `VMGUESTLIB_ERROR_INVALID_ARG` (9): an argument was invalid.
    #[error("an argument was invalid")]
    InvalidArg,
    /// `VMGUESTLIB_ERROR_UNSUPPORTED_VERSION` (10): the host is too old for this statistic
    /// (for VMware: it answered with a guestlib data version that does not carry it).
    #[error("the host is too old to report {stat}")]
    UnsupportedVersion {
        /// The statistic that was asked for.
        stat: Stat,
    },
    /// Reading a file of the guest kernel (procfs, sysfs, cgroupfs) failed.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file, including the configured root.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: Arc<io::Error>,
    },
    /// A file of the guest kernel did not have the expected format.
    #[error("cannot parse {}: {detail}", path.display())]
    Parse {
        /// The file, including the configured root.
        path: PathBuf,
        /// What was wrong, with the line where it helps.
        detail: String,
    },
    /// The VMware message channel (GuestRPC) failed: the host closed it, refused to open it or
    /// broke the protocol. The C library reports this as `VMGUESTLIB_ERROR_OTHER`.
    #[error("VMware message channel failed: {detail}")]
    Channel {
        /// What failed, in the protocol's terms.
        detail: String,
    },
    /// The host's guestlib reply could not be decoded. The C library reports this as
    /// `VMGUESTLIB_ERROR_OTHER` (or silently invalidates the handle).
    #[error("malformed guestlib v{version} reply: {detail}")]
    Decode {
        /// The guestlib data version that was being decoded (2 or 3).
        version: u32,
        /// What was wrong and where.
        detail: String,
    },
    /// A plain VMware backdoor command (GETVERSION, GETTIMEFULL, GETMHZ) gave no usable
    /// answer.
    #[error("VMware backdoor command {command} failed: {detail}")]
    BackdoorCommand {
        /// The command's name, e.g. `GETTIMEFULL`.
        command: &'static str,
        /// What was wrong with the answer.
        detail: String,
    },
    /// The VMware backdoor is there (CPUID says VMware) but using it faulted in a probe
    /// process. The host may restrict ring-3 access (`monitor_control.restrict_backdoor`), or the
    /// guest is a confidential VM whose kernel does not forward user-space hypercalls. The
    /// library never raises its own privileges; running as root does not change this.
    #[error("VMware backdoor access was denied: {detail}")]
    BackdoorDenied {
        /// How the probe failed (the signal that stopped it, or the system call that failed).
        detail: String,
    },
}

impl Error {
    /// The C API's code for this error.
    pub fn kind(&self) -> ErrorCode {
        match self {
            Error::Other => ErrorCode::Other,
            Error::NotRunningInVm => ErrorCode::NotRunningInVm,
            Error::NotEnabled => ErrorCode::NotEnabled,
            Error::NotAvailable { .. } | Error::RawStatNotAvailable { .. } => {
                ErrorCode::NotAvailable
            }
            Error::NoInfo => ErrorCode::NoInfo,
            Error::Memory => ErrorCode::Memory,
            Error::BufferTooSmall => ErrorCode::BufferTooSmall,
            Error::InvalidHandle => ErrorCode::InvalidHandle,
            Error::InvalidArg => ErrorCode::InvalidArg,
            Error::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Error::Io { .. }
            | Error::Parse { .. }
            | Error::Channel { .. }
            | Error::Decode { .. }
            | Error::BackdoorCommand { .. }
            | Error::BackdoorDenied { .. } => ErrorCode::Other,
        }
    }

    /// The number of the C API's `VMGuestLibError` for this error (1..=10).
    pub fn code(&self) -> u32 {
        self.kind().code()
    }

    /// Whether this error only says that one statistic has no value, so a caller collecting
    /// many statistics can carry on (`NotAvailable` and `UnsupportedVersion`).
    pub fn is_missing_statistic(&self) -> bool {
        matches!(
            self,
            Error::NotAvailable { .. }
                | Error::RawStatNotAvailable { .. }
                | Error::UnsupportedVersion { .. }
        )
    }

    #[cfg_attr(not(feature = "linux"), allow(dead_code))]
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }

    #[cfg_attr(not(feature = "linux"), allow(dead_code))]
    pub(crate) fn parse(path: impl Into<PathBuf>, detail: impl Into<String>) -> Error {
        Error::Parse {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
