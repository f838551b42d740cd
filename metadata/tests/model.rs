//! Property tests: random operation sequences run against the store and the per-page
//! reference model; every result, every error and every query is compared after every step,
//! and the store's canonical-form and summary invariants are checked after every step.
//!
//! Sequences per run: 6,000 (64-page chunks) + 3,000 (512-page chunks, which reach the
//! flip-list form) + 500 (1024-page chunks, which reach the indexed flip list) + 1,500
//! (32-page chunks with 2-page middle blocks) + 64 (x86-64 1G chunks) = 11,064.

#![cfg(not(pfnstore_loom))]

use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange};
use pfnstore_metadata::reference::ReferenceStore;
use pfnstore_metadata::{FileId, MetadataStore, PinOwner, QuarantineReason, Shareability};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
enum Op {
    Add(u64, bool),
    Remove(u64),
    Share(u64, u64, bool),
    ShareMany(Vec<(u64, u64)>, bool),
    Pin(u64, u64, u32, u32),
    Unpin(u64, u64, u32),
    Quarantine(u64, u64, u8),
    Dirty(u64, u64, bool),
    Assign(u64, u64, u32),
    Release(u64, u64, u32),
    OwnerOf(u64, u64),
    Plan(u64, u64),
}

/// The PFN space of a case: `chunks` chunks starting at chunk 1 (so PFN 0 is outside).
#[derive(Debug, Clone, Copy)]
struct Space {
    geometry: Geometry,
    chunks: u64,
}

impl Space {
    fn span(&self) -> PfnRange {
        let c = self.geometry.chunk_pages();
        PfnRange::new(Pfn(c), Pfn(c * (1 + self.chunks))).unwrap()
    }
}

/// Ranges biased towards the shapes that split and merge blocks: single pages, runs of
/// middle blocks, whole chunks, and arbitrary ranges that may stick out of the span.
fn range_strategy(space: Space) -> BoxedStrategy<(u64, u64)> {
    let g = space.geometry;
    let span = space.span();
    let (lo, total) = (span.start().0, span.len());
    let mid = g.mid_pages();
    let chunk = g.chunk_pages();
    prop_oneof![
        3 => (0..total, 1u64..4).prop_map(move |(s, l)| (lo + s, l)),
        3 => (0..total / mid, 1u64..4).prop_map(move |(m, n)| (lo + m * mid, n * mid)),
        1 => (0..space.chunks, 1u64..3).prop_map(move |(c, n)| (lo + c * chunk, n * chunk)),
        2 => (0..total + 4, 1..total / 2 + 2).prop_map(move |(s, l)| (lo + s - 2, l)),
    ]
    .boxed()
}

fn op_strategy(space: Space) -> BoxedStrategy<Op> {
    let r = range_strategy(space);
    let chunk_slot = 0..space.chunks + 2; // slot 0 and the last are outside the span
    let times = prop_oneof![4 => Just(1u32), 1 => Just(u32::MAX - 1), 1 => 2u32..4];
    prop_oneof![
        2 => (chunk_slot.clone(), any::<bool>()).prop_map(|(c, p)| Op::Add(c, p)),
        1 => chunk_slot.prop_map(Op::Remove),
        8 => (r.clone(), any::<bool>()).prop_map(|((s, l), p)| Op::Share(s, l, p)),
        2 => (prop::collection::vec(r.clone(), 0..6), any::<bool>())
            .prop_map(|(rs, p)| Op::ShareMany(rs, p)),
        3 => (r.clone(), 0u32..3, times).prop_map(|((s, l), o, t)| Op::Pin(s, l, o, t)),
        3 => (r.clone(), 0u32..3).prop_map(|((s, l), o)| Op::Unpin(s, l, o)),
        1 => (r.clone(), 0u8..3).prop_map(|((s, l), q)| Op::Quarantine(s, l, q)),
        2 => (r.clone(), any::<bool>()).prop_map(|((s, l), d)| Op::Dirty(s, l, d)),
        3 => (r.clone(), 0u32..2).prop_map(|((s, l), f)| Op::Assign(s, l, f)),
        3 => (r.clone(), 0u32..2).prop_map(|((s, l), f)| Op::Release(s, l, f)),
        1 => r.clone().prop_map(|(s, l)| Op::OwnerOf(s, l)),
        1 => r.prop_map(|(s, l)| Op::Plan(s, l)),
    ]
    .boxed()
}

