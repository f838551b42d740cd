//! Locks on page ranges that serialise the operations of one domain (file) that change what
//! its memory is (conversion, population, punch-hole) against each other and against the
//! accesses that must not see it change (the host view, faults, pins).
//!
//! Two modes: *exclusive* for changes, *shared* for accesses. Shared holders of overlapping
//! ranges coexist; an exclusive holder excludes every overlapping holder of another thread.
//! Waiters are woken by a condition variable; there is no fairness, so a stream of shared
//! holders can delay a change of the same pages (the host view's accesses are short).
//!
//! A change computes its plans from the state of whole blocks around the pages it changes, so
//! two changes that touch the same block must not interleave even if their pages are
//! disjoint. Changes therefore lock the *chunk hull* of their pages ([`chunk_hull`]), and
//! remember the pages themselves as the lock's *core*.
//!
//! # The calling thread
//!
//! Locks know their thread, which makes three answers possible instead of a deadlock:
//!
//! * a request that overlaps the **core** of a lock the same thread holds (a subscriber
//!   callback converting the pages of the conversion that called it) fails with
//!   [`LockError::Reentrant`];
//! * a **shared** request of the same thread that overlaps only the hull, not the core, is
//!   granted: a callback may read and query the pages around the change, which the change
//!   does not touch; an exclusive one (a second change in the same chunk) is `Reentrant`;
//! * a request that would **wait** for another thread, made by a thread that is inside a
//!   callback or already holds a range lock, fails with [`LockError::WouldBlock`]: the other
//!   thread may be waiting for us (two files whose subscribers convert each other's memory).
//!   Nothing ever hangs; the caller gets a typed error and may retry later.

use std::marker::PhantomData;

use pfnstore_core::sync::{self, CachePadded, Condvar, Mutex};
use pfnstore_core::{Geometry, PfnRange};

use super::callback;

/// The set of ranges currently locked, with a condition variable for waiters.
#[derive(Debug, Default)]
pub struct RangeLocks {
    /// Taken by every operation of the domain: kept off other domains' cache lines.
    held: CachePadded<Mutex<Vec<HeldRange>>>,
    released: Condvar,
}

#[derive(Debug, Clone, Copy)]
struct HeldRange {
    /// What is locked.
    range: PfnRange,
    /// The pages the holder works on (equal to `range` for shared locks).
    core: PfnRange,
    thread: usize,
    exclusive: bool,
}

/// Why a range could not be locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockError {
    /// The calling thread itself holds `held`, which overlaps the request: waiting would
    /// deadlock.
    Reentrant {
        /// The range this thread already holds.
        held: PfnRange,
    },
    /// Another thread holds `held`, and the calling thread may not wait (it is inside a
    /// subscriber callback or holds a range lock itself).
    WouldBlock {
        /// The range the other thread holds.
        held: PfnRange,
    },
}

impl RangeLocks {
    /// No range locked.
    pub fn new() -> Self {
        RangeLocks::default()
    }

    /// Locks `range` exclusively (its core is the whole range).
    pub fn lock(&self, range: PfnRange) -> Result<RangeGuard<'_>, LockError> {
        self.acquire(range, range, true)
    }

    /// Locks every chunk that `core` touches exclusively, for a change of the pages `core`.
    pub fn lock_chunks(
        &self,
        geometry: &Geometry,
        core: PfnRange,
    ) -> Result<RangeGuard<'_>, LockError> {
        self.acquire(chunk_hull(geometry, core), core, true)
    }

    /// Locks `range` shared: waits while another thread holds an overlapping range
    /// exclusively.
    pub fn lock_shared(&self, range: PfnRange) -> Result<RangeGuard<'_>, LockError> {
        self.acquire(range, range, false)
    }

    fn acquire(
        &self,
        range: PfnRange,
        core: PfnRange,
        exclusive: bool,
    ) -> Result<RangeGuard<'_>, LockError> {
        let me = sync::current_thread_index();
        let mut held = self.held.lock();
        loop {
            let conflicts = held
                .iter()
                .filter(|h| h.range.overlaps(&range) && (exclusive || h.exclusive));
            // Test-only mutation: the lock excludes nothing (the loom models must catch it).
            #[cfg(pfnstore_loom_mutation = "no_range_lock")]
            let conflicts = conflicts.filter(|h| h.thread == me);
            // Test-only mutation: a shared request of another thread conflicts only with the
            // pages a change changes, not with the rest of its chunk.
            #[cfg(pfnstore_loom_mutation = "shared_ignores_hull")]
            let conflicts =
                conflicts.filter(|h| h.thread == me || exclusive || h.core.overlaps(&range));
            let mut other = None;
            for h in conflicts {
                if h.thread == me {
                    if exclusive || h.core.overlaps(&range) {
                        return Err(LockError::Reentrant { held: h.range });
                    }
                } else {
                    other.get_or_insert(h.range);
                }
            }
            match other {
                None => break,
                #[cfg(not(pfnstore_loom_mutation = "callbacks_wait"))]
                Some(busy) if callback::must_not_wait() => {
                    return Err(LockError::WouldBlock { held: busy });
                }
                // Test-only mutation: a thread inside a callback (or holding a range lock)
                // waits for the range, polling (loom reports the livelock; a real deadlock
                // could not be unwound through the transaction's destructors under loom).
                #[cfg(pfnstore_loom_mutation = "callbacks_wait")]
                Some(_) if callback::must_not_wait() => {
                    drop(held);
                    sync::thread::yield_now();
                    held = self.held.lock();
                }
                Some(_) => held = self.released.wait(held),
            }
        }
        held.push(HeldRange {
            range,
            core,
            thread: me,
            exclusive,
        });
        drop(held);
        callback::range_lock_taken();
        Ok(RangeGuard {
            locks: self,
            range,
            thread: me,
            exclusive,
            _same_thread: PhantomData,
        })
    }

    /// Number of ranges locked now (for tests and statistics).
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

