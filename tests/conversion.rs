//! The conversion transaction through the facade: plans, pins, vetoes, unmap failures,
//! panics, re-entrancy, registration, punch-holes.

mod common;

use std::sync::Arc;

use common::*;
use pfnstore::core::testing::XorShift;
use pfnstore::core::{Geometry, PageSize, Pfn, PfnRange};
use pfnstore::subscribers::{Callback, FaultPlan, IommuMapper, KvmMmu};
use pfnstore::{
    ConvertMode, FileOptions, Interest, PinOwner, Shareability, StoreError, Subscriber,
};

fn blocks_of(entries: &[pfnstore::PlanEntry], size: PageSize) -> u64 {
    entries
        .iter()
        .filter(|e| e.run.size() == size)
        .map(|e| e.run.count())
        .sum()
}

#[test]
fn a_4k_conversion_inside_a_uniform_1g_splits_and_merges_back() {
    let store = synthetic(Geometry::X86_64, 2, 1);
    let file = store
        .create_file(FileOptions::new(GIB).populated())
        .unwrap();
    let recorder = Recorder::new("recorder");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All);
    assert_eq!(file.max_mapping_order(0).unwrap(), PageSize::Size1G);

    let offset = 1000 * PAGE;
    let to_shared = file
        .convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let plan = &to_shared.plan;
    assert_eq!(
        plan.region(),
        Some(PfnRange::new(Pfn(0), Pfn(1 << 18)).unwrap())
    );
    assert_eq!(
        plan.unmap().len(),
        1,
        "one 1G block to unmap: {:?}",
        plan.unmap()
    );
    assert_eq!(plan.unmap()[0].run.size(), PageSize::Size1G);
    assert_eq!(blocks_of(plan.map(), PageSize::Size2M), 511);
    assert_eq!(blocks_of(plan.map(), PageSize::Size4K), 512);
    assert!(plan.map().len() <= 6, "compact: {} runs", plan.map().len());
    assert_eq!(file.shareability(offset).unwrap(), Shareability::Shared);
    assert_eq!(
        file.shareability(offset + PAGE).unwrap(),
        Shareability::Private
    );
    assert_eq!(file.max_mapping_order(offset).unwrap(), PageSize::Size4K);
    assert_eq!(file.max_mapping_order(0).unwrap(), PageSize::Size2M);

    let back = file
        .convert(offset, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let plan = &back.plan;
    assert_eq!(
        plan.region(),
        Some(PfnRange::new(Pfn(0), Pfn(1 << 18)).unwrap())
    );
    assert_eq!(blocks_of(plan.unmap(), PageSize::Size2M), 511);
    assert_eq!(blocks_of(plan.unmap(), PageSize::Size4K), 512);
    assert_eq!(plan.map().len(), 1);
    assert_eq!(plan.map()[0].run.size(), PageSize::Size1G);
    assert_eq!(file.max_mapping_order(offset).unwrap(), PageSize::Size1G);
    assert_eq!(file.stats().metadata.nodes, 1, "merged back to one record");

    let events = recorder.events();
    assert!(matches!(
        events.as_slice(),
        [
            Event::Prepare(_),
            Event::Commit(..),
            Event::Prepare(_),
            Event::Commit(..)
        ]
    ));
}

#[test]
fn converting_to_the_current_shareability_notifies_nobody() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All);
    let outcome = file
        .convert(0, 8 * PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(outcome.plan.is_empty());
    assert!(outcome.change.is_none());
    assert!(recorder.events().is_empty());
}

