//! A KVM-like MMU.

use std::collections::BTreeMap;
use std::sync::Weak;

use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, OffsetRange, PAGE_SIZE, PageOffset, PageSize, Pfn};

use super::{Callback, Injected, Misbehaviour};
use crate::metadata::conversion::{Change, ChangeKind, Subscriber, UnmapError, Veto};
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
    /// Map every block of a plan at once (as if the guest touched everything), rather than
    /// only what faults install.
    eager: bool,
    store: Weak<StoreInner>,
    state: Mutex<State>,
    injected: Injected,
}

#[derive(Debug, Default)]
struct State {
    /// (file, first page) -> (pages, table).
    mappings: BTreeMap<(FileId, u64), (u64, Shareability)>,
    violations: Vec<String>,
    huge: u64,
    small: u64,
    /// Bumped when a change starts and ends, like KVM's `mmu_invalidate_seq`: a fault that
    /// raced with one retries instead of installing a stale translation.
    invalidate_seq: u64,
    /// Changes between their first callback and `map`/`abort`, like
    /// `mmu_invalidate_in_progress`: faults wait them out.
    in_progress: u64,
}

impl KvmMmu {
    /// An MMU for the files of `store` that maps every block of every plan at once (as if
    /// the guest touched everything), so that every plan is checked. It holds the store
    /// weakly.
    pub fn new(name: impl Into<String>, store: &Store) -> KvmMmu {
        KvmMmu {
            name: name.into(),
            geometry: store.geometry(),
            eager: true,
            store: std::sync::Arc::downgrade(&store.inner),
            state: Mutex::new(State::default()),
            injected: Injected::default(),
        }
    }

    /// An MMU that maps only what faults ask for, as KVM does: plans only zap.
    pub fn lazy(name: impl Into<String>, store: &Store) -> KvmMmu {
        KvmMmu {
            eager: false,
            ..KvmMmu::new(name, store)
        }
    }

    /// Handles a guest fault the way KVM does: asks the file for the frame and the largest
    /// mappable block, and maps that block in the table of the access's kind.
    ///
    /// Like KVM, it samples the invalidation sequence before asking the store and installs
    /// the mapping only if no change ran in between; otherwise it retries.
    pub fn fault(
        &self,
        file: FileId,
        offset: u64,
        access: Shareability,
    ) -> Result<(PageSize, Pfn), StoreError> {
        let store = self.store()?;
        let handle = store.file(file).ok_or(StoreError::NoSuchFile { file })?;
        let page = PageOffset::from_byte(offset);
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
            let fault = handle.fault(offset, access)?;
            let block = self
                .geometry
                .block_containing(page, fault.size)
                .ok_or_else(|| crate::error::broken("fault beyond the page space"))?
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
    pub fn mapping_at(
        &self,
        file: FileId,
        page: PageOffset,
    ) -> Option<(OffsetRange, Shareability)> {
        let state = self.state.lock();
        let (&(f, start), &(pages, table)) = state.mappings.range(..=(file, page.0)).next_back()?;
        let range = OffsetRange::from_len(PageOffset(start), pages).ok()?;
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
            if let Ok(block) = OffsetRange::from_len(PageOffset(start), pages)
                && let Some(problem) = check_block(&store, file, block, table)
            {
                problems.push(problem);
            }
        }
        problems
    }

    /// Injects misbehaviour.
    pub fn inject(&self, m: Misbehaviour) {
        self.injected.set(m);
    }

    fn store(&self) -> Result<Store, StoreError> {
        self.store
            .upgrade()
            .map(|inner| Store { inner })
            .ok_or(StoreError::StoreGone)
    }

    fn map_checked(
        &self,
        state: &mut State,
        store: &Store,
        file: FileId,
        block: OffsetRange,
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

    fn begin(&self) {
        let mut state = self.state.lock();
        state.in_progress += 1;
        state.invalidate_seq += 1;
    }

    fn end(&self) {
        let mut state = self.state.lock();
        state.in_progress = state.in_progress.saturating_sub(1);
        state.invalidate_seq += 1;
    }
}

/// Why mapping `block` in `table` would be wrong, if it would.
fn check_block(
    store: &Store,
    file: FileId,
    block: OffsetRange,
    table: Shareability,
) -> Option<String> {
    let handle = store.file(file)?;
    let blocks = match handle.mapped_blocks(block.start().byte(), block.len() * PAGE_SIZE) {
        Ok(blocks) => blocks,
        Err(e) => return Some(format!("cannot check {block} of {file}: {e}")),
    };
    let geometry = store.geometry();
    match blocks.as_slice() {
        [entry] if entry.run.range(&geometry).contains_range(&block) => {
            (entry.shareability != table).then(|| {
                format!(
                    "{block} of {file} is {:?} but mapped in the {table:?} table",
                    entry.shareability
                )
            })
        }
        [] => Some(format!("{block} of {file} is not backed")),
        _ => Some(format!(
            "{block} of {file} is not one uniform backed block: {} blocks",
            blocks.len()
        )),
    }
}

/// Zaps every mapping that overlaps `range` (KVM zaps whole huge mappings).
fn remove_overlapping(state: &mut State, file: FileId, range: OffsetRange) {
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

    fn prepare(&self, _change: &Change<'_>) -> Result<(), Veto> {
        self.injected.on_prepare()?;
        self.begin();
        Ok(())
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if !matches!(change.kind, ChangeKind::Convert { .. }) {
            // Populations and punch-holes have no prepare: the change starts here.
            self.begin();
        }
        self.injected.on_unmap(change.plan.region())?;
        let mut state = self.state.lock();
        for entry in change.plan.unmap() {
            remove_overlapping(&mut state, change.file, entry.run.range(&self.geometry));
        }
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        self.injected.on(Callback::Map);
        if self.eager
            && let Ok(store) = self.store()
        {
            let mut state = self.state.lock();
            for entry in change.plan.map() {
                for block in entry.run.blocks(&self.geometry) {
                    let range = block.range(&self.geometry);
                    remove_overlapping(&mut state, change.file, range);
                    self.map_checked(&mut state, &store, change.file, range, entry.shareability);
                }
            }
        }
        if change.kind != ChangeKind::Replay {
            self.end();
        }
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        // KVM maps lazily: the guest faults the old blocks back in. Nothing to do but the
        // injected failure.
        self.injected.on_restore(change.plan.region())
    }

    fn abort(&self, _change: &Change<'_>) {
        self.end();
    }
}
