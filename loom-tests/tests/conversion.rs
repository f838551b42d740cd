//! loom models of the conversion transaction (issue 7, models 3-6 and 8), on a one-chunk
//! domain of four pages (middle blocks of two).
//!
//! Four of them have a test-only mutation that breaks what they check. Built with it, the
//! model is expected to fail (`should_panic` with the model's own message), so the mutation
//! run passes only if loom finds the violation (see ARCHITECTURE.md, "Proving the models can
//! fail"):
//!
//! * `--cfg pfnstore_loom_mutation="no_range_lock"`: `overlapping_conversions_serialize` and
//!   `punch_hole_vs_conversion`;
//! * `--cfg pfnstore_loom_mutation="snapshot_per_phase"`: `registration_vs_conversion`;
//! * `--cfg pfnstore_loom_mutation="unregister_no_wait"`: `unregister_waits_for_callbacks`.
#![cfg(pfnstore_loom)]

use pfnstore_core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use pfnstore_core::sync::{Arc, Mutex, thread};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use pfnstore_loom_tests::model_builder;
use pfnstore_metadata::conversion::{
    ConversionDomain, ConversionError, ConversionPlan, ConversionRequest, Interest, Invalidation,
    Subscriber, SubscriberRegistry, UnmapError, Veto,
};
use pfnstore_metadata::{FileId, MetadataError, MetadataStore, PinOwner, Shareability};

const FILE: FileId = FileId(1);

fn pages(a: u64, b: u64) -> PfnRange {
    PfnRange::new(Pfn(a), Pfn(b)).unwrap()
}

fn domain() -> (
    Arc<MetadataStore>,
    std::sync::Arc<SubscriberRegistry>,
    Arc<ConversionDomain>,
) {
    let geometry = Geometry::new(1, 2).unwrap();
    let store = Arc::new(MetadataStore::new(geometry, pages(0, 4)).unwrap());
    store.add_chunk(Pfn(0), Shareability::Private).unwrap();
    let registry = std::sync::Arc::new(SubscriberRegistry::new());
    let domain = Arc::new(ConversionDomain::new(
        FILE,
        Arc::clone(&store),
        std::sync::Arc::clone(&registry),
    ));
    (store, registry, domain)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Prepare,
    Commit,
    Abort,
}

/// Records the callbacks it gets, in order.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Seen>>,
}

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn prepare(&self, _: &ConversionRequest) -> Result<(), Veto> {
        self.events.lock().push(Seen::Prepare);
        Ok(())
    }
    fn abort(&self, _: &ConversionRequest) {
        self.events.lock().push(Seen::Abort);
    }
    fn commit(&self, _: &ConversionRequest, _: &ConversionPlan) -> Result<(), UnmapError> {
        self.events.lock().push(Seen::Commit);
        Ok(())
    }
    fn invalidate(&self, _: &Invalidation) -> Result<(), UnmapError> {
        Ok(())
    }
}

/// Model 3: a conversion and a pin of the same pages. Either the pin lands first and the
/// conversion fails with `Pinned`, or the conversion completes and the pin sees the new
/// shareability: never a pinned page whose shareability changed under the pin.
#[test]
fn conversion_vs_pin() {
    model_builder().check(|| {
        let (store, _registry, domain) = domain();
        let converter = {
            let domain = Arc::clone(&domain);
            thread::spawn(move || domain.convert(pages(0, 2), Shareability::Shared))
        };
        store.pin(pages(0, 2), PinOwner(9)).unwrap();
        let seen_by_pin = store.attributes(Pfn(0)).unwrap().shareability;
        let converted = converter.join().unwrap();
        match converted {
            Ok(_) => assert_eq!(
                seen_by_pin,
                Shareability::Shared,
                "pinned page changed shareability"
            ),
            Err(ConversionError::Metadata(MetadataError::Pinned { first_pfn, owner })) => {
                assert_eq!((first_pfn, owner), (Pfn(0), PinOwner(9)));
                assert_eq!(
                    store.attributes(Pfn(0)).unwrap().shareability,
                    Shareability::Private
                );
            }
            Err(e) => panic!("unexpected {e}"),
        }
    });
}

