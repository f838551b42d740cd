//! The [`Store`]: memory from a source, handed out by the allocator, described by the
//! physical metadata, and watched by subscribers.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
// `Weak` references to files and the subscriber registry's `Arc`: plain reference counting of
// VMM-facing handles, not synchronisation the loom models need to see.
use std::sync::{Arc, Weak};

use pfnstore_allocator::{AllocRequest, Allocation, Allocator, AllocatorConfig, AllocatorStats};
use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, PAGE_SIZE, PageSize, Pfn, PfnRange};
use pfnstore_hugetlb::{HugetlbSource, Memfd, MemorySource, SyntheticSource};
use pfnstore_metadata::conversion::{Interest, Registration, Subscriber, SubscriberRegistry};
use pfnstore_metadata::{FileId, MetadataStore, QuarantineReason, Shareability, Stats};

use crate::StoreError;
use crate::config::{ConfigError, FileOptions, StoreOptions};
use crate::error::LayerError;
use crate::file::{FileInner, GuestFile};
use crate::gate::{Gate, Ops};
use crate::memory::Memory;

/// The backing store a VMM embeds. Cheap to clone (a handle); all methods take `&self` and
/// may be called from many threads.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    geometry: Geometry,
    memory: Memory,
    allocator: Allocator,
    /// Physical facts per PFN: which file holds a page, whether it needs scrubbing, whether it
    /// is quarantined. (Shareability and pins belong to file offsets; see `GuestFile`.)
    physical: MetadataStore,
    pub(crate) registry: Arc<SubscriberRegistry>,
    files: Mutex<FileTable>,
    capacity_pages: u64,
    gate: Gate,
    /// Store-level operations under way (file creation, subscription).
    ops: Ops,
}

#[derive(Default)]
struct FileTable {
    next: u32,
    open: BTreeMap<FileId, (Weak<FileInner>, u64)>,
}

/// A summary of a store's memory.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreStats {
    /// The allocator's accounting (free, allocated, quarantined, dirty; fragmentation).
    pub allocator: AllocatorStats,
    /// The physical metadata (owners, quarantine, scrub state; bytes used).
    pub physical: Stats,
    /// Files open now.
    pub files: usize,
    /// Bytes of the store's memory.
    pub capacity: u64,
    /// The sizes of the open files added up (more than `capacity` only with overcommit).
    pub committed: u64,
}

/// A weak handle of a [`Store`] ([`Store::downgrade`]).
#[derive(Clone, Debug)]
pub struct WeakStore(Weak<StoreInner>);

impl WeakStore {
    /// The store, if it is still alive.
    pub fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

/// The store's accounting does not add up: a bug (see [`Store::check_invariants`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store invariant violated: {0}")]
pub struct InvariantError(pub String);

impl From<String> for InvariantError {
    fn from(s: String) -> Self {
        InvariantError(s)
    }
}

impl Store {
    /// A store over real hugetlb (or fallback) memory.
    pub fn from_hugetlb(source: HugetlbSource, options: StoreOptions) -> Result<Store, StoreError> {
        Store::new(Box::new(source), options)
    }

    /// A store over PFNs with no memory behind them (a [`pfnstore_hugetlb::SyntheticSource`]):
    /// everything but byte access works, at any scale.
    pub fn synthetic(source: SyntheticSource, options: StoreOptions) -> Result<Store, StoreError> {
        Store::new(Box::new(source), options)
    }

    /// A store over `source`'s chunks. If the source has a memfd
    /// ([`MemorySource::memfd`]), the store reads and writes its bytes (scrubbing, the files'
    /// host mappings); without one it manages PFNs only and refuses byte access.
    pub fn new(source: Box<dyn MemorySource>, options: StoreOptions) -> Result<Store, StoreError> {
        // A fresh source's memory was zeroed by the kernel (hugetlb) or has no bytes at all
        // (synthetic): clean either way.
        Store::assemble(source, options, false, 0)
    }

