//! Subscribers: the users of the memory (KVM's MMU, an IOMMU mapper, the host view) that are
//! told about every change instead of holding refcounts.

use std::fmt;

use pfnstore_core::PfnRange;

use super::plan::ConversionPlan;
use crate::{FileId, Shareability};

/// What a conversion is about to do, as shown to [`Subscriber::prepare`], `commit` and `abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionRequest {
    /// The domain (guest-memory file) whose pages convert.
    pub file: FileId,
    /// The pages (file page offsets, or PFNs for a physical domain) that convert.
    pub range: PfnRange,
    /// The shareability they convert to.
    pub to: Shareability,
}

/// Pages that go away (punch-hole, truncate, free) and must be unmapped by every user first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The domain whose pages go away.
    pub file: FileId,
    /// The pages that go away.
    pub range: PfnRange,
    /// The mapped blocks covering them, as they are mapped now.
    pub plan: ConversionPlan,
}

/// A subscriber's refusal of a conversion in `prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veto {
    /// The first page the refusal is about, if the subscriber knows it (else the conversion's
    /// first page is reported).
    pub first_page: Option<pfnstore_core::Pfn>,
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
    pub fn at(first_page: pfnstore_core::Pfn, reason: impl Into<String>) -> Veto {
        Veto {
            first_page: Some(first_page),
            reason: reason.into(),
        }
    }
}

/// A subscriber could not unmap some of the pages it was told to unmap.
///
/// The store quarantines exactly `range` (those pages are never handed out again) and reports
/// the failure to the caller of the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmapError {
    /// The pages that are still mapped.
    pub range: PfnRange,
    /// Why.
    pub reason: String,
}

/// A user of the memory, told about conversions and invalidations.
///
/// # Contract
///
/// * Callbacks run with no metadata lock held: a callback may query the store and operate on
///   *other* ranges. Converting or punching the range of the operation that called it returns
///   an error (`Reentrant`) instead of deadlocking.
/// * For one conversion a subscriber sees `prepare` then exactly one of `commit` or `abort`,
///   or nothing at all (if it registered after the conversion began, or the conversion failed
///   its pin check).
/// * `commit` receives the [`ConversionPlan`]: the blocks to unmap (as they were mapped before)
///   and the blocks to map afterwards (each uniform, with its new attributes). A subscriber
///   that maps at fixed granularity (iommufd) can follow it exactly.
/// * A panic in a callback is caught: in `prepare` it counts as a veto, in `commit` or
///   `invalidate` as a failure to unmap everything it was told to unmap.
pub trait Subscriber: Send + Sync {
    /// A short name for errors and logs.
    fn name(&self) -> &str;

    /// Asked before anything changes; an `Err` vetoes the conversion.
    fn prepare(&self, request: &ConversionRequest) -> Result<(), Veto> {
        let _ = request;
        Ok(())
    }

    /// The conversion was abandoned after this subscriber prepared it.
    fn abort(&self, request: &ConversionRequest) {
        let _ = request;
    }

    /// The conversion happened: unmap `plan.unmap()`, then map what `plan.map()` allows.
    fn commit(&self, request: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError>;

    /// Pages go away: unmap every block of `invalidation.plan.unmap()`.
    fn invalidate(&self, invalidation: &Invalidation) -> Result<(), UnmapError>;
}

impl fmt::Debug for dyn Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subscriber({})", self.name())
    }
}

/// Which operations a subscriber hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interest {
    /// Every file of the store.
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
