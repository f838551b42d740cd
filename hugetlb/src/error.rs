//! The errors of this crate. Each names what was asked and, for an OS failure, the errno that
//! came back and a hint at what would make it work.

use std::io;
use std::path::PathBuf;

use pfnstore_core::{GeometryError, Pfn, RangeError};

use crate::pool::id::PoolId;
use crate::{HugePageSize, PfnKind, RecordProblem, SourceReport};

/// Everything that can go wrong while obtaining, describing or using memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HugetlbError {
    /// A source of zero bytes (or zero chunks) was asked for.
    #[error("a memory source of zero bytes was requested")]
    ZeroSize,
    /// The size is not a whole number of chunks of the page size.
    #[error("size {bytes:#x} is not a multiple of the chunk size {chunk_bytes:#x}")]
    SizeNotMultiple {
        /// Requested bytes.
        bytes: u64,
        /// Bytes per chunk.
        chunk_bytes: u64,
    },
    /// The size exceeds the machine's memory.
    #[error("size {bytes:#x} exceeds the machine's memory ({mem_total:#x} bytes)")]
    LargerThanMachine {
        /// Requested bytes.
        bytes: u64,
        /// MemTotal of /proc/meminfo.
        mem_total: u64,
    },
    /// A NUMA node that this machine does not have.
    #[error("NUMA node {node} does not exist (nodes here: {available:?})")]
    UnknownNumaNode {
        /// The node asked for.
        node: u32,
        /// The nodes that exist.
        available: Vec<u32>,
    },
    /// A system call failed.
    #[error("{op} ({page_size}) failed: {source}; hint: {hint}")]
    Os {
        /// The operation (`memfd_create`, `mmap`, `MADV_POPULATE_WRITE`, ...).
        op: &'static str,
        /// The page size it was for.
        page_size: HugePageSize,
        /// What the kernel returned (`raw_os_error()` gives the errno).
        #[source]
        source: io::Error,
        /// What would make it work.
        hint: &'static str,
    },
    /// A sysfs or procfs file could not be read, written or parsed.
    #[error("{path}: {problem}; hint: {hint}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// What went wrong (includes the errno for I/O errors).
        problem: String,
        /// The errno, if the failure was an I/O error.
        errno: Option<i32>,
        /// What would make it work.
        hint: &'static str,
    },
    /// The kernel gave fewer pages than asked when the pool was grown; what it did give was
    /// given back.
    #[error(
        "growing the {page_size} pool{} by {asked} pages gave only {got}; the pool was restored",
        node_suffix(*node)
    )]
    PoolGrowShort {
        /// The pool's page size.
        page_size: HugePageSize,
        /// The node, if the pool is a node's.
        node: Option<u32>,
        /// Pages asked for.
        asked: u64,
        /// Pages obtained.
        got: u64,
    },
    /// A page size that has no hugetlb pool (ordinary pages).
    #[error("{page_size} has no hugetlb pool")]
    NoPool {
        /// The size.
        page_size: HugePageSize,
    },
    /// `/proc/self/pagemap` says something that cannot hold for a huge page.
    #[error("pagemap at byte offset {offset:#x} of the memfd: {problem}")]
    Pagemap {
        /// Byte offset in the memfd of the page concerned.
        offset: u64,
        /// What is wrong.
        problem: PagemapProblem,
    },
    /// Every rung of the ladder failed (or the only one, in strict mode); the report says why
    /// each did.
    #[error("no memory obtained:\n{report}")]
    NoMemory {
        /// What was tried.
        report: Box<SourceReport>,
    },
    /// A byte range outside a mapping.
    #[error("bytes {offset:#x}+{len:#x} are outside the mapping of {size:#x} bytes")]
    OutOfBounds {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// A byte range that must cover whole pages does not.
    #[error("bytes {offset:#x}+{len:#x} are not whole {page_size} pages")]
    NotPageAligned {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The page size it must be aligned to.
        page_size: HugePageSize,
    },
    /// An access to a page that the host view has revoked.
    #[error("byte offset {offset:#x} lies in a page revoked from the host view")]
    Revoked {
        /// First revoked byte offset the access touches.
        offset: u64,
    },
    /// An access to a range of a [`crate::FileMapping`] that has nothing mapped (only the
    /// inaccessible reservation).
    #[error("byte offset {offset:#x} of the file mapping has no memory mapped")]
    NotMapped {
        /// First unmapped byte offset the access touches.
        offset: u64,
    },
    /// Changing the mappings would make the process hold more memory regions (kernel VMAs)
    /// than allowed: past `vm.max_map_count` the kernel refuses `mmap` and `mprotect` with
    /// `ENOMEM`. From a [`crate::FileMapping`] this is refused before anything changed, and
    /// `regions`/`limit` are its budget ([`crate::VmaBudget`]); from the kernel (an `ENOMEM`
    /// of `mprotect`, or of `mmap` with the process near the limit) they are the process's
    /// regions and `vm.max_map_count`.
    #[error(
        "byte offset {offset:#x}: {regions} memory regions exceed the limit of {limit}; hint: {}",
        hint::MAP_COUNT
    )]
    MapCountLimit {
        /// Byte offset (in the mapping or view) of the change that was refused.
        offset: u64,
        /// Regions there would be (budget) or are (kernel).
        regions: u64,
        /// The budget, or `vm.max_map_count`.
        limit: u64,
    },
    /// A memfd of pages larger than the alignment of the mapping it is to be mapped into:
    /// huge pages must be mapped at addresses aligned to their size.
    #[error("{page_size} pages cannot be mapped into a mapping aligned to {align} only")]
    MappingAlignment {
        /// The memfd's page size.
        page_size: HugePageSize,
        /// The mapping's alignment.
        align: HugePageSize,
    },
    /// A chunk's PFN is no longer what pagemap says: the kernel migrated the huge page
    /// (compaction, memory offlining, a contiguous allocation) after the PFN was read.
    #[error("chunk {chunk} (memfd offset {memfd_offset:#x}) was at {recorded} and is now at {now}")]
    PfnMoved {
        /// Index of the first chunk found moved.
        chunk: usize,
        /// Its byte offset in the memfd.
        memfd_offset: u64,
        /// The PFN the source recorded.
        recorded: Pfn,
        /// The PFN pagemap shows now.
        now: Pfn,
    },
    /// A chunk order that is not a permutation of the memfd's chunk slots
    /// ([`crate::testing::ShuffledSource::with_order`]).
    #[error("chunk {chunk} is given memfd slot {slot}, which is out of range or taken")]
    NotAPermutation {
        /// The chunk.
        chunk: usize,
        /// The slot it was given.
        slot: u64,
    },
    /// A PFN no chunk of the source contains.
    #[error("{pfn} is in no chunk of this source")]
    PfnNotFound {
        /// The PFN.
        pfn: Pfn,
    },
    /// Memory added by a grow got PFNs of another kind than the source's (pagemap stopped
    /// showing PFNs, say); it was given back.
    #[error("grown memory has PFNs {now} but the source's are {was:?}")]
    PfnKindChanged {
        /// The source's kind.
        was: Option<PfnKind>,
        /// The new memory's kind.
        now: PfnKind,
    },
    /// A handed-over memfd ([`crate::rebuild`]) has pages of another size than its record says.
    #[error("the memfd has {found} pages, the record says {recorded}")]
    MemfdPageSize {
        /// The record's page size.
        recorded: HugePageSize,
        /// The memfd's (from fstatfs).
        found: HugePageSize,
    },
    /// A handed-over memfd is not as long as its record says.
    #[error("the memfd holds {found:#x} bytes, the record says {recorded:#x}")]
    MemfdLength {
        /// The record's length.
        recorded: u64,
        /// The memfd's (from fstat).
        found: u64,
    },
    /// A handed-over descriptor is another file than the memfd the record was made of.
    #[error(
        "the descriptor is file {found:?} (device, inode), the record was made of {recorded:?}"
    )]
    WrongMemfd {
        /// The recorded memfd's (device, inode).
        recorded: (u64, u64),
        /// The descriptor's.
        found: (u64, u64),
    },
    /// A handed-over memfd holds another number of pages than its record says are backed
    /// (pages punched out, or written again, after the record was made): nothing was faulted.
    #[error("the memfd holds {found} pages of memory, the record says {expected}")]
    BackedPages {
        /// Pages the record says are backed (its length less its holes).
        expected: u64,
        /// Pages the memfd holds (fstat's blocks).
        found: u64,
    },
    /// A chunk the record says is backed has no page in the handed-over memfd. The page that
    /// touching it took from the pool was punched out again.
    #[error("chunk {chunk} (memfd offset {memfd_offset:#x}) has no page in the memfd")]
    PageMissing {
        /// Index of the chunk.
        chunk: usize,
        /// Its byte offset in the memfd.
        memfd_offset: u64,
    },
    /// A [`crate::SourceRecord`] that no source can be rebuilt from: it contradicts itself or
    /// the kind of source asked to rebuild it. Nothing was touched.
    #[error("invalid source record{}: {problem}", chunk.map(|c| format!(" (chunk {c})")).unwrap_or_default())]
    InvalidRecord {
        /// The chunk concerned, if one is.
        chunk: Option<usize>,
        /// What is wrong.
        problem: RecordProblem,
    },
    /// A recorded pool growth whose ledger entry is not what the record says; it was not
    /// taken over.
    #[error("ledger entry {entry}: {problem}")]
    LedgerMismatch {
        /// The entry.
        entry: PathBuf,
        /// What differs.
        problem: String,
    },
    /// [`crate::MemorySource::relinquish`] (or [`crate::pool::PoolReservation::relinquish`])
    /// of a growth that no other process has adopted: its ledger entry is still this
    /// process's. Nothing changed.
    #[error("the growth of the {pool} in {entry} was not adopted by another process")]
    NotAdopted {
        /// The pool.
        pool: PoolId,
        /// The ledger entry still owned here.
        entry: PathBuf,
    },
    /// An invalid PFN range (synthetic source bounds or alignment).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// An invalid geometry.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
}

