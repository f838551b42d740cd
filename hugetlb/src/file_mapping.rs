//! [`FileMapping`]: one contiguous host mapping of a guest-memory file, stable for its life.
//!
//! A KVM memory slot or a vhost-user region needs one virtual range per file; the memory
//! behind a file is a list of extents at scattered memfd offsets (hugetlb pages sit in the
//! memfd in no PFN order). A `FileMapping` reserves the range once (anonymous, `PROT_NONE`,
//! `MAP_NORESERVE`: address space only) and maps extents into it with `MAP_FIXED |
//! MAP_SHARED`; unmapping puts the inaccessible reservation back, so that no address of the
//! range ever reaches memory that left the file and no other mapping can land inside it.
//!
//! The mapping records, per range, whether it is reserved, mapped read-write or mapped
//! `PROT_NONE` (a range map under a reader-writer lock): [`FileMapping::read`],
//! [`FileMapping::write`] and [`FileMapping::zero`] check it under the shared lock and refuse
//! with [`HugetlbError::NotMapped`] or [`HugetlbError::Revoked`] instead of faulting;
//! [`FileMapping::map`], [`FileMapping::unmap`] and [`FileMapping::protect`] change it under
//! the exclusive lock, so a copy never races a protection change. Copies follow
//! [`crate::guest_copy`]'s rule (8-byte relaxed atomics only), so that a copy racing with the
//! guest or another thread is no data race.
//!
//! **Kernel regions.** Each maximal run of the range map is one kernel VMA: the kernel merges
//! neighbouring anonymous reservations, and neighbouring mappings of one ordinary memfd at
//! consecutive offsets with one protection, but never hugetlbfs mappings (`VM_DONTEXPAND`),
//! which stay one VMA per `mmap` and per `mprotect` split. The map gives every hugetlb piece
//! its own identity to count the same way. The regions are taken from a [`VmaBudget`] before
//! anything changes (see [`crate::vma`]).
//!
//! **What the caller keeps true.** The memfd ranges mapped stay backed while mapped: a range
//! is unmapped before its memory is punched out of the memfd or the memfd is truncated below
//! it (a hugetlb page punched under a mapping is faulted anew from the pool on the next touch,
//! and an empty pool makes that a `SIGBUS`). The mapping's own reservation of hugetlb pages is
//! taken at [`FileMapping::map`] (`mmap` without `MAP_NORESERVE`), which therefore fails with
//! `ENOMEM` rather than a later fault if a hole of the range has no pool page.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use pfnstore_core::PAGE_SIZE;
use pfnstore_core::sync::RwLock;
use rangemap::RangeMap;

use crate::memfd::FdInfo;
use crate::{HugePageSize, HugetlbError, Protection, VmaBudget, guest_copy, vma};

/// One virtual range of a file's size into which memfd extents are mapped. See the module
/// docs.
#[derive(Debug)]
pub struct FileMapping {
    base: usize,
    len: u64,
    align: HugePageSize,
    budget: &'static VmaBudget,
    regions: RwLock<Regions>,
}

/// What the range map holds, and the identities of hugetlb pieces.
#[derive(Debug)]
struct Regions {
    /// Covers `0..len` without gaps; one entry per kernel region.
    map: RangeMap<u64, Region>,
    next_piece: u64,
    /// Vectors reused by every change, so that converting memory back and forth allocates
    /// nothing once they have grown (conversions are the hot path of a confidential guest).
    scratch: Scratch,
}

/// See [`Regions::scratch`]; each is empty between changes.
#[derive(Debug, Default)]
struct Scratch {
    saved: Vec<(Range<u64>, Region)>,
    changes: Vec<(Range<u64>, Mapped)>,
    spans: Vec<Range<u64>>,
}

impl Regions {
    /// The identity of a new kernel region of `page_size` pages: 0 where the kernel merges
    /// compatible neighbours (so equal runs coalesce here too), unique for hugetlb.
    fn piece_id(&mut self, page_size: HugePageSize) -> u64 {
        if page_size.is_hugetlb() {
            self.next_piece += 1;
            self.next_piece
        } else {
            0
        }
    }

