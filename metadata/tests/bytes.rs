//! Bytes: the store's reported byte count equals what it holds from the allocator (measured
//! with a counting global allocator), stays within the per-page bitmap's size at every
//! fragmentation, and returns exactly to the baseline when every change is undone.
#![cfg(not(pfnstore_loom))]

use pfnstore_core::testing::{CountingAllocator, XorShift};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use pfnstore_metadata::{FileId, MetadataStore, PinOwner, QuarantineReason, Shareability};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn live() -> i64 {
    CountingAllocator::live_bytes()
}

fn allocation_calls() -> u64 {
    CountingAllocator::allocation_calls()
}

const G: Geometry = Geometry::X86_64;

fn page(p: u64) -> PfnRange {
    PfnRange::page(Pfn(p)).unwrap()
}

/// Distinct random pages of chunk `chunk`: `per_million` of its pages.
fn random_pages(chunk: u64, per_million: u64, seed: u64) -> Vec<u64> {
    let pages = G.chunk_pages();
    let want = (pages * per_million).div_ceil(1_000_000) as usize;
    let mut rng = XorShift::new(seed);
    let mut set = std::collections::BTreeSet::new();
    while set.len() < want {
        set.insert(chunk * pages + rng.next_u64() % pages);
    }
    set.into_iter().collect()
}

#[test]
fn bytes_are_measured_bounded_and_restored() {
    let chunks = 4u64;
    let span = PfnRange::new(Pfn(0), Pfn(chunks * G.chunk_pages())).unwrap();
    let store = MetadataStore::new(G, span).unwrap();
    for c in 0..chunks {
        store
            .add_chunk(Pfn(c * G.chunk_pages()), Shareability::Private)
            .unwrap();
    }
    let baseline_live = live();
    let baseline = store.stats();
    assert_eq!(baseline.heap_bytes, 0);
    assert!(
        baseline.bytes / chunks <= 64,
        "uniform memory costs {} B per GiB",
        baseline.bytes / chunks
    );

    // 0.01%, 0.1%, 1%, 10% of the pages of chunks 0..4 converted at random.
    let bitmap_bytes_per_chunk = G.chunk_pages() / 8;
    let fractions = [100u64, 1_000, 10_000, 100_000];
    let mut converted = Vec::with_capacity(fractions.len());
    // Only the store's own allocations count, not the test's page lists.
    let mut store_bytes = 0i64;
    for (c, per_million) in fractions.into_iter().enumerate() {
        let pages = random_pages(c as u64, per_million, 0x9e37_79b9 + c as u64);
        let before = live();
        for &p in &pages {
            drop(
                store
                    .set_shareability(page(p), Shareability::Shared)
                    .unwrap(),
            );
        }
        let grown = live() - before;
        store_bytes += grown;
        assert!(
            grown <= bitmap_bytes_per_chunk as i64,
            "{per_million} ppm: {grown} B for a chunk, the bitmap needs {bitmap_bytes_per_chunk}"
        );
        converted.push(pages);
    }
    // Some coarse fragmentation too: pins and an owner.
    let before = live();
    store
        .pin(PfnRange::new(Pfn(10), Pfn(20)).unwrap(), PinOwner(1))
        .unwrap();
    store
        .assign_owner(PfnRange::new(Pfn(0), Pfn(1000)).unwrap(), FileId(3))
        .unwrap();
    store_bytes += live() - before;
    let stats = store.stats();
    assert_eq!(
        stats.heap_bytes as i64, store_bytes,
        "stats must report measured bytes"
    );
    assert_eq!(stats.table_bytes, baseline.table_bytes);

    // Undo everything: the store returns to its baseline, byte for byte.
    store
        .unpin(PfnRange::new(Pfn(10), Pfn(20)).unwrap(), PinOwner(1))
        .unwrap();
    store
        .release_owner(PfnRange::new(Pfn(0), Pfn(1000)).unwrap(), FileId(3))
        .unwrap();
    for pages in converted.iter().rev() {
        for &p in pages.iter().rev() {
            drop(
                store
                    .set_shareability(page(p), Shareability::Private)
                    .unwrap(),
            );
        }
    }
    let extra = std::mem::size_of_val(&converted[..]) as i64
        + converted
            .iter()
            .map(|v| (v.capacity() * 8) as i64)
            .sum::<i64>();
    assert_eq!(
        live() - extra,
        baseline_live,
        "bytes must return to the baseline"
    );
    assert_eq!(store.stats(), baseline);
    store.check_invariants().unwrap();
}

#[test]
fn a_quarantined_page_costs_a_small_run_list() {
    let span = PfnRange::new(Pfn(0), Pfn(G.chunk_pages())).unwrap();
    let store = MetadataStore::new(G, span).unwrap();
    store.add_chunk(Pfn(0), Shareability::Shared).unwrap();
    let before = live();
    store
        .quarantine(page(5), QuarantineReason::UnmapFailed)
        .unwrap();
    let grown = live() - before;
    assert_eq!(grown as u64, store.stats().heap_bytes);
    assert!(grown < 200, "{grown} B for one quarantined page");
}

/// The conversion fast path (a few 4K pages converted in a uniform chunk, and back) never
/// calls the allocator, and its results are the ones the issue asks for.
#[test]
fn a_4k_conversion_and_back_does_not_allocate() {
    let span = PfnRange::new(Pfn(0), Pfn(2 * G.chunk_pages())).unwrap();
    let store = MetadataStore::new(G, span).unwrap();
    store.add_chunk(Pfn(0), Shareability::Shared).unwrap();
    store
        .add_chunk(Pfn(G.chunk_pages()), Shareability::Shared)
        .unwrap();
    let pages = [G.chunk_pages() + 1000, G.chunk_pages() + 5000];
    let calls = allocation_calls();
    for p in pages {
        let split = store
            .set_shareability(page(p), Shareability::Private)
            .unwrap();
        assert_eq!(split.splits().count(), if p == pages[0] { 2 } else { 1 });
    }
    for p in pages {
        let merged = store
            .set_shareability(page(p), Shareability::Shared)
            .unwrap();
        assert_eq!(merged.merges().count(), if p == pages[1] { 2 } else { 1 });
    }
    assert_eq!(
        allocation_calls(),
        calls,
        "the fast path called the allocator"
    );
    assert_eq!(store.stats().heap_bytes, 0);
    store.check_invariants().unwrap();
}
