//! One shard's state and the operations on it. Everything here runs under the shard's lock;
//! every operation validates first and changes nothing observable when it fails.

mod figures;
mod pages;
mod placement;

use std::collections::BTreeMap;

use pfnstore_core::{Pfn, PfnRange};

use crate::bits;
use crate::chunk::{Chunk, Dims, Mark, Split};
use crate::request::pfn_range;
use crate::shape::{Shape, align_down};
use crate::{AllocError, DirtyRanges};

/// Why an operation on a shard failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A final answer.
    Rejected(AllocError),
    /// The first page of the range is not in this shard's chunks: try its owner.
    StartNotOwned,
    /// The range reaches `pfn`, which is not in this shard's chunks: the caller tells
    /// [`AllocError::CrossesShards`] from [`AllocError::NotManaged`].
    Outside(u64),
}

/// What [`ShardState::free_hot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HotFree {
    /// Freed.
    Done,
    /// Nothing: the range starts in this shard, but takes the general path (validation,
    /// several blocks, quarantine, ...).
    General,
    /// Nothing: the range does not start in this shard.
    NotOwned,
}

impl From<AllocError> for Fault {
    fn from(e: AllocError) -> Fault {
        Fault::Rejected(e)
    }
}

#[derive(Debug)]
struct Slot {
    base: u64,
    chunk: Chunk,
    /// Which of the shard's chunk sets hold this chunk (`ALL_FREE | SOME_FREE | PARTIAL`).
    class: u8,
}

const ALL_FREE: u8 = 1;
const SOME_FREE: u8 = 2;
const PARTIAL: u8 = 4;

/// The mid block that small requests carve from first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    slot: usize,
    mid: u64,
    /// Its first page.
    base: u64,
}

/// Brings mid block `mid` of the chunk in `slot` to canonical form after a change of some of
/// its pages, unless it is the cursor block (which stays mixed while small requests use it).
fn normalize_unless_cursor(t: &mut Split, d: &Dims, cursor: Option<Cursor>, slot: usize, mid: u64) {
    if !cursor.is_some_and(|c| c.slot == slot && c.mid == mid) {
        t.normalize(d, mid);
    }
}

/// Collects the dirty parts of an allocation, merging touching pieces.
#[derive(Debug, Default)]
struct DirtyCollector {
    /// Ranges before the open one (none in the usual case: one dirty range or none).
    closed: Option<DirtyRanges>,
    open: Option<(u64, u64)>,
}

impl DirtyCollector {
    #[inline]
    fn piece(&mut self, lo: u64, hi: u64, clean: bool) {
        if clean {
            return;
        }
        match &mut self.open {
            Some((_, e)) if *e == lo => *e = hi,
            open => {
                if let Some((s, e)) = open.take() {
                    self.closed
                        .get_or_insert_with(DirtyRanges::new)
                        .push(pfn_range(s, e));
                }
                *open = Some((lo, hi));
            }
        }
    }

    #[inline]
    fn finish(self) -> DirtyRanges {
        match (self.closed, self.open) {
            (None, None) => DirtyRanges::new(),
            (None, Some((s, e))) => pfn_range(s, e).into(),
            (Some(mut ranges), open) => {
                if let Some((s, e)) = open {
                    ranges.push(pfn_range(s, e));
                }
                ranges
            }
        }
    }
}

/// The pages of one shard.
#[derive(Debug)]
pub(crate) struct ShardState {
    d: Dims,
    slots: Vec<Slot>,
    /// (base, slot), sorted by base.
    by_base: Vec<(u64, usize)>,
    /// When the shard's chunks lie close together: slot + 1 (0: not ours) by chunk index
    /// from `dense_lo` on, so that finding a page's chunk is one load, not a search.
    dense: Vec<u32>,
    dense_lo: u64,
    /// Per slot: every page free.
    all_free: Vec<u64>,
    /// Per slot: some mid blocks wholly free, not all (a partly used chunk).
    mid_free: Vec<u64>,
    /// Per slot: some mid block partly free (and not the cursor).
    partial: Vec<u64>,
    cursor: Option<Cursor>,
    /// Quarantined runs, coalesced: start -> end.
    quarantined: BTreeMap<u64, u64>,
    quarantined_pages: u64,
    /// Allocated pages, quarantined ones not included.
    allocated_pages: u64,
}

