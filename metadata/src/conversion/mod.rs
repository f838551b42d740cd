//! Changes of a guest-memory file's memory — conversions shared <-> private in place,
//! population, punch-holes — as all-or-nothing transactions, with every user of the memory
//! told through [`Subscriber`] callbacks instead of refcounts.
//!
//! A [`ConversionDomain`] is one file's view of this: its metadata store (keyed by page
//! offset), its range locks, its limits (size, largest physically contiguous block) and its
//! share of the store-wide [`SubscriberRegistry`].
//!
//! # The transaction
//!
//! Every change runs the same two-phase protocol (the details, and what subscribers see, are in
//! the [`Subscriber`] docs; the steps are in the `transaction` module):
//!
//! 1. lock the chunks the pages touch against other changes of the same file (readers of
//!    other pages and changes of other chunks and files go on);
//! 2. check: a pinned page fails a conversion or punch-hole with `Pinned { first_pfn, owner }`,
//!    a quarantined page fails a conversion or a population, before any subscriber hears of it;
//! 3. compute the [`MappingPlan`] without changing anything, and show it to `prepare`; a veto
//!    aborts the prepared subscribers and changes nothing;
//! 4. every subscriber unmaps the old blocks. A failure rolls back: the subscribers asked to
//!    unmap are told to map the old blocks again (`restore`), everyone gets `abort`, the
//!    shareability does not change, and the caller gets [`ConversionError::UnmapFailed`]
//!    naming the subscriber and its first failing page (the kernel's in-place conversion
//!    answers -EAGAIN with an error offset in the same situation). Only what a `restore`
//!    cannot map again is quarantined, and the error lists it;
//! 5. the metadata flips (and the caller's hooks do the store's own work: revoking the host
//!    view and zeroing before, restoring it after);
//! 6. every subscriber maps the new blocks. Merges are immediate: converting the last odd page
//!    of a block back makes the block uniform in the same transaction, and the plan says
//!    "unmap the small blocks, map the large one".
//!
//! # Why the whole chunk is locked
//!
//! The plan is computed from the state of the blocks around the changed pages. Two changes of
//! disjoint pages in one 1 GiB block would both split that block, and each would describe the
//! other's half-finished state to subscribers. Locking the chunk hull keeps plans exact; it
//! only serialises changes inside one chunk of one file. Callbacks may still read the pages
//! around the change (see [`RangeLocks`]).
//!
//! # Invariant the plans rely on
//!
//! A domain's mapping attributes (shareability, owner) change only under its range locks:
//! through this module's transactions, or code that holds a [`RangeGuard`]. In a file's
//! metadata the owner marks the offsets that have memory behind them: plans list backed
//! blocks only.

mod callback;
mod domain_core;
mod plan;
mod planner;
mod range_lock;
mod registry;
mod subscriber;
mod transaction;

use pfnstore_core::sync::Arc;
use pfnstore_core::{BlockRun, Geometry, OffsetRange, PageOffset, PageSize, Pfn, PfnRange};

pub use domain_core::DomainCore;
pub use plan::{MappingPlan, PlanEntry, Runs};
pub use range_lock::{LockError, RangeGuard, RangeLocks, chunk_hull};
pub use registry::{Registration, Snapshot, SubscriberId, SubscriberRegistry};
pub use subscriber::{Change, ChangeKind, Interest, Subscriber, UnmapError, Veto};

use crate::{FileId, MappingChange, MetadataError, MetadataStore, Shareability};

