//! The registry of subscribers, and the snapshots that operations take of it.
//!
//! A [`Registration`] is the subscriber's lifetime in the store: the store holds the subscriber
//! while it is registered, and dropping the registration stops the calls and releases every
//! reference the store had (the registry's and the domains' copies), once the operations in
//! flight are done. The store is never kept alive by a subscriber as long as subscribers hold
//! the store weakly, as the reference subscribers do. An operation
//! takes a [`Snapshot`] of the matching subscribers when it starts and calls exactly those until
//! it ends, so a subscriber that registers mid-operation sees none of it. Unregistering waits
//! until no operation that may hold the subscriber is in flight, so no callback arrives after
//! [`Registration::unregister`] returns.
//!
//! # Why every domain keeps its own view
//!
//! Conversions of different files must not contend. A registry-wide lock (or per-entry
//! in-flight counters) taken by every operation makes two threads converting disjoint files
//! bounce the same cache lines and, under parking_lot, put each other to sleep: measured here,
//! two threads were slower than one. So each domain (file) keeps a [`DomainView`]: its own copy
//! of the interested subscribers, tagged with the registry's generation, and its own in-flight
//! counter. An operation touches only its domain's view; it goes to the registry only when the
//! generation moved (someone registered or unregistered). Unregistering bumps the generation,
//! then waits until every domain has no operation in flight: an operation that started after
//! the bump sees the new generation and a list without the subscriber (the counter is raised
//! before the generation is read, both sequentially consistent, so one side always sees the
//! other).

use std::cell::Cell;
// Subscribers are the VMM's objects, handed over as `Arc<dyn Subscriber>` (loom's
// `Arc` cannot hold a trait object or be a method receiver). Only their reference counts live
// here; every lock, counter and wait goes through the sync facade and is modelled by loom.
use std::sync::{Arc, Weak};

use pfnstore_core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use pfnstore_core::sync::{CachePadded, Mutex, thread, thread_local};

use super::subscriber::{Interest, Subscriber};
use crate::FileId;

/// Identifies a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(u64);

#[derive(Debug)]
struct Entry {
    id: SubscriberId,
    interest: Interest,
    subscriber: Arc<dyn Subscriber>,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
    /// The views of the domains alive, to wait on when unregistering.
    domains: Vec<Weak<DomainView>>,
}

/// All subscribers of a store.
#[derive(Debug, Default)]
pub struct SubscriberRegistry {
    state: Mutex<State>,
    /// Bumped (under `state`) by every registration and unregistration.
    generation: AtomicU64,
}

/// The subscribers one domain calls, shared by its in-flight operations.
type Members = Arc<[Arc<dyn Subscriber>]>;

/// One domain's copy of the subscribers interested in it, and its in-flight operations.
///
/// The copy holds the subscribers strongly, so that an operation takes them with one
/// reference count of the domain's own instead of one contended count per subscriber; the
/// registry drops the copies whenever it changes.
#[derive(Debug)]
pub struct DomainView {
    file: FileId,
    /// Written by every operation of this domain: on a cache line of its own, so that two
    /// domains' views allocated side by side do not share one.
    in_flight: CachePadded<AtomicUsize>,
    /// (registry generation, subscribers interested in `file`).
    cached: CachePadded<Mutex<(u64, Members)>>,
}

thread_local! {
    /// How many subscriber callbacks the current thread is inside of. (Not a `const`
    /// initializer: loom's `thread_local!` does not take one.)
    #[allow(clippy::missing_const_for_thread_local)]
    static CALLBACK_DEPTH: Cell<usize> = Cell::new(0);
}

/// Marks the current thread as running a subscriber callback while alive.
pub(crate) struct InCallback(());

impl InCallback {
    pub(crate) fn enter() -> InCallback {
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

impl SubscriberRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        SubscriberRegistry::default()
    }

