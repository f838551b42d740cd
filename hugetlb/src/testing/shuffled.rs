//! [`ShuffledSource`]: a memory source whose chunks sit in its memfd in another order than
//! their PFNs, as real hugetlb pages do.
//!
//! The synthetic and ordinary sources keep chunk `i` at memfd offset `i * chunk`, so code that
//! assumes "PFN-adjacent chunks are memfd-adjacent" passes every test on them and then hands
//! one file's bytes to another on real hugetlb memory, where pages sit in the memfd in no
//! particular PFN order. This source has consecutive PFN bases and a shuffled memfd order, with
//! real bytes behind it (an ordinary memfd, or 2 MiB hugetlb where the pool allows).

use std::ops::Range;
use std::os::fd::OwnedFd;

use pfnstore_core::sync::Arc;
use pfnstore_core::testing::XorShift;
use pfnstore_core::{Geometry, PAGE_SIZE, Pfn};

use crate::backing::MemfdFile;
use crate::handover::{self, RecordProblem, RequestRecord, SourceKind, SourceRecord};
use crate::report::Timings;
use crate::{
    Chunk, ChunkIndex, ChunkLocation, HugePageSize, HugetlbError, Memfd, MemorySource, PfnKind,
    Prefault, SYNTHETIC_PFN_BASE, SourceReport, SyntheticReason,
};

/// Chunks with consecutive PFNs from [`ShuffledSource::BASE`], chunk `i` at memfd slot
/// `order[i]` (byte offset `order[i] * chunk bytes`) of a memfd whose pages are allocated up
/// front. Chunks are 2 MiB (512 pages; [`HugePageSize::Huge2M`]'s geometry) for 4 KiB and
/// 2 MiB pages, 1 GiB for 1 GiB pages.
#[derive(Debug)]
pub struct ShuffledSource {
    geometry: Geometry,
    page_size: HugePageSize,
    chunks: Vec<Chunk>,
    index: ChunkIndex,
    report: SourceReport,
    memfd: Arc<MemfdFile>,
    rng: XorShift,
}

impl ShuffledSource {
    /// The PFN of chunk 0.
    pub const BASE: Pfn = SYNTHETIC_PFN_BASE;

    /// `chunks` chunks of memory of `page_size` (4 KiB: an ordinary memfd; 2 MiB or 1 GiB:
    /// hugetlb, from the pool, which must have the pages free) in an order drawn from `seed`.
    /// With two or more chunks the order is never the identity.
    pub fn new(
        page_size: HugePageSize,
        chunks: u64,
        seed: u64,
    ) -> Result<ShuffledSource, HugetlbError> {
        let mut rng = XorShift::new(seed ^ 0x9e37_79b9_7f4a_7c15 | 1);
        let order = shuffled(&mut rng, 0..chunks);
        ShuffledSource::build(page_size, &order, rng)
    }

    /// Chunk `i` at memfd slot `order[i]`; `order` must be a permutation of `0..order.len()`.
    pub fn with_order(
        page_size: HugePageSize,
        order: &[u64],
    ) -> Result<ShuffledSource, HugetlbError> {
        let mut seen = vec![false; order.len()];
        for (chunk, slot) in order.iter().enumerate() {
            match seen.get_mut(*slot as usize) {
                Some(taken @ false) => *taken = true,
                _ => {
                    return Err(HugetlbError::NotAPermutation { chunk, slot: *slot });
                }
            }
        }
        ShuffledSource::build(page_size, order, XorShift::new(0x5eed))
    }

    /// Two chunks in reversed memfd order: the PFN-lower chunk is the memfd-higher one, so a
    /// copy that runs from the first chunk into the second would reach memory before it.
    pub fn reversed_pair(page_size: HugePageSize) -> Result<ShuffledSource, HugetlbError> {
        ShuffledSource::with_order(page_size, &[1, 0])
    }

    /// The memfd slot of each chunk, in chunk order.
    pub fn order(&self) -> Vec<u64> {
        let chunk_bytes = self.chunk_bytes();
        self.chunks
            .iter()
            .map(|c| c.memfd_offset / chunk_bytes)
            .collect()
    }

