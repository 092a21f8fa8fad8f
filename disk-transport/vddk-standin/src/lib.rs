//! A stand-in `libvixDiskLib.so` for integration tests of programs that use VDDK — through
//! `disk-transport`'s VDDK backend, nbdkit's vddk plugin or any other loader — without VMware's
//! library or a vCenter, the way nbdkit tests its VDDK plugin with `tests/dummy-vddk.c`.
//!
//! It exports the VDDK functions those loaders use, through the very function-pointer types
//! `disk_transport::vddk::ffi` calls them with (so signatures cannot drift), plus
//! `VixDiskLib_Create`, which nbdkit's vddk plugin also requires. It keeps disks in memory or in
//! files, checks how it is called (VDDK's threading and ordering rules) and reports what it saw.
//!
//! # Building it and pointing `libdir` at it
//!
//! The stand-in is not published on crates.io (`publish = false`): it is a `cdylib` that only
//! makes sense next to a checkout of this repository's `disk-transport`, whose ABI declarations
//! it compiles against, and `cargo install` cannot install a library. Build it from the
//! repository and lay it out like an unpacked VDDK:
//!
//! ```text
//! cargo build --release -p vddk-standin        # target/release/libvixDiskLib.so
//! mkdir -p /tmp/vddk/lib64
//! cp target/release/libvixDiskLib.so /tmp/vddk/lib64/libvixDiskLib.so.8
//! ```
//!
//! Then `VddkOptions::new().libdir("/tmp/vddk")` (or `vddk:///disk?libdir=/tmp/vddk`, or
//! nbdkit's `libdir=/tmp/vddk`) loads it as VDDK 8. No `LD_LIBRARY_PATH` is needed: the
//! stand-in depends on nothing beyond libc.
//!
//! # Disks
//!
//! The path given to `VixDiskLib_Open` names a disk and may carry options after a `?`:
//! `name?size=1048576&phys=4096&seed=/srv/golden.img&fail_open=4&fail_read=8:16007&fail_write=8:11&fail_flush=1&fail_query=6&async_delay_us=2000`.
//!
//! - **In memory** (the default): a disk is created on first open, `size` bytes (default
//!   1 MiB), or a copy of the file `seed=PATH` (its size unless `size=` is larger), and keeps
//!   its contents, 64 KiB allocation map and metadata for the life of the process.
//! - **Local files** (`standin.fileDisks = 1`): a disk opened on a local connection (no server)
//!   is the file its path names, as a local VMDK is for VDDK: the path must be absolute (else
//!   `VIX_E_INVALID_ARG`), the file exist (else `VIX_E_FILE_NOT_FOUND`) and hold whole sectors.
//! - **Remote disks in a datastore directory** (`standin.datastoreDir = DIR`): a disk opened on
//!   a remote connection, `[datastore1] vm/vm.vmdk`, is the file `DIR/datastore1/vm/vm.vmdk`
//!   (a raw image; `..` and other names are refused). Seed it by copying an image there.
//!
//! File-backed disks persist across processes: reads and writes go to the file, Flush
//! `fdatasync`s it, and QueryAllocatedBlocks reports the 64 KiB chunks in which the file system
//! has data (`SEEK_DATA`/`SEEK_HOLE`). Nothing is cached in the process, so several processes
//! loading the stand-in (your program and nbdkit, say) see the same bytes and extents.
//! `size=` and `seed=` are refused for them. `VixDiskLib_Create` makes a sparse file (or an
//! in-memory disk) of the requested capacity; an existing one is `VIX_E_FILE_ALREADY_EXISTS`.
//!
//! # Failure switches
//!
//! Each makes one step fail with the VDDK error code you choose, so your error paths run
//! against the same library calls as in production:
//!
//! | step | switch | error |
//! |---|---|---|
//! | login | `standin.password = PW` in the configuration | a remote ConnectEx with another password: `VIX_E_AUTHENTICATION_FAIL` (35) |
//! | login | `standin.failConnectEx = CODE` | every ConnectEx: `CODE` |
//! | prepare | `standin.failPrepareForAccess = CODE`, or an identity starting with `fail:` | PrepareForAccess: `CODE` (`VIX_E_FAIL` for `fail:`) |
//! | cleanup | `standin.failCleanup = CODE` | Cleanup: `CODE` |
//! | open | disk option `fail_open=CODE` | Open of that disk: `CODE` |
//! | read | disk option `fail_read=SECTOR:CODE` | any read covering the sector, sync or async: `CODE` |
//! | write | disk option `fail_write=SECTOR:CODE` | any write covering the sector: `CODE` |
//! | flush, extents | `fail_flush=CODE`, `fail_query=CODE` | Flush, QueryAllocatedBlocks: `CODE` |
//! | InitEx | `standin.failInitEx = CODE` | InitEx: `CODE` |
//!
//! `async_delay_us=N` completes asynchronous requests on a thread after that delay (otherwise
//! they complete inside the call, as VDDK does for local files).
//!
//! # Configuration (the InitEx configuration file)
//!
//! Besides the switches above: `standin.statsFile = PATH` — after every call, write a JSON
//! snapshot of the counters there (calls, rule violations, disks, PrepareForAccess/EndAccess
//! per identity, ConnectEx parameters without the password); `standin.logPassword = 1` —
//! ConnectEx logs the password (so tests can check that the caller redacts it);
//! `standin.transportModes = LIST`; `standin.delayUs = N` — sleep inside Open/Close and I/O
//! calls to widen the window in which overlapping calls (which VDDK forbids) are detected;
//! `standin.logLongMessage = 1` — InitEx logs a 10 000-character message (to test a loader's
//! message truncation; off by default, so the log stays quiet). Keys starting with `standin.`
//! are known to `disk_transport::Config::check`, so they draw no unknown-key warning.
//!
//! # The minimal variant
//!
//! Built with `VDDK_STANDIN_MINIMAL=1` (see `build.rs`), it exports only what VDDK 6.5 has, so
//! the loader's fallbacks for absent functions can be tested.
//!
//! # Rule checks
//!
//! Each violation of VDDK's rules is counted under `violations` in the stats: InitEx twice,
//! overlapping Open/Close/ConnectEx/Disconnect/Create, concurrent calls on one handle, synchronous
//! Read/Write/Flush/metadata calls while asynchronous requests are outstanding (GetInfo and
//! QueryAllocatedBlocks are allowed then: nbdkit's vddk plugin makes them between ReadAsync
//! calls without a Wait, against real VDDK), Disconnect with open disks, Close with
//! outstanding requests, unknown handles, Exit with open handles, a non-NULL locale.
#![allow(non_snake_case)]
// The minimal build (`VDDK_STANDIN_MINIMAL=1`, see build.rs) leaves out the exports that use some helpers and fields.
#![cfg_attr(standin_minimal, allow(dead_code, unused_imports))]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_ulong, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use disk_transport::vddk::ffi::*;
use serde_json::{json, Value};

mod ffi;
mod store;

use store::{Store, CHUNK};

/// `VIX_E_FILE_ERROR`: an I/O error on a file-backed disk.
pub const VIX_E_FILE_ERROR: VixError = 7;
/// `VIX_E_FILE_ALREADY_EXISTS`: `VixDiskLib_Create` of a disk that exists.
pub const VIX_E_FILE_ALREADY_EXISTS: VixError = 12;
/// `VIX_E_FILE_ACCESS_ERROR`: a file-backed disk that cannot be opened.
pub const VIX_E_FILE_ACCESS_ERROR: VixError = 13;

extern "C" {
    /// From shim.c: calls `func(fmt, va_list of the remaining arguments)`.
    fn standin_log(func: Option<LogFn>, fmt: *const c_char, ...);
    /// From shim.c: `sizeof(VixDiskLibConnectParams)` as gcc lays it out.
    fn standin_connect_params_size() -> usize;
}

#[derive(Debug, Clone, Default)]
struct Faults {
    /// `seed=PATH`: the file an in-memory disk's first contents are copied from.
    seed: Option<String>,
    open: Option<u64>,
    read: Option<(u64, u64)>,
    write: Option<(u64, u64)>,
    flush: Option<u64>,
    query: Option<u64>,
    async_delay_us: u64,
}

