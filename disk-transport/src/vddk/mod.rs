//! VMware VDDK (`libvixDiskLib.so`), loaded at run time.
//!
//! Nothing is linked at build time: [`VddkTransport::new`] looks for the library in the
//! directory you name (or the usual install locations), `dlopen`s it, calls
//! `VixDiskLib_InitEx` once for the whole process and then serves the crate's traits:
//! [`DiskTransport::connect`] is `ConnectEx`, [`Connection::open`] is `Open`, and a [`Disk`]
//! reads, writes, flushes and maps extents with `Read`/`Write`/`ReadAsync`/`WriteAsync`/`Wait`/
//! `Flush`/`QueryAllocatedBlocks`. `PrepareForAccess` returns an [`AccessGuard`] whose drop
//! calls `EndAccess`, so a failed or panicking backup never leaves Storage vMotion disabled.
//!
//! # VDDK's rules, enforced here
//!
//! - **InitEx once per process.** The first [`VddkTransport`] initialises the library; later
//!   ones share it (asking for a different `libdir` is an error). [`shutdown`] calls
//!   `VixDiskLib_Exit` once nothing uses the library any more; VDDK cannot be initialised again
//!   in the same process afterwards. VDDK's threads do not survive `fork`: a forked child that
//!   uses the library gets an error, not the hang it would otherwise meet.
//! - **Open/Close never interleaved across threads.** `ConnectEx`, `Open`, `Close` and
//!   `Disconnect` run under one process-wide lock.
//! - **One thread at a time per disk handle.** Each [`VddkDisk`] serialises its calls; different
//!   disks run in parallel. Asynchronous requests (`submit_read`/`submit_write`) are queued
//!   with `ReadAsync`/`WriteAsync` and completed on a per-disk thread, and every synchronous call
//!   first `Wait`s for them (VDDK rejects mixing the two).
//! - **Close before Disconnect.** A disk keeps its connection alive; the connection is
//!   disconnected when the last of them is dropped. [`VddkDisk::close`] and
//!   [`VddkConnection::disconnect`] do it now and return VDDK's error, which a drop can only
//!   log; the drop stays as the safety net.
//!
//! # Configuration, checked before InitEx
//!
//! [`VddkOptions`] is the one place for the library directory, the InitEx configuration file
//! and the log hook (the `libdir`/`config_path` of [`ConnectParams`] serve `vddk://` URIs and
//! must agree with them). The configuration file is parsed by [`Config::check_path`](crate::Config::check_path)
//! before anything is loaded: a malformed line or an out-of-range value is an
//! [`Error::Config`] naming the file, line and key, and InitEx does not run; a key neither the
//! VDDK guide nor this crate knows is a warning naming the nearest known key ("did you mean
//! vixDiskLib.nfc.ReadTimeoutMs?") and still reaches VDDK, or an error with
//! [`VddkOptions::strict_config`].
//!
//! # Logging and secrets
//!
//! VDDK's log, warning and panic callbacks are formatted (printf with the `va_list`, truncated at
//! 8 KiB) and sent to [`tracing`] (target `disk_transport::vddk`, levels debug/warn/error) or to
//! the hook set with [`VddkOptions::log_hook`]. Any password, cookie or key of a live connection
//! that appears in a message is replaced by `<redacted>`. Credentials reach VDDK as C strings
//! that are overwritten with zeros when the connection ends.
//!
//! # Diagnostics
//!
//! [`find_library`] says whether and where VDDK is installed without loading it;
//! [`loaded_library`] which one this process uses; [`call_stats`] how often each VDDK function
//! was called and how long it took (like nbdkit's `-D vddk.stats=1`); every call is also a
//! `tracing` event at trace level (target `disk_transport::vddk::calls`).
//!
//! # Timeouts
//!
//! A call into VDDK cannot be interrupted from outside. Give NFC operations timeouts in the
//! InitEx configuration file ([`Config`](crate::Config): `vixDiskLib.nfc.ReadTimeoutMs` and
//! friends, all "no timeout" by default) and pass its path with [`VddkOptions::config_path`].
//!
//! # LD_LIBRARY_PATH
//!
//! VDDK brings its own libssl, libcrypto and more, found through `LD_LIBRARY_PATH`, which glibc
//! reads once at process start. This crate does not re-execute the program (nbdkit does); if
//! loading fails on a missing dependency, start the program with
//! `LD_LIBRARY_PATH=<libdir>/lib64`. Never install VDDK into a system library directory.
//!
//! # Example
//!
//! Loading fails with an error that names every path tried:
//!
//! ```
//! use disk_transport::vddk::{VddkOptions, VddkTransport};
//!
//! let err = VddkTransport::new(&VddkOptions::new().libdir("/nonexistent/vddk")).unwrap_err();
//! assert!(err.to_string().contains("/nonexistent/vddk/lib64/libvixDiskLib.so.9"));
//! ```
//!
//! A backup of a snapshot over NBDSSL (needs a real vCenter):
//!
//! ```no_run
//! use disk_transport::vddk::{VddkOptions, VddkTransport};
//! use disk_transport::{ConnectParams, DiskTransport, OpenFlags, Thumbprint, TransportMode};
//!
//! # fn main() -> disk_transport::Result<()> {
//! let vddk = VddkTransport::new(&VddkOptions::new().libdir("/opt/vmware-vix-disklib-distrib"))?;
//! let params = ConnectParams::builder()
//!     .server("vcenter.example.com")
//!     .thumbprint(Thumbprint::new("AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD")?)
//!     .user_password("backup@vsphere.local", std::env::var("VC_PASSWORD").unwrap_or_default())
//!     .vm("moref=vm-16")
//!     .snapshot("snapshot-47")
//!     .transport_modes([TransportMode::NbdSsl, TransportMode::Nbd])
//!     .build()?;
//! let _access = vddk.prepare_for_access(&params, "my-backup")?; // EndAccess on drop
//! let connection = vddk.connect(&params)?;
//! let disk = connection.open("[datastore1] vm/vm.vmdk", OpenFlags::read_only())?;
//! let info = disk.info()?;
//! for extent in disk.allocated_extents(0, info.capacity)? {
//!     println!("{extent:?}");
//! }
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod ffi;

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::ffi::{
    ConnectSpec, CredSpec, Library, LoadError, RawConnection, RawDisk, Vix, ZeroingCString,
};
use crate::mode::{select_transport, StorageKind, TransportContext, DEFAULT_NETWORK_PRIORITY};
use crate::types::{clip_extents, push_range, AdapterType, DiskInfo, Extent, ExtentKind, Geometry};
use crate::{
    check_range, format_transport_modes, AccessGuard, CleanupStats, ConnectParams, Connection,
    Credentials, Disk, DiskTransport, Error, OpenFlags, ReadCompletion, Result, TransportMode,
    WriteCompletion,
};

/// The library's file name (versioned names `libvixDiskLib.so.N` are preferred).
pub const LIBRARY_NAME: &str = "libvixDiskLib.so";

/// Library versions searched, newest first (the soname number, as nbdkit searches them).
pub const LIBRARY_VERSIONS: [u32; 4] = [9, 8, 7, 6];