    /// Rebuilds a shuffled source another process recorded ([`MemorySource::record`]) from its
    /// memfd: the same chunks in the same order (consecutive PFNs from
    /// [`ShuffledSource::BASE`], memfd offsets a permutation of the slots), after checking the
    /// memfd's page size, length and identity against the record. Nothing is mapped or faulted
    /// (the source keeps no mapping of its own) and there is no pool growth to take over.
    pub fn rebuild(record: &SourceRecord, memfd: OwnedFd) -> Result<ShuffledSource, HugetlbError> {
        handover::check_kind(record, SourceKind::Shuffled)?;
        let shuffled = PfnKind::Synthetic {
            reason: SyntheticReason::Shuffled,
        };
        handover::pfn_kind_of(record, |kind| kind == shuffled)?;
        if record.geometry != geometry_for(record.page_size) {
            return Err(handover::invalid(None, RecordProblem::Geometry));
        }
        handover::check_consecutive(record, Self::BASE)?;
        handover::check_tiling(record)?;
        if !record.pool_growth.is_empty() {
            return Err(handover::invalid(None, RecordProblem::UnexpectedMemfd));
        }
        let memfd = handover::adopt_memfd(record, memfd)?;
        let chunks: Vec<Chunk> = record
            .chunks
            .iter()
            .map(|c| Chunk {
                base: c.base,
                pages: record.geometry.chunk_pages(),
                page_size: record.page_size,
                pfn_kind: shuffled,
                memfd_offset: c.memfd_offset,
                host: None,
            })
            .collect();
        Ok(ShuffledSource {
            geometry: record.geometry,
            page_size: record.page_size,
            index: ChunkIndex::new(&chunks),
            chunks,
            report: SourceReport {
                requested_bytes: record.request.requested_bytes,
                preferred: record.page_size,
                strict: true,
                numa_node: None,
                prefault: Prefault::None,
                steps: Vec::new(),
                obtained: Some(record.page_size),
                pfn_kind: Some(shuffled),
                bytes: record.memfd_len,
                timings: Timings::default(),
            },
            memfd,
            rng: XorShift::new(record.memfd_len ^ 0x5eed | 1),
        })
    }

    fn chunk_bytes(&self) -> u64 {
        self.geometry.chunk_pages() * PAGE_SIZE
    }

    fn build(
        page_size: HugePageSize,
        order: &[u64],
        rng: XorShift,
    ) -> Result<ShuffledSource, HugetlbError> {
        let geometry = geometry_for(page_size);
        let memfd = Arc::new(MemfdFile::create(page_size, 0)?);
        let mut source = ShuffledSource {
            geometry,
            page_size,
            chunks: Vec::new(),
            index: ChunkIndex::default(),
            report: SourceReport {
                requested_bytes: 0,
                preferred: page_size,
                strict: true,
                numa_node: None,
                prefault: Prefault::None,
                steps: Vec::new(),
                obtained: Some(page_size),
                pfn_kind: Some(PfnKind::Synthetic {
                    reason: SyntheticReason::Shuffled,
                }),
                bytes: 0,
                timings: Timings::default(),
            },
            memfd,
            rng,
        };
        source.append(order)?;
        source.report.requested_bytes = source.report.bytes;
        Ok(source)
    }

    /// Appends `order.len()` chunks, chunk `held + i` at slot `held + order[i]`.
    fn append(&mut self, order: &[u64]) -> Result<Range<usize>, HugetlbError> {
        if order.is_empty() {
            return Err(HugetlbError::ZeroSize);
        }
        let chunk_bytes = self.chunk_bytes();
        let held = self.chunks.len() as u64;
        let added = order.len() as u64;
        let too_large = HugetlbError::LargerThanMachine {
            bytes: u64::MAX,
            mem_total: 0,
        };
        let new_len = (held + added).checked_mul(chunk_bytes).ok_or(too_large)?;
        let old_len = self.report.bytes;
        self.memfd.set_len(new_len)?;
        if let Err(e) = self.memfd.allocate(old_len, new_len - old_len) {
            // Nothing added: the file shrinks back, which frees what was allocated.
            let _ = self.memfd.set_len(old_len);
            return Err(e);
        }
        let first = self.chunks.len();
        for (i, slot) in order.iter().enumerate() {
            let index = held + i as u64;
            self.chunks.push(Chunk {
                base: Pfn(Self::BASE.0 + index * self.geometry.chunk_pages()),
                pages: self.geometry.chunk_pages(),
                page_size: self.page_size,
                pfn_kind: PfnKind::Synthetic {
                    reason: SyntheticReason::Shuffled,
                },
                memfd_offset: (held + slot) * chunk_bytes,
                host: None,
            });
        }
        self.index = ChunkIndex::new(&self.chunks);
        self.report.bytes = new_len;
        Ok(first..self.chunks.len())
    }
}

/// The geometry of a shuffled source of pages of `page_size`.
fn geometry_for(page_size: HugePageSize) -> Geometry {
    match page_size {
        HugePageSize::Huge1G => HugePageSize::Huge1G.geometry(),
        HugePageSize::Base4K | HugePageSize::Huge2M => HugePageSize::Huge2M.geometry(),
    }
}

