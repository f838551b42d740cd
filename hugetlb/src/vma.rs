//! `vm.max_map_count`: the kernel's limit on a process's memory regions, and pfnstore's budget
//! under it.
//!
//! Every distinct mapping and every protection boundary inside one is a kernel memory region
//! (VMA). Past `vm.max_map_count` (65,530 by default) the kernel refuses `mmap` and `mprotect`
//! with `ENOMEM`, in whatever state the caller had reached. A [`crate::FileMapping`] therefore
//! counts the regions it holds and takes them from a [`VmaBudget`] before it changes
//! anything: a change that would exceed the budget is refused with
//! [`HugetlbError::MapCountLimit`] while everything is still as it was.
//!
//! The process-wide budget ([`VmaBudget::process`]) is three quarters of `vm.max_map_count`
//! (read once), so that the rest of the process (its libraries, heap, thread stacks, other
//! mappings of the VMM) keeps at least a quarter.

use std::io;
use std::sync::OnceLock;

// The sync facade's atomics are loom's under `pfnstore_loom`, and a loom atomic can neither
// live in a `static` (no const constructor) nor be used outside a model. The budget is
// process-wide accounting of a kernel resource, not state a model explores, so it uses core's.
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{HugePageSize, HugetlbError};

/// The kernel's default `vm.max_map_count`, assumed when procfs cannot be read.
pub const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;

/// A process's regions within this many of the limit make an `ENOMEM` from `mmap` the region
/// limit (a `MAP_FIXED` mapping inside a region can add two).
const REGION_MARGIN: u64 = 4;

/// Memory regions (kernel VMAs) that [`crate::FileMapping`]s may hold together.
///
/// The counts are conservative: a mapping counts one region per maximal run of its pages that
/// the kernel could keep as one VMA, so the kernel never holds more than counted (it can hold
/// fewer, when a reservation happens to merge with a neighbouring one).
#[derive(Debug)]
pub struct VmaBudget {
    used: AtomicU64,
    limit: u64,
}

impl VmaBudget {
    /// A budget of `limit` regions, for tests and for callers that split the process's budget
    /// themselves. (`const`, so that it can be a `static`.)
    pub const fn with_limit(limit: u64) -> VmaBudget {
        VmaBudget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// The process's budget: `vm.max_map_count` less a quarter of it (rounded up) for the rest
    /// of the process. Every [`crate::FileMapping::reserve`] takes from it.
    pub fn process() -> &'static VmaBudget {
        static PROCESS: OnceLock<VmaBudget> = OnceLock::new();
        PROCESS.get_or_init(|| {
            let max = max_map_count();
            VmaBudget::with_limit(max - max.div_ceil(4))
        })
    }

    /// Regions held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most regions that may be held.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `regions` more, or says how many there would be if that exceeds the limit (and
    /// takes nothing).
    pub(crate) fn take(&self, regions: u64) -> Result<(), u64> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let wanted = used.saturating_add(regions);
            if wanted > self.limit {
                return Err(wanted);
            }
            match self.used.compare_exchange_weak(
                used,
                wanted,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Gives `regions` back.
    pub(crate) fn give(&self, regions: u64) {
        self.used.fetch_sub(regions, Ordering::Relaxed);
    }

    /// Records a change the kernel made whether or not it fits (after a failure half-way,
    /// the count must follow what is mapped).
    pub(crate) fn record(&self, delta: i64) {
        if delta >= 0 {
            self.used.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.give(delta.unsigned_abs());
        }
    }
}

/// `vm.max_map_count`, read once ([`DEFAULT_MAX_MAP_COUNT`] if it cannot be read).
pub fn max_map_count() -> u64 {
    static MAX: OnceLock<u64> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_MAP_COUNT)
    })
}

/// The memory regions this process holds now (lines of `/proc/self/maps`).
pub fn process_regions() -> io::Result<u64> {
    let maps = std::fs::read("/proc/self/maps")?;
    Ok(maps.iter().filter(|b| **b == b'\n').count() as u64)
}

/// The error for a failed `mmap` or `mprotect` at byte `offset` of a mapping: an `ENOMEM` that
/// comes from the region limit becomes [`HugetlbError::MapCountLimit`] (always for
/// `mprotect` of a mapped range, whose only `ENOMEM` is that; for `mmap` when the process is
/// at the limit, since a short hugetlb pool gives `ENOMEM` too), anything else an OS error.
pub(crate) fn os_error_at(
    op: &'static str,
    page_size: HugePageSize,
    err: io::Error,
    offset: u64,
) -> HugetlbError {
    if err.raw_os_error() == Some(libc::ENOMEM) {
        let limit = max_map_count();
        let regions = process_regions().unwrap_or(0);
        if op == "mprotect" || regions + REGION_MARGIN >= limit {
            return HugetlbError::MapCountLimit {
                offset,
                regions,
                limit,
            };
        }
    }
    HugetlbError::os(op, page_size, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_past_its_limit_and_takes_nothing_then() {
        let budget = VmaBudget::with_limit(5);
        budget.take(3).unwrap();
        assert_eq!(budget.take(3), Err(6));
        assert_eq!(budget.used(), 3);
        budget.take(2).unwrap();
        budget.give(4);
        assert_eq!(budget.used(), 1);
        budget.record(7);
        budget.record(-2);
        assert_eq!(budget.used(), 6);
    }

    #[test]
    fn the_process_budget_leaves_a_quarter_of_max_map_count() {
        let max = max_map_count();
        let budget = VmaBudget::process();
        assert!(
            budget.limit() <= max * 3 / 4 + 1,
            "{} of {max}",
            budget.limit()
        );
        assert!(budget.limit() >= max / 2);
        assert!(process_regions().unwrap() > 0);
    }

    #[test]
    fn enomem_of_mprotect_is_the_region_limit() {
        let e = os_error_at(
            "mprotect",
            HugePageSize::Huge2M,
            io::Error::from_raw_os_error(libc::ENOMEM),
            0x20_0000,
        );
        assert!(
            matches!(e, HugetlbError::MapCountLimit { offset: 0x20_0000, limit, .. } if limit == max_map_count()),
            "{e:?}"
        );
        assert!(e.to_string().contains("vm.max_map_count"), "{e}");
        assert!(!e.to_string().contains("free memory"), "{e}");
        // A process far from the limit: ENOMEM of a hugetlb mmap is the pool.
        let e = os_error_at(
            "mmap",
            HugePageSize::Huge2M,
            io::Error::from_raw_os_error(libc::ENOMEM),
            0,
        );
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
        // And the plain OS error path names mprotect's ENOMEM the same way.
        let e = HugetlbError::os(
            "mprotect",
            HugePageSize::Base4K,
            io::Error::from_raw_os_error(libc::ENOMEM),
        );
        assert!(e.to_string().contains("vm.max_map_count"), "{e}");
    }
}
