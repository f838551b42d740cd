//! One bit per 4K page plus per-2M and per-1G private-page counters, behind one mutex.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};

use super::{BlockChange, ShareTracker, Watched, order_from_counts};

#[derive(Debug)]
struct Inner {
    bits: Vec<u64>,
    mid_private: Vec<u16>,
    chunk_private: Vec<u32>,
}

/// The bitmap baseline over `pages` pages starting at PFN 0 (all shared at first).
#[derive(Debug)]
pub struct BitmapTracker {
    geometry: Geometry,
    inner: Mutex<Inner>,
}

impl BitmapTracker {
    /// A tracker of `pages` pages (a multiple of the chunk size), all shared.
    pub fn new(geometry: Geometry, pages: u64) -> BitmapTracker {
        BitmapTracker {
            geometry,
            inner: Mutex::new(Inner {
                bits: vec![0; pages.div_ceil(64) as usize],
                mid_private: vec![0; (pages / geometry.mid_pages()) as usize],
                chunk_private: vec![0; (pages / geometry.chunk_pages()) as usize],
            }),
        }
    }

    /// Bytes held: the bitmap and the counters.
    pub fn bytes(&self) -> usize {
        let inner = self.inner.lock();
        inner.bits.len() * 8 + inner.mid_private.len() * 2 + inner.chunk_private.len() * 4
    }
}

impl ShareTracker for BitmapTracker {
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>) {
        let g = self.geometry;
        let (mid_order, chunk_order) = (g.order(PageSize::Size2M), g.order(PageSize::Size1G));
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut mid = Watched::new(PageSize::Size2M);
        let mut chunk = Watched::new(PageSize::Size1G);
        let mut pos = start;
        // Word by word; each word lies in one middle block (which is at least 64 pages on
        // x86-64), so its count delta goes to one counter.
        while pos < end {
            let w = (pos / 64) as usize;
            let from = pos % 64;
            let to = (end - (pos - from)).min(64);
            let mask = if to - from == 64 {
                !0
            } else {
                ((1u64 << (to - from)) - 1) << from
            };
            let old = inner.bits[w];
            let new = if private { old | mask } else { old & !mask };
            let delta = i64::from(new.count_ones()) - i64::from(old.count_ones());
            if delta != 0 {
                inner.bits[w] = new;
                let m = (pos >> mid_order) as usize;
                let c = (pos >> chunk_order) as usize;
                mid.visit(changes, g, m, |i| inner.mid_private[i].into());
                chunk.visit(changes, g, c, |i| inner.chunk_private[i].into());
                inner.mid_private[m] = (i64::from(inner.mid_private[m]) + delta) as u16;
                inner.chunk_private[c] = (i64::from(inner.chunk_private[c]) + delta) as u32;
            }
            pos = pos - from + to;
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
