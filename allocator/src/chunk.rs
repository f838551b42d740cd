//! One chunk's pages: a whole-chunk state, or a table of its mid blocks, each whole (free or
//! allocated, no per-page data) or *mixed* (a bitmap of allocated pages, and when needed a
//! second bitmap of allocation starts and clean free pages).
//!
//! Page states, and how a mixed mid block stores them:
//!
//! | page | `A` (allocated) | `S` |
//! | --- | --- | --- |
//! | free, dirty | 0 | 0 |
//! | free, clean (scrubbed or never used) | 0 | 1 |
//! | allocated, first page of an allocation | 1 | 1 |
//! | allocated, any later page | 1 | 0 |
//!
//! `S` is kept only when it says more than "every allocated page is a one-page allocation and
//! every free page is clean, or every free page is dirty" (the mid's `clean` mark says which):
//! 4 KiB allocations and frees in any order never need it, so such a block costs 64 bytes.
//! Quarantined pages are allocated pages here (the shard keeps which); a quarantined run
//! always begins with a start, so a range that runs into one is seen crossing a start.

use crate::bits;

/// The geometry in the units the chunk table works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    /// Pages per mid block.
    pub m: u64,
    /// Pages per chunk.
    pub c: u64,
    /// Mid blocks per chunk.
    pub mids: u64,
    /// log2 of `m`.
    pub m_shift: u32,
    /// log2 of `c`.
    pub c_shift: u32,
    /// Words of one mid block's page bitmap.
    pub w: usize,
    /// Words of a bitmap with one bit per mid block of a chunk.
    pub mw: usize,
}

/// One mid block that a range touches: its index in the chunk, its first page, and the part
/// of it inside the range (`lo..hi`, absolute pages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MidPart {
    pub mid: u64,
    pub first: u64,
    pub lo: u64,
    pub hi: u64,
}

impl MidPart {
    /// Whether the part is the whole block.
    pub(crate) fn whole(&self, d: &Dims) -> bool {
        self.lo == self.first && self.hi == self.first + d.m
    }
}

impl Dims {
    /// The mid blocks that `lo..hi` touches, inside the chunk that starts at page `base`.
    pub(crate) fn mids_in(self, base: u64, lo: u64, hi: u64) -> impl Iterator<Item = MidPart> {
        let mut q = lo;
        std::iter::from_fn(move || {
            if q >= hi {
                return None;
            }
            let mid = (q - base) >> self.m_shift;
            let first = base + (mid << self.m_shift);
            let part = MidPart {
                mid,
                first,
                lo: q,
                hi: hi.min(first + self.m),
            };
            q = part.hi;
            Some(part)
        })
    }

    pub(crate) fn new(m: u64, c: u64) -> Dims {
        Dims {
            m,
            c,
            mids: c / m,
            m_shift: m.trailing_zeros(),
            c_shift: c.trailing_zeros(),
            w: m.div_ceil(64) as usize,
            mw: (c / m).div_ceil(64) as usize,
        }
    }
}

/// A chunk's state.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// Every page free, all clean or all dirty.
    Free { clean: bool },
    /// Every page allocated, as (part of) one allocation; `start`: it starts at the chunk.
    Allocated { start: bool },
    /// Anything else, per mid block.
    Split(Box<Split>),
}

/// Why a page fails the "allocated, in one allocation" check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bad {
    Free,
    /// The page starts another allocation (or a quarantined run).
    Start,
}

/// The mid blocks of a chunk: per mid block a bit in each [`Mark`], interleaved so that the
/// seven marks of 64 blocks share one 56-byte stretch (a free touches one cache line of marks,
/// not seven: the random-order frees of a full 16 GiB miss the cache on every step otherwise).
///
/// The marks: `Free` (every page free: whole, or mixed with free pages of both kinds),
/// `Clean` (whole free: clean; mixed without `S`: its free pages are clean), `Alloc` (wholly
/// allocated as part of one allocation, not mixed), `Start` (of `Alloc`: the allocation starts
/// at the block's first page), `Mixed` (has page bitmaps), `Partial` (mixed, some pages free
/// and some allocated, not the shard's cursor), `HasS` (mixed, with an `S` bitmap).
#[derive(Debug)]
pub(crate) struct Split {
    marks: Box<[u64]>,
    pub free_mids: u64,
    pub partial_mids: u64,
    pub mixed_mids: u64,
    /// Page bitmaps `A` per group of 64 mid blocks (block `i` at `(i % 64) * w`), allocated
    /// while some block of the group is mixed: a block's bitmap is then one load from the
    /// table, with no index to follow (a random free costs one cache miss in the bitmaps).
    a_groups: Box<[Option<Box<[u64]>>]>,
    /// The same for `S`, while some block of the group has one.
    s_groups: Box<[Option<Box<[u64]>>]>,
}

