//! The shareability of one chunk: the attribute that fragments at 4K granularity, kept in an
//! adaptive, canonical form.
//!
//! The content is a function `offset -> Shareability` over the chunk's pages, described by the
//! value at offset 0 and the sorted *flip* positions (offsets `p` whose value differs from
//! `p - 1`). The representation is chosen from the number of flips alone, so it is canonical:
//!
//! | flips                          | form                    | heap bytes      |
//! |--------------------------------|-------------------------|-----------------|
//! | 0                              | `Uniform`               | 0               |
//! | 1..=[`INLINE_FLIPS`]           | `Inline` (in the slot)  | 0               |
//! | up to the bitmap's size        | `Runs`: boxed `[u32]`   | 4 per flip      |
//! | more                           | `Dense`: a bit per page | pages / 8       |
//!
//! A list is kept while `4 * flips <= pages / 8`, so the plane never costs more than a per-page
//! bitmap of the chunk would.

use crate::Shareability;
use crate::packed::Packed4;

/// Flips stored inside the chunk slot without a heap allocation.
pub(crate) const INLINE_FLIPS: usize = Packed4::CAPACITY;

#[derive(Debug)]
pub(crate) enum SharePlane {
    Uniform(Shareability),
    Inline {
        first: Shareability,
        len: u8,
        flips: [u32; INLINE_FLIPS],
    },
    Runs {
        first: Shareability,
        flips: Box<[u32]>,
    },
    Dense {
        flips: u32,
        bits: DenseBits,
    },
}

/// One bit per page (set = private). The `Dense` variant keeps the number of flips next to it,
/// inline in the slot, so that the canonical form is decided without rescanning the chunk.
#[derive(Debug)]
pub(crate) struct DenseBits {
    words: Box<[u64]>,
}

fn words_for(pages: u32) -> usize {
    (pages as usize).div_ceil(64)
}

/// Whether `flips` flips are stored as a bitmap (see the module docs).
fn dense_wanted(flips: usize, pages: u32) -> bool {
    flips > INLINE_FLIPS && flips * 4 > words_for(pages) * 8
}

fn from_bit(bit: u64) -> Shareability {
    if bit & 1 == 1 {
        Shareability::Private
    } else {
        Shareability::Shared
    }
}

/// A plane of at most [`INLINE_FLIPS`] flips (`Uniform` or `Inline`), by value and packed in
/// registers: what the conversion fast path computes on without touching the heap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmallPlane {
    first: Shareability,
    flips: Packed4,
}

impl SmallPlane {
    /// The sorted flip offsets.
    #[inline]
    pub(crate) fn flips(&self) -> Packed4 {
        self.flips
    }

    #[inline]
    fn value_at(&self, off: u32) -> Shareability {
        if self.flips.iter().filter(|&p| p <= off).count() % 2 == 0 {
            self.first
        } else {
            self.first.flipped()
        }
    }

    /// The plane with pages `lo..hi` (`lo < hi <= pages`) set to `to`, or `None` when that
    /// needs more than [`INLINE_FLIPS`] flips. The same content as [`SharePlane::set`].
    #[inline]
    pub(crate) fn with_set(&self, lo: u32, hi: u32, to: Shareability, pages: u32) -> Option<Self> {
        let flip_at_lo = lo > 0 && self.value_at(lo - 1) != to;
        let flip_at_hi = hi < pages && self.value_at(hi) != to;
        let mut flips = Packed4::default();
        for p in self.flips.iter().filter(|&p| p < lo) {
            flips.push(p)?;
        }
        if flip_at_lo {
            flips.push(lo)?;
        }
        if flip_at_hi {
            flips.push(hi)?;
        }
        for p in self.flips.iter().filter(|&p| p > hi) {
            flips.push(p)?;
        }
        Some(SmallPlane {
            first: if lo == 0 { to } else { self.first },
            flips,
        })
    }
}