#[derive(Debug, Default)]
struct DiskData {
    store: Store,
    metadata: BTreeMap<String, String>,
    physical_sector: u32,
    counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
struct Conn {
    read_only: bool,
    remote: bool,
    transports: Option<String>,
    open_handles: usize,
}

#[derive(Debug)]
struct Handle {
    conn: usize,
    disk: String,
    read_only: bool,
    faults: Faults,
    busy: Arc<AtomicBool>,
    outstanding: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    mode: &'static CStr,
}

#[derive(Debug, Default)]
struct Global {
    config: BTreeMap<String, String>,
    log: Option<LogFn>,
    warn: Option<LogFn>,
    initialised: bool,
    libdir: Option<String>,
    calls: BTreeMap<&'static str, u64>,
    violations: BTreeMap<&'static str, u64>,
    disks: HashMap<String, DiskData>,
    conns: HashMap<usize, Conn>,
    handles: HashMap<usize, Handle>,
    next_id: usize,
    access: BTreeMap<String, (u64, u64)>,
    connects: BTreeMap<String, Value>,
    live: BTreeMap<&'static str, i64>,
}

static STATE: LazyLock<Mutex<Global>> = LazyLock::new(|| {
    Mutex::new(Global {
        next_id: 0x1000,
        ..Global::default()
    })
});
static OPEN_CLOSE_ACTIVE: AtomicUsize = AtomicUsize::new(0);
static DELAY_US: AtomicUsize = AtomicUsize::new(0);

fn state() -> MutexGuard<'static, Global> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskData {
    /// A disk over `store` with the metadata VDDK reports for a fresh lsilogic disk.
    fn new(store: Store, physical_sector: u32) -> DiskData {
        let sectors = store.size() / 512;
        DiskData {
            store,
            metadata: BTreeMap::from([
                ("adapterType".to_owned(), "lsilogic".to_owned()),
                (
                    "geometry.cylinders".to_owned(),
                    (sectors / (255 * 63)).to_string(),
                ),
                (
                    "uuid".to_owned(),
                    "60 00 c2 9b 7d 2e 5e 4b-a1 c0 0f 3e 9d 7a 11 22".to_owned(),
                ),
            ]),
            physical_sector,
            counters: BTreeMap::new(),
        }
    }
}

impl Global {
    /// Whether local disks are files (`standin.fileDisks = 1` in the InitEx configuration).
    fn file_disks(&self) -> bool {
        self.config
            .get("standin.filedisks")
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    }

