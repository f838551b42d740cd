//! Support for the project's own tests: reporting a test that cannot run here as *skipped*,
//! [`CountingAllocator`], which measures the heap bytes a structure holds, and [`XorShift`],
//! the deterministic pseudo-random sequence tests and benches draw from.
//!
//! Hidden from the docs and outside the semver promise: this module exists for the
//! workspace's own tests and benches (see "Test support" in ARCHITECTURE.md).
//!
//! Rust's test harness has no runtime skip, so a test that needs something the machine lacks
//! (root, a hugetlb pool, `/dev/kvm`) calls [`skip`] and returns. `skip` prints the reason and,
//! when the test script sets `PFNSTORE_SKIP_LOG`, appends a line to that file so that the
//! script can count the test as skipped rather than passed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;

/// The environment variable naming the file that skipped tests are recorded in.
pub const SKIP_LOG_ENV: &str = "PFNSTORE_SKIP_LOG";

/// Records that the test `test` did not run, and why. The caller returns right after.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "could not record skip of {test} in {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

/// Marsaglia's xorshift64 (shifts 13, 7, 17): a deterministic pseudo-random sequence for tests
/// and benches, so they need no RNG crate and every run sees the same numbers. The state must
/// not be 0 (0 stays 0).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A sequence from `state` (non-zero).
    pub const fn new(state: u64) -> XorShift {
        XorShift(state)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next number modulo `bound` (non-zero).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// A global allocator that forwards every call to the system allocator and counts, per
/// thread, the bytes live and the allocation calls: tests and benches that check the bytes a
/// structure holds (or that a path allocates nothing) install it in their own binary with
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`. The counts are per
/// thread so that tests running in parallel do not disturb each other; memory allocated on one
/// thread and freed on another moves bytes between their counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

thread_local! {
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
    static ALLOCATION_CALLS: Cell<u64> = const { Cell::new(0) };
}

impl CountingAllocator {
    /// Bytes allocated minus bytes freed on this thread so far (through this allocator, when
    /// it is the global one).
    pub fn live_bytes() -> i64 {
        LIVE_BYTES.with(Cell::get)
    }

    /// Calls of `alloc`, `alloc_zeroed` and `realloc` on this thread so far.
    pub fn allocation_calls() -> u64 {
        ALLOCATION_CALLS.with(Cell::get)
    }

    fn count(bytes: i64, calls: u64) {
        LIVE_BYTES.with(|l| l.set(l.get() + bytes));
        ALLOCATION_CALLS.with(|c| c.set(c.get() + calls));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged, so `System`'s guarantees
// are this allocator's. The counters are thread-local `Cell`s with const initialisers, which
// need no allocation (no re-entry) and no destructor.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size() as i64, 1);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size() as i64, 1);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::count(-(layout.size() as i64), 0);
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation is).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size as i64 - layout.size() as i64, 1);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn xorshift_is_marsaglias_sequence() {
        let mut x = super::XorShift::new(1);
        // The first values of xorshift64 (13, 7, 17) from state 1.
        assert_eq!(x.next_u64(), 1_082_269_761);
        assert_eq!(x.next_u64(), 1_152_992_998_833_853_505);
        assert!(x.below(10) < 10);
    }

    #[test]
    fn skip_appends_a_line_per_call() {
        let dir = std::env::temp_dir().join(format!("pfnstore-skip-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let _ = std::fs::remove_file(&log);
        // The env var is process-wide; only this test in the crate touches it.
        // SAFETY: no other thread of this test binary reads or writes PFNSTORE_SKIP_LOG.
        unsafe { std::env::set_var(super::SKIP_LOG_ENV, &log) };
        super::skip("a", "first reason");
        super::skip("b", "second reason");
        // SAFETY: as above.
        unsafe { std::env::remove_var(super::SKIP_LOG_ENV) };
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "a\tfirst reason\nb\tsecond reason\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
