//! The geometry reduced to the two block sizes placement works with, and the capacities of a
//! free run that the placement rules search by.

use pfnstore_core::Geometry;

/// Pages in a middle block and in a chunk (both powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub mid: u64,
    pub chunk: u64,
}

impl Shape {
    pub(crate) fn new(geometry: &Geometry) -> Shape {
        Shape {
            mid: geometry.mid_pages(),
            chunk: geometry.chunk_pages(),
        }
    }
}

/// `x` rounded up to a multiple of `align` (a power of two). Callers only pass PFNs below
/// `PFN_LIMIT`, which is aligned to every block size, so this never overflows.
pub(crate) const fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

/// `x` rounded down to a multiple of `align` (a power of two).
pub(crate) const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// One capacity of a free run; the tree keeps the maximum of each over every subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    /// Pages in the run.
    Len = 0,
    /// Pages from the run's first mid-aligned PFN to its end.
    Mid = 1,
    /// Pages from the run's first chunk-aligned PFN to its end.
    Chunk = 2,
    /// The largest piece a small request can take without splitting a whole free mid block:
    /// the whole run if it holds no whole mid block, else the larger of its two unaligned ends.
    Sliver = 3,
    /// The largest mid-aligned capacity outside whole free chunks: `Mid` if the run holds no
    /// whole chunk, else the larger of the mid-aligned part before its first whole chunk and
    /// the part after its last one.
    PartialMid = 4,
}

/// Number of [`Field`]s.
pub(crate) const FIELDS: usize = 5;

/// The capacities of a run, indexed by [`Field`].
pub(crate) type Capacities = [u64; FIELDS];

/// Where the whole mid blocks and whole chunks of a run `[start, end)` lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunShape {
    pub start: u64,
    pub end: u64,
    /// First mid-aligned PFN at or after `start` (may be past `end`).
    pub mid_start: u64,
    /// Last mid-aligned PFN at or before `end`.
    pub mid_end: u64,
    /// First chunk-aligned PFN at or after `start` (may be past `end`).
    pub chunk_start: u64,
    /// Last chunk-aligned PFN at or before `end`.
    pub chunk_end: u64,
}

impl RunShape {
    pub(crate) fn new(shape: Shape, start: u64, end: u64) -> RunShape {
        debug_assert!(start < end);
        RunShape {
            start,
            end,
            mid_start: align_up(start, shape.mid),
            mid_end: align_down(end, shape.mid),
            chunk_start: align_up(start, shape.chunk),
            chunk_end: align_down(end, shape.chunk),
        }
    }

    pub(crate) fn has_whole_mid(&self) -> bool {
        self.mid_start < self.mid_end
    }

    pub(crate) fn has_whole_chunk(&self) -> bool {
        self.chunk_start < self.chunk_end
    }

    /// Whole mid blocks in the run.
    pub(crate) fn whole_mids(&self, shape: Shape) -> u64 {
        if self.has_whole_mid() {
            (self.mid_end - self.mid_start) >> shape.mid.trailing_zeros()
        } else {
            0
        }
    }

    /// Whole chunks in the run.
    pub(crate) fn whole_chunks(&self, shape: Shape) -> u64 {
        if self.has_whole_chunk() {
            (self.chunk_end - self.chunk_start) >> shape.chunk.trailing_zeros()
        } else {
            0
        }
    }

    /// Mid-aligned pages before the first whole chunk (0 without one).
    pub(crate) fn head_mid_capacity(&self) -> u64 {
        self.chunk_start.saturating_sub(self.mid_start)
    }

    pub(crate) fn capacities(&self) -> Capacities {
        let len = self.end - self.start;
        let mid = self.end.saturating_sub(self.mid_start);
        let chunk = self.end.saturating_sub(self.chunk_start);
        let sliver = if self.has_whole_mid() {
            (self.mid_start - self.start).max(self.end - self.mid_end)
        } else {
            len
        };
        let partial_mid = if self.has_whole_chunk() {
            self.head_mid_capacity().max(self.end - self.chunk_end)
        } else {
            mid
        };
        [len, mid, chunk, sliver, partial_mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Shape = Shape { mid: 8, chunk: 64 };

    #[test]
    fn capacities_of_typical_runs() {
        // A whole chunk: every capacity is the chunk, no sliver.
        let c = RunShape::new(S, 64, 128).capacities();
        assert_eq!(c, [64, 64, 64, 0, 0]);
        // A fragment inside one mid block: everything is sliver.
        let f = RunShape::new(S, 3, 6).capacities();
        assert_eq!(f, [3, 0, 0, 3, 0]);
        // Head sliver 5, two mid blocks, no chunk: partial-mid capacity is the mid capacity.
        let m = RunShape::new(S, 3, 24).capacities();
        assert_eq!(m, [21, 16, 0, 5, 16]);
        // Sliver 3, one mid block, a whole chunk, a tail of 10 pages (one mid block + 2).
        let r = RunShape::new(S, 53, 138);
        assert_eq!(r.capacities(), [85, 82, 74, 3, 10]);
        assert_eq!((r.whole_mids(S), r.whole_chunks(S)), (10, 1));
    }
}
