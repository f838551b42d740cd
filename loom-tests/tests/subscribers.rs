//! loom models of the subscriber protocol's harder corners (ARCHITECTURE.md's models 9-13):
//! a rollback next to other work, unregistering from a drop and under load, callbacks that
//! operate on another file or read their own chunk. Tiny domains (chunks of four pages,
//! middle blocks of two, every page backed), two threads each.
//!
//! Planted bugs each model must find (under the cfg the model is `should_panic` with its own
//! message; see ARCHITECTURE.md, "Proving the models can fail"):
//!
//! * `rollback_unlocked` (a failed change rolls back after releasing its range lock):
//!   `unmap_failure_rolls_back_alone`;
//! * `activate_unlocked` (see `conversion.rs`) breaks `registration_during_a_rollback` too;
//! * `unregister_waits_in_callback` (unregister waits for a grace period even from inside a
//!   callback): `unregister_from_inside_an_operation` (it waits for the operation it is part
//!   of: loom reports the spin as a livelock, "maximum number of branches");
//! * `unregister_waits_for_all` (a grace period also waits for the operations that started
//!   after it): `unregister_is_not_starved`;
//! * `callbacks_wait` (a thread inside a callback waits for another thread's range):
//!   `nested_changes_of_two_files` (two such waits in a cycle: loom reports the livelock);
//! * `shared_ignores_hull` (a shared lock conflicts only with the pages a change changes, not
//!   with its chunk): `callback_reads_its_own_chunk`;
//! * `no_range_lock` breaks both rollback models, `nested_changes_of_two_files` and
//!   `callback_reads_its_own_chunk` too.
#![cfg(pfnstore_loom)]

use std::sync::Mutex as StdMutex;

use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
use pfnstore_core::sync::{Arc, thread};
use pfnstore_core::{OffsetRange, PageOffset, Pfn};
use pfnstore_loom_tests::domains::{Domain, geometry, one_chunk, pages, register};
use pfnstore_loom_tests::mapper::{Callback, Mapper};
use pfnstore_loom_tests::model_builder;
use pfnstore_metadata::conversion::{
    Change, ChangeHooks, ConversionDomain, ConversionError, HookError, Interest, Registration,
    Subscriber, SubscriberRegistry, UnmapError,
};
use pfnstore_metadata::{FileId, Shareability};

/// Registers a healthy mapper, then one whose unmap of changes of page 0 fails (so that the
/// healthy one has unmapped when the failing one refuses).
fn healthy_and_failing(
    registry: &std::sync::Arc<SubscriberRegistry>,
) -> (
    std::sync::Arc<Mapper>,
    std::sync::Arc<Mapper>,
    [Registration; 2],
) {
    let healthy = std::sync::Arc::new(Mapper::new("healthy"));
    let failing = std::sync::Arc::new(Mapper::with("failing", Some(pages(0, 1)), |_, _| {}));
    let registrations = [
        register(registry, &healthy, Interest::All),
        register(registry, &failing, Interest::All),
    ];
    (healthy, failing, registrations)
}

/// The failing change's result: rolled back, the failing subscriber and page named, nothing
/// quarantined.
fn assert_rolled_back(result: Result<(), ConversionError>) {
    match result {
        Err(ConversionError::UnmapFailed {
            subscriber,
            range,
            quarantined,
            ..
        }) => {
            assert_eq!(subscriber, "failing", "rollback: wrong subscriber blamed");
            assert_eq!(range, pages(0, 1), "rollback: wrong error offset");
            assert!(
                quarantined.is_empty(),
                "rollback: quarantined {quarantined:?}"
            );
        }
        other => panic!("rollback: the failing change returned {other:?}"),
    }
}

/// Model 9: a change whose unmap fails rolls back (the subscribers asked to unmap map the old
/// blocks again, everyone is aborted, the shareability stays) while another thread converts a
/// page of the other chunk and then a page of the same chunk: that conversion never sees the
/// rolled-back chunk half-restored. Every subscriber sees whole sequences and ends up holding
/// exactly what is mapped.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "rollback_unlocked",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "rollback")
)]
fn unmap_failure_rolls_back_alone() {
    model_builder().check(|| {
        let registry = std::sync::Arc::new(SubscriberRegistry::new());
        let d = Domain::new(&registry, FileId(1), 2);
        let (healthy, failing, _registrations) = healthy_and_failing(&registry);
        let doomed = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).map(drop))
        };
        d.domain
            .convert(pages(4, 5), Shareability::Shared)
            .expect("rollback: the other chunk's conversion failed");
        d.domain
            .convert(pages(1, 2), Shareability::Shared)
            .expect("rollback: the same chunk's later conversion failed");
        assert_rolled_back(doomed.join().unwrap());
        let shared = |p| d.shareability(p) == Shareability::Shared;
        assert_eq!(
            [shared(0), shared(1), shared(4)],
            [false, true, true],
            "rollback: wrong final shareability"
        );
        for mapper in [&healthy, &failing] {
            mapper.check(&d.domain, "rollback");
        }
    });
}

