//! Locks on PFN ranges that serialise conversions (and punch-holes) of overlapping memory.
//!
//! Two modes: *exclusive* for operations that change what memory is (conversion, punch-hole,
//! population), *shared* for accesses that must not see it change underneath them (the host
//! view's reads and writes of shared memory). Shared holders of overlapping ranges coexist;
//! an exclusive holder excludes every overlapping holder. Waiters are woken by a condition
//! variable; there is no fairness, so a stream of shared holders can delay a conversion of the
//! same pages (the host view's accesses are short).
//!
//! A conversion computes its block plans from the state of whole blocks around the requested
//! range, so two conversions that touch the same block must not interleave even if their
//! ranges are disjoint. Callers therefore lock the *chunk hull* of their range (see
//! [`RangeLocks::lock_chunks`]). Queries never take these locks: they read the metadata under
//! the per-chunk shard locks only.

use pfnstore_core::sync::{self, CachePadded, Condvar, Mutex};
use pfnstore_core::{Geometry, PfnRange};

/// The set of ranges currently locked, with a condition variable for waiters.
#[derive(Debug, Default)]
pub struct RangeLocks {
    /// Taken by every operation of the domain: kept off other domains' cache lines.
    held: CachePadded<Mutex<Vec<HeldRange>>>,
    released: Condvar,
}

#[derive(Debug, Clone, Copy)]
struct HeldRange {
    range: PfnRange,
    thread: usize,
    exclusive: bool,
}

/// An overlapping range is already locked by the calling thread: waiting would deadlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reentrant {
    /// The range this thread already holds.
    pub held: PfnRange,
}

impl RangeLocks {
    /// No range locked.
    pub fn new() -> Self {
        RangeLocks::default()
    }

    /// Locks `range`, waiting while another thread holds an overlapping range.
    ///
    /// Fails instead of deadlocking when the calling thread itself holds an overlapping range
    /// (a subscriber callback that converts memory of the conversion that called it).
    pub fn lock(&self, range: PfnRange) -> Result<RangeGuard<'_>, Reentrant> {
        self.acquire(range, true)
    }

    /// Locks `range` shared: waits while an overlapping range is held exclusively.
    ///
    /// Fails instead of deadlocking when the calling thread itself holds an overlapping range
    /// exclusively.
    pub fn lock_shared(&self, range: PfnRange) -> Result<RangeGuard<'_>, Reentrant> {
        self.acquire(range, false)
    }

    fn acquire(&self, range: PfnRange, exclusive: bool) -> Result<RangeGuard<'_>, Reentrant> {
        let me = sync::current_thread_index();
        let mut held = self.held.lock();
        loop {
            let conflict = held
                .iter()
                .find(|h| h.range.overlaps(&range) && (exclusive || h.exclusive));
            // Test-only mutation: the lock excludes nothing (the loom models must catch it).
            #[cfg(pfnstore_loom_mutation = "no_range_lock")]
            let conflict = conflict.filter(|h| h.thread == me);
            match conflict {
                None => break,
                Some(h) if h.thread == me => return Err(Reentrant { held: h.range }),
                Some(_) => held = self.released.wait(held),
            }
        }
        held.push(HeldRange {
            range,
            thread: me,
            exclusive,
        });
        Ok(RangeGuard {
            locks: self,
            range,
            thread: me,
            exclusive,
        })
    }

    /// Locks every chunk that `range` touches.
    pub fn lock_chunks(
        &self,
        geometry: &Geometry,
        range: PfnRange,
    ) -> Result<RangeGuard<'_>, Reentrant> {
        self.lock(chunk_hull(geometry, range))
    }

    /// Number of ranges locked now (for tests and statistics).
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

/// The smallest chunk-aligned range containing `range`.
pub fn chunk_hull(geometry: &Geometry, range: PfnRange) -> PfnRange {
    let chunk = geometry.chunk_pages();
    let start = range.start().align_down(chunk);
    // `range.end() <= PFN_LIMIT`, which is chunk-aligned, so aligning up cannot overflow.
    let end = range.end().checked_align_up(chunk).unwrap_or(range.end());
    PfnRange::new(start, end).unwrap_or(range)
}

/// Holds a range locked; unlocks on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: PfnRange,
    thread: usize,
    exclusive: bool,
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
            Reentrant { held: r(0, 10) }
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
            Reentrant { held: r(0, 10) }
        );
        drop((a, b));
        let w = locks.lock(r(0, 20)).unwrap();
        assert!(locks.lock_shared(r(3, 4)).is_err());
        drop(w);
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn chunk_hull_rounds_to_chunks() {
        let g = Geometry::new(3, 6).unwrap();
        assert_eq!(chunk_hull(&g, r(70, 130)), r(64, 192));
        assert_eq!(chunk_hull(&g, r(64, 128)), r(64, 128));
    }
}
