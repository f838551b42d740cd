//! Conversion transactions: shared <-> private in place, all or nothing, with every user of the
//! memory told through [`Subscriber`] callbacks instead of refcounts.
//!
//! A [`ConversionDomain`] is one guest-memory file's view of conversion: its metadata store
//! (keyed by file page offset), its range locks, and the store-wide subscriber registry.
//!
//! # The transaction ([`ConversionDomain::convert`])
//!
//! 1. Lock the chunks the range touches against other conversions and punch-holes of the same
//!    domain. Readers are not blocked; conversions of other chunks run in parallel.
//! 2. Check pins and quarantine: a pinned page fails the whole conversion with
//!    `Pinned { first_pfn, owner }` before any subscriber hears of it.
//! 3. `prepare` every subscriber interested in the file, in registration order. A veto (or a
//!    panic) stops there: the ones already prepared get `abort`, in reverse order, and the caller
//!    gets [`ConversionError::Vetoed`] naming the subscriber, its reason and the first page.
//! 4. Flip the metadata. This re-checks pins under the shard locks, so a pin that raced in after
//!    step 2 still fails the conversion (and aborts the prepared subscribers).
//! 5. `commit` to every subscriber with the [`ConversionPlan`]: the blocks to unmap as they were
//!    mapped before (one 1 GiB block, say), and the blocks to map afterwards (511 x 2 MiB +
//!    512 x 4 KiB), widened to whatever split or merged. Merges are immediate: converting the
//!    last odd page of a block back makes the block uniform in the same transaction, and the
//!    plan says "unmap the small blocks, map the large one".
//! 6. A subscriber that fails to unmap reports the range; exactly that range is quarantined
//!    (never handed out again) and the caller gets [`ConversionError::UnmapFailed`]. The
//!    conversion itself stays done: the metadata and every other subscriber already moved on.
//!
//! # Why the whole chunk is locked
//!
//! The plan is computed from the state of the blocks around the range. Two conversions of
//! disjoint pages in one 1 GiB block would both split that block, and each would describe the
//! other's half-finished state to subscribers. Locking the chunk hull keeps plans exact; it
//! only serialises conversions inside one chunk of one file.
//!
//! # Invariant the plans rely on
//!
//! A domain's mapping attributes (shareability, owner, quarantine) change only under its range
//! locks: through `convert`, `invalidate`, or code that holds a [`RangeGuard`].

mod plan;
mod range_lock;
mod registry;
mod subscriber;

use std::panic::{AssertUnwindSafe, catch_unwind};

use pfnstore_core::sync::Arc;
use pfnstore_core::{BlockRun, Geometry, Pfn, PfnRange, RangeError};

pub use plan::{ConversionPlan, PlanEntry};
pub use range_lock::{RangeGuard, RangeLocks, Reentrant, chunk_hull};
pub use registry::{DomainView, Registration, Snapshot, SubscriberId, SubscriberRegistry};
pub use subscriber::{ConversionRequest, Interest, Invalidation, Subscriber, UnmapError, Veto};

use registry::InCallback;

use crate::{
    Attributes, FileId, MappingAttributes, MappingChange, MetadataError, MetadataStore,
    QuarantineReason, Shareability,
};

