//! The lock-free summary word of a chunk: what `max_mapping_size` can answer without a lock.
//!
//! Layout (bit numbers of the `u64`):
//!
//! | bits    | set when                                                                 |
//! |---------|--------------------------------------------------------------------------|
//! | 63      | the chunk is managed                                                     |
//! | 62      | the whole chunk is mapping-uniform                                       |
//! | 0..32   | *uniform group* `g`: every middle block of the group is mapping-uniform  |
//! | 32..48  | *split group* `g`: no middle block of the group is mapping-uniform       |
//!
//! A uniform group is 1/32 of the chunk (16 middle blocks on x86-64), a split group 1/16 (32
//! middle blocks); both are powers of two, so every uniform group lies in one split group and a
//! window of whole split groups is a window of whole uniform groups. An unmanaged chunk's word
//! is 0, so any set bit also says "managed".
//!
//! Uniform groups answer "2M" at low fragmentation, split groups answer "4K" at high
//! fragmentation (at 1 % of random 4K pages converted, about 5 per 2M block, 8 in 10 split
//! groups have no uniform middle block). In between neither does and the reader takes the lock.

use pfnstore_core::{Geometry, PageSize};

/// The chunk is managed.
pub(crate) const MANAGED: u64 = 1 << 63;
/// The whole chunk has one set of mapping attributes.
const CHUNK_UNIFORM: u64 = 1 << 62;
/// Uniform groups: bits `0..UNIFORM_GROUPS`.
const UNIFORM_GROUPS: u32 = 32;
/// Split groups: bits `SPLIT_BASE..SPLIT_BASE + SPLIT_GROUPS`.
const SPLIT_GROUPS: u32 = 16;
const SPLIT_BASE: u32 = 32;

/// How a geometry's middle blocks map to summary bits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SummaryLayout {
    /// log2 of the middle blocks per uniform group.
    uniform_shift: u32,
    /// log2 of the middle blocks per split group (`>= uniform_shift`).
    split_shift: u32,
    /// log2 of the middle blocks per chunk.
    mids_log: u32,
}

impl SummaryLayout {
    pub(crate) fn new(geometry: Geometry) -> SummaryLayout {
        let mids_log = geometry.order(PageSize::Size1G) - geometry.order(PageSize::Size2M);
        SummaryLayout {
            uniform_shift: mids_log.saturating_sub(UNIFORM_GROUPS.trailing_zeros()),
            split_shift: mids_log.saturating_sub(SPLIT_GROUPS.trailing_zeros()),
            mids_log,
        }
    }

    /// What the summary alone says about middle block `mid`: the block size to map it with,
    /// or `None` when the lock must be taken (always `None` for an unmanaged chunk).
    #[inline]
    pub(crate) fn lookup(&self, summary: u64, mid: u32) -> Option<PageSize> {
        if summary & CHUNK_UNIFORM != 0 {
            Some(PageSize::Size1G)
        } else if summary & (1 << (mid >> self.uniform_shift)) != 0 {
            Some(PageSize::Size2M)
        } else if summary & (1 << (SPLIT_BASE + (mid >> self.split_shift))) != 0 {
            Some(PageSize::Size4K)
        } else {
            None
        }
    }

    /// The summary of a managed, mapping-uniform chunk.
    pub(crate) fn uniform(&self) -> u64 {
        let mids = 1u32 << self.mids_log;
        MANAGED | CHUNK_UNIFORM | bits(0, (mids >> self.uniform_shift) - 1)
    }

    /// The middle blocks whose bits a change of blocks `m0..=m1` recomputes: the split groups
    /// holding them (whole uniform groups too).
    pub(crate) fn window(&self, m0: u32, m1: u32) -> (u32, u32) {
        let (g0, g1) = (m0 >> self.split_shift, m1 >> self.split_shift);
        (g0 << self.split_shift, ((g1 + 1) << self.split_shift) - 1)
    }

