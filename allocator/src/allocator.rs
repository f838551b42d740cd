//! The sharded allocator: which shard a request goes to, stealing, and the chunk table.

use std::collections::HashMap;

use pfnstore_core::sync::atomic::{AtomicU64, Ordering};
use pfnstore_core::sync::{CachePadded, RwLock, current_thread_index};
use pfnstore_core::{Geometry, Pfn, PfnRange, RangeError};

use crate::lock::ShardLock;
use crate::shape::Shape;
use crate::shard::{Fault, HotFree, ShardState};
use crate::stats::{AllocatorStats, Usage};
use crate::{AllocError, AllocRequest, Allocation, DirtyRanges, ShardHint, ShardId};

/// How an [`Allocator`] is set up ([`AllocatorConfig::new`]).
///
/// Deliberately exhaustive, unlike the facade's option types: the geometry and the shard
/// count are the whole of an allocator's shape (policy lives in requests), and comparison
/// harnesses outside the workspace build it as a literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Block sizes; the chunk size is the unit in which memory is added and removed.
    pub geometry: Geometry,
    /// Number of shards (independent locks); at least 1. A few per NUMA node, or one per
    /// few CPUs, is typical.
    pub shards: usize,
}

impl AllocatorConfig {
    /// An allocator of `geometry`'s blocks over `shards` shards.
    pub fn new(geometry: Geometry, shards: usize) -> AllocatorConfig {
        AllocatorConfig { geometry, shards }
    }
}

#[derive(Debug)]
struct Shard {
    state: ShardLock<ShardState>,
    /// Pages in the shard's chunks. Written under `state`'s lock; read without it to pick a
    /// shard for a new chunk and to reject requests that no shard can ever hold.
    pages: AtomicU64,
}

/// A lock-sharded allocator of PFN ranges over chunks. `Send + Sync`: share it with `Arc`.
///
/// See the crate documentation for the concepts and the placement rules.
#[derive(Debug)]
pub struct Allocator {
    geometry: Geometry,
    shape: Shape,
    shards: Box<[CachePadded<Shard>]>,
    /// Chunk index -> owning shard. Only `add_chunk`/`remove_chunk` write it; operations on
    /// a range read it only when the range is not in the calling thread's home shard. It is
    /// never held together with a shard lock.
    owners: RwLock<HashMap<u64, ShardId>>,
}

