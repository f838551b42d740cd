//! The facade's host memory: each file's own contiguous host mapping, what of it the host can
//! reach (checked against the kernel's own view in `/proc/self/maps`, never by dereferencing a
//! guest address), byte access across chunk boundaries of a memfd whose chunks are not in PFN
//! order, the memfd extents handed to other processes, and the change protocol's promises on
//! a store with real bytes (ZERO after unmap, rollback on unmap failure, quarantine, no hang).
//!
//! Each test names the issue item it covers (#11.x: memory safety and concurrency, #12.x: the
//! store's contract, #13.x: the VMM surface). The stores are ordinary memory (a 4 KiB memfd):
//! [`shuffled_store`] puts 2 MiB chunks in the memfd out of PFN order, as real hugetlb pages
//! are; [`ordinary_store`] is the 4 KiB fallback with 1 GiB chunks. Tests on real hugetlb
//! pages are in `hugetlb_store.rs`.
//!
//! # A KVM memory slot over a lazily backed file
//!
//! The protocol that
//! `a_kvm_slot_over_a_lazily_backed_file_exits_to_the_vmm_which_faults_and_resumes` checks:
//! the VMM registers the file's whole [`GuestFile::host_mapping`] as one memory slot (stable
//! for the file's life). Unbacked pages (and units that are wholly private) are inaccessible
//! in it, so KVM cannot map them for the guest, and the access comes back to the VMM:
//!
//! * where the vCPU runs the instruction itself, `KVM_RUN` fails with `EFAULT`
//!   (`KVM_EXIT_MEMORY_FAULT` with the guest physical address where the kernel reports it)
//!   and the instruction has not executed: the VMM calls [`GuestFile::fault`] (or `populate`;
//!   `convert` for a shared access to a private page) for that offset and runs the vCPU again,
//!   which retries the instruction;
//! * where KVM emulates the instruction (real mode without unrestricted guest, nested or PVM
//!   hosts such as this test machine's `kvm_pvm`), the failed access is handed to the VMM as
//!   MMIO at an address inside the slot: the VMM backs the page the same way and completes the
//!   access itself (a write through [`GuestFile::write`], a read through [`GuestFile::read`]
//!   into the exit's data) before running the vCPU again.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pfnstore::core::Geometry;
use pfnstore::hugetlb::{FileMapping, HostView, HugePageSize, VmaBudget};
use pfnstore::subscribers::{IommuMapper, Misbehaviour};
use pfnstore::{
    Change, ChangeKind, ConfigError, ConvertMode, FileOptions, GuestFile, Interest, OffsetRange,
    PageOffset, PinOwner, Registration, Shareability, Store, StoreError, StoreOptions, Subscriber,
    UnmapError,
};

const M2: u64 = 2 << 20;
const WATCHDOG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers of this file.
// ---------------------------------------------------------------------------------------------

/// The first byte of the file's host mapping.
fn base(file: &GuestFile) -> usize {
    file.host_mapping()
        .expect("a store with host memory")
        .as_ptr() as usize
}

/// The memfd offset of byte `offset` of `file`, from its extents.
fn memfd_offset_of(file: &GuestFile, offset: u64) -> Option<u64> {
    file.extents()
        .unwrap()
        .into_iter()
        .find(|e| e.offset <= offset && offset < e.offset + e.len)
        .map(|e| e.memfd_offset + (offset - e.offset))
}

/// Whether the kernel lets the host load from byte `offset` of the file's mapping.
fn kernel_readable(file: &GuestFile, offset: u64) -> bool {
    kernel_region(base(file) + offset as usize).is_some_and(|r| r.readable())
}

/// Whether byte `offset` of the file's mapping reaches the store's memfd at all (as opposed
/// to the file's inaccessible anonymous reservation).
fn kernel_maps_memfd(file: &GuestFile, offset: u64) -> bool {
    let ino = memfd_inode(file.store());
    kernel_region(base(file) + offset as usize).is_some_and(|r| r.inode == ino)
}

fn assert_not_internal(result: Result<impl std::fmt::Debug, StoreError>, what: &str) -> StoreError {
    let err = result.expect_err(what);
    assert!(
        !matches!(err, StoreError::Internal { .. }),
        "{what}: a user error came back as Internal: {err}"
    );
    err
}

// ---------------------------------------------------------------------------------------------
// #11.1: no file reaches another file's bytes across a chunk boundary.
// ---------------------------------------------------------------------------------------------

#[test]
fn reads_and_writes_across_reversed_chunk_pairs_stay_in_their_file() {
    // Chunks 0/1, 2/3, 4/5 are reversed pairs in the memfd: a copy that runs on from chunk 0
    // into "the next bytes of the memfd" lands in chunk 2's slot (another file's memory).
    let store = shuffled_store(&[1, 0, 3, 2, 5, 4], 1);
    let files = check_files_stay_apart(&store, M2);
    store.check_invariants().unwrap();
    // The premise of the test: a file holds PFN-adjacent chunks whose memfd slots are not
    // adjacent, so that only a per-chunk split keeps the copy in the file.
    let premise = files.iter().any(|f| {
        let (lo, hi) = (f.pfn_at(M2 - PAGE).unwrap(), f.pfn_at(M2).unwrap());
        let (mlo, mhi) = (memfd_offset_of(f, M2 - PAGE), memfd_offset_of(f, M2));
        hi.unwrap().0 == lo.unwrap().0 + 1 && mhi.unwrap() != mlo.unwrap() + PAGE
    });
    assert!(
        premise,
        "no file spans PFN-adjacent chunks that are apart in the memfd"
    );
}

#[test]
fn reads_and_writes_across_shuffled_chunks_stay_in_their_file() {
    for seed in 1..=4 {
        for shards in [1, 2] {
            let store = shuffled_store_seeded(8, seed, shards);
            check_files_stay_apart(&store, M2);
            store.check_invariants().unwrap();
        }
    }
}

#[test]
fn host_view_address_of_a_range_over_several_chunks_is_contiguous_in_the_files_mapping() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(4 * M2).shared().populated())
        .unwrap();
    let model = tagged_bytes(0xC3, 0, 4 * M2);
    file.write(0, &model).unwrap();
    let base = base(&file);
    // Every range, including the whole file (four chunks, one reversed pair after another),
    // gets the address at its offset in the file's one mapping: no error, no panic.
    for (offset, len) in [
        (0, 4 * M2),
        (M2 - 16, 32),
        (M2 - PAGE, 2 * PAGE),
        (2 * M2 - 1, 2),
        (PAGE, 3 * M2),
        (3 * M2 + 5, M2 - 5),
    ] {
        let addr = file.host_view_address(offset, len).unwrap();
        assert_eq!(
            addr.as_ptr() as usize,
            base + offset as usize,
            "{offset:#x}+{len:#x}"
        );
        // What the kernel has at that address is the file's bytes (read without touching the
        // mapping from Rust).
        let shown = forced_read(addr.as_ptr() as usize, len.min(64) as usize).unwrap();
        assert_eq!(
            shown,
            &model[offset as usize..(offset + len.min(64)) as usize],
            "{offset:#x}"
        );
    }
    // The kernel's regions over the file map, at each file offset, the memfd offset that the
    // file's extents name.
    for offset in [0, M2 - PAGE, M2, 2 * M2 - PAGE, 2 * M2, 4 * M2 - PAGE] {
        let region = kernel_region(base + offset as usize).unwrap();
        assert!(region.readable() && region.writable(), "{region:?}");
        assert_eq!(
            Some(region.file_offset_of(base + offset as usize)),
            memfd_offset_of(&file, offset),
            "{offset:#x}"
        );
    }
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #11.4: punching 4 KiB of a wholly private unit does not open the rest.
// ---------------------------------------------------------------------------------------------

#[test]
fn punching_one_page_of_a_wholly_private_2m_unit_leaves_the_rest_revoked() {
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).populated())
        .unwrap();
    assert_eq!(
        file.stats().protection_unit,
        M2,
        "ordinary memory: 2 MiB units"
    );
    for offset in [0, 5 * PAGE, M2 - PAGE, M2] {
        assert!(file.host_revoked(offset).unwrap(), "{offset:#x}");
        assert!(!kernel_readable(&file, offset), "{offset:#x}");
    }
    file.punch_hole(5 * PAGE, PAGE).unwrap();
    assert_eq!(file.pfn_at(5 * PAGE).unwrap(), None);
    for page in (0..512).filter(|p| *p != 5) {
        assert!(
            file.host_revoked(page * PAGE).unwrap(),
            "page {page} of the private unit became accessible after a 4 KiB punch"
        );
    }
    let base = base(&file);
    for region in kernel_regions_in(base, base + M2 as usize) {
        assert!(!region.readable(), "the kernel maps {region:?} readable");
    }
    assert!(matches!(
        file.read(6 * PAGE, &mut [0u8; 8]),
        Err(StoreError::PrivateAccess { offset, .. }) if offset == 6 * PAGE
    ));
    // Punching all but one page still leaves the last one revoked; a shared page elsewhere
    // opens its own unit only.
    file.punch_hole(0, 5 * PAGE).unwrap();
    file.punch_hole(6 * PAGE, M2 - 7 * PAGE).unwrap();
    assert!(file.host_revoked(M2 - PAGE).unwrap());
    assert!(!kernel_readable(&file, M2 - PAGE));
    file.convert(M2 + PAGE, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(kernel_readable(&file, M2 + PAGE));
    assert!(!kernel_readable(&file, M2 - PAGE));
    assert!(file.host_revoked(M2 - PAGE).unwrap());
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #11.7: a ZERO conversion zeroes after every subscriber unmapped.
// ---------------------------------------------------------------------------------------------

/// A device that watches one page through the memfd (as DMA would, bypassing every mapping):
/// in `unmap` it records the bytes and makes a last write (a DMA still in flight until its
/// unmap completes); in `map` it records the bytes again.
struct ZeroWitness {
    memfd: std::fs::File,
    memfd_offset: u64,
    /// Only the first conversion is watched (the way back is not).
    armed: AtomicBool,
    at_unmap: Mutex<Option<Vec<u8>>>,
    at_map: Mutex<Option<Vec<u8>>>,
}

impl ZeroWitness {
    fn page(&self) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; PAGE as usize];
        self.memfd
            .read_exact_at(&mut buf, self.memfd_offset)
            .unwrap();
        buf
    }
}