/// Which mark of a [`Split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    Free = 0,
    Clean = 1,
    Alloc = 2,
    Start = 3,
    Mixed = 4,
    Partial = 5,
    HasS = 6,
}

const MARKS: usize = 7;

/// The word of `marks` that holds `mark` of mid block `mid`.
#[inline(always)]
fn mark_word(mark: Mark, mid: u64) -> usize {
    (mid / 64) as usize * MARKS + mark as usize
}

impl Split {
    /// A table with every mid block whole free (`clean` or not) or wholly allocated.
    pub(crate) fn new(d: &Dims, free: bool, clean_or_start: bool) -> Split {
        let mut t = Split {
            marks: vec![0u64; d.mw * MARKS].into_boxed_slice(),
            free_mids: 0,
            partial_mids: 0,
            mixed_mids: 0,
            a_groups: (0..d.mw).map(|_| None).collect(),
            s_groups: (0..d.mw).map(|_| None).collect(),
        };
        for g in 0..d.mw {
            let valid = bits::mask(0, (d.mids - g as u64 * 64).min(64) as u32);
            let on =
                |mark: Mark, yes: bool| (g * MARKS + mark as usize, if yes { valid } else { 0 });
            for (i, w) in [
                on(Mark::Free, free),
                on(Mark::Clean, free && clean_or_start),
                on(Mark::Alloc, !free),
            ] {
                t.marks[i] = w;
            }
        }
        t.free_mids = if free { d.mids } else { 0 };
        if !free && clean_or_start {
            t.put(Mark::Start, 0, true);
        }
        t
    }

    #[inline(always)]
    pub(crate) fn is(&self, mark: Mark, mid: u64) -> bool {
        self.marks[mark_word(mark, mid)] & (1 << (mid % 64)) != 0
    }

    /// Calls `f` for every mid block with `mark`, in order, until it returns `Some`.
    pub(crate) fn find<T>(&self, mark: Mark, mut f: impl FnMut(u64) -> Option<T>) -> Option<T> {
        for g in 0..self.marks.len() / MARKS {
            let mut w = self.marks[g * MARKS + mark as usize];
            while w != 0 {
                let mid = g as u64 * 64 + u64::from(w.trailing_zeros());
                if let Some(t) = f(mid) {
                    return Some(t);
                }
                w &= w - 1;
            }
        }
        None
    }

    /// The first mid block with `mark`.
    #[inline]
    pub(crate) fn first(&self, mark: Mark) -> Option<u64> {
        self.find(mark, Some)
    }

    /// Sets or clears a mark, keeping the counters.
    #[inline(always)]
    pub(crate) fn put(&mut self, mark: Mark, mid: u64, on: bool) {
        let word = &mut self.marks[mark_word(mark, mid)];
        let bit = 1u64 << (mid % 64);
        if (*word & bit != 0) == on {
            return;
        }
        *word ^= bit;
        let counter = match mark {
            Mark::Free => &mut self.free_mids,
            Mark::Mixed => &mut self.mixed_mids,
            Mark::Partial => &mut self.partial_mids,
            _ => return,
        };
        if on {
            *counter += 1;
        } else {
            *counter -= 1;
        }
    }

    // ----- page bitmaps -----

    /// Bitmap `which` (0: `A`, 1: `S`) of block `mid`, whose group must be allocated.
    #[inline(always)]
    fn bitmap(&self, d: &Dims, which: usize, mid: u64) -> &[u64] {
        let groups = if which == 0 {
            &self.a_groups
        } else {
            &self.s_groups
        };
        let group = groups[(mid / 64) as usize]
            .as_deref()
            .expect("a mixed block's group is allocated");
        let at = (mid % 64) as usize * d.w;
        &group[at..at + d.w]
    }

    #[inline(always)]
    fn bitmap_mut(&mut self, d: &Dims, which: usize, mid: u64) -> &mut [u64] {
        let groups = if which == 0 {
            &mut self.a_groups
        } else {
            &mut self.s_groups
        };
        let group = groups[(mid / 64) as usize]
            .as_deref_mut()
            .expect("a mixed block's group is allocated");
        let at = (mid % 64) as usize * d.w;
        &mut group[at..at + d.w]
    }

