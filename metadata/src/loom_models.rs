//! loom models of the store's concurrent paths (built with `--cfg pfnstore_loom`).

use pfnstore_core::sync::atomic::{AtomicBool, Ordering};
use pfnstore_core::sync::{Arc, thread};
use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};

use crate::{MetadataStore, PinOwner, Shareability};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

/// Two chunks of four pages, middle blocks of two.
fn store() -> MetadataStore {
    let g = Geometry::new(1, 2).expect("valid geometry");
    let store = MetadataStore::new(g, PfnRange::new(Pfn(0), Pfn(8)).unwrap()).unwrap();
    store.add_chunk(Pfn(0), Shareability::Private).unwrap();
    store.add_chunk(Pfn(4), Shareability::Private).unwrap();
    store
}

/// The lock-free max-order reader against a conversion: once the conversion is published,
/// the reader sees the split; a block the conversion does not touch is never reported 4K.
#[test]
fn max_order_reader_vs_conversion() {
    model(|| {
        let store = Arc::new(store());
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            thread::spawn(move || {
                store
                    .set_shareability(PfnRange::page(Pfn(0)).unwrap(), Shareability::Shared)
                    .unwrap();
                done.store(true, Ordering::Release);
            })
        };
        let published = done.load(Ordering::Acquire);
        let touched = store.max_mapping_size(Pfn(1)).unwrap();
        let untouched = store.max_mapping_size(Pfn(2)).unwrap();
        if published {
            assert_eq!(touched, PageSize::Size4K);
        }
        assert_ne!(untouched, PageSize::Size4K);
        writer.join().unwrap();
        assert_eq!(store.max_mapping_size(Pfn(1)).unwrap(), PageSize::Size4K);
        assert_eq!(store.max_mapping_size(Pfn(2)).unwrap(), PageSize::Size2M);
        store.check_invariants().unwrap();
    });
}

/// Conversion vs pin over two chunks: locks are taken in PFN order, so no deadlock, and the
/// conversion either ran before the pin or was refused by it.
#[test]
fn conversion_vs_pin_across_chunks() {
    model(|| {
        let store = Arc::new(store());
        let all = PfnRange::new(Pfn(0), Pfn(8)).unwrap();
        let pinner = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                store
                    .pin(PfnRange::new(Pfn(3), Pfn(5)).unwrap(), PinOwner(1))
                    .unwrap();
            })
        };
        let converted = store.set_shareability(all, Shareability::Shared);
        pinner.join().unwrap();
        let shared = store.attributes(Pfn(0)).unwrap().shareability == Shareability::Shared;
        match converted {
            Ok(_) => assert!(shared),
            Err(crate::MetadataError::Pinned { first_pfn, owner }) => {
                assert_eq!((first_pfn, owner), (Pfn(3), PinOwner(1)));
                assert!(!shared);
            }
            Err(e) => panic!("unexpected {e}"),
        }
        store.check_invariants().unwrap();
    });
}