    /// Where remote disks live as files (`standin.datastoreDir = DIR`), if anywhere.
    fn datastore_dir(&self) -> Option<std::path::PathBuf> {
        self.config
            .get("standin.datastoredir")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// The VixError a config switch `standin.<key> = CODE` asks a call to fail with.
    fn fail_code(&self, key: &str) -> Option<VixError> {
        self.config.get(key).and_then(|c| c.parse().ok())
    }

    fn call(&mut self, name: &'static str) {
        *self.calls.entry(name).or_default() += 1;
    }

    fn violation(&mut self, what: &'static str) {
        *self.violations.entry(what).or_default() += 1;
    }

    fn live(&mut self, what: &'static str, delta: i64) {
        *self.live.entry(what).or_default() += delta;
    }

    fn disk_count(&mut self, disk: &str, what: &'static str) {
        if let Some(d) = self.disks.get_mut(disk) {
            *d.counters.entry(what).or_default() += 1;
        }
    }

    fn new_id(&mut self) -> usize {
        self.next_id += 16;
        self.next_id
    }

    /// Writes the stats file, if configured (the caller holds the lock, so writers never race).
    fn publish(&self) {
        let Some(path) = self.config.get("standin.statsfile") else {
            return;
        };
        let disks: BTreeMap<&String, Value> = self
            .disks
            .iter()
            .map(|(name, d)| {
                let mut v = json!(d.counters);
                v["size"] = json!(d.store.size());
                v["allocated_chunks"] = json!(d
                    .store
                    .allocated_chunks(0, d.store.size().div_ceil(CHUNK))
                    .map_or(0, |c| c.len()));
                v["file"] = json!(d.store.path());
                (name, v)
            })
            .collect();
        let access: BTreeMap<&String, Value> = self
            .access
            .iter()
            .map(|(id, (p, e))| (id, json!({"prepared": p, "ended": e})))
            .collect();
        let stats = json!({
            "initialised": self.initialised,
            "libdir": self.libdir,
            "calls": self.calls,
            "violations": self.violations,
            "disks": disks,
            "access": access,
            "connects": self.connects,
            "live": self.live,
            "open_connections": self.conns.len(),
            "open_handles": self.handles.len(),
        });
        let tmp = format!("{path}.tmp");
        if std::fs::write(&tmp, stats.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Runs `f` on the state and publishes the stats afterwards.
fn with_state<R>(f: impl FnOnce(&mut Global) -> R) -> R {
    let mut g = state();
    let r = f(&mut g);
    g.publish();
    r
}

fn delay() {
    let us = DELAY_US.load(Ordering::Relaxed);
    if us > 0 {
        std::thread::sleep(Duration::from_micros(us as u64));
    }
}

/// Marks an Open/Close/ConnectEx/Disconnect in progress; overlapping ones are violations.
struct OpenCloseSection;

impl OpenCloseSection {
    fn enter() -> Self {
        if OPEN_CLOSE_ACTIVE.fetch_add(1, Ordering::SeqCst) > 0 {
            with_state(|g| g.violation("open_close_overlap"));
        }
        delay();
        OpenCloseSection
    }
}

impl Drop for OpenCloseSection {
    fn drop(&mut self) {
        OPEN_CLOSE_ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks a call on a handle in progress; concurrent calls on one handle are violations.
struct HandleSection(Arc<AtomicBool>);

impl Drop for HandleSection {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn enter_handle(
    h: VixDiskLibHandle,
    name: &'static str,
    sync_io: bool,
) -> Result<HandleSection, VixError> {
    let busy = with_state(|g| {
        g.call(name);
        let Some(handle) = g.handles.get(&(h as usize)) else {
            g.violation("bad_handle");
            return Err(VIX_E_INVALID_HANDLE);
        };
        let (busy, outstanding) = (
            Arc::clone(&handle.busy),
            handle.outstanding.load(Ordering::SeqCst),
        );
        if sync_io && outstanding > 0 {
            g.violation("mixed_mode");
            return Err(VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED);
        }
        Ok(busy)
    })?;
    if busy.swap(true, Ordering::SeqCst) {
        with_state(|g| g.violation("handle_concurrency"));
    }
    delay();
    Ok(HandleSection(busy))
}

/// # Safety
/// `p` must be NULL or a NUL-terminated string.
unsafe fn text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: per the contract.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

fn parse_config(path: &str) -> std::io::Result<BTreeMap<String, String>> {
    let body = std::fs::read_to_string(path)?;
    Ok(body
        .lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let (k, v) = line.split_once('=')?;
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect())
}

/// The file under `dir` that the remote disk `[datastore] folder/disk.vmdk` is:
/// `dir/datastore/folder/disk.vmdk`. Anything else, and any `..`, is refused.
fn datastore_file(dir: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    let (datastore, rest) = name
        .strip_prefix('[')
        .and_then(|n| n.split_once("] "))
        .ok_or_else(|| {
            format!("remote disk {name:?} is not named \"[datastore] folder/disk.vmdk\"")
        })?;
    let relative = std::path::Path::new(datastore).join(rest.trim_start_matches('/'));
    let escapes = relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if datastore.is_empty() || rest.is_empty() || escapes {
        return Err(format!(
            "remote disk {name:?} does not name a file inside the datastore directory"
        ));
    }
    Ok(dir.join(relative))
}

/// The size of an in-memory disk opened without `size=`.
const DEFAULT_SIZE: u64 = 1 << 20;

/// Splits `name?options` into the name, the `size=` (if given), the physical sector size and
/// the faults to inject.
fn parse_disk_spec(path: &str) -> (String, Option<u64>, u32, Faults) {
    let (name, query) = path.split_once('?').unwrap_or((path, ""));
    let mut size = None;
    let mut phys = 512;
    let mut faults = Faults::default();
    let at = |v: &str| -> Option<(u64, u64)> {
        let (s, c) = v.split_once(':')?;
        Some((s.parse().ok()?, c.parse().ok()?))
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "size" => size = v.parse().ok().or(size),
            "phys" => phys = v.parse().unwrap_or(phys),
            "seed" => faults.seed = Some(v.to_owned()),
            "fail_open" => faults.open = v.parse().ok(),
            "fail_read" => faults.read = at(v),
            "fail_write" => faults.write = at(v),
            "fail_flush" => faults.flush = v.parse().ok(),
            "fail_query" => faults.query = v.parse().ok(),
            "async_delay_us" => faults.async_delay_us = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    (name.to_owned(), size, phys, faults)
}

fn error_name(code: u16) -> &'static str {
    match u64::from(code) {
        VIX_OK => "The operation was successful",
        VIX_E_FAIL => "Unknown error",
        VIX_E_OUT_OF_MEMORY => "Memory allocation failed",
        VIX_E_INVALID_ARG => "One of the parameters was invalid",
        VIX_E_FILE_NOT_FOUND => "A file was not found",
        VIX_E_NOT_SUPPORTED => "The operation is not supported",
        VIX_E_FILE_READ_ONLY => "The file is write-protected",
        VIX_E_BUFFER_TOOSMALL => "The buffer is too small",
        VIX_E_AUTHENTICATION_FAIL => "Authentication failed",
        VIX_E_INVALID_HANDLE => "The handle is not a valid VIX object",
        VIX_E_DISK_OUTOFRANGE => "The sector is beyond the end of the disk",
        VIX_E_DISK_KEY_NOTFOUND => "The metadata key was not found",
        VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED => {
            "Mixing synchronous and asynchronous I/O is not supported"
        }
        _ => "Error",
    }
}

static TRANSPORT_MODES: OnceLock<CString> = OnceLock::new();

fn static_mode(name: &str) -> &'static CStr {
    match name {
        "file" => c"file",
        "san" => c"san",
        "hotadd" => c"hotadd",
        "nbd" => c"nbd",
        _ => c"nbdssl",
    }
}

// Every export is checked against the type the loader calls it through.
const _: InitExFn = VixDiskLib_InitEx;
const _: ExitFn = VixDiskLib_Exit;
const _: ListTransportModesFn = VixDiskLib_ListTransportModes;
const _: GetErrorTextFn = VixDiskLib_GetErrorText;
const _: FreeErrorTextFn = VixDiskLib_FreeErrorText;
#[cfg(not(standin_minimal))]
const _: AllocateConnectParamsFn = VixDiskLib_AllocateConnectParams;
const _: FreeConnectParamsFn = VixDiskLib_FreeConnectParams;
const _: ConnectExFn = VixDiskLib_ConnectEx;
const _: DisconnectFn = VixDiskLib_Disconnect;
const _: OpenFn = VixDiskLib_Open;
const _: CloseFn = VixDiskLib_Close;
const _: GetTransportModeFn = VixDiskLib_GetTransportMode;
const _: GetInfoFn = VixDiskLib_GetInfo;
const _: FreeInfoFn = VixDiskLib_FreeInfo;
const _: ReadFn = VixDiskLib_Read;
const _: WriteFn = VixDiskLib_Write;
#[cfg(not(standin_minimal))]
const _: ReadAsyncFn = VixDiskLib_ReadAsync;
#[cfg(not(standin_minimal))]
const _: WriteAsyncFn = VixDiskLib_WriteAsync;
#[cfg(not(standin_minimal))]
const _: WaitFn = VixDiskLib_Wait;
const _: FlushFn = VixDiskLib_Flush;
#[cfg(not(standin_minimal))]
const _: QueryAllocatedBlocksFn = VixDiskLib_QueryAllocatedBlocks;
#[cfg(not(standin_minimal))]
const _: FreeBlockListFn = VixDiskLib_FreeBlockList;
#[cfg(not(standin_minimal))]
const _: PrepareForAccessFn = VixDiskLib_PrepareForAccess;
#[cfg(not(standin_minimal))]
const _: EndAccessFn = VixDiskLib_EndAccess;
#[cfg(not(standin_minimal))]
const _: CleanupFn = VixDiskLib_Cleanup;
#[cfg(not(standin_minimal))]
const _: GetMetadataKeysFn = VixDiskLib_GetMetadataKeys;
#[cfg(not(standin_minimal))]
const _: ReadMetadataFn = VixDiskLib_ReadMetadata;
#[cfg(not(standin_minimal))]
const _: WriteMetadataFn = VixDiskLib_WriteMetadata;

/// `VixDiskLib_InitEx`.
///
/// # Safety
/// `lib_dir` and `config_file` must be NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_InitEx(
    major: u32,
    minor: u32,
    log: Option<LogFn>,
    warn: Option<LogFn>,
    _panic: Option<LogFn>,
    lib_dir: *const c_char,
    config_file: *const c_char,
) -> VixError {
    // SAFETY: per the contract.
    let (libdir, config_path) = unsafe { (text(lib_dir), text(config_file)) };
    let config = match config_path.as_deref().map(parse_config).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(_) => return VIX_E_FILE_NOT_FOUND,
    };
    // SAFETY: a plain C function without arguments.
    let c_size = unsafe { standin_connect_params_size() };
    let result = with_state(|g| {
        g.call("VixDiskLib_InitEx");
        if g.initialised {
            g.violation("init_twice");
        }
        if let Some(code) = config
            .get("standin.failinitex")
            .and_then(|c| c.parse().ok())
        {
            return code;
        }
        if c_size != std::mem::size_of::<VixDiskLibConnectParams>() {
            return VIX_E_FAIL;
        }
        DELAY_US.store(
            config
                .get("standin.delayus")
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
            Ordering::Relaxed,
        );
        g.config = config;
        g.log = log;
        g.warn = warn;
        g.libdir = libdir.clone();
        g.initialised = true;
        VIX_OK
    });
    let long_message = state()
        .config
        .get("standin.loglongmessage")
        .is_some_and(|v| v == "1");
    if result == VIX_OK {
        let dir = CString::new(libdir.unwrap_or_default()).unwrap_or_default();
        let long = CString::new("x".repeat(10_000)).unwrap_or_default();
        // SAFETY: the format's conversions match the arguments' C types (%u u32, %s NUL-terminated
        // strings, %lu unsigned long); the callback is the caller's log function or NULL.
        unsafe {
            standin_log(
                log,
                c"VixDiskLib: stand-in initialised (API %u.%u), libDir %s, connect params %lu bytes\n".as_ptr(),
                major,
                minor,
                dir.as_ptr(),
                std::mem::size_of::<VixDiskLibConnectParams>() as c_ulong,
            );
            if long_message {
                standin_log(log, c"long message: %s".as_ptr(), long.as_ptr());
            }
        }
    }
    result
}

/// `VixDiskLib_Exit`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Exit() {
    with_state(|g| {
        g.call("VixDiskLib_Exit");
        if !g.handles.is_empty() || !g.conns.is_empty() {
            g.violation("exit_with_open_handles");
        }
        g.initialised = false;
        g.log = None;
        g.warn = None;
    });
}

/// `VixDiskLib_ListTransportModes`.
#[no_mangle]
pub extern "C" fn VixDiskLib_ListTransportModes() -> *const c_char {
    let modes = with_state(|g| {
        g.call("VixDiskLib_ListTransportModes");
        g.config
            .get("standin.transportmodes")
            .cloned()
            .unwrap_or_else(|| "file:san:hotadd:nbdssl:nbd".to_owned())
    });
    TRANSPORT_MODES
        .get_or_init(|| CString::new(modes).unwrap_or_default())
        .as_ptr()
}

/// `VixDiskLib_GetErrorText`.
#[no_mangle]
pub extern "C" fn VixDiskLib_GetErrorText(err: VixError, locale: *const c_char) -> *mut c_char {
    with_state(|g| {
        g.call("VixDiskLib_GetErrorText");
        if !locale.is_null() {
            g.violation("locale_not_null");
        }
        g.live("error_texts", 1);
    });
    let code = vix_error_code(err);
    let message = format!("stand-in: {} (VixError {code})", error_name(code));
    CString::new(message).unwrap_or_default().into_raw()
}

/// `VixDiskLib_FreeErrorText`.
///
/// # Safety
/// `text` must be NULL or come from `VixDiskLib_GetErrorText`, and be freed once.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeErrorText(text: *mut c_char) {
    if text.is_null() {
        return;
    }
    // SAFETY: made by CString::into_raw in GetErrorText, freed once per the contract.
    drop(unsafe { CString::from_raw(text) });
    with_state(|g| {
        g.call("VixDiskLib_FreeErrorText");
        g.live("error_texts", -1);
    });
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_AllocateConnectParams`.
#[no_mangle]
pub extern "C" fn VixDiskLib_AllocateConnectParams() -> *mut VixDiskLibConnectParams {
    with_state(|g| {
        g.call("VixDiskLib_AllocateConnectParams");
        g.live("connect_params", 1);
    });
    Box::into_raw(Box::new(VixDiskLibConnectParams::zeroed()))
}

/// `VixDiskLib_FreeConnectParams`.
///
/// # Safety
/// `params` must be NULL or come from `VixDiskLib_AllocateConnectParams`, and be freed once.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeConnectParams(params: *mut VixDiskLibConnectParams) {
    if params.is_null() {
        return;
    }
    // SAFETY: made by Box::into_raw in AllocateConnectParams, freed once per the contract.
    drop(unsafe { Box::from_raw(params) });
    with_state(|g| {
        g.call("VixDiskLib_FreeConnectParams");
        g.live("connect_params", -1);
    });
}

/// What the stand-in reads from connection parameters.
struct Params {
    vmx_spec: Option<String>,
    server: Option<String>,
    thumbprint: Option<String>,
    cred_type: i32,
    user: Option<String>,
    password: Option<String>,
    cookie: Option<String>,
    port: u32,
    nfc_host_port: u32,
}

/// # Safety
/// `p` must be NULL or point to connection parameters whose strings are NUL-terminated.
unsafe fn read_params(p: *const VixDiskLibConnectParams) -> Option<Params> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and valid per the contract; the union member read is the one `cred_type`
    // selects.
    unsafe {
        let p = &*p;
        let (user, password, cookie) = match p.cred_type {
            CRED_UID => (
                text(p.creds.uid.user_name),
                text(p.creds.uid.password),
                None,
            ),
            CRED_SESSIONID => (
                text(p.creds.session_id.user_name),
                text(p.creds.session_id.key),
                text(p.creds.session_id.cookie),
            ),
            _ => (None, None, None),
        };
        Some(Params {
            vmx_spec: text(p.vmx_spec),
            server: text(p.server_name),
            thumbprint: text(p.thumb_print),
            cred_type: p.cred_type,
            user,
            password,
            cookie,
            port: p.port,
            nfc_host_port: p.nfc_host_port,
        })
    }
}

/// `VixDiskLib_ConnectEx`.
///
/// # Safety
/// Pointers must be NULL or valid as VDDK documents them.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ConnectEx(
    params: *const VixDiskLibConnectParams,
    read_only: c_char,
    snapshot_ref: *const c_char,
    transport_modes: *const c_char,
    connection: *mut VixDiskLibConnection,
) -> VixError {
    let _section = OpenCloseSection::enter();
    // SAFETY: per the contract.
    let (p, snapshot, transports) = unsafe {
        (
            read_params(params),
            text(snapshot_ref),
            text(transport_modes),
        )
    };
    let Some(p) = p else { return VIX_E_INVALID_ARG };
    if connection.is_null() {
        return VIX_E_INVALID_ARG;
    }
    let outcome = with_state(|g| {
        g.call("VixDiskLib_ConnectEx");
        if !g.initialised {
            g.violation("not_initialised");
            return Err(VIX_E_FAIL);
        }
        let remote = p.server.is_some();
        if remote {
            let creds_ok = match p.cred_type {
                CRED_UID => p.user.is_some() && p.password.is_some(),
                CRED_SESSIONID => p.user.is_some() && p.cookie.is_some(),
                _ => false,
            };
            if p.vmx_spec.is_none() || !creds_ok {
                return Err(VIX_E_INVALID_ARG);
            }
            if let Some(expected) = g.config.get("standin.password") {
                if p.password.as_deref() != Some(expected.as_str()) {
                    return Err(VIX_E_AUTHENTICATION_FAIL);
                }
            }
        }
        if let Some(code) = g.fail_code("standin.failconnectex") {
            return Err(code);
        }
        g.connects.insert(
            p.vmx_spec.clone().unwrap_or_else(|| "local".to_owned()),
            json!({
                "read_only": read_only != 0,
                "snapshot": snapshot,
                "transports": transports,
                "server": p.server,
                "thumbprint": p.thumbprint,
                "cred_type": p.cred_type,
                "user": p.user,
                "password_len": p.password.as_ref().map(String::len),
                "port": p.port,
                "nfc_host_port": p.nfc_host_port,
            }),
        );
        let id = g.new_id();
        g.conns.insert(
            id,
            Conn {
                read_only: read_only != 0,
                remote,
                transports: transports.clone(),
                open_handles: 0,
            },
        );
        let log_password = g
            .config
            .get("standin.logpassword")
            .is_some_and(|v| v == "1");
        Ok((id, g.log, log_password))
    });
    match outcome {
        Ok((id, log, log_password)) => {
            // SAFETY: `connection` is a non-NULL out-pointer per the contract.
            unsafe { *connection = id as VixDiskLibConnection };
            if log_password && p.server.is_some() {
                let server = CString::new(p.server.unwrap_or_default()).unwrap_or_default();
                let user = CString::new(p.user.unwrap_or_default()).unwrap_or_default();
                let password = CString::new(p.password.unwrap_or_default()).unwrap_or_default();
                // SAFETY: three %s with three NUL-terminated strings.
                unsafe {
                    standin_log(
                        log,
                        c"ConnectEx: logging in to %s as %s with password %s".as_ptr(),
                        server.as_ptr(),
                        user.as_ptr(),
                        password.as_ptr(),
                    )
                };
            }
            VIX_OK
        }
        Err(code) => code,
    }
}

/// `VixDiskLib_Disconnect`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Disconnect(connection: VixDiskLibConnection) -> VixError {
    let _section = OpenCloseSection::enter();
    with_state(|g| {
        g.call("VixDiskLib_Disconnect");
        match g.conns.remove(&(connection as usize)) {
            None => {
                g.violation("bad_connection");
                VIX_E_INVALID_HANDLE
            }
            Some(c) => {
                if c.open_handles > 0 {
                    g.violation("disconnect_with_open_handles");
                }
                VIX_OK
            }
        }
    })
}

/// `VixDiskLib_Open`.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `handle` NULL or a valid out-pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Open(
    connection: VixDiskLibConnection,
    path: *const c_char,
    flags: u32,
    handle: *mut VixDiskLibHandle,
) -> VixError {
    let _section = OpenCloseSection::enter();
    // SAFETY: per the contract.
    let Some(path) = (unsafe { text(path) }) else {
        return VIX_E_INVALID_ARG;
    };
    if handle.is_null() {
        return VIX_E_INVALID_ARG;
    }
    let (name, size, phys, faults) = parse_disk_spec(&path);
    let outcome = with_state(|g| {
        g.call("VixDiskLib_Open");
        let Some(conn) = g.conns.get(&(connection as usize)) else {
            g.violation("bad_connection");
            return Err((VIX_E_INVALID_HANDLE, g.warn, None));
        };
        let read_only = conn.read_only || flags & FLAG_OPEN_READ_ONLY != 0;
        let remote = conn.remote;
        let mode = if conn.remote {
            static_mode(
                conn.transports
                    .as_deref()
                    .and_then(|t| t.split(':').next())
                    .unwrap_or("nbdssl"),
            )
        } else {
            c"file"
        };
        if let Some(code) = faults.open {
            return Err((code, g.warn, None));
        }
        let warn = g.warn;
        // Like VDDK opening a local VMDK: the path names the file, and must be absolute. A
        // remote disk is a file under the datastore directory, when there is one.
        let file = if !remote && g.file_disks() {
            if !name.starts_with('/') {
                let why = format!("local disk {name:?} is not an absolute path");
                return Err((VIX_E_INVALID_ARG, warn, Some(why)));
            }
            Some(std::path::PathBuf::from(&name))
        } else if remote {
            match g.datastore_dir() {
                Some(dir) => Some(
                    datastore_file(&dir, &name)
                        .map_err(|why| (VIX_E_FILE_NOT_FOUND, warn, Some(why)))?,
                ),
                None => None,
            }
        } else {
            None
        };
        if let Some(file) = file {
            if size.is_some() || faults.seed.is_some() {
                let why = format!("size= or seed= given for the file-backed disk {name:?}");
                return Err((VIX_E_INVALID_ARG, warn, Some(why)));
            }
            let reopen = match g.disks.get(&name) {
                None => true,
                Some(d) => !read_only && !d.store.writable(),
            };
            if reopen {
                let store = Store::open_file(&file, !read_only)
                    .map_err(|(code, why)| (code, warn, Some(why)))?;
                match g.disks.get_mut(&name) {
                    Some(d) => d.store = store,
                    None => {
                        g.disks.insert(name.clone(), DiskData::new(store, phys));
                    }
                }
            }
        }
        if !g.disks.contains_key(&name) {
            let store = match &faults.seed {
                Some(seed) => Store::memory_seeded(std::path::Path::new(seed), size)
                    .map_err(|(code, why)| (code, warn, Some(why)))?,
                None => Store::memory(size.unwrap_or(DEFAULT_SIZE)),
            };
            g.disks.insert(name.clone(), DiskData::new(store, phys));
        }
        let disk = g.disks.get_mut(&name).expect("the disk was inserted above");
        *disk.counters.entry("opens").or_default() += 1;
        if read_only {
            *disk.counters.entry("read_only_opens").or_default() += 1;
        }
        let id = g.new_id();
        if let Some(c) = g.conns.get_mut(&(connection as usize)) {
            c.open_handles += 1;
        }
        g.handles.insert(
            id,
            Handle {
                conn: connection as usize,
                disk: name.clone(),
                read_only,
                faults: faults.clone(),
                busy: Arc::new(AtomicBool::new(false)),
                outstanding: Arc::new(AtomicUsize::new(0)),
                threads: Vec::new(),
                mode,
            },
        );
        Ok(id)
    });
    match outcome {
        Ok(id) => {
            // SAFETY: non-NULL out-pointer per the contract.
            unsafe { *handle = id as VixDiskLibHandle };
            VIX_OK
        }
        Err((code, warn, why)) => {
            let disk = CString::new(name).unwrap_or_default();
            let why = CString::new(why.unwrap_or_default()).unwrap_or_default();
            // SAFETY: two %s with NUL-terminated strings and %lu with an unsigned long.
            unsafe {
                standin_log(
                    warn,
                    c"Open of %s failed: error %lu %s".as_ptr(),
                    disk.as_ptr(),
                    code as c_ulong,
                    why.as_ptr(),
                )
            };
            code
        }
    }
}

/// `VixDiskLib_Close`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Close(handle: VixDiskLibHandle) -> VixError {
    let _section = OpenCloseSection::enter();
    with_state(|g| {
        g.call("VixDiskLib_Close");
        let Some(h) = g.handles.remove(&(handle as usize)) else {
            g.violation("bad_handle");
            return VIX_E_INVALID_HANDLE;
        };
        if h.outstanding.load(Ordering::SeqCst) > 0 || h.busy.load(Ordering::SeqCst) {
            g.violation("close_with_outstanding");
        }
        if let Some(c) = g.conns.get_mut(&h.conn) {
            c.open_handles -= 1;
        }
        g.disk_count(&h.disk, "closes");
        VIX_OK
    })
}

/// `VixDiskLibProgressFunc`: `Bool (*)(void *progressData, int percentCompleted)`; returning
/// FALSE (0) asks to cancel.
pub type ProgressFn = unsafe extern "C" fn(data: *mut c_void, percent: std::ffi::c_int) -> c_char;

/// `VixDiskLib_Create`'s signature as `vixDiskLib.h` declares it. vmsdk's backend never calls
/// Create (so `disk_transport::vddk::ffi` has no type for it); nbdkit's vddk plugin requires
/// the symbol and calls it for `create=true`.
pub type CreateFn = unsafe extern "C" fn(
    connection: VixDiskLibConnection,
    path: *const c_char,
    params: *const VixDiskLibCreateParams,
    progress: Option<ProgressFn>,
    progress_data: *mut c_void,
) -> VixError;

const _: CreateFn = VixDiskLib_Create;

/// `VixDiskLib_Create`: creates a local disk of `capacity` sectors. With `standin.fileDisks =
/// 1` the path is a file, which must not exist (`VIX_E_FILE_ALREADY_EXISTS`) and is created
/// sparse; otherwise an in-memory disk of that name. VDDK creates only hosted (local) disks:
/// on a remote connection this is `VIX_E_NOT_SUPPORTED`, on a read-only one
/// `VIX_E_FILE_READ_ONLY`. The progress callback, when given, hears 0 and 100 percent.
///
/// # Safety
/// `path` NUL-terminated, `params` NULL or valid, `progress` NULL or callable with
/// `progress_data`.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Create(
    connection: VixDiskLibConnection,
    path: *const c_char,
    params: *const VixDiskLibCreateParams,
    progress: Option<ProgressFn>,
    progress_data: *mut c_void,
) -> VixError {
    let _section = OpenCloseSection::enter();
    // SAFETY: per the contract.
    let (Some(path), false) = (unsafe { text(path) }, params.is_null()) else {
        return VIX_E_INVALID_ARG;
    };
    // SAFETY: non-NULL and valid per the contract.
    let params = unsafe { *params };
    let report = |percent| {
        if let Some(progress) = progress {
            // SAFETY: the caller's callback with the caller's data, per the contract.
            unsafe { progress(progress_data, percent) };
        }
    };
    report(0);
    let code = with_state(|g| {
        g.call("VixDiskLib_Create");
        let Some(conn) = g.conns.get(&(connection as usize)) else {
            g.violation("bad_connection");
            return VIX_E_INVALID_HANDLE;
        };
        if conn.remote {
            return VIX_E_NOT_SUPPORTED;
        }
        if conn.read_only {
            return VIX_E_FILE_READ_ONLY;
        }
        let (name, size, phys, _) = parse_disk_spec(&path);
        let Some(bytes) = params
            .capacity
            .checked_mul(SECTOR_SIZE)
            .filter(|&b| b > 0 && size.is_none())
        else {
            return VIX_E_INVALID_ARG;
        };
        if g.file_disks() {
            if !name.starts_with('/') {
                return VIX_E_INVALID_ARG;
            }
            return match Store::create_file(std::path::Path::new(&name), bytes) {
                Ok(()) => VIX_OK,
                Err((code, _)) => code,
            };
        }
        if g.disks.contains_key(&name) {
            return VIX_E_FILE_ALREADY_EXISTS;
        }
        let Ok(len) = usize::try_from(bytes) else {
            return VIX_E_OUT_OF_MEMORY;
        };
        let mut disk = DiskData::new(Store::memory(len as u64), phys);
        *disk.counters.entry("creates").or_default() += 1;
        g.disks.insert(name, disk);
        VIX_OK
    });
    if code == VIX_OK {
        report(100);
    }
    code
}

/// `VixDiskLib_GetTransportMode`.
#[no_mangle]
pub extern "C" fn VixDiskLib_GetTransportMode(handle: VixDiskLibHandle) -> *const c_char {
    with_state(|g| {
        g.call("VixDiskLib_GetTransportMode");
        g.handles
            .get(&(handle as usize))
            .map_or(std::ptr::null(), |h| h.mode.as_ptr())
    })
}

/// `VixDiskLib_GetInfo`.
///
/// # Safety
/// `info` must be NULL or a valid out-pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetInfo(
    handle: VixDiskLibHandle,
    info: *mut *mut VixDiskLibInfo,
) -> VixError {
    // Not I/O: allowed while asynchronous requests are in flight, as for QueryAllocatedBlocks.
    let _section = match enter_handle(handle, "VixDiskLib_GetInfo", false) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if info.is_null() {
        return VIX_E_INVALID_ARG;
    }
    let made = with_state(|g| {
        let h = g.handles.get(&(handle as usize))?;
        let disk = g.disks.get(&h.disk)?;
        let sectors = disk.store.size() / 512;
        let phys = disk.physical_sector;
        let uuid = disk.metadata.get("uuid").cloned().unwrap_or_default();
        let disk_name = h.disk.clone();
        g.disk_count(&disk_name, "infos");
        g.live("infos", 1);
        let geometry = VixDiskLibGeometry {
            cylinders: (sectors / (255 * 63)) as u32,
            heads: 255,
            sectors: 63,
        };
        Some(VixDiskLibInfo {
            bios_geo: geometry,
            phys_geo: geometry,
            capacity: sectors,
            adapter_type: 3,
            num_links: 1,
            parent_file_name_hint: std::ptr::null_mut(),
            uuid: CString::new(uuid).unwrap_or_default().into_raw(),
            logical_sector_size: 512,
            physical_sector_size: phys,
        })
    });
    match made {
        Some(i) => {
            // SAFETY: non-NULL out-pointer per the contract.
            unsafe { *info = Box::into_raw(Box::new(i)) };
            VIX_OK
        }
        None => VIX_E_INVALID_HANDLE,
    }
}

/// `VixDiskLib_FreeInfo`.
///
/// # Safety
/// `info` must be NULL or come from `VixDiskLib_GetInfo`, and be freed once.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeInfo(info: *mut VixDiskLibInfo) {
    if info.is_null() {
        return;
    }
    // SAFETY: made by Box::into_raw in GetInfo (uuid by CString::into_raw), freed once.
    unsafe {
        let info = Box::from_raw(info);
        if !info.uuid.is_null() {
            drop(CString::from_raw(info.uuid));
        }
    }
    with_state(|g| {
        g.call("VixDiskLib_FreeInfo");
        g.live("infos", -1);
    });
}

