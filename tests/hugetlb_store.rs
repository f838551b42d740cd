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
    let source = HugetlbSource::new(HugetlbConfig {
        bytes: GIB,
        page_size: HugePageSize::Huge1G,
        strict: true,
        numa_node: None,
        grow_pool: true,
        prefault: Prefault::MapPopulate,
        mlock: false,
    });
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
            pfn: file.translate(page).unwrap(),
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
    let pfn_before = file.translate(3 * PAGE).unwrap().unwrap();
    file.write(3 * PAGE, &[0xAB; 64]).unwrap();
    file.punch_hole(2 * PAGE, 2 * PAGE).unwrap();
    let mut buf = [0xFFu8; 64];
    file.read(3 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 64], "a hole reads as zeros");
    // Populating again takes the dirty pages back from the allocator and scrubs them.
    file.populate(2 * PAGE, 2 * PAGE).unwrap();
    assert_eq!(
        file.translate(3 * PAGE).unwrap(),
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
