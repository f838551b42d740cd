//! Threads allocate, free, punch holes, free each other's ranges (cross-shard) and steal,
//! for a bounded number of operations. A per-page ownership array, claimed with a
//! compare-and-swap on every successful allocation, proves that no page was ever handed to
//! two owners at once; afterwards the invariants and the accounting must be exact.
#![cfg(not(pfnstore_loom))]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig, ShardHint, ShardId};
use pfnstore_core::testing::XorShift;
use pfnstore_core::{Geometry, Pfn, PfnRange};

const THREADS: u32 = 6;
const OPS: u32 = 40_000;
const CHUNKS: u64 = 24;

struct Owners(Vec<AtomicU32>);

impl Owners {
    fn claim(&self, r: PfnRange, me: u32) {
        for p in r.pfns() {
            let prev =
                self.0[p.0 as usize].compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst);
            assert!(
                prev.is_ok(),
                "{p:?} handed to {me} while owned by {:?}",
                prev
            );
        }
    }
    fn release(&self, r: PfnRange, me: u32) {
        for p in r.pfns() {
            let prev =
                self.0[p.0 as usize].compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
            assert!(
                prev.is_ok(),
                "{p:?} released by {me} but owned by {:?}",
                prev
            );
        }
    }
}

#[test]
fn threads_never_share_a_page_and_accounting_is_exact() {
    let geometry = Geometry::new(3, 7).unwrap(); // 8-page mid blocks, 128-page chunks
    let (mid, chunk) = (geometry.mid_pages(), geometry.chunk_pages());
    let alloc = Arc::new(Allocator::new(AllocatorConfig::new(geometry, 3)).unwrap());
    // Uneven shards (shard 2 gets few chunks) so that threads homed there must steal.
    for c in 0..CHUNKS {
        let shard = ShardId(if c % 8 == 7 { 2 } else { (c % 2) as usize });
        alloc
            .add_chunk_to(Pfn(c * chunk), c % 3 == 0, shard)
            .unwrap();
    }
    let owners = Arc::new(Owners(
        (0..CHUNKS * chunk).map(|_| AtomicU32::new(0)).collect(),
    ));
    // Ranges one thread hands to another to free (cross-shard frees).
    let mailbox: Arc<Mutex<Vec<(PfnRange, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    // All threads start together, so that they interleave rather than run one after another.
    let start = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (1..=THREADS)
        .map(|me| {
            let (alloc, owners, mailbox) = (alloc.clone(), owners.clone(), mailbox.clone());
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut rng = XorShift::new(0x1234_5678_9abc_def0 ^ u64::from(me) << 32);
                let mut held: Vec<PfnRange> = Vec::new();
                let mut stats = [0u64; 5];
                for op in 0..OPS {
                    if op % 64 == 0 {
                        // There are more threads than cores: without this, a thread can do all
                        // its operations in one time slice and the threads barely interleave
                        // (no range posted by one is freed by another).
                        thread::yield_now();
                    }
                    let roll = rng.next_u64() % 100;
                    if roll < 45 || held.is_empty() {
                        let (pages, align) = match rng.next_u64() % 4 {
                            0 => (mid, mid),
                            1 => (1 + rng.next_u64() % 20, 1),
                            2 => (chunk, chunk),
                            _ => (1, 1),
                        };
                        let hint = match rng.next_u64() % 4 {
                            0 => ShardHint::Shard(ShardId(2)),
                            _ => ShardHint::Home,
                        };
                        match alloc.alloc(AllocRequest::new(pages).aligned(align).hint(hint)) {
                            Ok(a) => {
                                owners.claim(a.range, me);
                                held.push(a.range);
                                stats[0] += 1;
                                if hint == ShardHint::Shard(ShardId(2)) && a.shard != ShardId(2) {
                                    stats[4] += 1; // stolen from another shard
                                }
                            }
                            Err(_) => {
                                // Memory is full. If much of it waits in the mailbox (a thread
                                // that ran alone for a while posted its ranges there), free one
                                // posted range, so that no thread starves on an empty `held`.
                                let taken = {
                                    let mut mb = mailbox.lock().unwrap();
                                    let j = mb.iter().position(|&(_, from)| from != me);
                                    j.or((!mb.is_empty()).then_some(0))
                                        .map(|j| mb.swap_remove(j))
                                };
                                if let Some((r, from)) = taken {
                                    alloc.free(r).unwrap();
                                    if from != me {
                                        stats[3] += 1;
                                    }
                                }
                            }
                        }
                    } else if roll < 75 {
                        let r = held.swap_remove((rng.next_u64() as usize) % held.len());
                        owners.release(r, me);
                        alloc.free(r).unwrap();
                        stats[1] += 1;
                    } else if roll < 90 {
                        // Punch a hole in the middle of a held range.
                        let i = (rng.next_u64() as usize) % held.len();
                        let r = held[i];
                        if r.len() >= 3 {
                            let hole = PfnRange::from_len(
                                Pfn(r.start().0 + 1),
                                1 + rng.next_u64() % (r.len() - 2),
                            )
                            .unwrap();
                            owners.release(hole, me);
                            alloc.free(hole).unwrap();
                            held[i] = PfnRange::new(r.start(), hole.start()).unwrap();
                            if hole.end() < r.end() {
                                held.push(PfnRange::new(hole.end(), r.end()).unwrap());
                            }
                            stats[2] += 1;
                        }
                    } else {
                        // Hand a range to whoever frees next; free one handed to us.
                        let i = (rng.next_u64() as usize) % held.len();
                        let r = held.swap_remove(i);
                        owners.release(r, me);
                        let taken = {
                            let mut mb = mailbox.lock().unwrap();
                            mb.push((r, me));
                            mb.iter()
                                .position(|&(_, from)| from != me)
                                .map(|j| mb.swap_remove(j))
                        };
                        if let Some((r, _)) = taken {
                            alloc.free(r).unwrap();
                            stats[3] += 1;
                        }
                    }
                }
                for r in &held {
                    owners.release(*r, me);
                }
                (held, stats)
            })
        })
        .collect();
    let mut outstanding: Vec<PfnRange> = Vec::new();
    let mut totals = [0u64; 5];
    for h in handles {
        let (held, stats) = h.join().unwrap();
        outstanding.extend(held);
        for (t, s) in totals.iter_mut().zip(stats) {
            *t += s;
        }
    }
    outstanding.extend(mailbox.lock().unwrap().drain(..).map(|(r, _)| r));
    eprintln!("allocs, frees, holes, cross-thread frees, steals: {totals:?}");
    assert!(
        totals.iter().all(|&t| t > 100),
        "every kind of operation ran: {totals:?}"
    );
    alloc.check_invariants().unwrap();
    let s = alloc.stats().total;
    assert_eq!(
        s.allocated_pages,
        outstanding.iter().map(PfnRange::len).sum::<u64>()
    );
    assert_eq!(s.free_pages + s.allocated_pages, CHUNKS * chunk);
    for r in outstanding {
        alloc.free(r).unwrap();
    }
    let s = alloc.stats().total;
    assert_eq!(
        (s.free_pages, s.allocated_pages, s.free_chunks),
        (CHUNKS * chunk, 0, CHUNKS)
    );
    alloc.check_invariants().unwrap();
}

