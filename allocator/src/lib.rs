//! # pfnstore-allocator: a lock-sharded allocator of PFN ranges
//!
//! pfnstore hands physical page ranges to VMs. This crate decides which ones, keeping at most
//! two bits per 4 KiB page and only where pages of one 2 MiB block differ (a free or wholly
//! allocated 2 MiB or 1 GiB block costs a bit or two, not 512 or 262,144), and keeping huge
//! mappings possible.
//!
//! ## Concepts
//!
//! * **Chunks.** Memory arrives in chunks (1 GiB on x86-64: the largest block of the
//!   [`Geometry`](pfnstore_core::Geometry)), added with [`Allocator::add_chunk`] as the memory
//!   source grows and removed with [`Allocator::remove_chunk`] once wholly free.
//! * **Shards.** Each chunk belongs to one shard; a shard has its own lock (built from
//!   [`pfnstore_core::sync`]'s atomics, so loom can check it) and its own pages. A thread
//!   allocates from its *home shard* (by thread index, or a [`ShardHint`]) and *steals* from
//!   the other shards, one lock at a time, only when its own cannot serve. Frees, scrub
//!   reports and quarantines go to the shard that owns the range; a range never spans shards.
//! * **Blocks and pages.** A chunk is wholly free, wholly allocated, or split into mid blocks
//!   (2 MiB), each wholly free, wholly allocated, or *mixed*: a bitmap of allocated pages, and
//!   where needed a second one that marks where allocations start and which free pages are
//!   clean. The start marks are what lets `free` validate a range without a record per
//!   allocation. Per chunk and per shard, counts and small bitmaps say where whole free
//!   blocks and partly used blocks are, so every search for a block is a few word scans.
//! * **Dirty tracking.** Freed pages are dirty: they held a VM's data. An [`Allocation`]
//!   lists its dirty sub-ranges ([`DirtyRanges`]: a slice, with no heap allocation in the
//!   usual all-dirty or all-clean case) so that the caller scrubs exactly those; scrubbed
//!   free pages are reported back with [`Allocator::mark_clean`]; a request can ask for
//!   clean pages only ([`AllocRequest::clean_only`]); [`Allocator::cancel`] gives an unused
//!   allocation back exactly as it came. Chunks are added clean or dirty.
//! * **Quarantine.** Allocated pages that must never be reused (their unmap failed) are
//!   handed back with [`Allocator::quarantine`]: they stay out of use and accounted.
//!
//! Free, allocated and quarantined pages tile the shard's chunks exactly, which
//! [`Allocator::check_invariants`] verifies and [`Allocator::stats`] reports.
//!
//! ## Placement
//!
//! * A 4 KiB request takes the first free page of the shard's *cursor*, the mid block small
//!   requests carve from (LLFree's reserved block, per shard); when it is full, a partly used
//!   block becomes the cursor, and only when none has room is a whole free block broken
//!   (in a partly used chunk first). Other small requests search the same way for a run
//!   that fits inside one block.
//! * A 2 MiB request takes a whole free mid block, from a partly used chunk when there is
//!   one, so that whole free chunks stay whole for 1 GiB requests.
//! * A 1 GiB request takes a whole free chunk.
//! * Anything else (several blocks, odd alignments, clean-only requests, small runs that only
//!   fit across a block boundary) takes the first fit in address order.
//!
//! The rules are exact: `alloc` fails with [`AllocError::OutOfMemory`] only when no shard it
//! may use has a fitting free range. A 2 MiB or 1 GiB request that fails does so in O(1)
//! (the counts say there is no whole free block); the walk is only for the rare shapes
//! above. The details are in `IMPLEMENTATION.md` beside this crate.
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
//! let allocator = Allocator::new(AllocatorConfig::new(geometry, 2)).unwrap();
//! allocator.add_chunk(Pfn(0), true).unwrap();
//! let two_meg = allocator
//!     .alloc(AllocRequest::new(geometry.mid_pages()).aligned(geometry.mid_pages()))
//!     .unwrap();
//! assert!(two_meg.is_dirty()); // the chunk was added dirty: scrub before use
//! allocator.free(two_meg.range).unwrap();
//! allocator.check_invariants().unwrap();
//! ```

// The only unsafe code is the shard lock's `UnsafeCell` access (`lock.rs`), allowed there.
#![deny(unsafe_code)]

mod allocator;
mod bits;
mod chunk;
mod error;
#[allow(unsafe_code)] // SAFETY arguments are on each block in the module.
mod lock;
mod request;
mod shape;
mod shard;
mod stats;

pub use allocator::{Allocator, AllocatorConfig};
pub use error::AllocError;
pub use request::{AllocRequest, Allocation, DirtyRanges, ShardHint, ShardId};
pub use stats::{AllocatorStats, Usage};
