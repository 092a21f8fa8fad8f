//! Reference counts and cluster allocation (QEMU's `block/qcow2-refcount.c`).
//!
//! The refcount table is kept in memory, refcount blocks in a small cache; every change is
//! written through at once (the entry's bytes only), so nothing is left to write back and a
//! flush is one `fsync`. New clusters come from the end of the file, or from clusters freed
//! earlier in the same session; a refcount block for a new range is placed at the end of the
//! file, inside the range it covers, so it counts itself.

use super::{ImageFile, Metadata};
use crate::Result;

/// How many in-use clusters past the end of the file an allocation steps over before calling
/// the image damaged (so a refcount table claiming everything cannot keep it busy).
const MAX_COUNTED_PAST_END: u32 = 1 << 16;

/// The refcount of entry `index` of a refcount block with entries `1 << order` bits wide.
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        block[at..at + width]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Sets entry `index` to `value` (which must fit) and returns the byte range that changed.
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) -> std::ops::Range<usize> {
    let bits = 1u64 << order;
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        for (i, b) in block[at..at + width].iter_mut().enumerate() {
            *b = (value >> (8 * (width - 1 - i))) as u8;
        }
        at..at + width
    } else {
        let bit = index * bits;
        let at = (bit / 8) as usize;
        let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
        block[at] = (block[at] & !mask) | (((value as u8) << (bit % 8)) & mask);
        at..at + 1
    }
}

