//! One bit per 4K page plus per-2M and per-1G private-page counters, behind one mutex.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};

use super::counters::BlockCounters;
use super::{BlockChange, ShareTracker};

#[derive(Debug)]
struct Inner {
    bits: Vec<u64>,
    counters: BlockCounters,
}

/// The bitmap baseline over `pages` pages starting at PFN 0 (all shared at first).
#[derive(Debug)]
pub struct BitmapTracker {
    inner: Mutex<Inner>,
}

impl BitmapTracker {
    /// A tracker of `pages` pages (a multiple of the chunk size), all shared.
    pub fn new(geometry: Geometry, pages: u64) -> BitmapTracker {
        BitmapTracker {
            inner: Mutex::new(Inner {
                bits: vec![0; pages.div_ceil(64) as usize],
                counters: BlockCounters::new(geometry, pages),
            }),
        }
    }

    /// Bytes held: the bitmap and the counters.
    pub fn bytes(&self) -> usize {
        let inner = self.inner.lock();
        inner.bits.len() * 8 + inner.counters.bytes()
    }
}

impl ShareTracker for BitmapTracker {
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut tally = inner.counters.tally(changes);
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
                tally.add(pos, delta);
            }
            pos = pos - from + to;
        }
        tally.finish();
    }

    fn max_order(&self, pfn: u64) -> PageSize {
        self.inner.lock().counters.max_order(pfn)
    }
}
