//! The change transaction: one engine for conversions, population and punch-holes.
//!
//! Every change runs the same steps under the domain's exclusive lock of the chunks it
//! touches (see [`super::Subscriber`] for what subscribers see):
//!
//! 1. validate and find the pages that really change (pinned or quarantined pages refuse a
//!    conversion; pinned ones a punch-hole; quarantined ones a population);
//! 2. take the snapshot of subscribers and compute the plan (before anything changed);
//! 3. the caller's `before` hook (population gets its memory here): a failure ends the change
//!    before anyone heard of it;
//! 4. `prepare` (conversions): a veto aborts the prepared subscribers;
//! 5. `unmap`: a failure rolls back: `restore` to every subscriber that was asked to unmap,
//!    `abort` to all, quarantine of what a restore could not map again;
//! 6. the caller's `unmapped` hook (revoke the host view, zero, free memory): a failure rolls
//!    back as in 5;
//! 7. flip the metadata, then the caller's `changed` hook (restore the host view), then `map`.

use pfnstore_core::{OffsetRange, PageOffset, Pfn, PfnRange};

use super::callback::{self, panic_message};
use super::plan::MappingPlan;
use super::planner::{Edit, Overlay, Planner};
use super::registry::Snapshot;
use super::subscriber::{Change, ChangeKind, Subscriber, UnmapError, Veto};
use super::{ChangeHooks, ChangeOutcome, ConversionDomain, ConversionError, Flipped, lock_error};
use crate::{Attributes, MetadataError, QuarantineReason};

/// Changed pages kept inline: a conversion changes one range, a population usually one hole.
pub(crate) type Changed = crate::inline_vec::InlineVec<OffsetRange, 2>;

impl ConversionDomain {
    pub(crate) fn run(
        &self,
        kind: ChangeKind,
        range: OffsetRange,
        hooks: &mut dyn ChangeHooks,
    ) -> Result<ChangeOutcome, ConversionError> {
        let core = &*self.core;
        let geometry = core.store.geometry();
        let pages = range.cast::<Pfn>();
        let _guard = core
            .locks
            .lock_chunks(&geometry, pages)
            .map_err(|e| lock_error(range, e))?;

        let (changed_pages, edit) = self.changed_pages(kind, pages)?;
        let changed = changed_pages.as_slice();
        if changed.is_empty() {
            return Ok(ChangeOutcome::nothing(geometry));
        }

        let snapshot = self.registry.snapshot(core);
        let plan = Planner { core }.plan(Overlay { changed, edit }, snapshot.run_boundary())?;
        let change = Change {
            file: core.file,
            kind,
            range,
            plan: &plan,
        };
        hooks
            .before(&change, changed)
            .map_err(|e| ConversionError::Hook {
                range,
                reason: e.reason,
            })?;

        if let ChangeKind::Convert { .. } = kind {
            self.prepare_all(&snapshot, &change, hooks, changed)?;
        }
        // Everyone who saw `prepare` (conversions) or `unmap` gets `abort` on a rollback.
        let prepared = |asked: usize| match kind {
            ChangeKind::Convert { .. } => snapshot.len(),
            _ => asked,
        };
        for (i, subscriber) in snapshot.subscribers().enumerate() {
            let failure = match callback::call(|| subscriber.unmap(&change)) {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(panic) => whole_region(&plan, range, &*panic),
            };
            // Test-only mutation: roll back after letting go of the range lock.
            #[cfg(pfnstore_loom_mutation = "rollback_unlocked")]
            drop(_guard);
            let quarantined = self.roll_back(&snapshot, &change, i + 1, prepared(i + 1));
            hooks.rolled_back(&change, changed);
            let first = failure.range.intersection(&plan.region().unwrap_or(range));
            return Err(ConversionError::UnmapFailed {
                subscriber: subscriber.name().to_string(),
                range: first.unwrap_or(failure.range),
                reason: failure.reason,
                quarantined,
            });
        }
        if let Err(e) = hooks.unmapped(&change, changed) {
            let quarantined = self.roll_back(&snapshot, &change, snapshot.len(), snapshot.len());
            hooks.rolled_back(&change, changed);
            return Err(ConversionError::Hook {
                range,
                reason: hook_reason(e.reason, &quarantined),
            });
        }
        let flipped = match self.flip(edit, changed) {
            Ok(flipped) => flipped,
            Err(e) => {
                self.roll_back(&snapshot, &change, snapshot.len(), snapshot.len());
                hooks.rolled_back(&change, changed);
                return Err(e.into());
            }
        };
        hooks.changed(&change, changed);

        // Test-only mutation: look the subscribers up again for the map phase.
        #[cfg(pfnstore_loom_mutation = "snapshot_per_phase")]
        let snapshot = {
            drop(snapshot);
            self.registry.snapshot(core)
        };
        for subscriber in snapshot.subscribers() {
            // A panic in `map` cannot undo the change; the subscriber mapped less, that is all.
            let _ = callback::call(|| subscriber.map(&change));
        }
        let subscribers = snapshot.len();
        drop(snapshot);
        Ok(ChangeOutcome {
            plan,
            changed: changed_pages,
            changes: flipped,
            subscribers,
        })
    }

