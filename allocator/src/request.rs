//! The vocabulary of a request and its answer.

use std::fmt;

use pfnstore_core::{Pfn, PfnRange};

/// The index of a shard, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}

/// Which shard an allocation starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardHint {
    /// The calling thread's home shard; the others are tried (stolen from) if it cannot serve.
    #[default]
    Home,
    /// This shard first (e.g. the one on the caller's NUMA node), then the others.
    Shard(ShardId),
    /// This shard only: fail rather than take memory from another shard.
    Only(ShardId),
}

/// What `alloc` is asked for. Built with [`AllocRequest::new`] and the builder methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Number of 4 KiB pages; not zero.
    pub pages: u64,
    /// Alignment of the first page, in pages: a power of two, at most a chunk.
    pub align_pages: u64,
    /// Take only pages that are clean (never used, or scrubbed and reported with
    /// `mark_clean`), so that the caller need not scrub anything.
    pub clean_only: bool,
    /// Where to start looking.
    pub hint: ShardHint,
}

impl AllocRequest {
    /// `pages` pages, no alignment, dirty pages allowed, home shard first.
    pub const fn new(pages: u64) -> AllocRequest {
        AllocRequest {
            pages,
            align_pages: 1,
            clean_only: false,
            hint: ShardHint::Home,
        }
    }

    /// Sets the alignment (in pages).
    pub const fn aligned(mut self, align_pages: u64) -> AllocRequest {
        self.align_pages = align_pages;
        self
    }

    /// Asks for clean pages only.
    pub const fn clean_only(mut self) -> AllocRequest {
        self.clean_only = true;
        self
    }

    /// Sets where to start looking.
    pub const fn hint(mut self, hint: ShardHint) -> AllocRequest {
        self.hint = hint;
        self
    }
}

/// A range handed out by `alloc` or `alloc_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The pages, now owned by the caller.
    pub range: PfnRange,
    /// The shard that owns them (where `free` will take them back).
    pub shard: ShardId,
    /// The parts of `range` that held someone else's data and must be scrubbed before the
    /// memory is given to anyone: ascending, disjoint, not adjacent. Empty if all is clean.
    pub dirty: DirtyRanges,
}

/// Builds a range from bounds that an operation derived from valid ranges.
#[inline]
pub(crate) fn pfn_range(start: u64, end: u64) -> PfnRange {
    PfnRange::new(Pfn(start), Pfn(end))
        .expect("start < end <= PFN_LIMIT: both lie in a managed chunk")
}

impl Allocation {
    /// What a hot path handed out: `pages` pages from `start` (inside a managed chunk), all
    /// clean or all dirty.
    #[inline]
    pub(crate) fn hot(start: u64, pages: u64, shard: ShardId, clean: bool) -> Allocation {
        let range = pfn_range(start, start + pages);
        Allocation {
            range,
            shard,
            dirty: DirtyRanges::all_or_none(range, clean),
        }
    }

    /// Whether any page needs scrubbing.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Pages that need scrubbing.
    pub fn dirty_pages(&self) -> u64 {
        self.dirty.iter().map(PfnRange::len).sum()
    }
}

/// The dirty parts of an [`Allocation`]: a slice of ranges (it derefs to `[PfnRange]`).
///
/// Almost every allocation is wholly dirty or wholly clean, so up to one range is kept
/// inline and only an allocation that straddles clean and dirty memory needs the heap: an
/// allocation costs no heap allocation of its own.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DirtyRanges(Ranges);

#[derive(Clone, Default, PartialEq, Eq)]
enum Ranges {
    #[default]
    None,
    One(PfnRange),
    /// Two or more.
    Many(Vec<PfnRange>),
}

impl DirtyRanges {
    /// No dirty range.
    pub const fn new() -> DirtyRanges {
        DirtyRanges(Ranges::None)
    }

    /// All of `range` dirty, or none of it if it is `clean`.
    #[inline]
    pub(crate) fn all_or_none(range: PfnRange, clean: bool) -> DirtyRanges {
        if clean {
            DirtyRanges::new()
        } else {
            range.into()
        }
    }

    /// Appends `range`, which must come after (and not touch) every range already held.
    pub fn push(&mut self, range: PfnRange) {
        debug_assert!(self.last().is_none_or(|l| l.end() < range.start()));
        self.0 = match std::mem::take(&mut self.0) {
            Ranges::None => Ranges::One(range),
            Ranges::One(first) => Ranges::Many(vec![first, range]),
            Ranges::Many(mut all) => {
                all.push(range);
                Ranges::Many(all)
            }
        };
    }
}

impl From<PfnRange> for DirtyRanges {
    fn from(range: PfnRange) -> DirtyRanges {
        DirtyRanges(Ranges::One(range))
    }
}

impl std::ops::Deref for DirtyRanges {
    type Target = [PfnRange];
    fn deref(&self) -> &[PfnRange] {
        match &self.0 {
            Ranges::None => &[],
            Ranges::One(range) => std::slice::from_ref(range),
            Ranges::Many(all) => all,
        }
    }
}

impl<'a> IntoIterator for &'a DirtyRanges {
    type Item = &'a PfnRange;
    type IntoIter = std::slice::Iter<'a, PfnRange>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for DirtyRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq<[PfnRange]> for DirtyRanges {
    fn eq(&self, other: &[PfnRange]) -> bool {
        **self == *other
    }
}

impl PartialEq<Vec<PfnRange>> for DirtyRanges {
    fn eq(&self, other: &Vec<PfnRange>) -> bool {
        **self == **other
    }
}

impl From<DirtyRanges> for Vec<PfnRange> {
    fn from(ranges: DirtyRanges) -> Vec<PfnRange> {
        match ranges.0 {
            Ranges::None => Vec::new(),
            Ranges::One(range) => vec![range],
            Ranges::Many(all) => all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pfnstore_core::Pfn;

    fn range(start: u64, end: u64) -> PfnRange {
        PfnRange::new(Pfn(start), Pfn(end)).unwrap()
    }

    #[test]
    fn dirty_ranges_hold_one_inline_and_more_on_the_heap() {
        let mut dirty = DirtyRanges::new();
        assert!(dirty.is_empty());
        assert_eq!(dirty, Vec::new());
        dirty.push(range(1, 3));
        assert!(matches!(dirty.0, Ranges::One(_)));
        assert_eq!(dirty, vec![range(1, 3)]);
        dirty.push(range(5, 6));
        dirty.push(range(9, 12));
        let all = vec![range(1, 3), range(5, 6), range(9, 12)];
        assert_eq!(dirty, all);
        assert_eq!(IntoIterator::into_iter(&dirty).count(), 3);
        assert_eq!(format!("{dirty:?}"), format!("{all:?}"));
        assert_eq!(Vec::from(dirty), all);
        assert_eq!(DirtyRanges::from(range(4, 8)), vec![range(4, 8)]);
    }
}
