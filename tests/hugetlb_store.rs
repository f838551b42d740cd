//! The store on real 1 GiB hugetlb memory: real PFNs, bytes through the host view, PRESERVE
//! and ZERO conversions, revocation of entirely private huge pages, scrubbing after a
//! punch-hole. Reserves one 1 GiB page (restored afterwards); skipped where that is impossible.

mod common;

use common::*;
use pfnstore::core::PageSize;
use pfnstore::hugetlb::testing::{can_reserve, hugetlb_lock};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, PfnKind, Prefault};
use pfnstore::{ConvertMode, FileOptions, Shareability, Store, StoreError, StoreOptions};

/// A store on one real 1 GiB page, and the pool lock. Field order is drop order: the store
/// (which gives the page back to the pool) goes before the lock is released.
struct RealStore {
    store: Store,
    _lock: pfnstore::hugetlb::testing::HugetlbLock,
}

impl std::ops::Deref for RealStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

fn real_store(test: &str) -> Option<RealStore> {
    let lock = hugetlb_lock();
    if let Err(why) = can_reserve(HugePageSize::Huge1G) {
        pfnstore::core::testing::skip(test, &why);
        return None;
    }
    let source = HugetlbSource::new(
        HugetlbConfig::new(GIB)
            .with_strict(true)
            .with_grow_pool(true)
            .with_prefault(Prefault::MapPopulate),
    );
    let source = match source {
        Ok(source) => source,
        Err(e) => {
            pfnstore::core::testing::skip(test, &format!("no 1 GiB page could be had: {e}"));
            return None;
        }
    };
    Some(RealStore {
        store: Store::from_hugetlb(source, StoreOptions::default().with_shards(1)).expect("store"),
        _lock: lock,
    })
}

