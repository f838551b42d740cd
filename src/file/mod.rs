//! [`GuestFile`]: one guest-memory file (the guest_memfd counterpart).
//!
//! A file is a range of page offsets. Each offset has a shareability (and may be pinned)
//! whether or not memory backs it yet: shareability belongs to the offset, not to the memory,
//! so a conversion of unbacked offsets holds when memory arrives, and punching a hole does not
//! change it. These per-offset attributes live in the file's own metadata store (the
//! range-tree store the physical side uses too, keyed by page offset), where the owner mark
//! says which offsets are backed. The [`extents`] map says which frames the file holds at
//! which offsets; the [`mapping`] is the file's host mapping.
//!
//! The modules, one job each:
//!
//! * `mod.rs` (this one): the file's state, its creation and end, queries;
//! * [`extents`]: the frames the file holds;
//! * [`mapping`]: the host mapping and the protection rule;
//! * [`transaction`]: the glue between the metadata's change transaction and the memory:
//!   populate, convert, punch-hole;
//! * [`fault`]: the KVM fault path;
//! * [`access`]: the host's byte access, pins, and what is handed to the kernel.
//!
//! Lock order: the file's range locks (exclusive for changes, shared for accesses, faults and
//! pins), then the extents map, then the allocator's and the metadata stores' own locks.
//! Subscriber callbacks run under the range lock only.

mod access;
mod extents;
mod fault;
mod handover;
mod mapping;
mod transaction;

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use pfnstore_core::sync::RwLock;
use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
use pfnstore_core::{OffsetRange, PAGE_SIZE, PageOffset, PageSize, Pfn, PfnRange};
use pfnstore_metadata::conversion::{ConversionDomain, DomainLimits, MappingPlan, PlanEntry};
use pfnstore_metadata::{
    Attributes, FileId, MAX_CHUNKS, MetadataStore, PinSet, QuarantineReason, Shareability, Stats,
};

pub use access::{FileExtent, HostRegion};
pub use fault::FaultMapping;
pub use transaction::ConvertMode;

use crate::StoreError;
use crate::config::FileOptions;
use crate::error::FileContext;
use crate::gate::{Entered, Ops, Phase};
use crate::store::{InvariantError, Store, internal};
use extents::Extents;
use mapping::HostMapping;

/// Counts for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileStats {
    /// Size in bytes.
    pub size: u64,
    /// Pages with memory behind them.
    pub backed_pages: u64,
    /// Pages of memory the file holds: the backed ones, plus parts of huge pages whose other
    /// parts are backed, and the part of its last huge page past its end.
    pub held_pages: u64,
    /// Records of the extent map.
    pub extents: usize,
    /// Kernel memory regions of the file's host mapping (0 without one).
    pub mapping_regions: u64,
    /// Bytes per protection unit of the host mapping (0 without one): a unit is revoked
    /// when it holds no shared page.
    pub protection_unit: u64,
    /// The per-offset metadata.
    pub metadata: Stats,
}

/// One run of equal attributes of a file, as [`GuestFile::attribute_runs`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttributeRun {
    /// The pages of the run.
    pub range: OffsetRange,
    /// Shared or private.
    pub shareability: Shareability,
    /// Whether memory backs the pages.
    pub backed: bool,
    /// Who pins them, how often.
    pub pins: PinSet,
    /// Whether (and why) they are quarantined.
    pub quarantined: Option<QuarantineReason>,
}

/// A guest-memory file. Cheap to clone (a handle); dropping the last handle gives the memory
/// back (see [`GuestFile::destroy`] for the checked way).
#[derive(Clone)]
pub struct GuestFile {
    pub(crate) inner: Arc<FileInner>,
}

/// The former name of [`GuestFile`] (vm-memory's `GuestMemory` is a whole address space; a
/// pfnstore file is one region of it).
#[deprecated(since = "0.2.0", note = "renamed to GuestFile")]
pub type GuestMemory = GuestFile;

pub(crate) struct FileInner {
    id: FileId,
    store: Store,
    size_pages: u64,
    domain: ConversionDomain,
    extents: RwLock<Extents>,
    mapping: Option<HostMapping>,
    destroyed: AtomicBool,
    /// Operations under way (see [`crate::gate`]).
    ops: Ops,
}

