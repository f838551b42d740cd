//! Mapping plans: which blocks every user of the memory unmaps, and which it maps afterwards.

use pfnstore_core::{BlockRun, Geometry, OffsetRange, PageOffset, PageSize};

use crate::Shareability;
use crate::inline_vec::InlineVec;

/// A run of equal-sized, naturally aligned blocks of backed memory with one shareability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanEntry {
    /// The blocks, in page offsets of the file.
    pub run: BlockRun<PageOffset>,
    /// Their shareability (before the change for unmap entries, after it for map entries).
    pub shareability: Shareability,
}

/// Entries a plan keeps without touching the heap: enough for a 4 KiB conversion inside a
/// uniform 1 GiB (one unmap entry, five map entries) and its way back.
const INLINE_ENTRIES: usize = 8;

/// What a change means for everyone who maps the memory: unmap these blocks (as they were
/// mapped), then map these (as they may be mapped now).
///
/// Both lists cover backed memory only (unbacked offsets are mapped by nobody) and lie in the
/// same *region*: the changed pages widened to the blocks that split or merged. They are lists
/// of runs, so a 4 KiB conversion inside a uniform 1 GiB is one unmap entry (the 1 GiB) and
/// five map entries (511 x 2 MiB + 512 x 4 KiB), never a per-page list unless the memory
/// really is fragmented at 4 KiB. Blocks are never larger than the memory behind them is
/// physically contiguous (see [`super::ConversionDomain::new`]).
///
/// The second form, [`MappingPlan::unmap_runs`] / [`MappingPlan::map_runs`], merges entries
/// into maximal runs of one shareability cut at a boundary the caller chooses: what a mapper
/// that cannot unmap part of a mapping (vfio type1, iommufd) maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingPlan {
    pub(crate) geometry: Geometry,
    pub(crate) region: Option<OffsetRange>,
    pub(crate) unmap: InlineVec<PlanEntry, INLINE_ENTRIES>,
    pub(crate) map: InlineVec<PlanEntry, INLINE_ENTRIES>,
    /// The largest run boundary the region was widened for (see [`MappingPlan::map_runs`]).
    pub(crate) run_boundary: PageSize,
}

impl MappingPlan {
    /// A plan that changes nothing.
    pub fn empty(geometry: Geometry) -> MappingPlan {
        MappingPlan {
            geometry,
            region: None,
            unmap: InlineVec::default(),
            map: InlineVec::default(),
            run_boundary: PageSize::Size4K,
        }
    }

    /// The geometry the blocks are measured in.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The region both lists lie in; `None` for a plan that changes nothing.
    pub fn region(&self) -> Option<OffsetRange> {
        self.region
    }

    /// Blocks to unmap, as they were mapped before, lowest offset first.
    pub fn unmap(&self) -> &[PlanEntry] {
        self.unmap.as_slice()
    }

    /// Blocks that may be mapped after the change, lowest offset first.
    pub fn map(&self) -> &[PlanEntry] {
        self.map.as_slice()
    }

    /// Number of blocks (not runs) to unmap.
    pub fn unmap_blocks(&self) -> u64 {
        self.unmap().iter().map(|e| e.run.count()).sum()
    }

    /// Number of blocks (not runs) to map.
    pub fn map_blocks(&self) -> u64 {
        self.map().iter().map(|e| e.run.count()).sum()
    }

    /// Whether nothing needs unmapping or mapping.
    pub fn is_empty(&self) -> bool {
        self.unmap.is_empty() && self.map.is_empty()
    }

    /// The unmap list as maximal runs of one shareability, cut at every multiple of
    /// `boundary`. Exact for `boundary` up to [`MappingPlan::run_boundary`]: a mapper that
    /// maps every shared run cut at `boundary` unmaps exactly these.
    pub fn unmap_runs(&self, boundary: PageSize) -> Runs<'_> {
        Runs::new(self.unmap(), self.geometry, boundary)
    }

    /// The map list as maximal runs of one shareability, cut at every multiple of `boundary`
    /// (see [`MappingPlan::unmap_runs`]).
    pub fn map_runs(&self, boundary: PageSize) -> Runs<'_> {
        Runs::new(self.map(), self.geometry, boundary)
    }

    /// The largest boundary for which the runs forms are exact: the region was widened to
    /// multiples of it, because a subscriber asked for runs cut there
    /// ([`super::Subscriber::run_boundary`]).
    pub fn run_boundary(&self) -> PageSize {
        self.run_boundary
    }

    /// Checks that both lists are ascending, disjoint, inside the region and aligned (for
    /// tests and debug assertions).
    pub fn check(&self) -> Result<(), String> {
        let Some(region) = self.region else {
            return if self.is_empty() {
                Ok(())
            } else {
                Err("entries without a region".into())
            };
        };
        for (name, list) in [("unmap", self.unmap()), ("map", self.map())] {
            let mut next = region.start();
            for entry in list {
                let run = entry.run.range(&self.geometry);
                if run.start() < next || run.end() > region.end() {
                    return Err(format!(
                        "{name} list: {run} overlaps an earlier entry or leaves {region}"
                    ));
                }
                next = run.end();
            }
        }
        Ok(())
    }
}