#[test]
fn a_pinned_page_fails_the_conversion_before_anyone_hears_of_it() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(128 * PAGE).populated())
        .unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All);
    file.pin(70 * PAGE, 2 * PAGE, PinOwner(7)).unwrap();
    let err = file
        .convert(
            64 * PAGE,
            64 * PAGE,
            Shareability::Shared,
            ConvertMode::Preserve,
        )
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Pinned {
            file: file.id(),
            offset: 70 * PAGE,
            pfn: file.translate(70 * PAGE).unwrap(),
            owner: PinOwner(7)
        }
    );
    assert!(recorder.events().is_empty(), "no notifier ran");
    assert_eq!(file.shareability(64 * PAGE).unwrap(), Shareability::Private);
    // Pins on other pages do not matter; unpinning makes the conversion possible.
    file.convert(0, 8 * PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    file.unpin(70 * PAGE, 2 * PAGE, PinOwner(7)).unwrap();
    file.convert(
        64 * PAGE,
        64 * PAGE,
        Shareability::Shared,
        ConvertMode::Preserve,
    )
    .unwrap();
    assert_eq!(
        file.unpin(70 * PAGE, PAGE, PinOwner(7)).unwrap_err(),
        StoreError::NotPinned {
            file: file.id(),
            offset: 70 * PAGE,
            pfn: file.translate(70 * PAGE).unwrap(),
            owner: PinOwner(7)
        }
    );
}

#[test]
fn pins_need_backing_and_block_punch_holes_but_not_huge_mappings() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    assert_eq!(
        file.pin(8 * PAGE, PAGE, PinOwner(1)).unwrap_err(),
        StoreError::NotBacked {
            file: file.id(),
            offset: 8 * PAGE
        }
    );
    file.populate(0, 64 * PAGE).unwrap();
    file.pin(8 * PAGE, PAGE, PinOwner(1)).unwrap();
    assert_eq!(
        file.max_mapping_order(8 * PAGE).unwrap(),
        PageSize::Size1G,
        "a pin does not split"
    );
    assert!(
        matches!(file.punch_hole(0, 16 * PAGE), Err(StoreError::Pinned { offset, .. }) if offset == 8 * PAGE)
    );
    assert_eq!(file.stats().backed_pages, 64, "nothing was freed");
    assert!(
        matches!(file.clone().destroy(), Err(StoreError::FileBusy { offset, .. }) if offset == 8 * PAGE)
    );
    file.unpin(8 * PAGE, PAGE, PinOwner(1)).unwrap();
    file.destroy().unwrap();
    assert_eq!(store.stats().allocator.total.allocated_pages, 0);
}

#[test]
fn a_veto_aborts_the_prepared_subscribers_and_changes_nothing() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let first = Recorder::new("first");
    let second = Recorder::new("second");
    let third = Recorder::new("third");
    *second.veto.lock().unwrap() = Some("device busy".into());
    let _r1 = store.subscribe(&dyn_sub(&first), Interest::All);
    let _r2 = store.subscribe(&dyn_sub(&second), Interest::File(file.id()));
    let _r3 = store.subscribe(&dyn_sub(&third), Interest::All);
    let err = file
        .convert(
            8 * PAGE,
            8 * PAGE,
            Shareability::Shared,
            ConvertMode::Preserve,
        )
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Vetoed {
            file: file.id(),
            offset: 8 * PAGE,
            pfn: file.translate(8 * PAGE).unwrap(),
            subscriber: "second".into(),
            reason: "device busy".into()
        }
    );
    assert!(matches!(
        first.events().as_slice(),
        [Event::Prepare(_), Event::Abort(_)]
    ));
    assert!(
        matches!(second.events().as_slice(), [Event::Prepare(_)]),
        "the vetoer is not aborted"
    );
    assert!(third.events().is_empty(), "never asked");
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Private);
    assert_eq!(file.max_mapping_order(0).unwrap(), PageSize::Size1G);
}

#[test]
fn file_interest_filters_other_files() {
    let store = synthetic(tiny(), 4, 1);
    let a = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let b = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let only_b = Recorder::new("b");
    let _reg = store.subscribe(&dyn_sub(&only_b), Interest::File(b.id()));
    a.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(only_b.events().is_empty());
    b.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(only_b.events().len(), 2);
}

