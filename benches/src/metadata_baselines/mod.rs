//! Baselines for the metadata store: the designs a VMM or the kernel uses today for
//! shareability tracking, each implemented as fast as its design allows.
//!
//! * [`bitmap::BitmapTracker`]: one bit per 4K page plus per-2M and per-1G private-page
//!   counters behind one mutex (QEMU's RamBlockAttributes, cloud-hypervisor's SEV-SNP tracker).
//! * [`range_map::RangeMapTracker`]: `rangemap::RangeMap` behind one mutex (what a VMM writes
//!   first).
//! * [`struct_page::StructPageArray`]: a 64-byte record per 4K page plus per-2M/1G "mixed"
//!   counters (the kernel's `struct page`).
//!
//! All three do the same two jobs the benches ask of pfnstore: convert a range and report which
//! 1G and 2M blocks it split and merged (what `MetadataStore::set_shareability` returns, and
//! what a VMM needs to tell KVM and the IOMMU which mappings to break up or rebuild), and
//! answer the largest uniform aligned block around a PFN. They track shareability only (the
//! attribute the targets are about); the bytes they hold are what a tracker of that design
//! needs for it. Each reports its changes into a caller-provided vector, so the steady state
//! allocates nothing.

pub mod bitmap;
mod counters;
pub mod range_map;
pub mod struct_page;

use pfnstore_core::PageSize;

/// A 1G or 2M block whose uniformity a conversion changed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct BlockChange {
    /// The block's first page.
    pub start: u64,
    /// Its size.
    pub size: PageSize,
    /// `true`: it was uniform and is not any more; `false`: the reverse.
    pub split: bool,
}

/// The common interface of the baselines.
pub trait ShareTracker {
    /// Sets `start..end` private (`true`) or shared, and appends to `changes` the 1G and 2M
    /// blocks whose uniformity that changed (in no particular order).
    fn convert(&self, start: u64, end: u64, private: bool, changes: &mut Vec<BlockChange>);
    /// The largest uniform naturally aligned block (1G/2M/4K) around `pfn`.
    fn max_order(&self, pfn: u64) -> PageSize;
}

#[cfg(test)]
mod tests {
    use super::*;
    use pfnstore_core::testing::XorShift;
    use pfnstore_core::{Geometry, Pfn, PfnRange};
    use pfnstore_metadata::reference::ReferenceStore;
    use pfnstore_metadata::{MappingChange, Shareability};

    /// The blocks of `change`, one by one, sorted.
    fn blocks(g: &Geometry, change: &MappingChange) -> Vec<BlockChange> {
        let mut out = Vec::new();
        for (runs, split) in [
            (change.splits().collect::<Vec<_>>(), true),
            (change.merges().collect(), false),
        ] {
            for run in runs {
                for block in run.blocks(g) {
                    out.push(BlockChange {
                        start: block.start().0,
                        size: block.size(),
                        split,
                    });
                }
            }
        }
        out.sort();
        out
    }

    /// Every baseline reports the splits and merges of every conversion and answers
    /// max-order like the reference model after the same conversions.
    #[test]
    fn baselines_agree_with_the_reference_model() {
        // Middle blocks of 64 pages: the bitmap assumes a bitmap word lies in one of them.
        let g = Geometry::new(6, 9).unwrap();
        let pages = 2 * g.chunk_pages();
        let mut model = ReferenceStore::new(g, PfnRange::new(Pfn(0), Pfn(pages)).unwrap()).unwrap();
        for c in 0..2 {
            model
                .add_chunk(Pfn(c * g.chunk_pages()), Shareability::Shared)
                .unwrap();
        }
        let trackers: [Box<dyn ShareTracker>; 3] = [
            Box::new(bitmap::BitmapTracker::new(g, pages)),
            Box::new(range_map::RangeMapTracker::new(g)),
            Box::new(struct_page::StructPageArray::new(g, pages)),
        ];
        let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
        for step in 0..300 {
            let seed = rng.next_u64();
            let start = seed % pages;
            let len = [1, 3, 64, 200, 512][step % 5].min(pages - start);
            let private = seed & (1 << 40) != 0;
            let to = if private {
                Shareability::Private
            } else {
                Shareability::Shared
            };
            let change = model
                .set_shareability(PfnRange::from_len(Pfn(start), len).unwrap(), to)
                .unwrap();
            let want = blocks(&g, &change);
            for (i, t) in trackers.iter().enumerate() {
                let mut changes = Vec::new();
                t.convert(start, start + len, private, &mut changes);
                changes.sort();
                assert_eq!(changes, want, "tracker {i}, step {step}");
            }
            for probe in (0..pages).step_by(7) {
                let want = model.max_mapping_size(Pfn(probe)).unwrap();
                for (i, t) in trackers.iter().enumerate() {
                    assert_eq!(
                        t.max_order(probe),
                        want,
                        "tracker {i}, step {step}, pfn {probe}"
                    );
                }
            }
        }
    }
}
