//! loom models of the change transaction (ARCHITECTURE.md's models 3-6, 8 and 8b), on a
//! one-chunk domain of four pages (middle blocks of two), every page backed.
//!
//! Subscribers are [`Mapper`]s: they hold exactly the blocks the plans gave them and record a
//! violation for any callback that contradicts what they hold or comes out of order.
//!
//! Planted bugs each model must find (see ARCHITECTURE.md, "Proving the models can fail";
//! under the cfg the model is `should_panic` with its own message):
//!
//! * `no_range_lock` (range locks exclude nothing): `overlapping_conversions_serialize`,
//!   `registration_vs_conversion`, `punch_hole_vs_conversion`;
//! * `activate_unlocked` (a registration goes live and replays without the domain's lock):
//!   `registration_vs_conversion`;
//! * `snapshot_per_phase` (the map phase looks the subscribers up again):
//!   `unregistered_subscriber_sees_whole_changes` (the subscriber being unregistered misses
//!   its `map`);
//! * `unregister_no_wait` (unregister returns without a grace period):
//!   `unregister_waits_for_callbacks`.
#![cfg(pfnstore_loom)]

use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
use pfnstore_core::sync::{Arc, Mutex, thread};
use pfnstore_core::{OffsetRange, Pfn, PfnRange};
use pfnstore_loom_tests::domains::{FILE, one_chunk, pages, register};
use pfnstore_loom_tests::mapper::{Callback, Mapper};
use pfnstore_loom_tests::model_builder;
use pfnstore_metadata::conversion::{Change, ChangeHooks, ConversionError, HookError, Interest};
use pfnstore_metadata::{MetadataError, PinOwner, Shareability};

/// Model 3: a conversion and a pin (taken as the facade takes it, under a shared range lock)
/// of the same pages. Either the pin lands first and the conversion fails with `Pinned`, or
/// the conversion completes and the pin sees the new shareability: never a pinned page whose
/// shareability changed under the pin.
#[test]
fn conversion_vs_pin() {
    model_builder().check(|| {
        let (_registry, d) = one_chunk();
        let converter = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 2), Shareability::Shared))
        };
        let seen_by_pin = {
            let _shared = d
                .domain
                .lock_shared(pages(0, 2))
                .expect("a plain thread waits");
            d.store
                .pin(PfnRange::new(Pfn(0), Pfn(2)).unwrap(), PinOwner(9))
                .expect("pinning backed pages");
            d.shareability(0)
        };
        match converter.join().unwrap() {
            Ok(_) => assert_eq!(
                seen_by_pin,
                Shareability::Shared,
                "pinned page changed shareability"
            ),
            Err(ConversionError::Metadata(MetadataError::Pinned { first_pfn, owner })) => {
                assert_eq!((first_pfn, owner), (Pfn(0), PinOwner(9)));
                assert_eq!(d.shareability(0), Shareability::Private);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    });
}

/// Model 4: two overlapping conversions are serialised: the final state is one of the two
/// orders, and a subscriber sees whole sequences, one change after the other, each unmapping
/// exactly what the one before mapped.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "no_range_lock",
    should_panic(expected = "not serialized")
)]
fn overlapping_conversions_serialize() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let mapper = std::sync::Arc::new(Mapper::new("kvm"));
        let _registration = register(&registry, &mapper, Interest::All);
        let other = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(1, 2), Shareability::Shared).map(drop))
        };
        let first = d
            .domain
            .convert(pages(0, 3), Shareability::Shared)
            .map(drop);
        let second = d
            .domain
            .convert(pages(1, 2), Shareability::Private)
            .map(drop);
        let other = other.join().unwrap();
        assert_eq!(
            (first, second, other),
            (Ok(()), Ok(()), Ok(())),
            "not serialized: a conversion failed"
        );
        let share = |p| d.shareability(p) == Shareability::Shared;
        let final_state = [share(0), share(1), share(2)];
        // Main's two conversions are ordered; the other thread's lands before, between or after.
        assert!(
            final_state == [true, false, true] || final_state == [true, true, true],
            "not serialized: final state {final_state:?}"
        );
        mapper.check(&d.domain, "not serialized");
    });
}

