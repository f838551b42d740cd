//! A file's part of a handover ([`crate::handover`]): its image, and its rebuild in the
//! receiving process.

use std::ops::ControlFlow;
use std::sync::Arc;

use pfnstore_core::sync::RwLock;
use pfnstore_core::sync::atomic::AtomicBool;
use pfnstore_core::{OffsetRange, PAGE_SIZE, PageOffset, Pfn, PfnRange};
use pfnstore_metadata::conversion::{ConversionDomain, DomainLimits};
use pfnstore_metadata::{MetadataStore, Shareability};

use super::FileInner;
use super::extents::{Extent, Extents};
use super::mapping::{Direction, HostMapping};
use crate::StoreError;
use crate::gate::Ops;
use crate::handover::{FileImage, FileRuns, HandoverError};
use crate::store::Store;

impl FileInner {
    /// The file's image; the store's gate is closed (nothing changes meanwhile).
    pub(crate) fn image(&self) -> Result<FileImage, HandoverError> {
        let mut runs = FileRuns::default();
        if let Some(all) = self.all_pages() {
            self.domain
                .store()
                .visit_runs(all.cast(), |run, a| {
                    runs.push(
                        run.end().0,
                        a.shareability == Shareability::Shared,
                        a.owner == Some(self.id),
                        a.quarantined,
                        a.pins.iter(),
                    );
                    ControlFlow::Continue(())
                })
                .map_err(|e| HandoverError::Mismatch(e.to_string()))?;
        }
        let mut extents: Vec<(OffsetRange, Pfn)> = Vec::new();
        for e in self.extents.read().all() {
            match extents.last_mut() {
                // Contiguous in offsets and frames: one record (a synthetic store's chunks
                // are PFN-adjacent; the receiver splits at chunk boundaries again).
                Some((offsets, pfn))
                    if offsets.end() == e.offsets.start() && pfn.0 + offsets.len() == e.pfn.0 =>
                {
                    *offsets = offsets.hull(&e.offsets);
                }
                _ => extents.push((e.offsets, e.pfn)),
            }
        }
        Ok(FileImage {
            id: self.id,
            pages: self.size_pages,
            runs,
            extents,
        })
    }

    /// Rebuilds the file `image` describes in `store` (whose allocator and physical metadata
    /// already hold its memory).
    pub(crate) fn rebuild(
        store: Store,
        image: &FileImage,
    ) -> Result<Arc<FileInner>, HandoverError> {
        let inner_store = &store.inner;
        let geometry = inner_store.geometry();
        let memory = inner_store.memory();
        let chunk = geometry.chunk_pages();
        let size_pages = image.pages;
        let span = PfnRange::from_len(Pfn(0), size_pages.div_ceil(chunk) * chunk)
            .map_err(StoreError::from)?;
        let mismatch =
            |e: &dyn std::fmt::Display| HandoverError::Mismatch(format!("{}: {e}", image.id));
        let offsets = MetadataStore::new(geometry, span).map_err(|e| mismatch(&e))?;
        for base in (0..span.end().0).step_by(chunk as usize) {
            offsets
                .add_chunk(Pfn(base), Shareability::Private)
                .map_err(|e| mismatch(&e))?;
        }
        // Shareability first (it is refused over pinned or quarantined pages), in one pass per
        // chunk: a fragmented file has millions of runs.
        let shared: Vec<PfnRange> = image
            .runs
            .iter()
            .filter(|run| run.shared)
            .map(|run| run.pages.cast::<Pfn>())
            .collect();
        offsets
            .set_shareability_of(&shared, Shareability::Shared)
            .map_err(|e| mismatch(&e))?;
        // Ownership over the longest runs (the runs split wherever shareability changes).
        let mut backed: Option<PfnRange> = None;
        for run in image.runs.iter().filter(|run| run.backed) {
            let keys = run.pages.cast::<Pfn>();
            backed = match backed {
                Some(open) if open.end() == keys.start() => Some(open.hull(&keys)),
                Some(open) => {
                    offsets
                        .assign_owner(open, image.id)
                        .map_err(|e| mismatch(&e))?;
                    Some(keys)
                }
                None => Some(keys),
            };
        }
        if let Some(open) = backed {
            offsets
                .assign_owner(open, image.id)
                .map_err(|e| mismatch(&e))?;
        }
        for run in image.runs.iter() {
            let keys = run.pages.cast::<Pfn>();
            for (_, owner, count) in run.pins {
                offsets
                    .pin_by(keys, *owner, *count)
                    .map_err(|e| mismatch(&e))?;
            }
            if let Some(reason) = run.quarantined {
                offsets.quarantine(keys, reason).map_err(|e| mismatch(&e))?;
            }
        }
        let domain = ConversionDomain::with_limits(
            image.id,
            pfnstore_core::sync::Arc::new(offsets),
            Arc::clone(inner_store.registry()),
            DomainLimits {
                pages: size_pages,
                max_block: memory.max_block(),
            },
        );
        let mapping = if memory.has_bytes() {
            Some(HostMapping::new(size_pages, memory.granule(), &geometry)?)
        } else {
            None
        };
        let mut extents = Extents::default();
        for (offsets, pfn) in &image.extents {
            // One extent per chunk, as the file keeps them (a chunk is contiguous in the
            // memfd, two PFN-adjacent chunks are not).
            let (mut at, mut pfn) = (offsets.start(), *pfn);
            while at < offsets.end() {
                let end = memory
                    .chunk_end(pfn)?
                    .0
                    .min(pfn.0 + (offsets.end().0 - at.0));
                let len = end - pfn.0;
                let extent = Extent {
                    offsets: OffsetRange::from_len(at, len).map_err(StoreError::from)?,
                    pfn,
                };
                if let (Some(mapping), Some(memfd)) = (&mapping, memory.memfd()) {
                    mapping
                        .map(&extent, memfd.fd(), memory.memfd_offset(pfn)?)
                        .map_err(StoreError::from)?;
                }
                extents.insert(extent);
                at = PageOffset(at.0 + len);
                pfn = Pfn(end);
            }
        }
        let file = Arc::new(FileInner {
            id: image.id,
            store,
            size_pages,
            domain,
            extents: RwLock::new(extents),
            mapping,
            destroyed: AtomicBool::new(false),
            ops: Ops::default(),
        });
        if let Some(all) = file.all_pages() {
            // Nobody else has the file yet: the protection rule can be applied without a lock.
            file.refresh(all, None, Direction::Both)?;
        }
        let _ = PAGE_SIZE;
        Ok(file)
    }
}
