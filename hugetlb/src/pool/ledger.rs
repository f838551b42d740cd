//! The ledger: one file per pool growth, so that pages a dead process added are given back.
//!
//! An entry is `<run dir>/hugetlb-ledger/<pid>.<start time>.<n>` (the start time, from
//! `/proc/<pid>/stat`, tells a live owner from a new process that got a dead owner's pid) and
//! holds two lines: the pool's sysfs directory and the pages still owed to it. Entries are only
//! read, lowered, renamed and removed under the pool lock, and pages are only given back while
//! the entry that owes them exists, so that an owner, its guardian and [`reconcile`] can never
//! give the same pages back twice. The guardian's shell script implements [`settle`] the same
//! way.
//!
//! ## Handing a growth over
//!
//! A growth changes owner by *renaming* its entry, never by copying it, so that exactly one
//! entry owes the pages at any moment (see [`crate::pool`], "Handing a growth to another
//! process"). The new owner ([`adopt`]) renames the entry to a name of its own and adds a
//! third line, `from <old name>`, which says the handover is not confirmed yet: while the
//! process named there lives, a settle of the entry (the new owner dropping it, its guardian or
//! [`reconcile`] after the new owner died) renames it back instead of giving pages back, so
//! that the old owner resumes as if nothing happened. The old owner confirms the handover with
//! [`relinquish`], which drops the third line; an old owner that lets go of a growth it no longer
//! holds does the same, and takes the entry back if the new owner died.
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
    /// The entry the growth was handed back to instead, because the handover it came from was
    /// not confirmed and the old owner still lives (nothing was given back then).
    pub handed_back_to: Option<PathBuf>,
}

impl Settled {
    /// Pages the entry still owes after this settle (0 when it was handed back: it owes nothing
    /// for the one who settled it).
    pub fn still_owed(&self) -> u64 {
        if self.handed_back_to.is_some() {
            0
        } else {
            self.owed - self.given_back
        }
    }
}

/// One entry's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) pool_dir: PathBuf,
    pub(crate) owed: u64,
    /// The entry this one was adopted from, while that handover is unconfirmed.
    pub(crate) from: Option<String>,
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

/// Whether `name` is the name of an entry (and nothing else: no directory, no temporary file).
pub(crate) fn is_entry_name(name: &str) -> bool {
    !name.contains('/') && owner_of(Path::new(name)).is_some()
}

/// Whether the process that owns the entry `entry` is alive.
fn owner_alive(entry: &Path) -> bool {
    owner_of(entry).is_some_and(|(pid, start)| start_time(pid) == Some(start))
}

/// The start time (clock ticks after boot, field 22 of `/proc/<pid>/stat`) of a live process.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

pub(crate) fn ledger_dir(sysfs: &Sysfs) -> Result<PathBuf, HugetlbError> {
    let dir = sysfs.run_dir()?.join(LEDGER_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e, hint::ROOT))?;
    Ok(dir)
}

/// Writes an entry atomically (a temporary file renamed over it), so that a reader never sees
/// half an entry.
pub(crate) fn write_entry(path: &Path, entry: &Entry) -> Result<(), HugetlbError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut contents = format!("{}\n{}\n", entry.pool_dir.display(), entry.owed);
    if let Some(from) = &entry.from {
        contents.push_str(&format!("from {from}\n"));
    }
    std::fs::write(&tmp, contents).map_err(|e| io_error(&tmp, e, hint::ROOT))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e, hint::ROOT))
}

/// A name for a new entry of this process.
fn new_entry_path(sysfs: &Sysfs) -> Result<PathBuf, HugetlbError> {
    use core::sync::atomic::{AtomicU64, Ordering};
    // A process-wide sequence number (core's atomic: a static, see vma.rs for why).
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(ledger_dir(sysfs)?.join(format!("{pid}.{start}.{seq}")))
}

/// Records that this process added `pages` to the pool in `pool_dir`; returns the entry.
pub(crate) fn record(
    sysfs: &Sysfs,
    _lock: &PoolLock,
    pool_dir: &Path,
    pages: u64,
) -> Result<PathBuf, HugetlbError> {
    let entry = new_entry_path(sysfs)?;
    let contents = Entry {
        pool_dir: pool_dir.to_path_buf(),
        owed: pages,
        from: None,
    };
    write_entry(&entry, &contents)?;
    Ok(entry)
}

