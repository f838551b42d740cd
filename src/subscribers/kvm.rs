//! A KVM-like MMU.

use std::collections::BTreeMap;
use std::sync::Weak;

use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};

use super::{Callback, FaultPlan, Faults};
use crate::metadata::conversion::{
    ConversionPlan, ConversionRequest, Invalidation, PlanEntry, Subscriber, UnmapError, Veto,
};
use crate::store::{Store, StoreInner};
use crate::{FileId, Shareability, StoreError};

/// Keeps a private and a shared table of huge and small mappings, like KVM's private and
/// shared EPT/NPT, filled from the plans it is given (as if the guest touched everything) and
/// from [`KvmMmu::fault`]. Every mapping is checked against the store when it is made: its
/// attributes must be uniform and match the table. See the [module docs](super).
#[derive(Debug)]
pub struct KvmMmu {
    name: String,
    geometry: Geometry,
    store: Weak<StoreInner>,
    state: Mutex<State>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct State {
    /// (file, first page) -> (pages, table).
    mappings: BTreeMap<(FileId, u64), (u64, Shareability)>,
    violations: Vec<String>,
    huge: u64,
    small: u64,
    /// Bumped when a conversion starts (prepare) and ends (commit, abort) and by every
    /// invalidation, like KVM's `mmu_invalidate_seq`: a fault that raced with one retries
    /// instead of installing a stale translation.
    invalidate_seq: u64,
    /// Conversions between prepare and commit/abort, like `mmu_invalidate_in_progress`:
    /// faults wait them out.
    in_progress: u64,
}

impl KvmMmu {
    /// An MMU for the files of `store`. It holds the store weakly.
    pub fn new(name: impl Into<String>, store: &Store) -> KvmMmu {
        KvmMmu {
            name: name.into(),
            geometry: store.geometry(),
            store: std::sync::Arc::downgrade(&store.inner),
            state: Mutex::new(State::default()),
            faults: Faults::default(),
        }
    }

    /// Handles a guest fault the way KVM does: asks the file for the PFN and the largest
    /// mappable block, and maps that block in the table of the access's kind.
    ///
    /// Like KVM, it samples the invalidation sequence before asking the store and installs
    /// the mapping only if no commit or invalidation ran in between; otherwise it retries.
    pub fn fault(
        &self,
        file: FileId,
        offset: u64,
        access: Shareability,
    ) -> Result<(PageSize, Pfn), StoreError> {
        let store = self.store()?;
        let file_handle = store
            .file(file)
            .ok_or(StoreError::Internal(format!("{file} is closed")))?;
        let page = offset / pfnstore_core::PAGE_SIZE;
        loop {
            let seq = {
                let state = self.state.lock();
                if state.in_progress > 0 {
                    drop(state);
                    std::thread::yield_now();
                    continue;
                }
                state.invalidate_seq
            };
            let fault = file_handle.fault(offset, access)?;
            let block = self
                .geometry
                .block_containing(Pfn(page), fault.size)
                .ok_or(StoreError::Internal("fault beyond the PFN space".into()))?
                .range(&self.geometry);
            let mut state = self.state.lock();
            if state.invalidate_seq != seq || state.in_progress > 0 {
                continue;
            }
            remove_overlapping(&mut state, file, block);
            self.map_checked(&mut state, &store, file, block, access);
            return Ok((fault.size, fault.pfn));
        }
    }

    /// Number of mappings: (huge ones made, small ones made, present now).
    pub fn counts(&self) -> (u64, u64, usize) {
        let state = self.state.lock();
        (state.huge, state.small, state.mappings.len())
    }

    /// The mapping that covers `page` of `file`: its pages and its table.
    pub fn mapping_at(&self, file: FileId, page: Pfn) -> Option<(PfnRange, Shareability)> {
        let state = self.state.lock();
        let (&(f, start), &(pages, table)) = state.mappings.range(..=(file, page.0)).next_back()?;
        let range = PfnRange::from_len(Pfn(start), pages).ok()?;
        (f == file && range.contains(page)).then_some((range, table))
    }

    /// Rule violations seen.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().violations.clone()
    }

    /// Re-checks every mapping held against the store's current attributes.
    pub fn audit(&self) -> Vec<String> {
        let Ok(store) = self.store() else {
            return vec!["the store is gone".into()];
        };
        let state = self.state.lock();
        let mut problems = Vec::new();
        for (&(file, start), &(pages, table)) in &state.mappings {
            if let Ok(block) = PfnRange::from_len(Pfn(start), pages)
                && let Some(problem) = check_block(&store, file, block, table)
            {
                problems.push(problem);
            }
        }
        problems
    }

    /// Injects misbehaviour.
    pub fn inject(&self, faults: FaultPlan) {
        self.faults.set(faults);
    }

