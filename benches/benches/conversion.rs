//! Conversion transactions through the facade (issue 6): 4K inside a uniform 1G and back with
//! three no-op subscribers, a whole 1 GiB and 1 TiB (synthetic memory), and disjoint files
//! converting on one and on two threads.
//!
//! Run: `cargo bench -p pfnstore-benches --bench conversion -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    ConversionPlan, ConversionRequest, ConvertMode, FileOptions, GuestMemory, Interest,
    Invalidation, Registration, Shareability, Store, StoreOptions, Subscriber, UnmapError,
};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// A subscriber that accepts everything and does nothing: the cost of the protocol itself.
struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn commit(&self, _: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError> {
        black_box(plan.unmap().len());
        Ok(())
    }
    fn invalidate(&self, _: &Invalidation) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn store(chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), chunks).expect("source");
    Store::synthetic(source, StoreOptions { shards }).expect("store")
}

fn with_subscribers(store: &Store, n: usize) -> (Vec<Arc<dyn Subscriber>>, Vec<Registration>) {
    let subs: Vec<Arc<dyn Subscriber>> = (0..n)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let regs = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All))
        .collect();
    (subs, regs)
}

fn convert_and_back(file: &GuestMemory, offset: u64, len: u64) {
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
        let workers = Workers::new(&files[..threads]);
        group.bench_function(
            format!("disjoint files, {threads} thread(s), per op"),
            |b| b.iter_custom(|iters| workers.run(iters)),
        );
    }
    group.finish();
}

/// Long-lived worker threads, one per file, as a VMM's vCPU threads are: spawning threads for
/// every sample would measure thread start-up and the C allocator's arena assignment instead.
struct Workers {
    orders: Vec<mpsc::Sender<u64>>,
    spans: mpsc::Receiver<(Instant, Instant)>,
}

impl Workers {
    fn new(files: &[GuestMemory]) -> Workers {
        let (span_tx, spans) = mpsc::channel();
        let orders = files
            .iter()
            .map(|file| {
                let (tx, rx) = mpsc::channel::<u64>();
                let (file, span_tx) = (file.clone(), span_tx.clone());
                std::thread::spawn(move || {
                    for pairs in rx {
                        let start = Instant::now();
                        for i in 0..pairs {
                            convert_and_back(&file, (i % 4096) * PAGE * 7, PAGE);
                        }
                        if span_tx.send((start, Instant::now())).is_err() {
                            return;
                        }
                    }
                });
                tx
            })
            .collect();
        Workers { orders, spans }
    }

    /// Runs `iters` pairs split across the workers; returns the span from the first start to
    /// the last end, so criterion reports the time per pair at that parallelism.
    fn run(&self, iters: u64) -> Duration {
        let per_worker = iters.div_ceil(self.orders.len() as u64);
        for order in &self.orders {
            order.send(per_worker).expect("worker alive");
        }
        let spans: Vec<_> = (0..self.orders.len())
            .map(|_| self.spans.recv().expect("worker alive"))
            .collect();
        let first = spans.iter().map(|s| s.0).min().expect("a worker");
        let last = spans.iter().map(|s| s.1).max().expect("a worker");
        last - first
    }
}

criterion_group!(conversion, benches);

fn main() {
    conversion();
    Criterion::default().configure_from_args().final_summary();
}
