//! A tight loop of 4K convert-and-back in a uniform 1G, for profilers (`perf record`,
//! `valgrind --tool=callgrind`) and for checking how disjoint files scale:
//! `cargo run --release -p pfnstore-benches --example convert_loop -- [pairs] [threads] [subscribers]`.

use std::sync::Arc;

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    Change, ConvertMode, FileOptions, Interest, Shareability, Store, StoreOptions, Subscriber,
    UnmapError,
};

struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        std::hint::black_box(change.plan.unmap().len());
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        std::hint::black_box(change.plan.map().len());
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (pairs, threads, subscribers) = (arg(1, 1_000_000), arg(2, 1), arg(3, 3));
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), threads + 1).expect("source");
    let store = Store::synthetic(
        source,
        StoreOptions::default().with_shards(threads as usize),
    )
    .expect("store");
    let subs: Vec<Arc<dyn Subscriber>> = (0..subscribers)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let _regs: Vec<_> = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All).expect("subscribe"))
        .collect();
    let files: Vec<_> = (0..threads)
        .map(|_| {
            store
                .create_file(FileOptions::new(1 << 30).populated())
                .expect("file")
        })
        .collect();
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for file in &files {
            s.spawn(move || {
                for _ in 0..pairs {
                    file.convert(
                        4096 * 1000,
                        4096,
                        Shareability::Shared,
                        ConvertMode::Preserve,
                    )
                    .expect("convert");
                    file.convert(
                        4096 * 1000,
                        4096,
                        Shareability::Private,
                        ConvertMode::Preserve,
                    )
                    .expect("convert");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let per = elapsed / pairs as u32;
    let rate = (pairs * threads) as f64 / elapsed.as_secs_f64();
    println!(
        "{threads} thread(s), {subscribers} subscriber(s): {per:?} per pair per thread, {rate:.0} pairs/s in all"
    );
}
