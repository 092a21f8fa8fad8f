//! Block exports: `block-export-add`/`-del` and `query-block-exports` on the state, and an
//! export seen as a [`Disk`]: what an NBD client of the export would
//! read (`base:allocation` as data or hole per cluster, `qemu:dirty-bitmap:NAME` as dirty
//! extents), read straight from the fake's block graph.

use disk_transport::{
    DirtyExtent, Disk, DiskInfo, Error as DiskError, Extent, ExtentKind, Result as DiskResult,
};

use serde_json::{json, Value};

use super::state::{bitmap_busy, FakeState, QResult, QmpError, DEFAULT_CLUSTER};
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

/// A block export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExport {
    /// Export id.
    pub id: String,
    /// Exported node.
    pub node: String,
    /// NBD export name.
    pub name: String,
    /// Writable export.
    pub writable: bool,
    /// Exported dirty bitmaps as `(node, bitmap)`.
    pub bitmaps: Vec<(String, String)>,
}

impl FakeState {
    // ---------------------------------------------------------------- exports

    /// `block-export-add` of type `nbd` (arguments checked).
    pub(crate) fn export_add(
        &mut self,
        id: &str,
        node: &str,
        name: Option<&str>,
        writable: bool,
        bitmaps: &[String],
    ) -> QResult<()> {
        if self.exports.iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        if self.node(node).is_none() {
            return Err(QmpError::generic(format!(
                "Cannot find device='' nor node-name='{node}'"
            )));
        }
        if self.nbd_server.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let name = name.unwrap_or(node);
        if name.len() > 4096 {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        if self.exports.iter().any(|e| e.name == name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let mut found = Vec::new();
        for b in bitmaps {
            // The bitmap may live on the node or anywhere down its backing chain.
            let mut cur = Some(node.to_owned());
            let mut hit = None;
            while let Some(n) = cur {
                let Some(nd) = self.node(&n) else { break };
                if nd.bitmap(b).is_some() {
                    hit = Some(n.clone());
                    break;
                }
                cur = nd.backing.clone().or_else(|| {
                    (nd.driver == "raw" || nd.driver == "copy-before-write")
                        .then(|| nd.file.clone())
                        .flatten()
                });
            }
            let Some(owner) = hit else {
                return Err(QmpError::generic(format!("Bitmap '{b}' is not found")));
            };
            let bm = self
                .node(&owner)
                .and_then(|n| n.bitmap(b))
                .expect("found above");
            if bm.busy || bm.inconsistent {
                return Err(bitmap_busy(b));
            }
            if !writable && bm.recording {
                return Err(QmpError::generic(format!(
                    "Enabled bitmap '{b}' incompatible with readonly export"
                )));
            }
            found.push((owner, b.clone()));
        }
        for (owner, b) in &found {
            if let Some(bm) = self.node_mut(owner).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = true;
            }
        }
        self.exports.push(BlockExport {
            id: id.to_owned(),
            node: node.to_owned(),
            name: name.to_owned(),
            writable,
            bitmaps: found,
        });
        Ok(())
    }

    pub(crate) fn export_del(&mut self, id: &str) -> QResult<()> {
        let Some(pos) = self.exports.iter().position(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let export = self.exports.remove(pos);
        for (owner, b) in &export.bitmaps {
            if let Some(bm) = self.node_mut(owner).and_then(|n| n.bitmap_mut(b)) {
                bm.busy = false;
            }
        }
        self.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
        Ok(())
    }

    pub(crate) fn exports_json(&self) -> Value {
        Value::Array(
            self.exports
                .iter()
                .rev()
                .map(|e| {
                    json!({"node-name": e.node, "shutting-down": false, "type": "nbd", "id": e.id})
                })
                .collect(),
        )
    }
}
