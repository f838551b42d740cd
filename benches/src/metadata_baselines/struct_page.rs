//! A 64-byte record per 4K page (the kernel's `struct page`) plus per-2M/1G mixed counters.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};

use super::{BlockChange, ShareTracker, Watched, order_from_counts};

/// The per-page record: flags, the shareability, and the rest of a `struct page`'s 64 bytes
/// (refcount, mapcount, mapping, index, private, LRU links) that such a design carries.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRecord {
    /// Bit 0: private.
    pub flags: u64,
    /// The rest of the record.
    pub other: [u64; 7],
}

#[derive(Debug)]
struct Inner {
    pages: Vec<PageRecord>,
    mid_private: Vec<u32>,
    chunk_private: Vec<u32>,
}

/// The struct-page baseline over `pages` pages from PFN 0.
#[derive(Debug)]
pub struct StructPageArray {
    geometry: Geometry,
    inner: Mutex<Inner>,
}

impl StructPageArray {
    /// `pages` records, all shared.
    pub fn new(geometry: Geometry, pages: u64) -> StructPageArray {
        StructPageArray {
            geometry,
            inner: Mutex::new(Inner {
                pages: vec![PageRecord::default(); pages as usize],
                mid_private: vec![0; (pages / geometry.mid_pages()) as usize],
                chunk_private: vec![0; (pages / geometry.chunk_pages()) as usize],
            }),
        }
    }
}

impl ShareTracker for StructPageArray {
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>) {
        let g = self.geometry;
        let (mid_order, chunk_order) = (g.order(PageSize::Size2M), g.order(PageSize::Size1G));
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut mid = Watched::new(PageSize::Size2M);
        let mut chunk = Watched::new(PageSize::Size1G);
        for pfn in start..end {
            let page = &mut inner.pages[pfn as usize];
            if (page.flags & 1 == 1) != private {
                page.flags ^= 1;
                let m = (pfn >> mid_order) as usize;
                let c = (pfn >> chunk_order) as usize;
                mid.visit(changes, g, m, |i| inner.mid_private[i].into());
                chunk.visit(changes, g, c, |i| inner.chunk_private[i].into());
                if private {
                    inner.mid_private[m] += 1;
                    inner.chunk_private[c] += 1;
                } else {
                    inner.mid_private[m] -= 1;
                    inner.chunk_private[c] -= 1;
                }
            }
        }
        mid.finish(changes, g, |i| inner.mid_private[i].into());
        chunk.finish(changes, g, |i| inner.chunk_private[i].into());
    }

    fn max_order(&self, pfn: u64) -> PageSize {
        let g = self.geometry;
        let inner = self.inner.lock();
        let chunk = inner.chunk_private[(pfn >> g.order(PageSize::Size1G)) as usize];
        let mid = inner.mid_private[(pfn >> g.order(PageSize::Size2M)) as usize];
        order_from_counts(g, chunk.into(), mid.into())
    }
}
