//! The registry of subscribers, the domains (files) they watch, and the snapshots operations
//! take of it.
//!
//! # Weak subscribers, strong registrations
//!
//! The registry holds subscribers weakly: a subscriber that holds the store (or a file) forms
//! no cycle, and when its last `Arc` goes it is simply no longer called. A [`Registration`] is
//! the handle that unregisters; dropping it waits until no operation can still call the
//! subscriber (a *grace period*, below), so no callback arrives after it returns.
//!
//! # Per-domain copies, so that files do not contend
//!
//! Conversions of different files must not share cache lines. Each domain keeps its own copy
//! of the subscribers interested in it, tagged with the registry's generation, and its own
//! in-flight counters; an operation touches only its domain, and goes to the registry only
//! when the generation moved (someone registered or unregistered).
//!
//! # Registration replays, atomically
//!
//! A new subscriber must learn what is mapped before it hears any change, or the first plan
//! would tell it to unmap blocks it never got. So an entry starts *pending* for every domain
//! that exists when it registers: operations of such a domain leave it out until the domain is
//! *activated* for it, which happens under the domain's exclusive range lock over the whole
//! file (no operation of the domain is in flight), together with the replay of the domain's
//! current mapping. Domains created later include it from the start (they have nothing mapped
//! yet). So a subscriber sees every change of a domain after its replay, and none before.
//!
//! # Grace periods without starvation
//!
//! An operation counts itself in one of two in-flight counters of its domain, chosen by the
//! registry's *epoch*. Unregistering removes the entry, moves the epoch on (new operations
//! count in the other counter and see the new list), and waits until the old counter of every
//! domain drains: only operations that started before the removal are waited for, however
//! busy the store is. (An operation increments its counter, then re-reads the epoch and
//! retries if it moved: with sequentially consistent operations, either the unregister sees
//! the increment or the operation sees the new epoch.) Grace periods are serialised by a
//! mutex, so the other counter has drained before the epoch moves again.

// Subscribers are the VMM's objects, handed over as `Arc<dyn Subscriber>` (loom's `Arc` cannot
// hold a trait object). Only their reference counts live in std types here; every lock,
// counter and wait goes through the sync facade and is modelled by loom.
use std::sync::{Arc, Weak};

use pfnstore_core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use pfnstore_core::sync::{CachePadded, Mutex, thread};
use pfnstore_core::{PageOffset, PageSize};

use super::callback;
use super::domain_core::DomainCore;
use super::planner::Planner;
use super::range_lock::RangeLocks;
use super::subscriber::{Change, ChangeKind, Interest, Subscriber};
use super::{ConversionError, lock_error};
use crate::{FileId, MetadataStore};

/// Identifies a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(u64);

#[derive(Debug)]
struct Entry {
    id: SubscriberId,
    interest: Interest,
    subscriber: Weak<dyn Subscriber>,
    /// Domains with this serial or a later one include the entry from their start.
    first_serial: u64,
    /// Earlier domains that have been activated (replayed) for it.
    activated: Vec<u64>,
}

impl Entry {
    fn covers(&self, domain: &DomainCore) -> bool {
        self.interest.covers(domain.file)
            && (domain.serial >= self.first_serial || self.activated.contains(&domain.serial))
    }
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
    next_serial: u64,
    /// The domains alive, to activate and to wait on.
    domains: Vec<Weak<DomainCore>>,
}

/// All subscribers of a store.
#[derive(Debug, Default)]
pub struct SubscriberRegistry {
    state: Mutex<State>,
    /// Bumped (under `state`) whenever what some domain should call changes.
    generation: AtomicU64,
    /// Selects the in-flight counter new operations count in; moved by grace periods.
    epoch: AtomicU64,
    /// Serialises grace periods.
    grace: Mutex<()>,
}

