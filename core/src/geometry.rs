//! Page sizes, the block geometry, and the decomposition of ranges into aligned blocks.
//!
//! Memory is mapped in three naturally aligned block sizes. On x86-64 they are 4 KiB, 2 MiB and
//! 1 GiB ([`Geometry::X86_64`]); the largest is also the *chunk*: the unit in which memory is
//! obtained, allocated to shards and tracked by one metadata record. Tests use a scaled-down
//! geometry (for example 1/8/64 pages) so that every split and merge level is reached on a
//! small PFN space; there [`PageSize::Size2M`] and [`PageSize::Size1G`] stand for the middle
//! and the chunk level, whatever their byte sizes.

use crate::{GeometryError, PFN_LIMIT, PageIndex, PageRange, Pfn};

/// One of the three mapping levels, from the smallest up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// The base page (one PFN).
    Size4K,
    /// The middle level (2 MiB on x86-64).
    Size2M,
    /// The chunk level (1 GiB on x86-64).
    Size1G,
}

impl PageSize {
    /// All sizes, largest first: the order in which a decomposition tries them.
    pub const LARGEST_FIRST: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

    /// The next smaller size, if any.
    pub const fn smaller(self) -> Option<PageSize> {
        match self {
            PageSize::Size1G => Some(PageSize::Size2M),
            PageSize::Size2M => Some(PageSize::Size4K),
            PageSize::Size4K => None,
        }
    }

    /// The next larger size, if any.
    pub const fn larger(self) -> Option<PageSize> {
        match self {
            PageSize::Size4K => Some(PageSize::Size2M),
            PageSize::Size2M => Some(PageSize::Size1G),
            PageSize::Size1G => None,
        }
    }
}

/// The block orders of a PFN space: how many base pages a middle block and a chunk hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    mid_order: u32,
    chunk_order: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry::X86_64
    }
}

impl Geometry {
    /// 4 KiB / 2 MiB / 1 GiB.
    pub const X86_64: Geometry = Geometry {
        mid_order: 9,
        chunk_order: 18,
    };

    /// A geometry with middle blocks of `2^mid_order` pages and chunks of `2^chunk_order`.
    pub const fn new(mid_order: u32, chunk_order: u32) -> Result<Geometry, GeometryError> {
        if mid_order == 0 || mid_order >= chunk_order || chunk_order > 30 {
            return Err(GeometryError::BadOrders {
                mid_order,
                chunk_order,
            });
        }
        Ok(Geometry {
            mid_order,
            chunk_order,
        })
    }

    /// log2 of the pages in a block of `size`.
    pub const fn order(&self, size: PageSize) -> u32 {
        match size {
            PageSize::Size4K => 0,
            PageSize::Size2M => self.mid_order,
            PageSize::Size1G => self.chunk_order,
        }
    }

    /// Pages in a block of `size`.
    pub const fn pages(&self, size: PageSize) -> u64 {
        1 << self.order(size)
    }

    /// Pages in a chunk (the largest block).
    pub const fn chunk_pages(&self) -> u64 {
        self.pages(PageSize::Size1G)
    }

    /// Pages in a middle block.
    pub const fn mid_pages(&self) -> u64 {
        self.pages(PageSize::Size2M)
    }

    /// Middle blocks per chunk.
    pub const fn mids_per_chunk(&self) -> u64 {
        1 << (self.chunk_order - self.mid_order)
    }

    /// The index of the chunk that contains `pfn` (`pfn / chunk_pages`).
    pub fn chunk_index<K: PageIndex>(&self, index: K) -> u64 {
        index.raw() >> self.chunk_order
    }

    /// The block of `size` that contains `pfn`, or `None` if `pfn` is at or beyond
    /// [`PFN_LIMIT`].
    pub fn block_containing<K: PageIndex>(&self, index: K, size: PageSize) -> Option<Block<K>> {
        if index.raw() >= PFN_LIMIT.0 {
            return None;
        }
        Some(Block {
            start: K::from_raw(index.raw() & !(self.pages(size) - 1)),
            size,
        })
    }

