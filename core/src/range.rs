//! Half-open, non-empty page ranges: of frames ([`PfnRange`]) or of file pages ([`OffsetRange`]).

use std::fmt;

use crate::{PFN_LIMIT, PageIndex, PageOffset, Pfn, RangeError};

/// `[start, end)` in 4 KiB pages of one index space, never empty, and ending at or below
/// [`PFN_LIMIT`].
///
/// Because a range can only be built through validating constructors, code that receives one
/// never has to re-check emptiness or overflow.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange<K: PageIndex = Pfn> {
    start: K,
    end: K,
}

impl<K: PageIndex> Default for PageRange<K> {
    /// The first page alone (a placeholder for fixed-size storage, not a meaningful range).
    fn default() -> Self {
        PageRange {
            start: K::from_raw(0),
            end: K::from_raw(1),
        }
    }
}

/// A range of page frames.
pub type PfnRange = PageRange<Pfn>;

/// A range of pages of a guest-memory file (page offsets).
pub type OffsetRange = PageRange<PageOffset>;

impl<K: PageIndex> PageRange<K> {
    /// `[start, end)`; fails with [`RangeError::Empty`] if `end <= start` and with
    /// [`RangeError::Overflow`] if `end` lies beyond [`PFN_LIMIT`].
    pub fn new(start: K, end: K) -> Result<PageRange<K>, RangeError> {
        if end.raw() <= start.raw() {
            return Err(RangeError::Empty {
                start: Pfn(start.raw()),
                end: Pfn(end.raw()),
            });
        }
        if end.raw() > PFN_LIMIT.0 {
            return Err(RangeError::Overflow {
                start: Pfn(start.raw()),
                pages: end.raw() - start.raw(),
            });
        }
        Ok(PageRange { start, end })
    }

    /// For callers in this crate that derived `start < end <= PFN_LIMIT` from a valid range.
    pub(crate) fn new_unchecked(start: K, end: K) -> PageRange<K> {
        debug_assert!(start.raw() < end.raw() && end.raw() <= PFN_LIMIT.0);
        PageRange { start, end }
    }

    /// `pages` pages from `start`.
    pub fn from_len(start: K, pages: u64) -> Result<PageRange<K>, RangeError> {
        if pages == 0 {
            return Err(RangeError::Empty {
                start: Pfn(start.raw()),
                end: Pfn(start.raw()),
            });
        }
        match start.raw().checked_add(pages) {
            Some(end) if end <= PFN_LIMIT.0 => Ok(PageRange {
                start,
                end: K::from_raw(end),
            }),
            _ => Err(RangeError::Overflow {
                start: Pfn(start.raw()),
                pages,
            }),
        }
    }

    /// The single page `index`; fails at or beyond [`PFN_LIMIT`].
    pub fn page(index: K) -> Result<PageRange<K>, RangeError> {
        PageRange::from_len(index, 1)
    }

    /// First page.
    pub fn start(&self) -> K {
        self.start
    }

    /// One past the last page.
    pub fn end(&self) -> K {
        self.end
    }

    /// The last page (inclusive).
    pub fn last(&self) -> K {
        K::from_raw(self.end.raw() - 1)
    }

    /// Number of pages; never zero.
    #[allow(clippy::len_without_is_empty)] // a range is never empty
    pub fn len(&self) -> u64 {
        self.end.raw() - self.start.raw()
    }

    /// Whether `index` lies in the range.
    pub fn contains(&self, index: K) -> bool {
        self.start <= index && index < self.end
    }

    /// Whether all of `other` lies in the range.
    pub fn contains_range(&self, other: &PageRange<K>) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one page.
    pub fn overlaps(&self, other: &PageRange<K>) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The pages both ranges share, if any.
    pub fn intersection(&self, other: &PageRange<K>) -> Option<PageRange<K>> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        PageRange::new(start, end).ok()
    }

    /// The smallest range containing both.
    pub fn hull(&self, other: &PageRange<K>) -> PageRange<K> {
        PageRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// Splits into `[start, at)` and `[at, end)`; `at` must lie strictly inside.
    pub fn split_at(&self, at: K) -> Result<(PageRange<K>, PageRange<K>), RangeError> {
        if at <= self.start || at >= self.end {
            return Err(RangeError::OutOfBounds { pfn: Pfn(at.raw()) });
        }
        Ok((
            PageRange {
                start: self.start,
                end: at,
            },
            PageRange {
                start: at,
                end: self.end,
            },
        ))
    }

    /// Whether both ends are multiples of `pages` (a power of two).
    pub fn is_aligned_to(&self, pages: u64) -> bool {
        debug_assert!(pages.is_power_of_two());
        (self.start.raw() | self.end.raw()) & (pages - 1) == 0
    }

    /// The smallest range with both ends multiples of `pages` (a power of two) that contains
    /// this one. The end cannot overflow: [`PFN_LIMIT`] is aligned to every block size.
    pub fn align_out(&self, pages: u64) -> PageRange<K> {
        debug_assert!(pages.is_power_of_two() && pages <= PFN_LIMIT.0);
        let start = self.start.raw() & !(pages - 1);
        let end = (self.end.raw() + (pages - 1)) & !(pages - 1);
        PageRange {
            start: K::from_raw(start),
            end: K::from_raw(end.min(PFN_LIMIT.0)),
        }
    }

    /// Fails with [`RangeError::Unaligned`] naming the first misaligned end.
    pub fn check_aligned_to(&self, pages: u64) -> Result<(), RangeError> {
        for index in [self.start, self.end] {
            if index.raw() & (pages - 1) != 0 {
                return Err(RangeError::Unaligned {
                    pfn: Pfn(index.raw()),
                    align_pages: pages,
                });
            }
        }
        Ok(())
    }

    /// Fails with [`RangeError::OutOfBounds`] naming the first page of `self` outside `bounds`.
    pub fn check_within(&self, bounds: &PageRange<K>) -> Result<(), RangeError> {
        if self.start < bounds.start || self.start >= bounds.end {
            return Err(RangeError::OutOfBounds {
                pfn: Pfn(self.start.raw()),
            });
        }
        if self.end > bounds.end {
            return Err(RangeError::OutOfBounds {
                pfn: Pfn(bounds.end.raw()),
            });
        }
        Ok(())
    }

    /// The same numbers in another index space (a file's offsets as the keys of its metadata
    /// store, say).
    pub fn cast<L: PageIndex>(self) -> PageRange<L> {
        PageRange {
            start: L::from_raw(self.start.raw()),
            end: L::from_raw(self.end.raw()),
        }
    }

    /// The pages of the range, one by one. Meant for tests and reference models; production
    /// code works on blocks (see [`crate::Geometry::blocks`]).
    pub fn pages(&self) -> impl DoubleEndedIterator<Item = K> + use<K> {
        (self.start.raw()..self.end.raw()).map(K::from_raw)
    }
}

impl PfnRange {
    /// The PFNs of the range, one by one (see [`PageRange::pages`]).
    pub fn pfns(&self) -> impl DoubleEndedIterator<Item = Pfn> + use<> {
        self.pages()
    }
}

impl OffsetRange {
    /// The byte offsets `start..end` of the range.
    pub fn bytes(&self) -> std::ops::Range<u64> {
        self.start.byte()..self.end.byte()
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

impl fmt::Debug for OffsetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OffsetRange({:#x}..{:#x})",
            self.start.byte(),
            self.end.byte()
        )
    }
}

impl fmt::Display for OffsetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "offsets {:#x}..{:#x}",
            self.start.byte(),
            self.end.byte()
        )
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
