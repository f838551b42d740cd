//! The conversion path allocates nothing: a steady-state 4 KiB
//! convert-and-back through `GuestFile::convert` makes no heap allocation, on a synthetic store
//! and, with the file's host mapping and its `mprotect`s, on ordinary 4 KiB memory and on real
//! 1 GiB hugetlb pages (skipped where the pool cannot be grown). The host mapping's own
//! `FileMapping::protect` (hugetlb crate) is also measured alone, on a bare mapping of the same
//! memory: one protection change of one unit each way, as the protection rule makes for a
//! convert-and-back.
//!
//! With up to four subscribers (no-op ones here) the path allocates nothing either: an
//! operation's snapshot of them is held inline.
//!
//! Allocation counts are deterministic, so they are asserted. When one is off, the test runs one
//! more pair with a backtrace captured at every allocation and fails with the call sites.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use pfnstore::hugetlb::{FileMapping, HugePageSize, Protection};
use pfnstore::{
    Change, ConvertMode, FileOptions, GuestFile, Interest, Shareability, Store, Subscriber,
    UnmapError,
};
use pfnstore_benches::stores::{self, GIB};
use pfnstore_core::testing::CountingAllocator;

/// [`CountingAllocator`], plus a backtrace of every allocation while [`TRACING`] is set on the
/// allocating thread.
struct TracingAllocator;

#[global_allocator]
static GLOBAL: TracingAllocator = TracingAllocator;

