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
//! and it gives back exactly what it added when dropped.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::hint;
use crate::{HugePageSize, HugetlbError};

/// One pool: a huge page size, system-wide or on one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId {
    /// The page size (1G or 2M).
    pub page_size: HugePageSize,
    /// The node, or `None` for the system-wide pool.
    pub node: Option<u32>,
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "{} pool of node {n}", self.page_size),
            None => write!(f, "{} pool", self.page_size),
        }
    }
}

/// The counters of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// `nr_hugepages`: persistent pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages nobody has faulted in (reserved ones included).
    pub free: u64,
    /// `resv_hugepages`: free pages already promised to mappings (system-wide pools only;
    /// the kernel keeps no per-node count, so 0 there).
    pub reserved: u64,
    /// `surplus_hugepages`: pages beyond `total` from overcommit.
    pub surplus: u64,
}

impl PoolCounts {
    /// Pages a new mapping can still reserve: free and not promised to anyone.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

impl fmt::Display for PoolCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "total {} free {} reserved {} surplus {}",
            self.total, self.free, self.reserved, self.surplus
        )
    }
}

/// A pool and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Which pool.
    pub id: PoolId,
    /// Its counters when read.
    pub counts: PoolCounts,
}

/// Where sysfs and procfs are: `/sys` and `/proc` on a real system, a directory tree in
/// tests of the parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    sys: PathBuf,
    proc: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::system()
    }
}

impl Sysfs {
    /// The running system's `/sys` and `/proc`.
    pub fn system() -> Sysfs {
        Sysfs::at("/sys", "/proc")
    }

    /// Trees rooted elsewhere (tests).
    pub fn at(sys: impl Into<PathBuf>, proc: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            sys: sys.into(),
            proc: proc.into(),
        }
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
        let dir = self.pool_dir(id)?;
        let read = |name: &str| read_u64(&dir.join(name));
        Ok(PoolCounts {
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: if id.node.is_none() {
                read("resv_hugepages")?
            } else {
                0
            },
            surplus: read("surplus_hugepages")?,
        })
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
    /// pages than asked when memory is fragmented).
    pub fn write_total(&self, id: PoolId, total: u64) -> Result<u64, HugetlbError> {
        let path = self.pool_dir(id)?.join("nr_hugepages");
        std::fs::write(&path, format!("{total}\n")).map_err(|e| io_error(&path, e, hint::ROOT))?;
        read_u64(&path)
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

fn io_error(path: &Path, e: io::Error, hint: &'static str) -> HugetlbError {
    HugetlbError::Sysfs {
        path: path.to_path_buf(),
        problem: e.to_string(),
        errno: e.raw_os_error(),
        hint,
    }
}

fn read_u64(path: &Path) -> Result<u64, HugetlbError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e, hint::ROOT))?;
    text.trim().parse().map_err(|_| HugetlbError::Sysfs {
        path: path.to_path_buf(),
        problem: format!("not a number: {:?}", text.trim()),
        errno: None,
        hint: hint::ROOT,
    })
}

/// What a [`PoolReservation`] puts back when dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    /// Take away the pages that were added (others may have changed the pool meanwhile;
    /// their changes stay).
    Subtract(u64),
    /// Set the pool back to this total.
    Total(u64),
}

/// A change to a pool's size that is undone when this guard is dropped, also when a test
/// panics: the guard is how sources grow a pool (`grow_pool`) and how tests set pools up.
///
/// Tests that change pools share a system-wide resource with every other test binary; they
/// hold [`crate::testing::hugetlb_lock`] while a reservation lives.
#[derive(Debug)]
#[must_use = "the pool is restored when the reservation is dropped"]
pub struct PoolReservation {
    sysfs: Sysfs,
    id: PoolId,
    restore: Restore,
}

impl PoolReservation {
    /// Grows the pool by `pages`. If the kernel gives fewer, memory is compacted once and the
    /// rest asked for again (a 1 GiB page needs 1 GiB of contiguous free memory, and page cache
    /// or a build's memory can leave free memory too scattered for it); if it still gives
    /// fewer, what it gave is taken back and the answer is [`HugetlbError::PoolGrowShort`]:
    /// nothing is left behind.
    pub fn grow(sysfs: &Sysfs, id: PoolId, pages: u64) -> Result<PoolReservation, HugetlbError> {
        let before = sysfs.read_pool(id)?.total;
        let wanted = before.saturating_add(pages);
        let mut got = sysfs.write_total(id, wanted)?;
        if got < wanted && sysfs.compact_memory() {
            got = sysfs.write_total(id, wanted)?;
        }
        if got < wanted {
            let added = got.saturating_sub(before);
            if added > 0 {
                // Best effort: the short grow is the error to report, and a failing write
                // here would fail the same way the caller's next attempt does.
                let _ = sysfs.write_total(id, before);
            }
            return Err(HugetlbError::PoolGrowShort {
                page_size: id.page_size,
                node: id.node,
                asked: pages,
                got: added,
            });
        }
        Ok(PoolReservation {
            sysfs: sysfs.clone(),
            id,
            restore: Restore::Subtract(got - before),
        })
    }