    /// Registers `subscriber` for `interest`, until the returned registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        subscriber: &Arc<dyn Subscriber>,
        interest: Interest,
    ) -> Registration {
        let mut state = self.state.lock();
        let id = SubscriberId(state.next_id);
        state.next_id += 1;
        state.entries.push(Entry {
            id,
            interest,
            subscriber: Arc::clone(subscriber),
        });
        self.generation.fetch_add(1, Ordering::SeqCst);
        Registration {
            registry: Arc::clone(self),
            id,
            done: false,
        }
    }

    /// A view for the domain of `file`; operations on that domain take their snapshots from it.
    pub fn view(&self, file: FileId) -> Arc<DomainView> {
        let view = Arc::new(DomainView {
            file,
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            // Generation 0 is never current once anything registered; an empty registry at
            // generation 0 has nothing to list anyway.
            cached: CachePadded::new(Mutex::new((0, Arc::from(Vec::new())))),
        });
        let mut state = self.state.lock();
        state.domains.retain(|d| d.strong_count() > 0);
        state.domains.push(Arc::downgrade(&view));
        view
    }

    /// The live subscribers interested in `view`'s file, held until the snapshot drops.
    pub fn snapshot<'a>(&self, view: &'a DomainView) -> Snapshot<'a> {
        // Raise the counter before reading the generation: see the module docs.
        view.in_flight.fetch_add(1, Ordering::SeqCst);
        let generation = self.generation.load(Ordering::SeqCst);
        let mut cached = view.cached.lock();
        if cached.0 != generation {
            let state = self.state.lock();
            let members: Vec<Arc<dyn Subscriber>> = state
                .entries
                .iter()
                .filter(|e| e.interest.covers(view.file))
                .map(|e| Arc::clone(&e.subscriber))
                .collect();
            cached.1 = Arc::from(members);
            // The generation read under `state` is the one this list belongs to.
            cached.0 = self.generation.load(Ordering::SeqCst);
        }
        let members = Arc::clone(&cached.1);
        drop(cached);
        Snapshot {
            view,
            members: Some(members),
        }
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn unregister(&self, id: SubscriberId) {
        let domains: Vec<Arc<DomainView>> = {
            let mut state = self.state.lock();
            state.entries.retain(|e| e.id != id);
            self.generation.fetch_add(1, Ordering::SeqCst);
            state.domains.retain(|d| d.strong_count() > 0);
            state.domains.iter().filter_map(Weak::upgrade).collect()
        };
        // From inside a callback the current operation may hold this very subscriber: waiting
        // would deadlock, so the removal takes effect for later operations only.
        // Test-only mutation: return without waiting (the loom models must catch it).
        let wait = !cfg!(pfnstore_loom_mutation = "unregister_no_wait");
        if wait && !in_callback() {
            for domain in &domains {
                while domain.in_flight.load(Ordering::SeqCst) > 0 {
                    thread::yield_now();
                }
            }
        }
        // Let go of the copies that still hold the subscriber; the next operation of each
        // domain builds a fresh one.
        for domain in &domains {
            *domain.cached.lock() = (0, Arc::from(Vec::new()));
        }
    }
}

/// The subscribers one operation calls, fixed when it started.
#[derive(Debug)]
pub struct Snapshot<'a> {
    view: &'a DomainView,
    /// `None` once dropped.
    members: Option<Members>,
}

impl Snapshot<'_> {
    /// The subscribers, in registration order.
    pub fn subscribers(
        &self,
    ) -> impl DoubleEndedIterator<Item = &Arc<dyn Subscriber>> + ExactSizeIterator {
        self.members.as_deref().unwrap_or(&[]).iter()
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.members.as_deref().map_or(0, <[_]>::len)
    }

    /// Whether nobody is interested.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        // Let go of the subscribers before the operation counts as finished: an unregister
        // that waited for us may assume no operation holds them any more.
        self.members = None;
        self.view.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A subscriber's registration; unregisters on drop.
#[derive(Debug)]
#[must_use = "dropping the registration unregisters the subscriber"]
pub struct Registration {
    registry: Arc<SubscriberRegistry>,
    id: SubscriberId,
    done: bool,
}

impl Registration {
    /// The registration's id.
    pub fn id(&self) -> SubscriberId {
        self.id
    }

    /// Unregisters, waiting until no in-flight operation can still call the subscriber
    /// (unless called from inside a callback, where waiting could deadlock: then operations
    /// already under way may still call it, later ones will not).
    pub fn unregister(mut self) {
        self.done = true;
        self.registry.unregister(self.id);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.done {
            self.registry.unregister(self.id);
        }
    }
}
