//! The registry of subscribers, and the snapshots that operations take of it.
//!
//! The registry holds subscribers by [`Weak`] reference: a VMM component that drops its
//! subscriber is simply no longer called, and a subscriber never keeps the store alive. An
//! operation takes a [`Snapshot`] of the matching subscribers when it starts and calls exactly
//! those until it ends, so a subscriber that registers mid-operation sees none of it.
//! Unregistering waits until no in-flight operation holds the subscriber in its snapshot, so no
//! callback arrives after [`Registration::unregister`] returns.

use std::cell::Cell;
// Subscribers are the VMM's objects, handed over as `Arc<dyn Subscriber>` (loom's
// `Arc` cannot hold a trait object or be a method receiver). Only their reference counts live
// here; every lock and wait goes through the sync facade and is modelled by loom.
use std::sync::{Arc, Weak};

use pfnstore_core::sync::{Condvar, Mutex, thread_local};

use super::subscriber::{Interest, Subscriber};
use crate::FileId;

/// Identifies a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(u64);

#[derive(Debug)]
struct Entry {
    id: SubscriberId,
    interest: Interest,
    subscriber: Weak<dyn Subscriber>,
    /// Operations whose snapshot holds this entry.
    in_flight: usize,
    /// Unregistered; kept only until `in_flight` drops to zero.
    removed: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
}

/// All subscribers of a store.
#[derive(Debug, Default)]
pub struct SubscriberRegistry {
    state: Mutex<State>,
    idle: Condvar,
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

    /// Registers `subscriber` for `interest`. The registry keeps only a weak reference: the
    /// caller keeps the subscriber alive for as long as it wants to be called.
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
            subscriber: Arc::downgrade(subscriber),
            in_flight: 0,
            removed: false,
        });
        Registration {
            registry: Arc::clone(self),
            id,
            done: false,
        }
    }

    /// The live subscribers interested in `file`, held until the snapshot drops.
    pub fn snapshot(&self, file: FileId) -> Snapshot<'_> {
        let mut state = self.state.lock();
        let mut members = Vec::new();
        for entry in state.entries.iter_mut() {
            if entry.removed || !entry.interest.covers(file) {
                continue;
            }
            if let Some(subscriber) = entry.subscriber.upgrade() {
                entry.in_flight += 1;
                members.push((entry.id, subscriber));
            }
        }
        // Forget subscribers whose owner dropped them.
        state
            .entries
            .retain(|e| e.in_flight > 0 || e.subscriber.strong_count() > 0);
        Snapshot {
            registry: self,
            members,
        }
    }

    /// Number of registrations (live or waiting for in-flight operations).
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn unregister(&self, id: SubscriberId) {
        let mut state = self.state.lock();
        if let Some(entry) = state.entries.iter_mut().find(|e| e.id == id) {
            entry.removed = true;
        }
        // From inside a callback the current operation may hold this very subscriber: waiting
        // would deadlock, so the removal takes effect for later operations only.
        // Test-only mutation: return without waiting (the loom models must catch it).
        let wait = !cfg!(pfnstore_loom_mutation = "unregister_no_wait");
        if wait && !in_callback() {
            while state.entries.iter().any(|e| e.id == id && e.in_flight > 0) {
                state = self.idle.wait(state);
            }
        }
        state.entries.retain(|e| !(e.id == id && e.in_flight == 0));
    }

    fn release(&self, ids: impl Iterator<Item = SubscriberId>) {
        let mut state = self.state.lock();
        let mut idle_removed = false;
        for id in ids {
            if let Some(entry) = state.entries.iter_mut().find(|e| e.id == id) {
                entry.in_flight -= 1;
                idle_removed |= entry.removed && entry.in_flight == 0;
            }
        }
        if idle_removed {
            state.entries.retain(|e| !(e.removed && e.in_flight == 0));
            drop(state);
            // Someone unregisters and waits for exactly this.
            self.idle.notify_all();
        }
    }
}

/// The subscribers one operation calls, fixed when it started.
#[derive(Debug)]
pub struct Snapshot<'a> {
    registry: &'a SubscriberRegistry,
    members: Vec<(SubscriberId, Arc<dyn Subscriber>)>,
}

impl Snapshot<'_> {
    /// The subscribers, in registration order.
    pub fn subscribers(
        &self,
    ) -> impl DoubleEndedIterator<Item = &Arc<dyn Subscriber>> + ExactSizeIterator {
        self.members.iter().map(|(_, s)| s)
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether nobody is interested.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        if !self.members.is_empty() {
            self.registry
                .release(self.members.iter().map(|(id, _)| *id));
        }
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
