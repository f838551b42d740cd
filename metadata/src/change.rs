//! What a mutation changed in mapping terms: blocks that lost uniformity and blocks that
//! regained it.

use std::fmt;

use pfnstore_core::{BlockRun, Geometry, PageSize, Pfn};

use crate::inline_vec::InlineVec;

/// Consecutive blocks of one kind, as `(first block's PFN, count)`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct RunRecord {
    start: u64,
    count: u32,
    kind: Kind,
}

/// Which list a record belongs to.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Kind {
    #[default]
    SplitChunk,
    SplitMid,
    MergedChunk,
    MergedMid,
}

/// All records in one small vector (kept small so that the result moves cheaply): the common
/// 4K conversion records two.
type Runs = InlineVec<RunRecord, 3>;

/// The blocks whose mapping uniformity a mutation changed.
///
/// A *split* block was mapping-uniform before the call and is not after it: a user that maps
/// it with one large mapping must replace that mapping by smaller ones (see
/// [`crate::MetadataStore::block_plan`]). A *merged* block was not uniform before and is after:
/// it may now be mapped large. Only chunk (1G) and middle (2M) blocks are reported — a 4K block
/// is always uniform — and each level is reported on its own: converting one page of a uniform
/// chunk splits the chunk and the one middle block that holds the page, nothing else; the other
/// middle blocks stay uniform. Consecutive blocks of one level are given as one [`BlockRun`].
///
/// Both lists are empty when no mapping attribute changed (pins, dirty state, or a change that
/// leaves every block as uniform as it was).
#[derive(Clone)]
pub struct MappingChange {
    geometry: Geometry,
    records: Runs,
}

/// Which way a block's uniformity went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Transition {
    Split,
    Merge,
}

impl MappingChange {
    pub(crate) fn new(geometry: Geometry) -> MappingChange {
        MappingChange {
            geometry,
            records: Runs::default(),
        }
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Records one block; blocks of a level must be recorded in ascending order.
    pub(crate) fn record(&mut self, transition: Transition, size: PageSize, start: Pfn) {
        let kind = match (transition, size) {
            (Transition::Split, PageSize::Size1G) => Kind::SplitChunk,
            (Transition::Split, _) => Kind::SplitMid,
            (Transition::Merge, PageSize::Size1G) => Kind::MergedChunk,
            (Transition::Merge, _) => Kind::MergedMid,
        };
        let pages = self.geometry.pages(size);
        if let Some(last) = self.records.last_of(|r| r.kind == kind)
            && last.start + u64::from(last.count) * pages == start.0
            && last.count < u32::MAX
        {
            last.count += 1;
            return;
        }
        self.records.push(RunRecord {
            start: start.0,
            count: 1,
            kind,
        });
    }

    /// Records the middle blocks of the chunk at `base` listed in `after` but not in `before`
    /// (both ascending) as splits, and the reverse as merges.
    #[inline]
    pub(crate) fn record_mid_diff(
        &mut self,
        base: Pfn,
        before: impl Iterator<Item = u32>,
        after: impl Iterator<Item = u32>,
    ) {
        let mid_order = self.geometry.order(PageSize::Size2M);
        let at = |mid: u32| Pfn(base.0 + (u64::from(mid) << mid_order));
        let (mut b, mut a) = (before.peekable(), after.peekable());
        loop {
            match (b.peek().copied(), a.peek().copied()) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => {
                    b.next();
                    a.next();
                }
                (Some(x), y) if y.is_none_or(|y| x < y) => {
                    self.record(Transition::Merge, PageSize::Size2M, at(x));
                    b.next();
                }
                (_, Some(y)) => {
                    self.record(Transition::Split, PageSize::Size2M, at(y));
                    a.next();
                }
                (Some(_), None) => unreachable!("covered by the arm above"),
            }
        }
    }

    /// Blocks that lost their uniformity: chunk runs first, then middle-block runs, each
    /// ascending.
    pub fn splits(&self) -> impl Iterator<Item = BlockRun> + '_ {
        self.runs(Kind::SplitChunk, Kind::SplitMid)
    }

    /// Blocks that became uniform again: chunk runs first, then middle-block runs, each
    /// ascending.
    pub fn merges(&self) -> impl Iterator<Item = BlockRun> + '_ {
        self.runs(Kind::MergedChunk, Kind::MergedMid)
    }

    /// Whether no block changed its uniformity.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn runs(&self, chunks: Kind, mids: Kind) -> impl Iterator<Item = BlockRun> + '_ {
        let geometry = self.geometry;
        let records = self.records.as_slice();
        let of = move |kind: Kind, size: PageSize| {
            records
                .iter()
                .filter(move |r| r.kind == kind)
                .map(move |r| (size, r))
        };
        of(chunks, PageSize::Size1G)
            .chain(of(mids, PageSize::Size2M))
            .map(move |(size, r)| {
                BlockRun::new(&geometry, Pfn(r.start), size, u64::from(r.count))
                    .expect("recorded blocks are aligned blocks of managed chunks below PFN_LIMIT")
            })
    }
}

/// Equal when the same blocks split and merged (however the records were interleaved).
impl PartialEq for MappingChange {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && self.splits().eq(other.splits())
            && self.merges().eq(other.merges())
    }
}

impl Eq for MappingChange {}

impl fmt::Debug for MappingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappingChange")
            .field("splits", &self.splits().collect::<Vec<_>>())
            .field("merges", &self.merges().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_blocks_coalesce_per_level() {
        let g = Geometry::new(3, 6).unwrap();
        let mut c = MappingChange::new(g);
        assert!(c.is_empty());
        c.record(Transition::Split, PageSize::Size2M, Pfn(8));
        c.record(Transition::Split, PageSize::Size2M, Pfn(16));
        c.record(Transition::Split, PageSize::Size2M, Pfn(32));
        c.record(Transition::Split, PageSize::Size1G, Pfn(0));
        c.record(Transition::Merge, PageSize::Size1G, Pfn(64));
        c.record(Transition::Merge, PageSize::Size1G, Pfn(128));
        let splits: Vec<_> = c
            .splits()
            .map(|r| (r.start().0, r.size(), r.count()))
            .collect();
        assert_eq!(
            splits,
            vec![
                (0, PageSize::Size1G, 1),
                (8, PageSize::Size2M, 2),
                (32, PageSize::Size2M, 1)
            ]
        );
        let merges: Vec<_> = c.merges().map(|r| (r.start().0, r.count())).collect();
        assert_eq!(merges, vec![(64, 2)]);
        assert!(!c.is_empty());
    }
}
