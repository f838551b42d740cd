//! Allocation benches: pfnstore's allocator against rust-vmm's vm-allocator
//! `AddressAllocator` behind a parking_lot Mutex (how a VMM uses it), in one run.
//!
//! * `alloc_free_empty/<size>/<impl>`: one alloc + free of 4K, 2M or 1G on an empty 64 GiB.
//! * `alloc_free_10k_holes/<size>/<impl>`: the same after 10,000 single-page holes were
//!   punched at the bottom of the space (vm-allocator's first-match walk is O(holes)).
//! * `threads/<n>/<impl>`: n threads (1, 2, 8 on this 2-core machine) each doing a mixed
//!   stream (4K 70 %, 2M 25 %, 1G 5 %) of allocs and frees, each thread keeping up to 16
//!   allocations live; throughput in alloc+free pairs per second. This is the random-size
//!   row: sizes drawn among 4K/2M/1G (not random page counts).
//!
//! `ours-1-shard` is this allocator with one shard (one lock, like the baseline);
//! `ours-sharded` has 8 shards.
//!
//! The allocator targets' table (pfnstore's side; LLFree is measured outside the project, see
//! benches/RESULTS.md), on 16 GiB added dirty with `add_chunk`, one frame of order o aligned to
//! its size per call:
//!
//! * `pair/<size>/<shards>`: one alloc + free of 4K (1 and 8 shards), 2M, 1G, one thread.
//! * `bulk_4k/<phase>`: 4K frames allocated one after another from empty (up to 1M, then
//!   freed untimed), and freed newest first or in a random order; time per alloc or free.
//! * `pair_threads/<n>`: n threads (shards = n) repeating 4K pairs; throughput in pairs/s.
//! * `bulk_4k_threads/<n>`: n threads (shards = n) each allocating 65,536 4K frames, then
//!   freeing them (LLFree's bulk workload); throughput in alloc+free pairs/s.
//! * `fragmented_16g/<phase>`: 16 GiB filled with 4K frames, a random half freed (time per
//!   free); then 64 random whole 2M blocks freed and 2M allocs find them (time per 2M alloc,
//!   64 of 64 asserted); a failing 2M request on the fragmented memory.
//! * metadata bytes per GiB in each state, printed as a table before the timings (measured
//!   with `pfnstore_core::testing::CountingAllocator`).
//!
//! Run: `cargo bench -p pfnstore-benches --bench allocator -- --warm-up-time 1 --measurement-time 2`

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use parking_lot::Mutex;
use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig};
use pfnstore_benches::workers::Workers;
use pfnstore_core::testing::{CountingAllocator, XorShift};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const G: Geometry = Geometry::X86_64;
const CHUNKS: u64 = 64; // 64 GiB
const HOLES: u64 = 10_000;

/// The two allocators behind one interface, in PFN units (vm-allocator's unit is arbitrary).
trait PfnAlloc: Sync {
    type Handle: Send;
    fn alloc(&self, pages: u64, align: u64) -> Self::Handle;
    fn free(&self, handle: Self::Handle);
}

struct VmAllocator(Mutex<AddressAllocator>);

impl VmAllocator {
    fn new() -> VmAllocator {
        VmAllocator(Mutex::new(
            // Based one chunk up: vm-allocator 0.1.4's free fails (Underflow) on coalescing
            // a range that starts at 0.
            AddressAllocator::new(G.chunk_pages(), CHUNKS * G.chunk_pages()).expect("valid space"),
        ))
    }
}

impl PfnAlloc for VmAllocator {
    type Handle = RangeInclusive;
    fn alloc(&self, pages: u64, align: u64) -> RangeInclusive {
        self.0
            .lock()
            .allocate(pages, align, AllocPolicy::FirstMatch)
            .expect("bench space has room")
    }
    fn free(&self, handle: RangeInclusive) {
        self.0
            .lock()
            .free(&handle)
            .expect("freeing what was allocated");
    }
}

struct Ours(Allocator);

impl Ours {
    fn new(shards: usize) -> Ours {
        let a = Allocator::new(AllocatorConfig::new(G, shards)).expect("valid config");
        for c in 0..CHUNKS {
            a.add_chunk(Pfn(c * G.chunk_pages()), true)
                .expect("fresh chunk");
        }
        Ours(a)
    }
}

impl PfnAlloc for Ours {
    type Handle = PfnRange;
    fn alloc(&self, pages: u64, align: u64) -> PfnRange {
        self.0
            .alloc(AllocRequest::new(pages).aligned(align))
            .expect("bench space has room")
            .range
    }
    fn free(&self, handle: PfnRange) {
        self.0.free(handle).expect("freeing what was allocated");
    }
}

