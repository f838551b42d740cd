//! One test per placement rule, per kind of bad input, and per accounting promise, on the
//! real x86-64 geometry (4 KiB / 2 MiB / 1 GiB).
#![cfg(not(pfnstore_loom))]

use pfnstore_allocator::{
    AllocError, AllocRequest, Allocator, AllocatorConfig, ShardHint, ShardId,
};
use pfnstore_core::{Geometry, Pfn, PfnRange, RangeError};

const G: Geometry = Geometry::X86_64;
const M: u64 = 512;
const C: u64 = 512 * 512;

fn range(start: u64, len: u64) -> PfnRange {
    PfnRange::from_len(Pfn(start), len).unwrap()
}

fn one_shard(chunks: &[u64]) -> Allocator {
    let a = Allocator::new(AllocatorConfig::new(G, 1)).unwrap();
    for &c in chunks {
        a.add_chunk(Pfn(c * C), true).unwrap();
    }
    a
}

fn alloc(a: &Allocator, pages: u64, align: u64) -> PfnRange {
    a.alloc(AllocRequest::new(pages).aligned(align))
        .unwrap()
        .range
}

#[test]
fn chunk_requests_take_whole_chunks() {
    let a = one_shard(&[0, 1, 2, 3]);
    let small = alloc(&a, 1, 1);
    assert_eq!(small.start(), Pfn(0));
    // Unaligned 1G request: still placed on a chunk boundary, not at page 1.
    let big = alloc(&a, C, 1);
    assert_eq!(big, range(C, C));
    let two = alloc(&a, 2 * C, C);
    assert_eq!(two, range(2 * C, 2 * C));
    assert_eq!(
        a.alloc(AllocRequest::new(C).aligned(C)).unwrap_err(),
        AllocError::OutOfMemory {
            pages: C,
            align_pages: C
        }
    );
    a.free(two).unwrap();
    a.free(big).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn mid_requests_use_a_partly_used_chunk_before_breaking_a_free_one() {
    // Chunk 0 is wholly free and lower; chunk 2 has one page in use.
    let a = one_shard(&[0, 2]);
    a.alloc_at(range(2 * C + 7 * M + 3, 1)).unwrap();
    let mid = alloc(&a, M, M);
    assert!(
        mid.start().0 >= 2 * C && mid.end().0 <= 3 * C,
        "{mid:?} broke the free chunk 0"
    );
    assert!(mid.start().is_aligned_to(M));
    assert_eq!(a.stats().total.free_chunks, 1);
    // Now leave chunk 2 without any whole free 2M block: one page used in every block.
    for b in 0..512 {
        let _ = a.alloc_at(range(2 * C + b * M + 1, 1));
    }
    let next = alloc(&a, M, M);
    assert!(next.end().0 <= C, "{next:?} should come from chunk 0 now");
    assert_eq!(a.stats().total.free_chunks, 0);
    a.check_invariants().unwrap();
}

#[test]
fn small_requests_pack_into_split_mid_blocks_first() {
    let a = one_shard(&[0, 2]);
    // Split one 2M block of chunk 2: a page in its middle.
    a.alloc_at(range(2 * C + 5 * M + 100, 1)).unwrap();
    let p = alloc(&a, 1, 1);
    assert!(
        p.start().0 >= 2 * C + 5 * M && p.end().0 <= 2 * C + 6 * M,
        "{p:?} is not in the split block"
    );
    // Fill that block's rest, 4K at a time: every one stays inside it.
    let free_mids_before = a.stats().total.free_mid_blocks;
    for _ in 0..(M - 2) {
        let q = alloc(&a, 1, 1);
        assert!(q.start().0 >= 2 * C + 5 * M && q.end().0 <= 2 * C + 6 * M);
    }
    assert_eq!(a.stats().total.free_mid_blocks, free_mids_before);
    // The block is full: the next 4K splits a 2M block of the partly used chunk 2, not
    // chunk 0.
    let r = alloc(&a, 1, 1);
    assert!(r.start().0 >= 2 * C, "{r:?} broke the free chunk 0");
    assert_eq!(a.stats().total.free_mid_blocks, free_mids_before - 1);
    assert_eq!(a.stats().total.free_chunks, 1);
    a.check_invariants().unwrap();
}

#[test]
fn a_free_chunk_is_broken_only_when_nothing_else_fits() {
    let a = one_shard(&[0, 2]);
    // Use all of chunk 2 but one page at its very end.
    a.alloc_at(range(2 * C, C - 1)).unwrap();
    // One page: fits the sliver at the end of chunk 2.
    assert_eq!(alloc(&a, 1, 1), range(3 * C - 1, 1));
    // Chunk 2 is full; two pages must break chunk 0.
    assert_eq!(alloc(&a, 2, 1), range(0, 2));
    a.check_invariants().unwrap();
}

#[test]
fn fragmentation_figures() {
    let a = one_shard(&[0]);
    a.alloc_at(range(M + 1, 1)).unwrap();
    let s = a.stats().total;
    assert_eq!(s.free_chunks, 0);
    assert_eq!(s.free_mid_blocks, 511);
    assert_eq!(s.free_extents, 2);
    assert_eq!(s.largest_free_extent, C - M - 2);
    assert_eq!(s.largest_free_mid_aligned, C - 2 * M);
    // From PFN 0, a chunk boundary, 513 pages are free.
    assert_eq!(s.largest_free_chunk_aligned, M + 1);
    assert_eq!(s.allocated_extents, 1);
}

#[test]
fn ten_thousand_holes_do_not_stop_2m_allocations() {
    let a = one_shard(&[0, 1, 2, 3]);
    // Every other 4K page of the first 20,000 is allocated: 10,000 holes.
    let mut held = Vec::new();
    for i in 0..10_000 {
        let r = range(2 * i, 1);
        a.alloc_at(r).unwrap();
        held.push(r);
    }
    assert_eq!(a.stats().total.free_extents, 10_000);
    for _ in 0..100 {
        let r = alloc(&a, M, M);
        assert!(r.start().0 >= 20_000 && r.start().is_aligned_to(M));
        a.free(r).unwrap();
    }
    for r in held {
        a.free(r).unwrap();
    }
    assert_eq!(a.stats().total.free_extents, 1);
    assert_eq!(a.stats().total.free_chunks, 4);
    a.check_invariants().unwrap();
}

#[test]
fn punch_holes_split_allocations_and_frees_coalesce() {
    let a = one_shard(&[0]);
    let r = alloc(&a, 3 * M, M);
    a.free(range(r.start().0 + M, M)).unwrap();
    assert_eq!(a.stats().total.allocated_extents, 2);
    // The hole is free: freeing across it fails naming the hole's first page.
    assert_eq!(
        a.free(r),
        Err(AllocError::DoubleFree {
            pfn: Pfn(r.start().0 + M)
        })
    );
    a.free(range(r.start().0, M)).unwrap();
    a.free(range(r.start().0 + 2 * M, M)).unwrap();
    assert_eq!(a.stats().total.free_extents, 1);
    assert_eq!(a.stats().total.allocated_pages, 0);
    a.check_invariants().unwrap();
}

#[test]
fn bad_input_is_rejected_naming_the_pfn_and_changes_nothing() {
    let a = Allocator::new(AllocatorConfig::new(G, 2)).unwrap();
    a.add_chunk_to(Pfn(0), true, ShardId(0)).unwrap();
    a.add_chunk_to(Pfn(C), true, ShardId(1)).unwrap();
    a.alloc_at(range(10, 20)).unwrap();
    a.alloc_at(range(30, 5)).unwrap();
    a.quarantine(range(12, 2)).unwrap();
    let before = a.stats();
    let req = AllocRequest::new;
    let cases: Vec<(AllocError, Result<(), AllocError>)> = vec![
        (AllocError::ZeroPages, a.alloc(req(0)).map(drop)),
        (
            AllocError::BadAlignment { align_pages: 3 },
            a.alloc(req(1).aligned(3)).map(drop),
        ),
        (
            AllocError::BadAlignment { align_pages: 2 * C },
            a.alloc(req(1).aligned(2 * C)).map(drop),
        ),
        (
            AllocError::BadAlignment { align_pages: 0 },
            a.alloc(req(1).aligned(0)).map(drop),
        ),
        (
            AllocError::TooLarge {
                pages: C + 1,
                largest_shard_pages: C,
            },
            a.alloc(req(C + 1)).map(drop),
        ),
        (
            AllocError::NoSuchShard { shard: ShardId(2) },
            a.alloc(req(1).hint(ShardHint::Only(ShardId(2)))).map(drop),
        ),
        (
            AllocError::DoubleFree { pfn: Pfn(40) },
            a.free(range(40, 2)),
        ),
        (
            AllocError::DoubleFree { pfn: Pfn(35) },
            a.free(range(31, 5)),
        ),
        (
            AllocError::SpansAllocations { pfn: Pfn(30) },
            a.free(range(28, 4)),
        ),
        (
            AllocError::Quarantined { pfn: Pfn(12) },
            a.free(range(10, 4)),
        ),
        (
            AllocError::Quarantined { pfn: Pfn(13) },
            a.free(range(13, 1)),
        ),
        (
            AllocError::NotAllocated { pfn: Pfn(5) },
            a.quarantine(range(5, 1)),
        ),
        (
            AllocError::NotManaged { pfn: Pfn(2 * C) },
            a.free(range(2 * C, 1)),
        ),
        (
            AllocError::CrossesShards { pfn: Pfn(C) },
            a.mark_clean(range(C - 4, 8)),
        ),
        (
            AllocError::NotManaged { pfn: Pfn(2 * C) },
            a.mark_clean(range(2 * C - 4, 8)),
        ),
        (
            AllocError::NotFree { pfn: Pfn(10) },
            a.mark_clean(range(0, 11)),
        ),
        (
            AllocError::NotFree { pfn: Pfn(29) },
            a.alloc_at(range(29, 2)).map(drop),
        ),
        (
            AllocError::NotFree { pfn: Pfn(10) },
            a.alloc_at(range(9, 2)).map(drop),
        ),
        (
            AllocError::ChunkInUse {
                base: Pfn(0),
                pfn: Pfn(10),
            },
            a.remove_chunk(Pfn(0)),
        ),
        (
            AllocError::NotManaged { pfn: Pfn(5 * C) },
            a.remove_chunk(Pfn(5 * C)),
        ),
        (
            AllocError::Range(RangeError::Unaligned {
                pfn: Pfn(7),
                align_pages: C,
            }),
            a.remove_chunk(Pfn(7)),
        ),
        (
            AllocError::Range(RangeError::Unaligned {
                pfn: Pfn(7),
                align_pages: C,
            }),
            a.add_chunk(Pfn(7), true).map(drop),
        ),
        (
            AllocError::Overlap { pfn: Pfn(C) },
            a.add_chunk(Pfn(C), false).map(drop),
        ),
        (
            AllocError::NoSuchShard { shard: ShardId(9) },
            a.add_chunk_to(Pfn(4 * C), false, ShardId(9)),
        ),
    ];
    for (i, (expected, got)) in cases.into_iter().enumerate() {
        assert_eq!(got, Err(expected), "case {i}");
        assert!(!expected.to_string().is_empty());
    }
    assert_eq!(a.stats(), before);
    a.check_invariants().unwrap();
    // Out of memory after filling both shards.
    a.alloc(req(C).hint(ShardHint::Shard(ShardId(1)))).unwrap();
    assert_eq!(
        a.alloc(req(C)),
        Err(AllocError::OutOfMemory {
            pages: C,
            align_pages: 1
        })
    );
    assert_eq!(
        Allocator::new(AllocatorConfig::new(G, 0)).unwrap_err(),
        AllocError::NoShards
    );
}

#[test]
fn freed_memory_is_dirty_until_marked_clean() {
    let a = one_shard(&[]);
    a.add_chunk(Pfn(0), false).unwrap();
    let first = a.alloc(AllocRequest::new(M).aligned(M)).unwrap();
    assert!(!first.is_dirty(), "a clean chunk hands out clean memory");
    a.free(first.range).unwrap();
    assert_eq!(a.stats().total.dirty_pages, M);
    // A range spanning dirty and clean memory reports exactly the dirty part.
    let both = a.alloc_at(range(first.range.start().0 + M - 3, 6)).unwrap();
    assert_eq!(both.dirty, vec![range(first.range.start().0 + M - 3, 3)]);
    assert_eq!(both.dirty_pages(), 3);
    // Clean-only skips the dirty pages left.
    let clean = a.alloc(AllocRequest::new(1).clean_only()).unwrap();
    assert!(!clean.is_dirty());
    assert!(!clean.range.overlaps(&range(first.range.start().0, M - 3)));
    // Scrubbed and reported: clean again.
    a.mark_clean(range(first.range.start().0, M - 3)).unwrap();
    assert_eq!(a.stats().total.dirty_pages, 0);
    let again = a.alloc_at(range(first.range.start().0, 4)).unwrap();
    assert!(!again.is_dirty());
    a.check_invariants().unwrap();
}

#[test]
fn clean_only_fails_when_only_dirty_memory_is_left() {
    let a = one_shard(&[0]); // dirty chunk
    assert_eq!(
        a.alloc(AllocRequest::new(1).clean_only()),
        Err(AllocError::OutOfMemory {
            pages: 1,
            align_pages: 1
        })
    );
    let all = a.alloc(AllocRequest::new(1)).unwrap();
    assert_eq!(all.dirty, vec![all.range]);
}

#[test]
fn quarantined_pages_are_never_handed_out_again() {
    let a = one_shard(&[0]);
    let r = alloc(&a, 64, 1);
    a.quarantine(range(r.start().0 + 8, 8)).unwrap();
    a.free(range(r.start().0, 8)).unwrap();
    a.free(range(r.start().0 + 16, 48)).unwrap();
    let mut got = Vec::new();
    while let Ok(x) = a.alloc(AllocRequest::new(1)) {
        assert!(!x.range.overlaps(&range(r.start().0 + 8, 8)));
        got.push(x.range);
    }
    assert_eq!(got.len() as u64, C - 8);
    let s = a.stats().total;
    assert_eq!(
        (s.quarantined_pages, s.quarantined_extents, s.free_pages),
        (8, 1, 0)
    );
    for x in got {
        a.free(x).unwrap();
    }
    assert_eq!(
        a.remove_chunk(Pfn(0)),
        Err(AllocError::ChunkInUse {
            base: Pfn(0),
            pfn: Pfn(8)
        })
    );
    a.check_invariants().unwrap();
}

#[test]
fn stealing_and_hints() {
    let a = Allocator::new(AllocatorConfig::new(G, 2)).unwrap();
    assert_eq!(a.add_chunk(Pfn(0), true).unwrap(), ShardId(0));
    assert_eq!(a.add_chunk(Pfn(4 * C), true).unwrap(), ShardId(1));
    // Shard 1 first, it has room.
    let x = a
        .alloc(AllocRequest::new(C).hint(ShardHint::Shard(ShardId(1))))
        .unwrap();
    assert_eq!((x.shard, x.range.start()), (ShardId(1), Pfn(4 * C)));
    // Shard 1 is full: Only fails, Shard steals from shard 0.
    assert_eq!(
        a.alloc(AllocRequest::new(1).hint(ShardHint::Only(ShardId(1)))),
        Err(AllocError::OutOfMemory {
            pages: 1,
            align_pages: 1
        })
    );
    let y = a
        .alloc(AllocRequest::new(1).hint(ShardHint::Shard(ShardId(1))))
        .unwrap();
    assert_eq!(y.shard, ShardId(0));
    // Frees find the owner whatever the calling thread's home shard is.
    a.free(x.range).unwrap();
    a.free(y.range).unwrap();
    let s = a.stats();
    assert_eq!((s.shards[0].free_chunks, s.shards[1].free_chunks), (1, 1));
    a.check_invariants().unwrap();
}

#[test]
fn chunks_are_removed_when_free_and_can_come_back() {
    let a = one_shard(&[0, 1, 2]);
    // Adjacent chunks of a shard form one run; a 2-chunk request can span them.
    assert_eq!(a.stats().total.free_extents, 1);
    let two = alloc(&a, 2 * C, C);
    assert_eq!(two, range(0, 2 * C));
    a.free(two).unwrap();
    a.remove_chunk(Pfn(C)).unwrap();
    let s = a.stats().total;
    assert_eq!((s.chunks, s.free_extents, s.total_pages), (2, 2, 2 * C));
    assert_eq!(
        a.free(range(C, 1)),
        Err(AllocError::NotManaged { pfn: Pfn(C) })
    );
    a.add_chunk(Pfn(C), false).unwrap();
    assert_eq!(a.stats().total.free_extents, 1);
    assert_eq!(a.stats().total.dirty_pages, 2 * C);
    a.check_invariants().unwrap();
}

/// The fragmented case of benches/RESULTS.md's allocator table: 16 GiB filled with 4K frames,
/// a random half freed (no whole 2M block is left), then 64 random 2M blocks made wholly free:
/// 2M requests find all 64, and a failing 2M request fails without a walk (it is answered
/// from the per-chunk counts).
#[test]
fn every_free_2m_block_is_found_in_fragmented_memory() {
    let a = one_shard(&(0..16).collect::<Vec<_>>());
    let frames = 16 * C;
    let mut table: Vec<Option<PfnRange>> = vec![None; frames as usize];
    while let Ok(x) = a.alloc(AllocRequest::new(1)) {
        table[x.range.start().0 as usize] = Some(x.range);
    }
    assert_eq!(a.stats().total.allocated_pages, frames);
    let mut rng = pfnstore_core::testing::XorShift::new(0xF4A6);
    let mut order: Vec<u64> = (0..frames).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &p in &order[..frames as usize / 2] {
        a.free(table[p as usize].take().unwrap()).unwrap();
    }
    assert_eq!(a.stats().total.free_mid_blocks, 0);
    assert!(matches!(
        a.alloc(AllocRequest::new(M).aligned(M)),
        Err(AllocError::OutOfMemory { .. })
    ));
    let mut blocks: Vec<u64> = (0..frames / M).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &b in &blocks[..64] {
        for slot in &mut table[(b * M) as usize..((b + 1) * M) as usize] {
            if let Some(r) = slot.take() {
                a.free(r).unwrap();
            }
        }
    }
    assert_eq!(a.stats().total.free_mid_blocks, 64);
    let mut found: Vec<u64> = (0..64).map(|_| alloc(&a, M, M).start().0 / M).collect();
    assert!(a.alloc(AllocRequest::new(M).aligned(M)).is_err());
    found.sort_unstable();
    let mut freed = blocks[..64].to_vec();
    freed.sort_unstable();
    assert_eq!(found, freed, "exactly the freed blocks");
    a.check_invariants().unwrap();
}

/// `cancel` gives an allocation back as it was handed out: the clean part clean again, the
/// dirty part dirty, and every figure as before the allocation.
#[test]
fn cancel_restores_the_accounting() {
    let a = Allocator::new(AllocatorConfig::new(G, 1)).unwrap();
    a.add_chunk(Pfn(0), false).unwrap();
    // Dirty 3 pages in the middle of what the next request will get.
    let first = alloc(&a, 8, 1);
    a.free(first).unwrap();
    a.mark_clean(range(first.start().0, 2)).unwrap();
    a.mark_clean(range(first.start().0 + 5, 3)).unwrap();
    let before = a.stats();
    let x = a.alloc(AllocRequest::new(8)).unwrap();
    assert_eq!(x.dirty, vec![range(first.start().0 + 2, 3)]);
    a.cancel(&x).unwrap();
    assert_eq!(a.stats(), before);
    let again = a.alloc(AllocRequest::new(8)).unwrap();
    assert_eq!(
        again.dirty, x.dirty,
        "the same pages are dirty again, no more"
    );
    // A cancelled allocation is gone: cancelling it again is a double free.
    a.cancel(&again).unwrap();
    assert_eq!(
        a.cancel(&again),
        Err(AllocError::DoubleFree {
            pfn: again.range.start()
        })
    );
    a.check_invariants().unwrap();
}

/// Chunks far apart (a sparse PFN space): the shard finds a page's chunk by search instead of
/// its direct index, and everything else works the same.
#[test]
fn scattered_chunks_are_found_by_search() {
    let far = 1 << 20; // chunk index 2^20: 1 PiB away
    let a = one_shard(&[0, far, 3]);
    let big = alloc(&a, C, C);
    let two = alloc(&a, M, M);
    let one = alloc(&a, 1, 1);
    for r in [big, two, one] {
        assert!([0, far, 3].contains(&(r.start().0 / C)), "{r:?}");
    }
    a.free(one).unwrap();
    a.free(two).unwrap();
    a.free(big).unwrap();
    assert_eq!(
        a.free(range(far * C, 1)),
        Err(AllocError::DoubleFree { pfn: Pfn(far * C) })
    );
    a.remove_chunk(Pfn(3 * C)).unwrap();
    assert_eq!(a.stats().total.free_chunks, 2);
    a.check_invariants().unwrap();
}

/// A wholly free cursor block waits while partly used blocks have room; when none of them
/// has room for the request (here: one page aligned to two, and the only free page of the
/// partly used block is odd), the cursor serves it rather than the request failing.
#[test]
fn a_waiting_cursor_still_serves_what_partly_used_blocks_cannot() {
    let a = one_shard(&[0]);
    let pages: Vec<PfnRange> = (0..C).map(|_| alloc(&a, 1, 1)).collect();
    let last_mid = pages.last().unwrap().start().0 / M;
    a.free(range(5 * M + 1, 1)).unwrap();
    for p in &pages[(last_mid * M) as usize..((last_mid + 1) * M) as usize] {
        a.free(*p).unwrap();
    }
    assert_eq!(alloc(&a, 1, 2), range(last_mid * M, 1));
    a.check_invariants().unwrap();
}

/// `free` answers from the calling thread's home shard when it can (one page, one whole
/// block), sends everything else there through full validation, and a range that starts in
/// another shard straight to its owner: every kind of free, good and bad, gives the same
/// answer in the home shard and in the other one.
#[test]
fn frees_get_the_same_answers_in_the_home_shard_and_in_another() {
    let a = Allocator::new(AllocatorConfig::new(G, 2)).unwrap();
    let home = a.home_shard();
    let other = ShardId(1 - home.0);
    // Chunks 0 and 1 to the home shard, 2 and 3 to the other one: a range from chunk 1 into
    // chunk 2 crosses shards.
    for (c, shard) in [(0, home), (1, home), (2, other), (3, other)] {
        a.add_chunk_to(Pfn(c * C), true, shard).unwrap();
    }
    let only = |shard, pages: u64| {
        let align = if pages.is_power_of_two() { pages } else { 1 };
        a.alloc(
            AllocRequest::new(pages)
                .aligned(align)
                .hint(ShardHint::Only(shard)),
        )
        .unwrap()
    };
    for shard in [home, other] {
        let page = only(shard, 1);
        let block = only(shard, 512);
        let chunk = only(shard, C);
        let run = only(shard, 3);
        assert!([page.shard, block.shard, chunk.shard, run.shard] == [shard; 4]);
        for r in [page.range, block.range, chunk.range] {
            a.free(r).unwrap();
            assert_eq!(a.free(r), Err(AllocError::DoubleFree { pfn: r.start() }));
        }
        // Not for the hot path: part of an allocation (a hole), then the rest.
        a.free(range(run.range.start().0 + 1, 1)).unwrap();
        assert_eq!(
            a.free(run.range),
            Err(AllocError::DoubleFree {
                pfn: Pfn(run.range.start().0 + 1)
            })
        );
        a.free(range(run.range.start().0, 1)).unwrap();
        a.free(range(run.range.start().0 + 2, 1)).unwrap();
        a.check_invariants().unwrap();
    }
    // A range from the home shard's last chunk into the other shard's first one, taken
    // with `alloc_at` in two parts, and freed as one: it crosses shards.
    let across = range(2 * C - 1, 2);
    a.alloc_at(range(2 * C - 1, 1)).unwrap();
    a.alloc_at(range(2 * C, 1)).unwrap();
    assert_eq!(
        a.free(across),
        Err(AllocError::CrossesShards { pfn: Pfn(2 * C) })
    );
    a.free(range(2 * C - 1, 1)).unwrap();
    a.free(range(2 * C, 1)).unwrap();
    // No chunk at all.
    assert_eq!(
        a.free(range(9 * C, 1)),
        Err(AllocError::NotManaged { pfn: Pfn(9 * C) })
    );
    let s = a.stats();
    assert_eq!(s.total.allocated_pages, 0);
    assert_eq!(s.total.free_chunks, 4);
    a.check_invariants().unwrap();
}
