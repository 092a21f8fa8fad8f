//! Where a stand-in disk keeps its bytes: in this process's memory, or in a file.
//!
//! A file-backed disk (`standin.fileDisks = 1`, local connections) is the file itself: reads and
//! writes go to it with `pread`/`pwrite`, flushes `fdatasync` it, and what is allocated is what
//! the file system says (`SEEK_DATA`/`SEEK_HOLE`), counted in the same 64 KiB chunks as the
//! in-memory map. Nothing about the disk lives in the process, so two processes that load the
//! stand-in (nbdkit's vddk plugin and vmsdk's VDDK backend, say) see the same bytes and the
//! same allocation.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use disk_transport::vddk::ffi::{VixError, VIX_E_DISK_OUTOFRANGE, VIX_E_INVALID_ARG};

use crate::{VIX_E_FILE_ACCESS_ERROR, VIX_E_FILE_ERROR};

/// The allocation unit of both maps: VDDK's `QueryAllocatedBlocks` answers in grains, and the
/// stand-in's grain is 64 KiB.
pub(crate) const CHUNK: u64 = 64 * 1024;

/// The bytes of a disk.
#[derive(Debug)]
pub(crate) enum Store {
    /// Lives as long as the process; `allocated` holds the chunks ever written.
    Memory {
        data: Vec<u8>,
        allocated: BTreeSet<u64>,
    },
    /// The file at `path`, `size` bytes (a whole number of sectors), opened for writing when
    /// `writable`.
    File {
        path: PathBuf,
        file: File,
        size: u64,
        writable: bool,
    },
}

impl Default for Store {
    fn default() -> Self {
        Store::Memory {
            data: Vec::new(),
            allocated: BTreeSet::new(),
        }
    }
}

impl Store {
    /// A zeroed in-memory disk of `size` bytes.
    pub(crate) fn memory(size: u64) -> Store {
        Store::Memory {
            data: vec![0; size as usize],
            allocated: BTreeSet::new(),
        }
    }

