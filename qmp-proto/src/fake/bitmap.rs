//! Dirty bitmaps: their granules, and the `block-dirty-bitmap-*` family on the state.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::state::*;

/// Dirty granules as disjoint, non-touching half-open ranges `[start, end)` of granule
/// indices: a bitmap's memory grows with the number of dirty areas, not their size (a 512-byte
/// granularity bitmap merged from a 2 GiB one stays one range).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct GranuleRanges(BTreeMap<u64, u64>);

impl GranuleRanges {
    fn insert(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let touching: Vec<u64> = self.0.range(start..=end).map(|(&k, _)| k).collect();
        for k in touching {
            if let Some(e) = self.0.remove(&k) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    fn granules(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    pub(crate) fn last_end(&self) -> Option<u64> {
        self.0.values().next_back().copied()
    }
}

/// A dirty bitmap of a block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Its name (unique on its node).
    pub name: String,
    /// Bytes per bit: a power of two, at least 512.
    pub granularity: u64,
    /// Whether writes mark it (`disabled` is the opposite).
    pub recording: bool,
    /// Whether it is stored in the image (qcow2 only).
    pub persistent: bool,
    /// Whether an export or a job uses it (then it cannot be changed or removed).
    pub busy: bool,
    /// Whether it was not saved properly (a crash with a persistent bitmap in use).
    pub inconsistent: bool,
    pub(crate) dirty: GranuleRanges,
}

impl DirtyBitmap {
    /// The dirty byte count `query-named-block-nodes` reports: granules × granularity.
    pub fn count(&self) -> u64 {
        self.dirty.granules().saturating_mul(self.granularity)
    }

    /// The dirty ranges as `(offset, length)` in bytes, whole granules, adjacent ones merged.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.dirty
            .iter()
            .map(|(s, e)| {
                (
                    s.saturating_mul(self.granularity),
                    (e - s).saturating_mul(self.granularity),
                )
            })
            .collect()
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let g = offset / self.granularity;
        self.dirty.iter().any(|(s, e)| s <= g && g < e)
    }

    pub(crate) fn mark(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = offset.saturating_add(length - 1) / self.granularity;
        self.dirty.insert(first, last.saturating_add(1));
    }

    pub(crate) fn clear(&mut self) {
        self.dirty = GranuleRanges::default();
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("recording".into(), json!(self.recording));
        m.insert("persistent".into(), json!(self.persistent));
        m.insert("busy".into(), json!(self.busy));
        m.insert("granularity".into(), json!(self.granularity));
        m.insert("count".into(), json!(self.count()));
        if self.inconsistent {
            m.insert("inconsistent".into(), json!(true));
        }
        Value::Object(m)
    }
}

impl FakeState {
    // ---------------------------------------------------------------- bitmaps

    pub(crate) fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> QResult<()> {
        let n = self.lookup(node)?;
        if name.is_empty() {
            return Err(QmpError::generic("Bitmap name cannot be empty"));
        }
        if name.len() > 1023 {
            return Err(QmpError::generic("Bitmap name is too long"));
        }
        let granularity = granularity.unwrap_or(DEFAULT_CLUSTER);
        if granularity < 512 || !granularity.is_power_of_two() || granularity > 1 << 31 {
            return Err(QmpError::generic(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        if n.bitmap(name).is_some() {
            return Err(QmpError::generic(format!("Bitmap already exists: {name}")));
        }
        if persistent && n.driver != "qcow2" {
            return Err(QmpError::generic(format!(
                "Can't store persistent bitmaps to {node}: Operation not supported"
            )));
        }
        let n = self.node_mut(node).expect("looked up above");
        n.bitmaps.push(DirtyBitmap {
            name: name.to_owned(),
            granularity,
            recording: !disabled,
            persistent,
            busy: false,
            inconsistent: false,
            dirty: GranuleRanges::default(),
        });
        Ok(())
    }

    /// The node of an existing bitmap (`block_dirty_bitmap_lookup`'s text when missing).
    pub(crate) fn bitmap_node(&self, node: &str) -> QResult<&BlockNode> {
        self.node(node)
            .ok_or_else(|| QmpError::generic(format!("Node '{node}' not found")))
    }

    /// Looks up a bitmap that may be changed (exists, not busy, consistent).
    pub(crate) fn bitmap_for_change(
        &mut self,
        node: &str,
        name: &str,
    ) -> QResult<&mut DirtyBitmap> {
        self.bitmap_node(node)?;
        let b = self
            .node_mut(node)
            .expect("looked up above")
            .bitmap_mut(name)
            .ok_or_else(|| bitmap_missing(name))?;
        if b.busy {
            return Err(bitmap_busy(name));
        }
        if b.inconsistent {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
            )));
        }
        Ok(b)
    }

    pub(crate) fn bitmap_remove(&mut self, node: &str, name: &str) -> QResult<()> {
        self.bitmap_node(node)?;
        let b = self
            .node(node)
            .and_then(|n| n.bitmap(name))
            .ok_or_else(|| bitmap_missing(name))?;
        if b.busy {
            return Err(bitmap_busy(name));
        }
        let n = self.node_mut(node).expect("looked up above");
        n.bitmaps.retain(|b| b.name != name);
        Ok(())
    }

    pub(crate) fn bitmap_clear(&mut self, node: &str, name: &str) -> QResult<()> {
        self.bitmap_for_change(node, name)?.clear();
        Ok(())
    }

    pub(crate) fn bitmap_enable(&mut self, node: &str, name: &str, on: bool) -> QResult<()> {
        self.bitmap_for_change(node, name)?.recording = on;
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: `sources` are `(node, name)`.
    pub(crate) fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[(String, String)],
    ) -> QResult<()> {
        self.bitmap_for_change(node, target)?;
        let mut ranges = Vec::new();
        for (src_node, src_name) in sources {
            let n = self.bitmap_node(src_node)?;
            let b = n.bitmap(src_name).ok_or_else(|| bitmap_missing(src_name))?;
            ranges.extend(b.dirty_ranges());
        }
        let b = self.bitmap_for_change(node, target)?;
        for (off, len) in ranges {
            b.mark(off, len);
        }
        Ok(())
    }
}
