//! Model tests of the change transaction (`conversion`): random conversions, populations,
//! punch-holes and pins on a small domain, with subscribers that hold exactly what the plans
//! told them and check every unmap against it, and a per-page model of the attributes.
//!
//! After every step: each healthy subscriber holds exactly the current layout (the invariant
//! "what a subscriber was told to map is what the next plan tells it to unmap"), the plans are
//! well formed and capped at the domain's largest block, a failed change changed nothing but
//! the quarantine it reports, and the metadata agrees with the per-page model.

#![cfg(not(pfnstore_loom))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pfnstore_core::{Geometry, OffsetRange, PageOffset, PageSize, Pfn, PfnRange};
use pfnstore_metadata::conversion::{
    Change, ConversionDomain, ConversionError, DomainLimits, Interest, MappingPlan, Registration,
    Subscriber, SubscriberRegistry, UnmapError, Veto,
};
use pfnstore_metadata::{FileId, MetadataError, MetadataStore, PinOwner, Shareability};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const FILE: FileId = FileId(7);

fn geometry() -> Geometry {
    Geometry::new(3, 6).unwrap()
}

fn r(a: u64, b: u64) -> OffsetRange {
    OffsetRange::new(PageOffset(a), PageOffset(b)).unwrap()
}

/// What one mapper holds: block or run start -> (end, shareability).
type Held = BTreeMap<u64, (u64, Shareability)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Maps every backed block (a KVM-like MMU).
    Blocks,
    /// Maps shared runs cut at a boundary (a vfio-type1-like mapper).
    SharedRuns(PageSize),
}

/// A subscriber that follows the plans exactly and records every inconsistency.
struct Mapper {
    name: String,
    policy: Policy,
    held: Mutex<Held>,
    violations: Mutex<Vec<String>>,
    /// Fail `unmap` of plans whose region overlaps this; fail `restore` too if set.
    fail_unmap: Mutex<Option<(OffsetRange, bool)>>,
    veto: Mutex<bool>,
    events: Mutex<Vec<&'static str>>,
}

impl Mapper {
    fn new(name: &str, policy: Policy) -> Arc<Mapper> {
        Arc::new(Mapper {
            name: name.to_string(),
            policy,
            held: Mutex::new(Held::new()),
            violations: Mutex::new(Vec::new()),
            fail_unmap: Mutex::new(None),
            veto: Mutex::new(false),
            events: Mutex::new(Vec::new()),
        })
    }

    fn wanted(&self, plan: &MappingPlan, unmap: bool) -> Vec<(u64, u64, Shareability)> {
        let g = plan.geometry();
        match self.policy {
            Policy::Blocks => {
                let list = if unmap { plan.unmap() } else { plan.map() };
                list.iter()
                    .flat_map(|e| {
                        e.run.blocks(&g).map(move |b| {
                            let range = b.range(&g);
                            (range.start().0, range.end().0, e.shareability)
                        })
                    })
                    .collect()
            }
            Policy::SharedRuns(boundary) => {
                let runs = if unmap {
                    plan.unmap_runs(boundary)
                } else {
                    plan.map_runs(boundary)
                };
                runs.filter(|(_, s)| *s == Shareability::Shared)
                    .map(|(range, s)| (range.start().0, range.end().0, s))
                    .collect()
            }
        }
    }

    fn map_all(&self, items: &[(u64, u64, Shareability)], tolerate_present: bool) {
        let mut held = self.held.lock().unwrap();
        for &(s, e, sh) in items {
            if tolerate_present && held.get(&s) == Some(&(e, sh)) {
                continue;
            }
            let overlap = held
                .range(..e)
                .next_back()
                .is_some_and(|(_, (end, _))| *end > s);
            if overlap {
                self.violations.lock().unwrap().push(format!(
                    "{}: map {s}..{e} overlaps a held mapping",
                    self.name
                ));
            }
            held.insert(s, (e, sh));
        }
    }

