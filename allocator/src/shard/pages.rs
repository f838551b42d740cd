//! Questions about the pages of a range, and the changes that validated operations make.

use pfnstore_core::Pfn;

use super::{DirtyCollector, Fault, ShardState, normalize_unless_cursor};
use crate::AllocError;
use crate::DirtyRanges;
use crate::chunk::{Bad, Chunk, Mark};

impl ShardState {
    pub(super) fn quarantined_at(&self, pfn: u64) -> bool {
        !self.quarantined.is_empty()
            && self
                .quarantined
                .range(..=pfn)
                .next_back()
                .is_some_and(|(_, &e)| e > pfn)
    }

    /// Whether `pfn` (in an owned chunk) is allocated, and whether it starts an allocation.
    pub(super) fn page_at(&self, pfn: u64) -> Option<(bool, bool)> {
        let slot = self.slot_of(pfn)?;
        let base = self.slots[slot].base;
        Some(match &self.slots[slot].chunk {
            Chunk::Free { .. } => (false, false),
            Chunk::Allocated { start } => (true, pfn == base && *start),
            Chunk::Split(t) => {
                let off = pfn - base;
                t.page(&self.d, off >> self.d.m_shift, off & (self.d.m - 1))
            }
        })
    }

    /// Checks that `[start, end)` is free and owned; returns the fault at its first page that
    /// is not.
    pub(super) fn check_free(&self, start: u64, end: u64) -> Result<(), Fault> {
        let d = self.d;
        let mut p = start;
        while p < end {
            let Some(slot) = self.slot_of(p) else {
                return Err(if p == start {
                    Fault::StartNotOwned
                } else {
                    Fault::Outside(p)
                });
            };
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            match &self.slots[slot].chunk {
                Chunk::Free { .. } => {}
                Chunk::Allocated { .. } => return Err(AllocError::NotFree { pfn: Pfn(p) }.into()),
                Chunk::Split(t) => {
                    let mut q = p;
                    while q < hi {
                        let mid = (q - base) >> d.m_shift;
                        let mb = base + (mid << d.m_shift);
                        let mhi = hi.min(mb + d.m);
                        if let Some(off) = t.first_not_free(&d, mid, q - mb, mhi - mb) {
                            return Err(AllocError::NotFree { pfn: Pfn(mb + off) }.into());
                        }
                        q = mhi;
                    }
                }
            }
            p = hi;
        }
        Ok(())
    }

    /// Checks that `[start, end)` is allocated, owned and inside one allocation.
    pub(super) fn check_allocated(&self, start: u64, end: u64, freeing: bool) -> Result<(), Fault> {
        let d = self.d;
        let fault = |pfn: u64, bad: Bad| -> Fault {
            let pfn_ = Pfn(pfn);
            match bad {
                Bad::Free if freeing => AllocError::DoubleFree { pfn: pfn_ },
                Bad::Free => AllocError::NotAllocated { pfn: pfn_ },
                Bad::Start if self.quarantined_at(pfn) => AllocError::Quarantined { pfn: pfn_ },
                Bad::Start => AllocError::SpansAllocations { pfn: pfn_ },
            }
            .into()
        };
        let mut p = start;
        while p < end {
            let Some(slot) = self.slot_of(p) else {
                return Err(if p == start {
                    Fault::StartNotOwned
                } else {
                    Fault::Outside(p)
                });
            };
            if p == start && self.quarantined_at(start) {
                return Err(AllocError::Quarantined { pfn: Pfn(start) }.into());
            }
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            match &self.slots[slot].chunk {
                Chunk::Free { .. } => return Err(fault(p, Bad::Free)),
                Chunk::Allocated { start: s } => {
                    if p == base && *s && p != start {
                        return Err(fault(p, Bad::Start));
                    }
                }
                Chunk::Split(t) => {
                    let mut q = p;
                    while q < hi {
                        let mid = (q - base) >> d.m_shift;
                        let mb = base + (mid << d.m_shift);
                        let mhi = hi.min(mb + d.m);
                        if let Err((off, bad)) =
                            t.check_allocated(&d, mid, q - mb, mhi - mb, q == start)
                        {
                            return Err(fault(mb + off, bad));
                        }
                        q = mhi;
                    }
                }
            }
            p = hi;
        }
        Ok(())
    }