    /// An in-memory disk holding a copy of the file at `path` (the seed), `size` bytes (the
    /// file's size when `None`, rounded up to whole sectors); chunks of zeros stay unallocated.
    /// The file is read once; the disk then lives in this process like any in-memory one.
    pub(crate) fn memory_seeded(
        path: &Path,
        size: Option<u64>,
    ) -> Result<Store, (VixError, String)> {
        let bytes = std::fs::read(path).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                disk_transport::vddk::ffi::VIX_E_FILE_NOT_FOUND
            } else {
                VIX_E_FILE_ACCESS_ERROR
            };
            (
                code,
                format!("cannot read the seed {}: {e}", path.display()),
            )
        })?;
        let size = size.unwrap_or((bytes.len() as u64).div_ceil(512) * 512);
        if (bytes.len() as u64) > size {
            return Err((
                VIX_E_INVALID_ARG,
                format!(
                    "the seed {} holds {} bytes, more than size={size}",
                    path.display(),
                    bytes.len()
                ),
            ));
        }
        let mut store = Store::memory(size);
        for (index, piece) in bytes.chunks(CHUNK as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                store
                    .write(index as u64 * CHUNK, piece)
                    .map_err(|code| (code, "cannot copy the seed".to_owned()))?;
            }
        }
        Ok(store)
    }

    /// Opens the file at `path` as a disk. VDDK's answers to what can go wrong: a missing file
    /// is `VIX_E_FILE_NOT_FOUND`, one that cannot be opened `VIX_E_FILE_ACCESS_ERROR`, one
    /// that is not a whole number of sectors `VIX_E_INVALID_ARG` (the text says which).
    pub(crate) fn open_file(path: &Path, writable: bool) -> Result<Store, (VixError, String)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| {
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    disk_transport::vddk::ffi::VIX_E_FILE_NOT_FOUND
                } else {
                    VIX_E_FILE_ACCESS_ERROR
                };
                (code, format!("cannot open {}: {e}", path.display()))
            })?;
        let meta = file.metadata().map_err(|e| {
            (
                VIX_E_FILE_ERROR,
                format!("cannot stat {}: {e}", path.display()),
            )
        })?;
        if !meta.is_file() {
            return Err((
                VIX_E_INVALID_ARG,
                format!("{} is not a regular file", path.display()),
            ));
        }
        if meta.len() % 512 != 0 {
            return Err((
                VIX_E_INVALID_ARG,
                format!(
                    "{} is {} bytes, not a whole number of 512-byte sectors",
                    path.display(),
                    meta.len()
                ),
            ));
        }
        Ok(Store::File {
            path: path.to_path_buf(),
            file,
            size: meta.len(),
            writable,
        })
    }

    /// Creates the file at `path` (which must not exist) as a sparse disk of `size` bytes.
    pub(crate) fn create_file(path: &Path, size: u64) -> Result<(), (VixError, String)> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                let code = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    crate::VIX_E_FILE_ALREADY_EXISTS
                } else {
                    VIX_E_FILE_ACCESS_ERROR
                };
                (code, format!("cannot create {}: {e}", path.display()))
            })?;
        file.set_len(size).map_err(|e| {
            (
                VIX_E_FILE_ERROR,
                format!("cannot size {}: {e}", path.display()),
            )
        })
    }

    /// Whether the store may be written (a file opened read-only may not).
    pub(crate) fn writable(&self) -> bool {
        match self {
            Store::Memory { .. } => true,
            Store::File { writable, .. } => *writable,
        }
    }

    /// The file, for a file-backed disk.
    pub(crate) fn path(&self) -> Option<&Path> {
        match self {
            Store::Memory { .. } => None,
            Store::File { path, .. } => Some(path),
        }
    }

    /// The capacity in bytes.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Store::Memory { data, .. } => data.len() as u64,
            Store::File { size, .. } => *size,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), VixError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(VIX_E_DISK_OUTOFRANGE),
        }
    }

    /// Fills `dst` from `offset`.
    pub(crate) fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), VixError> {
        self.check(offset, dst.len())?;
        match self {
            Store::Memory { data, .. } => {
                let a = offset as usize;
                dst.copy_from_slice(&data[a..a + dst.len()]);
                Ok(())
            }
            Store::File { file, .. } => file
                .read_exact_at(dst, offset)
                .map_err(|_| VIX_E_FILE_ERROR),
        }
    }

    /// Writes `src` at `offset`.
    pub(crate) fn write(&mut self, offset: u64, src: &[u8]) -> Result<(), VixError> {
        self.check(offset, src.len())?;
        match self {
            Store::Memory { data, allocated } => {
                let a = offset as usize;
                data[a..a + src.len()].copy_from_slice(src);
                if !src.is_empty() {
                    allocated.extend(offset / CHUNK..=(offset + src.len() as u64 - 1) / CHUNK);
                }
                Ok(())
            }
            Store::File { file, .. } => {
                file.write_all_at(src, offset).map_err(|_| VIX_E_FILE_ERROR)
            }
        }
    }

    /// Makes written data durable (a no-op in memory).
    pub(crate) fn flush(&self) -> Result<(), VixError> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::File { file, .. } => file.sync_data().map_err(|_| VIX_E_FILE_ERROR),
        }
    }

    /// The allocated chunks among `first..end` (chunk numbers), in order.
    pub(crate) fn allocated_chunks(&self, first: u64, end: u64) -> Result<Vec<u64>, VixError> {
        match self {
            Store::Memory { allocated, .. } => Ok(allocated.range(first..end).copied().collect()),
            Store::File { file, size, .. } => {
                let mut chunks = Vec::new();
                let stop = (end.saturating_mul(CHUNK)).min(*size);
                let mut pos = first.saturating_mul(CHUNK);
                while pos < stop {
                    let Some(data) = crate::ffi::seek_data(file, pos)? else {
                        break;
                    };
                    if data >= stop {
                        break;
                    }
                    let hole = crate::ffi::seek_hole(file, data)?.min(stop);
                    let (a, b) = (data / CHUNK, (hole - 1) / CHUNK);
                    let from = chunks.last().map_or(a, |&last: &u64| a.max(last + 1));
                    chunks.extend(from..=b);
                    pos = hole.max((b + 1) * CHUNK);
                }
                Ok(chunks)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vddk-standin-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_file_disk_reports_the_file_systems_allocation_in_chunks() {
        let path = scratch("alloc.img");
        Store::create_file(&path, 16 * CHUNK).unwrap();
        let mut store = Store::open_file(&path, true).unwrap();
        assert_eq!(store.size(), 16 * CHUNK);
        assert_eq!(store.allocated_chunks(0, 16).unwrap(), Vec::<u64>::new());
        // One sector inside chunk 2, a write straddling chunks 5 and 6, the last sector.
        store.write(2 * CHUNK + 512, &[7; 512]).unwrap();
        store.write(6 * CHUNK - 4096, &[9; 8192]).unwrap();
        store.write(16 * CHUNK - 512, &[1; 512]).unwrap();
        store.flush().unwrap();
        assert_eq!(store.allocated_chunks(0, 16).unwrap(), vec![2, 5, 6, 15]);
        assert_eq!(store.allocated_chunks(3, 6).unwrap(), vec![5]);
        assert_eq!(store.allocated_chunks(7, 15).unwrap(), Vec::<u64>::new());
        // Another handle on the same file sees the same bytes and map.
        let other = Store::open_file(&path, false).unwrap();
        let mut sector = [0u8; 512];
        other.read(2 * CHUNK + 512, &mut sector).unwrap();
        assert_eq!(sector, [7; 512]);
        assert_eq!(other.allocated_chunks(0, 16).unwrap(), vec![2, 5, 6, 15]);
        assert!(!other.writable());
        assert_eq!(
            other.read(16 * CHUNK, &mut sector),
            Err(VIX_E_DISK_OUTOFRANGE)
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn file_disk_errors_are_vddks() {
        let missing = scratch("missing.img");
        let err = Store::open_file(&missing, false).unwrap_err();
        assert_eq!(err.0, disk_transport::vddk::ffi::VIX_E_FILE_NOT_FOUND);
        assert!(err.1.contains("missing.img"), "{}", err.1);

        let odd = scratch("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let err = Store::open_file(&odd, false).unwrap_err();
        assert_eq!(err.0, VIX_E_INVALID_ARG);
        assert!(err.1.contains("not a whole number"), "{}", err.1);
        assert_eq!(
            Store::create_file(&odd, 4096).unwrap_err().0,
            crate::VIX_E_FILE_ALREADY_EXISTS
        );
        std::fs::remove_file(&odd).unwrap();

        let dir = odd.parent().unwrap();
        assert_eq!(
            Store::open_file(dir, false).unwrap_err().0,
            VIX_E_INVALID_ARG
        );
    }
}