/// Sets or clears bit `i` of a per-slot set (sized for every slot by `reindex`).
#[inline(always)]
fn put_bit(words: &mut [u64], i: usize, on: bool) {
    let (w, b) = (i / 64, 1u64 << (i % 64));
    words[w] = if on { words[w] | b } else { words[w] & !b };
}

impl ShardState {
    pub(crate) fn new(shape: Shape) -> ShardState {
        ShardState {
            d: Dims::new(shape.mid, shape.chunk),
            slots: Vec::new(),
            by_base: Vec::new(),
            dense: Vec::new(),
            dense_lo: 0,
            all_free: Vec::new(),
            mid_free: Vec::new(),
            partial: Vec::new(),
            cursor: None,
            quarantined: BTreeMap::new(),
            quarantined_pages: 0,
            allocated_pages: 0,
        }
    }

    // ----- chunks -----

    #[inline]
    fn slot_of(&self, pfn: u64) -> Option<usize> {
        if !self.dense.is_empty() {
            let i = (pfn >> self.d.c_shift).wrapping_sub(self.dense_lo);
            return match self.dense.get(i as usize) {
                Some(&s) if s != 0 => Some(s as usize - 1),
                _ => None,
            };
        }
        let base = align_down(pfn, self.d.c);
        self.by_base
            .binary_search_by_key(&base, |e| e.0)
            .ok()
            .map(|i| self.by_base[i].1)
    }

    /// Rebuilds the direct chunk index after chunks came or went.
    fn reindex(&mut self) {
        let words = self.slots.len().div_ceil(64).max(1);
        for sets in [&mut self.all_free, &mut self.mid_free, &mut self.partial] {
            sets.resize(words, 0);
        }
        self.dense = Vec::new();
        let (Some(&(lo, _)), Some(&(hi, _))) = (self.by_base.first(), self.by_base.last()) else {
            return;
        };
        let (lo, hi) = (lo >> self.d.c_shift, hi >> self.d.c_shift);
        if hi - lo >= 4 * self.by_base.len() as u64 + 64 {
            return; // scattered chunks: binary search
        }
        self.dense_lo = lo;
        self.dense = vec![0; (hi - lo + 1) as usize];
        for &(base, slot) in &self.by_base {
            self.dense[((base >> self.d.c_shift) - lo) as usize] = slot as u32 + 1;
        }
    }

    fn owns(&self, pfn: u64) -> bool {
        self.slot_of(pfn).is_some()
    }

    /// Updates the shard's chunk sets after a change in `slot` (only what changed).
    #[inline(always)]
    fn chunk_changed(&mut self, slot: usize) {
        let mids = self.d.mids;
        let class = match &self.slots[slot].chunk {
            Chunk::Free { .. } => ALL_FREE,
            Chunk::Allocated { .. } => 0,
            Chunk::Split(t) => {
                (if t.free_mids == mids { ALL_FREE } else { 0 })
                    | (if t.free_mids > 0 && t.free_mids < mids {
                        SOME_FREE
                    } else {
                        0
                    })
                    | (if t.partial_mids > 0 { PARTIAL } else { 0 })
            }
        };
        if class == self.slots[slot].class {
            return;
        }
        self.slots[slot].class = class;
        put_bit(&mut self.all_free, slot, class & ALL_FREE != 0);
        put_bit(&mut self.mid_free, slot, class & SOME_FREE != 0);
        put_bit(&mut self.partial, slot, class & PARTIAL != 0);
    }