impl Allocator {
    /// An allocator with no memory yet; add chunks with [`Allocator::add_chunk`].
    pub fn new(config: AllocatorConfig) -> Result<Allocator, AllocError> {
        if config.shards == 0 {
            return Err(AllocError::NoShards);
        }
        let shape = Shape::new(&config.geometry);
        let shards = (0..config.shards)
            .map(|_| {
                CachePadded::new(Shard {
                    state: ShardLock::new(ShardState::new(shape)),
                    pages: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Allocator {
            geometry: config.geometry,
            shape,
            shards,
            owners: RwLock::new(HashMap::new()),
        })
    }

    /// The geometry the allocator was built with.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The calling thread's home shard.
    pub fn home_shard(&self) -> ShardId {
        ShardId(self.home())
    }

    fn home(&self) -> usize {
        let shards = self.shards.len();
        if shards == 1 {
            0
        } else if shards.is_power_of_two() {
            // The same answer as `%` without a division on every operation.
            current_thread_index() & (shards - 1)
        } else {
            current_thread_index() % shards
        }
    }

    fn check_shard(&self, shard: ShardId) -> Result<usize, AllocError> {
        if shard.0 < self.shards.len() {
            Ok(shard.0)
        } else {
            Err(AllocError::NoSuchShard { shard })
        }
    }

    fn check_chunk_base(&self, base: Pfn) -> Result<(), AllocError> {
        let chunk = self.shape.chunk;
        if !base.is_aligned_to(chunk) {
            return Err(RangeError::Unaligned {
                pfn: base,
                align_pages: chunk,
            }
            .into());
        }
        PfnRange::from_len(base, chunk)?;
        Ok(())
    }

    /// Adds the chunk starting at `base` to the shard with the fewest pages (the lowest such
    /// shard on a tie) and returns it. `dirty` says whether its contents must be scrubbed
    /// before use. Fails if `base` is not chunk-aligned or the chunk is already managed.
    ///
    /// Chunks of different shards are never merged into one free run, so a request longer
    /// than a chunk needs adjacent chunks in one shard: use [`Allocator::add_chunk_to`].
    pub fn add_chunk(&self, base: Pfn, dirty: bool) -> Result<ShardId, AllocError> {
        let target = (0..self.shards.len())
            .min_by_key(|&i| self.shards[i].pages.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.add_chunk_to(base, dirty, ShardId(target))?;
        Ok(ShardId(target))
    }

    /// Adds the chunk starting at `base` to `shard` (NUMA placement).
    pub fn add_chunk_to(&self, base: Pfn, dirty: bool, shard: ShardId) -> Result<(), AllocError> {
        let index = self.check_shard(shard)?;
        self.check_chunk_base(base)?;
        {
            // Reserve the chunk in the table first: that is where overlap is decided.
            let mut owners = self.owners.write();
            let chunk = self.geometry.chunk_index(base);
            if owners.contains_key(&chunk) {
                return Err(AllocError::Overlap { pfn: base });
            }
            owners.insert(chunk, shard);
        }
        let target = &self.shards[index];
        target.state.with(|state| {
            state.add_chunk(base.0, dirty);
            target.pages.fetch_add(self.shape.chunk, Ordering::Relaxed);
        });
        Ok(())
    }

    /// Removes the chunk starting at `base`, which must be wholly free (and not quarantined).
    pub fn remove_chunk(&self, base: Pfn) -> Result<(), AllocError> {
        self.check_chunk_base(base)?;
        let ((), shard) = self.on_owner(base, |state| state.remove_chunk(base.0))?;
        self.shards[shard.0]
            .pages
            .fetch_sub(self.shape.chunk, Ordering::Relaxed);
        self.owners.write().remove(&self.geometry.chunk_index(base));
        Ok(())
    }

    /// Allocates a range as `request` says. Tries the hinted shard first, then (unless the
    /// hint is [`ShardHint::Only`]) every other shard in turn, one lock at a time.
    #[inline(always)]
    pub fn alloc(&self, request: AllocRequest) -> Result<Allocation, AllocError> {
        // Inlined into the caller, so that the allocation is built in the caller's registers
        // from the hot path's two-register answer (IMPLEMENTATION.md, "Hot paths").
        #[cfg(not(pfnstore_loom_mutation = "allocator_split_alloc"))]
        if request.hint == ShardHint::Home {
            let index = self.home();
            let hot = self.shards[index].state.with(|state| {
                state.alloc_hot(request.pages, request.align_pages, request.clean_only)
            });
            if let Some((start, clean)) = hot {
                return Ok(Allocation::hot(start, request.pages, ShardId(index), clean));
            }
        }
        self.alloc_general(request)
    }

    /// [`Allocator::alloc`] when the hot path does not apply: validation, every shard in
    /// turn, every placement rule.
    fn alloc_general(&self, request: AllocRequest) -> Result<Allocation, AllocError> {
        let AllocRequest {
            pages,
            align_pages,
            clean_only,
            hint,
        } = request;
        if pages == 0 {
            return Err(AllocError::ZeroPages);
        }
        if !align_pages.is_power_of_two() || align_pages > self.shape.chunk {
            return Err(AllocError::BadAlignment { align_pages });
        }
        let (first, tries) = match hint {
            ShardHint::Home => (self.home(), self.shards.len()),
            ShardHint::Shard(s) => (self.check_shard(s)?, self.shards.len()),
            ShardHint::Only(s) => (self.check_shard(s)?, 1),
        };
        for step in 0..tries {
            // `(first + step) % shards`, without a division: both terms are below `shards`.
            let index = match first + step {
                i if i >= self.shards.len() => i - self.shards.len(),
                i => i,
            };
            if let Some((range, dirty)) = self.alloc_in(index, pages, align_pages, clean_only) {
                return Ok(Allocation {
                    range,
                    shard: ShardId(index),
                    dirty,
                });
            }
        }
        // Only now, off the hot path: could any shard ever have held the request?
        let largest_shard_pages = self
            .shards
            .iter()
            .map(|s| s.pages.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        if pages > largest_shard_pages {
            return Err(AllocError::TooLarge {
                pages,
                largest_shard_pages,
            });
        }
        Err(AllocError::OutOfMemory { pages, align_pages })
    }

    #[cfg(not(pfnstore_loom_mutation = "allocator_split_alloc"))]
    fn alloc_in(
        &self,
        index: usize,
        pages: u64,
        align: u64,
        clean_only: bool,
    ) -> Option<(PfnRange, DirtyRanges)> {
        self.shards[index]
            .state
            .with(|state| state.alloc(pages, align, clean_only))
    }

    /// The mutation the loom models must catch: the placement is chosen under one lock
    /// acquisition and taken under another, so two threads can take the same range.
    #[cfg(pfnstore_loom_mutation = "allocator_split_alloc")]
    fn alloc_in(
        &self,
        index: usize,
        pages: u64,
        align: u64,
        clean_only: bool,
    ) -> Option<(PfnRange, DirtyRanges)> {
        let start = self.shards[index]
            .state
            .with(|state| state.place(pages, align, clean_only))?;
        Some(
            self.shards[index]
                .state
                .with(|state| state.carve_unchecked(start, start + pages)),
        )
    }

    /// Claims exactly `range`, which must be free and in one shard (to restore a saved state).
    pub fn alloc_at(&self, range: PfnRange) -> Result<Allocation, AllocError> {
        let (dirty, shard) = self.on_owner(range.start(), |state| state.alloc_at(range))?;
        Ok(Allocation {
            range,
            shard,
            dirty,
        })
    }

    /// Gives back an allocation or any part of one (punching a hole). The pages become free
    /// and dirty. Fails, changing nothing, if any page is not part of that one allocation.
    #[inline(always)]
    pub fn free(&self, range: PfnRange) -> Result<(), AllocError> {
        let home = self.home();
        let (start, end) = (range.start().0, range.end().0);
        match self.shards[home]
            .state
            .with(|state| state.free_hot(start, end))
        {
            HotFree::Done => Ok(()),
            HotFree::General => self.free_general(range),
            HotFree::NotOwned => self.free_elsewhere(range, home),
        }
    }

    /// [`Allocator::free`] of a range that starts in the home shard but is not for the hot
    /// path: validation, several blocks or chunks, quarantine.
    fn free_general(&self, range: PfnRange) -> Result<(), AllocError> {
        self.on_owner(range.start(), |state| state.free(range))
            .map(|_| ())
    }

    /// [`Allocator::free`] of a range that does not start in the home shard: straight to the
    /// owner the chunk table names (the home shard has said no already).
    fn free_elsewhere(&self, range: PfnRange, home: usize) -> Result<(), AllocError> {
        let op = |state: &mut ShardState| state.free(range);
        self.follow_owner(range.start(), op, home, Err(Fault::StartNotOwned))
            .map(|_| ())
    }

    /// Gives `allocation` back exactly as [`Allocator::alloc`] handed it out: its pages become
    /// free, its dirty sub-ranges dirty and the rest clean again, so that a caller that could not
    /// use the memory (and wrote nothing to it) leaves the accounting as it found it. Freeing
    /// and then marking the clean parts clean does the same in two steps, with a window in
    /// which another thread can take the clean pages as dirty ones. The clean parts are taken
    /// on the caller's word: pass the allocation unchanged, and only if nothing was written to
    /// its memory. Fails, changing nothing, as [`Allocator::free`] of the range would.
    pub fn cancel(&self, allocation: &Allocation) -> Result<(), AllocError> {
        let (range, dirty) = (allocation.range, &allocation.dirty);
        self.on_owner(range.start(), |state| state.cancel(range, dirty))
            .map(|_| ())
    }

    /// Records that the caller scrubbed the free pages of `range`: clean-only requests may
    /// take them. Every page must be free.
    pub fn mark_clean(&self, range: PfnRange) -> Result<(), AllocError> {
        self.on_owner(range.start(), |state| state.mark_clean(range))
            .map(|_| ())
    }

    /// Takes allocated pages (an allocation or part of one) out of use for good, e.g. after a
    /// failed unmap. They stay accounted as quarantined and are never handed out again.
    pub fn quarantine(&self, range: PfnRange) -> Result<(), AllocError> {
        self.on_owner(range.start(), |state| state.quarantine(range))
            .map(|_| ())
    }

    /// Runs `op` on the shard that owns `first`: the calling thread's home shard if it does
    /// (no table lookup on the common path), else the owner the chunk table names. Never
    /// holds two locks at once.
    fn on_owner<T>(
        &self,
        first: Pfn,
        mut op: impl FnMut(&mut ShardState) -> Result<T, Fault>,
    ) -> Result<(T, ShardId), AllocError> {
        let home = self.home();
        let outcome = self.shards[home].state.with(&mut op);
        self.follow_owner(first, op, home, outcome)
    }

    /// The rest of [`Allocator::on_owner`]: `outcome` is what shard `tried` answered.
    fn follow_owner<T>(
        &self,
        first: Pfn,
        mut op: impl FnMut(&mut ShardState) -> Result<T, Fault>,
        mut tried: usize,
        mut outcome: Result<T, Fault>,
    ) -> Result<(T, ShardId), AllocError> {
        // The table may change under us (a chunk removed and re-added elsewhere): follow it
        // until the shard it names says the same as the last one.
        while matches!(outcome, Err(Fault::StartNotOwned)) {
            let owner = self
                .owners
                .read()
                .get(&self.geometry.chunk_index(first))
                .copied();
            match owner {
                Some(s) if s.0 != tried => {
                    tried = s.0;
                    outcome = self.shards[tried].state.with(&mut op);
                }
                _ => break,
            }
        }
        match outcome {
            Ok(value) => Ok((value, ShardId(tried))),
            Err(Fault::Rejected(e)) => Err(e),
            Err(Fault::StartNotOwned) => Err(AllocError::NotManaged { pfn: first }),
            Err(Fault::Outside(pfn)) => {
                let managed = self
                    .owners
                    .read()
                    .contains_key(&self.geometry.chunk_index(Pfn(pfn)));
                Err(if managed {
                    AllocError::CrossesShards { pfn: Pfn(pfn) }
                } else {
                    AllocError::NotManaged { pfn: Pfn(pfn) }
                })
            }
        }
    }

    /// Usage of each shard and in total. Shards are read one after another, so the total
    /// is a consistent snapshot only while no other thread changes the allocator.
    pub fn stats(&self) -> AllocatorStats {
        let shards: Vec<Usage> = self
            .shards
            .iter()
            .map(|s| s.state.with(|state| state.usage()))
            .collect();
        let mut total = Usage::default();
        for s in &shards {
            total.absorb(s);
        }
        AllocatorStats { shards, total }
    }

    /// Verifies every invariant: in each shard, free, allocated and quarantined runs tile its
    /// chunks exactly, clean runs are free, and the search indexes and counters are right;
    /// the chunk table names exactly the chunks each shard owns. O(runs + chunks); meant for
    /// tests and debugging, on an allocator that no other thread is changing.
    pub fn check_invariants(&self) -> Result<(), String> {
        let owners = self.owners.read().clone();
        let mut seen = 0;
        for (index, shard) in self.shards.iter().enumerate() {
            let bases = shard.state.with(|state| {
                state
                    .check()
                    .map(|()| state.chunk_bases().collect::<Vec<u64>>())
            });
            let bases = bases.map_err(|e| format!("shard {index}: {e}"))?;
            let mut chunks = 0;
            for base in bases {
                chunks += 1;
                let owner = owners.get(&self.geometry.chunk_index(Pfn(base)));
                if owner != Some(&ShardId(index)) {
                    return Err(format!(
                        "shard {index} owns chunk {base:#x}, the table says {owner:?}"
                    ));
                }
            }
            let pages = shard.pages.load(Ordering::Relaxed);
            if pages != chunks * self.shape.chunk {
                return Err(format!(
                    "shard {index} counts {pages} pages but owns {chunks} chunks"
                ));
            }
            seen += chunks;
        }
        if seen != owners.len() as u64 {
            return Err(format!(
                "the table lists {} chunks, the shards own {seen}",
                owners.len()
            ));
        }
        Ok(())
    }
}
