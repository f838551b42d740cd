//! The allocator's heap never exceeds a per-frame bitmap's order of cost (64 KiB per GiB:
//! two bits per 4 KiB frame) and is about nothing for free or huge-page-allocated memory,
//! measured with the counting allocator in the states of benches/RESULTS.md's allocator table.
#![cfg(not(pfnstore_loom))]

use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig};
use pfnstore_core::testing::{CountingAllocator, XorShift};
use pfnstore_core::{Geometry, Pfn, PfnRange};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const GIB: u64 = 4;
const C: u64 = 1 << 18;

fn kib_per_gib(bytes: i64) -> f64 {
    bytes as f64 / GIB as f64 / 1024.0
}

#[test]
fn metadata_stays_within_two_bits_per_frame() {
    let frames = GIB * C;
    // The test's own vectors first, so that every later difference is the allocator's.
    let mut slots: Vec<Option<PfnRange>> = vec![None; frames as usize];
    let mut order: Vec<usize> = (0..frames as usize).collect();
    let mut rng = XorShift::new(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let before = CountingAllocator::live_bytes();
    let a = Allocator::new(AllocatorConfig::new(Geometry::X86_64, 1)).unwrap();
    for c in 0..GIB {
        a.add_chunk(Pfn(c * C), true).unwrap();
    }
    let live = || kib_per_gib(CountingAllocator::live_bytes() - before);
    assert!(live() < 1.0, "empty: {} KiB per GiB", live());
    let mut n = 0;
    while let Ok(x) = a.alloc(AllocRequest::new(1)) {
        slots[x.range.start().0 as usize] = Some(x.range);
        n += 1;
    }
    assert_eq!(n, frames);
    let all_4k = live();
    assert!(all_4k <= 64.0, "all in 4K frames: {all_4k} KiB per GiB");
    for &i in &order[..frames as usize / 2] {
        a.free(slots[i].take().unwrap()).unwrap();
    }
    let half = live();
    assert!(half <= 64.0, "a random half freed: {half} KiB per GiB");
    for s in slots.iter_mut() {
        if let Some(r) = s.take() {
            a.free(r).unwrap();
        }
    }
    // What is left: the marks of chunks that were split (0.4 KiB each) and the page index of
    // the chunk that holds the shard's cursor block (4 KiB, once per shard).
    let freed = live();
    assert!(freed < 3.0, "all freed again: {freed} KiB per GiB");
    drop(slots);
    let base = CountingAllocator::live_bytes();
    let twos: Vec<PfnRange> = (0..frames / 512)
        .map(|_| a.alloc(AllocRequest::new(512).aligned(512)).unwrap().range)
        .collect();
    let vec_bytes = (twos.capacity() * size_of::<PfnRange>()) as i64;
    let huge = kib_per_gib(CountingAllocator::live_bytes() - base - vec_bytes) + freed;
    assert!(huge < 3.0, "all in 2M blocks: {huge} KiB per GiB");
    eprintln!(
        "KiB per GiB: all 4K {all_4k:.2}, random half freed {half:.2}, all freed {freed:.2}, all 2M {huge:.2}"
    );
}

/// The costliest state there is: every 2 MiB block of every chunk mixed *and* needing its
/// second bitmap (`S`), here through a two-page allocation in each block with the rest of
/// the block free and clean. Two bits per frame are 64 KiB per GiB, the least that exact
/// per-page state (free clean, free dirty, allocation start, allocation continued) can cost;
/// the six marks per block (0.375 KiB) and each chunk's tables of bitmap groups come on top,
/// under 1 KiB per GiB together (IMPLEMENTATION.md, "Memory").
#[test]
fn the_worst_state_costs_two_bits_per_frame_and_the_block_marks() {
    const BLOCK: u64 = 512;
    let before = CountingAllocator::live_bytes();
    let a = Allocator::new(AllocatorConfig::new(Geometry::X86_64, 1)).unwrap();
    for c in 0..GIB {
        a.add_chunk(Pfn(c * C), false).unwrap();
    }
    for block in 0..GIB * C / BLOCK {
        // Two pages in the middle of the block: an allocation that is not one page, with
        // clean free pages on both sides.
        let at = Pfn(block * BLOCK + 100);
        a.alloc_at(PfnRange::from_len(at, 2).unwrap()).unwrap();
    }
    a.check_invariants().unwrap();
    let worst = kib_per_gib(CountingAllocator::live_bytes() - before);
    let floor = 64.0;
    let beyond = 1.0;
    eprintln!("KiB per GiB, every block mixed with S: {worst:.3} (two bits per frame: {floor})");
    assert!(
        worst > floor,
        "the state under test is not the worst one: {worst} KiB per GiB"
    );
    assert!(
        worst <= floor + beyond,
        "every block mixed with S: {worst} KiB per GiB, more than two bits per frame and the marks"
    );
}
