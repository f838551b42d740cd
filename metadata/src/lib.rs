//! # pfnstore-metadata: per-range attributes of physical memory, without per-page metadata
//!
//! A [`MetadataStore`] records, for every page of the chunks it manages, the attributes of
//! pfnstore's contract: [`Shareability`] (shared with the host or private to the guest), pins
//! ([`PinSet`]: owner → count, owners may overlap), quarantine (with a
//! [`QuarantineReason`]), dirty (needs a scrub before reuse) and the owning file ([`FileId`]).
//! It never stores anything per 4K page unless the memory really is fragmented at 4K, and
//! even then never more than a one-bit-per-page bitmap would.
//!
//! ## Chunks are the shards
//!
//! The store covers a chunk-aligned PFN *span* fixed at construction and keeps one 64-byte,
//! cache-line-aligned slot per chunk of it (a 16 TiB span of 1G chunks is 1 MiB of slots).
//! Chunks become *managed* with [`MetadataStore::add_chunk`]. Each slot holds the chunk's lock
//! (from [`pfnstore_core::sync`]), a lock-free summary word, and the chunk's state, which for a
//! uniform chunk is entirely inline: a uniform GiB costs those 64 bytes and nothing else.
//!
//! The state has two planes (see `IMPLEMENTATION.md` for the details and the memory math):
//!
//! * **shareability**, the attribute that fragments at 4K: uniform, a few flip offsets inline,
//!   a list of flip offsets (with a per-middle-block index once it is long), or a bitmap,
//!   chosen by the number of flips alone;
//! * **coarse** attributes (owner, quarantine, dirty, pins): a run list, inline when uniform.
//!
//! Both are *canonical*: the representation is a function of the content, equal adjacent runs
//! are always merged, and converting everything back restores the exact uniform form and
//! byte count. [`MetadataStore::check_invariants`] verifies this.
//!
//! ## Mapping attributes
//!
//! [`MetadataStore::max_mapping_size`], [`MetadataStore::block_layout`] and [`MappingChange`]
//! consider only the [`MappingAttributes`]: shareability, owner (a huge mapping cannot span two
//! files) and whether the memory is quarantined. Pins and scrub state do **not** make a block
//! non-uniform: a DMA pin on one 4K page must not split KVM's 1G mapping.
//!
//! ## Mutations
//!
//! [`MetadataStore::set_shareability`], [`MetadataStore::pin`]/[`MetadataStore::unpin`],
//! [`MetadataStore::quarantine`], [`MetadataStore::set_dirty`],
//! [`MetadataStore::assign_owner`]/[`MetadataStore::release_owner`] are all-or-nothing: the
//! whole range is validated with its chunks locked, and a refused call changes nothing. Errors
//! name the first offending page (ascending); when one page fails several checks, the check
//! listed first in the method's docs wins. Every mutation returns a [`MappingChange`]: the
//! blocks that lost their uniformity (split) and those that regained it (merge), in the same
//! call — converting the 4K page back merges the 1G block at once.
//!
//! ## Lock order
//!
//! There is one lock per chunk. An operation on a range takes the locks of all its chunks
//! **in ascending PFN order** (write locks for mutations, read locks for `ranges`,
//! `block_layout`, `owner_of`), holds them until it returns, and never takes a chunk lock while
//! holding a lock of a higher chunk. No user code runs under a chunk lock. `stats` and
//! `check_invariants` take one read lock at a time.
//!
//! ## The fault path
//!
//! `max_mapping_size` reads the chunk's summary word with one atomic load: a bit saying the
//! chunk is mapping-uniform, 32 bits saying that every middle block of a group (1/32 of the
//! chunk) is, and 16 bits saying that *no* middle block of a larger group (1/16 of the chunk)
//! is. When a bit answers for `pfn` (1G, 2M or 4K), no lock is taken; otherwise the chunk's
//! read lock is taken, and a fragmented chunk answers from its *mid index* (one bit per middle
//! block, kept with long flip lists) with one load, a lightly fragmented one with an O(log n)
//! search of its short list. The summary is written only under the chunk's
//! write lock, after the state changed, with release ordering: a lock-free reader sees the
//! summary of the state before or after a concurrent mutation, each exact for its state.
//!
//! ## The conversion fast path
//!
//! A shareability change inside one chunk whose coarse attributes are uniform and whose
//! shareability has at most four flips before and after (a uniform 1G with a few converted 4K
//! pages) computes its splits, merges and summary word from the two flip arrays, packed in
//! registers, without a heap allocation; everything else takes the general path, which gives
//! the same results.
//!
//! ## Testing support
//!
//! [`reference::ReferenceStore`] is a naive per-page array with the same API and errors. The
//! property tests compare the two after every step; other crates' tests and the benches may use
//! it as the "struct page" model.

// Range trees and bitmaps need no unsafe code; keep it that way.
#![forbid(unsafe_code)]

mod attrs;
mod change;
mod chunk;
mod coarse_plane;
pub mod conversion;
mod error;
mod fast_convert;
mod inline_vec;
mod layout;
#[cfg(all(test, pfnstore_loom))]
mod loom_models;
mod packed;
#[doc(hidden)]
pub mod reference;
mod share_plane;
mod stats;
mod store;
mod summary;

pub use attrs::{
    Attributes, FileId, MappingAttributes, PinOwner, PinSet, QuarantineReason, Shareability,
};
pub use change::MappingChange;
pub(crate) use change::Transition;
pub use error::MetadataError;
pub use layout::BlockLayout;
pub use stats::Stats;
pub use store::{MAX_CHUNKS, MetadataStore};

#[cfg(all(test, not(pfnstore_loom)))]
mod layout_tests {
    use super::*;

    #[test]
    fn a_uniform_chunk_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<chunk::ChunkState>(), 48);
        assert_eq!(store::slot_size(), 64);
    }
}
