//! Half-open, non-empty PFN ranges.

use std::fmt;

use crate::{PFN_LIMIT, Pfn, RangeError};

/// `[start, end)` in 4 KiB PFNs, never empty, and ending at or below [`PFN_LIMIT`].
///
/// Because a `PfnRange` can only be built through validating constructors, code that receives
/// one never has to re-check emptiness or overflow.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PfnRange {
    start: Pfn,
    end: Pfn,
}

impl PfnRange {
    /// `[start, end)`; fails with [`RangeError::Empty`] if `end <= start` and with
    /// [`RangeError::Overflow`] if `end` lies beyond [`PFN_LIMIT`].
    pub const fn new(start: Pfn, end: Pfn) -> Result<PfnRange, RangeError> {
        if end.0 <= start.0 {
            return Err(RangeError::Empty { start, end });
        }
        if end.0 > PFN_LIMIT.0 {
            return Err(RangeError::Overflow {
                start,
                pages: end.0 - start.0,
            });
        }
        Ok(PfnRange { start, end })
    }

    /// For callers in this crate that derived `start < end <= PFN_LIMIT` from a valid range.
    pub(crate) const fn new_unchecked(start: Pfn, end: Pfn) -> PfnRange {
        debug_assert!(start.0 < end.0 && end.0 <= PFN_LIMIT.0);
        PfnRange { start, end }
    }

    /// `pages` pages from `start`.
    pub const fn from_len(start: Pfn, pages: u64) -> Result<PfnRange, RangeError> {
        if pages == 0 {
            return Err(RangeError::Empty { start, end: start });
        }
        match start.0.checked_add(pages) {
            Some(end) if end <= PFN_LIMIT.0 => Ok(PfnRange {
                start,
                end: Pfn(end),
            }),
            _ => Err(RangeError::Overflow { start, pages }),
        }
    }

    /// The single page `pfn`; fails for PFNs at or beyond [`PFN_LIMIT`].
    pub const fn page(pfn: Pfn) -> Result<PfnRange, RangeError> {
        PfnRange::from_len(pfn, 1)
    }

    /// First page.
    pub const fn start(&self) -> Pfn {
        self.start
    }

    /// One past the last page.
    pub const fn end(&self) -> Pfn {
        self.end
    }

    /// The last page (inclusive).
    pub const fn last(&self) -> Pfn {
        Pfn(self.end.0 - 1)
    }

    /// Number of pages; never zero.
    #[allow(clippy::len_without_is_empty)] // a PfnRange is never empty
    pub const fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Whether `pfn` lies in the range.
    pub const fn contains(&self, pfn: Pfn) -> bool {
        self.start.0 <= pfn.0 && pfn.0 < self.end.0
    }

    /// Whether all of `other` lies in the range.
    pub const fn contains_range(&self, other: &PfnRange) -> bool {
        self.start.0 <= other.start.0 && other.end.0 <= self.end.0
    }

    /// Whether the two ranges share at least one page.
    pub const fn overlaps(&self, other: &PfnRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// The pages both ranges share, if any.
    pub fn intersection(&self, other: &PfnRange) -> Option<PfnRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        PfnRange::new(start, end).ok()
    }

    /// Splits into `[start, at)` and `[at, end)`; `at` must lie strictly inside.
    pub fn split_at(&self, at: Pfn) -> Result<(PfnRange, PfnRange), RangeError> {
        if at <= self.start || at >= self.end {
            return Err(RangeError::OutOfBounds { pfn: at });
        }
        Ok((
            PfnRange {
                start: self.start,
                end: at,
            },
            PfnRange {
                start: at,
                end: self.end,
            },
        ))
    }

    /// Whether both ends are multiples of `pages` (a power of two).
    pub const fn is_aligned_to(&self, pages: u64) -> bool {
        self.start.is_aligned_to(pages) && self.end.is_aligned_to(pages)
    }

    /// Fails with [`RangeError::Unaligned`] naming the first misaligned end.
    pub fn check_aligned_to(&self, pages: u64) -> Result<(), RangeError> {
        for pfn in [self.start, self.end] {
            if !pfn.is_aligned_to(pages) {
                return Err(RangeError::Unaligned {
                    pfn,
                    align_pages: pages,
                });
            }
        }
        Ok(())
    }

    /// Fails with [`RangeError::OutOfBounds`] naming the first page of `self` outside `bounds`.
    pub fn check_within(&self, bounds: &PfnRange) -> Result<(), RangeError> {
        if self.start < bounds.start || self.start >= bounds.end {
            return Err(RangeError::OutOfBounds { pfn: self.start });
        }
        if self.end > bounds.end {
            return Err(RangeError::OutOfBounds { pfn: bounds.end });
        }
        Ok(())
    }

