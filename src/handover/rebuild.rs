//! The receiver's side: a store rebuilt from a snapshot's image over the received memory.

use std::collections::BTreeSet;

use pfnstore_hugetlb::MemorySource;
use pfnstore_metadata::FileId;

use super::snapshot::Image;
use super::{HandoverError, Received};
use crate::file::FileInner;
use crate::{GuestFile, Store, StoreError, StoreOptions};

impl Store {
    /// Rebuilds the store `image` describes over `source` (the received memory).
    pub(crate) fn rebuild(
        image: Image,
        source: Box<dyn MemorySource>,
        options: StoreOptions,
    ) -> Result<Received, HandoverError> {
        if source.geometry() != image.geometry {
            return Err(HandoverError::Mismatch(format!(
                "the snapshot's geometry is {:?}, the memory's {:?}",
                image.geometry,
                source.geometry()
            )));
        }
        // Every chunk starts free and dirty; what the image says is clean becomes clean.
        let store = Store::assemble(source, options, true, image.next_file)?;
        let result = fill(&store, &image);
        if result.is_err() {
            // Nothing is taken over: the half-rebuilt files must give nothing back when they go
            // (closing the gate for good does that), and dropping the source hands the pool
            // growth back to the sender.
            store.inner.gate().seal();
        }
        result.map(|files| Received { store, files })
    }
}

/// Rebuilds allocator, physical metadata and files of `image` in the freshly assembled
/// `store`; returns the files.
fn fill(store: &Store, image: &Image) -> Result<Vec<GuestFile>, HandoverError> {
    let inner = &store.inner;
    let internal = |e: &dyn std::fmt::Display| HandoverError::Mismatch(e.to_string());
    // Allocations: one per extent a file holds.
    for file in &image.files {
        for (offsets, pfn) in &file.extents {
            alloc_at(inner, *pfn, pfn.0 + offsets.len())?;
        }
    }
    let files: BTreeSet<FileId> = image.files.iter().map(|f| f.id).collect();
    for run in &image.physical {
        let physical = inner.physical();
        match run.owner {
            Some(owner) if files.contains(&owner) => {
                physical
                    .assign_owner(run.pfns, owner)
                    .map_err(|e| internal(&e))?;
            }
            Some(owner) => {
                return Err(HandoverError::Mismatch(format!(
                    "{} belongs to {owner}, which the snapshot does not have",
                    run.pfns
                )));
            }
            // Quarantined memory no file holds: out of use for good, as it was.
            None if run.quarantined.is_some() => {
                alloc_at(inner, run.pfns.start(), run.pfns.end().0)?;
            }
            None => {}
        }
        if let Some(reason) = run.quarantined {
            physical
                .quarantine(run.pfns, reason)
                .map_err(|e| internal(&e))?;
            per_chunk(inner, run.pfns, |pfns| inner.allocator().quarantine(pfns))?;
        }
        if run.dirty {
            physical
                .set_dirty(run.pfns, true)
                .map_err(|e| internal(&e))?;
        } else if run.owner.is_none() && run.quarantined.is_none() {
            per_chunk(inner, run.pfns, |pfns| inner.allocator().mark_clean(pfns))?;
        }
    }
    let mut handles = Vec::with_capacity(image.files.len());
    for file in &image.files {
        let rebuilt = FileInner::rebuild(store.clone(), file)?;
        inner.reopen_file(file.id, &rebuilt, file.pages * pfnstore_core::PAGE_SIZE);
        handles.push(GuestFile { inner: rebuilt });
    }
    let total = inner.allocator().stats().total;
    let got = (
        total.free_pages,
        total.allocated_pages,
        total.quarantined_pages,
        total.dirty_pages,
    );
    let want = (
        image.totals.free,
        image.totals.allocated,
        image.totals.quarantined,
        image.totals.dirty,
    );
    if got != want {
        return Err(HandoverError::Mismatch(format!(
            "allocator (free, allocated, quarantined, dirty) pages: {got:?} rebuilt, {want:?} sent"
        )));
    }
    store
        .check_invariants()
        .map_err(|e| HandoverError::Mismatch(e.to_string()))?;
    Ok(handles)
}

/// Takes frames `start..end` out of the free memory of the rebuilt allocator, one allocation
/// per chunk.
fn alloc_at(
    inner: &crate::store::StoreInner,
    start: pfnstore_core::Pfn,
    end: u64,
) -> Result<(), HandoverError> {
    let range =
        pfnstore_core::PfnRange::new(start, pfnstore_core::Pfn(end)).map_err(StoreError::from)?;
    per_chunk(inner, range, |pfns| {
        inner.allocator().alloc_at(pfns).map(drop)
    })
}

/// Runs an allocator operation on `range` one chunk at a time: the allocator refuses ranges
/// that cross into another shard, and chunks are dealt to shards one by one.
fn per_chunk<E: std::fmt::Display>(
    inner: &crate::store::StoreInner,
    range: pfnstore_core::PfnRange,
    mut op: impl FnMut(pfnstore_core::PfnRange) -> Result<(), E>,
) -> Result<(), HandoverError> {
    let mut at = range.start();
    while at < range.end() {
        let stop = inner.memory().chunk_end(at)?.min(range.end());
        let pfns = pfnstore_core::PfnRange::new(at, stop).map_err(StoreError::from)?;
        op(pfns).map_err(|e| HandoverError::Mismatch(e.to_string()))?;
        at = stop;
    }
    Ok(())
}
