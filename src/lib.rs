//! # pfnstore: backing store for confidential-VM guest memory
//!
//! A VMM embeds pfnstore to hold the memory of its confidential guests (TDX, SEV-SNP, pKVM,
//! CCA). pfnstore carves physical PFN ranges out of 1 GiB hugetlb pages, keeps their metadata
//! (shared/private, pins, quarantine, scrub state) in range trees rather than one record per
//! 4 KiB page, converts memory between shared and private in place, and tells every user of the
//! memory (KVM's MMU, an IOMMU mapper, the VMM's host view) through notifier callbacks.
//!
//! The crates underneath:
//!
//! * [`core`](pfnstore_core): PFNs, ranges, block geometry, shared errors, the sync facade;
//! * [`hugetlb`](pfnstore_hugetlb): where memory comes from;
//! * [`allocator`](pfnstore_allocator): the lock-sharded PFN-range allocator;
//! * [`metadata`](pfnstore_metadata): the range-tree metadata store.
//!
//! This crate glues them into what a VMM embeds; see ARCHITECTURE.md for the layering.

pub use pfnstore_allocator as allocator;
pub use pfnstore_core as core;
pub use pfnstore_hugetlb as hugetlb;
pub use pfnstore_metadata as metadata;

mod config;

pub use config::{ConfigError, StoreConfig};
