//! Allocation benches (issue 4): pfnstore's allocator against rust-vmm's vm-allocator
//! `AddressAllocator` behind a parking_lot Mutex (how a VMM uses it), in one run.
//!
//! * `alloc_free_empty/<size>/<impl>`: one alloc + free of 4K, 2M or 1G on an empty 64 GiB.
//! * `alloc_free_10k_holes/<size>/<impl>`: the same after 10,000 single-page holes were
//!   punched at the bottom of the space (vm-allocator's first-match walk is O(holes)).
//! * `threads/<n>/<impl>`: n threads (1, 2, 8 on this 2-core machine) each doing a mixed
//!   stream (4K 70 %, 2M 25 %, 1G 5 %) of allocs and frees, each thread keeping up to 16
//!   allocations live; throughput in alloc+free pairs per second.
//!
//! `ours-1-shard` is this allocator with one shard (one lock, like the baseline);
//! `ours-sharded` has 8 shards. Run:
//! `cargo bench -p pfnstore-benches --bench allocator -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use parking_lot::Mutex;
use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig};
use pfnstore_benches::workers::Workers;
use pfnstore_core::testing::XorShift;
use pfnstore_core::{Geometry, Pfn, PfnRange};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

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
        let a = Allocator::new(AllocatorConfig {
            geometry: G,
            shards,
        })
        .expect("valid config");
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

criterion_group!(benches, empty, holes, threads);
criterion_main!(benches);