/// Model 4: two overlapping conversions are serialised: the final state is one of the two
/// orders, and a subscriber sees whole prepare/commit pairs, one conversion after the other.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "no_range_lock",
    should_panic(expected = "not serialized")
)]
fn overlapping_conversions_serialize() {
    model_builder().check(|| {
        let (store, registry, domain) = domain();
        let recorder = std::sync::Arc::new(Recorder::default());
        let dyn_recorder: std::sync::Arc<dyn Subscriber> = recorder.clone();
        let _registration = registry.register(&dyn_recorder, Interest::All);
        let other = {
            let domain = Arc::clone(&domain);
            thread::spawn(move || domain.convert(pages(1, 2), Shareability::Shared).unwrap())
        };
        domain.convert(pages(0, 3), Shareability::Shared).unwrap();
        domain.convert(pages(1, 2), Shareability::Private).unwrap();
        other.join().unwrap();
        let share = |p| store.attributes(Pfn(p)).unwrap().shareability == Shareability::Shared;
        let final_state = [share(0), share(1), share(2)];
        // Main's two conversions are ordered; the other thread's lands before, between or after.
        assert!(
            final_state == [true, false, true] || final_state == [true, true, true],
            "not serialized: final state {final_state:?}"
        );
        let events = recorder.events.lock().clone();
        for pair in events.chunks(2) {
            assert_eq!(
                pair,
                [Seen::Prepare, Seen::Commit],
                "not serialized: callbacks {events:?}"
            );
        }
    });
}

/// Model 5: a subscriber that registers while a conversion is in flight sees all of it or
/// none of it.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "snapshot_per_phase",
    should_panic(expected = "partial sequence")
)]
fn registration_vs_conversion() {
    model_builder().check(|| {
        let (_store, registry, domain) = domain();
        let converter = {
            let domain = Arc::clone(&domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).unwrap())
        };
        let recorder = std::sync::Arc::new(Recorder::default());
        let dyn_recorder: std::sync::Arc<dyn Subscriber> = recorder.clone();
        let registration = registry.register(&dyn_recorder, Interest::File(FILE));
        converter.join().unwrap();
        let events = recorder.events.lock().clone();
        assert!(
            events.is_empty() || events == [Seen::Prepare, Seen::Commit],
            "partial sequence: {events:?}"
        );
        drop(registration);
    });
}

/// Model 6: punching a hole (invalidate, then free) against a conversion that touches the
/// memory just before its flip (a ZERO conversion): the memory is never touched after, or
/// while, it is freed.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "no_range_lock",
    should_panic(expected = "memory freed while")
)]
fn punch_hole_vs_conversion() {
    model_builder().check(|| {
        let (_store, _registry, domain) = domain();
        let backed = Arc::new(Mutex::new(true));
        let touching = Arc::new(AtomicBool::new(false));
        let converter = {
            let (domain, backed, touching) = (
                Arc::clone(&domain),
                Arc::clone(&backed),
                Arc::clone(&touching),
            );
            thread::spawn(move || {
                domain.convert_with(pages(0, 2), Shareability::Shared, |_| {
                    if *backed.lock() {
                        touching.store(true, Ordering::SeqCst);
                        thread::yield_now();
                        touching.store(false, Ordering::SeqCst);
                    }
                    Ok(())
                })
            })
        };
        domain
            .invalidate(pages(0, 2), |_| {
                assert!(
                    !touching.load(Ordering::SeqCst),
                    "memory freed while a conversion touches it"
                );
                *backed.lock() = false;
            })
            .unwrap();
        converter.join().unwrap().unwrap();
    });
}

/// Counts its commits and says when one is running.
#[derive(Default)]
struct Slow {
    inside: AtomicBool,
    calls: AtomicUsize,
}

impl Subscriber for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn commit(&self, _: &ConversionRequest, _: &ConversionPlan) -> Result<(), UnmapError> {
        self.inside.store(true, Ordering::SeqCst);
        thread::yield_now();
        self.inside.store(false, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn invalidate(&self, _: &Invalidation) -> Result<(), UnmapError> {
        Ok(())
    }
}

/// Model 8: unregistering while a callback runs waits for it, and no callback arrives after
/// `unregister` returned.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "unregister_no_wait",
    should_panic(expected = "unregister")
)]
fn unregister_waits_for_callbacks() {
    model_builder().check(|| {
        let (_store, registry, domain) = domain();
        let slow = std::sync::Arc::new(Slow::default());
        let dyn_slow: std::sync::Arc<dyn Subscriber> = slow.clone();
        let registration = registry.register(&dyn_slow, Interest::All);
        let converter = {
            let domain = Arc::clone(&domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).unwrap())
        };
        registration.unregister();
        assert!(
            !slow.inside.load(Ordering::SeqCst),
            "unregister returned during a callback"
        );
        let calls_at_return = slow.calls.load(Ordering::SeqCst);
        converter.join().unwrap();
        assert_eq!(
            slow.calls.load(Ordering::SeqCst),
            calls_at_return,
            "a callback after unregister"
        );
    });
}
