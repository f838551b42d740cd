//! The hugetlb pools in sysfs: reading them, growing them, and giving back what was added.
//!
//! The kernel keeps one pool per huge page size (`/sys/kernel/mm/hugepages/hugepages-<kB>kB`)
//! and, on NUMA machines, one per node and size
//! (`/sys/devices/system/node/node<N>/hugepages/hugepages-<kB>kB`). A pool's `nr_hugepages`
//! is its size; writing it (as root) grows or shrinks the pool. `free_hugepages` counts pages
//! not faulted in by anyone, `resv_hugepages` those of them already promised to a mapping, and
//! `surplus_hugepages` pages above `nr_hugepages` from overcommit.
//!
//! pfnstore never changes a pool silently: only [`PoolReservation`] writes `nr_hugepages`,
//! and it gives back what it added, and only that, when dropped.
//!
//! ## Other processes
//!
//! A pool is shared by every process of the machine. Each read-modify-write of a pool by
//! pfnstore holds an advisory lock that all pfnstore processes (and their guardians) honour:
//! `flock(2)` on [`POOL_LOCK_FILE`] in the *run directory*, `/run/pfnstore` ([`RUN_DIR`]), or
//! `$TMPDIR/pfnstore` when `/run` is not writable (a process that may not write `/run` is not
//! root and cannot resize pools either, so the two never need to meet). Giving pages back
//! never assumes the pool is as it was left: a reservation shrinks the pool by what it added
//! *and what is still free and unreserved now*, so it never takes pages that others added and
//! use; what it could not give back yet stays owed (see below).
//!
//! ## Surviving the owner's death
//!
//! A process killed without unwinding (SIGKILL, an OOM kill, `std::process::exit`) drops
//! nothing, so the pool would stay grown. (Surplus pages, which the kernel frees by itself,
//! are no answer: this kernel refuses `nr_overcommit_hugepages` for 1 GiB pages.) So every
//! growth is written down and watched:
//!
//! * **The ledger**: one file per growth in `<run directory>/`[`LEDGER_DIR`], named
//!   `<pid>.<start time>.<n>` and holding the pool's sysfs directory and the pages owed.
//!   Whoever gives pages back (the owner, its guardian, [`reconcile`]) does so under the
//!   pool lock, only while the entry exists, and removes the entry (or lowers it to what is
//!   still owed) in the same critical section, so pages are never given back twice.
//! * **The guardian**: a tiny `/bin/sh` process (using `flock(1)` from util-linux), started
//!   when a reservation grows a pool, that holds the read end of a pipe whose write end stays
//!   in the owner (close-on-exec, so programs the VMM starts do not inherit it; a child it
//!   forks without exec does, and the guardian then waits for that child too). The guardian
//!   holds no other descriptor of the owner (all are made close-on-exec before it starts, the
//!   memfd already is) and none of its memory (it is a new program), and it runs in its own
//!   process group, ignoring SIGHUP, SIGINT and SIGTERM, so a Ctrl-C or a service stop aimed
//!   at the VMM does not end it before it has done its job. On a normal drop the owner settles its entry and then tells the guardian to stand
//!   down; when the pipe closes without that (the owner died), the guardian settles the entry
//!   itself, retrying for a while ([`GUARDIAN_PATIENCE`]) if the owner's pages are not free
//!   yet (the kernel frees a dead process's memory as it tears it down), then exits. There is
//!   one guardian (a `/bin/sh` of a megabyte or two) per growth while it lives.
//! * **Reconciling**: [`reconcile`] settles the entries of dead processes (a guardian that
//!   could not be started or ran out of patience). A source with `grow_pool` calls it before
//!   it reads the pool it may grow; a VMM can call it at start, an administrator through the
//!   CLI (`pfnstore hugetlb --restore`).
//!
//! ## Handing a growth to another process
//!
//! A live update hands a source, and with it the growth it owns, to a new process
//! ([`crate::handover`]). A growth has exactly one ledger entry at every moment, so that two
//! processes can never both give it back, and it changes owner by renaming that entry under the
//! pool lock:
//!
//! 1. **Adopt** (the new owner, [`PoolReservation::adopt`], last step of
//!    [`crate::rebuild`]): the old entry (its name travels in the record) gets a third line
//!    `from <old name>` and is renamed to a name of the new owner, whose guardian watches it.
//!    From now on the old owner's reservation finds its entry gone: dropping it, or its guardian
//!    after it died, gives nothing back. The pool is not touched.
//! 2. **Relinquish** (the old owner, after the new one confirmed,
//!    [`PoolReservation::relinquish`] through [`crate::MemorySource::relinquish`]): the `from`
//!    line goes, the old guardian exits, the old reservation owns nothing. Refused
//!    ([`HugetlbError::NotAdopted`]) while the entry is still the old owner's.
//!
//! Until the old owner relinquishes, the `from` line marks the handover as unconfirmed, and
//! whoever settles the entry while the old owner lives (the new owner dropping its source after
//! a failure, the new owner's guardian after it died, [`reconcile`]) renames it back to the old
//! name instead of giving pages back: the old owner resumes as if nothing happened. An old
//! owner that lets go of a growth it no longer holds confirms the handover if the new owner
//! lives, and takes the entry back and settles it if the new owner died. When the old owner
//! is dead, the entry is settled as any other. Give-backs never take more than the pool's free
//! and unreserved pages, so pages one owner still maps are never taken by the other's settle.
//!
//! Both processes must share the run directory (same host, same `/run`); a receiver that finds
//! no entry of the recorded name takes over nothing (its pages were given back already).