/// Model 5: a subscriber that registers while a conversion runs gets the replay of one
/// consistent state and then whole sequences: it is never told to unmap a block it was not
/// told to map, and in the end holds exactly what the domain maps.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "activate_unlocked",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "registration")
)]
fn registration_vs_conversion() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let converter = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).map(drop))
        };
        let late = std::sync::Arc::new(Mapper::new("late"));
        let registration = register(&registry, &late, Interest::File(FILE));
        converter
            .join()
            .unwrap()
            .expect("registration: the conversion failed");
        assert_eq!(
            late.events().first(),
            Some(&Callback::Replay),
            "registration: the first callback was not the replay"
        );
        late.check(&d.domain, "registration");
        drop(registration);
    });
}

/// A ZERO conversion's store work: touches the memory (if it still has any) after every
/// subscriber unmapped and before the flip.
struct ZeroMemory {
    backed: Arc<Mutex<bool>>,
    touching: Arc<AtomicBool>,
}

impl ChangeHooks for ZeroMemory {
    fn unmapped(&mut self, _: &Change<'_>, _: &[OffsetRange]) -> Result<(), HookError> {
        if *self.backed.lock() {
            self.touching.store(true, Ordering::SeqCst);
            thread::yield_now();
            self.touching.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A punch-hole's store work: frees the memory after the flip.
struct FreeMemory {
    backed: Arc<Mutex<bool>>,
    touching: Arc<AtomicBool>,
}

impl ChangeHooks for FreeMemory {
    fn changed(&mut self, _: &Change<'_>, _: &[OffsetRange]) {
        assert!(
            !self.touching.load(Ordering::SeqCst),
            "memory freed while a conversion touches it"
        );
        *self.backed.lock() = false;
    }
}

/// Model 6: punching a hole (every subscriber unmaps, the metadata flips, the memory is freed)
/// against a ZERO conversion that touches the memory before its flip: the memory is never
/// freed while it is touched, nor touched after it is freed.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "no_range_lock",
    should_panic(expected = "memory freed while")
)]
fn punch_hole_vs_conversion() {
    model_builder().check(|| {
        let (_registry, d) = one_chunk();
        let backed = Arc::new(Mutex::new(true));
        let touching = Arc::new(AtomicBool::new(false));
        let converter = {
            let domain = Arc::clone(&d.domain);
            let mut zero = ZeroMemory {
                backed: Arc::clone(&backed),
                touching: Arc::clone(&touching),
            };
            thread::spawn(move || {
                domain
                    .convert_with(pages(0, 2), Shareability::Shared, &mut zero)
                    .map(drop)
            })
        };
        let mut free = FreeMemory { backed, touching };
        d.domain.punch_with(pages(0, 2), &mut free).unwrap();
        converter.join().unwrap().unwrap();
    });
}

/// A subscriber whose `map` takes a while (it yields), saying when it is inside.
fn slow_mapper(inside: &Arc<AtomicBool>) -> std::sync::Arc<Mapper> {
    let inside = Arc::clone(inside);
    std::sync::Arc::new(Mapper::with("slow", None, move |callback, _| {
        if callback == Callback::Map {
            inside.store(true, Ordering::SeqCst);
            thread::yield_now();
            inside.store(false, Ordering::SeqCst);
        }
    }))
}

/// Model 8: unregistering while a callback runs waits for it: `unregister` never returns
/// during a callback, and no callback arrives after it returned.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "unregister_no_wait",
    should_panic(expected = "unregister")
)]
fn unregister_waits_for_callbacks() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let inside = Arc::new(AtomicBool::new(false));
        let slow = slow_mapper(&inside);
        let registration = register(&registry, &slow, Interest::All);
        let converter = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).unwrap())
        };
        registration.unregister();
        assert!(
            !inside.load(Ordering::SeqCst),
            "unregister returned during a callback"
        );
        let events_at_return = slow.events();
        converter.join().unwrap();
        assert_eq!(
            slow.events(),
            events_at_return,
            "a callback after unregister returned"
        );
    });
}

/// Model 8b: a subscriber unregistered while a change runs has seen that change whole (it
/// was in the change's snapshot: it gets every callback of it) or not at all.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "snapshot_per_phase",
    should_panic(expected = "partial sequence")
)]
fn unregistered_subscriber_sees_whole_changes() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let inside = Arc::new(AtomicBool::new(false));
        let slow = slow_mapper(&inside);
        let registration = register(&registry, &slow, Interest::All);
        let converter = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).unwrap())
        };
        registration.unregister();
        converter.join().unwrap();
        let problems = slow.problems();
        assert!(
            problems.is_empty(),
            "an unregistered subscriber saw a partial sequence: {problems:?}"
        );
    });
}
