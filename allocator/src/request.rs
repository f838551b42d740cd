//! The vocabulary of a request and its answer.

use std::fmt;

use pfnstore_core::PfnRange;

/// The index of a shard, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}

/// Which shard an allocation starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardHint {
    /// The calling thread's home shard; the others are tried (stolen from) if it cannot serve.
    #[default]
    Home,
    /// This shard first (e.g. the one on the caller's NUMA node), then the others.
    Shard(ShardId),
    /// This shard only: fail rather than take memory from another shard.
    Only(ShardId),
}

/// What `alloc` is asked for. Built with [`AllocRequest::new`] and the builder methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Number of 4 KiB pages; not zero.
    pub pages: u64,
    /// Alignment of the first page, in pages: a power of two, at most a chunk.
    pub align_pages: u64,
    /// Take only pages that are clean (never used, or scrubbed and reported with
    /// `mark_clean`), so that the caller need not scrub anything.
    pub clean_only: bool,
    /// Where to start looking.
    pub hint: ShardHint,
}

impl AllocRequest {
    /// `pages` pages, no alignment, dirty pages allowed, home shard first.
    pub const fn new(pages: u64) -> AllocRequest {
        AllocRequest {
            pages,
            align_pages: 1,
            clean_only: false,
            hint: ShardHint::Home,
        }
    }

    /// Sets the alignment (in pages).
    pub const fn aligned(mut self, align_pages: u64) -> AllocRequest {
        self.align_pages = align_pages;
        self
    }

    /// Asks for clean pages only.
    pub const fn clean_only(mut self) -> AllocRequest {
        self.clean_only = true;
        self
    }

    /// Sets where to start looking.
    pub const fn hint(mut self, hint: ShardHint) -> AllocRequest {
        self.hint = hint;
        self
    }
}

/// A range handed out by `alloc` or `alloc_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The pages, now owned by the caller.
    pub range: PfnRange,
    /// The shard that owns them (where `free` will take them back).
    pub shard: ShardId,
    /// The parts of `range` that held someone else's data and must be scrubbed before the
    /// memory is given to anyone: ascending, disjoint, not adjacent. Empty if all is clean.
    pub dirty: Vec<PfnRange>,
}

impl Allocation {
    /// Whether any page needs scrubbing.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Pages that need scrubbing.
    pub fn dirty_pages(&self) -> u64 {
        self.dirty.iter().map(PfnRange::len).sum()
    }
}
