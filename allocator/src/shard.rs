//! One shard's state and the operations on it. Everything here runs under the shard's lock;
//! every operation validates first and changes nothing observable when it fails.

use std::collections::BTreeMap;

use pfnstore_core::{Pfn, PfnRange};

use crate::bits;
use crate::chunk::{Bad, Chunk, Dims, Mark, Split};
use crate::shape::{Shape, align_down, align_up};
use crate::stats::Usage;
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

impl From<AllocError> for Fault {
    fn from(e: AllocError) -> Fault {
        Fault::Rejected(e)
    }
}

/// Builds a range from bounds that an operation derived from valid ranges.
fn pfn_range(start: u64, end: u64) -> PfnRange {
    PfnRange::new(Pfn(start), Pfn(end))
        .expect("start < end <= PFN_LIMIT: both lie in a managed chunk")
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

    // ----- page questions -----

    fn quarantined_at(&self, pfn: u64) -> bool {
        !self.quarantined.is_empty()
            && self
                .quarantined
                .range(..=pfn)
                .next_back()
                .is_some_and(|(_, &e)| e > pfn)
    }

    /// Whether `pfn` (in an owned chunk) is allocated, and whether it starts an allocation.
    fn page_at(&self, pfn: u64) -> Option<(bool, bool)> {
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
    fn check_free(&self, start: u64, end: u64) -> Result<(), Fault> {
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
    fn check_allocated(&self, start: u64, end: u64, freeing: bool) -> Result<(), Fault> {
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
    fn dirty_piece(&self, slot: usize, p: u64, hi: u64, out: &mut DirtyCollector) {
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
    fn take(&mut self, start: u64, end: u64) -> DirtyRanges {
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
                let mut q = p;
                while q < hi {
                    let mid = (q - base) >> d.m_shift;
                    let mb = base + (mid << d.m_shift);
                    let mhi = hi.min(mb + d.m);
                    if q == mb && mhi == mb + d.m && !t.is(Mark::Mixed, mid) {
                        t.put(Mark::Free, mid, false);
                        t.put(Mark::Clean, mid, false);
                        t.put(Mark::Alloc, mid, true);
                        t.put(Mark::Start, mid, q == start);
                    } else {
                        t.ensure_mixed(&d, mid);
                        t.take_pages(&d, mid, q - mb, mhi - mb, q == start);
                        if cursor
                            != Some(Cursor {
                                slot,
                                mid,
                                base: mb,
                            })
                        {
                            t.normalize(&d, mid);
                        }
                    }
                    q = mhi;
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
        self.allocated_pages += end - start;
        dirty.finish()
    }

    /// Marks allocated `[start, end)` free and dirty.
    fn release(&mut self, start: u64, end: u64) {
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
                let mut q = p;
                while q < hi {
                    let mid = (q - base) >> d.m_shift;
                    let mb = base + (mid << d.m_shift);
                    let mhi = hi.min(mb + d.m);
                    if q == mb && mhi == mb + d.m && t.is(Mark::Alloc, mid) {
                        t.put(Mark::Alloc, mid, false);
                        t.put(Mark::Start, mid, false);
                        t.put(Mark::Free, mid, true);
                        t.put(Mark::Clean, mid, false);
                    } else {
                        t.ensure_mixed(&d, mid);
                        t.release_pages(&d, mid, q - mb, mhi - mb);
                        if cursor
                            != Some(Cursor {
                                slot,
                                mid,
                                base: mb,
                            })
                        {
                            t.normalize(&d, mid);
                        }
                    }
                    q = mhi;
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
        self.allocated_pages -= end - start;
    }

    /// Page `pfn` (allocated, owned) starts an allocation from now on.
    fn set_start_at(&mut self, pfn: u64) {
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
    fn split_after(&mut self, end: u64) {
        if let Some((true, false)) = self.page_at(end) {
            self.set_start_at(end);
        }
    }

    // ----- placement -----

    /// The start of a placement for the request, if the shard has room. Moves the cursor
    /// when a small request settles in another mid block.
    pub(crate) fn place(&mut self, pages: u64, align: u64, clean_only: bool) -> Option<u64> {
        let (m, c) = (self.d.m, self.d.c);
        if clean_only {
            if (pages >= m || align >= m)
                && let Some(p) = self.scan_fit(pages, align.max(m).min(c), true)
            {
                return Some(p);
            }
            return self.scan_fit(pages, align, true);
        }
        if pages < m && align < m {
            return self.place_small(pages, align);
        }
        self.retire_cursor_if_free();
        if pages <= c && (align == c || pages == c) {
            if let Some(slot) = bits::first_set(&self.all_free) {
                return Some(self.slots[slot as usize].base);
            }
            if pages == c && align == c {
                return None;
            }
        }
        if pages <= m && align <= m {
            // A whole free mid block holds it, at its start.
            if let Some((slot, mid)) = self.whole_free_mid() {
                return Some(self.slots[slot].base + mid * m);
            }
            if pages == m && align == m {
                return None;
            }
        }
        if align < m
            && let Some(p) = self.scan_fit(pages, m, false)
        {
            return Some(p);
        }
        self.scan_fit(pages, align, false)
    }

    /// A wholly free mid block, in a partly used chunk if there is one.
    fn whole_free_mid(&self) -> Option<(usize, u64)> {
        let slot = bits::first_set(&self.mid_free).or_else(|| bits::first_set(&self.all_free))?;
        let slot = slot as usize;
        let mid = match &self.slots[slot].chunk {
            Chunk::Split(t) => t.first(Mark::Free).expect("a chunk in the free sets"),
            _ => 0,
        };
        Some((slot, mid))
    }

    fn place_small(&mut self, pages: u64, align: u64) -> Option<u64> {
        let d = self.d;
        let mut packing_skipped = false;
        if let Some(c) = self.cursor
            && let Chunk::Split(t) = &self.slots[c.slot].chunk
        {
            let a = t.a(&d, c.mid);
            packing_skipped = bits::all_clear(a, d.m) && self.partial.iter().any(|&w| w != 0);
            if !packing_skipped && let Some(off) = bits::find_clear_run(a, d.m, pages, align) {
                return Some(c.base + off);
            }
        }
        // Another partly used mid block.
        let mut found = None;
        'outer: for (i, &word) in self.partial.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let slot = i * 64 + w.trailing_zeros() as usize;
                if let Chunk::Split(t) = &self.slots[slot].chunk
                    && let Some(hit) = t.find(Mark::Partial, |mid| {
                        bits::find_clear_run(t.a(&d, mid), d.m, pages, align).map(|off| (mid, off))
                    })
                {
                    found = Some((slot, hit));
                    break 'outer;
                }
                w &= w - 1;
            }
        }
        if let Some((slot, (mid, off))) = found {
            self.set_cursor(slot, mid);
            return Some(self.slots[slot].base + mid * d.m + off);
        }
        if let Some((slot, mid)) = self.whole_free_mid() {
            self.set_cursor(slot, mid);
            return Some(self.slots[slot].base + mid * d.m);
        }
        if packing_skipped
            && let Some(c) = self.cursor
            && let Chunk::Split(t) = &self.slots[c.slot].chunk
            && let Some(off) = bits::find_clear_run(t.a(&d, c.mid), d.m, pages, align)
        {
            // The wholly free cursor waited for partly used blocks, and none could serve.
            return Some(c.base + off);
        }
        if pages == 1 && align == 1 {
            // Every free page is in one of the places searched above.
            return None;
        }
        // Only a fit across mid blocks is left.
        self.scan_fit(pages, align, false)
    }

    /// The first fit in address order, by a walk over the shard's runs (free or clean).
    fn scan_fit(&self, pages: u64, align: u64, clean_only: bool) -> Option<u64> {
        let mut found = None;
        self.runs(clean_only, |s, e| {
            let p = align_up(s, align);
            if p + pages <= e {
                found = Some(p);
                return true;
            }
            false
        });
        found
    }

    /// Calls `f(start, end)` for the maximal free (or clean free) runs in address order, until
    /// it returns `true`.
    fn runs(&self, clean_only: bool, mut f: impl FnMut(u64, u64) -> bool) {
        let d = self.d;
        let mut open: Option<(u64, u64)> = None;
        let mut stop = false;
        let mut piece = |s: u64, e: u64, stop: &mut bool| {
            if *stop {
                return;
            }
            match &mut open {
                Some((_, oe)) if *oe == s => *oe = e,
                o => {
                    if let Some((os, oe)) = o.take() {
                        *stop = f(os, oe);
                    }
                    *o = Some((s, e));
                }
            }
        };
        for &(base, slot) in &self.by_base {
            match &self.slots[slot].chunk {
                Chunk::Free { clean } => {
                    if !clean_only || *clean {
                        piece(base, base + d.c, &mut stop);
                    }
                }
                Chunk::Allocated { .. } => {}
                Chunk::Split(t) => {
                    for mid in 0..d.mids {
                        let mb = base + mid * d.m;
                        if !t.is(Mark::Mixed, mid) {
                            if t.is(Mark::Free, mid) && (!clean_only || t.is(Mark::Clean, mid)) {
                                piece(mb, mb + d.m, &mut stop);
                            }
                            continue;
                        }
                        let a = t.a(&d, mid);
                        let s = t.s(&d, mid);
                        let clean_all = t.is(Mark::Clean, mid);
                        bits::runs(
                            d.m,
                            |i| match (clean_only, s) {
                                (false, _) => !a[i],
                                (true, Some(s)) => !a[i] & s[i],
                                (true, None) if clean_all => !a[i],
                                (true, None) => 0,
                            },
                            |lo, hi| piece(mb + lo, mb + hi, &mut stop),
                        );
                    }
                }
            }
            if stop {
                return;
            }
        }
        if let Some((s, e)) = open
            && !stop
        {
            f(s, e);
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
        if pages == 1
            && align == 1
            && !clean_only
            && let Some(done) = self.alloc_one_from_cursor()
        {
            return Some(done);
        }
        if !clean_only
            && pages == align
            && (pages == self.d.m || pages == self.d.c)
            && let Some(done) = self.alloc_whole_block(pages)
        {
            return Some(done);
        }
        let start = self.place(pages, align, clean_only)?;
        let dirty = self.take(start, start + pages);
        Some((pfn_range(start, start + pages), dirty))
    }

    /// The hot path of a 2 MiB or 1 GiB request: a whole free block without page bitmaps.
    /// `None` sends the request down the general path (which also finds out whether there is
    /// room at all).
    #[inline]
    fn alloc_whole_block(&mut self, pages: u64) -> Option<(PfnRange, DirtyRanges)> {
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
        let range = pfn_range(start, start + pages);
        Some((
            range,
            if clean {
                DirtyRanges::new()
            } else {
                range.into()
            },
        ))
    }

    /// The hot path of a 4 KiB request: the first free page of the cursor block.
    #[inline]
    fn alloc_one_from_cursor(&mut self) -> Option<(PfnRange, DirtyRanges)> {
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
        let pfn = c.base + off;
        let range = pfn_range(pfn, pfn + 1);
        Some((
            range,
            if clean {
                DirtyRanges::new()
            } else {
                range.into()
            },
        ))
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
                    let mut q = p;
                    while q < hi {
                        let mid = (q - base) >> d.m_shift;
                        let mb = base + (mid << d.m_shift);
                        let mhi = hi.min(mb + d.m);
                        let whole_mid = q == mb && mhi == mb + d.m;
                        if !t.is(Mark::Mixed, mid) && (whole_mid || t.is(Mark::Clean, mid)) {
                            t.put(Mark::Clean, mid, true);
                        } else {
                            t.ensure_mixed(&d, mid);
                            t.clean_pages(&d, mid, q - mb, mhi - mb);
                            if cursor
                                != Some(Cursor {
                                    slot,
                                    mid,
                                    base: mb,
                                })
                            {
                                t.normalize(&d, mid);
                            }
                        }
                        q = mhi;
                    }
                }
            }
            self.chunk_changed(slot);
            p = hi;
        }
    }

    pub(crate) fn free(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        if end - start == 1 && self.free_one(start) {
            return Ok(());
        }
        if self.free_whole_block(start, end) {
            return Ok(());
        }
        self.check_allocated(start, end, true)?;
        self.release(start, end);
        self.split_after(end);
        Ok(())
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

    // ----- figures -----

    /// Allocation starts in `[start, end)` (allocated pages only).
    fn starts_in(&self, start: u64, end: u64) -> u64 {
        let d = self.d;
        let mut n = 0;
        let mut p = start;
        while p < end {
            let Some(slot) = self.slot_of(p) else {
                p = align_down(p, d.c) + d.c;
                continue;
            };
            let base = self.slots[slot].base;
            let hi = end.min(base + d.c);
            match &self.slots[slot].chunk {
                Chunk::Free { .. } => {}
                Chunk::Allocated { start: s } => n += u64::from(*s && p == base),
                Chunk::Split(t) => {
                    let mut q = p;
                    while q < hi {
                        let mid = (q - base) >> d.m_shift;
                        let mb = base + (mid << d.m_shift);
                        let (lo, mhi) = (q - mb, hi.min(mb + d.m) - mb);
                        if t.is(Mark::Alloc, mid) {
                            n += u64::from(lo == 0 && t.is(Mark::Start, mid));
                        } else if t.is(Mark::Mixed, mid) {
                            let a = t.a(&d, mid);
                            n += match t.s(&d, mid) {
                                None => bits::count_in(a, lo, mhi),
                                Some(s) => (lo..mhi)
                                    .filter(|&i| bits::test(a, i) && bits::test(s, i))
                                    .count() as u64,
                            };
                        }
                        q = mb + mhi;
                    }
                }
            }
            p = hi;
        }
        n
    }

    pub(crate) fn usage(&self) -> Usage {
        let (m, c) = (self.d.m, self.d.c);
        let mut u = Usage {
            chunks: self.slots.len() as u64,
            total_pages: self.slots.len() as u64 * c,
            allocated_pages: self.allocated_pages,
            quarantined_pages: self.quarantined_pages,
            quarantined_extents: self.quarantined.len() as u64,
            ..Usage::default()
        };
        self.runs(false, |s, e| {
            u.free_pages += e - s;
            u.free_extents += 1;
            u.largest_free_extent = u.largest_free_extent.max(e - s);
            u.largest_free_mid_aligned = u
                .largest_free_mid_aligned
                .max(e.saturating_sub(align_up(s, m)));
            u.largest_free_chunk_aligned = u
                .largest_free_chunk_aligned
                .max(e.saturating_sub(align_up(s, c)));
            false
        });
        let mut clean = 0;
        self.runs(true, |s, e| {
            clean += e - s;
            false
        });
        u.dirty_pages = u.free_pages - clean;
        let cursor_free = self
            .cursor
            .is_some_and(|cur| match &self.slots[cur.slot].chunk {
                Chunk::Split(t) => bits::all_clear(t.a(&self.d, cur.mid), m),
                _ => false,
            });
        for (slot, s) in self.slots.iter().enumerate() {
            let cursor_mid =
                usize::from(cursor_free && self.cursor.is_some_and(|c| c.slot == slot));
            match &s.chunk {
                Chunk::Free { .. } => {
                    u.free_mid_blocks += self.d.mids;
                    u.free_chunks += 1;
                }
                Chunk::Allocated { .. } => {}
                Chunk::Split(t) => {
                    let free = t.free_mids + cursor_mid as u64;
                    u.free_mid_blocks += free;
                    u.free_chunks += u64::from(free == self.d.mids);
                }
            }
        }
        let mut starts = 0;
        for &(base, _) in &self.by_base {
            starts += self.starts_in(base, base + c);
        }
        let quarantined_starts: u64 = self
            .quarantined
            .iter()
            .map(|(&s, &e)| self.starts_in(s, e))
            .sum();
        u.allocated_extents = starts - quarantined_starts;
        u
    }

    /// The first PFN of every chunk owned (for the allocator's cross-checks).
    pub(crate) fn chunk_bases(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_base.iter().map(|e| e.0)
    }

    /// Verifies the chunk tables, the chunk sets, the cursor, the quarantined runs and the
    /// page counters.
    pub(crate) fn check(&self) -> Result<(), String> {
        let d = self.d;
        if self.by_base.len() != self.slots.len()
            || self.by_base.windows(2).any(|w| w[0].0 >= w[1].0)
            || self
                .by_base
                .iter()
                .any(|&(base, slot)| self.slots.get(slot).is_none_or(|s| s.base != base))
        {
            return Err("the chunk index disagrees with the chunks".into());
        }
        for (slot, s) in self.slots.iter().enumerate() {
            let mids = d.mids;
            let want = match &s.chunk {
                Chunk::Free { .. } => (true, false, false),
                Chunk::Allocated { .. } => (false, false, false),
                Chunk::Split(t) => {
                    let cursor = self.cursor.filter(|c| c.slot == slot).map(|c| c.mid);
                    t.check(&d, cursor)
                        .map_err(|e| format!("chunk {:#x}: {e}", s.base))?;
                    (
                        t.free_mids == mids,
                        t.free_mids > 0 && t.free_mids < mids,
                        t.partial_mids > 0,
                    )
                }
            };
            let has = |w: &Vec<u64>| {
                w.get(slot / 64)
                    .is_some_and(|x| x & (1 << (slot % 64)) != 0)
            };
            if (has(&self.all_free), has(&self.mid_free), has(&self.partial)) != want {
                return Err(format!("chunk {:#x}: chunk sets are stale", s.base));
            }
        }
        for sets in [&self.all_free, &self.mid_free, &self.partial] {
            if bits::first_set_in(sets, self.slots.len() as u64, sets.len() as u64 * 64).is_some() {
                return Err("a chunk set names a slot beyond the chunks".into());
            }
        }
        if let Some(c) = self.cursor {
            match self.slots.get(c.slot).map(|s| &s.chunk) {
                Some(Chunk::Split(t))
                    if t.is(Mark::Mixed, c.mid)
                        && c.base == self.slots[c.slot].base + c.mid * d.m => {}
                _ => return Err(format!("cursor {c:?} is not a mixed block")),
            }
        }
        let mut prev_end = None;
        for (&s, &e) in &self.quarantined {
            if s >= e || prev_end == Some(s) {
                return Err(format!(
                    "quarantined run {s:#x}..{e:#x} empty or not coalesced"
                ));
            }
            prev_end = Some(e);
            if !matches!(self.page_at(s), Some((true, true))) {
                return Err(format!(
                    "quarantined run {s:#x} does not start a run of its own"
                ));
            }
            for p in [s, e - 1] {
                if !matches!(self.page_at(p), Some((true, _))) {
                    return Err(format!("quarantined page {p:#x} is not held"));
                }
            }
        }
        let mut free = 0;
        self.runs(false, |s, e| {
            free += e - s;
            false
        });
        let total = self.slots.len() as u64 * d.c;
        if free + self.allocated_pages + self.quarantined_pages != total {
            return Err(format!(
                "free {free} + allocated {} + quarantined {} pages != {total} in the chunks",
                self.allocated_pages, self.quarantined_pages
            ));
        }
        Ok(())
    }
}