/// Copies between the disk and `buf` (`write` = into the disk); applies faults and rules.
fn transfer(handle: usize, start: u64, count: u64, buf: *mut u8, write: bool) -> VixError {
    with_state(|g| {
        let Some(h) = g.handles.get(&handle) else {
            return VIX_E_INVALID_HANDLE;
        };
        let (disk_name, read_only, faults) = (h.disk.clone(), h.read_only, h.faults.clone());
        if write && read_only {
            g.disk_count(&disk_name, "rejected_writes");
            return VIX_E_FILE_READ_ONLY;
        }
        let fault = if write { faults.write } else { faults.read };
        if let Some((sector, code)) = fault {
            if sector >= start && sector < start.saturating_add(count) {
                return code;
            }
        }
        let Some(disk) = g.disks.get_mut(&disk_name) else {
            return VIX_E_INVALID_HANDLE;
        };
        let sectors = disk.store.size() / 512;
        match start.checked_add(count) {
            Some(end) if end <= sectors => {}
            _ => return VIX_E_DISK_OUTOFRANGE,
        }
        let (offset, len) = (start * 512, (count * 512) as usize);
        let result = if write {
            // SAFETY: the caller passed `buf` readable for `count` sectors (VDDK's contract).
            let src = unsafe { std::slice::from_raw_parts(buf, len) };
            disk.store.write(offset, src)
        } else {
            // SAFETY: the caller passed `buf` writable for `count` sectors (VDDK's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(buf, len) };
            disk.store.read(offset, dst)
        };
        match result {
            Ok(()) => {
                let what = if write { "writes" } else { "reads" };
                *disk.counters.entry(what).or_default() += 1;
                VIX_OK
            }
            Err(code) => code,
        }
    })
}

