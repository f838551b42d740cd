//! The [`MemorySource`] abstraction: memory as a list of chunks with base PFNs.

use std::fmt;
use std::ops::Range;

use pfnstore_core::{Geometry, PAGE_SIZE, Pfn};

use crate::{HugePageSize, HugetlbError, Memfd, SourceRecord, SourceReport};

/// Where a store's memory comes from.
///
/// A source hands out *chunks*: runs of `geometry().chunk_pages()` PFNs, each naturally
/// aligned to its size, at a known byte offset of the source's memfd. The facade feeds the
/// chunks' base PFNs to the allocator and the metadata store, and turns a PFN back into a
/// memfd offset with [`MemorySource::locate`].
pub trait MemorySource: Send + Sync + fmt::Debug {
    /// The PFN geometry; its chunk is one chunk of this source.
    fn geometry(&self) -> Geometry;
    /// The chunks. Chunk `i` starts at byte `chunks()[i].memfd_offset` of the memfd, which is
    /// `i * chunk bytes` for [`crate::HugetlbSource`] and [`crate::SyntheticSource`] (memfd
    /// order) but not for [`crate::testing::ShuffledSource`] (PFN order, shuffled memfd).
    fn chunks(&self) -> &[Chunk];
    /// What was asked, what was obtained, and every step on the way.
    fn report(&self) -> &SourceReport;
    /// The chunk that contains `pfn` and where `pfn` lies in it, or `None`.
    fn locate(&self, pfn: Pfn) -> Option<ChunkLocation>;
    /// Adds `chunks` chunks of the same kind as the existing ones and returns the indices of
    /// the new chunks in [`MemorySource::chunks`]. On failure nothing was added and nothing
    /// is left behind.
    fn grow(&mut self, chunks: u64) -> Result<Range<usize>, HugetlbError>;
    /// The memfd that holds the chunks' bytes (chunk `c` at `c.memfd_offset`), for sources with
    /// memory; `None` for sources without ([`crate::SyntheticSource`]). Map it with
    /// [`crate::FileMapping::map`] or [`crate::HostView::from_memfd`].
    fn memfd(&self) -> Option<Memfd<'_>> {
        None
    }
    /// What another process needs to rebuild this source from its memfd ([`crate::rebuild`]):
    /// the first step of a handover (see [`crate::handover`]); `None` for a source that
    /// cannot be handed over (the default, for sources of your own). Call it with the source
    /// quiesced: nothing may grow it, punch or fill its pages until the handover ends.
    fn handover_record(&self) -> Option<SourceRecord> {
        None
    }
    /// Gives up the pool growth this source owns, as the old owner of a handover, once the new
    /// owner has rebuilt the source (which adopted the growth) and confirmed: dropping the
    /// source then only unmaps its memory and closes its memfd, and gives nothing back to the
    /// pools. [`HugetlbError::NotAdopted`] (and nothing changed) if a growth of this source was
    /// not adopted by another process. Sources that own no growth have nothing to do.
    fn relinquish(&self) -> Result<(), HugetlbError> {
        Ok(())
    }
}

/// Whether a chunk's PFNs are the machine's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PfnKind {
    /// Read from `/proc/self/pagemap` and checked: aligned, contiguous, present.
    Real,
    /// Made up (consecutive from a base); the reason says why no real ones are known.
    Synthetic {
        /// Why the PFNs are synthetic.
        reason: SyntheticReason,
    },
}

/// Why a chunk has synthetic PFNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyntheticReason {
    /// No memory behind it at all ([`crate::SyntheticSource`]).
    NoMemory,
    /// Ordinary 4 KiB pages: their frames are scattered, no contiguous PFN run exists.
    OrdinaryPages,
    /// pagemap showed PFN 0: the process lacks `CAP_SYS_ADMIN`.
    PagemapHidden,
    /// The pages were not prefaulted (`Prefault::None`), so they have no frames yet.
    NotPrefaulted,
    /// A test source ([`crate::testing::ShuffledSource`]) made them up, consecutive in PFN
    /// order while its memfd holds the chunks in another order.
    Shuffled,
}

impl fmt::Display for SyntheticReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyntheticReason::NoMemory => "synthetic source, no memory behind the PFNs",
            SyntheticReason::OrdinaryPages => "ordinary pages have no contiguous frames",
            SyntheticReason::PagemapHidden => {
                "pagemap hides PFNs without CAP_SYS_ADMIN (run as root for real PFNs)"
            }
            SyntheticReason::NotPrefaulted => "pages not prefaulted, so they have no frames yet",
            SyntheticReason::Shuffled => "test source: chunks in shuffled memfd order",
        })
    }
}

