//! [`GuestMemory`]: one guest-memory file (the guest_memfd counterpart).
//!
//! A file is a range of page offsets. Each offset has a shareability (and may be pinned)
//! whether or not memory backs it yet: shareability belongs to the offset, not to the memory,
//! so a conversion of unbacked offsets holds when memory arrives, and punching a hole does not
//! change it. These per-offset attributes live in the file's own metadata store (the same
//! range-tree store the physical side uses, keyed by page offset); the [`Backing`] map says
//! which PFNs back which offsets; the store's physical metadata says which file owns a PFN.
//!
//! Lock order: the file's range locks (exclusive for populate, convert, punch; shared for the
//! host view, pins and faults), then the backing map, then the allocator's and the metadata
//! stores' own locks. Subscriber callbacks run under the range lock only.

use std::fmt;
use std::sync::Arc;

use pfnstore_core::sync::RwLock;
use pfnstore_core::{BlockRun, PAGE_SIZE, PageSize, Pfn, PfnRange};
use pfnstore_hugetlb::Protection;
use pfnstore_metadata::conversion::{
    ConversionDomain, ConversionError, ConversionOutcome, ConversionPlan,
};
use pfnstore_metadata::{
    Attributes, FileId, MetadataError, MetadataStore, PinOwner, Shareability, Stats,
};

use crate::StoreError;
use crate::backing::{Backing, Extent};
use crate::store::{Store, bytes, internal};

/// How a file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Size in bytes: a non-zero multiple of 4 KiB.
    pub size: u64,
    /// Shareability of every offset at creation (guest_memfd's INIT_SHARED flag).
    pub initial: Shareability,
    /// Back every offset with memory at creation, rather than on first use.
    pub populate: bool,
}

impl FileOptions {
    /// `size` bytes, all private, backed lazily.
    pub const fn new(size: u64) -> FileOptions {
        FileOptions {
            size,
            initial: Shareability::Private,
            populate: false,
        }
    }

    /// Starts all-shared.
    pub const fn shared(mut self) -> FileOptions {
        self.initial = Shareability::Shared;
        self
    }

    /// Backs every offset at creation.
    pub const fn populated(mut self) -> FileOptions {
        self.populate = true;
        self
    }
}

/// What a conversion does to the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvertMode {
    /// The bytes stay as they are (in-place conversion).
    #[default]
    Preserve,
    /// The bytes are zeroed before anyone sees the converted memory.
    Zero,
}

/// What the KVM fault path needs for one offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The PFN behind the faulting offset.
    pub pfn: Pfn,
    /// The largest block around the offset that may be mapped with one entry: uniform
    /// attributes, one contiguous extent with PFNs aligned like the offsets, inside the file.
    pub size: PageSize,
    /// The offset's shareability.
    pub shareability: Shareability,
}

/// Counts for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStats {
    /// Size in bytes.
    pub size: u64,
    /// Pages with memory behind them.
    pub backed_pages: u64,
    /// Records of the backing map.
    pub extents: usize,
    /// The per-offset metadata.
    pub metadata: Stats,
}

/// A guest-memory file. Cheap to clone (a handle); dropping the last handle gives the memory
/// back (see [`GuestMemory::destroy`] for the checked way).
#[derive(Clone)]
pub struct GuestMemory {
    pub(crate) inner: Arc<FileInner>,
}

pub(crate) struct FileInner {
    id: FileId,
    store: Store,
    size_pages: u64,
    domain: ConversionDomain,
    backing: RwLock<Backing>,
}

