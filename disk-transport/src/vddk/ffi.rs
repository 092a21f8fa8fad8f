//! The raw VDDK C ABI and the only `unsafe` code of the crate.
//!
//! Two layers live here:
//!
//! - **Raw declarations** (public): the `#[repr(C)]` structs of `vixDiskLib.h`, its constants and
//!   one function-pointer type per VDDK entry point. Layouts are checked at compile time against
//!   the sizes and offsets gcc reports for the VDDK 7 header on x86-64 Linux, so a field typo
//!   cannot compile. The stand-in library used by the tests (`vddk-standin`) exports its functions
//!   through these same types, so the two sides cannot drift apart.
//! - **Owning wrappers** (crate-private): `Library` (the `dlopen`ed library and its function
//!   table), `RawConnection` and `RawDisk`. They are the only way to obtain a VDDK connection
//!   or disk handle, a handle is closed exactly once by `Drop`, a disk keeps its connection alive,
//!   and every I/O method takes `&mut RawDisk` — so "one thread at a time per handle" and
//!   "close before disconnect" are enforced by the borrow checker, and `Open`/`Close`/`ConnectEx`/
//!   `Disconnect` are serialised by one lock per library (VDDK sets up and tears down internal
//!   libraries in them, and interleaving them across threads fails).
//!
//! # ABI assumptions
//!
//! VDDK ships only for x86-64 Linux. The log callbacks receive a `va_list`; on x86-64 SysV a
//! `va_list` argument is a pointer to the `__va_list_tag` array, and on AArch64 Linux (AAPCS64)
//! the 32-byte `va_list` struct is passed by reference. On both, the callback can take the
//! argument as `*mut c_void` and hand the same pointer to libc's `vsnprintf`, which consumes it
//! once. Other targets get the unformatted format string.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_long, c_void, CStr};
use std::fmt;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

/// `VixError`: 64 bits; the low 16 are the code (`VIX_ERROR_CODE`), the rest extra data.
pub type VixError = u64;
/// `VixDiskLibConnection`: an opaque pointer.
pub type VixDiskLibConnection = *mut c_void;
/// `VixDiskLibHandle`: an opaque pointer.
pub type VixDiskLibHandle = *mut c_void;

/// Success.
pub const VIX_OK: VixError = 0;
/// Success of `ReadAsync`/`WriteAsync`: the request was queued; the callback reports the result.
pub const VIX_ASYNC: VixError = 25000;
/// "Unknown error".
pub const VIX_E_FAIL: VixError = 1;
/// Out of memory.
pub const VIX_E_OUT_OF_MEMORY: VixError = 2;
/// Invalid argument.
pub const VIX_E_INVALID_ARG: VixError = 3;
/// File not found.
pub const VIX_E_FILE_NOT_FOUND: VixError = 4;
/// Not supported.
pub const VIX_E_NOT_SUPPORTED: VixError = 6;
/// The file is read-only.
pub const VIX_E_FILE_READ_ONLY: VixError = 11;
/// A buffer is too small.
pub const VIX_E_BUFFER_TOOSMALL: VixError = 24;
/// Authentication failed.
pub const VIX_E_AUTHENTICATION_FAIL: VixError = 35;
/// Invalid handle.
pub const VIX_E_INVALID_HANDLE: VixError = 1000;
/// A sector lies beyond the end of the disk.
pub const VIX_E_DISK_OUTOFRANGE: VixError = 16007;
/// A metadata key was not found.
pub const VIX_E_DISK_KEY_NOTFOUND: VixError = 16052;
/// Synchronous and asynchronous I/O were mixed on one handle.
pub const VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED: VixError = 26000;

/// `VIX_ERROR_CODE(e)`: the code without the extra bits.
pub const fn vix_error_code(err: VixError) -> u16 {
    (err & 0xFFFF) as u16
}

/// `VIXDISKLIB_SECTOR_SIZE`.
pub const SECTOR_SIZE: u64 = 512;
/// `VIXDISKLIB_FLAG_OPEN_UNBUFFERED`.
pub const FLAG_OPEN_UNBUFFERED: u32 = 1;
/// `VIXDISKLIB_FLAG_OPEN_SINGLE_LINK`.
pub const FLAG_OPEN_SINGLE_LINK: u32 = 2;
/// `VIXDISKLIB_FLAG_OPEN_READ_ONLY`.
pub const FLAG_OPEN_READ_ONLY: u32 = 4;
/// `VIXDISKLIB_MIN_CHUNK_SIZE`: `QueryAllocatedBlocks` granularity in sectors (64 KiB).
pub const MIN_CHUNK_SIZE: u64 = 128;
/// `VIXDISKLIB_MAX_CHUNK_NUMBER`: chunks per `QueryAllocatedBlocks` call.
pub const MAX_CHUNK_NUMBER: u64 = 512 * 1024;

/// `VIXDISKLIB_CRED_UID`.
pub const CRED_UID: c_int = 1;
/// `VIXDISKLIB_CRED_SESSIONID`.
pub const CRED_SESSIONID: c_int = 2;
/// `VIXDISKLIB_CRED_TICKETID`.
pub const CRED_TICKETID: c_int = 3;
/// `VIXDISKLIB_CRED_UNKNOWN`.
pub const CRED_UNKNOWN: c_int = 256;
/// `VIXDISKLIB_SPEC_VMX`.
pub const SPEC_VMX: c_int = 0;
/// `VIXDISKLIB_SPEC_VSTORAGE_OBJECT`.
pub const SPEC_VSTORAGE_OBJECT: c_int = 1;

/// `VixDiskLibUidPasswdCreds`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VixDiskLibUidPasswdCreds {
    /// User name.
    pub user_name: *mut c_char,
    /// Password.
    pub password: *mut c_char,
}

/// `VixDiskLibSessionIdCreds`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VixDiskLibSessionIdCreds {
    /// The `vmware_soap_session` cookie.
    pub cookie: *mut c_char,
    /// User name.
    pub user_name: *mut c_char,
    /// Session key.
    pub key: *mut c_char,
}

/// The `creds` union of `VixDiskLibConnectParams`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union VixDiskLibCreds {
    /// `VIXDISKLIB_CRED_UID`.
    pub uid: VixDiskLibUidPasswdCreds,
    /// `VIXDISKLIB_CRED_SESSIONID`.
    pub session_id: VixDiskLibSessionIdCreds,
    /// The ticket (`VIXDISKLIB_CRED_TICKETID`).
    pub reserved2: *mut c_void,
}

impl fmt::Debug for VixDiskLibCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VixDiskLibCreds { <union> }")
    }
}

/// `VixDiskLibVStorageObjectSpec` (first-class disks).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VixDiskLibVStorageObjectSpec {
    /// Object id.
    pub id: *mut c_char,
    /// Datastore MoRef.
    pub datastore_mo_ref: *mut c_char,
    /// Snapshot id.
    pub ss_id: *mut c_char,
}

/// The `spec` union of `VixDiskLibConnectParams`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union VixDiskLibSpec {
    /// `VIXDISKLIB_SPEC_VSTORAGE_OBJECT`.
    pub v_storage_obj_spec: VixDiskLibVStorageObjectSpec,
}

impl fmt::Debug for VixDiskLibSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VixDiskLibSpec { <union> }")
    }
}