/// Why a conversion or invalidation did not (fully) happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// Validation or metadata failure (bad range, pinned, quarantined, not managed...). Nothing
    /// changed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// A subscriber refused in `prepare`. Nothing changed; the prepared ones were aborted.
    #[error("conversion vetoed by {subscriber} at page {first_page}: {reason}")]
    Vetoed {
        /// The first page the veto is about.
        first_page: Pfn,
        /// The subscriber's name.
        subscriber: String,
        /// Its reason.
        reason: String,
    },
    /// A subscriber could not unmap `range`. The operation went through everywhere else;
    /// `range` is quarantined and will never be handed out again.
    #[error("{subscriber} failed to unmap {range}: {reason} (quarantined{more})", more = if *.others > 0 { format!("; {} more failures", .others) } else { String::new() })]
    UnmapFailed {
        /// The subscriber's name.
        subscriber: String,
        /// The pages it could not unmap (now quarantined).
        range: PfnRange,
        /// Its reason.
        reason: String,
        /// Further failures of the same operation (also quarantined).
        others: usize,
    },
    /// The caller's `before_flip` step failed; the conversion was aborted and nothing changed.
    #[error("conversion of {range} aborted: {reason}")]
    Hook {
        /// The range that was to convert.
        range: PfnRange,
        /// What failed.
        reason: String,
    },
    /// The calling thread already holds an overlapping range (a subscriber callback that
    /// operates on the range of the operation that called it).
    #[error("re-entrant operation on {requested}: this thread already holds {held}")]
    Reentrant {
        /// The range asked for.
        requested: PfnRange,
        /// The overlapping range the thread holds.
        held: PfnRange,
    },
}

/// What a successful conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionOutcome {
    /// What subscribers were told to unmap and map.
    pub plan: ConversionPlan,
    /// The blocks that split or merged; `None` when the range already had the requested
    /// shareability and nothing happened.
    pub change: Option<MappingChange>,
    /// How many subscribers took part.
    pub subscribers: usize,
}

/// One guest-memory file's conversions: its metadata, range locks and subscribers.
#[derive(Debug)]
pub struct ConversionDomain {
    file: FileId,
    store: Arc<MetadataStore>,
    locks: RangeLocks,
    registry: std::sync::Arc<SubscriberRegistry>,
    view: std::sync::Arc<DomainView>,
}

struct Failure {
    subscriber: String,
    error: UnmapError,
}

impl ConversionDomain {
    /// A domain for `file` over `store`, notifying the subscribers of `registry`.
    pub fn new(
        file: FileId,
        store: Arc<MetadataStore>,
        registry: std::sync::Arc<SubscriberRegistry>,
    ) -> Self {
        ConversionDomain {
            file,
            store,
            locks: RangeLocks::new(),
            view: registry.view(file),
            registry,
        }
    }

    /// The file this domain belongs to.
    pub fn file(&self) -> FileId {
        self.file
    }

    /// The domain's metadata.
    pub fn store(&self) -> &MetadataStore {
        &self.store
    }