    /// The ranges `kind` changes within `pages`, and how; checks what must refuse the change.
    fn changed_pages(
        &self,
        kind: ChangeKind,
        pages: PfnRange,
    ) -> Result<(Changed, Edit), ConversionError> {
        let store = &self.core.store;
        let mut changed = Changed::default();
        let mut refusal: Option<MetadataError> = None;
        let mut collect = |r: PfnRange, take: bool| {
            if !take {
                return;
            }
            let r = r.cast::<PageOffset>();
            match changed.last_mut() {
                Some(last) if last.end() == r.start() => *last = last.hull(&r),
                _ => changed.push(r),
            }
        };
        let edit = match kind {
            ChangeKind::Convert { to } => {
                store.visit_runs(pages, |r, a| {
                    refusal = pin_or_quarantine(r, a, true);
                    collect(r, a.shareability != to);
                    stop_if(refusal.is_some())
                })?;
                Edit::Share(to)
            }
            ChangeKind::Populate => {
                store.visit_runs(pages, |r, a| {
                    if a.quarantined.is_some() {
                        refusal = Some(MetadataError::Quarantined {
                            first_pfn: r.start(),
                        });
                    }
                    collect(r, a.owner.is_none());
                    stop_if(refusal.is_some())
                })?;
                Edit::Back(self.core.file)
            }
            ChangeKind::Punch => {
                store.visit_runs(pages, |r, a| {
                    refusal = pin_or_quarantine(r, a, false);
                    collect(r, a.owner == Some(self.core.file));
                    stop_if(refusal.is_some())
                })?;
                Edit::Unback
            }
            ChangeKind::Replay => Edit::None,
        };
        match refusal {
            Some(e) => Err(e.into()),
            None => Ok((changed, edit)),
        }
    }

    fn prepare_all(
        &self,
        snapshot: &Snapshot<'_>,
        change: &Change<'_>,
        hooks: &mut dyn ChangeHooks,
        changed: &[OffsetRange],
    ) -> Result<(), ConversionError> {
        for (i, subscriber) in snapshot.subscribers().enumerate() {
            let veto = match callback::call(|| subscriber.prepare(change)) {
                Ok(Ok(())) => continue,
                Ok(Err(veto)) => veto,
                Err(panic) => Veto::new(format!("panicked in prepare: {}", panic_message(&*panic))),
            };
            abort_all(snapshot.first(i), change);
            hooks.rolled_back(change, changed);
            return Err(ConversionError::Vetoed {
                first_page: veto.first_page.unwrap_or(change.range.start()),
                subscriber: subscriber.name().to_string(),
                reason: veto.reason,
            });
        }
        Ok(())
    }

