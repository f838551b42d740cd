//! loom models of the allocator (issue 7, models 1 and 2).
//!
//! Each thread claims every page it is handed in a per-page ownership array with a
//! compare-and-swap, so "no PFN is ever owned twice" is checked at the moment of handing
//! out, in every interleaving; after the join the accounting must be exact and
//! `check_invariants` must hold.
//!
//! Showing that the models can fail: built with the test-only mutation
//! `--cfg pfnstore_loom_mutation="allocator_split_alloc"`, the allocator chooses a placement
//! under one lock acquisition and takes it under another. Models 1 and 2 then must find an
//! interleaving in which two threads get the same page; under that cfg they are
//! `should_panic(expected = "owned twice")`, so they pass only if loom reports it:
//!
//! ```text
//! RUSTFLAGS='--cfg pfnstore_loom --cfg pfnstore_loom_mutation="allocator_split_alloc"' \
//!     cargo test --release --target-dir target/loom-mutation -p pfnstore-loom-tests --test allocator
//! ```
//!
//! With `allocator_racy_lock` the shard lock's uncontended path tests with a load and takes
//! with a plain store (instead of one compare-and-swap): two threads then run a shard's
//! critical section at once, and loom's checked cell reports it ("Causality violation") in
//! models 1, 2 and 9. `scripts/test-all.sh` builds each allocator mutation on its own, so that
//! each one's own failure is what the models must find.
#![cfg(pfnstore_loom)]

use pfnstore_allocator::{AllocRequest, Allocator, AllocatorConfig, ShardHint, ShardId};
use pfnstore_core::sync::atomic::{AtomicUsize, Ordering};
use pfnstore_core::sync::{Arc, thread};
use pfnstore_core::{Geometry, Pfn, PfnRange};
use pfnstore_loom_tests::model_builder;

/// 2-page mid blocks, 4-page chunks.
fn tiny() -> Geometry {
    Geometry::new(1, 2).expect("1 < 2 <= 30")
}

const PAGES: usize = 8;

struct Owners([AtomicUsize; PAGES]);

impl Owners {
    fn new() -> Owners {
        Owners(std::array::from_fn(|_| AtomicUsize::new(0)))
    }
    fn claim(&self, r: PfnRange, me: usize) {
        for p in r.pfns() {
            let prev =
                self.0[p.0 as usize].compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst);
            assert!(prev.is_ok(), "{p:?} owned twice: by {me} and {prev:?}");
        }
    }
    fn release(&self, r: PfnRange, me: usize) {
        for p in r.pfns() {
            let prev =
                self.0[p.0 as usize].compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
            assert!(prev.is_ok(), "{p:?} released by {me} but owned by {prev:?}");
        }
    }
}

fn two_shards() -> Allocator {
    Allocator::new(AllocatorConfig::new(tiny(), 2)).expect("two shards are a valid configuration")
}

/// Model 1: two threads allocate and free on the same shard (one of them frees and
/// allocates again). No page is owned twice; afterwards allocated pages equal what the
/// threads still hold and the invariants hold.
#[test]
#[cfg_attr(
    all(
        pfnstore_loom_mutation = "allocator_split_alloc",
        not(pfnstore_loom_mutation = "allocator_racy_lock")
    ),
    should_panic(expected = "owned twice")
)]
#[cfg_attr(
    pfnstore_loom_mutation = "allocator_racy_lock",
    should_panic(expected = "Causality violation")
)]
fn alloc_and_free_on_one_shard() {
    model_builder().check(|| {
        let alloc = Arc::new(two_shards());
        alloc.add_chunk_to(Pfn(0), true, ShardId(0)).unwrap();
        let owners = Arc::new(Owners::new());
        let only0 = ShardHint::Only(ShardId(0));
        let t1 = {
            let (alloc, owners) = (alloc.clone(), owners.clone());
            thread::spawn(move || {
                let a = alloc.alloc(AllocRequest::new(2).hint(only0)).unwrap();
                owners.claim(a.range, 1);
                owners.release(a.range, 1);
                alloc.free(a.range).unwrap();
                let b = alloc.alloc(AllocRequest::new(1).hint(only0)).unwrap();
                owners.claim(b.range, 1);
                b.range
            })
        };
        let c = alloc.alloc(AllocRequest::new(1).hint(only0)).unwrap();
        owners.claim(c.range, 2);
        let b = t1.join().unwrap();
        let s = alloc.stats();
        assert_eq!(s.shards[0].allocated_pages, 2, "accounting after join");
        assert_eq!(s.total.free_pages + s.total.allocated_pages, 4);
        alloc.check_invariants().unwrap();
        alloc.free(b).unwrap();
        alloc.free(c.range).unwrap();
        assert_eq!(alloc.stats().total.free_pages, 4);
    });
}