/// `VixDiskLibConnectParams` as of VDDK 7 (128 bytes). Older libraries read only a prefix;
/// newer ones may be larger, which is why `VixDiskLib_AllocateConnectParams` is preferred.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VixDiskLibConnectParams {
    /// The VM, e.g. `moref=vm-16`.
    pub vmx_spec: *mut c_char,
    /// vCenter/ESXi host name.
    pub server_name: *mut c_char,
    /// SHA-1 thumbprint of the server certificate.
    pub thumb_print: *mut c_char,
    /// Reserved (`privateUse` in old headers).
    pub reserved1: c_long,
    /// `VIXDISKLIB_CRED_*`.
    pub cred_type: c_int,
    /// Credentials, as selected by `cred_type`.
    pub creds: VixDiskLibCreds,
    /// Authentication port (0 = 443).
    pub port: u32,
    /// NFC port (0 = 902).
    pub nfc_host_port: u32,
    /// Reserved.
    pub reserved3: *mut c_char,
    /// Reserved.
    pub reserved4: [c_char; 8],
    /// Reserved.
    pub reserved5: *mut c_void,
    /// First-class disk spec.
    pub spec: VixDiskLibSpec,
    /// `VIXDISKLIB_SPEC_*`.
    pub spec_type: c_int,
}

impl VixDiskLibConnectParams {
    /// All fields zero/NULL, as `calloc` would return them.
    pub fn zeroed() -> Self {
        // SAFETY: every field is an integer, a raw pointer, a char array or a union of raw
        // pointers; all-zero bytes are a valid value (0 / NULL) for each of them.
        unsafe { std::mem::zeroed() }
    }
}

/// `VixDiskLibGeometry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VixDiskLibGeometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

/// `VixDiskLibInfo` as of VDDK 7 (64 bytes); the two sector sizes do not exist before VDDK 7.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VixDiskLibInfo {
    /// BIOS geometry.
    pub bios_geo: VixDiskLibGeometry,
    /// Physical geometry.
    pub phys_geo: VixDiskLibGeometry,
    /// Size in sectors.
    pub capacity: u64,
    /// `VIXDISKLIB_ADAPTER_*`.
    pub adapter_type: c_int,
    /// Base disk plus redo logs.
    pub num_links: c_int,
    /// Parent of a child disk.
    pub parent_file_name_hint: *mut c_char,
    /// Disk UUID.
    pub uuid: *mut c_char,
    /// Logical sector size (VDDK ≥ 7).
    pub logical_sector_size: u32,
    /// Physical sector size (VDDK ≥ 7).
    pub physical_sector_size: u32,
}

/// `VixDiskLibBlock`: a range in sectors.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VixDiskLibBlock {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub length: u64,
}

/// `VixDiskLibBlockList`: `num_blocks` entries starting at `blocks` (a C flexible array).
#[repr(C)]
#[derive(Debug)]
pub struct VixDiskLibBlockList {
    /// Number of entries.
    pub num_blocks: u32,
    /// The first entry; the others follow it in memory.
    pub blocks: [VixDiskLibBlock; 1],
}

/// `VixDiskLibCreateParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VixDiskLibCreateParams {
    /// `VIXDISKLIB_DISK_*`.
    pub disk_type: c_int,
    /// `VIXDISKLIB_ADAPTER_*`.
    pub adapter_type: c_int,
    /// `VIXDISKLIB_HWVERSION_*`.
    pub hw_version: u16,
    /// Size in sectors.
    pub capacity: u64,
    /// Logical sector size (0 = default).
    pub logical_sector_size: u32,
    /// Physical sector size (0 = default).
    pub physical_sector_size: u32,
}

/// Compile-time check of a `#[repr(C)]` type against the C layout: `Type = size { field: offset }`,
/// either part optional.
#[cfg(target_pointer_width = "64")]
macro_rules! assert_layout {
    ($ty:ident $(= $size:literal)? $({ $($field:ident: $offset:literal),* $(,)? })?) => {
        $(assert!(size_of::<$ty>() == $size);)?
        $($(assert!(offset_of!($ty, $field) == $offset);)*)?
    };
}

// Sizes and offsets gcc 12 reports for nbdkit's copy of the VDDK 7 header on x86-64 Linux.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert_layout!(VixDiskLibConnectParams = 128 {
        vmx_spec: 0,
        server_name: 8,
        thumb_print: 16,
        reserved1: 24,
        cred_type: 32,
        creds: 40,
        port: 64,
        nfc_host_port: 68,
        reserved3: 72,
        reserved4: 80,
        reserved5: 88,
        spec: 96,
        spec_type: 120,
    });
    assert_layout!(VixDiskLibCreds = 24);
    assert_layout!(VixDiskLibSpec = 24);
    assert_layout!(VixDiskLibGeometry = 12);
    assert_layout!(VixDiskLibInfo = 64 {
        phys_geo: 12,
        capacity: 24,
        adapter_type: 32,
        num_links: 36,
        parent_file_name_hint: 40,
        uuid: 48,
        logical_sector_size: 56,
        physical_sector_size: 60,
    });
    assert_layout!(VixDiskLibBlock = 16);
    assert_layout!(VixDiskLibBlockList { blocks: 8 });
    assert_layout!(VixDiskLibCreateParams = 32 {
        hw_version: 8,
        capacity: 16,
        logical_sector_size: 24,
        physical_sector_size: 28,
    });
};

/// `VixDiskLibGenericLogFunc`: `void (*)(const char *fmt, va_list args)`; see the module docs
/// for why `va_list` is a pointer here.
pub type LogFn = unsafe extern "C" fn(fmt: *const c_char, args: *mut c_void);
/// `VixDiskLibCompletionCB` (VDDK ≥ 6.5): `void (*)(void *cbData, VixError result)`.
pub type CompletionFn = unsafe extern "C" fn(data: *mut c_void, result: VixError);

/// `VixDiskLib_InitEx(major, minor, log, warn, panic, libDir, configFile)`.
pub type InitExFn = unsafe extern "C" fn(
    major: u32,
    minor: u32,
    log: Option<LogFn>,
    warn: Option<LogFn>,
    panic: Option<LogFn>,
    lib_dir: *const c_char,
    config_file: *const c_char,
) -> VixError;
/// `VixDiskLib_Exit()`.
pub type ExitFn = unsafe extern "C" fn();
/// `VixDiskLib_ListTransportModes()`: a static string.
pub type ListTransportModesFn = unsafe extern "C" fn() -> *const c_char;
/// `VixDiskLib_GetErrorText(err, locale)`; free with `FreeErrorText`.
pub type GetErrorTextFn = unsafe extern "C" fn(err: VixError, locale: *const c_char) -> *mut c_char;
/// `VixDiskLib_FreeErrorText(text)`.
pub type FreeErrorTextFn = unsafe extern "C" fn(text: *mut c_char);
/// `VixDiskLib_AllocateConnectParams()` (VDDK ≥ 6.7).
pub type AllocateConnectParamsFn = unsafe extern "C" fn() -> *mut VixDiskLibConnectParams;
/// `VixDiskLib_FreeConnectParams(params)`.
pub type FreeConnectParamsFn = unsafe extern "C" fn(params: *mut VixDiskLibConnectParams);
/// `VixDiskLib_ConnectEx(params, readOnly, snapshotRef, transportModes, connection*)`.
pub type ConnectExFn = unsafe extern "C" fn(
    params: *const VixDiskLibConnectParams,
    read_only: c_char,
    snapshot_ref: *const c_char,
    transport_modes: *const c_char,
    connection: *mut VixDiskLibConnection,
) -> VixError;
/// `VixDiskLib_Disconnect(connection)`.
pub type DisconnectFn = unsafe extern "C" fn(connection: VixDiskLibConnection) -> VixError;
/// `VixDiskLib_Open(connection, path, flags, handle*)`.
pub type OpenFn = unsafe extern "C" fn(
    connection: VixDiskLibConnection,
    path: *const c_char,
    flags: u32,
    handle: *mut VixDiskLibHandle,
) -> VixError;
/// `VixDiskLib_Close(handle)`.
pub type CloseFn = unsafe extern "C" fn(handle: VixDiskLibHandle) -> VixError;
/// `VixDiskLib_GetTransportMode(handle)`: a static string.
pub type GetTransportModeFn = unsafe extern "C" fn(handle: VixDiskLibHandle) -> *const c_char;
/// `VixDiskLib_GetInfo(handle, info**)`; free with `FreeInfo`.
pub type GetInfoFn =
    unsafe extern "C" fn(handle: VixDiskLibHandle, info: *mut *mut VixDiskLibInfo) -> VixError;
