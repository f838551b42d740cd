//! # pfnstore-allocator: a lock-sharded allocator of PFN ranges
//!
//! pfnstore hands physical page ranges to VMs. This crate decides which ones, keeping only
//! per-extent metadata (a free gigabyte costs one record, not 262,144) and keeping huge
//! mappings possible.
//!
//! ## Concepts
//!
//! * **Chunks.** Memory arrives in chunks (1 GiB on x86-64: the largest block of the
//!   [`Geometry`](pfnstore_core::Geometry)), added with [`Allocator::add_chunk`] as the memory
//!   source grows and removed with [`Allocator::remove_chunk`] once wholly free.
//! * **Shards.** Each chunk belongs to one shard; a shard has its own lock (from
//!   [`pfnstore_core::sync`], so loom can check it) and its own runs. A thread allocates from
//!   its *home shard* (by thread index, or a [`ShardHint`]) and *steals* from the other
//!   shards, one lock at a time, only when its own cannot serve. Frees, scrub reports and
//!   quarantines go to the shard that owns the range; a range never spans shards.
//! * **Runs and records.** Per shard: maximal *free runs* (coalesced on free), the *clean*
//!   runs among them, one *allocation record* per allocation (split when a hole is punched)
//!   and *quarantined* runs. Together they tile the shard's chunks exactly, which
//!   [`Allocator::check_invariants`] verifies and [`Allocator::stats`] reports.
//! * **Dirty tracking.** Freed pages are dirty: they held a VM's data. An [`Allocation`]
//!   lists its dirty sub-ranges ([`DirtyRanges`]: a slice, with no heap allocation in the
//!   usual all-dirty or all-clean case) so that the caller scrubs exactly those; scrubbed
//!   free pages are reported back with [`Allocator::mark_clean`]; a request can ask for
//!   clean pages only ([`AllocRequest::clean_only`]). Chunks are added clean or dirty.
//! * **Quarantine.** Allocated pages that must never be reused (their unmap failed) are
//!   handed back with [`Allocator::quarantine`]: they stay out of use and accounted.
//!
//! ## Placement
//!
//! Free runs live in a treap per shard whose nodes carry, per subtree, the largest of five
//! capacities of a run (its length, its mid- and chunk-aligned lengths, the largest piece
//! that splits no free mid block, the largest mid-aligned piece outside free chunks). Each
//! rule is one O(log runs) descent for the lowest-addressed run with enough of one capacity,
//! so 10,000 holes cost a few more levels, not a walk:
//!
//! * a request of a chunk or more, or chunk-aligned, takes whole free chunks;
//! * a mid-aligned request (2 MiB) goes into a partly used chunk whenever one can hold it and
//!   breaks a free chunk only otherwise;
//! * a small request packs into already split mid blocks first, then splits a mid block of a
//!   partly used chunk, and breaks a free chunk last.
//!
//! For alignments of one page, a mid block or a chunk the rules are exact: `alloc` fails
//! with [`AllocError::OutOfMemory`] only when no shard it may use has a fitting free range.
//! The details are in `IMPLEMENTATION.md` beside this crate.
//!
//! ## Errors
//!
//! Every operation validates its input and returns an [`AllocError`] naming the offending
//! PFN; a failed operation changes nothing.
//!
//! ```
//! use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig};
//! use pfnstore_core::{Geometry, Pfn};
//!
//! let geometry = Geometry::X86_64;
//! let allocator = Allocator::new(AllocatorConfig { geometry, shards: 2 }).unwrap();
//! allocator.add_chunk(Pfn(0), true).unwrap();
//! let two_meg = allocator
//!     .alloc(AllocRequest::new(geometry.mid_pages()).aligned(geometry.mid_pages()))
//!     .unwrap();
//! assert!(two_meg.is_dirty()); // the chunk was added dirty: scrub before use
//! allocator.free(two_meg.range).unwrap();
//! allocator.check_invariants().unwrap();
//! ```

mod allocator;
mod bits;
mod chunk;
mod error;
mod lock;
mod request;
mod shape;
mod shard;
mod stats;

pub use allocator::{Allocator, AllocatorConfig};
pub use error::AllocError;
pub use request::{AllocRequest, Allocation, DirtyRanges, ShardHint, ShardId};
pub use stats::{AllocatorStats, Usage};
