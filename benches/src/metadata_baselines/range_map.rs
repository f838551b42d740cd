//! `rangemap::RangeMap` of private ranges behind one mutex.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};
use rangemap::RangeMap;

use std::ops::Range;

use super::{BlockChange, ShareTracker};

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

/// Whether `block` is uniform: no private range touches it, or one covers all of it.
fn uniform(map: &RangeMap<u64, bool>, block: &Range<u64>) -> bool {
    match map.overlapping(block).next() {
        None => true,
        Some((r, _)) => r.start <= block.start && r.end >= block.end,
    }
}

impl ShareTracker for RangeMapTracker {
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>) {
        let mut map = self.map.lock();
        // Only blocks the range touches can change. A block the range covers partly (at most
        // two per level) is asked before and after; one it covers wholly is uniform after,
        // and was not iff a private range starts or ends strictly inside it.
        let mut edges: [Option<(Range<u64>, PageSize, bool)>; 4] = Default::default();
        let mut mixed_inside: Vec<(u64, PageSize)> = Vec::new();
        for (level, size) in [PageSize::Size1G, PageSize::Size2M].into_iter().enumerate() {
            let pages = self.geometry.pages(size);
            let (lo, hi) = (start.next_multiple_of(pages), end & !(pages - 1));
            let first = start & !(pages - 1)..(start & !(pages - 1)) + pages;
            let last = hi..hi + pages;
            if start != first.start || end < first.end {
                let was = uniform(&map, &first);
                edges[2 * level] = Some((first.clone(), size, was));
            }
            if end != hi && hi > first.start {
                let was = uniform(&map, &last);
                edges[2 * level + 1] = Some((last.clone(), size, was));
            }
            if lo < hi {
                for (r, _) in map.overlapping(&(lo..hi)) {
                    for b in [r.start, r.end] {
                        let block = b & !(pages - 1);
                        if b > lo
                            && b < hi
                            && b != block
                            && mixed_inside.last() != Some(&(block, size))
                        {
                            mixed_inside.push((block, size));
                        }
                    }
                }
            }
        }
        if private {
            map.insert(start..end, true);
        } else {
            map.remove(start..end);
        }
        for (block, size, was) in edges.into_iter().flatten() {
            if uniform(&map, &block) != was {
                changes.push(BlockChange {
                    start: block.start,
                    size,
                    split: was,
                });
            }
        }
        changes.extend(mixed_inside.into_iter().map(|(start, size)| BlockChange {
            start,
            size,
            split: false,
        }));
    }

    fn max_order(&self, pfn: u64) -> PageSize {
        let map = self.map.lock();
        for size in [PageSize::Size1G, PageSize::Size2M] {
            let pages = self.geometry.pages(size);
            let start = pfn & !(pages - 1);
            if uniform(&map, &(start..start + pages)) {
                return size;
            }
        }
        PageSize::Size4K
    }
}