#[test]
fn bytes_conversions_and_revocation_on_a_real_1g_page() {
    let Some(store) = real_store("bytes_conversions_and_revocation_on_a_real_1g_page") else {
        return;
    };
    assert!(store.has_host_memory());
    let file = store
        .create_file(FileOptions::new(GIB).shared().populated())
        .unwrap();

    // One real, 1 GiB-aligned PFN run behind the whole file: mapped as one 1 GiB block.
    let fault = file.fault(0, Shareability::Shared).unwrap();
    assert_eq!(fault.size, PageSize::Size1G);
    assert_eq!(
        fault.pfn.0 % (1 << 18),
        0,
        "real PFN {:?} is 1 GiB aligned",
        fault.pfn
    );
    let report = store.source_report();
    assert_eq!(report.obtained, Some(HugePageSize::Huge1G), "{report}");
    assert_eq!(report.pfn_kind, Some(PfnKind::Real), "{report}");

    let page = 5 * PAGE;
    file.write(page + 10, b"guest data").unwrap();
    let mut buf = [0u8; 10];
    file.read(page + 10, &mut buf).unwrap();
    assert_eq!(&buf, b"guest data");

    // PRESERVE to private: bytes stay, the host may not see them, the huge page is revoked.
    file.convert(0, GIB, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    assert_eq!(
        file.read(page + 10, &mut buf).unwrap_err(),
        StoreError::PrivateAccess {
            file: file.id(),
            offset: page + 10,
            pfn: file.pfn_at(page).unwrap(),
        }
    );
    assert!(
        file.host_revoked(page).unwrap(),
        "an entirely private huge page is PROT_NONE"
    );

    // One page back to shared: the huge page is partly shared, so the view is restored and
    // the API check alone guards the private pages.
    file.convert(page, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(!file.host_revoked(page).unwrap());
    file.read(page + 10, &mut buf).unwrap();
    assert_eq!(&buf, b"guest data", "PRESERVE kept the bytes");
    assert!(matches!(
        file.read(page + PAGE, &mut buf),
        Err(StoreError::PrivateAccess { .. })
    ));

    // ZERO: the bytes are gone after the conversion.
    file.convert(page, PAGE, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    file.convert(page, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    file.read(page + 10, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 10], "ZERO cleared the page");
    store.check_invariants().unwrap();
}

#[test]
fn a_punched_range_reads_as_zeros_once_populated_again() {
    let Some(store) = real_store("a_punched_range_reads_as_zeros_once_populated_again") else {
        return;
    };
    let file = store
        .create_file(FileOptions::new(GIB).shared().populated())
        .unwrap();
    let pfn_before = file.pfn_at(3 * PAGE).unwrap().unwrap();
    file.write(3 * PAGE, &[0xAB; 64]).unwrap();
    file.punch_hole(2 * PAGE, 2 * PAGE).unwrap();
    let mut buf = [0xFFu8; 64];
    file.read(3 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 64], "a hole reads as zeros");
    // Populating again takes the dirty pages back from the allocator and scrubs them.
    file.populate(2 * PAGE, 2 * PAGE).unwrap();
    assert_eq!(
        file.pfn_at(3 * PAGE).unwrap(),
        Some(pfn_before),
        "the same frame came back"
    );
    file.read(3 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 64], "scrubbed before reuse");
    assert_eq!(store.stats().allocator.total.dirty_pages, 0);
    file.destroy().unwrap();
}

#[test]
fn dropping_the_store_gives_the_grown_pool_back() {
    use pfnstore::hugetlb::pool::{PoolId, Sysfs};
    let pool = PoolId {
        page_size: HugePageSize::Huge1G,
        node: None,
    };
    let total = || Sysfs::system().read_pool(pool).map(|c| c.total);
    let lock = hugetlb_lock();
    let Ok(before) = total() else {
        return pfnstore::core::testing::skip(
            "dropping_the_store_gives_the_grown_pool_back",
            "the 1 GiB pool cannot be read",
        );
    };
    drop(lock);
    let Some(RealStore { store, _lock: lock }) =
        real_store("dropping_the_store_gives_the_grown_pool_back")
    else {
        return;
    };
    let file = store
        .create_file(FileOptions::new(GIB).shared().populated())
        .unwrap();
    file.write(0, b"x").unwrap();
    let during = total().unwrap();
    assert!(
        during > before,
        "the store grew the pool: {before} -> {during}"
    );
    // The views map the memfd; they must be gone before the pool shrinks back.
    drop(file);
    drop(store);
    assert_eq!(total().unwrap(), before, "the pool was not given back");
    drop(lock);
}

// ---------------------------------------------------------------------------------------------
// The facade's host memory on real 2 MiB and 1 GiB hugetlb pages (issues #11, #12, #13).
// Each test holds the pool lock for its whole run, takes at most 2 GiB, and gives the pool
// back (the sources and reservations restore it when dropped, also on failure).
// ---------------------------------------------------------------------------------------------

use std::sync::{Arc, Mutex};

use pfnstore::hugetlb::pool::{PoolId, PoolReservation, Sysfs};
use pfnstore::hugetlb::testing::{HugetlbLock, ShuffledSource};
use pfnstore::{Change, GuestFile, Interest, Registration, Subscriber, UnmapError};

const M2: u64 = 2 << 20;

fn pool_2m() -> PoolId {
    PoolId {
        page_size: HugePageSize::Huge2M,
        node: None,
    }
}

/// A store on `bytes` of real 2 MiB pages (real PFNs, the pool grown by what is missing and
/// given back when the store goes), built under `lock`.
fn real_2m_store(test: &str, bytes: u64, lock: HugetlbLock) -> Option<RealStore> {
    if let Err(why) = can_reserve(HugePageSize::Huge2M) {
        pfnstore::core::testing::skip(test, &why);
        return None;
    }
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes)
            .with_page_size(HugePageSize::Huge2M)
            .with_strict(true)
            .with_grow_pool(true)
            .with_prefault(Prefault::MapPopulate),
    );
    match source {
        Ok(source) => Some(RealStore {
            store: Store::from_hugetlb(source, StoreOptions::default().with_shards(1))
                .expect("store"),
            _lock: lock,
        }),
        Err(e) => {
            pfnstore::core::testing::skip(test, &format!("{bytes:#x} bytes of 2 MiB pages: {e}"));
            None
        }
    }
}