impl SharePlane {
    /// The plane by value when it has at most [`INLINE_FLIPS`] flips.
    #[inline]
    pub(crate) fn small(&self) -> Option<SmallPlane> {
        match *self {
            SharePlane::Uniform(first) => Some(SmallPlane {
                first,
                flips: Packed4::default(),
            }),
            SharePlane::Inline { first, len, flips } => Some(SmallPlane {
                first,
                flips: Packed4::from_array(flips, usize::from(len)),
            }),
            _ => None,
        }
    }

    /// The canonical plane of `small`.
    #[inline]
    pub(crate) fn from_small(small: SmallPlane) -> SharePlane {
        match small.flips.len() {
            0 => SharePlane::Uniform(small.first),
            // len <= INLINE_FLIPS, which fits in a u8.
            len => SharePlane::Inline {
                first: small.first,
                len: len as u8,
                flips: small.flips.to_array(),
            },
        }
    }

    /// The flip list, unless the plane is a bitmap.
    fn list(&self) -> Option<(Shareability, &[u32])> {
        match self {
            SharePlane::Uniform(v) => Some((*v, &[])),
            SharePlane::Inline { first, len, flips } => Some((*first, &flips[..*len as usize])),
            SharePlane::Runs { first, flips } => Some((*first, flips)),
            SharePlane::Dense { .. } => None,
        }
    }

    /// The sorted flip offsets, unless the plane is a bitmap.
    pub(crate) fn flip_list(&self) -> Option<&[u32]> {
        self.list().map(|(_, flips)| flips)
    }

    /// The value when the whole chunk has one.
    pub(crate) fn uniform_value(&self) -> Option<Shareability> {
        match self {
            SharePlane::Uniform(v) => Some(*v),
            _ => None,
        }
    }

    pub(crate) fn value_at(&self, off: u32) -> Shareability {
        match self.list() {
            Some((first, flips)) => {
                let before = flips.partition_point(|&p| p <= off);
                if before % 2 == 0 {
                    first
                } else {
                    first.flipped()
                }
            }
            None => match self {
                SharePlane::Dense { bits, .. } => from_bit(bits.bit(off)),
                _ => unreachable!("list() is None only for Dense"),
            },
        }
    }

    /// The first flip `p` with `after < p < limit`.
    pub(crate) fn next_flip(&self, after: u32, limit: u32) -> Option<u32> {
        match self {
            SharePlane::Uniform(_) => None,
            SharePlane::Dense { bits, .. } => bits.next_flip(after, limit),
            _ => {
                let (_, flips) = self.list()?;
                let i = flips.partition_point(|&p| p <= after);
                flips.get(i).copied().filter(|&p| p < limit)
            }
        }
    }

    /// Whether pages `lo..hi` all have one value.
    pub(crate) fn uniform_over(&self, lo: u32, hi: u32) -> bool {
        self.next_flip(lo, hi).is_none()
    }

    pub(crate) fn flip_count(&self) -> usize {
        match self {
            SharePlane::Dense { flips, .. } => *flips as usize,
            _ => self.list().map_or(0, |(_, f)| f.len()),
        }
    }

