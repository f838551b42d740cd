//! # pfnstore-hugetlb: where pfnstore's physical memory comes from
//!
//! A store manages *PFN ranges*; this crate produces them. A [`MemorySource`] is memory cut
//! into **chunks**: runs of PFNs as long as the source's [`Geometry`](pfnstore_core::Geometry) chunk, each naturally
//! aligned, each at a known byte offset of the source's memfd. The allocator and the metadata
//! store never see a source; the facade feeds them the chunks' base PFNs and uses
//! [`MemorySource::locate`] to turn a PFN back into a memfd offset.
//!
//! ## Sources
//!
//! * [`HugetlbSource`]: a memfd created with `MFD_HUGETLB | MFD_HUGE_1GB` (or `MFD_HUGE_2MB`),
//!   sized with ftruncate, mapped `MAP_SHARED`, prefaulted ([`Prefault`]), optionally bound to
//!   a NUMA node and mlocked. Its PFNs are read from `/proc/self/pagemap` and checked for
//!   every 4 KiB entry: present, the first naturally aligned to the huge page, the others
//!   contiguous. A chunk is one huge page, the largest run whose PFNs are known contiguous.
//! * [`SyntheticSource`]: chunks of any geometry with consecutive made-up PFNs and no memory,
//!   so that the allocator and metadata can be exercised at 16 TiB on a small machine.
//!
//! Every chunk says whether its PFNs are real: [`PfnKind::Real`], or
//! [`PfnKind::Synthetic`] with the [`SyntheticReason`] (ordinary pages, pagemap hiding PFNs
//! from a process without `CAP_SYS_ADMIN`, no prefault, or no memory at all).
//!
//! ## The fallback ladder
//!
//! A [`HugetlbConfig`] names a preferred page size; [`HugetlbSource::new`] tries it, then (unless
//! `strict`) 2 MiB pages, then ordinary memory. Each step is recorded in the
//! [`SourceReport`]: the pool as found, what was added to it, and the error with its errno
//! (`ENOMEM` from mmap when the pool is short, `EINVAL` when the kernel lacks the size,
//! `EPERM` when sysfs is not writable). On success the report is
//! [`MemorySource::report`]; when every step failed it is inside
//! [`HugetlbError::NoMemory`]. Ordinary memory gets synthetic PFNs and 1 GiB chunks (the
//! preferred size's chunk): its frames are scattered, so no real PFN run exists.
//!
//! ## Pools
//!
//! [`pool`] reads the system-wide and per-node pools in sysfs. A source grows a pool only if
//! `grow_pool` is set, by what is missing, through a [`pool::PoolReservation`] that gives
//! back exactly the added pages when the source is dropped (after its memory is unmapped).
//!
//! ## The host view
//!
//! [`HugetlbSource::map_view`] maps the memfd a second time: a [`HostView`] that the facade
//! reads and writes through bounds-checked calls, restricts per huge page
//! ([`HostView::protect`], mprotect) and gives memory back through
//! ([`HostView::punch_hole`], `fallocate(PUNCH_HOLE)`), so that the facade needs no `unsafe`.
//!
//! ## Prefaulting: why threads
//!
//! The cost of obtaining hugetlb memory is the kernel zeroing each page when it is first
//! faulted, on the faulting thread. `MAP_POPULATE` faults the whole mapping on the calling
//! thread; [`Prefault::Threads`] splits it into whole pages handed to a thread per core with
//! `MADV_POPULATE_WRITE`, so the zeroing scales with the cores (the `pfnstore prefault`
//! command measures both side by side). `MADV_POPULATE_WRITE` also reports failures, where
//! `MAP_POPULATE` silently leaves pages unpopulated; the pagemap check catches those.
//!
//! ## Testing on the real pools
//!
//! [`testing`] holds the lock and helpers every test that resizes a hugetlb pool uses.

mod backing;
mod config;
mod error;
mod file_mapping;
mod guest_copy;
mod host_view;
mod hugetlb_source;
mod memfd;
mod page_size;
pub mod pagemap;
pub mod plan;
pub mod pool;
mod report;
mod source;
mod synthetic;
#[cfg(not(pfnstore_loom))]
pub mod testing;
pub mod vma;

pub use backing::MEMFD_NAME_PREFIX;
pub use config::{HugetlbConfig, Prefault};
pub use error::{HugetlbError, PagemapProblem};
pub use file_mapping::{FileMapping, MappingState};
pub use host_view::{HostView, Protection};
pub use hugetlb_source::{HugetlbSource, SYNTHETIC_PFN_BASE};
pub use memfd::Memfd;
pub use page_size::HugePageSize;
pub use report::{LadderStep, SourceReport, StepFailure, StepKind, Timings};
pub use source::{
    Chunk, ChunkIndex, ChunkLocation, HostMapping, MemorySource, PfnKind, SyntheticReason,
};
pub use synthetic::SyntheticSource;
pub use vma::VmaBudget;