use std::io;
use std::path::{Path, PathBuf};

use crate::error::hint;
use crate::{HugePageSize, HugetlbError};

mod guardian;
pub(crate) mod id;
mod ledger;
mod lock;
mod reservation;

pub use guardian::GUARDIAN_PATIENCE;
pub use id::{PoolCounts, PoolId};
pub use ledger::{Settled, ledger_entries, reconcile};
pub use lock::PoolLock;
pub use reservation::PoolReservation;

/// The run directory of pfnstore processes on a real system (falling back to
/// `$TMPDIR/pfnstore` when it cannot be created).
pub const RUN_DIR: &str = "/run/pfnstore";

/// The pool lock's file in the run directory.
pub const POOL_LOCK_FILE: &str = "hugetlb-pool.lock";

/// The ledger's directory in the run directory.
pub const LEDGER_DIR: &str = "hugetlb-ledger";

/// A pool and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Which pool.
    pub id: PoolId,
    /// Its counters when read.
    pub counts: PoolCounts,
}

/// Where sysfs and procfs are: `/sys` and `/proc` on a real system, a directory tree in
/// tests of the parsing; and the run directory that holds the pool lock and the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    sys: PathBuf,
    proc: PathBuf,
    /// `None`: [`RUN_DIR`] or its fallback.
    run: Option<PathBuf>,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::system()
    }
}

impl Sysfs {
    /// The running system's `/sys` and `/proc`, and [`RUN_DIR`].
    pub fn system() -> Sysfs {
        Sysfs {
            sys: "/sys".into(),
            proc: "/proc".into(),
            run: None,
        }
    }

    /// Trees rooted elsewhere (tests), with the run directory `pfnstore-run` next to `sys`, so
    /// that a fake tree's lock and ledger are its own.
    pub fn at(sys: impl Into<PathBuf>, proc: impl Into<PathBuf>) -> Sysfs {
        let sys = sys.into();
        let run = sys.parent().unwrap_or(Path::new("/")).join("pfnstore-run");
        Sysfs {
            sys,
            proc: proc.into(),
            run: Some(run),
        }
    }

    /// The same trees with the run directory `run`.
    pub fn with_run_dir(mut self, run: impl Into<PathBuf>) -> Sysfs {
        self.run = Some(run.into());
        self
    }

    /// The run directory (created if missing): the one given, or [`RUN_DIR`], or
    /// `$TMPDIR/pfnstore` when that cannot be created.
    pub fn run_dir(&self) -> Result<PathBuf, HugetlbError> {
        let create = |dir: PathBuf| {
            std::fs::create_dir_all(&dir)
                .map(|()| dir.clone())
                .map_err(|e| io_error(&dir, e, hint::ROOT))
        };
        match &self.run {
            Some(dir) => create(dir.clone()),
            None => create(PathBuf::from(RUN_DIR))
                .or_else(|_| create(std::env::temp_dir().join("pfnstore"))),
        }
    }