    /// Heap bytes owned by the plane.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            SharePlane::Uniform(_) | SharePlane::Inline { .. } => 0,
            SharePlane::Runs { flips, .. } => std::mem::size_of_val::<[u32]>(flips),
            SharePlane::Dense { bits, .. } => std::mem::size_of_val::<[u64]>(&bits.words),
        }
    }

    /// Pages of the chunk that are private.
    pub(crate) fn private_pages(&self, pages: u32) -> u64 {
        match self {
            SharePlane::Dense { bits, .. } => {
                bits.words.iter().map(|w| u64::from(w.count_ones())).sum()
            }
            _ => {
                let (first, flips) = self.list().expect("only Dense has no list");
                let mut value = first;
                let mut start = 0u32;
                let mut private = 0u64;
                for &p in flips.iter().chain(std::iter::once(&pages)) {
                    if value == Shareability::Private {
                        private += u64::from(p - start);
                    }
                    value = value.flipped();
                    start = p;
                }
                private
            }
        }
    }

    /// Sets pages `lo..hi` (`lo < hi <= pages`) to `to` and returns the plane to its canonical
    /// form.
    pub(crate) fn set(&mut self, lo: u32, hi: u32, to: Shareability, pages: u32) {
        debug_assert!(lo < hi && hi <= pages);
        if lo == 0 && hi == pages {
            *self = SharePlane::Uniform(to);
            return;
        }
        if let SharePlane::Dense { flips, bits } = self {
            *flips = bits.set(lo, hi, to, pages, *flips);
            if !dense_wanted(*flips as usize, pages) {
                let first = from_bit(bits.words[0]);
                let flips: Vec<u32> = bits.all_flips(pages, *flips as usize);
                *self = SharePlane::from_list(first, &flips, pages);
            }
            return;
        }
        let (first, flips) = self.list().expect("Dense was handled above");
        let flip_at_lo = lo > 0 && self.value_at(lo - 1) != to;
        let flip_at_hi = hi < pages && self.value_at(hi) != to;
        let below = flips.partition_point(|&p| p < lo);
        let above = flips.partition_point(|&p| p <= hi);
        let count =
            below + usize::from(flip_at_lo) + usize::from(flip_at_hi) + (flips.len() - above);
        let new_first = if lo == 0 { to } else { first };
        let old_middle = &flips[below..above];
        let unchanged = new_first == first
            && match (flip_at_lo, flip_at_hi) {
                (false, false) => old_middle.is_empty(),
                (true, false) => old_middle == [lo],
                (false, true) => old_middle == [hi],
                (true, true) => old_middle == [lo, hi],
            };
        if unchanged {
            return; // keep the allocation
        }
        let new_flips = flips[..below]
            .iter()
            .copied()
            .chain(flip_at_lo.then_some(lo))
            .chain(flip_at_hi.then_some(hi))
            .chain(flips[above..].iter().copied());
        *self = SharePlane::from_iter(new_first, count, new_flips, pages);
    }

    fn from_list(first: Shareability, flips: &[u32], pages: u32) -> SharePlane {
        SharePlane::from_iter(first, flips.len(), flips.iter().copied(), pages)
    }

    /// The canonical plane for `first` and `count` sorted flips.
    fn from_iter(
        first: Shareability,
        count: usize,
        flips: impl Iterator<Item = u32>,
        pages: u32,
    ) -> SharePlane {
        if count == 0 {
            SharePlane::Uniform(first)
        } else if count <= INLINE_FLIPS {
            let mut inline = [0u32; INLINE_FLIPS];
            for (slot, p) in inline.iter_mut().zip(flips) {
                *slot = p;
            }
            SharePlane::Inline {
                first,
                len: count as u8,
                flips: inline,
            }
        } else if !dense_wanted(count, pages) {
            let mut list = Vec::with_capacity(count);
            list.extend(flips);
            SharePlane::Runs {
                first,
                flips: list.into_boxed_slice(),
            }
        } else {
            SharePlane::Dense {
                // A chunk has at most 2^30 pages, so its flip count fits in a u32.
                flips: count as u32,
                bits: DenseBits::from_flips(first, flips, pages),
            }
        }
    }

    /// Checks the canonical-form invariant; returns a description of the first violation.
    pub(crate) fn check_canonical(&self, pages: u32) -> Result<(), String> {
        let flips: Vec<u32> = match self {
            SharePlane::Dense { flips, bits: d } => {
                let all = d.all_flips(pages, 0);
                if all.len() != *flips as usize {
                    return Err(format!("dense flip count {flips} but {} flips", all.len()));
                }
                if d.words.len() != words_for(pages) {
                    return Err("dense bitmap has the wrong length".into());
                }
                if let Some(last) = d.words.last()
                    && !pages.is_multiple_of(64)
                    && last >> (pages % 64) != 0
                {
                    return Err("dense bitmap has bits beyond the chunk".into());
                }
                if !dense_wanted(all.len(), pages) {
                    return Err(format!("{} flips stored dense", all.len()));
                }
                return Ok(());
            }
            _ => self.list().expect("not Dense").1.to_vec(),
        };
        if flips.windows(2).any(|w| w[0] >= w[1]) || flips.iter().any(|&p| p == 0 || p >= pages) {
            return Err(format!("flip list not sorted within the chunk: {flips:?}"));
        }
        let expected = match flips.len() {
            0 => matches!(self, SharePlane::Uniform(_)),
            n if n <= INLINE_FLIPS => matches!(self, SharePlane::Inline { .. }),
            n => !dense_wanted(n, pages) && matches!(self, SharePlane::Runs { .. }),
        };
        if expected {
            Ok(())
        } else {
            Err(format!("{} flips in the wrong form: {self:?}", flips.len()))
        }
    }
}

