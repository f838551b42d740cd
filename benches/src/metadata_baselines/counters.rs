//! Per-2M and per-1G private-page counters: how the bitmap and the struct-page array answer
//! the uniformity questions (QEMU's and the kernel's trackers keep the same ones).

use pfnstore_core::{Geometry, PageSize};

use super::BlockChange;

/// Whether a block with `count` of its `pages` private is uniform: none or all private.
pub(super) fn uniform(count: u64, pages: u64) -> bool {
    count == 0 || count == pages
}

/// The private-page count of every middle block and chunk of a space from PFN 0.
#[derive(Debug)]
pub(super) struct BlockCounters {
    geometry: Geometry,
    /// `u16`: a middle block has at most 512 pages on x86-64 (checked in `new`).
    mid_private: Vec<u16>,
    chunk_private: Vec<u32>,
}

impl BlockCounters {
    /// Zeroed counters for `pages` pages (a multiple of the chunk size).
    pub(super) fn new(geometry: Geometry, pages: u64) -> BlockCounters {
        assert!(
            geometry.mid_pages() <= u64::from(u16::MAX),
            "middle blocks too large for u16 counters"
        );
        BlockCounters {
            geometry,
            mid_private: vec![0; (pages / geometry.mid_pages()) as usize],
            chunk_private: vec![0; (pages / geometry.chunk_pages()) as usize],
        }
    }

    /// Bytes the counters hold.
    pub(super) fn bytes(&self) -> usize {
        self.mid_private.len() * 2 + self.chunk_private.len() * 4
    }

    /// The largest uniform block around `pfn`.
    pub(super) fn max_order(&self, pfn: u64) -> PageSize {
        let g = self.geometry;
        let chunk = self.chunk_private[(pfn >> g.order(PageSize::Size1G)) as usize];
        if uniform(chunk.into(), g.chunk_pages()) {
            return PageSize::Size1G;
        }
        let mid = self.mid_private[(pfn >> g.order(PageSize::Size2M)) as usize];
        if uniform(mid.into(), g.mid_pages()) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }

    /// Starts counting one conversion, whose block changes go to `changes`.
    pub(super) fn tally<'a>(&'a mut self, changes: &'a mut Vec<BlockChange>) -> Tally<'a> {
        Tally {
            counters: self,
            changes,
            mid: None,
            chunk: None,
        }
    }
}

/// One conversion's counting. Conversions walk ascending, so a block's pages come together:
/// the current middle block and chunk are kept with their counts from before the call, and a
/// block's uniformity change is noted when the walk leaves it (or at [`Tally::finish`]).
pub(super) struct Tally<'a> {
    counters: &'a mut BlockCounters,
    changes: &'a mut Vec<BlockChange>,
    mid: Option<(usize, u64)>,
    chunk: Option<(usize, u64)>,
}

impl Tally<'_> {
    /// Adds `delta` private pages at `pfn` (all in one middle block).
    pub(super) fn add(&mut self, pfn: u64, delta: i64) {
        let g = self.counters.geometry;
        let m = (pfn >> g.order(PageSize::Size2M)) as usize;
        let c = (pfn >> g.order(PageSize::Size1G)) as usize;
        if self.mid.is_none_or(|(i, _)| i != m) {
            self.leave_mid();
            self.mid = Some((m, self.counters.mid_private[m].into()));
        }
        if self.chunk.is_none_or(|(i, _)| i != c) {
            self.leave_chunk();
            self.chunk = Some((c, self.counters.chunk_private[c].into()));
        }
        let counters = &mut *self.counters;
        counters.mid_private[m] = (i64::from(counters.mid_private[m]) + delta) as u16;
        counters.chunk_private[c] = (i64::from(counters.chunk_private[c]) + delta) as u32;
    }

    /// Notes the changes of the blocks still current.
    pub(super) fn finish(mut self) {
        self.leave_mid();
        self.leave_chunk();
    }

    fn leave_mid(&mut self) {
        if let Some((i, before)) = self.mid.take() {
            let after = self.counters.mid_private[i].into();
            self.note(PageSize::Size2M, i, before, after);
        }
    }

    fn leave_chunk(&mut self) {
        if let Some((i, before)) = self.chunk.take() {
            let after = self.counters.chunk_private[i].into();
            self.note(PageSize::Size1G, i, before, after);
        }
    }

    /// Notes block `index` of `size` if its count going from `before` to `after` changed
    /// its uniformity.
    fn note(&mut self, size: PageSize, index: usize, before: u64, after: u64) {
        let pages = self.counters.geometry.pages(size);
        let (was, is) = (uniform(before, pages), uniform(after, pages));
        if was != is {
            self.changes.push(BlockChange {
                start: index as u64 * pages,
                size,
                split: was,
            });
        }
    }
}
