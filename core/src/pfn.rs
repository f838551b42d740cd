//! Page frame numbers.

use std::fmt;

/// log2 of the base page size (4 KiB) that every PFN counts in.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// One past the highest PFN any range may reach: 64-bit byte addresses in 4 KiB pages.
///
/// Keeping every range below 2^52 means that byte addresses, block ends and chunk ends never
/// overflow, so no arithmetic on a validated range needs a checked operation.
pub const PFN_LIMIT: Pfn = Pfn(1 << (64 - PAGE_SHIFT));

/// A page frame number: the index of a 4 KiB page in a PFN space.
///
/// The PFN space is usually physical memory (PFNs read from `/proc/self/pagemap`), but the
/// metadata and allocator crates treat it as an abstract index space: synthetic PFNs, or page
/// offsets inside a guest-memory file, work the same way.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

/// The index types of page spaces: [`Pfn`] (frames) and [`PageOffset`] (pages of a file).
///
/// Ranges ([`crate::PageRange`]), blocks and block runs are generic over it, so that the same
/// geometry code serves both spaces while the type system keeps a file offset from being
/// passed where a frame is meant.
pub trait PageIndex:
    Copy + Ord + std::hash::Hash + Default + fmt::Debug + fmt::Display + Send + Sync + 'static
{
    /// The index with raw value `v`.
    fn from_raw(v: u64) -> Self;
    /// The raw value.
    fn raw(self) -> u64;
}

/// The arithmetic both index types share; `$t` is a `struct $t(pub u64)`.
macro_rules! page_index_impl {
    ($t:ident) => {
        impl $t {
            /// The raw number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + pages`, or `None` on overflow.
            pub const fn checked_add(self, pages: u64) -> Option<$t> {
                match self.0.checked_add(pages) {
                    Some(v) => Some($t(v)),
                    None => None,
                }
            }

            /// The number of pages from `earlier` to `self`, or `None` if `earlier` is after
            /// `self`.
            pub const fn checked_distance_from(self, earlier: $t) -> Option<u64> {
                self.0.checked_sub(earlier.0)
            }

            /// Whether this index is a multiple of `pages` (which must be a power of two).
            pub const fn is_aligned_to(self, pages: u64) -> bool {
                debug_assert!(pages.is_power_of_two());
                self.0 & (pages - 1) == 0
            }

            /// Rounds down to a multiple of `pages` (a power of two).
            pub const fn align_down(self, pages: u64) -> $t {
                debug_assert!(pages.is_power_of_two());
                $t(self.0 & !(pages - 1))
            }

            /// Rounds up to a multiple of `pages` (a power of two), or `None` on overflow.
            pub const fn checked_align_up(self, pages: u64) -> Option<$t> {
                debug_assert!(pages.is_power_of_two());
                match self.0.checked_add(pages - 1) {
                    Some(v) => Some($t(v & !(pages - 1))),
                    None => None,
                }
            }
        }

        impl PageIndex for $t {
            fn from_raw(v: u64) -> $t {
                $t(v)
            }
            fn raw(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $t {
            fn from(v: u64) -> $t {
                $t(v)
            }
        }

        impl From<$t> for u64 {
            fn from(p: $t) -> u64 {
                p.0
            }
        }
    };
}

page_index_impl!(Pfn);
page_index_impl!(PageOffset);

impl Pfn {
    /// The PFN of the page that contains byte address `addr`.
    pub const fn from_addr(addr: u64) -> Pfn {
        Pfn(addr >> PAGE_SHIFT)
    }

    /// The byte address of the first byte of this page, or `None` if it does not fit in a u64.
    pub const fn to_addr(self) -> Option<u64> {
        self.0.checked_mul(PAGE_SIZE)
    }
}

/// The index of a 4 KiB page inside a guest-memory file: byte offset / 4 KiB.
///
/// Shareability, pins and block plans of a file are keyed by page offset (what KVM calls a
/// gfn relative to the memory slot, what an IOMMU maps at an IOVA); the frames behind them
/// are [`Pfn`]s. Keeping the two apart in the types means a plan entry cannot be handed to
/// code that expects a frame.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageOffset(pub u64);

impl PageOffset {
    /// The page that contains byte offset `offset`.
    pub const fn from_byte(offset: u64) -> PageOffset {
        PageOffset(offset >> PAGE_SHIFT)
    }

    /// The byte offset of the page's first byte (saturating at `u64::MAX`, beyond any file).
    pub const fn byte(self) -> u64 {
        self.0.saturating_mul(PAGE_SIZE)
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

impl fmt::Debug for PageOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageOffset({:#x})", self.0)
    }
}

impl fmt::Display for PageOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offset {:#x}", self.byte())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_round_trip() {
        assert_eq!(Pfn::from_addr(0x4000_0000), Pfn(0x40000));
        assert_eq!(Pfn(0x40000).to_addr(), Some(0x4000_0000));
        assert_eq!(Pfn(u64::MAX).to_addr(), None);
        assert_eq!(Pfn::from_addr(0x1fff), Pfn(1));
    }

    #[test]
    fn alignment() {
        assert!(Pfn(512).is_aligned_to(512));
        assert!(!Pfn(513).is_aligned_to(512));
        assert_eq!(Pfn(1023).align_down(512), Pfn(512));
        assert_eq!(Pfn(513).checked_align_up(512), Some(Pfn(1024)));
        assert_eq!(Pfn(512).checked_align_up(512), Some(Pfn(512)));
        assert_eq!(Pfn(u64::MAX).checked_align_up(512), None);
    }

    #[test]
    fn arithmetic_and_display() {
        assert_eq!(Pfn(5).checked_add(3), Some(Pfn(8)));
        assert_eq!(Pfn(u64::MAX).checked_add(1), None);
        assert_eq!(Pfn(8).checked_distance_from(Pfn(5)), Some(3));
        assert_eq!(Pfn(5).checked_distance_from(Pfn(8)), None);
        assert_eq!(Pfn(0x40000).to_string(), "pfn 0x40000");
        assert_eq!(format!("{:?}", Pfn(16)), "Pfn(0x10)");
    }
}
