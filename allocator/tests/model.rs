//! The allocator against a naive per-page reference model.
//!
//! The model keeps one state per 4 KiB page and the owning shard per chunk; it derives free
//! runs by scanning pages and restates the placement rules of the crate documentation on
//! those runs. Every operation of a random sequence runs on both; every result (range, shard,
//! dirty sub-ranges, error with its PFN) and the full statistics are compared after every
//! step, and `check_invariants` must hold after every step.
//!
//! The number of sequences defaults to 10,000 (the CI requirement) and can be changed with
//! `PFNSTORE_MODEL_CASES`.

use pfnstore_allocator::{
    AllocError, AllocRequest, Allocation, Allocator, AllocatorConfig, ShardHint, ShardId, Usage,
};
use pfnstore_core::testing::XorShift;
use pfnstore_core::{Geometry, Pfn, PfnRange, RangeError};
use proptest::prelude::*;

const MID_ORDER: u32 = 2;
const CHUNK_ORDER: u32 = 4;
const M: u64 = 1 << MID_ORDER;
const C: u64 = 1 << CHUNK_ORDER;
const SLOTS: u64 = 8;
const SPACE: u64 = SLOTS * C;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Unmanaged,
    Free { clean: bool },
    Allocated(u64),
    Quarantined,
}

struct Model {
    shards: usize,
    pages: Vec<Page>,
    owner: Vec<Option<usize>>,
    next_id: u64,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// A free run `[s, e)` and the capacities the statistics report.
struct Caps {
    s: u64,
    e: u64,
}

impl Caps {
    fn len(&self) -> u64 {
        self.e - self.s
    }
    fn mid_start(&self) -> u64 {
        align_up(self.s, M)
    }
    fn chunk_start(&self) -> u64 {
        align_up(self.s, C)
    }
    fn mid(&self) -> u64 {
        self.e.saturating_sub(self.mid_start())
    }
    fn chunk(&self) -> u64 {
        self.e.saturating_sub(self.chunk_start())
    }
}

impl Model {
    fn new(shards: usize) -> Model {
        Model {
            shards,
            pages: vec![Page::Unmanaged; SPACE as usize],
            owner: vec![None; SLOTS as usize],
            next_id: 0,
        }
    }

    fn owner_of(&self, pfn: u64) -> Option<usize> {
        self.owner.get((pfn / C) as usize).copied().flatten()
    }

    fn page(&self, pfn: u64) -> Page {
        self.pages
            .get(pfn as usize)
            .copied()
            .unwrap_or(Page::Unmanaged)
    }

    fn shard_pages(&self, shard: usize) -> u64 {
        self.owner.iter().filter(|o| **o == Some(shard)).count() as u64 * C
    }

    /// Maximal runs of pages of `shard` that are free (and clean, if asked).
    fn runs(&self, shard: usize, clean_only: bool) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in 0..SPACE {
            let ok = self.owner_of(p) == Some(shard)
                && match self.page(p) {
                    Page::Free { clean } => clean || !clean_only,
                    _ => false,
                };
            if ok {
                match runs.last_mut() {
                    Some(last) if last.1 == p => last.1 += 1,
                    _ => runs.push((p, p + 1)),
                }
            }
        }
        runs
    }

    fn take(&mut self, s: u64, e: u64) -> Vec<PfnRange> {
        let id = self.next_id;
        self.next_id += 1;
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        for p in s..e {
            if self.pages[p as usize] == (Page::Free { clean: false }) {
                match dirty.last_mut() {
                    Some(last) if last.1 == p => last.1 += 1,
                    _ => dirty.push((p, p + 1)),
                }
            }
            self.pages[p as usize] = Page::Allocated(id);
        }
        dirty.into_iter().map(|(a, b)| range(a, b)).collect()
    }

    fn add_chunk_to(&mut self, base: u64, dirty: bool, shard: usize) -> Result<(), AllocError> {
        if shard >= self.shards {
            return Err(AllocError::NoSuchShard {
                shard: ShardId(shard),
            });
        }
        if !base.is_multiple_of(C) {
            return Err(RangeError::Unaligned {
                pfn: Pfn(base),
                align_pages: C,
            }
            .into());
        }
        if self.owner_of(base).is_some() {
            return Err(AllocError::Overlap { pfn: Pfn(base) });
        }
        self.owner[(base / C) as usize] = Some(shard);
        for p in base..base + C {
            self.pages[p as usize] = Page::Free { clean: !dirty };
        }
        Ok(())
    }

