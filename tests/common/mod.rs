//! Helpers shared by the facade's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex};

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    ConversionPlan, ConversionRequest, Invalidation, Store, StoreOptions, Subscriber, UnmapError,
    Veto,
};

pub const GIB: u64 = 1 << 30;
pub const PAGE: u64 = 4096;

/// A store of `chunks` synthetic chunks in `geometry` (PFNs from 0x100000).
pub fn synthetic(geometry: Geometry, chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(geometry, Pfn(1 << 20), chunks).expect("synthetic source");
    Store::synthetic(source, StoreOptions { shards }).expect("store")
}

/// 1/8/64-page blocks: every split and merge level within a few pages.
pub fn tiny() -> Geometry {
    Geometry::new(3, 6).unwrap()
}

/// What a [`Recorder`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Prepare(ConversionRequest),
    Commit(ConversionRequest, ConversionPlan),
    Abort(ConversionRequest),
    Invalidate(Invalidation),
}

/// A subscriber that records every callback and can veto.
#[derive(Debug, Default)]
pub struct Recorder {
    pub name: String,
    pub events: Mutex<Vec<Event>>,
    pub veto: Mutex<Option<String>>,
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

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, request: &ConversionRequest) -> Result<(), Veto> {
        self.events.lock().unwrap().push(Event::Prepare(*request));
        match self.veto.lock().unwrap().clone() {
            Some(reason) => Err(Veto::new(reason)),
            None => Ok(()),
        }
    }

    fn abort(&self, request: &ConversionRequest) {
        self.events.lock().unwrap().push(Event::Abort(*request));
    }

    fn commit(&self, request: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Commit(*request, plan.clone()));
        Ok(())
    }

    fn invalidate(&self, invalidation: &Invalidation) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Invalidate(invalidation.clone()));
        Ok(())
    }
}

/// `Arc<T>` as the trait object the store registers.
pub fn dyn_sub<T: Subscriber + 'static>(s: &Arc<T>) -> Arc<dyn Subscriber> {
    Arc::clone(s) as Arc<dyn Subscriber>
}
