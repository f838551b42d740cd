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
    AllocError, AllocRequest, Allocator, AllocatorConfig, ShardHint, ShardId, Usage,
};
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

/// The capacities of a run `[s, e)`, restated from the crate documentation.
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
    fn has_whole_mid(&self) -> bool {
        self.mid_start() + M <= self.e
    }
    fn has_whole_chunk(&self) -> bool {
        self.chunk_start() + C <= self.e
    }
    fn head_mid(&self) -> u64 {
        self.chunk_start() - self.mid_start()
    }
    fn tail_after_chunks(&self) -> u64 {
        self.e - align_down(self.e, C)
    }
    fn sliver(&self) -> u64 {
        if self.has_whole_mid() {
            (self.mid_start() - self.s).max(self.e - align_down(self.e, M))
        } else {
            self.len()
        }
    }
    fn partial_mid(&self) -> u64 {
        if self.has_whole_chunk() {
            self.head_mid().max(self.tail_after_chunks())
        } else {
            self.mid()
        }
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

    fn leftmost(runs: &[(u64, u64)], cap: impl Fn(&Caps) -> u64, min: u64) -> Option<Caps> {
        runs.iter()
            .map(|&(s, e)| Caps { s, e })
            .find(|c| cap(c) >= min)
    }

    /// The placement rules, restated on a list of runs.
    fn place(runs: &[(u64, u64)], n: u64, a: u64) -> Option<u64> {
        if a == C || n >= C {
            if let Some(r) = Self::leftmost(runs, Caps::chunk, n) {
                return Some(r.chunk_start());
            }
            if a == C {
                return None;
            }
        }
        let unusual = |runs: &[(u64, u64)]| {
            if let Some(r) = Self::leftmost(runs, Caps::len, n + a - 1) {
                return Some(align_up(r.s, a));
            }
            if a < M
                && let Some(r) = Self::leftmost(runs, Caps::mid, n)
            {
                return Some(r.mid_start());
            }
            Self::leftmost(runs, Caps::chunk, n).map(|r| r.chunk_start())
        };
        if a > M {
            return unusual(runs);
        }
        if a == M || n >= M {
            if let Some(r) = Self::leftmost(runs, Caps::partial_mid, n) {
                if !r.has_whole_chunk() || r.head_mid() >= n {
                    return Some(r.mid_start());
                }
                return Some(align_down(r.e - n, M));
            }
            if let Some(r) = Self::leftmost(runs, Caps::mid, n) {
                return Some(r.mid_start());
            }
            if a == M {
                return None;
            }
        }
        if a > 1 {
            return unusual(runs);
        }
        if let Some(r) = Self::leftmost(runs, Caps::sliver, n) {
            if !r.has_whole_mid() || r.mid_start() - r.s >= n {
                return Some(r.s);
            }
            return Some(r.e - n);
        }
        if let Some(r) = Self::leftmost(runs, Caps::partial_mid, n) {
            if !r.has_whole_chunk() || r.head_mid() >= n {
                return Some(r.s);
            }
            return Some(r.e - n);
        }
        Self::leftmost(runs, Caps::len, n).map(|r| r.s)
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

    fn alloc(
        &mut self,
        req: AllocRequest,
        home: usize,
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
            let runs = self.runs(shard, req.clean_only);
            let placed = Self::place(&runs, n, a);
            if a == 1 || a == M || a == C {
                // The rules are exact for these alignments: they find a place iff one exists.
                let exists = runs.iter().any(|&(s, e)| align_up(s, a) + n <= e);
                assert_eq!(
                    placed.is_some(),
                    exists,
                    "exactness for {n} pages aligned {a} in {runs:?}"
                );
            }
            if let Some(s) = placed {
                let dirty = self.take(s, s + n);
                return Ok((range(s, s + n), shard, dirty));
            }
        }
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
    fn allocator_matches_the_per_page_model(shards in 1usize..=3, ops in prop::collection::vec(op(), 1..48)) {
        let geometry = Geometry::new(MID_ORDER, CHUNK_ORDER).unwrap();
        let alloc = Allocator::new(AllocatorConfig { geometry, shards }).unwrap();
        let mut model = Model::new(shards);
        let home = alloc.home_shard().0;
        let mut owned: Vec<PfnRange> = Vec::new();
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
                    let ours = alloc.alloc(req).map(|a| (a.range, a.shard.0, Vec::from(a.dirty)));
                    let expected = model.alloc(req, home);
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