impl GuestMemory {
    pub(crate) fn create(
        store: Store,
        id: FileId,
        options: FileOptions,
    ) -> Result<GuestMemory, StoreError> {
        if options.size == 0 {
            return Err(StoreError::Empty { offset: 0 });
        }
        if !options.size.is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Unaligned {
                offset: 0,
                len: options.size,
            });
        }
        let geometry = store.geometry();
        let size_pages = options.size / PAGE_SIZE;
        let chunk = geometry.chunk_pages();
        let span_pages = size_pages.div_ceil(chunk) * chunk;
        let span = PfnRange::from_len(Pfn(0), span_pages)?;
        let offsets = MetadataStore::new(geometry, span).map_err(internal)?;
        for base in (0..span_pages).step_by(chunk as usize) {
            offsets
                .add_chunk(Pfn(base), options.initial)
                .map_err(internal)?;
        }
        // The metadata covers whole chunks; the file's own offsets are marked as owned by it,
        // so that no uniform block (and so no plan, no huge mapping) reaches past its end.
        offsets
            .assign_owner(PfnRange::from_len(Pfn(0), size_pages)?, id)
            .map_err(internal)?;
        let domain = ConversionDomain::new(
            id,
            pfnstore_core::sync::Arc::new(offsets),
            Arc::clone(&store.inner.registry),
        );
        let file = GuestMemory {
            inner: Arc::new(FileInner {
                id,
                store,
                size_pages,
                domain,
                backing: RwLock::new(Backing::new()),
            }),
        };
        if options.populate {
            file.populate(0, options.size)?;
        }
        Ok(file)
    }

    /// The file's id (what subscribers see).
    pub fn id(&self) -> FileId {
        self.inner.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        bytes(self.inner.size_pages)
    }

    /// The store the file lives in.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The attributes of the page at byte `offset`.
    pub fn attributes(&self, offset: u64) -> Result<Attributes, StoreError> {
        let page = self.inner.page(offset)?;
        self.inner
            .domain
            .store()
            .attributes(page)
            .map_err(|e| self.inner.metadata_error(e))
    }

    /// The shareability of the page at byte `offset`.
    pub fn shareability(&self, offset: u64) -> Result<Shareability, StoreError> {
        self.attributes(offset).map(|a| a.shareability)
    }

    /// The PFN behind byte `offset`, if memory backs it.
    pub fn translate(&self, offset: u64) -> Result<Option<Pfn>, StoreError> {
        let page = self.inner.page(offset)?;
        Ok(self.inner.backing.read().pfn_of(page))
    }

    /// Backs `offset..offset + len` with memory (zeroed), where it is not backed yet.
    /// All or nothing: on failure nothing new is backed.
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let pages = self.inner.pages(offset, len)?;
        let _guard = self
            .inner
            .domain
            .lock(pages)
            .map_err(|e| self.inner.conversion_error(e))?;
        self.inner.populate_locked(pages)
    }

    /// Converts `offset..offset + len` to `to`, in place: the transaction of
    /// [`pfnstore_metadata::conversion`], with the plan in page offsets of this file.
    pub fn convert(
        &self,
        offset: u64,
        len: u64,
        to: Shareability,
        mode: ConvertMode,
    ) -> Result<ConversionOutcome, StoreError> {
        let inner = &self.inner;
        let pages = inner.pages(offset, len)?;
        let mut zero_error = None;
        let result = inner.domain.convert_with(pages, to, |range| {
            if mode == ConvertMode::Zero {
                for extent in inner.backing.read().extents_in(range) {
                    if let Err(e) = inner.store.inner.memory.zero(extent.pfns()) {
                        zero_error = Some(e.clone());
                        return Err(e.to_string());
                    }
                }
            }
            Ok(())
        });
        match result {
            Ok(outcome) => {
                inner.refresh_host_protection(&outcome.plan)?;
                Ok(outcome)
            }
            Err(ConversionError::UnmapFailed { ref range, .. }) => {
                inner.quarantine_backing(*range)?;
                // The conversion happened; the plan is the region around the range.
                let region = chunk_region(inner, pages);
                inner.refresh_host_protection_in(region)?;
                Err(inner.conversion_error(result.expect_err("matched an error")))
            }
            Err(ConversionError::Hook { .. }) if zero_error.is_some() => {
                Err(zero_error.expect("checked just above"))
            }
            Err(e) => Err(inner.conversion_error(e)),
        }
    }

    /// Pins `offset..offset + len` for `owner` (a device or TD doing DMA): conversions and
    /// punch-holes of pinned pages fail until they are unpinned. The pages must be backed.
    pub fn pin(&self, offset: u64, len: u64, owner: PinOwner) -> Result<(), StoreError> {
        let inner = &self.inner;
        let pages = inner.pages(offset, len)?;
        let _guard = inner.shared_lock(pages)?;
        if let Some(hole) = inner.backing.read().holes_in(pages).first() {
            return Err(StoreError::NotBacked {
                file: inner.id,
                offset: bytes(hole.start().0),
            });
        }
        inner
            .domain
            .store()
            .pin(pages, owner)
            .map(drop)
            .map_err(|e| inner.metadata_error(e))
    }

    /// Drops one pin of `owner` on `offset..offset + len`.
    pub fn unpin(&self, offset: u64, len: u64, owner: PinOwner) -> Result<(), StoreError> {
        let inner = &self.inner;
        let pages = inner.pages(offset, len)?;
        inner
            .domain
            .store()
            .unpin(pages, owner)
            .map(drop)
            .map_err(|e| inner.metadata_error(e))
    }

    /// Takes the memory away from `offset..offset + len`: every subscriber unmaps it first,
    /// then it returns to the allocator (dirty, to be scrubbed before anyone gets it again).
    /// Shareability is not changed; the offsets read as zeros once populated again. Pinned
    /// pages fail the call; a subscriber that fails to unmap gets the pages quarantined.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let pages = inner.pages(offset, len)?;
        let result = inner
            .domain
            .invalidate(pages, |_plan| inner.release_backing(pages));
        match result {
            Ok(released) => released,
            Err(ConversionError::UnmapFailed { range, .. }) => {
                inner.quarantine_backing(range)?;
                Err(inner.conversion_error(result.expect_err("matched an error")))
            }
            Err(e) => Err(inner.conversion_error(e)),
        }
    }

    /// The KVM fault path: the PFN behind `offset` and the largest block that may be mapped
    /// around it, for a guest access of kind `access`. Backs the offset on first use. An
    /// access whose kind differs from the page's shareability fails with
    /// [`StoreError::PrivateAccess`] (a shared access to a private page) or
    /// [`StoreError::SharedAccess`] (a private access to a shared page): KVM turns either
    /// into an exit to the VMM, which may convert.
    pub fn fault(&self, offset: u64, access: Shareability) -> Result<Fault, StoreError> {
        let inner = &self.inner;
        let page = inner.page(offset)?;
        let geometry = inner.store.geometry();
        let metadata = inner.domain.store();
        loop {
            // Shared with other faults, excluded by conversions and punch-holes: the answer
            // describes one consistent state of the page.
            let guard = inner.shared_lock(PfnRange::page(page)?)?;
            let attributes = metadata
                .attributes(page)
                .map_err(|e| inner.metadata_error(e))?;
            if attributes.shareability != access {
                return Err(match attributes.shareability {
                    Shareability::Private => StoreError::PrivateAccess {
                        file: inner.id,
                        offset,
                        pfn: inner.pfn_at(page),
                    },
                    Shareability::Shared => StoreError::SharedAccess {
                        file: inner.id,
                        offset,
                        pfn: inner.pfn_at(page),
                    },
                });
            }
            if attributes.quarantined.is_some() {
                return Err(StoreError::Quarantined {
                    file: inner.id,
                    offset,
                    pfn: inner.pfn_at(page),
                });
            }
            let uniform = metadata
                .max_mapping_order(page)
                .map_err(|e| inner.metadata_error(e))?;
            let backing = inner.backing.read();
            let Some(pfn) = backing.pfn_of(page) else {
                // First touch: back the whole uniform block around the page, so that it can
                // be mapped huge. Population locks exclusively: let go, populate, look again.
                drop(backing);
                drop(guard);
                let block = block_in_file(inner, page, uniform);
                self.populate(bytes(block.start().0), bytes(block.len()))?;
                continue;
            };
            let contiguous = backing
                .contiguous_order(&geometry, page)
                .unwrap_or(PageSize::Size4K);
            let mut size = uniform.min(contiguous);
            while size > PageSize::Size4K
                && block_in_file(inner, page, size).len() < geometry.pages(size)
            {
                size = size.smaller().unwrap_or(PageSize::Size4K);
            }
            return Ok(Fault {
                pfn,
                size,
                shareability: attributes.shareability,
            });
        }
    }

    /// The largest naturally aligned block around `offset` whose attributes are uniform (the
    /// metadata half of [`GuestMemory::fault`]; lock-free for uniform chunks).
    pub fn max_mapping_order(&self, offset: u64) -> Result<PageSize, StoreError> {
        let page = self.inner.page(offset)?;
        self.inner
            .domain
            .store()
            .max_mapping_order(page)
            .map_err(|e| self.inner.metadata_error(e))
    }

    /// The mapped blocks of `offset..offset + len` as the metadata describes them now: what a
    /// subscriber that maps everything would hold.
    pub fn block_plan(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(BlockRun, pfnstore_metadata::MappingAttributes)>, StoreError> {
        let pages = self.inner.pages(offset, len)?;
        let plan = self
            .inner
            .domain
            .store()
            .block_plan(pages)
            .map_err(|e| self.inner.metadata_error(e))?;
        Ok(plan.into_iter().collect())
    }

    /// Reads `buf.len()` bytes at `offset` through the host view. Every page touched must be
    /// shared (R4); unbacked pages read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let pages = inner.byte_pages(offset, buf.len() as u64)?;
        let _guard = inner.shared_lock(pages)?;
        inner.check_shared(pages, offset)?;
        inner.copy(offset, pages, Copy::Read(buf))
    }

    /// Writes `data` at `offset` through the host view. Every page touched must be shared
    /// (R4); unbacked pages are backed first.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let pages = inner.byte_pages(offset, data.len() as u64)?;
        loop {
            {
                let _guard = inner.shared_lock(pages)?;
                inner.check_shared(pages, offset)?;
                if inner.backing.read().holes_in(pages).is_empty() {
                    return inner.copy(offset, pages, Copy::Write(data));
                }
            }
            // Back the holes (exclusive), then retry under the shared lock: a conversion or
            // punch-hole may have come in between.
            self.populate(bytes(pages.start().0), bytes(pages.len()))?;
        }
    }

    /// The host view's address of bytes `offset..offset + len`, for handing shared guest memory
    /// to the kernel: a KVM memory slot, a VFIO DMA mapping. The bytes must be backed by one
    /// extent (populate first) and every page must be shared now.
    ///
    /// The address is only as good as the store's promises: pages that are converted to
    /// private later are revoked from the view (whole huge pages) or merely refused by the API
    /// (partly shared huge pages), and a punched range loses its memory. A VMM that hands the
    /// address on must subscribe and unmap on the store's plans, as KVM and VFIO do.
    pub fn host_view_address(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<std::ptr::NonNull<u8>, StoreError> {
        let inner = &self.inner;
        let pages = inner.byte_pages(offset, len)?;
        let _guard = inner.shared_lock(pages)?;
        inner.check_shared(pages, offset)?;
        let extent = inner.backing.read().extent_at(pages.start());
        let Some(extent) = extent.filter(|e| e.offsets.contains_range(&pages)) else {
            return Err(StoreError::NotBacked {
                file: inner.id,
                offset,
            });
        };
        let pfns = PfnRange::from_len(extent.pfn_of(pages.start()), pages.len())?;
        let base = inner.store.inner.memory.host_address(pfns)?;
        let address = base.wrapping_add((offset % PAGE_SIZE) as usize);
        std::ptr::NonNull::new(address).ok_or(StoreError::Internal("null host view".into()))
    }

    /// The memory behind the file: (first byte offset, PFNs) per extent, by offset.
    pub fn extents(&self) -> Vec<(u64, PfnRange)> {
        let all = PfnRange::from_len(Pfn(0), self.inner.size_pages).expect("a file is never empty");
        self.inner
            .backing
            .read()
            .extents_in(all)
            .into_iter()
            .map(|e| (bytes(e.offsets.start().0), e.pfns()))
            .collect()
    }

    /// Whether the host view's mapping of the page at `offset` is revoked (PROT_NONE): true
    /// only for backed pages in a huge page that is entirely private.
    pub fn host_revoked(&self, offset: u64) -> Result<bool, StoreError> {
        let page = self.inner.page(offset)?;
        let pfn = self.inner.backing.read().pfn_of(page);
        Ok(pfn.is_some_and(|pfn| self.inner.store.inner.memory.is_revoked(pfn)))
    }

    /// Counts for this file.
    pub fn stats(&self) -> FileStats {
        let backing = self.inner.backing.read();
        FileStats {
            size: self.size(),
            backed_pages: backing.backed_pages(),
            extents: backing.extent_count(),
            metadata: self.inner.domain.store().stats(),
        }
    }

    /// Checks the file's invariants: its metadata is canonical, every backed PFN is owned by
    /// this file in the store's physical metadata.
    pub fn check_invariants(&self) -> Result<(), String> {
        let inner = &self.inner;
        inner.domain.store().check_invariants()?;
        let all = PfnRange::from_len(Pfn(0), inner.size_pages).map_err(|e| e.to_string())?;
        for extent in inner.backing.read().extents_in(all) {
            let owner = inner
                .store
                .inner
                .physical
                .owner_of(extent.pfns())
                .map_err(|e| e.to_string())?;
            if owner != Some(inner.id) {
                return Err(format!(
                    "{:?} of {} is owned by {owner:?}",
                    extent, inner.id
                ));
            }
        }
        Ok(())
    }

    /// Destroys the file: fails with [`StoreError::FileBusy`] if any page is pinned (nothing
    /// changes then); otherwise punches the whole file and returns its memory.
    pub fn destroy(self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let all = PfnRange::from_len(Pfn(0), inner.size_pages)?;
        let pinned = inner
            .domain
            .store()
            .ranges(all)
            .map_err(|e| inner.metadata_error(e))?;
        if let Some((range, _)) = pinned.iter().find(|(_, a)| !a.pins.is_empty()) {
            return Err(StoreError::FileBusy {
                file: inner.id,
                offset: bytes(range.start().0),
                pfn: inner.pfn_at(range.start()),
            });
        }
        self.punch_hole(0, self.size())
    }
}

