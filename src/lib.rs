//! # pfnstore: backing store for confidential-VM guest memory
//!
//! A VMM embeds pfnstore to hold the memory of its confidential guests (TDX, SEV-SNP, pKVM,
//! CCA). pfnstore carves physical PFN ranges out of 1 GiB hugetlb pages, keeps their metadata
//! (shared/private, pins, quarantine, scrub state) in range trees rather than one record per
//! 4 KiB page, converts memory between shared and private in place, and tells every user of the
//! memory (KVM's MMU, an IOMMU mapper, the VMM's host view) through notifier callbacks.
//!
//! ## Concepts
//!
//! * A [`Store`] owns the memory: a [`pfnstore_hugetlb::MemorySource`] (hugetlb pages, or
//!   synthetic PFNs for scale), the lock-sharded allocator, and the physical metadata (which
//!   file owns a PFN, what needs scrubbing, what is quarantined).
//! * A [`GuestMemory`] file is what a VM's memory region is backed by (guest_memfd's
//!   counterpart). Shareability and pins belong to its *offsets*: converting offsets that have
//!   no memory yet is recorded and holds when memory arrives. Memory is allocated lazily (or
//!   eagerly), a block at a time, with PFNs aligned like the offsets so that it can be mapped
//!   huge.
//! * [`GuestMemory::convert`] is the conversion transaction of
//!   [`pfnstore_metadata::conversion`]: pin check, prepare (veto), commit with an exact block
//!   plan, immediate merges, quarantine on unmap failure.
//! * Subscribers ([`Subscriber`]) are the users of the memory; [`subscribers`] has two
//!   reference ones (an iommufd-like DMA mapper and a KVM-like MMU) that check the plans.
//! * The host view: [`GuestMemory::read`] and [`GuestMemory::write`] reach shared memory only;
//!   huge pages that are entirely private are also revoked (PROT_NONE) in the VMM's mapping.
//!
//! The crates underneath:
//!
//! * [`core`]: PFNs, ranges, block geometry, shared errors, the sync facade;
//! * [`hugetlb`]: where memory comes from;
//! * [`allocator`]: the lock-sharded PFN-range allocator;
//! * [`metadata`]: the range-tree metadata store and conversions.
//!
//! See ARCHITECTURE.md for the layering.
//!
//! ## What private means
//!
//! "Private" is pfnstore's own guarantee in this process, not the kernel's or the CPU's:
//!
//! * where a whole protection unit of a file's host mapping is private (the memfd's page, at
//!   least 2 MiB: 1 GiB on 1 GiB hugetlb pages), the unit is removed from the mapping
//!   (`PROT_NONE`): a host access faults, and KVM cannot map it for the guest either;
//! * everywhere else private pages are refused by the API only ([`GuestFile::read`],
//!   [`GuestFile::write`], [`GuestFile::host_view_address`], [`GuestFile::fault`], and the
//!   vm-memory adapter of the `vm-memory` feature): an address or slice taken before a page
//!   became private still reaches it while its unit holds a shared page, unless the holder
//!   pinned it ([`GuestFile::pin`]), which makes the conversion fail instead;
//! * the bytes stay ordinary memory of the store's memfd, reachable through any other mapping
//!   of it (a process the memfd is handed to, too), and are neither encrypted nor isolated.
//!
//! Kernel-enforced privacy needs guest_memfd private memory attributes
//! (`KVM_SET_MEMORY_ATTRIBUTES` with `KVM_MEMORY_ATTRIBUTE_PRIVATE`, or
//! `KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd in the in-place conversion series) on a VM
//! type that supports them (TDX, SEV-SNP, pKVM, CCA): the guest's private memory then comes
//! from a guest_memfd the host cannot map. A KVM that offers guest_memfd only with the `MMAP`
//! and `INIT_SHARED` flags and no private attributes (the one pfnstore is tested on) cannot
//! give a guest memory the host cannot reach. README.md, "What private means", has the
//! details.
//!
//! ## Example
//!
//! A store over synthetic memory (a hugetlb one is built with [`Store::from_hugetlb`]), one
//! 1 GiB file, an IOMMU-like subscriber, and a 4 KiB conversion inside the 1 GiB block:
//!
//! ```
//! use std::sync::Arc;
//! use pfnstore::core::{Geometry, PageSize, Pfn};
//! use pfnstore::hugetlb::SyntheticSource;
//! use pfnstore::subscribers::IommuMapper;
//! use pfnstore::{ConvertMode, FileOptions, Interest, Shareability, Store, StoreOptions, Subscriber};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = SyntheticSource::new(Geometry::X86_64, Pfn(0x100000), 2)?;
//! let store = Store::synthetic(source, StoreOptions::default())?;
//! let file = store.create_file(FileOptions::new(1 << 30).populated())?;
//!
//! let iommu = Arc::new(IommuMapper::new("vfio", store.geometry()));
//! let as_subscriber: Arc<dyn Subscriber> = iommu.clone();
//! let _registration = store.subscribe(&as_subscriber, Interest::File(file.id()));
//!
//! let done = file.convert(0x3e8000, 4096, Shareability::Shared, ConvertMode::Preserve)?;
//! assert_eq!(done.plan.unmap_blocks(), 1); // the 1 GiB mapping goes...
//! assert_eq!(done.plan.map_blocks(), 511 + 512); // ...511 x 2 MiB + 512 x 4 KiB come back
//! assert_eq!(iommu.mappings(), 1); // the one shared page is DMA-mapped
//! assert_eq!(file.max_mapping_size(0)?, PageSize::Size2M);
//!
//! file.convert(0x3e8000, 4096, Shareability::Private, ConvertMode::Zero)?;
//! assert_eq!(file.max_mapping_size(0)?, PageSize::Size1G); // merged back at once
//! # Ok(())
//! # }
//! ```

// The only unsafe code is the vm-memory region's raw host address (`vm_memory/region.rs`),
// allowed there; everything touching host memory lives in pfnstore-hugetlb.
#![deny(unsafe_code)]

pub use pfnstore_allocator as allocator;
pub use pfnstore_core as core;
pub use pfnstore_hugetlb as hugetlb;
pub use pfnstore_metadata as metadata;

pub use pfnstore_core::{OffsetRange, PageOffset};
pub use pfnstore_metadata::conversion::{
    Change, ChangeKind, ChangeOutcome, Interest, MappingPlan, PlanEntry, Registration, Subscriber,
    UnmapError, Veto,
};
pub use pfnstore_metadata::{FileId, PinOwner, QuarantineReason, Shareability};

mod config;
mod error;
mod file;
mod gate;
pub mod handover;
mod memory;
mod store;
pub mod subscribers;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;

pub use config::{ConfigError, FileOptions, MAX_SHARDS, StoreOptions};
pub use error::{LayerError, MemoryError, StoreError};
#[allow(deprecated)]
pub use file::GuestMemory;
pub use file::{
    AttributeRun, ConvertMode, FaultMapping, FileExtent, FileStats, GuestFile, HostRegion,
};
pub use store::{InvariantError, Store, StoreStats, WeakStore};

/// The handles a VMM passes between threads are `Send + Sync`: checked at compile time (a
/// change that loses it fails to build here, not in a user's crate).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    send_sync::<WeakStore>();
    send_sync::<GuestFile>();
    send_sync::<Registration>();
    send_sync::<StoreError>();
    send_sync::<ChangeOutcome>();
    send_sync::<HostRegion>();
    send_sync::<subscribers::IommuMapper>();
    send_sync::<subscribers::KvmMmu>();
};
