//! A DMA mapper (iommufd, vfio type1), with the mapping policies VMMs use.

use std::collections::BTreeMap;

use pfnstore_core::sync::Mutex;
use pfnstore_core::{Geometry, OffsetRange, PAGE_SIZE, PageOffset, PageSize};

use super::{Injected, Misbehaviour};
use crate::metadata::conversion::{Change, Subscriber, UnmapError, Veto};
use crate::{FileId, Shareability};

/// How a DMA mapper turns plans into IOMMU mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaPolicy {
    /// One mapping per block of the plans (iommufd mapping the plan exactly): few mappings
    /// for uniform memory, but a 4 KiB conversion inside 1 GiB costs 1,022 map calls.
    Blocks,
    /// One mapping per maximal shared run, cut at every multiple of the boundary (vfio
    /// type1, which cannot unmap part of a mapping). The runs of a *window* (an aligned
    /// boundary-sized range) depend only on the pages in it, so a change unmaps and maps only
    /// the windows its pages touch, whatever blocks split or merged around it: it remaps at
    /// most its own length plus one window on each side, and live mappings stay below the
    /// shared runs plus shared bytes / boundary.
    Runs(PageSize),
    /// One mapping per shared 4 KiB page (QEMU's and cloud-hypervisor's policy today): the
    /// reference point. A change unmaps and maps only its own pages. Counted, not stored.
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

    /// The shared pieces of a change's unmap or map list, as this mapper maps them.
    ///
    /// Blocks are the plan's: a block that splits or merges is unmapped whole. Pages and runs
    /// are the mapper's own: outside the pages the change asked for, every page keeps its
    /// attributes, so its page mappings, and the runs of every boundary window it does not
    /// touch, are the same before and after, and stay mapped.
    fn pieces(&self, change: &Change<'_>, unmap: bool) -> Vec<OffsetRange> {
        let plan = change.plan;
        let shared = |s: &Shareability| *s == Shareability::Shared;
        let list = if unmap { plan.unmap() } else { plan.map() };
        let g = self.geometry;
        match self.policy {
            DmaPolicy::Blocks => list
                .iter()
                .filter(|e| shared(&e.shareability))
                .flat_map(|e| e.run.blocks(&g).map(move |b| b.range(&g)))
                .collect(),
            DmaPolicy::PerPage => list
                .iter()
                .filter(|e| shared(&e.shareability))
                .filter_map(|e| e.run.range(&g).intersection(&change.range))
                .collect(),
            DmaPolicy::Runs(boundary) => {
                let runs = if unmap {
                    plan.unmap_runs(boundary)
                } else {
                    plan.map_runs(boundary)
                };
                // Each run lies in one window; the windows the request touches tile this.
                let touched = change.range.align_out(g.pages(boundary));
                runs.filter(|(r, s)| shared(s) && r.overlaps(&touched))
                    .map(|(r, _)| r)
                    .collect()
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
            if let Some(existing) = first_overlapping(state, file, *range) {
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

/// A mapping of `file` that overlaps `range`, if any, in one lookup (this is every map call's
/// check): mappings are disjoint, so the last one that starts before `range` ends overlaps it
/// if any does.
fn first_overlapping(state: &State, file: FileId, range: OffsetRange) -> Option<OffsetRange> {
    let (&(f, start), &pages) = state.mappings.range(..(file, range.end().0)).next_back()?;
    let m = OffsetRange::from_len(PageOffset(start), pages).ok()?;
    (f == file && m.overlaps(&range)).then_some(m)
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
            let after = self.mappings() - count(self.pieces(change, true))
                + count(self.pieces(change, false));
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
        let pieces = self.pieces(change, true);
        let mut state = self.state.lock();
        self.remove(&mut state, change.file, &pieces);
        state.unmapped.insert(change_key(change), pieces);
        Ok(())
    }

    fn map(&self, change: &Change<'_>) {
        self.injected.on(super::Callback::Map);
        let pieces = self.pieces(change, false);
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

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use std::sync::Arc;

    use pfnstore_core::testing::XorShift;
    use pfnstore_core::{Geometry, Pfn};
    use pfnstore_hugetlb::SyntheticSource;

    use super::*;
    use crate::{ConvertMode, FileOptions, GuestFile, Interest, Store, StoreOptions};

    const GIB_PAGES: u64 = 1 << 18;
    const MIB2_PAGES: u64 = 512;

    fn store(chunks: u64) -> Store {
        let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), chunks).unwrap();
        Store::synthetic(source, StoreOptions::default().with_shards(1)).unwrap()
    }

    fn mapper(store: &Store, policy: DmaPolicy) -> (Arc<IommuMapper>, crate::Registration) {
        let mapper = Arc::new(IommuMapper::with_policy("dma", store.geometry(), policy));
        let subscriber: Arc<dyn Subscriber> = mapper.clone();
        let registration = store.subscribe(&subscriber, Interest::All).unwrap();
        (mapper, registration)
    }

    fn pages(start: u64, len: u64) -> OffsetRange {
        OffsetRange::from_len(PageOffset(start), len).unwrap()
    }

    fn convert(file: &GuestFile, r: OffsetRange, to: Shareability) {
        file.convert(
            r.start().byte(),
            r.len() * PAGE_SIZE,
            to,
            ConvertMode::Preserve,
        )
        .unwrap();
    }

    /// The maximal runs of backed shared pages of `file`, cut at every multiple of `boundary`
    /// pages: what a per-run mapper must hold.
    fn expected_runs(file: &GuestFile, boundary: u64) -> Vec<OffsetRange> {
        let mut runs: Vec<OffsetRange> = Vec::new();
        for run in file.attribute_runs(0, file.size()).unwrap() {
            if !(run.backed && run.shareability == Shareability::Shared) {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.end() == run.range.start() => *last = last.hull(&run.range),
                _ => runs.push(run.range),
            }
        }
        let mut cut = Vec::new();
        for run in runs {
            let mut at = run.start().0;
            while at < run.end().0 {
                let end = ((at / boundary + 1) * boundary).min(run.end().0);
                cut.push(pages(at, end - at));
                at = end;
            }
        }
        cut
    }

    fn held(mapper: &IommuMapper, file: &GuestFile) -> Vec<OffsetRange> {
        let state = mapper.state.lock();
        state
            .mappings
            .iter()
            .filter(|((f, _), _)| *f == file.id())
            .map(|(&(_, start), &len)| pages(start, len))
            .collect()
    }

    fn shared_backed_pages(file: &GuestFile) -> u64 {
        let mut n = 0;
        for run in file.attribute_runs(0, file.size()).unwrap() {
            if run.backed && run.shareability == Shareability::Shared {
                n += run.range.len();
            }
        }
        n
    }

    #[test]
    fn runs_remap_only_the_windows_a_change_touches() {
        // 4 KiB to private and back inside a shared, uniform 1 GiB: the block splits and
        // merges, but only the 2 MiB window around the page changes its runs.
        let store = store(1);
        let file = store
            .create_file(FileOptions::new(GIB_PAGES * PAGE_SIZE).shared().populated())
            .unwrap();
        let (runs, _r1) = mapper(&store, DmaPolicy::Runs(PageSize::Size2M));
        let (per_page, _r2) = mapper(&store, DmaPolicy::PerPage);
        assert_eq!(runs.mappings(), GIB_PAGES / MIB2_PAGES);
        assert_eq!(per_page.mappings(), GIB_PAGES);
        let (before_runs, before_pages) = (runs.stats(), per_page.stats());

        let page = pages(1000, 1);
        convert(&file, page, Shareability::Private);
        let s = runs.stats();
        assert_eq!(s.unmap_calls - before_runs.unmap_calls, 1);
        assert_eq!(
            s.bytes_unmapped - before_runs.bytes_unmapped,
            MIB2_PAGES * PAGE_SIZE
        );
        assert_eq!(
            s.map_calls - before_runs.map_calls,
            2,
            "the window minus the page"
        );
        assert_eq!(
            s.bytes_mapped - before_runs.bytes_mapped,
            (MIB2_PAGES - 1) * PAGE_SIZE
        );
        let p = per_page.stats();
        assert_eq!(p.unmap_calls - before_pages.unmap_calls, 1);
        assert_eq!(p.map_calls, before_pages.map_calls);

        convert(&file, page, Shareability::Shared);
        let s2 = runs.stats();
        assert_eq!(s2.unmap_calls - s.unmap_calls, 2);
        assert_eq!(s2.map_calls - s.map_calls, 1);
        assert_eq!(s2.bytes_mapped - s.bytes_mapped, MIB2_PAGES * PAGE_SIZE);
        assert_eq!(held(&runs, &file), expected_runs(&file, MIB2_PAGES));
        assert_eq!(per_page.stats().map_calls - p.map_calls, 1);
        assert_eq!(per_page.mappings(), GIB_PAGES);
        assert!(runs.violations().is_empty(), "{:?}", runs.violations());
    }

    #[test]
    fn mappers_stay_exact_and_remap_only_near_the_change_under_random_changes() {
        let store = store(2);
        let size = 2 * GIB_PAGES;
        let file = store
            .create_file(FileOptions::new(size * PAGE_SIZE).populated())
            .unwrap();
        let (blocks, _r0) = mapper(&store, DmaPolicy::Blocks);
        let (runs_2m, _r1) = mapper(&store, DmaPolicy::Runs(PageSize::Size2M));
        let (runs_1g, _r2) = mapper(&store, DmaPolicy::Runs(PageSize::Size1G));
        let (per_page, _r3) = mapper(&store, DmaPolicy::PerPage);
        let mut rng = XorShift::new(0x1_0aaa_0013);
        for step in 0..400 {
            let len = 1 + rng.below(3 * MIB2_PAGES);
            let r = pages(rng.below(size - len), len);
            let before = [runs_2m.stats(), runs_1g.stats(), per_page.stats()];
            match rng.below(10) {
                0 => file.punch_hole(r.start().byte(), len * PAGE_SIZE).unwrap(),
                1 => file.populate(r.start().byte(), len * PAGE_SIZE).unwrap(),
                n => {
                    let to = if n % 2 == 0 {
                        Shareability::Shared
                    } else {
                        Shareability::Private
                    };
                    convert(&file, r, to);
                }
            }
            assert_eq!(
                held(&runs_2m, &file),
                expected_runs(&file, MIB2_PAGES),
                "step {step}"
            );
            assert_eq!(
                held(&runs_1g, &file),
                expected_runs(&file, GIB_PAGES),
                "step {step}"
            );
            assert_eq!(
                per_page.mappings(),
                shared_backed_pages(&file),
                "step {step}"
            );
            // Remapping is bounded by the change: its own windows, no more.
            for (mapper, before, window) in [
                (&runs_2m, before[0], MIB2_PAGES),
                (&runs_1g, before[1], GIB_PAGES),
                (&per_page, before[2], 1),
            ] {
                let touched = r.align_out(window).len() * PAGE_SIZE;
                let s = mapper.stats();
                assert!(
                    s.bytes_unmapped - before.bytes_unmapped <= touched,
                    "step {step}"
                );
                assert!(
                    s.bytes_mapped - before.bytes_mapped <= touched,
                    "step {step}"
                );
            }
        }
        for m in [&blocks, &runs_2m, &runs_1g, &per_page] {
            assert!(m.violations().is_empty(), "{:?}", m.violations());
        }
        file.destroy().unwrap();
        for m in [&blocks, &runs_2m, &runs_1g, &per_page] {
            assert_eq!(m.mappings(), 0);
        }
    }
}
