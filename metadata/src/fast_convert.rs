//! The conversion fast path: a shareability change inside one chunk in the common case — the
//! chunk's coarse plane (owner, pins, quarantine, dirty) is uniform and its shareability plane
//! has at most [`crate::share_plane::INLINE_FLIPS`] flips before and after (a uniform 1G with a few converted 4K
//! pages). [`crate::MetadataStore::set_shareability`] decides when it applies.
//!
//! With a uniform coarse plane, the mapping boundaries of the chunk are exactly its flips, so
//! the splits, the merges and the whole summary word follow from the old and new flip arrays
//! alone: no run walk, no heap, no before/after uniformity scan. Everything else takes the
//! general path, which computes the same results (the property tests compare both with the
//! reference model).

use pfnstore_core::{PageSize, Pfn};

use crate::packed::Packed4;
use crate::share_plane::SmallPlane;
use crate::summary::{MANAGED, SummaryLayout};
use crate::{MappingChange, Transition};

/// Records in `change` what happened to the chunk at `base`, whose coarse plane is uniform,
/// when its shareability went from `before` to `after`, and returns its new summary word.
#[inline(always)]
pub(crate) fn small_conversion(
    before: &SmallPlane,
    after: &SmallPlane,
    base: Pfn,
    layout: &SummaryLayout,
    change: &mut MappingChange,
) -> u64 {
    let mid_order = change.geometry().order(PageSize::Size2M);
    let mixed_before = mixed_mids(before.flips(), mid_order);
    let mixed_after = mixed_mids(after.flips(), mid_order);
    let (uniform_before, uniform_after) = (before.flips().is_empty(), after.flips().is_empty());
    match (uniform_before, uniform_after) {
        (true, false) => change.record(Transition::Split, PageSize::Size1G, base),
        (false, true) => change.record(Transition::Merge, PageSize::Size1G, base),
        _ => {}
    }
    change.record_mid_diff(base, mixed_before.iter(), mixed_after.iter());
    layout.recompute(
        uniform_after,
        layout.whole_chunk(),
        mixed_after.iter(),
        MANAGED,
    )
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
