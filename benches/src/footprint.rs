//! Metadata bytes per GiB of pfnstore's metadata store and of its baselines at each
//! fragmentation (random 4 KiB pages converted to private), measured as live heap bytes.
//!
//! Byte counts are deterministic, so the metadata bench prints them and the benchmark summary
//! computes them directly; both call [`metadata_bytes_per_gib`]. The measurement needs
//! `pfnstore_core::testing::CountingAllocator` as the calling binary's global allocator; without
//! it the function returns an error rather than zeros.

use std::collections::BTreeSet;
use std::hint::black_box;

use pfnstore_core::testing::{CountingAllocator, XorShift};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use pfnstore_metadata::{MetadataStore, Shareability};

use crate::metadata_baselines::ShareTracker;
use crate::metadata_baselines::bitmap::BitmapTracker;
use crate::metadata_baselines::range_map::RangeMapTracker;
use crate::metadata_baselines::struct_page::StructPageArray;

/// The fragmentations the benches measure, in converted pages per million, with their labels.
pub const FRAGMENTATIONS: [(u64, &str); 5] = [
    (0, "0%"),
    (100, "0.01%"),
    (1_000, "0.1%"),
    (10_000, "1%"),
    (100_000, "10%"),
];

/// Bytes per GiB of each design at one fragmentation.
#[derive(Debug, Clone, PartialEq)]
pub struct BytesPerGib {
    /// The fragmentation's label (`"1%"`).
    pub label: &'static str,
    /// Converted pages per million.
    pub per_million: u64,
    /// pfnstore's `MetadataStore`.
    pub pfnstore: f64,
    /// One bit per page plus per-2M/1G counters.
    pub bitmap: f64,
    /// `rangemap::RangeMap` behind a mutex.
    pub rangemap: f64,
    /// 64 bytes per page plus counters (does not depend on the fragmentation).
    pub struct_page: f64,
}

/// `per_million` of the pages of `0..pages`, distinct, at random, ascending.
pub fn random_pages(pages: u64, per_million: u64, seed: u64) -> Vec<u64> {
    let want = (pages * per_million).div_ceil(1_000_000) as usize;
    let mut rng = XorShift::new(seed | 1);
    let mut set = BTreeSet::new();
    while set.len() < want {
        set.insert(rng.next_u64() % pages);
    }
    set.into_iter().collect()
}

fn live() -> i64 {
    CountingAllocator::live_bytes()
}

/// Whether the counting allocator is the global one (its count moves when this thread
/// allocates).
pub fn counting_allocator_installed() -> bool {
    let before = live();
    let probe = std::hint::black_box(vec![0u8; 4096]);
    let counted = live() - before >= 4096;
    drop(probe);
    counted
}

/// A metadata store over `gib` GiB at PFN 0, every chunk added shared.
fn store(geometry: Geometry, gib: u64) -> MetadataStore {
    let chunk = geometry.chunk_pages();
    let span = PfnRange::new(Pfn(0), Pfn(gib * chunk)).expect("a non-empty span");
    let store = MetadataStore::new(geometry, span).expect("a valid span");
    for c in 0..gib {
        store
            .add_chunk(Pfn(c * chunk), Shareability::Shared)
            .expect("a fresh chunk inside the span");
    }
    store
}

/// Bytes per GiB of each design over `gib` GiB at each of [`FRAGMENTATIONS`], the same random
/// pages converted to private in each. Measured on this thread with the counting allocator.
pub fn metadata_bytes_per_gib(gib: u64) -> Result<Vec<BytesPerGib>, String> {
    if !counting_allocator_installed() {
        return Err("pfnstore_core::testing::CountingAllocator is not the global allocator".into());
    }
    let geometry = Geometry::X86_64;
    let chunk = geometry.chunk_pages();
    let pages = gib * chunk;
    let per_gib = |bytes: i64| bytes as f64 / gib as f64;
    // The struct-page array's bytes per GiB do not depend on its size or content: measure 1 GiB.
    let struct_page = {
        let before = live();
        // black_box: an array nobody reads is an allocation the optimiser may leave out.
        let array = black_box(StructPageArray::new(geometry, chunk));
        let bytes = live() - before;
        drop(array);
        bytes as f64
    };
    // The baselines' change reports go here; allocated before any measurement starts.
    let mut changes = Vec::with_capacity(8);
    let mut rows = Vec::with_capacity(FRAGMENTATIONS.len());
    for (per_million, label) in FRAGMENTATIONS {
        let converted = random_pages(pages, per_million, 0x5eed + per_million);

        let before = live();
        let ours = black_box(store(geometry, gib));
        for &p in &converted {
            let page = PfnRange::page(Pfn(p)).expect("a page");
            drop(
                ours.set_shareability(page, Shareability::Private)
                    .map_err(|e| format!("converting PFN {p}: {e}"))?,
            );
        }
        let pfnstore = per_gib(live() - before);
        let reported = per_gib(ours.stats().bytes as i64);
        drop(ours);
        if reported != pfnstore {
            return Err(format!(
                "at {label}: the store reports {reported} bytes per GiB, the heap shows {pfnstore}"
            ));
        }

        let before = live();
        let bitmap = black_box(BitmapTracker::new(geometry, pages));
        for &p in &converted {
            bitmap.convert(p, p + 1, true, &mut changes);
            changes.clear();
        }
        let bitmap_bytes = per_gib(live() - before);
        drop(bitmap);

        let before = live();
        let rmap = black_box(RangeMapTracker::new(geometry));
        for &p in &converted {
            rmap.convert(p, p + 1, true, &mut changes);
            changes.clear();
        }
        let rangemap = per_gib(live() - before);
        drop(rmap);

        rows.push(BytesPerGib {
            label,
            per_million,
            pfnstore,
            bitmap: bitmap_bytes,
            rangemap,
            struct_page,
        });
    }
    Ok(rows)
}
