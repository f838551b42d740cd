//! The ledger: one file per pool growth, so that pages a dead process added are given back.
//!
//! An entry is `<run dir>/hugetlb-ledger/<pid>.<start time>.<n>` (the start time, from
//! `/proc/<pid>/stat`, tells a live owner from a new process that got a dead owner's pid) and
//! holds two lines: the pool's sysfs directory and the pages still owed to it. Entries are only
//! read, lowered and removed under the pool lock, and pages are only given back while the
//! entry that owes them exists, so that an owner, its guardian and [`reconcile`] can never give
//! the same pages back twice. The guardian's shell script implements [`settle`] the same way.

use std::path::{Path, PathBuf};

use crate::HugetlbError;
use crate::error::hint;
use crate::pool::{LEDGER_DIR, PoolLock, Sysfs, io_error, read_counts, write_total_in};

/// What settling one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The entry's file.
    pub entry: PathBuf,
    /// The process that grew the pool.
    pub pid: u32,
    /// The pool's sysfs directory.
    pub pool_dir: PathBuf,
    /// Pages owed before.
    pub owed: u64,
    /// Pages given back now (the rest, if any, stays owed: they were not free).
    pub given_back: u64,
}

/// An entry's name parts: owner pid and start time.
fn owner_of(entry: &Path) -> Option<(u32, u64)> {
    let name = entry.file_name()?.to_str()?;
    let mut parts = name.split('.');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    let _seq: u64 = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((pid, start))
}

/// The start time (clock ticks after boot, field 22 of `/proc/<pid>/stat`) of a live process.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn ledger_dir(sysfs: &Sysfs) -> Result<PathBuf, HugetlbError> {
    let dir = sysfs.run_dir()?.join(LEDGER_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e, hint::ROOT))?;
    Ok(dir)
}

/// Writes `contents` to `path` atomically (a temporary file renamed over it), so that a
/// reader never sees half an entry.
fn write_entry(path: &Path, pool_dir: &Path, pages: u64) -> Result<(), HugetlbError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let contents = format!("{}\n{pages}\n", pool_dir.display());
    std::fs::write(&tmp, contents).map_err(|e| io_error(&tmp, e, hint::ROOT))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e, hint::ROOT))
}

/// Records that this process added `pages` to the pool in `pool_dir`; returns the entry.
pub(crate) fn record(
    sysfs: &Sysfs,
    _lock: &PoolLock,
    pool_dir: &Path,
    pages: u64,
) -> Result<PathBuf, HugetlbError> {
    use core::sync::atomic::{AtomicU64, Ordering};
    // A process-wide sequence number (core's atomic: a static, see vma.rs for why).
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let entry = ledger_dir(sysfs)?.join(format!("{pid}.{start}.{seq}"));
    write_entry(&entry, pool_dir, pages)?;
    Ok(entry)
}

/// Reads an entry: the pool's directory and the pages owed, or `None` if it is gone.
fn read_entry(entry: &Path) -> Result<Option<(PathBuf, u64)>, HugetlbError> {
    let text = match std::fs::read_to_string(entry) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(entry, e, hint::ROOT)),
    };
    let mut lines = text.lines();
    let parsed = lines
        .next()
        .map(PathBuf::from)
        .zip(lines.next().and_then(|l| l.trim().parse().ok()));
    parsed.map(Some).ok_or_else(|| HugetlbError::Sysfs {
        path: entry.to_path_buf(),
        problem: format!("not a ledger entry: {text:?}"),
        errno: None,
        hint: "remove the file by hand after checking the pool",
    })
}

/// Gives back what `entry` owes, as far as the pool's free and unreserved pages allow, and
/// removes the entry (or lowers it to what is still owed). `None` if the entry is gone.
pub(crate) fn settle(_lock: &PoolLock, entry: &Path) -> Result<Option<Settled>, HugetlbError> {
    let Some((pool_dir, owed)) = read_entry(entry)? else {
        return Ok(None);
    };
    let counts = read_counts(&pool_dir)?;
    let give = owed.min(counts.available());
    let given_back = if give > 0 {
        let now = write_total_in(&pool_dir, counts.total - give)?;
        counts.total.saturating_sub(now).min(give)
    } else {
        0
    };
    let left = owed - given_back;
    if left == 0 {
        std::fs::remove_file(entry).map_err(|e| io_error(entry, e, hint::ROOT))?;
    } else {
        write_entry(entry, &pool_dir, left)?;
    }
    Ok(Some(Settled {
        entry: entry.to_path_buf(),
        pid: owner_of(entry).map_or(0, |(pid, _)| pid),
        pool_dir,
        owed,
        given_back,
    }))
}