    /// The middle blocks of the whole chunk, as a window.
    pub(crate) fn whole_chunk(&self) -> (u32, u32) {
        (0, (1 << self.mids_log) - 1)
    }

    /// `previous` with the chunk bit and the group bits of `window` (from [`Self::window`])
    /// recomputed, given whether the chunk is uniform and its non-uniform middle blocks in
    /// `window` (ascending, distinct). `previous` must be the summary of a managed chunk.
    #[inline]
    pub(crate) fn recompute(
        &self,
        uniform: bool,
        window: (u32, u32),
        nonuniform: impl IntoIterator<Item = u32>,
        previous: u64,
    ) -> u64 {
        let (u0, u1) = (
            window.0 >> self.uniform_shift,
            window.1 >> self.uniform_shift,
        );
        let (s0, s1) = (window.0 >> self.split_shift, window.1 >> self.split_shift);
        let window_bits = bits(u0, u1) | bits(SPLIT_BASE + s0, SPLIT_BASE + s1);
        let summary = (previous | MANAGED) & !(CHUNK_UNIFORM | window_bits);
        if uniform {
            return summary | CHUNK_UNIFORM | bits(u0, u1);
        }
        let mut not_uniform = 0u64;
        let mut split = 0u64;
        let group_size = 1u32 << self.split_shift;
        // The split group being counted, and how many of its blocks were listed so far.
        let (mut group, mut listed) = (u32::MAX, 0u32);
        for mid in nonuniform {
            not_uniform |= 1 << (mid >> self.uniform_shift);
            if mid >> self.split_shift != group {
                (group, listed) = (mid >> self.split_shift, 0);
            }
            listed += 1;
            if listed == group_size {
                split |= 1 << (SPLIT_BASE + group);
            }
        }
        summary | (bits(u0, u1) & !not_uniform) | split
    }
}

/// Bits `b0..=b1`.
fn bits(b0: u32, b1: u32) -> u64 {
    (u64::MAX >> (63 - (b1 - b0))) << b0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_answer_uniform_and_split_blocks() {
        let layout = SummaryLayout::new(Geometry::X86_64);
        let full = layout.whole_chunk();
        assert_eq!(full, (0, 511));
        assert_eq!(layout.lookup(0, 7), None);
        assert_eq!(layout.lookup(layout.uniform(), 7), Some(PageSize::Size1G));
        // Middle block 20 mixed: its uniform group (16..32) loses its bit, nothing is split.
        let one = layout.recompute(false, full, [20], MANAGED);
        assert_eq!(layout.lookup(one, 20), None);
        assert_eq!(layout.lookup(one, 31), None);
        assert_eq!(layout.lookup(one, 32), Some(PageSize::Size2M));
        // Every block of split group 1 (32..64) mixed.
        let group: Vec<u32> = (20..21).chain(32..64).collect();
        let split = layout.recompute(false, full, group, MANAGED);
        assert_eq!(layout.lookup(split, 40), Some(PageSize::Size4K));
        assert_eq!(layout.lookup(split, 0), Some(PageSize::Size2M));
        assert_eq!(layout.lookup(split, 20), None);
        // Recomputing the window of group 1 alone keeps the bits outside it.
        assert_eq!(layout.window(40, 41), (32, 63));
        let healed = layout.recompute(false, (32, 63), [], split);
        assert_eq!(healed, one);
        assert_eq!(layout.recompute(true, full, [], healed), layout.uniform());
    }

    #[test]
    fn small_geometries_have_one_block_per_group() {
        let layout = SummaryLayout::new(Geometry::new(1, 2).unwrap());
        assert_eq!(layout.whole_chunk(), (0, 1));
        let s = layout.recompute(false, (0, 1), [0], MANAGED);
        assert_eq!(layout.lookup(s, 0), Some(PageSize::Size4K));
        assert_eq!(layout.lookup(s, 1), Some(PageSize::Size2M));
        assert_eq!(layout.window(1, 1), (1, 1));
    }
}
