//! Every command of the protocol as a type implementing [`Command`].
//!
//! A command type is a marker (`cmd::GuestInfo`); its arguments are a
//! separate struct (`cmd::GuestExecArgs`) or `()` when the command takes
//! none. Typed calls go through [`crate::GuestAgentExt::call`] (async) or
//! [`crate::Client::call`] (blocking):
//!
//! ```
//! # fn main() -> Result<(), qga_proto::Error> {
//! use qga_proto::cmd::{self, Command};
//! assert_eq!(cmd::GuestInfo::NAME, "guest-info");
//! assert!(!cmd::GuestShutdown::SUCCESS_RESPONSE);
//! let request = qga_proto::wire::encode_request(
//!     cmd::GuestFileOpen::NAME,
//!     &cmd::GuestFileOpenArgs::new("/etc/os-release"),
//!     None,
//! )?;
//! assert_eq!(request, b"{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/etc/os-release\"}}\n");
//! # Ok(()) }
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::*;

/// One command of the guest agent protocol.
pub trait Command {
    /// The wire name, e.g. `guest-info`.
    const NAME: &'static str;
    /// Arguments (`()` for commands without any).
    type Args: Serialize + Send + Sync;
    /// The value of `return` on success.
    type Returns: DeserializeOwned + Send;
    /// Whether the agent answers on success (`false` for shutdown and suspend).
    const SUCCESS_RESPONSE: bool = true;
    /// First QEMU release that has the command, `(major, minor)`.
    const SINCE: (u32, u32);
    /// The command's parameters as the schema declares them, in order.
    const PARAMS: &'static [ParamSpec];
    /// The build condition of the reference's "Availability" line (`CONFIG_WIN32`,
    /// `CONFIG_LINUX or CONFIG_WIN32`, ...), empty when every build has the command. Since 9.1
    /// an agent built without it leaves the command out of `guest-info`; older agents list it
    /// disabled.
    const AVAILABILITY: &'static str = "";
}

/// JSON type of a parameter, as the agent's argument checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParamKind {
    /// A JSON integer.
    Int,
    /// A JSON string.
    Str,
    /// A JSON boolean.
    Bool,
    /// A JSON array.
    Array,
    /// An alternate: integer or string (`GuestFileWhence`).
    IntOrStr,
    /// An alternate: boolean or string (`GuestExecCaptureOutput`).
    BoolOrStr,
}

/// One parameter of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    /// Wire name.
    pub name: &'static str,
    /// JSON type.
    pub kind: ParamKind,
    /// Whether the parameter may be left out.
    pub optional: bool,
}

const fn req(name: &'static str, kind: ParamKind) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        optional: false,
    }
}

const fn opt(name: &'static str, kind: ParamKind) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        optional: true,
    }
}

/// Static facts about a command, one entry of [`COMMANDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandSpec {
    /// Wire name.
    pub name: &'static str,
    /// First QEMU release that has the command.
    pub since: (u32, u32),
    /// Whether the agent answers on success.
    pub success_response: bool,
    /// Parameters in schema order.
    pub params: &'static [ParamSpec],
    /// Build condition ([`Command::AVAILABILITY`]), empty for every build.
    pub availability: &'static str,
}

impl CommandSpec {
    /// The entry for command type `C`.
    pub const fn of<C: Command>() -> CommandSpec {
        CommandSpec {
            name: C::NAME,
            since: C::SINCE,
            success_response: C::SUCCESS_RESPONSE,
            params: C::PARAMS,
            availability: C::AVAILABILITY,
        }
    }
}