impl GuestFile {
    /// Creates file `id`; `open` publishes it in the store's file table before it is
    /// populated.
    pub(crate) fn create(
        store: Store,
        id: FileId,
        options: FileOptions,
        open: impl FnOnce(&Arc<FileInner>),
    ) -> Result<GuestFile, StoreError> {
        let size = options.size;
        if size == 0 {
            return Err(StoreError::Empty { offset: 0 });
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Unaligned {
                offset: 0,
                len: size,
            });
        }
        let inner_store = &store.inner;
        let geometry = inner_store.geometry();
        let chunk = geometry.chunk_pages();
        let capacity = inner_store.capacity_pages() * PAGE_SIZE;
        if !options.overcommit && size > capacity {
            return Err(StoreError::FileTooLarge {
                size,
                limit: capacity,
                why: "the store's memory; FileOptions::overcommit allows more",
            });
        }
        let metadata_limit = MAX_CHUNKS * chunk * PAGE_SIZE;
        if size > metadata_limit {
            return Err(StoreError::FileTooLarge {
                size,
                limit: metadata_limit,
                why: "the most chunks a file's metadata describes",
            });
        }
        let size_pages = size / PAGE_SIZE;
        let span_pages = size_pages.div_ceil(chunk) * chunk;
        let span = PfnRange::from_len(Pfn(0), span_pages)?;
        let context = "the metadata of a new file";
        let offsets = MetadataStore::new(geometry, span).map_err(|e| internal(context, e))?;
        for base in (0..span_pages).step_by(chunk as usize) {
            offsets
                .add_chunk(Pfn(base), options.initial)
                .map_err(|e| internal(context, e))?;
        }
        let memory = inner_store.memory();
        let domain = ConversionDomain::with_limits(
            id,
            pfnstore_core::sync::Arc::new(offsets),
            Arc::clone(inner_store.registry()),
            DomainLimits {
                pages: size_pages,
                max_block: memory.max_block(),
            },
        );
        let mapping = if memory.has_bytes() {
            let mapping = HostMapping::new(size_pages, memory.granule(), &geometry);
            Some(mapping.map_err(|e| match e {
                StoreError::Memory(m) => match m.get() {
                    pfnstore_hugetlb::HugetlbError::MapCountLimit { regions, limit, .. } => {
                        StoreError::MappingLimit {
                            file: id,
                            offset: 0,
                            regions: *regions,
                            limit: *limit,
                        }
                    }
                    _ => StoreError::Memory(m),
                },
                other => other,
            })?)
        } else {
            None
        };
        let inner = Arc::new(FileInner {
            id,
            store,
            size_pages,
            domain,
            extents: RwLock::new(Extents::default()),
            mapping,
            destroyed: AtomicBool::new(false),
            ops: Ops::default(),
        });
        open(&inner);
        let file = GuestFile { inner };
        if options.populate {
            file.populate(0, size)?;
        }
        Ok(file)
    }

    /// The file's id (what subscribers see).
    pub fn id(&self) -> FileId {
        self.inner.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size_pages * PAGE_SIZE
    }

    /// The store the file lives in.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The attributes of the page at byte `offset` (its `owner` is this file when memory
    /// backs it, `None` otherwise).
    pub fn attributes(&self, offset: u64) -> Result<Attributes, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let page = inner.page(offset)?;
        inner
            .domain
            .store()
            .attributes(Pfn(page.0))
            .map_err(|e| inner.context().metadata(e))
    }

    /// The shareability of the page at byte `offset`.
    pub fn shareability(&self, offset: u64) -> Result<Shareability, StoreError> {
        self.attributes(offset).map(|a| a.shareability)
    }

    /// The frame behind byte `offset`, if memory backs it.
    pub fn pfn_at(&self, offset: u64) -> Result<Option<Pfn>, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let page = inner.page(offset)?;
        Ok(inner.backed_pfn(page))
    }

    /// Former name of [`GuestFile::pfn_at`].
    #[deprecated(since = "0.2.0", note = "renamed to pfn_at")]
    pub fn translate(&self, offset: u64) -> Result<Option<Pfn>, StoreError> {
        self.pfn_at(offset)
    }

    /// The largest naturally aligned block around `offset` whose attributes are uniform,
    /// never larger than the memory is physically contiguous for (the metadata half of
    /// [`GuestFile::fault`]; lock-free for uniform chunks).
    pub fn max_mapping_size(&self, offset: u64) -> Result<PageSize, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let page = inner.page(offset)?;
        inner
            .domain
            .max_mapping_size(page)
            .map_err(|e| inner.context().metadata(e))
    }

    /// Former name of [`GuestFile::max_mapping_size`].
    #[deprecated(since = "0.2.0", note = "renamed to max_mapping_size")]
    pub fn max_mapping_order(&self, offset: u64) -> Result<PageSize, StoreError> {
        self.max_mapping_size(offset)
    }

    /// The backed blocks of `offset..offset + len` as a plan would describe them now: what a
    /// subscriber that maps everything holds there.
    pub fn mapped_blocks(&self, offset: u64, len: u64) -> Result<Vec<PlanEntry>, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.pages(offset, len)?;
        let plan = inner
            .domain
            .blocks_in(pages)
            .map_err(|e| inner.context().metadata(e))?;
        Ok(plan.map().to_vec())
    }

    /// Everything mapped now as one plan (what a subscriber gets as its replay).
    pub fn current_plan(&self) -> Result<MappingPlan, StoreError> {
        let _op = self.inner.enter()?;
        self.inner.current_plan()
    }

    /// The runs of equal attributes of `offset..offset + len`, ascending: a whole state in as
    /// many records as it has boundaries (a uniform 1 GiB is one), for comparing and dumping.
    pub fn attribute_runs(&self, offset: u64, len: u64) -> Result<Vec<AttributeRun>, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.pages(offset, len)?;
        let mut runs = Vec::new();
        inner
            .domain
            .store()
            .visit_runs(pages.cast(), |run, a| {
                runs.push(AttributeRun {
                    range: run.cast(),
                    shareability: a.shareability,
                    backed: a.owner == Some(inner.id),
                    pins: a.pins.clone(),
                    quarantined: a.quarantined,
                });
                ControlFlow::Continue(())
            })
            .map_err(|e| inner.context().metadata(e))?;
        Ok(runs)
    }

    /// Counts for this file.
    pub fn stats(&self) -> FileStats {
        let inner = &self.inner;
        let (held_pages, extents) = {
            let extents = inner.extents.read();
            (extents.held_pages(), extents.len())
        };
        let backed_pages = inner.backed_pages();
        FileStats {
            size: self.size(),
            backed_pages,
            held_pages,
            extents,
            mapping_regions: inner.mapping.as_ref().map_or(0, HostMapping::regions),
            protection_unit: inner.protection_unit().unwrap_or(0) * PAGE_SIZE,
            metadata: inner.domain.store().stats(),
        }
    }

    /// Pages of memory the file holds.
    pub(crate) fn held_pages(&self) -> u64 {
        self.inner.extents.read().held_pages()
    }

    /// Checks the file's invariants: its metadata is canonical; every held frame is recorded
    /// as this file's in the store's physical metadata; every backed offset is held; held
    /// memory comes in whole granules of the source.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let inner = &self.inner;
        inner.domain.store().check_invariants()?;
        let granule = inner.store.inner.memory().granule();
        let extents: Vec<_> = inner.extents.read().all().collect();
        for extent in &extents {
            let holder = inner
                .store
                .inner
                .holder_of(extent.pfns())
                .map_err(|e| InvariantError(e.to_string()))?;
            if holder != Some(inner.id) {
                return Err(InvariantError(format!(
                    "{extent:?} of {} is held by {holder:?} in the physical metadata",
                    inner.id
                )));
            }
            if !extent.offsets.is_aligned_to(granule) || !extent.pfn.is_aligned_to(granule) {
                return Err(InvariantError(format!(
                    "{extent:?} of {} is not whole granules of {granule} pages",
                    inner.id
                )));
            }
        }
        let Some(all) = inner.all_pages() else {
            return Ok(());
        };
        let held = inner.extents.read();
        let mut problem = None;
        // Backed runs are checked as maximal spans of the owner, not as attribute runs: a
        // fragmented file's runs split at every shareability flip, and walking them (one
        // lookup in the extents each) dominated a live update's check of the rebuilt store.
        inner
            .domain
            .store()
            .visit_owner_runs(all.cast(), |run, owner| {
                let run = run.cast::<PageOffset>();
                if owner == Some(inner.id) && !held.holes_in(run).is_empty() {
                    problem = Some(format!("{run} is backed but not held"));
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| InvariantError(e.to_string()))?;
        match problem {
            Some(p) => Err(InvariantError(format!("{}: {p}", inner.id))),
            None => Ok(()),
        }
    }

    /// Destroys the file: fails with [`StoreError::FileBusy`] if any page is pinned (nothing
    /// changes then); otherwise every subscriber unmaps it, its memory goes back to the store,
    /// and every handle of it answers [`StoreError::Destroyed`] from then on. If a subscriber
    /// fails to unmap, the file stays as it was and the error says so.
    pub fn destroy(self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let all = inner.all_pages().ok_or(StoreError::Empty { offset: 0 })?;
        // The whole file locked: no operation under way, none starts until we are done.
        let guard = inner
            .domain
            .lock(all)
            .map_err(|e| inner.context().conversion(e))?;
        if let Some(pinned) = inner.first_pinned(all)? {
            return Err(StoreError::FileBusy {
                file: inner.id,
                offset: pinned.byte(),
                pfn: inner.backed_pfn(pinned),
            });
        }
        // Operations that start from now on are refused (they check the flag under their
        // lock, which they get once we let go).
        // Test-only mutation: mark the file destroyed only once its memory is gone.
        #[cfg(not(pfnstore_loom_mutation = "destroy_flag_late"))]
        if inner.destroyed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Destroyed { file: inner.id });
        }
        drop(guard);
        if let Err(e) = inner.punch(all, true) {
            inner.destroyed.store(false, Ordering::SeqCst);
            return Err(e);
        }
        inner.release_held();
        #[cfg(pfnstore_loom_mutation = "destroy_flag_late")]
        inner.destroyed.store(true, Ordering::SeqCst);
        inner.store.inner.file_closed(inner.id);
        Ok(())
    }
}

