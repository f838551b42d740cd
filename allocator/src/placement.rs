//! Where in a shard a request goes: the placement rules that keep huge mappings possible.
//!
//! Every rule is "the lowest-addressed run whose capacity `field` is at least `pages`", one
//! O(log runs) descent of the [`ExtentTree`], followed by an O(1) choice of the position in
//! that run. The rules are tried in order, the first that finds a run wins:
//!
//! * **chunk level** (request aligned to a chunk, or at least a chunk long): the first run with
//!   chunk-aligned capacity, placed at its first chunk boundary: 1G requests take whole chunks.
//! * **mid level** (aligned to a mid block, or at least a mid block long):
//!   1. a run with mid-aligned capacity outside whole free chunks ([`Field::PartialMid`]):
//!      the request fits in a partly used chunk and breaks no free chunk;
//!   2. any run with mid-aligned capacity: a free chunk is broken, as little as possible.
//! * **small** (alignment 1):
//!   1. a run with a sliver that fits ([`Field::Sliver`]): the request packs into a mid block
//!      that is already split and breaks no whole free mid block;
//!   2. a run with room outside whole free chunks: a mid block of a partly used chunk is
//!      broken, but no chunk;
//!   3. any run that is long enough: a free chunk is broken.
//!
//! A request that prefers a level (a 1G-long request with alignment 1, say) falls through to
//! the next level when the preferred one finds nothing, so it succeeds whenever the shard
//! has a fit. For alignments 1, mid and chunk the rules are exact: they fail only if no run of
//! the tree can hold the request. Other alignments (between those levels) take the first run
//! that fits wherever its start falls (`len >= pages + align - 1`) or that fits at a mid or
//! chunk boundary; they may miss a tight fit, which is the price of never walking the runs.

use crate::extent_tree::ExtentTree;
use crate::shape::{Field, RunShape, Shape, align_down, align_up};

/// The first PFN of the placement of `pages` pages aligned to `align` (a power of two no
/// larger than a chunk) in `tree`, or `None` if the rules find no room.
pub(crate) fn place(tree: &ExtentTree, shape: Shape, pages: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two() && align <= shape.chunk && pages > 0);
    if align == shape.chunk || pages >= shape.chunk {
        if let Some((s, _)) = tree.leftmost_with(Field::Chunk, pages) {
            return Some(align_up(s, shape.chunk));
        }
        if align == shape.chunk {
            return None;
        }
    }
    if align > shape.mid {
        return place_unusual(tree, shape, pages, align);
    }
    if align == shape.mid || pages >= shape.mid {
        if let Some(p) = place_mid(tree, shape, pages) {
            return Some(p);
        }
        if align == shape.mid {
            return None;
        }
    }
    if align > 1 {
        return place_unusual(tree, shape, pages, align);
    }
    place_small(tree, shape, pages)
}

fn place_mid(tree: &ExtentTree, shape: Shape, pages: u64) -> Option<u64> {
    if let Some((s, e)) = tree.leftmost_with(Field::PartialMid, pages) {
        let r = RunShape::new(shape, s, e);
        if !r.has_whole_chunk() || r.head_mid_capacity() >= pages {
            return Some(r.mid_start);
        }
        // The tail after the last whole chunk: as high as possible, so that the rest of the
        // run stays one piece with the chunks before it.
        return Some(align_down(e - pages, shape.mid));
    }
    tree.leftmost_with(Field::Mid, pages)
        .map(|(s, _)| align_up(s, shape.mid))
}

fn place_small(tree: &ExtentTree, shape: Shape, pages: u64) -> Option<u64> {
    // Positions at either end of a run shrink it instead of splitting it in two.
    if let Some((s, e)) = tree.leftmost_with(Field::Sliver, pages) {
        let r = RunShape::new(shape, s, e);
        if !r.has_whole_mid() || r.mid_start - s >= pages {
            return Some(s);
        }
        return Some(e - pages);
    }
    if let Some((s, e)) = tree.leftmost_with(Field::PartialMid, pages) {
        let r = RunShape::new(shape, s, e);
        if !r.has_whole_chunk() || r.head_mid_capacity() >= pages {
            return Some(s);
        }
        return Some(e - pages);
    }
    tree.leftmost_with(Field::Len, pages).map(|(s, _)| s)
}

/// Alignments strictly between the indexed levels.
fn place_unusual(tree: &ExtentTree, shape: Shape, pages: u64, align: u64) -> Option<u64> {
    if let Some((s, _)) = tree.leftmost_with(Field::Len, pages.saturating_add(align - 1)) {
        return Some(align_up(s, align));
    }
    if align < shape.mid
        && let Some((s, _)) = tree.leftmost_with(Field::Mid, pages)
    {
        return Some(align_up(s, shape.mid));
    }
    tree.leftmost_with(Field::Chunk, pages)
        .map(|(s, _)| align_up(s, shape.chunk))
}
