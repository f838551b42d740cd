//! Accounting and fragmentation figures, per shard and in total.

/// The state of one shard's pages, or of all shards summed ([`AllocatorStats::total`]).
///
/// `free_pages + allocated_pages + quarantined_pages == total_pages` always holds for one
/// shard; the total of a running allocator sums shards read one after another, so it is
/// exact only while no other thread changes the allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Chunks owned.
    pub chunks: u64,
    /// Pages in those chunks.
    pub total_pages: u64,
    /// Pages that can be allocated.
    pub free_pages: u64,
    /// Free pages that must be scrubbed before use (free but not clean).
    pub dirty_pages: u64,
    /// Pages handed out.
    pub allocated_pages: u64,
    /// Pages taken out of use for good.
    pub quarantined_pages: u64,
    /// Maximal free runs.
    pub free_extents: u64,
    /// Allocation records (one per allocation, more after punched holes).
    pub allocated_extents: u64,
    /// Maximal quarantined runs.
    pub quarantined_extents: u64,
    /// Pages in the longest free run.
    pub largest_free_extent: u64,
    /// The most pages a mid-aligned request could get (from a mid boundary to a run's end).
    pub largest_free_mid_aligned: u64,
    /// The most pages a chunk-aligned request could get.
    pub largest_free_chunk_aligned: u64,
    /// Whole, aligned free middle blocks (2 MiB on x86-64).
    pub free_mid_blocks: u64,
    /// Whole free chunks (1 GiB on x86-64).
    pub free_chunks: u64,
}

impl Usage {
    /// Adds `other`'s counts to these and keeps the larger of each maximum.
    pub fn absorb(&mut self, other: &Usage) {
        self.chunks += other.chunks;
        self.total_pages += other.total_pages;
        self.free_pages += other.free_pages;
        self.dirty_pages += other.dirty_pages;
        self.allocated_pages += other.allocated_pages;
        self.quarantined_pages += other.quarantined_pages;
        self.free_extents += other.free_extents;
        self.allocated_extents += other.allocated_extents;
        self.quarantined_extents += other.quarantined_extents;
        self.largest_free_extent = self.largest_free_extent.max(other.largest_free_extent);
        self.largest_free_mid_aligned = self
            .largest_free_mid_aligned
            .max(other.largest_free_mid_aligned);
        self.largest_free_chunk_aligned = self
            .largest_free_chunk_aligned
            .max(other.largest_free_chunk_aligned);
        self.free_mid_blocks += other.free_mid_blocks;
        self.free_chunks += other.free_chunks;
    }
}

/// [`Usage`] of each shard (indexed by shard) and of all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// One entry per shard.
    pub shards: Vec<Usage>,
    /// The sum over shards.
    pub total: Usage,
}
