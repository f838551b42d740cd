//! The change transaction through the facade: plans, pins, vetoes, unmap failures and their
//! rollback, panics, re-entrancy, registration and replay, punch-holes.

mod common;

use std::sync::Arc;

use common::*;
use pfnstore::core::testing::XorShift;
use pfnstore::core::{Geometry, PageSize};
use pfnstore::subscribers::{Callback, IommuMapper, KvmMmu, Misbehaviour};
use pfnstore::{
    ChangeKind, ConvertMode, FileOptions, Interest, PinOwner, Shareability, StoreError, Subscriber,
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
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All).unwrap();
    assert_eq!(recorder.names(), ["map"], "the replay of the backed 1 GiB");
    recorder.take();
    assert_eq!(file.max_mapping_size(0).unwrap(), PageSize::Size1G);

    let offset = 1000 * PAGE;
    let to_shared = file
        .convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let plan = &to_shared.plan;
    assert_eq!(plan.region(), Some(pages(0, 1 << 18)));
    assert_eq!(plan.unmap().len(), 1, "one 1G block: {:?}", plan.unmap());
    assert_eq!(plan.unmap()[0].run.size(), PageSize::Size1G);
    assert_eq!(blocks_of(plan.map(), PageSize::Size2M), 511);
    assert_eq!(blocks_of(plan.map(), PageSize::Size4K), 512);
    assert!(plan.map().len() <= 6, "compact: {} runs", plan.map().len());
    assert_eq!(to_shared.split_blocks(), 2);
    assert_eq!(file.shareability(offset).unwrap(), Shareability::Shared);
    assert_eq!(
        file.shareability(offset + PAGE).unwrap(),
        Shareability::Private
    );
    assert_eq!(file.max_mapping_size(offset).unwrap(), PageSize::Size4K);
    assert_eq!(file.max_mapping_size(0).unwrap(), PageSize::Size2M);

    let back = file
        .convert(offset, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let plan = &back.plan;
    assert_eq!(plan.region(), Some(pages(0, 1 << 18)));
    assert_eq!(blocks_of(plan.unmap(), PageSize::Size2M), 511);
    assert_eq!(blocks_of(plan.unmap(), PageSize::Size4K), 512);
    assert_eq!(plan.map().len(), 1);
    assert_eq!(plan.map()[0].run.size(), PageSize::Size1G);
    assert_eq!(back.merged_blocks(), 2);
    assert_eq!(file.max_mapping_size(offset).unwrap(), PageSize::Size1G);
    assert_eq!(file.stats().metadata.nodes, 1, "merged back to one record");
    assert_eq!(
        recorder.names(),
        ["prepare", "unmap", "map", "prepare", "unmap", "map"]
    );
    // `prepare` saw the plan `unmap` and `map` got.
    let events = recorder.events();
    let (Event::Unmap(_, a), Event::Map(_, b)) = (&events[1], &events[2]) else {
        panic!("{events:?}")
    };
    assert_eq!(a, b);
}

#[test]
fn converting_to_the_current_shareability_notifies_nobody() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All).unwrap();
    let outcome = file
        .convert(0, 8 * PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(outcome.plan.is_empty());
    assert!(outcome.is_noop());
    assert!(recorder.events().is_empty());
}

#[test]
fn a_pinned_page_fails_the_conversion_before_anyone_hears_of_it() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(128 * PAGE).populated())
        .unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All).unwrap();
    recorder.take();
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
            pfn: file.pfn_at(70 * PAGE).unwrap(),
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
            pfn: file.pfn_at(70 * PAGE).unwrap(),
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
        file.max_mapping_size(8 * PAGE).unwrap(),
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
    let _r1 = store.subscribe(&dyn_sub(&first), Interest::All).unwrap();
    let _r2 = store
        .subscribe(&dyn_sub(&second), Interest::File(file.id()))
        .unwrap();
    let _r3 = store.subscribe(&dyn_sub(&third), Interest::All).unwrap();
    for r in [&first, &second, &third] {
        r.take();
    }
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
            pfn: file.pfn_at(8 * PAGE).unwrap(),
            subscriber: "second".into(),
            reason: "device busy".into()
        }
    );
    assert_eq!(first.names(), ["prepare", "abort"]);
    assert_eq!(second.names(), ["prepare"], "the vetoer is not aborted");
    assert!(third.events().is_empty(), "never asked");
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Private);
    assert_eq!(file.max_mapping_size(0).unwrap(), PageSize::Size1G);
}

