//! The glue between the metadata's change transaction and the file's memory: what the store
//! does at each step of a population, a conversion and a punch-hole (see
//! [`pfnstore_metadata::conversion`] for the steps, and [`super::mapping`] for the rule the
//! host mapping follows).
//!
//! * populate: the memory is taken (and mapped, inaccessible) *before* any subscriber hears
//!   of it, so that running out of memory changes nothing; the rule opens what is shared
//!   once the metadata says it is backed.
//! * convert: after every subscriber unmapped and before the metadata flips, the host loses
//!   access to units that become wholly private and a ZERO conversion zeroes the bytes
//!   (nobody can write them any more); after the flip, access is restored where the rule
//!   says so.
//! * punch: after every subscriber unmapped, huge pages with nothing backed left leave the
//!   host mapping; after the flip their frames go back to the allocator.
//!
//! A failure of the store's own step rolls the change back like a subscriber's unmap failure
//! would, and the caller gets the store's typed error.

use pfnstore_core::{OffsetRange, PageOffset, Pfn};
use pfnstore_metadata::conversion::{
    Change, ChangeHooks, ChangeOutcome, ConversionError, HookError,
};
use pfnstore_metadata::{QuarantineReason, Shareability};

use super::extents::Extent;
use super::mapping::Direction;
use super::{FileInner, GuestFile};
use crate::StoreError;
use crate::store::Taken;

/// What a conversion does to the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvertMode {
    /// The bytes stay as they are (in-place conversion).
    #[default]
    Preserve,
    /// The bytes are zeroed after every user unmapped them and before anyone maps them again:
    /// every backed page of the requested range, also those that already had the target
    /// shareability, once any page of it changes (a conversion that changes nothing zeroes
    /// nothing).
    Zero,
}

impl GuestFile {
    /// Backs `offset..offset + len` with memory (zeroed), where it is not backed yet, and
    /// tells subscribers what they may map now. Memory comes in the source's pages: on a
    /// hugetlb store, backing one 4 KiB page backs the whole huge page around it. All or
    /// nothing: on failure nothing new is backed and the allocator's accounting is unchanged.
    /// Quarantined offsets are never backed again ([`StoreError::Quarantined`]).
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let pages = self.inner.pages(offset, len)?;
        self.inner.populate(pages).map(drop)
    }

    /// Converts `offset..offset + len` to `to`, in place: the two-phase transaction of
    /// [`pfnstore_metadata::conversion`], with the plan in page offsets of this file. On any
    /// failure the shareability is unchanged; [`StoreError::UnmapFailed`] says which
    /// subscriber failed at which offset, and lists what could not be restored.
    pub fn convert(
        &self,
        offset: u64,
        len: u64,
        to: Shareability,
        mode: ConvertMode,
    ) -> Result<ChangeOutcome, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.pages(offset, len)?;
        let mut hooks = Convert {
            file: inner,
            pages,
            to,
            mode,
            error: None,
        };
        let result = inner.domain.convert_with(pages, to, &mut hooks);
        #[cfg(pfnstore_loom_mutation = "refresh_unlocked")]
        let _ = inner.refresh(pages, None, Direction::Both);
        let outcome = inner.finish(result, hooks.error)?;
        if outcome.is_noop() {
            // Nothing to convert; but a restoration that failed earlier (the process out of
            // memory regions) is retried, so that converting again repairs the host mapping.
            let _guard = inner
                .domain
                .lock_shared(pages)
                .map_err(|e| inner.context().conversion(e))?;
            inner.refresh(pages, None, Direction::Both)?;
        }
        Ok(outcome)
    }

    /// Takes the memory away from `offset..offset + len`: every subscriber unmaps it first,
    /// then it leaves the host mapping and returns to the allocator (dirty, to be scrubbed
    /// before anyone gets it again). Shareability is not changed; the offsets read as zeros
    /// once populated again. On a hugetlb store, a huge page is given back once none of it is
    /// backed any more. Pinned pages fail the call; a subscriber that fails to unmap fails it
    /// with nothing freed.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let pages = self.inner.pages(offset, len)?;
        self.inner.punch(pages, false)
    }
}

impl FileInner {
    /// Backs the unbacked pages of `pages`, widened to whole granules of the source (clipped
    /// to the file).
    pub(crate) fn populate(&self, pages: OffsetRange) -> Result<ChangeOutcome, StoreError> {
        let _op = self.enter()?;
        let granule = self.store.inner.memory().granule();
        let widened = pages.align_out(granule);
        let end = widened.end().0.min(self.size_pages);
        let request = OffsetRange::new(widened.start(), PageOffset(end))?;
        let mut hooks = Populate {
            file: self,
            added: Vec::new(),
            error: None,
        };
        let result = self.domain.populate_with(request, &mut hooks);
        self.finish(result, hooks.error)
    }