    /// What it should hold if it had followed every change from the start.
    fn expected(&self, domain: &ConversionDomain) -> Held {
        let plan = domain.current_plan().unwrap();
        self.wanted(&plan, false)
            .into_iter()
            .map(|(s, e, sh)| (s, (e, sh)))
            .collect()
    }
}

impl Subscriber for Mapper {
    fn name(&self) -> &str {
        &self.name
    }

    fn run_boundary(&self) -> Option<PageSize> {
        match self.policy {
            Policy::Blocks => None,
            Policy::SharedRuns(b) => Some(b),
        }
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        self.events.lock().unwrap().push("prepare");
        if let Err(e) = change.plan.check() {
            self.violations.lock().unwrap().push(e);
        }
        if *self.veto.lock().unwrap() {
            return Err(Veto::at(change.range.start(), "no"));
        }
        Ok(())
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events.lock().unwrap().push("unmap");
        if let Some((fail, _)) = *self.fail_unmap.lock().unwrap()
            && change
                .plan
                .region()
                .is_some_and(|region| region.overlaps(&fail))
        {
            return Err(UnmapError {
                range: fail,
                reason: "injected".into(),
            });
        }
        let mut held = self.held.lock().unwrap();
        for (s, e, sh) in self.wanted(change.plan, true) {
            if held.remove(&s) != Some((e, sh)) {
                self.violations.lock().unwrap().push(format!(
                    "{}: told to unmap {s}..{e} ({sh:?}), which it does not hold as such",
                    self.name
                ));
            }
        }
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        self.events.lock().unwrap().push("map");
        let items = self.wanted(change.plan, false);
        self.map_all(&items, false);
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events.lock().unwrap().push("restore");
        if let Some((fail, true)) = *self.fail_unmap.lock().unwrap() {
            return Err(UnmapError {
                range: fail,
                reason: "injected restore failure".into(),
            });
        }
        let items = self.wanted(change.plan, true);
        self.map_all(&items, true);
        Ok(())
    }

    fn abort(&self, _change: &Change<'_>) {
        self.events.lock().unwrap().push("abort");
    }
}

struct Fixture {
    store: Arc<MetadataStore>,
    registry: Arc<SubscriberRegistry>,
    domain: ConversionDomain,
}

fn fixture(pages: u64, initial: Shareability, max_block: PageSize) -> Fixture {
    let g = geometry();
    let span_pages = pages.div_ceil(g.chunk_pages()) * g.chunk_pages();
    let store =
        Arc::new(MetadataStore::new(g, PfnRange::new(Pfn(0), Pfn(span_pages)).unwrap()).unwrap());
    for base in (0..span_pages).step_by(g.chunk_pages() as usize) {
        store.add_chunk(Pfn(base), initial).unwrap();
    }
    let registry = Arc::new(SubscriberRegistry::new());
    let domain = ConversionDomain::with_limits(
        FILE,
        Arc::clone(&store),
        Arc::clone(&registry),
        DomainLimits { pages, max_block },
    );
    Fixture {
        store,
        registry,
        domain,
    }
}

/// Registers `m`; its event log starts after the replay.
fn subscribe(f: &Fixture, m: &Arc<Mapper>) -> Registration {
    let s: Arc<dyn Subscriber> = m.clone();
    let registration = f.registry.register(&s, Interest::File(FILE)).unwrap();
    m.events.lock().unwrap().clear();
    registration
}

#[test]
fn a_4k_conversion_inside_a_backed_chunk_is_one_unmap_and_five_map_runs() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    f.domain.populate_with(r(0, 64), &mut ()).unwrap();
    let kvm = Mapper::new("kvm", Policy::Blocks);
    let _reg = subscribe(&f, &kvm);
    assert_eq!(
        kvm.held.lock().unwrap().len(),
        1,
        "the replay maps the one chunk block"
    );
    let done = f.domain.convert(r(20, 21), Shareability::Shared).unwrap();
    assert_eq!(done.plan.unmap().len(), 1);
    assert_eq!(done.plan.unmap_blocks(), 1);
    assert_eq!(done.plan.map().len(), 5);
    assert_eq!(done.plan.map_blocks(), 7 + 8);
    assert_eq!(
        done.split_blocks(),
        2,
        "the chunk and the page's middle block split"
    );
    let back = f.domain.convert(r(20, 21), Shareability::Private).unwrap();
    assert_eq!(back.plan.map_blocks(), 1, "merged back at once");
    assert_eq!(back.merged_blocks(), 2);
    assert_eq!(*kvm.held.lock().unwrap(), kvm.expected(&f.domain));
    assert!(kvm.violations.lock().unwrap().is_empty());
    assert_eq!(
        *kvm.events.lock().unwrap(),
        ["prepare", "unmap", "map", "prepare", "unmap", "map"]
    );
}