#[test]
fn an_unmap_failure_quarantines_exactly_the_failing_block() {
    let store = synthetic(tiny(), 4, 1);
    let file = store
        .create_file(FileOptions::new(128 * PAGE).shared().populated())
        .unwrap();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _reg = store.subscribe(&dyn_sub(&iommu), Interest::All);
    iommu.map_file(&file).unwrap();
    assert_eq!(iommu.mappings(), 2, "two uniform chunks, two mappings");
    // Converting page 3 splits the first chunk; the IOMMU cannot unmap the old 64-page block.
    iommu.inject(FaultPlan {
        fail_unmap: Some(PfnRange::page(Pfn(3)).unwrap()),
        ..Default::default()
    });
    let err = file
        .convert(3 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::UnmapFailed {
            file: file.id(),
            offset: 0,
            end: 64 * PAGE,
            pfn: file.translate(0).unwrap(),
            subscriber: "iommu".into(),
            reason: "injected unmap failure".into()
        }
    );
    // The conversion itself happened; the block whose unmap failed is quarantined, the
    // other chunk is not.
    assert_eq!(file.shareability(3 * PAGE).unwrap(), Shareability::Private);
    assert!(file.attributes(0).unwrap().quarantined.is_some());
    assert!(file.attributes(63 * PAGE).unwrap().quarantined.is_some());
    assert!(file.attributes(64 * PAGE).unwrap().quarantined.is_none());
    let allocator = store.stats().allocator.total;
    assert_eq!(allocator.quarantined_pages, 64);
    // Quarantined memory cannot convert, and is never handed back to the allocator.
    iommu.inject(FaultPlan::default());
    assert!(matches!(
        file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve),
        Err(StoreError::Quarantined { offset: 0, .. })
    ));
    file.clone().destroy().unwrap();
    let allocator = store.stats().allocator.total;
    assert_eq!(
        (allocator.allocated_pages, allocator.quarantined_pages),
        (0, 64)
    );
    store.check_invariants().unwrap();
}

#[test]
fn panics_in_callbacks_are_reported_not_propagated() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _reg = store.subscribe(&dyn_sub(&mmu), Interest::All);

    mmu.inject(FaultPlan {
        panic_in: Some(Callback::Prepare),
        ..Default::default()
    });
    let err = file
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Vetoed { reason, .. } if reason.contains("panicked")),
        "{err}"
    );
    assert_eq!(file.shareability(0).unwrap(), Shareability::Private);

    mmu.inject(FaultPlan {
        panic_in: Some(Callback::Commit),
        ..Default::default()
    });
    let err = file
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnmapFailed { offset: 0, end, .. } if *end == 64 * PAGE),
        "{err}"
    );
    assert!(file.attributes(5 * PAGE).unwrap().quarantined.is_some());
    // The store is still usable: its locks were not poisoned, other files convert.
    mmu.inject(FaultPlan::default());
    let other = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    other
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    store.check_invariants().unwrap();
}

/// A subscriber that, from inside its commit callback, converts the same range (must be
/// refused, not deadlock) and another file's range (must work).
struct Reentrant {
    same: pfnstore::GuestMemory,
    other: pfnstore::GuestMemory,
    results: std::sync::Mutex<Vec<Result<(), StoreError>>>,
}

impl Subscriber for Reentrant {
    fn name(&self) -> &str {
        "reentrant"
    }
    fn commit(
        &self,
        request: &pfnstore::ConversionRequest,
        _plan: &pfnstore::ConversionPlan,
    ) -> Result<(), pfnstore::UnmapError> {
        if request.file == self.same.id() {
            let mut results = self.results.lock().unwrap();
            results.push(
                self.same
                    .convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
                    .map(drop),
            );
            results.push(
                self.other
                    .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
                    .map(drop),
            );
            results.push(self.same.shareability(0).map(drop));
        }
        Ok(())
    }
    fn invalidate(&self, _: &pfnstore::Invalidation) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
}

