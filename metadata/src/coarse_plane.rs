//! Owner, quarantine, scrub state and pins of one chunk: attributes that change in large
//! ranges, kept as a canonical run list (inline when the chunk is uniform).

use crate::{Attributes, FileId, PinSet, QuarantineReason, Shareability};

/// The attributes other than shareability.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub(crate) struct Coarse {
    pub(crate) owner: Option<FileId>,
    pub(crate) quarantined: Option<QuarantineReason>,
    pub(crate) dirty: bool,
    pub(crate) pins: PinSet,
}

impl Coarse {
    /// What of these attributes constrains mappings (see [`crate::MappingAttributes`]).
    pub(crate) fn mapping_key(&self) -> Option<FileId> {
        self.owner
    }

    pub(crate) fn with_shareability(&self, shareability: Shareability) -> Attributes {
        Attributes {
            shareability,
            owner: self.owner,
            quarantined: self.quarantined,
            dirty: self.dirty,
            pins: self.pins.clone(),
        }
    }
}

/// Canonical: `Runs` has at least two runs, the first starts at offset 0, starts ascend,
/// adjacent runs differ, and the vector's capacity equals its length.
#[derive(Debug)]
pub(crate) enum CoarsePlane {
    Uniform(Coarse),
    // Boxed so that the variant is one pointer wide and a chunk slot stays one cache line.
    #[allow(clippy::box_collection)]
    Runs(Box<Vec<(u32, Coarse)>>),
}

impl CoarsePlane {
    fn runs(&self) -> &[(u32, Coarse)] {
        match self {
            CoarsePlane::Uniform(_) => &[],
            CoarsePlane::Runs(runs) => runs,
        }
    }

    pub(crate) fn is_uniform(&self) -> bool {
        matches!(self, CoarsePlane::Uniform(_))
    }

    pub(crate) fn at(&self, off: u32) -> &Coarse {
        match self {
            CoarsePlane::Uniform(c) => c,
            CoarsePlane::Runs(runs) => {
                // The first run starts at 0, so the index is at least 1 before subtracting.
                let i = runs.partition_point(|r| r.0 <= off) - 1;
                &runs[i].1
            }
        }
    }