fn node_suffix(node: Option<u32>) -> String {
    node.map(|n| format!(" of node {n}")).unwrap_or_default()
}

/// What is wrong with a pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PagemapProblem {
    /// The page is not present although it was prefaulted.
    #[error("page not present after prefault")]
    NotPresent,
    /// The first PFN of a huge page is not aligned to the huge page.
    #[error("{pfn} is not aligned to {align_pages} pages")]
    Unaligned {
        /// The PFN.
        pfn: Pfn,
        /// The huge page's size in 4K pages.
        align_pages: u64,
    },
    /// A 4K PFN inside a huge page is not the next one.
    #[error("expected {expected}, found {found}")]
    NotContiguous {
        /// What contiguity requires.
        expected: Pfn,
        /// What pagemap says.
        found: Pfn,
    },
}

/// Hints, worded once.
pub(crate) mod hint {
    pub(crate) const POOL: &str = "run as root with grow_pool, or set nr_hugepages in /sys/kernel/mm/hugepages (per node: /sys/devices/system/node/nodeN/hugepages)";
    pub(crate) const ROOT: &str = "run as root or set nr_hugepages";
    pub(crate) const SIZE: &str =
        "the kernel lacks this huge page size, or the size is not a multiple of it";
    pub(crate) const MEMLOCK: &str = "raise RLIMIT_MEMLOCK (ulimit -l) or run as root";
    pub(crate) const MEMORY: &str = "the machine has not enough free memory";
    pub(crate) const MAP_COUNT: &str = "every mapping and every protection boundary is a kernel memory region (VMA); protect larger aligned ranges, or raise vm.max_map_count";
}