#[test]
fn callbacks_may_query_and_operate_elsewhere_but_not_reenter() {
    let store = synthetic(tiny(), 4, 1);
    let same = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let other = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let sub = Arc::new(Reentrant {
        same: same.clone(),
        other: other.clone(),
        results: Default::default(),
    });
    let reg = store.subscribe(&dyn_sub(&sub), Interest::File(same.id()));
    same.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let results = sub.results.lock().unwrap().clone();
    assert!(
        matches!(results[0], Err(StoreError::Reentrant { offset: 0, .. })),
        "{results:?}"
    );
    assert_eq!(results[1], Ok(()));
    assert_eq!(results[2], Ok(()));
    assert_eq!(other.shareability(0).unwrap(), Shareability::Shared);
    drop(reg);
}

/// Registers another subscriber from inside `prepare`: the newcomer must see none of the
/// conversion in flight, and all of the next one.
struct Registrar {
    store: pfnstore::Store,
    newcomer: Arc<Recorder>,
    registration: std::sync::Mutex<Option<pfnstore::Registration>>,
}

impl Subscriber for Registrar {
    fn name(&self) -> &str {
        "registrar"
    }
    fn prepare(&self, _: &pfnstore::ConversionRequest) -> Result<(), pfnstore::Veto> {
        let mut slot = self.registration.lock().unwrap();
        if slot.is_none() {
            *slot = Some(
                self.store
                    .subscribe(&dyn_sub(&self.newcomer), Interest::All),
            );
        }
        Ok(())
    }
    fn commit(
        &self,
        _: &pfnstore::ConversionRequest,
        _: &pfnstore::ConversionPlan,
    ) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
    fn invalidate(&self, _: &pfnstore::Invalidation) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
}

#[test]
fn a_subscriber_registered_mid_conversion_sees_none_of_it() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let newcomer = Recorder::new("newcomer");
    let registrar = Arc::new(Registrar {
        store: store.clone(),
        newcomer: Arc::clone(&newcomer),
        registration: Default::default(),
    });
    let _reg = store.subscribe(&dyn_sub(&registrar), Interest::All);
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(newcomer.events().is_empty());
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(matches!(
        newcomer.events().as_slice(),
        [Event::Prepare(_), Event::Commit(..)]
    ));
}

#[test]
fn a_dropped_registration_stops_the_calls_and_releases_the_subscriber() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let kept = Recorder::new("kept");
    let _kept_reg = store.subscribe(&dyn_sub(&kept), Interest::All);
    let gone = Recorder::new("gone");
    let gone_weak = Arc::downgrade(&gone);
    let reg = store.subscribe(&dyn_sub(&gone), Interest::All);
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(gone.take().len(), 2);
    drop(reg);
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(
        gone.events().is_empty(),
        "called after its registration was dropped"
    );
    assert_eq!(kept.take().len(), 4);
    // The store let go of every reference: the owner's is the last one.
    drop(gone);
    assert!(
        gone_weak.upgrade().is_none(),
        "the store kept an unregistered subscriber alive"
    );
}

