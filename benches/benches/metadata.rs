//! Metadata store vs. its baselines: conversion of 4K inside a uniform 1G and back
//! (shared and private memory), max-mapping-order at several fragmentations, 1G, 64 GiB and
//! 1 TiB conversion, and metadata bytes per GiB (printed as a table before the timings, measured with
//! a counting allocator). Every conversion, ours and the baselines', reports the blocks it split
//! and merged (see `pfnstore_benches::metadata_baselines`).
//!
//! Run: `cargo bench -p pfnstore-benches --bench metadata -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group};
use pfnstore_benches::footprint::{FRAGMENTATIONS, metadata_bytes_per_gib, random_pages};
use pfnstore_benches::metadata_baselines::bitmap::BitmapTracker;
use pfnstore_benches::metadata_baselines::range_map::RangeMapTracker;
use pfnstore_benches::metadata_baselines::struct_page::StructPageArray;
use pfnstore_benches::metadata_baselines::{BlockChange, ShareTracker};
use pfnstore_core::testing::{CountingAllocator, XorShift};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use pfnstore_metadata::{MetadataStore, Shareability};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const G: Geometry = Geometry::X86_64;
/// The PFN space of the timing benches: 64 GiB, as in the hand measurements.
const GIB_64: u64 = 64;
/// The struct-page array gets 4 GiB (64 MiB of records): 64 GiB would need 1 GiB of RAM, and
/// its per-operation cost does not depend on the space's size.
const STRUCT_PAGE_GIB: u64 = 4;

fn chunk_pages() -> u64 {
    G.chunk_pages()
}

fn store(gib: u64) -> MetadataStore {
    store_of(gib, Shareability::Shared)
}

fn store_of(gib: u64, initial: Shareability) -> MetadataStore {
    let span = PfnRange::new(Pfn(0), Pfn(gib * chunk_pages())).unwrap();
    let store = MetadataStore::new(G, span).unwrap();
    for c in 0..gib {
        store.add_chunk(Pfn(c * chunk_pages()), initial).unwrap();
    }
    store
}

fn range(a: u64, b: u64) -> PfnRange {
    PfnRange::new(Pfn(a), Pfn(b)).unwrap()
}

/// Bytes per GiB of each design at each fragmentation (`pfnstore_benches::footprint`).
fn print_bytes_table() {
    let gib = 4u64;
    println!("\nmetadata bytes per GiB ({gib} GiB, random 4K pages converted private):");
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>14} {:>10} {:>10}",
        "frag", "pfnstore", "bitmap", "rangemap", "struct page", "bitmap/us", "rmap/us"
    );
    for row in metadata_bytes_per_gib(gib).expect("bytes per GiB") {
        println!(
            "{:>8} {:>12.0} {:>12.0} {:>12.0} {:>14} {:>10.1} {:>10.1}",
            row.label,
            row.pfnstore,
            row.bitmap,
            row.rangemap,
            row.struct_page,
            row.bitmap / row.pfnstore,
            row.rangemap / row.pfnstore
        );
    }
    println!();
}

/// 4K converted inside a uniform 1G and back (a split and a merge), in three spaces of 64 GiB:
/// all shared (a plain VM's), all private (a confidential VM's at boot; it converts pages to
/// shared for I/O buffers), and shared with 1 % of the pages of every *other* chunk converted
/// private at random (a VM that has been running: the 1G in question is uniform, the space
/// around it is not).
fn convert_4k_in_uniform_1g(c: &mut Criterion) {
    for (label, initial, others_per_million) in [
        ("shared_1g", Shareability::Shared, 0),
        ("private_1g", Shareability::Private, 0),
        (
            "shared_1g_of_1pct_fragmented_space",
            Shareability::Shared,
            10_000,
        ),
    ] {
        let mut group = c.benchmark_group(format!("metadata/convert_4k_and_back_in_{label}"));
        // Inside chunk 1, which every design (including the 4 GiB struct-page array) holds.
        let page = chunk_pages() + 1000;
        let all_pages = GIB_64 * chunk_pages();
        let others: Vec<u64> = random_pages(all_pages, others_per_million, 0x0_7e55)
            .into_iter()
            .filter(|&p| p / chunk_pages() != 1)
            .collect();
        let space = Space {
            initial,
            others: &others,
        };
        let ours = store_of(GIB_64, initial);
        for &p in &others {
            drop(ours.set_shareability(PfnRange::page(Pfn(p)).unwrap(), initial.flipped()));
        }
        let p = PfnRange::page(Pfn(page)).unwrap();
        let there = initial.flipped();
        group.bench_function("pfnstore", |b| {
            b.iter(|| {
                black_box(ours.set_shareability(p, there).unwrap());
                black_box(ours.set_shareability(p, initial).unwrap());
            })
        });
        drop(ours);
        let bitmap = BitmapTracker::new(G, all_pages);
        bench_baseline(&mut group, "bitmap", &bitmap, all_pages, &space, page);
        drop(bitmap);
        let rmap = RangeMapTracker::new(G);
        bench_baseline(&mut group, "rangemap", &rmap, all_pages, &space, page);
        drop(rmap);
        let array = StructPageArray::new(G, STRUCT_PAGE_GIB * chunk_pages());
        let array_pages = STRUCT_PAGE_GIB * chunk_pages();
        bench_baseline(&mut group, "struct_page", &array, array_pages, &space, page);
        group.finish();
    }
}

/// The state a convert bench starts from: every page `initial`, except `others`.
struct Space<'a> {
    initial: Shareability,
    others: &'a [u64],
}

