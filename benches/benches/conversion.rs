//! Conversion transactions through the facade (issue 6): 4K inside a uniform 1G and back with
//! three no-op subscribers, a whole 1 GiB and 1 TiB (synthetic memory), and disjoint files
//! converting on one and on two threads.
//!
//! Run: `cargo bench -p pfnstore-benches --bench conversion -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group};
use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    Change, ConvertMode, FileOptions, GuestFile, Interest, Registration, Shareability, Store,
    StoreOptions, Subscriber, UnmapError,
};
use pfnstore_benches::workers::Workers;

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// A subscriber that accepts everything and does nothing: the cost of the protocol itself.
struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        black_box(change.plan.unmap().len());
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        black_box(change.plan.map().len());
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn store(chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), chunks).expect("source");
    Store::synthetic(source, StoreOptions::default().with_shards(shards)).expect("store")
}

fn with_subscribers(store: &Store, n: usize) -> (Vec<Arc<dyn Subscriber>>, Vec<Registration>) {
    let subs: Vec<Arc<dyn Subscriber>> = (0..n)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let regs = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All).expect("subscribe"))
        .collect();
    (subs, regs)
}

fn convert_and_back(file: &GuestFile, offset: u64, len: u64) {
    file.convert(offset, len, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    file.convert(offset, len, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("conversion");

    let s = store(2, 1);
    let (_subs, _regs) = with_subscribers(&s, 3);
    let file = s.create_file(FileOptions::new(GIB).populated()).unwrap();
    group.bench_function("4K in uniform 1G, split + merge, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&file, 1000 * PAGE, PAGE))
    });
    group.bench_function("whole 1 GiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&file, 0, GIB))
    });

    let big = store(1024, 2);
    let (_subs_big, _regs_big) = with_subscribers(&big, 3);
    let tib = big
        .create_file(FileOptions::new(1024 * GIB).populated())
        .unwrap();
    group.bench_function("whole 1 TiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&tib, 0, 1024 * GIB))
    });
    let gib64 = 64 * GIB;
    group.bench_function("64 GiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&tib, 0, gib64))
    });

    // Disjoint files: each thread converts 4K in its own file; time per conversion pair.
    let shared_store = store(4, 2);
    let (_subs2, _regs2) = with_subscribers(&shared_store, 3);
    let files: Vec<_> = (0..2)
        .map(|_| {
            shared_store
                .create_file(FileOptions::new(GIB).populated())
                .unwrap()
        })
        .collect();
    for threads in [1usize, 2] {
        // One worker per file, each converting its share of the sample's pairs; the span
        // from the first start to the last end gives criterion the time per pair at that
        // parallelism.
        let jobs = files[..threads]
            .iter()
            .map(|file| {
                let file = file.clone();
                Box::new(move |pairs: u64| {
                    for i in 0..pairs {
                        convert_and_back(&file, (i % 4096) * PAGE * 7, PAGE);
                    }
                }) as Box<dyn Fn(u64) + Send>
            })
            .collect();
        let workers = Workers::new(jobs);
        group.bench_function(
            format!("disjoint files, {threads} thread(s), per op"),
            |b| b.iter_custom(|iters| workers.round(iters.div_ceil(workers.len() as u64))),
        );
    }
    group.finish();
}

criterion_group!(conversion, benches);

fn main() {
    conversion();
    Criterion::default().configure_from_args().final_summary();
}
