//! The host's access to a file's memory: byte reads and writes through the file's host
//! mapping (shared pages only), pins, and what is handed to the kernel or another process
//! (addresses, memfd extents).

use std::ops::ControlFlow;
use std::ptr::NonNull;

use pfnstore_core::{OffsetRange, PAGE_SIZE, PageOffset, Pfn};
use pfnstore_hugetlb::{HugetlbError, Memfd};
use pfnstore_metadata::{PinOwner, Shareability};

use super::mapping::Direction;
use super::{FileInner, GuestFile};
use crate::StoreError;

/// One backed piece of a file, for handing its memory to another process or device by file
/// descriptor: a vhost-user region, iommufd's `IOMMU_IOAS_MAP_FILE`, vm-memory's
/// `FileOffset`. The descriptor is [`GuestFile::memfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileExtent {
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Byte offset of the same memory in the store's memfd.
    pub memfd_offset: u64,
    /// The first frame.
    pub pfn: Pfn,
}

/// The file's host mapping: one contiguous range of the file's size (rounded up to the
/// source's page), stable for the file's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRegion {
    /// The first byte's address (kept as a number: the region grants no access by itself).
    addr: usize,
    len: u64,
}

impl HostRegion {
    /// The first byte (file offset 0), for handing to the kernel (a KVM memory slot, a DMA
    /// map). Dereferencing it bypasses the store's checks.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Bytes mapped (at least the file's size).
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// A piece of an access: bytes `start..end` of the file, backed or not.
#[derive(Clone, Copy)]
struct Piece {
    start: u64,
    end: u64,
    backed: bool,
}

impl GuestFile {
    /// Reads `buf.len()` bytes at `offset` through the file's host mapping. Every page
    /// touched must be shared and not quarantined; unbacked pages read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.byte_pages(offset, buf.len() as u64)?;
        let _guard = inner
            .domain
            .lock_shared(pages)
            .map_err(|e| inner.context().conversion(e))?;
        inner.alive()?;
        let end = offset + buf.len() as u64;
        let pieces = inner.pieces(pages, offset, end)?;
        for piece in pieces {
            let dst = &mut buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
            if piece.backed {
                let mapping = inner.host("reading guest memory")?;
                inner.retrying(piece.start, |at| mapping.read(at, dst))?;
            } else {
                // Unbacked pages read as zeros, with or without host memory.
                dst.fill(0);
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` through the file's host mapping. Every page touched must be
    /// shared and not quarantined; unbacked pages are backed first (which a store without
    /// host memory refuses before anything changes).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.byte_pages(offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        loop {
            {
                let _guard = inner
                    .domain
                    .lock_shared(pages)
                    .map_err(|e| inner.context().conversion(e))?;
                inner.alive()?;
                let pieces = inner.pieces(pages, offset, end)?;
                // Checked before anything is backed: a refused write changes nothing.
                let mapping = inner.host("writing guest memory")?;
                if pieces.iter().all(|p| p.backed) {
                    for piece in pieces {
                        let src =
                            &data[(piece.start - offset) as usize..(piece.end - offset) as usize];
                        inner.retrying(piece.start, |at| mapping.write(at, src))?;
                    }
                    return Ok(());
                }
            }
            // Back the holes (exclusive), then retry under the shared lock: a conversion or
            // punch-hole may have come in between.
            inner.populate(pages)?;
            // Test-only mutation: write without looking again (the loom models must catch it).
            #[cfg(pfnstore_loom_mutation = "write_unchecked_after_populate")]
            {
                let mapping = inner.host("writing guest memory")?;
                return inner.retrying(offset, |at| mapping.write(at, data));
            }
        }
    }

    /// The address of bytes `offset..offset + len` in the file's host mapping, for handing
    /// shared guest memory to the kernel (a VFIO DMA mapping, an I/O buffer). Every page must
    /// be backed and shared now.
    ///
    /// The address is only as good as the store's promises: pages converted to private later
    /// are revoked from the mapping (whole units) or merely refused by the API (partly shared
    /// units), and punched pages lose their memory. A VMM that hands the address on must
    /// subscribe and unmap on the store's plans, as KVM and VFIO do.
    pub fn host_view_address(&self, offset: u64, len: u64) -> Result<NonNull<u8>, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.byte_pages(offset, len)?;
        let mapping = inner.host("handing guest memory to the kernel")?;
        let _guard = inner
            .domain
            .lock_shared(pages)
            .map_err(|e| inner.context().conversion(e))?;
        inner.alive()?;
        if let Some(hole) = inner
            .pieces(pages, offset, offset + len)?
            .iter()
            .find(|p| !p.backed)
        {
            return Err(StoreError::NotBacked {
                file: inner.id,
                offset: hole.start,
            });
        }
        inner.retrying(offset, |at| {
            if mapping.is_accessible(at, offset + len - at) {
                Ok(())
            } else {
                Err(HugetlbError::Revoked { offset: at })
            }
        })?;
        NonNull::new(mapping.as_ptr().wrapping_add(offset as usize))
            .ok_or_else(|| crate::error::broken("null host mapping"))
    }

    /// The file's host mapping (what a KVM memory slot or a vhost-user region is made of), or
    /// `None` for a store without host memory. Unbacked pages, and units of it that are
    /// wholly private, are inaccessible (`PROT_NONE`): a guest access to them through a KVM
    /// slot reaches the VMM as a memory fault (an `EFAULT` exit), which backs the page with
    /// [`GuestFile::fault`] (or converts it) and resumes.
    pub fn host_mapping(&self) -> Option<HostRegion> {
        let mapping = self.inner.mapping.as_ref()?;
        Some(HostRegion {
            addr: mapping.as_ptr() as usize,
            len: mapping.len(),
        })
    }

    /// The memfd the file's memory lives in (see [`GuestFile::extents`]).
    pub fn memfd(&self) -> Option<Memfd<'_>> {
        self.inner.store.inner.memory().memfd()
    }

    /// The backed memory of the file, by offset: where each piece lies in the memfd.
    pub fn extents(&self) -> Result<Vec<FileExtent>, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let Some(all) = inner.all_pages() else {
            return Ok(Vec::new());
        };
        let memory = inner.store.inner.memory();
        let mut backed = Vec::new();
        inner
            .domain
            .store()
            .visit_runs(all.cast(), |run, a| {
                if a.owner == Some(inner.id) {
                    backed.push(run.cast::<PageOffset>());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| inner.context().metadata(e))?;
        let held = inner.extents.read();
        let mut out: Vec<FileExtent> = Vec::new();
        for range in backed {
            for extent in held.extents_in(range) {
                let memfd_offset = memory.memfd_offset(extent.pfn).unwrap_or(0);
                let len = extent.offsets.len() * PAGE_SIZE;
                // Canonical: maximal pieces contiguous in offsets, frames and the memfd, however
                // the file happened to get its memory.
                match out.last_mut() {
                    Some(last)
                        if last.offset + last.len == extent.offsets.start().byte()
                            && last.pfn.0 + last.len / PAGE_SIZE == extent.pfn.0
                            && last.memfd_offset + last.len == memfd_offset =>
                    {
                        last.len += len;
                    }
                    _ => out.push(FileExtent {
                        offset: extent.offsets.start().byte(),
                        len,
                        memfd_offset,
                        pfn: extent.pfn,
                    }),
                }
            }
        }
        Ok(out)
    }

    /// Whether the host mapping of the page at `offset` is revoked: true for backed pages in
    /// a unit that holds no shared page.
    pub fn host_revoked(&self, offset: u64) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let page = inner.page(offset)?;
        let Some(mapping) = &inner.mapping else {
            return Ok(false);
        };
        Ok(inner.backed_pfn(page).is_some() && !mapping.is_accessible(page.byte(), PAGE_SIZE))
    }

    /// Pins `offset..offset + len` for `owner` (a device or TD doing DMA): conversions and
    /// punch-holes of pinned pages fail until they are unpinned. The pages must be backed.
    pub fn pin(&self, offset: u64, len: u64, owner: PinOwner) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.pages(offset, len)?;
        // Test-only mutation: pin without the range lock (the loom models must catch it).
        #[cfg(not(pfnstore_loom_mutation = "pin_unlocked"))]
        let _guard = inner
            .domain
            .lock_shared(pages)
            .map_err(|e| inner.context().conversion(e))?;
        inner.alive()?;
        let mut hole = None;
        inner
            .domain
            .store()
            .visit_runs(pages.cast(), |run, a| {
                if a.owner != Some(inner.id) {
                    hole = Some(run.start().0);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| inner.context().metadata(e))?;
        if let Some(page) = hole {
            return Err(StoreError::NotBacked {
                file: inner.id,
                offset: PageOffset(page).byte(),
            });
        }
        inner
            .domain
            .store()
            .pin(pages.cast(), owner)
            .map(drop)
            .map_err(|e| inner.context().metadata(e))
    }

    /// Drops one pin of `owner` on `offset..offset + len`.
    pub fn unpin(&self, offset: u64, len: u64, owner: PinOwner) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _op = inner.enter()?;
        let pages = inner.pages(offset, len)?;
        let _guard = inner
            .domain
            .lock_shared(pages)
            .map_err(|e| inner.context().conversion(e))?;
        inner
            .domain
            .store()
            .unpin(pages.cast(), owner)
            .map(drop)
            .map_err(|e| inner.context().metadata(e))
    }
}

impl FileInner {
    fn host(&self, what: &'static str) -> Result<&super::mapping::HostMapping, StoreError> {
        self.mapping
            .as_ref()
            .ok_or(StoreError::NoHostMemory { what })
    }

    /// The backed and unbacked pieces of bytes `start..end` (pages `pages`), after checking
    /// that every page is shared and not quarantined.
    fn pieces(&self, pages: OffsetRange, start: u64, end: u64) -> Result<Vec<Piece>, StoreError> {
        let mut pieces: Vec<Piece> = Vec::with_capacity(1);
        let mut refused = None;
        self.domain
            .store()
            .visit_runs(pages.cast(), |run, a| {
                let first = PageOffset(run.start().0).byte().max(start);
                if a.shareability == Shareability::Private {
                    refused = Some(StoreError::PrivateAccess {
                        file: self.id,
                        offset: first,
                        pfn: None,
                    });
                    return ControlFlow::Break(());
                }
                if a.quarantined.is_some() {
                    refused = Some(StoreError::Quarantined {
                        file: self.id,
                        offset: first,
                        pfn: None,
                    });
                    return ControlFlow::Break(());
                }
                let last = PageOffset(run.end().0).byte().min(end);
                let backed = a.owner == Some(self.id);
                match pieces.last_mut() {
                    Some(p) if p.backed == backed && p.end == first => p.end = last,
                    _ => pieces.push(Piece {
                        start: first,
                        end: last,
                        backed,
                    }),
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| self.context().metadata(e))?;
        match refused {
            Some(e) => Err(self.with_pfn(e)),
            None => Ok(pieces),
        }
    }

    /// `e` with the frame behind its offset filled in.
    fn with_pfn(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::PrivateAccess { file, offset, .. } => StoreError::PrivateAccess {
                file,
                offset,
                pfn: self.backed_pfn(PageOffset::from_byte(offset)),
            },
            StoreError::Quarantined { file, offset, .. } => StoreError::Quarantined {
                file,
                offset,
                pfn: self.backed_pfn(PageOffset::from_byte(offset)),
            },
            other => other,
        }
    }

    /// Runs an access of the host mapping at byte `at`; if it finds memory revoked that the
    /// rule says is accessible (a restoration that failed earlier, when the process was out
    /// of memory regions), applies the rule again and retries once.
    fn retrying(
        &self,
        at: u64,
        mut access: impl FnMut(u64) -> Result<(), HugetlbError>,
    ) -> Result<(), StoreError> {
        match access(at) {
            Ok(()) => Ok(()),
            Err(HugetlbError::Revoked { offset }) | Err(HugetlbError::NotMapped { offset }) => {
                let page = OffsetRange::page(PageOffset::from_byte(offset))?;
                self.refresh(page, None, Direction::Both)?;
                access(at).map_err(|e| match e {
                    HugetlbError::Revoked { offset } | HugetlbError::NotMapped { offset } => {
                        crate::error::broken(format_args!(
                            "{}: offset {offset:#x} is shared and backed but not accessible in the host mapping",
                            self.id
                        ))
                    }
                    other => self.mapping_error(other, PageOffset::from_byte(at)),
                })
            }
            Err(other) => Err(self.mapping_error(other, PageOffset::from_byte(at))),
        }
    }
}