/// `range` in an order drawn from `rng` (Fisher-Yates), never the identity for two or more.
fn shuffled(rng: &mut XorShift, range: Range<u64>) -> Vec<u64> {
    let mut order: Vec<u64> = (0..range.end - range.start).collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    if order.len() >= 2 && order.iter().enumerate().all(|(i, s)| *s == i as u64) {
        order.swap(0, 1);
    }
    order
}

impl ShuffledSource {
    /// What another process needs to rebuild this source (see
    /// [`MemorySource::handover_record`]).
    pub fn record(&self) -> SourceRecord {
        SourceRecord {
            kind: SourceKind::Shuffled,
            page_size: self.page_size,
            geometry: self.geometry,
            memfd_len: self.report.bytes,
            memfd_id: handover::memfd_identity(&self.memfd),
            chunks: handover::chunk_records(&self.chunks),
            holes: handover::hole_records(&self.memfd),
            request: RequestRecord {
                requested_bytes: self.report.requested_bytes,
                preferred: self.page_size,
                strict: true,
                numa_node: None,
                grow_pool: false,
                prefault: Prefault::None,
                mlock: false,
            },
            pool_growth: Vec::new(),
        }
    }
}

impl MemorySource for ShuffledSource {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn report(&self) -> &SourceReport {
        &self.report
    }

    fn locate(&self, pfn: Pfn) -> Option<ChunkLocation> {
        self.index.locate(&self.chunks, pfn)
    }

    /// Adds `chunks` chunks at the end of the memfd, shuffled among themselves.
    fn grow(&mut self, chunks: u64) -> Result<Range<usize>, HugetlbError> {
        let order = shuffled(&mut self.rng, 0..chunks);
        self.append(&order)
    }

