//! Allocation of the dataplane's fixed-size maps: dense ids (services,
//! backend slots) and Maglev table rows in the ring map. Pure bookkeeping,
//! tested on its own; nothing here touches the kernel.
//!
//! Every allocation is decided before anything is written, so a service
//! that does not fit is refused whole and the services already programmed
//! are never disturbed.

use std::collections::{BTreeMap, BTreeSet};

use kube_dsr_common::RING_ROW;

/// Free ids `0..len`, lowest first (a dense id space keeps the per-CPU
/// counter arrays' touched part small).
#[derive(Clone, Debug)]
pub struct IdPool {
    len: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    pub fn new(len: u32) -> Self {
        Self { len, free: (0..len).collect() }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Marks `id` taken (what a restart reads back). `false` when it is out
    /// of range or taken already.
    pub fn take(&mut self, id: u32) -> bool {
        self.free.remove(&id)
    }

    /// The `n` lowest free ids, taken; `None` (nothing taken) when fewer are
    /// free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.free.len() < n {
            return None;
        }
        Some((0..n).filter_map(|_| self.free.pop_first()).collect())
    }

    pub fn release(&mut self, id: u32) {
        if id < self.len {
            self.free.insert(id);
        }
    }
}

/// A Maglev table's place in the ring map: `size` slots from slot `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub base: u32,
    pub size: u32,
}

/// The ring map is cut into chunks of [`RING_ROW`] slots; each chunk in use
/// holds rows of one table size only. The supported (prime) sizes fill a
/// chunk almost exactly (261 × 251, 64 × 1021, 16 × 4093, 4 × 16381,
/// 2 × 32749, 1 × 65537), so memory follows the sizes in use and free space
/// never fragments below a chunk: a freed row is reused by the next table of
/// its size, and a chunk whose rows are all free serves any size again.
#[derive(Clone, Debug)]
pub struct RingPool {
    chunks: u32,
    free_chunks: BTreeSet<u32>,
    /// Per table size: free rows in chunks of that size, and rows in use per
    /// chunk.
    classes: BTreeMap<u32, Class>,
}

#[derive(Clone, Debug, Default)]
struct Class {
    free: BTreeSet<u32>,
    used: BTreeMap<u32, u32>,
}

/// Rows of `size` slots that fit in one chunk.
pub fn rows_per_chunk(size: u32) -> u32 {
    RING_ROW.checked_div(size).unwrap_or(0)
}

impl RingPool {
    /// A pool over `slots` ring slots (whole chunks only).
    pub fn new(slots: u64) -> Self {
        let chunks = u32::try_from(slots / u64::from(RING_ROW)).unwrap_or(u32::MAX);
        Self { chunks, free_chunks: (0..chunks).collect(), classes: BTreeMap::new() }
    }

    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    pub fn free_chunks(&self) -> u32 {
        self.free_chunks.len() as u32
    }

    /// Rows of `size` that could be allocated now.
    pub fn available(&self, size: u32) -> u64 {
        let free = self.classes.get(&size).map_or(0, |c| c.free.len() as u64);
        free + u64::from(self.free_chunks()) * u64::from(rows_per_chunk(size))
    }

    /// Allocates `n` rows of `size` slots, all or none.
    pub fn alloc(&mut self, size: u32, n: usize) -> Option<Vec<Row>> {
        if size == 0 || size > RING_ROW || self.available(size) < n as u64 {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let class = self.classes.entry(size).or_default();
            if class.free.is_empty() {
                let chunk = self.free_chunks.pop_first().expect("checked by available()");
                let start = chunk * RING_ROW;
                class.free.extend((0..rows_per_chunk(size)).map(|i| start + i * size));
            }
            let base = class.free.pop_first().expect("refilled above");
            *class.used.entry(base / RING_ROW).or_default() += 1;
            out.push(Row { base, size });
        }
        Some(out)
    }

    /// Marks a row found in the maps (after a restart) as in use. `false`
    /// when it cannot be one of this pool's rows (outside the map, not on a
    /// row boundary of its size, or in a chunk holding another size).
    pub fn take(&mut self, row: Row) -> bool {
        let per = rows_per_chunk(row.size);
        let chunk = row.base / RING_ROW;
        let offset = row.base % RING_ROW;
        if per == 0
            || chunk >= self.chunks
            || !offset.is_multiple_of(row.size)
            || offset / row.size >= per
        {
            return false;
        }
        if self.free_chunks.remove(&chunk) {
            let class = self.classes.entry(row.size).or_default();
            let start = chunk * RING_ROW;
            class.free.extend((0..per).map(|i| start + i * row.size));
        }
        let Some(class) = self.classes.get_mut(&row.size) else { return false };
        if !class.free.remove(&row.base) {
            return false;
        }
        *class.used.entry(chunk).or_default() += 1;
        true
    }