    /// Whether `pfn` is a multiple of the block size.
    pub fn is_aligned<K: PageIndex>(&self, index: K, size: PageSize) -> bool {
        index.raw() & (self.pages(size) - 1) == 0
    }

    /// The largest block size that starts at `pfn` and ends at or before `end`.
    ///
    /// Returns `None` only if `pfn >= end`.
    pub fn largest_block_at<K: PageIndex>(&self, index: K, end: K) -> Option<PageSize> {
        if index >= end {
            return None;
        }
        let room = end.raw() - index.raw();
        PageSize::LARGEST_FIRST
            .into_iter()
            .find(|&size| self.is_aligned(index, size) && self.pages(size) <= room)
    }

    /// The decomposition of `range` into maximal naturally aligned blocks, smallest address first.
    ///
    /// Yields one [`Block`] at a time; for a compact description use [`Geometry::block_runs`].
    pub fn blocks<K: PageIndex>(&self, range: PageRange<K>) -> Blocks<K> {
        Blocks {
            runs: self.block_runs(range),
            current: None,
        }
    }

    /// The decomposition of `range` into maximal aligned blocks, as runs of equal-sized blocks.
    ///
    /// Any range yields at most five runs (4K head, 2M head, 1G body, 2M tail, 4K tail): a 4 KiB
    /// hole in a 1 GiB chunk, seen as the rest of the chunk, is described in a handful of runs
    /// rather than 262,143 entries.
    pub fn block_runs<K: PageIndex>(&self, range: PageRange<K>) -> BlockRuns<K> {
        BlockRuns {
            geometry: *self,
            next: range.start(),
            end: range.end(),
        }
    }
}

/// A naturally aligned block of memory at one mapping level.
///
/// Blocks are only made by a [`Geometry`] from a valid range or PFN, so they always lie below
/// [`PFN_LIMIT`] (which is aligned to every block size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block<K: PageIndex = Pfn> {
    start: K,
    size: PageSize,
}

impl<K: PageIndex> Block<K> {
    /// First page (aligned to the block size).
    pub fn start(&self) -> K {
        self.start
    }

    /// The block's level.
    pub const fn size(&self) -> PageSize {
        self.size
    }

    /// The pages of the block.
    pub fn range(&self, geometry: &Geometry) -> PageRange<K> {
        PageRange::new_unchecked(
            self.start,
            K::from_raw(self.start.raw() + geometry.pages(self.size)),
        )
    }
}

impl<K: PageIndex> Default for BlockRun<K> {
    /// One base page at index 0 (a placeholder for fixed-size storage, not a meaningful run).
    fn default() -> Self {
        BlockRun {
            start: K::default(),
            size: PageSize::Size4K,
            count: 1,
        }
    }
}

/// `count` consecutive blocks of the same size starting at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRun<K: PageIndex = Pfn> {
    start: K,
    size: PageSize,
    count: u64,
}

impl<K: PageIndex> BlockRun<K> {
    /// A run of `count` blocks of `size` from `start`: checked for alignment, emptiness and
    /// the PFN limit.
    pub fn new(
        geometry: &Geometry,
        start: K,
        size: PageSize,
        count: u64,
    ) -> Result<BlockRun<K>, crate::RangeError> {
        let pages = count
            .checked_mul(geometry.pages(size))
            .ok_or(crate::RangeError::Overflow {
                start: Pfn(start.raw()),
                pages: u64::MAX,
            })?;
        PageRange::from_len(start, pages)?.check_aligned_to(geometry.pages(size))?;
        Ok(BlockRun { start, size, count })
    }

    /// First page of the first block.
    pub fn start(&self) -> K {
        self.start
    }

    /// Size of every block in the run.
    pub const fn size(&self) -> PageSize {
        self.size
    }

    /// Number of blocks; never zero.
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// Pages covered by the run.
    pub fn pages(&self, geometry: &Geometry) -> u64 {
        self.count << geometry.order(self.size)
    }

    /// The pages covered by the run.
    pub fn range(&self, geometry: &Geometry) -> PageRange<K> {
        PageRange::new_unchecked(
            self.start,
            K::from_raw(self.start.raw() + self.pages(geometry)),
        )
    }

