//! Where a request goes: the cursor, partly used blocks, whole free blocks and chunks, and
//! the walk in address order for everything else (see the crate documentation).

use super::ShardState;
use crate::bits;
use crate::chunk::{Chunk, Mark};
use crate::shape::align_up;

impl ShardState {
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
    pub(super) fn whole_free_mid(&self) -> Option<(usize, u64)> {
        let slot = bits::first_set(&self.mid_free).or_else(|| bits::first_set(&self.all_free))?;
        let slot = slot as usize;
        let mid = match &self.slots[slot].chunk {
            Chunk::Split(t) => t.first(Mark::Free).expect("a chunk in the free sets"),
            _ => 0,
        };
        Some((slot, mid))
    }

    pub(super) fn place_small(&mut self, pages: u64, align: u64) -> Option<u64> {
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
    pub(super) fn scan_fit(&self, pages: u64, align: u64, clean_only: bool) -> Option<u64> {
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
    pub(super) fn runs(&self, clean_only: bool, mut f: impl FnMut(u64, u64) -> bool) {
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
}
