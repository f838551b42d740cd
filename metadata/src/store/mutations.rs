//! Changing the store: every mutation validates all its runs under the write locks of its
//! chunks, then applies, then brings each chunk's summary word up to date and reports the
//! splits and merges. All or nothing.

use std::ops::DerefMut;

use pfnstore_core::sync::atomic::Ordering;
use pfnstore_core::{PageSize, Pfn, PfnRange};

use super::{Guards, MetadataStore};
use crate::chunk::{ChunkState, MidList};
use crate::coarse_plane::{Coarse, CoarsePlane};
use crate::fast_convert::{ChunkShape, convert_small};
use crate::share_plane::SharePlane;
use crate::{
    FileId, MappingChange, MetadataError, PinOwner, QuarantineReason, Shareability, Transition,
};

impl MetadataStore {
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

    /// Whether the chunk is mapping-uniform, and its non-uniform middle blocks in `window`.
    pub(super) fn uniformity(&self, chunk: &ChunkState, window: (u32, u32)) -> (bool, MidList) {
        if chunk.mapping_uniform() {
            (true, MidList::default())
        } else {
            (
                false,
                chunk.nonuniform_mids(window.0, window.1, self.mid_order()),
            )
        }
    }

    /// A mutation of the coarse plane: `validate` each run in ascending order, then `update`.
    pub(super) fn update_coarse(
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
    pub(super) fn mutate(
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

    pub(super) fn mutate_locked<G: DerefMut<Target = Option<ChunkState>>>(
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
    pub(super) fn change_chunk(
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
pub(super) fn may_change_shareability(first_pfn: Pfn, c: &Coarse) -> Result<(), MetadataError> {
    if let Some(owner) = c.pins.first_owner() {
        return Err(MetadataError::Pinned { first_pfn, owner });
    }
    if c.quarantined.is_some() {
        return Err(MetadataError::Quarantined { first_pfn });
    }
    Ok(())
}
