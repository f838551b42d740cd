//! Conversion plans: which blocks every subscriber unmaps, and which it maps afterwards.

use pfnstore_core::{BlockRun, Geometry, PfnRange};

use crate::MappingAttributes;

/// A run of equal-sized aligned blocks with uniform mapping attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    /// The blocks.
    pub run: BlockRun,
    /// Their mapping attributes (before the change for unmap entries, after it for map entries).
    pub attributes: MappingAttributes,
}

/// What a change means for everyone who maps the memory: unmap these blocks (as they were
/// mapped), then map these (as they may be mapped now).
///
/// Both lists tile the same region, the *affected region*: the requested range widened to the
/// blocks that split or merged. They are lists of runs, so a 4 KiB conversion inside a uniform
/// 1 GiB is one unmap entry (the 1 GiB) and a handful of map entries (511 x 2 MiB + 512 x
/// 4 KiB), never a per-page list, unless the memory really is fragmented at 4 KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversionPlan {
    pub(crate) region: Option<PfnRange>,
    pub(crate) unmap: Vec<PlanEntry>,
    pub(crate) map: Vec<PlanEntry>,
}

impl ConversionPlan {
    /// The affected region; `None` for a change that affected no mapping.
    pub fn region(&self) -> Option<PfnRange> {
        self.region
    }

    /// Blocks to unmap, as they were mapped before, lowest address first.
    pub fn unmap(&self) -> &[PlanEntry] {
        &self.unmap
    }

    /// Blocks that may be mapped after the change, lowest address first.
    pub fn map(&self) -> &[PlanEntry] {
        &self.map
    }

    /// Number of blocks (not runs) to unmap.
    pub fn unmap_blocks(&self) -> u64 {
        self.unmap.iter().map(|e| e.run.count()).sum()
    }

    /// Number of blocks (not runs) to map.
    pub fn map_blocks(&self) -> u64 {
        self.map.iter().map(|e| e.run.count()).sum()
    }

    /// Whether nothing needs unmapping or mapping.
    pub fn is_empty(&self) -> bool {
        self.unmap.is_empty() && self.map.is_empty()
    }

    /// Checks that both lists tile the region exactly (for tests and debug assertions).
    pub fn check_tiles(&self, geometry: &Geometry) -> Result<(), String> {
        let Some(region) = self.region else {
            return if self.is_empty() {
                Ok(())
            } else {
                Err("entries without a region".into())
            };
        };
        for (name, list) in [("unmap", &self.unmap), ("map", &self.map)] {
            let mut next = region.start();
            for entry in list {
                let run = entry.run.range(geometry);
                if run.start() != next {
                    return Err(format!(
                        "{name} list: gap or overlap at {next} (run starts at {})",
                        run.start()
                    ));
                }
                next = run.end();
            }
            if next != region.end() {
                return Err(format!(
                    "{name} list ends at {next}, region at {}",
                    region.end()
                ));
            }
        }
        Ok(())
    }
}