    /// The runs that intersect `lo..hi`, clipped to it, as `(start, end, attributes)`.
    pub(crate) fn runs_in(
        &self,
        lo: u32,
        hi: u32,
        pages: u32,
    ) -> impl Iterator<Item = (u32, u32, &Coarse)> + '_ {
        let (single, runs) = match self {
            CoarsePlane::Uniform(c) => (Some((lo, hi, c)), &[][..]),
            CoarsePlane::Runs(runs) => (None, &runs[..]),
        };
        let first = runs.partition_point(|r| r.0 <= lo).saturating_sub(1);
        let listed = runs[first..]
            .iter()
            .enumerate()
            .map(move |(k, (start, c))| {
                let end = runs.get(first + k + 1).map_or(pages, |r| r.0);
                ((*start).max(lo), end.min(hi), c)
            })
            .take_while(move |&(start, _, _)| start < hi);
        single.into_iter().chain(listed)
    }

    /// The first run start `p` with `after < p < limit`; with `mapping_only`, only starts where
    /// the mapping attributes change.
    pub(crate) fn next_boundary(&self, after: u32, limit: u32, mapping_only: bool) -> Option<u32> {
        let runs = self.runs();
        let mut i = runs.partition_point(|r| r.0 <= after);
        while let Some((start, c)) = runs.get(i) {
            if *start >= limit {
                return None;
            }
            // `i >= 1` because run 0 starts at offset 0 <= after.
            if !mapping_only || runs[i - 1].1.mapping_key() != c.mapping_key() {
                return Some(*start);
            }
            i += 1;
        }
        None
    }

    /// Whether every run's mapping attributes are the same.
    pub(crate) fn mapping_uniform(&self) -> bool {
        let runs = self.runs();
        runs.windows(2)
            .all(|w| w[0].1.mapping_key() == w[1].1.mapping_key())
    }

    pub(crate) fn run_count(&self) -> usize {
        self.runs().len().max(1)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            CoarsePlane::Uniform(c) => c.pins.heap_bytes(),
            CoarsePlane::Runs(runs) => {
                std::mem::size_of::<Vec<(u32, Coarse)>>()
                    + runs.capacity() * std::mem::size_of::<(u32, Coarse)>()
                    + runs.iter().map(|r| r.1.pins.heap_bytes()).sum::<usize>()
            }
        }
    }

    /// Replaces the attributes of `lo..hi` by `f` of them and restores the canonical form.
    pub(crate) fn update(&mut self, lo: u32, hi: u32, pages: u32, f: impl Fn(&Coarse) -> Coarse) {
        if let CoarsePlane::Uniform(c) = self {
            let updated = f(c);
            if updated == *c {
                return;
            }
            if lo == 0 && hi == pages {
                *c = updated;
                return;
            }
        }
        let old = match std::mem::replace(self, CoarsePlane::Uniform(Coarse::default())) {
            CoarsePlane::Uniform(c) => vec![(0, c)],
            CoarsePlane::Runs(runs) => *runs,
        };
        let mut out: Vec<(u32, Coarse)> = Vec::with_capacity(old.len() + 2);
        let mut iter = old.into_iter().peekable();
        while let Some((start, c)) = iter.next() {
            let end = iter.peek().map_or(pages, |r| r.0);
            if end <= lo || start >= hi {
                out.push((start, c));
                continue;
            }
            if start < lo {
                out.push((start, c.clone()));
            }
            out.push((start.max(lo), f(&c)));
            if end > hi {
                out.push((hi, c));
            }
        }
        out.dedup_by(|next, prev| next.1 == prev.1);
        *self = if out.len() == 1 {
            CoarsePlane::Uniform(out.pop().expect("one run").1)
        } else {
            // Exact capacity keeps the byte count a function of the content alone.
            CoarsePlane::Runs(Box::new(out.into_boxed_slice().into_vec()))
        };
    }

    pub(crate) fn check_canonical(&self) -> Result<(), String> {
        let CoarsePlane::Runs(runs) = self else {
            return Ok(());
        };
        if runs.len() < 2 {
            return Err("a run list with fewer than two runs".into());
        }
        if runs[0].0 != 0 {
            return Err("the first run does not start at 0".into());
        }
        if runs.capacity() != runs.len() {
            return Err("run list capacity differs from its length".into());
        }
        if let Some(w) = runs
            .windows(2)
            .find(|w| w[0].0 >= w[1].0 || w[0].1 == w[1].1)
        {
            return Err(format!("runs not ascending or not merged: {w:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(f: u32) -> impl Fn(&Coarse) -> Coarse {
        move |c| Coarse {
            owner: Some(FileId(f)),
            ..c.clone()
        }
    }

    #[test]
    fn update_splits_and_merges_back() {
        let mut plane = CoarsePlane::Uniform(Coarse::default());
        plane.update(10, 20, 64, owned(1));
        assert_eq!(plane.run_count(), 3);
        plane.check_canonical().unwrap();
        assert_eq!(plane.at(15).owner, Some(FileId(1)));
        assert_eq!(plane.at(20).owner, None);
        assert_eq!(plane.next_boundary(0, 64, true), Some(10));
        assert_eq!(plane.next_boundary(10, 64, false), Some(20));
        assert_eq!(plane.next_boundary(10, 20, false), None);
        let runs: Vec<_> = plane.runs_in(5, 15, 64).map(|(s, e, _)| (s, e)).collect();
        assert_eq!(runs, vec![(5, 10), (10, 15)]);
        plane.update(0, 64, 64, |c| Coarse {
            owner: None,
            ..c.clone()
        });
        assert!(matches!(plane, CoarsePlane::Uniform(_)));
        assert_eq!(plane.heap_bytes(), 0);
    }

    #[test]
    fn dirty_boundaries_are_not_mapping_boundaries() {
        let mut plane = CoarsePlane::Uniform(Coarse::default());
        plane.update(8, 16, 64, |c| Coarse {
            dirty: true,
            ..c.clone()
        });
        assert!(plane.mapping_uniform());
        assert_eq!(plane.next_boundary(0, 64, true), None);
        assert_eq!(plane.next_boundary(0, 64, false), Some(8));
    }
}