/// Maximal runs of one shareability, cut at a boundary (see [`MappingPlan::map_runs`]).
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    entries: std::slice::Iter<'a, PlanEntry>,
    geometry: Geometry,
    boundary_pages: u64,
    /// The run being built, and the part of an entry not yet handed out.
    current: Option<(OffsetRange, Shareability)>,
}

impl<'a> Runs<'a> {
    fn new(entries: &'a [PlanEntry], geometry: Geometry, boundary: PageSize) -> Runs<'a> {
        Runs {
            entries: entries.iter(),
            geometry,
            boundary_pages: geometry.pages(boundary),
            current: None,
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (OffsetRange, Shareability);

    fn next(&mut self) -> Option<(OffsetRange, Shareability)> {
        let (mut run, shareability) = match self.current.take() {
            Some(c) => c,
            None => {
                let e = self.entries.next()?;
                (e.run.range(&self.geometry), e.shareability)
            }
        };
        // Cut at the next boundary after the run's start.
        let cut = (run.start().0 | (self.boundary_pages - 1)) + 1;
        // Extend with the following entries while contiguous, alike and before the cut.
        while run.end().0 < cut {
            let mut rest = self.entries.clone();
            match rest.next() {
                Some(e) if e.shareability == shareability && e.run.start() == run.end() => {
                    self.entries = rest;
                    run = run.hull(&e.run.range(&self.geometry));
                }
                _ => break,
            }
        }
        if cut < run.end().0 {
            let (head, tail) = run.split_at(PageOffset(cut)).ok()?;
            self.current = Some((tail, shareability));
            return Some((head, shareability));
        }
        Some((run, shareability))
    }
}

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use super::*;

    fn entry(g: &Geometry, start: u64, size: PageSize, count: u64, s: Shareability) -> PlanEntry {
        PlanEntry {
            run: BlockRun::new(g, PageOffset(start), size, count).unwrap(),
            shareability: s,
        }
    }

    fn r(a: u64, b: u64) -> OffsetRange {
        OffsetRange::new(PageOffset(a), PageOffset(b)).unwrap()
    }

    #[test]
    fn runs_merge_alike_neighbours_and_cut_at_the_boundary() {
        let g = Geometry::new(3, 6).unwrap();
        let (sh, pr) = (Shareability::Shared, Shareability::Private);
        let mut plan = MappingPlan::empty(g);
        plan.region = Some(r(0, 64));
        for e in [
            entry(&g, 0, PageSize::Size2M, 2, sh),  // 0..16
            entry(&g, 16, PageSize::Size4K, 3, sh), // 16..19
            entry(&g, 19, PageSize::Size4K, 1, pr), // 19..20
            entry(&g, 20, PageSize::Size4K, 4, sh), // 20..24
            entry(&g, 24, PageSize::Size2M, 5, sh), // 24..64
        ] {
            plan.map.push(e);
        }
        plan.check().unwrap();
        let cut_mid: Vec<_> = plan.map_runs(PageSize::Size2M).collect();
        assert_eq!(
            cut_mid,
            vec![
                (r(0, 8), sh),
                (r(8, 16), sh),
                (r(16, 19), sh),
                (r(19, 20), pr),
                (r(20, 24), sh),
                (r(24, 32), sh),
                (r(32, 40), sh),
                (r(40, 48), sh),
                (r(48, 56), sh),
                (r(56, 64), sh),
            ]
        );
        let cut_chunk: Vec<_> = plan.map_runs(PageSize::Size1G).collect();
        assert_eq!(
            cut_chunk,
            vec![(r(0, 19), sh), (r(19, 20), pr), (r(20, 64), sh)]
        );
    }
}
