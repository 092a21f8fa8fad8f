//! The one system call std has no wrapper for: `lseek` with `SEEK_DATA`/`SEEK_HOLE`, which a
//! file-backed disk uses to report what the file system has allocated.

use std::fs::File;
use std::os::fd::AsRawFd;

use disk_transport::vddk::ffi::VixError;

use crate::VIX_E_FILE_ERROR;

fn seek(file: &File, offset: u64, whence: libc::c_int) -> Result<Option<u64>, VixError> {
    let offset = libc::off_t::try_from(offset).map_err(|_| VIX_E_FILE_ERROR)?;
    // SAFETY: `lseek` on a descriptor the borrowed `File` keeps open; it only moves the file
    // offset, which nothing else here relies on (all I/O is positional).
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    match std::io::Error::last_os_error().raw_os_error() {
        // No data at or after `offset`.
        Some(libc::ENXIO) => Ok(None),
        _ => Err(VIX_E_FILE_ERROR),
    }
}

/// The first byte at or after `offset` that holds data, or `None` when only holes follow.
pub(crate) fn seek_data(file: &File, offset: u64) -> Result<Option<u64>, VixError> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The first hole at or after `offset` (the end of the file counts as one).
pub(crate) fn seek_hole(file: &File, offset: u64) -> Result<u64, VixError> {
    seek(file, offset, libc::SEEK_HOLE)?.ok_or(VIX_E_FILE_ERROR)
}
