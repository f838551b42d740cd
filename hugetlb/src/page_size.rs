//! The page sizes memory can be backed with, and what each means for the kernel and for PFNs.

use std::fmt;

use pfnstore_core::{Geometry, PAGE_SIZE};

/// The size of the pages that back a source's memory: a rung of the fallback ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HugePageSize {
    /// Ordinary 4 KiB pages (a plain memfd). Their frames are scattered, so a source of them
    /// hands out synthetic PFNs.
    Base4K,
    /// 2 MiB hugetlb pages.
    Huge2M,
    /// 1 GiB hugetlb pages.
    Huge1G,
}

impl HugePageSize {
    /// The ladder from the largest size down: the order in which a source tries them.
    pub const LADDER: [HugePageSize; 3] = [
        HugePageSize::Huge1G,
        HugePageSize::Huge2M,
        HugePageSize::Base4K,
    ];

    /// Bytes in one page.
    pub const fn bytes(self) -> u64 {
        match self {
            HugePageSize::Base4K => PAGE_SIZE,
            HugePageSize::Huge2M => 2 << 20,
            HugePageSize::Huge1G => 1 << 30,
        }
    }

    /// 4 KiB PFNs in one page.
    pub const fn base_pages(self) -> u64 {
        self.bytes() / PAGE_SIZE
    }

    /// Whether this size comes from a hugetlb pool (and so has a sysfs pool and real,
    /// contiguous PFNs per page).
    pub const fn is_hugetlb(self) -> bool {
        !matches!(self, HugePageSize::Base4K)
    }

    /// The sysfs directory name of the pool (`hugepages-1048576kB`), for hugetlb sizes.
    pub fn sysfs_dir(self) -> Option<String> {
        self.is_hugetlb()
            .then(|| format!("hugepages-{}kB", self.bytes() >> 10))
    }

    /// The size whose sysfs directory is `name`, if it is one pfnstore uses.
    pub fn from_sysfs_dir(name: &str) -> Option<HugePageSize> {
        [HugePageSize::Huge1G, HugePageSize::Huge2M]
            .into_iter()
            .find(|s| s.sysfs_dir().as_deref() == Some(name))
    }

    /// The `memfd_create` flags that select this size.
    pub(crate) const fn memfd_flags(self) -> libc::c_uint {
        match self {
            HugePageSize::Base4K => 0,
            HugePageSize::Huge2M => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            HugePageSize::Huge1G => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
        }
    }

    /// The next rung down the ladder.
    pub const fn smaller(self) -> Option<HugePageSize> {
        match self {
            HugePageSize::Huge1G => Some(HugePageSize::Huge2M),
            HugePageSize::Huge2M => Some(HugePageSize::Base4K),
            HugePageSize::Base4K => None,
        }
    }

    /// The PFN geometry of a source backed by this size: the chunk is one huge page, because
    /// only within one huge page are real PFNs known to be contiguous.
    ///
    /// * 1 GiB pages: [`Geometry::X86_64`] (4K / 2M / 1G chunk).
    /// * 2 MiB pages: chunks of one 2 MiB page. Core's [`Geometry`] needs three levels, and
    ///   x86-64 has none between 4 KiB and 2 MiB, so the middle level is 64 KiB (order 4, the
    ///   size of an arm64 contiguous-PTE run); on x86-64 it merges nothing in hardware.
    /// * ordinary pages: PFNs are synthetic, so chunks can be as large as we like; they are
    ///   1 GiB ([`Geometry::X86_64`]) so that the allocator and metadata see the same shape as
    ///   with 1 GiB pages.
    pub fn geometry(self) -> Geometry {
        match self {
            HugePageSize::Huge1G | HugePageSize::Base4K => Geometry::X86_64,
            HugePageSize::Huge2M => Geometry::new(4, 9)
                .expect("orders 4 < 9 <= 30 satisfy Geometry::new's only condition"),
        }
    }

    /// The bytes of one chunk of a source backed by this size.
    pub fn chunk_bytes(self) -> u64 {
        self.geometry().chunk_pages() * PAGE_SIZE
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePageSize::Base4K => "4K (ordinary)",
            HugePageSize::Huge2M => "2M hugetlb",
            HugePageSize::Huge1G => "1G hugetlb",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_sysfs_names_round_trip() {
        assert_eq!(HugePageSize::Huge1G.bytes(), 1 << 30);
        assert_eq!(HugePageSize::Huge2M.base_pages(), 512);
        assert_eq!(
            HugePageSize::Huge1G.sysfs_dir().as_deref(),
            Some("hugepages-1048576kB")
        );
        assert_eq!(HugePageSize::Base4K.sysfs_dir(), None);
        for size in [HugePageSize::Huge1G, HugePageSize::Huge2M] {
            assert_eq!(
                HugePageSize::from_sysfs_dir(&size.sysfs_dir().unwrap()),
                Some(size)
            );
        }
        assert_eq!(HugePageSize::from_sysfs_dir("hugepages-64kB"), None);
    }

    #[test]
    fn chunk_is_one_huge_page_for_hugetlb_sizes() {
        assert_eq!(HugePageSize::Huge1G.chunk_bytes(), 1 << 30);
        assert_eq!(HugePageSize::Huge2M.chunk_bytes(), 2 << 20);
        assert_eq!(HugePageSize::Base4K.chunk_bytes(), 1 << 30);
        let ladder: Vec<_> =
            std::iter::successors(Some(HugePageSize::Huge1G), |s| s.smaller()).collect();
        assert_eq!(ladder, HugePageSize::LADDER);
    }
}
