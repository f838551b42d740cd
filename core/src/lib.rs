//! # pfnstore-core: the vocabulary every pfnstore crate shares
//!
//! * [`Pfn`] and [`PfnRange`]: 4 KiB page frame numbers and half-open, never-empty ranges of
//!   them. Every public operation in pfnstore takes these, so validation (emptiness, overflow)
//!   happens once, at construction.
//! * [`PageSize`] and [`Geometry`]: the three mapping levels (4K/2M/1G on x86-64, scaled-down
//!   levels in tests) and the decomposition of any range into maximal naturally aligned blocks,
//!   [`Geometry::blocks`] and the compact [`Geometry::block_runs`] (at most five runs for any
//!   range).
//! * [`RangeError`]: the validation errors every crate shares; each names the offending PFN.
//! * [`sync`]: the sync facade. Crates that run concurrently (allocator, metadata, the facade)
//!   take every lock, atomic and thread from here, so that the loom models can swap them all.
//! * [`testing`]: how a test that cannot run on this machine reports itself as skipped, a
//!   counting global allocator for tests and benches that measure bytes held, and the
//!   deterministic xorshift generator they share.
//!
//! This crate has no OS dependencies and no `unsafe` beyond what the sync facade's
//! `UnsafeCell` wrapper passes through to its callers and the counting allocator's forwarding
//! to the system allocator.

// The only unsafe code is the test-support counting allocator (`testing.rs`), allowed there.
#![deny(unsafe_code)]

mod error;
mod geometry;
mod pfn;
mod range;
pub mod sync;
#[doc(hidden)]
#[allow(unsafe_code)] // SAFETY arguments are on each block in the module.
pub mod testing;

pub use error::{GeometryError, RangeError};
pub use geometry::{Block, BlockRun, BlockRuns, Blocks, Geometry, PageSize};
pub use pfn::{PAGE_SHIFT, PAGE_SIZE, PFN_LIMIT, PageIndex, PageOffset, Pfn};
pub use range::{OffsetRange, PageRange, PfnRange};