    /// Puts the `saved` entries back into the map, and the vector back into the scratch.
    fn restore(&mut self, mut saved: Vec<(Range<u64>, Region)>) {
        for (range, region) in saved.drain(..) {
            self.map.insert(range, region);
        }
        self.scratch.saved = saved;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Reserved,
    Mapped(Mapped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapped {
    /// (device, inode) of the memfd.
    file: (u64, u64),
    /// memfd offset minus mapping offset (wrapping): constant along a run of consecutive
    /// memfd offsets, so that such a run is one entry.
    delta: u64,
    page_size: HugePageSize,
    protection: Protection,
    /// See [`Regions::piece_id`].
    piece: u64,
}

/// The state of a byte of a [`FileMapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingState {
    /// Only the inaccessible reservation: no memory behind it.
    Reserved,
    /// A memfd page is mapped here.
    Mapped {
        /// Byte offset in the memfd of this byte.
        memfd_offset: u64,
        /// The memfd's page size.
        page_size: HugePageSize,
        /// The access allowed.
        protection: Protection,
    },
}

/// A change to the range map taken from the budget but not yet committed.
struct Staged {
    /// The entries around the change as they were.
    saved: Vec<(Range<u64>, Region)>,
    /// Regions added (negative: removed).
    delta: i64,
}

impl FileMapping {
    /// Reserves `len` bytes (rounded up to `align`) of address space at an address aligned to
    /// `align`, so that huge pages of up to that size can be mapped into it as huge pages. The
    /// reservation is one region of the process's budget ([`VmaBudget::process`]).
    pub fn reserve(len: u64, align: HugePageSize) -> Result<FileMapping, HugetlbError> {
        FileMapping::reserve_in(len, align, VmaBudget::process())
    }

    /// [`FileMapping::reserve`] taking regions from `budget`.
    pub fn reserve_in(
        len: u64,
        align: HugePageSize,
        budget: &'static VmaBudget,
    ) -> Result<FileMapping, HugetlbError> {
        if len == 0 {
            return Err(HugetlbError::ZeroSize);
        }
        let page = align.bytes();
        let too_large = || {
            HugetlbError::os(
                "mmap (reserve)",
                align,
                io::Error::from_raw_os_error(libc::ENOMEM),
            )
        };
        let len = len.checked_next_multiple_of(page).ok_or_else(too_large)?;
        // mmap returns 4 KiB-aligned addresses; this much more always holds an aligned start.
        let extra = page - PAGE_SIZE;
        let total = len
            .checked_add(extra)
            .and_then(|t| usize::try_from(t).ok())
            .ok_or_else(too_large)?;
        budget
            .take(1)
            .map_err(|regions| HugetlbError::MapCountLimit {
                offset: 0,
                regions,
                limit: budget.limit(),
            })?;
        // SAFETY: an anonymous, inaccessible mapping at an address the kernel chooses: it
        // replaces nothing and no Rust reference can point into it.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            budget.give(1);
            return Err(vma::os_error_at(
                "mmap (reserve)",
                align,
                io::Error::last_os_error(),
                0,
            ));
        }
        let raw = raw as usize;
        let base = raw.next_multiple_of(page as usize);
        let head = base - raw;
        let tail = total - head - len as usize;
        for (start, bytes) in [(raw, head), (base + len as usize, tail)] {
            if bytes > 0 {
                // SAFETY: trims the ends of the reservation just made, which nothing uses;
                // trimming the ends of one region cannot fail for want of regions.
                unsafe { libc::munmap(start as *mut libc::c_void, bytes) };
            }
        }
        let mut map = RangeMap::new();
        map.insert(0..len, Region::Reserved);
        Ok(FileMapping {
            base,
            len,
            align,
            budget,
            regions: RwLock::new(Regions {
                map,
                next_piece: 0,
                scratch: Scratch::default(),
            }),
        })
    }

    /// Bytes reserved (the length asked for, rounded up to the alignment).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never: a reservation has at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, for handing to the kernel (a KVM memory slot, a vhost-user region).
    /// Dereferencing it bypasses the checks of this type; [`FileMapping::read`] and
    /// [`FileMapping::write`] are the safe way in.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The alignment of the start (the largest page size that can be mapped into it).
    pub fn align(&self) -> HugePageSize {
        self.align
    }

    /// Kernel regions this mapping holds (counted in its budget).
    pub fn regions(&self) -> u64 {
        self.regions.read().map.len() as u64
    }

    /// The budget its regions are taken from.
    pub fn budget(&self) -> &'static VmaBudget {
        self.budget
    }

