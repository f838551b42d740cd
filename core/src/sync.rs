//! The sync facade: the only place where pfnstore names its synchronisation primitives.
//!
//! # The rule
//!
//! Code in `pfnstore-allocator`, `pfnstore-metadata` and the facade crate reaches locks,
//! atomics, `Arc`, `UnsafeCell`, threads and cache padding **only through this module**. It
//! never names `std::sync`, `parking_lot` or `crossbeam` directly. That is what lets the loom
//! models in `loom-tests/` replace every primitive at once and explore all interleavings.
//!
//! Normally the primitives are parking_lot's locks, std's atomics and `Arc`, and crossbeam's
//! `CachePadded`. When the crate is built with `RUSTFLAGS="--cfg pfnstore_loom"` they are loom's. The
//! cfg is the project's own rather than a plain `loom` so that dependencies which also check
//! `cfg(loom)` are not switched along with us (crossbeam does the same with `crossbeam_loom`).
//!
//! # One std-shaped API for both
//!
//! loom models std's API, parking_lot has its own. The wrappers here give both one shape:
//! `lock()`/`read()`/`write()` return the guard directly (no poisoning: a panic while a lock is
//! held is reported by the code that caught it, it does not make the lock unusable), and
//! [`Condvar::wait`] takes the guard by value and gives it back. [`UnsafeCell`] has loom's
//! closure API (`with`, `with_mut`) so that loom can check every access.

#[cfg(not(pfnstore_loom))]
mod imp {
    pub use std::sync::Arc;

    /// Atomics (std's, or loom's under `pfnstore_loom`).
    pub mod atomic {
        pub use std::sync::atomic::{
            AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        };
    }

    /// Threads (std's, or loom's under `pfnstore_loom`).
    pub mod thread {
        pub use std::thread::{spawn, yield_now};
    }

    /// Spin-loop hint.
    pub mod hint {
        pub use std::hint::spin_loop;
    }

    /// Thread-local storage (loom's under `pfnstore_loom`, whose model threads share one OS
    /// thread). Use the plain `static NAME: T = init;` form, which both accept.
    pub use std::thread_local;

    /// A mutual-exclusion lock (parking_lot's).
    #[derive(Debug, Default)]
    pub struct Mutex<T: ?Sized>(parking_lot::Mutex<T>);
    /// Guard of [`Mutex`].
    pub type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub const fn new(value: T) -> Self {
            Mutex(parking_lot::Mutex::new(value))
        }
        /// Consumes the mutex, returning the value.
        pub fn into_inner(self) -> T {
            self.0.into_inner()
        }
    }

    impl<T: ?Sized> Mutex<T> {
        /// Blocks until the lock is held.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock()
        }
        /// The lock if it is free now.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock()
        }
        /// Mutable access without locking (the borrow proves exclusivity).
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut()
        }
    }

    /// A reader-writer lock (parking_lot's).
    #[derive(Debug, Default)]
    pub struct RwLock<T: ?Sized>(parking_lot::RwLock<T>);
    /// Shared guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
    /// Exclusive guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub const fn new(value: T) -> Self {
            RwLock(parking_lot::RwLock::new(value))
        }
        /// Consumes the lock, returning the value.
        pub fn into_inner(self) -> T {
            self.0.into_inner()
        }
    }

    impl<T: ?Sized> RwLock<T> {
        /// Shared access.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read()
        }
        /// Exclusive access.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write()
        }
        /// Mutable access without locking.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut()
        }
    }

    /// A condition variable paired with [`Mutex`].
    #[derive(Debug, Default)]
    pub struct Condvar(parking_lot::Condvar);

    impl Condvar {
        /// A new condition variable.
        pub const fn new() -> Self {
            Condvar(parking_lot::Condvar::new())
        }
        /// Releases the guard's lock, waits for a notification, and relocks.
        pub fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(&mut guard);
            guard
        }
        /// Wakes one waiter.
        pub fn notify_one(&self) {
            self.0.notify_one();
        }
        /// Wakes every waiter.
        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// `core::cell::UnsafeCell` with loom's checked-access API.
    #[derive(Debug, Default)]
    pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        /// A new cell.
        pub const fn new(value: T) -> Self {
            UnsafeCell(core::cell::UnsafeCell::new(value))
        }
        /// Calls `f` with a shared pointer to the value.
        pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }
        /// Calls `f` with a mutable pointer to the value.
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }

    /// Pads and aligns a value to a cache line to keep hot per-shard state from false sharing.
    pub use crossbeam_utils::CachePadded;
}

