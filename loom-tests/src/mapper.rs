//! [`Mapper`]: a subscriber that maps every block the plans give it (as KVM's MMU does), holds
//! exactly those, and checks every callback against what it holds and against the protocol's
//! order, like the mappers of `metadata/tests/transaction.rs`.
//!
//! It records a violation when it is told to unmap a block it does not hold as such, to map a
//! block over one it holds, or when a callback comes out of order for a change (the sequences
//! are `[prepare] unmap map`, `[prepare] abort`, `[prepare] unmap restore abort`, and a lone
//! replay `map`). Changes of different chunks may interleave; the order is checked per chunk.
//!
//! Its state sits behind a `std` mutex, not the facade's: the models check what the store
//! does, not the mapper, and the lock is never held across a loom operation (the `inside`
//! hook runs after it is released), so it adds no interleavings.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use pfnstore_core::{Geometry, OffsetRange};
use pfnstore_metadata::Shareability;
use pfnstore_metadata::conversion::{
    Change, ChangeKind, ConversionDomain, MappingPlan, Subscriber, UnmapError, Veto,
};

/// Which callback ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    /// `prepare`.
    Prepare,
    /// `unmap`.
    Unmap,
    /// `map` of a change.
    Map,
    /// `map` of a replay (registration).
    Replay,
    /// `restore`.
    Restore,
    /// `abort`.
    Abort,
}

/// Where a change stands for one subscriber (absent: no change open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepared,
    Unmapped,
    Restored,
}

/// Block start -> (end, shareability).
pub type Held = BTreeMap<u64, (u64, Shareability)>;

#[derive(Debug, Default)]
struct State {
    held: Held,
    /// Open changes, by chunk index.
    phases: BTreeMap<u64, Phase>,
    events: Vec<Callback>,
    violations: Vec<String>,
}