/// `VixDiskLib_Read`.
///
/// # Safety
/// `buf` must be writable for `count` sectors.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Read(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *mut u8,
) -> VixError {
    match enter_handle(handle, "VixDiskLib_Read", true) {
        Ok(_section) => transfer(handle as usize, start, count, buf, false),
        Err(code) => code,
    }
}

/// `VixDiskLib_Write`.
///
/// # Safety
/// `buf` must be readable for `count` sectors.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Write(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *const u8,
) -> VixError {
    match enter_handle(handle, "VixDiskLib_Write", true) {
        Ok(_section) => transfer(handle as usize, start, count, buf.cast_mut(), true),
        Err(code) => code,
    }
}

#[cfg(not(standin_minimal))]
struct SendPtr(*mut u8, *mut c_void);
// SAFETY: the pointers are handed to the completion thread only; the caller keeps the buffer
// and callback data alive until the callback runs (VDDK's async contract).
#[cfg(not(standin_minimal))]
unsafe impl Send for SendPtr {}

#[cfg(not(standin_minimal))]
#[allow(clippy::too_many_arguments)]
fn submit_async(
    handle: VixDiskLibHandle,
    name: &'static str,
    start: u64,
    count: u64,
    buf: *mut u8,
    write: bool,
    callback: Option<CompletionFn>,
    data: *mut c_void,
) -> VixError {
    let _section = match enter_handle(handle, name, false) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(callback) = callback else {
        return VIX_E_INVALID_ARG;
    };
    let queued = with_state(|g| {
        let h = g.handles.get(&(handle as usize))?;
        let (disk, delay_us, outstanding) = (
            h.disk.clone(),
            h.faults.async_delay_us,
            Arc::clone(&h.outstanding),
        );
        g.disk_count(&disk, if write { "async_writes" } else { "async_reads" });
        Some((delay_us, outstanding))
    });
    let Some((delay_us, outstanding)) = queued else {
        return VIX_E_INVALID_HANDLE;
    };
    let id = handle as usize;
    if delay_us == 0 {
        let result = transfer(id, start, count, buf, write);
        // SAFETY: VDDK's contract: `data` is the caller's, handed back once.
        unsafe { callback(data, result) };
        return VIX_ASYNC;
    }
    outstanding.fetch_add(1, Ordering::SeqCst);
    let ptrs = SendPtr(buf, data);
    let thread = std::thread::spawn(move || {
        let ptrs = ptrs;
        std::thread::sleep(Duration::from_micros(delay_us));
        let result = transfer(id, start, count, ptrs.0, write);
        outstanding.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: as above, once, from this VDDK-style worker thread.
        unsafe { callback(ptrs.1, result) };
    });
    with_state(|g| {
        if let Some(h) = g.handles.get_mut(&id) {
            h.threads.push(thread);
        }
    });
    VIX_ASYNC
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_ReadAsync`.
///
/// # Safety
/// `buf` must stay writable for `count` sectors until the callback runs.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadAsync(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *mut u8,
    callback: Option<CompletionFn>,
    data: *mut c_void,
) -> VixError {
    submit_async(
        handle,
        "VixDiskLib_ReadAsync",
        start,
        count,
        buf,
        false,
        callback,
        data,
    )
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_WriteAsync`.
///
/// # Safety
/// `buf` must stay readable for `count` sectors until the callback runs.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_WriteAsync(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *const u8,
    callback: Option<CompletionFn>,
    data: *mut c_void,
) -> VixError {
    submit_async(
        handle,
        "VixDiskLib_WriteAsync",
        start,
        count,
        buf.cast_mut(),
        true,
        callback,
        data,
    )
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_Wait`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Wait(handle: VixDiskLibHandle) -> VixError {
    let _section = match enter_handle(handle, "VixDiskLib_Wait", false) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let threads = with_state(|g| {
        g.handles
            .get_mut(&(handle as usize))
            .map(|h| std::mem::take(&mut h.threads))
            .unwrap_or_default()
    });
    for t in threads {
        let _ = t.join();
    }
    VIX_OK
}

/// `VixDiskLib_Flush`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Flush(handle: VixDiskLibHandle) -> VixError {
    let _section = match enter_handle(handle, "VixDiskLib_Flush", true) {
        Ok(s) => s,
        Err(code) => return code,
    };
    with_state(|g| {
        let Some(h) = g.handles.get(&(handle as usize)) else {
            return VIX_E_INVALID_HANDLE;
        };
        let (disk, fault) = (h.disk.clone(), h.faults.flush);
        g.disk_count(&disk, "flushes");
        if let Some(code) = fault {
            return code;
        }
        match g.disks.get(&disk).map(|d| d.store.flush()) {
            Some(Ok(())) => VIX_OK,
            Some(Err(code)) => code,
            None => VIX_E_INVALID_HANDLE,
        }
    })
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_QueryAllocatedBlocks`.
///
/// # Safety
/// `list` must be NULL or a valid out-pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_QueryAllocatedBlocks(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    chunk_size: u64,
    list: *mut *mut VixDiskLibBlockList,
) -> VixError {
    // Not I/O: asynchronous reads may be in flight (nbdkit's vddk plugin asks for extents
    // between ReadAsync calls without a Wait, and real VDDK answers).
    let _section = match enter_handle(handle, "VixDiskLib_QueryAllocatedBlocks", false) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if list.is_null() {
        return VIX_E_INVALID_ARG;
    }
    let blocks = with_state(|g| {
        let h = g
            .handles
            .get(&(handle as usize))
            .ok_or(VIX_E_INVALID_HANDLE)?;
        let (disk_name, fault) = (h.disk.clone(), h.faults.query);
        g.disk_count(&disk_name, "queries");
        if let Some(code) = fault {
            return Err(code);
        }
        let disk = g.disks.get(&disk_name).ok_or(VIX_E_INVALID_HANDLE)?;
        let sectors = disk.store.size() / 512;
        let valid = chunk_size >= MIN_CHUNK_SIZE
            && start.is_multiple_of(chunk_size)
            && count.is_multiple_of(chunk_size)
            && count / chunk_size <= MAX_CHUNK_NUMBER
            && start.checked_add(count).is_some_and(|e| e <= sectors);
        if !valid {
            return Err(VIX_E_INVALID_ARG);
        }
        // Runs of allocated 64 KiB chunks, in sectors, within the request.
        let sectors_per_chunk = CHUNK / 512;
        let mut runs: Vec<VixDiskLibBlock> = Vec::new();
        for chunk in disk.store.allocated_chunks(
            start / sectors_per_chunk,
            (start + count).div_ceil(sectors_per_chunk),
        )? {
            let offset = chunk * sectors_per_chunk;
            match runs.last_mut() {
                Some(last) if last.offset + last.length == offset => {
                    last.length += sectors_per_chunk
                }
                _ => runs.push(VixDiskLibBlock {
                    offset,
                    length: sectors_per_chunk,
                }),
            }
        }
        g.live("block_lists", 1);
        Ok(runs)
    });
    let blocks = match blocks {
        Ok(b) => b,
        Err(code) => return code,
    };
    let layout = block_list_layout(blocks.len());
    // SAFETY: the layout has a non-zero size; the allocation is checked for NULL, then the header
    // and `blocks.len()` entries (all inside the layout) are written before it is handed out.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<VixDiskLibBlockList>();
        if p.is_null() {
            return VIX_E_OUT_OF_MEMORY;
        }
        (*p).num_blocks = blocks.len() as u32;
        let first = std::ptr::addr_of_mut!((*p).blocks).cast::<VixDiskLibBlock>();
        for (i, b) in blocks.iter().enumerate() {
            first.add(i).write(*b);
        }
        *list = p;
    }
    VIX_OK
}

