//! The shareability of one chunk: the attribute that fragments at 4K granularity, kept in an
//! adaptive, canonical form.
//!
//! The content is a function `offset -> Shareability` over the chunk's pages, described by the
//! value at offset 0 and the sorted *flip* positions (offsets `p` whose value differs from
//! `p - 1`). The representation is chosen from the number of flips alone, so it is canonical:
//!
//! | flips                             | form                           | heap bytes           |
//! |-----------------------------------|--------------------------------|----------------------|
//! | 0                                 | `Uniform`                      | 0                    |
//! | 1..=[`INLINE_FLIPS`]              | `Inline` (in the slot)         | 0                    |
//! | up to 16 × the index's words      | `Runs`: boxed `[u32]`          | 4 per flip           |
//! | up to the bitmap's size           | `Indexed`: index + `[u32]`     | 4 per flip + mids/8  |
//! | more                              | `Dense`: a bit per page        | pages / 8            |
//!
//! A list is kept while it (with its index) is no larger than a per-page bitmap of the chunk,
//! so the plane never costs more than that bitmap would.
//!
//! The *mid index* of an `Indexed` list is one bit per middle block, set when a flip lies
//! strictly inside the block, stored at the head of the list's allocation. It answers "is this
//! middle block uniform" with one load instead of a binary search of the list, for the chunks
//! fragmented enough that the summary word cannot answer (a long list). It costs at most 1/16
//! of the list it sits in (64 B per GiB chunk on x86-64, from 256 flips on).

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
    /// A long list with its mid index: `data[..index_words]` is the index (bit `m` of the
    /// index set = a flip lies strictly inside middle block `m`), `data[index_words..]` the
    /// flips.
    Indexed {
        first: Shareability,
        index_words: u32,
        data: Box<[u32]>,
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

/// A list carries its mid index once the index is at most this fraction of the flips' bytes.
const INDEX_RATIO: usize = 16;

/// The chunk as the plane sees it: its pages and the size of its middle blocks, which decide
/// the canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlaneShape {
    pages: u32,
    mid_order: u32,
}

impl PlaneShape {
    /// A chunk of `pages` pages (a power of two) with middle blocks of `2^mid_order` pages.
    pub(crate) fn new(pages: u32, mid_order: u32) -> PlaneShape {
        debug_assert!(pages.is_power_of_two() && 1 << mid_order <= pages);
        PlaneShape { pages, mid_order }
    }

    /// `u32` words of the mid index.
    fn index_words(&self) -> usize {
        ((self.pages >> self.mid_order) as usize).div_ceil(32)
    }

    /// Whether a list of `flips` flips carries the mid index.
    fn indexed(&self, flips: usize) -> bool {
        flips > INLINE_FLIPS && flips >= INDEX_RATIO * self.index_words()
    }

    /// Heap bytes of a list of `flips` flips (with its index when it has one).
    fn list_bytes(&self, flips: usize) -> usize {
        let index = if self.indexed(flips) {
            self.index_words()
        } else {
            0
        };
        4 * (flips + index)
    }

    /// Whether `flips` flips are stored as a bitmap (see the module docs). Monotone in
    /// `flips`, so the forms follow each other as the table says.
    fn dense_wanted(&self, flips: usize) -> bool {
        flips > INLINE_FLIPS && self.list_bytes(flips) > words_for(self.pages) * 8
    }

    /// The mid index of the sorted `flips`.
    fn index_of(&self, flips: &[u32]) -> Vec<u32> {
        let mut index = vec![0u32; self.index_words()];
        for &p in flips {
            mark_mid(&mut index, p, self.mid_order);
        }
        index
    }
}

