//! Errors shared by every pfnstore crate.
//!
//! Each crate has its own error enum for what only it can get wrong (a double free, a pinned
//! range, a missing hugetlb pool) and wraps [`RangeError`] for the validation they all share.
//! Every variant names the offending PFN so that a VMM can report it without guessing.

use crate::{PageSize, Pfn};

/// A PFN range that cannot be formed or is not acceptable where it was passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeError {
    /// `start..end` contains no page (`end <= start`).
    #[error("empty range starting at {start} (end {end})")]
    Empty {
        /// The first page of the range.
        start: Pfn,
        /// The end (exclusive) of the range.
        end: Pfn,
    },
    /// `start + pages` does not fit in the PFN space.
    #[error("range of {pages} pages starting at {start} overflows the PFN space")]
    Overflow {
        /// The first page of the range.
        start: Pfn,
        /// The length of the range in 4 KiB pages.
        pages: u64,
    },
    /// A boundary is not aligned as the operation requires.
    #[error("{pfn} is not aligned to {align_pages} pages")]
    Unaligned {
        /// The unaligned boundary.
        pfn: Pfn,
        /// The alignment required, in 4 KiB pages.
        align_pages: u64,
    },
    /// The range reaches outside what the callee manages; `pfn` is the first page outside.
    #[error("{pfn} is outside the managed PFN space")]
    OutOfBounds {
        /// The first page outside.
        pfn: Pfn,
    },
    /// A page-size request that does not fit the geometry.
    #[error("{size:?} is not a valid block size here")]
    BadPageSize {
        /// The size asked for.
        size: PageSize,
    },
}

/// A [`crate::Geometry`] that cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// The orders must satisfy `0 < mid_order < chunk_order <= 30`.
    #[error(
        "invalid geometry: mid order {mid_order}, chunk order {chunk_order} (need 0 < mid < chunk <= 30)"
    )]
    BadOrders {
        /// The order (log2 of 4 KiB pages) of a mid-size block.
        mid_order: u32,
        /// The order (log2 of 4 KiB pages) of a chunk.
        chunk_order: u32,
    },
}
