//! Reference subscribers that behave like the real users of guest memory, check every plan
//! they are given, and can be told to misbehave (veto, fail an unmap, panic) so that tests can
//! drive the store's error paths.
//!
//! * [`IommuMapper`]: an iommufd-like DMA mapper. It maps shared blocks at the granularity the
//!   plans give and enforces iommufd's rule that an unmap must cover whole earlier mappings.
//!   Its mapping count shows what a VFIO user pays: one mapping per uniform block, not one
//!   per 4 KiB page.
//! * [`KvmMmu`]: a KVM-like MMU with a private and a shared table of huge and small mappings.
//!   It checks, against the store, that it never holds a block whose attributes are mixed or
//!   a private block in the shared (host-visible) table.
//!
//! Both record violations instead of panicking; tests assert that there are none.

mod iommu;
mod kvm;

pub use iommu::IommuMapper;
pub use kvm::KvmMmu;

use pfnstore_core::PfnRange;
use pfnstore_core::sync::Mutex;

use crate::metadata::conversion::{UnmapError, Veto};

/// Which callback a fault is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    /// `prepare`.
    Prepare,
    /// `commit`.
    Commit,
    /// `invalidate`.
    Invalidate,
}

/// Misbehaviour to inject into a reference subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Veto every conversion with this reason.
    pub veto: Option<String>,
    /// Fail to unmap any block that overlaps these pages.
    pub fail_unmap: Option<PfnRange>,
    /// Panic in this callback.
    pub panic_in: Option<Callback>,
}

/// The injected faults of one subscriber.
#[derive(Debug, Default)]
pub(crate) struct Faults(Mutex<FaultPlan>);

impl Faults {
    pub(crate) fn set(&self, plan: FaultPlan) {
        *self.0.lock() = plan;
    }

    pub(crate) fn on_prepare(&self) -> Result<(), Veto> {
        let plan = self.0.lock().clone();
        if plan.panic_in == Some(Callback::Prepare) {
            panic!("injected panic in prepare");
        }
        match plan.veto {
            Some(reason) => Err(Veto::new(reason)),
            None => Ok(()),
        }
    }

    pub(crate) fn on_unmap_callback(&self, callback: Callback) {
        if self.0.lock().panic_in == Some(callback) {
            panic!("injected panic in {callback:?}");
        }
    }

    /// Fails the unmap of `block` if it overlaps the injected range.
    pub(crate) fn check_unmap(&self, block: PfnRange) -> Result<(), UnmapError> {
        match self.0.lock().fail_unmap {
            Some(fail) if fail.overlaps(&block) => Err(UnmapError {
                range: block,
                reason: "injected unmap failure".to_string(),
            }),
            _ => Ok(()),
        }
    }
}
