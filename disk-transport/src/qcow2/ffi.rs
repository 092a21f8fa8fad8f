//! Open file description (OFD) locks on single bytes of a file, as QEMU takes them on every
//! image it opens (`qemu_lock_fd`/`qemu_lock_fd_test` in QEMU's `util/osdep.c`): `fcntl` with
//! `F_OFD_SETLK` and `F_OFD_GETLK`, which std and rustix do not offer for byte ranges. OFD
//! locks belong to the open file (not the process), so they conflict between two opens of one
//! image in the same process too, and go away when the file is closed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn request(kind: libc::c_int, offset: u64) -> io::Result<libc::flock> {
    let start = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock offset too large"))?;
    // SAFETY: `flock` is a plain C struct of integers, for which all zeros is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start;
    lock.l_len = 1;
    lock.l_pid = 0; // must be 0 for OFD locks
    Ok(lock)
}

/// Takes a shared (read) lock on byte `offset` of `file` without waiting: an error with
/// `EAGAIN`/`EACCES` when another open file holds an exclusive lock on it.
pub fn lock_byte_shared(file: &File, offset: u64) -> io::Result<()> {
    let lock = request(libc::F_RDLCK, offset)?;
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and `lock` is a valid
    // `flock` that lives across the call; F_OFD_SETLK only reads it.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Releases this open file's lock on byte `offset` of `file`, whichever descriptors still
/// refer to the open file.
pub fn unlock_byte(file: &File, offset: u64) -> io::Result<()> {
    let lock = request(libc::F_UNLCK, offset)?;
    // SAFETY: as for `lock_byte_shared`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file holds any lock on byte `offset` of `file` (an exclusive lock
/// here would conflict with it): QEMU's test before it takes a permission.
pub fn byte_locked_elsewhere(file: &File, offset: u64) -> io::Result<bool> {
    let mut lock = request(libc::F_WRLCK, offset)?;
    // SAFETY: as above; F_OFD_GETLK writes the conflicting lock (or F_UNLCK) into `lock`,
    // which is a valid, exclusively borrowed `flock`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}
