//! The KVM fault path: the frame behind an offset and the largest block that may be mapped
//! around it, backing the offset on first touch.

use pfnstore_core::{OffsetRange, PageOffset, PageSize, Pfn};
use pfnstore_metadata::Shareability;

use super::{FileInner, GuestFile};
use crate::StoreError;

/// What a guest fault on one offset may map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultMapping {
    /// The frame behind the faulting offset.
    pub pfn: Pfn,
    /// The largest block around the offset that may be mapped with one entry: uniform
    /// attributes, backed by one run of frames aligned like the offsets, no larger than the
    /// memory is physically contiguous for.
    pub size: PageSize,
    /// The offset's shareability.
    pub shareability: Shareability,
}

impl GuestFile {
    /// The KVM fault path: the frame behind `offset` and the largest block that may be mapped
    /// around it, for a guest access of kind `access`. Backs the offset on first touch: the
    /// whole uniform block around it if that much memory can be had, else the largest block
    /// that can, down to the faulting page (a hugetlb page on a hugetlb store). An access
    /// whose kind differs from the page's shareability fails with
    /// [`StoreError::PrivateAccess`] (a shared access to a private page) or
    /// [`StoreError::SharedAccess`] (a private access to a shared page): KVM turns either into
    /// an exit to the VMM, which may convert.
    pub fn fault(&self, offset: u64, access: Shareability) -> Result<FaultMapping, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let page = inner.page(offset)?;
        let geometry = inner.store.geometry();
        loop {
            // Shared with other faults, excluded by changes: the answer describes one
            // consistent state of the page.
            let guard = inner
                .domain
                .lock_shared(OffsetRange::page(page)?)
                .map_err(|e| inner.context().conversion(e))?;
            inner.alive()?;
            let attributes = inner
                .domain
                .store()
                .attributes(Pfn(page.0))
                .map_err(|e| inner.context().metadata(e))?;
            let pfn = inner.backed_pfn(page);
            if attributes.shareability != access {
                return Err(match attributes.shareability {
                    Shareability::Private => StoreError::PrivateAccess {
                        file: inner.id,
                        offset,
                        pfn,
                    },
                    Shareability::Shared => StoreError::SharedAccess {
                        file: inner.id,
                        offset,
                        pfn,
                    },
                });
            }
            if attributes.quarantined.is_some() {
                return Err(StoreError::Quarantined {
                    file: inner.id,
                    offset,
                    pfn,
                });
            }
            let Some(pfn) = pfn else {
                // First touch. Population locks exclusively: let go, populate, look again.
                drop(guard);
                inner.back_for_fault(page)?;
                continue;
            };
            let uniform = inner
                .domain
                .max_mapping_size(page)
                .map_err(|e| inner.context().metadata(e))?;
            let contiguous = inner
                .extents
                .read()
                .contiguous_order(&geometry, page)
                .unwrap_or(PageSize::Size4K);
            return Ok(FaultMapping {
                pfn,
                size: uniform.min(contiguous),
                shareability: attributes.shareability,
            });
        }
    }
}

impl FileInner {
    /// Backs the uniform block around `page`, or the largest block around it that memory can
    /// be had for, down to the page itself.
    fn back_for_fault(&self, page: PageOffset) -> Result<(), StoreError> {
        let geometry = self.store.geometry();
        let uniform = self
            .domain
            .max_mapping_size(page)
            .map_err(|e| self.context().metadata(e))?;
        let mut size = uniform;
        loop {
            let block = geometry
                .block_containing(page, size)
                .map(|b| b.range(&geometry))
                .ok_or_else(|| crate::error::broken(format_args!("no block around {page}")))?;
            let end = block.end().0.min(self.size_pages);
            let block = OffsetRange::new(block.start(), PageOffset(end))?;
            let err = match self.populate(block) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            // Less memory, or a quarantined page elsewhere in the block: try a smaller one.
            let retry = matches!(
                err,
                StoreError::OutOfMemory { .. } | StoreError::Quarantined { .. }
            );
            match size.smaller() {
                Some(smaller) if retry => size = smaller,
                _ => return Err(err),
            }
        }
    }
}