    pub fn release(&mut self, row: Row) {
        let chunk = row.base / RING_ROW;
        let Some(class) = self.classes.get_mut(&row.size) else { return };
        let Some(used) = class.used.get_mut(&chunk) else { return };
        if !class.free.insert(row.base) {
            return;
        }
        *used -= 1;
        if *used == 0 {
            class.used.remove(&chunk);
            let start = chunk * RING_ROW;
            for i in 0..rows_per_chunk(row.size) {
                class.free.remove(&(start + i * row.size));
            }
            self.free_chunks.insert(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::TABLE_SIZES;

    #[test]
    fn ids_are_dense_all_or_nothing_and_reused() {
        let mut p = IdPool::new(4);
        assert_eq!(p.alloc(3), Some(vec![0, 1, 2]));
        assert_eq!(p.alloc(2), None, "only one is free");
        assert_eq!(p.free(), 1, "a refused allocation takes nothing");
        p.release(1);
        assert_eq!(p.alloc(2), Some(vec![1, 3]));
        assert!(!p.take(3), "taken already");
        p.release(9);
        assert_eq!(p.free(), 0, "out of range ids are ignored");
    }

    #[test]
    fn every_supported_size_fills_a_chunk_almost_exactly() {
        for size in TABLE_SIZES {
            let per = rows_per_chunk(size);
            assert!(per >= 1, "{size}");
            let waste = RING_ROW - per * size;
            assert!(waste < size && waste * 100 < RING_ROW, "size {size} wastes {waste} slots");
        }
    }

    #[test]
    fn rows_of_one_size_share_chunks_and_a_freed_chunk_serves_any_size() {
        let mut p = RingPool::new(2 * u64::from(RING_ROW));
        let small = p.alloc(16381, 4).unwrap();
        assert_eq!(p.free_chunks(), 1, "four rows of 16381 share one chunk");
        let bases: BTreeSet<u32> = small.iter().map(|r| r.base).collect();
        assert_eq!(bases, BTreeSet::from([0, 16381, 2 * 16381, 3 * 16381]));
        let big = p.alloc(65537, 1).unwrap();
        assert_eq!(big[0].base, RING_ROW);
        assert_eq!(p.alloc(65537, 1), None, "no chunk left");
        assert_eq!(p.alloc(251, 1), None, "chunks of another size are not shared");
        for r in small {
            p.release(r);
        }
        assert_eq!(p.free_chunks(), 1);
        assert_eq!(p.alloc(251, 261).map(|r| r.len()), Some(261));
        assert_eq!(p.alloc(251, 1), None);
    }

    #[test]
    fn a_refused_allocation_takes_nothing() {
        let mut p = RingPool::new(u64::from(RING_ROW));
        assert_eq!(p.alloc(32749, 3), None);
        assert_eq!(p.available(32749), 2);
        assert_eq!(p.alloc(32749, 2).map(|r| r.len()), Some(2));
        assert_eq!(p.alloc(0, 1), None);
        assert_eq!(p.alloc(RING_ROW + 1, 1), None);
    }

    #[test]
    fn rows_read_back_are_kept_out_of_later_allocations() {
        let mut p = RingPool::new(3 * u64::from(RING_ROW));
        // The layout of earlier versions: one service row per chunk.
        assert!(p.take(Row { base: RING_ROW, size: 65537 }));
        assert!(p.take(Row { base: 2 * RING_ROW + 4093, size: 4093 }));
        assert!(!p.take(Row { base: 2 * RING_ROW + 4093, size: 4093 }), "taken twice");
        assert!(!p.take(Row { base: 2 * RING_ROW + 5, size: 4093 }), "not on a row boundary");
        assert!(!p.take(Row { base: 2 * RING_ROW, size: 251 }), "chunk holds 4093");
        assert!(!p.take(Row { base: 3 * RING_ROW, size: 251 }), "outside the map");
        let rows = p.alloc(4093, 15).unwrap();
        assert!(rows.iter().all(|r| r.base != 2 * RING_ROW + 4093));
        assert_eq!(p.alloc(65537, 1).unwrap()[0].base, 0);
        assert_eq!(p.alloc(4093, 1), None);
    }
}