/// Interleaved sizes and random-order frees: threads (more than shards) allocate runs of 4K
/// frames interleaved with 2M blocks and small multi-page ranges until they hold a share of
/// memory, then free everything in a random order, several rounds. Pages are claimed in the
/// ownership array as above; after every round of every thread the memory must come back to
/// whole free chunks, with exact accounting.
#[test]
fn interleaved_sizes_and_random_order_frees() {
    const THREADS: u32 = 4;
    const ROUNDS: u32 = 6;
    let geometry = Geometry::new(4, 9).unwrap(); // 16-page mid blocks, 512-page chunks
    let (mid, chunk) = (geometry.mid_pages(), geometry.chunk_pages());
    let chunks = 8;
    let alloc = Arc::new(Allocator::new(AllocatorConfig::new(geometry, 2)).unwrap());
    for c in 0..chunks {
        alloc.add_chunk(Pfn(c * chunk), c % 2 == 0).unwrap();
    }
    let owners = Arc::new(Owners(
        (0..chunks * chunk).map(|_| AtomicU32::new(0)).collect(),
    ));
    let start = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (1..=THREADS)
        .map(|me| {
            let (alloc, owners, start) = (alloc.clone(), owners.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut rng = XorShift::new(0xfeed_0000 + u64::from(me));
                let share = chunks * chunk / u64::from(THREADS) / 2;
                for _ in 0..ROUNDS {
                    let mut held: Vec<PfnRange> = Vec::new();
                    let mut pages = 0;
                    while pages < share {
                        let (n, align) = match rng.below(16) {
                            0 => (mid, mid),
                            1 => (2 + rng.below(5), 1),
                            _ => (1, 1),
                        };
                        match alloc.alloc(AllocRequest::new(n).aligned(align)) {
                            Ok(a) => {
                                owners.claim(a.range, me);
                                pages += n;
                                held.push(a.range);
                            }
                            Err(_) => break,
                        }
                        if held.len().is_multiple_of(32) {
                            thread::yield_now();
                        }
                    }
                    // Free in a random order.
                    while !held.is_empty() {
                        let r = held.swap_remove(rng.below(held.len() as u64) as usize);
                        owners.release(r, me);
                        alloc.free(r).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    alloc.check_invariants().unwrap();
    let s = alloc.stats().total;
    // The two shards own alternate chunks, so no two free chunks of one shard touch.
    assert_eq!(
        (
            s.free_pages,
            s.allocated_pages,
            s.free_chunks,
            s.free_extents
        ),
        (chunks * chunk, 0, chunks, chunks),
        "everything free again, as whole chunks"
    );
    assert_eq!(s.free_mid_blocks, chunks * chunk / mid);
}
