//! The per-file host mapping, and the one rule that decides what of it is accessible.
//!
//! Every file of a store with memory has one contiguous mapping of its size, stable for its
//! life (a KVM memory slot, a vhost-user region): the memory the file holds is mapped into it
//! at the file's offsets from the source's memfd; what it does not hold is an inaccessible
//! reservation. Memory that leaves the file leaves the mapping before it goes back to the
//! allocator, so no address of one file ever reaches another file's memory.
//!
//! # The protection rule
//!
//! The mapping is protected a *unit* at a time: the memfd's page (a hugetlb mapping can only
//! be protected a whole huge page at a time), and at least 2 MiB, so that a file fragmented
//! at 4 KiB does not need one kernel memory region per page. A unit is accessible (read-write)
//! exactly when one of its pages is backed, shared and not quarantined; otherwise it is
//! `PROT_NONE`. So a unit that is entirely private is revoked from the host, and one that is
//! partly shared is guarded by the API's checks alone: [`crate::GuestFile::read`] and
//! [`crate::GuestFile::write`] refuse private and quarantined pages. [`FileInner::refresh`]
//! is the only code that applies the rule, and every operation that changes what backs an
//! offset or what it is calls it, under the range lock of the change, before (revocations)
//! and after (restorations) the metadata changes.

use std::ops::ControlFlow;

use pfnstore_core::{Geometry, OffsetRange, PAGE_SIZE, PageOffset, Pfn};
use pfnstore_hugetlb::{FileMapping, HugePageSize, HugetlbError, Protection};
use pfnstore_metadata::Shareability;

use super::FileInner;
use super::extents::Extent;
use crate::StoreError;

/// A file's host mapping.
#[derive(Debug)]
pub(crate) struct HostMapping {
    map: FileMapping,
    /// Pages per protection unit.
    unit: u64,
}

impl HostMapping {
    /// Reserves the mapping of a file of `pages` pages over memory of `granule` pages per
    /// memfd page.
    pub(crate) fn new(
        pages: u64,
        granule: u64,
        geometry: &Geometry,
    ) -> Result<HostMapping, StoreError> {
        let align = match granule * PAGE_SIZE {
            b if b >= HugePageSize::Huge1G.bytes() => HugePageSize::Huge1G,
            b if b >= HugePageSize::Huge2M.bytes() => HugePageSize::Huge2M,
            // Ordinary pages: align like a 2 MiB page anyway, so that the units below line up
            // with the host's transparent huge pages.
            _ => HugePageSize::Huge2M,
        };
        let unit = granule
            .max((2 << 20) / PAGE_SIZE)
            .min(geometry.chunk_pages().max(granule));
        let bytes = pages.div_ceil(granule) * granule * PAGE_SIZE;
        Ok(HostMapping {
            map: FileMapping::reserve(bytes, align)?,
            unit,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    pub(crate) fn len(&self) -> u64 {
        self.map.len()
    }

    pub(crate) fn regions(&self) -> u64 {
        self.map.regions()
    }

    /// Maps a held extent (inaccessible until the rule says otherwise).
    pub(crate) fn map(
        &self,
        extent: &Extent,
        memfd: std::os::fd::BorrowedFd<'_>,
        memfd_offset: u64,
    ) -> Result<(), HugetlbError> {
        self.map.map(
            extent.offsets.start().byte(),
            memfd,
            memfd_offset,
            extent.offsets.len() * PAGE_SIZE,
            Protection::None,
        )
    }

    /// Puts the reservation back over `offsets`.
    pub(crate) fn unmap(&self, offsets: OffsetRange) -> Result<(), HugetlbError> {
        let bytes = offsets.bytes();
        let end = bytes.end.min(self.map.len());
        if bytes.start >= end {
            return Ok(());
        }
        self.map.unmap(bytes.start, end - bytes.start)
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HugetlbError> {
        self.map.read(offset, buf)
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<(), HugetlbError> {
        self.map.write(offset, data)
    }

    /// Whether the bytes at `offset..offset + len` are mapped read-write.
    pub(crate) fn is_accessible(&self, offset: u64, len: u64) -> bool {
        self.map.is_accessible(offset, len)
    }

    /// The protection units that `pages` touches.
    fn units(&self, pages: OffsetRange) -> OffsetRange {
        pages.align_out(self.unit)
    }

    fn set(&self, unit: OffsetRange, protection: Protection) -> Result<(), HugetlbError> {
        let bytes = unit.bytes();
        let end = bytes.end.min(self.map.len());
        if bytes.start >= end {
            return Ok(());
        }
        self.map.protect(bytes.start, end - bytes.start, protection)
    }
}

/// Which way [`FileInner::refresh`] may change protections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Only revoke (before the metadata changes: the host loses access first).
    RevokeOnly,
    /// Revoke and restore (after it changed).
    Both,
}

impl FileInner {
    /// Whether `unit` may be accessible: one of its pages is backed, shared and not
    /// quarantined, with `pending` (pages about to convert) applied.
    fn unit_accessible(
        &self,
        unit: OffsetRange,
        pending: Option<(OffsetRange, Shareability)>,
    ) -> Result<bool, StoreError> {
        let mut accessible = false;
        let keys = unit.cast::<Pfn>();
        self.domain
            .store()
            .visit_runs(keys, |run, a| {
                if a.owner != Some(self.id) || a.quarantined.is_some() {
                    return ControlFlow::Continue(());
                }
                let run = run.cast::<PageOffset>();
                let shared_somewhere = match pending {
                    Some((changing, to)) => {
                        // Pages of the run outside `changing` keep their shareability.
                        let outside = run.start() < changing.start() || run.end() > changing.end();
                        (outside && a.shareability == Shareability::Shared)
                            || (run.overlaps(&changing) && to == Shareability::Shared)
                    }
                    None => a.shareability == Shareability::Shared,
                };
                if shared_somewhere {
                    accessible = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| self.context().metadata(e))?;
        Ok(accessible)
    }

    /// Applies the protection rule (module docs) to every unit `pages` touches. With
    /// `pending`, the rule sees those pages converted already (for revoking before the
    /// metadata changes). The caller holds the range lock of a change covering the units.
    pub(crate) fn refresh(
        &self,
        pages: OffsetRange,
        pending: Option<(OffsetRange, Shareability)>,
        direction: Direction,
    ) -> Result<(), StoreError> {
        let Some(mapping) = &self.mapping else {
            return Ok(());
        };
        let units = mapping.units(pages);
        let mut start = units.start();
        while start < units.end() {
            let unit = OffsetRange::from_len(start, mapping.unit)?;
            let accessible = self.unit_accessible(unit, pending)?;
            // Before the flip only revocations are made: the host loses access first.
            if !accessible || direction == Direction::Both {
                let protection = if accessible {
                    Protection::ReadWrite
                } else {
                    Protection::None
                };
                mapping
                    .set(unit, protection)
                    .map_err(|e| self.mapping_error(e, unit.start()))?;
            }
            start = unit.end();
        }
        Ok(())
    }

    /// The protection unit of the host mapping, in pages (for tests and stats).
    pub(crate) fn protection_unit(&self) -> Option<u64> {
        self.mapping.as_ref().map(|m| m.unit)
    }

    /// Translates a host-mapping error at `at`.
    pub(crate) fn mapping_error(&self, e: HugetlbError, at: PageOffset) -> StoreError {
        match e {
            HugetlbError::MapCountLimit { regions, limit, .. } => StoreError::MappingLimit {
                file: self.id,
                offset: at.byte(),
                regions,
                limit,
            },
            other => other.into(),
        }
    }
}