/// Why a change did not happen. Unless the variant says otherwise, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConversionError {
    /// Validation or metadata failure (bad range, pinned, quarantined, not managed...).
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// A subscriber refused in `prepare`; the prepared ones were aborted.
    #[error("conversion vetoed by {subscriber} at {first_page}: {reason}")]
    Vetoed {
        /// The first page the veto is about.
        first_page: PageOffset,
        /// The subscriber's name.
        subscriber: String,
        /// Its reason.
        reason: String,
    },
    /// A subscriber could not unmap `range`; the change was rolled back. `quarantined` lists
    /// what could not be mapped again by the subscribers asked to restore (those pages are
    /// quarantined in the metadata; everything else is as it was).
    #[error("{subscriber} failed to unmap {range}: {reason} (rolled back{})", quarantine_note(.quarantined))]
    UnmapFailed {
        /// The subscriber's name.
        subscriber: String,
        /// The pages it could not unmap (the first of them is the error offset).
        range: OffsetRange,
        /// Its reason.
        reason: String,
        /// Pages quarantined because a restore failed.
        quarantined: Vec<OffsetRange>,
    },
    /// A hook of the caller failed; the change was rolled back like an unmap failure.
    #[error("change of {range} aborted: {reason}")]
    Hook {
        /// The pages that were to change.
        range: OffsetRange,
        /// What failed.
        reason: String,
    },
    /// The calling thread already holds an overlapping range (a subscriber callback that
    /// operates on the pages of the change that called it, or a second change in its chunk).
    #[error("re-entrant operation on {requested}: this thread already holds {held}")]
    Reentrant {
        /// The pages asked for.
        requested: OffsetRange,
        /// The overlapping range the thread holds.
        held: OffsetRange,
    },
    /// Another thread's change holds `held`, and the calling thread (inside a callback, or
    /// holding a range lock) may not wait for it.
    #[error("operation on {requested} would wait for {held}, held by another change")]
    WouldBlock {
        /// The pages asked for.
        requested: OffsetRange,
        /// The range the other change holds.
        held: OffsetRange,
    },
    /// A subscription to a file that has no domain (never created, or gone).
    #[error("{file} does not exist")]
    NoSuchFile {
        /// The file asked for.
        file: FileId,
    },
}

fn quarantine_note(quarantined: &[OffsetRange]) -> String {
    if quarantined.is_empty() {
        String::new()
    } else {
        format!("; could not restore, quarantined: {quarantined:?}")
    }
}

pub(crate) fn lock_error(requested: OffsetRange, e: LockError) -> ConversionError {
    match e {
        LockError::Reentrant { held } => ConversionError::Reentrant {
            requested,
            held: held.cast(),
        },
        LockError::WouldBlock { held } => ConversionError::WouldBlock {
            requested,
            held: held.cast(),
        },
    }
}

/// A hook's failure: the change is rolled back and reported as [`ConversionError::Hook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// What failed.
    pub reason: String,
}

/// The caller's part of a change: what the store does with its memory at each step (see the
/// module docs). Every method has a no-op default.
pub trait ChangeHooks {
    /// Before any subscriber hears of the change (a population gets its memory here). An error
    /// ends the change with nothing done.
    fn before(&mut self, change: &Change<'_>, changed: &[OffsetRange]) -> Result<(), HookError> {
        let _ = (change, changed);
        Ok(())
    }

    /// Every subscriber unmapped the old blocks; the metadata flips next (revoke the host view,
    /// zero, free memory). An error rolls the change back.
    fn unmapped(&mut self, change: &Change<'_>, changed: &[OffsetRange]) -> Result<(), HookError> {
        let _ = (change, changed);
        Ok(())
    }

    /// The metadata flipped; subscribers map next.
    fn changed(&mut self, change: &Change<'_>, changed: &[OffsetRange]) {
        let _ = (change, changed);
    }

    /// The change was rolled back after `before` succeeded: undo what the hooks did.
    fn rolled_back(&mut self, change: &Change<'_>, changed: &[OffsetRange]) {
        let _ = (change, changed);
    }
}

/// Hooks that do nothing (a metadata-only domain).
impl ChangeHooks for () {}

/// The metadata changes of one transaction (one per changed range).
#[derive(Debug, Default)]
pub(crate) struct Flipped {
    first: Option<MappingChange>,
    more: Vec<MappingChange>,
}