impl DenseBits {
    fn from_flips(first: Shareability, flips: impl Iterator<Item = u32>, pages: u32) -> DenseBits {
        let mut bits = DenseBits {
            words: vec![0u64; words_for(pages)].into_boxed_slice(),
        };
        let mut value = first;
        let mut start = 0;
        for p in flips.chain(std::iter::once(pages)) {
            if value == Shareability::Private {
                bits.fill(start, p, true);
            }
            value = value.flipped();
            start = p;
        }
        bits
    }

    fn bit(&self, off: u32) -> u64 {
        self.words[(off / 64) as usize] >> (off % 64)
    }

    /// Bit `i` of the result is set when page `64 * w + i` differs from the page before it
    /// (page 0 is compared with itself). Bits past the chunk's end are not masked.
    fn raw_flip_word(&self, w: usize) -> u64 {
        let word = self.words[w];
        let carry = if w == 0 {
            word & 1
        } else {
            self.words[w - 1] >> 63
        };
        word ^ ((word << 1) | carry)
    }

    /// [`Self::raw_flip_word`] without the flip past the chunk's last page.
    fn flip_word(&self, w: usize, pages: u32) -> u64 {
        let mut flips = self.raw_flip_word(w);
        let end_bit = pages as usize - 64 * w;
        if end_bit < 64 {
            flips &= (1u64 << end_bit) - 1;
        }
        flips
    }

    fn next_flip(&self, after: u32, limit: u32) -> Option<u32> {
        let start = after.checked_add(1)?;
        if start >= limit {
            return None;
        }
        // `limit` never exceeds the chunk, so the unmasked word's spurious flip at the chunk's
        // end (when the last page is private) is excluded by the `p < limit` test.
        let mut w = (start / 64) as usize;
        let mut flips = self.raw_flip_word(w) & (!0u64 << (start % 64));
        loop {
            if flips != 0 {
                let p = (w * 64) as u32 + flips.trailing_zeros();
                return (p < limit).then_some(p);
            }
            w += 1;
            if w * 64 >= limit as usize {
                return None;
            }
            flips = self.raw_flip_word(w);
        }
    }

    fn all_flips(&self, pages: u32, expected: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(expected);
        for w in 0..self.words.len() {
            let mut flips = self.flip_word(w, pages);
            while flips != 0 {
                out.push((w * 64) as u32 + flips.trailing_zeros());
                flips &= flips - 1;
            }
        }
        out
    }

    /// Flips at positions `lo..=hi` (position 0 and `pages` are never flips).
    fn count_flips(&self, lo: u32, hi: u32, pages: u32) -> usize {
        let hi = hi.min(pages - 1);
        if lo > hi {
            return 0;
        }
        let (w0, w1) = ((lo / 64) as usize, (hi / 64) as usize);
        (w0..=w1)
            .map(|w| {
                let mut f = self.flip_word(w, pages);
                if w == w0 {
                    f &= !0u64 << (lo % 64);
                }
                if w == w1 && hi % 64 != 63 {
                    f &= (1u64 << (hi % 64 + 1)) - 1;
                }
                f.count_ones() as usize
            })
            .sum()
    }