    /// The domain's range locks, for operations that must exclude conversions (allocation of
    /// backing, for instance).
    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// Locks the chunks `range` touches, as conversions do.
    pub fn lock(&self, range: PfnRange) -> Result<RangeGuard<'_>, ConversionError> {
        self.locks
            .lock_chunks(&self.store.geometry(), range)
            .map_err(|r| ConversionError::Reentrant {
                requested: range,
                held: r.held,
            })
    }

    /// Converts `range` to `to`: the transaction described in the module docs.
    pub fn convert(
        &self,
        range: PfnRange,
        to: Shareability,
    ) -> Result<ConversionOutcome, ConversionError> {
        self.convert_with(range, to, |_| Ok(()))
    }

    /// [`convert`](Self::convert), running `before_flip` once every subscriber has prepared
    /// and just before the metadata changes (the facade zeroes memory there for a ZERO
    /// conversion). An `Err` from it aborts the conversion like a veto would, and is reported
    /// as [`ConversionError::Hook`].
    pub fn convert_with(
        &self,
        range: PfnRange,
        to: Shareability,
        before_flip: impl FnOnce(PfnRange) -> Result<(), String>,
    ) -> Result<ConversionOutcome, ConversionError> {
        let geometry = self.store.geometry();
        let _guard = self.lock(range)?;

        let current = self.store.ranges(range)?;
        check_convertible(&current)?;
        if current.iter().all(|(_, a)| a.shareability == to) {
            return Ok(ConversionOutcome {
                plan: ConversionPlan::default(),
                change: None,
                subscribers: 0,
            });
        }

        let request = ConversionRequest {
            file: self.file,
            range,
            to,
        };
        let snapshot = self.registry.snapshot(&self.view);
        let subscribers = &snapshot;
        for (i, subscriber) in subscribers.subscribers().enumerate() {
            let answer = {
                let _cb = InCallback::enter();
                catch_unwind(AssertUnwindSafe(|| subscriber.prepare(&request)))
            };
            let veto = match answer {
                Ok(Ok(())) => continue,
                Ok(Err(veto)) => veto,
                Err(panic) => Veto::new(format!("panicked in prepare: {}", panic_message(&panic))),
            };
            abort_all(subscribers.subscribers().take(i), &request);
            return Err(ConversionError::Vetoed {
                first_page: veto.first_page.unwrap_or(range.start()),
                subscriber: subscriber.name().to_string(),
                reason: veto.reason,
            });
        }

        let before_region = self.mapped_hull(&geometry, range)?;
        // A uniform block around the range has the range's own mapping attributes.
        let range_before = current.first().map(|(_, a)| a.mapping()).filter(|first| {
            current.iter().all(|(_, a)| {
                let m = a.mapping();
                m.owner == first.owner && m.quarantined == first.quarantined
            })
        });
        let before = self.plan_of(&geometry, before_region, range_before)?;
        if let Err(reason) = before_flip(range) {
            abort_all(subscribers.subscribers(), &request);
            return Err(ConversionError::Hook { range, reason });
        }
        let change = match self.store.set_shareability(range, to) {
            Ok(change) => change,
            Err(e) => {
                abort_all(subscribers.subscribers(), &request);
                return Err(e.into());
            }
        };
        let range_after = range_before.map(|a| MappingAttributes {
            shareability: to,
            ..a
        });
        let plan = self.plan_after(&geometry, before_region, before, &change, range_after)?;

        // Test-only mutation: look the subscribers up again for the commit, so that one that
        // registered mid-conversion gets a commit without a prepare (the loom models must
        // catch it).
        #[cfg(pfnstore_loom_mutation = "snapshot_per_phase")]
        let late = self.registry.snapshot(&self.view);
        #[cfg(pfnstore_loom_mutation = "snapshot_per_phase")]
        let subscribers = &late;
        let mut failures = commit_all(subscribers.subscribers(), &request, &plan);
        self.quarantine_failures(&plan, &mut failures)?;
        if let Some(err) = failure_error(failures) {
            return Err(err);
        }
        Ok(ConversionOutcome {
            plan,
            change: Some(change),
            subscribers: subscribers.len(),
        })
    }

    /// Tells every subscriber that `range` goes away and, once all acknowledged, runs `then`
    /// (which frees the backing) with the range still locked, so no conversion can interleave.
    ///
    /// Pinned pages fail with `Pinned` before anyone is told. If a subscriber fails to unmap,
    /// the failing pages are quarantined, `then` does not run, and the error names them.
    pub fn invalidate<R>(
        &self,
        range: PfnRange,
        then: impl FnOnce(&ConversionPlan) -> R,
    ) -> Result<R, ConversionError> {
        let geometry = self.store.geometry();
        let _guard = self.lock(range)?;
        let current = self.store.ranges(range)?;
        if let Some((r, owner)) = first_pin(&current) {
            return Err(MetadataError::Pinned {
                first_pfn: r,
                owner,
            }
            .into());
        }
        let region = self.mapped_hull(&geometry, range)?;
        let plan = ConversionPlan {
            region: Some(region),
            unmap: entries(self.store.block_plan(region)?),
            map: Vec::new(),
        };
        let invalidation = Invalidation {
            file: self.file,
            range,
            plan,
        };
        let snapshot = self.registry.snapshot(&self.view);
        let mut failures = Vec::new();
        for subscriber in snapshot.subscribers() {
            let answer = {
                let _cb = InCallback::enter();
                catch_unwind(AssertUnwindSafe(|| subscriber.invalidate(&invalidation)))
            };
            if let Some(error) = unmap_failure(answer, region) {
                failures.push(Failure {
                    subscriber: subscriber.name().to_string(),
                    error,
                });
            }
        }
        drop(snapshot);
        self.quarantine_failures(&invalidation.plan, &mut failures)?;
        if let Some(err) = failure_error(failures) {
            return Err(err);
        }
        Ok(then(&invalidation.plan))
    }

    /// `range` widened to the blocks that are mapped now at its two ends.
    fn mapped_hull(&self, geometry: &Geometry, range: PfnRange) -> Result<PfnRange, MetadataError> {
        let first = self.mapped_block(geometry, range.start())?;
        let last = self.mapped_block(geometry, range.last())?;
        Ok(hull(first, last))
    }

    fn mapped_block(&self, geometry: &Geometry, page: Pfn) -> Result<PfnRange, MetadataError> {
        let order = self.store.max_mapping_order(page)?;
        geometry
            .block_containing(page, order)
            .map(|b| b.range(geometry))
            .ok_or(MetadataError::Range(RangeError::OutOfBounds { pfn: page }))
    }

    /// The plan once the metadata changed: the before-blocks of `before_region`, plus, for
    /// blocks that merged, the small blocks they were made of; and the after-blocks of the
    /// whole affected region.
    fn plan_after(
        &self,
        geometry: &Geometry,
        before_region: PfnRange,
        before: Vec<PlanEntry>,
        change: &MappingChange,
        range_after: Option<MappingAttributes>,
    ) -> Result<ConversionPlan, MetadataError> {
        let region = change
            .merges()
            .map(|run| run.range(geometry))
            .fold(before_region, hull);
        // At most five runs per piece (see `Geometry::block_runs`).
        let mut unmap = Vec::with_capacity(before.len() + 10);
        // Pages of a merged block outside `before_region` did not change: they were uniform
        // before too, with the attributes the merged block has now, and were mapped as the
        // plain block decomposition of their piece (no block of theirs crossed into
        // `before_region`, whose ends are block boundaries of the old mapping).
        if region.start() < before_region.start() {
            let piece = PfnRange::new(region.start(), before_region.start())?;
            unmap.extend(self.unchanged_piece(geometry, piece, range_after)?);
        }
        unmap.extend(before);
        if before_region.end() < region.end() {
            let piece = PfnRange::new(before_region.end(), region.end())?;
            unmap.extend(self.unchanged_piece(geometry, piece, range_after)?);
        }
        let map = self.plan_of(geometry, region, range_after)?;
        let plan = ConversionPlan {
            region: Some(region),
            unmap,
            map,
        };
        debug_assert_eq!(plan.check_tiles(geometry), Ok(()));
        Ok(plan)
    }

    /// The block plan of `region`, which contains the conversion's range; without walking the
    /// tree when the region is one uniform aligned block (the 1 GiB before a split, or after a
    /// merge: the common case). A uniform region has the mapping attributes of any of its
    /// pages, so `range_attributes` (those of the range's first page) are the region's.
    fn plan_of(
        &self,
        geometry: &Geometry,
        region: PfnRange,
        range_attributes: Option<MappingAttributes>,
    ) -> Result<Vec<PlanEntry>, MetadataError> {
        let single = geometry
            .largest_block_at(region.start(), region.end())
            .filter(|size| geometry.pages(*size) == region.len());
        if let (Some(size), Some(attributes)) = (single, range_attributes)
            && self.store.max_mapping_order(region.start())? >= size
        {
            let run = BlockRun::new(geometry, region.start(), size, 1)?;
            return Ok(vec![PlanEntry { run, attributes }]);
        }
        Ok(entries(self.store.block_plan(region)?))
    }

    /// A piece of a merged block outside the old mapped hull, as it was mapped: the plain
    /// decomposition of the piece, with the merged block's (unchanged) attributes.
    fn unchanged_piece(
        &self,
        geometry: &Geometry,
        piece: PfnRange,
        merged: Option<MappingAttributes>,
    ) -> Result<impl Iterator<Item = PlanEntry> + use<>, MetadataError> {
        let attributes = match merged {
            Some(a) => a,
            None => self.store.attributes(piece.start())?.mapping(),
        };
        Ok(geometry
            .block_runs(piece)
            .map(move |run| PlanEntry { run, attributes }))
    }

    /// Quarantines what each failure names, clamped to the affected region: a subscriber may
    /// only report pages it was told about, so a confused one cannot quarantine others. The
    /// failures are updated to name what was really quarantined.
    fn quarantine_failures(
        &self,
        plan: &ConversionPlan,
        failures: &mut [Failure],
    ) -> Result<(), MetadataError> {
        let Some(region) = plan.region() else {
            return Ok(());
        };
        for failure in failures {
            let range = region.intersection(&failure.error.range).unwrap_or(region);
            failure.error.range = range;
            self.store
                .quarantine(range, QuarantineReason::UnmapFailed)?;
        }
        Ok(())
    }
}