    /// Gives block `mid` bitmap `which` with the contents `fill`.
    fn new_bitmap(&mut self, d: &Dims, which: usize, mid: u64, fill: &[u64]) {
        let groups = if which == 0 {
            &mut self.a_groups
        } else {
            &mut self.s_groups
        };
        let group = &mut groups[(mid / 64) as usize];
        if group.is_none() {
            *group = Some(vec![0u64; 64 * d.w].into_boxed_slice());
        }
        self.bitmap_mut(d, which, mid).copy_from_slice(fill);
    }

    /// Clears block `mid`'s bitmap `which` and frees its group when no block of the group
    /// keeps one (`mark` says which blocks do, and must already be cleared for `mid`).
    fn drop_bitmap(&mut self, d: &Dims, which: usize, mid: u64, mark: Mark) {
        self.bitmap_mut(d, which, mid).fill(0);
        let g = (mid / 64) as usize;
        if self.marks[g * MARKS + mark as usize] == 0 {
            let groups = if which == 0 {
                &mut self.a_groups
            } else {
                &mut self.s_groups
            };
            groups[g] = None;
        }
    }

    #[inline]
    pub(crate) fn a(&self, d: &Dims, mid: u64) -> &[u64] {
        self.bitmap(d, 0, mid)
    }

    #[inline]
    pub(crate) fn s(&self, d: &Dims, mid: u64) -> Option<&[u64]> {
        self.is(Mark::HasS, mid).then(|| self.bitmap(d, 1, mid))
    }

    #[inline]
    pub(crate) fn has_s(&self, mid: u64) -> bool {
        self.is(Mark::HasS, mid)
    }

    #[inline]
    pub(crate) fn a_mut(&mut self, d: &Dims, mid: u64) -> &mut [u64] {
        self.bitmap_mut(d, 0, mid)
    }

    /// Both bitmaps of a mixed block that has `S`.
    fn a_s_mut(&mut self, d: &Dims, mid: u64) -> (&mut [u64], &mut [u64]) {
        let g = (mid / 64) as usize;
        let at = (mid % 64) as usize * d.w;
        let a = self.a_groups[g].as_deref_mut().expect("mixed");
        let s = self.s_groups[g].as_deref_mut().expect("has S");
        (&mut a[at..at + d.w], &mut s[at..at + d.w])
    }

    /// Gives a mixed block its `S` bitmap, spelling out what the singles form implied.
    fn materialize_s(&mut self, d: &Dims, mid: u64) {
        if self.has_s(mid) {
            return;
        }
        let mut s: Vec<u64> = self.a(d, mid).to_vec();
        if self.is(Mark::Clean, mid) {
            s.iter_mut().for_each(|w| *w = u64::MAX);
            if d.m < 64 {
                s[0] = bits::mask(0, d.m as u32);
            }
        }
        self.put(Mark::Clean, mid, false);
        self.new_bitmap(d, 1, mid, &s);
        self.put(Mark::HasS, mid, true);
    }

    /// Makes a whole block mixed (per-page bitmaps) with the same page states.
    pub(crate) fn ensure_mixed(&mut self, d: &Dims, mid: u64) {
        if self.is(Mark::Mixed, mid) {
            return;
        }
        let mut a = vec![0u64; d.w];
        if self.is(Mark::Free, mid) {
            // The block's clean mark stays: it is now "free pages are clean".
            self.new_bitmap(d, 0, mid, &a);
            self.put(Mark::Free, mid, false);
        } else {
            debug_assert!(self.is(Mark::Alloc, mid));
            bits::set_range(&mut a, 0, d.m);
            self.new_bitmap(d, 0, mid, &a);
            let mut s = vec![0u64; d.w];
            if self.is(Mark::Start, mid) {
                bits::set(&mut s, 0);
            }
            self.new_bitmap(d, 1, mid, &s);
            self.put(Mark::HasS, mid, true);
            self.put(Mark::Alloc, mid, false);
            self.put(Mark::Start, mid, false);
            self.put(Mark::Clean, mid, false);
        }
        self.put(Mark::Mixed, mid, true);
    }