    fn split_mut(&mut self, slot: usize) -> &mut Split {
        let d = self.d;
        let chunk = &mut self.slots[slot].chunk;
        match *chunk {
            Chunk::Free { clean } => *chunk = Chunk::Split(Box::new(Split::new(&d, true, clean))),
            Chunk::Allocated { start } => {
                *chunk = Chunk::Split(Box::new(Split::new(&d, false, start)))
            }
            Chunk::Split(_) => {}
        }
        match chunk {
            Chunk::Split(t) => t,
            _ => unreachable!("made split above"),
        }
    }

    /// Adds a chunk that the caller has reserved for this shard (so it overlaps nothing).
    pub(crate) fn add_chunk(&mut self, base: u64, dirty: bool) {
        debug_assert!(!self.owns(base));
        let slot = self.slots.len();
        self.slots.push(Slot {
            base,
            chunk: Chunk::Free { clean: !dirty },
            class: 0,
        });
        let at = self.by_base.partition_point(|e| e.0 < base);
        self.by_base.insert(at, (base, slot));
        self.reindex();
        self.chunk_changed(slot);
    }

    pub(crate) fn remove_chunk(&mut self, base: u64) -> Result<(), Fault> {
        let slot = self.slot_of(base).ok_or(Fault::StartNotOwned)?;
        if self.cursor.is_some_and(|c| c.slot == slot) {
            self.retire_cursor_if_free();
        }
        if let Err(Fault::Rejected(AllocError::NotFree { pfn })) =
            self.check_free(base, base + self.d.c)
        {
            return Err(AllocError::ChunkInUse {
                base: Pfn(base),
                pfn,
            }
            .into());
        }
        if self.cursor.is_some_and(|c| c.slot == slot) {
            self.cursor = None;
        }
        let last = self.slots.len() - 1;
        self.slots.swap_remove(slot);
        self.by_base.retain(|e| e.0 != base);
        for sets in [&mut self.all_free, &mut self.mid_free, &mut self.partial] {
            put_bit(sets, last, false);
        }
        if slot != last {
            for e in &mut self.by_base {
                if e.1 == last {
                    e.1 = slot;
                }
            }
            if let Some(c) = &mut self.cursor
                && c.slot == last
            {
                c.slot = slot;
            }
            // The sets' bits at `slot` were the removed chunk's: write them all.
            self.slots[slot].class = u8::MAX;
            self.chunk_changed(slot);
        }
        self.reindex();
        Ok(())
    }

    // ----- the cursor -----

    /// Makes `(slot, mid)` the cursor (mixed, outside the partial/free marks).
    fn set_cursor(&mut self, slot: usize, mid: u64) {
        self.retire_cursor();
        let d = self.d;
        let t = self.split_mut(slot);
        t.ensure_mixed(&d, mid);
        t.put(Mark::Free, mid, false);
        t.put(Mark::Partial, mid, false);
        let base = self.slots[slot].base + mid * d.m;
        self.cursor = Some(Cursor { slot, mid, base });
        self.chunk_changed(slot);
    }

    fn retire_cursor(&mut self) {
        if let Some(c) = self.cursor.take() {
            let d = self.d;
            if let Chunk::Split(t) = &mut self.slots[c.slot].chunk {
                t.normalize(&d, c.mid);
            }
            self.chunk_changed(c.slot);
        }
    }

    /// Before a search for whole blocks: a wholly free cursor goes back among the free blocks.
    fn retire_cursor_if_free(&mut self) {
        if let Some(c) = self.cursor
            && let Chunk::Split(t) = &self.slots[c.slot].chunk
            && bits::all_clear(t.a(&self.d, c.mid), self.d.m)
        {
            self.retire_cursor();
        }
    }

    // ----- operations -----