impl Flipped {
    fn push(&mut self, change: MappingChange) {
        match self.first {
            None => self.first = Some(change),
            Some(_) => self.more.push(change),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &MappingChange> {
        self.first.iter().chain(self.more.iter())
    }
}

/// What a change did.
#[derive(Debug)]
pub struct ChangeOutcome {
    /// What subscribers were told to unmap and map.
    pub plan: MappingPlan,
    changed: transaction::Changed,
    changes: Flipped,
    /// How many subscribers took part.
    pub subscribers: usize,
}

impl ChangeOutcome {
    fn nothing(geometry: Geometry) -> ChangeOutcome {
        ChangeOutcome {
            plan: MappingPlan::empty(geometry),
            changed: transaction::Changed::default(),
            changes: Flipped::default(),
            subscribers: 0,
        }
    }

    /// The pages that really changed (a population's holes, a conversion's range), ascending;
    /// empty when the change was a no-op (already converted, already backed).
    pub fn changed(&self) -> &[OffsetRange] {
        self.changed.as_slice()
    }

    /// Whether nothing changed.
    pub fn is_noop(&self) -> bool {
        self.changed.is_empty()
    }

    /// The 1G and 2M blocks that lost their uniformity, as runs.
    pub fn splits(&self) -> impl Iterator<Item = BlockRun<PageOffset>> + '_ {
        self.changes
            .iter()
            .flat_map(|c| c.splits().map(BlockRun::cast))
    }

    /// The 1G and 2M blocks that became uniform, as runs.
    pub fn merges(&self) -> impl Iterator<Item = BlockRun<PageOffset>> + '_ {
        self.changes
            .iter()
            .flat_map(|c| c.merges().map(BlockRun::cast))
    }

    /// Blocks split, counted one by one.
    pub fn split_blocks(&self) -> u64 {
        self.splits().map(|r| r.count()).sum()
    }

    /// Blocks merged, counted one by one.
    pub fn merged_blocks(&self) -> u64 {
        self.merges().map(|r| r.count()).sum()
    }
}

/// The owner a file's metadata gives the pages past the file's end (its metadata covers
/// whole chunks). No file has this id.
pub const PAST_END: FileId = FileId(u32::MAX);

/// A domain's size and the largest block its memory is physically contiguous for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainLimits {
    /// Pages of the file; the metadata store covers whole chunks, the plans stop here.
    pub pages: u64,
    /// No plan entry, and no `max_mapping_size` answer, is larger than this: 4 KiB for
    /// ordinary pages, 2 MiB for 2 MiB hugetlb pages, the chunk for 1 GiB ones.
    pub max_block: PageSize,
}

/// One guest-memory file's changes: its metadata, range locks and subscribers.
#[derive(Debug)]
pub struct ConversionDomain {
    core: std::sync::Arc<DomainCore>,
    registry: std::sync::Arc<SubscriberRegistry>,
}

impl ConversionDomain {
    /// A domain for `file` over all of `store`, notifying the subscribers of `registry`.
    pub fn new(
        file: FileId,
        store: Arc<MetadataStore>,
        registry: std::sync::Arc<SubscriberRegistry>,
    ) -> Self {
        let pages = store.span().end().0;
        ConversionDomain::with_limits(
            file,
            store,
            registry,
            DomainLimits {
                pages,
                max_block: PageSize::Size1G,
            },
        )
    }

    /// A domain for the first `limits.pages` pages of `store`, with plans capped at
    /// `limits.max_block`.
    pub fn with_limits(
        file: FileId,
        store: Arc<MetadataStore>,
        registry: std::sync::Arc<SubscriberRegistry>,
        limits: DomainLimits,
    ) -> Self {
        // The metadata covers whole chunks: mark the pages past the file's end, so that no
        // uniform block (and so no plan, no huge mapping) reaches past it. (Unbacked pages
        // inside the file have no owner; backed ones have the file.)
        let span_end = store.span().end();
        if let Ok(tail) = PfnRange::new(Pfn(limits.pages), span_end) {
            let _ = store.assign_owner(tail, PAST_END);
        }
        let core = registry.add_domain(file, store, limits.pages, limits.max_block);
        ConversionDomain { core, registry }
    }

