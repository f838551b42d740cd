//! [`SyntheticSource`]: chunks with made-up PFNs and no memory, for running the allocator and
//! the metadata store at the scale of a large host (16 TiB on a 24 GiB machine).

use std::ops::Range;

use pfnstore_core::{Geometry, PAGE_SIZE, Pfn, PfnRange};

use crate::handover::{self, RecordProblem, RequestRecord, SourceKind, SourceRecord};
use crate::report::Timings;
use crate::{
    Chunk, ChunkLocation, HugePageSize, HugetlbError, MemorySource, PfnKind, Prefault,
    SourceReport, SyntheticReason,
};

/// Chunks of consecutive synthetic PFNs from a base, with nothing behind them.
///
/// Chunk `i` has base `base + i * chunk_pages`; [`MemorySource::locate`] is arithmetic, so
/// no index is kept. Each chunk still costs one [`Chunk`] record (16 TiB of 1 GiB chunks:
/// 16,384 records, under 1 MiB).
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    geometry: Geometry,
    base: Pfn,
    chunks: Vec<Chunk>,
    report: SourceReport,
}

impl SyntheticSource {
    /// `chunks` chunks of `geometry` from `base`, which must be chunk-aligned; the whole span
    /// must lie below the PFN limit.
    pub fn new(
        geometry: Geometry,
        base: Pfn,
        chunks: u64,
    ) -> Result<SyntheticSource, HugetlbError> {
        let mut source = SyntheticSource {
            geometry,
            base,
            chunks: Vec::new(),
            report: SourceReport {
                requested_bytes: 0,
                preferred: stand_in_size(&geometry),
                strict: true,
                numa_node: None,
                prefault: Prefault::None,
                steps: Vec::new(),
                obtained: Some(stand_in_size(&geometry)),
                pfn_kind: Some(PfnKind::Synthetic {
                    reason: SyntheticReason::NoMemory,
                }),
                bytes: 0,
                timings: Timings::default(),
            },
        };
        source.grow(chunks)?;
        source.report.requested_bytes = source.report.bytes;
        Ok(source)
    }

    /// The PFNs of all chunks.
    pub fn span(&self) -> PfnRange {
        let pages = self.chunks.len() as u64 * self.geometry.chunk_pages();
        PfnRange::from_len(self.base, pages)
            .expect("grow checked that the span is non-empty and below the PFN limit")
    }
}

impl SyntheticSource {
    /// Rebuilds a synthetic source another process recorded ([`MemorySource::handover_record`]): the
    /// same chunks (consecutive from the first chunk's base, each at its index times the chunk
    /// size, PFN kind [`SyntheticReason::NoMemory`]) and geometry. There is no memfd and
    /// nothing to take over. [`HugetlbError::InvalidRecord`] names the first chunk out of place.
    pub fn rebuild(record: &SourceRecord) -> Result<SyntheticSource, HugetlbError> {
        handover::check_kind(record, SourceKind::Synthetic)?;
        let no_memory = PfnKind::Synthetic {
            reason: SyntheticReason::NoMemory,
        };
        handover::pfn_kind_of(record, |kind| kind == no_memory)?;
        if record.page_size != stand_in_size(&record.geometry) {
            return Err(handover::invalid(None, RecordProblem::Geometry));
        }
        let base = record.chunks[0].base;
        handover::check_consecutive(record, base)?;
        let chunk_bytes = record.geometry.chunk_pages() * PAGE_SIZE;
        for (i, c) in record.chunks.iter().enumerate() {
            if Some(c.memfd_offset) != (i as u64).checked_mul(chunk_bytes) {
                return Err(handover::invalid(
                    Some(i),
                    RecordProblem::MemfdOffset {
                        memfd_offset: c.memfd_offset,
                    },
                ));
            }
        }
        if record.memfd_len != 0 || !record.holes.is_empty() || !record.pool_growth.is_empty() {
            return Err(handover::invalid(None, RecordProblem::UnexpectedMemfd));
        }
        let mut source = SyntheticSource::new(record.geometry, base, record.chunks.len() as u64)?;
        source.report.requested_bytes = record.request.requested_bytes;
        Ok(source)
    }
}

/// The page size a synthetic chunk stands for.
fn stand_in_size(geometry: &Geometry) -> HugePageSize {
    match geometry.chunk_pages() {
        p if p == HugePageSize::Huge1G.base_pages() => HugePageSize::Huge1G,
        p if p == HugePageSize::Huge2M.base_pages() => HugePageSize::Huge2M,
        _ => HugePageSize::Base4K,
    }
}

impl SyntheticSource {
    /// What another process needs to rebuild this source (see
    /// [`MemorySource::handover_record`]).
    pub fn record(&self) -> SourceRecord {
        SourceRecord {
            kind: SourceKind::Synthetic,
            page_size: stand_in_size(&self.geometry),
            geometry: self.geometry,
            memfd_len: 0,
            memfd_id: None,
            chunks: handover::chunk_records(&self.chunks),
            holes: Vec::new(),
            request: RequestRecord {
                requested_bytes: self.report.requested_bytes,
                preferred: self.report.preferred,
                strict: self.report.strict,
                numa_node: None,
                grow_pool: false,
                prefault: Prefault::None,
                mlock: false,
            },
            pool_growth: Vec::new(),
        }
    }
}