#[test]
fn unbacked_pages_are_in_no_plan_and_population_is_announced() {
    let f = fixture(100, Shareability::Shared, PageSize::Size1G);
    let kvm = Mapper::new("kvm", Policy::Blocks);
    let _reg = subscribe(&f, &kvm);
    // Converting unbacked pages is recorded, but nobody maps anything.
    let done = f.domain.convert(r(3, 5), Shareability::Private).unwrap();
    assert!(done.plan.unmap().is_empty() && done.plan.map().is_empty());
    let populated = f.domain.populate_with(r(0, 16), &mut ()).unwrap();
    assert!(populated.plan.unmap().is_empty());
    assert_eq!(populated.changed(), &[r(0, 16)]);
    assert_eq!(*kvm.held.lock().unwrap(), kvm.expected(&f.domain));
    // Populating the rest of the chunk merges nothing across the private pages...
    f.domain.populate_with(r(0, 64), &mut ()).unwrap();
    // ...converting them back merges the whole chunk: the plan unmaps the small blocks.
    let merged = f.domain.convert(r(3, 5), Shareability::Shared).unwrap();
    assert_eq!(merged.plan.map_blocks(), 1);
    assert!(merged.plan.unmap_blocks() > 1);
    // A punch in the middle unmaps the chunk and maps what is left.
    let punched = f.domain.punch_with(r(30, 31), &mut ()).unwrap();
    assert_eq!(punched.plan.unmap_blocks(), 1);
    // 3 middle blocks and 6 pages before the hole, 1 page and 4 middle blocks after it.
    assert_eq!(punched.plan.map_blocks(), 3 + 6 + 1 + 4);
    assert_eq!(*kvm.held.lock().unwrap(), kvm.expected(&f.domain));
    assert!(kvm.violations.lock().unwrap().is_empty());
    // The tail beyond the file end (pages 100..128) is never in a plan.
    f.domain.populate_with(r(64, 100), &mut ()).unwrap();
    let tail = f.domain.current_plan().unwrap();
    let end = tail.map().last().unwrap().run.range(&geometry()).end();
    assert_eq!(end, PageOffset(100));
}

#[test]
fn plans_never_claim_more_than_the_memory_is_contiguous_for() {
    for (max, largest) in [
        (PageSize::Size4K, 1),
        (PageSize::Size2M, 8),
        (PageSize::Size1G, 64),
    ] {
        let f = fixture(64, Shareability::Private, max);
        let done = f.domain.populate_with(r(0, 64), &mut ()).unwrap();
        let biggest = done
            .plan
            .map()
            .iter()
            .map(|e| geometry().pages(e.run.size()))
            .max()
            .unwrap();
        assert_eq!(biggest, largest, "{max:?}");
        assert_eq!(f.domain.max_mapping_size(PageOffset(5)).unwrap(), max);
    }
}