type Inside = Box<dyn Fn(Callback, &Change<'_>) + Send + Sync>;

/// The subscriber (see the module docs).
pub struct Mapper {
    name: String,
    geometry: Geometry,
    /// `unmap` of a change of these pages fails (nothing unmapped).
    fail_unmap: Option<OffsetRange>,
    state: Mutex<State>,
    /// Runs inside every callback, after it was recorded: what the model wants a callback to
    /// do (yield, operate on the store, ...).
    inside: Inside,
}

impl fmt::Debug for Mapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapper")
            .field("name", &self.name)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Mapper {
    /// A healthy mapper that does nothing else in its callbacks.
    pub fn new(name: &str) -> Mapper {
        Mapper::with(name, None, |_, _| {})
    }

    /// A mapper whose `unmap` fails for changes of pages overlapping `fail_unmap`, and that
    /// runs `inside` in every callback.
    pub fn with(
        name: &str,
        fail_unmap: Option<OffsetRange>,
        inside: impl Fn(Callback, &Change<'_>) + Send + Sync + 'static,
    ) -> Mapper {
        Mapper {
            name: name.to_string(),
            geometry: crate::domains::geometry(),
            fail_unmap,
            state: Mutex::new(State::default()),
            inside: Box::new(inside),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere in the model must not hide this mapper's own report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The callbacks so far.
    pub fn events(&self) -> Vec<Callback> {
        self.state().events.clone()
    }

    /// What it holds now.
    pub fn held(&self) -> Held {
        self.state().held.clone()
    }

    /// Protocol violations so far, and any change still open: empty when every change it
    /// heard of was a whole sequence and no callback contradicted what it holds.
    pub fn problems(&self) -> Vec<String> {
        let state = self.state();
        let mut problems = state.violations.clone();
        for (chunk, phase) in &state.phases {
            problems.push(format!(
                "{}: a change of chunk {chunk} left open at {phase:?} (events {:?})",
                self.name, state.events
            ));
        }
        problems
    }

    /// Panics with `what` unless it saw only whole sequences and holds exactly what `domain`
    /// maps now.
    pub fn check(&self, domain: &ConversionDomain, what: &str) {
        let problems = self.problems();
        assert!(problems.is_empty(), "{what}: {problems:?}");
        let expected = blocks(&domain.current_plan().expect("a plan of the domain"), false);
        let held = self.held();
        assert_eq!(
            held,
            expected,
            "{what}: {} holds {held:?}, the domain maps {expected:?} (events {:?})",
            self.name,
            self.events()
        );
    }

    /// Records `callback` for `change`, checking it against the change's phase.
    fn record(&self, callback: Callback, change: &Change<'_>) {
        let chunk = self.geometry.chunk_index(change.range.start());
        let mut state = self.state();
        state.events.push(callback);
        let before = state.phases.get(&chunk).copied();
        let convert = matches!(change.kind, ChangeKind::Convert { .. });
        let after = match (callback, before) {
            (Callback::Prepare, None) => Ok(Some(Phase::Prepared)),
            (Callback::Unmap, Some(Phase::Prepared)) => Ok(Some(Phase::Unmapped)),
            (Callback::Unmap, None) if !convert => Ok(Some(Phase::Unmapped)),
            (Callback::Map, Some(Phase::Unmapped)) => Ok(None),
            (Callback::Replay, None) => Ok(None),
            (Callback::Restore, Some(Phase::Unmapped)) => Ok(Some(Phase::Restored)),
            (Callback::Abort, Some(Phase::Prepared | Phase::Restored)) => Ok(None),
            _ => Err(()),
        };
        match after {
            Ok(Some(phase)) => {
                state.phases.insert(chunk, phase);
            }
            Ok(None) => {
                state.phases.remove(&chunk);
            }
            Err(()) => {
                let message = format!(
                    "{}: {callback:?} of {:?} {} while the chunk's change was at {before:?} (events {:?})",
                    self.name, change.kind, change.range, state.events
                );
                state.violations.push(message);
            }
        }
    }

    fn unmap_blocks(&self, plan: &MappingPlan) {
        let mut state = self.state();
        for (start, block) in blocks(plan, true) {
            if state.held.remove(&start) != Some(block) {
                let message = format!(
                    "{}: told to unmap {start}..{} ({:?}), which it does not hold as such (holds {:?})",
                    self.name, block.0, block.1, state.held
                );
                state.violations.push(message);
            }
        }
    }

    fn map_blocks(&self, plan: &MappingPlan, unmap_list: bool) {
        let mut state = self.state();
        for (start, (end, shareability)) in blocks(plan, unmap_list) {
            // `restore` maps the old blocks again; a block it still holds stays as it is.
            if unmap_list && state.held.get(&start) == Some(&(end, shareability)) {
                continue;
            }
            let overlaps = state
                .held
                .range(..end)
                .next_back()
                .is_some_and(|(_, (held_end, _))| *held_end > start);
            if overlaps {
                let message = format!(
                    "{}: told to map {start}..{end} over a block it holds ({:?})",
                    self.name, state.held
                );
                state.violations.push(message);
            }
            state.held.insert(start, (end, shareability));
        }
    }
}

/// The blocks of a plan's unmap or map list.
pub fn blocks(plan: &MappingPlan, unmap_list: bool) -> Held {
    let g = plan.geometry();
    let list = if unmap_list { plan.unmap() } else { plan.map() };
    list.iter()
        .flat_map(|e| {
            e.run.blocks(&g).map(move |b| {
                let r = b.range(&g);
                (r.start().0, (r.end().0, e.shareability))
            })
        })
        .collect()
}

impl Subscriber for Mapper {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        self.record(Callback::Prepare, change);
        (self.inside)(Callback::Prepare, change);
        Ok(())
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.record(Callback::Unmap, change);
        (self.inside)(Callback::Unmap, change);
        if let Some(fail) = self.fail_unmap
            && change.range.overlaps(&fail)
        {
            return Err(UnmapError {
                range: fail,
                reason: "injected".into(),
            });
        }
        self.unmap_blocks(change.plan);
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        let callback = if change.kind == ChangeKind::Replay {
            Callback::Replay
        } else {
            Callback::Map
        };
        self.record(callback, change);
        self.map_blocks(change.plan, false);
        (self.inside)(callback, change);
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.record(Callback::Restore, change);
        self.map_blocks(change.plan, true);
        (self.inside)(Callback::Restore, change);
        Ok(())
    }

    fn abort(&self, change: &Change<'_>) {
        self.record(Callback::Abort, change);
        (self.inside)(Callback::Abort, change);
    }
}
