//! Changes of many ranges at once, one pass per chunk. Rebuilding a store (a live update)
//! sets the shareability of millions of ranges; one [`MetadataStore::set_shareability`] per
//! range would rebuild a fragmented chunk's flip list once per range, quadratic in its flips.

use std::borrow::Cow;

use pfnstore_core::{Pfn, PfnRange};

use super::MetadataStore;
use super::mutations::may_change_shareability;
use crate::{MappingChange, MetadataError, Shareability};

impl MetadataStore {
    /// Sets the shareability of every page of `ranges` to `to`: what one
    /// [`MetadataStore::set_shareability`] per range does, in one pass over each chunk they
    /// touch. The ranges may come in any order, overlap and touch.
    ///
    /// All or nothing: with every chunk touched write-locked, it is refused with nothing changed
    /// if a page of the ranges is outside the span or in a chunk not managed (the first such
    /// range's), or pinned or quarantined (the first such page in PFN order).
    pub fn set_shareability_of(
        &self,
        ranges: &[PfnRange],
        to: Shareability,
    ) -> Result<MappingChange, MetadataError> {
        let ranges = self.merged(ranges)?;
        let mut change = MappingChange::new(self.geometry);
        let Some(last) = ranges.last() else {
            return Ok(change);
        };
        // Every chunk a range touches, ascending (the lock order), with its ranges' indices.
        let mut chunks: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, range) in ranges.iter().enumerate() {
            for index in self.slot_index(range.start())..=self.slot_index(range.last()) {
                match chunks.last_mut() {
                    Some((at, members)) if *at == index => members.end = i + 1,
                    _ => chunks.push((index, i..i + 1)),
                }
            }
        }
        debug_assert!(chunks.last().map(|c| c.0) == Some(self.slot_index(last.last())));
        let mut guards: Vec<_> = chunks
            .iter()
            .map(|(index, _)| self.slots[*index].state.write())
            .collect();
        let pages = self.chunk_pages();
        for ((index, members), guard) in chunks.iter().zip(&guards) {
            if guard.is_none() {
                let first = ranges[members.start];
                return Err(MetadataError::NotManaged {
                    pfn: first.start().max(self.chunk_base(*index)),
                });
            }
        }
        for ((index, members), guard) in chunks.iter().zip(&guards) {
            let chunk = guard.as_ref().expect("checked above");
            let base = self.chunk_base(*index).0;
            for range in &ranges[members.clone()] {
                let (lo, hi) = self.clip(*range, *index);
                for (start, _, c) in chunk.coarse.runs_in(lo, hi, pages) {
                    may_change_shareability(Pfn(base + u64::from(start)), c)?;
                }
            }
        }
        let shape = self.plane_shape();
        let mut offsets: Vec<(u32, u32)> = Vec::new();
        for ((index, members), guard) in chunks.iter().zip(&mut guards) {
            let chunk = guard.as_mut().expect("checked above");
            offsets.clear();
            offsets.extend(
                ranges[members.clone()]
                    .iter()
                    .map(|range| self.clip(*range, *index)),
            );
            let span = (offsets[0].0, offsets[offsets.len() - 1].1);
            self.change_chunk(*index, chunk, span, &mut change, |chunk| {
                chunk.share.set_many(&offsets, to, shape)
            });
        }
        Ok(change)
    }

    /// `ranges` sorted, with overlapping and touching ones merged; each checked to lie in the
    /// span. Ranges already so (a rebuilt store's, millions of them) are not copied.
    fn merged<'a>(&self, ranges: &'a [PfnRange]) -> Result<Cow<'a, [PfnRange]>, MetadataError> {
        for range in ranges {
            range.check_within(&self.span)?;
        }
        if ranges.windows(2).all(|w| w[0].end() < w[1].start()) {
            return Ok(Cow::Borrowed(ranges));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable_by_key(|r| r.start());
        let mut merged: Vec<PfnRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            match merged.last_mut() {
                Some(last) if last.end() >= range.start() => *last = last.hull(&range),
                _ => merged.push(range),
            }
        }
        Ok(Cow::Owned(merged))
    }
}