    /// The state of byte `offset`.
    pub fn state_at(&self, offset: u64) -> Result<MappingState, HugetlbError> {
        self.check_range(offset, 1)?;
        let regions = self.regions.read();
        let region = regions
            .map
            .get(&offset)
            .expect("the range map covers the whole mapping");
        Ok(state_of(region, offset))
    }

    /// The runs of one state in `offset..offset + len`, in order (each run's memfd offset is
    /// that of its first byte).
    pub fn states(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(Range<u64>, MappingState)>, HugetlbError> {
        let end = self.check_range(offset, len)?;
        let regions = self.regions.read();
        Ok(regions
            .map
            .overlapping(offset..end)
            .map(|(r, region)| {
                let start = r.start.max(offset);
                (start..r.end.min(end), state_of(region, start))
            })
            .collect())
    }

    /// Whether all of `offset..offset + len` is mapped read-write (and inside the mapping).
    pub fn is_accessible(&self, offset: u64, len: u64) -> bool {
        self.check_access(&self.regions.read(), offset, len).is_ok()
    }

    /// Maps `len` bytes of `memfd` at `memfd_offset` to `offset`, with `protection`,
    /// replacing whatever was mapped there (`mmap(MAP_FIXED | MAP_SHARED)`).
    ///
    /// `offset`, `memfd_offset` and `len` must be multiples of the memfd's page size (4 KiB for
    /// an ordinary memfd, 2 MiB or 1 GiB for hugetlb), that page size at most the mapping's
    /// alignment, the memfd range inside the memfd, and the range inside the mapping. If the
    /// range cuts a hugetlb run already mapped, the cut must be aligned to that run's page
    /// size. Refused with a typed error, with nothing changed, if not, or if it would exceed
    /// the region budget. If the kernel refuses the `mmap`, the range is left reserved.
    pub fn map(
        &self,
        offset: u64,
        memfd: BorrowedFd<'_>,
        memfd_offset: u64,
        len: u64,
        protection: Protection,
    ) -> Result<(), HugetlbError> {
        let info = FdInfo::probe(memfd)?;
        let page_size = info.page_size;
        if page_size > self.align {
            return Err(HugetlbError::MappingAlignment {
                page_size,
                align: self.align,
            });
        }
        let end = self.check_whole(offset, len, page_size)?;
        if !memfd_offset.is_multiple_of(page_size.bytes()) {
            return Err(HugetlbError::NotPageAligned {
                offset: memfd_offset,
                len,
                page_size,
            });
        }
        let in_file = memfd_offset
            .checked_add(len)
            .filter(|e| *e <= info.len)
            .and_then(|_| libc::off_t::try_from(memfd_offset).ok());
        let Some(file_offset) = in_file else {
            return Err(HugetlbError::OutOfBounds {
                offset: memfd_offset,
                len,
                size: info.len,
            });
        };
        let mut regions = self.regions.write();
        check_cuts(&regions, offset, end)?;
        let staged = self.stage(&mut regions, offset, end, |regions| {
            let piece = regions.piece_id(page_size);
            let region = Region::Mapped(Mapped {
                file: info.id,
                delta: memfd_offset.wrapping_sub(offset),
                page_size,
                protection,
                piece,
            });
            regions.map.insert(offset..end, region);
        })?;
        // SAFETY: `offset..end` lies inside our reservation (checked), so MAP_FIXED replaces
        // only our own mapping; the exclusive lock keeps every copy out of it meanwhile, and no
        // Rust reference into it exists. The memfd range lies inside the file (checked).
        let got = unsafe {
            libc::mmap(
                self.addr(offset).cast(),
                len as usize,
                prot_bits(protection),
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd.as_raw_fd(),
                file_offset,
            )
        };
        if got == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            self.undo(&mut regions, staged);
            // A failed MAP_FIXED may have removed what was there: put the reservation back so
            // that no hole opens in the range, and say so in the map.
            let _ = self.reserve_range(offset, len);
            self.record(&mut regions, |regions| {
                regions.map.insert(offset..end, Region::Reserved)
            });
            return Err(vma::os_error_at("mmap", page_size, err, offset));
        }
        self.commit(&mut regions, staged);
        Ok(())
    }

