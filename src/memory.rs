//! The store's memory: its source, and the store's own unrestricted view of it.
//!
//! The *scrub view* is a mapping of the source's whole memfd that only the store uses, to
//! zero memory (scrubbing before reuse, ZERO conversions, a punched range populated again).
//! The VMM never sees it: it reaches guest memory through each file's own mapping
//! ([`crate::GuestFile::host_mapping`]), which holds only that file's memory.

use std::fmt;

use pfnstore_core::{Geometry, PAGE_SIZE, PageSize, Pfn, PfnRange};
use pfnstore_hugetlb::{HostView, HugePageSize, Memfd, MemorySource};

use crate::StoreError;

pub(crate) struct Memory {
    // Field order is drop order: the view maps the source's memfd and must be gone before the
    // source gives its hugetlb pages back to the pool.
    scrub: Option<HostView>,
    source: Box<dyn MemorySource>,
    /// Pages of the memfd's page size: the least a file holds of it (a hugetlb page cannot be
    /// mapped in part), 1 without a memfd.
    granule: u64,
    /// The largest block the memory is physically contiguous for.
    max_block: PageSize,
}

impl Memory {
    pub(crate) fn new(source: Box<dyn MemorySource>) -> Result<Memory, StoreError> {
        let geometry = source.geometry();
        // Memory is physically contiguous within a page of the memfd; PFNs without memory
        // (a synthetic source) are as contiguous as their chunks.
        let (scrub, granule, max_block) = match source.memfd() {
            Some(memfd) => (
                Some(HostView::from_memfd(memfd)?),
                memfd.page_size().base_pages(),
                largest_block_within(&geometry, memfd.page_size()),
            ),
            None => (None, 1, PageSize::Size1G),
        };
        Ok(Memory {
            scrub,
            max_block,
            granule,
            source,
        })
    }

    pub(crate) fn has_bytes(&self) -> bool {
        self.scrub.is_some()
    }

    pub(crate) fn source(&self) -> &dyn MemorySource {
        self.source.as_ref()
    }

    pub(crate) fn memfd(&self) -> Option<Memfd<'_>> {
        self.source.memfd()
    }

    pub(crate) fn granule(&self) -> u64 {
        self.granule
    }

    pub(crate) fn max_block(&self) -> PageSize {
        self.max_block
    }

    /// The memfd byte offset of `pfn`'s first byte.
    pub(crate) fn memfd_offset(&self, pfn: Pfn) -> Result<u64, StoreError> {
        self.source
            .locate(pfn)
            .map(|l| l.memfd_offset)
            .ok_or(StoreError::UnknownPfn { pfn })
    }

    /// One past the last PFN of the chunk that holds `pfn`: a chunk is contiguous in the
    /// memfd, two PFN-adjacent chunks are not (hugetlb pages sit in the memfd in no PFN order).
    pub(crate) fn chunk_end(&self, pfn: Pfn) -> Result<Pfn, StoreError> {
        let location = self
            .source
            .locate(pfn)
            .ok_or(StoreError::UnknownPfn { pfn })?;
        let chunk = &self.source.chunks()[location.chunk];
        Ok(Pfn(chunk.base.0 + chunk.pages))
    }

    /// Zeroes `pfns` (scrubbing, a ZERO conversion). A synthetic source has nothing to zero.
    pub(crate) fn zero(&self, pfns: PfnRange) -> Result<(), StoreError> {
        let Some(scrub) = &self.scrub else {
            return Ok(());
        };
        let mut next = pfns.start();
        while next < pfns.end() {
            let end = self.chunk_end(next)?.min(pfns.end());
            let offset = self.memfd_offset(next)?;
            scrub.zero(offset, (end.0 - next.0) * PAGE_SIZE)?;
            next = end;
        }
        Ok(())
    }
}

/// The largest block level of `geometry` no larger than a page of `contiguous`.
fn largest_block_within(geometry: &Geometry, contiguous: HugePageSize) -> PageSize {
    PageSize::LARGEST_FIRST
        .into_iter()
        .find(|s| geometry.pages(*s) <= contiguous.base_pages())
        .unwrap_or(PageSize::Size4K)
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memory")
            .field("chunks", &self.source.chunks().len())
            .field("bytes", &self.scrub.is_some())
            .field("granule_pages", &self.granule)
            .field("max_block", &self.max_block)
            .finish()
    }
}
