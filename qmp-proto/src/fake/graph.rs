//! The block graph: nodes from `blockdev-add`, their data (through `file` and `backing`
//! children), guest writes with copy-before-write, and what `query-named-block-nodes` and
//! `query-blockstats` report.

use disk_transport::memory::MemoryDisk;
use disk_transport::Disk;
use serde_json::{json, Map, Value};

use super::state::*;

/// A block node.
#[derive(Debug, Clone)]
pub struct BlockNode {
    /// Its node name (`#blockNNN` for nodes QEMU named itself).
    pub name: String,
    /// The block driver: `qcow2`, `raw`, `file`, `null-co`, `copy-before-write`.
    pub driver: String,
    /// Whether it was opened read-only.
    pub read_only: bool,
    /// Its `file` child.
    pub file: Option<String>,
    /// Its `backing` child.
    pub backing: Option<String>,
    /// For `file` nodes: the path.
    pub filename: Option<String>,
    /// The size the guest sees.
    pub size: u64,
    /// Dirty bitmaps, oldest first (QEMU lists them newest first).
    pub bitmaps: Vec<DirtyBitmap>,
    /// One past the highest byte written through this node.
    pub wr_highest_offset: u64,
    /// The data of qcow2 and raw-over-file nodes (shared with the [`ImageFile`]).
    pub(crate) data: Option<MemoryDisk>,
    /// The options QEMU prints in `json:{...}` file names.
    pub(crate) options: Value,
    /// Named by QEMU (an implicit child), deleted with its parent.
    pub(crate) implicit: bool,
}

impl BlockNode {
    /// The bitmap called `name`.
    pub fn bitmap(&self, name: &str) -> Option<&DirtyBitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    pub(crate) fn bitmap_mut(&mut self, name: &str) -> Option<&mut DirtyBitmap> {
        self.bitmaps.iter_mut().find(|b| b.name == name)
    }
}

/// Formats a JSON value the way QEMU prints `json:` file names (`", "` and `": "`).
pub(crate) fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

impl FakeState {
    // ---------------------------------------------------------------- block graph