    fn fill(&mut self, lo: u32, hi: u32, value: bool) {
        let (mut pos, end) = (lo as usize, hi as usize);
        while pos < end {
            let w = pos / 64;
            let from = pos % 64;
            let to = (end - w * 64).min(64);
            let mask = if to - from == 64 {
                !0
            } else {
                ((1u64 << (to - from)) - 1) << from
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            pos = w * 64 + to;
        }
    }

    /// Sets pages `lo..hi` and returns the new flip count, given the old one.
    fn set(&mut self, lo: u32, hi: u32, to: Shareability, pages: u32, flips: u32) -> u32 {
        let before = self.count_flips(lo, hi, pages);
        self.fill(lo, hi, to == Shareability::Private);
        let after = self.count_flips(lo, hi, pages);
        flips - before as u32 + after as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Shareability::*;
    use proptest::prelude::*;

    fn naive(plane: &SharePlane, pages: u32) -> Vec<Shareability> {
        (0..pages).map(|p| plane.value_at(p)).collect()
    }

    #[test]
    fn one_page_inline_then_back_to_uniform() {
        let mut plane = SharePlane::Uniform(Shared);
        plane.set(7, 8, Private, 64);
        assert!(matches!(plane, SharePlane::Inline { len: 2, .. }));
        assert_eq!(plane.value_at(7), Private);
        assert_eq!(plane.value_at(8), Shared);
        assert_eq!(plane.next_flip(0, 64), Some(7));
        plane.set(7, 8, Shared, 64);
        assert!(matches!(plane, SharePlane::Uniform(Shared)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn small_plane_set_matches_the_general_set(
            ops in prop::collection::vec((0u32..64, 1u32..20, any::<bool>()), 1..12),
        ) {
            let pages = 64;
            let mut plane = SharePlane::Uniform(Shared);
            for (start, len, private) in ops {
                let (lo, to) = (start % pages, if private { Private } else { Shared });
                let hi = (lo + len).min(pages);
                let small = plane.small().map(|s| s.with_set(lo, hi, to, pages));
                plane.set(lo, hi, to, pages);
                match (small, plane.small()) {
                    (Some(Some(fast)), Some(general)) => {
                        prop_assert_eq!(fast.flips(), general.flips());
                        prop_assert_eq!(fast.flips().to_array(), general.flips().to_array());
                        prop_assert_eq!(fast.first, general.first);
                        let rebuilt = SharePlane::from_small(fast);
                        prop_assert_eq!(naive(&rebuilt, pages), naive(&plane, pages));
                        rebuilt.check_canonical(pages).map_err(TestCaseError::fail)?;
                    }
                    // Too many flips for the fast path: the general plane is a list.
                    (Some(None), general) => prop_assert!(general.is_none()),
                    (None, _) => {}
                    (Some(Some(_)), None) => prop_assert!(false, "fast path kept a big plane"),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn plane_matches_a_page_array(
            pages_log in 2u32..10,
            ops in prop::collection::vec((0u32..1024, 1u32..200, any::<bool>()), 1..60),
        ) {
            let pages = 1u32 << pages_log;
            let mut plane = SharePlane::Uniform(Shared);
            let mut model = vec![Shared; pages as usize];
            for (start, len, private) in ops {
                let lo = start % pages;
                let hi = (lo + len).min(pages);
                let to = if private { Private } else { Shared };
                plane.set(lo, hi, to, pages);
                model[lo as usize..hi as usize].fill(to);
                prop_assert_eq!(&naive(&plane, pages), &model);
                plane.check_canonical(pages).map_err(TestCaseError::fail)?;
                let private_pages = model.iter().filter(|v| **v == Private).count() as u64;
                prop_assert_eq!(plane.private_pages(pages), private_pages);
                let flips: Vec<u32> = (1..pages).filter(|&p| model[p as usize] != model[p as usize - 1]).collect();
                prop_assert_eq!(plane.flip_count(), flips.len());
                for probe in [0, lo, hi - 1, pages / 2] {
                    let expect = flips.iter().copied().find(|&p| p > probe && p < hi.max(probe + 1));
                    prop_assert_eq!(plane.next_flip(probe, hi.max(probe + 1)), expect);
                }
            }
        }
    }
}