#[test]
fn file_interest_filters_other_files() {
    let store = synthetic(tiny(), 4, 1);
    let a = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let b = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let only_b = Recorder::new("b");
    let _reg = store
        .subscribe(&dyn_sub(&only_b), Interest::File(b.id()))
        .unwrap();
    a.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(only_b.events().is_empty());
    b.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(only_b.names(), ["prepare", "unmap", "map"]);
}

#[test]
fn subscribing_to_a_file_that_is_not_open_is_refused() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let id = file.id();
    let r = Recorder::new("r");
    let missing = pfnstore::FileId(id.0 + 7);
    assert_eq!(
        store
            .subscribe(&dyn_sub(&r), Interest::File(missing))
            .unwrap_err(),
        StoreError::NoSuchFile { file: missing }
    );
    file.destroy().unwrap();
    assert_eq!(
        store
            .subscribe(&dyn_sub(&r), Interest::File(id))
            .unwrap_err(),
        StoreError::NoSuchFile { file: id }
    );
}

#[test]
fn an_unmap_failure_rolls_back_and_only_what_cannot_be_restored_is_quarantined() {
    let store = synthetic(tiny(), 4, 1);
    let file = store
        .create_file(FileOptions::new(128 * PAGE).shared().populated())
        .unwrap();
    let healthy = Arc::new(IommuMapper::new("healthy", store.geometry()));
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _r1 = store.subscribe(&dyn_sub(&healthy), Interest::All).unwrap();
    let _r2 = store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap();
    assert_eq!(
        iommu.mappings(),
        2,
        "two uniform chunks, two mappings (replayed)"
    );
    // Converting page 3 splits the first chunk; the IOMMU cannot unmap it.
    iommu.inject(Misbehaviour::fail_unmap(pages(3, 4), false));
    let err = file
        .convert(3 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::UnmapFailed {
            file: file.id(),
            offset: 3 * PAGE,
            end: 4 * PAGE,
            pfn: file.pfn_at(3 * PAGE).unwrap(),
            subscriber: "iommu".into(),
            reason: "injected unmap failure".into(),
            quarantined: vec![],
        }
    );
    // Rolled back: the shareability, the mappings and the accounting are as they were.
    assert_eq!(file.shareability(3 * PAGE).unwrap(), Shareability::Shared);
    assert!(file.attributes(3 * PAGE).unwrap().quarantined.is_none());
    assert_eq!((healthy.mappings(), iommu.mappings()), (2, 2));
    assert_eq!(store.stats().allocator.total.quarantined_pages, 0);
    // Now the restore fails too: exactly the pages it names are quarantined, and the
    // mapping shape of everyone else is unchanged (the next plan unmaps the same 64 pages).
    iommu.inject(Misbehaviour::fail_unmap(pages(3, 4), true));
    let err = file
        .convert(3 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnmapFailed { quarantined, .. } if quarantined == &vec![(3 * PAGE, 4 * PAGE)]),
        "{err}"
    );
    assert!(err.to_string().contains("quarantined"), "{err}");
    assert!(file.attributes(3 * PAGE).unwrap().quarantined.is_some());
    assert!(file.attributes(4 * PAGE).unwrap().quarantined.is_none());
    assert_eq!(store.stats().allocator.total.quarantined_pages, 1);
    assert_eq!(file.max_mapping_size(0).unwrap(), PageSize::Size1G);
    iommu.inject(Misbehaviour::none());
    assert!(matches!(
        file.convert(3 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve),
        Err(StoreError::Quarantined { offset, .. }) if offset == 3 * PAGE
    ));
    file.punch_hole(0, 64 * PAGE).unwrap();
    assert!(
        healthy.violations().is_empty(),
        "{:?}",
        healthy.violations()
    );
    // A quarantined offset is never backed again.
    assert!(matches!(
        file.populate(0, 64 * PAGE),
        Err(StoreError::Quarantined { offset, .. }) if offset == 3 * PAGE
    ));
    file.destroy().unwrap();
    let total = store.stats().allocator.total;
    assert_eq!((total.allocated_pages, total.quarantined_pages), (0, 1));
    store.check_invariants().unwrap();
}