    /// A store over `source` with every chunk free, `dirty` or clean, the next file id
    /// `next_file` (a handover's receiver rebuilds on top of this).
    pub(crate) fn assemble(
        source: Box<dyn MemorySource>,
        options: StoreOptions,
        dirty: bool,
        next_file: u32,
    ) -> Result<Store, StoreError> {
        options.validate()?;
        let geometry = source.geometry();
        let chunks = source.chunks().to_vec();
        let span = span_of(&geometry, chunks.iter().map(|c| c.base))?;
        let allocator = Allocator::new(AllocatorConfig::new(geometry, options.shards))
            .map_err(|e| internal("allocator for validated options", e))?;
        let physical = MetadataStore::new(geometry, span).map_err(|e| StoreError::BadSource {
            base: chunks.first().map_or(Pfn(0), |c| c.base),
            source: e.into(),
        })?;
        let mut capacity_pages = 0;
        for chunk in &chunks {
            let bad = |source: LayerError| StoreError::BadSource {
                base: chunk.base,
                source,
            };
            allocator
                .add_chunk(chunk.base, dirty)
                .map_err(|e| bad(e.into()))?;
            physical
                .add_chunk(chunk.base, Shareability::Private)
                .map_err(|e| bad(e.into()))?;
            capacity_pages += chunk.pages;
        }
        Ok(Store {
            inner: Arc::new(StoreInner {
                geometry,
                memory: Memory::new(source)?,
                allocator,
                physical,
                registry: Arc::new(SubscriberRegistry::new()),
                files: Mutex::new(FileTable {
                    next: next_file,
                    open: BTreeMap::new(),
                }),
                capacity_pages,
                gate: Gate::default(),
                ops: Ops::default(),
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

    /// Bytes of memory the store manages.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity_pages * PAGE_SIZE
    }

    /// The largest block a plan or a fault claims: what the memory is physically contiguous
    /// for (4 KiB for ordinary pages, 2 MiB for 2 MiB hugetlb pages).
    pub fn max_block(&self) -> PageSize {
        self.inner.memory.max_block()
    }

    /// The memfd of the store's memory, if it has one: what every file's extents are mapped
    /// from (see [`GuestFile::extents`]).
    pub fn memfd(&self) -> Option<Memfd<'_>> {
        self.inner.memory.memfd()
    }

    /// Creates a guest-memory file. Refused with [`StoreError::FileTooLarge`] if it is larger
    /// than the store (unless [`FileOptions::overcommit`]) or than the metadata can describe.
    pub fn create_file(&self, options: FileOptions) -> Result<GuestFile, StoreError> {
        let _op = self.inner.gate.enter(&self.inner.ops)?;
        let id = {
            let mut files = self.inner.files.lock();
            let id = FileId(files.next);
            // The last id marks the pages past a file's end in its metadata.
            files.next = files
                .next
                .checked_add(1)
                .filter(|next| *next < pfnstore_metadata::conversion::PAST_END.0)
                .ok_or(StoreError::FileIdsExhausted)?;
            id
        };
        let file = GuestFile::create(self.clone(), id, options, |inner| {
            // Open (visible to `file`, `subscribe` and the statistics) before it is populated,
            // so that a subscriber registering meanwhile either is in the file's list from its
            // start or replays it.
            let mut files = self.inner.files.lock();
            files.open.retain(|_, (f, _)| f.strong_count() > 0);
            files.open.insert(id, (Arc::downgrade(inner), options.size));
        })?;
        Ok(file)
    }

    /// An open file by id.
    pub fn file(&self, id: FileId) -> Option<GuestFile> {
        let files = self.inner.files.lock();
        let inner = files.open.get(&id)?.0.upgrade()?;
        (!inner.is_destroyed()).then_some(GuestFile { inner })
    }

    /// Registers a subscriber for every file (`Interest::All`) or one open file, and replays
    /// to it what is mapped now (see [`Subscriber`]). The store holds it weakly: drop your
    /// `Arc` and it is no longer called. Dropping the returned registration unregisters it
    /// (waiting for callbacks under way). Subscribing to a file that is not open is refused.
    pub fn subscribe(
        &self,
        subscriber: &Arc<dyn Subscriber>,
        interest: Interest,
    ) -> Result<Registration, StoreError> {
        let _op = self.inner.gate.enter(&self.inner.ops)?;
        if let Interest::File(id) = interest
            && self.file(id).is_none()
        {
            return Err(StoreError::NoSuchFile { file: id });
        }
        self.inner
            .registry
            .register(subscriber, interest)
            .map_err(|e| match e {
                pfnstore_metadata::conversion::ConversionError::NoSuchFile { file } => {
                    StoreError::NoSuchFile { file }
                }
                pfnstore_metadata::conversion::ConversionError::Reentrant { requested, .. } => {
                    StoreError::Reentrant {
                        file: interest_file(interest),
                        offset: requested.start().byte(),
                        end: requested.end().byte(),
                    }
                }
                pfnstore_metadata::conversion::ConversionError::WouldBlock {
                    requested, ..
                } => StoreError::WouldBlock {
                    file: interest_file(interest),
                    offset: requested.start().byte(),
                    end: requested.end().byte(),
                },
                other => internal("subscribe", other),
            })
    }

    /// A weak handle: what a subscriber that needs the store should hold (see
    /// [`Store::subscribe`]), so that the store is never kept alive through its subscribers.
    pub fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }

    /// Which file holds `pfn`, if any.
    pub fn owner_of(&self, pfn: Pfn) -> Result<Option<FileId>, StoreError> {
        self.inner
            .physical
            .attributes(pfn)
            .map(|a| a.owner)
            .map_err(|_| StoreError::UnknownPfn { pfn })
    }

    /// Accounting of the store's memory.
    pub fn stats(&self) -> StoreStats {
        let (files, committed) = {
            let table = self.inner.files.lock();
            table
                .open
                .values()
                .filter(|(f, _)| f.upgrade().is_some_and(|f| !f.is_destroyed()))
                .fold((0, 0), |(n, bytes), (_, size)| (n + 1, bytes + size))
        };
        StoreStats {
            allocator: self.inner.allocator.stats(),
            physical: self.inner.physical.stats(),
            files,
            capacity: self.capacity(),
            committed,
        }
    }

    /// Checks the allocator's and the metadata's own invariants, every open file's, and that
    /// they all agree on who holds which page: every page the allocator counts as allocated
    /// is held by an open file, every page an open file holds is allocated to it, and the only
    /// pages of files that are gone are quarantined ones. Meant for tests and debugging, on a
    /// store with no operation under way.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let inner = &self.inner;
        inner.allocator.check_invariants()?;
        inner.physical.check_invariants()?;
        let open: Vec<GuestFile> = {
            let table = inner.files.lock();
            table
                .open
                .values()
                .filter_map(|(f, _)| f.upgrade())
                .map(|inner| GuestFile { inner })
                .collect()
        };
        let mut held_by: BTreeMap<FileId, u64> = BTreeMap::new();
        for file in &open {
            file.check_invariants()?;
            held_by.insert(file.id(), file.held_pages());
        }
        let mut owned: BTreeMap<FileId, u64> = BTreeMap::new();
        // Quarantined pages that a file still holds, and those no file holds any more.
        let (mut quarantined_held, mut quarantined_free) = (0u64, 0u64);
        let mut problem = None;
        // Chunk by chunk: real PFNs leave gaps in the span that no chunk manages.
        for chunk in inner.memory.source().chunks() {
            let range = PfnRange::from_len(chunk.base, chunk.pages)
                .map_err(|e| InvariantError(e.to_string()))?;
            inner
                .physical
                .visit_runs(range, |run, a| {
                    match (a.owner, a.quarantined.is_some()) {
                        (Some(owner), quarantined) => {
                            if !held_by.contains_key(&owner) {
                                problem = Some(format!(
                                    "{run} still belongs to {owner}, which is gone (leaked)"
                                ));
                                return ControlFlow::Break(());
                            }
                            *owned.entry(owner).or_default() += run.len();
                            if quarantined {
                                quarantined_held += run.len();
                            }
                        }
                        (None, true) => quarantined_free += run.len(),
                        (None, false) => {}
                    }
                    ControlFlow::Continue(())
                })
                .map_err(|e| InvariantError(e.to_string()))?;
            if problem.is_some() {
                break;
            }
        }
        if let Some(problem) = problem {
            return Err(InvariantError(problem));
        }
        for (file, held) in &held_by {
            let physical = owned.get(file).copied().unwrap_or(0);
            if physical != *held {
                return Err(InvariantError(format!(
                    "{file} holds {held} pages, the physical metadata gives it {physical}"
                )));
            }
        }
        let a = inner.allocator.stats().total;
        let total_owned: u64 = owned.values().sum();
        let quarantined = quarantined_held + quarantined_free;
        if a.quarantined_pages != quarantined || a.allocated_pages + quarantined_held != total_owned
        {
            return Err(InvariantError(format!(
                "the allocator has {} pages allocated and {} quarantined; the metadata has {} held by files ({} of them quarantined) and {} quarantined held by none",
                a.allocated_pages,
                a.quarantined_pages,
                total_owned,
                quarantined_held,
                quarantined_free
            )));
        }
        Ok(())
    }
}

fn interest_file(interest: Interest) -> FileId {
    match interest {
        Interest::File(f) => f,
        Interest::All => FileId(u32::MAX),
    }
}

/// Memory taken from the allocator for a file, and how to give it back unchanged.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) range: PfnRange,
    allocation: Allocation,
}

/// The narrow interface the file code uses: memory in and out, bytes, quarantine.
impl StoreInner {
    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub(crate) fn memory(&self) -> &Memory {
        &self.memory
    }

