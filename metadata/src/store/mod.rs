//! The sharded store: one slot per chunk of the span, each with its own lock and a lock-free
//! summary of its mapping uniformity.

use std::ops::{ControlFlow, Deref, DerefMut};

use pfnstore_core::sync::RwLock;
use pfnstore_core::sync::atomic::{AtomicU64, Ordering};
use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange, RangeError};

use crate::chunk::{ChunkState, MidList};
use crate::coarse_plane::{Coarse, CoarsePlane};
use crate::fast_convert::{ChunkShape, convert_small};
use crate::layout::{BlockLayout, RunCollector};
use crate::share_plane::{PlaneShape, SharePlane};
use crate::summary::{MANAGED, SummaryLayout};
mod bulk;

use crate::{
    Attributes, FileId, MappingAttributes, MappingChange, MetadataError, PinOwner,
    QuarantineReason, Shareability, Stats, Transition,
};

/// The most chunk slots a store allocates (64 MiB of slots; 4 PiB of memory in 1G chunks).
pub const MAX_CHUNKS: u64 = 1 << 20;

/// One chunk of the span: 64 bytes, one cache line.
#[cfg_attr(not(pfnstore_loom), repr(align(64)))]
#[derive(Debug)]
struct Slot {
    /// Written only with the chunk's write lock held; read without any lock by
    /// [`MetadataStore::max_mapping_order`]. See [`crate::summary`] for its bits.
    summary: AtomicU64,
    state: RwLock<Option<ChunkState>>,
}

/// The attribute store of a PFN span: shareability, pins, quarantine, scrub state and owner
/// of every page of its managed chunks. See the crate docs for the concepts, the lock order
/// and the representation.
#[derive(Debug)]
pub struct MetadataStore {
    geometry: Geometry,
    span: PfnRange,
    first_chunk: u64,
    summary: SummaryLayout,
    slots: Box<[Slot]>,
}

/// Holds a chunk's lock guards in ascending PFN order.
type Guards<G> = [G];

impl MetadataStore {
    /// A store for the chunks of `span` (chunk-aligned), none of them managed yet.
    pub fn new(geometry: Geometry, span: PfnRange) -> Result<MetadataStore, MetadataError> {
        span.check_aligned_to(geometry.chunk_pages())?;
        let chunks = span.len() >> geometry.order(PageSize::Size1G);
        if chunks > MAX_CHUNKS {
            return Err(MetadataError::SpanTooLarge {
                chunks,
                max: MAX_CHUNKS,
            });
        }
        let slots = (0..chunks)
            .map(|_| Slot {
                summary: AtomicU64::new(0),
                state: RwLock::new(None),
            })
            .collect();
        Ok(MetadataStore {
            geometry,
            span,
            first_chunk: geometry.chunk_index(span.start()),
            summary: SummaryLayout::new(geometry),
            slots,
        })
    }

    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The PFN span the store may manage.
    pub fn span(&self) -> PfnRange {
        self.span
    }

    fn chunk_pages(&self) -> u32 {
        // chunk_order <= 30 (Geometry's invariant), so a chunk's page count fits in a u32.
        self.geometry.chunk_pages() as u32
    }

    fn mid_order(&self) -> u32 {
        self.geometry.order(PageSize::Size2M)
    }

    fn plane_shape(&self) -> PlaneShape {
        PlaneShape::new(self.chunk_pages(), self.mid_order())
    }

    fn slot_index(&self, pfn: Pfn) -> usize {
        (self.geometry.chunk_index(pfn) - self.first_chunk) as usize
    }

    fn chunk_base(&self, index: usize) -> Pfn {
        Pfn((self.first_chunk + index as u64) << self.geometry.order(PageSize::Size1G))
    }

    /// The slot and offset of `pfn`, which must lie in the span: one subtraction and one
    /// comparison, as the span is chunk-aligned (this is on the fault path).
    #[inline]
    fn locate(&self, pfn: Pfn) -> Result<(usize, u32), MetadataError> {
        let rel = pfn.0.wrapping_sub(self.span.start().0);
        if rel >= self.span.len() {
            return Err(self.outside_span(pfn));
        }
        let index = (rel >> self.geometry.order(PageSize::Size1G)) as usize;
        // The offset is below the chunk's page count, which fits in a u32.
        Ok((index, (rel & (self.geometry.chunk_pages() - 1)) as u32))
    }