enum Copy<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl FileInner {
    /// The page range of `offset..offset + len`, which must be page-aligned and in the file.
    fn pages(&self, offset: u64, len: u64) -> Result<PfnRange, StoreError> {
        if len == 0 {
            return Err(StoreError::Empty { offset });
        }
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Unaligned { offset, len });
        }
        self.byte_pages(offset, len)
    }

    /// The pages that bytes `offset..offset + len` touch.
    fn byte_pages(&self, offset: u64, len: u64) -> Result<PfnRange, StoreError> {
        if len == 0 {
            return Err(StoreError::Empty { offset });
        }
        let size = bytes(self.size_pages);
        let end = offset.checked_add(len).filter(|end| *end <= size);
        let Some(end) = end else {
            return Err(StoreError::BeyondEnd {
                file: self.id,
                offset: offset.max(size),
                size,
            });
        };
        Ok(PfnRange::new(
            Pfn(offset / PAGE_SIZE),
            Pfn(end.div_ceil(PAGE_SIZE)),
        )?)
    }

    fn page(&self, offset: u64) -> Result<Pfn, StoreError> {
        self.byte_pages(offset, 1).map(|r| r.start())
    }

    fn shared_lock(
        &self,
        pages: PfnRange,
    ) -> Result<pfnstore_metadata::conversion::RangeGuard<'_>, StoreError> {
        self.domain
            .locks()
            .lock_shared(pages)
            .map_err(|_| StoreError::Reentrant {
                file: self.id,
                offset: bytes(pages.start().0),
                end: bytes(pages.end().0),
            })
    }

    fn check_shared(&self, pages: PfnRange, offset: u64) -> Result<(), StoreError> {
        let ranges = self
            .domain
            .store()
            .ranges(pages)
            .map_err(|e| self.metadata_error(e))?;
        if let Some((range, _)) = ranges
            .iter()
            .find(|(_, a)| a.shareability == Shareability::Private)
        {
            let first = bytes(range.start().0).max(offset);
            return Err(StoreError::PrivateAccess {
                file: self.id,
                offset: first,
                pfn: self.pfn_at(Pfn(first / PAGE_SIZE)),
            });
        }
        if let Some((range, _)) = ranges.iter().find(|(_, a)| a.quarantined.is_some()) {
            let first = bytes(range.start().0).max(offset);
            return Err(StoreError::Quarantined {
                file: self.id,
                offset: first,
                pfn: self.pfn_at(Pfn(first / PAGE_SIZE)),
            });
        }
        Ok(())
    }

    fn copy(&self, offset: u64, pages: PfnRange, mut what: Copy<'_>) -> Result<(), StoreError> {
        let memory = &self.store.inner.memory;
        let backing = self.backing.read();
        let mut done = 0usize;
        let total = match &what {
            Copy::Read(buf) => buf.len(),
            Copy::Write(data) => data.len(),
        };
        let mut next_page = pages.start();
        let mut pieces = backing.extents_in(pages).into_iter().peekable();
        while done < total {
            let here = offset + done as u64;
            let page = Pfn(here / PAGE_SIZE);
            debug_assert!(page >= next_page);
            next_page = page;
            // The bytes up to the end of the extent (or of the hole) that `here` lies in.
            let extent = loop {
                match pieces.peek() {
                    Some(e) if e.offsets.end() <= page => {
                        pieces.next();
                    }
                    other => break other.copied(),
                }
            };
            let (stop_page, pfn) = match extent {
                Some(e) if e.offsets.contains(page) => (e.offsets.end(), Some(e.pfn_of(page))),
                Some(e) => (e.offsets.start(), None),
                None => (pages.end(), None),
            };
            let len = ((bytes(stop_page.0) - here) as usize).min(total - done);
            let in_page = here % PAGE_SIZE;
            match (&mut what, pfn) {
                (Copy::Read(buf), Some(pfn)) => {
                    memory.read(pfn, in_page, &mut buf[done..done + len])?
                }
                (Copy::Read(buf), None) => buf[done..done + len].fill(0),
                (Copy::Write(data), Some(pfn)) => {
                    memory.write(pfn, in_page, &data[done..done + len])?
                }
                (Copy::Write(_), None) => {
                    return Err(StoreError::NotBacked {
                        file: self.id,
                        offset: here,
                    });
                }
            }
            done += len;
        }
        Ok(())
    }

    /// Backs the holes of `pages`; the caller holds the range lock. All or nothing.
    fn populate_locked(&self, pages: PfnRange) -> Result<(), StoreError> {
        let geometry = self.store.geometry();
        let holes = self.backing.read().holes_in(pages);
        let mut added: Vec<Extent> = Vec::new();
        for hole in holes {
            for run in geometry.block_runs(hole) {
                if let Err(e) = self.allocate_run(run, &mut added) {
                    self.undo(&added);
                    return Err(e);
                }
            }
        }
        let mut backing = self.backing.write();
        for extent in added {
            backing.insert(extent);
        }
        Ok(())
    }

    /// Allocates memory for the blocks of `run`, with PFNs aligned like the offsets so the
    /// blocks can be mapped at their size; splits blocks the allocator cannot serve whole.
    fn allocate_run(&self, run: BlockRun, added: &mut Vec<Extent>) -> Result<(), StoreError> {
        let geometry = self.store.geometry();
        let block_pages = geometry.pages(run.size());
        let store = &self.store.inner;
        if let Some(pfns) = store.allocate_for(self.id, run.pages(&geometry), block_pages) {
            added.push(Extent {
                offsets: run.range(&geometry),
                pfn: pfns.start(),
            });
            return Ok(());
        }
        let Some(smaller) = run.size().smaller() else {
            return Err(StoreError::OutOfMemory {
                file: self.id,
                offset: bytes(run.start().0),
                pages: run.pages(&geometry),
            });
        };
        for block in run.blocks(&geometry) {
            let sub = BlockRun::new(
                &geometry,
                block.start(),
                smaller,
                block_pages / geometry.pages(smaller),
            )?;
            self.allocate_run(sub, added)?;
        }
        Ok(())
    }

    fn undo(&self, added: &[Extent]) {
        for extent in added {
            // These were just allocated, owned by this file and unpinned: release cannot fail
            // unless the store's state is already broken, in which case nothing better exists.
            let _ = self.store.inner.release(self.id, extent.pfns());
        }
    }

    /// Gives back the memory of `pages` (range lock held, subscribers done). Quarantined
    /// offsets keep their memory out of use: the allocator already holds it quarantined.
    fn release_backing(&self, pages: PfnRange) -> Result<(), StoreError> {
        let quarantined: Vec<PfnRange> = self
            .domain
            .store()
            .ranges(pages)
            .map_err(|e| self.metadata_error(e))?
            .into_iter()
            .filter(|(_, a)| a.quarantined.is_some())
            .map(|(r, _)| r)
            .collect();
        let removed = self.backing.write().remove(pages);
        let memory = &self.store.inner.memory;
        for extent in removed {
            let mut healthy = vec![extent];
            for q in &quarantined {
                healthy = healthy.into_iter().flat_map(|e| subtract(e, q)).collect();
            }
            for piece in healthy {
                memory.protect_if_revoked(piece.pfns(), Protection::ReadWrite)?;
                self.store.inner.release(self.id, piece.pfns())?;
            }
        }
        Ok(())
    }

    /// Quarantines the memory behind `pages` (their unmap failed).
    fn quarantine_backing(&self, pages: PfnRange) -> Result<(), StoreError> {
        for extent in self.backing.read().extents_in(pages) {
            self.store.inner.quarantine(extent.pfns())?;
        }
        Ok(())
    }

    /// Revokes the host view for every huge page of the plan's region that backs only
    /// private offsets of this file, and restores it for those that back a shared one.
    fn refresh_host_protection(&self, plan: &ConversionPlan) -> Result<(), StoreError> {
        match plan.region() {
            Some(region) => self.refresh_host_protection_in(region),
            None => Ok(()),
        }
    }

    fn refresh_host_protection_in(&self, region: PfnRange) -> Result<(), StoreError> {
        let memory = &self.store.inner.memory;
        let Some(granule) = memory.protect_granule() else {
            return Ok(());
        };
        let granule_pages = granule / PAGE_SIZE;
        for extent in self.backing.read().extents_in(region) {
            // Whole huge pages of the extent only: a huge page shared with other files or
            // with free memory is guarded by the API checks alone.
            let whole = self
                .backing
                .read()
                .extent_at(extent.offsets.start())
                .unwrap_or(extent);
            let mut pfn = extent
                .pfn
                .checked_align_up(granule_pages)
                .unwrap_or(extent.pfn);
            while pfn.0 + granule_pages <= extent.pfns().end().0 {
                let huge = PfnRange::from_len(pfn, granule_pages)?;
                if whole.pfns().contains_range(&huge) {
                    let offsets = PfnRange::from_len(
                        Pfn(whole.offsets.start().0 + (pfn.0 - whole.pfn.0)),
                        granule_pages,
                    )?;
                    let all_private = self
                        .domain
                        .store()
                        .ranges(offsets)
                        .map_err(|e| self.metadata_error(e))?
                        .iter()
                        .all(|(_, a)| a.shareability == Shareability::Private);
                    let protection = if all_private {
                        Protection::None
                    } else {
                        Protection::ReadWrite
                    };
                    memory.protect_to(huge, protection)?;
                }
                pfn = Pfn(pfn.0 + granule_pages);
            }
        }
        Ok(())
    }

    /// The frame behind `page`, for error reports. Never call with the backing map locked.
    fn pfn_at(&self, page: Pfn) -> Option<Pfn> {
        self.backing.read().pfn_of(page)
    }

    fn metadata_error(&self, e: MetadataError) -> StoreError {
        let file = self.id;
        match e {
            MetadataError::Pinned { first_pfn, owner } => StoreError::Pinned {
                file,
                offset: bytes(first_pfn.0),
                pfn: self.pfn_at(first_pfn),
                owner,
            },
            MetadataError::Quarantined { first_pfn } => StoreError::Quarantined {
                file,
                offset: bytes(first_pfn.0),
                pfn: self.pfn_at(first_pfn),
            },
            MetadataError::NotPinned { first_pfn, owner } => StoreError::NotPinned {
                file,
                offset: bytes(first_pfn.0),
                pfn: self.pfn_at(first_pfn),
                owner,
            },
            MetadataError::PinOverflow { first_pfn, owner } => StoreError::PinOverflow {
                file,
                offset: bytes(first_pfn.0),
                pfn: self.pfn_at(first_pfn),
                owner,
            },
            other => internal(other),
        }
    }

    fn conversion_error(&self, e: ConversionError) -> StoreError {
        let file = self.id;
        match e {
            ConversionError::Metadata(m) => self.metadata_error(m),
            ConversionError::Vetoed {
                first_page,
                subscriber,
                reason,
            } => StoreError::Vetoed {
                file,
                offset: bytes(first_page.0),
                pfn: self.pfn_at(first_page),
                subscriber,
                reason,
            },
            ConversionError::UnmapFailed {
                subscriber,
                range,
                reason,
                ..
            } => StoreError::UnmapFailed {
                file,
                offset: bytes(range.start().0),
                end: bytes(range.end().0),
                pfn: self.pfn_at(range.start()),
                subscriber,
                reason,
            },
            ConversionError::Reentrant { requested, .. } => StoreError::Reentrant {
                file,
                offset: bytes(requested.start().0),
                end: bytes(requested.end().0),
            },
            ConversionError::Hook { reason, .. } => internal(reason),
        }
    }

    /// Gives everything back when the last handle goes: best effort, since nothing can be
    /// reported from a drop. Pinned memory cannot be freed while a device may still DMA into
    /// it, so it is quarantined instead (never reused, visible in the store's statistics).
    fn release_all(&self) {
        let Ok(all) = PfnRange::from_len(Pfn(0), self.size_pages) else {
            return;
        };
        let Ok(ranges) = self.domain.store().ranges(all) else {
            return;
        };
        for (range, attributes) in ranges {
            if !attributes.pins.is_empty() {
                let _ = self.quarantine_backing(range);
                self.backing.write().remove(range);
                continue;
            }
            let result = self
                .domain
                .invalidate(range, |_| self.release_backing(range));
            if let Err(ConversionError::UnmapFailed { range: failed, .. }) = result {
                // The failing pages are quarantined now; release_backing keeps them out of
                // the allocator and gives the rest back.
                let _ = self.quarantine_backing(failed);
                let _ = self
                    .domain
                    .invalidate(range, |_| self.release_backing(range));
            }
        }
    }
}

