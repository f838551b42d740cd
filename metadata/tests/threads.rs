//! Many threads on one store: conversions in their own chunks, pins across all chunks (which
//! lock every chunk in PFN order), and lock-free max-order readers.
#![cfg(not(pfnstore_loom))]

use pfnstore_core::sync::{Arc, thread};
use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};
use pfnstore_metadata::{MetadataStore, PinOwner, Shareability};

#[test]
fn converters_pinners_and_readers_run_together() {
    let g = Geometry::new(3, 9).unwrap();
    let chunk = g.chunk_pages();
    let chunks = 4u64;
    let store = Arc::new(
        MetadataStore::new(g, PfnRange::new(Pfn(0), Pfn(chunks * chunk)).unwrap()).unwrap(),
    );
    for c in 0..chunks {
        store
            .add_chunk(Pfn(c * chunk), Shareability::Private)
            .unwrap();
    }
    let mut handles = Vec::new();
    for c in 0..chunks {
        let store = Arc::clone(&store);
        handles.push(thread::spawn(move || {
            // Page 8 of each chunk flips back and forth; its middle block is 8..16.
            let page = PfnRange::page(Pfn(c * chunk + 8)).unwrap();
            for _ in 0..2000 {
                store.set_shareability(page, Shareability::Shared).unwrap();
                store.set_shareability(page, Shareability::Private).unwrap();
            }
        }));
    }
    {
        // Pins straddle chunk boundaries (so they lock two chunks at once) and miss the
        // flipping pages, which must stay convertible.
        let store = Arc::clone(&store);
        handles.push(thread::spawn(move || {
            for i in 0..2000 {
                let c = i % (chunks - 1);
                let r = PfnRange::new(Pfn(c * chunk + 100), Pfn((c + 1) * chunk + 4)).unwrap();
                store.pin(r, PinOwner(1)).unwrap();
                store.unpin(r, PinOwner(1)).unwrap();
            }
        }));
    }
    {
        let store = Arc::clone(&store);
        handles.push(thread::spawn(move || {
            for i in 0..20_000u64 {
                // Pages outside the flipping middle block never see a 4K order.
                let pfn = Pfn((i * 37) % (chunks * chunk));
                let order = store.max_mapping_size(pfn).unwrap();
                if pfn.0 % chunk / 8 != 1 {
                    assert_ne!(order, PageSize::Size4K, "{pfn:?}");
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    store.check_invariants().unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.heap_bytes, stats.pinned_pages, stats.private_pages),
        (0, 0, chunks * chunk)
    );
}