/// Looks up a command of the newest protocol by wire name.
pub fn spec(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

macro_rules! commands {
    ($(
        $(#[$doc:meta])*
        $ty:ident = $name:literal, since ($maj:literal, $min:literal), args $args:ty, returns $ret:ty,
        reply $reply:literal, $(only $cond:literal,)? params [$($p:expr),* $(,)?];
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
            pub struct $ty;

            impl Command for $ty {
                const NAME: &'static str = $name;
                type Args = $args;
                type Returns = $ret;
                const SUCCESS_RESPONSE: bool = $reply;
                const SINCE: (u32, u32) = ($maj, $min);
                const PARAMS: &'static [ParamSpec] = &[$($p),*];
                const AVAILABILITY: &'static str = concat!("" $(, $cond)?);
            }
        )*

        /// Every command of the newest protocol reference, in reference order.
        pub const COMMANDS: &[CommandSpec] = &[$(CommandSpec::of::<$ty>()),*];
    };
}

use ParamKind::*;

commands! {
    /// `guest-sync-delimited`: echo an id, prefixing the reply with a 0xFF sentinel.
    GuestSyncDelimited = "guest-sync-delimited", since (1, 1), args GuestSyncArgs, returns i64,
        reply true, params [req("id", Int)];
    /// `guest-sync`: echo an id.
    GuestSync = "guest-sync", since (0, 15), args GuestSyncArgs, returns i64,
        reply true, params [req("id", Int)];
    /// `guest-ping`: check the agent is alive.
    GuestPing = "guest-ping", since (0, 15), args (), returns Empty, reply true, params [];
    /// `guest-get-time`: guest system time in ns since the epoch.
    GuestGetTime = "guest-get-time", since (1, 5), args (), returns i64, reply true, params [];
    /// `guest-set-time`: set system time (and the RTC).
    GuestSetTime = "guest-set-time", since (1, 5), args GuestSetTimeArgs, returns Empty,
        reply true, params [opt("time", Int)];
    /// `guest-info`: agent version and command list.
    GuestInfo = "guest-info", since (0, 15), args (), returns GuestAgentInfo, reply true, params [];
    /// `guest-shutdown`: power down, halt or reboot; no reply on success.
    GuestShutdown = "guest-shutdown", since (0, 15), args GuestShutdownArgs, returns Empty,
        reply false, params [opt("mode", Str)];
    /// `guest-file-open`: open a file, returning a handle.
    GuestFileOpen = "guest-file-open", since (0, 15), args GuestFileOpenArgs, returns i64,
        reply true, params [req("path", Str), opt("mode", Str)];
    /// `guest-file-close`: close a handle.
    GuestFileClose = "guest-file-close", since (0, 15), args GuestFileHandleArgs, returns Empty,
        reply true, params [req("handle", Int)];
    /// `guest-file-read`: read from a handle.
    GuestFileRead = "guest-file-read", since (0, 15), args GuestFileReadArgs,
        returns crate::types::GuestFileRead, reply true, params [req("handle", Int), opt("count", Int)];
    /// `guest-file-write`: write to a handle.
    GuestFileWrite = "guest-file-write", since (0, 15), args GuestFileWriteArgs,
        returns crate::types::GuestFileWrite, reply true,
        params [req("handle", Int), req("buf-b64", Str), opt("count", Int)];
    /// `guest-file-seek`: reposition a handle.
    GuestFileSeek = "guest-file-seek", since (0, 15), args GuestFileSeekArgs,
        returns crate::types::GuestFileSeek, reply true,
        params [req("handle", Int), req("offset", Int), req("whence", IntOrStr)];
    /// `guest-file-flush`: flush a handle's user-space buffers.
    GuestFileFlush = "guest-file-flush", since (0, 15), args GuestFileHandleArgs, returns Empty,
        reply true, params [req("handle", Int)];
    /// `guest-fsfreeze-status`: whether filesystems are frozen.
    GuestFsfreezeStatus = "guest-fsfreeze-status", since (0, 15), args (),
        returns crate::types::GuestFsfreezeStatus, reply true, only "CONFIG_WIN32 or CONFIG_FSFREEZE", params [];
    /// `guest-fsfreeze-freeze`: freeze every freezable local filesystem.
    GuestFsfreezeFreeze = "guest-fsfreeze-freeze", since (0, 15), args (), returns i64, reply true, only "CONFIG_WIN32 or CONFIG_FSFREEZE", params [];
    /// `guest-fsfreeze-freeze-list`: freeze the given mount points.
    GuestFsfreezeFreezeList = "guest-fsfreeze-freeze-list", since (2, 2), args GuestFsfreezeFreezeListArgs,
        returns i64, reply true, only "CONFIG_WIN32 or CONFIG_FSFREEZE", params [opt("mountpoints", Array)];
    /// `guest-fsfreeze-thaw`: thaw frozen filesystems.
    GuestFsfreezeThaw = "guest-fsfreeze-thaw", since (0, 15), args (), returns i64, reply true, only "CONFIG_WIN32 or CONFIG_FSFREEZE", params [];
    /// `guest-fstrim`: discard unused blocks.
    GuestFstrim = "guest-fstrim", since (1, 2), args GuestFstrimArgs, returns GuestFilesystemTrimResponse,
        reply true, only "CONFIG_WIN32 or CONFIG_FSTRIM", params [opt("minimum", Int)];
    /// `guest-suspend-disk`: hibernate; no reply on success.
    GuestSuspendDisk = "guest-suspend-disk", since (1, 1), args (), returns Empty, reply false, only "CONFIG_LINUX or CONFIG_WIN32", params [];
    /// `guest-suspend-ram`: suspend to RAM; no reply on success.
    GuestSuspendRam = "guest-suspend-ram", since (1, 1), args (), returns Empty, reply false, only "CONFIG_LINUX or CONFIG_WIN32", params [];
    /// `guest-suspend-hybrid`: hybrid sleep; no reply on success.
    GuestSuspendHybrid = "guest-suspend-hybrid", since (1, 1), args (), returns Empty, reply false, only "CONFIG_LINUX", params [];
    /// `guest-network-get-interfaces`: interfaces, addresses, counters.
    GuestNetworkGetInterfaces = "guest-network-get-interfaces", since (1, 1), args (),
        returns Vec<GuestNetworkInterface>, reply true, only "CONFIG_WIN32 or HAVE_GETIFADDRS", params [];
    /// `guest-get-vcpus`: logical processors.
    GuestGetVcpus = "guest-get-vcpus", since (1, 5), args (), returns Vec<GuestLogicalProcessor>,
        reply true, only "CONFIG_LINUX or CONFIG_WIN32", params [];
    /// `guest-set-vcpus`: online/offline logical processors.
    GuestSetVcpus = "guest-set-vcpus", since (1, 5), args GuestSetVcpusArgs, returns i64,
        reply true, only "CONFIG_LINUX", params [req("vcpus", Array)];
    /// `guest-get-disks`: block devices.
    GuestGetDisks = "guest-get-disks", since (5, 2), args (), returns Vec<GuestDiskInfo>, reply true, only "CONFIG_WIN32 or CONFIG_LIBUDEV", params [];
    /// `guest-get-fsinfo`: mounted filesystems.
    GuestGetFsinfo = "guest-get-fsinfo", since (2, 2), args (), returns Vec<GuestFilesystemInfo>,
        reply true, only "CONFIG_WIN32 or CONFIG_LINUX", params [];
    /// `guest-set-user-password`: change an account's password.
    GuestSetUserPassword = "guest-set-user-password", since (2, 3), args GuestSetUserPasswordArgs,
        returns Empty, reply true, only "CONFIG_WIN32 or CONFIG_LINUX or CONFIG_FREEBSD", params [req("username", Str), req("password", Str), req("crypted", Bool)];
    /// `guest-get-memory-blocks`: memory blocks.
    GuestGetMemoryBlocks = "guest-get-memory-blocks", since (2, 3), args (), returns Vec<GuestMemoryBlock>,
        reply true, only "CONFIG_LINUX", params [];
    /// `guest-set-memory-blocks`: online/offline memory blocks.
    GuestSetMemoryBlocks = "guest-set-memory-blocks", since (2, 3), args GuestSetMemoryBlocksArgs,
        returns Vec<GuestMemoryBlockResponse>, reply true, only "CONFIG_LINUX", params [req("mem-blks", Array)];
    /// `guest-get-memory-block-info`: memory block size.
    GuestGetMemoryBlockInfo = "guest-get-memory-block-info", since (2, 3), args (),
        returns GuestMemoryBlockInfo, reply true, only "CONFIG_LINUX", params [];
    /// `guest-exec-status`: state of a process started by `guest-exec`.
    GuestExecStatus = "guest-exec-status", since (2, 5), args GuestExecStatusArgs,
        returns crate::types::GuestExecStatus, reply true, params [req("pid", Int)];
    /// `guest-exec`: start a process.
    GuestExec = "guest-exec", since (2, 5), args GuestExecArgs, returns crate::types::GuestExec, reply true,
        params [req("path", Str), opt("arg", Array), opt("env", Array), opt("input-data", Str),
                opt("capture-output", BoolOrStr)];
    /// `guest-get-host-name`: the guest's host name.
    GuestGetHostName = "guest-get-host-name", since (2, 10), args (), returns GuestHostName, reply true, params [];
    /// `guest-get-users`: logged-in users.
    GuestGetUsers = "guest-get-users", since (2, 10), args (), returns Vec<GuestUser>, reply true, only "CONFIG_WIN32 or HAVE_UTMPX", params [];
    /// `guest-get-timezone`: time zone.
    GuestGetTimezone = "guest-get-timezone", since (2, 10), args (), returns GuestTimezone, reply true, params [];
    /// `guest-get-osinfo`: operating system identity.
    GuestGetOsinfo = "guest-get-osinfo", since (2, 10), args (), returns GuestOSInfo, reply true, params [];
    /// `guest-get-devices`: devices and drivers (Windows).
    GuestGetDevices = "guest-get-devices", since (5, 2), args (), returns Vec<GuestDeviceInfo>, reply true, only "CONFIG_WIN32", params [];
    /// `guest-ssh-get-authorized-keys`: a user's authorized SSH keys.
    GuestSshGetAuthorizedKeys = "guest-ssh-get-authorized-keys", since (5, 2), args GuestSshGetAuthorizedKeysArgs,
        returns GuestAuthorizedKeys, reply true, params [req("username", Str)];
    /// `guest-ssh-add-authorized-keys`: add SSH keys for a user.
    GuestSshAddAuthorizedKeys = "guest-ssh-add-authorized-keys", since (5, 2), args GuestSshAddAuthorizedKeysArgs,
        returns Empty, reply true, params [req("username", Str), req("keys", Array), opt("reset", Bool)];
    /// `guest-ssh-remove-authorized-keys`: remove SSH keys of a user.
    GuestSshRemoveAuthorizedKeys = "guest-ssh-remove-authorized-keys", since (5, 2),
        args GuestSshRemoveAuthorizedKeysArgs, returns Empty, reply true,
        params [req("username", Str), req("keys", Array)];
    /// `guest-get-diskstats`: disk I/O counters.
    GuestGetDiskstats = "guest-get-diskstats", since (7, 1), args (), returns Vec<GuestDiskStatsInfo>,
        reply true, only "CONFIG_LINUX", params [];
    /// `guest-get-cpustats`: per-CPU times.
    GuestGetCpustats = "guest-get-cpustats", since (7, 1), args (), returns Vec<GuestCpuStats>, reply true, only "CONFIG_LINUX", params [];
    /// `guest-get-load`: load averages.
    GuestGetLoad = "guest-get-load", since (10, 0), args (), returns GuestLoadAverage, reply true, only "CONFIG_GETLOADAVG", params [];
    /// `guest-network-get-route`: routing table.
    GuestNetworkGetRoute = "guest-network-get-route", since (9, 1), args (), returns Vec<GuestNetworkRoute>,
        reply true, only "CONFIG_LINUX", params [];
}

// ---------------------------------------------------------------------------
// Argument structs
// ---------------------------------------------------------------------------

/// Arguments of `guest-sync` and `guest-sync-delimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSyncArgs {
    /// The id the agent echoes.
    pub id: i64,
}

/// Arguments of `guest-set-time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GuestSetTimeArgs {
    /// Nanoseconds since the epoch; `None` sets the system time from the RTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
}

