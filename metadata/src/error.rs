//! The errors of the metadata store. Every variant names the first offending PFN.

use pfnstore_core::{Pfn, RangeError};

use crate::{FileId, PinOwner};

/// Why a metadata operation was refused. A refused operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The range is empty, unaligned, overflowing or outside the store's span.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The span would need more chunk slots than the store supports.
    #[error("a span of {chunks} chunks exceeds the limit of {max}")]
    SpanTooLarge {
        /// The chunks the span would need.
        chunks: u64,
        /// The most chunks a store supports.
        max: u64,
    },
    /// `pfn` lies in a chunk of the span that is not managed (see `add_chunk`).
    #[error("{pfn} is not in a managed chunk")]
    NotManaged {
        /// The first page outside every managed chunk.
        pfn: Pfn,
    },
    /// The chunk at `base` is already managed.
    #[error("the chunk at {base} is already managed")]
    AlreadyManaged {
        /// The first page of the chunk.
        base: Pfn,
    },
    /// `first_pfn` is pinned by `owner` (the smallest owner pinning it).
    #[error("{first_pfn} is pinned by {owner}")]
    Pinned {
        /// The first pinned page.
        first_pfn: Pfn,
        /// The smallest owner pinning it.
        owner: PinOwner,
    },
    /// `first_pfn` is quarantined.
    #[error("{first_pfn} is quarantined")]
    Quarantined {
        /// The first quarantined page.
        first_pfn: Pfn,
    },
    /// `first_pfn` holds no pin by `owner`.
    #[error("{first_pfn} is not pinned by {owner}")]
    NotPinned {
        /// The first page without the pin.
        first_pfn: Pfn,
        /// The owner whose pin is missing.
        owner: PinOwner,
    },
    /// `owner`'s pin count on `first_pfn` would overflow.
    #[error("the pin count of {owner} on {first_pfn} would overflow")]
    PinOverflow {
        /// The first page whose count would overflow.
        first_pfn: Pfn,
        /// The owner whose count would overflow.
        owner: PinOwner,
    },
    /// `first_pfn` already belongs to `owner`.
    #[error("{first_pfn} already belongs to {owner}")]
    AlreadyOwned {
        /// The first page already owned.
        first_pfn: Pfn,
        /// The file that owns it.
        owner: FileId,
    },
    /// `first_pfn` does not belong to `expected` (it belongs to `found`, or to nobody).
    #[error("{first_pfn} belongs to {found:?}, not to {expected}")]
    NotOwner {
        /// The first page not owned by `expected`.
        first_pfn: Pfn,
        /// The owner the caller named.
        expected: FileId,
        /// Its actual owner, if any.
        found: Option<FileId>,
    },
    /// The range spans two owners: `first_pfn` belongs to `found`, the range's start to `first`.
    #[error("the range spans files: {first_pfn} belongs to {found:?}, its start to {first:?}")]
    SpansFiles {
        /// The first page with a different owner.
        first_pfn: Pfn,
        /// The owner of the range's first page.
        first: Option<FileId>,
        /// The owner of `first_pfn`.
        found: Option<FileId>,
    },
}