#[cfg(not(standin_minimal))]
fn block_list_layout(n: usize) -> std::alloc::Layout {
    let size = std::mem::offset_of!(VixDiskLibBlockList, blocks)
        + n.max(1) * std::mem::size_of::<VixDiskLibBlock>();
    std::alloc::Layout::from_size_align(size, std::mem::align_of::<VixDiskLibBlockList>())
        .unwrap_or(std::alloc::Layout::new::<VixDiskLibBlockList>())
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_FreeBlockList`.
///
/// # Safety
/// `list` must be NULL or come from `VixDiskLib_QueryAllocatedBlocks`, and be freed once.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeBlockList(list: *mut VixDiskLibBlockList) -> VixError {
    if list.is_null() {
        return VIX_OK;
    }
    // SAFETY: allocated in QueryAllocatedBlocks with the layout for its `num_blocks`.
    unsafe {
        let layout = block_list_layout((*list).num_blocks as usize);
        std::alloc::dealloc(list.cast(), layout);
    }
    with_state(|g| {
        g.call("VixDiskLib_FreeBlockList");
        g.live("block_lists", -1);
    });
    VIX_OK
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_PrepareForAccess`. An identity starting with `fail:` fails with `VIX_E_FAIL`.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_PrepareForAccess(
    params: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError {
    // SAFETY: per the contract.
    let (p, identity) = unsafe { (read_params(params), text(identity)) };
    with_state(|g| {
        g.call("VixDiskLib_PrepareForAccess");
        let (Some(p), Some(identity)) = (p, identity) else {
            return VIX_E_INVALID_ARG;
        };
        if p.vmx_spec.is_none() {
            return VIX_E_INVALID_ARG;
        }
        if identity.starts_with("fail:") {
            return VIX_E_FAIL;
        }
        if let Some(code) = g.fail_code("standin.failprepareforaccess") {
            return code;
        }
        g.access.entry(identity).or_default().0 += 1;
        VIX_OK
    })
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_EndAccess`.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_EndAccess(
    params: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError {
    // SAFETY: per the contract.
    let (p, identity) = unsafe { (read_params(params), text(identity)) };
    with_state(|g| {
        g.call("VixDiskLib_EndAccess");
        let (Some(p), Some(identity)) = (p, identity) else {
            return VIX_E_INVALID_ARG;
        };
        if p.vmx_spec.is_none() {
            return VIX_E_INVALID_ARG;
        }
        let entry = g.access.entry(identity).or_default();
        entry.1 += 1;
        if entry.1 > entry.0 {
            g.violation("unmatched_end_access");
        }
        VIX_OK
    })
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_Cleanup`: nothing is ever left over here; vmxSpec must be NULL.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Cleanup(
    params: *const VixDiskLibConnectParams,
    cleaned_up: *mut u32,
    remaining: *mut u32,
) -> VixError {
    // SAFETY: per the contract.
    let p = unsafe { read_params(params) };
    let code = with_state(|g| {
        g.call("VixDiskLib_Cleanup");
        match p {
            Some(p) if p.vmx_spec.is_none() => g.fail_code("standin.failcleanup").unwrap_or(VIX_OK),
            _ => VIX_E_INVALID_ARG,
        }
    });
    if code == VIX_OK {
        // SAFETY: each out-pointer is NULL or valid per the contract.
        unsafe {
            if !cleaned_up.is_null() {
                *cleaned_up = 0;
            }
            if !remaining.is_null() {
                *remaining = 0;
            }
        }
    }
    code
}

#[cfg(not(standin_minimal))]
/// Copies `value` plus a NUL into `buf` if it fits; sets `*required`.
///
/// # Safety
/// `buf` must be NULL or writable for `len` bytes; `required` NULL or valid.
unsafe fn copy_out(value: &[u8], buf: *mut c_char, len: usize, required: *mut usize) -> VixError {
    let needed = value.len() + 1;
    if !required.is_null() {
        // SAFETY: valid per the contract.
        unsafe { *required = needed };
    }
    if buf.is_null() || len < needed {
        return VIX_E_BUFFER_TOOSMALL;
    }
    // SAFETY: `buf` is writable for `len >= needed` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast::<u8>(), value.len());
        *buf.add(value.len()) = 0;
    }
    VIX_OK
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_GetMetadataKeys`.
///
/// # Safety
/// As `copy_out`.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetMetadataKeys(
    handle: VixDiskLibHandle,
    keys: *mut c_char,
    max_len: usize,
    required_len: *mut usize,
) -> VixError {
    let _section = match enter_handle(handle, "VixDiskLib_GetMetadataKeys", true) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let joined = with_state(|g| {
        let disk = g
            .handles
            .get(&(handle as usize))
            .and_then(|h| g.disks.get(&h.disk))?;
        let mut out = Vec::new();
        for key in disk.metadata.keys() {
            out.extend_from_slice(key.as_bytes());
            out.push(0);
        }
        Some(out)
    });
    let Some(joined) = joined else {
        return VIX_E_INVALID_HANDLE;
    };
    // SAFETY: per the contract (the trailing NUL of copy_out ends the list).
    unsafe { copy_out(&joined, keys, max_len, required_len) }
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_ReadMetadata`.
///
/// # Safety
/// `key` NUL-terminated; the rest as `copy_out`.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadMetadata(
    handle: VixDiskLibHandle,
    key: *const c_char,
    buf: *mut c_char,
    buf_len: usize,
    required_len: *mut usize,
) -> VixError {
    let _section = match enter_handle(handle, "VixDiskLib_ReadMetadata", true) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // SAFETY: per the contract.
    let Some(key) = (unsafe { text(key) }) else {
        return VIX_E_INVALID_ARG;
    };
    let value = with_state(|g| {
        let disk = g
            .handles
            .get(&(handle as usize))
            .and_then(|h| g.disks.get(&h.disk))?;
        Some(disk.metadata.get(&key).cloned())
    });
    match value {
        None => VIX_E_INVALID_HANDLE,
        Some(None) => VIX_E_DISK_KEY_NOTFOUND,
        // SAFETY: per the contract.
        Some(Some(v)) => unsafe { copy_out(v.as_bytes(), buf, buf_len, required_len) },
    }
}

#[cfg(not(standin_minimal))]
/// `VixDiskLib_WriteMetadata`.
///
/// # Safety
/// `key` and `value` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_WriteMetadata(
    handle: VixDiskLibHandle,
    key: *const c_char,
    value: *const c_char,
) -> VixError {
    let _section = match enter_handle(handle, "VixDiskLib_WriteMetadata", true) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // SAFETY: per the contract.
    let (Some(key), Some(value)) = (unsafe { text(key) }, unsafe { text(value) }) else {
        return VIX_E_INVALID_ARG;
    };
    with_state(|g| {
        let Some(h) = g.handles.get(&(handle as usize)) else {
            return VIX_E_INVALID_HANDLE;
        };
        if h.read_only {
            return VIX_E_FILE_READ_ONLY;
        }
        let name = h.disk.clone();
        match g.disks.get_mut(&name) {
            Some(d) => {
                d.metadata.insert(key, value);
                VIX_OK
            }
            None => VIX_E_INVALID_HANDLE,
        }
    })
}

/// Negative controls: the rule checks the backend's tests rely on ("no violation counted")
/// must really fire when the rules are broken, which only code calling the exports directly
/// can do.
#[cfg(all(test, not(standin_minimal)))]
mod tests {
    use super::*;

    fn init() {
        static INIT: OnceLock<()> = OnceLock::new();
        INIT.get_or_init(|| {
            let config =
                std::env::temp_dir().join(format!("vddk-standin-unit-{}.conf", std::process::id()));
            std::fs::write(&config, "standin.delayUs = 20000\n").unwrap();
            let path = CString::new(config.to_str().unwrap()).unwrap();
            // SAFETY: NULL callbacks are allowed; the strings are NUL-terminated.
            let code = unsafe {
                VixDiskLib_InitEx(6, 5, None, None, None, c"/nowhere".as_ptr(), path.as_ptr())
            };
            assert_eq!(code, VIX_OK);
            let _ = std::fs::remove_file(config);
        });
    }

    fn violations(what: &str) -> u64 {
        state().violations.get(what).copied().unwrap_or(0)
    }

    fn connect() -> VixDiskLibConnection {
        let params = VixDiskLibConnectParams::zeroed();
        let mut conn = std::ptr::null_mut();
        // SAFETY: valid params (local: all NULL) and out-pointer.
        let code = unsafe {
            VixDiskLib_ConnectEx(&params, 0, std::ptr::null(), std::ptr::null(), &mut conn)
        };
        assert_eq!(code, VIX_OK);
        conn
    }

    fn open(conn: VixDiskLibConnection, path: &CStr) -> VixDiskLibHandle {
        let mut handle = std::ptr::null_mut();
        // SAFETY: a live connection, a NUL-terminated path and a valid out-pointer.
        let code = unsafe { VixDiskLib_Open(conn, path.as_ptr(), 0, &mut handle) };
        assert_eq!(code, VIX_OK);
        handle
    }

    #[test]
    fn overlapping_open_and_close_are_detected() {
        init();
        let conn = connect() as usize;
        let before = violations("open_close_overlap");
        let threads: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || open(conn as VixDiskLibConnection, c"overlap") as usize)
            })
            .collect();
        let handles: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(violations("open_close_overlap") > before);
        for h in handles {
            assert_eq!(VixDiskLib_Close(h as VixDiskLibHandle), VIX_OK);
        }
        assert_eq!(VixDiskLib_Disconnect(conn as VixDiskLibConnection), VIX_OK);
    }

    #[test]
    fn concurrent_calls_on_one_handle_are_detected() {
        init();
        let conn = connect();
        let handle = open(conn, c"concurrent") as usize;
        let before = violations("handle_concurrency");
        let threads: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    // SAFETY: a live handle and a one-sector buffer.
                    unsafe { VixDiskLib_Read(handle as VixDiskLibHandle, 0, 1, buf.as_mut_ptr()) }
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), VIX_OK);
        }
        assert!(violations("handle_concurrency") > before);
        // Disconnecting with the disk still open is a violation too.
        let before = violations("disconnect_with_open_handles");
        assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK);
        assert!(violations("disconnect_with_open_handles") > before);
        assert_eq!(VixDiskLib_Close(handle as VixDiskLibHandle), VIX_OK);
        assert_eq!(
            VixDiskLib_Close(handle as VixDiskLibHandle),
            VIX_E_INVALID_HANDLE
        );
    }

    unsafe extern "C" fn record(data: *mut c_void, result: VixError) {
        // SAFETY: `data` points to the AtomicU64 the test keeps alive until after Wait.
        unsafe { &*(data as *const std::sync::atomic::AtomicU64) }
            .store(result + 1, Ordering::SeqCst);
    }

    #[test]
    fn mixing_sync_and_async_io_is_refused_until_wait() {
        init();
        let conn = connect();
        let handle = open(conn, c"mixed?async_delay_us=100000");
        let result = std::sync::atomic::AtomicU64::new(0);
        let mut abuf = [0u8; 512];
        let mut sbuf = [0u8; 512];
        // SAFETY: the buffer and `result` outlive the request (Wait below).
        let code = unsafe {
            VixDiskLib_ReadAsync(
                handle,
                0,
                1,
                abuf.as_mut_ptr(),
                Some(record),
                &result as *const _ as *mut c_void,
            )
        };
        assert_eq!(code, VIX_ASYNC);
        // SAFETY: a live handle and a one-sector buffer.
        let code = unsafe { VixDiskLib_Read(handle, 0, 1, sbuf.as_mut_ptr()) };
        assert_eq!(code, VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED);
        assert_eq!(VixDiskLib_Wait(handle), VIX_OK);
        assert_eq!(result.load(Ordering::SeqCst), VIX_OK + 1);
        // SAFETY: as above.
        let code = unsafe { VixDiskLib_Read(handle, 0, 1, sbuf.as_mut_ptr()) };
        assert_eq!(code, VIX_OK);
        assert_eq!(VixDiskLib_Close(handle), VIX_OK);
        assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK);
    }

    #[test]
    fn query_allocated_blocks_insists_on_whole_chunks() {
        init();
        let conn = connect();
        let handle = open(conn, c"chunks?size=1048576");
        let mut list = std::ptr::null_mut();
        // SAFETY: a live handle and a valid out-pointer.
        unsafe {
            assert_eq!(
                VixDiskLib_QueryAllocatedBlocks(handle, 1, 128, 128, &mut list),
                VIX_E_INVALID_ARG
            );
            assert_eq!(
                VixDiskLib_QueryAllocatedBlocks(handle, 0, 100, 128, &mut list),
                VIX_E_INVALID_ARG
            );
            assert_eq!(
                VixDiskLib_QueryAllocatedBlocks(handle, 0, 4096, 128, &mut list),
                VIX_E_INVALID_ARG
            );
            assert_eq!(
                VixDiskLib_QueryAllocatedBlocks(handle, 0, 2048, 128, &mut list),
                VIX_OK
            );
            assert_eq!((*list).num_blocks, 0);
            assert_eq!(VixDiskLib_FreeBlockList(list), VIX_OK);
        }
        assert_eq!(VixDiskLib_Close(handle), VIX_OK);
        assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK);
    }
}