    /// Recomputes the marks of a mixed block from its bitmaps, drops what they no longer need
    /// and makes it whole again when its pages allow. Not for the shard's cursor.
    pub(crate) fn normalize(&mut self, d: &Dims, mid: u64) {
        if !self.is(Mark::Mixed, mid) {
            return;
        }
        let a_zero = bits::all_clear(self.a(d, mid), d.m);
        let a_ones = bits::all_set(self.a(d, mid), d.m);
        if let Some(s) = self.s(d, mid) {
            // Does `S` say more than the singles form?
            let a = self.a(d, mid);
            let mut singles = true;
            let (mut free_clean, mut free_dirty) = (false, false);
            for i in 0..d.w {
                let valid = if d.m < 64 {
                    bits::mask(0, d.m as u32)
                } else {
                    u64::MAX
                };
                singles &= a[i] & !s[i] == 0;
                free_clean |= !a[i] & s[i] & valid != 0;
                free_dirty |= !a[i] & !s[i] & valid != 0;
            }
            if a_ones && !singles {
                // One allocation covers the block (started here or before): whole again.
                let only_first = s
                    .iter()
                    .enumerate()
                    .all(|(i, &w)| if i == 0 { w & !1 == 0 } else { w == 0 });
                if only_first {
                    let start = s[0] & 1 == 1;
                    self.demix(d, mid);
                    self.put(Mark::Free, mid, false);
                    self.put(Mark::Alloc, mid, true);
                    self.put(Mark::Start, mid, start);
                    self.put(Mark::Partial, mid, false);
                    return;
                }
            }
            if singles && !(free_clean && free_dirty) {
                self.put(Mark::HasS, mid, false);
                self.drop_bitmap(d, 1, mid, Mark::HasS);
                self.put(Mark::Clean, mid, free_clean);
            }
        }
        if a_zero && !self.has_s(mid) {
            let clean = self.is(Mark::Clean, mid);
            self.demix(d, mid);
            self.put(Mark::Free, mid, true);
            self.put(Mark::Clean, mid, clean);
            self.put(Mark::Partial, mid, false);
            return;
        }
        self.put(Mark::Free, mid, a_zero);
        self.put(Mark::Partial, mid, !a_zero && !a_ones);
    }

    /// Drops a block's bitmaps (the caller sets its whole marks).
    fn demix(&mut self, d: &Dims, mid: u64) {
        if self.is(Mark::HasS, mid) {
            self.put(Mark::HasS, mid, false);
            self.drop_bitmap(d, 1, mid, Mark::HasS);
        }
        self.put(Mark::Mixed, mid, false);
        self.drop_bitmap(d, 0, mid, Mark::Mixed);
        self.put(Mark::Clean, mid, false);
    }

    // ----- page queries (offsets within the block) -----

    /// The first page of `[lo, hi)` that is not free.
    pub(crate) fn first_not_free(&self, d: &Dims, mid: u64, lo: u64, hi: u64) -> Option<u64> {
        if self.is(Mark::Mixed, mid) {
            bits::first_set_in(self.a(d, mid), lo, hi)
        } else if self.is(Mark::Free, mid) {
            None
        } else {
            Some(lo)
        }
    }

    /// Whether page `off` is allocated, and whether it starts an allocation.
    pub(crate) fn page(&self, d: &Dims, mid: u64, off: u64) -> (bool, bool) {
        if self.is(Mark::Mixed, mid) {
            let allocated = bits::test(self.a(d, mid), off);
            let start = allocated && self.s(d, mid).is_none_or(|s| bits::test(s, off));
            (allocated, start)
        } else if self.is(Mark::Alloc, mid) {
            (true, off == 0 && self.is(Mark::Start, mid))
        } else {
            (false, false)
        }
    }

    /// The first page of `[lo, hi)` that is free or starts an allocation (page `lo` may start
    /// one when `start_ok`).
    pub(crate) fn check_allocated(
        &self,
        d: &Dims,
        mid: u64,
        lo: u64,
        hi: u64,
        start_ok: bool,
    ) -> Result<(), (u64, Bad)> {
        if !self.is(Mark::Mixed, mid) {
            if self.is(Mark::Alloc, mid) {
                if lo == 0 && !start_ok && self.is(Mark::Start, mid) {
                    return Err((0, Bad::Start));
                }
                return Ok(());
            }
            return Err((lo, Bad::Free));
        }
        let a = self.a(d, mid);
        let free = bits::first_clear_in(a, lo, hi);
        let from = lo + u64::from(start_ok);
        let start = if from >= hi {
            None
        } else {
            match self.s(d, mid) {
                None => bits::first_set_in(a, from, hi),
                Some(s) => first_set_in_both(a, s, from, hi),
            }
        };
        match (free, start) {
            (Some(f), Some(s)) if s < f => Err((s, Bad::Start)),
            (Some(f), _) => Err((f, Bad::Free)),
            (None, Some(s)) => Err((s, Bad::Start)),
            (None, None) => Ok(()),
        }
    }