    fn store(&self) -> Result<Store, StoreError> {
        self.store
            .upgrade()
            .map(|inner| Store { inner })
            .ok_or(StoreError::Internal("the store is gone".into()))
    }

    fn map_checked(
        &self,
        state: &mut State,
        store: &Store,
        file: FileId,
        block: PfnRange,
        table: Shareability,
    ) {
        if let Some(problem) = check_block(store, file, block, table) {
            state.violations.push(problem);
            return;
        }
        if block.len() > 1 {
            state.huge += 1;
        } else {
            state.small += 1;
        }
        state
            .mappings
            .insert((file, block.start().0), (block.len(), table));
    }

    fn apply(&self, file: FileId, plan: &ConversionPlan, map: bool) -> Result<(), UnmapError> {
        let mut state = self.state.lock();
        state.invalidate_seq += 1;
        let mut failed = Vec::new();
        for entry in plan.unmap() {
            let range = entry.run.range(&self.geometry);
            if let Err(e) = self.faults.check_unmap(range) {
                failed.push(e);
                continue;
            }
            remove_overlapping(&mut state, file, range);
        }
        if map && let Ok(store) = self.store() {
            for entry in plan.map() {
                self.map_entry(&mut state, &store, file, entry, &failed);
            }
        }
        match failed.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    fn map_entry(
        &self,
        state: &mut State,
        store: &Store,
        file: FileId,
        entry: &PlanEntry,
        failed: &[UnmapError],
    ) {
        if entry.attributes.quarantined {
            return;
        }
        for block in entry.run.blocks(&self.geometry) {
            let range = block.range(&self.geometry);
            if failed.iter().any(|f| f.range.overlaps(&range)) {
                continue;
            }
            if overlaps_any(state, file, range) {
                state.violations.push(format!(
                    "plan maps {range} of {file} over an existing mapping"
                ));
                continue;
            }
            self.map_checked(state, store, file, range, entry.attributes.shareability);
        }
    }
}

/// Why mapping `block` in `table` would be wrong, if it would.
fn check_block(
    store: &Store,
    file: FileId,
    block: PfnRange,
    table: Shareability,
) -> Option<String> {
    let handle = store.file(file)?;
    let offset = crate::store::bytes(block.start().0);
    let len = crate::store::bytes(block.len());
    let plan = match handle.block_plan(offset, len) {
        Ok(plan) => plan,
        Err(e) => return Some(format!("cannot check {block} of {file}: {e}")),
    };
    match plan.as_slice() {
        [(run, attributes)] if run.count() == 1 => {
            if attributes.shareability != table {
                Some(format!(
                    "{block} of {file} is {:?} but mapped in the {table:?} table",
                    attributes.shareability
                ))
            } else {
                None
            }
        }
        _ => Some(format!(
            "{block} of {file} has mixed attributes: {} runs",
            plan.len()
        )),
    }
}

fn overlaps_any(state: &State, file: FileId, range: PfnRange) -> bool {
    let before = state.mappings.range(..=(file, range.start().0)).next_back();
    let hit_before = matches!(before, Some((&(f, start), &(pages, _))) if f == file && start + pages > range.start().0);
    hit_before
        || state
            .mappings
            .range((file, range.start().0 + 1)..(file, range.end().0))
            .next()
            .is_some()
}

/// Zaps every mapping that overlaps `range` (KVM zaps whole huge mappings).
fn remove_overlapping(state: &mut State, file: FileId, range: PfnRange) {
    let mut doomed = Vec::new();
    if let Some((&(f, start), &(pages, _))) =
        state.mappings.range(..=(file, range.start().0)).next_back()
        && f == file
        && start + pages > range.start().0
    {
        doomed.push(start);
    }
    doomed.extend(
        state
            .mappings
            .range((file, range.start().0 + 1)..(file, range.end().0))
            .map(|(&(_, start), _)| start),
    );
    for start in doomed {
        state.mappings.remove(&(file, start));
    }
}

impl Subscriber for KvmMmu {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, _request: &ConversionRequest) -> Result<(), Veto> {
        self.faults.on_prepare()?;
        let mut state = self.state.lock();
        state.in_progress += 1;
        state.invalidate_seq += 1;
        Ok(())
    }

    fn abort(&self, _request: &ConversionRequest) {
        let mut state = self.state.lock();
        state.in_progress -= 1;
        state.invalidate_seq += 1;
    }

    fn commit(&self, request: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError> {
        {
            let mut state = self.state.lock();
            state.in_progress -= 1;
        }
        self.faults.on_unmap_callback(Callback::Commit);
        self.apply(request.file, plan, true)
    }

    fn invalidate(&self, invalidation: &Invalidation) -> Result<(), UnmapError> {
        self.faults.on_unmap_callback(Callback::Invalidate);
        self.apply(invalidation.file, &invalidation.plan, false)
    }
}