#[test]
fn panics_in_callbacks_are_reported_not_propagated() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _reg = store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap();

    mmu.inject(Misbehaviour::panic_in(Callback::Prepare));
    let err = file
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Vetoed { reason, .. } if reason.contains("panicked")),
        "{err}"
    );
    assert_eq!(file.shareability(0).unwrap(), Shareability::Private);

    mmu.inject(Misbehaviour::panic_in(Callback::Unmap));
    let err = file
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnmapFailed { offset: 0, end, .. } if *end == 64 * PAGE),
        "{err}"
    );
    assert_eq!(file.shareability(0).unwrap(), Shareability::Private);
    // A panic in `map` cannot undo the change: it happened.
    mmu.inject(Misbehaviour::panic_in(Callback::Map));
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    // The store is still usable: its locks were not poisoned, other files convert.
    mmu.inject(Misbehaviour::none());
    let other = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    other
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    store.check_invariants().unwrap();
}

/// A subscriber that, from inside `map`, converts the same range (refused, not a deadlock),
/// reads and faults pages of the same chunk outside the change (allowed), and converts
/// another file's range (works).
struct Reentrant {
    same: pfnstore::GuestFile,
    other: pfnstore::GuestFile,
    results: std::sync::Mutex<Vec<Result<(), StoreError>>>,
}

