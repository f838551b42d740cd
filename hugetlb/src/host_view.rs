//! [`HostView`]: the VMM's own mapping of a source's memory, with checked access.
//!
//! A view is a second `MAP_SHARED` mapping of the source's memfd: it sees the same bytes as
//! the source's mapping and as the guest, and it can be restricted without touching them.
//! Everything that could fault is checked first, so that safe code never takes a SIGSEGV or
//! SIGBUS through a view:
//!
//! * **revoked pages** (`protect(.., Protection::None)`, mprotect `PROT_NONE`) refuse reads
//!   and writes with [`HugetlbError::Revoked`]; a hugetlb mapping can only be protected a
//!   whole huge page at a time, so the facade revokes the pages that are entirely private and
//!   guards the partly shared ones with its own checks;
//! * **punched pages** (`punch_hole`, fallocate `PUNCH_HOLE`) went back to the kernel; reading
//!   them yields zeros without faulting, and writing first populates a fresh (zeroed) page with
//!   `MADV_POPULATE_WRITE`, which reports an empty pool as an error instead of a SIGBUS.
//!
//! A page populated again after a punch is a new page: its PFN is not the one the source's
//! chunk names. Punching is meant for memory the store gives up (truncate).
//!
//! Bytes are copied by [`crate::guest_copy`]'s rule: relaxed atomic accesses of aligned 8-byte
//! words only, so that a copy racing with the guest, a device or another thread is not a data
//! race. As with any shared memory, such a copy can see a mix of old and new.

use std::ops::Range;

use memmap2::{Advice, MmapRaw};
use pfnstore_core::sync::{Arc, RwLock};
use rangemap::RangeSet;

use crate::backing::MemfdFile;
use crate::{HugePageSize, HugetlbError, Memfd, guest_copy, vma};

/// Access allowed through a view to a range of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// No access (mprotect `PROT_NONE`): the pages are revoked from the view.
    None,
    /// Read and write.
    ReadWrite,
}

/// A second shared mapping of a source's memfd. See the module docs.
#[derive(Debug)]
pub struct HostView {
    map: MmapRaw,
    memfd: Arc<MemfdFile>,
    /// Page indices revoked in this view. Lock order: this, then `memfd.holes`.
    revoked: RwLock<RangeSet<u64>>,
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    Zero,
}

impl HostView {
    /// A view of the whole of `memfd` (as long as it is now), for the VMM's own accesses or a
    /// scrub mapping: any source's [`crate::MemorySource::memfd`] can be viewed.
    ///
    /// The view maps `MAP_SHARED | MAP_NORESERVE`: the source holds (or deliberately punched)
    /// the pages, the view promises nothing more. Views of one of this crate's memfds share
    /// its record of punched pages, so that every view reads a hole as zeros without
    /// faulting; a foreign descriptor ([`Memfd::from_fd`]) gets a record of its own, which
    /// knows only the holes punched through its views.
    pub fn from_memfd(memfd: Memfd<'_>) -> Result<HostView, HugetlbError> {
        if memfd.is_empty() {
            return Err(HugetlbError::ZeroSize);
        }
        let file = match memfd.owned_file() {
            Some(file) => Arc::clone(file),
            None => {
                let fd = memfd.fd().try_clone_to_owned().map_err(|e| {
                    HugetlbError::os("fcntl(F_DUPFD_CLOEXEC)", memfd.page_size(), e)
                })?;
                Arc::new(MemfdFile::from_file(fd.into(), memfd.page_size()))
            }
        };
        let map = file.map(0, memfd.len(), false, true)?;
        Ok(HostView {
            map,
            memfd: file,
            revoked: RwLock::new(RangeSet::new()),
        })
    }