    /// Unbacks `pages`; `dying` lets a file being destroyed or dropped do it.
    pub(crate) fn punch(&self, pages: OffsetRange, dying: bool) -> Result<(), StoreError> {
        let _op = if dying { None } else { Some(self.enter()?) };
        let mut hooks = Punch {
            file: self,
            dying,
            releasable: Vec::new(),
            unmapped: 0,
            error: None,
        };
        let result = self.domain.punch_with(pages, &mut hooks);
        self.finish(result, hooks.error).map(drop)
    }

    /// The caller's error for a transaction's result: the store's own typed error for a
    /// failed hook; for an unmap failure, the frames behind what could not be restored are
    /// quarantined too, and the host mapping follows.
    fn finish(
        &self,
        result: Result<ChangeOutcome, ConversionError>,
        stashed: Option<StoreError>,
    ) -> Result<ChangeOutcome, StoreError> {
        match result {
            Ok(outcome) => Ok(outcome),
            Err(ConversionError::Hook { .. }) if stashed.is_some() => {
                Err(stashed.unwrap_or_else(|| crate::error::broken("a hook's error was lost")))
            }
            Err(e) => {
                if let ConversionError::UnmapFailed { quarantined, .. } = &e {
                    for range in quarantined {
                        let frames = self.extents.read().extents_in(*range);
                        for extent in frames {
                            self.store
                                .inner
                                .quarantine(extent.pfns(), QuarantineReason::UnmapFailed)?;
                        }
                        self.refresh(*range, None, Direction::Both)?;
                    }
                }
                Err(self.context().conversion(e))
            }
        }
    }

    /// Takes memory for the unheld `hole` (widened to whole granules): aligned blocks as
    /// large as the offsets allow, each retried as smaller blocks when it cannot be had, never
    /// below a granule. Maps each piece into the host mapping, inaccessible, and records it as
    /// held.
    fn take_memory(
        &self,
        hole: OffsetRange,
        added: &mut Vec<(Taken, Vec<Extent>)>,
    ) -> Result<(), StoreError> {
        let geometry = self.store.inner.geometry();
        let granule = self.store.inner.memory().granule();
        let mut todo: Vec<_> = geometry.blocks(hole.align_out(granule)).collect();
        todo.reverse();
        while let Some(block) = todo.pop() {
            let offsets = block.range(&geometry);
            let pages = offsets.len();
            if let Some(taken) = self.store.inner.take(self.id, pages, pages.max(granule)) {
                match self.hold(offsets, &taken) {
                    Ok(extents) => added.push((taken, extents)),
                    Err(e) => {
                        let _ = self.store.inner.untake(self.id, taken);
                        return Err(e);
                    }
                }
                continue;
            }
            let smaller = block
                .size()
                .smaller()
                .filter(|s| geometry.pages(*s) >= granule);
            let Some(smaller) = smaller else {
                return Err(StoreError::OutOfMemory {
                    file: self.id,
                    offset: offsets.start().byte(),
                    pages,
                });
            };
            let count = pages / geometry.pages(smaller);
            let mut parts: Vec<_> =
                pfnstore_core::BlockRun::new(&geometry, offsets.start(), smaller, count)?
                    .blocks(&geometry)
                    .collect();
            parts.reverse();
            todo.extend(parts);
        }
        Ok(())
    }

    /// Records `taken` as holding `offsets`, one extent per chunk, mapped inaccessible.
    fn hold(&self, offsets: OffsetRange, taken: &Taken) -> Result<Vec<Extent>, StoreError> {
        let memory = self.store.inner.memory();
        let mut extents: Vec<Extent> = Vec::new();
        let mut pfn = taken.range.start();
        let mut at = offsets.start();
        while at < offsets.end() {
            let chunk_end = memory.chunk_end(pfn)?.min(taken.range.end());
            let len = chunk_end.0 - pfn.0;
            let extent = Extent {
                offsets: OffsetRange::from_len(at, len)?,
                pfn,
            };
            if let (Some(mapping), Some(memfd)) = (&self.mapping, memory.memfd()) {
                let memfd_offset = memory.memfd_offset(pfn)?;
                if let Err(e) = mapping.map(&extent, memfd.fd(), memfd_offset) {
                    for done in &extents {
                        let _ = mapping.unmap(done.offsets);
                    }
                    return Err(self.mapping_error(e, at));
                }
            }
            extents.push(extent);
            pfn = chunk_end;
            at = PageOffset(at.0 + len);
        }
        let mut held = self.extents.write();
        for extent in &extents {
            held.insert(*extent);
        }
        Ok(extents)
    }