#[test]
fn shareability_belongs_to_offsets_not_memory() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    // Converting unbacked offsets is recorded and holds when memory arrives.
    file.convert(
        8 * PAGE,
        8 * PAGE,
        Shareability::Shared,
        ConvertMode::Preserve,
    )
    .unwrap();
    assert_eq!(file.translate(8 * PAGE).unwrap(), None);
    file.populate(0, 64 * PAGE).unwrap();
    assert!(file.translate(8 * PAGE).unwrap().is_some());
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Shared);
    assert_eq!(file.shareability(16 * PAGE).unwrap(), Shareability::Private);
    // Punching a hole keeps the shareability.
    file.punch_hole(8 * PAGE, 8 * PAGE).unwrap();
    assert_eq!(file.translate(8 * PAGE).unwrap(), None);
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Shared);
    assert_eq!(file.stats().backed_pages, 56);
    file.check_invariants().unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn punch_hole_invalidates_then_frees_dirty_memory() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All);
    let before = store.stats().allocator.total;
    file.punch_hole(16 * PAGE, 8 * PAGE).unwrap();
    let events = recorder.events();
    let [Event::Invalidate(inv)] = events.as_slice() else {
        panic!("one invalidation expected: {events:?}")
    };
    assert_eq!(inv.range, PfnRange::new(Pfn(16), Pfn(24)).unwrap());
    // The chunk was mapped as one block: unmap it whole.
    assert_eq!(inv.plan.unmap_blocks(), 1);
    let after = store.stats().allocator.total;
    assert_eq!(after.free_pages, before.free_pages + 8);
    assert_eq!(
        after.dirty_pages,
        before.dirty_pages + 8,
        "freed memory is dirty until scrubbed"
    );
    // The next allocation takes (and scrubs) it.
    file.populate(16 * PAGE, 8 * PAGE).unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn the_host_view_refuses_private_memory_and_synthetic_stores_refuse_bytes() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        file.read(100, &mut buf).unwrap_err(),
        StoreError::PrivateAccess {
            file: file.id(),
            offset: 100,
            pfn: file.translate(0).unwrap(),
        }
    );
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(matches!(
        file.read(100, &mut buf),
        Err(StoreError::NoHostMemory { .. })
    ));
    // An access that starts shared and runs into private memory names the first private byte.
    let mut wide = vec![0u8; 2 * PAGE as usize];
    assert_eq!(
        file.read(0, &mut wide).unwrap_err(),
        StoreError::PrivateAccess {
            file: file.id(),
            offset: PAGE,
            pfn: file.translate(PAGE).unwrap(),
        }
    );
}

#[test]
fn bad_input_is_typed_and_changes_nothing() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let id = file.id();
    assert_eq!(
        file.convert(100, PAGE, Shareability::Shared, ConvertMode::Preserve)
            .unwrap_err(),
        StoreError::Unaligned {
            offset: 100,
            len: PAGE
        }
    );
    assert_eq!(
        file.convert(0, 0, Shareability::Shared, ConvertMode::Preserve)
            .unwrap_err(),
        StoreError::Empty { offset: 0 }
    );
    assert_eq!(
        file.convert(
            60 * PAGE,
            8 * PAGE,
            Shareability::Shared,
            ConvertMode::Preserve
        )
        .unwrap_err(),
        StoreError::BeyondEnd {
            file: id,
            offset: 64 * PAGE,
            size: 64 * PAGE
        }
    );
    assert!(matches!(
        file.populate(u64::MAX - PAGE + 1, PAGE),
        Err(StoreError::BeyondEnd { .. })
    ));
    assert!(matches!(
        store.create_file(FileOptions::new(100)),
        Err(StoreError::Unaligned { .. })
    ));
    assert!(matches!(
        store.create_file(FileOptions::new(0)),
        Err(StoreError::Empty { .. })
    ));
    // More than the store has: out of memory, and nothing stays allocated.
    let huge = store.create_file(FileOptions::new(256 * PAGE)).unwrap();
    assert!(matches!(
        huge.populate(0, 256 * PAGE),
        Err(StoreError::OutOfMemory { .. })
    ));
    assert_eq!(huge.stats().backed_pages, 0);
    assert_eq!(store.stats().allocator.total.allocated_pages, 0);
    assert_eq!(file.stats().metadata.nodes, 1);
    store.check_invariants().unwrap();
}

