//! Support for tests: the lock every test that uses the real hugetlb pools holds (this
//! crate's and the facade's), [`ShuffledSource`], a memory source whose memfd holds its
//! chunks in shuffled order, and [`send_with_fd`]/[`recv_with_fd`], which pass a memfd to
//! another process over a Unix socket as a handover does.
//!
//! Hidden from the docs and outside the semver promise: this module exists for the
//! workspace's own tests and benches (see "Test support" in ARCHITECTURE.md).
//!
//! The pools are system-wide: two tests that resize them at once would see each other's
//! pages. Every such test holds [`hugetlb_lock`] for its whole run, which serializes the
//! threads of one test binary (a process-wide mutex) and the test binaries that cargo runs
//! side by side (an `flock` on [`LOCK_PATH`]). Pool changes go through
//! [`PoolReservation`](crate::pool::PoolReservation), which restores the pool when dropped,
//! also when the test panics.
//!
//! ```no_run
//! use pfnstore_hugetlb::{HugePageSize, pool::{PoolId, PoolReservation, Sysfs}, testing};
//!
//! let _lock = testing::hugetlb_lock();
//! if let Err(why) = testing::can_reserve(HugePageSize::Huge1G) {
//!     pfnstore_core::testing::skip("my_test", &why);
//!     return Ok(());
//! }
//! let id = PoolId { page_size: HugePageSize::Huge1G, node: None };
//! let _pages = PoolReservation::grow(&Sysfs::system(), id, 1)?;
//! // ... use one 1 GiB page ...
//! # Ok::<(), pfnstore_hugetlb::HugetlbError>(())
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;

mod shuffled;
pub use crate::fd_passing::{recv_with_fd, send_with_fd};
pub use shuffled::ShuffledSource;

use pfnstore_core::sync::{Mutex, MutexGuard};

use crate::HugePageSize;
use crate::pool::Sysfs;

/// The file every pfnstore test binary locks before touching a hugetlb pool.
pub const LOCK_PATH: &str = "/tmp/pfnstore-hugetlb.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Held while a test uses the hugetlb pools; released on drop.
#[derive(Debug)]
pub struct HugetlbLock {
    // Field order is drop order: the file lock goes first, then the in-process mutex.
    _file: Option<File>,
    _guard: MutexGuard<'static, ()>,
}

/// Blocks until no other test (in this process or another) uses the hugetlb pools.
///
/// If the lock file cannot be opened (a read-only /tmp), only this process is serialized;
/// that is said on stderr.
pub fn hugetlb_lock() -> HugetlbLock {
    let guard = IN_PROCESS.lock();
    let file = match File::options().create(true).append(true).open(LOCK_PATH) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "pfnstore-hugetlb: cannot open {LOCK_PATH} ({e}); serializing this process only"
            );
            None
        }
    };
    if let Some(f) = &file {
        loop {
            // SAFETY: flock takes a file descriptor we own (it lives in `f`) and an operation
            // flag; it touches no memory of ours.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                eprintln!(
                    "pfnstore-hugetlb: flock {LOCK_PATH}: {err}; serializing this process only"
                );
                break;
            }
        }
    }
    HugetlbLock {
        _file: file,
        _guard: guard,
    }
}

/// Whether this process can grow the pool of `page_size` (root and a writable
/// `nr_hugepages`); the error says why not, for [`pfnstore_core::testing::skip`].
pub fn can_reserve(page_size: HugePageSize) -> Result<(), String> {
    Sysfs::system().can_grow(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_serializes_threads() {
        use pfnstore_core::sync::atomic::{AtomicU32, Ordering};
        use pfnstore_core::sync::thread;
        static INSIDE: AtomicU32 = AtomicU32::new(0);
        let workers: Vec<_> = (0..4)
            .map(|_| {
                thread::spawn(|| {
                    for _ in 0..20 {
                        let _l = hugetlb_lock();
                        assert_eq!(INSIDE.fetch_add(1, Ordering::SeqCst), 0);
                        thread::yield_now();
                        INSIDE.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }
}