    pub(crate) fn registry(&self) -> &Arc<SubscriberRegistry> {
        &self.registry
    }

    pub(crate) fn capacity_pages(&self) -> u64 {
        self.capacity_pages
    }

    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The allocator, for the handover's snapshot and rebuild only.
    pub(crate) fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// The physical metadata, for the handover's snapshot and rebuild only.
    pub(crate) fn physical(&self) -> &MetadataStore {
        &self.physical
    }

    /// The id the next file gets.
    pub(crate) fn next_file_id(&self) -> u32 {
        self.files.lock().next
    }

    /// Puts a rebuilt file in the table (a handover's receiver), with the id it had.
    pub(crate) fn reopen_file(&self, id: FileId, inner: &Arc<FileInner>, size: u64) {
        self.files
            .lock()
            .open
            .insert(id, (Arc::downgrade(inner), size));
    }

    /// Takes `pages` aligned to `align` for `file`, scrubbing whatever was dirty, and records
    /// `file` as the holder. `None` when no such run is free.
    pub(crate) fn take(&self, file: FileId, pages: u64, align: u64) -> Option<Taken> {
        let allocation = self
            .allocator
            .alloc(AllocRequest::new(pages).aligned(align))
            .ok()?;
        let scrubbed = allocation
            .dirty
            .iter()
            .try_for_each(|dirty| self.memory.zero(*dirty));
        if scrubbed.is_err() {
            // Memory that cannot be scrubbed must not be used by anyone.
            let _ = self
                .physical
                .quarantine(allocation.range, QuarantineReason::ScrubFailed);
            let _ = self.physical.assign_owner(allocation.range, file);
            let _ = self.allocator.quarantine(allocation.range);
            return None;
        }
        self.physical.assign_owner(allocation.range, file).ok()?;
        if allocation.is_dirty() {
            let _ = self.physical.set_dirty(allocation.range, false);
        }
        Some(Taken {
            range: allocation.range,
            allocation,
        })
    }

