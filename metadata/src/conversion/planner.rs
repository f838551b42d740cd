//! Computing a change's [`MappingPlan`] before anything changes, so that `prepare` can show it
//! and `unmap` can run before the metadata flips.
//!
//! The plan of a change of pages `changed` is computed from two reads of the metadata, with
//! the change applied on the fly (an *overlay*) instead of to the store:
//!
//! * the *region*: the changed pages widened to the mapped blocks at both ends before the
//!   change (the blocks that split) and after it (the blocks that merge). A block that splits
//!   or merges contains a changed page; one that contains neither end lies between them.
//! * the unmap list: the layout of the region now; the map list: its layout with the overlay.
//!   Both keep backed blocks only (owned pages: in a file's metadata the owner marks the
//!   offsets that have memory), capped at the largest block the memory is contiguous for.
//!
//! Checking whether a block is uniform after the change stops at the first run that differs,
//! so the cost follows the runs near the change, not the size of the block.

use std::ops::ControlFlow;

use pfnstore_core::{Geometry, OffsetRange, PageOffset, PageSize, Pfn, PfnRange, RangeError};

use super::domain_core::DomainCore;
use super::plan::{MappingPlan, PlanEntry};
use crate::{FileId, MappingAttributes, MetadataError, Shareability};

/// How a change edits the mapping attributes of the changed pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Edit {
    /// Shareability becomes this.
    Share(Shareability),
    /// The pages get memory (of this file).
    Back(FileId),
    /// The pages lose their memory.
    Unback,
    /// Nothing changes (a replay).
    None,
}

impl Edit {
    fn apply(self, a: MappingAttributes) -> MappingAttributes {
        match self {
            Edit::Share(shareability) => MappingAttributes { shareability, ..a },
            Edit::Back(file) => MappingAttributes {
                owner: Some(file),
                ..a
            },
            Edit::Unback => MappingAttributes { owner: None, ..a },
            Edit::None => a,
        }
    }
}

/// The changed pages (ascending, disjoint) and their edit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Overlay<'a> {
    pub(crate) changed: &'a [OffsetRange],
    pub(crate) edit: Edit,
}

impl Overlay<'_> {
    /// Calls `f` with the pieces of the run `range` (attributes `a`) as they are after the
    /// change.
    fn pieces(
        &self,
        range: PfnRange,
        a: MappingAttributes,
        mut f: impl FnMut(PfnRange, MappingAttributes) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let mut at = range.start();
        // The changed ranges are few (one for a conversion); a linear scan is cheapest.
        for c in self.changed {
            let c = c.cast::<Pfn>();
            if c.end() <= at {
                continue;
            }
            if c.start() >= range.end() {
                break;
            }
            if c.start() > at {
                f(piece(at, c.start()), a)?;
                at = c.start();
            }
            let end = c.end().min(range.end());
            f(piece(at, end), self.edit.apply(a))?;
            at = end;
        }
        if at < range.end() {
            f(piece(at, range.end()), a)?;
        }
        ControlFlow::Continue(())
    }
}

/// `start..end`, which the callers derive from a valid range with `start < end`.
fn piece(start: Pfn, end: Pfn) -> PfnRange {
    PfnRange::new(start, end).unwrap_or_else(|_| PfnRange::default())
}

/// Plans changes of one domain.
pub(crate) struct Planner<'a> {
    pub(crate) core: &'a DomainCore,
}

