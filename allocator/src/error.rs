//! What the allocator rejects. Every variant names the offending PFN (or the offending
//! number); a failed operation has changed nothing.

use pfnstore_core::{Pfn, RangeError};

use crate::ShardId;

/// An allocator operation that was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// A range or chunk base that is malformed, unaligned or beyond the PFN space.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The configuration asks for no shards.
    #[error("an allocator needs at least one shard")]
    NoShards,
    /// A request for zero pages.
    #[error("a request for zero pages")]
    ZeroPages,
    /// An alignment that is not a power of two or is larger than a chunk.
    #[error("alignment of {align_pages} pages is not a power of two no larger than a chunk")]
    BadAlignment {
        /// The alignment asked for, in 4 KiB pages.
        align_pages: u64,
    },
    /// A shard index at or beyond the number of shards.
    #[error("{shard} does not exist")]
    NoSuchShard {
        /// The shard asked for.
        shard: ShardId,
    },
    /// A request larger than the largest shard holds, even when empty.
    #[error("{pages} pages is more than the largest shard holds ({largest_shard_pages} pages)")]
    TooLarge {
        /// The pages asked for.
        pages: u64,
        /// The pages of the largest shard.
        largest_shard_pages: u64,
    },
    /// No shard that the request may use has a free range that fits.
    #[error("no free range of {pages} pages aligned to {align_pages} pages")]
    OutOfMemory {
        /// The pages asked for.
        pages: u64,
        /// The alignment asked for, in 4 KiB pages.
        align_pages: u64,
    },
    /// `free` of a page that is already free.
    #[error("{pfn} is already free")]
    DoubleFree {
        /// The first page that is already free.
        pfn: Pfn,
    },
    /// `quarantine` of a page that is free.
    #[error("{pfn} is not allocated")]
    NotAllocated {
        /// The first page that is free.
        pfn: Pfn,
    },
    /// `free`/`quarantine` of a page that is quarantined and may never be reused.
    #[error("{pfn} is quarantined")]
    Quarantined {
        /// The first quarantined page.
        pfn: Pfn,
    },
    /// `free`/`quarantine` of a range that runs from one allocation into another: each
    /// allocation, or a part of one, is handed back on its own. `pfn` starts the second one.
    #[error("the range crosses into another allocation at {pfn}")]
    SpansAllocations {
        /// The first page of the second allocation.
        pfn: Pfn,
    },
    /// `alloc_at`/`mark_clean` of a page that is allocated or quarantined.
    #[error("{pfn} is not free")]
    NotFree {
        /// The first page that is not free.
        pfn: Pfn,
    },
    /// A page in no chunk of this allocator.
    #[error("{pfn} is not managed by this allocator")]
    NotManaged {
        /// The first page outside every chunk.
        pfn: Pfn,
    },
    /// A range that reaches from one shard's chunks into another's (`pfn` is the first page
    /// of the other shard). Ranges are always handled by the one shard that owns them.
    #[error("the range crosses into another shard at {pfn}")]
    CrossesShards {
        /// The first page of the other shard.
        pfn: Pfn,
    },
    /// `remove_chunk` of a chunk that is not wholly free; `pfn` is its first used page.
    #[error("chunk at {base} is in use (first used page {pfn})")]
    ChunkInUse {
        /// The first page of the chunk.
        base: Pfn,
        /// The chunk's first page in use.
        pfn: Pfn,
    },
    /// `add_chunk` of a chunk that is already managed.
    #[error("chunk at {pfn} is already managed")]
    Overlap {
        /// The first page of the chunk.
        pfn: Pfn,
    },
}