/// The smallest chunk-aligned range containing `range`.
pub fn chunk_hull(geometry: &Geometry, range: PfnRange) -> PfnRange {
    range.align_out(geometry.chunk_pages())
}

/// Holds a range locked; unlocks on drop. Not `Send`: the lock belongs to its thread (see the
/// module docs).
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: PfnRange,
    thread: usize,
    exclusive: bool,
    _same_thread: PhantomData<*const ()>,
}

impl RangeGuard<'_> {
    /// The locked range.
    pub fn range(&self) -> PfnRange {
        self.range
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        let mine = |h: &HeldRange| {
            h.range == self.range && h.thread == self.thread && h.exclusive == self.exclusive
        };
        if let Some(i) = held.iter().position(mine) {
            held.swap_remove(i);
        }
        drop(held);
        callback::range_lock_released();
        self.locks.released.notify_all();
    }
}

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use super::*;
    use pfnstore_core::Pfn;
    use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
    use pfnstore_core::sync::{Arc, thread};

    fn r(a: u64, b: u64) -> PfnRange {
        PfnRange::new(Pfn(a), Pfn(b)).unwrap()
    }

    #[test]
    fn disjoint_ranges_lock_together_and_reentry_is_refused() {
        let locks = RangeLocks::new();
        let a = locks.lock(r(0, 10)).unwrap();
        let b = locks.lock(r(10, 20)).unwrap();
        assert_eq!(locks.held(), 2);
        assert_eq!(
            locks.lock(r(5, 6)).unwrap_err(),
            LockError::Reentrant { held: r(0, 10) }
        );
        drop(a);
        let c = locks.lock(r(5, 6)).unwrap();
        drop((b, c));
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn overlapping_lock_waits_for_release() {
        let locks = Arc::new(RangeLocks::new());
        let guard = locks.lock(r(0, 64)).unwrap();
        let acquired = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (locks, acquired) = (Arc::clone(&locks), Arc::clone(&acquired));
            thread::spawn(move || {
                let _g = locks.lock(r(63, 65)).unwrap();
                acquired.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot get in while we hold the overlapping range. (No timing assertion:
        // whatever the scheduling, it must not have acquired before we release.)
        thread::yield_now();
        assert!(!acquired.load(Ordering::SeqCst));
        drop(guard);
        waiter.join().unwrap();
        assert!(acquired.load(Ordering::SeqCst));
    }

    #[test]
    fn shared_holders_coexist_and_exclude_writers() {
        let locks = RangeLocks::new();
        let a = locks.lock_shared(r(0, 10)).unwrap();
        let b = locks.lock_shared(r(5, 15)).unwrap();
        // This thread holds both shared; an exclusive request would wait on itself.
        assert_eq!(
            locks.lock(r(9, 10)).unwrap_err(),
            LockError::Reentrant { held: r(0, 10) }
        );
        drop((a, b));
        let w = locks.lock(r(0, 20)).unwrap();
        assert!(locks.lock_shared(r(3, 4)).is_err());
        drop(w);
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn the_holder_may_read_around_its_core_but_not_change_it() {
        let g = Geometry::new(3, 6).unwrap();
        let locks = RangeLocks::new();
        let change = locks.lock_chunks(&g, r(10, 11)).unwrap();
        assert_eq!(change.range(), r(0, 64));
        // Shared access to pages of the chunk outside the core: granted.
        let read = locks.lock_shared(r(20, 30)).unwrap();
        drop(read);
        // Shared access to the core, or any exclusive request in the chunk: reentrant.
        assert_eq!(
            locks.lock_shared(r(10, 12)).unwrap_err(),
            LockError::Reentrant { held: r(0, 64) }
        );
        assert!(matches!(
            locks.lock_chunks(&g, r(40, 41)),
            Err(LockError::Reentrant { .. })
        ));
        drop(change);
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn a_thread_holding_a_lock_does_not_wait_for_another() {
        let locks = Arc::new(RangeLocks::new());
        let mine = locks.lock(r(0, 8)).unwrap();
        let other = {
            let locks = Arc::clone(&locks);
            thread::spawn(move || {
                let held = locks.lock(r(100, 108)).unwrap();
                // This thread holds a lock and asks for one the main thread holds: no wait.
                let answer = locks.lock(r(4, 5)).map(drop);
                drop(held);
                answer
            })
        };
        assert_eq!(
            other.join().unwrap(),
            Err(LockError::WouldBlock { held: r(0, 8) })
        );
        drop(mine);
    }

    #[test]
    fn chunk_hull_rounds_to_chunks() {
        let g = Geometry::new(3, 6).unwrap();
        assert_eq!(chunk_hull(&g, r(70, 130)), r(64, 192));
        assert_eq!(chunk_hull(&g, r(64, 128)), r(64, 128));
    }
}