    /// The dirty parts of `[p, hi)`, which is free and inside the chunk in `slot`.
    pub(super) fn dirty_piece(&self, slot: usize, p: u64, hi: u64, out: &mut DirtyCollector) {
        let d = self.d;
        let base = self.slots[slot].base;
        match &self.slots[slot].chunk {
            Chunk::Free { clean } => out.piece(p, hi, *clean),
            Chunk::Allocated { .. } => unreachable!("checked free"),
            Chunk::Split(t) => {
                let mut q = p;
                while q < hi {
                    let mid = (q - base) >> d.m_shift;
                    let mb = base + (mid << d.m_shift);
                    let mhi = hi.min(mb + d.m);
                    t.clean_runs(&d, mid, q - mb, mhi - mb, |lo, hi, clean| {
                        out.piece(mb + lo, mb + hi, clean)
                    });
                    q = mhi;
                }
            }
        }
    }

    // ----- page changes (after validation) -----

    /// Marks free `[start, end)` allocated, as one allocation; returns its dirty parts.
    pub(super) fn take(&mut self, start: u64, end: u64) -> DirtyRanges {
        let d = self.d;
        let mut dirty = DirtyCollector::default();
        let mut p = start;
        while p < end {
            let slot = self.slot_of(p).expect("checked free, so owned");
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            self.dirty_piece(slot, p, hi, &mut dirty);
            let whole = p == base && hi == base + d.c;
            let cursor_here = self.cursor.is_some_and(|c| c.slot == slot);
            let collapse = match &self.slots[slot].chunk {
                Chunk::Free { .. } => whole,
                Chunk::Split(t) => whole && !cursor_here && t.mixed_mids == 0,
                Chunk::Allocated { .. } => unreachable!("checked free"),
            };
            if collapse {
                self.slots[slot].chunk = Chunk::Allocated { start: p == start };
            } else {
                let cursor = self.cursor;
                let t = self.split_mut(slot);
                for part in d.mids_in(base, p, hi) {
                    let mid = part.mid;
                    if part.whole(&d) && !t.is(Mark::Mixed, mid) {
                        t.put(Mark::Free, mid, false);
                        t.put(Mark::Clean, mid, false);
                        t.put(Mark::Alloc, mid, true);
                        t.put(Mark::Start, mid, part.lo == start);
                    } else {
                        t.ensure_mixed(&d, mid);
                        let (lo, hi) = (part.lo - part.first, part.hi - part.first);
                        t.take_pages(&d, mid, lo, hi, part.lo == start);
                        normalize_unless_cursor(t, &d, cursor, slot, mid);
                    }
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
        self.allocated_pages += end - start;
        dirty.finish()
    }

    /// Marks allocated `[start, end)` free and dirty.
    pub(super) fn release(&mut self, start: u64, end: u64) {
        let d = self.d;
        let mut p = start;
        while p < end {
            let slot = self.slot_of(p).expect("checked allocated, so owned");
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            let whole = p == base && hi == base + d.c;
            if whole && matches!(self.slots[slot].chunk, Chunk::Allocated { .. }) {
                self.slots[slot].chunk = Chunk::Free { clean: false };
            } else {
                let cursor = self.cursor;
                let t = self.split_mut(slot);
                for part in d.mids_in(base, p, hi) {
                    let mid = part.mid;
                    if part.whole(&d) && t.is(Mark::Alloc, mid) {
                        t.put(Mark::Alloc, mid, false);
                        t.put(Mark::Start, mid, false);
                        t.put(Mark::Free, mid, true);
                        t.put(Mark::Clean, mid, false);
                    } else {
                        t.ensure_mixed(&d, mid);
                        t.release_pages(&d, mid, part.lo - part.first, part.hi - part.first);
                        normalize_unless_cursor(t, &d, cursor, slot, mid);
                    }
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
        self.allocated_pages -= end - start;
    }

    /// Page `pfn` (allocated, owned) starts an allocation from now on.
    pub(super) fn set_start_at(&mut self, pfn: u64) {
        let d = self.d;
        let slot = self.slot_of(pfn).expect("allocated, so owned");
        let base = self.slots[slot].base;
        if pfn == base
            && let Chunk::Allocated { start } = &mut self.slots[slot].chunk
        {
            *start = true;
            return;
        }
        let cursor = self.cursor;
        let t = self.split_mut(slot);
        let off = pfn - base;
        let mid = off >> d.m_shift;
        t.set_start(&d, mid, off & (d.m - 1));
        if cursor.is_none_or(|c| c.slot != slot || c.mid != mid) {
            t.normalize(&d, mid);
        }
        self.chunk_changed(slot);
    }

    /// After `[.., end)` of an allocation left it: the rest, if any, is an allocation of its
    /// own from `end` on.
    pub(super) fn split_after(&mut self, end: u64) {
        if let Some((true, false)) = self.page_at(end) {
            self.set_start_at(end);
        }
    }
}
