//! The sync facade under loom: the primitives really are loom's, and loom finds a lost update
//! when the code has one.
#![cfg(pfnstore_loom)]

use pfnstore_core::sync::atomic::{AtomicUsize, Ordering};
use pfnstore_core::sync::{Arc, Mutex, thread};
use pfnstore_loom_tests::model_builder;

/// Two threads add to a counter under the facade's Mutex: the total is exact in every
/// interleaving.
#[test]
fn mutex_counter_is_exact() {
    model_builder().check(|| {
        let counter = Arc::new(Mutex::new(0u32));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let counter = Arc::clone(&counter);
                thread::spawn(move || *counter.lock() += 1)
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(*counter.lock(), 2);
    });
}

/// The same counter with a load-then-store instead of a lock: loom must find the interleaving
/// that loses an update. This proves the models can fail, i.e. that the facade really routes
/// through loom.
#[test]
#[should_panic(expected = "lost update")]
fn racy_counter_is_caught() {
    model_builder().check(|| {
        let counter = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let counter = Arc::clone(&counter);
                thread::spawn(move || {
                    let seen = counter.load(Ordering::SeqCst);
                    counter.store(seen + 1, Ordering::SeqCst);
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counter.load(Ordering::SeqCst), 2, "lost update");
    });
}