fn share(private: bool) -> Shareability {
    if private {
        Shareability::Private
    } else {
        Shareability::Shared
    }
}

fn reason(q: u8) -> QuarantineReason {
    [
        QuarantineReason::UnmapFailed,
        QuarantineReason::ScrubFailed,
        QuarantineReason::Operator,
    ][q as usize % 3]
}

struct Harness {
    space: Space,
    store: MetadataStore,
    model: ReferenceStore,
    /// Compare every page's max order and attributes (small spaces) or sampled pages.
    exhaustive: bool,
}

impl Harness {
    fn new(space: Space, exhaustive: bool) -> Harness {
        Harness {
            space,
            store: MetadataStore::new(space.geometry, space.span()).unwrap(),
            model: ReferenceStore::new(space.geometry, space.span()).unwrap(),
            exhaustive,
        }
    }

    fn chunk_base(&self, slot: u64) -> Pfn {
        Pfn(slot * self.space.geometry.chunk_pages())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let range = |s: u64, l: u64| PfnRange::from_len(Pfn(s), l).unwrap();
        match *op {
            Op::Add(c, p) => {
                let base = self.chunk_base(c);
                prop_assert_eq!(
                    self.store.add_chunk(base, share(p)),
                    self.model.add_chunk(base, share(p))
                );
                // An unaligned base is refused the same way by both.
                let odd = Pfn(base.0 + 1);
                prop_assert_eq!(
                    self.store.add_chunk(odd, share(p)),
                    self.model.add_chunk(odd, share(p))
                );
            }
            Op::Remove(c) => {
                let base = self.chunk_base(c);
                prop_assert_eq!(self.store.remove_chunk(base), self.model.remove_chunk(base));
            }
            Op::Share(s, l, p) => prop_assert_eq!(
                self.store.set_shareability(range(s, l), share(p)),
                self.model.set_shareability(range(s, l), share(p))
            ),
            Op::ShareMany(ref ranges, p) => {
                let ranges: Vec<PfnRange> = ranges.iter().map(|&(s, l)| range(s, l)).collect();
                prop_assert_eq!(
                    self.store.set_shareability_of(&ranges, share(p)),
                    self.model.set_shareability_of(&ranges, share(p))
                )
            }
            Op::Pin(s, l, o, t) => prop_assert_eq!(
                self.store.pin_by(range(s, l), PinOwner(o), t),
                self.model.pin_by(range(s, l), PinOwner(o), t)
            ),
            Op::Unpin(s, l, o) => prop_assert_eq!(
                self.store.unpin(range(s, l), PinOwner(o)),
                self.model.unpin(range(s, l), PinOwner(o))
            ),
            Op::Quarantine(s, l, q) => prop_assert_eq!(
                self.store.quarantine(range(s, l), reason(q)),
                self.model.quarantine(range(s, l), reason(q))
            ),
            Op::Dirty(s, l, d) => prop_assert_eq!(
                self.store.set_dirty(range(s, l), d),
                self.model.set_dirty(range(s, l), d)
            ),
            Op::Assign(s, l, f) => prop_assert_eq!(
                self.store.assign_owner(range(s, l), FileId(f)),
                self.model.assign_owner(range(s, l), FileId(f))
            ),
            Op::Release(s, l, f) => prop_assert_eq!(
                self.store.release_owner(range(s, l), FileId(f)),
                self.model.release_owner(range(s, l), FileId(f))
            ),
            Op::OwnerOf(s, l) => prop_assert_eq!(
                self.store.owner_of(range(s, l)),
                self.model.owner_of(range(s, l))
            ),
            Op::Plan(s, l) => prop_assert_eq!(
                self.store.block_layout(range(s, l)),
                self.model.block_layout(range(s, l))
            ),
        }
        self.compare(op)
    }