    /// The blocks of the run, one by one.
    pub fn blocks(&self, geometry: &Geometry) -> impl Iterator<Item = Block<K>> + use<K> {
        let (start, size, step) = (self.start.raw(), self.size, geometry.pages(self.size));
        (0..self.count).map(move |i| Block {
            start: K::from_raw(start + i * step),
            size,
        })
    }

    /// The same run expressed in blocks no larger than `max` (a 1 GiB block as 512 blocks of
    /// 2 MiB, say), for memory that is physically contiguous only up to `max`.
    pub fn capped(&self, geometry: &Geometry, max: PageSize) -> BlockRun<K> {
        if self.size <= max {
            return *self;
        }
        BlockRun {
            start: self.start,
            size: max,
            count: self.count << (geometry.order(self.size) - geometry.order(max)),
        }
    }

    /// The same run in another index space.
    pub fn cast<L: PageIndex>(self) -> BlockRun<L> {
        BlockRun {
            start: L::from_raw(self.start.raw()),
            size: self.size,
            count: self.count,
        }
    }
}

/// Iterator returned by [`Geometry::block_runs`].
#[derive(Debug, Clone)]
pub struct BlockRuns<K: PageIndex = Pfn> {
    geometry: Geometry,
    next: K,
    end: K,
}

impl<K: PageIndex> Iterator for BlockRuns<K> {
    type Item = BlockRun<K>;

    fn next(&mut self) -> Option<BlockRun<K>> {
        let size = self.geometry.largest_block_at(self.next, self.end)?;
        let block_pages = self.geometry.pages(size);
        // The run of `size` blocks stops where the next larger block could start, or at the end.
        let limit = match size.larger() {
            Some(larger) if !self.geometry.is_aligned(self.next, larger) => {
                let boundary = self.next.raw() | (self.geometry.pages(larger) - 1);
                // `boundary + 1` is the next larger-aligned PFN; it cannot overflow unless the
                // PFN space's last larger block is involved, in which case `end` is the limit.
                boundary
                    .checked_add(1)
                    .map_or(self.end.raw(), |b| b.min(self.end.raw()))
            }
            _ => self.end.raw(),
        };
        let count = (limit - self.next.raw()) / block_pages;
        let run = BlockRun {
            start: self.next,
            size,
            count,
        };
        self.next = K::from_raw(self.next.raw() + count * block_pages);
        Some(run)
    }
}

/// Iterator returned by [`Geometry::blocks`].
#[derive(Debug, Clone)]
pub struct Blocks<K: PageIndex = Pfn> {
    runs: BlockRuns<K>,
    current: Option<(BlockRun<K>, u64)>,
}

impl<K: PageIndex> Iterator for Blocks<K> {
    type Item = Block<K>;

