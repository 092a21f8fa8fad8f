//! Model-specific registers through a trait, so the SEV_STATUS read runs on recordings in tests.
//!
//! Linux exposes MSRs through the `msr` driver: `/dev/cpu/N/msr` is a character device where
//! register `index` is the 8 bytes at file offset `index`. Reading it needs the `msr` module
//! loaded and `CAP_SYS_RAWIO` (root). That is plain file I/O, so no `unsafe` is involved.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The AMD SEV_STATUS register (`MSR_AMD64_SEV`): bit 0 SEV, bit 1 SEV-ES, bit 2 SEV-SNP active.
pub const MSR_AMD64_SEV_STATUS: u32 = 0xc001_0131;

/// Anything that reads model-specific registers of CPU 0: the msr driver, or a recording.
pub trait MsrReader: Send + Sync + fmt::Debug {
    /// Reads register `index`. An error means the register cannot be read here (no driver, no
    /// privilege, not recorded); it says why.
    fn read_msr(&self, index: u32) -> io::Result<u64>;

    /// Where the values come from, for evidence: a device path, or "the CPUID recording".
    fn origin(&self) -> String;
}

/// The msr driver's device for CPU 0, `/dev/cpu/0/msr`, possibly under another root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCpuMsr {
    path: PathBuf,
}

impl DevCpuMsr {
    /// The device path relative to a root.
    pub const PATH: &'static str = "dev/cpu/0/msr";

    /// `/dev/cpu/0/msr` of this machine.
    pub fn new() -> Self {
        Self::under_root("/")
    }

    /// `<root>/dev/cpu/0/msr`.
    pub fn under_root(root: impl AsRef<Path>) -> Self {
        Self {
            path: root.as_ref().join(Self::PATH),
        }
    }

    /// The device file this reader opens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for DevCpuMsr {
    fn default() -> Self {
        Self::new()
    }
}

impl MsrReader for DevCpuMsr {
    fn read_msr(&self, index: u32) -> io::Result<u64> {
        let context = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot {what} {}: {e}", self.path.display()),
            )
        };
        let file = File::open(&self.path).map_err(|e| context("open", e))?;
        let mut value = [0u8; 8];
        // One pread of 8 bytes, as the driver expects; anything shorter is a failed read.
        let read = file
            .read_at(&mut value, u64::from(index))
            .map_err(|e| context("read", e))?;
        if read != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short read of {read} bytes at offset {index:#x} of {}",
                    self.path.display()
                ),
            ));
        }
        Ok(u64::from_le_bytes(value))
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_eight_bytes_at_the_register_offset_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DevCpuMsr::PATH);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = File::create(&path).unwrap();
        file.write_all_at(&7u64.to_le_bytes(), u64::from(MSR_AMD64_SEV_STATUS))
            .unwrap();
        let reader = DevCpuMsr::under_root(dir.path());
        assert_eq!(reader.read_msr(MSR_AMD64_SEV_STATUS).unwrap(), 7);
        // A register past the end of the file is a short read, not a zero.
        let err = reader.read_msr(MSR_AMD64_SEV_STATUS + 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("short read of 4 bytes"), "{err}");
    }

    #[test]
    fn a_missing_device_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = DevCpuMsr::under_root(dir.path())
            .read_msr(MSR_AMD64_SEV_STATUS)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("cannot open"), "{err}");
        assert!(err.to_string().contains("dev/cpu/0/msr"), "{err}");
    }
}