    /// Takes the pool lock (see the module docs), blocking until no other pfnstore process
    /// holds it.
    pub fn lock_pools(&self) -> Result<PoolLock, HugetlbError> {
        PoolLock::acquire(&self.run_dir()?.join(POOL_LOCK_FILE))
    }

    /// The directory of a pool.
    pub fn pool_dir(&self, id: PoolId) -> Result<PathBuf, HugetlbError> {
        let dir = id.page_size.sysfs_dir().ok_or(HugetlbError::NoPool {
            page_size: id.page_size,
        })?;
        Ok(match id.node {
            None => self.sys.join("kernel/mm/hugepages").join(dir),
            Some(n) => self
                .sys
                .join(format!("devices/system/node/node{n}/hugepages"))
                .join(dir),
        })
    }

    /// The NUMA nodes of the machine, ascending. A kernel without NUMA has no node directory;
    /// then the answer is `[0]`, the node every page is on.
    pub fn numa_nodes(&self) -> Result<Vec<u32>, HugetlbError> {
        let dir = self.sys.join("devices/system/node");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![0]),
            Err(e) => return Err(io_error(&dir, e, hint::ROOT)),
        };
        let mut nodes: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("node")?
                    .parse::<u32>()
                    .ok()
            })
            .collect();
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// Checks that `node` exists.
    pub fn check_node(&self, node: u32) -> Result<(), HugetlbError> {
        let available = self.numa_nodes()?;
        if available.contains(&node) {
            Ok(())
        } else {
            Err(HugetlbError::UnknownNumaNode { node, available })
        }
    }

    /// The counters of one pool.
    pub fn read_pool(&self, id: PoolId) -> Result<PoolCounts, HugetlbError> {
        read_counts(&self.pool_dir(id)?)
    }

    /// Every pool of the sizes pfnstore uses: the system-wide ones, then each node's.
    /// Sizes the kernel does not offer are left out.
    pub fn pools(&self) -> Result<Vec<PoolStatus>, HugetlbError> {
        let mut nodes: Vec<Option<u32>> = vec![None];
        nodes.extend(self.numa_nodes()?.into_iter().map(Some));
        let mut out = Vec::new();
        for node in nodes {
            for page_size in [HugePageSize::Huge1G, HugePageSize::Huge2M] {
                let id = PoolId { page_size, node };
                if self.pool_dir(id)?.is_dir() {
                    out.push(PoolStatus {
                        id,
                        counts: self.read_pool(id)?,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Sets a pool's `nr_hugepages` and returns what the kernel made of it (it may give fewer
    /// pages than asked when memory is fragmented). This takes no lock: [`PoolReservation`]
    /// holds the pool lock around its reads and writes, which is what keeps pfnstore
    /// processes from undoing each other's changes.
    pub fn write_total(&self, id: PoolId, total: u64) -> Result<u64, HugetlbError> {
        write_total_in(&self.pool_dir(id)?, total)
    }

    /// Asks the kernel to compact all memory (`/proc/sys/vm/compact_memory`), so that freed
    /// pages coalesce into the contiguous ranges huge pages need. Best effort: `false` when the
    /// trigger could not be written (no root, no `CONFIG_COMPACTION`).
    pub fn compact_memory(&self) -> bool {
        std::fs::write(self.proc.join("sys/vm/compact_memory"), "1\n").is_ok()
    }

    /// Whether this process may write `nr_hugepages` of `id` (root, writable sysfs).
    pub fn pool_writable(&self, id: PoolId) -> bool {
        let Ok(dir) = self.pool_dir(id) else {
            return false;
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("nr_hugepages"))
            .is_ok()
    }

    /// Whether this process can grow the system-wide pool of `page_size`: root, the pool
    /// exists, and its `nr_hugepages` is writable. The error says why not.
    pub fn can_grow(&self, page_size: HugePageSize) -> Result<(), String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to resize hugetlb pools".into());
        }
        let id = PoolId {
            page_size,
            node: None,
        };
        if !self.pool_dir(id).is_ok_and(|d| d.is_dir()) {
            return Err(format!("the kernel has no {page_size} pool"));
        }
        if !self.pool_writable(id) {
            return Err(format!(
                "nr_hugepages of the {page_size} pool is not writable"
            ));
        }
        Ok(())
    }

    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub fn mem_total(&self) -> Result<u64, HugetlbError> {
        let path = self.proc.join("meminfo");
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e, hint::ROOT))?;
        text.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb << 10)
            .ok_or_else(|| HugetlbError::Sysfs {
                path,
                problem: "no MemTotal line in kB".into(),
                errno: None,
                hint: hint::ROOT,
            })
    }
}