/// `VixDiskLib_FreeInfo(info)`.
pub type FreeInfoFn = unsafe extern "C" fn(info: *mut VixDiskLibInfo);
/// `VixDiskLib_Read(handle, startSector, numSectors, buf)`.
pub type ReadFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *mut u8,
) -> VixError;
/// `VixDiskLib_Write(handle, startSector, numSectors, buf)`.
pub type WriteFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *const u8,
) -> VixError;
/// `VixDiskLib_ReadAsync(handle, startSector, numSectors, buf, callback, data)`.
pub type ReadAsyncFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *mut u8,
    callback: Option<CompletionFn>,
    data: *mut c_void,
) -> VixError;
/// `VixDiskLib_WriteAsync(handle, startSector, numSectors, buf, callback, data)`.
pub type WriteAsyncFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    buf: *const u8,
    callback: Option<CompletionFn>,
    data: *mut c_void,
) -> VixError;
/// `VixDiskLib_Wait(handle)`: waits for every asynchronous request on the handle.
pub type WaitFn = unsafe extern "C" fn(handle: VixDiskLibHandle) -> VixError;
/// `VixDiskLib_Flush(handle)`.
pub type FlushFn = unsafe extern "C" fn(handle: VixDiskLibHandle) -> VixError;
/// `VixDiskLib_QueryAllocatedBlocks(handle, startSector, numSectors, chunkSize, list**)`.
pub type QueryAllocatedBlocksFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    start: u64,
    count: u64,
    chunk_size: u64,
    list: *mut *mut VixDiskLibBlockList,
) -> VixError;
/// `VixDiskLib_FreeBlockList(list)`.
pub type FreeBlockListFn = unsafe extern "C" fn(list: *mut VixDiskLibBlockList) -> VixError;
/// `VixDiskLib_PrepareForAccess(params, identity)`.
pub type PrepareForAccessFn = unsafe extern "C" fn(
    params: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError;
/// `VixDiskLib_EndAccess(params, identity)`.
pub type EndAccessFn = unsafe extern "C" fn(
    params: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError;
/// `VixDiskLib_Cleanup(params, numCleanedUp*, numRemaining*)`.
pub type CleanupFn = unsafe extern "C" fn(
    params: *const VixDiskLibConnectParams,
    cleaned_up: *mut u32,
    remaining: *mut u32,
) -> VixError;
/// `VixDiskLib_GetMetadataKeys(handle, keys, maxLen, requiredLen*)`: NUL-separated keys.
pub type GetMetadataKeysFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    keys: *mut c_char,
    max_len: usize,
    required_len: *mut usize,
) -> VixError;
/// `VixDiskLib_ReadMetadata(handle, key, buf, bufLen, requiredLen*)`.
pub type ReadMetadataFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    key: *const c_char,
    buf: *mut c_char,
    buf_len: usize,
    required_len: *mut usize,
) -> VixError;
/// `VixDiskLib_WriteMetadata(handle, key, value)`.
pub type WriteMetadataFn = unsafe extern "C" fn(
    handle: VixDiskLibHandle,
    key: *const c_char,
    value: *const c_char,
) -> VixError;

/// Times one VDDK call for [`call_stats`](super::call_stats); records when dropped.
struct CallTimer {
    function: &'static str,
    bytes: u64,
    started: std::time::Instant,
}

impl CallTimer {
    fn start(function: &'static str, bytes: u64) -> Self {
        CallTimer {
            function,
            bytes,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        super::record_call(self.function, self.started.elapsed(), self.bytes);
    }
}

/// A failed VDDK call: which function, and its `VixError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vix {
    pub(crate) function: &'static str,
    pub(crate) code: VixError,
}

fn check(function: &'static str, code: VixError) -> Result<(), Vix> {
    if code == VIX_OK {
        Ok(())
    } else {
        Err(Vix { function, code })
    }
}

/// Why [`Library::load`] failed.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// `dlopen` failed (message from `dlerror`).
    Open(String),
    /// A function every supported VDDK (≥ 6.5) has is missing.
    MissingSymbol(&'static str),
}

/// A C string that is overwritten with zeros when dropped, for everything handed to VDDK in
/// connection parameters (credentials among them).
pub(crate) struct ZeroingCString(Vec<u8>);

impl ZeroingCString {
    /// `None` if `text` contains a NUL byte.
    pub(crate) fn new(text: &str) -> Option<Self> {
        if text.as_bytes().contains(&0) {
            return None;
        }
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0);
        Some(ZeroingCString(bytes))
    }

    pub(crate) fn as_c_str(&self) -> &CStr {
        // The constructor appended exactly one NUL and rejected interior ones.
        CStr::from_bytes_with_nul(&self.0).unwrap_or_default()
    }

    fn as_mut_ptr(&self) -> *mut c_char {
        // VDDK declares these fields `char *` but never writes through them.
        self.as_c_str().as_ptr().cast_mut()
    }
}

impl Drop for ZeroingCString {
    fn drop(&mut self) {
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference into the vector; a volatile
            // write keeps the compiler from removing the stores to memory about to be freed.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for ZeroingCString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<c-string>")
    }
}

fn opt_ptr(s: &Option<ZeroingCString>) -> *mut c_char {
    s.as_ref()
        .map_or(std::ptr::null_mut(), ZeroingCString::as_mut_ptr)
}

/// Credentials as C strings.
#[derive(Debug)]
pub(crate) enum CredSpec {
    None,
    Uid {
        user: ZeroingCString,
        password: ZeroingCString,
    },
    Session {
        cookie: ZeroingCString,
        user: ZeroingCString,
        key: ZeroingCString,
    },
}

/// Everything `VixDiskLibConnectParams` points to, owned, zeroed on drop.
#[derive(Debug)]
pub(crate) struct ConnectSpec {
    pub(crate) vmx_spec: Option<ZeroingCString>,
    pub(crate) server_name: Option<ZeroingCString>,
    pub(crate) thumbprint: Option<ZeroingCString>,
    pub(crate) creds: CredSpec,
    pub(crate) port: u32,
    pub(crate) nfc_host_port: u32,
}

impl ConnectSpec {
    fn fill(&self, p: &mut VixDiskLibConnectParams) {
        p.vmx_spec = opt_ptr(&self.vmx_spec);
        p.server_name = opt_ptr(&self.server_name);
        p.thumb_print = opt_ptr(&self.thumbprint);
        p.port = self.port;
        p.nfc_host_port = self.nfc_host_port;
        p.spec_type = SPEC_VMX;
        match &self.creds {
            // Local connections leave the type zero, as a calloc'ed struct has it.
            CredSpec::None => p.cred_type = 0,
            CredSpec::Uid { user, password } => {
                p.cred_type = CRED_UID;
                p.creds.uid = VixDiskLibUidPasswdCreds {
                    user_name: user.as_mut_ptr(),
                    password: password.as_mut_ptr(),
                };
            }
            CredSpec::Session { cookie, user, key } => {
                p.cred_type = CRED_SESSIONID;
                p.creds.session_id = VixDiskLibSessionIdCreds {
                    cookie: cookie.as_mut_ptr(),
                    user_name: user.as_mut_ptr(),
                    key: key.as_mut_ptr(),
                };
            }
        }
    }
}