#[test]
fn faults_report_the_largest_mappable_block() {
    let store = synthetic(tiny(), 4, 1);
    let file = store.create_file(FileOptions::new(128 * PAGE)).unwrap();
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _reg = store.subscribe(&dyn_sub(&mmu), Interest::All);
    let (size, _) = mmu
        .fault(file.id(), 5 * PAGE, Shareability::Private)
        .unwrap();
    assert_eq!(
        size,
        PageSize::Size1G,
        "backed lazily as one chunk and mapped huge"
    );
    assert!(matches!(
        file.fault(5 * PAGE, Shareability::Shared),
        Err(StoreError::PrivateAccess { offset, .. }) if offset == 5 * PAGE
    ));
    file.convert(9 * PAGE, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(
        mmu.fault(file.id(), 9 * PAGE, Shareability::Shared)
            .unwrap()
            .0,
        PageSize::Size4K
    );
    assert_eq!(
        mmu.fault(file.id(), 10 * PAGE, Shareability::Private)
            .unwrap()
            .0,
        PageSize::Size4K
    );
    assert_eq!(
        mmu.fault(file.id(), 20 * PAGE, Shareability::Private)
            .unwrap()
            .0,
        PageSize::Size2M
    );
    assert!(matches!(
        file.fault(9 * PAGE, Shareability::Private),
        Err(StoreError::SharedAccess { .. })
    ));
    assert!(mmu.violations().is_empty(), "{:?}", mmu.violations());
    assert!(mmu.audit().is_empty(), "{:?}", mmu.audit());
}

#[test]
fn sixteen_gib_with_one_percent_shared_costs_the_iommu_one_mapping_per_block() {
    // 16 GiB private; 1% of its 4K pages (41,943) converted to shared at random. A 4K-granular
    // manager (QEMU's bitmap + VFIO) would hold up to 4 million mappings; the plans give the
    // iommufd-like mapper one mapping per uniform shared block.
    let store = synthetic(Geometry::X86_64, 16, 2);
    let file = store.create_file(FileOptions::new(16 * GIB)).unwrap();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _reg = store.subscribe(&dyn_sub(&iommu), Interest::All);
    let pages = 16 * GIB / PAGE;
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
    let mut shared = std::collections::BTreeSet::new();
    while shared.len() < (pages / 100) as usize {
        shared.insert(rng.below(pages));
    }
    for &page in &shared {
        file.convert(
            page * PAGE,
            PAGE,
            Shareability::Shared,
            ConvertMode::Preserve,
        )
        .unwrap();
    }
    let plan = file.block_plan(0, 16 * GIB).unwrap();
    let shared_blocks: u64 = plan
        .iter()
        .filter(|(_, a)| a.shareability == Shareability::Shared)
        .map(|(run, _)| run.count())
        .sum();
    assert_eq!(iommu.mappings() as u64, shared_blocks);
    assert!(iommu.mappings() < 50_000, "{} mappings", iommu.mappings());
    assert!(
        iommu.violations().is_empty(),
        "{:?}",
        &iommu.violations()[..3.min(iommu.violations().len())]
    );
    println!(
        "16 GiB, {} shared 4K pages: {} IOMMU mappings (a 4K-granular mapper: up to {})",
        shared.len(),
        iommu.mappings(),
        pages
    );
}

#[test]
fn dropping_a_file_with_live_pins_quarantines_only_the_pinned_memory() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let pinned_pfn = file.translate(8 * PAGE).unwrap().unwrap();
    file.pin(8 * PAGE, 2 * PAGE, PinOwner(3)).unwrap();
    assert!(file.translate(8 * PAGE).unwrap().is_some());
    let err = file.clone().destroy().unwrap_err();
    assert_eq!(
        err,
        StoreError::FileBusy {
            file: file.id(),
            offset: 8 * PAGE,
            pfn: Some(pinned_pfn)
        }
    );
    assert!(err.to_string().contains(&format!("{pinned_pfn}")), "{err}");
    drop(file);
    // A device may still DMA into the pinned pages: they are never reused. The rest is free.
    let total = store.stats().allocator.total;
    assert_eq!((total.allocated_pages, total.quarantined_pages), (0, 2));
    assert_eq!(store.stats().files, 0);
    store.check_invariants().unwrap();
    let again = store.create_file(FileOptions::new(64 * PAGE).populated());
    assert!(matches!(again, Err(StoreError::OutOfMemory { .. })) || again.is_ok());
    if let Ok(f) = again {
        let all: Vec<_> = f.extents().into_iter().map(|(_, pfns)| pfns).collect();
        assert!(
            all.iter().all(|r| !r.contains(pinned_pfn)),
            "quarantined memory was reused"
        );
    }
}
