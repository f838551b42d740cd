//! Which frames a file holds, and at which of its page offsets.
//!
//! One record per extent: a run of page offsets held by a run of PFNs that lies in one chunk
//! of the source (a chunk is contiguous in the memfd; two PFN-adjacent chunks are not, so an
//! extent never crosses a chunk boundary and always maps to one contiguous memfd range).
//! Files hold memory in whole granules of the source (a hugetlb page cannot be mapped in
//! part), with PFNs aligned like their offsets, so that a block of offsets is a block of
//! frames and can be mapped huge.
//!
//! *Held* is not *backed*: an offset is backed when the file's metadata says so (its owner
//! mark). A punch-hole of part of a hugetlb page leaves the page held (and mapped in the
//! file's host mapping) until the whole page is punched; a file's last page may reach past
//! its end.

use std::collections::BTreeMap;

use pfnstore_core::{Geometry, OffsetRange, PageOffset, PageSize, Pfn, PfnRange};

/// `offsets` held by PFNs starting at `pfn`, inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) offsets: OffsetRange,
    pub(crate) pfn: Pfn,
}

impl Extent {
    /// The PFNs behind the extent.
    pub(crate) fn pfns(&self) -> PfnRange {
        // Extents are built from valid frame ranges of the same length.
        PfnRange::from_len(self.pfn, self.offsets.len()).unwrap_or_default()
    }

    /// The PFN behind `offset` (which must lie in the extent).
    pub(crate) fn pfn_at(&self, offset: PageOffset) -> Pfn {
        Pfn(self.pfn.0 + (offset.0 - self.offsets.start().0))
    }

    /// The part of the extent inside `range`, if any.
    pub(crate) fn clip(&self, range: &OffsetRange) -> Option<Extent> {
        let offsets = self.offsets.intersection(range)?;
        Some(Extent {
            offsets,
            pfn: self.pfn_at(offsets.start()),
        })
    }
}

/// The extent map of one file.
#[derive(Debug, Default)]
pub(crate) struct Extents {
    by_start: BTreeMap<u64, Extent>,
    held_pages: u64,
}

impl Extents {
    pub(crate) fn len(&self) -> usize {
        self.by_start.len()
    }

    pub(crate) fn held_pages(&self) -> u64 {
        self.held_pages
    }

    /// The extent containing `offset`.
    pub(crate) fn extent_at(&self, offset: PageOffset) -> Option<Extent> {
        let (_, e) = self.by_start.range(..=offset.0).next_back()?;
        e.offsets.contains(offset).then_some(*e)
    }

    /// The frame held at `offset` (backed or not).
    pub(crate) fn pfn_at(&self, offset: PageOffset) -> Option<Pfn> {
        self.extent_at(offset).map(|e| e.pfn_at(offset))
    }

    /// The held pieces of `range`, clipped to it, lowest offset first.
    pub(crate) fn extents_in(&self, range: OffsetRange) -> Vec<Extent> {
        let mut out = Vec::new();
        self.for_each_in(range, |e| out.push(e));
        out
    }

    /// Calls `f` with each held piece of `range`, clipped, lowest offset first.
    pub(crate) fn for_each_in(&self, range: OffsetRange, mut f: impl FnMut(Extent)) {
        if let Some(first) = self.extent_at(range.start()) {
            f(first.clip(&range).unwrap_or(first));
        }
        for (_, e) in self.by_start.range(range.start().0 + 1..range.end().0) {
            if let Some(piece) = e.clip(&range) {
                f(piece);
            }
        }
    }

    /// The pieces of `range` that hold nothing, lowest offset first.
    pub(crate) fn holes_in(&self, range: OffsetRange) -> Vec<OffsetRange> {
        let mut holes = Vec::new();
        let mut next = range.start();
        self.for_each_in(range, |e| {
            if let Ok(hole) = OffsetRange::new(next, e.offsets.start()) {
                holes.push(hole);
            }
            next = e.offsets.end();
        });
        if let Ok(hole) = OffsetRange::new(next, range.end()) {
            holes.push(hole);
        }
        holes
    }

    /// Records that `extent.offsets` (which must hold nothing) is held by `extent.pfns()`.
    pub(crate) fn insert(&mut self, extent: Extent) {
        debug_assert!(
            self.extents_in(extent.offsets).is_empty(),
            "offsets already held"
        );
        self.held_pages += extent.offsets.len();
        self.by_start.insert(extent.offsets.start().0, extent);
    }

