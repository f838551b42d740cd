//! Which physical pages back which offsets of a guest-memory file.
//!
//! One record per extent (a contiguous run of offsets backed by a contiguous run of PFNs), in
//! an ordered map keyed by first offset page. Files are populated a block at a time with PFNs
//! aligned like their offsets, so a 1 GiB file backed by one 1 GiB chunk is one record and can
//! be mapped as one 1 GiB block.

use std::collections::BTreeMap;

use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};

/// A contiguous piece: `offsets` (file page offsets) backed by PFNs starting at `pfn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// File page offsets.
    pub offsets: PfnRange,
    /// First PFN behind `offsets.start()`.
    pub pfn: Pfn,
}

impl Extent {
    /// The PFNs behind the extent.
    pub fn pfns(&self) -> PfnRange {
        PfnRange::from_len(self.pfn, self.offsets.len())
            .expect("extents are built from valid PFN ranges")
    }

    /// The PFN behind `offset` (which must lie in the extent).
    pub fn pfn_of(&self, offset: Pfn) -> Pfn {
        Pfn(self.pfn.0 + (offset.0 - self.offsets.start().0))
    }

    /// The part of the extent inside `range`, if any.
    pub fn clip(&self, range: &PfnRange) -> Option<Extent> {
        let offsets = self.offsets.intersection(range)?;
        Some(Extent {
            offsets,
            pfn: self.pfn_of(offsets.start()),
        })
    }
}

/// The extent map of one file.
#[derive(Debug, Default)]
pub struct Backing {
    extents: BTreeMap<u64, Extent>,
}

impl Backing {
    /// No offset backed.
    pub fn new() -> Self {
        Backing::default()
    }

    /// Number of extents.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// Pages backed.
    pub fn backed_pages(&self) -> u64 {
        self.extents.values().map(|e| e.offsets.len()).sum()
    }

    /// The extent containing `offset`.
    pub fn extent_at(&self, offset: Pfn) -> Option<Extent> {
        let (_, e) = self.extents.range(..=offset.0).next_back()?;
        e.offsets.contains(offset).then_some(*e)
    }

    /// The PFN behind `offset`.
    pub fn pfn_of(&self, offset: Pfn) -> Option<Pfn> {
        self.extent_at(offset).map(|e| e.pfn_of(offset))
    }

    /// The backed pieces of `range`, clipped to it, lowest offset first.
    pub fn extents_in(&self, range: PfnRange) -> Vec<Extent> {
        let mut out = Vec::new();
        if let Some(first) = self.extent_at(range.start()) {
            out.extend(first.clip(&range));
        }
        for (_, e) in self.extents.range(range.start().0 + 1..range.end().0) {
            out.extend(e.clip(&range));
        }
        out
    }

    /// The unbacked pieces of `range`, lowest offset first.
    pub fn holes_in(&self, range: PfnRange) -> Vec<PfnRange> {
        let mut holes = Vec::new();
        let mut next = range.start();
        for e in self.extents_in(range) {
            if let Ok(hole) = PfnRange::new(next, e.offsets.start()) {
                holes.push(hole);
            }
            next = e.offsets.end();
        }
        if let Ok(hole) = PfnRange::new(next, range.end()) {
            holes.push(hole);
        }
        holes
    }

    /// Records that `extent.offsets` (which must be a hole) is backed by `extent.pfns()`.
    pub fn insert(&mut self, extent: Extent) {
        debug_assert!(
            self.extents_in(extent.offsets).is_empty(),
            "offsets already backed"
        );
        self.extents.insert(extent.offsets.start().0, extent);
    }

    /// Removes the backing of `range` and returns what it was, splitting extents at its ends.
    pub fn remove(&mut self, range: PfnRange) -> Vec<Extent> {
        let removed = self.extents_in(range);
        for piece in &removed {
            let whole = self
                .extent_at(piece.offsets.start())
                .expect("piece came from an extent");
            self.extents.remove(&whole.offsets.start().0);
            if let Ok(left) = PfnRange::new(whole.offsets.start(), piece.offsets.start()) {
                self.insert(Extent {
                    offsets: left,
                    pfn: whole.pfn,
                });
            }
            if let Ok(right) = PfnRange::new(piece.offsets.end(), whole.offsets.end()) {
                self.insert(Extent {
                    offsets: right,
                    pfn: whole.pfn_of(right.start()),
                });
            }
        }
        removed
    }

    /// The largest block around `offset` that one extent backs with PFNs aligned like the
    /// offsets, i.e. that could be mapped with one page-table entry of that size.
    pub fn contiguous_order(&self, geometry: &Geometry, offset: Pfn) -> Option<PageSize> {
        let extent = self.extent_at(offset)?;
        let pfn = extent.pfn_of(offset);
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

    fn r(a: u64, b: u64) -> PfnRange {
        PfnRange::new(Pfn(a), Pfn(b)).unwrap()
    }

    fn ext(a: u64, b: u64, pfn: u64) -> Extent {
        Extent {
            offsets: r(a, b),
            pfn: Pfn(pfn),
        }
    }

    #[test]
    fn lookup_holes_and_removal() {
        let mut b = Backing::new();
        b.insert(ext(0, 64, 1000));
        b.insert(ext(128, 192, 5000));
        assert_eq!(b.pfn_of(Pfn(10)), Some(Pfn(1010)));
        assert_eq!(b.pfn_of(Pfn(64)), None);
        assert_eq!(b.holes_in(r(0, 256)), vec![r(64, 128), r(192, 256)]);
        assert_eq!(
            b.extents_in(r(32, 160)),
            vec![ext(32, 64, 1032), ext(128, 160, 5000)]
        );
        let removed = b.remove(r(16, 144));
        assert_eq!(removed, vec![ext(16, 64, 1016), ext(128, 144, 5000)]);
        assert_eq!(b.extent_count(), 2);
        assert_eq!(b.pfn_of(Pfn(15)), Some(Pfn(1015)));
        assert_eq!(b.pfn_of(Pfn(144)), Some(Pfn(5016)));
        assert_eq!(b.backed_pages(), 16 + 48);
        // Removing from the middle of one extent leaves both sides.
        b.remove(r(150, 151));
        assert_eq!(b.extent_count(), 3);
        assert_eq!(b.pfn_of(Pfn(151)), Some(Pfn(5023)));
    }

    #[test]
    fn contiguous_order_needs_fit_and_congruence() {
        let g = Geometry::new(3, 6).unwrap();
        let mut b = Backing::new();
        b.insert(ext(0, 64, 128)); // chunk-aligned PFNs: a whole chunk block
        b.insert(ext(64, 72, 203)); // misaligned PFNs: 4K only
        b.insert(ext(72, 80, 208)); // 8-aligned: a mid block
        assert_eq!(b.contiguous_order(&g, Pfn(5)), Some(PageSize::Size1G));
        assert_eq!(b.contiguous_order(&g, Pfn(65)), Some(PageSize::Size4K));
        assert_eq!(b.contiguous_order(&g, Pfn(75)), Some(PageSize::Size2M));
        assert_eq!(b.contiguous_order(&g, Pfn(90)), None);
    }
}
