//! The shard lock: one compare-and-swap to enter, one release store to leave.
//!
//! A shard's critical sections are short (tens of nanoseconds) and a shard is normally used by
//! one thread, so the lock is almost never contended; what it costs is its atomic operations.
//! parking_lot's mutex takes a compare-and-swap to lock *and* one to unlock (it must see
//! whether a waiter parked); on this machine each locked instruction costs several
//! nanoseconds, more than the rest of a 4 KiB alloc or free. This lock leaves with a plain
//! release store, which on x86-64 is an ordinary `mov`. A thread that finds it taken spins
//! briefly and then yields, so a preempted holder gets the core back (8 threads on 2 cores).
//!
//! Built only from the sync facade's atomics and `UnsafeCell`, so loom checks it: the
//! allocator's loom models run every critical section through it, and the mutation
//! `allocator_racy_lock` (enter with a load and a store instead of one compare-and-swap) is
//! caught by them.

use pfnstore_core::sync::UnsafeCell;
use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
use pfnstore_core::sync::{hint, thread};

/// A lock around `T` whose sections run in a closure ([`ShardLock::with`]).
#[derive(Debug)]
pub(crate) struct ShardLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `with`, which holds the lock (an acquire CAS that
// found it free, paired with the release store of the previous holder) for the whole access, so
// at most one thread touches `T` at a time; `T: Send` lets it move between those threads.
unsafe impl<T: Send> Sync for ShardLock<T> {}
// SAFETY: owning the lock owns the `T`.
unsafe impl<T: Send> Send for ShardLock<T> {}

/// Leaves the lock when dropped, also when the section panics.
struct Held<'a>(&'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<T> ShardLock<T> {
    pub(crate) fn new(value: T) -> ShardLock<T> {
        ShardLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    #[inline]
    fn try_enter(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[cfg(not(pfnstore_loom_mutation = "allocator_racy_lock"))]
    #[inline]
    fn enter(&self) -> Held<'_> {
        if !self.try_enter() {
            self.enter_contended();
        }
        Held(&self.locked)
    }

    /// The mutation the loom models must catch: the uncontended path tests with a load and
    /// takes with a plain store, so two threads can both see the lock free and both enter.
    #[cfg(pfnstore_loom_mutation = "allocator_racy_lock")]
    #[inline]
    fn enter(&self) -> Held<'_> {
        if self.locked.load(Ordering::Acquire) {
            self.enter_contended();
        } else {
            self.locked.store(true, Ordering::Relaxed);
        }
        Held(&self.locked)
    }

    /// Waits with plain loads (no cache-line ping-pong) and yields after a short spin, so that
    /// a preempted holder gets the core back.
    #[cold]
    fn enter_contended(&self) {
        let mut spins = 0u32;
        loop {
            // Under loom a relaxed load may keep returning an old value and every spin is a
            // scheduling point: there, retry the compare-and-swap (which reads the latest
            // value and writes nothing when it fails) after every yield.
            while !cfg!(pfnstore_loom) && self.locked.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    hint::spin_loop();
                } else {
                    thread::yield_now();
                }
            }
            if self.try_enter() {
                return;
            }
            if cfg!(pfnstore_loom) {
                thread::yield_now();
            }
        }
    }

    /// Runs `f` on the value with the lock held.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let _held = self.enter();
        // SAFETY: `_held` proves the lock is ours until it drops after `f` returns; no other
        // reference to the value exists meanwhile (see the `Sync` impl).
        self.value.with_mut(|value| f(unsafe { &mut *value }))
    }
}

#[cfg(all(test, pfnstore_loom))]
mod loom_models {
    use super::ShardLock;
    use pfnstore_core::sync::{Arc, thread};

    /// Two threads add to a counter under the lock: every interleaving ends at 2, and loom's
    /// cell checks see no concurrent access.
    #[test]
    fn the_lock_excludes() {
        loom::model(|| {
            let lock = Arc::new(ShardLock::new(0u32));
            let other = {
                let lock = Arc::clone(&lock);
                thread::spawn(move || lock.with(|n| *n += 1))
            };
            lock.with(|n| *n += 1);
            other.join().unwrap();
            assert_eq!(lock.with(|n| *n), 2);
        });
    }
}