    /// Sets the pool to exactly `total` pages (growing or shrinking it) and puts the old total
    /// back on drop. Returns the reservation and the total the kernel actually set.
    pub fn set_total(
        sysfs: &Sysfs,
        id: PoolId,
        total: u64,
    ) -> Result<(PoolReservation, u64), HugetlbError> {
        let before = sysfs.read_pool(id)?.total;
        let got = sysfs.write_total(id, total)?;
        Ok((
            PoolReservation {
                sysfs: sysfs.clone(),
                id,
                restore: Restore::Total(before),
            },
            got,
        ))
    }

    /// The pool this reservation changed.
    pub fn pool(&self) -> PoolId {
        self.id
    }

    /// Pages added by [`PoolReservation::grow`] (0 for [`PoolReservation::set_total`]).
    pub fn added(&self) -> u64 {
        match self.restore {
            Restore::Subtract(n) => n,
            Restore::Total(_) => 0,
        }
    }

    fn restore(&self) -> Result<(), HugetlbError> {
        let target = match self.restore {
            Restore::Subtract(n) => self.sysfs.read_pool(self.id)?.total.saturating_sub(n),
            Restore::Total(t) => t,
        };
        self.sysfs.write_total(self.id, target).map(drop)
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            // Drop cannot return the error; say loudly that the pool was left changed.
            eprintln!("pfnstore-hugetlb: could not restore the {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys and /proc with one node and both pools.
    fn fake_tree(name: &str) -> (PathBuf, Sysfs) {
        let root =
            std::env::temp_dir().join(format!("pfnstore-hugetlb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let sys = root.join("sys");
        let proc = root.join("proc");
        for (dir, resv) in [
            ("kernel/mm/hugepages/hugepages-1048576kB", true),
            ("kernel/mm/hugepages/hugepages-2048kB", true),
            (
                "devices/system/node/node0/hugepages/hugepages-1048576kB",
                false,
            ),
            (
                "devices/system/node/node0/hugepages/hugepages-2048kB",
                false,
            ),
        ] {
            let d = sys.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("nr_hugepages"), "4\n").unwrap();
            std::fs::write(d.join("free_hugepages"), "3\n").unwrap();
            std::fs::write(d.join("surplus_hugepages"), "0\n").unwrap();
            if resv {
                std::fs::write(d.join("resv_hugepages"), "1\n").unwrap();
            }
        }
        std::fs::create_dir_all(sys.join("devices/system/node/node2")).unwrap();
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(
            proc.join("meminfo"),
            "MemTotal:       24610996 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        (root, Sysfs::at(sys, proc))
    }

    #[test]
    fn reads_pools_nodes_and_memtotal_from_a_tree() {
        let (root, sysfs) = fake_tree("read");
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
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn reservation_restores_what_it_added() {
        let (root, sysfs) = fake_tree("restore");
        let id = PoolId {
            page_size: HugePageSize::Huge1G,
            node: None,
        };
        {
            let r = PoolReservation::grow(&sysfs, id, 2).unwrap();
            assert_eq!(r.added(), 2);
            assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
            // Someone else grows the pool meanwhile: their page stays.
            sysfs.write_total(id, 7).unwrap();
        }
        assert_eq!(sysfs.read_pool(id).unwrap().total, 5);
        {
            let (_r, got) = PoolReservation::set_total(&sysfs, id, 0).unwrap();
            assert_eq!(got, 0);
        }
        assert_eq!(sysfs.read_pool(id).unwrap().total, 5);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn compaction_is_triggered_through_proc_and_only_for_a_short_grow() {
        let (root, sysfs) = fake_tree("short");
        let id = PoolId {
            page_size: HugePageSize::Huge1G,
            node: None,
        };
        // Without the trigger (no /proc/sys/vm) compaction reports that it did not happen.
        // (A fake tree's nr_hugepages takes any value, so the short grow itself is exercised
        // only by the real-hugetlb tests, when the kernel is short of contiguous memory.)
        assert!(!sysfs.compact_memory());
        std::fs::create_dir_all(root.join("proc/sys/vm")).unwrap();
        assert!(sysfs.compact_memory());
        assert_eq!(
            std::fs::read_to_string(root.join("proc/sys/vm/compact_memory")).unwrap(),
            "1\n"
        );
        // A grow the fake kernel grants in full needs no compaction and keeps its pages.
        std::fs::remove_file(root.join("proc/sys/vm/compact_memory")).unwrap();
        let r = PoolReservation::grow(&sysfs, id, 1).unwrap();
        assert_eq!(r.added(), 1);
        assert!(!root.join("proc/sys/vm/compact_memory").exists());
        drop(r);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn garbage_in_sysfs_is_a_typed_error_naming_the_file() {
        let (root, sysfs) = fake_tree("garbage");
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
        std::fs::remove_dir_all(root).unwrap();
    }
}