    /// Opens a node from `blockdev-add` options (already type-checked). Children given as
    /// objects become implicit nodes. Returns the node name.
    pub(crate) fn open_node(&mut self, opts: &Map<String, Value>, top: bool) -> QResult<String> {
        let driver = opts
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = match opts.get("node-name").and_then(Value::as_str) {
            Some(n) => {
                if self.node(n).is_some() {
                    return Err(QmpError::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                if n.is_empty()
                    || n.len() > 31
                    || !n.starts_with(|c: char| c.is_ascii_alphabetic())
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    return Err(QmpError::generic(
                        "Invalid node-name: '".to_owned() + n + "'",
                    ));
                }
                (n.to_owned(), false)
            }
            None if top => {
                return Err(QmpError::generic(
                    "'node-name' must be specified for the root node",
                ))
            }
            None => (String::new(), true),
        };
        let read_only = opts
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut node = BlockNode {
            name: name.0,
            driver: driver.clone(),
            read_only,
            file: None,
            backing: None,
            filename: None,
            size: 0,
            bitmaps: Vec::new(),
            wr_highest_offset: 0,
            data: None,
            options: Value::Null,
            implicit: name.1,
        };
        let mut created_children = Vec::new();
        let result = (|| -> QResult<()> {
            let mut shown = Map::new();
            match driver.as_str() {
                "null-co" => {
                    node.size = opts.get("size").and_then(Value::as_u64).unwrap_or(1 << 30);
                    shown.insert("driver".into(), json!("null-co"));
                    if let Some(v) = opts.get("read-zeroes") {
                        shown.insert("read-zeroes".into(), v.clone());
                    }
                    shown.insert("size".into(), json!(node.size));
                }
                "file" => {
                    let path = opts
                        .get("filename")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let image = self.images.get(path).ok_or_else(|| {
                        QmpError::generic(format!(
                            "Could not open '{path}': No such file or directory"
                        ))
                    })?;
                    node.size = file_size(image);
                    node.filename = Some(path.to_owned());
                    shown.insert("driver".into(), json!("file"));
                    shown.insert("filename".into(), json!(path));
                }
                "raw" | "qcow2" => {
                    let file = self.child(opts, "file", &mut created_children)?;
                    let Some(file) = file else {
                        return Err(QmpError::generic("Parameter 'file' is missing"));
                    };
                    let file_node = self.lookup(&file)?.clone();
                    let image = file_node
                        .filename
                        .as_ref()
                        .and_then(|p| self.images.get(p).cloned());
                    if driver == "qcow2" {
                        let Some(image) = image.filter(|i| i.format == ImageFormat::Qcow2) else {
                            return Err(QmpError::generic("Image is not in qcow2 format"));
                        };
                        node.size = image.disk.capacity();
                        node.data = Some(image.disk.clone());
                        if let Some(backing) = opts.get("backing") {
                            if !backing.is_null() {
                                node.backing =
                                    self.child(opts, "backing", &mut created_children)?;
                            }
                        }
                    } else {
                        match image {
                            Some(image) if image.format == ImageFormat::Raw => {
                                node.size = image.disk.capacity();
                                node.data = Some(image.disk.clone());
                            }
                            _ => node.size = file_node.size,
                        }
                    }
                    if let Some(b) = &node.backing {
                        shown.insert("backing".into(), self.lookup(b)?.options.clone());
                    }
                    shown.insert("driver".into(), json!(driver));
                    shown.insert("file".into(), file_node.options.clone());
                    node.file = Some(file);
                }
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'driver' does not accept value '{other}'"
                    )))
                }
            }
            node.options = Value::Object(shown);
            Ok(())
        })();
        if let Err(e) = result {
            // Children opened for this node go away with it.
            self.nodes.retain(|n| !created_children.contains(&n.name));
            return Err(e);
        }
        if node.implicit {
            node.name = self.auto_name();
        }
        let name = node.name.clone();
        self.nodes.push(node);
        Ok(name)
    }

    /// A child given by reference (a node name) or inline (options of a new implicit node).
    pub(crate) fn child(
        &mut self,
        opts: &Map<String, Value>,
        key: &str,
        created: &mut Vec<String>,
    ) -> QResult<Option<String>> {
        match opts.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(reference)) => {
                self.lookup(reference)?;
                Ok(Some(reference.clone()))
            }
            Some(Value::Object(inline)) => {
                let name = self.open_node(inline, false)?;
                created.push(name.clone());
                Ok(Some(name))
            }
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: BlockdevRef"
            ))),
        }
    }

    /// The text of a node's `file` name as QEMU shows it.
    pub(crate) fn display_filename(&self, node: &BlockNode) -> String {
        match node.driver.as_str() {
            "file" => node.filename.clone().unwrap_or_default(),
            "copy-before-write" => node
                .file
                .as_deref()
                .and_then(|f| self.node(f))
                .map(|f| self.display_filename(f))
                .unwrap_or_default(),
            "qcow2" | "raw" if node.backing.is_none() => {
                let file = node.file.as_deref().and_then(|f| self.node(f));
                match file {
                    Some(f) if f.driver == "file" => self.display_filename(f),
                    _ => format!("json:{}", qemu_json(&node.options)),
                }
            }
            _ => format!("json:{}", qemu_json(&node.options)),
        }
    }

    /// Nodes that use `name` as a child, an export or a job.
    pub(crate) fn users(&self, name: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.file.as_deref() == Some(name) || n.backing.as_deref() == Some(name))
            .map(|n| n.name.clone())
            .collect()
    }

    pub(crate) fn job_holding(&self, name: &str) -> Option<&Job> {
        self.jobs
            .iter()
            .find(|j| j.is_live() && j.nodes().contains(&name))
    }

    /// `blockdev-del`.
    pub(crate) fn delete_node(&mut self, name: &str) -> QResult<()> {
        let Some(node) = self.node(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let implicit = node.implicit;
        if self.exports.iter().any(|e| e.node == name) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if self.job_holding(name).is_some() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: block device is in use by block job: backup"
            )));
        }
        if implicit {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.users(name).is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let node = self.node(name).cloned().expect("checked above");
        self.nodes.retain(|n| n.name != name);
        // Implicit children nobody else uses go with their parent.
        for child in [node.file, node.backing].into_iter().flatten() {
            let implicit = self.node(&child).is_some_and(|c| c.implicit);
            if implicit && self.users(&child).is_empty() {
                let _ = self.delete_implicit(&child);
            }
        }
        Ok(())
    }

    pub(crate) fn delete_implicit(&mut self, name: &str) -> QResult<()> {
        if let Some(n) = self.node_mut(name) {
            n.implicit = false;
        }
        self.delete_node(name)
    }

    /// `query-named-block-nodes` (flat: the filter nodes are listed, not nested).
    pub(crate) fn named_block_nodes(&self) -> Value {
        Value::Array(self.nodes.iter().rev().map(|n| self.node_info(n)).collect())
    }

    pub(crate) fn node_info(&self, n: &BlockNode) -> Value {
        let filename = self.display_filename(n);
        let mut image = Map::new();
        image.insert("virtual-size".into(), json!(n.size));
        image.insert("filename".into(), json!(filename));
        match n.driver.as_str() {
            "qcow2" | "copy-before-write" => {
                image.insert("cluster-size".into(), json!(DEFAULT_CLUSTER));
            }
            _ => {}
        }
        image.insert("format".into(), json!(n.driver));
        image.insert("actual-size".into(), json!(self.actual_size(n)));
        if n.driver == "qcow2" {
            image.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
                    "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false,
                    "extended-l2": false}}),
            );
        }
        if n.driver == "file" && self.release.file_format_specific() {
            image.insert(
                "format-specific".into(),
                json!({"type": "file", "data": {}}),
            );
        }
        if matches!(n.driver.as_str(), "qcow2" | "file" | "copy-before-write") {
            image.insert("dirty-flag".into(), json!(false));
        }
        let mut m = Map::new();
        m.insert("iops_rd".into(), json!(0));
        m.insert("detect_zeroes".into(), json!("off"));
        if self.release.has_active_flag() {
            m.insert("active".into(), json!(true));
        }
        m.insert("image".into(), Value::Object(image));
        m.insert("iops_wr".into(), json!(0));
        m.insert("ro".into(), json!(n.read_only));
        m.insert("node-name".into(), json!(n.name));
        m.insert("backing_file_depth".into(), json!(0));
        m.insert("drv".into(), json!(n.driver));
        m.insert("iops".into(), json!(0));
        m.insert("bps_wr".into(), json!(0));
        m.insert("write_threshold".into(), json!(0));
        if let Some(b) = n.backing.as_deref().and_then(|b| self.node(b)) {
            m.insert("backing_file".into(), json!(self.display_filename(b)));
        }
        if !n.bitmaps.is_empty() {
            m.insert(
                "dirty-bitmaps".into(),
                Value::Array(n.bitmaps.iter().rev().map(DirtyBitmap::to_json).collect()),
            );
        }
        m.insert("encrypted".into(), json!(false));
        m.insert("bps".into(), json!(0));
        m.insert("bps_rd".into(), json!(0));
        m.insert(
            "cache".into(),
            json!({"no-flush": false, "direct": false, "writeback": true}),
        );
        m.insert("file".into(), json!(filename));
        Value::Object(m)
    }

    /// Bytes of host storage a node takes (what `actual-size` shows).
    pub(crate) fn actual_size(&self, n: &BlockNode) -> u64 {
        match n.driver.as_str() {
            "null-co" => 0,
            "raw" => n
                .file
                .as_deref()
                .and_then(|f| self.node(f))
                .map_or(0, |f| self.actual_size(f)),
            _ => {
                let path = match n.driver.as_str() {
                    "file" => n.filename.clone(),
                    _ => n
                        .file
                        .as_deref()
                        .and_then(|f| self.node(f))
                        .and_then(|f| f.filename.clone()),
                };
                path.and_then(|p| self.images.get(&p))
                    .map_or(0, |i| file_size(i) + 3 * 4096)
            }
        }
    }

    /// `query-blockstats` with `query-nodes: true` (oldest node first).
    pub(crate) fn blockstats(&self) -> Value {
        Value::Array(self.nodes.iter().map(|n| self.node_stats(n)).collect())
    }

    pub(crate) fn node_stats(&self, n: &BlockNode) -> Value {
        let mut stats = Map::new();
        let zero_keys = [
            "unmap_operations",
            "unmap_merged",
            "flush_total_time_ns",
            "wr_total_time_ns",
            "failed_wr_operations",
            "failed_rd_operations",
            "wr_merged",
            "wr_bytes",
            "failed_unmap_operations",
            "failed_flush_operations",
            "rd_total_time_ns",
            "invalid_unmap_operations",
            "flush_operations",
            "wr_operations",
            "unmap_bytes",
            "rd_merged",
            "rd_bytes",
            "unmap_total_time_ns",
            "invalid_flush_operations",
            "rd_operations",
            "invalid_wr_operations",
            "invalid_rd_operations",
        ];
        for k in zero_keys {
            stats.insert(k.into(), json!(0));
        }
        if self.release.has_zone_stats() {
            for k in [
                "failed_zone_append_operations",
                "zone_append_merged",
                "zone_append_total_time_ns",
                "zone_append_operations",
                "zone_append_bytes",
                "invalid_zone_append_operations",
            ] {
                stats.insert(k.into(), json!(0));
            }
        }
        stats.insert("wr_highest_offset".into(), json!(n.wr_highest_offset));
        stats.insert("timed_stats".into(), json!([]));
        stats.insert("account_invalid".into(), json!(false));
        stats.insert("account_failed".into(), json!(false));
        let mut m = Map::new();
        m.insert("stats".into(), Value::Object(stats));
        m.insert("node-name".into(), json!(n.name));
        if n.driver == "file" {
            m.insert(
                "driver-specific".into(),
                json!({"discard-bytes-ok": 0, "discard-nb-ok": 0, "driver": "file",
                    "discard-nb-failed": 0}),
            );
        }
        if let Some(f) = n.file.as_deref().and_then(|f| self.node(f)) {
            m.insert("parent".into(), self.node_stats(f));
        }
        Value::Object(m)
    }

    // ---------------------------------------------------------------- data

    /// Reads what the guest of node `name` sees.
    pub(crate) fn read(&self, name: &str, buf: &mut [u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        check_range(node, offset, buf.len() as u64)?;
        match node.driver.as_str() {
            "null-co" => {
                buf.fill(0);
                Ok(())
            }
            "qcow2" => {
                let disk = node.data.as_ref().expect("qcow2 nodes have data");
                let mut pos = 0usize;
                while pos < buf.len() {
                    let at = offset + pos as u64;
                    let cluster_end = (at / DEFAULT_CLUSTER + 1) * DEFAULT_CLUSTER;
                    let n = ((cluster_end - at) as usize).min(buf.len() - pos);
                    let piece = &mut buf[pos..pos + n];
                    let allocated = disk
                        .allocated_extents(at, n as u64)
                        .map_err(io_error)?
                        .iter()
                        .any(|e| e.kind == disk_transport::ExtentKind::Data);
                    if allocated {
                        disk.read_at(piece, at).map_err(io_error)?;
                    } else if let Some(b) = &node.backing {
                        let backing_size = self.lookup(b)?.size;
                        piece.fill(0);
                        if at < backing_size {
                            let m = ((backing_size - at) as usize).min(n);
                            self.read(b, &mut piece[..m], at)?;
                        }
                    } else {
                        piece.fill(0);
                    }
                    pos += n;
                }
                Ok(())
            }
            "raw" if node.data.is_some() => node
                .data
                .as_ref()
                .expect("checked")
                .read_at(buf, offset)
                .map_err(io_error),
            "raw" | "copy-before-write" => {
                let child = node.file.clone().unwrap_or_default();
                self.read(&child, buf, offset)
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes into node `name`'s own layer (no copy-before-write, no bitmaps).
    pub(crate) fn write_layer(&mut self, name: &str, data: &[u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        match node.driver.as_str() {
            "qcow2" | "raw" if node.data.is_some() => node
                .data
                .as_ref()
                .expect("checked")
                .write_at(data, offset)
                .map_err(io_error),
            "raw" | "copy-before-write" => {
                let child = node.file.clone().unwrap_or_default();
                self.write_layer(&child, data, offset)
            }
            // null-co and protocol nodes of images the fake does not lay out: discarded.
            _ => Ok(()),
        }
    }

    /// A guest write to node `name`: copy-before-write for backup jobs reading it, then the
    /// data, then the recording bitmaps.
    pub(crate) fn guest_write(&mut self, name: &str, data: &[u8], offset: u64) -> QResult<()> {
        let node = self.lookup(name)?;
        // Writes through a backup's copy-before-write filter are writes to its source.
        if node.driver == "copy-before-write" {
            let source = node.file.clone().unwrap_or_default();
            return self.guest_write(&source, data, offset);
        }
        check_range(node, offset, data.len() as u64)?;
        if node.read_only {
            return Err(QmpError::generic(format!("Node '{name}' is read only")));
        }
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / DEFAULT_CLUSTER;
        let last = (offset + data.len() as u64 - 1) / DEFAULT_CLUSTER;
        let jobs: Vec<usize> = self
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| {
                j.is_live() && matches!(&j.kind, JobKind::Backup { source, .. } if source == name)
            })
            .map(|(i, _)| i)
            .collect();
        for i in jobs {
            let JobKind::Backup { target, copied, .. } = &self.jobs[i].kind else {
                continue;
            };
            let target = target.clone();
            let todo: Vec<u64> = (first..=last).filter(|c| !copied.contains(c)).collect();
            let size = self.lookup(name)?.size;
            for cluster in todo {
                let start = cluster * DEFAULT_CLUSTER;
                let len = DEFAULT_CLUSTER.min(size - start) as usize;
                let mut old = vec![0u8; len];
                self.read(name, &mut old, start)?;
                self.write_layer(&target, &old, start)?;
                if let JobKind::Backup { copied, .. } = &mut self.jobs[i].kind {
                    copied.insert(cluster);
                }
            }
        }
        self.write_layer(name, data, offset)?;
        let node = self.node_mut(name).expect("looked up above");
        for b in node.bitmaps.iter_mut().filter(|b| b.recording) {
            b.mark(offset, data.len() as u64);
        }
        node.wr_highest_offset = node.wr_highest_offset.max(offset + data.len() as u64);
        Ok(())
    }
}

pub(crate) fn check_range(node: &BlockNode, offset: u64, len: u64) -> QResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= node.size => Ok(()),
        _ => Err(QmpError::generic(format!(
            "Request of {len} bytes at offset {offset} is beyond the end of node '{}' ({} bytes)",
            node.name, node.size
        ))),
    }
}

pub(crate) fn io_error(e: disk_transport::Error) -> QmpError {
    QmpError::generic(format!("Input/output error: {e}"))
}

/// Size of an image file: raw images are their data; qcow2 ones a header, tables and the
/// allocated clusters (an approximation; QEMU's exact layout is not modelled).
pub(crate) fn file_size(image: &ImageFile) -> u64 {
    match image.format {
        ImageFormat::Raw => image.disk.capacity(),
        ImageFormat::Qcow2 => 3 * DEFAULT_CLUSTER + image.disk.allocated_bytes(),
    }
}