    /// Bytes mapped (the source's size when the view was made).
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The view's first byte, for handing to the kernel (a KVM memory slot, a VFIO DMA map).
    /// Dereferencing it bypasses the checks of this type; [`HostView::read`] and
    /// [`HostView::write`] are the safe way in.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether the view maps nothing (never: sources are not empty).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The page size: the granularity of [`HostView::protect`] and [`HostView::punch_hole`].
    pub fn page_size(&self) -> HugePageSize {
        self.memfd.page_size
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`. Punched pages read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HugetlbError> {
        self.access(offset, buf.len() as u64, Access::Read(buf))
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), HugetlbError> {
        self.access(offset, data.len() as u64, Access::Write(data))
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        self.access(offset, len, Access::Zero)
    }

    /// Whether the page containing byte `offset` is revoked from this view.
    pub fn is_revoked(&self, offset: u64) -> bool {
        self.revoked
            .read()
            .contains(&(offset / self.page_size().bytes()))
    }

    /// Whether the page containing byte `offset` is punched out (and not written since).
    pub fn is_hole(&self, offset: u64) -> bool {
        self.memfd
            .holes
            .read()
            .contains(&(offset / self.page_size().bytes()))
    }

    /// Sets the access to the whole pages `offset..offset + len` of this view (other views and
    /// the guest are not affected).
    pub fn protect(
        &self,
        offset: u64,
        len: u64,
        protection: Protection,
    ) -> Result<(), HugetlbError> {
        let pages = self.whole_pages(offset, len)?;
        let mut revoked = self.revoked.write();
        let prot = match protection {
            Protection::None => libc::PROT_NONE,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: the range lies inside our mapping (checked by `whole_pages`) and is aligned
        // to the page size, as hugetlb requires. No Rust reference into the mapping exists:
        // reads and writes copy through raw pointers while holding `revoked`'s read lock,
        // which this write lock excludes.
        let rc = unsafe {
            libc::mprotect(
                self.map.as_mut_ptr().add(offset as usize).cast(),
                len as usize,
                prot,
            )
        };
        if rc != 0 {
            return Err(vma::os_error_at(
                "mprotect",
                self.page_size(),
                std::io::Error::last_os_error(),
                offset,
            ));
        }
        match protection {
            Protection::None => revoked.insert(pages),
            Protection::ReadWrite => revoked.remove(pages),
        }
        Ok(())
    }

    /// Gives the whole pages `offset..offset + len` back to the kernel (for hugetlb: to the
    /// pool's free pages), in every mapping of the memfd. They read as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let pages = self.whole_pages(offset, len)?;
        let mut holes = self.memfd.holes.write();
        self.memfd.punch_hole(offset, len)?;
        holes.insert(pages);
        Ok(())
    }

    /// Checks that `offset..offset + len` is inside the view; returns the pages it touches.
    fn pages_touched(&self, offset: u64, len: u64) -> Result<Range<u64>, HugetlbError> {
        let end = offset.checked_add(len).filter(|end| *end <= self.len());
        let Some(end) = end else {
            return Err(HugetlbError::OutOfBounds {
                offset,
                len,
                size: self.len(),
            });
        };
        let page = self.page_size().bytes();
        Ok(offset / page..end.div_ceil(page))
    }

    /// Like `pages_touched`, and the range must be non-empty whole pages.
    fn whole_pages(&self, offset: u64, len: u64) -> Result<Range<u64>, HugetlbError> {
        let page = self.page_size().bytes();
        if len == 0 || !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(HugetlbError::NotPageAligned {
                offset,
                len,
                page_size: self.page_size(),
            });
        }
        self.pages_touched(offset, len)
    }

    fn access(&self, offset: u64, len: u64, access: Access<'_>) -> Result<(), HugetlbError> {
        let pages = self.pages_touched(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let page = self.page_size().bytes();
        let revoked = self.revoked.read();
        if let Some(r) = revoked.overlapping(&pages).next() {
            return Err(HugetlbError::Revoked {
                offset: (r.start * page).max(offset),
            });
        }
        let writes = !matches!(access, Access::Read(_));
        let holes_read = self.memfd.holes.read();
        if !(writes && holes_read.overlaps(&pages)) {
            self.copy(offset, len, access, &holes_read);
            return Ok(());
        }
        drop(holes_read);
        let mut holes = self.memfd.holes.write();
        let to_fill: Vec<Range<u64>> = holes
            .overlapping(&pages)
            .map(|r| r.start.max(pages.start)..r.end.min(pages.end))
            .collect();
        for (i, fill) in to_fill.iter().enumerate() {
            let populated = self.map.advise_range(
                Advice::PopulateWrite,
                (fill.start * page) as usize,
                ((fill.end - fill.start) * page) as usize,
            );
            if let Err(e) = populated {
                // Put back the pages populated so far: the write failed, the file is as it was.
                for done in &to_fill[..=i] {
                    let _ = self
                        .memfd
                        .punch_hole(done.start * page, (done.end - done.start) * page);
                }
                return Err(HugetlbError::os("MADV_POPULATE_WRITE", self.page_size(), e));
            }
        }
        for fill in to_fill {
            holes.remove(fill);
        }
        self.copy(offset, len, access, &holes);
        Ok(())
    }

    /// Copies with the checks done: `offset..offset + len` is inside the view, none of it is
    /// revoked, and for writes none of it is a hole. Reads of holes yield zeros.
    fn copy(&self, offset: u64, len: u64, access: Access<'_>, holes: &RangeSet<u64>) {
        let page = self.page_size().bytes();
        let base = self.map.as_mut_ptr();
        match access {
            Access::Read(buf) => {
                let mut at = offset;
                while at < offset + len {
                    let page_index = at / page;
                    let run_end = (page_index + 1) * page;
                    let end = run_end.min(offset + len);
                    let dst = &mut buf[(at - offset) as usize..(end - offset) as usize];
                    if holes.contains(&page_index) {
                        dst.fill(0);
                    } else {
                        // SAFETY: `at..end` lies in the mapping (bounds checked by the caller),
                        // in a page that is neither revoked (PROT_NONE) nor punched, so it is
                        // mapped readable and backed, and so are the aligned words around it
                        // (a word never crosses a page); the revoked/holes locks held by the
                        // caller keep it so during the copy. This process touches guest memory
                        // only through `guest_copy`, whose 8-byte atomics cannot race
                        // non-atomically with each other; `dst` is a distinct Rust buffer.
                        unsafe { guest_copy::read(base.add(at as usize), dst) };
                    }
                    at = end;
                }
            }
            Access::Write(data) => {
                // SAFETY: the range lies in the mapping, is writable (not revoked) and backed
                // (no holes, checked or filled by the caller, locks held), as are the aligned
                // words around it; guest memory is only touched through `guest_copy`; `data`
                // is a Rust slice that cannot alias our mapping's pages through a reference.
                unsafe { guest_copy::write(base.add(offset as usize), data) };
            }
            Access::Zero => {
                // SAFETY: as for `Access::Write`.
                unsafe { guest_copy::zero(base.add(offset as usize), len as usize) }
            }
        }
    }
}