/// Sets the index bit of the middle block that `flip` lies strictly inside, if any.
#[inline]
fn mark_mid(index: &mut [u32], flip: u32, mid_order: u32) {
    if flip & ((1 << mid_order) - 1) != 0 {
        let mid = flip >> mid_order;
        index[(mid / 32) as usize] |= 1 << (mid % 32);
    }
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
    /// A uniform plane of value `value`.
    #[inline]
    pub(crate) fn uniform(value: Shareability) -> SmallPlane {
        SmallPlane {
            first: value,
            flips: Packed4::default(),
        }
    }

    /// The plane of value `first` at offset 0 that flips at `flips` (sorted, distinct,
    /// none at 0).
    #[inline]
    pub(crate) fn with_flips(first: Shareability, flips: Packed4) -> SmallPlane {
        SmallPlane { first, flips }
    }

    /// The value at offset 0.
    #[inline]
    pub(crate) fn first(&self) -> Shareability {
        self.first
    }

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
            SharePlane::Indexed {
                first,
                index_words,
                data,
            } => Some((*first, &data[*index_words as usize..])),
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

    /// What the mid index says of middle block `mid` (uniform or not); `None` without an index.
    #[inline]
    pub(crate) fn indexed_mid_uniform(&self, mid: u32) -> Option<bool> {
        match self {
            SharePlane::Indexed {
                index_words, data, ..
            } if mid / 32 < *index_words => {
                Some((data[(mid / 32) as usize] >> (mid % 32)) & 1 == 0)
            }
            _ => None,
        }
    }

    /// Whether middle block `mid` (of `2^mid_order` pages, the plane's shape's) has one value:
    /// one load of the mid index for an `Indexed` list, a search otherwise.
    #[inline]
    pub(crate) fn mid_uniform(&self, mid: u32, mid_order: u32) -> bool {
        match self {
            SharePlane::Uniform(_) => true,
            _ => self
                .indexed_mid_uniform(mid)
                .unwrap_or_else(|| self.uniform_over(mid << mid_order, (mid + 1) << mid_order)),
        }
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
            SharePlane::Indexed { data, .. } => std::mem::size_of_val::<[u32]>(data),
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
    pub(crate) fn set(&mut self, lo: u32, hi: u32, to: Shareability, shape: PlaneShape) {
        let pages = shape.pages;
        debug_assert!(lo < hi && hi <= pages);
        if lo == 0 && hi == pages {
            *self = SharePlane::Uniform(to);
            return;
        }
        if let SharePlane::Dense { flips, bits } = self {
            *flips = bits.set(lo, hi, to, pages, *flips);
            if !shape.dense_wanted(*flips as usize) {
                let first = from_bit(bits.words[0]);
                let flips: Vec<u32> = bits.all_flips(pages, *flips as usize);
                *self = SharePlane::from_list(first, &flips, shape);
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
        *self = SharePlane::from_iter(new_first, count, new_flips, shape);
    }

    /// Sets each of `ranges` (ascending, disjoint, not adjacent, inside the chunk) to `to`, in
    /// one pass over the plane: O(flips + ranges), where as many [`Self::set`]s would rebuild
    /// the list once each.
    pub(crate) fn set_many(&mut self, ranges: &[(u32, u32)], to: Shareability, shape: PlaneShape) {
        let pages = shape.pages;
        match ranges {
            [] => return,
            [(lo, hi)] => return self.set(*lo, *hi, to, shape),
            _ => {}
        }
        if let SharePlane::Dense { flips, bits } = self {
            for &(lo, hi) in ranges {
                *flips = bits.set(lo, hi, to, pages, *flips);
            }
            if !shape.dense_wanted(*flips as usize) {
                let first = from_bit(bits.words[0]);
                let flips: Vec<u32> = bits.all_flips(pages, *flips as usize);
                *self = SharePlane::from_list(first, &flips, shape);
            }
            return;
        }
        let (first, old) = self.list().expect("Dense was handled above");
        let (first, flips) = sweep(first, old, ranges, to, pages);
        *self = SharePlane::from_list(first, &flips, shape);
    }

    fn from_list(first: Shareability, flips: &[u32], shape: PlaneShape) -> SharePlane {
        SharePlane::from_iter(first, flips.len(), flips.iter().copied(), shape)
    }

    /// The canonical plane for `first` and `count` sorted flips (`flips` yields exactly
    /// `count`).
    fn from_iter(
        first: Shareability,
        count: usize,
        flips: impl Iterator<Item = u32>,
        shape: PlaneShape,
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
        } else if shape.dense_wanted(count) {
            SharePlane::Dense {
                // A chunk has at most 2^30 pages, so its flip count fits in a u32.
                flips: count as u32,
                bits: DenseBits::from_flips(first, flips, shape.pages),
            }
        } else if shape.indexed(count) {
            let index_words = shape.index_words();
            // Exactly the final length, so `into_boxed_slice` does not reallocate.
            let mut data = Vec::with_capacity(index_words + count);
            data.resize(index_words, 0);
            for p in flips {
                mark_mid(&mut data[..index_words], p, shape.mid_order);
                data.push(p);
            }
            SharePlane::Indexed {
                first,
                // At most pages / 32 <= 2^25 words.
                index_words: index_words as u32,
                data: data.into_boxed_slice(),
            }
        } else {
            let mut list = Vec::with_capacity(count);
            list.extend(flips);
            SharePlane::Runs {
                first,
                flips: list.into_boxed_slice(),
            }
        }
    }

    /// Checks the canonical-form invariant; returns a description of the first violation.
    pub(crate) fn check_canonical(&self, shape: PlaneShape) -> Result<(), String> {
        let pages = shape.pages;
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
                if !shape.dense_wanted(all.len()) {
                    return Err(format!("{} flips stored dense", all.len()));
                }
                return Ok(());
            }
            _ => self.list().expect("not Dense").1.to_vec(),
        };
        if flips.windows(2).any(|w| w[0] >= w[1]) || flips.iter().any(|&p| p == 0 || p >= pages) {
            return Err(format!("flip list not sorted within the chunk: {flips:?}"));
        }
        if let SharePlane::Indexed {
            index_words, data, ..
        } = self
        {
            let index = &data[..*index_words as usize];
            if *index != shape.index_of(&flips)[..] {
                return Err(format!(
                    "mid index {index:?} does not match the flips {flips:?}"
                ));
            }
        }
        let expected = match flips.len() {
            0 => matches!(self, SharePlane::Uniform(_)),
            n if n <= INLINE_FLIPS => matches!(self, SharePlane::Inline { .. }),
            n if shape.dense_wanted(n) => false,
            n if shape.indexed(n) => matches!(self, SharePlane::Indexed { .. }),
            _ => matches!(self, SharePlane::Runs { .. }),
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

/// The first value and the flips of the plane `first`/`old` (sorted flips) with `ranges`
/// (ascending, disjoint, not adjacent, `lo < hi <= pages`) set to `to`: a merge of the old
/// flips with the ranges' ends, emitting a flip wherever the new value changes.
fn sweep(
    first: Shareability,
    old: &[u32],
    ranges: &[(u32, u32)],
    to: Shareability,
    pages: u32,
) -> (Shareability, Vec<u32>) {
    let mut flips = Vec::with_capacity(old.len() + 2 * ranges.len());
    let (mut f, mut r) = (0, 0);
    // The old value, and whether a range covers, from `at` on.
    let (mut old_value, mut inside) = (first, false);
    // The new value of the segment before `at`; none before the first.
    let mut previous: Option<Shareability> = None;
    let mut new_first = first;
    let mut at = 0u32;
    loop {
        while f < old.len() && old[f] == at {
            old_value = old_value.flipped();
            f += 1;
        }
        if r < ranges.len() && ranges[r].1 == at {
            inside = false;
            r += 1;
        }
        if r < ranges.len() && ranges[r].0 == at {
            inside = true;
        }
        let value = if inside { to } else { old_value };
        match previous {
            None => new_first = value,
            Some(before) if before != value => flips.push(at),
            Some(_) => {}
        }
        previous = Some(value);
        let next_old = old.get(f).copied();
        let next_range = ranges.get(r).map(|&(lo, hi)| if inside { hi } else { lo });
        at = match (next_old, next_range) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        if at >= pages {
            break;
        }
    }
    (new_first, flips)
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
        let shape = PlaneShape::new(64, 3);
        let mut plane = SharePlane::Uniform(Shared);
        plane.set(7, 8, Private, shape);
        assert!(matches!(plane, SharePlane::Inline { len: 2, .. }));
        assert_eq!(plane.value_at(7), Private);
        assert_eq!(plane.value_at(8), Shared);
        assert_eq!(plane.next_flip(0, 64), Some(7));
        plane.set(7, 8, Shared, shape);
        assert!(matches!(plane, SharePlane::Uniform(Shared)));
    }

    /// An x86-64 chunk (2^18 pages, 512 middle blocks): the list gains its 64-byte index at
    /// 256 flips, loses it below, and becomes the bitmap past 8192 - 16 flips.
    #[test]
    fn the_mid_index_follows_the_flip_count() {
        let shape = PlaneShape::new(1 << 18, 9);
        assert_eq!(shape.index_words(), 16);
        assert!(!shape.indexed(255) && shape.indexed(256));
        assert!(!shape.dense_wanted(8192 - 16) && shape.dense_wanted(8192 - 15));
        let mut plane = SharePlane::Uniform(Shared);
        // Pages 1000 * k + 1 for k in 0..128: 256 flips, in middle blocks 1000 * k / 512.
        for k in 0..128u32 {
            plane.set(1000 * k + 1, 1000 * k + 2, Private, shape);
            let flips = 2 * (k as usize + 1);
            assert_eq!(
                matches!(plane, SharePlane::Indexed { .. }),
                flips >= 256,
                "{flips} flips"
            );
            let heap = if flips <= INLINE_FLIPS {
                0
            } else {
                shape.list_bytes(flips)
            };
            assert_eq!(plane.heap_bytes(), heap);
            plane.check_canonical(shape).unwrap();
        }
        assert_eq!(plane.heap_bytes(), 4 * (256 + 16));
        for mid in 0..512u32 {
            let mixed = (0..128u32).any(|k| (1000 * k + 1) >> 9 == mid);
            assert_eq!(plane.mid_uniform(mid, 9), !mixed, "mid {mid}");
        }
        plane.set(1, 2, Shared, shape);
        assert!(matches!(plane, SharePlane::Runs { .. }));
        assert!(plane.mid_uniform(0, 9));
        assert!(!plane.mid_uniform(1, 9));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn small_plane_set_matches_the_general_set(
            ops in prop::collection::vec((0u32..64, 1u32..20, any::<bool>()), 1..12),
        ) {
            let pages = 64;
            let shape = PlaneShape::new(pages, 3);
            let mut plane = SharePlane::Uniform(Shared);
            for (start, len, private) in ops {
                let (lo, to) = (start % pages, if private { Private } else { Shared });
                let hi = (lo + len).min(pages);
                let small = plane.small().map(|s| s.with_set(lo, hi, to, pages));
                plane.set(lo, hi, to, shape);
                match (small, plane.small()) {
                    (Some(Some(fast)), Some(general)) => {
                        prop_assert_eq!(fast.flips(), general.flips());
                        prop_assert_eq!(fast.flips().to_array(), general.flips().to_array());
                        prop_assert_eq!(fast.first, general.first);
                        let rebuilt = SharePlane::from_small(fast);
                        prop_assert_eq!(naive(&rebuilt, pages), naive(&plane, pages));
                        rebuilt.check_canonical(shape).map_err(TestCaseError::fail)?;
                    }
                    // Too many flips for the fast path: the general plane is a list.
                    (Some(None), general) => prop_assert!(general.is_none()),
                    (None, _) => {}
                    (Some(Some(_)), None) => prop_assert!(false, "fast path kept a big plane"),
                }
            }
        }
    }

    /// Disjoint, non-adjacent ascending ranges inside `pages` from arbitrary cut points.
    fn disjoint_ranges(cuts: &[u32], pages: u32) -> Vec<(u32, u32)> {
        let mut points: Vec<u32> = cuts.iter().map(|c| c % (pages + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for pair in points.chunks_exact(2) {
            let (lo, hi) = (pair[0], pair[1]);
            match ranges.last() {
                // Touching the previous range: skip, the caller merges adjacent ranges.
                Some(&(_, end)) if end >= lo => {}
                _ => ranges.push((lo, hi)),
            }
        }
        ranges
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// `set_many` of several ranges gives the plane (value and canonical form) that as
        /// many `set`s give, from every shape of plane.
        #[test]
        fn set_many_matches_one_set_per_range(
            pages_log in 2u32..13,
            mid_pick in 0u32..16,
            start in prop::collection::vec((0u32..8192, 1u32..64, any::<bool>()), 0..600),
            batches in prop::collection::vec(
                (prop::collection::vec(0u32..8193, 0..400), any::<bool>()),
                1..4,
            ),
        ) {
            let pages = 1u32 << pages_log;
            let mid_order = 1 + mid_pick % (pages_log - 1);
            let shape = PlaneShape::new(pages, mid_order);
            let mut plane = SharePlane::Uniform(Shared);
            let mut model = vec![Shared; pages as usize];
            for (at, len, private) in start {
                let lo = at % pages;
                let hi = (lo + len).min(pages);
                let to = if private { Private } else { Shared };
                plane.set(lo, hi, to, shape);
                model[lo as usize..hi as usize].fill(to);
            }
            for (cuts, private) in batches {
                let to = if private { Private } else { Shared };
                let ranges = disjoint_ranges(&cuts, pages);
                plane.set_many(&ranges, to, shape);
                for &(lo, hi) in &ranges {
                    model[lo as usize..hi as usize].fill(to);
                }
                prop_assert_eq!(&naive(&plane, pages), &model);
                plane.check_canonical(shape).map_err(TestCaseError::fail)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn plane_matches_a_page_array(
            pages_log in 2u32..12,
            mid_pick in 0u32..16,
            ops in prop::collection::vec(
                (0u32..4096, prop_oneof![1u32..3, 1u32..200], any::<bool>()),
                1..80,
            ),
        ) {
            let pages = 1u32 << pages_log;
            let mid_order = 1 + mid_pick % (pages_log - 1);
            let shape = PlaneShape::new(pages, mid_order);
            let mut plane = SharePlane::Uniform(Shared);
            let mut model = vec![Shared; pages as usize];
            for (start, len, private) in ops {
                let lo = start % pages;
                let hi = (lo + len).min(pages);
                let to = if private { Private } else { Shared };
                plane.set(lo, hi, to, shape);
                model[lo as usize..hi as usize].fill(to);
                prop_assert_eq!(&naive(&plane, pages), &model);
                plane.check_canonical(shape).map_err(TestCaseError::fail)?;
                for mid in 0..pages >> mid_order {
                    let block = &model[(mid << mid_order) as usize..((mid + 1) << mid_order) as usize];
                    let uniform = block.iter().all(|v| *v == block[0]);
                    prop_assert_eq!(plane.mid_uniform(mid, mid_order), uniform);
                }
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
