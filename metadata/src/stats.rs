//! Store statistics.

/// Counts and sizes of a store, measured by walking its chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunks being managed.
    pub managed_chunks: u64,
    /// Records: one per managed chunk, plus one per shareability flip, plus one per extra
    /// coarse run (a uniform chunk is one node).
    pub nodes: u64,
    /// `table_bytes + heap_bytes`: everything the store owns.
    pub bytes: u64,
    /// The chunk-slot table (64 bytes per chunk of the span, managed or not).
    pub table_bytes: u64,
    /// Heap bytes of fragmented chunks (exact sizes requested from the allocator).
    pub heap_bytes: u64,
    /// Managed pages that are shared.
    pub shared_pages: u64,
    /// Managed pages that are private.
    pub private_pages: u64,
    /// Pages with at least one pin.
    pub pinned_pages: u64,
    /// Quarantined pages.
    pub quarantined_pages: u64,
    /// Pages that need a scrub.
    pub dirty_pages: u64,
    /// Pages that belong to a file.
    pub owned_pages: u64,
}
