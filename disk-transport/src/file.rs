//! Raw image files and block devices.
//!
//! - Positional I/O (`pread`/`pwrite`), so one [`FileDisk`] serves many threads at once.
//! - Extents from `SEEK_DATA`/`SEEK_HOLE`; file systems or devices without them report the
//!   whole range as data.
//! - Optional `O_DIRECT` ([`FileOptions::direct`], or [`OpenFlags::unbuffered`]), following the
//!   rules VDDK applies in SAN mode: offsets and lengths must be multiples of
//!   [`DIRECT_IO_ALIGNMENT`](FileDisk::DIRECT_IO_ALIGNMENT) (only the last block of a file whose
//!   size is not a multiple may be shorter, for reads); buffers need no alignment from the caller
//!   because unaligned ones go through an aligned bounce buffer.
//! - `write_zeroes` and `trim` punch holes (`FALLOCATE_PUNCH_HOLE`), falling back to writing
//!   zeros where the file system cannot.
//!
//! Local file I/O has no timeout: the kernel gives no portable way to abandon a `pread`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::fs::{fadvise, fallocate, seek, Advice, FallocateFlags, SeekFrom as RawSeekFrom};

use crate::types::{push_extent, push_range, DiskInfo, Extent, ExtentKind};
use crate::{
    check_range, write_zeros_from, AccessGuard, CleanupStats, ConnectParams, Connection, Disk,
    DiskTransport, Error, OpenFlags, Result, TransportMode,
};

/// How to open a file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Open with `O_DIRECT` (no page cache; aligned I/O only).
    pub direct: bool,
    /// Create the file (sparse, this many bytes) if it does not exist.
    pub create_size: Option<u64>,
}

/// An open raw image file or block device.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    direct: bool,
    can_extents: bool,
    /// Page-cache writes of a regular file are written back as they go; see
    /// [`FileDisk::write_back_early`].
    write_back: bool,
    /// Bytes written through the page cache so far.
    written: AtomicU64,
    /// Held around each page-cache write of a regular file; see [`FileDisk::write_at`].
    writing: Mutex<()>,
}

/// How many bytes written through the page cache start their write-back (and drop what an
/// earlier round wrote back from the cache).
const WRITE_BACK_WINDOW: u64 = 32 << 20;

/// Buffer with its start aligned to `alignment` (a power of two), for `O_DIRECT`.
pub fn aligned_buffer(length: usize, alignment: usize) -> AlignedBuffer {
    let storage = vec![0u8; length + alignment];
    let start = storage.as_ptr().align_offset(alignment);
    AlignedBuffer {
        storage,
        start,
        length,
    }
}

/// A heap buffer whose start is aligned; see [`aligned_buffer`].
pub struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    length: usize,
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuffer")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.length]
    }
}

impl std::ops::DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.length]
    }
}

impl FileDisk {
    /// Alignment of offsets, lengths and buffers for `O_DIRECT` I/O. 4096 satisfies both 512e
    /// and 4Kn devices.
    pub const DIRECT_IO_ALIGNMENT: u64 = 4096;