impl MemorySource for SyntheticSource {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn handover_record(&self) -> Option<SourceRecord> {
        Some(self.record())
    }

    fn relinquish(&self) -> Result<(), HugetlbError> {
        Ok(())
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn report(&self) -> &SourceReport {
        &self.report
    }

    fn locate(&self, pfn: Pfn) -> Option<ChunkLocation> {
        let pages = pfn.checked_distance_from(self.base)?;
        let chunk = usize::try_from(pages / self.geometry.chunk_pages()).ok()?;
        let c = self.chunks.get(chunk)?;
        let page_offset = pages % self.geometry.chunk_pages();
        Some(ChunkLocation {
            chunk,
            page_offset,
            memfd_offset: c.memfd_offset + page_offset * PAGE_SIZE,
        })
    }

    fn grow(&mut self, chunks: u64) -> Result<Range<usize>, HugetlbError> {
        if chunks == 0 {
            return Err(HugetlbError::ZeroSize);
        }
        let chunk_pages = self.geometry.chunk_pages();
        let held = self.chunks.len() as u64;
        let start = Pfn(self.base.0.checked_add(held * chunk_pages).ok_or(
            pfnstore_core::RangeError::Overflow {
                start: self.base,
                pages: u64::MAX,
            },
        )?);
        let pages = chunks
            .checked_mul(chunk_pages)
            .ok_or(pfnstore_core::RangeError::Overflow {
                start,
                pages: u64::MAX,
            })?;
        let range = PfnRange::from_len(start, pages)?;
        range.check_aligned_to(chunk_pages)?;
        let count = usize::try_from(chunks)
            .map_err(|_| pfnstore_core::RangeError::Overflow { start, pages })?;
        self.chunks
            .try_reserve(count)
            .map_err(|_| HugetlbError::LargerThanMachine {
                bytes: pages.saturating_mul(PAGE_SIZE),
                mem_total: 0,
            })?;
        let page_size = stand_in_size(&self.geometry);
        let first = self.chunks.len();
        for i in 0..chunks {
            let index = held + i;
            self.chunks.push(Chunk {
                base: Pfn(self.base.0 + index * chunk_pages),
                pages: chunk_pages,
                page_size,
                pfn_kind: PfnKind::Synthetic {
                    reason: SyntheticReason::NoMemory,
                },
                memfd_offset: index * chunk_pages * PAGE_SIZE,
                host: None,
            });
        }
        self.report.bytes += pages * PAGE_SIZE;
        Ok(first..self.chunks.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sixteen_tib_of_1g_chunks() {
        let s = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 18), 16 << 10).unwrap();
        assert_eq!(s.chunks().len(), 16384);
        assert_eq!(s.report().bytes, 16 << 40);
        assert_eq!(s.span().len(), 16 << 28);
        let last = s.chunks().last().unwrap();
        assert_eq!(last.base, Pfn((1 << 18) + 16383 * (1 << 18)));
        assert_eq!(last.page_size, HugePageSize::Huge1G);
        assert!(matches!(
            last.pfn_kind,
            PfnKind::Synthetic {
                reason: SyntheticReason::NoMemory
            }
        ));
        assert_eq!(last.host, None);
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing() {
        let g = Geometry::new(3, 6).unwrap();
        assert!(matches!(
            SyntheticSource::new(g, Pfn(0), 0),
            Err(HugetlbError::ZeroSize)
        ));
        assert!(matches!(
            SyntheticSource::new(g, Pfn(65), 1),
            Err(HugetlbError::Range(pfnstore_core::RangeError::Unaligned {
                pfn: Pfn(65),
                ..
            }))
        ));
        let limit = pfnstore_core::PFN_LIMIT.0;
        assert!(matches!(
            SyntheticSource::new(g, Pfn(limit - 64), 2),
            Err(HugetlbError::Range(_))
        ));
        let mut s = SyntheticSource::new(g, Pfn(limit - 128), 1).unwrap();
        assert!(s.grow(2).is_err());
        assert!(s.grow(u64::MAX).is_err());
        assert_eq!(s.chunks().len(), 1);
        assert_eq!(s.grow(1).unwrap(), 1..2);
        assert_eq!(s.span().end(), pfnstore_core::PFN_LIMIT);
        assert_eq!(s.chunks()[0].page_size, HugePageSize::Base4K);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// `locate` agrees with a scan of the chunks, for PFNs inside, before and after.
        #[test]
        fn locate_agrees_with_a_scan(chunks in 1u64..40, grow in 0u64..5, probe in 0u64..(50 * 64)) {
            let g = Geometry::new(3, 6).unwrap();
            let mut s = SyntheticSource::new(g, Pfn(640), chunks).unwrap();
            if grow > 0 {
                s.grow(grow).unwrap();
            }
            let pfn = Pfn(probe);
            let expected = s.chunks().iter().enumerate().find_map(|(i, c)| {
                let off = pfn.checked_distance_from(c.base)?;
                (off < c.pages).then_some((i, off, c.memfd_offset + off * PAGE_SIZE))
            });
            let got = s.locate(pfn).map(|l| (l.chunk, l.page_offset, l.memfd_offset));
            prop_assert_eq!(got, expected);
        }
    }
}