    /// Lets go of `range` and returns what held it, splitting extents at its ends.
    pub(crate) fn remove(&mut self, range: OffsetRange) -> Vec<Extent> {
        let removed = self.extents_in(range);
        for piece in &removed {
            let Some(whole) = self.extent_at(piece.offsets.start()) else {
                continue;
            };
            self.by_start.remove(&whole.offsets.start().0);
            self.held_pages -= whole.offsets.len();
            if let Ok(left) = OffsetRange::new(whole.offsets.start(), piece.offsets.start()) {
                self.insert(Extent {
                    offsets: left,
                    pfn: whole.pfn,
                });
            }
            if let Ok(right) = OffsetRange::new(piece.offsets.end(), whole.offsets.end()) {
                self.insert(Extent {
                    offsets: right,
                    pfn: whole.pfn_at(right.start()),
                });
            }
        }
        removed
    }

    /// Every extent, lowest offset first.
    pub(crate) fn all(&self) -> impl Iterator<Item = Extent> + '_ {
        self.by_start.values().copied()
    }

    /// The largest block around `offset` that one extent holds with PFNs aligned like the
    /// offsets, i.e. that could be mapped with one page-table entry of that size.
    pub(crate) fn contiguous_order(
        &self,
        geometry: &Geometry,
        offset: PageOffset,
    ) -> Option<PageSize> {
        let extent = self.extent_at(offset)?;
        let pfn = extent.pfn_at(offset);
        for size in PageSize::LARGEST_FIRST {
            let pages = geometry.pages(size);
            let block_start = offset.align_down(pages);
            let fits = extent.offsets.start() <= block_start
                && block_start.0 + pages <= extent.offsets.end().0;
            let congruent = (pfn.0 ^ offset.0) & (pages - 1) == 0;
            if fits && congruent {
                return Some(size);
            }
        }
        Some(PageSize::Size4K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> OffsetRange {
        OffsetRange::new(PageOffset(a), PageOffset(b)).unwrap()
    }

    fn ext(a: u64, b: u64, pfn: u64) -> Extent {
        Extent {
            offsets: r(a, b),
            pfn: Pfn(pfn),
        }
    }

    #[test]
    fn lookup_holes_and_removal() {
        let mut b = Extents::default();
        b.insert(ext(0, 64, 1000));
        b.insert(ext(128, 192, 5000));
        assert_eq!(b.pfn_at(PageOffset(10)), Some(Pfn(1010)));
        assert_eq!(b.pfn_at(PageOffset(64)), None);
        assert_eq!(b.holes_in(r(0, 256)), vec![r(64, 128), r(192, 256)]);
        assert_eq!(
            b.extents_in(r(32, 160)),
            vec![ext(32, 64, 1032), ext(128, 160, 5000)]
        );
        let removed = b.remove(r(16, 144));
        assert_eq!(removed, vec![ext(16, 64, 1016), ext(128, 144, 5000)]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.pfn_at(PageOffset(15)), Some(Pfn(1015)));
        assert_eq!(b.pfn_at(PageOffset(144)), Some(Pfn(5016)));
        assert_eq!(b.held_pages(), 16 + 48);
        // Removing from the middle of one extent leaves both sides.
        b.remove(r(150, 151));
        assert_eq!(b.len(), 3);
        assert_eq!(b.pfn_at(PageOffset(151)), Some(Pfn(5023)));
        assert_eq!(b.held_pages(), 16 + 47);
    }

    #[test]
    fn contiguous_order_needs_fit_and_congruence() {
        let g = Geometry::new(3, 6).unwrap();
        let mut b = Extents::default();
        b.insert(ext(0, 64, 128)); // chunk-aligned PFNs: a whole chunk block
        b.insert(ext(64, 72, 203)); // misaligned PFNs: 4K only
        b.insert(ext(72, 80, 208)); // 8-aligned: a mid block
        assert_eq!(
            b.contiguous_order(&g, PageOffset(5)),
            Some(PageSize::Size1G)
        );
        assert_eq!(
            b.contiguous_order(&g, PageOffset(65)),
            Some(PageSize::Size4K)
        );
        assert_eq!(
            b.contiguous_order(&g, PageOffset(75)),
            Some(PageSize::Size2M)
        );
        assert_eq!(b.contiguous_order(&g, PageOffset(90)), None);
    }
}