impl HugetlbError {
    /// The errno behind an OS or sysfs failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HugetlbError::Os { source, .. } => source.raw_os_error(),
            HugetlbError::Sysfs { errno, .. } => *errno,
            _ => None,
        }
    }

    /// An OS failure of `op`, with the hint that fits its errno.
    pub(crate) fn os(op: &'static str, page_size: HugePageSize, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::ENOMEM | libc::EPERM | libc::EAGAIN) if op == "mlock" => hint::MEMLOCK,
            // mprotect's ENOMEM on a mapped range is the region limit, never free memory.
            Some(libc::ENOMEM) if op == "mprotect" => hint::MAP_COUNT,
            Some(libc::EPERM | libc::EACCES) => hint::ROOT,
            Some(libc::EINVAL) => hint::SIZE,
            Some(libc::ENOMEM | libc::ENOSPC | libc::EFAULT | libc::EHWPOISON)
                if page_size.is_hugetlb() =>
            {
                hint::POOL
            }
            _ => hint::MEMORY,
        };
        HugetlbError::Os {
            op,
            page_size,
            source,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_carry_the_errno_and_a_hint() {
        let e = HugetlbError::os(
            "mmap",
            HugePageSize::Huge1G,
            io::Error::from_raw_os_error(libc::ENOMEM),
        );
        assert_eq!(e.errno(), Some(libc::ENOMEM));
        assert!(e.to_string().contains("set nr_hugepages"), "{e}");
        let e = HugetlbError::os(
            "write nr_hugepages",
            HugePageSize::Huge2M,
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert!(e.to_string().contains("run as root"), "{e}");
        let e = HugetlbError::os(
            "memfd_create",
            HugePageSize::Huge1G,
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert!(e.to_string().contains("lacks this huge page size"), "{e}");
    }
}
