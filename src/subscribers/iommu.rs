//! A DMA mapper (iommufd, vfio type1), with the mapping policies VMMs use.

use std::collections::BTreeMap;

use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, OffsetRange, PAGE_SIZE, PageOffset, PageSize};

use super::{Injected, Misbehaviour};
use crate::metadata::conversion::{Change, MappingPlan, Subscriber, UnmapError, Veto};
use crate::{FileId, Shareability};

/// How a DMA mapper turns plans into IOMMU mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaPolicy {
    /// One mapping per block of the plans (iommufd mapping the plan exactly): few mappings
    /// for uniform memory, but a 4 KiB conversion inside 1 GiB costs 1,022 map calls.
    Blocks,
    /// One mapping per maximal shared run, cut at every multiple of the boundary (vfio
    /// type1, which cannot unmap part of a mapping): a conversion remaps at most one window
    /// of the boundary on each side, and live mappings stay near shared bytes / boundary.
    Runs(PageSize),
    /// One mapping per shared 4 KiB page (QEMU's and cloud-hypervisor's policy today): the
    /// reference point. Counted, not stored.
    PerPage,
}

/// What a mapper did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapperStats {
    /// Live IOMMU mappings now.
    pub mappings: u64,
    /// The most live mappings at any time.
    pub max_mappings: u64,
    /// `MAP_DMA` calls.
    pub map_calls: u64,
    /// `UNMAP_DMA` calls.
    pub unmap_calls: u64,
    /// Bytes mapped, summed over calls.
    pub bytes_mapped: u64,
    /// Bytes unmapped, summed over calls.
    pub bytes_unmapped: u64,
}

/// Maps the shared memory of the files it hears about into an IOMMU, as a VMM maps guest
/// memory for a device. See the [module docs](super).
#[derive(Debug)]
pub struct IommuMapper {
    name: String,
    geometry: Geometry,
    policy: DmaPolicy,
    /// Refuse conversions that would take live mappings above this (a `dma_entry_limit`).
    budget: Option<u64>,
    state: Mutex<State>,
    injected: Injected,
}

#[derive(Debug, Default)]
struct State {
    /// (file, first page) -> pages of the mapping (not kept for `PerPage`).
    mappings: BTreeMap<(FileId, u64), u64>,
    stats: MapperStats,
    violations: Vec<String>,
    /// What the `unmap` of each change under way removed (by file and first page of the
    /// plan's region; concurrent changes of one file lie in different chunks): what a
    /// `restore` maps back.
    unmapped: BTreeMap<(FileId, u64), Vec<OffsetRange>>,
}

impl IommuMapper {
    /// A mapper that maps the plans' blocks, for a store of `geometry`.
    pub fn new(name: impl Into<String>, geometry: Geometry) -> IommuMapper {
        IommuMapper::with_policy(name, geometry, DmaPolicy::Blocks)
    }

    /// A mapper with `policy`.
    pub fn with_policy(
        name: impl Into<String>,
        geometry: Geometry,
        policy: DmaPolicy,
    ) -> IommuMapper {
        IommuMapper {
            name: name.into(),
            geometry,
            policy,
            budget: None,
            state: Mutex::new(State::default()),
            injected: Injected::default(),
        }
    }

    /// Vetoes conversions that would need more than `mappings` live mappings (vfio type1's
    /// `dma_entry_limit`, vDPA's IOTLB size).
    pub fn with_budget(mut self, mappings: u64) -> IommuMapper {
        self.budget = Some(mappings);
        self
    }

    /// Current number of IOMMU mappings.
    pub fn mappings(&self) -> u64 {
        self.state.lock().stats.mappings
    }

    /// Everything counted so far.
    pub fn stats(&self) -> MapperStats {
        self.state.lock().stats
    }