    fn next(&mut self) -> Option<Block<K>> {
        loop {
            if let Some((run, done)) = &mut self.current
                && *done < run.count
            {
                let block = Block {
                    start: K::from_raw(
                        run.start.raw() + (*done << self.runs.geometry.order(run.size)),
                    ),
                    size: run.size,
                };
                *done += 1;
                return Some(block);
            }
            self.current = Some((self.runs.next()?, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PfnRange;
    use proptest::prelude::*;

    const G: Geometry = Geometry::X86_64;

    fn range(a: u64, b: u64) -> PfnRange {
        PfnRange::new(Pfn(a), Pfn(b)).unwrap()
    }

    #[test]
    fn geometry_validation() {
        assert!(Geometry::new(0, 6).is_err());
        assert!(Geometry::new(6, 6).is_err());
        assert!(Geometry::new(3, 31).is_err());
        let tiny = Geometry::new(3, 6).unwrap();
        assert_eq!(tiny.pages(PageSize::Size2M), 8);
        assert_eq!(tiny.chunk_pages(), 64);
        assert_eq!(tiny.mids_per_chunk(), 8);
        assert_eq!(G.mids_per_chunk(), 512);
        assert_eq!(G.chunk_index(Pfn(0x40000)), 1);
    }

    #[test]
    fn a_4k_hole_in_a_1g_chunk_is_five_runs_at_most() {
        // Everything of chunk [0, 2^18) except page 1000: the two sides of the hole.
        let left: Vec<_> = G.block_runs(range(0, 1000)).collect();
        let right: Vec<_> = G.block_runs(range(1001, 1 << 18)).collect();
        assert_eq!(
            left,
            vec![
                BlockRun {
                    start: Pfn(0),
                    size: PageSize::Size2M,
                    count: 1
                },
                BlockRun {
                    start: Pfn(512),
                    size: PageSize::Size4K,
                    count: 488
                },
            ]
        );
        assert_eq!(
            right,
            vec![
                BlockRun {
                    start: Pfn(1001),
                    size: PageSize::Size4K,
                    count: 23
                },
                BlockRun {
                    start: Pfn(1024),
                    size: PageSize::Size2M,
                    count: 510
                },
            ]
        );
        let twomeg: u64 = left
            .iter()
            .chain(&right)
            .filter(|r| r.size == PageSize::Size2M)
            .map(|r| r.count)
            .sum();
        let fourk: u64 = left
            .iter()
            .chain(&right)
            .filter(|r| r.size == PageSize::Size4K)
            .map(|r| r.count)
            .sum();
        assert_eq!((twomeg, fourk), (511, 511));
    }

    #[test]
    fn a_whole_chunk_is_one_block() {
        let blocks: Vec<_> = G.blocks(range(1 << 18, 2 << 18)).collect();
        assert_eq!(blocks.len(), 1);
        assert_eq!(
            (blocks[0].start(), blocks[0].size()),
            (Pfn(1 << 18), PageSize::Size1G)
        );
        assert_eq!(blocks[0].range(&G), range(1 << 18, 2 << 18));
    }

    #[test]
    fn largest_block_at_respects_alignment_and_room() {
        assert_eq!(
            G.largest_block_at(Pfn(0), Pfn(1 << 18)),
            Some(PageSize::Size1G)
        );
        assert_eq!(
            G.largest_block_at(Pfn(0), Pfn((1 << 18) - 1)),
            Some(PageSize::Size2M)
        );
        assert_eq!(
            G.largest_block_at(Pfn(512), Pfn(1 << 20)),
            Some(PageSize::Size2M)
        );
        assert_eq!(
            G.largest_block_at(Pfn(3), Pfn(1 << 20)),
            Some(PageSize::Size4K)
        );
        assert_eq!(G.largest_block_at(Pfn(3), Pfn(3)), None);
    }

    #[test]
    fn decomposition_reaches_the_top_of_the_pfn_space() {
        let top = range(PFN_LIMIT.0 - 600, PFN_LIMIT.0);
        let covered: u64 = G.block_runs(top).map(|r| r.pages(&G)).sum();
        assert_eq!(covered, 600);
    }

    proptest! {
        #[test]
        fn blocks_tile_the_range_maximally(start in 0u64..5000, len in 1u64..5000, tiny in any::<bool>()) {
            let g = if tiny { Geometry::new(3, 6).unwrap() } else { Geometry::new(4, 10).unwrap() };
            let r = PfnRange::from_len(Pfn(start), len).unwrap();
            let blocks: Vec<Block> = g.blocks(r).collect();
            // Tiling: contiguous, aligned, exact cover.
            let mut next = r.start();
            for b in &blocks {
                let b = &Block { start: b.start(), size: b.size() };
                prop_assert_eq!(b.start, next);
                prop_assert!(g.is_aligned(b.start, b.size));
                next = b.range(&g).end();
                // Maximal: the next larger block containing it does not fit in the range.
                if let Some(larger) = b.size.larger() {
                    let parent = g.block_containing(b.start, larger).unwrap().range(&g);
                    prop_assert!(!r.contains_range(&parent), "block {:?} could have been {:?}", b, larger);
                }
            }
            prop_assert_eq!(next, r.end());
            // Runs describe the same blocks, in at most five runs.
            let runs: Vec<BlockRun> = g.block_runs(r).collect();
            prop_assert!(runs.len() <= 5);
            let from_runs: Vec<Block> = runs.iter().flat_map(|run| run.blocks(&g)).collect();
            prop_assert_eq!(from_runs, blocks);
        }
    }
}
