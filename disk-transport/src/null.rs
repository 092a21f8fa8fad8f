//! A sink disk: writes are discarded, reads return zeros, everything is a hole — the
//! counterpart of nbdcopy's `null:` for measuring how fast a source can be read.

use crate::types::{DiskInfo, Extent, ExtentKind};
use crate::{check_range, Disk, Result, WriteCompletion};

/// A disk of a given size that stores nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NullDisk {
    capacity: u64,
}

impl NullDisk {
    /// A sink of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        NullDisk { capacity }
    }
}

impl Disk for NullDisk {
    fn info(&self) -> Result<DiskInfo> {
        Ok(DiskInfo {
            can_extents: true,
            can_multi_conn: true,
            max_request_size: u32::MAX,
            ..DiskInfo::new(self.capacity)
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.capacity)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn allocated_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(offset, length, self.capacity)?;
        Ok(if length == 0 {
            Vec::new()
        } else {
            vec![Extent {
                offset,
                length,
                kind: ExtentKind::Hole,
            }]
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.capacity)
    }

    fn discards_writes(&self) -> bool {
        true
    }

    fn submit_write(&self, offset: u64, buf: Vec<u8>, done: WriteCompletion) {
        done(self.write_at(&buf, offset).map(|()| buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discards_and_reads_zero() {
        let d = NullDisk::new(100);
        d.write_at(&[1; 10], 90).unwrap();
        assert!(d.write_at(&[1; 11], 90).is_err());
        let mut b = [7u8; 4];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4]);
        assert_eq!(
            d.allocated_extents(0, 100).unwrap()[0].kind,
            ExtentKind::Hole
        );
        // Through a pointer too: the copy engine sees its destination as `&dyn Disk`.
        let boxed: Box<dyn Disk> = Box::new(d);
        assert!(boxed.discards_writes());
        assert!(!crate::memory::MemoryDisk::new(100).discards_writes());
    }
}