impl Drop for FileInner {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// `extent` without the offsets of `hole`.
fn subtract(extent: Extent, hole: &PfnRange) -> Vec<Extent> {
    let mut out = Vec::new();
    let o = extent.offsets;
    if let Ok(left) = PfnRange::new(o.start(), hole.start().min(o.end())) {
        out.extend(extent.clip(&left));
    }
    if let Ok(right) = PfnRange::new(hole.end().max(o.start()), o.end()) {
        out.extend(extent.clip(&right));
    }
    out
}

/// The block of `size` around `page`, clipped to the file.
fn block_in_file(inner: &FileInner, page: Pfn, size: PageSize) -> PfnRange {
    let geometry = inner.store.geometry();
    let pages = geometry.pages(size);
    let start = page.align_down(pages);
    let end = (start.0 + pages).min(inner.size_pages);
    PfnRange::new(start, Pfn(end))
        .unwrap_or_else(|_| PfnRange::page(page).expect("page is in the file"))
}

/// The chunk hull of `pages` clipped to the file: the most a conversion's plan can cover.
fn chunk_region(inner: &FileInner, pages: PfnRange) -> PfnRange {
    let hull = pfnstore_metadata::conversion::chunk_hull(&inner.store.geometry(), pages);
    let end = hull.end().0.min(inner.size_pages);
    PfnRange::new(hull.start(), Pfn(end)).unwrap_or(pages)
}

impl fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMemory")
            .field("id", &self.inner.id)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}
