//! One shard's state and the operations on it. Everything here runs under the shard's lock;
//! every operation validates first and changes nothing when it fails.

use std::collections::{BTreeMap, BTreeSet};

use pfnstore_core::{Pfn, PfnRange};

use crate::extent_tree::ExtentTree;
use crate::placement::place;
use crate::records::Records;
use crate::shape::{Field, Shape, align_down};
use crate::stats::Usage;
use crate::{AllocError, DirtyRanges};

/// Why an operation on a shard failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A final answer.
    Rejected(AllocError),
    /// The first page of the range is not in this shard's chunks: try its owner.
    StartNotOwned,
    /// The range reaches `pfn`, which is not in this shard's chunks: the caller tells
    /// [`AllocError::CrossesShards`] from [`AllocError::NotManaged`].
    Outside(u64),
}

impl From<AllocError> for Fault {
    fn from(e: AllocError) -> Fault {
        Fault::Rejected(e)
    }
}

/// Builds a range from bounds that an operation derived from valid ranges.
fn pfn_range(start: u64, end: u64) -> PfnRange {
    PfnRange::new(Pfn(start), Pfn(end))
        .expect("start < end <= PFN_LIMIT: both lie in a managed chunk")
}

/// The pages of one shard: free runs (and the clean ones among them), allocation records and
/// quarantined runs, which together tile the shard's chunks exactly.
#[derive(Debug)]
pub(crate) struct ShardState {
    shape: Shape,
    /// First PFN of every chunk the shard owns.
    chunks: BTreeSet<u64>,
    /// Free runs, coalesced.
    free: ExtentTree,
    /// The free runs (or parts of them) that need no scrubbing. Always inside `free`.
    clean: ExtentTree,
    /// One record per allocation, split when a hole is punched: start -> end.
    allocated: Records,
    allocated_pages: u64,
    /// Quarantined runs, coalesced: start -> end.
    quarantined: BTreeMap<u64, u64>,
    quarantined_pages: u64,
}

impl ShardState {
    pub(crate) fn new(shape: Shape) -> ShardState {
        ShardState {
            shape,
            chunks: BTreeSet::new(),
            free: ExtentTree::new(shape),
            clean: ExtentTree::new(shape),
            allocated: Records::new(),
            allocated_pages: 0,
            quarantined: BTreeMap::new(),
            quarantined_pages: 0,
        }
    }

    fn owns(&self, pfn: u64) -> bool {
        self.chunks.contains(&align_down(pfn, self.shape.chunk))
    }

    fn record_containing(&self, pfn: u64) -> Option<(u64, u64)> {
        self.allocated
            .last_at_or_below(pfn)
            .filter(|&(_, e)| e > pfn)
    }

    /// Adds a chunk that the caller has reserved for this shard (so it overlaps nothing).
    pub(crate) fn add_chunk(&mut self, base: u64, dirty: bool) {
        let end = base + self.shape.chunk;
        debug_assert!(!self.owns(base) && self.free.containing(base).is_none());
        self.chunks.insert(base);
        self.free.insert(base, end);
        if !dirty {
            self.clean.insert(base, end);
        }
    }

    pub(crate) fn remove_chunk(&mut self, base: u64) -> Result<(), Fault> {
        if !self.owns(base) {
            return Err(Fault::StartNotOwned);
        }
        let end = base + self.shape.chunk;
        match self.free.containing(base) {
            Some((_, re)) if re >= end => {}
            run => {
                return Err(AllocError::ChunkInUse {
                    base: Pfn(base),
                    pfn: Pfn(run.map_or(base, |(_, re)| re)),
                }
                .into());
            }
        }
        self.free.remove(base, end);
        self.clean.subtract(base, end, |_, _| {});
        self.chunks.remove(&base);
        Ok(())
    }

    /// The start of a placement for the request, if the shard has room.
    pub(crate) fn place(&self, pages: u64, align: u64, clean_only: bool) -> Option<u64> {
        let tree = if clean_only { &self.clean } else { &self.free };
        place(tree, self.shape, pages, align)
    }