/// Model 2: shard 1 starts full. One thread asks for a page starting at shard 1 and steals
/// from shard 0 unless the other thread's cross-shard free of shard 1's chunk lands first;
/// the other thread frees that chunk (from whatever its home shard is) and allocates from
/// shard 0. No page is owned twice; accounting is exact after join.
#[test]
#[cfg_attr(
    all(
        pfnstore_loom_mutation = "allocator_split_alloc",
        not(pfnstore_loom_mutation = "allocator_racy_lock")
    ),
    should_panic(expected = "owned twice")
)]
#[cfg_attr(
    pfnstore_loom_mutation = "allocator_racy_lock",
    should_panic(expected = "Causality violation")
)]
fn stealing_and_cross_shard_free() {
    model_builder().check(|| {
        let alloc = Arc::new(two_shards());
        alloc.add_chunk_to(Pfn(0), true, ShardId(0)).unwrap();
        alloc.add_chunk_to(Pfn(4), true, ShardId(1)).unwrap();
        let full = alloc
            .alloc_at(PfnRange::from_len(Pfn(4), 4).unwrap())
            .unwrap();
        let owners = Arc::new(Owners::new());
        owners.claim(full.range, 3);
        owners.release(full.range, 3); // handed to the freeing thread below
        let stealer = {
            let (alloc, owners) = (alloc.clone(), owners.clone());
            thread::spawn(move || {
                let a = alloc
                    .alloc(AllocRequest::new(1).hint(ShardHint::Shard(ShardId(1))))
                    .unwrap();
                owners.claim(a.range, 1);
                a
            })
        };
        let freer = {
            let (alloc, owners) = (alloc.clone(), owners.clone());
            thread::spawn(move || {
                alloc.free(full.range).unwrap();
                let b = alloc
                    .alloc(AllocRequest::new(1).hint(ShardHint::Shard(ShardId(0))))
                    .unwrap();
                owners.claim(b.range, 2);
                b
            })
        };
        let a = stealer.join().unwrap();
        let b = freer.join().unwrap();
        assert_eq!(
            b.shard,
            ShardId(0),
            "shard 0 always has room for the second thread"
        );
        let s = alloc.stats();
        assert_eq!(s.total.allocated_pages, 2, "accounting after join");
        assert_eq!(s.total.free_pages, 6);
        assert_eq!(
            s.shards[a.shard.0].allocated_pages + s.shards[1 - a.shard.0].allocated_pages,
            2
        );
        alloc.check_invariants().unwrap();
    });
}

/// Model 9: the shard lock. Two threads free pages of one shard at once while one of them
/// also allocates; loom's checked cell around the shard sees every access, so two threads
/// inside one shard's critical section at once fail the model. Afterwards the accounting is
/// exact.
#[test]
#[cfg_attr(
    pfnstore_loom_mutation = "allocator_racy_lock",
    should_panic(expected = "Causality violation")
)]
fn frees_on_one_shard_are_serialised() {
    model_builder().check(|| {
        let alloc = Arc::new(two_shards());
        alloc.add_chunk_to(Pfn(0), true, ShardId(0)).unwrap();
        let only0 = ShardHint::Only(ShardId(0));
        let a = alloc.alloc(AllocRequest::new(1).hint(only0)).unwrap();
        let b = alloc.alloc(AllocRequest::new(2).hint(only0)).unwrap();
        let other = {
            let alloc = alloc.clone();
            thread::spawn(move || {
                alloc.free(b.range).unwrap();
                alloc.alloc(AllocRequest::new(1).hint(only0)).unwrap().range
            })
        };
        alloc.free(a.range).unwrap();
        let c = other.join().unwrap();
        let s = alloc.stats();
        assert_eq!(
            (s.total.allocated_pages, s.total.free_pages),
            (1, 3),
            "accounting after join"
        );
        alloc.check_invariants().unwrap();
        alloc.free(c).unwrap();
    });
}