    /// The pages of the range, one by one. Meant for tests and reference models; production
    /// code works on blocks (see [`crate::Geometry::blocks`]).
    pub fn pfns(&self) -> impl DoubleEndedIterator<Item = Pfn> + use<> {
        (self.start.0..self.end.0).map(Pfn)
    }
}

impl fmt::Debug for PfnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PfnRange({:#x}..{:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for PfnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfns {:#x}..{:#x}", self.start.0, self.end.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(a: u64, b: u64) -> PfnRange {
        PfnRange::new(Pfn(a), Pfn(b)).unwrap()
    }

    #[test]
    fn constructors_reject_empty_and_overflow() {
        assert_eq!(
            PfnRange::new(Pfn(5), Pfn(5)),
            Err(RangeError::Empty {
                start: Pfn(5),
                end: Pfn(5)
            })
        );
        assert!(matches!(
            PfnRange::new(Pfn(6), Pfn(5)),
            Err(RangeError::Empty { .. })
        ));
        assert!(matches!(
            PfnRange::from_len(Pfn(1), 0),
            Err(RangeError::Empty { .. })
        ));
        assert_eq!(
            PfnRange::from_len(Pfn(u64::MAX), 1),
            Err(RangeError::Overflow {
                start: Pfn(u64::MAX),
                pages: 1
            })
        );
        assert!(matches!(
            PfnRange::new(Pfn(0), Pfn(PFN_LIMIT.0 + 1)),
            Err(RangeError::Overflow { .. })
        ));
        assert!(PfnRange::new(Pfn(0), PFN_LIMIT).is_ok());
        assert_eq!(PfnRange::from_len(Pfn(3), 4).unwrap(), r(3, 7));
        assert_eq!(PfnRange::page(Pfn(9)).unwrap().len(), 1);
    }

    #[test]
    fn accessors() {
        let x = r(10, 20);
        assert_eq!(x.len(), 10);
        assert_eq!(x.last(), Pfn(19));
        assert!(x.contains(Pfn(10)) && x.contains(Pfn(19)));
        assert!(!x.contains(Pfn(20)) && !x.contains(Pfn(9)));
        assert!(x.contains_range(&r(10, 20)) && !x.contains_range(&r(9, 12)));
        assert_eq!(x.to_string(), "pfns 0xa..0x14");
    }

    #[test]
    fn split_at_bounds() {
        let x = r(10, 20);
        assert_eq!(x.split_at(Pfn(15)).unwrap(), (r(10, 15), r(15, 20)));
        assert_eq!(
            x.split_at(Pfn(10)),
            Err(RangeError::OutOfBounds { pfn: Pfn(10) })
        );
        assert_eq!(
            x.split_at(Pfn(20)),
            Err(RangeError::OutOfBounds { pfn: Pfn(20) })
        );
    }

    #[test]
    fn alignment_and_bounds_checks_name_the_pfn() {
        let x = r(512, 1025);
        assert!(!x.is_aligned_to(512));
        assert_eq!(
            x.check_aligned_to(512),
            Err(RangeError::Unaligned {
                pfn: Pfn(1025),
                align_pages: 512
            })
        );
        assert_eq!(r(512, 1024).check_aligned_to(512), Ok(()));
        let bounds = r(100, 200);
        assert_eq!(
            r(150, 250).check_within(&bounds),
            Err(RangeError::OutOfBounds { pfn: Pfn(200) })
        );
        assert_eq!(
            r(50, 150).check_within(&bounds),
            Err(RangeError::OutOfBounds { pfn: Pfn(50) })
        );
        assert_eq!(r(100, 200).check_within(&bounds), Ok(()));
    }

    proptest! {
        #[test]
        fn overlap_and_intersection_agree_with_page_sets(a in 0u64..64, la in 1u64..32, b in 0u64..64, lb in 1u64..32) {
            let x = PfnRange::from_len(Pfn(a), la).unwrap();
            let y = PfnRange::from_len(Pfn(b), lb).unwrap();
            let common: Vec<Pfn> = x.pfns().filter(|p| y.contains(*p)).collect();
            prop_assert_eq!(x.overlaps(&y), !common.is_empty());
            prop_assert_eq!(y.overlaps(&x), !common.is_empty());
            match x.intersection(&y) {
                Some(i) => prop_assert_eq!(i.pfns().collect::<Vec<_>>(), common),
                None => prop_assert!(common.is_empty()),
            }
        }
    }
}