    /// Every query on the whole space (or on sampled pages for the 1G geometry).
    /// The store's `visit_owner_runs` of `range`, collected.
    fn owner_runs_of_store(
        &self,
        range: PfnRange,
    ) -> Result<Vec<(PfnRange, Option<FileId>)>, pfnstore_metadata::MetadataError> {
        let mut out = Vec::new();
        self.store.visit_owner_runs(range, |run, owner| {
            out.push((run, owner));
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// What `visit_owner_runs` must give: the reference's runs, merged where the owner
    /// continues.
    fn owner_runs_of_model(
        &self,
        range: PfnRange,
    ) -> Result<Vec<(PfnRange, Option<FileId>)>, pfnstore_metadata::MetadataError> {
        let mut out: Vec<(PfnRange, Option<FileId>)> = Vec::new();
        for (run, a) in self.model.ranges(range)? {
            match out.last_mut() {
                Some((last, owner)) if last.end() == run.start() && *owner == a.owner => {
                    *last = last.hull(&run);
                }
                _ => out.push((run, a.owner)),
            }
        }
        Ok(out)
    }

    fn compare(&self, op: &Op) -> Result<(), TestCaseError> {
        self.store
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
        let g = self.space.geometry;
        let span = self.space.span();
        for c in 0..self.space.chunks + 2 {
            let base = self.chunk_base(c);
            let Ok(chunk) = PfnRange::from_len(base, g.chunk_pages()) else {
                continue;
            };
            prop_assert_eq!(self.store.ranges(chunk), self.model.ranges(chunk));
            prop_assert_eq!(
                self.store.block_layout(chunk),
                self.model.block_layout(chunk)
            );
        }
        prop_assert_eq!(self.store.ranges(span), self.model.ranges(span));
        prop_assert_eq!(
            self.owner_runs_of_store(span),
            self.owner_runs_of_model(span)
        );
        let probes: Vec<Pfn> = if self.exhaustive {
            (span.start().0.saturating_sub(1)..span.end().0 + 1)
                .map(Pfn)
                .collect()
        } else {
            // The reference answers a probe by walking the chunk, so sample: both ends of a
            // few middle blocks per chunk, and the ends of the last operation's range.
            let mids = g.mids_per_chunk();
            let mut p: Vec<Pfn> = (0..self.space.chunks + 2)
                .flat_map(|c| [0, 1, mids / 2, mids - 1].map(move |m| (c, m)))
                .map(|(c, m)| c * g.chunk_pages() + m * g.mid_pages())
                .flat_map(|s| [Pfn(s), Pfn(s + g.mid_pages() - 1)])
                .collect();
            match *op {
                Op::Share(s, l, _)
                | Op::Pin(s, l, ..)
                | Op::Unpin(s, l, _)
                | Op::Quarantine(s, l, _)
                | Op::Assign(s, l, _)
                | Op::Release(s, l, _) => {
                    p.extend([Pfn(s.saturating_sub(1)), Pfn(s), Pfn(s + l - 1), Pfn(s + l)])
                }
                _ => {}
            }
            p
        };
        for pfn in probes {
            prop_assert_eq!(
                self.store.max_mapping_size(pfn),
                self.model.max_mapping_size(pfn),
                "max order at {:?}",
                pfn
            );
            prop_assert_eq!(self.store.attributes(pfn), self.model.attributes(pfn));
        }
        let (s, m) = (self.store.stats(), self.model.stats());
        prop_assert_eq!(
            (
                s.managed_chunks,
                s.shared_pages,
                s.private_pages,
                s.pinned_pages,
                s.quarantined_pages,
                s.dirty_pages,
                s.owned_pages
            ),
            (
                m.managed_chunks,
                m.shared_pages,
                m.private_pages,
                m.pinned_pages,
                m.quarantined_pages,
                m.dirty_pages,
                m.owned_pages
            )
        );
        Ok(())
    }
}

fn case_strategy(space: Space, steps: usize) -> impl Strategy<Value = (Vec<bool>, Vec<Op>)> {
    (
        prop::collection::vec(prop::bool::weighted(0.85), space.chunks as usize),
        prop::collection::vec(op_strategy(space), 1..steps),
    )
}

fn run_case(
    space: Space,
    exhaustive: bool,
    initial: &[bool],
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut h = Harness::new(space, exhaustive);
    for (slot, add) in initial.iter().enumerate() {
        if *add {
            let base = h.chunk_base(slot as u64 + 1);
            h.store.add_chunk(base, Shareability::Private).unwrap();
            h.model.add_chunk(base, Shareability::Private).unwrap();
        }
    }
    for op in ops {
        h.step(op)?;
    }
    Ok(())
}

fn space(mid_order: u32, chunk_order: u32, chunks: u64) -> Space {
    Space {
        geometry: Geometry::new(mid_order, chunk_order).unwrap(),
        chunks,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6000))]
    #[test]
    fn tiny_geometry_matches_the_reference((initial, ops) in case_strategy(space(3, 6, 3), 24)) {
        run_case(space(3, 6, 3), true, &initial, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn flip_list_geometry_matches_the_reference((initial, ops) in case_strategy(space(3, 9, 2), 40)) {
        run_case(space(3, 9, 2), false, &initial, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    /// 1024-page chunks of 32 middle blocks: a list carries its one-word mid index from 16 to
    /// 31 flips. Scattered single pages are converted first so that the indexed form is
    /// reached, then random operations run from there.
    #[test]
    fn indexed_list_geometry_matches_the_reference(
        (initial, ops) in case_strategy(space(5, 10, 2), 24),
        scattered in prop::collection::vec(0u64..2048, 8..28),
    ) {
        let space = space(5, 10, 2);
        let lo = space.span().start().0;
        let mut steps: Vec<Op> = scattered.into_iter().map(|p| Op::Share(lo + p, 1, false)).collect();
        steps.extend(ops);
        run_case(space, false, &initial, &steps)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]
    #[test]
    fn two_page_mids_match_the_reference((initial, ops) in case_strategy(space(1, 5, 4), 24)) {
        run_case(space(1, 5, 4), true, &initial, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn x86_64_geometry_matches_the_reference((initial, ops) in case_strategy(Space { geometry: Geometry::X86_64, chunks: 2 }, 16)) {
        run_case(Space { geometry: Geometry::X86_64, chunks: 2 }, false, &initial, &ops)?;
    }
}

#[test]
fn a_4k_conversion_in_a_uniform_1g_splits_and_merges_in_one_call() {
    let g = Geometry::X86_64;
    let chunk = g.chunk_pages();
    let store = MetadataStore::new(g, PfnRange::new(Pfn(0), Pfn(chunk)).unwrap()).unwrap();
    store.add_chunk(Pfn(0), Shareability::Private).unwrap();
    let page = PfnRange::page(Pfn(1000)).unwrap();
    let change = store.set_shareability(page, Shareability::Shared).unwrap();
    let splits: Vec<_> = change
        .splits()
        .map(|r| (r.start().0, r.size(), r.count()))
        .collect();
    assert_eq!(
        splits,
        vec![(0, PageSize::Size1G, 1), (512, PageSize::Size2M, 1)]
    );
    assert_eq!(change.merges().count(), 0);
    let plan = store
        .block_layout(PfnRange::new(Pfn(0), Pfn(chunk)).unwrap())
        .unwrap();
    let count = |size| {
        plan.iter()
            .filter(|(r, _)| r.size() == size)
            .map(|(r, _)| r.count())
            .sum::<u64>()
    };
    assert_eq!(
        (count(PageSize::Size2M), count(PageSize::Size4K)),
        (511, 512)
    );
    assert!(plan.len() <= 5, "{plan:?}");
    assert_eq!(store.max_mapping_size(Pfn(1000)), Ok(PageSize::Size4K));
    assert_eq!(store.max_mapping_size(Pfn(0)), Ok(PageSize::Size2M));
    let back = store.set_shareability(page, Shareability::Private).unwrap();
    let merges: Vec<_> = back
        .merges()
        .map(|r| (r.start().0, r.size(), r.count()))
        .collect();
    assert_eq!(
        merges,
        vec![(0, PageSize::Size1G, 1), (512, PageSize::Size2M, 1)]
    );
    assert_eq!(store.max_mapping_size(Pfn(1000)), Ok(PageSize::Size1G));
    assert_eq!(store.stats().heap_bytes, 0);
}

#[test]
fn a_pin_does_not_split_a_mapping_but_blocks_conversion() {
    let g = Geometry::X86_64;
    let store =
        MetadataStore::new(g, PfnRange::new(Pfn(0), Pfn(g.chunk_pages())).unwrap()).unwrap();
    store.add_chunk(Pfn(0), Shareability::Shared).unwrap();
    let page = PfnRange::page(Pfn(77)).unwrap();
    assert!(store.pin(page, PinOwner(4)).unwrap().is_empty());
    assert_eq!(store.max_mapping_size(Pfn(77)), Ok(PageSize::Size1G));
    let big = PfnRange::new(Pfn(0), Pfn(4096)).unwrap();
    assert_eq!(
        store.set_shareability(big, Shareability::Private),
        Err(pfnstore_metadata::MetadataError::Pinned {
            first_pfn: Pfn(77),
            owner: PinOwner(4)
        })
    );
    assert_eq!(
        store.attributes(Pfn(0)).unwrap().shareability,
        Shareability::Shared
    );
}