    /// Rule violations seen (empty if every plan was exact).
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().violations.clone()
    }

    /// The mapping that covers `page` of `file`, if any.
    pub fn mapping_at(&self, file: FileId, page: PageOffset) -> Option<OffsetRange> {
        let state = self.state.lock();
        let (&(f, start), &pages) = state.mappings.range(..=(file, page.0)).next_back()?;
        let range = OffsetRange::from_len(PageOffset(start), pages).ok()?;
        (f == file && range.contains(page)).then_some(range)
    }

    /// Injects misbehaviour.
    pub fn inject(&self, m: Misbehaviour) {
        self.injected.set(m);
    }

    /// The shared pieces of a plan's unmap or map list, as this mapper maps them.
    fn pieces(&self, plan: &MappingPlan, unmap: bool) -> Vec<OffsetRange> {
        let shared = |s: &Shareability| *s == Shareability::Shared;
        match self.policy {
            DmaPolicy::Blocks | DmaPolicy::PerPage => {
                let list = if unmap { plan.unmap() } else { plan.map() };
                list.iter()
                    .filter(|e| shared(&e.shareability))
                    .flat_map(|e| {
                        let g = self.geometry;
                        e.run.blocks(&g).map(move |b| b.range(&g))
                    })
                    .collect()
            }
            DmaPolicy::Runs(boundary) => {
                let runs = if unmap {
                    plan.unmap_runs(boundary)
                } else {
                    plan.map_runs(boundary)
                };
                runs.filter(|(_, s)| shared(s)).map(|(r, _)| r).collect()
            }
        }
    }

    fn add(&self, state: &mut State, file: FileId, pieces: &[OffsetRange]) {
        for range in pieces {
            if self.policy == DmaPolicy::PerPage {
                state.stats.mappings += range.len();
                state.stats.map_calls += range.len();
                state.stats.bytes_mapped += range.len() * PAGE_SIZE;
                continue;
            }
            let key = (file, range.start().0);
            if let Some(existing) = overlapping(state, file, *range).first() {
                state.violations.push(format!(
                    "{}: map of {range} over the existing mapping {existing} of {file}",
                    self.name
                ));
                continue;
            }
            state.mappings.insert(key, range.len());
            state.stats.mappings += 1;
            state.stats.map_calls += 1;
            state.stats.bytes_mapped += range.len() * PAGE_SIZE;
        }
        state.stats.max_mappings = state.stats.max_mappings.max(state.stats.mappings);
    }

    /// Unmaps `pieces`; iommufd and vfio type1 refuse an unmap that does not name a whole
    /// earlier mapping: that is a violation of the plan.
    fn remove(&self, state: &mut State, file: FileId, pieces: &[OffsetRange]) {
        for range in pieces {
            if self.policy == DmaPolicy::PerPage {
                state.stats.mappings = state.stats.mappings.saturating_sub(range.len());
                state.stats.unmap_calls += range.len();
                state.stats.bytes_unmapped += range.len() * PAGE_SIZE;
                continue;
            }
            if state.mappings.get(&(file, range.start().0)) != Some(&range.len()) {
                let held = overlapping(state, file, *range);
                state.violations.push(format!(
                    "{}: unmap of {range} of {file} does not name one earlier mapping (holds {held:?})",
                    self.name
                ));
                for m in held {
                    state.mappings.remove(&(file, m.start().0));
                    state.stats.mappings -= 1;
                }
                continue;
            }
            state.mappings.remove(&(file, range.start().0));
            state.stats.mappings -= 1;
            state.stats.unmap_calls += 1;
            state.stats.bytes_unmapped += range.len() * PAGE_SIZE;
        }
    }
}

/// Identifies a change under way for this subscriber.
fn change_key(change: &Change<'_>) -> (FileId, u64) {
    let first = change
        .plan
        .region()
        .map_or(change.range.start(), |r| r.start());
    (change.file, first.0)
}

fn overlapping(state: &State, file: FileId, range: OffsetRange) -> Vec<OffsetRange> {
    let mut out = Vec::new();
    if let Some((&(f, start), &pages)) =
        state.mappings.range(..=(file, range.start().0)).next_back()
        && f == file
        && let Ok(m) = OffsetRange::from_len(PageOffset(start), pages)
        && m.overlaps(&range)
    {
        out.push(m);
    }
    for (&(_, start), &pages) in state
        .mappings
        .range((file, range.start().0 + 1)..(file, range.end().0))
    {
        if let Ok(m) = OffsetRange::from_len(PageOffset(start), pages) {
            out.push(m);
        }
    }
    out
}

impl Subscriber for IommuMapper {
    fn name(&self) -> &str {
        &self.name
    }

    fn run_boundary(&self) -> Option<PageSize> {
        match self.policy {
            DmaPolicy::Runs(boundary) => Some(boundary),
            _ => None,
        }
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        self.injected.on_prepare()?;
        if let Some(budget) = self.budget {
            let count = |pieces: Vec<OffsetRange>| -> u64 {
                match self.policy {
                    DmaPolicy::PerPage => pieces.iter().map(|r| r.len()).sum(),
                    _ => pieces.len() as u64,
                }
            };
            let after = self.mappings() - count(self.pieces(change.plan, true))
                + count(self.pieces(change.plan, false));
            if after > budget {
                return Err(Veto::at(
                    change.range.start(),
                    format!("would need {after} DMA mappings, the limit is {budget}"),
                ));
            }
        }
        Ok(())
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.injected.on_unmap(change.plan.region())?;
        let pieces = self.pieces(change.plan, true);
        let mut state = self.state.lock();
        self.remove(&mut state, change.file, &pieces);
        state.unmapped.insert(change_key(change), pieces);
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        self.injected.on(super::Callback::Map);
        let pieces = self.pieces(change.plan, false);
        let mut state = self.state.lock();
        state.unmapped.remove(&change_key(change));
        self.add(&mut state, change.file, &pieces);
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.injected.on_restore(change.plan.region())?;
        // Map back what the unmap of this change removed (nothing, if it failed first).
        let mut state = self.state.lock();
        let removed = state
            .unmapped
            .remove(&change_key(change))
            .unwrap_or_default();
        self.add(&mut state, change.file, &removed);
        Ok(())
    }
}