    /// Calls `f(lo, hi, clean)` for the runs of clean and of dirty pages in `[lo, hi)`, all free.
    pub(crate) fn clean_runs(
        &self,
        d: &Dims,
        mid: u64,
        lo: u64,
        hi: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) {
        match self.s(d, mid).filter(|_| self.is(Mark::Mixed, mid)) {
            None => f(lo, hi, self.is(Mark::Clean, mid)),
            Some(s) => {
                let mut p = lo;
                while p < hi {
                    let clean = bits::test(s, p);
                    let next = if clean {
                        bits::first_clear_in(s, p, hi)
                    } else {
                        bits::first_set_in(s, p, hi)
                    }
                    .unwrap_or(hi);
                    f(p, next, clean);
                    p = next;
                }
            }
        }
    }

    // ----- page changes -----

    /// Free pages `[lo, hi)` of a mixed block become allocated: one allocation, starting at
    /// `lo` if `start` (else continuing one that began before).
    pub(crate) fn take_pages(&mut self, d: &Dims, mid: u64, lo: u64, hi: u64, start: bool) {
        debug_assert!(self.is(Mark::Mixed, mid));
        if hi - lo == 1 && start && !self.has_s(mid) {
            bits::set(self.a_mut(d, mid), lo);
            return;
        }
        self.materialize_s(d, mid);
        let (a, s) = self.a_s_mut(d, mid);
        bits::set_range(a, lo, hi);
        bits::clear_range(s, lo, hi);
        if start {
            bits::set(s, lo);
        }
    }

    /// Allocated pages `[lo, hi)` of a mixed block become free and dirty.
    pub(crate) fn release_pages(&mut self, d: &Dims, mid: u64, lo: u64, hi: u64) {
        debug_assert!(self.is(Mark::Mixed, mid));
        if hi - lo == 1 && !self.has_s(mid) && !self.is(Mark::Clean, mid) {
            // One page in singles form with dirty free pages: only its `A` bit changes.
            let word = &mut self.a_mut(d, mid)[(lo / 64) as usize];
            *word &= !(1 << (lo % 64));
            return;
        }
        if !self.has_s(mid) && self.is(Mark::Clean, mid) {
            self.materialize_s(d, mid);
        }
        if self.has_s(mid) {
            let (a, s) = self.a_s_mut(d, mid);
            bits::clear_range(a, lo, hi);
            bits::clear_range(s, lo, hi);
        } else {
            bits::clear_range(self.a_mut(d, mid), lo, hi);
        }
    }

    /// Page `off`, allocated, starts an allocation from now on.
    pub(crate) fn set_start(&mut self, d: &Dims, mid: u64, off: u64) {
        if !self.is(Mark::Mixed, mid) {
            if off == 0 {
                self.put(Mark::Start, mid, true);
                return;
            }
            self.ensure_mixed(d, mid);
        }
        if self.has_s(mid) {
            bits::set(self.bitmap_mut(d, 1, mid), off);
        }
    }

    /// Free pages `[lo, hi)` of a mixed block become clean.
    pub(crate) fn clean_pages(&mut self, d: &Dims, mid: u64, lo: u64, hi: u64) {
        if !self.has_s(mid) {
            if self.is(Mark::Clean, mid) {
                return;
            }
            self.materialize_s(d, mid);
        }
        let (_, s) = self.a_s_mut(d, mid);
        bits::set_range(s, lo, hi);
    }

    // ----- whole-chunk questions -----

