//! The [`Store`]: memory from a source, handed out by the allocator, described by the metadata
//! store, and watched by subscribers.

use std::collections::BTreeMap;
use std::fmt;
// `Weak` references to files and the subscriber registry's `Arc`: plain reference counting of
// VMM-facing handles, not synchronisation the loom models need to see.
use std::sync::{Arc, Weak};

use pfnstore_allocator::{AllocRequest, Allocation, Allocator, AllocatorConfig, AllocatorStats};
use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, PAGE_SIZE, Pfn, PfnRange};
use pfnstore_hugetlb::{HugetlbSource, MemorySource, SyntheticSource};
use pfnstore_metadata::conversion::{Interest, Registration, Subscriber, SubscriberRegistry};
use pfnstore_metadata::{FileId, MetadataStore, Shareability, Stats};

use crate::StoreError;
use crate::file::{FileOptions, GuestMemory};
use crate::memory::{Memory, Views};

/// The backing store a VMM embeds. Cheap to clone (a handle); all methods take `&self` and
/// may be called from many threads.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    pub(crate) geometry: Geometry,
    pub(crate) memory: Memory,
    pub(crate) allocator: Allocator,
    /// Physical facts per PFN: which file owns a page, whether it needs scrubbing, whether it
    /// is quarantined. (Shareability and pins belong to file offsets; see `GuestMemory`.)
    pub(crate) physical: MetadataStore,
    pub(crate) registry: Arc<SubscriberRegistry>,
    files: Mutex<FileTable>,
}

#[derive(Default)]
struct FileTable {
    next: u32,
    open: BTreeMap<FileId, Weak<crate::file::FileInner>>,
}

/// How a store is set up beyond its memory source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Lock shards of the allocator (default: one per CPU).
    pub shards: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A summary of a store's memory.
#[derive(Debug, Clone)]
pub struct StoreStats {
    /// The allocator's accounting (free, allocated, quarantined, dirty; fragmentation).
    pub allocator: AllocatorStats,
    /// The physical metadata (owners, quarantine, scrub state; bytes used).
    pub physical: Stats,
    /// Files open now.
    pub files: usize,
}

impl Store {
    /// A store over real hugetlb (or fallback) memory: it maps the source twice, once to
    /// scrub and once as the host view.
    pub fn from_hugetlb(source: HugetlbSource, options: StoreOptions) -> Result<Store, StoreError> {
        let views = Views {
            scrub: source.map_view().map_err(internal)?,
            host: source.map_view().map_err(internal)?,
        };
        Store::new(Box::new(source), Some(views), options)
    }

    /// A store over PFNs with no memory behind them (a [`pfnstore_hugetlb::SyntheticSource`]):
    /// everything but byte access works, at any scale.
    pub fn synthetic(source: SyntheticSource, options: StoreOptions) -> Result<Store, StoreError> {
        Store::new(Box::new(source), None, options)
    }

    /// A store over `source`'s chunks. `views`, if given, are two mappings of the source's
    /// memory: one the store scrubs through, one it serves the host view through. Without them
    /// the store manages PFNs only and refuses byte access.
    pub fn new(
        source: Box<dyn MemorySource>,
        views: Option<Views>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let geometry = source.geometry();
        let chunks = source.chunks();
        let span = span_of(&geometry, chunks.iter().map(|c| c.base))?;
        let allocator = Allocator::new(AllocatorConfig {
            geometry,
            shards: options.shards,
        })
        .map_err(internal)?;
        let physical = MetadataStore::new(geometry, span).map_err(internal)?;
        for chunk in chunks {
            // A fresh source's memory was zeroed by the kernel (hugetlb) or has no bytes at all
            // (synthetic): clean either way.
            allocator.add_chunk(chunk.base, false).map_err(internal)?;
            physical
                .add_chunk(chunk.base, Shareability::Private)
                .map_err(internal)?;
        }
        Ok(Store {
            inner: Arc::new(StoreInner {
                geometry,
                memory: Memory::new(source, views),
                allocator,
                physical,
                registry: Arc::new(SubscriberRegistry::new()),
                files: Mutex::new(FileTable::default()),
            }),
        })
    }

    /// The block geometry (4K/2M/1G for hugetlb 1G sources).
    pub fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    /// What the memory source was asked for and what it obtained (the fallback ladder).
    pub fn source_report(&self) -> &pfnstore_hugetlb::SourceReport {
        self.inner.memory.source().report()
    }

    /// Whether the store can read and write its memory (false for synthetic sources).
    pub fn has_host_memory(&self) -> bool {
        self.inner.memory.has_bytes()
    }

    /// Creates a guest-memory file.
    pub fn create_file(&self, options: FileOptions) -> Result<GuestMemory, StoreError> {
        let id = {
            let mut files = self.inner.files.lock();
            let id = FileId(files.next);
            files.next = files
                .next
                .checked_add(1)
                .ok_or_else(|| internal("file ids exhausted"))?;
            id
        };
        let file = GuestMemory::create(self.clone(), id, options)?;
        let mut files = self.inner.files.lock();
        files.open.retain(|_, f| f.strong_count() > 0);
        files.open.insert(id, Arc::downgrade(&file.inner));
        Ok(file)
    }