/// Where VDDK is usually unpacked or installed, tried in order when no `libdir` is given.
pub const DEFAULT_LIBDIRS: [&str; 4] = [
    "/usr/lib64/vmware-vix-disklib",
    "/usr/lib/vmware-vix-disklib",
    "/opt/vmware-vix-disklib-distrib",
    "/usr/local/vmware-vix-disklib-distrib",
];

/// Largest single VDDK read or write; bigger requests are split. NFC servers fail larger
/// allocations ("Failed to allocate the requested 2097176 bytes"), so stay at 2 MiB.
pub const MAX_IO_BYTES: usize = 2 << 20;

/// Asynchronous requests worth keeping in flight per disk (VDDK ≥ 6.7 overlaps them on NFC).
pub const ASYNC_IN_FLIGHT: usize = 8;

/// Which VDDK callback a message came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// The `log` callback: informational, often verbose.
    Log,
    /// The `warn` callback.
    Warning,
    /// The `panic` callback: VDDK is about to abort.
    Panic,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Log => "log",
            LogLevel::Warning => "warning",
            LogLevel::Panic => "panic",
        })
    }
}

/// Receives VDDK's messages (formatted, trimmed, secrets redacted). Called from VDDK's threads.
pub type LogHook = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// How to find and initialise the library. Only the first successful load in a process uses
/// them (InitEx runs once per process).
///
/// # `VddkOptions` or `ConnectParams`?
///
/// The library and its configuration are chosen once per process, by the options of the first
/// [`VddkTransport`]: these options are the one place for them. [`ConnectParams::libdir`] and
/// [`ConnectParams::config_path`] exist for the `vddk://` URI (`libdir=`, `config=`), where
/// [`VddkTransport::from_params`] turns them into options; on any other connection they are
/// only compared with what the process initialised, and a different one is an error, never
/// silently ignored. Leave them unset when you build a transport from options.
#[derive(Clone, Default)]
pub struct VddkOptions {
    libdir: Option<PathBuf>,
    config_path: Option<PathBuf>,
    config_check: crate::ConfigCheck,
    log_hook: Option<LogHook>,
}

impl VddkOptions {
    /// Options that search [`DEFAULT_LIBDIRS`], pass no configuration file and log to `tracing`.
    pub fn new() -> Self {
        VddkOptions::default()
    }

    /// The directory VDDK was unpacked to (it holds `lib64/libvixDiskLib.so.N`); passed to
    /// InitEx as `libDir`.
    pub fn libdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.libdir = Some(dir.into());
        self
    }

    /// The InitEx configuration file. Build one with [`Config`](crate::Config) and write its
    /// `Display` form (`std::fs::write(path, config.to_string())`); the NFC timeouts belong there.
    ///
    /// The file is checked with [`Config::check_path`](crate::Config::check_path) before
    /// InitEx: a malformed line or an out-of-range value is an [`Error::Config`] naming the
    /// file, line and key, and VDDK is not initialised; a key nobody knows is a warning (to the
    /// [`log_hook`](Self::log_hook), else `tracing`) naming the nearest known key, and still
    /// reaches VDDK unless [`strict_config`](Self::strict_config) is set.
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }

    /// Makes an unknown key in the configuration file an error rather than a warning.
    pub fn strict_config(mut self, strict: bool) -> Self {
        self.config_check = if strict {
            crate::ConfigCheck::Strict
        } else {
            crate::ConfigCheck::Lenient
        };
        self
    }

    /// Sends VDDK's messages to `hook` instead of `tracing`.
    pub fn log_hook(mut self, hook: impl Fn(LogLevel, &str) + Send + Sync + 'static) -> Self {
        self.log_hook = Some(Arc::new(hook));
        self
    }

    /// Options taken from connection parameters (`libdir`, `config_path`).
    pub fn from_params(params: &ConnectParams) -> Self {
        VddkOptions {
            libdir: params.libdir().map(Path::to_path_buf),
            config_path: params.config_path().map(Path::to_path_buf),
            ..VddkOptions::default()
        }
    }
}

impl fmt::Debug for VddkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VddkOptions")
            .field("libdir", &self.libdir)
            .field("config_path", &self.config_path)
            .field("config_check", &self.config_check)
            .field("log_hook", &self.log_hook.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

/// The library in use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LibraryInfo {
    /// The file loaded.
    pub path: PathBuf,
    /// The directory passed to InitEx (canonicalised).
    pub libdir: PathBuf,
    /// The soname number (6, 7, 8, 9), `None` for an unversioned `libvixDiskLib.so`. VDDK does
    /// not report its version otherwise.
    pub version: Option<u32>,
    /// The InitEx configuration file (canonicalised), if one was passed.
    pub config_path: Option<PathBuf>,
}

/// The files tried for `libdir`, in order: `lib64/libvixDiskLib.so.N` and
/// `libvixDiskLib.so.N` for N = 9, 8, 7, 6, then the unversioned names.
pub fn candidate_paths(libdir: &Path) -> Vec<(PathBuf, Option<u32>)> {
    let mut paths = Vec::new();
    let names = LIBRARY_VERSIONS
        .iter()
        .map(|v| (format!("{LIBRARY_NAME}.{v}"), Some(*v)))
        .chain([(LIBRARY_NAME.to_owned(), None)]);
    for (name, version) in names {
        paths.push((libdir.join("lib64").join(&name), version));
        paths.push((libdir.join(&name), version));
    }
    paths
}

/// The library file [`VddkTransport::new`] would load — the first of [`candidate_paths`] that
/// exists, in `libdir` or else the [`DEFAULT_LIBDIRS`] — with its soname number, without
/// loading it. For detection ("is VDDK installed?"); loading can still fail.
pub fn find_library(libdir: Option<&Path>) -> Option<(PathBuf, Option<u32>)> {
    let dirs: Vec<PathBuf> = match libdir {
        Some(dir) => vec![dir.to_path_buf()],
        None => DEFAULT_LIBDIRS.iter().map(PathBuf::from).collect(),
    };
    dirs.iter()
        .flat_map(|d| candidate_paths(d))
        .find(|(path, _)| path.is_file())
}

enum State {
    Unloaded,
    Ready(Arc<Library>, LibraryInfo),
    Exited(LibraryInfo),
}

static STATE: Mutex<State> = Mutex::new(State::Unloaded);
/// The process that ran InitEx (0: none yet).
static INIT_PID: AtomicU32 = AtomicU32::new(0);

/// VDDK starts threads in InitEx and `fork` does not copy them: a child that goes on using the
/// library hangs (RHBZ 1846309). Refuse instead.
fn check_not_forked() -> Result<()> {
    forked_check(INIT_PID.load(Ordering::SeqCst), std::process::id())
}

fn forked_check(init_pid: u32, pid: u32) -> Result<()> {
    if init_pid != 0 && init_pid != pid {
        return Err(Error::InvalidParams(format!(
            "VDDK was initialised in process {init_pid}, and this is process {pid}, forked from it: \
             VDDK's threads do not survive fork, so initialise VDDK after forking"
        )));
    }
    Ok(())
}
/// Replaced by each load attempt until one succeeds; fixed from then on.
static LOG_HOOK: RwLock<Option<LogHook>> = RwLock::new(None);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The library this process initialised, if any.
pub fn loaded_library() -> Option<LibraryInfo> {
    match &*state() {
        State::Ready(_, info) => Some(info.clone()),
        _ => None,
    }
}

