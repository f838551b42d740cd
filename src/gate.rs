//! The store's lifecycle gate: operations run only while the store is live.
//!
//! A handover to another process ([`crate::handover`]) must see the store at rest: no
//! operation under way, none starting. Every operation of a file enters the gate (one counter
//! per file, on a cache line of its own, so that files do not contend) and leaves it when it
//! ends; a handover closes the gate (new operations get [`StoreError::HandoverInProgress`]),
//! waits until every counter is zero, and either opens it again (the receiver failed) or
//! closes it for good (every operation gets [`StoreError::HandedOver`]).
//!
//! An operation increments its counter and then reads the phase; a handover writes the phase
//! and then reads the counters; both sequentially consistent, so either the handover sees the
//! operation or the operation sees the closed gate (Dekker's pattern).

use pfnstore_core::sync::CachePadded;
use pfnstore_core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use pfnstore_core::sync::thread;

use crate::StoreError;

const LIVE: u8 = 0;
const HANDING_OVER: u8 = 1;
const HANDED_OVER: u8 = 2;

/// Where a store is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Operations run.
    Live,
    /// A handover is waiting for operations to end, or for the receiver.
    HandingOver,
    /// Another process owns the store's memory now.
    HandedOver,
}

/// The phase, shared by the store and its files.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    phase: AtomicU8,
}

/// Operations of one file (or of the store itself) under way.
#[derive(Debug, Default)]
pub(crate) struct Ops(CachePadded<AtomicUsize>);

/// An operation inside the gate; leaves it on drop.
#[derive(Debug)]
pub(crate) struct Entered<'a>(&'a Ops);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            LIVE => Phase::Live,
            HANDING_OVER => Phase::HandingOver,
            _ => Phase::HandedOver,
        }
    }

    /// Counts an operation in `ops`, or refuses it if the store is not live.
    pub(crate) fn enter<'a>(&self, ops: &'a Ops) -> Result<Entered<'a>, StoreError> {
        ops.0.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(ops);
        match self.phase() {
            Phase::Live => Ok(entered),
            Phase::HandingOver => Err(StoreError::HandoverInProgress),
            Phase::HandedOver => Err(StoreError::HandedOver),
        }
    }

    /// Closes the gate for a handover: operations that start from now on are refused. Fails
    /// if the store is not live (another handover, or handed over already).
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        match self
            .phase
            .compare_exchange(LIVE, HANDING_OVER, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(()),
            Err(HANDING_OVER) => Err(StoreError::HandoverInProgress),
            Err(_) => Err(StoreError::HandedOver),
        }
    }

    /// Waits until no operation counted in `ops` is under way (after [`Gate::close`], none
    /// starts any more). Operations end on their own (none waits for the handover), so this
    /// polls rather than making every operation's exit pay for a wake-up: it yields at first,
    /// for the common case of short operations, then sleeps with a growing pause (at most
    /// 200 µs) so that a long one (a subscriber's slow callback) does not keep a core busy.
    pub(crate) fn drain(&self, ops: &Ops) {
        let mut rounds = 0u32;
        while ops.0.load(Ordering::SeqCst) > 0 {
            rounds = rounds.saturating_add(1);
            #[cfg(not(pfnstore_loom))]
            if rounds > 64 {
                let pause = 1u64 << (rounds - 64).min(8);
                std::thread::sleep(std::time::Duration::from_micros(pause.min(200)));
                continue;
            }
            thread::yield_now();
        }
    }

    /// Opens the gate again after a failed handover.
    pub(crate) fn reopen(&self) {
        self.phase.store(LIVE, Ordering::SeqCst);
    }

    /// Closes the gate for good: another process owns the memory.
    pub(crate) fn seal(&self) {
        self.phase.store(HANDED_OVER, Ordering::SeqCst);
    }
}
