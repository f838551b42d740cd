//! The stores the facade's benches, examples and allocation tests run on, built one way
//! everywhere so that their figures compare:
//!
//! * [`synthetic`]: PFNs without memory (no host mapping): the facade's own cost;
//! * [`ordinary`]: ordinary 4 KiB memory from a memfd (the last rung of the fallback ladder),
//!   with each file's host mapping;
//! * [`hugetlb_1g`]: real 1 GiB hugetlb pages, the pool grown for them and given back when the
//!   store goes, under the pool lock every pfnstore test and bench holds.
//!
//! Memory that cannot be had (no root, no pages) is an `Err` with the reason, for the caller to
//! print as a skip.

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::testing::{HugetlbLock, can_reserve, hugetlb_lock};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault, SyntheticSource};
use pfnstore::{Store, StoreOptions};

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// The most hugetlb memory a bench may take from the pool (house rule).
pub const MAX_HUGETLB_GIB: u64 = 2;

/// A store of `chunks` 1 GiB chunks of synthetic PFNs.
pub fn synthetic(chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), chunks)
        .expect("a synthetic source needs no memory");
    Store::synthetic(source, StoreOptions::default().with_shards(shards))
        .expect("a store over a synthetic source")
}

/// A store of `gib` GiB of ordinary 4 KiB pages, prefaulted by one thread per CPU.
pub fn ordinary(gib: u64, shards: usize) -> Result<Store, String> {
    let source = HugetlbSource::new(
        HugetlbConfig::new(gib * GIB)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true),
    )
    .map_err(|e| format!("{gib} GiB of ordinary memory could not be had: {e}"))?;
    Store::from_hugetlb(source, StoreOptions::default().with_shards(shards))
        .map_err(|e| format!("store over ordinary memory: {e}"))
}

/// A store on real 1 GiB hugetlb pages, holding the pool lock. Field order is drop order: the
/// store gives its pages back to the pool before the lock is released.
#[derive(Debug)]
pub struct HugetlbStore {
    /// The store.
    pub store: Store,
    _lock: HugetlbLock,
}

impl std::ops::Deref for HugetlbStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// A store of `gib` (at most [`MAX_HUGETLB_GIB`]) real 1 GiB hugetlb pages, growing the pool
/// by what is missing (root only); the pages go back to the pool when the store is dropped.
pub fn hugetlb_1g(gib: u64, shards: usize) -> Result<HugetlbStore, String> {
    if gib > MAX_HUGETLB_GIB {
        return Err(format!(
            "{gib} GiB of hugetlb pages asked for; benches take at most {MAX_HUGETLB_GIB}"
        ));
    }
    let lock = hugetlb_lock();
    can_reserve(HugePageSize::Huge1G)?;
    let source = HugetlbSource::new(
        HugetlbConfig::new(gib * GIB)
            .with_strict(true)
            .with_grow_pool(true)
            .with_prefault(Prefault::MapPopulate),
    )
    .map_err(|e| format!("{gib} x 1 GiB hugetlb pages could not be had: {e}"))?;
    let store = Store::from_hugetlb(source, StoreOptions::default().with_shards(shards))
        .map_err(|e| format!("store over 1 GiB hugetlb pages: {e}"))?;
    Ok(HugetlbStore { store, _lock: lock })
}