impl FileInner {
    /// Enters the store's gate for an operation of this file: refused once the file is
    /// destroyed or while the store is handed over.
    pub(crate) fn enter(&self) -> Result<Entered<'_>, StoreError> {
        let entered = self.store.inner.gate().enter(&self.ops)?;
        self.alive()?;
        Ok(entered)
    }

    /// The operations of this file under way.
    pub(crate) fn ops(&self) -> &Ops {
        &self.ops
    }

    /// Fails with [`StoreError::Destroyed`] once the file is destroyed.
    pub(crate) fn alive(&self) -> Result<(), StoreError> {
        if self.is_destroyed() {
            Err(StoreError::Destroyed { file: self.id })
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::SeqCst)
    }

    /// The error-translation context of this file.
    pub(crate) fn context(&self) -> FileContext<impl Fn(PageOffset) -> Option<Pfn> + '_> {
        FileContext {
            file: self.id,
            pfn: move |page| self.backed_pfn(page),
        }
    }

    pub(crate) fn all_pages(&self) -> Option<OffsetRange> {
        OffsetRange::from_len(PageOffset(0), self.size_pages).ok()
    }

    /// The page range of `offset..offset + len`, which must be page-aligned and in the file.
    pub(crate) fn pages(&self, offset: u64, len: u64) -> Result<OffsetRange, StoreError> {
        if len == 0 {
            return Err(StoreError::Empty { offset });
        }
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Unaligned { offset, len });
        }
        self.byte_pages(offset, len)
    }

    /// The pages that bytes `offset..offset + len` touch.
    pub(crate) fn byte_pages(&self, offset: u64, len: u64) -> Result<OffsetRange, StoreError> {
        if len == 0 {
            return Err(StoreError::Empty { offset });
        }
        let size = self.size_pages * PAGE_SIZE;
        let end = offset.checked_add(len).filter(|end| *end <= size);
        let Some(end) = end else {
            return Err(StoreError::BeyondEnd {
                file: self.id,
                offset: offset.max(size),
                size,
            });
        };
        Ok(OffsetRange::new(
            PageOffset(offset / PAGE_SIZE),
            PageOffset(end.div_ceil(PAGE_SIZE)),
        )?)
    }

    pub(crate) fn page(&self, offset: u64) -> Result<PageOffset, StoreError> {
        self.byte_pages(offset, 1).map(|r| r.start())
    }

    /// The frame behind `page` if memory backs it (held frames of punched pages do not).
    pub(crate) fn backed_pfn(&self, page: PageOffset) -> Option<Pfn> {
        let backed = self
            .domain
            .store()
            .attributes(Pfn(page.0))
            .is_ok_and(|a| a.owner == Some(self.id));
        if !backed {
            return None;
        }
        self.extents.read().pfn_at(page)
    }

    fn backed_pages(&self) -> u64 {
        let Some(all) = self.all_pages() else {
            return 0;
        };
        let mut pages = 0;
        let _ = self.domain.store().visit_runs(all.cast(), |run, a| {
            if a.owner == Some(self.id) {
                pages += run.len();
            }
            ControlFlow::Continue(())
        });
        pages
    }

    fn current_plan(&self) -> Result<MappingPlan, StoreError> {
        self.domain
            .current_plan()
            .map_err(|e| self.context().metadata(e))
    }

    /// The first pinned page of `pages`, if any.
    pub(crate) fn first_pinned(
        &self,
        pages: OffsetRange,
    ) -> Result<Option<PageOffset>, StoreError> {
        let mut first = None;
        self.domain
            .store()
            .visit_runs(pages.cast(), |run, a| {
                if !a.pins.is_empty() {
                    first = Some(PageOffset(run.start().0));
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| self.context().metadata(e))?;
        Ok(first)
    }

    /// Gives back every frame the file still holds (after its pages were punched, or when it
    /// goes away): out of the host mapping, then to the allocator; quarantined frames stay
    /// out of use.
    fn release_held(&self) {
        let held: Vec<_> = self.extents.read().all().collect();
        for extent in held {
            if let Some(mapping) = &self.mapping {
                let _ = mapping.unmap(extent.offsets);
            }
            self.extents.write().remove(extent.offsets);
            let _ = self.store.inner.release(self.id, extent.pfns());
        }
    }

    /// Gives everything back when the last handle goes: best effort, since nothing can be
    /// reported from a drop. Pinned memory cannot be freed while a device may still DMA into
    /// it, and memory a subscriber failed to unmap may still be mapped: both are quarantined
    /// instead (never reused, visible in the store's statistics).
    fn release_all(&self) {
        // Destroyed: nothing left. Handed over: the memory is another process's now.
        if self.is_destroyed() || self.store.inner.gate().phase() == Phase::HandedOver {
            return;
        }
        self.destroyed.store(true, Ordering::SeqCst);
        let Some(all) = self.all_pages() else {
            return;
        };
        // Split only where pinning starts or ends: one punch per shareability flip would cost a
        // fragmented file one transaction per converted page.
        let mut runs: Vec<(OffsetRange, bool)> = Vec::new();
        let _ = self.domain.store().visit_runs(all.cast(), |run, a| {
            let (run, pinned) = (run.cast::<PageOffset>(), !a.pins.is_empty());
            match runs.last_mut() {
                Some((last, p)) if *p == pinned && last.end() == run.start() => {
                    *last = last.hull(&run);
                }
                _ => runs.push((run, pinned)),
            }
            ControlFlow::Continue(())
        });
        for (run, pinned) in runs {
            let failed = pinned || self.punch(run, true).is_err();
            if failed {
                let frames: Vec<_> = self.extents.read().extents_in(run);
                let reason = if pinned {
                    QuarantineReason::StillPinned
                } else {
                    QuarantineReason::UnmapFailed
                };
                for extent in frames {
                    let _ = self.store.inner.quarantine(extent.pfns(), reason);
                }
            }
        }
        self.release_held();
        self.store.inner.file_closed(self.id);
    }
}

impl Drop for FileInner {
    fn drop(&mut self) {
        self.release_all();
    }
}

impl fmt::Debug for GuestFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestFile")
            .field("id", &self.inner.id)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}