    /// Gives back memory taken for a population that did not happen, as it was.
    fn give_back(&self, added: Vec<(Taken, Vec<Extent>)>) {
        for (taken, extents) in added.into_iter().rev() {
            for extent in &extents {
                if let Some(mapping) = &self.mapping {
                    let _ = mapping.unmap(extent.offsets);
                }
                self.extents.write().remove(extent.offsets);
            }
            let _ = self.store.inner.untake(self.id, taken);
        }
    }
}

struct Populate<'a> {
    file: &'a FileInner,
    added: Vec<(Taken, Vec<Extent>)>,
    error: Option<StoreError>,
}

impl ChangeHooks for Populate<'_> {
    fn before(&mut self, _: &Change<'_>, changed: &[OffsetRange]) -> Result<(), HookError> {
        let file = self.file;
        let result = (|| {
            file.alive()?;
            if !file.store.inner.memory().has_bytes() && file.mapping.is_some() {
                return Err(StoreError::NoHostMemory {
                    what: "populating a file",
                });
            }
            for range in changed {
                // Held frames of punched pages: zero them (a punched range reads as zeros).
                let held = file.extents.read().extents_in(*range);
                for extent in held {
                    file.store.inner.memory().zero(extent.pfns())?;
                }
                let holes = file.extents.read().holes_in(*range);
                for hole in holes {
                    file.take_memory(hole, &mut self.added)?;
                }
            }
            Ok(())
        })();
        result.map_err(|e| {
            self.file.give_back(std::mem::take(&mut self.added));
            stash(&mut self.error, e)
        })
    }

    fn changed(&mut self, _: &Change<'_>, changed: &[OffsetRange]) {
        self.added.clear();
        for range in changed {
            // Shared memory becomes accessible; on failure it stays revoked (the safe side)
            // and the next access retries.
            let _ = self.file.refresh(*range, None, Direction::Both);
        }
    }

    fn rolled_back(&mut self, _: &Change<'_>, _: &[OffsetRange]) {
        self.file.give_back(std::mem::take(&mut self.added));
    }
}

struct Convert<'a> {
    file: &'a FileInner,
    pages: OffsetRange,
    to: Shareability,
    mode: ConvertMode,
    error: Option<StoreError>,
}

impl ChangeHooks for Convert<'_> {
    fn before(&mut self, _: &Change<'_>, _: &[OffsetRange]) -> Result<(), HookError> {
        self.file.alive().map_err(|e| stash(&mut self.error, e))
    }

    fn unmapped(&mut self, _: &Change<'_>, _: &[OffsetRange]) -> Result<(), HookError> {
        let file = self.file;
        let result = (|| {
            if self.to == Shareability::Private {
                file.refresh(
                    self.pages,
                    Some((self.pages, self.to)),
                    Direction::RevokeOnly,
                )?;
            }
            if self.mode == ConvertMode::Zero {
                let held = file.extents.read().extents_in(self.pages);
                for extent in held {
                    file.store.inner.memory().zero(extent.pfns())?;
                }
            }
            Ok(())
        })();
        result.map_err(|e| stash(&mut self.error, e))
    }

    fn changed(&mut self, _: &Change<'_>, _: &[OffsetRange]) {
        // Restorations only can fail here, which leaves memory revoked (the safe side); the
        // next access to it retries.
        // Test-only mutation: apply the rule after the range lock is released instead.
        #[cfg(not(pfnstore_loom_mutation = "refresh_unlocked"))]
        let _ = self.file.refresh(self.pages, None, Direction::Both);
    }

    fn rolled_back(&mut self, _: &Change<'_>, _: &[OffsetRange]) {
        let _ = self.file.refresh(self.pages, None, Direction::Both);
    }
}

struct Punch<'a> {
    file: &'a FileInner,
    dying: bool,
    /// Whole granules that hold nothing backed once the punch is done.
    releasable: Vec<OffsetRange>,
    /// How many of them left the host mapping already.
    unmapped: usize,
    error: Option<StoreError>,
}

