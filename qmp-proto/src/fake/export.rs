//! An export of the fake monitor seen as a [`Disk`]: what an NBD client of the export would
//! read (`base:allocation` as data or hole per cluster, `qemu:dirty-bitmap:NAME` as dirty
//! extents), read straight from the fake's block graph.

use disk_transport::{
    DirtyExtent, Disk, DiskInfo, Error as DiskError, Extent, ExtentKind, Result as DiskResult,
};

use super::state::DEFAULT_CLUSTER;
use super::{FakeError, FakeShared};

/// A read-only view of a fake monitor's export; see [`super::FakeMonitor::export_disk`].
/// It follows the export: reads after `block-export-del` fail.
#[derive(Debug, Clone)]
pub struct ExportDisk {
    shared: FakeShared,
    name: String,
    bitmap: Option<String>,
    capacity: u64,
}

impl ExportDisk {
    pub(crate) fn open(
        shared: FakeShared,
        name: &str,
        bitmap: Option<&str>,
    ) -> Result<Self, FakeError> {
        let state = shared.lock();
        let export = state
            .exports()
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| FakeError(format!("export '{name}' not found")))?;
        if let Some(b) = bitmap {
            if !export.bitmaps.iter().any(|(_, x)| x == b) {
                return Err(FakeError(format!(
                    "export '{name}' does not carry bitmap '{b}' (block-export-add bitmaps)"
                )));
            }
        }
        let capacity = state.node(&export.node).map_or(0, |n| n.size);
        drop(state);
        Ok(ExportDisk {
            shared,
            name: name.to_owned(),
            bitmap: bitmap.map(str::to_owned),
            capacity,
        })
    }

    /// The exported node now, or an error when the export is gone.
    fn node(&self) -> DiskResult<String> {
        let state = self.shared.lock();
        state
            .exports()
            .iter()
            .find(|e| e.name == self.name)
            .map(|e| e.node.clone())
            .ok_or_else(|| DiskError::NotFound(format!("export '{}' was deleted", self.name)))
    }

    fn check(&self, offset: u64, length: u64) -> DiskResult<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                length,
                capacity: self.capacity,
            }),
        }
    }
}

impl Disk for ExportDisk {
    fn info(&self) -> DiskResult<DiskInfo> {
        Ok(DiskInfo {
            read_only: true,
            dirty_bitmap: self.bitmap.clone(),
            ..DiskInfo::new(self.capacity)
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DiskResult<()> {
        self.check(offset, buf.len() as u64)?;
        let node = self.node()?;
        self.shared
            .lock()
            .read(&node, buf, offset)
            .map_err(|e| DiskError::Protocol(e.desc))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> DiskResult<()> {
        Err(DiskError::ReadOnly(format!("export '{}'", self.name)))
    }

    fn flush(&self) -> DiskResult<()> {
        Ok(())
    }

    /// Whole clusters: data where any byte is non-zero, holes elsewhere.
    fn allocated_extents(&self, offset: u64, length: u64) -> DiskResult<Vec<Extent>> {
        self.check(offset, length)?;
        let node = self.node()?;
        let state = self.shared.lock();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + length;
        let mut pos = offset;
        let mut buf = vec![0u8; DEFAULT_CLUSTER as usize];
        while pos < end {
            let stop = ((pos / DEFAULT_CLUSTER + 1) * DEFAULT_CLUSTER).min(end);
            let piece = &mut buf[..(stop - pos) as usize];
            state
                .read(&node, piece, pos)
                .map_err(|e| DiskError::Protocol(e.desc))?;
            let kind = if piece.iter().any(|&b| b != 0) {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.length += stop - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: stop - pos,
                    kind,
                }),
            }
            pos = stop;
        }
        Ok(out)
    }

    fn dirty_extents(&self, offset: u64, length: u64) -> DiskResult<Vec<DirtyExtent>> {
        let Some(name) = &self.bitmap else {
            return Err(DiskError::Unsupported(
                "dirty extents of an export view opened without a bitmap".into(),
            ));
        };
        self.check(offset, length)?;
        self.node()?;
        let state = self.shared.lock();
        let export = state
            .exports()
            .iter()
            .find(|e| e.name == self.name)
            .ok_or_else(|| DiskError::NotFound(format!("export '{}'", self.name)))?;
        let (owner, _) = export
            .bitmaps
            .iter()
            .find(|(_, b)| b == name)
            .ok_or_else(|| DiskError::NotFound(format!("bitmap '{name}'")))?;
        let bitmap = state
            .node(owner)
            .and_then(|n| n.bitmap(name))
            .ok_or_else(|| DiskError::NotFound(format!("bitmap '{name}'")))?;
        let end = offset + length;
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut push = |from: u64, to: u64, dirty: bool| {
            if to <= from {
                return;
            }
            match out.last_mut() {
                Some(last) if last.dirty == dirty && last.offset + last.length == from => {
                    last.length += to - from
                }
                _ => out.push(DirtyExtent {
                    offset: from,
                    length: to - from,
                    dirty,
                }),
            }
        };
        let mut pos = offset;
        for (start, len) in bitmap.dirty_ranges() {
            let (start, stop) = (start.max(offset), (start + len).min(end));
            if stop <= start {
                continue;
            }
            push(pos, start, false);
            push(start, stop, true);
            pos = stop;
        }
        push(pos, end, false);
        Ok(out)
    }
}
