//! Helpers shared by the facade's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex};

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    Change, ChangeKind, MappingPlan, OffsetRange, PageOffset, Store, StoreOptions, Subscriber,
    UnmapError, Veto,
};

pub const GIB: u64 = 1 << 30;
pub const PAGE: u64 = 4096;

/// A store of `chunks` synthetic chunks in `geometry` (PFNs from 0x100000).
pub fn synthetic(geometry: Geometry, chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(geometry, Pfn(1 << 20), chunks).expect("synthetic source");
    Store::synthetic(source, StoreOptions::default().with_shards(shards)).expect("store")
}

/// 1/8/64-page blocks: every split and merge level within a few pages.
pub fn tiny() -> Geometry {
    Geometry::new(3, 6).unwrap()
}

/// Pages `a..b` of a file.
pub fn pages(a: u64, b: u64) -> OffsetRange {
    OffsetRange::new(PageOffset(a), PageOffset(b)).unwrap()
}

/// What a [`Recorder`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Prepare(ChangeKind, OffsetRange),
    Unmap(ChangeKind, MappingPlan),
    Map(ChangeKind, MappingPlan),
    Restore(ChangeKind),
    Abort(ChangeKind),
}

impl Event {
    /// The callback's name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Prepare(..) => "prepare",
            Event::Unmap(..) => "unmap",
            Event::Map(..) => "map",
            Event::Restore(..) => "restore",
            Event::Abort(..) => "abort",
        }
    }
}

/// A subscriber that records every callback and can veto or fail.
#[derive(Debug, Default)]
pub struct Recorder {
    pub name: String,
    pub events: Mutex<Vec<Event>>,
    pub veto: Mutex<Option<String>>,
    /// Fail the unmap of changes whose region overlaps these pages.
    pub fail_unmap: Mutex<Option<OffsetRange>>,
}

impl Recorder {
    pub fn new(name: &str) -> Arc<Recorder> {
        Arc::new(Recorder {
            name: name.to_string(),
            ..Default::default()
        })
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The callbacks' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.events().iter().map(Event::name).collect()
    }

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Prepare(change.kind, change.range));
        match self.veto.lock().unwrap().clone() {
            Some(reason) => Err(Veto::new(reason)),
            None => Ok(()),
        }
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Unmap(change.kind, change.plan.clone()));
        match *self.fail_unmap.lock().unwrap() {
            Some(fail) if change.plan.region().is_some_and(|r| r.overlaps(&fail)) => {
                Err(UnmapError {
                    range: fail,
                    reason: "recorder told to fail".into(),
                })
            }
            _ => Ok(()),
        }
    }

    fn map(&self, change: &Change<'_>) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Map(change.kind, change.plan.clone()));
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Restore(change.kind));
        Ok(())
    }

    fn abort(&self, change: &Change<'_>) {
        self.events.lock().unwrap().push(Event::Abort(change.kind));
    }
}

/// `Arc<T>` as the trait object the store registers.
pub fn dyn_sub<T: Subscriber + 'static>(s: &Arc<T>) -> Arc<dyn Subscriber> {
    Arc::clone(s) as Arc<dyn Subscriber>
}