/// Reads an entry, or `None` if it is gone.
pub(crate) fn read_entry(entry: &Path) -> Result<Option<Entry>, HugetlbError> {
    let text = match std::fs::read_to_string(entry) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(entry, e, hint::ROOT)),
    };
    let mut lines = text.lines();
    let pool_dir = lines.next().map(PathBuf::from);
    let owed = lines.next().and_then(|l| l.trim().parse().ok());
    let from = match lines.next() {
        None => Some(None),
        Some(line) => line
            .strip_prefix("from ")
            .filter(|name| is_entry_name(name))
            .map(|name| Some(name.to_string())),
    };
    match (pool_dir, owed, from, lines.next()) {
        (Some(pool_dir), Some(owed), Some(from), None) => Ok(Some(Entry {
            pool_dir,
            owed,
            from,
        })),
        _ => Err(HugetlbError::Sysfs {
            path: entry.to_path_buf(),
            problem: format!("not a ledger entry: {text:?}"),
            errno: None,
            hint: "remove the file by hand after checking the pool",
        }),
    }
}

/// Renames `entry` (whose contents are `contents`) to `to`, without its `from` line. The rename
/// comes first: a crash in between leaves one entry (with a stale `from` line naming a dead or
/// confirmed handover, which `settle` ignores), never two.
fn move_entry(entry: &Path, contents: &Entry, to: &Path) -> Result<(), HugetlbError> {
    std::fs::rename(entry, to).map_err(|e| io_error(entry, e, hint::ROOT))?;
    write_entry(
        to,
        &Entry {
            from: None,
            ..contents.clone()
        },
    )
}

/// The predecessor `entry` is to be handed back to, if its handover is unconfirmed: the entry
/// it was adopted from, when that is not `entry` itself, is gone, and its owner still lives.
fn hand_back_target(entry: &Path, contents: &Entry) -> Option<PathBuf> {
    let from = contents.from.as_deref()?;
    let target = entry.with_file_name(from);
    (target != entry && !target.exists() && owner_alive(&target)).then_some(target)
}

/// Gives back what `entry` owes, as far as the pool's free and unreserved pages allow, and
/// removes the entry (or lowers it to what is still owed). `None` if the entry is gone.
///
/// An entry adopted in a handover that was not confirmed, whose old owner still lives, is
/// renamed back to the old owner's entry instead (and nothing is given back).
pub(crate) fn settle(_lock: &PoolLock, entry: &Path) -> Result<Option<Settled>, HugetlbError> {
    let Some(contents) = read_entry(entry)? else {
        return Ok(None);
    };
    let pid = owner_of(entry).map_or(0, |(pid, _)| pid);
    if let Some(target) = hand_back_target(entry, &contents) {
        move_entry(entry, &contents, &target)?;
        return Ok(Some(Settled {
            entry: entry.to_path_buf(),
            pid,
            pool_dir: contents.pool_dir,
            owed: contents.owed,
            given_back: 0,
            handed_back_to: Some(target),
        }));
    }
    let Entry { pool_dir, owed, .. } = contents;
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
        let lowered = Entry {
            pool_dir: pool_dir.clone(),
            owed: left,
            from: None,
        };
        write_entry(entry, &lowered)?;
    }
    Ok(Some(Settled {
        entry: entry.to_path_buf(),
        pid,
        pool_dir,
        owed,
        given_back,
        handed_back_to: None,
    }))
}

/// The entry adopted from `entry` in a handover not confirmed yet (the one whose `from` line
/// names it), if any.
fn successor_of(entry: &Path) -> Result<Option<(PathBuf, Entry)>, HugetlbError> {
    let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let Some(dir) = entry.parent() else {
        return Ok(None);
    };
    for candidate in entries_in(dir)? {
        // An entry that cannot be read is no successor of ours; reconcile reports it.
        if candidate != entry
            && let Ok(Some(contents)) = read_entry(&candidate)
            && contents.from.as_deref() == Some(name)
        {
            return Ok(Some((candidate, contents)));
        }
    }
    Ok(None)
}

