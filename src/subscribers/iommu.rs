//! An iommufd-like DMA mapper.

use std::collections::BTreeMap;

use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, Pfn, PfnRange};

use super::{Callback, FaultPlan, Faults};
use crate::metadata::conversion::{
    ConversionPlan, ConversionRequest, Invalidation, PlanEntry, Subscriber, UnmapError, Veto,
};
use crate::{FileId, GuestMemory, Shareability, StoreError};

/// Maps the shared blocks of the files it hears about, one IOMMU mapping per block, as VFIO
/// maps guest memory for a device. See the [module docs](super).
#[derive(Debug)]
pub struct IommuMapper {
    name: String,
    geometry: Geometry,
    state: Mutex<State>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    /// (file, first page) -> pages of the mapping.
    mappings: BTreeMap<(FileId, u64), u64>,
    map_calls: u64,
    unmap_calls: u64,
    violations: Vec<String>,
}

impl IommuMapper {
    /// A mapper for a store of `geometry`.
    pub fn new(name: impl Into<String>, geometry: Geometry) -> IommuMapper {
        IommuMapper {
            name: name.into(),
            geometry,
            state: Mutex::new(State::default()),
            faults: Faults::default(),
        }
    }

    /// Maps every shared block of `file` as it is now (what a VMM does when it attaches a
    /// device); the plans keep the mappings up to date from then on.
    pub fn map_file(&self, file: &GuestMemory) -> Result<(), StoreError> {
        let plan = file.block_plan(0, file.size())?;
        let mut state = self.state.lock();
        for (run, attributes) in plan {
            let entry = PlanEntry { run, attributes };
            self.map_entry(&mut state, file.id(), &entry);
        }
        Ok(())
    }

    /// Current number of IOMMU mappings.
    pub fn mappings(&self) -> usize {
        self.state.lock().mappings.len()
    }

    /// Map and unmap calls made so far.
    pub fn calls(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.map_calls, state.unmap_calls)
    }

    /// Rule violations seen (empty if every plan was exact).
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().violations.clone()
    }

    /// The mapping that covers `page` of `file`, if any, as a page range.
    pub fn mapping_at(&self, file: FileId, page: Pfn) -> Option<PfnRange> {
        let state = self.state.lock();
        let (&(f, start), &pages) = state.mappings.range(..=(file, page.0)).next_back()?;
        let range = PfnRange::from_len(Pfn(start), pages).ok()?;
        (f == file && range.contains(page)).then_some(range)
    }

    /// Injects misbehaviour.
    pub fn inject(&self, faults: FaultPlan) {
        self.faults.set(faults);
    }

    fn map_entry(&self, state: &mut State, file: FileId, entry: &PlanEntry) {
        if entry.attributes.shareability != Shareability::Shared || entry.attributes.quarantined {
            return;
        }
        for block in entry.run.blocks(&self.geometry) {
            let range = block.range(&self.geometry);
            if let Some(existing) = overlapping(state, file, range).first() {
                state.violations.push(format!(
                    "map of {range} over the existing mapping {existing} of {file}"
                ));
                continue;
            }
            state.mappings.insert((file, range.start().0), range.len());
            state.map_calls += 1;
        }
    }

    /// Unmaps the mappings inside `entry`'s blocks. iommufd refuses an unmap that cuts a
    /// mapping: that is a violation of the plan (it must name whole earlier mappings).
    fn unmap_entry(
        &self,
        state: &mut State,
        file: FileId,
        entry: &PlanEntry,
    ) -> Result<(), UnmapError> {
        for block in entry.run.blocks(&self.geometry) {
            let range = block.range(&self.geometry);
            let hit = overlapping(state, file, range);
            if hit.is_empty() {
                continue;
            }
            self.faults.check_unmap(range)?;
            for mapping in hit {
                if !range.contains_range(&mapping) {
                    state.violations.push(format!(
                        "unmap of {range} cuts the mapping {mapping} of {file} (iommufd would refuse)"
                    ));
                    continue;
                }
                state.mappings.remove(&(file, mapping.start().0));
                state.unmap_calls += 1;
            }
        }
        Ok(())
    }
}

fn overlapping(state: &State, file: FileId, range: PfnRange) -> Vec<PfnRange> {
    let mut out = Vec::new();
    if let Some((&(f, start), &pages)) =
        state.mappings.range(..=(file, range.start().0)).next_back()
        && f == file
        && let Ok(m) = PfnRange::from_len(Pfn(start), pages)
        && m.overlaps(&range)
    {
        out.push(m);
    }
    for (&(_, start), &pages) in state
        .mappings
        .range((file, range.start().0 + 1)..(file, range.end().0))
    {
        if let Ok(m) = PfnRange::from_len(Pfn(start), pages) {
            out.push(m);
        }
    }
    out
}

impl Subscriber for IommuMapper {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, _request: &ConversionRequest) -> Result<(), Veto> {
        self.faults.on_prepare()
    }

    fn commit(&self, request: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError> {
        self.faults.on_unmap_callback(Callback::Commit);
        let mut state = self.state.lock();
        let mut failed: Vec<UnmapError> = Vec::new();
        for entry in plan.unmap() {
            if let Err(e) = self.unmap_entry(&mut state, request.file, entry) {
                failed.push(e);
            }
        }
        for entry in plan.map() {
            // Blocks whose old mapping is stuck stay as they are (the store quarantines them).
            let stuck = failed
                .iter()
                .any(|f| f.range.overlaps(&entry.run.range(&self.geometry)));
            if !stuck {
                self.map_entry(&mut state, request.file, entry);
            }
        }
        match failed.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    fn invalidate(&self, invalidation: &Invalidation) -> Result<(), UnmapError> {
        self.faults.on_unmap_callback(Callback::Invalidate);
        let mut state = self.state.lock();
        let mut failure = Ok(());
        for entry in invalidation.plan.unmap() {
            if let Err(e) = self.unmap_entry(&mut state, invalidation.file, entry) {
                failure = failure.and(Err(e));
            }
        }
        failure
    }
}