    fn add_chunk(&mut self, base: u64, dirty: bool) -> Result<ShardId, AllocError> {
        let target = (0..self.shards)
            .min_by_key(|&s| self.shard_pages(s))
            .unwrap();
        self.add_chunk_to(base, dirty, target)?;
        Ok(ShardId(target))
    }

    fn remove_chunk(&mut self, base: u64) -> Result<(), AllocError> {
        if !base.is_multiple_of(C) {
            return Err(RangeError::Unaligned {
                pfn: Pfn(base),
                align_pages: C,
            }
            .into());
        }
        if self.owner_of(base).is_none() {
            return Err(AllocError::NotManaged { pfn: Pfn(base) });
        }
        if let Some(p) =
            (base..base + C).find(|&p| !matches!(self.pages[p as usize], Page::Free { .. }))
        {
            return Err(AllocError::ChunkInUse {
                base: Pfn(base),
                pfn: Pfn(p),
            });
        }
        self.owner[(base / C) as usize] = None;
        for p in base..base + C {
            self.pages[p as usize] = Page::Unmanaged;
        }
        Ok(())
    }

    /// Whether `shard` has room for `n` pages aligned to `a` (clean ones if asked).
    fn fits(&self, shard: usize, n: u64, a: u64, clean_only: bool) -> bool {
        self.runs(shard, clean_only)
            .iter()
            .any(|&(s, e)| align_up(s, a) + n <= e)
    }

    /// Mid blocks of `shard` with some free and some held pages.
    fn partly_used_mids(&self, shard: usize) -> Vec<u64> {
        (0..SPACE / M)
            .filter(|b| {
                let pages = || (b * M..(b + 1) * M).map(|p| self.page(p));
                self.owner_of(b * M) == Some(shard)
                    && pages().any(|p| matches!(p, Page::Free { .. }))
                    && pages().any(|p| !matches!(p, Page::Free { .. }))
            })
            .collect()
    }

    fn wholly_free(&self, start: u64, len: u64) -> bool {
        (start..start + len).all(|p| matches!(self.page(p), Page::Free { .. }))
    }