impl SubscriberRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        SubscriberRegistry::default()
    }

    /// Registers a domain (a file) whose operations will take snapshots of this registry.
    pub(crate) fn add_domain(
        &self,
        file: FileId,
        store: pfnstore_core::sync::Arc<MetadataStore>,
        pages: u64,
        max_block: PageSize,
    ) -> Arc<DomainCore> {
        let mut state = self.state.lock();
        let serial = state.next_serial;
        state.next_serial += 1;
        let core = Arc::new(DomainCore {
            file,
            serial,
            store,
            locks: RangeLocks::new(),
            pages,
            max_block,
            in_flight: [
                CachePadded::new(AtomicUsize::new(0)),
                CachePadded::new(AtomicUsize::new(0)),
            ],
            // Generation 0 is never current once anything registered; an empty registry at
            // generation 0 has nothing to list anyway.
            cached: CachePadded::new(Mutex::new((0, Arc::from(Vec::new())))),
        });
        state.domains.retain(|d| d.strong_count() > 0);
        state.domains.push(Arc::downgrade(&core));
        core
    }

    /// Registers `subscriber` for `interest` until the returned registration is dropped, and
    /// replays to it what every domain it covers has mapped now (one `map` with
    /// [`ChangeKind::Replay`] per file).
    ///
    /// Fails with `NoSuchFile` for a file that has no domain, and with `Reentrant` or
    /// `WouldBlock` when called from a callback whose change holds a file it covers; nothing
    /// stays registered then (files replayed before the failure were replayed).
    pub fn register(
        self: &Arc<Self>,
        subscriber: &Arc<dyn Subscriber>,
        interest: Interest,
    ) -> Result<Registration, ConversionError> {
        let (registration, mut domains) = {
            let mut state = self.state.lock();
            let id = SubscriberId(state.next_id);
            state.next_id += 1;
            let first_serial = state.next_serial;
            state.entries.push(Entry {
                id,
                interest,
                subscriber: Arc::downgrade(subscriber),
                first_serial,
                activated: Vec::new(),
            });
            // Domains created from now on list the entry from their start: their cached
            // lists (tagged with generation 0 when created) must not look current.
            self.generation.fetch_add(1, Ordering::SeqCst);
            let domains: Vec<Arc<DomainCore>> = state
                .domains
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|d| interest.covers(d.file))
                .collect();
            let registration = Registration {
                registry: Arc::clone(self),
                id,
                done: false,
            };
            (registration, domains)
        };
        if let Interest::File(file) = interest
            && domains.is_empty()
        {
            return Err(ConversionError::NoSuchFile { file });
        }
        domains.sort_by_key(|d| d.serial);
        for domain in &domains {
            self.activate(domain, registration.id, subscriber)?;
        }
        Ok(registration)
    }

    /// Makes the pending entry `id` live for `domain` and replays the domain to it, with no
    /// operation of the domain in flight.
    fn activate(
        &self,
        domain: &DomainCore,
        id: SubscriberId,
        subscriber: &Arc<dyn Subscriber>,
    ) -> Result<(), ConversionError> {
        let Some(all) = domain.all_pages() else {
            return Ok(());
        };
        let geometry = domain.store.geometry();
        // Test-only mutation: go live and replay without the domain's lock (the loom models
        // must catch it).
        #[cfg(not(pfnstore_loom_mutation = "activate_unlocked"))]
        let _whole = domain
            .locks
            .lock_chunks(&geometry, all)
            .map_err(|e| lock_error(all.cast(), e))?;
        #[cfg(pfnstore_loom_mutation = "activate_unlocked")]
        let _ = (geometry, lock_error);
        {
            let mut state = self.state.lock();
            if let Some(entry) = state.entries.iter_mut().find(|e| e.id == id) {
                entry.activated.push(domain.serial);
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        let plan = Planner { core: domain }.current()?;
        if plan.map().is_empty() {
            return Ok(());
        }
        let change = Change {
            file: domain.file,
            kind: ChangeKind::Replay,
            range: all.cast::<PageOffset>(),
            plan: &plan,
        };
        // A panic in a replay is the subscriber's own problem: it was told, as in `map`.
        let _ = callback::call(|| subscriber.map(&change));
        Ok(())
    }

    /// The live subscribers interested in `domain`, held until the snapshot drops.
    pub(crate) fn snapshot<'a>(&self, domain: &'a DomainCore) -> Snapshot<'a> {
        let slot = loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let slot = (epoch & 1) as usize;
            domain.in_flight[slot].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                break slot;
            }
            domain.in_flight[slot].fetch_sub(1, Ordering::SeqCst);
        };
        let generation = self.generation.load(Ordering::SeqCst);
        let mut cached = domain.cached.lock();
        if cached.0 != generation {
            let state = self.state.lock();
            let members: Vec<Weak<dyn Subscriber>> = state
                .entries
                .iter()
                .filter(|e| e.covers(domain))
                .map(|e| Weak::clone(&e.subscriber))
                .collect();
            cached.1 = Arc::from(members);
            // The generation read under `state` is the one this list belongs to.
            cached.0 = self.generation.load(Ordering::SeqCst);
        }
        let mut members = Held::default();
        for subscriber in cached.1.iter().filter_map(Weak::upgrade) {
            members.push(subscriber);
        }
        drop(cached);
        Snapshot {
            domain,
            slot,
            members,
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
        let domains: Vec<Arc<DomainCore>> = {
            let mut state = self.state.lock();
            state.entries.retain(|e| e.id != id);
            self.generation.fetch_add(1, Ordering::SeqCst);
            state.domains.retain(|d| d.strong_count() > 0);
            state.domains.iter().filter_map(Weak::upgrade).collect()
        };
        // From inside a callback (or with a range lock held) the operations in flight may
        // include the caller's own: waiting would deadlock, so the removal takes effect for
        // later operations only.
        // Test-only mutation: return without waiting (the loom models must catch it).
        let wait = !cfg!(pfnstore_loom_mutation = "unregister_no_wait");
        // Test-only mutation: wait from inside callbacks too (the loom models must catch it).
        #[cfg(not(pfnstore_loom_mutation = "unregister_waits_in_callback"))]
        let wait = wait && !callback::must_not_wait();
        if wait {
            let _grace = self.grace.lock();
            let epoch = self.epoch.load(Ordering::SeqCst);
            self.epoch.store(epoch + 1, Ordering::SeqCst);
            let old = (epoch & 1) as usize;
            for domain in &domains {
                while domain.in_flight[old].load(Ordering::SeqCst) > 0 {
                    thread::yield_now();
                }
                // Test-only mutation: wait for the operations that started after the epoch
                // moved too (the loom models must catch the starvation).
                #[cfg(pfnstore_loom_mutation = "unregister_waits_for_all")]
                while domain.in_flight[1 - old].load(Ordering::SeqCst) > 0 {
                    thread::yield_now();
                }
            }
        }
    }
}