/// Model 9b: a subscriber registers while a change fails and rolls back: its replay shows one
/// consistent state (the rollback is invisible to it), then whole sequences; everyone ends up
/// holding exactly what is mapped.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "activate_unlocked",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "rollback")
)]
fn registration_during_a_rollback() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let (healthy, failing, _registrations) = healthy_and_failing(&registry);
        let doomed = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).map(drop))
        };
        let late = std::sync::Arc::new(Mapper::new("late"));
        let _late = register(&registry, &late, Interest::All);
        assert_rolled_back(doomed.join().unwrap());
        assert_eq!(
            d.shareability(0),
            Shareability::Private,
            "rollback: the failed change took effect"
        );
        for mapper in [&healthy, &failing, &late] {
            mapper.check(&d.domain, "rollback");
        }
        assert_eq!(
            late.events().first(),
            Some(&Callback::Replay),
            "rollback: the late subscriber's first callback was not its replay"
        );
    });
}

/// A subscriber that owns its own registration: dropping its last reference unregisters it;
/// a quitter also unregisters itself from inside its first `map`.
struct SelfRegistered {
    quits_in_callback: bool,
    registration: StdMutex<Option<Registration>>,
}

impl SelfRegistered {
    fn new(
        registry: &std::sync::Arc<SubscriberRegistry>,
        quits_in_callback: bool,
    ) -> std::sync::Arc<SelfRegistered> {
        let subscriber = std::sync::Arc::new(SelfRegistered {
            quits_in_callback,
            registration: StdMutex::new(None),
        });
        let registration = register(registry, &subscriber, Interest::All);
        *subscriber.registration.lock().unwrap() = Some(registration);
        subscriber
    }
}

impl Subscriber for SelfRegistered {
    fn name(&self) -> &str {
        "self-registered"
    }
    fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {
        if self.quits_in_callback {
            // Taken out first: the unregistration runs with this mapper's own lock released.
            let registration = self.registration.lock().unwrap().take();
            drop(registration);
        }
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

/// Model 10: unregistering from inside an operation. One subscriber drops its own
/// registration inside its `map` callback; another owns its registration and the VMM drops its
/// last reference while an operation holds it in its snapshot, so that the unregistration may
/// run in the snapshot's drop, under the operation's range lock. Neither may wait for the
/// operation it is part of (which would spin for ever), and in the end nothing is registered.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "unregister_waits_in_callback",
    should_panic(expected = "maximum number of branches")
)]
fn unregister_from_inside_an_operation() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let quitter = SelfRegistered::new(&registry, true);
        let owned = SelfRegistered::new(&registry, false);
        let worker = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).unwrap())
        };
        drop(owned);
        worker.join().unwrap();
        assert_eq!(registry.len(), 0, "a subscriber is still registered");
        assert_eq!(
            d.domain.subscribers(),
            0,
            "the domain still calls a subscriber"
        );
        drop(quitter);
    });
}

/// Yields inside the operation (after it took its snapshot, so while it counts as in flight).
struct YieldInFlight;

impl ChangeHooks for YieldInFlight {
    fn before(&mut self, _: &Change<'_>, _: &[OffsetRange]) -> Result<(), HookError> {
        thread::yield_now();
        Ok(())
    }
}

/// Model 11: unregistering while another thread runs one operation after another (each
/// pausing while in flight) completes after at most the operations that started before it:
/// it is never starved by operations that began after it.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "unregister_waits_for_all",
    should_panic(expected = "starved")
)]
fn unregister_is_not_starved() {
    let builder = model_builder();
    // Each preemption of the unregistering thread lets the stream run one more operation; a
    // grace period itself waits for at most two (the one in flight, the one that yields next).
    let limit = 2 * builder.preemption_bound.unwrap_or(2) + 6;
    builder.check(move || {
        let (registry, d) = one_chunk();
        let leaving = std::sync::Arc::new(Mapper::new("leaving"));
        let registration = register(&registry, &leaving, Interest::All);
        let unregistered = Arc::new(AtomicBool::new(false));
        let stream = {
            let domain = Arc::clone(&d.domain);
            let unregistered = Arc::clone(&unregistered);
            thread::spawn(move || {
                let mut operations = 0;
                while !unregistered.load(Ordering::SeqCst) {
                    assert!(
                        operations < limit,
                        "unregister starved by a stream of {operations} operations"
                    );
                    let to = if operations % 2 == 0 {
                        Shareability::Shared
                    } else {
                        Shareability::Private
                    };
                    domain
                        .convert_with(pages(0, 1), to, &mut YieldInFlight)
                        .unwrap();
                    operations += 1;
                }
            })
        };
        registration.unregister();
        unregistered.store(true, Ordering::SeqCst);
        stream.join().unwrap();
    });
}

/// What the nested operations of [`nested_changes_of_two_files`] returned.
type Outcomes = std::sync::Arc<StdMutex<Vec<Result<(), ConversionError>>>>;