/// Arguments of `guest-shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GuestShutdownArgs {
    /// Mode; the agent defaults to `powerdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<GuestShutdownMode>,
}

/// Arguments of `guest-file-open`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileOpenArgs {
    /// Full path in the guest.
    pub path: String,
    /// `fopen()` mode; the agent defaults to `"r"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl GuestFileOpenArgs {
    /// Opens `path` with the agent's default mode (`"r"`).
    pub fn new(path: impl Into<String>) -> Self {
        GuestFileOpenArgs {
            path: path.into(),
            mode: None,
        }
    }

    /// Sets the `fopen()` mode (`"r"`, `"w"`, `"a+"`, ...).
    pub fn mode(mut self, mode: impl Into<String>) -> Self {
        self.mode = Some(mode.into());
        self
    }
}

/// Arguments of `guest-file-close` and `guest-file-flush`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileHandleArgs {
    /// Handle from `guest-file-open`.
    pub handle: i64,
}

/// Arguments of `guest-file-read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileReadArgs {
    /// Handle from `guest-file-open`.
    pub handle: i64,
    /// Maximum bytes to read (agent default 4 KiB, maximum 48 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

/// Arguments of `guest-file-write`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileWriteArgs {
    /// Handle from `guest-file-open`.
    pub handle: i64,
    /// The bytes to write.
    #[serde(rename = "buf-b64")]
    pub buf_b64: Base64Data,
    /// How many of the bytes to write (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