    /// Rolls a change back before the metadata flipped: `restore` to the first `asked`
    /// subscribers (in reverse), `abort` to the first `prepared`; quarantines (in the metadata)
    /// and returns what a restore could not map again.
    fn roll_back(
        &self,
        snapshot: &Snapshot<'_>,
        change: &Change<'_>,
        asked: usize,
        prepared: usize,
    ) -> Vec<OffsetRange> {
        let region = change.plan.region().unwrap_or(change.range);
        let mut quarantined = Vec::new();
        for subscriber in snapshot.first(asked).rev() {
            let failure = match callback::call(|| subscriber.restore(change)) {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(panic) => whole_region(change.plan, change.range, &*panic),
            };
            // A subscriber may only name pages it was told about.
            let range = failure.range.intersection(&region).unwrap_or(region);
            if self
                .core
                .store
                .quarantine(range.cast(), QuarantineReason::UnmapFailed)
                .is_ok()
            {
                quarantined.push(range);
            }
        }
        abort_all(snapshot.first(prepared), change);
        quarantined
    }

    /// Applies `edit` to the changed pages in the metadata. All or nothing.
    fn flip(&self, edit: Edit, changed: &[OffsetRange]) -> Result<Flipped, MetadataError> {
        let store = &self.core.store;
        let file = self.core.file;
        let mut done = Flipped::default();
        for (i, range) in changed.iter().enumerate() {
            let pages = range.cast::<Pfn>();
            let result = match edit {
                Edit::Share(to) => store.set_shareability(pages, to),
                Edit::Back(_) => store.assign_owner(pages, file),
                Edit::Unback => store.release_owner(pages, file),
                Edit::None => continue,
            };
            match result {
                Ok(change) => done.push(change),
                Err(e) => {
                    // Validated under the lock, so this is a bug; still, change nothing.
                    for earlier in &changed[..i] {
                        let pages = earlier.cast::<Pfn>();
                        let _ = match edit {
                            Edit::Share(to) => store.set_shareability(pages, to.flipped()),
                            Edit::Back(_) => store.release_owner(pages, file),
                            Edit::Unback => store.assign_owner(pages, file),
                            Edit::None => continue,
                        };
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }
}

fn pin_or_quarantine(r: PfnRange, a: &Attributes, quarantine: bool) -> Option<MetadataError> {
    if let Some(owner) = a.pins.first_owner() {
        return Some(MetadataError::Pinned {
            first_pfn: r.start(),
            owner,
        });
    }
    if quarantine && a.quarantined.is_some() {
        return Some(MetadataError::Quarantined {
            first_pfn: r.start(),
        });
    }
    None
}

fn stop_if(stop: bool) -> std::ops::ControlFlow<()> {
    if stop {
        std::ops::ControlFlow::Break(())
    } else {
        std::ops::ControlFlow::Continue(())
    }
}

fn abort_all<'a>(
    subscribers: impl DoubleEndedIterator<Item = &'a std::sync::Arc<dyn Subscriber>>,
    change: &Change<'_>,
) {
    for subscriber in subscribers.rev() {
        // A panic in abort cannot undo anything more.
        let _ = callback::call(|| subscriber.abort(change));
    }
}

/// After a panic nothing is known about what is still mapped: the whole region failed.
fn whole_region(
    plan: &MappingPlan,
    range: OffsetRange,
    panic: &(dyn std::any::Any + Send),
) -> UnmapError {
    UnmapError {
        range: plan.region().unwrap_or(range),
        reason: format!("panicked: {}", panic_message(panic)),
    }
}

fn hook_reason(reason: String, quarantined: &[OffsetRange]) -> String {
    if quarantined.is_empty() {
        reason
    } else {
        format!("{reason}; could not restore (quarantined): {quarantined:?}")
    }
}
