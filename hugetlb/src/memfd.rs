//! [`Memfd`]: a source's memory as a file descriptor, with its page size and length, for the
//! mappings a VMM makes of it (a [`crate::FileMapping`] per guest file, a [`crate::HostView`],
//! a vhost-user region, `IOMMU_IOAS_MAP_FILE`).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use pfnstore_core::sync::Arc;

use crate::backing::MemfdFile;
use crate::{HugePageSize, HugetlbError};

/// `statfs.f_type` of hugetlbfs (linux/magic.h), which memfds of `MFD_HUGETLB` live on.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The memfd behind a [`crate::MemorySource`]: borrowed from the source, so it cannot be
/// closed (or the source grown) while in use.
#[derive(Clone, Copy)]
pub struct Memfd<'a> {
    file: FileRef<'a>,
    len: u64,
}

#[derive(Clone, Copy)]
enum FileRef<'a> {
    /// One of this crate's memfds: views of it share its record of punched pages.
    Owned(&'a Arc<MemfdFile>),
    /// A descriptor from elsewhere, probed with fstat and fstatfs.
    Foreign {
        fd: BorrowedFd<'a>,
        page_size: HugePageSize,
    },
}

impl<'a> Memfd<'a> {
    pub(crate) fn owned(file: &'a Arc<MemfdFile>, len: u64) -> Memfd<'a> {
        Memfd {
            file: FileRef::Owned(file),
            len,
        }
    }

    /// Describes any memfd (or other shared-memory file): its page size from `fstatfs`
    /// (hugetlbfs reports its huge page size, everything else is taken as 4 KiB pages) and
    /// its length from `fstat`.
    pub fn from_fd(fd: BorrowedFd<'a>) -> Result<Memfd<'a>, HugetlbError> {
        let info = FdInfo::probe(fd)?;
        Ok(Memfd {
            file: FileRef::Foreign {
                fd,
                page_size: info.page_size,
            },
            len: info.len,
        })
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'a> {
        match self.file {
            FileRef::Owned(file) => {
                let file: &'a MemfdFile = file;
                file.file.as_fd()
            }
            FileRef::Foreign { fd, .. } => fd,
        }
    }

    /// The size of the pages backing it: offsets and lengths of mappings of it must be
    /// multiples of this.
    pub fn page_size(&self) -> HugePageSize {
        match self.file {
            FileRef::Owned(file) => file.page_size,
            FileRef::Foreign { page_size, .. } => page_size,
        }
    }

    /// Bytes of it that hold the source's memory (its length when borrowed).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no memory.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This crate's record of the memfd, if it is one of ours.
    pub(crate) fn owned_file(&self) -> Option<&'a Arc<MemfdFile>> {
        match self.file {
            FileRef::Owned(file) => Some(file),
            FileRef::Foreign { .. } => None,
        }
    }
}

impl AsFd for Memfd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

impl fmt::Debug for Memfd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memfd")
            .field("fd", &self.fd().as_raw_fd())
            .field("page_size", &self.page_size())
            .field("len", &self.len)
            .finish()
    }
}

/// What the kernel says about a descriptor to be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdInfo {
    pub(crate) page_size: HugePageSize,
    /// Bytes in the file now.
    pub(crate) len: u64,
    /// Which file it is (device, inode): mappings of one file at consecutive offsets can be one
    /// kernel region, of two files never.
    pub(crate) id: (u64, u64),
}

impl FdInfo {
    pub(crate) fn probe(fd: BorrowedFd<'_>) -> Result<FdInfo, HugetlbError> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes one `struct stat` into `st`, which is large enough and lives
        // across the call; `fd` is a borrowed open descriptor.
        let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(HugetlbError::os(
                "fstat",
                HugePageSize::Base4K,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fstat succeeded, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: as for fstat, with one `struct statfs`.
        let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), fs.as_mut_ptr()) };
        if rc != 0 {
            return Err(HugetlbError::os(
                "fstatfs",
                HugePageSize::Base4K,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fstatfs succeeded, so it initialised `fs`.
        let fs = unsafe { fs.assume_init() };
        // `f_type` is i64 on x86-64 and arm64 but narrower on some targets.
        #[allow(clippy::unnecessary_cast)]
        let on_hugetlbfs = fs.f_type as i64 == HUGETLBFS_MAGIC;
        let page_size = if on_hugetlbfs {
            match fs.f_bsize as u64 {
                b if b == HugePageSize::Huge1G.bytes() => HugePageSize::Huge1G,
                b if b == HugePageSize::Huge2M.bytes() => HugePageSize::Huge2M,
                _ => {
                    return Err(HugetlbError::os(
                        "fstatfs",
                        HugePageSize::Base4K,
                        std::io::Error::from_raw_os_error(libc::EINVAL),
                    ));
                }
            }
        } else {
            HugePageSize::Base4K
        };
        Ok(FdInfo {
            page_size,
            len: st.st_size as u64,
            id: (st.st_dev, st.st_ino),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_memfd_is_probed_as_4k_with_its_length() {
        let memfd = MemfdFile::create(HugePageSize::Base4K, 3 << 20).unwrap();
        let described = Memfd::from_fd(memfd.file.as_fd()).unwrap();
        assert_eq!(described.page_size(), HugePageSize::Base4K);
        assert_eq!(described.len(), 3 << 20);
        let other = MemfdFile::create(HugePageSize::Base4K, 4096).unwrap();
        let a = FdInfo::probe(memfd.file.as_fd()).unwrap();
        let b = FdInfo::probe(other.file.as_fd()).unwrap();
        assert_ne!(a.id, b.id);
        assert!(format!("{described:?}").contains("Base4K"));
    }

    #[test]
    fn a_hugetlb_memfd_is_probed_with_its_huge_page_size() {
        // An empty hugetlb memfd takes no pool page.
        for size in [HugePageSize::Huge2M, HugePageSize::Huge1G] {
            match MemfdFile::create(size, 0) {
                Ok(memfd) => {
                    let info = FdInfo::probe(memfd.file.as_fd()).unwrap();
                    assert_eq!((info.page_size, info.len), (size, 0));
                }
                Err(e) => pfnstore_core::testing::skip(
                    "a_hugetlb_memfd_is_probed_with_its_huge_page_size",
                    &format!("no {size} memfds here: {e}"),
                ),
            }
        }
    }
}