/// What the owner of `entry` does when it lets go of its growth (a [`crate::pool::PoolReservation`]
/// dropped): settle the entry. If the entry is gone because a handover adopted it and was
/// never confirmed, the growth is the old owner's again when the new owner died (it is taken
/// back and settled) and the new owner's for good when it lives (its `from` line goes).
pub(crate) fn settle_own(lock: &PoolLock, entry: &Path) -> Result<Option<Settled>, HugetlbError> {
    if entry.exists() {
        return settle(lock, entry);
    }
    match successor_of(entry)? {
        Some((successor, contents)) if !owner_alive(&successor) => {
            move_entry(&successor, &contents, entry)?;
            settle(lock, entry)
        }
        Some((successor, contents)) => {
            confirm(&successor, contents)?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Drops the `from` line of an adopted entry: the handover is confirmed.
fn confirm(successor: &Path, contents: Entry) -> Result<(), HugetlbError> {
    write_entry(
        successor,
        &Entry {
            from: None,
            ..contents
        },
    )
}

/// Checks that the entry named `name` can be taken over for this process: it is a ledger
/// entry's name, it owes pages to `pool_dir` and at most `most` of them (what the old owner said
/// it added). Returns its path and contents, or `None` if it is gone (its pages were given back
/// already, or someone else adopted it).
pub(crate) fn adoptable(
    sysfs: &Sysfs,
    _lock: &PoolLock,
    name: &str,
    pool_dir: &Path,
    most: u64,
) -> Result<Option<(PathBuf, Entry)>, HugetlbError> {
    let dir = ledger_dir(sysfs)?;
    let old = dir.join(name);
    if !is_entry_name(name) {
        return Err(HugetlbError::LedgerMismatch {
            entry: old,
            problem: "not the name of a ledger entry".into(),
        });
    }
    let Some(contents) = read_entry(&old)? else {
        return Ok(None);
    };
    if contents.pool_dir != pool_dir {
        return Err(HugetlbError::LedgerMismatch {
            entry: old,
            problem: format!(
                "owes pages to {}, not to {}",
                contents.pool_dir.display(),
                pool_dir.display()
            ),
        });
    }
    if contents.owed > most {
        return Err(HugetlbError::LedgerMismatch {
            entry: old,
            problem: format!(
                "owes {} pages, more than the {most} recorded",
                contents.owed
            ),
        });
    }
    Ok(Some((old, contents)))
}

/// Takes the entry `old` (checked by [`adoptable`]) over for this process: renames it to a
/// new entry of this process, marked as adopted from `old` until the old owner
/// [`relinquish`]es it. Returns the new entry.
pub(crate) fn adopt(
    sysfs: &Sysfs,
    _lock: &PoolLock,
    old: &Path,
    contents: &Entry,
) -> Result<PathBuf, HugetlbError> {
    let name = old
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_entry_name(n))
        .ok_or_else(|| HugetlbError::LedgerMismatch {
            entry: old.to_path_buf(),
            problem: "not the name of a ledger entry".into(),
        })?;
    // The `from` line goes in first (naming the entry itself, which `settle` ignores), then the
    // entry is renamed: each step is atomic, and at no point are there two entries or an
    // adopted one without its `from` line.
    write_entry(
        old,
        &Entry {
            from: Some(name.to_string()),
            ..contents.clone()
        },
    )?;
    let new = new_entry_path(sysfs)?;
    std::fs::rename(old, &new).map_err(|e| io_error(old, e, hint::ROOT))?;
    Ok(new)
}

/// Whether a handover took `entry` over: the entry is gone from the ledger.
pub(crate) fn adopted(_lock: &PoolLock, entry: &Path) -> bool {
    !entry.exists()
}

/// Confirms the handover of `entry`, which must be [`adopted`]: the entry adopted from it (if
/// it still exists) loses its `from` line, so that it is its new owner's for good.
pub(crate) fn relinquish(_lock: &PoolLock, entry: &Path) -> Result<(), HugetlbError> {
    if let Some((successor, contents)) = successor_of(entry)? {
        confirm(&successor, contents)?;
    }
    Ok(())
}

/// Settles the ledger entries of processes that are gone (their guardian could not start, or
/// their pages were not free while it waited): gives their pages back as far as they are free
/// now. Entries of live processes are left alone. An entry that a process that is gone had
/// adopted in a handover the old owner never confirmed goes back to the old owner if that
/// lives ([`Settled::handed_back_to`]; see "Handing a growth to another process" in
/// [`crate::pool`]). Call it at start, or from the CLI (`pfnstore hugetlb --restore`); a
/// [`crate::HugetlbSource`] with `grow_pool` calls it before it reads the pool it may grow.
pub fn reconcile(sysfs: &Sysfs) -> Result<Vec<Settled>, HugetlbError> {
    let dir = ledger_dir(sysfs)?;
    let dead: Vec<PathBuf> = entries_in(&dir)?
        .into_iter()
        .filter(|p| !owner_alive(p))
        .collect();
    if dead.is_empty() {
        return Ok(Vec::new());
    }
    let lock = sysfs.lock_pools()?;
    let mut settled = Vec::new();
    for entry in dead {
        settled.extend(settle(&lock, &entry)?);
    }
    Ok(settled)
}

/// The entries in `dir`, sorted.
fn entries_in(dir: &Path) -> Result<Vec<PathBuf>, HugetlbError> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e, hint::ROOT))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| owner_of(p).is_some())
        .collect();
    all.sort();
    Ok(all)
}