/// A baseline's 4K convert-and-back, after bringing its first `pages` pages to `space`,
/// reporting its splits and merges into a reused vector (called directly, not through `dyn`,
/// as pfnstore is).
fn bench_baseline<T: ShareTracker>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    tracker: &T,
    pages: u64,
    space: &Space<'_>,
    page: u64,
) {
    let private = space.initial == Shareability::Private;
    let mut changes: Vec<BlockChange> = Vec::with_capacity(8);
    if private {
        tracker.convert(0, pages, true, &mut changes);
    }
    for &p in space.others.iter().filter(|&&p| p < pages) {
        tracker.convert(p, p + 1, !private, &mut changes);
        changes.clear();
    }
    changes.clear();
    group.bench_function(name, |b| {
        b.iter(|| {
            tracker.convert(page, page + 1, !private, &mut changes);
            tracker.convert(page, page + 1, private, &mut changes);
            black_box(&changes);
            changes.clear();
        })
    });
}

fn max_order(c: &mut Criterion) {
    let mut group = c.benchmark_group("metadata/max_mapping_size");
    let gib = 8u64;
    let pages = gib * chunk_pages();
    for (per_million, label) in FRAGMENTATIONS {
        let converted = random_pages(pages, per_million, 0xfa57 + per_million);
        let ours = store(gib);
        let bitmap = BitmapTracker::new(G, pages);
        let mut changes = Vec::new();
        for &p in &converted {
            ours.set_shareability(PfnRange::page(Pfn(p)).unwrap(), Shareability::Private)
                .unwrap();
            bitmap.convert(p, p + 1, true, &mut changes);
            changes.clear();
        }
        // Probe a fixed pseudo-random walk over the space.
        let probes: Vec<u64> = {
            let mut rng = XorShift::new(0x1234);
            (0..4096).map(|_| rng.next_u64() % pages).collect()
        };
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("pfnstore", label), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(ours.max_mapping_size(Pfn(probes[i])).unwrap())
            })
        });
        group.bench_function(BenchmarkId::new("bitmap", label), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(bitmap.max_order(probes[i]))
            })
        });
        if per_million == 10_000 {
            let rmap = RangeMapTracker::new(G);
            for &p in &converted {
                rmap.convert(p, p + 1, true, &mut changes);
                changes.clear();
            }
            group.bench_function(BenchmarkId::new("rangemap", label), |b| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    black_box(rmap.max_order(probes[i]))
                })
            });
        }
    }
    group.finish();
}

fn convert_1g(c: &mut Criterion) {
    let mut group = c.benchmark_group("metadata/convert_1g_and_back");
    let ours = store(GIB_64);
    let chunk = range(3 * chunk_pages(), 4 * chunk_pages());
    group.bench_function("pfnstore", |b| {
        b.iter(|| {
            black_box(ours.set_shareability(chunk, Shareability::Private).unwrap());
            black_box(ours.set_shareability(chunk, Shareability::Shared).unwrap());
        })
    });
    let bitmap = BitmapTracker::new(G, GIB_64 * chunk_pages());
    let (a, z) = (3 * chunk_pages(), 4 * chunk_pages());
    let mut changes = Vec::with_capacity(8);
    group.bench_function("bitmap", |b| {
        b.iter(|| {
            bitmap.convert(a, z, true, &mut changes);
            bitmap.convert(a, z, false, &mut changes);
            changes.clear();
        })
    });
    let array = StructPageArray::new(G, STRUCT_PAGE_GIB * chunk_pages());
    group.sample_size(10);
    group.bench_function("struct_page", |b| {
        b.iter(|| {
            array.convert(a, z, true, &mut changes);
            array.convert(a, z, false, &mut changes);
            changes.clear();
        })
    });
    group.finish();
}

/// 64 GiB of a 64 GiB space to private and back; the struct-page array would need 1 GiB of
/// records for it and is left out (its 1G row shows how it scales: linearly in pages).
fn convert_64g(c: &mut Criterion) {
    let mut group = c.benchmark_group("metadata/convert_64g_and_back");
    group.sample_size(10);
    let ours = store(GIB_64);
    let all = range(0, GIB_64 * chunk_pages());
    group.bench_function("pfnstore", |b| {
        b.iter(|| {
            black_box(ours.set_shareability(all, Shareability::Private).unwrap());
            black_box(ours.set_shareability(all, Shareability::Shared).unwrap());
        })
    });
    drop(ours);
    let bitmap = BitmapTracker::new(G, GIB_64 * chunk_pages());
    let mut changes = Vec::with_capacity(1 << 16);
    group.bench_function("bitmap", |b| {
        b.iter(|| {
            bitmap.convert(0, GIB_64 * chunk_pages(), true, &mut changes);
            bitmap.convert(0, GIB_64 * chunk_pages(), false, &mut changes);
            changes.clear();
        })
    });
    group.finish();
}

/// All of a 1 TiB space converted one way (alternating direction per iteration).
fn convert_1t(c: &mut Criterion) {
    let mut group = c.benchmark_group("metadata/convert_1t");
    group.sample_size(10);
    let ours = store(1024);
    let all = range(0, 1024 * chunk_pages());
    let mut to = Shareability::Private;
    group.bench_function("pfnstore", |b| {
        b.iter(|| {
            black_box(ours.set_shareability(all, to).unwrap());
            to = to.flipped();
        })
    });
    drop(ours);
    // 32 MiB of bits plus the counters.
    let pages = 1024 * chunk_pages();
    let bitmap = BitmapTracker::new(G, pages);
    let mut changes = Vec::with_capacity(1 << 20);
    let mut private = true;
    group.bench_function("bitmap", |b| {
        b.iter(|| {
            bitmap.convert(0, pages, private, &mut changes);
            changes.clear();
            private = !private;
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    convert_4k_in_uniform_1g,
    max_order,
    convert_1g,
    convert_64g,
    convert_1t
);

fn main() {
    print_bytes_table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