/// Calls `VixDiskLib_Exit` and unloads the library, once every transport, connection, disk and
/// access guard is gone. VDDK cannot be initialised again in this process afterwards.
///
/// Returns an error (and changes nothing) while something still uses the library.
pub fn shutdown() -> Result<()> {
    let mut state = state();
    match std::mem::replace(&mut *state, State::Unloaded) {
        State::Ready(lib, info) => match Arc::try_unwrap(lib) {
            Ok(lib) => {
                lib.exit();
                *state = State::Exited(info);
                Ok(())
            }
            Err(lib) => {
                let users = Arc::strong_count(&lib) - 1;
                *state = State::Ready(lib, info);
                Err(Error::InvalidParams(format!(
                    "VDDK is still in use ({users} transports, connections, disks or access \
                     guards); drop them before calling shutdown"
                )))
            }
        },
        other => {
            *state = other;
            Ok(())
        }
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn load(options: &VddkOptions) -> Result<(Arc<Library>, LibraryInfo)> {
    let mut state = state();
    match &*state {
        State::Ready(lib, info) => {
            check_not_forked()?;
            if let Some(config) = &options.config_path {
                if info.config_path.as_deref() != Some(canonical(config).as_path()) {
                    return Err(Error::InvalidParams(format!(
                        "VDDK is already initialised in this process with configuration {} and \
                         InitEx runs once per process; {} cannot be used as well",
                        info.config_path
                            .as_deref()
                            .map_or("(none)".into(), |p| p.display().to_string()),
                        config.display()
                    )));
                }
            }
            if let Some(dir) = &options.libdir {
                if canonical(dir) != info.libdir {
                    return Err(Error::InvalidParams(format!(
                        "VDDK is already initialised in this process from {} and InitEx runs \
                         once per process; libdir {} cannot be used as well",
                        info.path.display(),
                        dir.display()
                    )));
                }
            }
            return Ok((Arc::clone(lib), info.clone()));
        }
        State::Exited(info) => {
            return Err(Error::InvalidParams(format!(
                "VDDK ({}) was shut down in this process and cannot be initialised again",
                info.path.display()
            )));
        }
        State::Unloaded => {}
    }

    // The configuration is checked before anything is loaded: VDDK would read a bad line or
    // value without a word, and a misspelt timeout would silently not apply.
    if let Some(config) = &options.config_path {
        let (_, warnings) = crate::Config::check_path(config, options.config_check)?;
        for warning in warnings {
            let message = format!("InitEx configuration: {warning}");
            match &options.log_hook {
                Some(hook) => hook(LogLevel::Warning, &message),
                None => tracing::warn!(target: "disk_transport::vddk", "{message}"),
            }
        }
    }

    let dirs: Vec<PathBuf> = match &options.libdir {
        Some(dir) => vec![dir.clone()],
        None => DEFAULT_LIBDIRS.iter().map(PathBuf::from).collect(),
    };
    let mut tried = Vec::new();
    let mut found = None;
    'search: for dir in &dirs {
        for (path, version) in candidate_paths(dir) {
            if !path.exists() {
                tried.push(format!("{} (absent)", path.display()));
                continue;
            }
            match Library::load(&path) {
                Ok(lib) => {
                    found = Some((lib, path, version, dir.clone()));
                    break 'search;
                }
                Err(LoadError::Open(why)) => {
                    tried.push(format!("{} (dlopen failed: {why})", path.display()))
                }
                Err(LoadError::MissingSymbol(symbol)) => {
                    return Err(Error::NotFound(format!(
                        "{} is not a usable VDDK: it has no {symbol} (VDDK 6.5 or newer is needed)",
                        path.display()
                    )))
                }
            }
        }
    }
    let Some((lib, path, version, dir)) = found else {
        return Err(Error::NotFound(format!(
            "{LIBRARY_NAME} (VDDK); tried {}. Name the directory VDDK was unpacked to with \
             VddkOptions::libdir or ConnectParams::libdir; if a library VDDK itself needs is \
             missing, start the program with LD_LIBRARY_PATH=<libdir>/lib64",
            tried.join(", ")
        )));
    };

    let libdir = canonical(&dir);
    let libdir_c = path_c_string("libdir", &libdir)?;
    let config_c = options
        .config_path
        .as_deref()
        .map(|config| path_c_string("config_path", config))
        .transpose()?;
    *LOG_HOOK.write().unwrap_or_else(PoisonError::into_inner) = options.log_hook.clone();
    if let Err(e) = lib.init_ex(&libdir_c, config_c.as_deref(), deliver_log) {
        return Err(vix_error(&lib, e.function.to_owned(), e.code));
    }
    warn_about_ld_library_path(&path);
    let info = LibraryInfo {
        path,
        libdir,
        version,
        config_path: options.config_path.as_deref().map(canonical),
    };
    tracing::debug!(target: "disk_transport::vddk", library = %info.path.display(), "VixDiskLib_InitEx done");
    INIT_PID.store(std::process::id(), Ordering::SeqCst);
    let lib = Arc::new(lib);
    *state = State::Ready(Arc::clone(&lib), info.clone());
    Ok((lib, info))
}

fn warn_about_ld_library_path(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let listed = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).any(|p| canonical(&p) == canonical(dir)))
        .unwrap_or(false);
    if !listed {
        tracing::debug!(
            target: "disk_transport::vddk",
            "{} is not in LD_LIBRARY_PATH; VDDK's own dependencies and plugins may fail to load",
            dir.display()
        );
    }
}

fn path_c_string(what: &str, path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidParams(format!("{what} {} contains a NUL byte", path.display())))
}

fn c_string(what: &str, text: &str) -> Result<ZeroingCString> {
    ZeroingCString::new(text)
        .ok_or_else(|| Error::InvalidParams(format!("{what} contains a NUL byte")))
}

fn vix_error(lib: &Library, function: String, code: u64) -> Error {
    Error::Vix {
        function,
        code,
        message: crate::error::strip_vix_code(&lib.error_text(code), code),
    }
}

/// Logs an error a drop cannot return, worded as [`Error::Vix`] is (the code once, a hint).
pub(crate) fn log_library_error(function: &str, code: u64, lib: &Library) {
    tracing::warn!(target: "disk_transport::vddk", "{}", vix_error(lib, function.to_owned(), code));
}

/// Time spent in one VDDK function by this process (like nbdkit's `-D vddk.stats=1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CallStats {
    /// The VDDK function, e.g. `VixDiskLib_Read`.
    pub function: String,
    /// How often it was called.
    pub calls: u64,
    /// Total time inside it (for asynchronous calls: the submission only).
    pub total: Duration,
    /// Bytes it read or wrote.
    pub bytes: u64,
}

static CALLS: Mutex<BTreeMap<&'static str, (u64, Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Calls slower than this are logged as warnings: nothing can interrupt them, but the log then
/// says where a stuck backup waits.
pub const SLOW_CALL: Duration = Duration::from_secs(30);

