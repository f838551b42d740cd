//! The conversion fast path: a shareability change inside one chunk in the common case — the
//! chunk's coarse plane (owner, pins, quarantine, dirty) is uniform and its shareability plane
//! has at most [`crate::share_plane::INLINE_FLIPS`] flips before and after (a uniform 1G with a
//! few converted 4K pages). [`crate::MetadataStore::set_shareability`] decides when it applies.
//!
//! With a uniform coarse plane, the mapping boundaries of the chunk are exactly its flips, so
//! the splits, the merges and the whole summary word follow from the old and new flip lists
//! alone: no run walk, no heap, no before/after uniformity scan. Everything else takes the
//! general path, which computes the same results (the property tests compare both with the
//! reference model).
//!
//! The two transitions a conversion and its way back make — a uniform chunk gains an island,
//! and an island is converted back so the chunk is uniform again — are answered without
//! building the new flip list through [`SmallPlane::with_set`]: their flips, splits and
//! merges are known from the range's two ends (respectively the old flips) alone.

use crate::Shareability;
use crate::packed::Packed4;
use crate::share_plane::SmallPlane;
use crate::summary::{MANAGED, SummaryLayout};

/// What a small conversion changed in mapping terms, in registers: the chunk's transition
/// and the middle blocks (indices in the chunk, ascending) that split and that merged.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct SmallChange {
    /// `Some(true)`: the chunk split; `Some(false)`: it merged.
    pub(crate) chunk_split: Option<bool>,
    pub(crate) split_mids: Packed4,
    pub(crate) merged_mids: Packed4,
}

/// The result of a small conversion: the new plane, the new summary word (`None`: unchanged)
/// and the change.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmallOutcome {
    pub(crate) after: SmallPlane,
    pub(crate) summary: Option<u64>,
    pub(crate) change: SmallChange,
}

/// What the fast path needs to know of the store's chunks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkShape<'a> {
    /// Pages per chunk.
    pub(crate) pages: u32,
    /// log2 of the pages per middle block.
    pub(crate) mid_order: u32,
    pub(crate) layout: &'a SummaryLayout,
}

/// Sets pages `lo..hi` (`lo < hi <= pages`) of a chunk whose coarse plane is uniform and whose
/// shareability plane is `before` to `to`. `None` when the result needs more flips than a
/// [`SmallPlane`] holds (the caller then takes the general path; nothing was changed).
#[inline(always)]
pub(crate) fn convert_small(
    before: SmallPlane,
    lo: u32,
    hi: u32,
    to: Shareability,
    shape: ChunkShape<'_>,
) -> Option<SmallOutcome> {
    let ChunkShape {
        pages,
        mid_order,
        layout,
    } = shape;
    let flips = before.flips();
    let first = before.first();
    if flips.is_empty() {
        return Some(island(first, lo, hi, to, shape));
    }
    // Every flip inside lo..=hi and the pages outside the range already `to`: the chunk is
    // uniform again (the way back of an island).
    let (min, max) = (flips.first().unwrap_or(0), flips.last().unwrap_or(0));
    let last_value = if flips.len().is_multiple_of(2) {
        first
    } else {
        first.flipped()
    };
    if lo <= min && max <= hi && (lo == 0 || first == to) && (hi == pages || last_value == to) {
        return Some(SmallOutcome {
            after: SmallPlane::uniform(to),
            summary: Some(layout.uniform()),
            change: SmallChange {
                chunk_split: Some(false),
                split_mids: Packed4::default(),
                merged_mids: mixed_mids(flips, mid_order),
            },
        });
    }
    let after = before.with_set(lo, hi, to, pages)?;
    let mixed_before = mixed_mids(flips, mid_order);
    let mixed_after = mixed_mids(after.flips(), mid_order);
    let uniform_after = after.flips().is_empty();
    Some(SmallOutcome {
        after,
        summary: Some(layout.recompute(
            uniform_after,
            layout.whole_chunk(),
            mixed_after.iter(),
            MANAGED,
        )),
        change: SmallChange {
            chunk_split: uniform_after.then_some(false),
            split_mids: mixed_after.without(mixed_before),
            merged_mids: mixed_before.without(mixed_after),
        },
    })
}

