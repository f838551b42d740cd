//! The shard's figures ([`Usage`]) and its invariants, from one walk over its marks and bitmaps.

use super::ShardState;
use crate::bits;
use crate::chunk::{Chunk, Mark};
use crate::shape::{align_down, align_up};
use crate::stats::Usage;

impl ShardState {
    /// Allocation starts in `[start, end)` (allocated pages only).
    pub(super) fn starts_in(&self, start: u64, end: u64) -> u64 {
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
