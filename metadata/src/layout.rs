//! Block layouts: how a range is mapped with the largest blocks its attributes allow.

use pfnstore_core::{BlockRun, Geometry, Pfn, PfnRange};

use crate::MappingAttributes;

/// Maximal runs of equal mapping attributes, built in ascending order.
#[derive(Default)]
pub(crate) struct RunCollector {
    runs: Vec<(Pfn, Pfn, MappingAttributes)>,
}

impl RunCollector {
    /// An empty collector with room for a few runs (most plans have one to three).
    pub(crate) fn new() -> RunCollector {
        RunCollector {
            runs: Vec::with_capacity(4),
        }
    }

    /// Appends `start..end`; merges it into the previous run when contiguous and equal.
    pub(crate) fn push(&mut self, start: Pfn, end: Pfn, attrs: MappingAttributes) {
        if let Some(last) = self.runs.last_mut()
            && last.1 == start
            && last.2 == attrs
        {
            last.1 = end;
            return;
        }
        self.runs.push((start, end, attrs));
    }

    pub(crate) fn finish(self) -> Vec<(Pfn, Pfn, MappingAttributes)> {
        self.runs
    }
}

/// The maximal naturally aligned blocks whose mapping attributes are uniform, covering
/// exactly the range asked for, ascending.
///
/// Each maximal run of equal mapping attributes is decomposed into aligned blocks
/// ([`Geometry::block_runs`]), so consecutive equal-sized blocks come as one [`BlockRun`]: one
/// 4K page converted inside a uniform 1G chunk gives five runs (2M blocks before the page's
/// middle block, 4K pages up to it, the page, 4K pages after it, 2M blocks after), describing
/// 511 2M blocks and 512 4K blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    geometry: Geometry,
    runs: Vec<(BlockRun, MappingAttributes)>,
}

impl BlockLayout {
    pub(crate) fn from_runs(
        geometry: Geometry,
        uniform_runs: Vec<(Pfn, Pfn, MappingAttributes)>,
    ) -> BlockLayout {
        // A uniform run decomposes into at most five block runs.
        let mut runs = Vec::with_capacity(uniform_runs.len() * 5);
        for (start, end, attrs) in uniform_runs {
            let range = PfnRange::new(start, end)
                .expect("collected runs are non-empty pieces of a valid range");
            runs.extend(geometry.block_runs(range).map(|run| (run, attrs)));
        }
        BlockLayout { geometry, runs }
    }

    /// The runs of blocks, ascending, with their mapping attributes.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (BlockRun, MappingAttributes)> + '_ {
        self.runs.iter().copied()
    }

    /// Number of runs (not blocks).
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether the plan has no run (never true for a plan of a valid range).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The geometry the blocks are sized in.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}

impl IntoIterator for BlockLayout {
    type Item = (BlockRun, MappingAttributes);
    type IntoIter = std::vec::IntoIter<(BlockRun, MappingAttributes)>;

    fn into_iter(self) -> Self::IntoIter {
        self.runs.into_iter()
    }
}