thread_local! {
    static TRACING: Cell<bool> = const { Cell::new(false) };
    /// Set while a backtrace is taken, whose own allocations are not traced.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
    static SITES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn trace(bytes: usize) {
    if !TRACING.with(Cell::get) || INSIDE.with(Cell::get) {
        return;
    }
    INSIDE.with(|i| i.set(true));
    let backtrace = std::backtrace::Backtrace::force_capture().to_string();
    // The frames of the workspace (and of rangemap, the one dependency on the path) say where.
    let frames: Vec<&str> = backtrace
        .lines()
        .filter(|l| l.contains("pfnstore") || l.contains("rangemap") || l.contains("at ./"))
        .filter(|l| !l.contains("conversion_allocations") && !l.contains("TracingAllocator"))
        .take(16)
        .collect();
    let site = format!("{bytes} bytes:\n{}", frames.join("\n"));
    SITES.with(|s| s.borrow_mut().push(site));
    INSIDE.with(|i| i.set(false));
}

// SAFETY: every call is forwarded unchanged to `CountingAllocator`, which forwards to the
// system allocator; tracing only reads thread-local flags (const-initialised `Cell`s without
// destructors) and, while tracing, allocates through this same allocator with `INSIDE` set so
// that it does not recurse.
unsafe impl GlobalAlloc for TracingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        trace(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { CountingAllocator.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        trace(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { CountingAllocator.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `CountingAllocator`, with `layout`.
        unsafe { CountingAllocator.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        trace(new_size);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { CountingAllocator.realloc(ptr, layout, new_size) }
    }
}

const PAGE: u64 = 4096;
const WARM_UP: u64 = 4;
const MEASURED: u64 = 100;

fn convert_and_back(file: &GuestFile, offset: u64) {
    file.convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .expect("to shared");
    file.convert(offset, PAGE, Shareability::Private, ConvertMode::Preserve)
        .expect("to private");
}

/// Allocation calls per steady-state 4 KiB convert-and-back in a populated private file of
/// `file_bytes`, the file's protection unit (0 without a host mapping), and the call sites of
/// one pair when there are allocations.
fn allocations_per_pair(store: &Store, file_bytes: u64) -> (f64, u64, Vec<String>) {
    let file = store
        .create_file(FileOptions::new(file_bytes).populated())
        .expect("file");
    let unit = file.stats().protection_unit;
    let offset = (1000 * PAGE) % file_bytes;
    for _ in 0..WARM_UP {
        convert_and_back(&file, offset);
    }
    let before = CountingAllocator::allocation_calls();
    for _ in 0..MEASURED {
        convert_and_back(&file, offset);
    }
    let calls = CountingAllocator::allocation_calls() - before;
    let mut sites = Vec::new();
    if calls > 0 {
        TRACING.with(|t| t.set(true));
        convert_and_back(&file, offset);
        TRACING.with(|t| t.set(false));
        sites = SITES.with(|s| std::mem::take(&mut *s.borrow_mut()));
    }
    (calls as f64 / MEASURED as f64, unit, sites)
}

/// Allocation calls of one `FileMapping::protect` of a `unit`-byte protection unit to
/// read-write and one back to none, on a bare mapping of `store`'s memfd laid out as a file's
/// (the unit in the middle of one mapped extent where the memory allows).
fn protect_pair_allocations(store: &Store, unit: u64) -> f64 {
    let memfd = store.memfd().expect("a store with host memory has a memfd");
    let align = match memfd.page_size() {
        HugePageSize::Base4K => HugePageSize::Huge2M,
        huge => huge,
    };
    let (len, at) = if 3 * unit <= memfd.len() {
        (3 * unit, unit)
    } else {
        (unit, 0)
    };
    let mapping = FileMapping::reserve(len, align).expect("reserve");
    mapping
        .map(0, memfd.fd(), 0, len, Protection::None)
        .expect("map the memfd");
    let pair = || {
        mapping
            .protect(at, unit, Protection::ReadWrite)
            .expect("to read-write");
        mapping
            .protect(at, unit, Protection::None)
            .expect("to none");
    };
    for _ in 0..WARM_UP {
        pair();
    }
    let before = CountingAllocator::allocation_calls();
    for _ in 0..MEASURED {
        pair();
    }
    (CountingAllocator::allocation_calls() - before) as f64 / MEASURED as f64
}

/// Asserts that a 4 KiB convert-and-back allocates nothing, nor do the host mapping's
/// protection changes alone.
fn assert_no_allocation(what: &str, store: &Store, file_bytes: u64) {
    let (per_pair, unit, sites) = allocations_per_pair(store, file_bytes);
    let protect = if unit > 0 {
        protect_pair_allocations(store, unit)
    } else {
        0.0
    };
    if unit > 0 {
        println!(
            "{what}: {per_pair} allocations per 4 KiB convert-and-back, {protect} in the host mapping's 2 protection changes alone"
        );
    } else {
        println!("{what}: {per_pair} allocations per 4 KiB convert-and-back (no host mapping)");
    }
    assert!(
        per_pair == 0.0,
        "{what}: {per_pair} allocations per 4 KiB convert-and-back; one pair allocated at:\n\n{}",
        sites.join("\n\n")
    );
    assert!(
        protect == 0.0,
        "{what}: {protect} allocations per pair of FileMapping::protect calls"
    );
}

#[test]
fn a_4k_convert_and_back_allocates_nothing_on_a_synthetic_store() {
    let store = stores::synthetic(2, 1);
    assert_no_allocation("synthetic, 1 GiB file", &store, GIB);
}

#[test]
fn a_4k_convert_and_back_with_its_host_mapping_allocates_nothing_on_ordinary_memory() {
    let store = match stores::ordinary(1, 1) {
        Ok(store) => store,
        Err(why) => {
            pfnstore_core::testing::skip(
                "a_4k_convert_and_back_with_its_host_mapping_allocates_nothing_on_ordinary_memory",
                &why,
            );
            return;
        }
    };
    assert!(store.has_host_memory());
    assert_no_allocation("ordinary 4 KiB memory, 1 GiB file", &store, GIB);
    assert_no_allocation("ordinary 4 KiB memory, 2 MiB file", &store, 2 << 20);
}

#[test]
fn a_4k_convert_and_back_with_its_host_mapping_allocates_nothing_on_real_1g_hugetlb() {
    let store = match stores::hugetlb_1g(1, 1) {
        Ok(store) => store,
        Err(why) => {
            pfnstore_core::testing::skip(
                "a_4k_convert_and_back_with_its_host_mapping_allocates_nothing_on_real_1g_hugetlb",
                &why,
            );
            return;
        }
    };
    assert_no_allocation("real 1 GiB hugetlb, 1 GiB file", &store, GIB);
}

/// Accepts everything, does nothing.
struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
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
fn a_4k_convert_and_back_with_three_subscribers_allocates_nothing_on_a_synthetic_store() {
    let store = stores::synthetic(2, 1);
    // Registered before any file exists, as a VMM registers its mappers at start-up.
    let subscribers: Vec<Arc<dyn Subscriber>> = (0..3)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let _registrations: Vec<_> = subscribers
        .iter()
        .map(|s| store.subscribe(s, Interest::All).expect("subscribe"))
        .collect();
    let file = store.create_file(FileOptions::new(PAGE)).expect("file");
    let outcome = file
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .expect("convert");
    assert_eq!(outcome.subscribers, 3, "every subscriber takes part");
    drop(file);
    assert_no_allocation("synthetic, 1 GiB file, 3 no-op subscribers", &store, GIB);
}