impl fmt::Display for PfnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PfnKind::Real => f.write_str("real (pagemap)"),
            PfnKind::Synthetic { reason } => write!(f, "synthetic: {reason}"),
        }
    }
}

/// Where a chunk is mapped in this process. Only an address: reading or writing through it is
/// for [`crate::HostView`], which checks bounds and revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostMapping {
    addr: usize,
    len: usize,
}

impl HostMapping {
    pub(crate) fn new(addr: usize, len: usize) -> HostMapping {
        HostMapping { addr, len }
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a chunk's).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One chunk of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// First PFN; aligned to the chunk.
    pub base: Pfn,
    /// 4 KiB pages in the chunk.
    pub pages: u64,
    /// The pages that back it (for a synthetic source: the size it stands for, from its
    /// geometry: 1G for 2^18-page chunks, 2M for 2^9, 4K otherwise).
    pub page_size: HugePageSize,
    /// Whether `base` is the machine's PFN.
    pub pfn_kind: PfnKind,
    /// Byte offset of the chunk in the source's memfd.
    pub memfd_offset: u64,
    /// The source's own mapping of the chunk, if it has memory.
    pub host: Option<HostMapping>,
}

impl Chunk {
    /// Bytes in the chunk.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// Where a PFN lies: which chunk, and how far into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    /// Index in [`MemorySource::chunks`].
    pub chunk: usize,
    /// 4 KiB pages from the chunk's base.
    pub page_offset: u64,
    /// Byte offset of the PFN's page in the source's memfd (also its offset in a
    /// [`crate::HostView`]).
    pub memfd_offset: u64,
}

/// A sorted index of chunk bases for PFN lookups: real PFNs of successive chunks are in no
/// particular order, so [`MemorySource::chunks`] order cannot be searched directly.
#[derive(Debug, Clone, Default)]
pub struct ChunkIndex {
    /// (base, chunk index), sorted by base.
    by_base: Vec<(Pfn, usize)>,
}

impl ChunkIndex {
    /// Indexes `chunks`.
    pub fn new(chunks: &[Chunk]) -> ChunkIndex {
        let mut by_base: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.base, i))
            .collect();
        by_base.sort_unstable();
        ChunkIndex { by_base }
    }

    /// Locates `pfn` among `chunks` (the slice this index was built from).
    pub fn locate(&self, chunks: &[Chunk], pfn: Pfn) -> Option<ChunkLocation> {
        let after = self.by_base.partition_point(|(base, _)| *base <= pfn);
        let (base, chunk) = *self.by_base.get(after.checked_sub(1)?)?;
        let c = chunks.get(chunk)?;
        let page_offset = pfn.checked_distance_from(base)?;
        (page_offset < c.pages).then(|| ChunkLocation {
            chunk,
            page_offset,
            memfd_offset: c.memfd_offset + page_offset * PAGE_SIZE,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(base: u64, i: u64) -> Chunk {
        Chunk {
            base: Pfn(base),
            pages: 512,
            page_size: HugePageSize::Huge2M,
            pfn_kind: PfnKind::Real,
            memfd_offset: i << 21,
            host: None,
        }
    }

    #[test]
    fn locate_finds_unordered_chunks_and_rejects_gaps() {
        let chunks = [chunk(0x4000, 0), chunk(0x1000, 1), chunk(0x8000, 2)];
        let index = ChunkIndex::new(&chunks);
        assert_eq!(
            index.locate(&chunks, Pfn(0x1005)),
            Some(ChunkLocation {
                chunk: 1,
                page_offset: 5,
                memfd_offset: (2 << 20) + 5 * 4096
            })
        );
        assert_eq!(index.locate(&chunks, Pfn(0x4000)).unwrap().chunk, 0);
        assert_eq!(index.locate(&chunks, Pfn(0x81ff)).unwrap().page_offset, 511);
        assert_eq!(index.locate(&chunks, Pfn(0x8200)), None);
        assert_eq!(index.locate(&chunks, Pfn(0x1200)), None);
        assert_eq!(index.locate(&chunks, Pfn(0xfff)), None);
    }
}