    /// Places and takes a request; returns the range and its dirty parts.
    #[cfg_attr(
        pfnstore_loom_mutation = "allocator_split_alloc",
        allow(dead_code, reason = "the mutation places and takes in two steps")
    )]
    pub(crate) fn alloc(
        &mut self,
        pages: u64,
        align: u64,
        clean_only: bool,
    ) -> Option<(PfnRange, DirtyRanges)> {
        if let Some((start, clean)) = self.alloc_hot(pages, align, clean_only) {
            let range = pfn_range(start, start + pages);
            return Some((range, DirtyRanges::all_or_none(range, clean)));
        }
        let start = self.place(pages, align, clean_only)?;
        let dirty = self.take(start, start + pages);
        Some((pfn_range(start, start + pages), dirty))
    }

    /// The hot paths of [`ShardState::alloc`]: one page from the cursor, or one whole 2 MiB
    /// or 1 GiB block. Returns the first page and whether the range is clean, a pair that
    /// travels in two registers (the callers' `Allocation` is built where it is used, so no
    /// caller reads it back from memory the callee just wrote, which stalls store forwarding:
    /// see allocator/IMPLEMENTATION.md, "Hot paths"). `None`: the general path decides.
    #[inline(never)]
    pub(crate) fn alloc_hot(
        &mut self,
        pages: u64,
        align: u64,
        clean_only: bool,
    ) -> Option<(u64, bool)> {
        if clean_only || pages != align {
            None
        } else if pages == 1 {
            self.alloc_one_from_cursor()
        } else if pages == self.d.m || pages == self.d.c {
            self.alloc_whole_block(pages)
        } else {
            None
        }
    }

    /// The hot path of a 2 MiB or 1 GiB request: a whole free block without page bitmaps.
    /// `None` sends the request down the general path (which also finds out whether there is
    /// room at all).
    #[inline]
    fn alloc_whole_block(&mut self, pages: u64) -> Option<(u64, bool)> {
        let d = self.d;
        self.retire_cursor_if_free();
        let (start, clean) = if pages == d.c {
            let slot = bits::first_set(&self.all_free)? as usize;
            let base = self.slots[slot].base;
            let clean = match &self.slots[slot].chunk {
                Chunk::Free { clean } => *clean,
                _ => return None,
            };
            self.slots[slot].chunk = Chunk::Allocated { start: true };
            self.chunk_changed(slot);
            (base, clean)
        } else {
            let (slot, mid) = self.whole_free_mid()?;
            let base = self.slots[slot].base;
            let t = match &mut self.slots[slot].chunk {
                Chunk::Split(t) => t,
                _ => self.split_mut(slot),
            };
            if t.is(Mark::Mixed, mid) {
                return None;
            }
            let clean = t.is(Mark::Clean, mid);
            t.put(Mark::Free, mid, false);
            t.put(Mark::Clean, mid, false);
            t.put(Mark::Alloc, mid, true);
            t.put(Mark::Start, mid, true);
            self.chunk_changed(slot);
            (base + (mid << d.m_shift), clean)
        };
        self.allocated_pages += pages;
        Some((start, clean))
    }

    /// The hot path of a 4 KiB request: the first free page of the cursor block.
    #[inline]
    fn alloc_one_from_cursor(&mut self) -> Option<(u64, bool)> {
        let d = self.d;
        let c = self.cursor?;
        let Chunk::Split(t) = &mut self.slots[c.slot].chunk else {
            return None;
        };
        let off = bits::first_clear_in(t.a(&d, c.mid), 0, d.m)?;
        if off == 0 && self.partial.iter().any(|&w| w != 0) && bits::all_clear(t.a(&d, c.mid), d.m)
        {
            // A wholly free cursor waits while partly used blocks have room.
            return None;
        }
        let clean = match t.s(&d, c.mid) {
            Some(s) => bits::test(s, off),
            None => t.is(Mark::Clean, c.mid),
        };
        t.take_pages(&d, c.mid, off, off + 1, true);
        self.allocated_pages += 1;
        Some((c.base + off, clean))
    }

    /// The test-only mutation of the loom models: takes `[start, end)` without checking that
    /// it is still free, as a racy "place under one lock, take under another" would.
    #[cfg(pfnstore_loom_mutation = "allocator_split_alloc")]
    pub(crate) fn carve_unchecked(&mut self, start: u64, end: u64) -> (PfnRange, DirtyRanges) {
        let dirty = self.take(start, end);
        (pfn_range(start, end), dirty)
    }

    pub(crate) fn alloc_at(&mut self, range: PfnRange) -> Result<DirtyRanges, Fault> {
        let (start, end) = (range.start().0, range.end().0);
        self.check_free(start, end)?;
        Ok(self.take(start, end))
    }

    pub(crate) fn mark_clean(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        self.check_free(start, end)?;
        self.clean(start, end);
        Ok(())
    }

    /// Marks free `[start, end)` clean.
    fn clean(&mut self, start: u64, end: u64) {
        let d = self.d;
        let mut p = start;
        while p < end {
            let slot = self.slot_of(p).expect("checked free, so owned");
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            let whole = p == base && hi == base + d.c;
            match self.slots[slot].chunk {
                Chunk::Free { .. } if whole => {
                    self.slots[slot].chunk = Chunk::Free { clean: true };
                }
                Chunk::Free { clean: true } => {}
                _ => {
                    let cursor = self.cursor;
                    let t = self.split_mut(slot);
                    for part in d.mids_in(base, p, hi) {
                        let mid = part.mid;
                        if !t.is(Mark::Mixed, mid) && (part.whole(&d) || t.is(Mark::Clean, mid)) {
                            t.put(Mark::Clean, mid, true);
                        } else {
                            t.ensure_mixed(&d, mid);
                            t.clean_pages(&d, mid, part.lo - part.first, part.hi - part.first);
                            normalize_unless_cursor(t, &d, cursor, slot, mid);
                        }
                    }
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
    }

    pub(crate) fn free(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        if self.free_hot(start, end) == HotFree::Done {
            return Ok(());
        }
        self.check_allocated(start, end, true)?;
        self.release(start, end);
        self.split_after(end);
        Ok(())
    }

    /// The hot paths of [`ShardState::free`]: one page of a mixed block, or one whole block.
    /// The answer is one byte in a register (for the reason `alloc_hot` gives); anything but
    /// [`HotFree::Done`] has changed nothing.
    #[inline(never)]
    pub(crate) fn free_hot(&mut self, start: u64, end: u64) -> HotFree {
        if (end - start == 1 && self.free_one(start)) || self.free_whole_block(start, end) {
            HotFree::Done
        } else if self.owns(start) {
            HotFree::General
        } else {
            HotFree::NotOwned
        }
    }

    /// The hot path of a 4 KiB free: a one-page allocation in a mixed block. Returns
    /// whether it applied (else the general path runs, validation included).
    #[inline]
    fn free_one(&mut self, pfn: u64) -> bool {
        let d = self.d;
        if !self.quarantined.is_empty() {
            return false;
        }
        let (slot, mid, off, in_cursor) = match self.cursor {
            Some(c) if pfn.wrapping_sub(c.base) < d.m => (c.slot, c.mid, pfn - c.base, true),
            _ => {
                let Some(slot) = self.slot_of(pfn) else {
                    return false;
                };
                let off = pfn - self.slots[slot].base;
                (slot, off >> d.m_shift, off & (d.m - 1), false)
            }
        };
        let Chunk::Split(t) = &mut self.slots[slot].chunk else {
            return false;
        };
        if !t.is(Mark::Mixed, mid) {
            return false;
        }
        let bit = |w: &[u64], p: u64| w[(p / 64) as usize] >> (p % 64) & 1 != 0;
        let last = off + 1 == d.m;
        let a = t.a(&d, mid);
        // Allocated, and a start (always, in singles form); does the allocation go on?
        let (start, goes_on) = match t.s(&d, mid) {
            None => (true, false),
            Some(s) => (bit(s, off), !last && bit(a, off + 1) && !bit(s, off + 1)),
        };
        if !bit(a, off) || !start {
            return false;
        }
        if goes_on {
            t.set_start(&d, mid, off + 1);
        }
        t.release_pages(&d, mid, off, off + 1);
        self.allocated_pages -= 1;
        if !in_cursor {
            if t.has_s(mid) || bits::all_clear(t.a(&d, mid), d.m) {
                t.normalize(&d, mid);
            } else {
                t.put(Mark::Partial, mid, true);
            }
            self.chunk_changed(slot);
        }
        if last {
            self.split_after(pfn + 1);
        }
        true
    }

    /// The hot path of a 2 MiB or 1 GiB free: exactly one whole block that starts an
    /// allocation. Returns whether it applied (else the general path runs).
    #[inline]
    fn free_whole_block(&mut self, start: u64, end: u64) -> bool {
        let d = self.d;
        if !self.quarantined.is_empty() {
            return false;
        }
        let Some(slot) = self.slot_of(start) else {
            return false;
        };
        let base = self.slots[slot].base;
        match &mut self.slots[slot].chunk {
            Chunk::Allocated { start: true } if start == base && end == base + d.c => {
                self.slots[slot].chunk = Chunk::Free { clean: false };
            }
            Chunk::Split(t) if end - start == d.m && start & (d.m - 1) == 0 => {
                let mid = (start - base) >> d.m_shift;
                if !t.is(Mark::Alloc, mid) || !t.is(Mark::Start, mid) {
                    return false;
                }
                t.put(Mark::Alloc, mid, false);
                t.put(Mark::Start, mid, false);
                t.put(Mark::Free, mid, true);
                t.put(Mark::Clean, mid, false);
                // The block after it, in the same chunk and whole: does the allocation go on
                // into it? (Mixed blocks and the next chunk take the general way below.)
                if mid + 1 < d.mids && !t.is(Mark::Mixed, mid + 1) {
                    if t.is(Mark::Alloc, mid + 1) && !t.is(Mark::Start, mid + 1) {
                        t.put(Mark::Start, mid + 1, true);
                    }
                    self.chunk_changed(slot);
                    self.allocated_pages -= d.m;
                    return true;
                }
            }
            _ => return false,
        }
        self.chunk_changed(slot);
        self.allocated_pages -= end - start;
        self.split_after(end);
        true
    }

    /// Gives back an allocation as it was handed out: `dirty` (inside `range`) dirty, the
    /// rest of `range` clean.
    pub(crate) fn cancel(&mut self, range: PfnRange, dirty: &[PfnRange]) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        self.check_allocated(start, end, true)?;
        self.release(start, end);
        self.split_after(end);
        let mut p = start;
        for r in dirty {
            let (ds, de) = (r.start().0.max(start), r.end().0.min(end));
            if ds > p {
                self.clean(p, ds);
            }
            p = p.max(de);
        }
        if p < end {
            self.clean(p, end);
        }
        Ok(())
    }

    pub(crate) fn quarantine(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (mut start, mut end) = (range.start().0, range.end().0);
        self.check_allocated(start, end, false)?;
        let n = end - start;
        if let Some((true, false)) = self.page_at(start) {
            self.set_start_at(start);
        }
        self.split_after(end);
        self.allocated_pages -= n;
        self.quarantined_pages += n;
        if let Some((&ls, &le)) = self.quarantined.range(..start).next_back()
            && le == start
        {
            start = ls;
        }
        if let Some(re) = self.quarantined.remove(&end) {
            end = re;
        }
        self.quarantined.insert(start, end);
        Ok(())
    }
}
