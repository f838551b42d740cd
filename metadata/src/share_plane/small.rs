//! [`SmallPlane`]: a plane of few flips by value, for the conversion fast path.

use crate::Shareability;
use crate::packed::Packed4;

/// A plane of at most [`INLINE_FLIPS`] flips (`Uniform` or `Inline`), by value and packed in
/// registers: what the conversion fast path computes on without touching the heap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmallPlane {
    pub(super) first: Shareability,
    pub(super) flips: Packed4,
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
    pub(super) fn value_at(&self, off: u32) -> Shareability {
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