    /// Checks the allocator's answer `got` to `req` against the contract and, if it is right,
    /// applies it: the request goes to the first shard (in the hint's order) that has room
    /// (the rules are exact: a request fails only if no shard it may use has a fitting free
    /// range); the range is free, aligned, in that shard; its dirty list is exact; and the
    /// placement rules that keep huge blocks whole hold.
    fn alloc(
        &mut self,
        req: AllocRequest,
        home: usize,
        got: Option<(PfnRange, usize)>,
    ) -> Result<(PfnRange, usize, Vec<PfnRange>), AllocError> {
        let (n, a) = (req.pages, req.align_pages);
        if n == 0 {
            return Err(AllocError::ZeroPages);
        }
        if !a.is_power_of_two() || a > C {
            return Err(AllocError::BadAlignment { align_pages: a });
        }
        let (first, tries) = match req.hint {
            ShardHint::Home => (home, self.shards),
            ShardHint::Shard(s) | ShardHint::Only(s) if s.0 >= self.shards => {
                return Err(AllocError::NoSuchShard { shard: s });
            }
            ShardHint::Shard(s) => (s.0, self.shards),
            ShardHint::Only(s) => (s.0, 1),
        };
        let largest = (0..self.shards).map(|s| self.shard_pages(s)).max().unwrap();
        if n > largest {
            return Err(AllocError::TooLarge {
                pages: n,
                largest_shard_pages: largest,
            });
        }
        for step in 0..tries {
            let shard = (first + step) % self.shards;
            if !self.fits(shard, n, a, req.clean_only) {
                continue;
            }
            let Some((r, got_shard)) = got else {
                panic!("{req:?}: shard {shard} has room but alloc failed");
            };
            let (s, e) = (r.start().0, r.end().0);
            assert_eq!(
                got_shard, shard,
                "{req:?} went to {got_shard}, {shard} has room"
            );
            assert!(r.len() == n && s % a == 0, "{req:?} got {r:?}");
            for p in s..e {
                assert_eq!(self.owner_of(p), Some(shard), "{req:?} got {r:?}");
                match self.page(p) {
                    Page::Free { clean } => assert!(clean || !req.clean_only, "{r:?} not clean"),
                    other => panic!("{req:?} got {r:?}: page {p} is {other:?}"),
                }
            }
            let placed_by_rules = !req.clean_only;
            if placed_by_rules
                && n < M
                && a < M
                && s / M == (e - 1) / M
                && self.wholly_free(align_down(s, M), M)
            {
                // A small request breaks a whole free mid block only if no partly used one
                // has room inside it.
                for b in self.partly_used_mids(shard) {
                    let inside = (b * M..(b + 1) * M)
                        .step_by(a as usize)
                        .any(|p| p + n <= (b + 1) * M && self.wholly_free(p, n));
                    assert!(
                        !inside,
                        "{req:?} broke a free mid block at {s}; mid {b} had room"
                    );
                }
            }
            if placed_by_rules && n == M && a == M && self.wholly_free(align_down(s, C), C) {
                // A 2M request breaks a whole free chunk only if no partly used chunk has a
                // whole free mid block.
                for b in (0..SPACE / M).filter(|b| self.owner_of(b * M) == Some(shard)) {
                    let chunk = align_down(b * M, C);
                    assert!(
                        !self.wholly_free(b * M, M) || self.wholly_free(chunk, C),
                        "{req:?} broke the free chunk at {s}; mid {b} was free"
                    );
                }
            }
            let dirty = self.take(s, e);
            return Ok((r, shard, dirty));
        }
        assert!(
            got.is_none(),
            "{req:?}: no shard has room, yet alloc gave {got:?}"
        );
        Err(AllocError::OutOfMemory {
            pages: n,
            align_pages: a,
        })
    }

    /// The error for page `p` of a range handled by `shard` that is not in the state wanted.
    fn outside(&self, p: u64) -> AllocError {
        if self.owner_of(p).is_some() {
            AllocError::CrossesShards { pfn: Pfn(p) }
        } else {
            AllocError::NotManaged { pfn: Pfn(p) }
        }
    }

    fn check_free_range(&self, r: PfnRange) -> Result<(), AllocError> {
        let (s, e) = (r.start().0, r.end().0);
        let Some(shard) = self.owner_of(s) else {
            return Err(AllocError::NotManaged { pfn: Pfn(s) });
        };
        for p in s..e {
            if self.owner_of(p) != Some(shard) {
                return Err(self.outside(p));
            }
            if !matches!(self.page(p), Page::Free { .. }) {
                return Err(AllocError::NotFree { pfn: Pfn(p) });
            }
        }
        Ok(())
    }

    fn alloc_at(&mut self, r: PfnRange) -> Result<(usize, Vec<PfnRange>), AllocError> {
        self.check_free_range(r)?;
        let shard = self.owner_of(r.start().0).unwrap();
        Ok((shard, self.take(r.start().0, r.end().0)))
    }

    fn mark_clean(&mut self, r: PfnRange) -> Result<(), AllocError> {
        self.check_free_range(r)?;
        for p in r.pfns() {
            self.pages[p.0 as usize] = Page::Free { clean: true };
        }
        Ok(())
    }

    fn check_allocated(&self, r: PfnRange, freeing: bool) -> Result<(), AllocError> {
        let (s, e) = (r.start().0, r.end().0);
        let Some(shard) = self.owner_of(s) else {
            return Err(AllocError::NotManaged { pfn: Pfn(s) });
        };
        let id = match self.page(s) {
            Page::Allocated(id) => id,
            _ => 0,
        };
        for p in s..e {
            if self.owner_of(p) != Some(shard) {
                return Err(self.outside(p));
            }
            let pfn = Pfn(p);
            match self.page(p) {
                Page::Allocated(x) if x == id => {}
                Page::Allocated(_) => return Err(AllocError::SpansAllocations { pfn }),
                Page::Free { .. } if freeing => return Err(AllocError::DoubleFree { pfn }),
                Page::Free { .. } => return Err(AllocError::NotAllocated { pfn }),
                Page::Quarantined => return Err(AllocError::Quarantined { pfn }),
                Page::Unmanaged => unreachable!("owned chunks are managed"),
            }
        }
        Ok(())
    }

