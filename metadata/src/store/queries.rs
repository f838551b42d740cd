//! Reading the store: attributes, mapping sizes, runs, block layouts, owners, statistics.
//! Readers take chunk read locks in ascending order; `max_mapping_size` first tries the
//! lock-free summary word.

use std::ops::{ControlFlow, Deref};

use pfnstore_core::sync::atomic::Ordering;
use pfnstore_core::{PageSize, Pfn, PfnRange};

use super::{Guards, MetadataStore, Slot};
use crate::chunk::ChunkState;
use crate::layout::{BlockLayout, RunCollector};
use crate::{Attributes, FileId, MappingAttributes, MetadataError, Shareability, Stats};

impl MetadataStore {
    /// Everything known about `pfn`.
    pub fn attributes(&self, pfn: Pfn) -> Result<Attributes, MetadataError> {
        let (index, off) = self.locate(pfn)?;
        let state = self.slots[index].state.read();
        let chunk = state.as_ref().ok_or(MetadataError::NotManaged { pfn })?;
        Ok(chunk.attributes_at(off))
    }

    /// The old name of [`MetadataStore::max_mapping_size`] (it returns a size, not an order).
    #[deprecated(since = "0.2.0", note = "renamed to max_mapping_size")]
    pub fn max_mapping_order(&self, pfn: Pfn) -> Result<PageSize, MetadataError> {
        self.max_mapping_size(pfn)
    }

    /// The largest naturally aligned block around `pfn` whose mapping attributes are uniform.
    ///
    /// The fault path: no allocation, no per-page walk. When the chunk is uniform, or the
    /// summary group of middle blocks around `pfn` is all uniform or all non-uniform, the
    /// answer comes from one atomic load without a lock; otherwise the chunk's read lock is
    /// taken and a fragmented chunk answers from its mid index with one more load (a lightly
    /// fragmented one with a search of its short flip list).
    #[inline]
    pub fn max_mapping_size(&self, pfn: Pfn) -> Result<PageSize, MetadataError> {
        let (index, off) = self.locate(pfn)?;
        let slot = &self.slots[index];
        let mid = off >> self.mid_order();
        match self
            .summary
            .lookup(slot.summary.load(Ordering::Acquire), mid)
        {
            Some(size) => Ok(size),
            None => mid_mapping_order_locked(slot, mid, self.mid_order())
                .ok_or(MetadataError::NotManaged { pfn }),
        }
    }

