//! Reference subscribers that behave like the real users of guest memory, check every plan
//! they are given, and can be told to misbehave (veto, fail an unmap or a restore, panic) so
//! that tests can drive the store's error paths. They are examples of how to write a
//! subscriber as much as test tools.
//!
//! * [`IommuMapper`]: a DMA mapper. Per block (iommufd mapping exactly the plan's blocks),
//!   per run cut at a boundary (vfio type1: one `MAP_DMA` per shared run, bounded remapping),
//!   or per 4 KiB page (what QEMU and cloud-hypervisor do today, counted only). It enforces
//!   the rule that an unmap must cover whole earlier mappings, and counts mappings, calls and
//!   bytes remapped.
//! * [`KvmMmu`]: a KVM-like MMU with a private and a shared table of huge and small mappings,
//!   filled by faults and by the plans. It checks, against the store, that it never holds a
//!   block whose attributes are mixed or a private block in the shared (host-visible) table,
//!   and follows KVM's invalidation protocol (`mmu_invalidate_seq`, `_in_progress`).
//!
//! Both record violations instead of panicking; tests assert that there are none.

mod iommu;
mod kvm;

pub use iommu::{DmaPolicy, IommuMapper, MapperStats};
pub use kvm::KvmMmu;

use pfnstore_core::OffsetRange;
use pfnstore_core::sync::Mutex;

use crate::metadata::conversion::{UnmapError, Veto};

/// Which callback a panic is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    /// `prepare`.
    Prepare,
    /// `unmap`.
    Unmap,
    /// `map`.
    Map,
    /// `restore`.
    Restore,
}

/// Misbehaviour to inject into a reference subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Misbehaviour {
    /// Veto every conversion with this reason.
    pub veto: Option<String>,
    /// Fail to unmap when a change touches these pages.
    pub fail_unmap: Option<OffsetRange>,
    /// Fail to restore too (after failing to unmap), so that the pages are quarantined.
    pub fail_restore: bool,
    /// Panic in this callback.
    pub panic_in: Option<Callback>,
}

impl Misbehaviour {
    /// Nothing wrong.
    pub fn none() -> Misbehaviour {
        Misbehaviour::default()
    }

    /// Veto every conversion.
    pub fn veto(reason: impl Into<String>) -> Misbehaviour {
        Misbehaviour {
            veto: Some(reason.into()),
            ..Misbehaviour::default()
        }
    }

    /// Fail to unmap changes that touch `pages`; with `restore_too`, fail to map them back.
    pub fn fail_unmap(pages: OffsetRange, restore_too: bool) -> Misbehaviour {
        Misbehaviour {
            fail_unmap: Some(pages),
            fail_restore: restore_too,
            ..Misbehaviour::default()
        }
    }

    /// Panic in `callback`.
    pub fn panic_in(callback: Callback) -> Misbehaviour {
        Misbehaviour {
            panic_in: Some(callback),
            ..Misbehaviour::default()
        }
    }
}

/// The injected misbehaviour of one subscriber.
#[derive(Debug, Default)]
pub(crate) struct Injected(Mutex<Misbehaviour>);

impl Injected {
    pub(crate) fn set(&self, m: Misbehaviour) {
        *self.0.lock() = m;
    }

    fn get(&self) -> Misbehaviour {
        self.0.lock().clone()
    }

    pub(crate) fn on(&self, callback: Callback) {
        if self.get().panic_in == Some(callback) {
            panic!("injected panic in {callback:?}");
        }
    }

    pub(crate) fn on_prepare(&self) -> Result<(), Veto> {
        self.on(Callback::Prepare);
        match self.get().veto {
            Some(reason) => Err(Veto::new(reason)),
            None => Ok(()),
        }
    }

    /// Fails an unmap of a change whose region overlaps the injected pages.
    pub(crate) fn on_unmap(&self, region: Option<OffsetRange>) -> Result<(), UnmapError> {
        self.on(Callback::Unmap);
        match (self.get().fail_unmap, region) {
            (Some(fail), Some(region)) if fail.overlaps(&region) => Err(UnmapError {
                range: fail,
                reason: "injected unmap failure".to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Fails a restore if asked to (after an injected unmap failure).
    pub(crate) fn on_restore(&self, region: Option<OffsetRange>) -> Result<(), UnmapError> {
        self.on(Callback::Restore);
        let m = self.get();
        match (m.fail_unmap, region) {
            (Some(fail), Some(region)) if m.fail_restore && fail.overlaps(&region) => {
                Err(UnmapError {
                    range: fail,
                    reason: "injected restore failure".to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}