/// Settles the ledger entries of processes that are gone (their guardian could not start, or
/// their pages were not free while it waited): gives their pages back as far as they are free
/// now. Entries of live processes are left alone. Call it at start, or from the CLI
/// (`pfnstore hugetlb --restore`); a [`crate::HugetlbSource`] with `grow_pool` calls it before
/// it reads the pool it may grow.
pub fn reconcile(sysfs: &Sysfs) -> Result<Vec<Settled>, HugetlbError> {
    let dir = ledger_dir(sysfs)?;
    let mut dead: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| io_error(&dir, e, hint::ROOT))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| owner_of(p).is_some_and(|(pid, start)| start_time(pid) != Some(start)))
        .collect();
    if dead.is_empty() {
        return Ok(Vec::new());
    }
    dead.sort();
    let lock = sysfs.lock_pools()?;
    let mut settled = Vec::new();
    for entry in dead {
        settled.extend(settle(&lock, &entry)?);
    }
    Ok(settled)
}

/// The ledger's entries now (of live and dead processes), sorted: what is owed to pools.
pub fn ledger_entries(sysfs: &Sysfs) -> Result<Vec<PathBuf>, HugetlbError> {
    let dir = ledger_dir(sysfs)?;
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| io_error(&dir, e, hint::ROOT))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| owner_of(p).is_some())
        .collect();
    all.sort();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::fake::FakeTree;
    use crate::{HugePageSize, pool::PoolId};

    #[test]
    fn start_times_tell_live_owners_from_dead_ones() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(start > 0);
        assert_eq!(owner_of(Path::new("/x/12.345.6")), Some((12, 345)));
        assert_eq!(owner_of(Path::new("/x/.12.345.6.tmp")), None);
        assert_eq!(owner_of(Path::new("/x/12.345")), None);
        // A finished child's pid is free: no start time.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }

    #[test]
    fn reconcile_settles_dead_owners_only_and_keeps_what_is_not_free() {
        let tree = FakeTree::new("reconcile");
        let sysfs = tree.sysfs();
        let id = PoolId {
            page_size: HugePageSize::Huge2M,
            node: None,
        };
        let dir = sysfs.pool_dir(id).unwrap();
        // total 4, free 3, reserved 1: 2 pages can be given back.
        let ledger = ledger_dir(&sysfs).unwrap();
        let me = std::process::id();
        let live = ledger.join(format!("{me}.{}.0", start_time(me).unwrap()));
        let dead = ledger.join(format!("{me}.1.1"));
        write_entry(&live, &dir, 1).unwrap();
        write_entry(&dead, &dir, 3).unwrap();
        let settled = reconcile(&sysfs).unwrap();
        assert_eq!(
            settled,
            vec![Settled {
                entry: dead.clone(),
                pid: me,
                pool_dir: dir.clone(),
                owed: 3,
                given_back: 2
            }]
        );
        assert_eq!(sysfs.read_pool(id).unwrap().total, 2);
        assert_eq!(
            read_entry(&dead).unwrap(),
            Some((dir.clone(), 1)),
            "1 still owed"
        );
        assert_eq!(
            read_entry(&live).unwrap(),
            Some((dir.clone(), 1)),
            "untouched"
        );
        // The pool's pages come free; the next reconcile gives back the rest.
        tree.set(id, "free_hugepages", 2);
        tree.set(id, "resv_hugepages", 0);
        let settled = reconcile(&sysfs).unwrap();
        assert_eq!(settled[0].given_back, 1);
        assert_eq!(read_entry(&dead).unwrap(), None);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 1);
        assert_eq!(ledger_entries(&sysfs).unwrap(), vec![live.clone()]);
        // A settle of an entry that is gone does nothing.
        let lock = sysfs.lock_pools().unwrap();
        assert_eq!(settle(&lock, &dead).unwrap(), None);
        std::fs::write(&live, "garbage").unwrap();
        assert!(matches!(
            settle(&lock, &live),
            Err(HugetlbError::Sysfs { path, .. }) if path == live
        ));
    }
}