impl Punch<'_> {
    /// The granules of `changed` with nothing backed left after the punch.
    fn releasable(&self, changed: &[OffsetRange]) -> Result<Vec<OffsetRange>, StoreError> {
        let file = self.file;
        let granule = file.store.inner.memory().granule();
        let mut out: Vec<OffsetRange> = Vec::new();
        let mut push = |r: OffsetRange| match out.last_mut() {
            Some(last) if last.end() >= r.start() => *last = last.hull(&r),
            _ => out.push(r),
        };
        for range in changed {
            let (start, end) = (range.start().0, range.end().0);
            let inner_start = start.div_ceil(granule) * granule;
            let inner_end = end / granule * granule;
            // Granules the punch covers whole go; the partly punched ones at the two ends go
            // only if nothing else of them stays backed.
            let head = (start % granule != 0).then(|| start / granule * granule);
            let tail = (end % granule != 0)
                .then_some(inner_end)
                .filter(|t| Some(*t) != head);
            if let Some(h) = head {
                let g = OffsetRange::from_len(PageOffset(h), granule)?;
                if !file.backed_outside(g, changed)? {
                    push(g);
                }
            }
            if inner_start < inner_end {
                push(OffsetRange::new(
                    PageOffset(inner_start),
                    PageOffset(inner_end),
                )?);
            }
            if let Some(t) = tail {
                let g = OffsetRange::from_len(PageOffset(t), granule)?;
                if !file.backed_outside(g, changed)? {
                    push(g);
                }
            }
        }
        Ok(out)
    }
}

impl FileInner {
    /// Whether a page of `granule` outside `changed` is backed.
    fn backed_outside(
        &self,
        granule: OffsetRange,
        changed: &[OffsetRange],
    ) -> Result<bool, StoreError> {
        let mut backed = false;
        self.domain
            .store()
            .visit_runs(granule.cast::<Pfn>(), |run, a| {
                let run = run.cast::<PageOffset>();
                if a.owner == Some(self.id) && !changed.iter().any(|c| c.contains_range(&run)) {
                    backed = true;
                    return std::ops::ControlFlow::Break(());
                }
                std::ops::ControlFlow::Continue(())
            })
            .map_err(|e| self.context().metadata(e))?;
        Ok(backed)
    }
}

impl ChangeHooks for Punch<'_> {
    fn before(&mut self, _: &Change<'_>, _: &[OffsetRange]) -> Result<(), HookError> {
        if self.dying {
            return Ok(());
        }
        self.file.alive().map_err(|e| stash(&mut self.error, e))
    }

    fn unmapped(&mut self, _: &Change<'_>, changed: &[OffsetRange]) -> Result<(), HookError> {
        let result = (|| {
            self.releasable = self.releasable(changed)?;
            // Test-only mutation: leave the host mapping only after the memory went back to
            // the allocator (the loom models must catch it).
            #[cfg(not(pfnstore_loom_mutation = "release_before_unmap"))]
            if let Some(mapping) = &self.file.mapping {
                for g in &self.releasable {
                    mapping
                        .unmap(*g)
                        .map_err(|e| self.file.mapping_error(e, g.start()))?;
                    self.unmapped += 1;
                }
            }
            Ok(())
        })();
        result.map_err(|e| {
            self.remap();
            stash(&mut self.error, e)
        })
    }

    fn changed(&mut self, _: &Change<'_>, changed: &[OffsetRange]) {
        let file = self.file;
        for g in std::mem::take(&mut self.releasable) {
            let gone = file.extents.write().remove(g);
            for extent in gone {
                let _ = file.store.inner.release(file.id, extent.pfns());
            }
            #[cfg(pfnstore_loom_mutation = "release_before_unmap")]
            if let Some(mapping) = &file.mapping {
                let _ = mapping.unmap(g);
            }
        }
        for range in changed {
            let _ = file.refresh(*range, None, Direction::Both);
        }
    }

    fn rolled_back(&mut self, _: &Change<'_>, changed: &[OffsetRange]) {
        self.remap();
        for range in changed {
            let _ = self.file.refresh(*range, None, Direction::Both);
        }
    }
}

impl Punch<'_> {
    /// Maps back the granules this punch took out of the host mapping (a rollback).
    fn remap(&mut self) {
        let file = self.file;
        let (Some(mapping), Some(memfd)) = (&file.mapping, file.store.inner.memory().memfd())
        else {
            return;
        };
        for g in self.releasable.iter().take(self.unmapped) {
            let held = file.extents.read().extents_in(*g);
            for extent in held {
                if let Ok(offset) = file.store.inner.memory().memfd_offset(extent.pfn) {
                    let _ = mapping.map(&extent, memfd.fd(), offset);
                }
            }
        }
        self.unmapped = 0;
    }
}

/// Keeps the store's typed error for the caller; the transaction gets its text.
fn stash(slot: &mut Option<StoreError>, e: StoreError) -> HookError {
    let reason = e.to_string();
    *slot = Some(e);
    HookError { reason }
}