    fn memfd(&self) -> Option<Memfd<'_>> {
        Some(Memfd::owned(&self.memfd, self.report.bytes))
    }

    fn handover_record(&self) -> Option<SourceRecord> {
        Some(self.record())
    }

    /// A shuffled source never grows a pool (tests reserve pages for it): nothing to give up.
    fn relinquish(&self) -> Result<(), HugetlbError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{PoolId, PoolReservation, Sysfs};
    use crate::{FileMapping, HostView, Protection, VmaBudget};

    const M2: u64 = 2 << 20;

    #[test]
    fn the_reversed_pair_locates_each_pfn_in_the_other_half_of_the_memfd() {
        let s = ShuffledSource::reversed_pair(HugePageSize::Base4K).unwrap();
        let base = ShuffledSource::BASE;
        assert_eq!(s.order(), [1, 0]);
        assert_eq!(s.geometry().chunk_pages(), 512);
        assert_eq!(s.chunks()[0].base, base);
        assert_eq!(s.chunks()[1].base, Pfn(base.0 + 512));
        assert_eq!(
            s.locate(Pfn(base.0 + 5)),
            Some(ChunkLocation {
                chunk: 0,
                page_offset: 5,
                memfd_offset: M2 + 5 * PAGE_SIZE
            })
        );
        // The PFN after the last of chunk 0 is the first of chunk 1, at memfd offset 0.
        assert_eq!(
            s.locate(Pfn(base.0 + 511)).unwrap().memfd_offset,
            2 * M2 - PAGE_SIZE
        );
        assert_eq!(
            s.locate(Pfn(base.0 + 512)),
            Some(ChunkLocation {
                chunk: 1,
                page_offset: 0,
                memfd_offset: 0
            })
        );
        assert_eq!(s.locate(Pfn(base.0 + 1024)), None);
        assert_eq!(s.locate(Pfn(base.0 - 1)), None);
        let memfd = s.memfd().unwrap();
        assert_eq!(
            (memfd.len(), memfd.page_size()),
            (2 * M2, HugePageSize::Base4K)
        );
        assert_eq!(
            s.report().pfn_kind,
            Some(PfnKind::Synthetic {
                reason: SyntheticReason::Shuffled
            })
        );
    }

    #[test]
    fn a_seeded_order_is_a_permutation_and_locate_agrees_with_a_scan() {
        let s = ShuffledSource::new(HugePageSize::Base4K, 8, 42).unwrap();
        let order = s.order();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        assert_ne!(order, sorted, "shuffled");
        assert_eq!(
            ShuffledSource::new(HugePageSize::Base4K, 8, 42)
                .unwrap()
                .order(),
            order,
            "deterministic"
        );
        let base = ShuffledSource::BASE.0;
        for probe in (base - 3..base + 8 * 512 + 3).step_by(7) {
            let pfn = Pfn(probe);
            let expected = s.chunks().iter().enumerate().find_map(|(i, c)| {
                let off = pfn.checked_distance_from(c.base)?;
                (off < c.pages).then_some((i, off, c.memfd_offset + off * PAGE_SIZE))
            });
            let got = s
                .locate(pfn)
                .map(|l| (l.chunk, l.page_offset, l.memfd_offset));
            assert_eq!(got, expected, "{pfn}");
        }
        // Two chunks, whatever the seed, are never in identity order.
        for seed in 0..64 {
            assert_eq!(
                ShuffledSource::new(HugePageSize::Base4K, 2, seed)
                    .unwrap()
                    .order(),
                [1, 0]
            );
        }
    }

    #[test]
    fn growing_shuffles_the_new_chunks_and_keeps_the_old() {
        let mut s = ShuffledSource::new(HugePageSize::Base4K, 3, 7).unwrap();
        let old = s.order();
        assert_eq!(s.grow(4).unwrap(), 3..7);
        let order = s.order();
        assert_eq!(&order[..3], &old[..]);
        let mut new: Vec<u64> = order[3..].to_vec();
        new.sort_unstable();
        assert_eq!(new, [3, 4, 5, 6]);
        assert_eq!(s.memfd().unwrap().len(), 7 * M2);
        assert_eq!(s.chunks()[6].base, Pfn(ShuffledSource::BASE.0 + 6 * 512));
        assert!(matches!(s.grow(0), Err(HugetlbError::ZeroSize)));
        assert_eq!(s.chunks().len(), 7);
    }

    #[test]
    fn an_order_that_is_no_permutation_is_refused() {
        assert!(matches!(
            ShuffledSource::with_order(HugePageSize::Base4K, &[0, 2]),
            Err(HugetlbError::NotAPermutation { chunk: 1, slot: 2 })
        ));
        assert!(matches!(
            ShuffledSource::with_order(HugePageSize::Base4K, &[1, 1]),
            Err(HugetlbError::NotAPermutation { chunk: 1, slot: 1 })
        ));
        assert!(matches!(
            ShuffledSource::with_order(HugePageSize::Base4K, &[]),
            Err(HugetlbError::ZeroSize)
        ));
    }

    /// What the facade does with it: the chunks mapped in PFN order into one file mapping
    /// read the bytes written at their memfd offsets.
    fn check_bytes_follow_locate(s: &ShuffledSource) {
        static BUDGET: VmaBudget = VmaBudget::with_limit(100);
        let chunk = s.chunk_bytes();
        let view = HostView::from_memfd(s.memfd().unwrap()).unwrap();
        for (i, c) in s.chunks().iter().enumerate() {
            view.write(c.memfd_offset, &[i as u8 + 1; 8]).unwrap();
        }
        let memfd = s.memfd().unwrap();
        let files = FileMapping::reserve_in(
            s.chunks().len() as u64 * chunk,
            s.memfd().unwrap().page_size().max(HugePageSize::Huge2M),
            &BUDGET,
        )
        .unwrap();
        for (i, c) in s.chunks().iter().enumerate() {
            let loc = s.locate(c.base).unwrap();
            files
                .map(
                    i as u64 * chunk,
                    memfd.fd(),
                    loc.memfd_offset,
                    chunk,
                    Protection::ReadWrite,
                )
                .unwrap();
        }
        for i in 0..s.chunks().len() as u64 {
            let mut b = [0u8; 8];
            files.read(i * chunk, &mut b).unwrap();
            assert_eq!(b, [i as u8 + 1; 8], "chunk {i}");
        }
    }

    #[test]
    fn bytes_written_at_memfd_offsets_read_back_in_pfn_order() {
        check_bytes_follow_locate(&ShuffledSource::new(HugePageSize::Base4K, 6, 3).unwrap());
    }

    #[test]
    fn a_2m_hugetlb_shuffled_source() {
        let test = "a_2m_hugetlb_shuffled_source";
        let _lock = crate::testing::hugetlb_lock();
        if let Err(why) = crate::testing::can_reserve(HugePageSize::Huge2M) {
            pfnstore_core::testing::skip(test, &why);
            return;
        }
        let sysfs = Sysfs::system();
        let id = PoolId {
            page_size: HugePageSize::Huge2M,
            node: None,
        };
        let before = sysfs.read_pool(id).unwrap();
        {
            let missing = 4u64.saturating_sub(before.available());
            let _pages = (missing > 0).then(|| PoolReservation::grow(&sysfs, id, missing).unwrap());
            let s = ShuffledSource::new(HugePageSize::Huge2M, 4, 11).unwrap();
            assert_eq!(s.memfd().unwrap().page_size(), HugePageSize::Huge2M);
            assert_eq!(s.chunks()[0].page_size, HugePageSize::Huge2M);
            check_bytes_follow_locate(&s);
        }
        // Pages the kernel has not finished freeing when the reservation is dropped are given
        // back by its guardian as they come free: wait for that, not for a fixed moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sysfs.read_pool(id).unwrap() != before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(sysfs.read_pool(id).unwrap(), before);
    }
}
