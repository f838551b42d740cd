//! The state of one managed chunk: its two planes and the uniformity questions asked of them.

use pfnstore_core::PageSize;

use crate::coarse_plane::{Coarse, CoarsePlane};
use crate::inline_vec::InlineVec;
use crate::share_plane::{PlaneShape, SharePlane};
use crate::{Attributes, MappingAttributes, Shareability};

/// Middle-block indices inside a chunk, ascending.
pub(crate) type MidList = InlineVec<u32, 4>;

#[derive(Debug)]
pub(crate) struct ChunkState {
    pub(crate) share: SharePlane,
    pub(crate) coarse: CoarsePlane,
}

impl ChunkState {
    /// A freshly managed chunk: unowned, clean, unpinned, not quarantined.
    pub(crate) fn new(initial: Shareability) -> ChunkState {
        ChunkState {
            share: SharePlane::Uniform(initial),
            coarse: CoarsePlane::Uniform(Coarse::default()),
        }
    }

    pub(crate) fn attributes_at(&self, off: u32) -> Attributes {
        self.coarse
            .at(off)
            .with_shareability(self.share.value_at(off))
    }

    /// The mapping attributes at `off`, whose shareability the caller knows.
    pub(crate) fn mapping_with(&self, off: u32, shareability: Shareability) -> MappingAttributes {
        MappingAttributes {
            shareability,
            owner: self.coarse.at(off).mapping_key(),
        }
    }

    /// Whether the whole chunk has one set of mapping attributes.
    pub(crate) fn mapping_uniform(&self) -> bool {
        self.share.uniform_value().is_some() && self.coarse.mapping_uniform()
    }

    /// Whether middle block `mid` (of `2^mid_order` pages) has one set of mapping attributes.
    #[inline]
    pub(crate) fn mapping_uniform_mid(&self, mid: u32, mid_order: u32) -> bool {
        let (lo, hi) = (mid << mid_order, (mid + 1) << mid_order);
        // Both evaluated (`&`, not `&&`): the coarse test of a uniform coarse plane is a
        // constant, and a random mid's answer is better selected than branched on.
        let coarse_uniform =
            self.coarse.is_uniform() || self.coarse.next_boundary(lo, hi, true).is_none();
        self.share.mid_uniform(mid, mid_order) & coarse_uniform
    }

    /// The largest mapping size for the pages of middle block `mid` (of `2^mid_order` pages).
    #[inline]
    pub(crate) fn mid_mapping_order(&self, mid: u32, mid_order: u32) -> PageSize {
        // The case the mid index is for, with no call (hence no register spill) on its path.
        if self.coarse.is_uniform()
            && let Some(uniform) = self.share.indexed_mid_uniform(mid)
        {
            return if uniform {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
        }
        self.mid_mapping_order_general(mid, mid_order)
    }

    /// [`Self::mid_mapping_order`] for every other chunk (out of line, see there).
    #[inline(never)]
    fn mid_mapping_order_general(&self, mid: u32, mid_order: u32) -> PageSize {
        if self.mapping_uniform() {
            PageSize::Size1G
        } else if self.mapping_uniform_mid(mid, mid_order) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }

    /// The first offset `p` with `after < p < limit` where the mapping attributes change.
    pub(crate) fn next_mapping_boundary(&self, after: u32, limit: u32) -> Option<u32> {
        let share = self.share.next_flip(after, limit);
        let coarse = self.coarse.next_boundary(after, limit, true);
        share.into_iter().chain(coarse).min()
    }

    /// The middle blocks `m0..=m1` that are not mapping-uniform, found from the boundaries
    /// inside them (so the cost follows the boundaries, not the number of blocks).
    pub(crate) fn nonuniform_mids(&self, m0: u32, m1: u32, mid_order: u32) -> MidList {
        let mut out = MidList::default();
        let end = (m1 + 1) << mid_order;
        let mut after = m0 << mid_order;
        if self.coarse.is_uniform()
            && let Some(flips) = self.share.flip_list()
        {
            // The common case: only shareability has boundaries, and they are a short list.
            let first = flips.partition_point(|&p| p <= after);
            for &p in flips[first..].iter().take_while(|&&p| p < end) {
                let mid = p >> mid_order;
                if p & ((1 << mid_order) - 1) != 0 && out.as_slice().last() != Some(&mid) {
                    out.push(mid);
                }
            }
            return out;
        }
        while let Some(p) = self.next_mapping_boundary(after, end) {
            if p & ((1 << mid_order) - 1) == 0 {
                after = p; // a boundary between two middle blocks splits neither
                continue;
            }
            let mid = p >> mid_order;
            out.push(mid);
            // Continue with the boundaries of the next middle block.
            after = ((mid + 1) << mid_order) - 1;
        }
        out
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.share.heap_bytes() + self.coarse.heap_bytes()
    }

    pub(crate) fn check_canonical(&self, shape: PlaneShape) -> Result<(), String> {
        self.share.check_canonical(shape)?;
        self.coarse.check_canonical()
    }
}