    /// The error for a `pfn` outside the span: the one `PfnRange::page(pfn)` and
    /// `check_within` give.
    #[cold]
    fn outside_span(&self, pfn: Pfn) -> MetadataError {
        match PfnRange::page(pfn) {
            Err(e) => e.into(),
            Ok(_) => RangeError::OutOfBounds { pfn }.into(),
        }
    }

    /// The part of `range` in chunk `index`, as offsets.
    fn clip(&self, range: PfnRange, index: usize) -> (u32, u32) {
        let base = self.chunk_base(index).0;
        let lo = range.start().0.max(base) - base;
        let hi = range.end().0.min(base + self.geometry.chunk_pages()) - base;
        (lo as u32, hi as u32)
    }

    /// A chunk-aligned chunk range starting at `base`, inside the span.
    fn check_chunk_base(&self, base: Pfn) -> Result<usize, MetadataError> {
        let chunk = PfnRange::from_len(base, self.geometry.chunk_pages())?;
        chunk.check_aligned_to(self.geometry.chunk_pages())?;
        chunk.check_within(&self.span)?;
        Ok(self.slot_index(base))
    }

    /// Starts managing the chunk at `base`: unowned, clean, unpinned, not quarantined, and all
    /// `initial`.
    pub fn add_chunk(&self, base: Pfn, initial: Shareability) -> Result<(), MetadataError> {
        let index = self.check_chunk_base(base)?;
        let slot = &self.slots[index];
        let mut state = slot.state.write();
        if state.is_some() {
            return Err(MetadataError::AlreadyManaged { base });
        }
        *state = Some(ChunkState::new(initial));
        slot.summary
            .store(self.summary.uniform(), Ordering::Release);
        Ok(())
    }

    /// Stops managing the chunk at `base`. Refused while any page is owned, pinned or
    /// quarantined (quarantined memory must never be handed on).
    pub fn remove_chunk(&self, base: Pfn) -> Result<(), MetadataError> {
        let index = self.check_chunk_base(base)?;
        let slot = &self.slots[index];
        let mut state = slot.state.write();
        let chunk = state
            .as_ref()
            .ok_or(MetadataError::NotManaged { pfn: base })?;
        for (start, _, c) in chunk
            .coarse
            .runs_in(0, self.chunk_pages(), self.chunk_pages())
        {
            let first_pfn = Pfn(base.0 + u64::from(start));
            if let Some(owner) = c.owner {
                return Err(MetadataError::AlreadyOwned { first_pfn, owner });
            }
            if let Some(owner) = c.pins.first_owner() {
                return Err(MetadataError::Pinned { first_pfn, owner });
            }
            if c.quarantined.is_some() {
                return Err(MetadataError::Quarantined { first_pfn });
            }
        }
        *state = None;
        slot.summary.store(0, Ordering::Release);
        Ok(())
    }

    /// Everything known about `pfn`.
    pub fn attributes(&self, pfn: Pfn) -> Result<Attributes, MetadataError> {
        let (index, off) = self.locate(pfn)?;
        let state = self.slots[index].state.read();
        let chunk = state.as_ref().ok_or(MetadataError::NotManaged { pfn })?;
        Ok(chunk.attributes_at(off))
    }

