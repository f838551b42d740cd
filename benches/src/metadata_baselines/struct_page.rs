//! A 64-byte record per 4K page (the kernel's `struct page`) plus per-2M/1G mixed counters.

use parking_lot::Mutex;
use pfnstore_core::{Geometry, PageSize};

use super::counters::BlockCounters;
use super::{BlockChange, ShareTracker};

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
    counters: BlockCounters,
}

/// The struct-page baseline over `pages` pages from PFN 0.
#[derive(Debug)]
pub struct StructPageArray {
    inner: Mutex<Inner>,
}

impl StructPageArray {
    /// `pages` records, all shared.
    pub fn new(geometry: Geometry, pages: u64) -> StructPageArray {
        StructPageArray {
            inner: Mutex::new(Inner {
                pages: vec![PageRecord::default(); pages as usize],
                counters: BlockCounters::new(geometry, pages),
            }),
        }
    }
}

impl ShareTracker for StructPageArray {
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut tally = inner.counters.tally(changes);
        for pfn in start..end {
            let page = &mut inner.pages[pfn as usize];
            if (page.flags & 1 == 1) != private {
                page.flags ^= 1;
                tally.add(pfn, if private { 1 } else { -1 });
            }
        }
        tally.finish();
    }

    fn max_order(&self, pfn: u64) -> PageSize {
        self.inner.lock().counters.max_order(pfn)
    }
}
