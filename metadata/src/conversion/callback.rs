//! Running subscriber callbacks: which thread is inside one, which thread holds range locks,
//! and catching panics.
//!
//! Two per-thread counters decide whether an operation may wait. A thread inside a callback,
//! or holding any range lock, never waits for a range another thread holds: the other thread
//! may be waiting for one of ours (two files whose subscribers convert each other's memory),
//! so the nested operation fails with `WouldBlock` instead. And such a thread never waits for
//! a grace period in `unregister`, whose in-flight operations may be its own.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use pfnstore_core::sync::thread_local;

thread_local! {
    /// How many subscriber callbacks the current thread is inside of. (Not `const`
    /// initializers: loom's `thread_local!` does not take them.)
    #[allow(clippy::missing_const_for_thread_local)]
    static CALLBACK_DEPTH: Cell<usize> = Cell::new(0);
    /// How many range locks the current thread holds, in any domain.
    #[allow(clippy::missing_const_for_thread_local)]
    static RANGE_LOCKS_HELD: Cell<usize> = Cell::new(0);
}

/// Runs `f` as a subscriber callback: marked as such for the thread, panics caught.
pub(crate) fn call<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
    // Under loom, a panic raised by loom itself (the model found a livelock or a data race) is
    // not the subscriber's: it ends the model's execution instead of being caught as one.
    #[cfg(pfnstore_loom)]
    let result = result.map_err(|panic| {
        let message = panic_message(&*panic);
        if ["Model exceeded", "Causality violation", "deadlock;"]
            .iter()
            .any(|loom| message.starts_with(loom))
        {
            std::panic::resume_unwind(panic);
        }
        panic
    });
    result
}

/// Whether the current thread is running a subscriber callback.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// Whether the current thread must not wait on other threads' operations: it is inside a
/// callback or holds a range lock.
pub(crate) fn must_not_wait() -> bool {
    in_callback() || RANGE_LOCKS_HELD.with(|n| n.get() > 0)
}

/// Counts a range lock taken by the current thread.
pub(crate) fn range_lock_taken() {
    RANGE_LOCKS_HELD.with(|n| n.set(n.get() + 1));
}

/// Counts a range lock released by the current thread.
pub(crate) fn range_lock_released() {
    RANGE_LOCKS_HELD.with(|n| n.set(n.get().saturating_sub(1)));
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