/// A uniform chunk of value `first` with pages `lo..hi` set to `to`.
#[inline(always)]
fn island(
    first: Shareability,
    lo: u32,
    hi: u32,
    to: Shareability,
    shape: ChunkShape<'_>,
) -> SmallOutcome {
    let ChunkShape {
        pages,
        mid_order,
        layout,
    } = shape;
    let mut flips = Packed4::default();
    if first == to || (lo == 0 && hi == pages) {
        // Still uniform: nothing to report, the summary stands.
        return SmallOutcome {
            after: SmallPlane::uniform(to),
            summary: None,
            change: SmallChange::default(),
        };
    }
    let mid_mask = (1 << mid_order) - 1;
    let mut split_mids = Packed4::default();
    // Two pushes into an empty list of four cannot fail.
    if lo > 0 {
        let _ = flips.push(lo);
        if lo & mid_mask != 0 {
            let _ = split_mids.push(lo >> mid_order);
        }
    }
    if hi < pages {
        let _ = flips.push(hi);
        if hi & mid_mask != 0 && split_mids.last() != Some(hi >> mid_order) {
            let _ = split_mids.push(hi >> mid_order);
        }
    }
    SmallOutcome {
        after: SmallPlane::with_flips(if lo == 0 { to } else { first }, flips),
        summary: Some(layout.recompute(false, layout.whole_chunk(), split_mids.iter(), MANAGED)),
        change: SmallChange {
            chunk_split: Some(true),
            split_mids,
            merged_mids: Packed4::default(),
        },
    }
}

/// The middle blocks that a flip lies strictly inside (a flip on a middle block's first page
/// splits no middle block), ascending and distinct: at most one per flip.
#[inline]
fn mixed_mids(flips: Packed4, mid_order: u32) -> Packed4 {
    let mut out = Packed4::default();
    for p in flips.iter() {
        let mid = p >> mid_order;
        if p & ((1 << mid_order) - 1) != 0 && out.last() != Some(mid) {
            // At most one middle block per flip, and there are at most four flips.
            let _ = out.push(mid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::SummaryLayout;
    use pfnstore_core::Geometry;

    const G: Geometry = Geometry::X86_64;
    const PAGES: u32 = 1 << 18;

    fn run(before: SmallPlane, lo: u32, hi: u32, to: Shareability) -> Option<SmallOutcome> {
        let layout = SummaryLayout::new(G);
        let shape = ChunkShape {
            pages: PAGES,
            mid_order: 9,
            layout: &layout,
        };
        convert_small(before, lo, hi, to, shape)
    }

    fn mids(values: &[u32]) -> Packed4 {
        let mut p = Packed4::default();
        for &v in values {
            p.push(v).unwrap();
        }
        p
    }

    #[test]
    fn an_island_splits_the_chunk_and_its_middle_blocks() {
        let shared = SmallPlane::uniform(Shareability::Shared);
        let out = run(shared, 1000, 1001, Shareability::Private).unwrap();
        assert_eq!(out.after.flips(), mids(&[1000, 1001]));
        assert_eq!(out.change.chunk_split, Some(true));
        assert_eq!(out.change.split_mids, mids(&[1]));
        // Across a middle-block boundary: both blocks split.
        let out = run(shared, 1000, 1030, Shareability::Private).unwrap();
        assert_eq!(out.change.split_mids, mids(&[1, 2]));
        // Aligned to middle blocks: the chunk splits, no middle block does.
        let out = run(shared, 512, 1024, Shareability::Private).unwrap();
        assert_eq!(out.change.split_mids, Packed4::default());
        assert_eq!(out.change.chunk_split, Some(true));
        // No change of value, or the whole chunk: still uniform, nothing reported.
        let out = run(shared, 5, 9, Shareability::Shared).unwrap();
        assert_eq!((out.summary, out.change), (None, SmallChange::default()));
        let out = run(shared, 0, PAGES, Shareability::Private).unwrap();
        assert_eq!(out.after.first(), Shareability::Private);
        assert_eq!((out.summary, out.change), (None, SmallChange::default()));
    }

    #[test]
    fn converting_an_island_back_merges_what_it_split() {
        let shared = SmallPlane::uniform(Shareability::Shared);
        let island = run(shared, 1000, 1030, Shareability::Private)
            .unwrap()
            .after;
        let out = run(island, 1000, 1030, Shareability::Shared).unwrap();
        assert!(out.after.flips().is_empty());
        assert_eq!(out.change.chunk_split, Some(false));
        assert_eq!(out.change.merged_mids, mids(&[1, 2]));
        assert_eq!(out.summary, Some(SummaryLayout::new(G).uniform()));
        // Half of it back: only the first middle block merges.
        let out = run(island, 1000, 1024, Shareability::Shared).unwrap();
        assert_eq!(out.after.flips(), mids(&[1024, 1030]));
        assert_eq!(out.change.chunk_split, None);
        assert_eq!(out.change.merged_mids, mids(&[1]));
        assert_eq!(out.change.split_mids, Packed4::default());
    }

    #[test]
    fn too_many_flips_take_the_general_path() {
        let shared = SmallPlane::uniform(Shareability::Shared);
        let one = run(shared, 10, 11, Shareability::Private).unwrap().after;
        let two = run(one, 20, 21, Shareability::Private).unwrap().after;
        assert_eq!(two.flips().len(), 4);
        assert!(run(two, 30, 31, Shareability::Private).is_none());
    }
}
