//! Subscribers: the users of the memory (KVM's MMU, an IOMMU mapper, a vhost-user backend)
//! that are told about every change instead of holding refcounts.

use std::fmt;

use pfnstore_core::{OffsetRange, PageOffset, PageSize};

use super::plan::MappingPlan;
use crate::{FileId, Shareability};

/// What kind of change a [`Change`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Pages convert to `to` in place (same memory).
    Convert {
        /// The shareability they convert to.
        to: Shareability,
    },
    /// Memory arrived behind pages that had none (populate, a first-touch fault, a write).
    /// RamDiscardManager's `notify_populate`.
    Populate,
    /// Memory leaves pages (punch-hole, truncate, the file's end). RamDiscardManager's
    /// `notify_discard`.
    Punch,
    /// The subscriber just registered: `map` describes everything mapped now.
    /// RamDiscardManager's `replay_populated`.
    Replay,
}

/// One change of a file's memory, as every callback sees it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The file (domain) whose memory changes.
    pub file: FileId,
    /// What happens.
    pub kind: ChangeKind,
    /// The pages asked for (a conversion's range, a punched range, the offsets populated).
    pub range: OffsetRange,
    /// The blocks to unmap and to map.
    pub plan: &'a MappingPlan,
}

/// A subscriber's refusal of a conversion in `prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veto {
    /// The first page the refusal is about, if the subscriber knows it (else the conversion's
    /// first page is reported).
    pub first_page: Option<PageOffset>,
    /// Why.
    pub reason: String,
}

impl Veto {
    /// A refusal about the whole request.
    pub fn new(reason: impl Into<String>) -> Veto {
        Veto {
            first_page: None,
            reason: reason.into(),
        }
    }

    /// A refusal that names the first offending page.
    pub fn at(first_page: PageOffset, reason: impl Into<String>) -> Veto {
        Veto {
            first_page: Some(first_page),
            reason: reason.into(),
        }
    }
}

/// A subscriber could not unmap (or, in `restore`, map again) some of the blocks it was told
/// about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmapError {
    /// The pages it failed on.
    pub range: OffsetRange,
    /// Why.
    pub reason: String,
}

/// A user of the memory, told about every change of the files it is interested in.
///
/// # The protocol
///
/// Every change (conversion, population, punch-hole) is a two-phase transaction with the same
/// [`Change`] (and so the same [`MappingPlan`]) in every callback:
///
/// 1. `prepare` (conversions only): the change and its plan, before anything happened. An
///    `Err` vetoes: the ones already prepared get `abort`, nothing changes.
/// 2. `unmap`: unmap every block of `plan.unmap()` that you hold. An `Err` rolls the change
///    back: every subscriber that was asked to unmap (you included) gets `restore` (map the
///    blocks of `plan.unmap()` again), then everyone gets `abort`; the caller's error names
///    you and your first failing page. Only what a `restore` cannot map again is quarantined.
/// 3. The metadata changes (and the store does its own work: revoking the host view, zeroing,
///    freeing memory).
/// 4. `map`: map whatever of `plan.map()` you want. This cannot fail the change.
///
/// A subscriber sees, for one change, `[prepare] → unmap → map`, or `[prepare] → abort`, or
/// `[prepare] → unmap → restore → abort`, or nothing at all (it registered after the change
/// began, or the change failed its checks). A `Replay` is a single `map`.
///
/// # The invariant
///
/// What a subscriber was told to map (by `map`, `restore` or a replay) is exactly what the
/// next plan that touches those pages tells it to unmap, provided it maps by the plan's
/// blocks (or, if it maps runs, by [`MappingPlan::map_runs`] with a boundary no larger than
/// the one it asks for in [`Subscriber::run_boundary`]). A subscriber that maps only some of
/// the blocks (shared ones, say) unmaps the same subset.
///
/// # What a callback may do
///
/// Callbacks run under the change's range lock and no other lock of the store. A callback
/// may query the store, read and write pages that the change does not touch (in the same
/// chunk too), and operate on other chunks and files; an operation on the pages being changed,
/// or a second change in the same chunk, returns `Reentrant`; an operation that would have to
/// wait for another thread's change returns `WouldBlock` instead of waiting. Nothing hangs.
///
/// A panic is caught: in `prepare` it counts as a veto, in `unmap` or `restore` as a failure
/// of the whole plan region; in `map` or `abort` it is ignored.
///
/// The store holds subscribers weakly: when the last `Arc` of a subscriber is dropped it is
/// simply no longer called (its registration stays until dropped).
pub trait Subscriber: Send + Sync {
    /// A short name for errors and logs.
    fn name(&self) -> &str;

    /// The boundary at which this subscriber cuts the runs it maps, if it maps runs rather
    /// than blocks (see [`MappingPlan::map_runs`]); plans are then widened so that the runs
    /// forms are exact at that boundary.
    fn run_boundary(&self) -> Option<PageSize> {
        None
    }

    /// Asked before a conversion changes anything, with the plan it would get; an `Err`
    /// vetoes the conversion.
    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        let _ = change;
        Ok(())
    }

    /// Unmap the blocks of `change.plan.unmap()` that you hold.
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError>;

    /// The change happened: map what you want of `change.plan.map()`.
    fn map(&self, change: &Change<'_>);

    /// The change is rolled back after you were asked to unmap: map the blocks of
    /// `change.plan.unmap()` again (those you still hold stay as they are). An `Err` means the
    /// old blocks cannot be restored: the pages it names are quarantined.
    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError>;

    /// The change was abandoned after you saw `prepare` or `unmap` (and, if you unmapped,
    /// `restore`).
    fn abort(&self, change: &Change<'_>) {
        let _ = change;
    }
}

impl fmt::Debug for dyn Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subscriber({})", self.name())
    }
}

/// Which files a subscriber hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interest {
    /// Every file of the store, present and future.
    All,
    /// One file.
    File(FileId),
}

impl Interest {
    /// Whether an operation on `file` concerns this interest.
    pub fn covers(&self, file: FileId) -> bool {
        match self {
            Interest::All => true,
            Interest::File(f) => *f == file,
        }
    }
}