const SIZES: [(&str, u64); 3] = [("4K", 1), ("2M", 512), ("1G", 512 * 512)];

fn punch_holes<A: PfnAlloc>(a: &A) {
    let pages: Vec<_> = (0..2 * HOLES).map(|_| a.alloc(1, 1)).collect();
    // Free every other page: 10,000 one-page holes at the bottom of the space; the other
    // pages stay allocated for the whole bench.
    for h in pages.into_iter().step_by(2) {
        a.free(h);
    }
}

fn single(c: &mut Criterion, holes: bool) {
    let name = if holes {
        "alloc_free_10k_holes"
    } else {
        "alloc_free_empty"
    };
    let mut group = c.benchmark_group(name);
    for (label, pages) in SIZES {
        let vm = VmAllocator::new();
        let one = Ours::new(1);
        let sharded = Ours::new(8);
        if holes {
            punch_holes(&vm);
            punch_holes(&one);
            punch_holes(&sharded);
        }
        group.bench_function(BenchmarkId::new(label, "vm-allocator"), |b| {
            b.iter(|| vm.free(black_box(vm.alloc(pages, pages))))
        });
        group.bench_function(BenchmarkId::new(label, "ours-1-shard"), |b| {
            b.iter(|| one.free(black_box(one.alloc(pages, pages))))
        });
        group.bench_function(BenchmarkId::new(label, "ours-sharded"), |b| {
            b.iter(|| sharded.free(black_box(sharded.alloc(pages, pages))))
        });
    }
    group.finish();
}

fn empty(c: &mut Criterion) {
    single(c, false);
}

fn holes(c: &mut Criterion) {
    single(c, true);
}

const OPS_PER_THREAD: u64 = 20_000;

/// `n` workers each doing one thread's share of a round on `a`.
fn workers<A: PfnAlloc + Send + 'static>(a: Arc<A>, n: u64) -> Workers {
    let jobs = (0..n)
        .map(|t| {
            let a = Arc::clone(&a);
            Box::new(move |_| work(&*a, t)) as Box<dyn Fn(u64) + Send>
        })
        .collect();
    Workers::new(jobs)
}

/// One thread's share of a round: `OPS_PER_THREAD` alloc+free pairs of mixed sizes.
fn work<A: PfnAlloc>(a: &A, seed: u64) {
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1));
    let mut live: Vec<A::Handle> = Vec::with_capacity(17);
    for _ in 0..OPS_PER_THREAD {
        let roll = rng.next_u64();
        let (pages, align) = match roll % 100 {
            0..70 => (1, 1),
            70..95 => (512, 512),
            _ => (512 * 512, 512 * 512),
        };
        live.push(a.alloc(pages, align));
        if live.len() > 16 {
            let victim = live.swap_remove((roll >> 32) as usize % live.len());
            a.free(victim);
        }
    }
    for h in live {
        a.free(h);
    }
}

fn threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("threads");
    for n in [1u64, 2, 8] {
        group.throughput(Throughput::Elements(n * OPS_PER_THREAD));
        let vm = workers(Arc::new(VmAllocator::new()), n);
        let one = workers(Arc::new(Ours::new(1)), n);
        let sharded = workers(Arc::new(Ours::new(8)), n);
        group.bench_function(BenchmarkId::new(n.to_string(), "vm-allocator"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| vm.round(0)).sum())
        });
        group.bench_function(BenchmarkId::new(n.to_string(), "ours-1-shard"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| one.round(0)).sum())
        });
        group.bench_function(BenchmarkId::new(n.to_string(), "ours-sharded"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| sharded.round(0)).sum())
        });
    }
    group.finish();
}

// ----- the allocator targets' cases (beside LLFree, benches/RESULTS.md) -----

/// 16 GiB, the size of the side-by-side runs with LLFree.
const GIB16: u64 = 16;
const FRAMES16: u64 = GIB16 << 18;
const BULK: u64 = 1 << 20;

/// 16 GiB in `shards` shards, added dirty (no scrub bookkeeping, as in the LLFree runs).
fn ours16(shards: usize) -> Allocator {
    let a = Allocator::new(AllocatorConfig::new(G, shards)).expect("valid config");
    for c in 0..GIB16 {
        a.add_chunk(Pfn(c * G.chunk_pages()), true)
            .expect("fresh chunk");
    }
    a
}

fn page(a: &Allocator, pages: u64) -> PfnRange {
    a.alloc(AllocRequest::new(pages).aligned(pages))
        .expect("room")
        .range
}

