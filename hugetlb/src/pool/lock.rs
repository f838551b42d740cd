//! [`PoolLock`]: the advisory lock around every read-modify-write of a hugetlb pool.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::HugetlbError;
use crate::error::hint;
use crate::pool::io_error;

/// Held while a pool is read and written; released on drop. An `flock(2)` on the pool lock
/// file, which every pfnstore process and guardian (`flock(1)`) takes: locks of separate
/// opens of the file exclude each other, also between threads of one process.
#[derive(Debug)]
pub struct PoolLock {
    _file: File,
    path: PathBuf,
}

impl PoolLock {
    /// Opens (creating) `path` and blocks until the lock is held.
    pub(crate) fn acquire(path: &Path) -> Result<PoolLock, HugetlbError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_error(path, e, hint::ROOT))?;
        loop {
            // SAFETY: flock takes a descriptor we own (in `file`) and an operation flag; it
            // touches no memory of ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(io_error(path, err, hint::ROOT));
            }
        }
        Ok(PoolLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_another_open_of_the_file() {
        let path =
            std::env::temp_dir().join(format!("pfnstore-pool-lock-test-{}", std::process::id()));
        let held = PoolLock::acquire(&path).unwrap();
        assert_eq!(held.path(), path);
        let other = File::options().append(true).open(&path).unwrap();
        let try_lock =
            // SAFETY: as in `acquire`, with LOCK_NB so that it cannot block.
            |f: &File| unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(try_lock(&other), -1, "held elsewhere");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
        drop(held);
        assert_eq!(try_lock(&other), 0, "released on drop");
        drop(other);
        std::fs::remove_file(path).unwrap();
    }
}
