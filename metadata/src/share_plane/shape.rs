//! The shape thresholds: which form a plane of so many flips takes in a chunk of so many pages.

use super::{INLINE_FLIPS, mark_mid};

pub(super) fn words_for(pages: u32) -> usize {
    (pages as usize).div_ceil(64)
}

/// A list carries its mid index once the index is at most this fraction of the flips' bytes.
pub(super) const INDEX_RATIO: usize = 16;

/// The chunk as the plane sees it: its pages and the size of its middle blocks, which decide
/// the canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlaneShape {
    pub(super) pages: u32,
    pub(super) mid_order: u32,
}

impl PlaneShape {
    /// A chunk of `pages` pages (a power of two) with middle blocks of `2^mid_order` pages.
    pub(crate) fn new(pages: u32, mid_order: u32) -> PlaneShape {
        debug_assert!(pages.is_power_of_two() && 1 << mid_order <= pages);
        PlaneShape { pages, mid_order }
    }

    /// `u32` words of the mid index.
    pub(super) fn index_words(&self) -> usize {
        ((self.pages >> self.mid_order) as usize).div_ceil(32)
    }

    /// Whether a list of `flips` flips carries the mid index.
    pub(super) fn indexed(&self, flips: usize) -> bool {
        flips > INLINE_FLIPS && flips >= INDEX_RATIO * self.index_words()
    }

    /// Heap bytes of a list of `flips` flips (with its index when it has one).
    pub(super) fn list_bytes(&self, flips: usize) -> usize {
        let index = if self.indexed(flips) {
            self.index_words()
        } else {
            0
        };
        4 * (flips + index)
    }

    /// Whether `flips` flips are stored as a bitmap (see the module docs). Monotone in
    /// `flips`, so the forms follow each other as the table says.
    pub(super) fn dense_wanted(&self, flips: usize) -> bool {
        flips > INLINE_FLIPS && self.list_bytes(flips) > words_for(self.pages) * 8
    }

    /// The mid index of the sorted `flips`.
    pub(super) fn index_of(&self, flips: &[u32]) -> Vec<u32> {
        let mut index = vec![0u32; self.index_words()];
        for &p in flips {
            mark_mid(&mut index, p, self.mid_order);
        }
        index
    }
}