impl Subscriber for Reentrant {
    fn name(&self) -> &str {
        "reentrant"
    }
    fn unmap(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
    fn restore(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
    fn map(&self, change: &pfnstore::Change<'_>) {
        if change.file != self.same.id() || !matches!(change.kind, ChangeKind::Convert { .. }) {
            return;
        }
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
        results.push(self.same.fault(40 * PAGE, Shareability::Private).map(drop));
        results.push(
            self.same
                .convert(40 * PAGE, PAGE, Shareability::Shared, ConvertMode::Preserve)
                .map(drop),
        );
    }
}

#[test]
fn callbacks_may_query_and_operate_elsewhere_but_not_reenter() {
    let store = synthetic(tiny(), 4, 1);
    let same = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let other = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let sub = Arc::new(Reentrant {
        same: same.clone(),
        other: other.clone(),
        results: Default::default(),
    });
    let reg = store
        .subscribe(&dyn_sub(&sub), Interest::File(same.id()))
        .unwrap();
    same.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let results = sub.results.lock().unwrap().clone();
    assert!(
        matches!(results[0], Err(StoreError::Reentrant { offset: 0, .. })),
        "{results:?}"
    );
    assert_eq!(results[1], Ok(()), "another file");
    assert_eq!(results[2], Ok(()), "a query");
    assert_eq!(results[3], Ok(()), "a fault of another page of the chunk");
    assert!(
        matches!(results[4], Err(StoreError::Reentrant { .. })),
        "a second change in the chunk: {results:?}"
    );
    assert_eq!(other.shareability(0).unwrap(), Shareability::Shared);
    drop(reg);
}

/// Registers another subscriber from inside `prepare`: the registration needs the file the
/// conversion holds, so it is refused rather than deadlocking; from outside it works and
/// replays.
struct Registrar {
    store: pfnstore::Store,
    newcomer: Arc<Recorder>,
    outcome: std::sync::Mutex<Option<Result<pfnstore::Registration, StoreError>>>,
}

impl Subscriber for Registrar {
    fn name(&self) -> &str {
        "registrar"
    }
    fn prepare(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::Veto> {
        let mut slot = self.outcome.lock().unwrap();
        if slot.is_none() {
            *slot = Some(
                self.store
                    .subscribe(&dyn_sub(&self.newcomer), Interest::All),
            );
        }
        Ok(())
    }
    fn unmap(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
    fn map(&self, _: &pfnstore::Change<'_>) {}
    fn restore(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
}

#[test]
fn a_registration_from_inside_a_change_of_its_file_is_refused_not_deadlocked() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let newcomer = Recorder::new("newcomer");
    let registrar = Arc::new(Registrar {
        store: store.clone(),
        newcomer: Arc::clone(&newcomer),
        outcome: Default::default(),
    });
    let _reg = store
        .subscribe(&dyn_sub(&registrar), Interest::All)
        .unwrap();
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let outcome = registrar.outcome.lock().unwrap().take().unwrap();
    assert!(
        matches!(outcome, Err(StoreError::Reentrant { .. })),
        "{outcome:?}"
    );
    assert!(newcomer.events().is_empty());
    let _late = store.subscribe(&dyn_sub(&newcomer), Interest::All).unwrap();
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(newcomer.names(), ["prepare", "unmap", "map"]);
}

#[test]
fn a_dropped_registration_stops_the_calls_and_releases_the_subscriber() {
    let store = synthetic(tiny(), 2, 1);
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    let kept = Recorder::new("kept");
    let _kept_reg = store.subscribe(&dyn_sub(&kept), Interest::All).unwrap();
    let gone = Recorder::new("gone");
    let gone_weak = Arc::downgrade(&gone);
    let reg = store.subscribe(&dyn_sub(&gone), Interest::All).unwrap();
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(gone.take().len(), 3);
    drop(reg);
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(
        gone.events().is_empty(),
        "called after its registration was dropped"
    );
    assert_eq!(kept.take().len(), 6);
    drop(gone);
    assert!(
        gone_weak.upgrade().is_none(),
        "the store kept an unregistered subscriber alive"
    );
}

/// A subscriber that holds the store and a file: with weak registrations, no cycle.
struct Holder {
    _store: pfnstore::Store,
    _file: pfnstore::GuestFile,
}

impl Subscriber for Holder {
    fn name(&self) -> &str {
        "holder"
    }
    fn unmap(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
    fn map(&self, _: &pfnstore::Change<'_>) {}
    fn restore(&self, _: &pfnstore::Change<'_>) -> Result<(), pfnstore::UnmapError> {
        Ok(())
    }
}

#[test]
fn the_store_holds_subscribers_weakly_so_a_subscriber_may_hold_the_store() {
    let store = synthetic(tiny(), 2, 1);
    let store_weak = store.downgrade();
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let holder: Arc<dyn Subscriber> = Arc::new(Holder {
        _store: store.clone(),
        _file: file.clone(),
    });
    let registration = store.subscribe(&holder, Interest::All).unwrap();
    // The registration outlives the subscriber: a dropped subscriber is just not called.
    let holder_weak = Arc::downgrade(&holder);
    drop(holder);
    assert!(
        holder_weak.upgrade().is_none(),
        "the store kept the subscriber alive"
    );
    file.convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    drop((registration, file, store));
    assert!(
        store_weak.upgrade().is_none(),
        "a cycle kept the store alive"
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
    assert_eq!(file.pfn_at(8 * PAGE).unwrap(), None);
    file.populate(0, 64 * PAGE).unwrap();
    assert!(file.pfn_at(8 * PAGE).unwrap().is_some());
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Shared);
    assert_eq!(file.shareability(16 * PAGE).unwrap(), Shareability::Private);
    // Punching a hole keeps the shareability.
    file.punch_hole(8 * PAGE, 8 * PAGE).unwrap();
    assert_eq!(file.pfn_at(8 * PAGE).unwrap(), None);
    assert_eq!(file.shareability(8 * PAGE).unwrap(), Shareability::Shared);
    assert_eq!(file.stats().backed_pages, 56);
    file.check_invariants().unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn punch_hole_unmaps_then_frees_dirty_memory_and_maps_what_is_left() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let recorder = Recorder::new("r");
    let _reg = store.subscribe(&dyn_sub(&recorder), Interest::All).unwrap();
    recorder.take();
    let before = store.stats().allocator.total;
    file.punch_hole(16 * PAGE, 8 * PAGE).unwrap();
    let events = recorder.events();
    let [
        Event::Unmap(ChangeKind::Punch, plan),
        Event::Map(ChangeKind::Punch, _),
    ] = events.as_slice()
    else {
        panic!("unmap then map expected: {events:?}")
    };
    // The chunk was mapped as one block: unmap it whole; map the two sides of the hole.
    assert_eq!(plan.unmap_blocks(), 1);
    assert_eq!(plan.map_blocks(), 2 + 5);
    let after = store.stats().allocator.total;
    assert_eq!(after.free_pages, before.free_pages + 8);
    assert_eq!(
        after.dirty_pages,
        before.dirty_pages + 8,
        "freed memory is dirty until scrubbed"
    );
    // Population is announced: the hole comes back as a merge of the whole chunk.
    recorder.take();
    file.populate(16 * PAGE, 8 * PAGE).unwrap();
    let events = recorder.events();
    let [
        Event::Unmap(ChangeKind::Populate, _),
        Event::Map(ChangeKind::Populate, plan),
    ] = events.as_slice()
    else {
        panic!("a populate notification expected: {events:?}")
    };
    assert_eq!(plan.map_blocks(), 1);
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
            pfn: file.pfn_at(0).unwrap(),
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
            pfn: file.pfn_at(PAGE).unwrap(),
        }
    );
}

#[test]
fn a_refused_write_backs_nothing() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).shared())
        .unwrap();
    assert!(matches!(
        file.write(0, b"hello"),
        Err(StoreError::NoHostMemory { .. })
    ));
    assert_eq!(file.pfn_at(0).unwrap(), None);
    assert_eq!(store.stats().allocator.total.allocated_pages, 0);
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
    // Larger than the store: refused unless overcommitted, and a typed error at any size.
    assert!(matches!(
        store.create_file(FileOptions::new(256 * PAGE)),
        Err(StoreError::FileTooLarge { size, limit, .. }) if size == 256 * PAGE && limit == 128 * PAGE
    ));
    assert!(matches!(
        store.create_file(FileOptions::new(0xFFFF_FFFF_FFFF_F000).overcommit()),
        Err(StoreError::FileTooLarge { .. })
    ));
    assert_eq!(store.stats().files, 1);
    let huge = store
        .create_file(FileOptions::new(256 * PAGE).overcommit())
        .unwrap();
    assert_eq!(store.stats().committed, (64 + 256) * PAGE);
    let dirty_before = store.stats().allocator.total.dirty_pages;
    assert!(matches!(
        huge.populate(0, 256 * PAGE),
        Err(StoreError::OutOfMemory { .. })
    ));
    assert_eq!(huge.stats().backed_pages, 0);
    let total = store.stats().allocator.total;
    assert_eq!(total.allocated_pages, 0);
    assert_eq!(
        total.dirty_pages, dirty_before,
        "a failed populate changes no accounting"
    );
    assert_eq!(file.stats().metadata.nodes, 1);
    store.check_invariants().unwrap();
}

#[test]
fn a_failed_populate_gives_dirty_memory_back_dirty() {
    let store = synthetic(tiny(), 2, 1);
    let first = store
        .create_file(FileOptions::new(128 * PAGE).populated())
        .unwrap();
    first.punch_hole(0, 64 * PAGE).unwrap();
    let before = store.stats().allocator.total;
    assert_eq!(before.dirty_pages, 64);
    let second = store.create_file(FileOptions::new(128 * PAGE)).unwrap();
    assert!(matches!(
        second.populate(0, 128 * PAGE),
        Err(StoreError::OutOfMemory { .. })
    ));
    let after = store.stats().allocator.total;
    assert_eq!(after, before, "accounting changed by a failed populate");
    store.check_invariants().unwrap();
}

#[test]
fn destroy_closes_the_file_for_every_handle() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let other = file.clone();
    let id = file.id();
    file.destroy().unwrap();
    assert_eq!(
        other.pfn_at(0).unwrap_err(),
        StoreError::Destroyed { file: id }
    );
    assert_eq!(
        other.populate(0, PAGE).unwrap_err(),
        StoreError::Destroyed { file: id }
    );
    assert_eq!(
        other
            .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
            .unwrap_err(),
        StoreError::Destroyed { file: id }
    );
    assert_eq!(
        other.fault(0, Shareability::Private).unwrap_err(),
        StoreError::Destroyed { file: id }
    );
    assert_eq!(
        other.clone().destroy().unwrap_err(),
        StoreError::Destroyed { file: id }
    );
    assert_eq!(store.stats().files, 0);
    assert!(store.file(id).is_none());
    assert_eq!(store.stats().allocator.total.allocated_pages, 0);
    store.check_invariants().unwrap();
}

#[test]
fn faults_report_the_largest_mappable_block() {
    let store = synthetic(tiny(), 4, 1);
    let file = store.create_file(FileOptions::new(128 * PAGE)).unwrap();
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _reg = store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap();
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
fn a_first_touch_fault_falls_back_to_the_largest_block_memory_allows() {
    // Two chunks; the first is taken by another file except for one middle block.
    let store = synthetic(tiny(), 1, 1);
    let squatter = store
        .create_file(FileOptions::new(56 * PAGE).populated())
        .unwrap();
    let file = store.create_file(FileOptions::new(64 * PAGE)).unwrap();
    // The uniform block around page 3 is the whole chunk, which cannot be had: the fault
    // backs the middle block instead, like `populate` of that page would.
    let fault = file.fault(3 * PAGE, Shareability::Private).unwrap();
    assert_eq!(fault.size, PageSize::Size2M);
    assert_eq!(file.stats().backed_pages, 8);
    drop(squatter);
    store.check_invariants().unwrap();
}

#[test]
fn sixteen_gib_with_one_percent_shared_costs_the_iommu_one_mapping_per_block() {
    // 16 GiB private; 1% of its 4K pages (41,943) converted to shared at random. A 4K-granular
    // manager (QEMU's bitmap + VFIO) would hold up to 4 million mappings; the plans give the
    // iommufd-like mapper one mapping per uniform shared block.
    let store = synthetic(Geometry::X86_64, 16, 2);
    let file = store
        .create_file(FileOptions::new(16 * GIB).populated())
        .unwrap();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _reg = store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap();
    let total = 16 * GIB / PAGE;
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
    let mut shared = std::collections::BTreeSet::new();
    while shared.len() < (total / 100) as usize {
        shared.insert(rng.below(total));
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
    let blocks = file.mapped_blocks(0, 16 * GIB).unwrap();
    let shared_blocks: u64 = blocks
        .iter()
        .filter(|e| e.shareability == Shareability::Shared)
        .map(|e| e.run.count())
        .sum();
    assert_eq!(iommu.mappings(), shared_blocks);
    assert!(iommu.mappings() < 50_000, "{} mappings", iommu.mappings());
    assert!(
        iommu.violations().is_empty(),
        "{:?}",
        &iommu.violations()[..3.min(iommu.violations().len())]
    );
}

#[test]
fn dropping_a_file_with_live_pins_quarantines_only_the_pinned_memory() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).populated())
        .unwrap();
    let pinned_pfn = file.pfn_at(8 * PAGE).unwrap().unwrap();
    file.pin(8 * PAGE, 2 * PAGE, PinOwner(3)).unwrap();
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
    // Everything but the two quarantined pages can be backed again, never those.
    let again = store.create_file(FileOptions::new(126 * PAGE)).unwrap();
    again.populate(0, 126 * PAGE).unwrap();
    assert!(
        again
            .extents()
            .unwrap()
            .iter()
            .all(|e| { e.pfn.0 > pinned_pfn.0 + 1 || e.pfn.0 + e.len / PAGE <= pinned_pfn.0 }),
        "quarantined memory was reused"
    );
    assert_eq!(store.stats().allocator.total.free_pages, 0);
    store.check_invariants().unwrap();
}

