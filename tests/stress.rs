//! Several threads convert, pin, punch, populate and fault in several files at once (some
//! sharing a file); afterwards every invariant holds, no PFN backs two offsets, nothing leaked,
//! and the reference subscribers saw only exact plans.

mod common;

use std::sync::Arc;

use common::*;
use pfnstore::core::PfnRange;
use pfnstore::core::testing::XorShift;
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{ConvertMode, FileOptions, GuestFile, Interest, PinOwner, Shareability, StoreError};

const THREADS: usize = 4;
const OPS: usize = 20_000;
const FILE_PAGES: u64 = 192;

fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = XorShift::new(seed | 1);
    move |bound| state.below(bound)
}

/// Errors a racing workload legitimately gets; anything else fails the test.
fn expected(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Pinned { .. }
            | StoreError::NotPinned { .. }
            | StoreError::NotBacked { .. }
            | StoreError::PrivateAccess { .. }
            | StoreError::SharedAccess { .. }
            | StoreError::NoHostMemory { .. }
            | StoreError::OutOfMemory { .. }
    )
}

fn work(thread: usize, files: Vec<GuestFile>, mmu: Arc<KvmMmu>) {
    let mut next = rng(0x5EED + thread as u64 * 7919);
    let owner = PinOwner(thread as u32);
    let mut pins: Vec<(usize, u64, u64)> = Vec::new();
    for _ in 0..OPS {
        let which = next(files.len() as u64) as usize;
        let file = &files[which];
        let start = next(FILE_PAGES);
        let span = if next(4) == 0 { 64 } else { 8 };
        let len = 1 + next(span).min(FILE_PAGES - start - 1);
        let (offset, bytes) = (start * PAGE, len * PAGE);
        let result = match next(7) {
            0 | 1 => {
                let to = if next(2) == 0 {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                file.convert(offset, bytes, to, ConvertMode::Preserve)
                    .map(drop)
            }
            2 => file.populate(offset, bytes),
            3 => file.punch_hole(offset, bytes),
            4 => {
                let r = file.pin(offset, bytes, owner);
                if r.is_ok() {
                    pins.push((which, offset, bytes));
                }
                r
            }
            5 => match pins.pop() {
                Some((w, o, b)) => files[w].unpin(o, b, owner),
                None => Ok(()),
            },
            _ => {
                let access = if next(2) == 0 {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                mmu.fault(file.id(), offset, access).map(drop)
            }
        };
        if let Err(e) = result {
            assert!(expected(&e), "thread {thread}: unexpected {e}");
        }
    }
    for (w, o, b) in pins {
        files[w].unpin(o, b, owner).unwrap();
    }
}

#[test]
fn concurrent_files_keep_every_invariant() {
    let store = synthetic(tiny(), 16, 2);
    let shared_file = store
        .create_file(FileOptions::new(FILE_PAGES * PAGE))
        .unwrap();
    let own: Vec<_> = (0..THREADS)
        .map(|_| {
            store
                .create_file(FileOptions::new(FILE_PAGES * PAGE))
                .unwrap()
        })
        .collect();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _r1 = store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap();
    let _r2 = store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap();

    std::thread::scope(|s| {
        for (t, file) in own.iter().enumerate() {
            let files = vec![file.clone(), shared_file.clone()];
            let mmu = Arc::clone(&mmu);
            s.spawn(move || work(t, files, mmu));
        }
    });

    store.check_invariants().unwrap();
    let mut all: Vec<PfnRange> = Vec::new();
    for file in own.iter().chain([&shared_file]) {
        file.check_invariants().unwrap();
        all.extend(
            file.extents()
                .unwrap()
                .into_iter()
                .map(|e| PfnRange::from_len(e.pfn, e.len / PAGE).unwrap()),
        );
    }
    all.sort();
    for pair in all.windows(2) {
        assert!(!pair[0].overlaps(&pair[1]), "{:?} backs two offsets", pair);
    }
    let backed: u64 = all.iter().map(|r| r.len()).sum();
    assert_eq!(
        store.stats().allocator.total.allocated_pages,
        backed,
        "nothing leaked"
    );
    assert!(iommu.violations().is_empty(), "{:?}", iommu.violations());
    assert!(mmu.violations().is_empty(), "{:?}", mmu.violations());
    assert!(mmu.audit().is_empty(), "{:?}", mmu.audit());

    for file in own.into_iter().chain([shared_file]) {
        file.destroy().unwrap();
    }
    let total = store.stats().allocator.total;
    assert_eq!((total.allocated_pages, total.quarantined_pages), (0, 0));
    store.check_invariants().unwrap();
}