    /// Places and takes a request; returns the range and its dirty parts.
    #[cfg_attr(
        pfnstore_loom_mutation = "allocator_split_alloc",
        allow(dead_code, reason = "the mutation places and takes in two steps")
    )]
    pub(crate) fn alloc(
        &mut self,
        pages: u64,
        align: u64,
        clean_only: bool,
    ) -> Option<(PfnRange, DirtyRanges)> {
        let start = self.place(pages, align, clean_only)?;
        let dirty = self.carve(start, start + pages);
        Some((pfn_range(start, start + pages), dirty))
    }

    /// Takes `[start, end)`, which lies in one free run, and records it as one allocation.
    fn carve(&mut self, start: u64, end: u64) -> DirtyRanges {
        self.free.remove(start, end);
        self.record_allocation(start, end)
    }

    fn record_allocation(&mut self, start: u64, end: u64) -> DirtyRanges {
        self.allocated.insert(start, end);
        self.allocated_pages += end - start;
        if self.clean.totals().runs == 0 {
            // Nothing is clean (the usual state between scrubs): all of it is dirty.
            return pfn_range(start, end).into();
        }
        let mut dirty = DirtyRanges::new();
        let mut next = start;
        self.clean.subtract(start, end, |cs, ce| {
            if cs > next {
                dirty.push(pfn_range(next, cs));
            }
            next = ce;
        });
        if next < end {
            dirty.push(pfn_range(next, end));
        }
        dirty
    }

    /// The test-only mutation of the loom models: takes `[start, end)` without checking that
    /// it is still free, as a racy "place under one lock, take under another" would.
    #[cfg(pfnstore_loom_mutation = "allocator_split_alloc")]
    pub(crate) fn carve_unchecked(&mut self, start: u64, end: u64) -> (PfnRange, DirtyRanges) {
        self.free.subtract(start, end, |_, _| {});
        let dirty = self.record_allocation(start, end);
        (pfn_range(start, end), dirty)
    }

    /// Classifies the first page `pfn` of a range that is not free.
    fn not_free_fault(&self, pfn: u64, first: bool) -> Fault {
        if !self.owns(pfn) {
            return if first {
                Fault::StartNotOwned
            } else {
                Fault::Outside(pfn)
            };
        }
        AllocError::NotFree { pfn: Pfn(pfn) }.into()
    }

    /// Checks that `[start, end)` is free in one run; returns the fault at its first page that
    /// is not.
    fn check_free(&self, start: u64, end: u64) -> Result<(), Fault> {
        match self.free.containing(start) {
            Some((_, re)) if re >= end => Ok(()),
            Some((_, re)) => Err(self.not_free_fault(re, false)),
            None => Err(self.not_free_fault(start, true)),
        }
    }

    pub(crate) fn alloc_at(&mut self, range: PfnRange) -> Result<DirtyRanges, Fault> {
        let (start, end) = (range.start().0, range.end().0);
        self.check_free(start, end)?;
        Ok(self.carve(start, end))
    }

    pub(crate) fn mark_clean(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        self.check_free(start, end)?;
        self.clean.insert(start, end);
        Ok(())
    }

    /// Finds the allocation record that holds all of `[start, end)`.
    fn check_allocated(&self, start: u64, end: u64, freeing: bool) -> Result<(u64, u64), Fault> {
        let fault_at = |pfn: u64, first: bool| -> Fault {
            if !self.owns(pfn) {
                return if first {
                    Fault::StartNotOwned
                } else {
                    Fault::Outside(pfn)
                };
            }
            let pfn_ = Pfn(pfn);
            if self.free.containing(pfn).is_some() {
                if freeing {
                    AllocError::DoubleFree { pfn: pfn_ }.into()
                } else {
                    AllocError::NotAllocated { pfn: pfn_ }.into()
                }
            } else if self.record_containing(pfn).is_some() {
                AllocError::SpansAllocations { pfn: pfn_ }.into()
            } else {
                AllocError::Quarantined { pfn: pfn_ }.into()
            }
        };
        match self.record_containing(start) {
            Some((rs, re)) if re >= end => Ok((rs, re)),
            Some((_, re)) => Err(fault_at(re, false)),
            None => Err(fault_at(start, true)),
        }
    }

    /// Removes `[start, end)` from the record `[rs, re)`, keeping what is left of it.
    fn cut_record(&mut self, (rs, re): (u64, u64), start: u64, end: u64) {
        self.allocated.remove(rs);
        if rs < start {
            self.allocated.insert(rs, start);
        }
        if end < re {
            self.allocated.insert(end, re);
        }
        self.allocated_pages -= end - start;
    }

    pub(crate) fn free(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (start, end) = (range.start().0, range.end().0);
        // The common free starts where an allocation starts: take its record out with one
        // search instead of a lookup and a removal, and put it back untouched if the range
        // reaches past it (then the checks below name the fault).
        if let Some(record_end) = self.allocated.remove(start) {
            if record_end >= end {
                if end < record_end {
                    self.allocated.insert(end, record_end);
                }
                self.allocated_pages -= end - start;
                self.free.insert(start, end);
                return Ok(());
            }
            self.allocated.insert(start, record_end);
        }
        let record = self.check_allocated(start, end, true)?;
        self.cut_record(record, start, end);
        // Freed pages held a VM's data: they go back dirty, so `clean` is left alone.
        self.free.insert(start, end);
        Ok(())
    }

    pub(crate) fn quarantine(&mut self, range: PfnRange) -> Result<(), Fault> {
        let (mut start, mut end) = (range.start().0, range.end().0);
        let record = self.check_allocated(start, end, false)?;
        self.cut_record(record, start, end);
        self.quarantined_pages += end - start;
        if let Some((&ls, &le)) = self.quarantined.range(..start).next_back()
            && le == start
        {
            start = ls;
        }
        if let Some(re) = self.quarantined.remove(&end) {
            end = re;
        }
        self.quarantined.insert(start, end);
        Ok(())
    }

    pub(crate) fn usage(&self) -> Usage {
        let free = self.free.totals();
        let clean = self.clean.totals();
        Usage {
            chunks: self.chunks.len() as u64,
            total_pages: self.chunks.len() as u64 * self.shape.chunk,
            free_pages: free.pages,
            dirty_pages: free.pages - clean.pages,
            allocated_pages: self.allocated_pages,
            quarantined_pages: self.quarantined_pages,
            free_extents: free.runs,
            allocated_extents: self.allocated.len() as u64,
            quarantined_extents: self.quarantined.len() as u64,
            largest_free_extent: self.free.max(Field::Len),
            largest_free_mid_aligned: self.free.max(Field::Mid),
            largest_free_chunk_aligned: self.free.max(Field::Chunk),
            free_mid_blocks: free.whole_mids,
            free_chunks: free.whole_chunks,
        }
    }

    /// The first PFN of every chunk owned (for the allocator's cross-checks).
    pub(crate) fn chunk_bases(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().copied()
    }

    /// Verifies that free, allocated and quarantined runs tile the shard's chunks exactly,
    /// that clean runs lie in free ones, and every index and counter. O(runs + chunks).
    pub(crate) fn check(&self) -> Result<(), String> {
        self.free.check("free runs")?;
        self.clean.check("clean runs")?;
        for (s, e) in self.clean.runs() {
            if !matches!(self.free.containing(s), Some((_, fe)) if fe >= e) {
                return Err(format!("clean run {s:#x}..{e:#x} is not free"));
            }
        }
        // Merge the three kinds of runs in address order and walk them once.
        let mut all: Vec<(u64, u64, &str)> = self
            .free
            .runs()
            .into_iter()
            .map(|(s, e)| (s, e, "free"))
            .collect();
        let mut allocated_pages = 0;
        self.allocated.check()?;
        for (s, e) in self.allocated.entries() {
            allocated_pages += e - s;
            all.push((s, e, "allocated"));
        }
        let mut quarantined_pages = 0;
        for (&s, &e) in &self.quarantined {
            quarantined_pages += e - s;
            all.push((s, e, "quarantined"));
        }
        if allocated_pages != self.allocated_pages || quarantined_pages != self.quarantined_pages {
            return Err(format!(
                "counters say {} allocated and {} quarantined pages, records {allocated_pages} and {quarantined_pages}",
                self.allocated_pages, self.quarantined_pages
            ));
        }
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!(
                    "{} {:#x}..{:#x} overlaps {} {:#x}..{:#x}",
                    w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
                ));
            }
            if w[0].2 == "quarantined" && w[1].2 == "quarantined" && w[0].1 == w[1].0 {
                return Err(format!("quarantined runs at {:#x} not coalesced", w[1].0));
            }
        }
        for &(s, e, what) in &all {
            if s >= e {
                return Err(format!("empty {what} run at {s:#x}"));
            }
            let mut chunk = align_down(s, self.shape.chunk);
            while chunk < e {
                if !self.chunks.contains(&chunk) {
                    return Err(format!(
                        "{what} run {s:#x}..{e:#x} reaches chunk {chunk:#x} that the shard does not own"
                    ));
                }
                chunk += self.shape.chunk;
            }
        }
        let covered = self.free.totals().pages + allocated_pages + quarantined_pages;
        let total = self.chunks.len() as u64 * self.shape.chunk;
        if covered != total {
            return Err(format!(
                "free + allocated + quarantined = {covered} pages, chunks hold {total}"
            ));
        }
        Ok(())
    }
}