    /// The file this domain belongs to.
    pub fn file(&self) -> FileId {
        self.core.file
    }

    /// The domain's metadata (keyed by page offset, as [`Pfn`]s of an abstract space).
    pub fn store(&self) -> &MetadataStore {
        &self.core.store
    }

    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        self.core.store.geometry()
    }

    /// The domain's limits.
    pub fn limits(&self) -> DomainLimits {
        DomainLimits {
            pages: self.core.pages,
            max_block: self.core.max_block,
        }
    }

    /// The domain's range locks.
    pub fn locks(&self) -> &RangeLocks {
        &self.core.locks
    }

    /// Locks the chunks `range` touches exclusively, as changes do.
    pub fn lock(&self, range: OffsetRange) -> Result<RangeGuard<'_>, ConversionError> {
        self.core
            .locks
            .lock_chunks(&self.geometry(), range.cast())
            .map_err(|e| lock_error(range, e))
    }

    /// Locks `range` shared: excludes changes of it, not other readers.
    pub fn lock_shared(&self, range: OffsetRange) -> Result<RangeGuard<'_>, ConversionError> {
        self.core
            .locks
            .lock_shared(range.cast())
            .map_err(|e| lock_error(range, e))
    }

    /// The largest naturally aligned block around `page` whose mapping attributes are
    /// uniform, capped at the domain's largest block. Lock-free for uniform chunks.
    pub fn max_mapping_size(&self, page: PageOffset) -> Result<PageSize, MetadataError> {
        self.core.max_mapping_size(Pfn(page.0))
    }

    /// The old name of [`ConversionDomain::max_mapping_size`] (it returns a size, not an order).
    #[deprecated(since = "0.2.0", note = "renamed to max_mapping_size")]
    pub fn max_mapping_order(&self, page: PageOffset) -> Result<PageSize, MetadataError> {
        self.max_mapping_size(page)
    }

    /// The plan that maps everything backed now (what a replay delivers).
    pub fn current_plan(&self) -> Result<MappingPlan, MetadataError> {
        planner::Planner { core: &self.core }.current()
    }

    /// The backed blocks that intersect `range` as a plan describes them now: what a
    /// subscriber that maps every block holds there (whole blocks, possibly reaching past
    /// `range`).
    pub fn blocks_in(&self, range: OffsetRange) -> Result<MappingPlan, MetadataError> {
        planner::Planner { core: &self.core }.blocks_in(range.cast())
    }

    /// Converts `range` to `to`: the transaction of the module docs, without hooks.
    pub fn convert(
        &self,
        range: OffsetRange,
        to: Shareability,
    ) -> Result<ChangeOutcome, ConversionError> {
        self.convert_with(range, to, &mut ())
    }

    /// [`ConversionDomain::convert`] with the caller's hooks.
    pub fn convert_with(
        &self,
        range: OffsetRange,
        to: Shareability,
        hooks: &mut dyn ChangeHooks,
    ) -> Result<ChangeOutcome, ConversionError> {
        self.run(ChangeKind::Convert { to }, range, hooks)
    }

    /// Gives memory to the pages of `range` that have none (marks them owned by the file),
    /// telling subscribers what they may map now. Quarantined pages refuse.
    pub fn populate_with(
        &self,
        range: OffsetRange,
        hooks: &mut dyn ChangeHooks,
    ) -> Result<ChangeOutcome, ConversionError> {
        self.run(ChangeKind::Populate, range, hooks)
    }

    /// Takes the memory away from the backed pages of `range`, every subscriber unmapping
    /// first. Pinned pages refuse.
    pub fn punch_with(
        &self,
        range: OffsetRange,
        hooks: &mut dyn ChangeHooks,
    ) -> Result<ChangeOutcome, ConversionError> {
        self.run(ChangeKind::Punch, range, hooks)
    }

    /// The subscribers interested in this domain now (for tests and statistics).
    pub fn subscribers(&self) -> usize {
        self.registry.snapshot(&self.core).len()
    }
}