#[test]
fn an_unmap_failure_rolls_back_and_restores_the_others() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    f.domain.populate_with(r(0, 64), &mut ()).unwrap();
    let healthy = Mapper::new("healthy", Policy::Blocks);
    let failing = Mapper::new("failing", Policy::Blocks);
    let _a = subscribe(&f, &healthy);
    let _b = subscribe(&f, &failing);
    *failing.fail_unmap.lock().unwrap() = Some((r(40, 41), false));
    let err = f
        .domain
        .convert(r(8, 16), Shareability::Shared)
        .unwrap_err();
    match err {
        ConversionError::UnmapFailed {
            subscriber,
            range,
            quarantined,
            ..
        } => {
            assert_eq!(subscriber, "failing");
            assert_eq!(range, r(40, 41));
            assert!(quarantined.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
    // Nothing changed; both hold what they held.
    assert_eq!(
        f.store.attributes(Pfn(10)).unwrap().shareability,
        Shareability::Private
    );
    for m in [&healthy, &failing] {
        assert_eq!(*m.held.lock().unwrap(), m.expected(&f.domain), "{}", m.name);
    }
    assert_eq!(
        *healthy.events.lock().unwrap(),
        ["prepare", "unmap", "restore", "abort"]
    );
    assert_eq!(
        *failing.events.lock().unwrap(),
        ["prepare", "unmap", "restore", "abort"]
    );
}

#[test]
fn a_failed_restore_is_quarantined_without_changing_the_mapping_shape() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    f.domain.populate_with(r(0, 64), &mut ()).unwrap();
    let healthy = Mapper::new("healthy", Policy::Blocks);
    let failing = Mapper::new("failing", Policy::Blocks);
    let _a = subscribe(&f, &healthy);
    let _b = subscribe(&f, &failing);
    *failing.fail_unmap.lock().unwrap() = Some((r(40, 48), true));
    let err = f
        .domain
        .convert(r(8, 16), Shareability::Shared)
        .unwrap_err();
    let ConversionError::UnmapFailed { quarantined, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(quarantined, vec![r(40, 48)]);
    assert!(f.store.attributes(Pfn(42)).unwrap().quarantined.is_some());
    // The healthy subscriber's 1G block is still exactly what the next plan unmaps.
    assert_eq!(
        f.domain.max_mapping_size(PageOffset(0)).unwrap(),
        PageSize::Size1G
    );
    *failing.fail_unmap.lock().unwrap() = None;
    let done = f.domain.punch_with(r(0, 8), &mut ()).unwrap();
    assert_eq!(done.plan.unmap_blocks(), 1);
    assert!(healthy.violations.lock().unwrap().is_empty());
    assert_eq!(*healthy.held.lock().unwrap(), healthy.expected(&f.domain));
    // Quarantined pages cannot convert or be backed again once punched.
    assert!(matches!(
        f.domain.convert(r(40, 41), Shareability::Shared),
        Err(ConversionError::Metadata(MetadataError::Quarantined { .. }))
    ));
    f.domain.punch_with(r(40, 48), &mut ()).unwrap();
    assert!(matches!(
        f.domain.populate_with(r(40, 41), &mut ()),
        Err(ConversionError::Metadata(MetadataError::Quarantined { .. }))
    ));
}

#[test]
fn a_veto_aborts_the_prepared_ones_and_changes_nothing() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    let first = Mapper::new("first", Policy::Blocks);
    let second = Mapper::new("second", Policy::Blocks);
    let _a = subscribe(&f, &first);
    let _b = subscribe(&f, &second);
    *second.veto.lock().unwrap() = true;
    let err = f.domain.convert(r(5, 6), Shareability::Shared).unwrap_err();
    assert!(
        matches!(err, ConversionError::Vetoed { first_page, .. } if first_page == PageOffset(5))
    );
    assert_eq!(*first.events.lock().unwrap(), ["prepare", "abort"]);
    assert_eq!(*second.events.lock().unwrap(), ["prepare"]);
}

#[test]
fn pinned_pages_refuse_before_anyone_hears() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    f.domain.populate_with(r(0, 64), &mut ()).unwrap();
    let m = Mapper::new("m", Policy::Blocks);
    let _reg = subscribe(&f, &m);
    f.store
        .pin(PfnRange::new(Pfn(9), Pfn(10)).unwrap(), PinOwner(3))
        .unwrap();
    for result in [
        f.domain.convert(r(0, 16), Shareability::Shared).map(drop),
        f.domain.punch_with(r(0, 16), &mut ()).map(drop),
    ] {
        assert!(matches!(
            result,
            Err(ConversionError::Metadata(MetadataError::Pinned {
                first_pfn: Pfn(9),
                owner: PinOwner(3)
            }))
        ));
    }
    assert!(m.events.lock().unwrap().is_empty());
}