/// What `ConvertMode::Zero` zeroes: every backed page of the requested range once any page of
/// it changes, those that already had the target shareability too; and nothing when nothing
/// changes.
#[test]
fn a_zero_conversion_zeroes_the_whole_range_once_anything_changes_and_nothing_otherwise() {
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(4 * PAGE).shared().populated())
        .unwrap();
    let page = |i: u64| [i as u8 + 1; 16];
    let read = |i: u64| {
        let mut b = [0u8; 16];
        file.read(i * PAGE, &mut b).unwrap();
        b
    };
    for i in 0..4 {
        file.write(i * PAGE, &page(i)).unwrap();
    }
    // Nothing changes: nothing is zeroed.
    let same = file
        .convert(0, 4 * PAGE, Shareability::Shared, ConvertMode::Zero)
        .unwrap();
    assert!(same.is_noop());
    assert!((0..4).all(|i| read(i) == page(i)));
    // Page 1 private already; then pages 0..3 to private with ZERO: 0 and 2 change, 1 does
    // not, and all three are zeroed. Page 3 is outside the range and keeps its bytes.
    file.convert(PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    file.convert(0, 3 * PAGE, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    file.convert(0, 3 * PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    for i in 0..3 {
        assert_eq!(read(i), [0; 16], "page {i}");
    }
    assert_eq!(read(3), page(3));
    store.check_invariants().unwrap();
}