    /// An open file by id.
    pub fn file(&self, id: FileId) -> Option<GuestMemory> {
        let files = self.inner.files.lock();
        files
            .open
            .get(&id)?
            .upgrade()
            .map(|inner| GuestMemory { inner })
    }

    /// Registers a subscriber for every file (`Interest::All`) or one file. The store holds it
    /// weakly: drop your `Arc` and it is no longer called. Dropping the returned registration
    /// unregisters it (waiting for callbacks under way).
    pub fn subscribe(&self, subscriber: &Arc<dyn Subscriber>, interest: Interest) -> Registration {
        self.inner.registry.register(subscriber, interest)
    }

    /// Which file owns `pfn`, if any.
    pub fn owner_of(&self, pfn: Pfn) -> Result<Option<FileId>, StoreError> {
        self.inner
            .physical
            .attributes(pfn)
            .map(|a| a.owner)
            .map_err(|_| StoreError::UnknownPfn { pfn })
    }

    /// Accounting of the store's memory.
    pub fn stats(&self) -> StoreStats {
        let files = self
            .inner
            .files
            .lock()
            .open
            .values()
            .filter(|f| f.strong_count() > 0)
            .count();
        StoreStats {
            allocator: self.inner.allocator.stats(),
            physical: self.inner.physical.stats(),
            files,
        }
    }

    /// Checks the allocator's and the metadata's internal invariants, and that they agree on
    /// which pages are in use (for tests and debugging).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.inner.allocator.check_invariants()?;
        self.inner.physical.check_invariants()?;
        let a = self.inner.allocator.stats().total;
        let p = self.inner.physical.stats();
        // Every allocated page belongs to a file; owned pages are allocated or, after a failed
        // unmap, quarantined.
        if a.allocated_pages > p.owned_pages
            || p.owned_pages > a.allocated_pages + a.quarantined_pages
        {
            return Err(format!(
                "metadata says {} pages are owned; the allocator has {} allocated and {} quarantined",
                p.owned_pages, a.allocated_pages, a.quarantined_pages
            ));
        }
        Ok(())
    }
}

impl StoreInner {
    /// Allocates `pages` aligned to `align`, scrubbing whatever was dirty, and records `file`
    /// as the owner.
    pub(crate) fn allocate_for(&self, file: FileId, pages: u64, align: u64) -> Option<PfnRange> {
        let allocation = self
            .allocator
            .alloc(AllocRequest::new(pages).aligned(align))
            .ok()?;
        match self.take(file, &allocation) {
            Ok(()) => Some(allocation.range),
            Err(_) => {
                // Scrubbing failed: those pages must not be used by anyone.
                let _ = self.allocator.quarantine(allocation.range);
                None
            }
        }
    }

    fn take(&self, file: FileId, allocation: &Allocation) -> Result<(), StoreError> {
        for dirty in &allocation.dirty {
            self.memory.zero(*dirty)?;
        }
        self.physical
            .assign_owner(allocation.range, file)
            .map_err(internal)?;
        if allocation.is_dirty() {
            self.physical
                .set_dirty(allocation.range, false)
                .map_err(internal)?;
        }
        Ok(())
    }

    /// Gives `pfns` (owned by `file`, unpinned) back to the allocator, dirty.
    pub(crate) fn release(&self, file: FileId, pfns: PfnRange) -> Result<(), StoreError> {
        self.physical.release_owner(pfns, file).map_err(internal)?;
        self.physical.set_dirty(pfns, true).map_err(internal)?;
        self.allocator.free(pfns).map_err(internal)
    }

    /// `pfns` (owned by `file`) must never be reused: their unmap failed.
    pub(crate) fn quarantine(&self, pfns: PfnRange) -> Result<(), StoreError> {
        self.physical
            .quarantine(pfns, pfnstore_metadata::QuarantineReason::UnmapFailed)
            .map_err(internal)?;
        self.allocator.quarantine(pfns).map_err(internal)
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("geometry", &self.inner.geometry)
            .field("memory", &self.inner.memory)
            .finish_non_exhaustive()
    }
}

/// The chunk-aligned span covering every chunk base.
fn span_of(geometry: &Geometry, bases: impl Iterator<Item = Pfn>) -> Result<PfnRange, StoreError> {
    let chunk = geometry.chunk_pages();
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for base in bases {
        lo = lo.min(base.0);
        hi = hi.max(base.0.saturating_add(chunk));
    }
    if lo >= hi {
        return Err(internal("the memory source has no chunks"));
    }
    Ok(PfnRange::new(Pfn(lo), Pfn(hi))?)
}

pub(crate) fn internal(e: impl fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Bytes in `pages` pages.
pub(crate) const fn bytes(pages: u64) -> u64 {
    pages * PAGE_SIZE
}