pub(crate) fn record_call(function: &'static str, elapsed: Duration, bytes: u64) {
    if elapsed >= SLOW_CALL {
        tracing::warn!(
            target: "disk_transport::vddk",
            "{function} took {:.1} s; NFC timeouts (vixDiskLib.nfc.*TimeoutMs in the InitEx \
             configuration file) bound network calls",
            elapsed.as_secs_f64()
        );
    }
    tracing::trace!(
        target: "disk_transport::vddk::calls",
        function,
        elapsed_us = elapsed.as_micros() as u64,
        bytes,
        "VDDK call"
    );
    let mut calls = CALLS.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = calls.entry(function).or_default();
    entry.0 += 1;
    entry.1 += elapsed;
    entry.2 += bytes;
}

/// Calls into VDDK so far, per function, the most time-consuming first. Connect and open cost
/// seconds on real hosts, and `QueryAllocatedBlocks` about one second per call: this shows
/// where a slow backup spends its time.
pub fn call_stats() -> Vec<CallStats> {
    let calls = CALLS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut stats: Vec<CallStats> = calls
        .iter()
        .map(|(function, (calls, total, bytes))| CallStats {
            function: (*function).to_owned(),
            calls: *calls,
            total: *total,
            bytes: *bytes,
        })
        .collect();
    stats.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.function.cmp(&b.function))
    });
    stats
}

// ---------------------------------------------------------------------------------------------
// Messages from VDDK

thread_local! {
    /// Set around probes whose failure is expected, so VDDK's complaints are demoted.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Secrets of live connections, for redaction. Overwritten with zeros when removed.
static SECRETS: Mutex<Vec<(u64, SecretText)>> = Mutex::new(Vec::new());
static NEXT_SECRET: AtomicU64 = AtomicU64::new(1);

struct SecretText(String);

impl Drop for SecretText {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

/// Keeps a connection's secrets registered for redaction while it lives.
struct SecretRegistration(Vec<u64>);

impl SecretRegistration {
    fn new(params: &ConnectParams) -> Self {
        let secrets: Vec<&str> = match params.credentials() {
            Some(Credentials::UserPassword { password, .. }) => vec![password.expose()],
            Some(Credentials::SessionId { cookie, key, .. }) => vec![cookie.expose(), key.expose()],
            None => Vec::new(),
        };
        let mut registry = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
        let ids = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|s| {
                let id = NEXT_SECRET.fetch_add(1, Ordering::Relaxed);
                registry.push((id, SecretText(s.to_owned())));
                id
            })
            .collect();
        SecretRegistration(ids)
    }
}

impl Drop for SecretRegistration {
    fn drop(&mut self) {
        let mut registry = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
        registry.retain(|(id, _)| !self.0.contains(id));
    }
}

impl fmt::Debug for SecretRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRegistration({} secrets)", self.0.len())
    }
}

fn redact(message: &str) -> Cow<'_, str> {
    let registry = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = Cow::Borrowed(message);
    for (_, secret) in registry.iter() {
        if out.contains(secret.0.as_str()) {
            out = Cow::Owned(out.replace(secret.0.as_str(), "<redacted>"));
        }
    }
    out
}

/// VDDK 7's pointless "phone home" complaints, demoted to the log level (as nbdkit does).
fn is_noise(message: &str) -> bool {
    message.contains("Get CEIP status failed") || message.contains("VDDK_PhoneHome:")
}

