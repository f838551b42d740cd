//! The reference model: a naive array of [`Attributes`], one per 4K page, with the same API,
//! the same validation order and the same errors as [`crate::MetadataStore`].
//!
//! Hidden from the docs and outside the semver promise: this module exists for the
//! workspace's own tests and benches (see "Test support" in ARCHITECTURE.md).
//!
//! It exists to be obviously right, not fast: every query and mutation walks pages. The
//! property tests run random operation sequences against both and compare every result; other
//! crates' tests may use it as an oracle, and the benches as the "struct page" design (a record
//! per page). Mutations take `&mut self`; wrap it in a lock to share it.

use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};

use crate::layout::{BlockLayout, RunCollector};
use crate::{
    Attributes, FileId, MAX_CHUNKS, MappingChange, MetadataError, PinOwner, PinSet,
    QuarantineReason, Shareability, Stats, Transition,
};

/// A per-page attribute array over a span (see the module docs).
#[derive(Debug, Clone)]
pub struct ReferenceStore {
    geometry: Geometry,
    span: PfnRange,
    pages: Vec<Option<Attributes>>,
}

impl ReferenceStore {
    /// A model of `span` (chunk-aligned) with no chunk managed. Allocates a record per page of
    /// the span, so keep spans small.
    pub fn new(geometry: Geometry, span: PfnRange) -> Result<ReferenceStore, MetadataError> {
        span.check_aligned_to(geometry.chunk_pages())?;
        let chunks = span.len() / geometry.chunk_pages();
        if chunks > MAX_CHUNKS {
            return Err(MetadataError::SpanTooLarge {
                chunks,
                max: MAX_CHUNKS,
            });
        }
        Ok(ReferenceStore {
            geometry,
            span,
            pages: vec![None; span.len() as usize],
        })
    }

    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn index(&self, pfn: Pfn) -> usize {
        (pfn.0 - self.span.start().0) as usize
    }

    fn page(&self, pfn: Pfn) -> &Option<Attributes> {
        &self.pages[self.index(pfn)]
    }

    fn check_chunk(&self, base: Pfn) -> Result<PfnRange, MetadataError> {
        let chunk = PfnRange::from_len(base, self.geometry.chunk_pages())?;
        chunk.check_aligned_to(self.geometry.chunk_pages())?;
        chunk.check_within(&self.span)?;
        Ok(chunk)
    }

    /// See [`crate::MetadataStore::add_chunk`].
    pub fn add_chunk(&mut self, base: Pfn, initial: Shareability) -> Result<(), MetadataError> {
        let chunk = self.check_chunk(base)?;
        if self.page(base).is_some() {
            return Err(MetadataError::AlreadyManaged { base });
        }
        let fresh = Attributes {
            shareability: initial,
            owner: None,
            quarantined: None,
            dirty: false,
            pins: PinSet::EMPTY,
        };
        for pfn in chunk.pfns() {
            let i = self.index(pfn);
            self.pages[i] = Some(fresh.clone());
        }
        Ok(())
    }

    /// See [`crate::MetadataStore::remove_chunk`].
    pub fn remove_chunk(&mut self, base: Pfn) -> Result<(), MetadataError> {
        let chunk = self.check_chunk(base)?;
        if self.page(base).is_none() {
            return Err(MetadataError::NotManaged { pfn: base });
        }
        for pfn in chunk.pfns() {
            let a = self.page(pfn).as_ref().expect("chunks are managed whole");
            if let Some(owner) = a.owner {
                return Err(MetadataError::AlreadyOwned {
                    first_pfn: pfn,
                    owner,
                });
            }
            if let Some(owner) = a.pins.first_owner() {
                return Err(MetadataError::Pinned {
                    first_pfn: pfn,
                    owner,
                });
            }
            if a.quarantined.is_some() {
                return Err(MetadataError::Quarantined { first_pfn: pfn });
            }
        }
        for pfn in chunk.pfns() {
            let i = self.index(pfn);
            self.pages[i] = None;
        }
        Ok(())
    }

    /// See [`crate::MetadataStore::attributes`].
    pub fn attributes(&self, pfn: Pfn) -> Result<Attributes, MetadataError> {
        PfnRange::page(pfn)?.check_within(&self.span)?;
        self.page(pfn)
            .clone()
            .ok_or(MetadataError::NotManaged { pfn })
    }

    fn managed(&self, range: PfnRange) -> Result<(), MetadataError> {
        range.check_within(&self.span)?;
        match range.pfns().find(|&p| self.page(p).is_none()) {
            Some(pfn) => Err(MetadataError::NotManaged { pfn }),
            None => Ok(()),
        }
    }

    fn uniform(&self, block: PfnRange) -> bool {
        let first = self.page(block.start()).as_ref().map(Attributes::mapping);
        block
            .pfns()
            .all(|p| self.page(p).as_ref().map(Attributes::mapping) == first)
    }