/// Arguments of `guest-file-seek`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestFileSeekArgs {
    /// Handle from `guest-file-open`.
    pub handle: i64,
    /// Offset relative to `whence`.
    pub offset: i64,
    /// Reference point.
    pub whence: GuestFileWhence,
}

impl GuestFileSeekArgs {
    /// Builds the arguments from a [`std::io::SeekFrom`], using the integer
    /// `whence` every agent version accepts.
    pub fn from_seek(handle: i64, pos: std::io::SeekFrom) -> Self {
        let offset = match pos {
            // Offsets past i64::MAX are not representable on the wire; the agent
            // rejects the clamped value the same way it would the real one.
            std::io::SeekFrom::Start(n) => i64::try_from(n).unwrap_or(i64::MAX),
            std::io::SeekFrom::Current(n) | std::io::SeekFrom::End(n) => n,
        };
        GuestFileSeekArgs {
            handle,
            offset,
            whence: pos.into(),
        }
    }
}

/// Arguments of `guest-fsfreeze-freeze-list`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GuestFsfreezeFreezeListArgs {
    /// Mount points to freeze; `None` freezes all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoints: Option<Vec<String>>,
}

/// Arguments of `guest-fstrim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GuestFstrimArgs {
    /// Minimum contiguous free range to discard, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<i64>,
}