    /// The maximal runs of equal attributes that intersect `range`, clipped to it, ascending.
    pub fn ranges(&self, range: PfnRange) -> Result<Vec<(PfnRange, Attributes)>, MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut out: Vec<(PfnRange, Attributes)> = Vec::with_capacity(4);
            self.walk_runs(
                range,
                guards,
                first,
                false,
                |chunk, pos, share, start, end| {
                    let attrs = chunk.coarse.at(pos).with_shareability(share);
                    match out.last_mut() {
                        Some((r, a)) if r.end() == start && *a == attrs => {
                            *r = PfnRange::new(r.start(), end)?
                        }
                        _ => out.push((PfnRange::new(start, end)?, attrs)),
                    }
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            Ok(out)
        })
    }

    /// The maximal naturally aligned blocks with uniform mapping attributes that cover exactly
    /// `range`, as runs of equal-sized blocks (see [`BlockLayout`]).
    pub fn block_layout(&self, range: PfnRange) -> Result<BlockLayout, MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut runs = RunCollector::new();
            self.walk_runs(
                range,
                guards,
                first,
                true,
                |chunk, pos, share, start, end| {
                    runs.push(start, end, chunk.mapping_with(pos, share));
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            Ok(BlockLayout::from_runs(self.geometry, runs.finish()))
        })
    }

    /// Calls `visit` with each maximal run of equal mapping attributes that intersects
    /// `range`, clipped to it, ascending, until it returns `Break`. Allocates nothing for a
    /// range inside one chunk: this is what conversion plans are computed from.
    pub fn visit_mapping_runs(
        &self,
        range: PfnRange,
        mut visit: impl FnMut(PfnRange, MappingAttributes) -> ControlFlow<()>,
    ) -> Result<(), MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut pending: Option<(Pfn, Pfn, MappingAttributes)> = None;
            let mut stopped = false;
            self.walk_runs(
                range,
                guards,
                first,
                true,
                |chunk, pos, share, start, end| {
                    let attrs = chunk.mapping_with(pos, share);
                    match &mut pending {
                        Some((_, e, a)) if *e == start && *a == attrs => *e = end,
                        _ => {
                            if let Some((s, e, a)) = pending.replace((start, end, attrs))
                                && visit(PfnRange::new(s, e)?, a).is_break()
                            {
                                stopped = true;
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            if let (false, Some((s, e, a))) = (stopped, pending) {
                let _ = visit(PfnRange::new(s, e)?, a);
            }
            Ok(())
        })
    }

    /// Calls `visit` with each maximal run of equal attributes (all of them: pins, quarantine
    /// and scrub state too) that intersects `range`, clipped to it, ascending, until it
    /// returns `Break`.
    pub fn visit_runs(
        &self,
        range: PfnRange,
        mut visit: impl FnMut(PfnRange, &Attributes) -> ControlFlow<()>,
    ) -> Result<(), MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut pending: Option<(Pfn, Pfn, Attributes)> = None;
            let mut stopped = false;
            self.walk_runs(
                range,
                guards,
                first,
                false,
                |chunk, pos, share, start, end| {
                    let attrs = chunk.coarse.at(pos).with_shareability(share);
                    match &mut pending {
                        Some((_, e, a)) if *e == start && *a == attrs => *e = end,
                        _ => {
                            if let Some((s, e, a)) = pending.replace((start, end, attrs))
                                && visit(PfnRange::new(s, e)?, &a).is_break()
                            {
                                stopped = true;
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            if let (false, Some((s, e, a))) = (stopped, pending) {
                let _ = visit(PfnRange::new(s, e)?, &a);
            }
            Ok(())
        })
    }

    /// Calls `visit(chunk, offset, shareability, start, end)` for each piece of `range` between two
    /// consecutive boundaries (of the mapping attributes only if `mapping_only`), chunk by
    /// chunk, ascending. The guards are the read-locked chunks of `range`, the first at slot
    /// `first`.
    ///
    /// A chunk's shareability flips are walked with a cursor, the shareability toggled at each
    /// (one search per chunk, not one per boundary): a fragmented chunk has thousands of flips,
    /// and a snapshot or an invariant check walks them all.
    pub(super) fn walk_runs<G: Deref<Target = Option<ChunkState>>>(
        &self,
        range: PfnRange,
        guards: &Guards<G>,
        first: usize,
        mapping_only: bool,
        mut visit: impl FnMut(
            &ChunkState,
            u32,
            Shareability,
            Pfn,
            Pfn,
        ) -> Result<ControlFlow<()>, MetadataError>,
    ) -> Result<(), MetadataError> {
        for (k, guard) in guards.iter().enumerate() {
            let chunk = guard
                .as_ref()
                .expect("read_locked checked every chunk is managed");
            let base = self.chunk_base(first + k).0;
            let (lo, hi) = self.clip(range, first + k);
            let mut flips = chunk.share.flips_after(lo);
            let mut pos = lo;
            while pos < hi {
                let (share, value) = match flips.as_mut() {
                    Some((value, list)) => {
                        while let Some((&p, rest)) = list.split_first()
                            && p <= pos
                        {
                            *list = rest;
                            *value = value.flipped();
                        }
                        (list.first().copied().filter(|&p| p < hi), *value)
                    }
                    None => (chunk.share.next_flip(pos, hi), chunk.share.value_at(pos)),
                };
                let coarse = chunk.coarse.next_boundary(pos, hi, mapping_only);
                let end = share.into_iter().chain(coarse).min().unwrap_or(hi);
                let flow = visit(
                    chunk,
                    pos,
                    value,
                    Pfn(base + u64::from(pos)),
                    Pfn(base + u64::from(end)),
                )?;
                if flow.is_break() {
                    return Ok(());
                }
                pos = end;
            }
        }
        Ok(())
    }

    /// Calls `visit` with each maximal run of one owner (`None`: no owner) that intersects
    /// `range`, clipped to it, ascending, until it returns `Break`. Walks the owners only, so
    /// its cost follows the owner boundaries, not the shareability flips (what checking a
    /// fragmented file's backing needs).
    pub fn visit_owner_runs(
        &self,
        range: PfnRange,
        mut visit: impl FnMut(PfnRange, Option<FileId>) -> ControlFlow<()>,
    ) -> Result<(), MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut pending: Option<(Pfn, Pfn, Option<FileId>)> = None;
            for (k, guard) in guards.iter().enumerate() {
                let chunk = guard
                    .as_ref()
                    .expect("read_locked checked every chunk is managed");
                let base = self.chunk_base(first + k).0;
                let (lo, hi) = self.clip(range, first + k);
                for (start, end, c) in chunk.coarse.runs_in(lo, hi, self.chunk_pages()) {
                    let (start, end) = (Pfn(base + u64::from(start)), Pfn(base + u64::from(end)));
                    match &mut pending {
                        Some((_, e, owner)) if *e == start && *owner == c.owner => *e = end,
                        _ => {
                            if let Some((s, e, owner)) = pending.replace((start, end, c.owner))
                                && visit(PfnRange::new(s, e)?, owner).is_break()
                            {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            if let Some((s, e, owner)) = pending {
                let _ = visit(PfnRange::new(s, e)?, owner);
            }
            Ok(())
        })
    }

    /// The one file that owns every page of `range` (`None`: no page is owned), or
    /// [`MetadataError::SpansFiles`] naming the first page whose owner differs from the
    /// start's.
    pub fn owner_of(&self, range: PfnRange) -> Result<Option<FileId>, MetadataError> {
        self.read_locked(range, |guards, first| {
            let mut owner = None;
            for (k, guard) in guards.iter().enumerate() {
                let chunk = guard
                    .as_ref()
                    .expect("read_locked checked every chunk is managed");
                let (lo, hi) = self.clip(range, first + k);
                for (start, _, c) in chunk.coarse.runs_in(lo, hi, self.chunk_pages()) {
                    let first_owner = *owner.get_or_insert(c.owner);
                    if c.owner != first_owner {
                        return Err(MetadataError::SpansFiles {
                            first_pfn: Pfn(self.chunk_base(first + k).0 + u64::from(start)),
                            first: first_owner,
                            found: c.owner,
                        });
                    }
                }
            }
            Ok(owner.flatten())
        })
    }

    /// Counts and bytes, walked under each chunk's read lock in turn (not one snapshot).
    pub fn stats(&self) -> Stats {
        let pages = self.chunk_pages();
        let mut stats = Stats {
            table_bytes: std::mem::size_of_val::<[Slot]>(&self.slots) as u64,
            ..Stats::default()
        };
        for slot in self.slots.iter() {
            let state = slot.state.read();
            let Some(chunk) = state.as_ref() else {
                continue;
            };
            stats.managed_chunks += 1;
            stats.heap_bytes += chunk.heap_bytes() as u64;
            stats.nodes +=
                1 + chunk.share.flip_count() as u64 + chunk.coarse.run_count() as u64 - 1;
            let private = chunk.share.private_pages(pages);
            stats.private_pages += private;
            stats.shared_pages += u64::from(pages) - private;
            for (start, end, c) in chunk.coarse.runs_in(0, pages, pages) {
                let len = u64::from(end - start);
                stats.pinned_pages += if c.pins.is_empty() { 0 } else { len };
                stats.quarantined_pages += if c.quarantined.is_some() { len } else { 0 };
                stats.dirty_pages += if c.dirty { len } else { 0 };
                stats.owned_pages += if c.owner.is_some() { len } else { 0 };
            }
        }
        stats.bytes = stats.table_bytes + stats.heap_bytes;
        stats
    }

    /// Runs `f` on the read-locked chunks of `range` (all managed), locked in ascending order.
    pub(super) fn read_locked<T>(
        &self,
        range: PfnRange,
        f: impl FnOnce(
            &Guards<pfnstore_core::sync::RwLockReadGuard<'_, Option<ChunkState>>>,
            usize,
        ) -> Result<T, MetadataError>,
    ) -> Result<T, MetadataError> {
        range.check_within(&self.span)?;
        let (first, last) = (
            self.slot_index(range.start()),
            self.slot_index(range.last()),
        );
        if first == last {
            // The common case (a range inside one chunk): no vector of guards to allocate.
            let guards = [self.slots[first].state.read()];
            self.check_managed(range, first, &guards)?;
            return f(&guards, first);
        }
        let guards: Vec<_> = (first..=last).map(|i| self.slots[i].state.read()).collect();
        self.check_managed(range, first, &guards)?;
        f(&guards, first)
    }
}

/// [`MetadataStore::max_mapping_size`] under the read lock of a chunk, for its middle block
/// `mid`; `None` when the chunk is not managed. Out of line so that the lock-free part inlines
/// into the caller, and with a small signature: a locked instruction waits for every earlier
/// store, so the fewer registers spilled (and no result written to memory) before the lock is
/// released, the cheaper it is.
#[inline(never)]
fn mid_mapping_order_locked(slot: &Slot, mid: u32, mid_order: u32) -> Option<PageSize> {
    let state = slot.state.read();
    state
        .as_ref()
        .map(|chunk| chunk.mid_mapping_order(mid, mid_order))
}
