//! Many ranges set in one pass (see [`super::SharePlane::set_many`]).

use crate::Shareability;

/// The first value and the flips of the plane `first`/`old` (sorted flips) with `ranges`
/// (ascending, disjoint, not adjacent, `lo < hi <= pages`) set to `to`: a merge of the old
/// flips with the ranges' ends, emitting a flip wherever the new value changes.
pub(super) fn sweep(
    first: Shareability,
    old: &[u32],
    ranges: &[(u32, u32)],
    to: Shareability,
    pages: u32,
) -> (Shareability, Vec<u32>) {
    let mut flips = Vec::with_capacity(old.len() + 2 * ranges.len());
    let (mut f, mut r) = (0, 0);
    // The old value, and whether a range covers, from `at` on.
    let (mut old_value, mut inside) = (first, false);
    // The new value of the segment before `at`; none before the first.
    let mut previous: Option<Shareability> = None;
    let mut new_first = first;
    let mut at = 0u32;
    loop {
        while f < old.len() && old[f] == at {
            old_value = old_value.flipped();
            f += 1;
        }
        if r < ranges.len() && ranges[r].1 == at {
            inside = false;
            r += 1;
        }
        if r < ranges.len() && ranges[r].0 == at {
            inside = true;
        }
        let value = if inside { to } else { old_value };
        match previous {
            None => new_first = value,
            Some(before) if before != value => flips.push(at),
            Some(_) => {}
        }
        previous = Some(value);
        let next_old = old.get(f).copied();
        let next_range = ranges.get(r).map(|&(lo, hi)| if inside { hi } else { lo });
        at = match (next_old, next_range) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        if at >= pages {
            break;
        }
    }
    (new_first, flips)
}