#[cfg(pfnstore_loom)]
mod imp {
    pub use loom::sync::Arc;

    /// Atomics (loom's).
    pub mod atomic {
        pub use loom::sync::atomic::{
            AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        };
    }

    /// Threads (loom's).
    pub mod thread {
        pub use loom::thread::{spawn, yield_now};
    }

    /// Spin-loop hint (loom's: a yield point for the model checker).
    pub mod hint {
        pub use loom::hint::spin_loop;
    }

    /// Thread-local storage (loom's: one value per model thread).
    pub use loom::thread_local;

    /// A mutual-exclusion lock (loom's).
    #[derive(Debug)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);
    /// Guard of [`Mutex`].
    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }
        /// Consumes the mutex, returning the value.
        pub fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(|e| e.into_inner())
        }
        /// Blocks until the lock is held.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
        /// The lock if it is free now.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
        /// Mutable access without locking.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    /// A reader-writer lock (loom's).
    #[derive(Debug)]
    pub struct RwLock<T>(loom::sync::RwLock<T>);
    /// Shared guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
    /// Exclusive guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub fn new(value: T) -> Self {
            RwLock(loom::sync::RwLock::new(value))
        }
        /// Consumes the lock, returning the value.
        pub fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(|e| e.into_inner())
        }
        /// Shared access.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(|e| e.into_inner())
        }
        /// Exclusive access.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(|e| e.into_inner())
        }
        /// Mutable access without locking.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl<T: Default> Default for RwLock<T> {
        fn default() -> Self {
            RwLock::new(T::default())
        }
    }

    /// A condition variable paired with [`Mutex`] (loom's).
    #[derive(Debug, Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        /// A new condition variable.
        pub fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }
        /// Releases the guard's lock, waits for a notification, and relocks.
        pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).unwrap_or_else(|e| e.into_inner())
        }
        /// Wakes one waiter.
        pub fn notify_one(&self) {
            self.0.notify_one();
        }
        /// Wakes every waiter.
        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    pub use loom::cell::UnsafeCell;

    pub use crossbeam_utils::CachePadded;
}

pub use imp::*;

/// A small, stable index for the calling thread: 0 for the first thread that asks, 1 for the
/// next, and so on. The allocator uses it to pick a thread's home shard.
pub fn current_thread_index() -> usize {
    use atomic::{AtomicUsize, Ordering};

    #[cfg(not(pfnstore_loom))]
    {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        INDEX.with(|i| *i)
    }
    #[cfg(pfnstore_loom)]
    {
        loom::lazy_static! {
            static ref NEXT: AtomicUsize = AtomicUsize::new(0);
        }
        loom::thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        INDEX.with(|i| *i)
    }
}

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use super::atomic::{AtomicUsize, Ordering};
    use super::*;

    #[test]
    fn mutex_and_condvar_hand_over_a_value() {
        let pair = Arc::new((Mutex::new(None::<u32>), Condvar::new()));
        let producer = {
            let pair = Arc::clone(&pair);
            thread::spawn(move || {
                *pair.0.lock() = Some(7);
                pair.1.notify_all();
            })
        };
        let mut guard = pair.0.lock();
        while guard.is_none() {
            guard = pair.1.wait(guard);
        }
        assert_eq!(*guard, Some(7));
        drop(guard);
        producer.join().unwrap();
    }

    #[test]
    fn rwlock_allows_many_readers() {
        let lock = RwLock::new(5);
        let a = lock.read();
        let b = lock.read();
        assert_eq!(*a + *b, 10);
        drop((a, b));
        *lock.write() += 1;
        assert_eq!(lock.into_inner(), 6);
    }

    #[test]
    #[allow(unsafe_code)] // the facade's UnsafeCell hands out raw pointers by design
    fn unsafe_cell_closure_api() {
        let cell = UnsafeCell::new(1u32);
        // SAFETY: the cell is not shared; no other access is live during either closure.
        cell.with_mut(|p| unsafe { *p += 1 });
        // SAFETY: as above.
        assert_eq!(cell.with(|p| unsafe { *p }), 2);
    }

    #[test]
    fn thread_indices_are_distinct_and_stable() {
        let here = current_thread_index();
        assert_eq!(here, current_thread_index());
        let seen = Arc::new(AtomicUsize::new(0));
        let other = {
            let seen = Arc::clone(&seen);
            thread::spawn(move || seen.store(current_thread_index(), Ordering::SeqCst))
        };
        other.join().unwrap();
        assert_ne!(seen.load(Ordering::SeqCst), here);
    }
}
