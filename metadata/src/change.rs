//! What a mutation changed in mapping terms: blocks that lost uniformity and blocks that
//! regained it.

use std::fmt;

use pfnstore_core::{BlockRun, Geometry, PageSize, Pfn};

use crate::fast_convert::SmallChange;
use crate::inline_vec::InlineVec;
use crate::packed::Packed4;

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

/// All records in one small vector (kept small so that the result moves cheaply).
type Runs = InlineVec<RunRecord, 3>;

/// The two forms of a change.
#[derive(Clone)]
enum Records {
    /// A fast-path conversion inside the chunk at `base` ([`crate::fast_convert`]): kept as
    /// computed, in a few words that are written straight from registers, and decoded into
    /// runs only when read. (Building run records in an array and moving them into the
    /// caller's result stalled on store forwarding, and cost more than the conversion.)
    Chunk { base: u64, change: SmallChange },
    /// Any other mutation: run records, and where the last record of each kind is (its
    /// index + 1, 0 for none, by `Kind as usize`). Without it a bulk change that records each
    /// chunk's split after its middle blocks' searched back over every middle-block record so
    /// far: quadratic in the chunks of a store rebuilt in a live update.
    Runs { runs: Runs, tails: [u32; 4] },
}

/// The blocks whose mapping uniformity a mutation changed.
///
/// A *split* block was mapping-uniform before the call and is not after it: a user that maps
/// it with one large mapping must replace that mapping by smaller ones (see
/// [`crate::MetadataStore::block_layout`]). A *merged* block was not uniform before and is after:
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
    records: Records,
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
            records: Records::Runs {
                runs: Runs::default(),
                tails: [0; 4],
            },
        }
    }

    /// The change a fast-path conversion of the chunk at `base` made.
    #[inline]
    pub(crate) fn from_small(geometry: Geometry, base: Pfn, change: SmallChange) -> MappingChange {
        MappingChange {
            geometry,
            records: Records::Chunk {
                base: base.0,
                change,
            },
        }
    }

    /// The run records and the tails of their kinds, converting a fast-path change into them
    /// first.
    fn runs_mut(&mut self) -> (&mut Runs, &mut [u32; 4]) {
        if let Records::Chunk { .. } = self.records {
            let mut runs = Runs::default();
            let mut tails = [0u32; 4];
            for (kind, run) in self.all_runs() {
                runs.push(RunRecord {
                    start: run.start().0,
                    count: run.count() as u32,
                    kind,
                });
                tails[kind as usize] = runs.as_slice().len() as u32;
            }
            self.records = Records::Runs { runs, tails };
        }
        match &mut self.records {
            Records::Runs { runs, tails } => (runs, tails),
            Records::Chunk { .. } => unreachable!("converted above"),
        }
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
        let (runs, tails) = self.runs_mut();
        let tail = tails[kind as usize] as usize;
        if let Some(last) = tail.checked_sub(1).and_then(|i| runs.get_mut(i))
            && last.start + u64::from(last.count) * pages == start.0
            && last.count < u32::MAX
        {
            last.count += 1;
            return;
        }
        runs.push(RunRecord {
            start: start.0,
            count: 1,
            kind,
        });
        tails[kind as usize] = runs.as_slice().len() as u32;
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
        self.runs_of(Kind::SplitChunk, Kind::SplitMid)
    }

    /// Blocks that became uniform again: chunk runs first, then middle-block runs, each
    /// ascending.
    pub fn merges(&self) -> impl Iterator<Item = BlockRun> + '_ {
        self.runs_of(Kind::MergedChunk, Kind::MergedMid)
    }

    /// Whether no block changed its uniformity.
    pub fn is_empty(&self) -> bool {
        match &self.records {
            Records::Chunk { change, .. } => *change == SmallChange::default(),
            Records::Runs { runs, .. } => runs.is_empty(),
        }
    }

    /// The runs of kinds `chunks` then `mids`, in that order.
    fn runs_of(&self, chunks: Kind, mids: Kind) -> impl Iterator<Item = BlockRun> + '_ {
        let all = move |kind: Kind| {
            self.all_runs()
                .filter(move |(k, _)| *k == kind)
                .map(|(_, run)| run)
        };
        all(chunks).chain(all(mids))
    }

    /// Every run with its kind, in the order of the records (kinds interleaved, each kind
    /// ascending).
    fn all_runs(&self) -> impl Iterator<Item = (Kind, BlockRun)> + '_ {
        let geometry = self.geometry;
        let block = move |start: u64, size: PageSize, count: u64| {
            BlockRun::new(&geometry, Pfn(start), size, count)
                .expect("recorded blocks are aligned blocks of managed chunks below PFN_LIMIT")
        };
        let (records, small) = match &self.records {
            Records::Runs { runs, .. } => (runs.as_slice(), None),
            Records::Chunk { base, change } => (&[][..], Some((*base, *change))),
        };
        let from_records = records.iter().map(move |r| {
            let size = match r.kind {
                Kind::SplitChunk | Kind::MergedChunk => PageSize::Size1G,
                Kind::SplitMid | Kind::MergedMid => PageSize::Size2M,
            };
            (r.kind, block(r.start, size, u64::from(r.count)))
        });
        let from_small = small.into_iter().flat_map(move |(base, change)| {
            let chunk = change.chunk_split.map(|split| {
                let kind = if split {
                    Kind::SplitChunk
                } else {
                    Kind::MergedChunk
                };
                (kind, block(base, PageSize::Size1G, 1))
            });
            let mid_order = geometry.order(PageSize::Size2M);
            let mids = move |mids: Packed4, kind: Kind| {
                MidRuns { mids, next: 0 }.map(move |(first, count)| {
                    let start = base + (u64::from(first) << mid_order);
                    (kind, block(start, PageSize::Size2M, u64::from(count)))
                })
            };
            chunk
                .into_iter()
                .chain(mids(change.split_mids, Kind::SplitMid))
                .chain(mids(change.merged_mids, Kind::MergedMid))
        });
        from_records.chain(from_small)
    }
}