    /// Opens (or creates) a file.
    pub fn open(path: impl AsRef<Path>, options: &FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.create_size.is_some() && !options.read_only {
            open.create(true);
        }
        if options.direct {
            open.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let mut file = open
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), None, e))?;
        let mut capacity = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("size of {}", path.display()), None, e))?;
        if let Some(size) = options.create_size {
            if capacity == 0 && size > 0 {
                file.set_len(size)
                    .map_err(|e| Error::io(format!("resize {}", path.display()), None, e))?;
                capacity = size;
            }
        }
        let can_extents = match seek(&file, RawSeekFrom::Data(0)) {
            Ok(_) => true,
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        };
        let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
        Ok(FileDisk {
            file,
            path: path.to_owned(),
            capacity,
            read_only: options.read_only,
            direct: options.direct,
            can_extents,
            write_back: regular && !options.read_only && !options.direct,
            written: AtomicU64::new(0),
            writing: Mutex::new(()),
        })
    }

    /// Creates a sparse file of `size` bytes (truncating an existing one) and opens it
    /// read-write.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref();
        let file = File::create(path)
            .map_err(|e| Error::io(format!("create {}", path.display()), None, e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("resize {}", path.display()), None, e))?;
        drop(file);
        FileDisk::open(path, &FileOptions::default())
    }

    /// Called after `length` bytes went into the page cache: every [`WRITE_BACK_WINDOW`]
    /// bytes, asks the kernel to write the file's dirty pages back now and to drop the pages an
    /// earlier round wrote back (`POSIX_FADV_DONTNEED`, which on Linux starts write-back of
    /// dirty pages without waiting and evicts only clean ones, so no data is at risk).
    ///
    /// Why: a big copy otherwise leaves gigabytes dirty until the final `fsync`, which then
    /// writes them all while nothing else happens, and past the kernel's dirty limit every
    /// `pwrite` is throttled; it also fills the page cache with a destination nobody reads.
    /// nbdcopy does the same (`sync_file_range` plus `POSIX_FADV_DONTNEED` in windows). On
    /// tmpfs the advice does nothing.
    fn write_back_early(&self, length: u64) {
        if !self.write_back {
            return;
        }
        let before = self.written.fetch_add(length, Ordering::Relaxed);
        if (before + length) / WRITE_BACK_WINDOW != before / WRITE_BACK_WINDOW {
            // Only advice: a refusal costs speed, never data.
            let _ = fadvise(&self.file, 0, None, Advice::DontNeed);
        }
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_direct(&self, offset: u64, length: u64, for_read: bool) -> Result<()> {
        if !self.direct {
            return Ok(());
        }
        let a = Self::DIRECT_IO_ALIGNMENT;
        let tail_ok = for_read && offset + length == self.capacity;
        if !offset.is_multiple_of(a) || (!length.is_multiple_of(a) && !tail_ok) {
            return Err(Error::Unaligned {
                offset,
                length,
                alignment: a,
                why: "O_DIRECT (unbuffered, SAN-style) I/O",
            });
        }
        Ok(())
    }

    fn io_error(&self, op: &str, offset: u64, e: io::Error) -> Error {
        Error::io(format!("{op} {}", self.path.display()), Some(offset), e)
    }

    fn zero_by_punching(&self, offset: u64, length: u64) -> Result<bool> {
        if length == 0 {
            return Ok(true);
        }
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        ) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => Ok(false),
            Err(e) => Err(self.io_error("punch hole in", offset, e.into())),
        }
    }

    /// Next offset ≥ `pos` holding data, or `None` past the last data.
    fn next_data(&self, pos: u64) -> Result<Option<u64>> {
        match seek(&self.file, RawSeekFrom::Data(pos)) {
            Ok(p) => Ok(Some(p)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(self.io_error("SEEK_DATA in", pos, e.into())),
        }
    }

    fn next_hole(&self, pos: u64) -> Result<u64> {
        match seek(&self.file, RawSeekFrom::Hole(pos)) {
            Ok(p) => Ok(p),
            Err(rustix::io::Errno::NXIO) => Ok(self.capacity),
            Err(e) => Err(self.io_error("SEEK_HOLE in", pos, e.into())),
        }
    }
}