/// A store on a [`ShuffledSource`] of real 2 MiB pages in `order`, with the pool grown for it.
/// Field order is drop order: the store, then the pool reservation, then the lock.
struct ShuffledHugeStore {
    store: Store,
    _pages: Option<PoolReservation>,
    _lock: HugetlbLock,
}

fn shuffled_2m_store(test: &str, order: &[u64]) -> Option<ShuffledHugeStore> {
    let lock = hugetlb_lock();
    if let Err(why) = can_reserve(HugePageSize::Huge2M) {
        pfnstore::core::testing::skip(test, &why);
        return None;
    }
    let sysfs = Sysfs::system();
    let free = sysfs
        .read_pool(pool_2m())
        .map(|c| c.available())
        .unwrap_or(0);
    let missing = (order.len() as u64).saturating_sub(free);
    let pages = if missing > 0 {
        match PoolReservation::grow(&sysfs, pool_2m(), missing) {
            Ok(pages) => Some(pages),
            Err(e) => {
                pfnstore::core::testing::skip(test, &format!("2 MiB pool: {e}"));
                return None;
            }
        }
    } else {
        None
    };
    let source = ShuffledSource::with_order(HugePageSize::Huge2M, order).expect("source");
    Some(ShuffledHugeStore {
        store: Store::new(Box::new(source), StoreOptions::default().with_shards(1)).expect("store"),
        _pages: pages,
        _lock: lock,
    })
}

fn base_of(file: &GuestFile) -> usize {
    file.host_mapping().unwrap().as_ptr() as usize
}

fn kernel_readable_at(file: &GuestFile, offset: u64) -> bool {
    kernel_region(base_of(file) + offset as usize).is_some_and(|r| r.readable())
}

#[test]
fn reads_and_writes_across_shuffled_2m_hugetlb_pages_stay_in_their_file() {
    let test = "reads_and_writes_across_shuffled_2m_hugetlb_pages_stay_in_their_file";
    let Some(shuffled) = shuffled_2m_store(test, &[1, 0, 3, 2, 5, 4]) else {
        return;
    };
    assert_eq!(
        shuffled.store.memfd().unwrap().page_size(),
        HugePageSize::Huge2M
    );
    let files = check_files_stay_apart(&shuffled.store, M2);
    shuffled.store.check_invariants().unwrap();
    // The reversed pairs give a file PFN-adjacent pages that are apart in the memfd.
    let spans_a_reversed_pair = files.iter().any(|f| {
        let extents = f.extents().unwrap();
        extents.len() == 2
            && extents[1].pfn.0 == extents[0].pfn.0 + M2 / PAGE
            && extents[1].memfd_offset + M2 == extents[0].memfd_offset
    });
    assert!(spans_a_reversed_pair, "{:?}", files[0].extents());
}

#[test]
fn reads_and_writes_across_real_2m_hugetlb_pages_stay_in_their_file() {
    let test = "reads_and_writes_across_real_2m_hugetlb_pages_stay_in_their_file";
    let lock = hugetlb_lock();
    let Some(store) = real_2m_store(test, 8 * M2, lock) else {
        return;
    };
    assert_eq!(store.source_report().pfn_kind, Some(PfnKind::Real));
    // (`store.check_invariants()` is not called: with real PFNs the chunks have gaps, see
    // host_mapping.rs `store_invariants_hold_on_memory_whose_chunks_have_pfn_gaps`.)
    let files = check_files_stay_apart(&store, M2);
    let adjacent_apart = files
        .iter()
        .flat_map(|f| f.extents().unwrap())
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| {
            w[1].pfn.0 == w[0].pfn.0 + w[0].len / PAGE
                && w[1].memfd_offset != w[0].memfd_offset + w[0].len
        })
        .count();
    println!("real 2 MiB pages: {adjacent_apart} PFN-adjacent pairs apart in the memfd");
}