/// The functions every VDDK since 6.5 exports, resolved at load time.
struct Required {
    init_ex: InitExFn,
    exit: ExitFn,
    list_transport_modes: ListTransportModesFn,
    get_error_text: GetErrorTextFn,
    free_error_text: FreeErrorTextFn,
    free_connect_params: FreeConnectParamsFn,
    connect_ex: ConnectExFn,
    disconnect: DisconnectFn,
    open: OpenFn,
    close: CloseFn,
    get_transport_mode: GetTransportModeFn,
    get_info: GetInfoFn,
    free_info: FreeInfoFn,
    read: ReadFn,
    write: WriteFn,
    flush: FlushFn,
}

/// Functions that newer libraries add or that this crate can do without, looked up on first
/// use (`None` = absent).
#[derive(Default)]
struct Optional {
    allocate_connect_params: OnceLock<Option<AllocateConnectParamsFn>>,
    read_async: OnceLock<Option<ReadAsyncFn>>,
    write_async: OnceLock<Option<WriteAsyncFn>>,
    wait: OnceLock<Option<WaitFn>>,
    query_allocated_blocks: OnceLock<Option<QueryAllocatedBlocksFn>>,
    free_block_list: OnceLock<Option<FreeBlockListFn>>,
    prepare_for_access: OnceLock<Option<PrepareForAccessFn>>,
    end_access: OnceLock<Option<EndAccessFn>>,
    cleanup: OnceLock<Option<CleanupFn>>,
    get_metadata_keys: OnceLock<Option<GetMetadataKeysFn>>,
    read_metadata: OnceLock<Option<ReadMetadataFn>>,
    write_metadata: OnceLock<Option<WriteMetadataFn>>,
}

/// Looks up a symbol of type `$ty`.
macro_rules! symbol {
    ($lib:expr, $ty:ty, $name:literal) => {{
        // SAFETY: `$ty` is the exact C signature VDDK's header gives `$name` (the stand-in library
        // is checked against these same types), and the returned pointer is used only while
        // the library stays loaded: `Library` owns the handle and is never unloaded while a
        // copy of the pointer can be called.
        unsafe { $lib.get::<$ty>($name.as_bytes()) }
            .ok()
            .map(|s| *s)
    }};
}

macro_rules! optional {
    ($self:expr, $field:ident, $ty:ty, $name:literal) => {
        *$self
            .optional
            .$field
            .get_or_init(|| symbol!($self.handle, $ty, $name))
    };
}

/// A loaded `libvixDiskLib.so`: its function table and the lock that keeps `ConnectEx`,
/// `Open`, `Close` and `Disconnect` from overlapping.
pub(crate) struct Library {
    required: Required,
    optional: Optional,
    open_close: Mutex<()>,
    // Last, so the function pointers above are never used after the library is unloaded.
    handle: libloading::os::unix::Library,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library").finish_non_exhaustive()
    }
}