impl Disk for FileDisk {
    fn info(&self) -> Result<DiskInfo> {
        let mut info = DiskInfo::new(self.capacity);
        info.read_only = self.read_only;
        info.can_extents = self.can_extents;
        info.can_multi_conn = true;
        info.transport_mode = Some(TransportMode::File);
        if self.direct {
            info.min_block_size = Self::DIRECT_IO_ALIGNMENT as u32;
        }
        info.preferred_block_size = 4096;
        info.max_request_size = 64 << 20;
        Ok(info)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        self.check_direct(offset, buf.len() as u64, true)?;
        let a = Self::DIRECT_IO_ALIGNMENT as usize;
        if self.direct
            && (!(buf.as_ptr() as usize).is_multiple_of(a) || !buf.len().is_multiple_of(a))
        {
            let mut bounce = aligned_buffer(buf.len().next_multiple_of(a), a);
            let mut done = 0;
            while done < buf.len() {
                match self.file.read_at(&mut bounce[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_error("read", offset, e)),
                }
            }
            if done < buf.len() {
                return Err(self.io_error(
                    "read",
                    offset + done as u64,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank under us"),
                ));
            }
            buf.copy_from_slice(&bounce[..buf.len()]);
            return Ok(());
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.path.display().to_string()));
        }
        check_range(offset, buf.len() as u64, self.capacity)?;
        self.check_direct(offset, buf.len() as u64, false)?;
        let a = Self::DIRECT_IO_ALIGNMENT as usize;
        if self.direct && !(buf.as_ptr() as usize).is_multiple_of(a) {
            let mut bounce = aligned_buffer(buf.len(), a);
            bounce.copy_from_slice(buf);
            return self
                .file
                .write_all_at(&bounce, offset)
                .map_err(|e| self.io_error("write", offset, e));
        }
        // The kernel runs page-cache writes of one file one at a time (tmpfs, ext4 and xfs take
        // the inode's lock exclusively), and a writer that finds the lock taken spins on it
        // while the holder copies: with two copying threads writing 512 KiB pieces into tmpfs,
        // a quarter of the copy's CPU time went to that spinning. Waiting here sleeps instead,
        // leaving the CPU to the NBD server. Direct I/O may run in parallel and is not held.
        let one_at_a_time = self
            .write_back
            .then(|| self.writing.lock().unwrap_or_else(|e| e.into_inner()));
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_error("write", offset, e))?;
        drop(one_at_a_time);
        self.write_back_early(buf.len() as u64);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("fsync {}", self.path.display()), None, e))
    }

    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.capacity)?;
        let end = offset + length;
        let mut extents = Vec::new();
        if !self.can_extents {
            push_extent(
                &mut extents,
                Extent {
                    offset,
                    length,
                    kind: ExtentKind::Data,
                },
            );
            return Ok(extents);
        }
        let mut pos = offset;
        while pos < end {
            let data = self.next_data(pos)?.unwrap_or(end).min(end);
            if data > pos {
                push_range(&mut extents, pos, data, ExtentKind::Hole);
                pos = data;
                continue;
            }
            let hole = self.next_hole(pos)?.min(end);
            // A file changed under us could make the kernel report no progress; count the
            // rest as data rather than loop.
            let stop = if hole > pos { hole } else { end };
            push_range(&mut extents, pos, stop, ExtentKind::Data);
            pos = stop;
        }
        Ok(extents)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.path.display().to_string()));
        }
        check_range(offset, length, self.capacity)?;
        self.check_direct(offset, length, false)?;
        if self.zero_by_punching(offset, length)? {
            return Ok(());
        }
        let zeros = aligned_buffer(
            length.min(1 << 20) as usize,
            Self::DIRECT_IO_ALIGNMENT as usize,
        );
        write_zeros_from(self, &zeros, offset, length)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.path.display().to_string()));
        }
        check_range(offset, length, self.capacity)?;
        // Trim is a hint: where punching is unsupported, leaving the data is correct.
        self.zero_by_punching(offset, length).map(|_| ())
    }
}

/// The `file` transport: local image files and block devices, opened by path.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileTransport;