    /// The 1G and then the 2M blocks that hold a page of `range`.
    fn blocks_of(&self, range: PfnRange) -> Vec<(PageSize, PfnRange)> {
        [PageSize::Size1G, PageSize::Size2M]
            .into_iter()
            .flat_map(|size| {
                let step = self.geometry.pages(size);
                let first = range.start().align_down(step).0;
                (first..range.end().0)
                    .step_by(step as usize)
                    .map(move |start| (size, Pfn(start)))
            })
            .map(|(size, start)| (size, self.block(start, size)))
            .collect()
    }

    fn block(&self, pfn: Pfn, size: PageSize) -> PfnRange {
        let start = pfn.align_down(self.geometry.pages(size));
        PfnRange::from_len(start, self.geometry.pages(size)).expect("blocks of the span are valid")
    }

    /// See [`crate::MetadataStore::max_mapping_size`].
    pub fn max_mapping_size(&self, pfn: Pfn) -> Result<PageSize, MetadataError> {
        self.attributes(pfn)?;
        for size in [PageSize::Size1G, PageSize::Size2M] {
            if self.uniform(self.block(pfn, size)) {
                return Ok(size);
            }
        }
        Ok(PageSize::Size4K)
    }

    /// See [`crate::MetadataStore::ranges`].
    pub fn ranges(&self, range: PfnRange) -> Result<Vec<(PfnRange, Attributes)>, MetadataError> {
        self.managed(range)?;
        let mut out: Vec<(PfnRange, Attributes)> = Vec::new();
        for pfn in range.pfns() {
            let a = self.page(pfn).clone().expect("checked managed");
            let end = Pfn(pfn.0 + 1);
            match out.last_mut() {
                Some((r, last)) if *last == a => *r = PfnRange::new(r.start(), end)?,
                _ => out.push((PfnRange::new(pfn, end)?, a)),
            }
        }
        Ok(out)
    }

    /// See [`crate::MetadataStore::block_layout`].
    pub fn block_layout(&self, range: PfnRange) -> Result<BlockLayout, MetadataError> {
        self.managed(range)?;
        let mut runs = RunCollector::default();
        for pfn in range.pfns() {
            let a = self.page(pfn).as_ref().expect("checked managed").mapping();
            runs.push(pfn, Pfn(pfn.0 + 1), a);
        }
        Ok(BlockLayout::from_runs(self.geometry, runs.finish()))
    }

    /// See [`crate::MetadataStore::owner_of`].
    pub fn owner_of(&self, range: PfnRange) -> Result<Option<FileId>, MetadataError> {
        self.managed(range)?;
        let first = self.page(range.start()).as_ref().expect("managed").owner;
        for pfn in range.pfns() {
            let found = self.page(pfn).as_ref().expect("managed").owner;
            if found != first {
                return Err(MetadataError::SpansFiles {
                    first_pfn: pfn,
                    first,
                    found,
                });
            }
        }
        Ok(first)
    }

    /// The shared frame of every mutation: bounds, managed, per-page checks in ascending order,
    /// then the change, with the uniformity of every chunk and middle block of the range
    /// compared before and after.
    fn mutate(
        &mut self,
        range: PfnRange,
        check: impl Fn(Pfn, &Attributes) -> Result<(), MetadataError>,
        apply: impl Fn(&mut Attributes),
    ) -> Result<MappingChange, MetadataError> {
        self.managed(range)?;
        for pfn in range.pfns() {
            check(pfn, self.page(pfn).as_ref().expect("checked managed"))?;
        }
        let blocks = self.blocks_of(range);
        let before: Vec<bool> = blocks.iter().map(|(_, b)| self.uniform(*b)).collect();
        for pfn in range.pfns() {
            let i = self.index(pfn);
            apply(self.pages[i].as_mut().expect("checked managed"));
        }
        let mut change = MappingChange::new(self.geometry);
        for ((size, block), was) in blocks.iter().zip(before) {
            match (was, self.uniform(*block)) {
                (true, false) => change.record(Transition::Split, *size, block.start()),
                (false, true) => change.record(Transition::Merge, *size, block.start()),
                _ => {}
            }
        }
        Ok(change)
    }