    /// Puts the inaccessible reservation back over `offset..offset + len` (whole 4 KiB pages,
    /// cutting hugetlb runs only at their page boundaries), so that the range no longer
    /// reaches any memfd. Reserved parts stay as they are.
    pub fn unmap(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let end = self.check_whole(offset, len, HugePageSize::Base4K)?;
        let mut regions = self.regions.write();
        check_cuts(&regions, offset, end)?;
        if regions
            .map
            .overlapping(offset..end)
            .all(|(_, r)| *r == Region::Reserved)
        {
            return Ok(());
        }
        let staged = self.stage(&mut regions, offset, end, |regions| {
            regions.map.insert(offset..end, Region::Reserved)
        })?;
        if let Err(err) = self.reserve_range(offset, len) {
            // Whether the old pages are still mapped is unknown: refuse access to them either
            // way (the map already says reserved).
            self.commit(&mut regions, staged);
            return Err(vma::os_error_at("mmap", HugePageSize::Base4K, err, offset));
        }
        self.commit(&mut regions, staged);
        Ok(())
    }

    /// Sets the access to the mapped parts of `offset..offset + len` (whole 4 KiB pages,
    /// cutting hugetlb runs only at their page boundaries); reserved parts stay inaccessible.
    /// Refused with nothing changed if it would exceed the region budget; if the kernel
    /// refuses half-way, what was changed is changed back.
    pub fn protect(
        &self,
        offset: u64,
        len: u64,
        protection: Protection,
    ) -> Result<(), HugetlbError> {
        let end = self.check_whole(offset, len, HugePageSize::Base4K)?;
        let mut regions = self.regions.write();
        check_cuts(&regions, offset, end)?;
        let mut changes = std::mem::take(&mut regions.scratch.changes);
        changes.clear();
        changes.extend(regions.map.overlapping(offset..end).filter_map(
            |(r, region)| match region {
                Region::Mapped(m) if m.protection != protection => {
                    Some((r.start.max(offset)..r.end.min(end), *m))
                }
                _ => None,
            },
        ));
        let mut spans = std::mem::take(&mut regions.scratch.spans);
        spans.clear();
        let result =
            self.protect_changes(&mut regions, offset, end, protection, &changes, &mut spans);
        regions.scratch.changes = changes;
        regions.scratch.spans = spans;
        result
    }

