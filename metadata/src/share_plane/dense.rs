//! The `Dense` form: one bit per page, for the chunks fragmented past what a list of flips
//! costs.

use super::shape::words_for;
use crate::Shareability;

/// One bit per page (set = private). The `Dense` variant keeps the number of flips next to it,
/// inline in the slot, so that the canonical form is decided without rescanning the chunk.
#[derive(Debug)]
pub(crate) struct DenseBits {
    pub(super) words: Box<[u64]>,
}

impl DenseBits {
    pub(super) fn from_flips(
        first: Shareability,
        flips: impl Iterator<Item = u32>,
        pages: u32,
    ) -> DenseBits {
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

    pub(super) fn bit(&self, off: u32) -> u64 {
        self.words[(off / 64) as usize] >> (off % 64)
    }

    /// Bit `i` of the result is set when page `64 * w + i` differs from the page before it
    /// (page 0 is compared with itself). Bits past the chunk's end are not masked.
    pub(super) fn raw_flip_word(&self, w: usize) -> u64 {
        let word = self.words[w];
        let carry = if w == 0 {
            word & 1
        } else {
            self.words[w - 1] >> 63
        };
        word ^ ((word << 1) | carry)
    }

    /// [`Self::raw_flip_word`] without the flip past the chunk's last page.
    pub(super) fn flip_word(&self, w: usize, pages: u32) -> u64 {
        let mut flips = self.raw_flip_word(w);
        let end_bit = pages as usize - 64 * w;
        if end_bit < 64 {
            flips &= (1u64 << end_bit) - 1;
        }
        flips
    }

    pub(super) fn next_flip(&self, after: u32, limit: u32) -> Option<u32> {
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

    pub(super) fn all_flips(&self, pages: u32, expected: usize) -> Vec<u32> {
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
    pub(super) fn count_flips(&self, lo: u32, hi: u32, pages: u32) -> usize {
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

    pub(super) fn fill(&mut self, lo: u32, hi: u32, value: bool) {
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
    pub(super) fn set(
        &mut self,
        lo: u32,
        hi: u32,
        to: Shareability,
        pages: u32,
        flips: u32,
    ) -> u32 {
        let before = self.count_flips(lo, hi, pages);
        self.fill(lo, hi, to == Shareability::Private);
        let after = self.count_flips(lo, hi, pages);
        flips - before as u32 + after as u32
    }
}