pub(crate) fn io_error(path: &Path, e: io::Error, hint: &'static str) -> HugetlbError {
    HugetlbError::Sysfs {
        path: path.to_path_buf(),
        problem: e.to_string(),
        errno: e.raw_os_error(),
        hint,
    }
}

/// The counters of the pool whose sysfs directory is `dir` (per-node pools have no
/// `resv_hugepages`: 0 there).
pub(crate) fn read_counts(dir: &Path) -> Result<PoolCounts, HugetlbError> {
    let read = |name: &str| read_u64(&dir.join(name));
    let resv = dir.join("resv_hugepages");
    Ok(PoolCounts {
        total: read("nr_hugepages")?,
        free: read("free_hugepages")?,
        reserved: if resv.exists() { read_u64(&resv)? } else { 0 },
        surplus: read("surplus_hugepages")?,
    })
}

/// Writes `nr_hugepages` of the pool in `dir`; returns what the kernel made of it.
pub(crate) fn write_total_in(dir: &Path, total: u64) -> Result<u64, HugetlbError> {
    let path = dir.join("nr_hugepages");
    std::fs::write(&path, format!("{total}\n")).map_err(|e| io_error(&path, e, hint::ROOT))?;
    read_u64(&path)
}

pub(crate) fn read_u64(path: &Path) -> Result<u64, HugetlbError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e, hint::ROOT))?;
    text.trim().parse().map_err(|_| HugetlbError::Sysfs {
        path: path.to_path_buf(),
        problem: format!("not a number: {:?}", text.trim()),
        errno: None,
        hint: hint::ROOT,
    })
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests {
    use super::*;
    use fake::FakeTree;

    #[test]
    fn reads_pools_nodes_and_memtotal_from_a_tree() {
        let tree = FakeTree::new("read");
        let sysfs = tree.sysfs();
        assert_eq!(sysfs.numa_nodes().unwrap(), vec![0, 2]);
        assert!(sysfs.check_node(2).is_ok());
        assert!(matches!(
            sysfs.check_node(1),
            Err(HugetlbError::UnknownNumaNode { node: 1, .. })
        ));
        let pools = sysfs.pools().unwrap();
        // Node 2 has no hugepages directory: only the global and node 0 pools are listed.
        assert_eq!(pools.len(), 4);
        let global = pools[0];
        assert_eq!(global.id.node, None);
        assert_eq!(
            global.counts,
            PoolCounts {
                total: 4,
                free: 3,
                reserved: 1,
                surplus: 0
            }
        );
        assert_eq!(global.counts.available(), 2);
        assert_eq!(pools[2].counts.reserved, 0);
        assert_eq!(sysfs.mem_total().unwrap(), 24610996 << 10);
    }

    #[test]
    fn garbage_in_sysfs_is_a_typed_error_naming_the_file() {
        let tree = FakeTree::new("garbage");
        let sysfs = tree.sysfs();
        let id = PoolId {
            page_size: HugePageSize::Huge2M,
            node: Some(0),
        };
        let path = sysfs.pool_dir(id).unwrap().join("free_hugepages");
        std::fs::write(&path, "lots\n").unwrap();
        match sysfs.read_pool(id) {
            Err(HugetlbError::Sysfs { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected a sysfs error, got {other:?}"),
        }
        assert!(matches!(
            sysfs.pool_dir(PoolId {
                page_size: HugePageSize::Base4K,
                node: None
            }),
            Err(HugetlbError::NoPool { .. })
        ));
    }
}
