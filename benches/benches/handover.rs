//! Live update: how long a store takes to snapshot and to rebuild from the
//! snapshot, and how many bytes the snapshot is, for synthetic stores of 1 TiB and 16 TiB,
//! uniform and fragmented. The socket transfer itself is a memcpy of those bytes. The snapshot
//! sizes are printed on stderr (`handover: <case>: snapshot <n> bytes`); with
//! `PFNSTORE_BENCH_QUICK` set (scripts/bench.sh sets it) the fragmented cases convert 0.1 %
//! instead of 1 %, and their names say so.
//!
//! Run: `cargo bench -p pfnstore-benches --bench handover -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group};
use pfnstore::core::testing::XorShift;
use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{ConvertMode, FileOptions, Shareability, Store, StoreOptions};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// A synthetic store of `gib` GiB with one file over all of it, and `conversions` random 4 KiB
/// pages converted to shared (each a pair of boundaries).
fn store(gib: u64, conversions: u64) -> Store {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), gib).expect("source");
    let store = Store::synthetic(source, StoreOptions::default()).expect("store");
    let file = store
        .create_file(FileOptions::new(gib * GIB).populated())
        .expect("file");
    let mut rng = XorShift::new(0x51AB_0001);
    let pages = gib * GIB / PAGE;
    for _ in 0..conversions {
        let page = rng.below(pages);
        file.convert(
            page * PAGE,
            PAGE,
            Shareability::Shared,
            ConvertMode::Preserve,
        )
        .expect("convert");
    }
    // The file must outlive this function: the store holds files weakly.
    std::mem::forget(file);
    store
}

/// Set (to anything) by `scripts/bench.sh`: the fragmented cases convert 0.1 % of 1 TiB's pages
/// rather than 1 %, so that the whole summary run fits in five minutes (the 1 % rebuild of
/// 16 TiB alone takes over a minute of samples). Their names say which was run.
const QUICK_ENV: &str = "PFNSTORE_BENCH_QUICK";

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("handover");
    group.sample_size(10);
    let quick = std::env::var_os(QUICK_ENV).is_some();
    // 1 % of the 4 KiB pages of 1 TiB is 2.7 million conversions; the 16 TiB store gets the
    // same number of boundaries (0.06 % of its pages), which is what the snapshot's size
    // follows.
    let (per_mille, fraction) = if quick { (1, "0.1%") } else { (10, "1%") };
    let conversions = 1024 * GIB / PAGE * per_mille / 1000;
    let fragmented_1t = format!("1 TiB, {fraction} of pages converted");
    let fragmented_16t = format!("16 TiB, same boundaries as 1 TiB at {fraction}");
    for (name, gib, conversions) in [
        ("1 TiB uniform", 1024, 0),
        ("16 TiB uniform", 16 * 1024, 0),
        (fragmented_1t.as_str(), 1024, conversions),
        (fragmented_16t.as_str(), 16 * 1024, conversions),
    ] {
        let s = store(gib, conversions);
        let bytes = s.snapshot().expect("snapshot");
        eprintln!("handover: {name}: snapshot {} bytes", bytes.len());
        group.bench_function(format!("snapshot, {name}"), |b| {
            b.iter(|| black_box(s.snapshot().expect("snapshot").len()))
        });
        group.bench_function(format!("rebuild, {name}"), |b| {
            b.iter(|| {
                let r = Store::receive_snapshot(&bytes, None, StoreOptions::default())
                    .expect("rebuild");
                black_box(r.files.len())
            })
        });
    }
    group.finish();
}

criterion_group!(handover, benches);

fn main() {
    handover();
    Criterion::default().configure_from_args().final_summary();
}