impl Planner<'_> {
    fn geometry(&self) -> Geometry {
        self.core.store.geometry()
    }

    /// The plan of `overlay`, its region widened to multiples of `run_boundary`.
    pub(crate) fn plan(
        &self,
        overlay: Overlay<'_>,
        run_boundary: Option<PageSize>,
    ) -> Result<MappingPlan, MetadataError> {
        let geometry = self.geometry();
        let mut plan = MappingPlan::empty(geometry);
        let (Some(first), Some(last)) = (overlay.changed.first(), overlay.changed.last()) else {
            return Ok(plan);
        };
        let (first, last) = (first.start().cast_pfn(), last.last().cast_pfn());
        let mut region = self.block_before(first)?.hull(&self.block_before(last)?);
        region = region.hull(&self.block_after(first, overlay)?);
        region = region.hull(&self.block_after(last, overlay)?);
        if let Some(boundary) = run_boundary {
            // Not capped by the memory's contiguity: runs are of offsets (an IOVA range maps
            // any memory), only blocks must be physically contiguous.
            region = region.align_out(geometry.pages(boundary));
            plan.run_boundary = boundary;
        }
        self.layout(region, None, |e| plan.unmap.push(e))?;
        self.layout(region, Some(overlay), |e| plan.map.push(e))?;
        plan.region = self.clip(region);
        debug_assert_eq!(plan.check(), Ok(()));
        Ok(plan)
    }

    /// The plan that maps everything backed in the domain now (a replay).
    pub(crate) fn current(&self) -> Result<MappingPlan, MetadataError> {
        let mut plan = MappingPlan::empty(self.geometry());
        let Some(all) = self.all() else {
            return Ok(plan);
        };
        self.layout(all, None, |e| plan.map.push(e))?;
        plan.region = Some(all.cast());
        Ok(plan)
    }

    /// The backed blocks that intersect `range` as a plan describes them now (whole blocks,
    /// possibly reaching past `range`).
    pub(crate) fn blocks_in(&self, range: PfnRange) -> Result<MappingPlan, MetadataError> {
        let mut plan = MappingPlan::empty(self.geometry());
        let hull = self
            .block_before(range.start())?
            .hull(&self.block_before(range.last())?);
        self.layout(hull, None, |e| plan.map.push(e))?;
        plan.region = self.clip(hull);
        Ok(plan)
    }

    /// Every page of the domain's file.
    fn all(&self) -> Option<PfnRange> {
        PfnRange::from_len(Pfn(0), self.core.pages).ok()
    }

    fn clip(&self, region: PfnRange) -> Option<OffsetRange> {
        let end = region.end().0.min(self.core.pages);
        PfnRange::new(region.start(), Pfn(end))
            .ok()
            .map(PfnRange::cast)
    }

    /// The block around `page` that is mapped now.
    fn block_before(&self, page: Pfn) -> Result<PfnRange, MetadataError> {
        let order = self.core.max_mapping_size(page)?;
        self.block(page, order)
    }

    /// The largest block around `page` that is uniform after the change.
    fn block_after(&self, page: Pfn, overlay: Overlay<'_>) -> Result<PfnRange, MetadataError> {
        for size in PageSize::LARGEST_FIRST {
            if size > self.core.max_block {
                continue;
            }
            let block = self.block(page, size)?;
            if size == PageSize::Size4K || self.uniform_after(block, overlay)? {
                return Ok(block);
            }
        }
        self.block(page, PageSize::Size4K)
    }

    fn block(&self, page: Pfn, size: PageSize) -> Result<PfnRange, MetadataError> {
        let geometry = self.geometry();
        geometry
            .block_containing(page, size)
            .map(|b| b.range(&geometry))
            .ok_or(MetadataError::Range(RangeError::OutOfBounds { pfn: page }))
    }

    fn uniform_after(&self, block: PfnRange, overlay: Overlay<'_>) -> Result<bool, MetadataError> {
        let mut first: Option<MappingAttributes> = None;
        let mut uniform = true;
        self.core.store.visit_mapping_runs(block, |run, a| {
            overlay.pieces(run, a, |_, after| {
                if *first.get_or_insert(after) != after {
                    uniform = false;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
        })?;
        Ok(uniform)
    }

    /// The backed blocks of `region` (with `overlay` applied, if given), as capped runs.
    fn layout(
        &self,
        region: PfnRange,
        overlay: Option<Overlay<'_>>,
        mut push: impl FnMut(PlanEntry),
    ) -> Result<(), MetadataError> {
        let geometry = self.geometry();
        let cap = self.core.max_block;
        let mut pending: Option<(PfnRange, MappingAttributes)> = None;
        let file = self.core.file;
        let mut flush = |run: PfnRange, a: MappingAttributes| {
            if a.owner != Some(file) {
                return;
            }
            for blocks in geometry.block_runs(run) {
                push(PlanEntry {
                    run: blocks.capped(&geometry, cap).cast(),
                    shareability: a.shareability,
                });
            }
        };
        let mut piece = |run: PfnRange, a: MappingAttributes| {
            match &mut pending {
                Some((r, pa)) if *pa == a && r.end() == run.start() => *r = r.hull(&run),
                _ => {
                    if let Some((r, pa)) = pending.replace((run, a)) {
                        flush(r, pa);
                    }
                }
            }
            ControlFlow::Continue(())
        };
        self.core
            .store
            .visit_mapping_runs(region, |run, a| match overlay {
                Some(o) => o.pieces(run, a, &mut piece),
                None => piece(run, a),
            })?;
        if let Some((r, a)) = pending {
            flush(r, a);
        }
        Ok(())
    }
}

/// Private conversions between the two index spaces of a file's metadata.
trait CastPfn {
    fn cast_pfn(self) -> Pfn;
}

impl CastPfn for PageOffset {
    fn cast_pfn(self) -> Pfn {
        Pfn(self.0)
    }
}
