//! `rangemap::RangeMap` of private ranges behind one mutex.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};
use rangemap::RangeMap;

use super::ShareTracker;

/// The range-map baseline: the map holds the private ranges; absent means shared.
#[derive(Debug)]
pub struct RangeMapTracker {
    geometry: Geometry,
    map: Mutex<RangeMap<u64, bool>>,
}

impl RangeMapTracker {
    /// An empty tracker (everything shared).
    pub fn new(geometry: Geometry) -> RangeMapTracker {
        RangeMapTracker {
            geometry,
            map: Mutex::new(RangeMap::new()),
        }
    }

    /// Number of ranges held.
    pub fn len(&self) -> usize {
        self.map.lock().iter().count()
    }

    /// Whether no range is private.
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }
}

impl ShareTracker for RangeMapTracker {
    fn convert(&self, start: u64, end: u64, private: bool) {
        let mut map = self.map.lock();
        if private {
            map.insert(start..end, true);
        } else {
            map.remove(start..end);
        }
    }

    fn max_order(&self, pfn: u64) -> PageSize {
        let map = self.map.lock();
        for size in [PageSize::Size1G, PageSize::Size2M] {
            let pages = self.geometry.pages(size);
            let start = pfn & !(pages - 1);
            let block = start..start + pages;
            // Uniform: no private range touches the block, or one covers all of it.
            let mut touching = map.overlapping(&block);
            let uniform = match touching.next() {
                None => true,
                Some((r, _)) => r.start <= block.start && r.end >= block.end,
            };
            if uniform {
                return size;
            }
        }
        PageSize::Size4K
    }
}
