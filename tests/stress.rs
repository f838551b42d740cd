//! Several threads convert, pin, punch, populate and fault in several files at once (some
//! sharing a file); afterwards every invariant holds, no PFN backs two offsets, nothing leaked,
//! and the reference subscribers saw only exact plans.

mod common;

use std::sync::Arc;

use common::*;
use pfnstore::core::PfnRange;
use pfnstore::core::testing::XorShift;
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{ConvertMode, FileOptions, GuestFile, Interest, PinOwner, Shareability, StoreError};

const THREADS: usize = 4;
const OPS: usize = 20_000;
const FILE_PAGES: u64 = 192;

fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = XorShift::new(seed | 1);
    move |bound| state.below(bound)
}

/// Errors a racing workload legitimately gets; anything else fails the test.
fn expected(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Pinned { .. }
            | StoreError::NotPinned { .. }
            | StoreError::NotBacked { .. }
            | StoreError::PrivateAccess { .. }
            | StoreError::SharedAccess { .. }
            | StoreError::NoHostMemory { .. }
            | StoreError::OutOfMemory { .. }
    )
}

fn work(thread: usize, files: Vec<GuestFile>, mmu: Arc<KvmMmu>) {
    let mut next = rng(0x5EED + thread as u64 * 7919);
    let owner = PinOwner(thread as u32);
    let mut pins: Vec<(usize, u64, u64)> = Vec::new();
    for _ in 0..OPS {
        let which = next(files.len() as u64) as usize;
        let file = &files[which];
        let start = next(FILE_PAGES);
        let span = if next(4) == 0 { 64 } else { 8 };
        let len = 1 + next(span).min(FILE_PAGES - start - 1);
        let (offset, bytes) = (start * PAGE, len * PAGE);
        let result = match next(7) {
            0 | 1 => {
                let to = if next(2) == 0 {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                file.convert(offset, bytes, to, ConvertMode::Preserve)
                    .map(drop)
            }
            2 => file.populate(offset, bytes),
            3 => file.punch_hole(offset, bytes),
            4 => {
                let r = file.pin(offset, bytes, owner);
                if r.is_ok() {
                    pins.push((which, offset, bytes));
                }
                r
            }
            5 => match pins.pop() {
                Some((w, o, b)) => files[w].unpin(o, b, owner),
                None => Ok(()),
            },
            _ => {
                let access = if next(2) == 0 {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                mmu.fault(file.id(), offset, access).map(drop)
            }
        };
        if let Err(e) = result {
            assert!(expected(&e), "thread {thread}: unexpected {e}");
        }
    }
    for (w, o, b) in pins {
        files[w].unpin(o, b, owner).unwrap();
    }
}

#[test]
fn concurrent_files_keep_every_invariant() {
    let store = synthetic(tiny(), 16, 2);
    let shared_file = store
        .create_file(FileOptions::new(FILE_PAGES * PAGE))
        .unwrap();
    let own: Vec<_> = (0..THREADS)
        .map(|_| {
            store
                .create_file(FileOptions::new(FILE_PAGES * PAGE))
                .unwrap()
        })
        .collect();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let mmu = Arc::new(KvmMmu::new("kvm", &store));
    let _r1 = store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap();
    let _r2 = store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap();

    std::thread::scope(|s| {
        for (t, file) in own.iter().enumerate() {
            let files = vec![file.clone(), shared_file.clone()];
            let mmu = Arc::clone(&mmu);
            s.spawn(move || work(t, files, mmu));
        }
    });

    store.check_invariants().unwrap();
    let mut all: Vec<PfnRange> = Vec::new();
    for file in own.iter().chain([&shared_file]) {
        file.check_invariants().unwrap();
        all.extend(
            file.extents()
                .unwrap()
                .into_iter()
                .map(|e| PfnRange::from_len(e.pfn, e.len / PAGE).unwrap()),
        );
    }
    all.sort();
    for pair in all.windows(2) {
        assert!(!pair[0].overlaps(&pair[1]), "{:?} backs two offsets", pair);
    }
    let backed: u64 = all.iter().map(|r| r.len()).sum();
    assert_eq!(
        store.stats().allocator.total.allocated_pages,
        backed,
        "nothing leaked"
    );
    assert!(iommu.violations().is_empty(), "{:?}", iommu.violations());
    assert!(mmu.violations().is_empty(), "{:?}", mmu.violations());
    assert!(mmu.audit().is_empty(), "{:?}", mmu.audit());

    for file in own.into_iter().chain([shared_file]) {
        file.destroy().unwrap();
    }
    let total = store.stats().allocator.total;
    assert_eq!((total.allocated_pages, total.quarantined_pages), (0, 0));
    store.check_invariants().unwrap();
}

// Regressions for defects the host-memory stress test (tests/host_stress.rs) found in code the
// synthetic stress above never reached. Each reproduction failed on the code before its fix.

/// A subscriber registered while the store has no file must be called for the files created
/// afterwards. The registry once bumped its generation only when it activated an existing
/// domain; with none it stayed at 0, the generation a new file's cached (empty) subscriber list
/// starts with, so the file's operations never looked again. A KVM MMU registered at VMM
/// start, before guest memory exists, kept translations to punched and converted memory.
#[test]
fn a_subscriber_registered_before_the_first_file_hears_of_its_changes() {
    let store = synthetic(tiny(), 4, 1);
    let early = Recorder::new("early");
    let _reg = store.subscribe(&dyn_sub(&early), Interest::All).unwrap();
    let file = store
        .create_file(FileOptions::new(FILE_PAGES * PAGE).shared())
        .unwrap();
    file.populate(0, 8 * PAGE).unwrap();
    assert!(
        early.names().contains(&"map"),
        "populating told the early subscriber nothing: {:?}",
        early.events()
    );
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(
        early.names().contains(&"prepare"),
        "a conversion told the early subscriber nothing: {:?}",
        early.events()
    );
}

/// A source whose two chunks have a gap of two chunks between their PFNs, as real 2 MiB (and
/// often 1 GiB) hugetlb pages do.
#[derive(Debug)]
struct GappedSource {
    inner: pfnstore::hugetlb::SyntheticSource,
    chunks: Vec<pfnstore::hugetlb::Chunk>,
    index: pfnstore::hugetlb::ChunkIndex,
}

impl GappedSource {
    fn new() -> GappedSource {
        let geometry = tiny();
        let inner =
            pfnstore::hugetlb::SyntheticSource::new(geometry, pfnstore::core::Pfn(1 << 20), 2)
                .unwrap();
        let mut chunks = pfnstore::hugetlb::MemorySource::chunks(&inner).to_vec();
        chunks[1].base = pfnstore::core::Pfn(chunks[1].base.0 + 2 * geometry.chunk_pages());
        let index = pfnstore::hugetlb::ChunkIndex::new(&chunks);
        GappedSource {
            inner,
            chunks,
            index,
        }
    }
}

impl pfnstore::hugetlb::MemorySource for GappedSource {
    fn geometry(&self) -> pfnstore::core::Geometry {
        self.inner.geometry()
    }
    fn chunks(&self) -> &[pfnstore::hugetlb::Chunk] {
        &self.chunks
    }
    fn report(&self) -> &pfnstore::hugetlb::SourceReport {
        self.inner.report()
    }
    fn locate(&self, pfn: pfnstore::core::Pfn) -> Option<pfnstore::hugetlb::ChunkLocation> {
        self.index.locate(&self.chunks, pfn)
    }
    fn grow(&mut self, _: u64) -> Result<std::ops::Range<usize>, pfnstore::hugetlb::HugetlbError> {
        Err(pfnstore::hugetlb::HugetlbError::ZeroSize)
    }
}

/// `Store::check_invariants` must accept a healthy store whose chunks are not contiguous in
/// PFN space (every real 2 MiB hugetlb store). It once visited the physical metadata's whole
/// span in one call, which failed with `NotManaged` at the first gap, and reported "file 0
/// holds 128 pages, the physical metadata gives it 0".
#[test]
fn check_invariants_accepts_a_healthy_store_with_gaps_between_its_chunks() {
    let store = pfnstore::Store::new(
        Box::new(GappedSource::new()),
        pfnstore::StoreOptions::default().with_shards(1),
    )
    .unwrap();
    let file = store
        .create_file(FileOptions::new(2 * 64 * PAGE).populated())
        .unwrap();
    file.check_invariants().unwrap();
    store.check_invariants().unwrap();
}
