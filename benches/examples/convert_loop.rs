//! A tight loop of 4K convert-and-back in a uniform 1G with three no-op subscribers, for
//! profilers (`perf record`, `valgrind --tool=callgrind`):
//! `cargo run --release -p pfnstore-benches --example convert_loop -- 1000000`.

use std::sync::Arc;

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    ConversionPlan, ConversionRequest, ConvertMode, FileOptions, Interest, Invalidation,
    Shareability, Store, StoreOptions, Subscriber, UnmapError,
};

struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn commit(&self, _: &ConversionRequest, plan: &ConversionPlan) -> Result<(), UnmapError> {
        std::hint::black_box(plan.unmap().len());
        Ok(())
    }
    fn invalidate(&self, _: &Invalidation) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn main() {
    let iterations: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), 2).expect("source");
    let store = Store::synthetic(source, StoreOptions { shards: 1 }).expect("store");
    let subs: Vec<Arc<dyn Subscriber>> = (0..3)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let _regs: Vec<_> = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All))
        .collect();
    let file = store
        .create_file(FileOptions::new(1 << 30).populated())
        .expect("file");
    let start = std::time::Instant::now();
    for _ in 0..iterations {
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
    let per = start.elapsed() / iterations as u32;
    println!("{iterations} convert-and-back pairs: {per:?} per pair");
}
