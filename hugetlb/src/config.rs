//! What a [`crate::HugetlbSource`] is asked for.

use crate::HugePageSize;

/// How pages are faulted in before the source hands them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefault {
    /// Not at all: pages are faulted on first touch. Without frames there are no PFNs, so a
    /// hugetlb source then hands out synthetic PFNs ([`crate::SyntheticReason::NotPrefaulted`]).
    None,
    /// `mmap(MAP_POPULATE)`: the kernel faults (and zeroes) every page on the calling thread.
    MapPopulate,
    /// `MADV_POPULATE_WRITE` from this many threads, each taking whole pages (or 64 MiB
    /// batches of small pages) from a shared counter. Faster than [`Prefault::MapPopulate`]
    /// on more than one core, because zeroing a fresh page is the cost and it happens on the
    /// faulting thread.
    Threads(usize),
}

impl std::fmt::Display for Prefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prefault::None => f.write_str("none (faulted on first touch)"),
            Prefault::MapPopulate => f.write_str("MAP_POPULATE"),
            Prefault::Threads(1) => f.write_str("MADV_POPULATE_WRITE on 1 thread"),
            Prefault::Threads(n) => write!(f, "MADV_POPULATE_WRITE on {n} threads"),
        }
    }
}

impl Prefault {
    /// One thread per available CPU.
    pub fn threads_per_cpu() -> Prefault {
        Prefault::Threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// A request for memory: [`HugetlbConfig::new`], then the `with_` methods for what differs
/// from the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HugetlbConfig {
    /// Bytes; a non-zero multiple of `page_size`'s chunk (1 GiB for 1G and ordinary pages,
    /// 2 MiB for 2M pages).
    pub bytes: u64,
    /// The preferred page size: the top of the ladder.
    pub page_size: HugePageSize,
    /// Fail rather than fall back to a smaller page size.
    pub strict: bool,
    /// Take the pages from this NUMA node only (mbind `MPOL_BIND`; the node's own pool).
    pub numa_node: Option<u32>,
    /// If the pool has too few free pages, grow it by what is missing (needs root), and give
    /// exactly those pages back when the source is dropped. Never done unless set.
    pub grow_pool: bool,
    /// How pages are faulted in.
    pub prefault: Prefault,
    /// mlock the mapping (keeps ordinary pages from being swapped; hugetlb pages never are).
    pub mlock: bool,
}

impl HugetlbConfig {
    /// `bytes` of 1 GiB pages, falling back, no pool growth, no NUMA binding, prefaulted by
    /// one thread per CPU, not mlocked.
    pub fn new(bytes: u64) -> HugetlbConfig {
        HugetlbConfig {
            bytes,
            page_size: HugePageSize::Huge1G,
            strict: false,
            numa_node: None,
            grow_pool: false,
            prefault: Prefault::threads_per_cpu(),
            mlock: false,
        }
    }

    /// The preferred page size, the top of the fallback ladder.
    pub fn with_page_size(mut self, page_size: HugePageSize) -> HugetlbConfig {
        self.page_size = page_size;
        self
    }

    /// Whether to fail rather than fall back to a smaller page size.
    pub fn with_strict(mut self, strict: bool) -> HugetlbConfig {
        self.strict = strict;
        self
    }

    /// Take the pages from this NUMA node only.
    pub fn with_numa_node(mut self, numa_node: Option<u32>) -> HugetlbConfig {
        self.numa_node = numa_node;
        self
    }

    /// Whether to grow a short pool (root), giving the pages back on drop.
    pub fn with_grow_pool(mut self, grow_pool: bool) -> HugetlbConfig {
        self.grow_pool = grow_pool;
        self
    }

    /// How pages are faulted in.
    pub fn with_prefault(mut self, prefault: Prefault) -> HugetlbConfig {
        self.prefault = prefault;
        self
    }

    /// Whether to mlock the mapping.
    pub fn with_mlock(mut self, mlock: bool) -> HugetlbConfig {
        self.mlock = mlock;
        self
    }
}