impl Library {
    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)` and resolves the required functions.
    pub(crate) fn load(path: &Path) -> Result<Library, LoadError> {
        use libloading::os::unix::{Library as Dl, RTLD_LOCAL, RTLD_NOW};
        // SAFETY: loading runs the library's initialisers. VDDK's (and the stand-in's) do not
        // depend on anything this process must have set up first; this is the documented way
        // to use VDDK without linking it.
        let handle = unsafe { Dl::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| LoadError::Open(e.to_string()))?;
        macro_rules! required {
            ($ty:ty, $name:literal) => {
                symbol!(handle, $ty, $name).ok_or(LoadError::MissingSymbol($name))?
            };
        }
        let required = Required {
            init_ex: required!(InitExFn, "VixDiskLib_InitEx"),
            exit: required!(ExitFn, "VixDiskLib_Exit"),
            list_transport_modes: required!(ListTransportModesFn, "VixDiskLib_ListTransportModes"),
            get_error_text: required!(GetErrorTextFn, "VixDiskLib_GetErrorText"),
            free_error_text: required!(FreeErrorTextFn, "VixDiskLib_FreeErrorText"),
            free_connect_params: required!(FreeConnectParamsFn, "VixDiskLib_FreeConnectParams"),
            connect_ex: required!(ConnectExFn, "VixDiskLib_ConnectEx"),
            disconnect: required!(DisconnectFn, "VixDiskLib_Disconnect"),
            open: required!(OpenFn, "VixDiskLib_Open"),
            close: required!(CloseFn, "VixDiskLib_Close"),
            get_transport_mode: required!(GetTransportModeFn, "VixDiskLib_GetTransportMode"),
            get_info: required!(GetInfoFn, "VixDiskLib_GetInfo"),
            free_info: required!(FreeInfoFn, "VixDiskLib_FreeInfo"),
            read: required!(ReadFn, "VixDiskLib_Read"),
            write: required!(WriteFn, "VixDiskLib_Write"),
            flush: required!(FlushFn, "VixDiskLib_Flush"),
        };
        Ok(Library {
            required,
            optional: Optional::default(),
            open_close: Mutex::new(()),
            handle,
        })
    }

    fn open_close_lock(&self) -> MutexGuard<'_, ()> {
        self.open_close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `VixDiskLib_InitEx(6, 5, ...)` with this module's log trampolines, which hand every
    /// formatted message to `sink`. The caller makes sure this runs once per process.
    pub(crate) fn init_ex(
        &self,
        libdir: &CStr,
        config: Option<&CStr>,
        sink: fn(super::LogLevel, &str),
    ) -> Result<(), Vix> {
        // A later InitEx (impossible through the caller) must not replace the first sink.
        let _ = LOG_SINK.set(sink);
        let _timer = CallTimer::start("VixDiskLib_InitEx", 0);
        // SAFETY: the callbacks have the `VixDiskLibGenericLogFunc` ABI and never unwind;
        // libdir and config are NUL-terminated and outlive the call (VDDK copies them).
        let code = unsafe {
            (self.required.init_ex)(
                6,
                5,
                Some(log_trampoline),
                Some(warn_trampoline),
                Some(panic_trampoline),
                libdir.as_ptr(),
                config.map_or(std::ptr::null(), CStr::as_ptr),
            )
        };
        check("VixDiskLib_InitEx", code)
    }

    /// `VixDiskLib_Exit`. Taking `self` by value proves that no connection, disk or access
    /// guard (each holds an `Arc<Library>`) is left; the library is unloaded afterwards.
    pub(crate) fn exit(self) {
        // SAFETY: InitEx succeeded on this library (the caller only keeps initialised ones) and,
        // as `self` is owned, no handle of it can be used again.
        unsafe { (self.required.exit)() }
    }

    /// `VixDiskLib_ListTransportModes`, copied.
    pub(crate) fn list_transport_modes(&self) -> String {
        // SAFETY: takes no arguments; returns NULL or a static NUL-terminated string.
        let ptr = unsafe { (self.required.list_transport_modes)() };
        // SAFETY: `ptr` is NULL or the static string just returned.
        unsafe { copy_c_string(ptr) }.unwrap_or_default()
    }

    /// `VixDiskLib_GetErrorText` + `VixDiskLib_FreeErrorText`.
    pub(crate) fn error_text(&self, code: VixError) -> String {
        // SAFETY: any code is accepted; the locale must be NULL.
        let ptr = unsafe { (self.required.get_error_text)(code, std::ptr::null()) };
        // SAFETY: `ptr` is NULL or a string owned by VDDK until FreeErrorText.
        let text = unsafe { copy_c_string(ptr) };
        // SAFETY: `ptr` came from GetErrorText and is freed once; FreeErrorText accepts NULL.
        unsafe { (self.required.free_error_text)(ptr) };
        text.unwrap_or_else(|| format!("VixError {code}"))
    }

    /// Whether ReadAsync, WriteAsync and Wait are all there.
    pub(crate) fn has_async(&self) -> bool {
        optional!(self, read_async, ReadAsyncFn, "VixDiskLib_ReadAsync").is_some()
            && optional!(self, write_async, WriteAsyncFn, "VixDiskLib_WriteAsync").is_some()
            && optional!(self, wait, WaitFn, "VixDiskLib_Wait").is_some()
    }

    /// Whether QueryAllocatedBlocks and FreeBlockList are there.
    pub(crate) fn has_query_allocated_blocks(&self) -> bool {
        optional!(
            self,
            query_allocated_blocks,
            QueryAllocatedBlocksFn,
            "VixDiskLib_QueryAllocatedBlocks"
        )
        .is_some()
            && optional!(
                self,
                free_block_list,
                FreeBlockListFn,
                "VixDiskLib_FreeBlockList"
            )
            .is_some()
    }

    fn allocate_params(&self, spec: &ConnectSpec) -> ParamsAlloc {
        let allocate = optional!(
            self,
            allocate_connect_params,
            AllocateConnectParamsFn,
            "VixDiskLib_AllocateConnectParams"
        );
        // SAFETY: AllocateConnectParams takes no arguments and returns a zeroed struct (or NULL).
        let from_vddk = allocate.map(|f| unsafe { f() }).filter(|p| !p.is_null());
        let mut alloc = match from_vddk {
            Some(ptr) => ParamsAlloc::Vddk(ptr),
            None => ParamsAlloc::Owned(Box::new(VixDiskLibConnectParams::zeroed())),
        };
        let params = match &mut alloc {
            // SAFETY: a non-NULL struct from AllocateConnectParams, exclusively ours until
            // FreeConnectParams; it is at least as large as the VDDK 7 layout we write.
            ParamsAlloc::Vddk(ptr) => unsafe { &mut **ptr },
            ParamsAlloc::Owned(b) => &mut **b,
        };
        spec.fill(params);
        alloc
    }

    fn free_params(&self, alloc: ParamsAlloc) {
        if let ParamsAlloc::Vddk(ptr) = alloc {
            // SAFETY: allocated by AllocateConnectParams and freed exactly once.
            unsafe { (self.required.free_connect_params)(ptr) }
        }
    }

    /// `VixDiskLib_PrepareForAccess` (`Err(None)` if the library has no such function).
    pub(crate) fn prepare_for_access(
        &self,
        spec: &ConnectSpec,
        identity: &CStr,
    ) -> Result<(), Option<Vix>> {
        let f = optional!(
            self,
            prepare_for_access,
            PrepareForAccessFn,
            "VixDiskLib_PrepareForAccess"
        )
        .ok_or(None)?;
        let params = self.allocate_params(spec);
        let _timer = CallTimer::start("VixDiskLib_PrepareForAccess", 0);
        // SAFETY: the params and the strings they point to (owned by `spec`) and `identity`
        // live until the call returns.
        let code = unsafe { f(params.as_ptr(), identity.as_ptr()) };
        self.free_params(params);
        check("VixDiskLib_PrepareForAccess", code).map_err(Some)
    }

    /// `VixDiskLib_EndAccess` (`Err(None)` if absent).
    pub(crate) fn end_access(
        &self,
        spec: &ConnectSpec,
        identity: &CStr,
    ) -> Result<(), Option<Vix>> {
        let f = optional!(self, end_access, EndAccessFn, "VixDiskLib_EndAccess").ok_or(None)?;
        let params = self.allocate_params(spec);
        let _timer = CallTimer::start("VixDiskLib_EndAccess", 0);
        // SAFETY: as for PrepareForAccess.
        let code = unsafe { f(params.as_ptr(), identity.as_ptr()) };
        self.free_params(params);
        check("VixDiskLib_EndAccess", code).map_err(Some)
    }

    /// `VixDiskLib_Cleanup` → (cleaned up, remaining) (`Err(None)` if absent).
    pub(crate) fn cleanup(&self, spec: &ConnectSpec) -> Result<(u32, u32), Option<Vix>> {
        let f = optional!(self, cleanup, CleanupFn, "VixDiskLib_Cleanup").ok_or(None)?;
        let params = self.allocate_params(spec);
        let (mut cleaned, mut remaining) = (0u32, 0u32);
        let _timer = CallTimer::start("VixDiskLib_Cleanup", 0);
        // SAFETY: params valid for the call; the out-pointers point to live u32s.
        let code = unsafe { f(params.as_ptr(), &mut cleaned, &mut remaining) };
        self.free_params(params);
        check("VixDiskLib_Cleanup", code).map_err(Some)?;
        Ok((cleaned, remaining))
    }
}

/// Connection parameters allocated by VDDK (freed with FreeConnectParams) or, for libraries
/// older than 6.7, by us.
enum ParamsAlloc {
    Vddk(*mut VixDiskLibConnectParams),
    Owned(Box<VixDiskLibConnectParams>),
}

impl ParamsAlloc {
    fn as_ptr(&self) -> *const VixDiskLibConnectParams {
        match self {
            ParamsAlloc::Vddk(p) => *p,
            ParamsAlloc::Owned(b) => &**b,
        }
    }
}

/// A `VixDiskLibConnection`, disconnected on drop. The parameters and the strings they point
/// to stay alive until then, as nbdkit keeps them: VDDK may refer to them while connected.
pub(crate) struct RawConnection {
    lib: Arc<Library>,
    raw: VixDiskLibConnection,
    params: Option<ParamsAlloc>,
    _spec: ConnectSpec,
}

// SAFETY: a VDDK connection is not tied to the thread that made it (nbdkit opens disks on it
// from any thread); everything that touches it goes through `Library`'s open/close lock.
unsafe impl Send for RawConnection {}
// SAFETY: the only operations on a shared connection are Open (under the open/close lock) and,
// on drop, Disconnect (exclusive by then).
unsafe impl Sync for RawConnection {}

impl fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConnection")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl RawConnection {
    /// `VixDiskLib_ConnectEx`.
    pub(crate) fn connect(
        lib: &Arc<Library>,
        spec: ConnectSpec,
        read_only: bool,
        snapshot: Option<&CStr>,
        transports: Option<&CStr>,
    ) -> Result<RawConnection, Vix> {
        let params = lib.allocate_params(&spec);
        let mut raw: VixDiskLibConnection = std::ptr::null_mut();
        let code = {
            let _serial = lib.open_close_lock();
            let _timer = CallTimer::start("VixDiskLib_ConnectEx", 0);
            // SAFETY: params and every string they point to (owned by `spec`, moved into the
            // returned connection) outlive the connection; snapshot/transports are NULL or
            // NUL-terminated; `raw` is a valid out-pointer.
            unsafe {
                (lib.required.connect_ex)(
                    params.as_ptr(),
                    c_char::from(read_only),
                    snapshot.map_or(std::ptr::null(), CStr::as_ptr),
                    transports.map_or(std::ptr::null(), CStr::as_ptr),
                    &mut raw,
                )
            }
        };
        if let Err(e) = check("VixDiskLib_ConnectEx", code) {
            lib.free_params(params);
            return Err(e);
        }
        Ok(RawConnection {
            lib: Arc::clone(lib),
            raw,
            params: Some(params),
            _spec: spec,
        })
    }
}

impl RawConnection {
    /// `VixDiskLib_Disconnect`, once: later calls (and the drop) do nothing. The caller owns
    /// the connection, so every disk opened on it (each holds an `Arc`) is closed by now.
    pub(crate) fn disconnect(&mut self) -> Result<(), Vix> {
        if self.raw.is_null() {
            return Ok(());
        }
        let code = {
            let _serial = self.lib.open_close_lock();
            let _timer = CallTimer::start("VixDiskLib_Disconnect", 0);
            // SAFETY: `raw` came from a successful ConnectEx and every disk opened on it holds an
            // `Arc<RawConnection>`, so all of them are closed by now; `raw` is nulled below, so
            // Disconnect runs once.
            unsafe { (self.lib.required.disconnect)(self.raw) }
        };
        self.raw = std::ptr::null_mut();
        if let Some(params) = self.params.take() {
            self.lib.free_params(params);
        }
        check("VixDiskLib_Disconnect", code)
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        if let Err(e) = self.disconnect() {
            super::log_library_error(e.function, e.code, &self.lib);
        }
    }
}

/// What `VixDiskLib_GetInfo` returned, copied out of VDDK's struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawInfo {
    pub(crate) bios_geo: VixDiskLibGeometry,
    pub(crate) phys_geo: VixDiskLibGeometry,
    pub(crate) capacity_sectors: u64,
    pub(crate) adapter_type: i32,
    pub(crate) num_links: i32,
    pub(crate) parent_file_name_hint: Option<String>,
    pub(crate) uuid: Option<String>,
    /// Only read when the caller says the library is VDDK ≥ 7 (older structs end before).
    pub(crate) sector_sizes: Option<(u32, u32)>,
}

/// An open `VixDiskLibHandle`, closed on drop (after waiting for asynchronous requests).
pub(crate) struct RawDisk {
    conn: Arc<RawConnection>,
    raw: VixDiskLibHandle,
    async_outstanding: bool,
}

// SAFETY: VDDK disk handles are not bound to a thread; only access must be serialised, which
// `&mut self` on every operation guarantees.
unsafe impl Send for RawDisk {}

impl fmt::Debug for RawDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDisk")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

/// Called from the completion trampoline with the result and the buffer.
pub(crate) type Completion = Box<dyn FnOnce(VixError, Vec<u8>) + Send>;

/// What an asynchronous request owns while VDDK works on it.
struct AsyncRequest {
    state: Mutex<Option<(Vec<u8>, Completion)>>,
}

impl RawDisk {
    fn lib(&self) -> &Library {
        &self.conn.lib
    }

    /// `VixDiskLib_Open`.
    pub(crate) fn open(conn: &Arc<RawConnection>, path: &CStr, flags: u32) -> Result<RawDisk, Vix> {
        let mut raw: VixDiskLibHandle = std::ptr::null_mut();
        let code = {
            let _serial = conn.lib.open_close_lock();
            let _timer = CallTimer::start("VixDiskLib_Open", 0);
            // SAFETY: `conn.raw` is a live connection (we hold an Arc); path is NUL-terminated;
            // `raw` is a valid out-pointer.
            unsafe { (conn.lib.required.open)(conn.raw, path.as_ptr(), flags, &mut raw) }
        };
        check("VixDiskLib_Open", code)?;
        Ok(RawDisk {
            conn: Arc::clone(conn),
            raw,
            async_outstanding: false,
        })
    }

    /// `VixDiskLib_GetTransportMode`, copied.
    pub(crate) fn transport_mode(&mut self) -> Option<String> {
        // SAFETY: a live handle; the result is NULL or a static string.
        let ptr = unsafe { (self.lib().required.get_transport_mode)(self.raw) };
        // SAFETY: NULL or a static NUL-terminated string.
        unsafe { copy_c_string(ptr) }
    }

    /// `VixDiskLib_GetInfo` + `FreeInfo`. `vddk7` says whether the sector-size fields exist.
    pub(crate) fn info(&mut self, vddk7: bool) -> Result<RawInfo, Vix> {
        self.wait()?;
        let mut ptr: *mut VixDiskLibInfo = std::ptr::null_mut();
        let _timer = CallTimer::start("VixDiskLib_GetInfo", 0);
        // SAFETY: a live handle and a valid out-pointer.
        let code = unsafe { (self.lib().required.get_info)(self.raw, &mut ptr) };
        check("VixDiskLib_GetInfo", code)?;
        if ptr.is_null() {
            return Err(Vix {
                function: "VixDiskLib_GetInfo",
                code: VIX_E_FAIL,
            });
        }
        // SAFETY: GetInfo succeeded, so `ptr` points to an info struct owned by VDDK until
        // FreeInfo. Fields are read one by one through the raw pointer (no reference to the
        // whole struct is made), and the sector sizes only from VDDK >= 7, whose struct has
        // them; older ones end before them.
        let info = unsafe {
            RawInfo {
                bios_geo: (*ptr).bios_geo,
                phys_geo: (*ptr).phys_geo,
                capacity_sectors: (*ptr).capacity,
                adapter_type: (*ptr).adapter_type,
                num_links: (*ptr).num_links,
                parent_file_name_hint: copy_c_string((*ptr).parent_file_name_hint),
                uuid: copy_c_string((*ptr).uuid),
                sector_sizes: if vddk7 {
                    Some(((*ptr).logical_sector_size, (*ptr).physical_sector_size))
                } else {
                    None
                },
            }
        };
        // SAFETY: `ptr` came from GetInfo and is freed once.
        unsafe { (self.lib().required.free_info)(ptr) };
        Ok(info)
    }

    /// Waits for outstanding asynchronous requests, so a synchronous call never mixes with them
    /// (`VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED`).
    pub(crate) fn wait(&mut self) -> Result<(), Vix> {
        if !self.async_outstanding {
            return Ok(());
        }
        let Some(wait) = optional!(self.lib(), wait, WaitFn, "VixDiskLib_Wait") else {
            return Ok(());
        };
        let _timer = CallTimer::start("VixDiskLib_Wait", 0);
        // SAFETY: a live handle.
        let code = unsafe { wait(self.raw) };
        self.async_outstanding = false;
        check("VixDiskLib_Wait", code)
    }

    fn sectors(function: &'static str, len: usize) -> Result<u64, Vix> {
        if !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(Vix {
                function,
                code: VIX_E_INVALID_ARG,
            });
        }
        Ok(len as u64 / SECTOR_SIZE)
    }

    /// `VixDiskLib_Read` of `buf.len() / 512` sectors (the length must be whole sectors).
    pub(crate) fn read(&mut self, start_sector: u64, buf: &mut [u8]) -> Result<(), Vix> {
        let count = Self::sectors("VixDiskLib_Read", buf.len())?;
        self.wait()?;
        let _timer = CallTimer::start("VixDiskLib_Read", buf.len() as u64);
        // SAFETY: a live handle; `buf` is writable for exactly `count` sectors.
        let code =
            unsafe { (self.lib().required.read)(self.raw, start_sector, count, buf.as_mut_ptr()) };
        check("VixDiskLib_Read", code)
    }

    /// `VixDiskLib_Write` of `buf.len() / 512` sectors.
    pub(crate) fn write(&mut self, start_sector: u64, buf: &[u8]) -> Result<(), Vix> {
        let count = Self::sectors("VixDiskLib_Write", buf.len())?;
        self.wait()?;
        let _timer = CallTimer::start("VixDiskLib_Write", buf.len() as u64);
        // SAFETY: a live handle; `buf` is readable for exactly `count` sectors.
        let code =
            unsafe { (self.lib().required.write)(self.raw, start_sector, count, buf.as_ptr()) };
        check("VixDiskLib_Write", code)
    }

    /// `VixDiskLib_Flush` (after Wait).
    pub(crate) fn flush(&mut self) -> Result<(), Vix> {
        self.wait()?;
        let _timer = CallTimer::start("VixDiskLib_Flush", 0);
        // SAFETY: a live handle.
        let code = unsafe { (self.lib().required.flush)(self.raw) };
        check("VixDiskLib_Flush", code)
    }

    /// `VixDiskLib_ReadAsync` (`write == false`) or `WriteAsync` of `buf`. On `Ok` the
    /// completion runs exactly once, possibly before this returns and possibly on a VDDK thread;
    /// on `Err` it never runs and the buffer and completion come back.
    #[allow(clippy::type_complexity)]
    pub(crate) fn submit(
        &mut self,
        write: bool,
        start_sector: u64,
        buf: Vec<u8>,
        done: Completion,
    ) -> Result<(), (Vix, Vec<u8>, Completion)> {
        let function = if write {
            "VixDiskLib_WriteAsync"
        } else {
            "VixDiskLib_ReadAsync"
        };
        let count = match Self::sectors(function, buf.len()) {
            Ok(n) => n,
            Err(e) => return Err((e, buf, done)),
        };
        let (read_fn, write_fn) = (
            optional!(self.lib(), read_async, ReadAsyncFn, "VixDiskLib_ReadAsync"),
            optional!(
                self.lib(),
                write_async,
                WriteAsyncFn,
                "VixDiskLib_WriteAsync"
            ),
        );
        if (write && write_fn.is_none()) || (!write && read_fn.is_none()) {
            return Err((
                Vix {
                    function,
                    code: VIX_E_NOT_SUPPORTED,
                },
                buf,
                done,
            ));
        }
        let mut buf = buf;
        let data_ptr = buf.as_mut_ptr();
        let request = Arc::new(AsyncRequest {
            state: Mutex::new(Some((buf, done))),
        });
        // One reference for the completion callback, released by it (or below if it never runs).
        let callback_ref = Arc::into_raw(Arc::clone(&request)) as *mut c_void;
        let timer = CallTimer::start(function, count * SECTOR_SIZE);
        // SAFETY: a live handle; `data_ptr` points into the heap buffer of the Vec that
        // `request` owns, which is neither moved nor freed until the completion has run (the
        // completion takes it out of `request`); the callback has the VixDiskLibCompletionCB
        // ABI, never unwinds, and releases `callback_ref` exactly once.
        let code = unsafe {
            match (write, read_fn, write_fn) {
                (false, Some(f), _) => f(
                    self.raw,
                    start_sector,
                    count,
                    data_ptr,
                    Some(completion_trampoline),
                    callback_ref,
                ),
                (true, _, Some(f)) => f(
                    self.raw,
                    start_sector,
                    count,
                    data_ptr,
                    Some(completion_trampoline),
                    callback_ref,
                ),
                _ => VIX_E_NOT_SUPPORTED,
            }
        };
        drop(timer);
        if code == VIX_ASYNC || code == VIX_OK {
            // Queued (VIX_ASYNC) or, from a library that says VIX_OK instead, done or queued:
            // either way the result comes through the callback, and the Wait before the next
            // synchronous call or Close collects it. Freeing the request here could free it
            // under a callback still to come.
            self.async_outstanding = true;
            return Ok(());
        }
        // An error: VDDK will not call back. If it did so anyway before failing, the state is
        // already taken and the callback released its reference.
        let taken = request
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some((buf, done)) => {
                // SAFETY: the callback did not run, so its reference is still unreleased;
                // release it here, once.
                drop(unsafe { Arc::from_raw(callback_ref as *const AsyncRequest) });
                Err((Vix { function, code }, buf, done))
            }
            None => {
                self.async_outstanding = true;
                Ok(())
            }
        }
    }

    /// `VixDiskLib_QueryAllocatedBlocks` → allocated (start sector, sector count) ranges.
    pub(crate) fn query_allocated_blocks(
        &mut self,
        start_sector: u64,
        num_sectors: u64,
        chunk_size: u64,
    ) -> Result<Vec<(u64, u64)>, Vix> {
        let function = "VixDiskLib_QueryAllocatedBlocks";
        let (Some(query), Some(free)) = (
            optional!(
                self.lib(),
                query_allocated_blocks,
                QueryAllocatedBlocksFn,
                "VixDiskLib_QueryAllocatedBlocks"
            ),
            optional!(
                self.lib(),
                free_block_list,
                FreeBlockListFn,
                "VixDiskLib_FreeBlockList"
            ),
        ) else {
            return Err(Vix {
                function,
                code: VIX_E_NOT_SUPPORTED,
            });
        };
        self.wait()?;
        let mut list: *mut VixDiskLibBlockList = std::ptr::null_mut();
        let _timer = CallTimer::start("VixDiskLib_QueryAllocatedBlocks", 0);
        // SAFETY: a live handle and a valid out-pointer.
        let code = unsafe { query(self.raw, start_sector, num_sectors, chunk_size, &mut list) };
        check(function, code)?;
        if list.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: QueryAllocatedBlocks succeeded, so `list` points to a block list owned by VDDK
        // holding `num_blocks` consecutive entries starting at `blocks` (a C flexible array);
        // the pointer to the array is derived from the list pointer, not from the one-element
        // Rust field, so reading past the first entry stays in the allocation.
        let blocks = unsafe {
            let n = (*list).num_blocks as usize;
            let first = std::ptr::addr_of!((*list).blocks).cast::<VixDiskLibBlock>();
            std::slice::from_raw_parts(first, n)
                .iter()
                .map(|b| (b.offset, b.length))
                .collect()
        };
        // SAFETY: `list` came from QueryAllocatedBlocks and is freed once.
        let _ = unsafe { free(list) };
        Ok(blocks)
    }

    /// `VixDiskLib_GetMetadataKeys`: the raw NUL-separated list (`Err(None)` if absent).
    pub(crate) fn metadata_keys(&mut self) -> Result<Vec<u8>, Option<Vix>> {
        let f = optional!(
            self.lib(),
            get_metadata_keys,
            GetMetadataKeysFn,
            "VixDiskLib_GetMetadataKeys"
        )
        .ok_or(None)?;
        self.wait().map_err(Some)?;
        let mut needed = 0usize;
        // SAFETY: a live handle; NULL keys with length 0 asks only for the size.
        let code = unsafe { f(self.raw, std::ptr::null_mut(), 0, &mut needed) };
        if code != VIX_OK && vix_error_code(code) != VIX_E_BUFFER_TOOSMALL as u16 {
            return Err(Some(Vix {
                function: "VixDiskLib_GetMetadataKeys",
                code,
            }));
        }
        let mut buf = vec![0u8; needed.max(1)];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let code = unsafe { f(self.raw, buf.as_mut_ptr().cast(), buf.len(), &mut needed) };
        check("VixDiskLib_GetMetadataKeys", code).map_err(Some)?;
        Ok(buf)
    }

    /// `VixDiskLib_ReadMetadata` (`Err(None)` if absent).
    pub(crate) fn read_metadata(&mut self, key: &CStr) -> Result<String, Option<Vix>> {
        let f = optional!(
            self.lib(),
            read_metadata,
            ReadMetadataFn,
            "VixDiskLib_ReadMetadata"
        )
        .ok_or(None)?;
        self.wait().map_err(Some)?;
        let mut buf = vec![0u8; 256];
        for _ in 0..4 {
            let mut needed = 0usize;
            // SAFETY: a live handle; key NUL-terminated; `buf` writable for its length.
            let code = unsafe {
                f(
                    self.raw,
                    key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut needed,
                )
            };
            if vix_error_code(code) == VIX_E_BUFFER_TOOSMALL as u16 && needed > buf.len() {
                buf.resize(needed, 0);
                continue;
            }
            check("VixDiskLib_ReadMetadata", code).map_err(Some)?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        Err(Some(Vix {
            function: "VixDiskLib_ReadMetadata",
            code: VIX_E_BUFFER_TOOSMALL,
        }))
    }

    /// `VixDiskLib_WriteMetadata` (`Err(None)` if absent).
    pub(crate) fn write_metadata(&mut self, key: &CStr, value: &CStr) -> Result<(), Option<Vix>> {
        let f = optional!(
            self.lib(),
            write_metadata,
            WriteMetadataFn,
            "VixDiskLib_WriteMetadata"
        )
        .ok_or(None)?;
        self.wait().map_err(Some)?;
        // SAFETY: a live handle; both strings NUL-terminated.
        let code = unsafe { f(self.raw, key.as_ptr(), value.as_ptr()) };
        check("VixDiskLib_WriteMetadata", code).map_err(Some)
    }
}

impl RawDisk {
    /// Waits for asynchronous requests, then `VixDiskLib_Close`, once: later calls (and the
    /// drop) do nothing. The handle is closed even when Wait failed; the first error is
    /// returned.
    pub(crate) fn close(&mut self) -> Result<(), Vix> {
        if self.raw.is_null() {
            return Ok(());
        }
        let waited = self.wait();
        let code = {
            let _serial = self.lib().open_close_lock();
            let _timer = CallTimer::start("VixDiskLib_Close", 0);
            // SAFETY: `raw` came from a successful Open, no request is outstanding (Wait above),
            // and `raw` is nulled below so Close runs once; the connection is still alive (we
            // hold an Arc to it).
            unsafe { (self.lib().required.close)(self.raw) }
        };
        self.raw = std::ptr::null_mut();
        waited.and(check("VixDiskLib_Close", code))
    }
}

impl Drop for RawDisk {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            super::log_library_error(e.function, e.code, self.lib());
        }
    }
}

/// Copies a C string; `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string valid for the duration of the call.
unsafe fn copy_c_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// VDDK's completion callback: hands the buffer and result to the request's completion.
unsafe extern "C" fn completion_trampoline(data: *mut c_void, result: VixError) {
    if data.is_null() {
        return;
    }
    // SAFETY: `data` is the reference `submit` leaked with Arc::into_raw for this callback, which
    // VDDK calls once per queued request; it is released here.
    let request = unsafe { Arc::from_raw(data as *const AsyncRequest) };
    let taken = request
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some((buf, done)) = taken {
        // The completion only queues work for another thread, but a panic must still never
        // unwind into C.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result, buf)));
    }
}