/// Arguments of `guest-set-vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSetVcpusArgs {
    /// Requested states, processed in order.
    pub vcpus: Vec<GuestLogicalProcessor>,
}

/// Arguments of `guest-set-user-password`. `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSetUserPasswordArgs {
    /// Account to change.
    pub username: String,
    /// New password (base64-encoded on the wire by [`Password`]).
    pub password: Password,
    /// Whether `password` is already a `crypt()` hash.
    pub crypted: bool,
}

/// Arguments of `guest-set-memory-blocks`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSetMemoryBlocksArgs {
    /// Requested states, processed in order.
    #[serde(rename = "mem-blks")]
    pub mem_blks: Vec<GuestMemoryBlock>,
}

/// Arguments of `guest-exec-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestExecStatusArgs {
    /// PID returned by `guest-exec`.
    pub pid: i64,
}

/// Arguments of `guest-exec`, built with [`GuestExecArgs::new`] and the setters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecArgs {
    /// Program path or name.
    pub path: String,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<Vec<String>>,
    /// Environment (`NAME=value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Data fed to stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_data: Option<Base64Data>,
    /// What to capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_output: Option<GuestExecCaptureOutput>,
}

impl GuestExecArgs {
    /// Runs `path` with no arguments, no input and no capture.
    pub fn new(path: impl Into<String>) -> Self {
        GuestExecArgs {
            path: path.into(),
            arg: None,
            env: None,
            input_data: None,
            capture_output: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.arg.get_or_insert_with(Vec::new).push(arg.into());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.arg
            .get_or_insert_with(Vec::new)
            .extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env
            .get_or_insert_with(Vec::new)
            .push(format!("{name}={value}"));
        self
    }

    /// Feeds `data` to the process's stdin.
    pub fn input(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.input_data = Some(Base64Data(data.into()));
        self
    }

    /// Captures stdout and stderr (the boolean form every agent since 2.5 accepts).
    pub fn capture(mut self) -> Self {
        self.capture_output = Some(GuestExecCaptureOutput::Flag(true));
        self
    }

    /// Selects a capture mode (agents 8.1 and later).
    pub fn capture_mode(mut self, mode: GuestExecCaptureOutputMode) -> Self {
        self.capture_output = Some(GuestExecCaptureOutput::Mode(mode));
        self
    }
}

/// Arguments of `guest-ssh-get-authorized-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSshGetAuthorizedKeysArgs {
    /// Account whose keys to read.
    pub username: String,
}

/// Arguments of `guest-ssh-add-authorized-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSshAddAuthorizedKeysArgs {
    /// Account to change.
    pub username: String,
    /// Keys in `authorized_keys` format.
    pub keys: Vec<String>,
    /// Replace the existing keys instead of appending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
}

/// Arguments of `guest-ssh-remove-authorized-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestSshRemoveAuthorizedKeysArgs {
    /// Account to change.
    pub username: String,
    /// Keys to remove.
    pub keys: Vec<String>,
}