    /// Gives back what [`StoreInner::take`] took, as it was: the pages that were dirty are
    /// dirty again, the others clean, so that a failed operation changes no accounting.
    pub(crate) fn untake(&self, file: FileId, taken: Taken) -> Result<(), StoreError> {
        let range = taken.range;
        let context = || format!("give back {range} taken for {file}");
        self.physical
            .release_owner(range, file)
            .map_err(|e| internal(context(), e))?;
        for dirty in taken.allocation.dirty.iter() {
            self.physical
                .set_dirty(*dirty, true)
                .map_err(|e| internal(context(), e))?;
        }
        // The dirty parts were scrubbed meanwhile, but they are given back as they came: a
        // failed operation changes no accounting.
        self.allocator
            .cancel(&taken.allocation)
            .map_err(|e| internal(context(), e))
    }

    /// Takes `pfns` away from `file` (which held them): the healthy pages go back to the
    /// allocator, dirty; the quarantined ones stay out of use for good, held by no file.
    pub(crate) fn release(&self, file: FileId, pfns: PfnRange) -> Result<(), StoreError> {
        // Runs split only where quarantine starts or ends: the physical runs also split at every
        // shareability flip, and one release per flip would cost a fragmented file's punch
        // (or destruction) a metadata change per converted page.
        let mut runs: Vec<(PfnRange, bool)> = Vec::new();
        self.physical
            .visit_runs(pfns, |run, a| {
                let quarantined = a.quarantined.is_some();
                match runs.last_mut() {
                    Some((last, q)) if *q == quarantined && last.end() == run.start() => {
                        *last = last.hull(&run);
                    }
                    _ => runs.push((run, quarantined)),
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| internal(format!("release {pfns} of {file}"), e))?;
        for (run, quarantined) in runs {
            let context = || format!("release {run} of {file}");
            self.physical
                .release_owner(run, file)
                .map_err(|e| internal(context(), e))?;
            if !quarantined {
                self.physical
                    .set_dirty(run, true)
                    .map_err(|e| internal(context(), e))?;
                self.allocator
                    .free(run)
                    .map_err(|e| internal(context(), e))?;
            }
        }
        Ok(())
    }

    /// `pfns` (held by a file) must never be reused: an unmap could not be undone, or a
    /// device may still reach them. Pages already quarantined are left as they are.
    pub(crate) fn quarantine(
        &self,
        pfns: PfnRange,
        reason: QuarantineReason,
    ) -> Result<(), StoreError> {
        let mut fresh: Vec<PfnRange> = Vec::new();
        self.physical
            .visit_runs(pfns, |run, a| {
                if a.quarantined.is_none() {
                    fresh.push(run);
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| internal(format!("quarantine {pfns}"), e))?;
        for run in fresh {
            let context = || format!("quarantine {run}");
            self.physical
                .quarantine(run, reason)
                .map_err(|e| internal(context(), e))?;
            self.allocator
                .quarantine(run)
                .map_err(|e| internal(context(), e))?;
        }
        Ok(())
    }

    /// Which file holds `pfns` (all of them), per the physical metadata.
    pub(crate) fn holder_of(&self, pfns: PfnRange) -> Result<Option<FileId>, StoreError> {
        self.physical
            .owner_of(pfns)
            .map_err(|e| internal(format!("holder of {pfns}"), e))
    }

    /// Closes the gate and waits until the store is at rest: no store or file operation
    /// under way.
    pub(crate) fn close_gate(&self) -> Result<(), StoreError> {
        self.gate.close()?;
        // Files are opened (put in the table) before anything runs on them, and creating one
        // is a store operation: once those are drained, the table lists every file that may
        // have an operation under way.
        self.gate.drain(&self.ops);
        for file in self.open_files() {
            self.gate.drain(file.ops());
        }
        Ok(())
    }

    /// The files open now.
    pub(crate) fn open_files(&self) -> Vec<Arc<FileInner>> {
        self.files
            .lock()
            .open
            .values()
            .filter_map(|(f, _)| f.upgrade())
            .collect()
    }

    pub(crate) fn file_closed(&self, id: FileId) {
        self.files.lock().open.remove(&id);
    }
}

impl fmt::Debug for StoreInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreInner")
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
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
        return Err(ConfigError::EmptySource.into());
    }
    Ok(PfnRange::new(Pfn(lo), Pfn(hi))?)
}

pub(crate) use crate::error::internal;