static LOG_SINK: OnceLock<fn(super::LogLevel, &str)> = OnceLock::new();

/// Longest message kept; longer ones are truncated (a `va_list` can be consumed only once, so
/// there is no second, larger attempt).
const LOG_BUFFER: usize = 8192;

// The `va_list` ABI decides how much of a VDDK log message can be formatted (module docs).
cfg_if::cfg_if! {
    if #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))] {
        /// Formats `fmt` with `args` (a `va_list`) through libc's `vsnprintf`.
        ///
        /// # Safety
        /// `fmt` must be NULL or a printf format string, and `args` the matching, started
        /// `va_list` as the platform passes it (see the module docs).
        unsafe fn format_va_list(fmt: *const c_char, args: *mut c_void) -> String {
            extern "C" {
                fn vsnprintf(
                    buf: *mut c_char,
                    len: usize,
                    fmt: *const c_char,
                    args: *mut c_void,
                ) -> c_int;
            }
            if fmt.is_null() {
                return String::new();
            }
            let mut buf = vec![0u8; LOG_BUFFER];
            // SAFETY: `buf` is writable for LOG_BUFFER bytes, vsnprintf writes at most that many
            // including the NUL; fmt/args are valid per the caller's contract and consumed once.
            let n = unsafe { vsnprintf(buf.as_mut_ptr().cast(), buf.len(), fmt, args) };
            if n < 0 {
                // SAFETY: fmt is a NUL-terminated string per the contract.
                return unsafe { copy_c_string(fmt) }.unwrap_or_default();
            }
            let len = (n as usize).min(LOG_BUFFER - 1);
            buf.truncate(len);
            String::from_utf8_lossy(&buf).into_owned()
        }
    } else {
        /// Without a known `va_list` ABI, only the format string itself is kept.
        ///
        /// # Safety
        /// `fmt` must be NULL or a NUL-terminated string.
        unsafe fn format_va_list(fmt: *const c_char, _args: *mut c_void) -> String {
            // SAFETY: per the contract.
            let text = unsafe { copy_c_string(fmt) }.unwrap_or_default();
            format!("{text} (arguments not formatted on this platform)")
        }
    }
}

