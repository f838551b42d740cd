//! The sender's side: the snapshot's image of a store at rest.

use std::ops::ControlFlow;

use pfnstore_core::PfnRange;

use super::HandoverError;
use super::snapshot::{Image, PhysicalRun, Totals};
use crate::store::StoreInner;

impl StoreInner {
    /// The image of the store; the caller closed the gate (nothing changes meanwhile).
    pub(crate) fn image(&self) -> Result<Image, HandoverError> {
        let memory = self.memory();
        let source = memory.source();
        let total = self.allocator().stats().total;
        let totals = Totals {
            free: total.free_pages,
            allocated: total.allocated_pages,
            quarantined: total.quarantined_pages,
            dirty: total.dirty_pages,
        };
        let mut physical: Vec<PhysicalRun> = Vec::new();
        let mut chunks: Vec<_> = source.chunks().iter().map(|c| (c.base, c.pages)).collect();
        chunks.sort_unstable();
        for (base, pages) in chunks {
            let range = PfnRange::from_len(base, pages).map_err(crate::StoreError::from)?;
            self.physical()
                .visit_runs(range, |run, a| {
                    let next = PhysicalRun {
                        pfns: run,
                        owner: a.owner,
                        quarantined: a.quarantined,
                        dirty: a.dirty,
                    };
                    match physical.last_mut() {
                        Some(last)
                            if last.pfns.end() == run.start()
                                && (last.owner, last.quarantined, last.dirty)
                                    == (next.owner, next.quarantined, next.dirty) =>
                        {
                            last.pfns = last.pfns.hull(&run);
                        }
                        _ => physical.push(next),
                    }
                    ControlFlow::Continue(())
                })
                .map_err(|e| HandoverError::Mismatch(e.to_string()))?;
        }
        let files = self
            .open_files()
            .iter()
            .filter(|f| !f.is_destroyed())
            .map(|f| f.image())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            geometry: self.geometry(),
            next_file: self.next_file_id(),
            source: source.handover_record().ok_or(HandoverError::Unsupported)?,
            totals,
            physical,
            files,
        })
    }
}
