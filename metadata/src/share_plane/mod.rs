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
//!
//! The thresholds between the forms are in `shape`, the bitmap form in `dense`, the by-value
//! plane of the conversion fast path in `small`, and the one-pass setting of many ranges in
//! `sweep`.

mod dense;
mod shape;
mod small;
mod sweep;
#[cfg(test)]
mod tests;

use dense::DenseBits;
pub(crate) use shape::PlaneShape;
use shape::words_for;
pub(crate) use small::SmallPlane;
use sweep::sweep;

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

    /// The value at `after` and the flips after it, ascending, unless the plane is a bitmap.
    pub(crate) fn flips_after(&self, after: u32) -> Option<(Shareability, &[u32])> {
        let (first, flips) = self.list()?;
        let before = flips.partition_point(|&p| p <= after);
        let value = if before % 2 == 0 {
            first
        } else {
            first.flipped()
        };
        Some((value, &flips[before..]))
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