fn pair(c: &mut Criterion) {
    let mut group = c.benchmark_group("pair");
    for (label, pages, shards) in [
        ("4K/1-shard", 1, 1),
        ("4K/8-shards", 1, 8),
        ("2M/1-shard", 512, 1),
        ("1G/1-shard", 1 << 18, 1),
    ] {
        let a = ours16(shards);
        group.bench_function(label, |b| {
            b.iter(|| a.free(black_box(page(&a, pages))).expect("own range"))
        });
    }
    group.finish();
}

/// Runs `iters` timed operations in rounds of at most `BULK`: `timed(round)` does one round
/// and returns its time.
fn in_rounds(iters: u64, mut timed: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let round = left.min(BULK);
        total += timed(round);
        left -= round;
    }
    total
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = XorShift::new(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn bulk(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulk_4k");
    let a = ours16(1);
    let mut held: Vec<PfnRange> = Vec::with_capacity(BULK as usize);
    group.bench_function("alloc", |b| {
        b.iter_custom(|iters| {
            in_rounds(iters, |n| {
                let t = Instant::now();
                for _ in 0..n {
                    held.push(page(&a, 1));
                }
                let spent = t.elapsed();
                for r in held.drain(..).rev() {
                    a.free(r).expect("own range");
                }
                spent
            })
        })
    });
    for (label, random) in [("free-newest-first", false), ("free-random", true)] {
        let mut seed = 0x5eed;
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                in_rounds(iters, |n| {
                    held.extend((0..n).map(|_| page(&a, 1)));
                    if random {
                        seed += 1;
                        shuffle(&mut held, seed);
                    } else {
                        held.reverse();
                    }
                    let t = Instant::now();
                    for r in held.drain(..) {
                        a.free(r).expect("own range");
                    }
                    t.elapsed()
                })
            })
        });
    }
    group.finish();
}

const PAIRS_PER_THREAD: u64 = 200_000;

fn pair_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("pair_threads");
    for n in [1u64, 2, 8] {
        group.throughput(Throughput::Elements(n * PAIRS_PER_THREAD));
        let a = Arc::new(ours16(n as usize));
        let jobs = (0..n)
            .map(|_| {
                let a = Arc::clone(&a);
                Box::new(move |_| {
                    for _ in 0..PAIRS_PER_THREAD {
                        a.free(black_box(page(&a, 1))).expect("own range");
                    }
                }) as Box<dyn Fn(u64) + Send>
            })
            .collect();
        let workers = Workers::new(jobs);
        group.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| workers.round(0)).sum())
        });
    }
    group.finish();
}

/// 4 KiB frames each thread of `bulk_4k_threads` allocates before freeing them (256 MiB per
/// thread: 8 threads take 2 GiB of the 16).
const BULK_PER_THREAD: u64 = 1 << 16;

/// LLFree's "bulk" workload: n threads (shards = n) each allocate `BULK_PER_THREAD` 4 KiB
/// frames, then free them all, oldest first; criterion times a round (all threads), the
/// throughput is alloc+free pairs.
fn bulk_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulk_4k_threads");
    for n in [1u64, 2, 8] {
        group.throughput(Throughput::Elements(n * BULK_PER_THREAD));
        let a = Arc::new(ours16(n as usize));
        let jobs = (0..n)
            .map(|_| {
                let a = Arc::clone(&a);
                let held = RefCell::new(Vec::with_capacity(BULK_PER_THREAD as usize));
                Box::new(move |_| {
                    let mut held = held.borrow_mut();
                    held.extend((0..BULK_PER_THREAD).map(|_| page(&a, 1)));
                    for r in held.drain(..) {
                        a.free(r).expect("own range");
                    }
                }) as Box<dyn Fn(u64) + Send>
            })
            .collect();
        let workers = Workers::new(jobs);
        group.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| workers.round(0)).sum())
        });
    }
    group.finish();
}

/// 16 GiB filled with 4K frames; returns them by frame.
fn fill(a: &Allocator) -> Vec<Option<PfnRange>> {
    let mut table = vec![None; FRAMES16 as usize];
    fill_into(a, &mut table);
    table
}

fn fill_into(a: &Allocator, table: &mut [Option<PfnRange>]) {
    while let Ok(x) = a.alloc(AllocRequest::new(1)) {
        table[x.range.start().0 as usize] = Some(x.range);
    }
    assert_eq!(a.stats().total.free_pages, 0);
}

/// Frees the frames of `order[..]` that are held.
fn free_frames(a: &Allocator, table: &mut [Option<PfnRange>], order: &[u32]) -> u64 {
    let mut n = 0;
    for &i in order {
        if let Some(r) = table[i as usize].take() {
            a.free(r).expect("own range");
            n += 1;
        }
    }
    n
}

