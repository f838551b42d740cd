//! The OS side of a source: the memfd, its mappings, NUMA binding, prefaulting and mlock.
//!
//! Everything here is a thin, checked wrapper around one system call; the ladder and the
//! bookkeeping live in [`crate::hugetlb_source`].

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use memmap2::{Advice, MmapOptions, MmapRaw};
use pfnstore_core::sync::RwLock;
use pfnstore_core::sync::atomic::{AtomicU64, Ordering};
use rangemap::RangeSet;

use crate::{HugePageSize, HugetlbError, Prefault};

/// A memfd and the state of its pages that every mapping of it shares.
#[derive(Debug)]
pub(crate) struct MemfdFile {
    pub(crate) file: File,
    pub(crate) page_size: HugePageSize,
    /// Pages (indices in units of `page_size`) punched out and not written since: they read as
    /// zeros, and touching them would fault in a new page from the pool.
    pub(crate) holes: RwLock<RangeSet<u64>>,
}

/// The name memfds get (visible in /proc/PID/maps and fd links): a prefix tests can look for.
pub const MEMFD_NAME_PREFIX: &str = "pfnstore";

impl MemfdFile {
    /// A new memfd of `bytes` backed by pages of `page_size`.
    pub(crate) fn create(page_size: HugePageSize, bytes: u64) -> Result<MemfdFile, HugetlbError> {
        let name = CString::new(format!("{MEMFD_NAME_PREFIX}-{}", page_size.bytes() >> 10))
            .expect("the name is made of digits and letters, no NUL");
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
        // plain bits. memfd_create touches no other memory.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | page_size.memfd_flags())
        };
        if fd < 0 {
            return Err(HugetlbError::os(
                "memfd_create",
                page_size,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let memfd = MemfdFile::from_file(file, page_size);
        memfd.set_len(bytes)?;
        Ok(memfd)
    }

    /// Wraps an open memfd of pages of `page_size`, with no holes known.
    pub(crate) fn from_file(file: File, page_size: HugePageSize) -> MemfdFile {
        MemfdFile {
            file,
            page_size,
            holes: RwLock::new(RangeSet::new()),
        }
    }

    /// Sets the memfd's size (ftruncate). Hugetlbfs needs whole huge pages.
    pub(crate) fn set_len(&self, bytes: u64) -> Result<(), HugetlbError> {
        self.file
            .set_len(bytes)
            .map_err(|e| HugetlbError::os("ftruncate", self.page_size, e))
    }

    /// A shared mapping of `len` bytes at `offset`, populated by the kernel if `populate`.
    /// `no_reserve` (MAP_NORESERVE) maps without promising pool pages for holes: views use it,
    /// as their pages are already reserved (or deliberately punched out) by the source.
    pub(crate) fn map(
        &self,
        offset: u64,
        len: u64,
        populate: bool,
        no_reserve: bool,
    ) -> Result<MmapRaw, HugetlbError> {
        let len = usize::try_from(len).map_err(|_| {
            HugetlbError::os(
                "mmap",
                self.page_size,
                std::io::Error::from_raw_os_error(libc::ENOMEM),
            )
        })?;
        let mut options = MmapOptions::new();
        options.offset(offset).len(len);
        if populate {
            options.populate();
        }
        if no_reserve {
            options.no_reserve_swap();
        }
        options
            .map_raw(&self.file)
            .map_err(|e| HugetlbError::os("mmap", self.page_size, e))
    }

    /// Allocates the pages of `len` bytes at `offset` (fallocate, mode 0): taken from the pool
    /// now for hugetlb, so that no later touch of them can find the pool empty.
    #[cfg_attr(pfnstore_loom, allow(dead_code))] // used by `testing`, which loom builds leave out
    pub(crate) fn allocate(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(HugetlbError::os(
                "fallocate",
                self.page_size,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        // SAFETY: fallocate acts on the file behind a descriptor we own and touches no memory
        // of this process.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, l) };
        if rc != 0 {
            return Err(HugetlbError::os(
                "fallocate",
                self.page_size,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Gives `len` bytes at `offset` back to the kernel (the hugetlb pool for huge pages):
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which also unmaps them from every mapping.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> Result<(), HugetlbError> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(HugetlbError::os(
                "fallocate(PUNCH_HOLE)",
                self.page_size,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        // SAFETY: fallocate acts on the file behind a descriptor we own; it changes no memory
        // of this process except through the page tables of mappings of this file, whose
        // users (HostView) consult `holes` before touching the punched pages.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc != 0 {
            return Err(HugetlbError::os(
                "fallocate(PUNCH_HOLE)",
                self.page_size,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Binds the pages of `map` to NUMA node `node` (mbind MPOL_BIND); must happen before they
/// are faulted in.
pub(crate) fn bind_to_node(
    map: &MmapRaw,
    page_size: HugePageSize,
    node: u32,
) -> Result<(), HugetlbError> {
    let words = node as usize / 64 + 1;
    let mut mask = vec![0 as libc::c_ulong; words];
    mask[node as usize / 64] |= 1 << (node % 64);
    // The kernel drops the last bit of `maxnode` (a historic off-by-one); +1 keeps all of ours.
    let maxnode = (words * 64 + 1) as libc::c_ulong;
    // SAFETY: mbind reads `mask` (`words` longs, alive for the call) and changes the memory
    // policy of our own mapping [ptr, ptr + len), which no Rust reference covers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            map.as_mut_ptr(),
            map.len(),
            libc::MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(HugetlbError::os(
            "mbind",
            page_size,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Bytes one prefault work item covers: a whole huge page, and for small pages a batch large
/// enough that handing out work costs nothing next to zeroing it.
const PREFAULT_BATCH: u64 = 64 << 20;

/// Faults in every page of `map` with MADV_POPULATE_WRITE from `threads` threads that take
/// work items (whole pages, or 64 MiB batches of small pages) from a shared counter.
///
/// Why threads: the kernel zeroes a page when it is first faulted, on the faulting thread.
/// MAP_POPULATE does this for the whole mapping on one thread; a 1 GiB page is zeroed at
/// memory-copy speed of one core, so N threads on N cores zero N pages at once.
pub(crate) fn populate_threads(
    map: &MmapRaw,
    page_size: HugePageSize,
    threads: usize,
) -> Result<(), HugetlbError> {
    let len = map.len() as u64;
    let item = page_size.bytes().max(PREFAULT_BATCH);
    let items = len.div_ceil(item);
    let threads = threads.clamp(1, items.max(1) as usize);
    let next = AtomicU64::new(0);
    let work = || -> Result<(), HugetlbError> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= items {
                return Ok(());
            }
            let start = i * item;
            let end = (start + item).min(len);
            map.advise_range(
                Advice::PopulateWrite,
                start as usize,
                (end - start) as usize,
            )
            .map_err(|e| HugetlbError::os("MADV_POPULATE_WRITE", page_size, e))?;
        }
    };
    if threads == 1 {
        return work();
    }
    // Scoped OS threads rather than the sync facade's: this is kernel work on disjoint ranges
    // with no shared state beyond the work counter, nothing for loom to model.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Prefaults `map` as `how` says. `mapped_with_populate` tells whether the mapping was made
/// with MAP_POPULATE already.
pub(crate) fn prefault(
    map: &MmapRaw,
    page_size: HugePageSize,
    how: Prefault,
    mapped_with_populate: bool,
) -> Result<(), HugetlbError> {
    match how {
        Prefault::None => Ok(()),
        Prefault::MapPopulate if mapped_with_populate => Ok(()),
        // MAP_POPULATE could not be used (the pages had to be bound to a node first): the
        // same single-threaded population, through madvise.
        Prefault::MapPopulate => populate_threads(map, page_size, 1),
        Prefault::Threads(n) => populate_threads(map, page_size, n),
    }
}

/// Locks the pages of `map` in memory.
pub(crate) fn lock(map: &MmapRaw, page_size: HugePageSize) -> Result<(), HugetlbError> {
    map.lock()
        .map_err(|e| HugetlbError::os("mlock", page_size, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hugetlb_memfd_of_a_partial_page_is_einval_with_a_hint() {
        // No page is mapped, so no pool page is used: no hugetlb lock needed.
        match MemfdFile::create(HugePageSize::Huge2M, 4096) {
            Err(
                e @ HugetlbError::Os {
                    op: "ftruncate", ..
                },
            ) => {
                assert_eq!(e.errno(), Some(libc::EINVAL));
                assert!(e.to_string().contains("lacks this huge page size"), "{e}");
            }
            Err(
                e @ HugetlbError::Os {
                    op: "memfd_create", ..
                },
            ) => {
                pfnstore_core::testing::skip(
                    "a_hugetlb_memfd_of_a_partial_page_is_einval_with_a_hint",
                    &format!("no 2M hugetlb memfds here: {e}"),
                );
            }
            other => panic!("expected EINVAL from ftruncate, got {other:?}"),
        }
    }

    #[test]
    fn an_ordinary_memfd_maps_and_punches() {
        let memfd = MemfdFile::create(HugePageSize::Base4K, 1 << 20).unwrap();
        let map = memfd.map(0, 1 << 20, true, false).unwrap();
        populate_threads(&map, HugePageSize::Base4K, 2).unwrap();
        memfd.punch_hole(0, 4096).unwrap();
        assert!(matches!(
            memfd.punch_hole(u64::MAX, 4096),
            Err(HugetlbError::Os { .. })
        ));
    }
}