    /// Checks the marks, counters and bitmaps against each other. `cursor`: the block that is
    /// the shard's cursor, if in this chunk (it is mixed and not normalized).
    pub(crate) fn check(&self, d: &Dims, cursor: Option<u64>) -> Result<(), String> {
        let count = |mark: Mark| (0..d.mids).filter(|&mid| self.is(mark, mid)).count() as u64;
        if count(Mark::Free) != self.free_mids
            || count(Mark::Partial) != self.partial_mids
            || count(Mark::Mixed) != self.mixed_mids
            || self.marks.iter().enumerate().any(|(i, &w)| {
                let first = (i / MARKS) as u64 * 64;
                first + 64 > d.mids && w & !bits::mask(0, (d.mids - first) as u32) != 0
            })
        {
            return Err("mid counters disagree with the marks".into());
        }
        for mid in 0..d.mids {
            let is = |m| self.is(m, mid);
            if is(Mark::Alloc) && (is(Mark::Free) || is(Mark::Mixed)) {
                return Err(format!("mid {mid} is allocated and free or mixed"));
            }
            if is(Mark::Start) && !is(Mark::Alloc) {
                return Err(format!("mid {mid} has a start but is not allocated"));
            }
            if !is(Mark::Alloc) && !is(Mark::Free) && !is(Mark::Mixed) {
                return Err(format!("mid {mid} has no state"));
            }
            if !is(Mark::Mixed) {
                if is(Mark::Partial) {
                    return Err(format!("whole mid {mid} marked partial"));
                }
                continue;
            }
            let a = self.a(d, mid);
            let a_zero = bits::all_clear(a, d.m);
            let a_ones = bits::all_set(a, d.m);
            if cursor == Some(mid) {
                if is(Mark::Free) || is(Mark::Partial) {
                    return Err(format!("cursor mid {mid} carries free or partial marks"));
                }
                continue;
            }
            if is(Mark::Free) != a_zero || is(Mark::Partial) != (!a_zero && !a_ones) {
                return Err(format!("mixed mid {mid}: marks disagree with its bitmap"));
            }
            if a_zero && !self.has_s(mid) {
                return Err(format!("mixed mid {mid} is wholly free and uniform"));
            }
            if let Some(s) = self.s(d, mid) {
                if is(Mark::Clean) {
                    return Err(format!("mid {mid} has S and a clean mark"));
                }
                let singles = (0..d.w).all(|i| a[i] & !s[i] == 0);
                let valid = |i: usize| {
                    if d.m < 64 && i == 0 {
                        bits::mask(0, d.m as u32)
                    } else {
                        u64::MAX
                    }
                };
                let clean = (0..d.w).any(|i| !a[i] & s[i] & valid(i) != 0);
                let dirty = (0..d.w).any(|i| !a[i] & !s[i] & valid(i) != 0);
                if singles && !(clean && dirty) {
                    return Err(format!("mid {mid} keeps an S bitmap it does not need"));
                }
                if s.iter().enumerate().any(|(i, &w)| w & !valid(i) != 0) {
                    return Err(format!("mid {mid}: S bits beyond the block"));
                }
            }
            if a.iter().enumerate().any(|(i, &w)| {
                let valid = if d.m < 64 && i == 0 {
                    bits::mask(0, d.m as u32)
                } else {
                    u64::MAX
                };
                w & !valid != 0
            }) {
                return Err(format!("mid {mid}: A bits beyond the block"));
            }
        }
        for g in 0..d.mw {
            let marked = |mark: Mark| self.marks[g * MARKS + mark as usize] != 0;
            if marked(Mark::Mixed) != self.a_groups[g].is_some()
                || marked(Mark::HasS) != self.s_groups[g].is_some()
            {
                return Err(format!("mid group {g}: bitmaps allocated unlike the marks"));
            }
        }
        for mid in 0..d.mids {
            for (which, mark) in [(0, Mark::Mixed), (1, Mark::HasS)] {
                let groups = if which == 0 {
                    &self.a_groups
                } else {
                    &self.s_groups
                };
                if !self.is(mark, mid)
                    && let Some(group) = &groups[(mid / 64) as usize]
                    && group[(mid % 64) as usize * d.w..][..d.w]
                        .iter()
                        .any(|&w| w != 0)
                {
                    return Err(format!("mid {mid}: a stale bitmap"));
                }
            }
            if self.is(Mark::HasS, mid) && !self.is(Mark::Mixed, mid) {
                return Err(format!("whole mid {mid} has an S bitmap"));
            }
        }
        Ok(())
    }
}

/// The first bit of `[lo, hi)` set in both `a` and `s`.
fn first_set_in_both(a: &[u64], s: &[u64], lo: u64, hi: u64) -> Option<u64> {
    let mut i = lo;
    while i < hi {
        let word = i / 64;
        let end = hi.min((word + 1) * 64);
        let m = bits::mask((i % 64) as u32, (end - word * 64) as u32);
        let both = a[word as usize] & s[word as usize] & m;
        if both != 0 {
            return Some(word * 64 + u64::from(both.trailing_zeros()));
        }
        i = end;
    }
    None
}