impl Metadata {
    fn block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << (1 << self.refcount_order)) - 1
        }
    }

    /// The refcount block for table index `index`, loaded, or `None` when it is unallocated.
    fn block(&mut self, io: &ImageFile, index: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.refcount_table.get(index as usize) else {
            return Ok(None);
        };
        let offset = entry & super::cluster::OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(io.corrupt(format!(
                "refcount table entry {index} points to {offset:#x}, not cluster-aligned"
            )));
        }
        if !self.blocks.contains(offset) {
            let mut block = vec![0u8; self.cluster_size() as usize];
            io.read_exact_at(&mut block, offset, "refcount block")?;
            self.blocks.insert(offset, block);
        }
        Ok(Some(offset))
    }

    /// The refcount of the host cluster at `host`.
    pub(super) fn refcount(&mut self, io: &ImageFile, host: u64) -> Result<u64> {
        let cluster = host >> self.cluster_bits;
        let entries = self.block_entries();
        match self.block(io, cluster / entries)? {
            None => Ok(0),
            Some(offset) => {
                let block = self.blocks.get(offset).expect("just loaded");
                Ok(get(block, cluster % entries, self.refcount_order))
            }
        }
    }

    /// Sets the refcount of the host cluster at `host`, creating its refcount block (and
    /// growing the table) when needed.
    pub(super) fn set_refcount(&mut self, io: &ImageFile, host: u64, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(io.corrupt(format!(
                "the refcount of the cluster at {host:#x} would overflow its {} bits",
                1 << self.refcount_order
            )));
        }
        self.set_refcounts(io, host, 1, value)
    }

    /// Sets the refcounts of `count` host clusters from `host` to `value` (which must fit),
    /// with one write per refcount block, creating blocks (and growing the table) when needed.
    pub(super) fn set_refcounts(
        &mut self,
        io: &ImageFile,
        host: u64,
        count: u64,
        value: u64,
    ) -> Result<()> {
        let entries = self.block_entries();
        let order = self.refcount_order;
        let mut cluster = host >> self.cluster_bits;
        let end = cluster + count;
        while cluster < end {
            let index = cluster / entries;
            let n = (entries - cluster % entries).min(end - cluster);
            let offset = match self.block(io, index)? {
                Some(offset) => offset,
                None if value == 0 => {
                    cluster += n;
                    continue;
                }
                None => {
                    if index as usize >= self.refcount_table.len() {
                        self.grow_table(io, index)?;
                    }
                    // Growing the table may have placed the block these clusters need already
                    // (for the new table's own clusters).
                    match self.block(io, index)? {
                        Some(offset) => offset,
                        None => self.new_block(io, index)?,
                    }
                }
            };
            // Creating the block may have dropped another from the cache, never this one.
            let block = self.blocks.get_mut(offset).expect("loaded");
            let (mut from, mut to) = (usize::MAX, 0);
            for i in cluster % entries..cluster % entries + n {
                let range = set(block, i, order, value);
                from = from.min(range.start);
                to = to.max(range.end);
            }
            let bytes = block[from..to].to_vec();
            io.write_all_at(&bytes, offset + from as u64, "refcount block")?;
            cluster += n;
        }
        Ok(())
    }

    /// Adds `delta` (±1) to a refcount, freeing the cluster when it drops to zero.
    pub(super) fn adjust_refcount(&mut self, io: &ImageFile, host: u64, delta: i64) -> Result<()> {
        let now = self.refcount(io, host)?;
        let next = now.checked_add_signed(delta).ok_or_else(|| {
            io.corrupt(format!(
                "the refcount of the cluster at {host:#x} is {now} and would drop below 0"
            ))
        })?;
        self.set_refcount(io, host, next)?;
        if next == 0 {
            if !self.reading.is_empty() {
                let now = self.next_ticket;
                self.quarantined.push_back((host, now));
            } else {
                // No read in flight: whatever waited for reads to end is free too.
                let waited = self.quarantined.drain(..).map(|(host, _)| host);
                self.freed.extend(waited);
                self.freed.push(host);
            }
        }
        Ok(())
    }

    /// Places a new, empty refcount block for table index `index` at the end of the file and
    /// counts it in whichever block covers it (itself, usually).
    fn new_block(&mut self, io: &ImageFile, index: u64) -> Result<u64> {
        let offset = self.end;
        self.end += self.cluster_size();
        let block = vec![0u8; self.cluster_size() as usize];
        io.write_all_at(&block, offset, "new refcount block")?;
        self.refcount_table[index as usize] = offset;
        if !self.moving_table {
            let at = self.refcount_table_offset + index * 8;
            io.write_all_at(&offset.to_be_bytes(), at, "refcount table")?;
        }
        self.blocks.insert(offset, block);
        self.set_refcount(io, offset, 1)?;
        Ok(offset)
    }

    /// Moves the refcount table to a larger place at the end of the file, big enough for index
    /// `needed` and then some, as QEMU does when an image outgrows it.
    fn grow_table(&mut self, io: &ImageFile, needed: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let entries = (needed + 1).max(self.refcount_table.len() as u64 * 2);
        // Room for the blocks that will count the new table itself.
        let entries = entries + 2;
        let clusters = (entries * 8).div_ceil(cluster_size);
        if clusters * cluster_size > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(io.corrupt(
                "the refcount table would grow past 8 MiB (QEMU's limit): the image is too \
                 large for its cluster size"
                    .into(),
            ));
        }
        let old_offset = self.refcount_table_offset;
        let old_clusters = (self.refcount_table.len() as u64 * 8).div_ceil(cluster_size);
        self.refcount_table
            .resize((clusters * cluster_size / 8) as usize, 0);
        let new_offset = self.end;
        self.end += clusters * cluster_size;
        self.moving_table = true;
        let counted =
            (0..clusters).try_for_each(|i| self.set_refcount(io, new_offset + i * cluster_size, 1));
        self.moving_table = false;
        counted?;
        let bytes: Vec<u8> = self
            .refcount_table
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        io.write_all_at(&bytes, new_offset, "new refcount table")?;
        io.sync("refcount table")?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&new_offset.to_be_bytes());
        field[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        io.write_all_at(
            &field,
            super::header::REFCOUNT_TABLE_OFFSET_FIELD,
            "header (refcount table)",
        )?;
        io.sync("header")?;
        self.refcount_table_offset = new_offset;
        for i in 0..old_clusters {
            self.adjust_refcount(io, old_offset + i * cluster_size, -1)?;
        }
        Ok(())
    }

    /// A free host cluster, counted (refcount 1): one freed earlier, or a new one at the end of
    /// the file.
    pub(super) fn allocate(&mut self, io: &ImageFile) -> Result<u64> {
        while let Some(host) = self.freed.pop() {
            if self.refcount(io, host)? == 0 {
                self.set_refcount(io, host, 1)?;
                return Ok(host);
            }
        }
        for _ in 0..MAX_COUNTED_PAST_END {
            let host = self.end;
            self.end += self.cluster_size();
            // A cluster past the end of the file may still be counted (a file truncated by
            // hand, a preallocated tail): never hand out one that is in use.
            if self.refcount(io, host)? == 0 {
                self.set_refcount(io, host, 1)?;
                return Ok(host);
            }
        }
        Err(io.corrupt(format!(
            "the refcounts claim more than {MAX_COUNTED_PAST_END} clusters past the end of the \
             file are in use: repair the image with `qemu-img check -r all`"
        )))
    }

    /// `count` clusters, contiguous where the end of the file allows (for one write of the
    /// data).
    pub(super) fn allocate_many(&mut self, io: &ImageFile, count: usize) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        if self.freed.is_empty() && count > 1 {
            // The usual case of a growing image: a run at the end of the file, counted with
            // one write per refcount block rather than one per cluster.
            let start = self.end;
            let mut free = true;
            for i in 0..count as u64 {
                if self.refcount(io, start + i * cs)? != 0 {
                    free = false;
                    break;
                }
            }
            if free {
                self.end += count as u64 * cs;
                self.set_refcounts(io, start, count as u64, 1)?;
                return Ok((0..count as u64).map(|i| start + i * cs).collect());
            }
        }
        let mut hosts = Vec::with_capacity(count);
        for _ in 0..count {
            hosts.push(self.allocate(io)?);
        }
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Setting an entry of any width changes only it, and reads back.
        #[test]
        fn set_then_get(order in 0u32..=6, index in 0u64..512, value in any::<u64>(), fill in any::<u8>()) {
            let mut block = vec![fill; 4096];
            let bits = 1u64 << order;
            let value = if bits == 64 { value } else { value & ((1 << bits) - 1) };
            let neighbour = index ^ 1;
            let before = get(&block, neighbour, order);
            let changed = set(&mut block, index, order, value);
            prop_assert!(changed.end <= block.len());
            prop_assert_eq!(get(&block, index, order), value);
            prop_assert_eq!(get(&block, neighbour, order), before);
        }
    }
}