/// Runs of consecutive middle blocks in an ascending list: `(first, count)`.
struct MidRuns {
    mids: Packed4,
    next: usize,
}

impl Iterator for MidRuns {
    type Item = (u32, u32);

    fn next(&mut self) -> Option<(u32, u32)> {
        let mut rest = self.mids.iter().skip(self.next);
        let first = rest.next()?;
        let count = 1 + rest
            .zip(first + 1..)
            .take_while(|(mid, want)| mid == want)
            .count() as u32;
        self.next += count as usize;
        Some((first, count))
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

    fn packed(values: &[u32]) -> Packed4 {
        let mut p = Packed4::default();
        for &v in values {
            p.push(v).unwrap();
        }
        p
    }

    /// A fast-path change reads like the same blocks recorded one by one, and can be
    /// extended by `record` afterwards.
    #[test]
    fn fast_path_changes_read_like_recorded_ones() {
        let g = Geometry::new(3, 6).unwrap();
        let base = Pfn(128);
        let small = SmallChange {
            chunk_split: Some(true),
            split_mids: packed(&[1, 2, 5]),
            merged_mids: packed(&[3, 7]),
        };
        let mut fast = MappingChange::from_small(g, base, small);
        let mut recorded = MappingChange::new(g);
        recorded.record(Transition::Split, PageSize::Size1G, base);
        for (transition, mid) in [
            (Transition::Split, 1),
            (Transition::Split, 2),
            (Transition::Merge, 3),
            (Transition::Split, 5),
            (Transition::Merge, 7),
        ] {
            recorded.record(transition, PageSize::Size2M, Pfn(base.0 + mid * 8));
        }
        assert_eq!(fast, recorded);
        let splits: Vec<_> = fast.splits().map(|r| (r.start().0, r.count())).collect();
        assert_eq!(splits, vec![(128, 1), (136, 2), (168, 1)]);
        assert!(!fast.is_empty());
        assert!(MappingChange::from_small(g, base, SmallChange::default()).is_empty());
        // Recording onto a fast-path change keeps what it had.
        fast.record(Transition::Merge, PageSize::Size1G, Pfn(256));
        recorded.record(Transition::Merge, PageSize::Size1G, Pfn(256));
        assert_eq!(fast, recorded);
        assert_eq!(fast.merges().count(), 3);
    }
}