impl DiskTransport for FileTransport {
    fn name(&self) -> &'static str {
        "file"
    }

    fn transport_modes(&self) -> Vec<TransportMode> {
        vec![TransportMode::File]
    }

    fn connect(&self, params: &ConnectParams) -> Result<Box<dyn Connection>> {
        if params.is_remote() {
            return Err(Error::InvalidParams(
                "the file transport opens local files; use the vddk or nbd backend for a server"
                    .into(),
            ));
        }
        if let Some(modes) = params.transport_modes() {
            if !modes.contains(&TransportMode::File) {
                return Err(Error::NoTransport(
                    modes
                        .iter()
                        .map(|m| (*m, "the file backend only offers file".to_owned()))
                        .collect(),
                ));
            }
        }
        Ok(Box::new(FileConnection {
            read_only: params.read_only(),
        }))
    }

    fn prepare_for_access(&self, _params: &ConnectParams, _identity: &str) -> Result<AccessGuard> {
        Err(Error::Unsupported(
            "PrepareForAccess on local files (only vCenter-managed VMs have it)".into(),
        ))
    }

    fn cleanup(&self, _params: &ConnectParams) -> Result<CleanupStats> {
        // Local connections leave no state behind, as with VDDK.
        Ok(CleanupStats::default())
    }
}

#[derive(Debug)]
struct FileConnection {
    read_only: bool,
}

impl Connection for FileConnection {
    fn open(&self, path: &str, flags: OpenFlags) -> Result<Box<dyn Disk>> {
        let flags = flags.effective(self.read_only);
        Ok(Box::new(FileDisk::open(
            path,
            &FileOptions {
                read_only: flags.read_only,
                direct: flags.unbuffered,
                create_size: None,
            },
        )?))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_extents_and_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let disk = FileDisk::create(&path, 4 << 20).unwrap();
        disk.write_at(&[0xAA; 4096], 1 << 20).unwrap();
        let extents = disk.allocated_extents(0, 4 << 20).unwrap();
        let info = disk.info().unwrap();
        assert_eq!(info.capacity, 4 << 20);
        if info.can_extents {
            assert!(extents.iter().any(|e| e.kind == ExtentKind::Hole));
            let data: Vec<_> = extents
                .iter()
                .filter(|e| e.kind == ExtentKind::Data)
                .collect();
            assert!(data
                .iter()
                .any(|e| e.offset <= 1 << 20 && e.end() >= (1 << 20) + 4096));
        }
        assert_eq!(extents.first().unwrap().offset, 0);
        assert_eq!(extents.last().unwrap().end(), 4 << 20);
        let mut buf = [0u8; 8];
        disk.read_at(&mut buf, (1 << 20) + 4092).unwrap();
        assert_eq!(buf, [0xAA, 0xAA, 0xAA, 0xAA, 0, 0, 0, 0]);
        disk.write_zeroes(1 << 20, 4096).unwrap();
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0; 8]);
        assert!(matches!(
            disk.read_at(&mut buf, (4 << 20) - 4),
            Err(Error::OutOfRange { .. })
        ));
        disk.flush().unwrap();
    }

    #[test]
    fn read_only_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, b"hello").unwrap();
        let c = FileTransport.connect(&ConnectParams::local()).unwrap();
        let d = c
            .open(path.to_str().unwrap(), OpenFlags::read_write())
            .unwrap();
        assert!(d.info().unwrap().read_only);
        assert!(matches!(d.write_at(b"x", 0), Err(Error::ReadOnly(_))));
        let mut buf = [0u8; 5];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        let err = c
            .open("/nonexistent/disk.img", OpenFlags::read_only())
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }

    #[test]
    fn direct_io_enforces_alignment_and_handles_unaligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![3u8; 3 * 4096 + 100]).unwrap();
        let options = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        let disk = match FileDisk::open(&path, &options) {
            Ok(d) => d,
            // tmpfs has no O_DIRECT.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(22) => return,
            Err(e) => panic!("{e}"),
        };
        let mut unaligned = vec![0u8; 4097];
        let buf = &mut unaligned[1..];
        disk.read_at(buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        assert!(matches!(
            disk.read_at(&mut [0u8; 512], 100),
            Err(Error::Unaligned { .. })
        ));
        let mut tail = vec![0u8; 4096 + 100];
        disk.read_at(&mut tail, 2 * 4096).unwrap();
        assert!(tail.iter().all(|&b| b == 3));
        disk.write_at(&unaligned[1..], 0).unwrap();
        assert!(matches!(
            disk.write_at(&[1u8; 10], 0),
            Err(Error::Unaligned { .. })
        ));
    }
}