    /// The largest naturally aligned block around `pfn` whose mapping attributes are uniform.
    ///
    /// The fault path: no allocation, no per-page walk. When the chunk is uniform, or the
    /// summary group of middle blocks around `pfn` is all uniform or all non-uniform, the
    /// answer comes from one atomic load without a lock; otherwise the chunk's read lock is
    /// taken and a fragmented chunk answers from its mid index with one more load (a lightly
    /// fragmented one with a search of its short flip list).
    #[inline]
    pub fn max_mapping_order(&self, pfn: Pfn) -> Result<PageSize, MetadataError> {
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
                ChunkState::next_boundary,
                |chunk, pos, start, end| {
                    let attrs = chunk.attributes_at(pos);
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
                ChunkState::next_mapping_boundary,
                |chunk, pos, start, end| {
                    runs.push(start, end, chunk.mapping_at(pos));
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
                ChunkState::next_mapping_boundary,
                |chunk, pos, start, end| {
                    let attrs = chunk.mapping_at(pos);
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
                ChunkState::next_boundary,
                |chunk, pos, start, end| {
                    let attrs = chunk.attributes_at(pos);
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

    /// Calls `visit(chunk, offset, start, end)` for each piece of `range` between two
    /// consecutive boundaries that `next` finds, chunk by chunk, ascending. The guards are the
    /// read-locked chunks of `range`, the first at slot `first`.
    fn walk_runs<G: Deref<Target = Option<ChunkState>>>(
        &self,
        range: PfnRange,
        guards: &Guards<G>,
        first: usize,
        next: impl Fn(&ChunkState, u32, u32) -> Option<u32>,
        mut visit: impl FnMut(&ChunkState, u32, Pfn, Pfn) -> Result<ControlFlow<()>, MetadataError>,
    ) -> Result<(), MetadataError> {
        for (k, guard) in guards.iter().enumerate() {
            let chunk = guard
                .as_ref()
                .expect("read_locked checked every chunk is managed");
            let base = self.chunk_base(first + k).0;
            let (lo, hi) = self.clip(range, first + k);
            let mut pos = lo;
            while pos < hi {
                let end = next(chunk, pos, hi).unwrap_or(hi);
                let flow = visit(
                    chunk,
                    pos,
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

    /// Sets the shareability of `range`. Refused if any page is pinned or quarantined.
    pub fn set_shareability(
        &self,
        range: PfnRange,
        to: Shareability,
    ) -> Result<MappingChange, MetadataError> {
        let pages = self.chunk_pages();
        let shape = self.plane_shape();
        let validate = may_change_shareability;
        let mut apply = |chunk: &mut ChunkState, lo, hi| chunk.share.set(lo, hi, to, shape);
        range.check_within(&self.span)?;
        let index = self.slot_index(range.start());
        if index != self.slot_index(range.last()) {
            return self.mutate(range, validate, apply);
        }
        let slot = &self.slots[index];
        let mut guard = slot.state.write();
        // The fast path (see `fast_convert`): a uniform coarse plane and few flips.
        if let Some(chunk) = guard.as_mut()
            && let CoarsePlane::Uniform(coarse) = &chunk.coarse
            && let Some(before) = chunk.share.small()
        {
            validate(range.start(), coarse)?;
            let (lo, hi) = self.clip(range, index);
            let shape = ChunkShape {
                pages,
                mid_order: self.mid_order(),
                layout: &self.summary,
            };
            let outcome = convert_small(before, lo, hi, to, shape);
            if let Some(outcome) = outcome {
                chunk.share = SharePlane::from_small(outcome.after);
                if let Some(summary) = outcome.summary {
                    slot.summary.store(summary, Ordering::Release);
                }
                let base = self.chunk_base(index);
                return Ok(MappingChange::from_small(
                    self.geometry,
                    base,
                    outcome.change,
                ));
            }
        }
        self.mutate_locked(
            range,
            index,
            std::slice::from_mut(&mut guard),
            validate,
            &mut apply,
        )
    }

    /// Adds one pin by `owner` to every page of `range`.
    pub fn pin(&self, range: PfnRange, owner: PinOwner) -> Result<MappingChange, MetadataError> {
        self.pin_by(range, owner, 1)
    }

    /// Adds `times` pins by `owner` to every page of `range`; refused with
    /// [`MetadataError::PinOverflow`] if a count would exceed `u32::MAX`.
    pub fn pin_by(
        &self,
        range: PfnRange,
        owner: PinOwner,
        times: u32,
    ) -> Result<MappingChange, MetadataError> {
        self.update_coarse(
            range,
            |first_pfn, c| match c.pins.with_added(owner, times) {
                Some(_) => Ok(()),
                None => Err(MetadataError::PinOverflow { first_pfn, owner }),
            },
            |c| Coarse {
                pins: c
                    .pins
                    .with_added(owner, times)
                    .expect("validated: no count overflows"),
                ..c.clone()
            },
        )
    }

    /// Drops one pin by `owner` from every page of `range`; refused with
    /// [`MetadataError::NotPinned`] if a page holds none.
    pub fn unpin(&self, range: PfnRange, owner: PinOwner) -> Result<MappingChange, MetadataError> {
        self.update_coarse(
            range,
            |first_pfn, c| match c.pins.count(owner) {
                0 => Err(MetadataError::NotPinned { first_pfn, owner }),
                _ => Ok(()),
            },
            |c| Coarse {
                pins: c
                    .pins
                    .with_removed(owner)
                    .expect("validated: every page holds a pin by owner"),
                ..c.clone()
            },
        )
    }

    /// Quarantines `range`. Pages already quarantined keep their first reason.
    pub fn quarantine(
        &self,
        range: PfnRange,
        reason: QuarantineReason,
    ) -> Result<MappingChange, MetadataError> {
        self.update_coarse(
            range,
            |_, _| Ok(()),
            |c| Coarse {
                quarantined: c.quarantined.or(Some(reason)),
                ..c.clone()
            },
        )
    }

    /// Marks `range` as needing a scrub (`true`) or as scrubbed (`false`).
    pub fn set_dirty(&self, range: PfnRange, dirty: bool) -> Result<MappingChange, MetadataError> {
        self.update_coarse(range, |_, _| Ok(()), |c| Coarse { dirty, ..c.clone() })
    }

    /// Gives `range` to `file`. Every page must be unowned and not quarantined.
    pub fn assign_owner(
        &self,
        range: PfnRange,
        file: FileId,
    ) -> Result<MappingChange, MetadataError> {
        self.update_coarse(
            range,
            |first_pfn, c| {
                if let Some(owner) = c.owner {
                    return Err(MetadataError::AlreadyOwned { first_pfn, owner });
                }
                if c.quarantined.is_some() {
                    return Err(MetadataError::Quarantined { first_pfn });
                }
                Ok(())
            },
            |c| Coarse {
                owner: Some(file),
                ..c.clone()
            },
        )
    }

    /// Takes `range` back from `file`. Every page must belong to `file` and be unpinned.
    pub fn release_owner(
        &self,
        range: PfnRange,
        file: FileId,
    ) -> Result<MappingChange, MetadataError> {
        self.update_coarse(
            range,
            |first_pfn, c| {
                if c.owner != Some(file) {
                    return Err(MetadataError::NotOwner {
                        first_pfn,
                        expected: file,
                        found: c.owner,
                    });
                }
                if let Some(owner) = c.pins.first_owner() {
                    return Err(MetadataError::Pinned { first_pfn, owner });
                }
                Ok(())
            },
            |c| Coarse {
                owner: None,
                ..c.clone()
            },
        )
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

    /// Checks the canonical form of every chunk and that every summary matches its chunk.
    /// For tests; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (index, slot) in self.slots.iter().enumerate() {
            let state = slot.state.read();
            let summary = slot.summary.load(Ordering::Acquire);
            let expected = match state.as_ref() {
                None => 0,
                Some(chunk) => {
                    chunk
                        .check_canonical(self.plane_shape())
                        .map_err(|e| format!("chunk {index}: {e}"))?;
                    let window = self.summary.whole_chunk();
                    let (uniform, nonuniform) = self.uniformity(chunk, window);
                    self.summary.recompute(
                        uniform,
                        window,
                        nonuniform.as_slice().iter().copied(),
                        MANAGED,
                    )
                }
            };
            if summary != expected {
                return Err(format!(
                    "chunk {index}: summary {summary:#x}, expected {expected:#x}"
                ));
            }
        }
        Ok(())
    }

    /// Whether the chunk is mapping-uniform, and its non-uniform middle blocks in `window`.
    fn uniformity(&self, chunk: &ChunkState, window: (u32, u32)) -> (bool, MidList) {
        if chunk.mapping_uniform() {
            (true, MidList::default())
        } else {
            (
                false,
                chunk.nonuniform_mids(window.0, window.1, self.mid_order()),
            )
        }
    }

    /// Runs `f` on the read-locked chunks of `range` (all managed), locked in ascending order.
    fn read_locked<T>(
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

    fn check_managed<G: Deref<Target = Option<ChunkState>>>(
        &self,
        range: PfnRange,
        first: usize,
        guards: &Guards<G>,
    ) -> Result<(), MetadataError> {
        match guards.iter().position(|g| g.is_none()) {
            None => Ok(()),
            Some(k) => Err(MetadataError::NotManaged {
                pfn: range.start().max(self.chunk_base(first + k)),
            }),
        }
    }

    /// A mutation of the coarse plane: `validate` each run in ascending order, then `update`.
    fn update_coarse(
        &self,
        range: PfnRange,
        validate: impl Fn(Pfn, &Coarse) -> Result<(), MetadataError>,
        update: impl Fn(&Coarse) -> Coarse,
    ) -> Result<MappingChange, MetadataError> {
        let pages = self.chunk_pages();
        self.mutate(range, validate, |chunk, lo, hi| {
            chunk.coarse.update(lo, hi, pages, &update)
        })
    }

    /// The frame of every mutation: lock the chunks of `range` in ascending order, check they
    /// are managed, `validate` every coarse run of the range in ascending order (it gets the
    /// run's first PFN inside the range), and only then `apply` to each chunk, keeping the
    /// summaries and recording the splits and merges.
    fn mutate(
        &self,
        range: PfnRange,
        validate: impl Fn(Pfn, &Coarse) -> Result<(), MetadataError>,
        mut apply: impl FnMut(&mut ChunkState, u32, u32),
    ) -> Result<MappingChange, MetadataError> {
        range.check_within(&self.span)?;
        let (first, last) = (
            self.slot_index(range.start()),
            self.slot_index(range.last()),
        );
        if first == last {
            // The common case without a guard vector.
            let mut guard = self.slots[first].state.write();
            self.mutate_locked(
                range,
                first,
                std::slice::from_mut(&mut guard),
                validate,
                &mut apply,
            )
        } else {
            let mut guards: Vec<_> = (first..=last)
                .map(|i| self.slots[i].state.write())
                .collect();
            self.mutate_locked(range, first, &mut guards, validate, &mut apply)
        }
    }

    fn mutate_locked<G: DerefMut<Target = Option<ChunkState>>>(
        &self,
        range: PfnRange,
        first: usize,
        guards: &mut Guards<G>,
        validate: impl Fn(Pfn, &Coarse) -> Result<(), MetadataError>,
        apply: &mut impl FnMut(&mut ChunkState, u32, u32),
    ) -> Result<MappingChange, MetadataError> {
        self.check_managed(range, first, guards)?;
        let pages = self.chunk_pages();
        for (k, guard) in guards.iter().enumerate() {
            let chunk = guard.as_ref().expect("check_managed passed");
            let base = self.chunk_base(first + k).0;
            let (lo, hi) = self.clip(range, first + k);
            for (start, _, c) in chunk.coarse.runs_in(lo, hi, pages) {
                validate(Pfn(base + u64::from(start)), c)?;
            }
        }
        let mut change = MappingChange::new(self.geometry);
        for (k, guard) in guards.iter_mut().enumerate() {
            let index = first + k;
            let chunk = guard.as_mut().expect("check_managed passed");
            let (lo, hi) = self.clip(range, index);
            self.change_chunk(index, chunk, (lo, hi), &mut change, |chunk| {
                apply(chunk, lo, hi)
            });
        }
        Ok(change)
    }

    /// Runs `apply` on write-locked chunk `index`, which changes nothing outside offsets
    /// `lo..hi`; then brings the chunk's summary up to date and records the splits and merges
    /// in `change`.
    fn change_chunk(
        &self,
        index: usize,
        chunk: &mut ChunkState,
        (lo, hi): (u32, u32),
        change: &mut MappingChange,
        apply: impl FnOnce(&mut ChunkState),
    ) {
        let mid_order = self.mid_order();
        let window = self.summary.window(lo >> mid_order, (hi - 1) >> mid_order);
        let (uniform_before, before) = self.uniformity(chunk, window);
        apply(chunk);
        let (uniform_after, after) = self.uniformity(chunk, window);
        let slot = &self.slots[index];
        let previous = slot.summary.load(Ordering::Relaxed);
        let summary = self.summary.recompute(
            uniform_after,
            window,
            after.as_slice().iter().copied(),
            previous,
        );
        slot.summary.store(summary, Ordering::Release);
        let base = self.chunk_base(index);
        match (uniform_before, uniform_after) {
            (true, false) => change.record(Transition::Split, PageSize::Size1G, base),
            (false, true) => change.record(Transition::Merge, PageSize::Size1G, base),
            _ => {}
        }
        change.record_mid_diff(
            base,
            before.as_slice().iter().copied(),
            after.as_slice().iter().copied(),
        );
    }
}

/// Why the shareability of the pages of coarse run `c` (from `first_pfn`) may not change.
fn may_change_shareability(first_pfn: Pfn, c: &Coarse) -> Result<(), MetadataError> {
    if let Some(owner) = c.pins.first_owner() {
        return Err(MetadataError::Pinned { first_pfn, owner });
    }
    if c.quarantined.is_some() {
        return Err(MetadataError::Quarantined { first_pfn });
    }
    Ok(())
}

/// [`MetadataStore::max_mapping_order`] under the read lock of a chunk, for its middle block
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

/// The size of a chunk slot, for the layout test.
#[cfg(all(test, not(pfnstore_loom)))]
pub(crate) fn slot_size() -> usize {
    std::mem::size_of::<Slot>()
}