fn check_convertible(current: &[(PfnRange, Attributes)]) -> Result<(), MetadataError> {
    if let Some((first_pfn, owner)) = first_pin(current) {
        return Err(MetadataError::Pinned { first_pfn, owner });
    }
    if let Some((r, _)) = current.iter().find(|(_, a)| a.quarantined.is_some()) {
        return Err(MetadataError::Quarantined {
            first_pfn: r.start(),
        });
    }
    Ok(())
}

fn first_pin(current: &[(PfnRange, Attributes)]) -> Option<(Pfn, crate::PinOwner)> {
    current
        .iter()
        .find_map(|(r, a)| a.pins.first_owner().map(|owner| (r.start(), owner)))
}

fn entries(plan: crate::BlockPlan) -> Vec<PlanEntry> {
    plan.into_iter()
        .map(|(run, attributes)| PlanEntry { run, attributes })
        .collect()
}

fn hull(a: PfnRange, b: PfnRange) -> PfnRange {
    PfnRange::new(a.start().min(b.start()), a.end().max(b.end())).unwrap_or(a)
}

fn abort_all<'a>(
    prepared: impl DoubleEndedIterator<Item = &'a std::sync::Arc<dyn Subscriber>>,
    request: &ConversionRequest,
) {
    for subscriber in prepared.rev() {
        let _cb = InCallback::enter();
        // A panic in abort cannot undo anything more; the subscriber learns nothing else.
        let _ = catch_unwind(AssertUnwindSafe(|| subscriber.abort(request)));
    }
}