    /// See [`crate::MetadataStore::set_shareability`].
    pub fn set_shareability(
        &mut self,
        range: PfnRange,
        to: Shareability,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |first_pfn, a| {
                if let Some(owner) = a.pins.first_owner() {
                    return Err(MetadataError::Pinned { first_pfn, owner });
                }
                if a.quarantined.is_some() {
                    return Err(MetadataError::Quarantined { first_pfn });
                }
                Ok(())
            },
            |a| a.shareability = to,
        )
    }

    /// See [`crate::MetadataStore::set_shareability_of`].
    pub fn set_shareability_of(
        &mut self,
        ranges: &[PfnRange],
        to: Shareability,
    ) -> Result<MappingChange, MetadataError> {
        for range in ranges {
            range.check_within(&self.span)?;
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.start());
        for range in &sorted {
            self.managed(*range)?;
        }
        let mut pages: Vec<Pfn> = sorted.iter().flat_map(|r| r.pfns()).collect();
        pages.sort();
        pages.dedup();
        for &pfn in &pages {
            let a = self.page(pfn).as_ref().expect("checked managed");
            if let Some(owner) = a.pins.first_owner() {
                return Err(MetadataError::Pinned {
                    first_pfn: pfn,
                    owner,
                });
            }
            if a.quarantined.is_some() {
                return Err(MetadataError::Quarantined { first_pfn: pfn });
            }
        }
        let mut change = MappingChange::new(self.geometry);
        let (Some(first), Some(last)) = (pages.first(), pages.last()) else {
            return Ok(change);
        };
        let hull = PfnRange::new(*first, Pfn(last.0 + 1))?;
        let blocks = self.blocks_of(hull);
        let before: Vec<bool> = blocks.iter().map(|(_, b)| self.uniform(*b)).collect();
        for pfn in pages {
            let i = self.index(pfn);
            self.pages[i]
                .as_mut()
                .expect("checked managed")
                .shareability = to;
        }
        for ((size, block), was) in blocks.iter().zip(before) {
            match (was, self.uniform(*block)) {
                (true, false) => change.record(Transition::Split, *size, block.start()),
                (false, true) => change.record(Transition::Merge, *size, block.start()),
                _ => {}
            }
        }
        Ok(change)
    }

    /// See [`crate::MetadataStore::pin`].
    pub fn pin(
        &mut self,
        range: PfnRange,
        owner: PinOwner,
    ) -> Result<MappingChange, MetadataError> {
        self.pin_by(range, owner, 1)
    }

    /// See [`crate::MetadataStore::pin_by`].
    pub fn pin_by(
        &mut self,
        range: PfnRange,
        owner: PinOwner,
        times: u32,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |first_pfn, a| {
                if a.pins.count(owner).checked_add(times).is_none() {
                    return Err(MetadataError::PinOverflow { first_pfn, owner });
                }
                Ok(())
            },
            |a| a.pins = a.pins.with_added(owner, times).expect("checked"),
        )
    }

    /// See [`crate::MetadataStore::unpin`].
    pub fn unpin(
        &mut self,
        range: PfnRange,
        owner: PinOwner,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |first_pfn, a| {
                if a.pins.count(owner) == 0 {
                    return Err(MetadataError::NotPinned { first_pfn, owner });
                }
                Ok(())
            },
            |a| a.pins = a.pins.with_removed(owner).expect("checked"),
        )
    }

    /// See [`crate::MetadataStore::quarantine`].
    pub fn quarantine(
        &mut self,
        range: PfnRange,
        reason: QuarantineReason,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |_, _| Ok(()),
            |a| a.quarantined = a.quarantined.or(Some(reason)),
        )
    }

    /// See [`crate::MetadataStore::set_dirty`].
    pub fn set_dirty(
        &mut self,
        range: PfnRange,
        dirty: bool,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(range, |_, _| Ok(()), |a| a.dirty = dirty)
    }

    /// See [`crate::MetadataStore::assign_owner`].
    pub fn assign_owner(
        &mut self,
        range: PfnRange,
        file: FileId,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |first_pfn, a| {
                if let Some(owner) = a.owner {
                    return Err(MetadataError::AlreadyOwned { first_pfn, owner });
                }
                if a.quarantined.is_some() {
                    return Err(MetadataError::Quarantined { first_pfn });
                }
                Ok(())
            },
            |a| a.owner = Some(file),
        )
    }

    /// See [`crate::MetadataStore::release_owner`].
    pub fn release_owner(
        &mut self,
        range: PfnRange,
        file: FileId,
    ) -> Result<MappingChange, MetadataError> {
        self.mutate(
            range,
            |first_pfn, a| {
                if a.owner != Some(file) {
                    return Err(MetadataError::NotOwner {
                        first_pfn,
                        expected: file,
                        found: a.owner,
                    });
                }
                if let Some(owner) = a.pins.first_owner() {
                    return Err(MetadataError::Pinned { first_pfn, owner });
                }
                Ok(())
            },
            |a| a.owner = None,
        )
    }

    /// The page counts of [`Stats`] (the node and byte fields describe the array: one node and
    /// `size_of::<Option<Attributes>>()` bytes per page, pins' heap not counted).
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            managed_chunks: 0,
            nodes: self.pages.len() as u64,
            table_bytes: std::mem::size_of_val::<[Option<Attributes>]>(&self.pages) as u64,
            ..Stats::default()
        };
        s.bytes = s.table_bytes;
        for (i, page) in self.pages.iter().enumerate() {
            let Some(a) = page else { continue };
            if (i as u64).is_multiple_of(self.geometry.chunk_pages()) {
                s.managed_chunks += 1;
            }
            match a.shareability {
                Shareability::Shared => s.shared_pages += 1,
                Shareability::Private => s.private_pages += 1,
            }
            s.pinned_pages += u64::from(!a.pins.is_empty());
            s.quarantined_pages += u64::from(a.quarantined.is_some());
            s.dirty_pages += u64::from(a.dirty);
            s.owned_pages += u64::from(a.owner.is_some());
        }
        s
    }
}