    /// [`FileMapping::protect`] of `changes` (the mapped runs of `offset..end` whose protection
    /// differs), with `spans` as scratch.
    fn protect_changes(
        &self,
        regions: &mut Regions,
        offset: u64,
        end: u64,
        protection: Protection,
        changes: &[(Range<u64>, Mapped)],
        spans: &mut Vec<Range<u64>>,
    ) -> Result<(), HugetlbError> {
        if changes.is_empty() {
            return Ok(());
        }
        let staged = self.stage(regions, offset, end, |regions| {
            for (range, m) in changes {
                let piece = regions.piece_id(m.page_size);
                let changed = Mapped {
                    protection,
                    piece,
                    ..*m
                };
                regions.map.insert(range.clone(), Region::Mapped(changed));
            }
        })?;
        // One mprotect per span of adjacent changes.
        for (range, _) in changes {
            match spans.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => spans.push(range.clone()),
            }
        }
        let old = match protection {
            Protection::None => Protection::ReadWrite,
            Protection::ReadWrite => Protection::None,
        };
        for (i, span) in spans.iter().enumerate() {
            if let Err(err) = self.mprotect(span, protection) {
                let stuck: Vec<Range<u64>> = spans[..i]
                    .iter()
                    .filter(|done| self.mprotect(done, old).is_err())
                    .cloned()
                    .collect();
                self.undo(regions, staged);
                // Spans that could not be changed back keep the new protection; the map says
                // what the kernel has.
                self.record(regions, |regions| {
                    for (range, m) in changes {
                        if stuck
                            .iter()
                            .any(|s| s.start <= range.start && range.end <= s.end)
                        {
                            let piece = regions.piece_id(m.page_size);
                            let changed = Mapped {
                                protection,
                                piece,
                                ..*m
                            };
                            regions.map.insert(range.clone(), Region::Mapped(changed));
                        }
                    }
                });
                let page_size = changes
                    .iter()
                    .find(|(r, _)| r.start >= span.start)
                    .map_or(HugePageSize::Base4K, |(_, m)| m.page_size);
                return Err(vma::os_error_at("mprotect", page_size, err, span.start));
            }
        }
        self.commit(regions, staged);
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`; all of them must be mapped read-write.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HugetlbError> {
        let regions = self.regions.read();
        self.check_access(&regions, offset, buf.len() as u64)?;
        // SAFETY: `offset..offset + buf.len()` is inside the mapping and mapped read-write to
        // backed memfd pages (checked under the shared lock, which every change of mapping or
        // protection excludes until we are done); so are the aligned words around it, which
        // never cross a page. This process touches guest memory only through `guest_copy`.
        unsafe { guest_copy::read(self.addr(offset), buf) };
        Ok(())
    }

    /// Copies `data` to `offset`; all of it must be mapped read-write.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), HugetlbError> {
        let regions = self.regions.read();
        self.check_access(&regions, offset, data.len() as u64)?;
        // SAFETY: as in `read`; `data` is a Rust slice distinct from the guest pages.
        unsafe { guest_copy::write(self.addr(offset), data) };
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`; all of them must be mapped read-write.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let regions = self.regions.read();
        self.check_access(&regions, offset, len)?;
        // SAFETY: as in `read`.
        unsafe { guest_copy::zero(self.addr(offset), len as usize) };
        Ok(())
    }

    fn addr(&self, offset: u64) -> *mut u8 {
        (self.base + offset as usize) as *mut u8
    }

    /// `offset..offset + len` inside the mapping; returns its end.
    fn check_range(&self, offset: u64, len: u64) -> Result<u64, HugetlbError> {
        offset
            .checked_add(len)
            .filter(|end| *end <= self.len)
            .ok_or(HugetlbError::OutOfBounds {
                offset,
                len,
                size: self.len,
            })
    }

    /// Like `check_range`, and the range is non-empty whole pages of `page_size`.
    fn check_whole(
        &self,
        offset: u64,
        len: u64,
        page_size: HugePageSize,
    ) -> Result<u64, HugetlbError> {
        let page = page_size.bytes();
        if len == 0 || !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(HugetlbError::NotPageAligned {
                offset,
                len,
                page_size,
            });
        }
        self.check_range(offset, len)
    }

    /// Whether the range is inside and mapped read-write, under `regions`.
    fn check_access(&self, regions: &Regions, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        for (range, region) in regions.map.overlapping(offset..end) {
            let at = range.start.max(offset);
            match region {
                Region::Reserved => return Err(HugetlbError::NotMapped { offset: at }),
                Region::Mapped(m) if m.protection == Protection::None => {
                    return Err(HugetlbError::Revoked { offset: at });
                }
                Region::Mapped(_) => {}
            }
        }
        Ok(())
    }

    /// Applies `change` (inside `offset..end`) to the map and takes the regions it adds from
    /// the budget; if they do not fit, undoes it and refuses.
    fn stage(
        &self,
        regions: &mut Regions,
        offset: u64,
        end: u64,
        change: impl FnOnce(&mut Regions),
    ) -> Result<Staged, HugetlbError> {
        let before = regions.map.len() as i64;
        // The change plus its neighbours on either side, with which it may merge or split.
        let window = offset.saturating_sub(1)..(end + 1).min(self.len);
        let mut saved = std::mem::take(&mut regions.scratch.saved);
        saved.clear();
        saved.extend(
            regions
                .map
                .overlapping(window)
                .map(|(r, v)| (r.clone(), *v)),
        );
        change(regions);
        let delta = regions.map.len() as i64 - before;
        let staged = Staged { saved, delta };
        if delta > 0
            && let Err(would_be) = self.budget.take(delta.unsigned_abs())
        {
            regions.restore(staged.saved);
            return Err(HugetlbError::MapCountLimit {
                offset,
                regions: would_be,
                limit: self.budget.limit(),
            });
        }
        Ok(staged)
    }

    /// Takes back a staged change that the kernel refused.
    fn undo(&self, regions: &mut Regions, staged: Staged) {
        regions.restore(staged.saved);
        if staged.delta > 0 {
            self.budget.give(staged.delta.unsigned_abs());
        }
    }

    /// Keeps a staged change the kernel made.
    fn commit(&self, regions: &mut Regions, mut staged: Staged) {
        if staged.delta < 0 {
            self.budget.give(staged.delta.unsigned_abs());
        }
        staged.saved.clear();
        regions.scratch.saved = staged.saved;
    }

    /// Applies a change the kernel already made, whether or not it fits the budget.
    fn record(&self, regions: &mut Regions, change: impl FnOnce(&mut Regions)) {
        let before = regions.map.len() as i64;
        change(regions);
        self.budget.record(regions.map.len() as i64 - before);
    }

    /// The reservation (anonymous, inaccessible, no swap) over `offset..offset + len`.
    fn reserve_range(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range lies inside our reservation (callers checked), so MAP_FIXED
        // replaces only our own mapping, under the exclusive lock; no reference points into it.
        let got = unsafe {
            libc::mmap(
                self.addr(offset).cast(),
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn mprotect(&self, range: &Range<u64>, protection: Protection) -> io::Result<()> {
        // SAFETY: the range lies inside our mapping and is mapped from a memfd (callers pass
        // mapped runs, cut at their page boundaries); the exclusive lock keeps copies out.
        let rc = unsafe {
            libc::mprotect(
                self.addr(range.start).cast(),
                (range.end - range.start) as usize,
                prot_bits(protection),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        let regions = self.regions.get_mut().map.len() as u64;
        // SAFETY: the whole reservation is ours; `&mut self` proves no copy is running and no
        // reference into it can outlive `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
        self.budget.give(regions);
    }
}

/// A cut at `offset` or `end` inside a hugetlb run must fall on one of its pages' boundaries
/// (the kernel cannot split a huge page's mapping).
fn check_cuts(regions: &Regions, offset: u64, end: u64) -> Result<(), HugetlbError> {
    for at in [offset, end] {
        if let Some((range, Region::Mapped(m))) = regions.map.get_key_value(&at)
            && range.start < at
            && !at.is_multiple_of(m.page_size.bytes())
        {
            return Err(HugetlbError::NotPageAligned {
                offset,
                len: end - offset,
                page_size: m.page_size,
            });
        }
    }
    Ok(())
}

fn state_of(region: &Region, at: u64) -> MappingState {
    match region {
        Region::Reserved => MappingState::Reserved,
        Region::Mapped(m) => MappingState::Mapped {
            memfd_offset: at.wrapping_add(m.delta),
            page_size: m.page_size,
            protection: m.protection,
        },
    }
}

fn prot_bits(protection: Protection) -> libc::c_int {
    match protection {
        Protection::None => libc::PROT_NONE,
        Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
    }
}

#[cfg(test)]
mod tests;
