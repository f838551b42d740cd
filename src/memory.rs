//! Byte access to the store's memory by PFN.
//!
//! Two mappings of the source's memfd: the *scrub view*, which the store alone uses to zero
//! memory (scrubbing before reuse, ZERO conversions) and which is never restricted, and the
//! *host view*, through which the VMM reads and writes shared memory, and which is revoked
//! (PROT_NONE) for every huge page that is entirely private.

use std::fmt;

use pfnstore_core::{PAGE_SIZE, Pfn, PfnRange};
use pfnstore_hugetlb::{HostView, MemorySource, Protection};

use crate::StoreError;
use crate::store::internal;

/// The source and, when it has bytes, the view through which the store touches them.
pub(crate) struct Memory {
    // Field order is drop order: the views map the source's memfd and must be gone before the
    // source gives its hugetlb pages back to the pool.
    views: Option<Views>,
    source: Box<dyn MemorySource>,
}

/// The two mappings of a source with bytes.
#[derive(Debug)]
pub struct Views {
    /// The store's own, unrestricted mapping.
    pub scrub: HostView,
    /// The VMM's mapping, restricted to shared memory.
    pub host: HostView,
}

impl Memory {
    pub(crate) fn new(source: Box<dyn MemorySource>, views: Option<Views>) -> Memory {
        Memory { views, source }
    }

    pub(crate) fn has_bytes(&self) -> bool {
        self.views.is_some()
    }

    pub(crate) fn source(&self) -> &dyn MemorySource {
        self.source.as_ref()
    }

    fn host(&self, what: &'static str) -> Result<&HostView, StoreError> {
        self.views
            .as_ref()
            .map(|v| &v.host)
            .ok_or(StoreError::NoHostMemory { what })
    }

    /// The host view's granularity of protection, in bytes (None without bytes).
    pub(crate) fn protect_granule(&self) -> Option<u64> {
        self.views.as_ref().map(|v| v.host.page_size().bytes())
    }

    /// The view offset of `pfn`'s first byte.
    fn offset_of(&self, pfn: Pfn) -> Result<u64, StoreError> {
        self.source
            .locate(pfn)
            .map(|l| l.memfd_offset)
            .ok_or(StoreError::UnknownPfn { pfn })
    }

    /// The pieces of `pfns` that lie in one chunk each, as (view offset, bytes).
    fn pieces(&self, pfns: PfnRange) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut next = pfns.start();
        while next < pfns.end() {
            let location = self
                .source
                .locate(next)
                .ok_or(StoreError::UnknownPfn { pfn: next })?;
            let chunk = &self.source.chunks()[location.chunk];
            let in_chunk = (chunk.pages - location.page_offset).min(pfns.end().0 - next.0);
            out.push((location.memfd_offset, in_chunk * PAGE_SIZE));
            next = Pfn(next.0 + in_chunk);
        }
        Ok(out)
    }

    /// Zeroes `pfns` (scrubbing, or a ZERO conversion). A synthetic source has nothing to
    /// zero.
    pub(crate) fn zero(&self, pfns: PfnRange) -> Result<(), StoreError> {
        let Some(views) = &self.views else {
            return Ok(());
        };
        for (offset, len) in self.pieces(pfns)? {
            views.scrub.zero(offset, len).map_err(internal)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at byte `offset` of page `pfn` (within that page's chunk).
    pub(crate) fn read(&self, pfn: Pfn, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let view = self.host("reading guest memory")?;
        view.read(self.offset_of(pfn)? + offset, buf)
            .map_err(internal)
    }

    /// Writes `data` at byte `offset` of page `pfn` (within that page's chunk).
    pub(crate) fn write(&self, pfn: Pfn, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let view = self.host("writing guest memory")?;
        view.write(self.offset_of(pfn)? + offset, data)
            .map_err(internal)
    }

    /// Revokes (or restores) the host view's access to `pfns`, which must be whole huge pages
    /// of the source. Without a view there is nothing to protect.
    pub(crate) fn protect(&self, pfns: PfnRange, protection: Protection) -> Result<(), StoreError> {
        let Some(views) = &self.views else {
            return Ok(());
        };
        for (offset, len) in self.pieces(pfns)? {
            views
                .host
                .protect(offset, len, protection)
                .map_err(internal)?;
        }
        Ok(())
    }

    /// Sets `pfns` (whole huge pages) to `protection`, skipping the system call when the view
    /// already has it.
    pub(crate) fn protect_to(
        &self,
        pfns: PfnRange,
        protection: Protection,
    ) -> Result<(), StoreError> {
        let revoked = self.is_revoked(pfns.start());
        if revoked != (protection == Protection::None) {
            self.protect(pfns, protection)?;
        }
        Ok(())
    }

    /// Restores access to every revoked huge page that `pfns` touches (memory about to leave
    /// its file must not stay revoked for its next owner).
    pub(crate) fn protect_if_revoked(
        &self,
        pfns: PfnRange,
        protection: Protection,
    ) -> Result<(), StoreError> {
        let Some(granule) = self.protect_granule() else {
            return Ok(());
        };
        let granule_pages = granule / PAGE_SIZE;
        let mut pfn = pfns.start().align_down(granule_pages);
        while pfn < pfns.end() {
            if self.is_revoked(pfn) {
                self.protect(PfnRange::from_len(pfn, granule_pages)?, protection)?;
            }
            pfn = Pfn(pfn.0 + granule_pages);
        }
        Ok(())
    }

    /// The host view's address of `pfns`, which must lie at consecutive offsets of the view.
    pub(crate) fn host_address(&self, pfns: PfnRange) -> Result<*mut u8, StoreError> {
        let view = self.host("handing guest memory to the kernel")?;
        let first = self.offset_of(pfns.start())?;
        let last = self.offset_of(pfns.last())?;
        if last - first != (pfns.len() - 1) * PAGE_SIZE {
            return Err(StoreError::Internal(format!(
                "{pfns} is not contiguous in the host view"
            )));
        }
        // `first` lies inside the view (the source located it), so the offset pointer stays
        // inside the mapping; no access happens here.
        Ok(view.as_ptr().wrapping_add(first as usize))
    }

    /// Whether the view has revoked `pfn`'s page.
    pub(crate) fn is_revoked(&self, pfn: Pfn) -> bool {
        match (&self.views, self.offset_of(pfn)) {
            (Some(views), Ok(offset)) => views.host.is_revoked(offset),
            _ => false,
        }
    }
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memory")
            .field("chunks", &self.source.chunks().len())
            .field("views", &self.views.is_some())
            .finish()
    }
}