/// A mapper of one file whose `map` of a change of the file's page 0 converts page 1 of
/// `other` (a nested operation on another file, from inside a callback).
fn cross_mapper(name: &str, other: &Arc<ConversionDomain>, outcomes: &Outcomes) -> Mapper {
    let (other, outcomes) = (Arc::clone(other), std::sync::Arc::clone(outcomes));
    Mapper::with(name, None, move |callback, change| {
        if callback == Callback::Map && change.range == pages(0, 1) {
            let nested = other.convert(pages(1, 2), Shareability::Shared).map(drop);
            outcomes.lock().unwrap().push(nested);
        }
    })
}

/// Model 12: two files whose subscribers, inside callbacks, convert a page of the other file,
/// while each file converts on its own thread: nothing deadlocks; a nested operation either
/// succeeds or gets `WouldBlock`; both files' subscribers see whole sequences.
#[test]
#[cfg_attr(
    all(
        pfnstore_loom_mutation = "callbacks_wait",
        not(pfnstore_loom_mutation = "no_range_lock")
    ),
    should_panic(expected = "maximum number of branches")
)]
#[cfg_attr(
    pfnstore_loom_mutation = "no_range_lock",
    should_panic(expected = "nested")
)]
fn nested_changes_of_two_files() {
    model_builder().check(|| {
        let registry = std::sync::Arc::new(SubscriberRegistry::new());
        let a = Domain::new(&registry, FileId(1), 1);
        let b = Domain::new(&registry, FileId(2), 1);
        let outcomes: Outcomes = Default::default();
        let a_mapper = std::sync::Arc::new(cross_mapper("a-mmu", &b.domain, &outcomes));
        let b_mapper = std::sync::Arc::new(cross_mapper("b-mmu", &a.domain, &outcomes));
        let _ra = register(&registry, &a_mapper, Interest::File(FileId(1)));
        let _rb = register(&registry, &b_mapper, Interest::File(FileId(2)));
        let other = {
            let domain = Arc::clone(&b.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).map(drop))
        };
        let mine = a
            .domain
            .convert(pages(0, 1), Shareability::Shared)
            .map(drop);
        let other = other.join().unwrap();
        assert_eq!(
            (mine, other),
            (Ok(()), Ok(())),
            "nested: an outer change failed"
        );
        for nested in outcomes.lock().unwrap().iter() {
            assert!(
                matches!(nested, Ok(()) | Err(ConversionError::WouldBlock { .. })),
                "nested: a nested change returned {nested:?}"
            );
        }
        a_mapper.check(&a.domain, "nested");
        b_mapper.check(&b.domain, "nested");
    });
}

/// Model 13: a subscriber's callback reads (shared lock) a page of its own chunk outside the
/// change: granted, never `Reentrant` or `WouldBlock`, and it sees the page unchanged. Another
/// thread faults on that page (shared lock, then the largest uniform block, as KVM would map
/// it): it never sees a change half-way, so the block it gets is the one the subscriber holds.
#[test]
#[cfg_attr(
    any(
        pfnstore_loom_mutation = "shared_ignores_hull",
        pfnstore_loom_mutation = "no_range_lock"
    ),
    should_panic(expected = "fault")
)]
fn callback_reads_its_own_chunk() {
    model_builder().check(|| {
        let (registry, d) = one_chunk();
        let reads: std::sync::Arc<StdMutex<Vec<String>>> = Default::default();
        let kvm = {
            let (domain, reads) = (Arc::clone(&d.domain), std::sync::Arc::clone(&reads));
            std::sync::Arc::new(Mapper::with("kvm", None, move |callback, change| {
                if callback == Callback::Unmap && change.range == pages(0, 1) {
                    let seen = domain.lock_shared(pages(3, 4)).map(|_shared| {
                        domain
                            .store()
                            .attributes(Pfn(3))
                            .expect("page 3 is in the domain")
                            .shareability
                    });
                    reads.lock().unwrap().push(format!("{seen:?}"));
                }
            }))
        };
        let _registration = register(&registry, &kvm, Interest::All);
        let converter = {
            let domain = Arc::clone(&d.domain);
            thread::spawn(move || domain.convert(pages(0, 1), Shareability::Shared).map(drop))
        };
        {
            let _shared = d
                .domain
                .lock_shared(pages(3, 4))
                .expect("fault: a plain thread waits for the lock");
            let size = d.domain.max_mapping_size(PageOffset(3)).unwrap();
            let g = geometry();
            let block = g
                .block_containing(PageOffset(3), size)
                .expect("page 3 has a block")
                .range(&g);
            let held = kvm.held();
            assert!(
                held.get(&block.start().0)
                    .is_some_and(|(end, _)| *end == block.end().0),
                "fault: answered block {block} while the subscriber holds {held:?}"
            );
        }
        converter
            .join()
            .unwrap()
            .expect("fault: the conversion failed");
        assert_eq!(
            *reads.lock().unwrap(),
            [format!(
                "{:?}",
                Ok::<_, ConversionError>(Shareability::Private)
            )],
            "fault: the callback's read of its own chunk"
        );
        kvm.check(&d.domain, "fault");
    });
}