    fn free(&mut self, r: PfnRange) -> Result<(), AllocError> {
        self.check_allocated(r, true)?;
        for p in r.pfns() {
            self.pages[p.0 as usize] = Page::Free { clean: false };
        }
        Ok(())
    }

    /// Gives an allocation back as it was handed out: its dirty parts dirty, the rest clean.
    fn cancel(&mut self, a: &Allocation) -> Result<(), AllocError> {
        self.check_allocated(a.range, true)?;
        for p in a.range.pfns() {
            let dirty = a.dirty.iter().any(|d| d.contains(p));
            self.pages[p.0 as usize] = Page::Free { clean: !dirty };
        }
        Ok(())
    }

    fn quarantine(&mut self, r: PfnRange) -> Result<(), AllocError> {
        self.check_allocated(r, false)?;
        for p in r.pfns() {
            self.pages[p.0 as usize] = Page::Quarantined;
        }
        Ok(())
    }

    /// Counts maximal runs of pages of `shard` for which `key` gives the same `Some`.
    fn count_runs(&self, shard: usize, key: impl Fn(Page) -> Option<u64>) -> u64 {
        let mut count = 0;
        let mut prev: Option<(u64, u64)> = None;
        for p in 0..SPACE {
            let k = if self.owner_of(p) == Some(shard) {
                key(self.page(p))
            } else {
                None
            };
            if let Some(k) = k
                && prev != Some((p, k))
            {
                count += 1;
            }
            prev = k.map(|k| (p + 1, k));
        }
        count
    }

    fn usage(&self, shard: usize) -> Usage {
        let runs = self.runs(shard, false);
        let caps: Vec<Caps> = runs.iter().map(|&(s, e)| Caps { s, e }).collect();
        let mine = |p: &u64| self.owner_of(*p) == Some(shard);
        let count = |f: &dyn Fn(Page) -> bool| {
            (0..SPACE).filter(mine).filter(|&p| f(self.page(p))).count() as u64
        };
        let chunks = self.owner.iter().filter(|o| **o == Some(shard)).count() as u64;
        Usage {
            chunks,
            total_pages: chunks * C,
            free_pages: count(&|p| matches!(p, Page::Free { .. })),
            dirty_pages: count(&|p| p == Page::Free { clean: false }),
            allocated_pages: count(&|p| matches!(p, Page::Allocated(_))),
            quarantined_pages: count(&|p| p == Page::Quarantined),
            free_extents: runs.len() as u64,
            allocated_extents: self.count_runs(shard, |p| match p {
                Page::Allocated(id) => Some(id),
                _ => None,
            }),
            quarantined_extents: self.count_runs(shard, |p| (p == Page::Quarantined).then_some(0)),
            largest_free_extent: caps.iter().map(Caps::len).max().unwrap_or(0),
            largest_free_mid_aligned: caps.iter().map(Caps::mid).max().unwrap_or(0),
            largest_free_chunk_aligned: caps.iter().map(Caps::chunk).max().unwrap_or(0),
            free_mid_blocks: (0..SPACE / M)
                .filter(|b| {
                    (b * M..(b + 1) * M)
                        .all(|p| mine(&p) && matches!(self.page(p), Page::Free { .. }))
                })
                .count() as u64,
            free_chunks: (0..SLOTS)
                .filter(|b| {
                    (b * C..(b + 1) * C)
                        .all(|p| mine(&p) && matches!(self.page(p), Page::Free { .. }))
                })
                .count() as u64,
        }
    }
}