impl Subscriber for ZeroWitness {
    fn name(&self) -> &str {
        "zero-witness"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        use std::os::unix::fs::FileExt;
        if let ChangeKind::Convert { .. } = change.kind
            && self.armed.load(Ordering::SeqCst)
        {
            *self.at_unmap.lock().unwrap() = Some(self.page());
            self.memfd
                .write_all_at(&[0xEE; 64], self.memfd_offset + 128)
                .unwrap();
        }
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        if let ChangeKind::Convert { .. } = change.kind
            && self.armed.swap(false, Ordering::SeqCst)
        {
            *self.at_map.lock().unwrap() = Some(self.page());
        }
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

#[test]
fn a_zero_conversion_zeroes_only_after_every_subscriber_unmapped() {
    let store = shuffled_store(&[1, 0], 1);
    let file = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    let page = 3 * PAGE;
    let data = tagged_bytes(0x7E, page, PAGE);
    file.write(page, &data).unwrap();
    let neighbour = tagged_bytes(0x7F, page + PAGE, PAGE);
    file.write(page + PAGE, &neighbour).unwrap();
    let witness = Arc::new(ZeroWitness {
        memfd: memfd_file(&store),
        memfd_offset: memfd_offset_of(&file, page).unwrap(),
        armed: AtomicBool::new(true),
        at_unmap: Mutex::new(None),
        at_map: Mutex::new(None),
    });
    let _reg = store
        .subscribe(&dyn_sub(&witness), Interest::File(file.id()))
        .unwrap();
    file.convert(page, PAGE, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    let at_unmap = witness.at_unmap.lock().unwrap().clone().unwrap();
    assert_eq!(
        at_unmap, data,
        "the bytes were already zeroed when the subscriber was asked to unmap"
    );
    let at_map = witness.at_map.lock().unwrap().clone().unwrap();
    assert!(
        at_map.iter().all(|b| *b == 0),
        "a write made before the unmap completed survived the ZERO conversion"
    );
    file.convert(page, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let mut back = vec![0xFFu8; PAGE as usize];
    file.read(page, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0));
    // Only the converted page was zeroed.
    let mut next = vec![0u8; PAGE as usize];
    file.read(page + PAGE, &mut next).unwrap();
    assert!(
        next == neighbour,
        "the ZERO conversion reached the next page"
    );
}

// ---------------------------------------------------------------------------------------------
// #11.8: every range whose restore fails is quarantined physically.
// ---------------------------------------------------------------------------------------------

/// Fails its unmap if the other one of the pair was asked first (so whichever is asked second
/// fails, and both are restored), and fails every restore, naming its own pages.
struct Unrestorable {
    name: &'static str,
    pages: OffsetRange,
    asked: Arc<AtomicUsize>,
    healthy: AtomicBool,
}

impl Subscriber for Unrestorable {
    fn name(&self) -> &str {
        self.name
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if self.healthy.load(Ordering::SeqCst) || !matches!(change.kind, ChangeKind::Convert { .. })
        {
            return Ok(());
        }
        if self.asked.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(());
        }
        Err(UnmapError {
            range: self.pages,
            reason: "device did not let go".into(),
        })
    }
    fn map(&self, _: &Change<'_>) {}
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        if self.healthy.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(UnmapError {
            range: self.pages,
            reason: "device cannot map back".into(),
        })
    }
}

#[test]
fn every_range_whose_restore_fails_is_quarantined_physically() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let first = pages(10, 12);
    let second = pages(700, 704);
    let subs: Vec<Arc<Unrestorable>> = [("first", first), ("second", second)]
        .into_iter()
        .map(|(name, pages)| {
            Arc::new(Unrestorable {
                name,
                pages,
                asked: Arc::clone(&asked),
                healthy: AtomicBool::new(false),
            })
        })
        .collect();
    let regs: Vec<Registration> = subs
        .iter()
        .map(|s| store.subscribe(&dyn_sub(s), Interest::All).unwrap())
        .collect();
    let frames: Vec<_> = [10, 11, 700, 701, 702, 703]
        .iter()
        .map(|p| file.pfn_at(p * PAGE).unwrap().unwrap())
        .collect();
    let err = file
        .convert(0, 2 * M2, Shareability::Private, ConvertMode::Preserve)
        .unwrap_err();
    let StoreError::UnmapFailed { quarantined, .. } = &err else {
        panic!("{err:?}")
    };
    let mut quarantined = quarantined.clone();
    quarantined.sort_unstable();
    assert_eq!(
        quarantined,
        vec![(10 * PAGE, 12 * PAGE), (700 * PAGE, 704 * PAGE)],
        "{err}"
    );
    assert_eq!(store.stats().allocator.total.quarantined_pages, 6);
    for s in &subs {
        s.healthy.store(true, Ordering::SeqCst);
    }
    drop(regs);
    drop(file);
    let total = store.stats().allocator.total;
    assert_eq!(
        (total.quarantined_pages, total.allocated_pages),
        (6, 0),
        "both ranges (and only they) stay out of use after the file is gone"
    );
    store.check_invariants().unwrap();
    // Nobody gets those frames again.
    let again = store
        .create_file(FileOptions::new(4 * M2 - 6 * PAGE))
        .unwrap();
    again.populate(0, 4 * M2 - 6 * PAGE).unwrap();
    for extent in again.extents().unwrap() {
        for frame in &frames {
            assert!(
                frame.0 < extent.pfn.0 || frame.0 >= extent.pfn.0 + extent.len / PAGE,
                "quarantined {frame} reused by {extent:?}"
            );
        }
    }
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #11.12 (and #11.5): user errors are typed.
// ---------------------------------------------------------------------------------------------

#[test]
fn access_to_revoked_and_quarantined_pages_through_the_api_is_typed() {
    let store = shuffled_store(&[1, 0], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).populated())
        .unwrap();
    let id = file.id();
    let offset = 7 * PAGE + 3;
    let pfn = file.pfn_at(7 * PAGE).unwrap();
    assert!(file.host_revoked(offset).unwrap());
    let private = StoreError::PrivateAccess {
        file: id,
        offset,
        pfn,
    };
    assert_eq!(
        assert_not_internal(file.read(offset, &mut [0u8; 4]), "read"),
        private
    );
    assert_eq!(
        assert_not_internal(file.write(offset, &[1u8; 4]), "write"),
        private
    );
    assert_eq!(
        assert_not_internal(file.host_view_address(offset, 4), "host_view_address"),
        private
    );
    assert!(matches!(
        assert_not_internal(file.fault(7 * PAGE, Shareability::Shared), "fault"),
        StoreError::PrivateAccess { offset: o, .. } if o == 7 * PAGE
    ));
    // A quarantined page in a unit that is open (shared pages around it): the API names it.
    let mapper = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _reg = store.subscribe(&dyn_sub(&mapper), Interest::All).unwrap();
    file.convert(M2, M2, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    mapper.inject(Misbehaviour::fail_unmap(pages(600, 601), true));
    assert_not_internal(
        file.convert(
            600 * PAGE,
            PAGE,
            Shareability::Private,
            ConvertMode::Preserve,
        ),
        "a conversion whose unmap fails",
    );
    mapper.inject(Misbehaviour::none());
    assert_eq!(
        assert_not_internal(file.read(600 * PAGE, &mut [0u8; 4]), "read quarantined"),
        StoreError::Quarantined {
            file: id,
            offset: 600 * PAGE,
            pfn: file.pfn_at(600 * PAGE).unwrap()
        }
    );
    assert!(matches!(
        assert_not_internal(file.host_view_address(600 * PAGE, PAGE), "address"),
        StoreError::Quarantined { .. }
    ));
    store.check_invariants().unwrap();
}

/// Takes every region of the process's budget for file mappings but `spare`, with
/// reservations of its own; they give the regions back when dropped.
fn exhaust_region_budget(spare: u64) -> Vec<FileMapping> {
    let budget = VmaBudget::process();
    let mut hogs = Vec::new();
    while budget.limit() - budget.used() > spare {
        hogs.push(FileMapping::reserve(PAGE, HugePageSize::Base4K).expect("reserve"));
    }
    hogs
}

/// Fills the kernel's table of memory regions (`vm.max_map_count`) with single pages of the
/// store's memfd, none mergeable with its neighbour, outside pfnstore's budget, until the
/// kernel refuses one (which must be a typed `MapCountLimit`). pfnstore's own budget keeps
/// room, so the store's next new region reaches the kernel and its `ENOMEM`.
fn exhaust_kernel_regions(store: &Store) -> FileMapping {
    static UNLIMITED: VmaBudget = VmaBudget::with_limit(u64::MAX);
    let limit = pfnstore::hugetlb::vma::max_map_count();
    let hog = FileMapping::reserve_in((limit + 16) * 2 * PAGE, HugePageSize::Base4K, &UNLIMITED)
        .expect("reserve");
    let memfd = store.memfd().unwrap();
    for i in 0..limit + 16 {
        // Every other page, mapping memfd page `i % 2`: no two neighbours can merge.
        let mapped = hog.map(
            2 * i * PAGE,
            memfd.fd(),
            (i % 2) * PAGE,
            PAGE,
            pfnstore::hugetlb::Protection::None,
        );
        if let Err(e) = mapped {
            assert!(
                matches!(e, pfnstore::hugetlb::HugetlbError::MapCountLimit { .. }),
                "the kernel's refusal is not typed as the region limit: {e}"
            );
            return hog;
        }
    }
    panic!("the kernel never refused a region (limit {limit})");
}

#[test]
fn a_population_needing_more_memory_regions_than_the_budget_is_refused_typed_and_changes_nothing() {
    let test = "a_population_needing_more_memory_regions_than_the_budget_is_refused_typed_and_changes_nothing";
    if run_in_child(test) {
        return;
    }
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(3 * M2).shared())
        .unwrap();
    file.write(100, b"kept").unwrap();
    let before = store.stats().allocator.total;
    let regions = file.stats().mapping_regions;
    let hogs = exhaust_region_budget(0);
    // A page in the middle of the reservation needs two more regions.
    let populated = file.populate(M2 + 5 * PAGE, PAGE);
    let written = file.write(2 * M2 + 100, b"lost");
    let created = store.create_file(FileOptions::new(M2)).map(drop);
    let files = store.stats().files;
    let after = store.stats().allocator.total;
    let stats = file.stats();
    drop(hogs);
    for (what, result) in [("populate", populated), ("write", written)] {
        assert!(
            matches!(result, Err(StoreError::MappingLimit { file: f, .. }) if f == file.id()),
            "{what}: {result:?}"
        );
    }
    assert_eq!(
        after, before,
        "the refused population changed the allocator's accounting"
    );
    // A new file's mapping is refused too, typed, and nothing of it stays open.
    assert!(
        matches!(&created, Err(StoreError::MappingLimit { offset: 0, .. })),
        "{created:?}"
    );
    assert_eq!(files, 1);
    assert_eq!((stats.backed_pages, stats.mapping_regions), (1, regions));
    assert_eq!(file.pfn_at(M2 + 5 * PAGE).unwrap(), None);
    let mut kept = [0u8; 4];
    file.read(100, &mut kept).unwrap();
    assert_eq!(&kept, b"kept");
    // With regions to spare the same calls work.
    file.populate(M2 + 5 * PAGE, PAGE).unwrap();
    file.write(2 * M2 + 100, b"done").unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn enomem_from_the_kernels_region_limit_is_a_typed_mapping_limit() {
    let test = "enomem_from_the_kernels_region_limit_is_a_typed_mapping_limit";
    if run_in_child(test) {
        return;
    }
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(3 * M2).shared())
        .unwrap();
    file.write(100, b"kept").unwrap();
    let before = store.stats().allocator.total;
    let hog = exhaust_kernel_regions(&store);
    let populated = file.populate(M2 + 5 * PAGE, PAGE);
    let after = store.stats().allocator.total;
    drop(hog);
    let err = populated.expect_err("a population past the kernel's region limit");
    assert!(
        matches!(err, StoreError::MappingLimit { offset, .. } if offset == M2 + 5 * PAGE),
        "ENOMEM of the kernel's region limit should be MappingLimit: {err:?}"
    );
    assert!(!err.to_string().contains("free memory"), "{err}");
    assert_eq!(after, before, "nothing changed");
    assert_eq!(file.pfn_at(M2 + 5 * PAGE).unwrap(), None);
    file.populate(M2 + 5 * PAGE, PAGE).unwrap();
    store.check_invariants().unwrap();
}

/// Converts the middle unit of a 1 GiB shared file (one kernel region, which the revocation
/// splits in three) to private while `exhaust` holds every region it can.
fn convert_without_regions<H>(exhaust: impl FnOnce(&Store) -> H) {
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(GIB).shared().populated())
        .unwrap();
    assert_eq!(file.stats().mapping_regions, 1);
    file.write(M2 + 100, b"kept").unwrap();
    let hog = exhaust(&store);
    let converted = file.convert(M2, M2, Shareability::Private, ConvertMode::Preserve);
    let shareability = file.shareability(M2).unwrap();
    let revoked = file.host_revoked(M2).unwrap();
    let readable = kernel_readable(&file, M2);
    drop(hog);
    // Either refused before anything changed, or done with the unit revoked: never private
    // memory left reachable by the host behind an Ok.
    match converted {
        Err(StoreError::MappingLimit {
            file: f, offset, ..
        }) => {
            assert_eq!((f, offset), (file.id(), M2));
            assert_eq!(shareability, Shareability::Shared, "refused, yet changed");
            assert!(readable && !revoked);
        }
        Ok(_) => assert!(
            revoked && !readable,
            "the conversion to private returned Ok but the unit is still mapped read-write \
             (shareability {shareability:?}, host_revoked {revoked}, kernel readable {readable})"
        ),
        Err(other) => panic!("not a typed region limit: {other:?}"),
    }
    file.convert(M2, M2, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert!(file.host_revoked(M2).unwrap() && !kernel_readable(&file, M2));
    store.check_invariants().unwrap();
}

#[test]
fn a_conversion_that_cannot_revoke_for_want_of_budget_is_refused_not_left_mapped() {
    let test = "a_conversion_that_cannot_revoke_for_want_of_budget_is_refused_not_left_mapped";
    if run_in_child(test) {
        return;
    }
    convert_without_regions(|_| exhaust_region_budget(0));
}

#[test]
fn a_conversion_that_cannot_revoke_for_the_kernels_region_limit_is_refused_not_left_mapped() {
    let test =
        "a_conversion_that_cannot_revoke_for_the_kernels_region_limit_is_refused_not_left_mapped";
    if run_in_child(test) {
        return;
    }
    convert_without_regions(exhaust_kernel_regions);
}

// ---------------------------------------------------------------------------------------------
// #12.1: memory private from creation is revoked from the host mapping.
// ---------------------------------------------------------------------------------------------

#[test]
fn memory_private_from_creation_is_revoked_from_the_host_mapping() {
    let store = ordinary_store(GIB, 1);
    // Created private and populated.
    let populated = store
        .create_file(FileOptions::new(2 * M2).populated())
        .unwrap();
    for offset in [0, PAGE, M2, 2 * M2 - PAGE] {
        assert!(populated.host_revoked(offset).unwrap(), "{offset:#x}");
        assert!(kernel_maps_memfd(&populated, offset), "backed, so mapped");
        assert!(!kernel_readable(&populated, offset), "{offset:#x}");
    }
    // A page backed by a fault.
    let faulted = store.create_file(FileOptions::new(2 * M2)).unwrap();
    assert!(
        !kernel_readable(&faulted, 5 * PAGE),
        "unbacked: the reservation"
    );
    faulted.fault(5 * PAGE, Shareability::Private).unwrap();
    assert!(faulted.pfn_at(5 * PAGE).unwrap().is_some());
    assert!(faulted.host_revoked(5 * PAGE).unwrap());
    assert!(kernel_maps_memfd(&faulted, 5 * PAGE));
    assert!(!kernel_readable(&faulted, 5 * PAGE));
    // A private range populated again after a punch-hole.
    populated.punch_hole(0, M2).unwrap();
    assert!(
        !kernel_maps_memfd(&populated, 0),
        "punched: back to the reservation"
    );
    populated.populate(0, M2).unwrap();
    assert!(populated.host_revoked(0).unwrap());
    assert!(kernel_maps_memfd(&populated, 0));
    assert!(!kernel_readable(&populated, 0));
    // The VMM's reads of private memory are refused by the API as well.
    assert!(matches!(
        populated.read(0, &mut [0u8; 8]),
        Err(StoreError::PrivateAccess { .. })
    ));
    // Shared memory is accessible, from creation and after population.
    let shared = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    assert!(!shared.host_revoked(0).unwrap());
    assert!(kernel_readable(&shared, 0) && kernel_readable(&shared, M2));
    let lazy_shared = store
        .create_file(FileOptions::new(2 * M2).shared())
        .unwrap();
    lazy_shared.fault(M2, Shareability::Shared).unwrap();
    assert!(!lazy_shared.host_revoked(M2).unwrap());
    assert!(kernel_readable(&lazy_shared, M2));
    // Mixed: the private unit is revoked, the shared one is not.
    let mixed = store
        .create_file(FileOptions::new(2 * M2).populated())
        .unwrap();
    mixed
        .convert(M2, M2, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(mixed.host_revoked(0).unwrap() && !kernel_readable(&mixed, 0));
    assert!(!mixed.host_revoked(M2).unwrap() && kernel_readable(&mixed, M2));
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.2: quarantined offsets are never backed again; nothing leaks.
// ---------------------------------------------------------------------------------------------

#[test]
fn quarantined_offsets_are_never_backed_again_and_nothing_leaks() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    let mapper = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let reg = store
        .subscribe(&dyn_sub(&mapper), Interest::File(file.id()))
        .unwrap();
    let frames = file.pfn_at(100 * PAGE).unwrap().unwrap();
    mapper.inject(Misbehaviour::fail_unmap(pages(100, 108), true));
    let err = file
        .convert(
            100 * PAGE,
            8 * PAGE,
            Shareability::Private,
            ConvertMode::Preserve,
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnmapFailed { quarantined, .. } if quarantined == &vec![(100 * PAGE, 108 * PAGE)]),
        "{err:?}"
    );
    mapper.inject(Misbehaviour::none());
    file.punch_hole(96 * PAGE, 16 * PAGE).unwrap();
    let before = store.stats().allocator.total;
    assert_eq!(
        file.populate(96 * PAGE, 16 * PAGE).unwrap_err(),
        StoreError::Quarantined {
            file: file.id(),
            offset: 100 * PAGE,
            pfn: None
        }
    );
    assert_eq!(file.pfn_at(96 * PAGE).unwrap(), None, "all or nothing");
    assert_eq!(store.stats().allocator.total, before);
    assert!(matches!(
        file.write(100 * PAGE, b"x"),
        Err(StoreError::Quarantined { .. })
    ));
    assert!(matches!(
        file.fault(100 * PAGE, Shareability::Shared),
        Err(StoreError::Quarantined { .. })
    ));
    assert_eq!(file.pfn_at(100 * PAGE).unwrap(), None, "no path backs it");
    file.populate(96 * PAGE, 4 * PAGE).unwrap();
    file.check_invariants().unwrap();
    // (`store.check_invariants()` fails here: see
    // `store_invariants_hold_after_punching_around_a_quarantined_page`.)
    drop(reg);
    drop(file);
    let total = store.stats().allocator.total;
    assert_eq!((total.allocated_pages, total.quarantined_pages), (0, 8));
    store.check_invariants().unwrap();
    // Everything else can be had again, never the quarantined frames.
    let again = store
        .create_file(FileOptions::new(4 * M2 - 8 * PAGE))
        .unwrap();
    again.populate(0, 4 * M2 - 8 * PAGE).unwrap();
    assert_eq!(store.stats().allocator.total.free_pages, 0);
    for extent in again.extents().unwrap() {
        let end = extent.pfn.0 + extent.len / PAGE;
        assert!(
            end <= frames.0 || extent.pfn.0 >= frames.0 + 8,
            "{extent:?}"
        );
    }
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.3: exact plans for healthy subscribers after a partial unmap failure.
// ---------------------------------------------------------------------------------------------

/// A healthy iommufd-like mapper and one whose unmap and restore of `failing` fail; then the
/// block around `failing` is punched: the healthy mapper is told to unmap exactly what it
/// holds, and nothing it still maps is freed.
fn punch_after_a_failed_restore(store: &Store, block: OffsetRange, failing: OffsetRange) {
    let file = store
        .create_file(
            FileOptions::new(2 * block.len() * PAGE)
                .shared()
                .populated(),
        )
        .unwrap();
    let healthy = Arc::new(IommuMapper::new("healthy", store.geometry()));
    let broken = Arc::new(IommuMapper::new("broken", store.geometry()));
    let _r1 = store.subscribe(&dyn_sub(&healthy), Interest::All).unwrap();
    let _r2 = store.subscribe(&dyn_sub(&broken), Interest::All).unwrap();
    let held_before: Vec<_> = (block.start().0..block.end().0)
        .map(|p| healthy.mapping_at(file.id(), PageOffset(p)))
        .collect();
    assert!(
        held_before.iter().all(Option::is_some),
        "the replay mapped the block"
    );
    broken.inject(Misbehaviour::fail_unmap(failing, true));
    let err = file
        .convert(
            failing.start().byte(),
            failing.len() * PAGE,
            Shareability::Private,
            ConvertMode::Preserve,
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnmapFailed { quarantined, .. } if quarantined == &vec![(failing.start().byte(), failing.end().byte())]),
        "{err:?}"
    );
    broken.inject(Misbehaviour::none());
    // The healthy mapper holds what it held, and the plans describe exactly that.
    let held_after: Vec<_> = (block.start().0..block.end().0)
        .map(|p| healthy.mapping_at(file.id(), PageOffset(p)))
        .collect();
    assert_eq!(
        held_after, held_before,
        "restore gave the healthy mapper its blocks back"
    );
    assert_eq!(
        file.shareability(failing.start().byte()).unwrap(),
        Shareability::Shared
    );
    let before = store.stats().allocator.total;
    file.punch_hole(block.start().byte(), block.len() * PAGE)
        .unwrap();
    assert!(
        healthy.violations().is_empty(),
        "{:?}",
        healthy.violations()
    );
    for p in block.start().0..block.end().0 {
        assert_eq!(
            healthy.mapping_at(file.id(), PageOffset(p)),
            None,
            "page {p} is still DMA-mapped after the punch freed it"
        );
    }
    let after = store.stats().allocator.total;
    assert_eq!(
        after.free_pages,
        before.free_pages + block.len() - failing.len(),
        "the punch freed the block less the quarantined pages"
    );
    assert_eq!(after.quarantined_pages, failing.len());
    file.check_invariants().unwrap();
    // (`store.check_invariants()` fails here: see
    // `store_invariants_hold_after_punching_around_a_quarantined_page`.)
    drop(file);
    let total = store.stats().allocator.total;
    assert_eq!(
        (total.allocated_pages, total.quarantined_pages),
        (0, failing.len())
    );
    store.check_invariants().unwrap();
}

#[test]
fn store_invariants_hold_after_punching_around_a_quarantined_page() {
    let store = synthetic(tiny(), 2, 1);
    let file = store
        .create_file(FileOptions::new(64 * PAGE).shared().populated())
        .unwrap();
    let mapper = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let _reg = store.subscribe(&dyn_sub(&mapper), Interest::All).unwrap();
    mapper.inject(Misbehaviour::fail_unmap(pages(3, 4), true));
    file.convert(3 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap_err();
    mapper.inject(Misbehaviour::none());
    store.check_invariants().unwrap();
    file.punch_hole(0, 8 * PAGE).unwrap();
    file.check_invariants().unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn a_healthy_mapper_gets_exact_plans_after_a_partial_unmap_failure() {
    // Synthetic memory, where plans have 2 MiB blocks: the iommufd-like mapper holds
    // [512, 1024) as one mapping, which a 4 KiB unmap could not take apart.
    let synthetic_store = synthetic(Geometry::X86_64, 1, 1);
    punch_after_a_failed_restore(&synthetic_store, pages(512, 1024), pages(600, 608));
    // Memory with bytes (4 KiB blocks on ordinary pages): the same promises.
    let host_store = shuffled_store(&[1, 0, 3, 2], 1);
    punch_after_a_failed_restore(&host_store, pages(512, 1024), pages(600, 608));
}

// ---------------------------------------------------------------------------------------------
// #12.4: a failed unmap rolls the change back.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_conversion_or_punch_whose_unmap_fails_does_not_take_effect() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    let data = tagged_bytes(0x42, 0, 2 * M2);
    file.write(0, &data).unwrap();
    let healthy = Arc::new(IommuMapper::new("healthy", store.geometry()));
    let failing = Arc::new(IommuMapper::new("failing", store.geometry()));
    let _r1 = store.subscribe(&dyn_sub(&healthy), Interest::All).unwrap();
    let _r2 = store.subscribe(&dyn_sub(&failing), Interest::All).unwrap();
    let runs = file.attribute_runs(0, 2 * M2).unwrap();
    let accounting = store.stats().allocator.total;
    let mappings = healthy.mappings();
    failing.inject(Misbehaviour::fail_unmap(pages(10, 12), false));
    assert_eq!(
        file.convert(0, M2, Shareability::Private, ConvertMode::Zero)
            .unwrap_err(),
        StoreError::UnmapFailed {
            file: file.id(),
            offset: 10 * PAGE,
            end: 12 * PAGE,
            pfn: file.pfn_at(10 * PAGE).unwrap(),
            subscriber: "failing".into(),
            reason: "injected unmap failure".into(),
            quarantined: vec![],
        }
    );
    assert_eq!(
        file.attribute_runs(0, 2 * M2).unwrap(),
        runs,
        "shareability unchanged"
    );
    assert!(!file.host_revoked(0).unwrap() && kernel_readable(&file, 0));
    let mut now = vec![0u8; (2 * M2) as usize];
    file.read(0, &mut now).unwrap();
    assert!(now == data, "a refused ZERO conversion touched the bytes");
    assert_eq!(healthy.mappings(), mappings);
    // A punch-hole: nothing freed, nothing unbacked, the bytes still there.
    let frame = file.pfn_at(8 * PAGE).unwrap();
    assert!(matches!(
        file.punch_hole(8 * PAGE, 8 * PAGE),
        Err(StoreError::UnmapFailed { offset, ref subscriber, .. }) if offset == 10 * PAGE && subscriber == "failing"
    ));
    assert_eq!(file.pfn_at(8 * PAGE).unwrap(), frame);
    assert_eq!(file.stats().backed_pages, 2 * M2 / PAGE);
    assert_eq!(
        store.stats().allocator.total,
        accounting,
        "a refused punch freed memory"
    );
    file.read(0, &mut now).unwrap();
    assert!(now == data, "a refused punch-hole touched the bytes");
    assert!(kernel_maps_memfd(&file, 8 * PAGE) && kernel_readable(&file, 8 * PAGE));
    assert!(
        healthy.violations().is_empty(),
        "{:?}",
        healthy.violations()
    );
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.5 / #12.6: callbacks that operate on other files and on their own chunk; no hang.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From inside `unmap` of a conversion of its file, converts page 0 of another file (once per
/// call: not from a callback that its own nested conversion causes). On its first call with a
/// rendezvous set, it waits there for the other thread's subscriber before and after its
/// nested conversion: both threads then hold their own file's range while asking for the
/// other's.
struct CrossConverter {
    other: GuestFile,
    rendezvous: Mutex<Option<Arc<std::sync::Barrier>>>,
    results: Mutex<Vec<Result<(), StoreError>>>,
}

impl Subscriber for CrossConverter {
    fn name(&self) -> &str {
        "cross-converter"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if !matches!(change.kind, ChangeKind::Convert { .. }) || IN_CALLBACK.get() {
            return Ok(());
        }
        IN_CALLBACK.set(true);
        let rendezvous = self.rendezvous.lock().unwrap().take();
        if let Some(barrier) = &rendezvous {
            barrier.wait();
        }
        let to = match self.other.shareability(0) {
            Ok(Shareability::Shared) => Shareability::Private,
            _ => Shareability::Shared,
        };
        let result = self
            .other
            .convert(0, PAGE, to, ConvertMode::Preserve)
            .map(drop);
        if let Some(barrier) = &rendezvous {
            // Neither lets go of its own range before both asked for the other's.
            barrier.wait();
        }
        IN_CALLBACK.set(false);
        self.results.lock().unwrap().push(result);
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {}
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

#[test]
fn cross_file_conversions_from_callbacks_on_two_threads_never_hang() {
    // Everything, registrations included, lives on the watched thread: if it hangs, the test
    // fails without waiting for anything the hung threads hold.
    with_watchdog(
        "two threads converting across files",
        WATCHDOG,
        cross_file_conversions,
    );
}

fn cross_file_conversions() {
    let store = shuffled_store(&[1, 0, 3, 2], 2);
    let a = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    let b = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    let on_a = Arc::new(CrossConverter {
        other: b.clone(),
        rendezvous: Mutex::new(None),
        results: Mutex::new(Vec::new()),
    });
    let on_b = Arc::new(CrossConverter {
        other: a.clone(),
        rendezvous: Mutex::new(None),
        results: Mutex::new(Vec::new()),
    });
    let _ra = store
        .subscribe(&dyn_sub(&on_a), Interest::File(a.id()))
        .unwrap();
    let _rb = store
        .subscribe(&dyn_sub(&on_b), Interest::File(b.id()))
        .unwrap();
    // Alone, the nested conversion just works.
    a.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(*on_a.results.lock().unwrap(), vec![Ok(())]);
    assert_eq!(b.shareability(0).unwrap(), Shareability::Private);
    on_a.results.lock().unwrap().clear();
    // Two threads, each converting page 0 of its file while the other's callback converts
    // page 0 of it; in the first round both callbacks meet before their nested conversion, so
    // each thread holds its own file's range and asks for the other's (a deadlock if either
    // waited).
    let barrier = Arc::new(std::sync::Barrier::new(2));
    *on_a.rendezvous.lock().unwrap() = Some(Arc::clone(&barrier));
    *on_b.rendezvous.lock().unwrap() = Some(barrier);
    const ROUNDS: usize = 300;
    let outer = {
        let (a, b) = (a.clone(), b.clone());
        {
            let run = |file: GuestFile| {
                std::thread::spawn(move || {
                    // Round 0 converts to shared: page 0 of both files is private now.
                    (0..ROUNDS)
                        .map(|i| {
                            let to = if i % 2 == 0 {
                                Shareability::Shared
                            } else {
                                Shareability::Private
                            };
                            file.convert(0, PAGE, to, ConvertMode::Preserve).map(drop)
                        })
                        .collect::<Vec<_>>()
                })
            };
            let (ta, tb) = (run(a), run(b));
            let mut all = ta.join().unwrap();
            all.extend(tb.join().unwrap());
            all
        }
    };
    assert!(
        outer.iter().all(Result::is_ok),
        "an outer conversion (not in a callback) may wait, never fail: {:?}",
        outer.iter().find(|r| r.is_err())
    );
    for sub in [&on_a, &on_b] {
        let results = sub.results.lock().unwrap();
        assert!(
            matches!(
                results.first(),
                Some(Err(StoreError::WouldBlock { offset: 0, .. }))
            ),
            "the first round's nested conversion must be told it would block: {:?}",
            results.first()
        );
        for r in results.iter() {
            assert!(
                matches!(r, Ok(()) | Err(StoreError::WouldBlock { .. })),
                "a nested operation may succeed or be told it would block: {r:?}"
            );
        }
    }
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
    store.check_invariants().unwrap();
}

/// From inside `unmap` and `map` of a conversion of page 0, touches other pages of the same
/// chunk: reads page 3, faults page 4, pins and unpins page 5, writes page 6 (all backed and
/// shared), and tries to convert page 9 (a second change in the chunk).
struct SameChunk {
    file: GuestFile,
    results: Mutex<Vec<Touched>>,
}

/// What a callback did, and what it got back (the bytes for a read).
type Touched = (&'static str, Result<Vec<u8>, StoreError>);

impl SameChunk {
    fn touch(&self) {
        let f = &self.file;
        let mut buf = vec![0u8; 16];
        let read = f.read(3 * PAGE, &mut buf).map(|()| buf);
        let fault = f.fault(4 * PAGE, Shareability::Shared).map(|_| Vec::new());
        let pin = f
            .pin(5 * PAGE, PAGE, PinOwner(9))
            .and_then(|()| f.unpin(5 * PAGE, PAGE, PinOwner(9)))
            .map(|()| Vec::new());
        let write = f.write(6 * PAGE, b"callback").map(|()| Vec::new());
        let convert = f
            .convert(9 * PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
            .map(|_| Vec::new());
        self.results.lock().unwrap().extend([
            ("read", read),
            ("fault", fault),
            ("pin", pin),
            ("write", write),
            ("convert", convert),
        ]);
    }
}

impl Subscriber for SameChunk {
    fn name(&self) -> &str {
        "same-chunk"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if matches!(change.kind, ChangeKind::Convert { .. }) {
            self.touch();
        }
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        if matches!(change.kind, ChangeKind::Convert { .. }) {
            self.touch();
        }
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

#[test]
fn a_callback_may_read_fault_pin_and_write_disjoint_pages_of_its_own_chunk() {
    with_watchdog(
        "a conversion whose callbacks touch their own chunk",
        WATCHDOG,
        callbacks_touching_their_own_chunk,
    );
}

fn callbacks_touching_their_own_chunk() {
    let store = shuffled_store(&[1, 0], 1);
    let file = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    let data = tagged_bytes(0x33, 3 * PAGE, 16);
    file.write(3 * PAGE, &data).unwrap();
    let sub = Arc::new(SameChunk {
        file: file.clone(),
        results: Mutex::new(Vec::new()),
    });
    let _reg = store
        .subscribe(&dyn_sub(&sub), Interest::File(file.id()))
        .unwrap();
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let results = std::mem::take(&mut *sub.results.lock().unwrap());
    assert_eq!(results.len(), 10, "unmap and map each touched five pages");
    for (what, result) in results {
        match what {
            "read" => assert_eq!(result.as_deref(), Ok(&data[..]), "read in a callback"),
            "convert" => assert!(
                matches!(result, Err(StoreError::Reentrant { offset, .. }) if offset == 9 * PAGE),
                "a second change in the chunk: {result:?}"
            ),
            _ => assert!(result.is_ok(), "{what} in a callback: {result:?}"),
        }
    }
    let mut written = [0u8; 8];
    file.read(6 * PAGE, &mut written).unwrap();
    assert_eq!(&written, b"callback");
    assert_eq!(file.shareability(0).unwrap(), Shareability::Private);
    assert!(file.attributes(5 * PAGE).unwrap().pins.is_empty());
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.7: a failed populate or fault changes no accounting.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_failed_populate_or_fault_leaves_the_allocators_accounting_unchanged() {
    // Clean memory (a fresh store): what a failed population took comes back clean.
    let fresh = shuffled_store(&[1, 0, 3, 2], 1);
    let squatter = fresh
        .create_file(FileOptions::new(fresh.capacity() - 100 * PAGE).populated())
        .unwrap();
    let before = fresh.stats().allocator.total;
    assert_eq!((before.free_pages, before.dirty_pages), (100, 0));
    let big = fresh.create_file(FileOptions::new(2 * M2)).unwrap();
    assert!(matches!(
        big.populate(0, 2 * M2),
        Err(StoreError::OutOfMemory { .. })
    ));
    assert_eq!(
        fresh.stats().allocator.total,
        before,
        "a failed populate of clean memory changed the accounting"
    );
    drop((big, squatter));
    fresh.check_invariants().unwrap();

    // Dirty memory: the same, and a fault that falls back keeps only what it backs.
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let capacity = store.capacity();
    // Every page dirty: used once and given back.
    drop(
        store
            .create_file(FileOptions::new(capacity).populated())
            .unwrap(),
    );
    let total_pages = capacity / PAGE;
    assert_eq!(store.stats().allocator.total.dirty_pages, total_pages);
    // A squatter leaves 100 pages free (dirty), in pieces of at most 16 aligned pages.
    let squatter = store
        .create_file(FileOptions::new(capacity - 100 * PAGE).populated())
        .unwrap();
    let before = store.stats().allocator.total;
    assert_eq!((before.free_pages, before.dirty_pages), (100, 100));
    // Populating more than is free takes some memory, runs out, and gives it back as it was.
    let big = store.create_file(FileOptions::new(M2)).unwrap();
    assert!(matches!(
        big.populate(0, M2),
        Err(StoreError::OutOfMemory { .. })
    ));
    assert_eq!(store.stats().allocator.total, before, "a failed populate");
    assert_eq!(big.stats().backed_pages, 0);
    // A first-touch fault whose uniform block (the chunk) cannot be had backs a smaller one.
    big.fault(0, Shareability::Private).unwrap();
    let held = big.stats().held_pages;
    assert!(held > 0 && held < 100, "{held}");
    let after = store.stats().allocator.total;
    assert_eq!(after.allocated_pages, before.allocated_pages + held);
    assert_eq!(
        after.dirty_pages,
        before.dirty_pages - held,
        "only what the fault kept was taken (and scrubbed)"
    );
    // With nothing free, a fault fails and changes nothing.
    let rest = store
        .create_file(FileOptions::new((100 - held) * PAGE).populated())
        .unwrap();
    let full = store.stats().allocator.total;
    assert_eq!(full.free_pages, 0);
    let late = store.create_file(FileOptions::new(M2)).unwrap();
    let faulted = late.fault(0, Shareability::Private);
    assert!(
        matches!(faulted, Err(StoreError::OutOfMemory { .. })),
        "{faulted:?}"
    );
    assert_eq!(store.stats().allocator.total, full, "a failed fault");
    drop((squatter, rest));
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.8: a refused host write backs nothing.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_refused_host_write_backs_nothing() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    // Unit 0 shared, unit 1 private, nothing backed.
    let file = store.create_file(FileOptions::new(2 * M2)).unwrap();
    file.convert(0, M2, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let before = store.stats().allocator.total;
    assert_eq!(
        file.write(M2 - 8, &[1u8; 16]).unwrap_err(),
        StoreError::PrivateAccess {
            file: file.id(),
            offset: M2,
            pfn: None
        }
    );
    assert!(matches!(
        file.write(2 * M2 - 8, &[1u8; 16]),
        Err(StoreError::BeyondEnd { .. })
    ));
    assert_eq!(file.pfn_at(M2 - PAGE).unwrap(), None);
    assert_eq!(file.stats().backed_pages, 0);
    assert_eq!(store.stats().allocator.total, before);
    assert!(!kernel_maps_memfd(&file, M2 - PAGE));
    // A store without bytes refuses the write before backing anything.
    let synthetic_store = synthetic(tiny(), 2, 1);
    let lazy = synthetic_store
        .create_file(FileOptions::new(64 * PAGE).shared())
        .unwrap();
    assert!(matches!(
        lazy.write(0, b"hello"),
        Err(StoreError::NoHostMemory { .. })
    ));
    assert_eq!(lazy.pfn_at(0).unwrap(), None);
    assert_eq!(synthetic_store.stats().allocator.total.allocated_pages, 0);
}

// ---------------------------------------------------------------------------------------------
// #12.9: a subscriber that holds the store forms no cycle.
// ---------------------------------------------------------------------------------------------

/// Holds the store, a file, and its own registration.
struct Holder {
    store: Store,
    file: GuestFile,
    registration: Mutex<Option<Registration>>,
    maps: AtomicUsize,
}

impl Subscriber for Holder {
    fn name(&self) -> &str {
        "holder"
    }
    fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {
        self.maps.fetch_add(1, Ordering::SeqCst);
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

#[test]
fn a_subscriber_holding_the_store_and_a_file_keeps_no_memory_alive() {
    let store = shuffled_store(&[1, 0], 1);
    let ino = memfd_inode(&store);
    let weak = store.downgrade();
    let file = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    file.write(0, b"guest").unwrap();
    let holder = Arc::new(Holder {
        store: store.clone(),
        file: file.clone(),
        registration: Mutex::new(None),
        maps: AtomicUsize::new(0),
    });
    let registration = store.subscribe(&dyn_sub(&holder), Interest::All).unwrap();
    *holder.registration.lock().unwrap() = Some(registration);
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(
        holder.maps.load(Ordering::SeqCst),
        2,
        "replay and the conversion"
    );
    assert_eq!(holder.file.id(), file.id());
    assert!(holder.store.has_host_memory());
    let (fds, regions) = references_to_inode(ino);
    assert!(
        fds >= 1 && regions >= 1,
        "the memfd is open and mapped: {fds}, {regions}"
    );
    drop((file, store, holder));
    assert!(weak.upgrade().is_none(), "a cycle kept the store alive");
    assert_eq!(
        references_to_inode(ino),
        (0, 0),
        "the memory is still open or mapped after the user dropped everything"
    );
}

// ---------------------------------------------------------------------------------------------
// #12.10 / #12.11 / #12.12: configuration, size, destroy.
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_configuration_gets_typed_errors_not_internal_or_a_panic() {
    let source = || {
        Box::new(
            pfnstore::hugetlb::testing::ShuffledSource::reversed_pair(HugePageSize::Base4K)
                .unwrap(),
        )
    };
    assert_eq!(
        Store::new(source(), StoreOptions::default().with_shards(0)).unwrap_err(),
        StoreError::Config(ConfigError::NoShards)
    );
    let huge = std::panic::catch_unwind(|| {
        Store::new(
            source(),
            StoreOptions::default().with_shards(usize::MAX / 2),
        )
        .map(drop)
    });
    assert!(
        matches!(
            huge,
            Ok(Err(StoreError::Config(ConfigError::TooManyShards { shards, .. }))) if shards == usize::MAX / 2
        ),
        "{huge:?}"
    );
    let store = Store::new(source(), StoreOptions::default().with_shards(1)).unwrap();
    for options in [
        FileOptions::new(0xFFFF_FFFF_FFFF_F000),
        FileOptions::new(0xFFFF_FFFF_FFFF_F000).overcommit(),
        FileOptions::new(!(PAGE - 1)).overcommit(),
    ] {
        let err = assert_not_internal(store.create_file(options), "a huge file");
        assert!(
            matches!(err, StoreError::FileTooLarge { size, .. } if size == options.size),
            "{err:?}"
        );
    }
    assert_eq!(store.stats().files, 0);
    assert_eq!(store.stats().committed, 0);
    store.check_invariants().unwrap();
}

#[test]
fn a_file_larger_than_the_store_is_refused_unless_overcommitted() {
    let store = shuffled_store(&[1, 0], 1);
    assert_eq!(store.capacity(), 2 * M2);
    assert_eq!(
        store.create_file(FileOptions::new(3 * M2)).unwrap_err(),
        StoreError::FileTooLarge {
            size: 3 * M2,
            limit: 2 * M2,
            why: "the store's memory; FileOptions::overcommit allows more",
        }
    );
    assert_eq!(store.stats().files, 0);
    let exact = store.create_file(FileOptions::new(2 * M2)).unwrap();
    let over = store
        .create_file(FileOptions::new(3 * M2).shared().overcommit())
        .unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.files, stats.committed, stats.capacity),
        (2, 5 * M2, 2 * M2)
    );
    assert_eq!(over.stats().size, 3 * M2);
    // The overcommitted file works as far as memory goes, and says when it does not.
    over.write(0, b"first").unwrap();
    assert!(matches!(
        exact.populate(0, 2 * M2),
        Err(StoreError::OutOfMemory { .. })
    ));
    drop(over);
    assert_eq!(store.stats().committed, 2 * M2);
    exact.populate(0, 2 * M2).unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn destroy_closes_every_handle_and_unmaps_the_files_memory() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    file.write(100, b"bytes").unwrap();
    let other = file.clone();
    let id = file.id();
    let base = base(&file);
    file.destroy().unwrap();
    let gone = StoreError::Destroyed { file: id };
    let mut buf = [0u8; 4];
    assert_eq!(other.read(0, &mut buf).unwrap_err(), gone);
    assert_eq!(other.write(0, &buf).unwrap_err(), gone);
    assert_eq!(other.host_view_address(0, PAGE).unwrap_err(), gone);
    assert_eq!(other.extents().unwrap_err(), gone);
    assert_eq!(other.host_revoked(0).unwrap_err(), gone);
    assert_eq!(other.pfn_at(0).unwrap_err(), gone);
    assert_eq!(other.pin(0, PAGE, PinOwner(1)).unwrap_err(), gone);
    assert_eq!(other.populate(0, PAGE).unwrap_err(), gone);
    assert_eq!(other.punch_hole(0, PAGE).unwrap_err(), gone);
    assert_eq!(other.fault(0, Shareability::Shared).unwrap_err(), gone);
    assert_eq!(
        other
            .convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
            .unwrap_err(),
        gone
    );
    assert_eq!(other.attribute_runs(0, PAGE).unwrap_err(), gone);
    assert_eq!(other.current_plan().unwrap_err(), gone);
    assert_eq!(other.clone().destroy().unwrap_err(), gone);
    assert!(store.file(id).is_none());
    let recorder = Recorder::new("late");
    assert_eq!(
        store
            .subscribe(&dyn_sub(&recorder), Interest::File(id))
            .unwrap_err(),
        StoreError::NoSuchFile { file: id }
    );
    let stats = store.stats();
    assert_eq!((stats.files, stats.committed), (0, 0));
    assert_eq!(stats.allocator.total.allocated_pages, 0);
    // Nothing of the file's range reaches the memfd any more, though a handle still exists.
    let ino = memfd_inode(&store);
    for region in kernel_regions_in(base, base + 2 * M2 as usize) {
        assert!(
            region.inode != ino && !region.readable(),
            "a destroyed file still maps {region:?}"
        );
    }
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #12.14: a punched page's address never reaches the next owner's bytes.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_punched_pages_old_address_never_reads_the_next_owners_bytes() {
    // One chunk: whatever A gives back, B gets.
    let store = shuffled_store(&[0], 1);
    let a = store
        .create_file(FileOptions::new(M2).shared().populated())
        .unwrap();
    let page = 7 * PAGE;
    a.write(page, &tagged_bytes(0xA0, page, PAGE)).unwrap();
    let addr = a.host_view_address(page, PAGE).unwrap().as_ptr() as usize;
    let frame = a.pfn_at(page).unwrap().unwrap();
    a.punch_hole(page, PAGE).unwrap();
    let b = store
        .create_file(FileOptions::new(PAGE).shared().populated())
        .unwrap();
    assert_eq!(b.pfn_at(0).unwrap(), Some(frame), "B got A's old frame");
    let secret = tagged_bytes(0xB0, 0, PAGE);
    b.write(0, &secret).unwrap();
    // A's address of that page no longer reaches any memory: the kernel shows A's own
    // inaccessible reservation there, and even a forced read of it sees zeros.
    let region = kernel_region(addr).unwrap();
    assert!(!region.readable(), "{region:?}");
    assert_ne!(region.inode, memfd_inode(&store), "{region:?}");
    let through_old_address = forced_read(addr, PAGE as usize).unwrap();
    assert_ne!(
        through_old_address, secret,
        "A's old address reads B's bytes"
    );
    assert!(through_old_address.iter().all(|b| *b == 0));
    // Through the API, A's page reads as a hole (zeros), never as B's bytes.
    let mut buf = vec![0xFFu8; PAGE as usize];
    a.read(page, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert!(
        !a.host_revoked(page).unwrap(),
        "unbacked pages are not 'revoked'"
    );
    assert!(matches!(
        a.host_view_address(page, PAGE),
        Err(StoreError::NotBacked { offset, .. }) if offset == page
    ));
    // When B is gone and A is backed there again (by the same frame, the only free one), A's
    // address shows A's memory: scrubbed, not B's bytes.
    b.destroy().unwrap();
    a.populate(page, PAGE).unwrap();
    assert_eq!(a.pfn_at(page).unwrap(), Some(frame));
    let again = forced_read(addr, PAGE as usize).unwrap();
    assert!(again.iter().all(|b| *b == 0), "B's bytes were not scrubbed");
    assert!(kernel_readable(&a, page));
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #13.1: one contiguous mapping per file.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_2gib_file_is_one_contiguous_host_mapping_whose_inaccessible_parts_follow_the_rule() {
    let store = ordinary_store(4 * GIB, 1);
    let ino = memfd_inode(&store);
    let file = store
        .create_file(FileOptions::new(2 * GIB).shared().populated())
        .unwrap();
    let region = file.host_mapping().unwrap();
    let start = region.as_ptr() as usize;
    assert!(region.len() >= 2 * GIB);
    assert_eq!(start % M2 as usize, 0, "aligned for transparent huge pages");
    // One address range, mapping the memfd at the extents' offsets all the way.
    for offset in [0, GIB - PAGE, GIB, 2 * GIB - PAGE] {
        let r = kernel_region(start + offset as usize).unwrap();
        assert_eq!(r.inode, ino, "{r:?}");
        assert!(r.readable() && r.writable());
        assert_eq!(
            Some(r.file_offset_of(start + offset as usize)),
            memfd_offset_of(&file, offset)
        );
    }
    for (offset, len) in [(0, 2 * GIB), (GIB - PAGE, 2 * PAGE), (GIB - 7, 14)] {
        let addr = file.host_view_address(offset, len).unwrap();
        assert_eq!(addr.as_ptr() as usize, start + offset as usize);
    }
    // Punched units are the reservation again; wholly private units are mapped but revoked;
    // partly private units stay mapped and the API guards their private pages.
    file.punch_hole(4 * M2, M2).unwrap();
    file.convert(8 * M2, M2, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    file.convert(10 * M2, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let punched = kernel_region(start + 4 * M2 as usize).unwrap();
    assert!(punched.inode == 0 && !punched.readable(), "{punched:?}");
    let private = kernel_region(start + 8 * M2 as usize).unwrap();
    assert!(private.inode == ino && !private.readable(), "{private:?}");
    assert!(kernel_readable(&file, 10 * M2));
    assert!(matches!(
        file.host_view_address(4 * M2, PAGE),
        Err(StoreError::NotBacked { offset, .. }) if offset == 4 * M2
    ));
    assert!(matches!(
        file.host_view_address(8 * M2, PAGE),
        Err(StoreError::PrivateAccess { .. })
    ));
    assert!(matches!(
        file.host_view_address(10 * M2, PAGE),
        Err(StoreError::PrivateAccess { .. })
    ));
    assert_eq!(
        file.host_view_address(10 * M2 + PAGE, PAGE)
            .unwrap()
            .as_ptr() as usize,
        start + (10 * M2 + PAGE) as usize
    );
    // The mapping is stable: the same address after all that.
    assert_eq!(file.host_mapping().unwrap(), region);
    // A lazily backed 2 GiB file: one reservation, which population opens piece by piece.
    let lazy = store
        .create_file(FileOptions::new(2 * GIB).shared())
        .unwrap();
    let lazy_base = base(&lazy);
    for r in kernel_regions_in(lazy_base, lazy_base + 2 * GIB as usize) {
        assert!(
            r.inode == 0 && !r.readable(),
            "unbacked but reachable: {r:?}"
        );
    }
    lazy.populate(GIB - M2, 2 * M2).unwrap();
    let addr = lazy.host_view_address(GIB - M2, 2 * M2).unwrap();
    assert_eq!(addr.as_ptr() as usize, lazy_base + (GIB - M2) as usize);
    assert!(kernel_readable(&lazy, GIB) && !kernel_readable(&lazy, GIB + 2 * M2));
    assert!(file.stats().mapping_regions < 16, "{:?}", file.stats());
    store.check_invariants().unwrap();
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_kvm_slot_over_a_lazily_backed_file_exits_to_the_vmm_which_faults_and_resumes() {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    let test = "a_kvm_slot_over_a_lazily_backed_file_exits_to_the_vmm_which_faults_and_resumes";
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => return pfnstore::core::testing::skip(test, &format!("/dev/kvm: {e}")),
    };
    // Real mode: code at 0x1000, data at 0x80000 (DS = 0x8000), both in the first 2 MiB unit,
    // which the backed shared code page makes accessible; the data page itself is unbacked, so
    // its address in the mapping is still the inaccessible reservation.
    const CODE: u64 = 0x1000;
    const DATA: u64 = 0x8_0000;
    // `mov al, 0x42; mov [ds:0], al; hlt`.
    const GUEST: [u8; 6] = [0xb0, 0x42, 0xa2, 0x00, 0x00, 0xf4];
    let store = ordinary_store(GIB, 1);
    let file = store
        .create_file(FileOptions::new(4 * M2).shared())
        .unwrap();
    file.write(CODE, &GUEST).unwrap();
    assert_eq!(
        file.pfn_at(DATA).unwrap(),
        None,
        "the data page is not backed"
    );
    assert!(!kernel_readable(&file, DATA) && kernel_readable(&file, CODE));
    let region = file.host_mapping().unwrap();
    let vm = kvm.create_vm().unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: file.size(),
        userspace_addr: region.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the slot is the file's whole host mapping, which lives as long as the file; the
    // VM is dropped before the file at the end of this test. KVM reaches through it only the
    // pages the store maps accessible.
    unsafe { vm.set_user_memory_region(slot).unwrap() };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = DATA;
    sregs.ds.selector = (DATA >> 4) as u16;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    // The guest's write to the unbacked page exits to the VMM. With hardware-run real mode it
    // is an EFAULT (KVM_EXIT_MEMORY_FAULT where reported) and the instruction is retried on
    // the next run; where KVM emulates the instruction (no unrestricted guest, as under nested
    // virtualisation) the failed access is handed over as MMIO, and the VMM completes it.
    let exit = vcpu.run();
    println!("the access to the unbacked page exited with {exit:?}");
    assert_eq!(
        file.pfn_at(DATA).unwrap(),
        None,
        "nothing was backed behind the VMM's back"
    );
    let completed_by_vmm = match exit {
        Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
            assert!(
                gpa <= DATA && DATA < gpa + size.max(1),
                "fault at {gpa:#x}+{size:#x}"
            );
            None
        }
        Err(e) if e.errno() == 14 => None,
        Ok(VcpuExit::MmioWrite(gpa, data)) => {
            assert_eq!((gpa, data), (DATA, &[0x42][..]));
            Some((gpa, data.to_vec()))
        }
        other => panic!("an access to an unbacked page did not exit to the VMM: {other:?}"),
    };
    // The VMM backs the page through the KVM fault path, completes an emulated access, and
    // resumes the guest.
    file.fault(DATA, Shareability::Shared).unwrap();
    assert!(kernel_readable(&file, DATA));
    if let Some((gpa, data)) = completed_by_vmm {
        file.write(gpa, &data).unwrap();
    }
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    let mut byte = [0u8];
    file.read(DATA, &mut byte).unwrap();
    assert_eq!(byte, [0x42], "the guest's write landed in the file");
    // Now backed, a second run writes straight through the slot (no exit but the hlt).
    file.write(DATA, &[0]).unwrap();
    vcpu.set_regs(&regs).unwrap();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    file.read(DATA, &mut byte).unwrap();
    assert_eq!(byte, [0x42], "the guest wrote through the memory slot");
    drop(vcpu);
    drop(vm);
    store.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------------------------
// #13.2: memfd extents.
// ---------------------------------------------------------------------------------------------

#[test]
fn extents_name_memfd_offsets_that_hold_the_files_bytes() {
    use std::os::fd::AsFd;
    let store = shuffled_store_seeded(8, 99, 1);
    let size = 3 * M2 + 5 * PAGE;
    let file = store.create_file(FileOptions::new(size).shared()).unwrap();
    file.populate(0, 2 * M2).unwrap();
    file.populate(3 * M2, 5 * PAGE).unwrap();
    file.punch_hole(M2 - 2 * PAGE, PAGE).unwrap();
    let model = tagged_bytes(0x13, 0, size);
    for (offset, len) in [
        (0, M2 - 2 * PAGE),
        (M2 - PAGE, M2 + PAGE),
        (3 * M2, 5 * PAGE),
    ] {
        file.write(offset, &model[offset as usize..(offset + len) as usize])
            .unwrap();
    }
    let extents = file.extents().unwrap();
    // Exactly the backed offsets, ascending, each contiguous in offsets, frames and memfd.
    let backed: Vec<(u64, u64)> = file
        .attribute_runs(0, size)
        .unwrap()
        .iter()
        .filter(|r| r.backed)
        .map(|r| (r.range.start().byte(), r.range.end().byte()))
        .collect();
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for e in &extents {
        match covered.last_mut() {
            Some(last) if last.1 == e.offset => last.1 += e.len,
            _ => covered.push((e.offset, e.offset + e.len)),
        }
    }
    assert_eq!(covered, backed, "{extents:?}");
    assert!(
        extents.len() > backed.len(),
        "shuffled chunks split the backed runs: {extents:?}"
    );
    let memfd = file.memfd().unwrap();
    let _: std::os::fd::BorrowedFd<'_> = memfd.as_fd();
    let view = HostView::from_memfd(file.memfd().unwrap()).unwrap();
    for e in &extents {
        assert_eq!(file.pfn_at(e.offset).unwrap(), Some(e.pfn));
        let last = e.offset + e.len - PAGE;
        assert_eq!(
            file.pfn_at(last).unwrap().map(|p| p.0),
            Some(e.pfn.0 + (e.len / PAGE - 1)),
            "{e:?} is one run of frames"
        );
        let mut through_api = vec![0u8; e.len as usize];
        file.read(e.offset, &mut through_api).unwrap();
        assert!(
            through_api == model[e.offset as usize..(e.offset + e.len) as usize],
            "{e:?}"
        );
        // pread of the memfd, and a mapping of it of our own, at the extent's memfd offset.
        assert!(
            memfd_bytes(&store, e.memfd_offset, e.len as usize) == through_api,
            "{e:?}"
        );
        let mut mapped = vec![0u8; e.len as usize];
        view.read(e.memfd_offset, &mut mapped).unwrap();
        assert!(mapped == through_api, "{e:?}");
        // And the file's own mapping maps that memfd offset at that file offset.
        let region = kernel_region(base(&file) + e.offset as usize).unwrap();
        assert_eq!(
            region.file_offset_of(base(&file) + e.offset as usize),
            e.memfd_offset
        );
    }
}

// ---------------------------------------------------------------------------------------------
// #13.3: notifications a device layer needs.
// ---------------------------------------------------------------------------------------------

#[test]
fn populate_replay_and_prepare_notifications_carry_exact_plans() {
    let store = shuffled_store(&[1, 0, 3, 2], 1);
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    // Replay on subscribe: one map of everything mapped now.
    let recorder = Recorder::new("r");
    let _reg = store
        .subscribe(&dyn_sub(&recorder), Interest::File(file.id()))
        .unwrap();
    let current = file.current_plan().unwrap();
    assert!(!current.map().is_empty());
    assert_eq!(
        recorder.take(),
        vec![Event::Map(ChangeKind::Replay, current.clone())]
    );
    // Punch then populate: the hole's blocks are unmapped, then mapped again on population.
    file.punch_hole(16 * PAGE, 8 * PAGE).unwrap();
    let punch = recorder.take();
    assert!(
        matches!(
            punch.as_slice(),
            [
                Event::Unmap(ChangeKind::Punch, _),
                Event::Map(ChangeKind::Punch, _)
            ]
        ),
        "{punch:?}"
    );
    file.populate(16 * PAGE, 8 * PAGE).unwrap();
    let populate = recorder.take();
    let [
        Event::Unmap(ChangeKind::Populate, a),
        Event::Map(ChangeKind::Populate, plan),
    ] = populate.as_slice()
    else {
        panic!("a populate notification expected: {populate:?}")
    };
    assert_eq!(a, plan);
    let hole = pages(16, 24);
    let mapped: u64 = plan
        .map()
        .iter()
        .filter(|e| e.run.range(&store.geometry()).overlaps(&hole))
        .map(|e| e.run.count() * store.geometry().pages(e.run.size()))
        .sum();
    assert!(
        mapped >= 8,
        "the populated pages are in the map list: {plan:?}"
    );
    assert_eq!(
        file.current_plan().unwrap(),
        current,
        "back to the state before the punch"
    );
    // A write to a punched shared page populates it, and says so.
    file.punch_hole(40 * PAGE, PAGE).unwrap();
    recorder.take();
    file.write(40 * PAGE, b"x").unwrap();
    let names: Vec<_> = recorder
        .take()
        .into_iter()
        .map(|e| match e {
            Event::Unmap(k, _) | Event::Map(k, _) => (e.name(), k),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            ("unmap", ChangeKind::Populate),
            ("map", ChangeKind::Populate)
        ]
    );
    // Prepare gets the plan that unmap and map get.
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let convert = recorder.take();
    let [
        Event::Prepare(_, range),
        Event::Unmap(_, unmap),
        Event::Map(_, map),
    ] = convert.as_slice()
    else {
        panic!("{convert:?}")
    };
    assert_eq!(*range, pages(0, 1));
    assert_eq!(unmap, map);
    let planned = Arc::new(PlanCapture::default());
    let _reg2 = store
        .subscribe(&dyn_sub(&planned), Interest::File(file.id()))
        .unwrap();
    let outcome = file
        .convert(PAGE, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let seen = planned.prepared.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![outcome.plan.clone()],
        "prepare saw the plan of the commit"
    );
    // Bad input is typed and changes nothing.
    let missing = pfnstore::FileId(file.id().0 + 100);
    assert_eq!(
        store
            .subscribe(&dyn_sub(&recorder), Interest::File(missing))
            .unwrap_err(),
        StoreError::NoSuchFile { file: missing }
    );
    let runs = file.attribute_runs(0, 2 * M2).unwrap();
    recorder.take();
    let empty = StoreError::Empty { offset: PAGE };
    assert_eq!(file.populate(PAGE, 0).unwrap_err(), empty);
    assert_eq!(file.punch_hole(PAGE, 0).unwrap_err(), empty);
    assert_eq!(
        file.convert(PAGE, 0, Shareability::Shared, ConvertMode::Preserve)
            .unwrap_err(),
        empty
    );
    assert_eq!(file.pin(PAGE, 0, PinOwner(1)).unwrap_err(), empty);
    assert_eq!(file.host_view_address(PAGE, 0).unwrap_err(), empty);
    assert_eq!(file.mapped_blocks(PAGE, 0).unwrap_err(), empty);
    assert_eq!(file.attribute_runs(PAGE, 0).unwrap_err(), empty);
    assert_eq!(file.read(PAGE, &mut []).unwrap_err(), empty);
    assert_eq!(file.write(PAGE, &[]).unwrap_err(), empty);
    assert!(
        recorder.events().is_empty(),
        "bad input notified a subscriber"
    );
    assert_eq!(file.attribute_runs(0, 2 * M2).unwrap(), runs);
    store.check_invariants().unwrap();
}

/// Records the plans `prepare` sees.
#[derive(Default)]
struct PlanCapture {
    prepared: Mutex<Vec<pfnstore::MappingPlan>>,
}

impl Subscriber for PlanCapture {
    fn name(&self) -> &str {
        "plan-capture"
    }
    fn prepare(&self, change: &Change<'_>) -> Result<(), pfnstore::Veto> {
        self.prepared.lock().unwrap().push(change.plan.clone());
        Ok(())
    }
    fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {}
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Store::check_invariants on memory whose chunks are not PFN-contiguous (real hugetlb pages).
// ---------------------------------------------------------------------------------------------

/// Ordinary memory whose two 2 MiB chunks have a PFN gap between them, as real hugetlb pages
/// usually do.
#[derive(Debug)]
struct GappySource {
    inner: pfnstore::hugetlb::testing::ShuffledSource,
    chunks: Vec<pfnstore::hugetlb::Chunk>,
    index: pfnstore::hugetlb::ChunkIndex,
}

impl GappySource {
    fn new() -> GappySource {
        use pfnstore::hugetlb::MemorySource;
        let inner = pfnstore::hugetlb::testing::ShuffledSource::reversed_pair(HugePageSize::Base4K)
            .unwrap();
        let mut chunks = inner.chunks().to_vec();
        // The second chunk two chunks further up: one chunk's worth of PFNs nobody has.
        chunks[1].base = pfnstore::core::Pfn(chunks[1].base.0 + chunks[1].pages);
        let index = pfnstore::hugetlb::ChunkIndex::new(&chunks);
        GappySource {
            inner,
            chunks,
            index,
        }
    }
}

impl pfnstore::hugetlb::MemorySource for GappySource {
    fn geometry(&self) -> Geometry {
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
    fn memfd(&self) -> Option<pfnstore::hugetlb::Memfd<'_>> {
        self.inner.memfd()
    }
}

#[test]
fn store_invariants_hold_on_memory_whose_chunks_have_pfn_gaps() {
    let store = Store::new(
        Box::new(GappySource::new()),
        StoreOptions::default().with_shards(1),
    )
    .unwrap();
    let file = store
        .create_file(FileOptions::new(2 * M2).shared().populated())
        .unwrap();
    file.write(M2 - 2, b"both").unwrap();
    file.check_invariants().unwrap();
    store.check_invariants().unwrap();
}
