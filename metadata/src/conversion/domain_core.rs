//! One domain's (file's) share of the conversion machinery, apart from the registry that
//! keeps it and the planner that reads it.

// Subscribers are the VMM's objects, held as `Weak<dyn Subscriber>` (see the registry).
use std::sync::{Arc, Weak};

use pfnstore_core::sync::atomic::AtomicUsize;
use pfnstore_core::sync::{CachePadded, Mutex};
use pfnstore_core::{PageSize, Pfn, PfnRange};

use super::range_lock::RangeLocks;
use super::subscriber::Subscriber;
use crate::{FileId, MetadataError, MetadataStore};

/// The subscribers one domain calls (weak: see the registry's module docs).
pub(super) type Members = Arc<[Weak<dyn Subscriber>]>;

/// One domain's share of the conversion machinery: its metadata, range locks, limits, and its
/// copy of the interested subscribers with its in-flight counters.
#[derive(Debug)]
pub struct DomainCore {
    pub(crate) file: FileId,
    pub(super) serial: u64,
    pub(crate) store: pfnstore_core::sync::Arc<MetadataStore>,
    pub(crate) locks: RangeLocks,
    /// Pages of the file (the metadata covers whole chunks beyond it).
    pub(crate) pages: u64,
    /// The largest block the memory behind the file is physically contiguous for.
    pub(crate) max_block: PageSize,
    /// Written by every operation of this domain: on cache lines of their own.
    pub(super) in_flight: [CachePadded<AtomicUsize>; 2],
    /// (registry generation, subscribers interested in `file`).
    pub(super) cached: CachePadded<Mutex<(u64, Members)>>,
}

impl DomainCore {
    /// [`MetadataStore::max_mapping_size`], capped at the domain's largest block.
    pub(crate) fn max_mapping_size(&self, page: Pfn) -> Result<PageSize, MetadataError> {
        Ok(self.store.max_mapping_size(page)?.min(self.max_block))
    }

    /// Every page of the file, as the metadata's keys.
    pub(crate) fn all_pages(&self) -> Option<PfnRange> {
        PfnRange::from_len(Pfn(0), self.pages).ok()
    }
}