fn range(a: u64, b: u64) -> PfnRange {
    PfnRange::new(Pfn(a), Pfn(b)).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    AddChunk {
        slot: u64,
        dirty: bool,
        to: Option<usize>,
        misalign: bool,
    },
    RemoveChunk {
        slot: u64,
        misalign: bool,
    },
    Alloc {
        pages: u64,
        align: u64,
        clean_only: bool,
        hint: u8,
        shard: usize,
    },
    AllocAt {
        start: u64,
        len: u64,
    },
    Free {
        start: u64,
        len: u64,
    },
    /// Frees part of a range this sequence allocated (the common, successful case).
    FreeOwned {
        pick: usize,
        offset: u64,
        len: u64,
    },
    MarkClean {
        start: u64,
        len: u64,
    },
    Quarantine {
        pick: usize,
        offset: u64,
        len: u64,
    },
    /// Gives back an allocation exactly as it was handed out (`Allocator::cancel`).
    Cancel {
        pick: usize,
    },
    /// Interleaved sizes, then frees in a random order: allocates each of `sizes` (pages,
    /// alignment) and frees what it got, shuffled by `seed`.
    Churn {
        sizes: Vec<(u64, u64)>,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let pages = prop_oneof![
        1u64..=5,
        Just(M),
        Just(2 * M),
        Just(M + 1),
        Just(C),
        Just(2 * C),
        1u64..=40,
        Just(0)
    ];
    let align = prop_oneof![4 => Just(1u64), 3 => Just(M), 2 => Just(C), 1 => Just(2u64), 1 => Just(8u64), 1 => Just(3u64), 1 => Just(2 * C)];
    prop_oneof![
        3 => (0..SLOTS, any::<bool>(), prop::option::of(0usize..4), prop::bool::weighted(0.05))
            .prop_map(|(slot, dirty, to, misalign)| Op::AddChunk { slot, dirty, to, misalign }),
        1 => (0..SLOTS, prop::bool::weighted(0.1)).prop_map(|(slot, misalign)| Op::RemoveChunk { slot, misalign }),
        8 => (pages, align, prop::bool::weighted(0.25), 0u8..3, 0usize..4)
            .prop_map(|(pages, align, clean_only, hint, shard)| Op::Alloc { pages, align, clean_only, hint, shard }),
        2 => (0..SPACE + 4, 1u64..24).prop_map(|(start, len)| Op::AllocAt { start, len }),
        2 => (0..SPACE + 4, 1u64..24).prop_map(|(start, len)| Op::Free { start, len }),
        5 => (any::<usize>(), 0u64..8, 1u64..24).prop_map(|(pick, offset, len)| Op::FreeOwned { pick, offset, len }),
        2 => (0..SPACE + 4, 1u64..24).prop_map(|(start, len)| Op::MarkClean { start, len }),
        1 => (any::<usize>(), 0u64..8, 1u64..8).prop_map(|(pick, offset, len)| Op::Quarantine { pick, offset, len }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        2 => (prop::collection::vec(prop_oneof![
                4 => Just((1u64, 1u64)),
                2 => Just((M, M)),
                1 => (2u64..=6, prop_oneof![Just(1u64), Just(2)]),
                1 => Just((C, C)),
            ], 1..12), any::<u64>())
            .prop_map(|(sizes, seed)| Op::Churn { sizes, seed }),
    ]
}

fn cases() -> u32 {
    std::env::var("PFNSTORE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// A sub-range of an allocation made earlier in the sequence (it may have been freed since:
/// then the operation is expected to fail the same way in both).
fn sub_range(owned: &[PfnRange], pick: usize, offset: u64, len: u64) -> Option<PfnRange> {
    let r = owned.get(pick % owned.len().max(1))?;
    let start = r.start().0 + offset % r.len();
    let end = (start + len).min(r.end().0);
    Some(range(start, end))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_the_per_page_model(
        shards in 1usize..=3,
        initial in prop::collection::vec((0..SLOTS, any::<bool>()), 0..5),
        ops in prop::collection::vec(op(), 1..64),
    ) {
        let geometry = Geometry::new(MID_ORDER, CHUNK_ORDER).unwrap();
        let alloc = Allocator::new(AllocatorConfig::new(geometry, shards)).unwrap();
        let mut model = Model::new(shards);
        let home = alloc.home_shard().0;
        let mut owned: Vec<PfnRange> = Vec::new();
        let mut handed: Vec<Allocation> = Vec::new();
        // Most sequences start with some memory, so that the operations reach deep states.
        let ops = initial
            .into_iter()
            .map(|(slot, dirty)| Op::AddChunk { slot, dirty, to: None, misalign: false })
            .chain(ops);
        for op in ops {
            match op {
                Op::AddChunk { slot, dirty, to, misalign } => {
                    let base = slot * C + u64::from(misalign);
                    match to {
                        None => prop_assert_eq!(alloc.add_chunk(Pfn(base), dirty), model.add_chunk(base, dirty)),
                        Some(s) => prop_assert_eq!(alloc.add_chunk_to(Pfn(base), dirty, ShardId(s)), model.add_chunk_to(base, dirty, s)),
                    }
                }
                Op::RemoveChunk { slot, misalign } => {
                    let base = slot * C + u64::from(misalign) * 3;
                    prop_assert_eq!(alloc.remove_chunk(Pfn(base)), model.remove_chunk(base));
                }
                Op::Alloc { pages, align, clean_only, hint, shard } => {
                    let mut req = AllocRequest::new(pages).aligned(align).hint(match hint {
                        0 => ShardHint::Home,
                        1 => ShardHint::Shard(ShardId(shard)),
                        _ => ShardHint::Only(ShardId(shard)),
                    });
                    if clean_only {
                        req = req.clean_only();
                    }
                    let ours = alloc.alloc(req);
                    let expected = model.alloc(req, home, ours.as_ref().ok().map(|a| (a.range, a.shard.0)));
                    let ours = ours.map(|a| { handed.push(a.clone()); (a.range, a.shard.0, Vec::from(a.dirty)) });
                    prop_assert_eq!(&ours, &expected, "{:?}", req);
                    if let Ok((r, _, _)) = ours {
                        owned.push(r);
                    }
                }
                Op::AllocAt { start, len } => {
                    let r = range(start, start + len);
                    let ours = alloc.alloc_at(r).map(|a| (a.shard.0, Vec::from(a.dirty)));
                    prop_assert_eq!(&ours, &model.alloc_at(r));
                    if ours.is_ok() {
                        owned.push(r);
                    }
                }
                Op::Free { start, len } => {
                    let r = range(start, start + len);
                    prop_assert_eq!(alloc.free(r), model.free(r));
                }
                Op::FreeOwned { pick, offset, len } => {
                    if let Some(r) = sub_range(&owned, pick, offset, len) {
                        prop_assert_eq!(alloc.free(r), model.free(r), "free {:?}", r);
                    }
                }
                Op::MarkClean { start, len } => {
                    let r = range(start, start + len);
                    prop_assert_eq!(alloc.mark_clean(r), model.mark_clean(r));
                }
                Op::Cancel { pick } => {
                    if !handed.is_empty() {
                        let a = &handed[pick % handed.len()];
                        prop_assert_eq!(alloc.cancel(a), model.cancel(a), "cancel {:?}", a);
                    }
                }
                Op::Churn { sizes, seed } => {
                    let mut got: Vec<PfnRange> = Vec::new();
                    for (pages, align) in sizes {
                        let req = AllocRequest::new(pages).aligned(align);
                        let ours = alloc.alloc(req);
                        let expected = model.alloc(req, home, ours.as_ref().ok().map(|a| (a.range, a.shard.0)));
                        let ours = ours.map(|a| (a.range, a.shard.0, Vec::from(a.dirty)));
                        prop_assert_eq!(&ours, &expected, "churn {:?}", req);
                        if let Ok((r, _, _)) = ours {
                            got.push(r);
                        }
                    }
                    let mut rng = XorShift::new(seed | 1);
                    while !got.is_empty() {
                        let r = got.swap_remove(rng.below(got.len() as u64) as usize);
                        prop_assert_eq!(alloc.free(r), model.free(r), "churn free {:?}", r);
                    }
                }
                Op::Quarantine { pick, offset, len } => {
                    if let Some(r) = sub_range(&owned, pick, offset, len) {
                        prop_assert_eq!(alloc.quarantine(r), model.quarantine(r));
                    }
                }
            }
            alloc.check_invariants().map_err(TestCaseError::fail)?;
            let stats = alloc.stats();
            let mut total = Usage::default();
            for s in 0..shards {
                let expected = model.usage(s);
                prop_assert_eq!(stats.shards[s], expected, "shard {}", s);
                total.absorb(&expected);
            }
            prop_assert_eq!(stats.total, total);
            prop_assert_eq!(total.free_pages + total.allocated_pages + total.quarantined_pages, total.total_pages);
        }
    }
}
