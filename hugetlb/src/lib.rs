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
//! back the added pages when the source is dropped (after its memory is unmapped). Pools are
//! shared with every other process, so every read-modify-write holds a lock all pfnstore
//! processes honour (`flock` on `/run/pfnstore/hugetlb-pool.lock`), and giving back takes only
//! what was added and is free now. A growth also outlives its owner's death (SIGKILL, an OOM
//! kill, `std::process::exit`): it is written to a ledger under `/run/pfnstore` and watched by
//! a guardian process that gives it back when the owner dies, and [`pool::reconcile`] settles
//! what is left over. The [`pool`] docs tell the protocol.
//!
//! ## PFNs are a snapshot: hugetlb page migration
//!
//! A chunk's PFN is read from pagemap once. On kernels with hugepage migration (x86-64 and
//! arm64 have it) the kernel may later *move* a hugetlb page to another frame: contiguous-range
//! allocation (`alloc_contig_range`, which growing a 1 GiB pool or a CMA allocation uses, and
//! which since Linux 5.16 migrates in-use hugetlb pages out of its way), memory offlining
//! (hot-unplug, `ZONE_MOVABLE`), soft-offlining of a page with corrected memory errors, and
//! NUMA calls such as `move_pages`/`mbind(MPOL_MF_MOVE)` by anyone allowed to. The virtual
//! mappings stay valid
//! (the data moves with them), so nothing faults, but a PFN recorded earlier then names a
//! frame the memory no longer occupies: a device programmed with it (DMA, an IOMMU mapping
//! made from PFNs rather than from the virtual address) or a confidential-computing RMP/PAMT
//! entry would be stale. `mlock` does not prevent migration (hugetlb pages are never swapped
//! anyway); a long-term pin (`FOLL_LONGTERM`, as VFIO and iommufd take when they map the
//! virtual address) does, after first moving the page out of movable memory. pfnstore does not
//! pin pages itself; [`HugetlbSource::verify_pfns`] re-reads pagemap and names the first chunk
//! whose frame changed ([`HugetlbError::PfnMoved`]), for callers (such as live update) that
//! must know the PFNs are still true. A page punched out and written again is also a new frame.
//!
//! ## Handing a source to another process
//!
//! A live update hands a running store to a new process without touching guest memory:
//! [`MemorySource::handover_record`] writes a source down as plain data ([`SourceRecord`]: page size,
//! geometry, memfd length, each chunk's PFN and memfd offset, holes, the pool growth it owns),
//! the memfd travels as a descriptor, and [`rebuild`] makes the source again in the receiving
//! process: it maps the memfd without copying, zeroing or allocating, re-reads real PFNs through
//! pagemap and checks them against the record ([`HugetlbError::PfnMoved`] names the first that
//! differs), and takes the pool growth over through the ledger, so that the pool is given back
//! when the new owner drops the source. [`MemorySource::relinquish`] then makes the old source
//! give nothing back. The [`handover`] and [`pool`] docs tell the protocol.
//!
//! ## Host mappings: views and file mappings
//!
//! [`MemorySource::memfd`] gives a source's memfd ([`Memfd`]: descriptor, page size,
//! length), for mappings the VMM makes of it:
//!
//! * A [`HostView`] ([`HostView::from_memfd`], or [`HugetlbSource::map_view`]) maps the whole
//!   memfd a second time, for the store's own accesses: bounds-checked reads and writes,
//!   restriction per huge page ([`HostView::protect`], mprotect) and giving memory back
//!   ([`HostView::punch_hole`], `fallocate(PUNCH_HOLE)`), so that the facade needs no
//!   `unsafe`.
//! * A [`FileMapping`] is one contiguous virtual range per guest-memory file, stable for the
//!   file's life (a KVM memory slot, a vhost-user region): an aligned, inaccessible
//!   reservation into which the file's extents are mapped from the memfd in any order, and
//!   unmapped or revoked again, with every access checked against what is mapped there.
//!
//! Both copy guest bytes with relaxed 8-byte atomics only (partial words by compare-exchange),
//! never plain `memcpy`: guest memory is written concurrently by the guest, devices and other
//! threads, and a racing non-atomic copy would be a data race. Every mapping and protection
//! boundary is a kernel memory region, limited by `vm.max_map_count`; file mappings count
//! theirs against a [`VmaBudget`] and refuse a change that would exceed it before making it
//! ([`HugetlbError::MapCountLimit`], also what an `ENOMEM` of `mprotect` becomes).
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
//! ## Testing
//!
//! [`testing`] holds the lock and helpers every test that resizes a hugetlb pool uses, and
//! [`testing::ShuffledSource`], a source whose memfd holds its chunks in another order than
//! their PFNs (as real hugetlb pages are), for tests that must not assume memfd order.

mod backing;
mod config;
mod error;
pub mod fd_passing;
mod file_mapping;
mod guest_copy;
pub mod handover;
mod host_view;
mod hugetlb_source;
mod memfd;
mod page_size;
pub mod pagemap;
pub mod pool;
pub mod preview;
mod report;
mod source;
mod synthetic;
#[doc(hidden)]
#[cfg(not(pfnstore_loom))]
pub mod testing;
pub mod vma;

pub use backing::MEMFD_NAME_PREFIX;
pub use config::{HugetlbConfig, Prefault};
pub use error::{HugetlbError, PagemapProblem};
pub use file_mapping::{FileMapping, MappingState};
pub use handover::{
    ChunkRecord, GrowthRecord, RecordProblem, RequestRecord, SourceKind, SourceRecord, rebuild,
};
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