fn commit_all<'a>(
    subscribers: impl Iterator<Item = &'a std::sync::Arc<dyn Subscriber>>,
    request: &ConversionRequest,
    plan: &ConversionPlan,
) -> Vec<Failure> {
    let region = plan.region().unwrap_or(request.range);
    let mut failures = Vec::new();
    for subscriber in subscribers {
        let answer = {
            let _cb = InCallback::enter();
            catch_unwind(AssertUnwindSafe(|| subscriber.commit(request, plan)))
        };
        if let Some(error) = unmap_failure(answer, region) {
            failures.push(Failure {
                subscriber: subscriber.name().to_string(),
                error,
            });
        }
    }
    failures
}

fn unmap_failure(
    answer: std::thread::Result<Result<(), UnmapError>>,
    region: PfnRange,
) -> Option<UnmapError> {
    match answer {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        // After a panic nothing is known about what is still mapped: the whole region.
        Err(panic) => Some(UnmapError {
            range: region,
            reason: format!("panicked: {}", panic_message(&panic)),
        }),
    }
}

fn failure_error(failures: Vec<Failure>) -> Option<ConversionError> {
    let others = failures.len().saturating_sub(1);
    failures
        .into_iter()
        .next()
        .map(|f| ConversionError::UnmapFailed {
            subscriber: f.subscriber,
            range: f.error.range,
            reason: f.error.reason,
            others,
        })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