fn fragmented(c: &mut Criterion) {
    let mut group = c.benchmark_group("fragmented_16g");
    group.sample_size(10);
    let a = ours16(1);
    let mut order: Vec<u32> = (0..FRAMES16 as u32).collect();
    shuffle(&mut order, 0xF4A6);
    let half = &order[..FRAMES16 as usize / 2];
    group.bench_function("free-random-half", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut table = fill(&a);
                let t = Instant::now();
                done += free_frames(&a, &mut table, half);
                total += t.elapsed();
                for r in table.into_iter().flatten() {
                    a.free(r).expect("own range");
                }
            }
            total * iters.max(1) as u32 / done.max(1) as u32
        })
    });
    // The fragmented state: a random half of 16 GiB in 4K frames.
    let mut table = fill(&a);
    free_frames(&a, &mut table, half);
    assert_eq!(
        a.stats().total.free_mid_blocks,
        0,
        "no whole 2M block by chance"
    );
    group.bench_function("2M-alloc-failing", |b| {
        b.iter(|| {
            assert!(
                a.alloc(AllocRequest::new(512).aligned(512)).is_err(),
                "no free 2M block"
            )
        })
    });
    // Then 64 random whole 2M blocks are made free: every one must be found.
    let mut blocks: Vec<u32> = (0..(FRAMES16 / 512) as u32).collect();
    shuffle(&mut blocks, 0xB10C);
    for &blk in &blocks[..64] {
        let frames: Vec<u32> = (blk * 512..(blk + 1) * 512).collect();
        free_frames(&a, &mut table, &frames);
    }
    assert_eq!(a.stats().total.free_mid_blocks, 64);
    let found: Vec<PfnRange> = (0..64).map(|_| page(&a, 512)).collect();
    assert!(a.alloc(AllocRequest::new(512).aligned(512)).is_err());
    println!("fragmented 16 GiB: 64 of 64 free 2M blocks found by 2M allocs");
    for r in found {
        a.free(r).expect("own range");
    }
    group.bench_function("2M-alloc-among-64-free-blocks", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut got = Vec::with_capacity(64);
            while left > 0 {
                let n = left.min(64);
                let t = Instant::now();
                for _ in 0..n {
                    got.push(page(&a, 512));
                }
                total += t.elapsed();
                for r in got.drain(..) {
                    a.free(r).expect("own range");
                }
                left -= n;
            }
            total
        })
    });
    group.finish();
}

fn live() -> i64 {
    CountingAllocator::live_bytes()
}

/// Metadata bytes per GiB of 16 GiB in each state of the side-by-side table. The bench's own
/// vectors are allocated before the first reading, so every difference is the allocator's.
fn print_bytes_table() {
    let report = |state: &str, bytes: i64| {
        println!(
            "{state:<44} {:>10.3} KiB per GiB",
            bytes as f64 / GIB16 as f64 / 1024.0
        );
    };
    println!("\nallocator metadata (16 GiB, 1 shard unless said; live heap bytes):");
    let mut held: Vec<PfnRange> = Vec::with_capacity(FRAMES16 as usize);
    let mut table: Vec<Option<PfnRange>> = vec![None; FRAMES16 as usize];
    let mut order: Vec<u32> = (0..FRAMES16 as u32).collect();
    shuffle(&mut order, 0xF4A6);
    let before = live();
    let a = ours16(1);
    report("empty", live() - before);
    held.extend((0..BULK).map(|_| page(&a, 1)));
    report("1M 4K frames allocated", live() - before);
    for r in held.drain(..) {
        a.free(r).expect("own range");
    }
    fill_into(&a, &mut table);
    report("all in 4K frames", live() - before);
    free_frames(&a, &mut table, &order[..FRAMES16 as usize / 2]);
    report("then a random half freed", live() - before);
    free_frames(&a, &mut table, &order);
    report("then all freed", live() - before);
    held.extend((0..FRAMES16 / 512).map(|_| page(&a, 512)));
    report("all in 2M blocks", live() - before);
    for r in held.drain(..) {
        a.free(r).expect("own range");
    }
    held.extend((0..GIB16).map(|_| page(&a, 1 << 18)));
    report("all in 1G blocks", live() - before);
    for r in held.drain(..) {
        a.free(r).expect("own range");
    }
    drop(a);
    let before = live();
    let a8 = ours16(8);
    report("empty, 8 shards", live() - before);
    drop(a8);
    println!();
}

criterion_group!(
    benches,
    empty,
    holes,
    threads,
    pair,
    bulk,
    pair_threads,
    bulk_threads,
    fragmented
);

fn main() {
    print_bytes_table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