/// The ledger's entries now (of live and dead processes), sorted: what is owed to pools.
pub fn ledger_entries(sysfs: &Sysfs) -> Result<Vec<PathBuf>, HugetlbError> {
    entries_in(&ledger_dir(sysfs)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pool::fake::FakeTree;
    use crate::{HugePageSize, pool::PoolId};

    pub(crate) fn entry(pool_dir: &Path, owed: u64, from: Option<&Path>) -> Entry {
        Entry {
            pool_dir: pool_dir.to_path_buf(),
            owed,
            from: from.map(|f| f.file_name().unwrap().to_str().unwrap().to_string()),
        }
    }

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
        write_entry(&live, &entry(&dir, 1, None)).unwrap();
        write_entry(&dead, &entry(&dir, 3, None)).unwrap();
        let settled = reconcile(&sysfs).unwrap();
        assert_eq!(
            settled,
            vec![Settled {
                entry: dead.clone(),
                pid: me,
                pool_dir: dir.clone(),
                owed: 3,
                given_back: 2,
                handed_back_to: None,
            }]
        );
        assert_eq!(sysfs.read_pool(id).unwrap().total, 2);
        assert_eq!(
            read_entry(&dead).unwrap(),
            Some(entry(&dir, 1, None)),
            "1 still owed"
        );
        assert_eq!(
            read_entry(&live).unwrap(),
            Some(entry(&dir, 1, None)),
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

    #[test]
    fn from_lines_are_read_strictly_and_one_naming_its_own_entry_is_ignored() {
        let tree = FakeTree::new("from-lines");
        let sysfs = tree.sysfs();
        let id = PoolId {
            page_size: HugePageSize::Huge1G,
            node: None,
        };
        let dir = sysfs.pool_dir(id).unwrap();
        let ledger = ledger_dir(&sysfs).unwrap();
        let me = std::process::id();
        let dead = ledger.join(format!("{me}.1.1"));
        for garbage in ["from ../x", "from", "elsewhere 1.2.3", "from 1.2.3\nmore"] {
            std::fs::write(&dead, format!("{}\n1\n{garbage}\n", dir.display())).unwrap();
            assert!(
                matches!(read_entry(&dead), Err(HugetlbError::Sysfs { .. })),
                "{garbage}"
            );
        }
        // What a crash between the two steps of `adopt` leaves: a `from` line naming the entry
        // itself. It is an ordinary entry: reconcile gives its pages back.
        write_entry(&dead, &entry(&dir, 2, Some(&dead))).unwrap();
        assert_eq!(
            read_entry(&dead).unwrap().unwrap().from.as_deref(),
            Some(&*format!("{me}.1.1"))
        );
        let settled = reconcile(&sysfs).unwrap();
        assert_eq!(
            (settled[0].given_back, settled[0].handed_back_to.clone()),
            (2, None)
        );
        assert!(!dead.exists());
        // A `from` line naming a predecessor that is gone: settled as usual too.
        write_entry(
            &dead,
            &entry(&dir, 1, Some(&ledger.join(format!("{me}.2.2")))),
        )
        .unwrap();
        assert_eq!(reconcile(&sysfs).unwrap()[0].given_back, 1);
        assert!(ledger_entries(&sysfs).unwrap().is_empty());
    }
}