/// The subscribers one operation calls, fixed when it started.
#[derive(Debug)]
pub struct Snapshot<'a> {
    domain: &'a DomainCore,
    slot: usize,
    members: Held,
}

/// Subscribers a snapshot holds without allocating: a store usually has a few (KVM's MMU, an
/// IOMMU mapper, a vhost-user backend), and an operation should not touch the heap.
const INLINE_MEMBERS: usize = 4;

/// A snapshot's strong handles, in registration order: inline up to [`INLINE_MEMBERS`], then
/// on the heap. Every slot below `len` is `Some`.
#[derive(Debug, Default)]
struct Held {
    len: usize,
    inline: [Option<Arc<dyn Subscriber>>; INLINE_MEMBERS],
    more: Vec<Option<Arc<dyn Subscriber>>>,
}

impl Held {
    fn push(&mut self, subscriber: Arc<dyn Subscriber>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some(subscriber),
            None => self.more.push(Some(subscriber)),
        }
        self.len += 1;
    }

    /// The first `n` subscribers.
    fn first(&self, n: usize) -> impl DoubleEndedIterator<Item = &Arc<dyn Subscriber>> {
        let n = n.min(self.len);
        let inline = &self.inline[..n.min(INLINE_MEMBERS)];
        let more = &self.more[..n.saturating_sub(INLINE_MEMBERS)];
        inline.iter().chain(more).flatten()
    }
}

impl Snapshot<'_> {
    /// The subscribers, in registration order.
    pub(crate) fn subscribers(&self) -> impl DoubleEndedIterator<Item = &Arc<dyn Subscriber>> {
        self.members.first(self.members.len)
    }

    /// The first `n` subscribers, in registration order.
    pub(crate) fn first(&self, n: usize) -> impl DoubleEndedIterator<Item = &Arc<dyn Subscriber>> {
        self.members.first(n)
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.members.len
    }

    /// Whether nobody is interested.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest run boundary any of the subscribers asked for.
    pub(crate) fn run_boundary(&self) -> Option<PageSize> {
        self.subscribers().filter_map(|s| s.run_boundary()).max()
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        // Count the operation as finished first, then let go of the subscribers: dropping the
        // last reference to one may run its destructor, which may unregister and wait for a
        // grace period that must not include this operation.
        let members = std::mem::take(&mut self.members);
        self.domain.in_flight[self.slot].fetch_sub(1, Ordering::SeqCst);
        drop(members);
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
    /// (unless called from inside a callback or with a range lock held, where waiting could
    /// deadlock: then operations already under way may still call it, later ones will not).
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

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use pfnstore_core::sync::atomic::{AtomicUsize, Ordering};
    use pfnstore_core::{Geometry, OffsetRange, PageOffset, Pfn, PfnRange};

    use super::*;
    use crate::conversion::{ConversionDomain, UnmapError};
    use crate::{MetadataStore, Shareability};

    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Subscriber for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn map(&self, _: &Change<'_>) {}
        fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
            Ok(())
        }
    }

    #[test]
    fn a_subscriber_registered_before_any_file_hears_of_later_files() {
        let registry = Arc::new(SubscriberRegistry::new());
        let counting = Arc::new(Counting::default());
        let subscriber: Arc<dyn Subscriber> = counting.clone();
        let _registration = registry.register(&subscriber, Interest::All).unwrap();

        let geometry = Geometry::new(3, 6).unwrap();
        let store = MetadataStore::new(geometry, PfnRange::new(Pfn(0), Pfn(64)).unwrap()).unwrap();
        store.add_chunk(Pfn(0), Shareability::Private).unwrap();
        let domain = ConversionDomain::new(
            FileId(1),
            pfnstore_core::sync::Arc::new(store),
            Arc::clone(&registry),
        );
        assert_eq!(domain.subscribers(), 1);
        let page = OffsetRange::from_len(PageOffset(3), 1).unwrap();
        let done = domain.convert(page, Shareability::Shared).unwrap();
        assert_eq!(done.subscribers, 1);
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
    }
}