/// Where the ffi trampolines send every formatted message.
fn deliver_log(level: LogLevel, message: &str) {
    let message = redact(message.trim_end());
    let level = if is_noise(&message) || QUIET.with(Cell::get) {
        LogLevel::Log
    } else {
        level
    };
    let hook = LOG_HOOK
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match hook {
        Some(hook) => hook(level, &message),
        _ => match level {
            LogLevel::Log => tracing::debug!(target: "disk_transport::vddk", "{message}"),
            LogLevel::Warning => tracing::warn!(target: "disk_transport::vddk", "{message}"),
            LogLevel::Panic => {
                tracing::error!(target: "disk_transport::vddk", "VDDK panic: {message}")
            }
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Transport

/// The VDDK backend: a handle to the process's initialised `libvixDiskLib.so`.
///
/// Cheap to clone; all clones (and all transports in the process) share one library.
#[derive(Debug, Clone)]
pub struct VddkTransport {
    lib: Arc<Library>,
    info: LibraryInfo,
    modes_text: String,
    modes: Vec<TransportMode>,
}

impl VddkTransport {
    /// Loads and initialises VDDK (first call in the process) or shares the loaded one.
    ///
    /// Errors: [`Error::NotFound`] naming every path tried; [`Error::Vix`] if InitEx fails;
    /// [`Error::InvalidParams`] if another `libdir` was initialised already.
    pub fn new(options: &VddkOptions) -> Result<Self> {
        let (lib, info) = load(options)?;
        let modes_text = lib.list_transport_modes();
        let modes = modes_text
            .split(':')
            .filter_map(|m| m.parse::<TransportMode>().ok())
            .fold(Vec::new(), |mut v, m| {
                if !v.contains(&m) {
                    v.push(m);
                }
                v
            });
        Ok(VddkTransport {
            lib,
            info,
            modes_text,
            modes,
        })
    }

    /// [`new`](Self::new) with the `libdir` and `config_path` of connection parameters (the
    /// `vddk://` URI path). Build options yourself to set a log hook or strict checking.
    pub fn from_params(params: &ConnectParams) -> Result<Self> {
        Self::new(&VddkOptions::from_params(params))
    }

    /// Which library is in use.
    pub fn library(&self) -> &LibraryInfo {
        &self.info
    }

    /// `VixDiskLib_ListTransportModes` as the library returned it, e.g. `file:san:hotadd:nbdssl:nbd`.
    pub fn transport_modes_text(&self) -> &str {
        &self.modes_text
    }

    /// The transport modes a connection with `params` may use, in the order VDDK will try them,
    /// after the rules of [`select_transport`]: modes the library does not offer, modes that
    /// need a snapshot or a server that is missing, and SAN for writes to local storage are
    /// left out. An error explains why none is left.
    pub fn plan(&self, params: &ConnectParams) -> Result<Vec<TransportMode>> {
        let ctx = TransportContext {
            available: self.modes.clone(),
            remote: params.is_remote(),
            has_snapshot: params.snapshot().is_some(),
            vm_powered_on: None,
            storage: StorageKind::Unknown,
            read_only: params.read_only(),
        };
        let mut rest: Vec<TransportMode> = match params.transport_modes() {
            Some(modes) => modes.to_vec(),
            None if ctx.remote => DEFAULT_NETWORK_PRIORITY.to_vec(),
            None => vec![TransportMode::File],
        };
        let mut viable = Vec::new();
        while !rest.is_empty() {
            match select_transport(Some(&rest), &ctx) {
                Ok(plan) => {
                    viable.push(plan.mode);
                    let next = rest
                        .iter()
                        .position(|m| *m == plan.mode)
                        .map_or(rest.len(), |i| i + 1);
                    rest.drain(..next);
                }
                Err(e) if viable.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(viable)
    }

    /// Connects (`VixDiskLib_ConnectEx`), with the concrete type (see [`DiskTransport::connect`]).
    pub fn connect_vddk(&self, params: &ConnectParams) -> Result<VddkConnection> {
        check_not_forked()?;
        self.check_libdir(params)?;
        let viable = self.plan(params)?;
        // With no list from the caller, VDDK applies its own default order.
        let transports = match params.transport_modes() {
            Some(_) => Some(c_string(
                "the transport list",
                &format_transport_modes(&viable),
            )?),
            None => None,
        };
        let snapshot = params
            .snapshot()
            .map(|s| c_string("the snapshot MoRef", s))
            .transpose()?;
        let spec = connect_spec(params, true)?;
        let secrets = SecretRegistration::new(params);
        let raw = RawConnection::connect(
            &self.lib,
            spec,
            params.read_only(),
            snapshot.as_ref().map(ZeroingCString::as_c_str),
            transports.as_ref().map(ZeroingCString::as_c_str),
        )
        .map_err(|e| vix_error(&self.lib, e.function.to_owned(), e.code))?;
        Ok(VddkConnection {
            shared: Arc::new(ConnectionShared {
                raw: Arc::new(raw),
                _secrets: secrets,
            }),
            lib: Arc::clone(&self.lib),
            library: self.info.clone(),
            read_only: params.read_only(),
            remote: params.is_remote(),
            planned: viable,
        })
    }

    /// A `libdir` or configuration file in `params` that differs from what the process
    /// initialised is an error: it could not take effect (see [`VddkOptions`]).
    fn check_libdir(&self, params: &ConnectParams) -> Result<()> {
        if let Some(dir) = params.libdir() {
            if canonical(dir) != self.info.libdir {
                return Err(Error::InvalidParams(format!(
                    "libdir {} differs from the VDDK this process initialised ({}); InitEx runs \
                     once per process",
                    dir.display(),
                    self.info.libdir.display()
                )));
            }
        }
        if let Some(config) = params.config_path() {
            if self.info.config_path.as_deref() != Some(canonical(config).as_path()) {
                return Err(Error::InvalidParams(format!(
                    "configuration file {} differs from the one VDDK was initialised with ({}); \
                     InitEx runs once per process",
                    config.display(),
                    self.info
                        .config_path
                        .as_deref()
                        .map_or("none".into(), |p| p.display().to_string())
                )));
            }
        }
        Ok(())
    }
}

fn connect_spec(params: &ConnectParams, with_vm: bool) -> Result<ConnectSpec> {
    let opt = |what: &str, v: Option<&str>| v.map(|v| c_string(what, v)).transpose();
    let creds = match params.credentials() {
        None => CredSpec::None,
        Some(Credentials::UserPassword { user, password }) => CredSpec::Uid {
            user: c_string("the user name", user)?,
            password: c_string("the password", password.expose())?,
        },
        Some(Credentials::SessionId { cookie, user, key }) => CredSpec::Session {
            cookie: c_string("the session cookie", cookie.expose())?,
            user: c_string("the user name", user)?,
            key: c_string("the session key", key.expose())?,
        },
    };
    Ok(ConnectSpec {
        vmx_spec: if with_vm {
            opt("the VM (vmxSpec)", params.vm())?
        } else {
            None
        },
        server_name: opt("the server name", params.server())?,
        thumbprint: opt("the thumbprint", params.thumbprint().map(|t| t.as_str()))?,
        creds,
        port: params.port().map_or(0, u32::from),
        nfc_host_port: params.nfc_host_port().map_or(0, u32::from),
    })
}

fn optional_call<T>(
    lib: &Library,
    what: &str,
    result: std::result::Result<T, Option<Vix>>,
) -> Result<T> {
    result.map_err(|e| match e {
        Some(v) => vix_error(lib, v.function.to_owned(), v.code),
        None => Error::Unsupported(format!("{what} (absent from this libvixDiskLib.so)")),
    })
}

impl DiskTransport for VddkTransport {
    fn name(&self) -> &'static str {
        "vddk"
    }

    fn transport_modes(&self) -> Vec<TransportMode> {
        self.modes.clone()
    }

    fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>> {
        Ok(Box::new(self.connect_vddk(params)?))
    }

    fn prepare_for_access(&self, params: &ConnectParams, identity: &str) -> Result<AccessGuard> {
        check_not_forked()?;
        self.check_libdir(params)?;
        if params.vm().is_none() {
            return Err(Error::InvalidParams(
                "PrepareForAccess needs the VM (ConnectParams::vm, e.g. \"moref=vm-16\")".into(),
            ));
        }
        let spec = connect_spec(params, true)?;
        let identity_c = c_string("the identity", identity)?;
        {
            let _secrets = SecretRegistration::new(params);
            let result = self.lib.prepare_for_access(&spec, identity_c.as_c_str());
            optional_call(&self.lib, "VixDiskLib_PrepareForAccess", result)?;
        }
        let lib = Arc::clone(&self.lib);
        let params = params.clone();
        Ok(AccessGuard::new(identity, move |identity| {
            let spec = connect_spec(&params, true)?;
            let identity_c = c_string("the identity", identity)?;
            let _secrets = SecretRegistration::new(&params);
            let result = lib.end_access(&spec, identity_c.as_c_str());
            optional_call(&lib, "VixDiskLib_EndAccess", result)
        }))
    }

    fn cleanup(&self, params: &ConnectParams) -> Result<CleanupStats> {
        check_not_forked()?;
        self.check_libdir(params)?;
        // Cleanup works per host: VDDK wants vmxSpec NULL.
        let spec = connect_spec(params, false)?;
        let _secrets = SecretRegistration::new(params);
        let result = self.lib.cleanup(&spec);
        let (cleaned_up, remaining) = optional_call(&self.lib, "VixDiskLib_Cleanup", result)?;
        Ok(CleanupStats {
            cleaned_up,
            remaining,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Connection

/// What disks share with their connection. Field order matters: Disconnect runs before the
/// secrets stop being redacted.
#[derive(Debug)]
struct ConnectionShared {
    raw: Arc<RawConnection>,
    _secrets: SecretRegistration,
}

/// A `VixDiskLibConnection`. Disconnected when it and every disk opened on it are dropped.
#[derive(Debug)]
pub struct VddkConnection {
    shared: Arc<ConnectionShared>,
    lib: Arc<Library>,
    library: LibraryInfo,
    read_only: bool,
    remote: bool,
    planned: Vec<TransportMode>,
}

impl VddkConnection {
    /// The transport modes this connection was planned with (see [`VddkTransport::plan`]).
    pub fn planned_transports(&self) -> &[TransportMode] {
        &self.planned
    }

    /// Disconnects now (`VixDiskLib_Disconnect`) and returns its error, which a drop can only
    /// log. Every disk opened on the connection must be closed first (VDDK's rule: Close
    /// before Disconnect): while one is open this is an error, and the connection is
    /// disconnected as before, when the last disk is dropped.
    pub fn disconnect(self) -> Result<()> {
        let lib = Arc::clone(&self.lib);
        let shared = Arc::try_unwrap(self.shared).map_err(|shared| {
            Error::InvalidParams(format!(
                "{} disks opened on this connection are still open; close them first (VDDK \
                 closes disks before it disconnects; the connection ends when the last is dropped)",
                Arc::strong_count(&shared) - 1
            ))
        })?;
        let ConnectionShared { raw, _secrets } = shared;
        let mut raw = Arc::try_unwrap(raw).map_err(|_| {
            Error::InvalidParams("a disk opened on this connection is still open".into())
        })?;
        // The secrets stay registered for redaction until Disconnect has returned.
        let result = raw.disconnect();
        drop(_secrets);
        result.map_err(|e| vix_error(&lib, e.function.to_owned(), e.code))
    }

    /// Opens a disk, with the concrete type (see [`Connection::open`]).
    pub fn open_disk(&self, path: &str, flags: OpenFlags) -> Result<VddkDisk> {
        check_not_forked()?;
        let flags = flags.effective(self.read_only);
        let path_c = c_string("the disk path", path)?;
        let mut raw =
            RawDisk::open(&self.shared.raw, path_c.as_c_str(), flags.bits()).map_err(|e| {
                let mut err = vix_error(&self.lib, format!("{}({path:?})", e.function), e.code);
                if self.remote && ffi::vix_error_code(e.code) == ffi::VIX_E_FAIL as u16 {
                    if let Error::Vix { message, .. } = &mut err {
                        message.push_str(
                            "; on a remote connection this often means a wrong thumbprint or an \
                         independent disk: read the VDDK messages logged before it",
                        );
                    }
                }
                err
            })?;
        let transport_mode = raw.transport_mode();
        let vddk7 = self.library.version.is_some_and(|v| v >= 7);
        let raw_info = raw
            .info(vddk7)
            .map_err(|e| vix_error(&self.lib, format!("{}({path:?})", e.function), e.code))?;
        let capacity = raw_info
            .capacity_sectors
            .checked_mul(ffi::SECTOR_SIZE)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{path}: a capacity of {} sectors",
                    raw_info.capacity_sectors
                ))
            })?;
        let can_extents = self.lib.has_query_allocated_blocks()
            && raw_info.capacity_sectors >= ffi::MIN_CHUNK_SIZE
            && {
                // As nbdkit: probe one chunk and fall back to "all data" if the library cannot.
                QUIET.with(|q| q.set(true));
                let ok = raw
                    .query_allocated_blocks(0, ffi::MIN_CHUNK_SIZE, ffi::MIN_CHUNK_SIZE)
                    .is_ok();
                QUIET.with(|q| q.set(false));
                ok
            };
        let (logical, physical) = match raw_info.sector_sizes {
            Some((l, p)) if l >= 512 && p >= 512 => (l, p),
            _ => (512, 512),
        };
        let geometry = |g: ffi::VixDiskLibGeometry| {
            (g != ffi::VixDiskLibGeometry::default()).then_some(Geometry {
                cylinders: g.cylinders,
                heads: g.heads,
                sectors: g.sectors,
            })
        };
        let mut info = DiskInfo::new(capacity);
        info.logical_sector_size = logical;
        info.physical_sector_size = physical;
        info.min_block_size = ffi::SECTOR_SIZE as u32;
        info.preferred_block_size = logical.max(physical).max(4096);
        info.max_request_size = 32 << 20;
        info.bios_geometry = geometry(raw_info.bios_geo);
        info.physical_geometry = geometry(raw_info.phys_geo);
        info.adapter_type =
            AdapterType::from_vddk(u32::try_from(raw_info.adapter_type).unwrap_or(256));
        info.num_links = u32::try_from(raw_info.num_links).unwrap_or(1).max(1);
        info.parent_file_name_hint = raw_info.parent_file_name_hint.filter(|s| !s.is_empty());
        info.uuid = raw_info.uuid.filter(|s| !s.is_empty());
        info.transport_mode = transport_mode.as_deref().and_then(|m| m.parse().ok());
        info.read_only = flags.read_only;
        info.can_extents = can_extents;
        info.can_multi_conn = false;

        let completions = if self.lib.has_async() {
            spawn_completion_thread()
        } else {
            None
        };
        Ok(VddkDisk {
            raw: Mutex::new(raw),
            _connection: Arc::clone(&self.shared),
            lib: Arc::clone(&self.lib),
            path: path.to_owned(),
            transport_text: transport_mode,
            info,
            single_link: flags.single_link,
            completions,
            extent_cache: Mutex::new(None),
        })
    }
}

impl Connection for VddkConnection {
    fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
        Ok(Box::new(self.open_disk(path, flags)?))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Completions run here, never on the thread that called VDDK or on VDDK's own threads, so a
/// completion may use the disk again without deadlocking.
fn spawn_completion_thread() -> Option<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("vddk-completion".into())
        .spawn(move || {
            for job in rx {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .ok()
        .map(|_| tx)
}

// ---------------------------------------------------------------------------------------------
// Disk

/// An open VDDK disk (`VixDiskLibHandle`). Calls on it are serialised; closed on drop (after
/// waiting for asynchronous requests).
pub struct VddkDisk {
    // Declared first so Close runs before the connection may be disconnected.
    raw: Mutex<RawDisk>,
    _connection: Arc<ConnectionShared>,
    lib: Arc<Library>,
    path: String,
    transport_text: Option<String>,
    info: DiskInfo,
    single_link: bool,
    completions: Option<mpsc::Sender<Job>>,
    /// The whole allocation map of a read-only disk, asked for once: each
    /// `QueryAllocatedBlocks` call costs about a second on real hosts whatever its size.
    extent_cache: Mutex<Option<Arc<Vec<Extent>>>>,
}

impl fmt::Debug for VddkDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VddkDisk")
            .field("path", &self.path)
            .field("transport", &self.transport_text)
            .field("capacity", &self.info.capacity)
            .field("read_only", &self.info.read_only)
            .finish_non_exhaustive()
    }
}

const CHUNK_BYTES: u64 = ffi::MIN_CHUNK_SIZE * ffi::SECTOR_SIZE;

impl VddkDisk {
    /// The disk path as opened.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `VixDiskLib_GetTransportMode` exactly as the library reported it.
    pub fn transport_mode_text(&self) -> Option<&str> {
        self.transport_text.as_deref()
    }

    /// Closes the disk now (`VixDiskLib_Wait` for outstanding asynchronous requests, then
    /// `VixDiskLib_Close`) and returns the first error, which a drop can only log. The handle
    /// is closed even when Wait fails. Dropping the disk without calling this still closes it.
    pub fn close(self) -> Result<()> {
        let result = self.lock().close();
        result.map_err(|e| {
            vix_error(
                &self.lib,
                format!("{}({:?})", e.function, self.path),
                e.code,
            )
        })
    }

    fn lock(&self) -> MutexGuard<'_, RawDisk> {
        self.raw.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_io(&self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.info.capacity)?;
        if !offset.is_multiple_of(ffi::SECTOR_SIZE) || !length.is_multiple_of(ffi::SECTOR_SIZE) {
            return Err(Error::Unaligned {
                offset,
                length,
                alignment: ffi::SECTOR_SIZE,
                why: "VDDK reads and writes whole 512-byte sectors",
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.info.read_only {
            return Err(Error::ReadOnly(self.path.clone()));
        }
        Ok(())
    }

    /// Asks `QueryAllocatedBlocks` about `[offset, offset + length)` widened to whole chunks, at
    /// most 32 GiB per call; the unqueryable tail shorter than a chunk is data.
    fn query_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let hole = if self.single_link {
            ExtentKind::Unallocated
        } else {
            ExtentKind::Hole
        };
        let capacity = self.info.capacity;
        let end = offset + length;
        let queryable_end = capacity / CHUNK_BYTES * CHUNK_BYTES;
        let mut pos = offset / CHUNK_BYTES * CHUNK_BYTES;
        let query_end = end
            .div_ceil(CHUNK_BYTES)
            .saturating_mul(CHUNK_BYTES)
            .min(queryable_end);
        let mut extents = Vec::new();
        let mut raw = self.lock();
        while pos < query_end {
            let stop = query_end.min(pos + ffi::MAX_CHUNK_NUMBER * CHUNK_BYTES);
            let (start_sector, sectors) = (pos / ffi::SECTOR_SIZE, (stop - pos) / ffi::SECTOR_SIZE);
            let blocks = raw
                .query_allocated_blocks(start_sector, sectors, ffi::MIN_CHUNK_SIZE)
                .map_err(|e| self.io_error(e, start_sector, sectors))?;
            extents_from_blocks(pos, stop, &blocks, hole, &mut extents);
            pos = stop;
        }
        drop(raw);
        if end > queryable_end {
            push_range(&mut extents, queryable_end, capacity, ExtentKind::Data);
        }
        Ok(extents)
    }

    fn io_error(&self, e: Vix, start: u64, count: u64) -> Error {
        vix_error(
            &self.lib,
            format!(
                "{}({:?}, startSector={start}, numSectors={count})",
                e.function, self.path
            ),
            e.code,
        )
    }

    fn submit(
        &self,
        write: bool,
        offset: u64,
        buf: Vec<u8>,
        done: Box<dyn FnOnce(Result<Vec<u8>>) + Send>,
    ) {
        let checked = if write { self.check_writable() } else { Ok(()) }
            .and_then(|()| self.check_io(offset, buf.len() as u64));
        if let Err(e) = checked {
            return done(Err(e));
        }
        let tx = match &self.completions {
            Some(tx) if !buf.is_empty() && buf.len() <= MAX_IO_BYTES => tx.clone(),
            _ => {
                let mut buf = buf;
                let result = if write {
                    self.write_at(&buf, offset)
                } else {
                    self.read_at(&mut buf, offset)
                };
                return done(result.map(|()| buf));
            }
        };
        let lib = Arc::clone(&self.lib);
        let start = offset / ffi::SECTOR_SIZE;
        let count = buf.len() as u64 / ffi::SECTOR_SIZE;
        let path = self.path.clone();
        let completion: ffi::Completion = Box::new(move |code, buf| {
            let job: Job = Box::new(move || {
                let result = if code == ffi::VIX_OK {
                    Ok(buf)
                } else {
                    let function = if write {
                        "VixDiskLib_WriteAsync"
                    } else {
                        "VixDiskLib_ReadAsync"
                    };
                    Err(vix_error(
                        &lib,
                        format!("{function}({path:?}, startSector={start}, numSectors={count})"),
                        code,
                    ))
                };
                done(result);
            });
            if let Err(mpsc::SendError(job)) = tx.send(job) {
                job();
            }
        });
        let submitted = self.lock().submit(write, start, buf, completion);
        if let Err((e, buf, completion)) = submitted {
            completion(e.code, buf);
        }
    }
}

/// Appends to `out` the extents of the byte range `[start, stop)` given the allocated ranges
/// `blocks` that `VixDiskLib_QueryAllocatedBlocks` returned for it, as (first sector, sector
/// count) pairs: allocated ranges are [`ExtentKind::Data`], the gaps `hole`.
///
/// The library's answer is not trusted: ranges may come unsorted, overlapping, empty, partly or
/// wholly outside the request, or overflow; the result still covers `[start, stop)` exactly,
/// in order, without gaps.
pub fn extents_from_blocks(
    start: u64,
    stop: u64,
    blocks: &[(u64, u64)],
    hole: ExtentKind,
    out: &mut Vec<Extent>,
) {
    if start >= stop {
        return;
    }
    let mut ranges: Vec<(u64, u64)> = blocks
        .iter()
        .filter_map(|&(s, n)| {
            let a = s.checked_mul(ffi::SECTOR_SIZE)?.max(start);
            let b = s.checked_add(n)?.checked_mul(ffi::SECTOR_SIZE)?.min(stop);
            (a < b).then_some((a, b))
        })
        .collect();
    ranges.sort_unstable();
    let mut cursor = start;
    for (a, b) in ranges {
        if a > cursor {
            push_range(out, cursor, a, hole);
            cursor = a;
        }
        if b > cursor {
            push_range(out, cursor, b, ExtentKind::Data);
            cursor = b;
        }
    }
    push_range(out, cursor, stop, hole);
}

/// Splits the buffer `VixDiskLib_GetMetadataKeys` fills: keys separated by NUL, the list ended
/// by an empty key (two NULs) or the end of the buffer. Invalid UTF-8 is replaced.
pub fn parse_metadata_keys(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .take_while(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

impl Disk for VddkDisk {
    fn info(&self) -> Result<DiskInfo> {
        Ok(self.info.clone())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_io(offset, buf.len() as u64)?;
        let mut raw = self.lock();
        let mut sector = offset / ffi::SECTOR_SIZE;
        for chunk in buf.chunks_mut(MAX_IO_BYTES) {
            let count = chunk.len() as u64 / ffi::SECTOR_SIZE;
            raw.read(sector, chunk)
                .map_err(|e| self.io_error(e, sector, count))?;
            sector += count;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_io(offset, buf.len() as u64)?;
        let mut raw = self.lock();
        let mut sector = offset / ffi::SECTOR_SIZE;
        for chunk in buf.chunks(MAX_IO_BYTES) {
            let count = chunk.len() as u64 / ffi::SECTOR_SIZE;
            raw.write(sector, chunk)
                .map_err(|e| self.io_error(e, sector, count))?;
            sector += count;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.lock().flush().map_err(|e| {
            vix_error(
                &self.lib,
                format!("{}({:?})", e.function, self.path),
                e.code,
            )
        })
    }

    /// Allocation from `QueryAllocatedBlocks`, asked in whole 64 KiB chunks and at most
    /// 32 GiB per call. Gaps are holes (or [`ExtentKind::Unallocated`] for single-link opens,
    /// whose parent may hold data); a tail shorter than a chunk cannot be queried and is
    /// reported as data, as VMware's sample does. A read-only disk cannot change, so its whole
    /// map is fetched on the first call and later calls are answered from it (as nbdkit does
    /// since a 1 TB disk took ~500 one-second calls otherwise).
    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.info.capacity)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        if !self.info.can_extents {
            return Ok(vec![Extent {
                offset,
                length,
                kind: ExtentKind::Data,
            }]);
        }
        if self.info.read_only {
            let mut cache = self
                .extent_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let map = match &*cache {
                Some(map) => Arc::clone(map),
                None => {
                    let map = Arc::new(self.query_extents(0, self.info.capacity)?);
                    *cache = Some(Arc::clone(&map));
                    map
                }
            };
            return Ok(clip_extents(&map, offset, length));
        }
        Ok(clip_extents(
            &self.query_extents(offset, length)?,
            offset,
            length,
        ))
    }

    fn metadata_keys(&self) -> Result<Vec<String>> {
        let result = self.lock().metadata_keys();
        optional_call(&self.lib, "VixDiskLib_GetMetadataKeys", result)
            .map(|b| parse_metadata_keys(&b))
    }

    fn read_metadata(&self, key: &str) -> Result<String> {
        let key_c = c_string("the metadata key", key)?;
        let result = self.lock().read_metadata(key_c.as_c_str());
        optional_call(&self.lib, "VixDiskLib_ReadMetadata", result)
    }

    fn write_metadata(&self, key: &str, value: &str) -> Result<()> {
        self.check_writable()?;
        let key_c = c_string("the metadata key", key)?;
        let value_c = c_string("the metadata value", value)?;
        let result = self
            .lock()
            .write_metadata(key_c.as_c_str(), value_c.as_c_str());
        optional_call(&self.lib, "VixDiskLib_WriteMetadata", result)
    }

    fn submit_read(&self, offset: u64, buf: Vec<u8>, done: ReadCompletion) {
        self.submit(false, offset, buf, done);
    }

    fn submit_write(&self, offset: u64, buf: Vec<u8>, done: WriteCompletion) {
        self.submit(true, offset, buf, done);
    }

    fn max_in_flight(&self) -> usize {
        if self.completions.is_some() {
            ASYNC_IN_FLIGHT
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_paths_follow_nbdkits_order() {
        let paths = candidate_paths(Path::new("/opt/vddk"));
        let names: Vec<String> = paths.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(names[0], "/opt/vddk/lib64/libvixDiskLib.so.9");
        assert_eq!(names[1], "/opt/vddk/libvixDiskLib.so.9");
        assert_eq!(names[7], "/opt/vddk/libvixDiskLib.so.6");
        assert_eq!(names[8], "/opt/vddk/lib64/libvixDiskLib.so");
        assert_eq!(names[9], "/opt/vddk/libvixDiskLib.so");
        assert_eq!(paths[2].1, Some(8));
        assert_eq!(paths[9].1, None);
    }

    #[test]
    fn redaction_replaces_registered_secrets_only_while_registered() {
        let params = ConnectParams::builder()
            .server("vc")
            .vm("moref=vm-1")
            .user_password("u", "s3cret-unit-test")
            .build()
            .unwrap();
        let msg = "login u/s3cret-unit-test failed";
        {
            let _reg = SecretRegistration::new(&params);
            assert_eq!(redact(msg), "login u/<redacted> failed");
        }
        assert_eq!(redact(msg), msg);
    }

    #[test]
    fn a_forked_child_is_refused() {
        assert!(forked_check(0, 42).is_ok());
        assert!(forked_check(42, 42).is_ok());
        let err = forked_check(42, 43).unwrap_err().to_string();
        assert!(
            err.contains("forked") && err.contains("after forking"),
            "{err}"
        );
    }

    #[test]
    fn phone_home_noise_is_recognised() {
        assert!(is_noise("[NFC ERROR] Get CEIP status failed"));
        assert!(is_noise("VDDK_PhoneHome: cannot reach server"));
        assert!(!is_noise("Open failed"));
    }

    #[test]
    fn blocks_become_extents() {
        let mut out = Vec::new();
        // Unsorted, overlapping, partly outside, empty and overflowing ranges.
        let blocks = [
            (256, 128),
            (0, 128),
            (64, 128),
            (1000, 0),
            (u64::MAX, 2),
            (500, 10_000),
        ];
        extents_from_blocks(0, 512 * 512, &blocks, ExtentKind::Hole, &mut out);
        let ext = |offset, length, kind| Extent {
            offset,
            length,
            kind,
        };
        assert_eq!(
            out,
            vec![
                ext(0, 192 * 512, ExtentKind::Data),
                ext(192 * 512, 64 * 512, ExtentKind::Hole),
                ext(256 * 512, 128 * 512, ExtentKind::Data),
                ext(384 * 512, 116 * 512, ExtentKind::Hole),
                ext(500 * 512, 12 * 512, ExtentKind::Data),
            ]
        );
        assert_eq!(
            parse_metadata_keys(b"uuid\0adapterType\0\0junk"),
            ["uuid", "adapterType"]
        );
        assert!(parse_metadata_keys(b"").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn extents_cover_the_range_and_match_the_blocks(
            start in 0u64..64,
            len in 1u64..64,
            blocks in proptest::collection::vec((0u64..160, 0u64..40), 0..12),
            wild in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY), 0..3),
        ) {
            let (start_b, stop_b) = (start * 512, (start + len) * 512);
            let mut all = blocks.clone();
            all.extend(wild.iter().copied().filter(|(s, n)| s.checked_add(*n).and_then(|e| e.checked_mul(512)).is_none()));
            let mut out = Vec::new();
            extents_from_blocks(start_b, stop_b, &all, ExtentKind::Hole, &mut out);
            // Contiguous cover of exactly the range, no empty extents, neighbours differ.
            proptest::prop_assert_eq!(out.first().map(|e| e.offset), Some(start_b));
            proptest::prop_assert_eq!(out.last().map(|e| e.end()), Some(stop_b));
            for pair in out.windows(2) {
                proptest::prop_assert_eq!(pair[0].end(), pair[1].offset);
                proptest::prop_assert_ne!(pair[0].kind, pair[1].kind);
            }
            // Every sector is data exactly when some block covers it.
            for sector in start..start + len {
                let covered = blocks.iter().any(|&(s, n)| sector >= s && sector < s + n);
                let kind = out.iter().find(|e| e.offset <= sector * 512 && sector * 512 < e.end()).map(|e| e.kind);
                proptest::prop_assert_eq!(kind, Some(if covered { ExtentKind::Data } else { ExtentKind::Hole }));
            }
        }

        #[test]
        fn metadata_key_lists_round_trip(
            keys in proptest::collection::vec("[a-zA-Z0-9._]{1,12}", 0..6),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
        ) {
            let mut buf = Vec::new();
            for k in &keys {
                buf.extend_from_slice(k.as_bytes());
                buf.push(0);
            }
            buf.push(0);
            buf.extend_from_slice(&tail);
            proptest::prop_assert_eq!(parse_metadata_keys(&buf), keys);
        }

        #[test]
        fn any_metadata_buffer_parses(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let keys = parse_metadata_keys(&buf);
            proptest::prop_assert!(keys.iter().all(|k| !k.is_empty() && !k.contains('\0')));
        }
    }

    #[test]
    fn options_debug_hides_the_hook() {
        let o = VddkOptions::new().libdir("/x").log_hook(|_, _| {});
        let text = format!("{o:?}");
        assert!(text.contains("<fn>") && text.contains("/x"), "{text}");
    }
}