fn deliver(level: super::LogLevel, fmt: *const c_char, args: *mut c_void) {
    // SAFETY: VDDK calls its log functions with a printf format and its started va_list.
    let message = unsafe { format_va_list(fmt, args) };
    if let Some(sink) = LOG_SINK.get() {
        let _ = std::panic::catch_unwind(|| sink(level, &message));
    }
}

unsafe extern "C" fn log_trampoline(fmt: *const c_char, args: *mut c_void) {
    deliver(super::LogLevel::Log, fmt, args);
}

unsafe extern "C" fn warn_trampoline(fmt: *const c_char, args: *mut c_void) {
    deliver(super::LogLevel::Warning, fmt, args);
}

unsafe extern "C" fn panic_trampoline(fmt: *const c_char, args: *mut c_void) {
    deliver(super::LogLevel::Panic, fmt, args);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroing_c_string_rejects_nul_and_round_trips() {
        assert!(ZeroingCString::new("a\0b").is_none());
        let s = ZeroingCString::new("moref=vm-16").unwrap();
        assert_eq!(s.as_c_str().to_str().unwrap(), "moref=vm-16");
        assert_eq!(format!("{s:?}"), "<c-string>");
    }

    #[test]
    fn spec_fills_uid_credentials() {
        let spec = ConnectSpec {
            vmx_spec: ZeroingCString::new("moref=vm-16"),
            server_name: ZeroingCString::new("vc"),
            thumbprint: None,
            creds: CredSpec::Uid {
                user: ZeroingCString::new("u").unwrap(),
                password: ZeroingCString::new("p").unwrap(),
            },
            port: 443,
            nfc_host_port: 902,
        };
        let mut p = VixDiskLibConnectParams::zeroed();
        spec.fill(&mut p);
        assert_eq!(p.cred_type, CRED_UID);
        assert_eq!(p.port, 443);
        assert_eq!(p.nfc_host_port, 902);
        assert!(p.thumb_print.is_null());
        // SAFETY: cred_type is UID, so the uid member is the one written.
        let user = unsafe { CStr::from_ptr(p.creds.uid.user_name) };
        assert_eq!(user.to_str().unwrap(), "u");
        assert_eq!(vix_error_code((3 << 32) | VIX_E_DISK_OUTOFRANGE), 16007);
    }
}