/// #11.4 and #12.1 on hugetlb pages of `page` bytes: a file created private and populated is
/// revoked from creation; punching one 4 KiB page of a private huge page keeps the huge page
/// (held, still revoked: none of its other pages becomes reachable); punching all of it
/// returns it to the reservation.
fn check_partial_punch_keeps_a_private_huge_page_revoked(store: &Store, page: u64) {
    let file = store
        .create_file(FileOptions::new(page).populated())
        .unwrap();
    assert_eq!(file.stats().protection_unit, page);
    let probes = [0, PAGE, 5 * PAGE, page / 2, page - PAGE];
    for offset in probes {
        assert!(
            file.host_revoked(offset).unwrap(),
            "private from creation: {offset:#x}"
        );
        assert!(!kernel_readable_at(&file, offset), "{offset:#x}");
    }
    file.punch_hole(5 * PAGE, PAGE).unwrap();
    assert_eq!(file.pfn_at(5 * PAGE).unwrap(), None);
    assert_eq!(
        file.stats().held_pages,
        page / PAGE,
        "a partly punched huge page stays held"
    );
    for offset in probes.into_iter().filter(|o| *o != 5 * PAGE) {
        assert!(
            file.host_revoked(offset).unwrap(),
            "{offset:#x} of the private huge page became accessible after a 4 KiB punch"
        );
    }
    let base = base_of(&file);
    for region in kernel_regions_in(base, base + page as usize) {
        assert!(!region.readable(), "the kernel maps {region:?} readable");
    }
    // Populated again, the punched page reads as zeros once shared; the huge page opens.
    file.populate(5 * PAGE, PAGE).unwrap();
    file.convert(5 * PAGE, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    assert!(kernel_readable_at(&file, 0));
    let mut buf = vec![0xFFu8; PAGE as usize];
    file.read(5 * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    file.convert(5 * PAGE, PAGE, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    assert!(!kernel_readable_at(&file, 0));
    // Punched whole, it leaves the file's mapping.
    file.punch_hole(0, page).unwrap();
    assert_eq!(file.stats().held_pages, 0);
    let gone = kernel_region(base).unwrap();
    assert!(gone.inode == 0 && !gone.readable(), "{gone:?}");
    file.destroy().unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn punching_4k_of_a_private_2m_hugetlb_page_keeps_the_rest_revoked() {
    let test = "punching_4k_of_a_private_2m_hugetlb_page_keeps_the_rest_revoked";
    let Some(store) = real_2m_store(test, 2 * M2, hugetlb_lock()) else {
        return;
    };
    check_partial_punch_keeps_a_private_huge_page_revoked(&store, M2);
}

#[test]
fn punching_4k_of_a_private_1g_page_keeps_the_rest_revoked() {
    let Some(store) = real_store("punching_4k_of_a_private_1g_page_keeps_the_rest_revoked") else {
        return;
    };
    check_partial_punch_keeps_a_private_huge_page_revoked(&store, GIB);
}

/// Holds the store, a file and its own registration: no cycle may keep the memory.
struct Holder {
    _store: Store,
    _file: GuestFile,
    registration: Mutex<Option<Registration>>,
}

impl Subscriber for Holder {
    fn name(&self) -> &str {
        "holder"
    }
    fn unmap(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
    fn map(&self, _: &Change<'_>) {}
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

#[test]
fn a_subscriber_holding_the_store_does_not_keep_the_hugetlb_pool_grown() {
    let test = "a_subscriber_holding_the_store_does_not_keep_the_hugetlb_pool_grown";
    let lock = hugetlb_lock();
    let total = || Sysfs::system().read_pool(pool_2m()).map(|c| c.total);
    let Ok(before) = total() else {
        return pfnstore::core::testing::skip(test, "the 2 MiB pool cannot be read");
    };
    let Some(RealStore { store, _lock: lock }) = real_2m_store(test, 4 * M2, lock) else {
        return;
    };
    let ino = memfd_inode(&store);
    let file = store
        .create_file(FileOptions::new(4 * M2).shared().populated())
        .unwrap();
    file.write(0, b"guest").unwrap();
    let holder = Arc::new(Holder {
        _store: store.clone(),
        _file: file.clone(),
        registration: Mutex::new(None),
    });
    let as_subscriber: Arc<dyn Subscriber> = holder.clone();
    let registration = store.subscribe(&as_subscriber, Interest::All).unwrap();
    *holder.registration.lock().unwrap() = Some(registration);
    file.convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    let during = total().unwrap();
    assert!(during >= before + 4 || before >= 4, "{before} -> {during}");
    let weak = store.downgrade();
    drop((file, store, holder, as_subscriber));
    assert!(weak.upgrade().is_none(), "a cycle kept the store alive");
    assert_eq!(
        references_to_inode(ino),
        (0, 0),
        "the hugetlb memfd is still open or mapped"
    );
    assert_eq!(total().unwrap(), before, "the pool was not given back");
    drop(lock);
}

#[test]
fn a_2gib_file_on_2m_hugetlb_pages_is_one_contiguous_host_mapping() {
    let test = "a_2gib_file_on_2m_hugetlb_pages_is_one_contiguous_host_mapping";
    let Some(store) = real_2m_store(test, 2 * GIB, hugetlb_lock()) else {
        return;
    };
    let ino = memfd_inode(&store);
    let file = store
        .create_file(FileOptions::new(2 * GIB).shared().populated())
        .unwrap();
    let extents = file.extents().unwrap();
    println!(
        "a 2 GiB file on 2 MiB pages: {} memfd extents",
        extents.len()
    );
    let region = file.host_mapping().unwrap();
    let base = region.as_ptr() as usize;
    assert!(region.len() >= 2 * GIB);
    assert_eq!(base % M2 as usize, 0);
    assert_eq!(
        file.host_view_address(0, 2 * GIB).unwrap().as_ptr() as usize,
        base
    );
    // Every extent boundary: the address is the file's, and the bytes there are the file's.
    for e in extents.iter().skip(1).take(64) {
        let at = e.offset - 8;
        let data = tagged_bytes(0x2F, at, 16);
        file.write(at, &data).unwrap();
        let addr = file.host_view_address(at, 16).unwrap().as_ptr() as usize;
        assert_eq!(addr, base + at as usize);
        assert_eq!(forced_read(addr, 16).unwrap(), data, "{at:#x}");
        let r = kernel_region(base + e.offset as usize).unwrap();
        assert_eq!(r.inode, ino);
        assert_eq!(r.file_offset_of(base + e.offset as usize), e.memfd_offset);
    }
    for r in kernel_regions_in(base, base + 2 * GIB as usize) {
        assert!(r.inode == ino && r.readable(), "{r:?}");
    }
    // A private 2 MiB page is revoked, a punched one is the reservation again, and the
    // addresses around them stay where they were.
    file.convert(10 * M2, M2, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    file.punch_hole(20 * M2, M2).unwrap();
    assert!(file.host_revoked(10 * M2).unwrap() && !kernel_readable_at(&file, 10 * M2));
    let hole = kernel_region(base + 20 * M2 as usize).unwrap();
    assert!(hole.inode == 0 && !hole.readable(), "{hole:?}");
    assert!(matches!(
        file.host_view_address(20 * M2, PAGE),
        Err(StoreError::NotBacked { .. })
    ));
    assert_eq!(
        file.host_view_address(21 * M2, M2).unwrap().as_ptr() as usize,
        base + 21 * M2 as usize
    );
    assert_eq!(file.host_mapping().unwrap(), region);
    drop(file);
    store.check_invariants().unwrap();
}