#[test]
fn a_dropped_subscriber_is_no_longer_called_and_the_store_holds_it_weakly() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    let m = Mapper::new("m", Policy::Blocks);
    let reg = subscribe(&f, &m);
    let weak = Arc::downgrade(&m);
    drop(m);
    assert!(weak.upgrade().is_none(), "the registry kept it alive");
    assert_eq!(f.domain.subscribers(), 0);
    f.domain.convert(r(0, 1), Shareability::Shared).unwrap();
    drop(reg);
    assert_eq!(f.registry.len(), 0);
}

#[test]
fn subscribing_to_a_missing_file_is_an_error() {
    let f = fixture(64, Shareability::Private, PageSize::Size1G);
    let s: Arc<dyn Subscriber> = Mapper::new("m", Policy::Blocks);
    let err = f
        .registry
        .register(&s, Interest::File(FileId(99)))
        .unwrap_err();
    assert_eq!(err, ConversionError::NoSuchFile { file: FileId(99) });
    assert_eq!(f.registry.len(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Convert(u64, u64, bool),
    Populate(u64, u64),
    Punch(u64, u64),
    Pin(u64, u64),
    Unpin(u64, u64),
    FailNext(u64, u64, bool),
    Veto,
}

fn op_strategy(pages: u64) -> impl Strategy<Value = Op> {
    let range = prop_oneof![
        3 => (0..pages, 1u64..3),
        2 => (0..pages / 8, 1u64..3).prop_map(|(m, n)| (m * 8, n * 8)),
        1 => (0..pages, 1..pages),
    ]
    .prop_map(move |(s, l)| (s, (s + l).min(pages)));
    prop_oneof![
        5 => (range.clone(), any::<bool>()).prop_map(|((s, e), sh)| Op::Convert(s, e, sh)),
        3 => range.clone().prop_map(|(s, e)| Op::Populate(s, e)),
        2 => range.clone().prop_map(|(s, e)| Op::Punch(s, e)),
        1 => range.clone().prop_map(|(s, e)| Op::Pin(s, e)),
        1 => range.clone().prop_map(|(s, e)| Op::Unpin(s, e)),
        1 => (range, any::<bool>()).prop_map(|((s, e), restore)| Op::FailNext(s, e, restore)),
        1 => Just(Op::Veto),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Page {
    shared: bool,
    backed: bool,
    pins: u32,
    quarantined: bool,
}

fn run_case(pages: u64, max_block: PageSize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let f = fixture(pages, Shareability::Private, max_block);
    let kvm = Mapper::new("kvm", Policy::Blocks);
    let vfio = Mapper::new("vfio", Policy::SharedRuns(PageSize::Size2M));
    let flaky = Mapper::new("flaky", Policy::Blocks);
    let _r = [
        subscribe(&f, &kvm),
        subscribe(&f, &vfio),
        subscribe(&f, &flaky),
    ];
    let mut model = vec![
        Page {
            shared: false,
            backed: false,
            pins: 0,
            quarantined: false
        };
        pages as usize
    ];
    for op in ops {
        *flaky.veto.lock().unwrap() = false;
        let before = model.clone();
        match op {
            Op::FailNext(s, e, restore) => {
                *flaky.fail_unmap.lock().unwrap() = Some((r(s, e), restore));
                continue;
            }
            Op::Veto => {
                *flaky.veto.lock().unwrap() = true;
                let result = f.domain.convert(r(0, 1), Shareability::Shared);
                let expect_noop = model[0].shared || model[0].pins > 0 || model[0].quarantined;
                if !expect_noop {
                    prop_assert!(
                        matches!(result, Err(ConversionError::Vetoed { .. })),
                        "{result:?}"
                    );
                }
            }
            Op::Pin(s, e) => {
                let keys = PfnRange::new(Pfn(s), Pfn(e)).unwrap();
                f.store.pin(keys, PinOwner(1)).unwrap();
                model[s as usize..e as usize]
                    .iter_mut()
                    .for_each(|p| p.pins += 1);
            }
            Op::Unpin(s, e) => {
                let keys = PfnRange::new(Pfn(s), Pfn(e)).unwrap();
                if f.store.unpin(keys, PinOwner(1)).is_ok() {
                    model[s as usize..e as usize]
                        .iter_mut()
                        .for_each(|p| p.pins -= 1);
                }
            }
            Op::Convert(s, e, _) | Op::Populate(s, e) | Op::Punch(s, e) => {
                let shared = matches!(op, Op::Convert(_, _, true));
                let slice = &mut model[s as usize..e as usize];
                let result = match op {
                    Op::Convert(..) => {
                        let to = if shared {
                            Shareability::Shared
                        } else {
                            Shareability::Private
                        };
                        f.domain.convert(r(s, e), to).map(drop)
                    }
                    Op::Populate(..) => f.domain.populate_with(r(s, e), &mut ()).map(drop),
                    _ => f.domain.punch_with(r(s, e), &mut ()).map(drop),
                };
                let refused = match op {
                    Op::Convert(..) => slice.iter().any(|p| p.pins > 0 || p.quarantined),
                    Op::Populate(..) => slice.iter().any(|p| p.quarantined),
                    _ => slice.iter().any(|p| p.pins > 0),
                };
                match result {
                    Ok(()) => {
                        prop_assert!(!refused, "{op:?} went through");
                        for p in slice.iter_mut() {
                            match op {
                                Op::Convert(..) => p.shared = shared,
                                Op::Populate(..) => p.backed = true,
                                _ => p.backed = false,
                            }
                        }
                    }
                    Err(ConversionError::Metadata(_)) => {
                        prop_assert!(refused, "{op:?}: {result:?}")
                    }
                    Err(ConversionError::Vetoed { .. }) => {}
                    Err(ConversionError::UnmapFailed { quarantined, .. }) => {
                        for q in quarantined {
                            for p in q.pages() {
                                model[p.0 as usize].quarantined = true;
                            }
                        }
                    }
                    Err(other) => prop_assert!(false, "{op:?}: {other:?}"),
                }
                *flaky.fail_unmap.lock().unwrap() = None;
            }
        }
        // The metadata agrees with the model, page by page.
        for (i, p) in model.iter().enumerate() {
            let a = f.store.attributes(Pfn(i as u64)).unwrap();
            prop_assert_eq!(
                a.shareability == Shareability::Shared,
                p.shared,
                "page {}",
                i
            );
            prop_assert_eq!(a.owner.is_some(), p.backed, "page {}", i);
            prop_assert_eq!(a.quarantined.is_some(), p.quarantined, "page {}", i);
        }
        // Every subscriber that was not told about a failed restore holds exactly the layout.
        let restore_failed = model
            .iter()
            .zip(&before)
            .any(|(a, b)| a.quarantined != b.quarantined);
        for m in [&kvm, &vfio, &flaky] {
            let violations = m.violations.lock().unwrap().clone();
            prop_assert!(violations.is_empty(), "{:?}", violations);
            if restore_failed && m.name == "flaky" {
                // The failing one cannot restore; drop its view (it would resync).
                *m.held.lock().unwrap() = m.expected(&f.domain);
            }
            prop_assert_eq!(
                &*m.held.lock().unwrap(),
                &m.expected(&f.domain),
                "{}",
                m.name
            );
        }
        f.store.check_invariants().map_err(TestCaseError::fail)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn subscribers_always_hold_exactly_what_the_plans_said(
        ops in proptest::collection::vec(op_strategy(100), 1..40),
        cap in prop_oneof![Just(PageSize::Size1G), Just(PageSize::Size2M), Just(PageSize::Size4K)],
    ) {
        run_case(100, cap, ops)?;
    }
}
