//! [`PoolReservation`]: a change to a pool that is undone when dropped, or by its guardian or
//! [`crate::pool::reconcile`] when its owner dies first.

use std::path::{Path, PathBuf};

use crate::HugetlbError;
use crate::pool::guardian::Guardian;
use crate::pool::{GUARDIAN_PATIENCE, PoolId, Sysfs, ledger};

/// What a [`PoolReservation`] puts back when dropped.
#[derive(Debug)]
enum Restore {
    /// Give back what the ledger entry still owes (as far as those pages are free).
    Owed {
        added: u64,
        /// `None` when nothing was added.
        entry: Option<PathBuf>,
        guardian: Option<Guardian>,
    },
    /// Set the pool back to this total (tests).
    Total(u64),
}

/// A change to a pool's size that is undone when this guard is dropped, also when a test
/// panics: the guard is how sources grow a pool (`grow_pool`) and how tests set pools up.
///
/// A growth is written to the ledger and watched by a guardian process, so that it is given
/// back also when the owner dies without dropping the guard (see [`crate::pool`]). All pool
/// reads and writes happen under the pool lock.
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
    ///
    /// The growth is recorded in the ledger before the pool lock is released, and a guardian
    /// is started; if it cannot be (no `/bin/sh` or `flock(1)`), that is said on stderr and
    /// the ledger alone remains, for [`crate::pool::reconcile`].
    pub fn grow(sysfs: &Sysfs, id: PoolId, pages: u64) -> Result<PoolReservation, HugetlbError> {
        let pool_dir = sysfs.pool_dir(id)?;
        let lock = sysfs.lock_pools()?;
        let before = sysfs.read_pool(id)?.total;
        let wanted = before.saturating_add(pages);
        let mut got = sysfs.write_total(id, wanted)?;
        if got < wanted && sysfs.compact_memory() {
            got = sysfs.write_total(id, wanted)?;
        }
        let added = got.saturating_sub(before);
        if got < wanted {
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
        if added == 0 {
            return Ok(PoolReservation {
                sysfs: sysfs.clone(),
                id,
                restore: Restore::Owed {
                    added,
                    entry: None,
                    guardian: None,
                },
            });
        }
        let entry = match ledger::record(sysfs, &lock, &pool_dir, added) {
            Ok(entry) => entry,
            Err(e) => {
                // Unrecorded pages could outlive us: take them back (they are still free).
                let _ = sysfs.write_total(id, before);
                return Err(e);
            }
        };
        let lock_file = lock.path().to_path_buf();
        drop(lock);
        let guardian = match Guardian::spawn(&lock_file, &entry, GUARDIAN_PATIENCE) {
            Ok(guardian) => Some(guardian),
            Err(e) => {
                eprintln!(
                    "pfnstore-hugetlb: {e}; if this process dies without dropping the \
                     reservation, pool::reconcile gives the {id}'s {added} pages back"
                );
                None
            }
        };
        Ok(PoolReservation {
            sysfs: sysfs.clone(),
            id,
            restore: Restore::Owed {
                added,
                entry: Some(entry),
                guardian,
            },
        })
    }

    /// Sets the pool to exactly `total` pages (growing or shrinking it) and puts the old total
    /// back on drop. Returns the reservation and the total the kernel actually set. Not
    /// recorded in the ledger: this is for tests, which hold the pools for themselves.
    pub fn set_total(
        sysfs: &Sysfs,
        id: PoolId,
        total: u64,
    ) -> Result<(PoolReservation, u64), HugetlbError> {
        let _lock = sysfs.lock_pools()?;
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
            Restore::Owed { added, .. } => added,
            Restore::Total(_) => 0,
        }
    }

    /// The guardian's process id, while one watches this growth.
    pub fn guardian_pid(&self) -> Option<u32> {
        match &self.restore {
            Restore::Owed {
                guardian: Some(g), ..
            } => Some(g.pid()),
            _ => None,
        }
    }

    /// The ledger entry of this growth.
    pub fn ledger_entry(&self) -> Option<&Path> {
        match &self.restore {
            Restore::Owed { entry: Some(e), .. } => Some(e),
            _ => None,
        }
    }

    /// Gives back what is owed; returns the pages still owed (in use, not free yet).
    fn restore(&self) -> Result<u64, HugetlbError> {
        match &self.restore {
            Restore::Owed { entry: None, .. } => Ok(0),
            Restore::Owed {
                entry: Some(entry), ..
            } => {
                let lock = self.sysfs.lock_pools()?;
                Ok(ledger::settle(&lock, entry)?.map_or(0, |s| s.owed - s.given_back))
            }
            Restore::Total(total) => {
                let _lock = self.sysfs.lock_pools()?;
                self.sysfs.write_total(self.id, *total).map(|_| 0)
            }
        }
    }

    /// Lets go as a dying owner would: the guardian's pipe closes with nothing settled.
    #[cfg(test)]
    pub(crate) fn abandon(self) {
        let mut this = std::mem::ManuallyDrop::new(self);
        if let Restore::Owed { guardian, .. } = &mut this.restore {
            drop(guardian.take());
        }
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        let result = self.restore();
        let guardian = match &mut self.restore {
            Restore::Owed { guardian, .. } => guardian.take(),
            Restore::Total(_) => None,
        };
        match (result, guardian) {
            (Ok(0), Some(guardian)) => guardian.stand_down(),
            (Ok(0), None) => {}
            // Dropping the guardian closes its pipe: it takes over and gives the rest back
            // when the pages come free.
            (Ok(left), guardian) => eprintln!(
                "pfnstore-hugetlb: {left} pages of the {} are still in use; {} gives them back \
                 once they are free",
                self.id,
                if guardian.is_some() {
                    "the guardian"
                } else {
                    "pool::reconcile"
                }
            ),
            // Drop cannot return the error; say loudly that the pool was left changed.
            (Err(e), _) => eprintln!("pfnstore-hugetlb: could not restore the {}: {e}", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HugePageSize;
    use crate::pool::fake::FakeTree;
    use crate::pool::guardian::tests::{alive, eventually};

    fn one_g() -> PoolId {
        PoolId {
            page_size: HugePageSize::Huge1G,
            node: None,
        }
    }

    #[test]
    fn reservation_restores_what_it_added() {
        let tree = FakeTree::new("restore");
        let sysfs = tree.sysfs();
        let id = one_g();
        let guardian;
        {
            let r = PoolReservation::grow(&sysfs, id, 2).unwrap();
            assert_eq!(r.added(), 2);
            assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
            let entry = r.ledger_entry().unwrap().to_path_buf();
            assert_eq!(
                std::fs::read_to_string(&entry).unwrap(),
                format!("{}\n2\n", sysfs.pool_dir(id).unwrap().display())
            );
            guardian = r.guardian_pid().expect("a guardian watches the growth");
            assert!(alive(guardian));
            // Someone else grows the pool meanwhile: their page stays.
            sysfs.write_total(id, 7).unwrap();
        }
        assert_eq!(sysfs.read_pool(id).unwrap().total, 5);
        assert!(ledger::ledger_entries(&sysfs).unwrap().is_empty());
        eventually("the guardian stands down", || !alive(guardian));
        assert_eq!(sysfs.read_pool(id).unwrap().total, 5, "and changes nothing");
        {
            let (r, got) = PoolReservation::set_total(&sysfs, id, 0).unwrap();
            assert_eq!((got, r.added(), r.guardian_pid()), (0, 0, None));
        }
        assert_eq!(sysfs.read_pool(id).unwrap().total, 5);
        let none = PoolReservation::grow(&sysfs, id, 0).unwrap();
        assert_eq!((none.added(), none.ledger_entry()), (0, None));
    }

    #[test]
    fn the_guardian_gives_back_the_growth_of_an_owner_that_died() {
        let tree = FakeTree::new("abandon");
        let sysfs = tree.sysfs();
        let id = PoolId {
            page_size: HugePageSize::Huge2M,
            node: Some(0),
        };
        let r = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let guardian = r.guardian_pid().unwrap();
        let entry = r.ledger_entry().unwrap().to_path_buf();
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
        r.abandon();
        eventually("the guardian settles", || !entry.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
        eventually("the guardian exits", || !alive(guardian));
    }

    #[test]
    fn pages_still_in_use_stay_owed_until_they_are_free() {
        let tree = FakeTree::new("in-use");
        let sysfs = tree.sysfs();
        let id = one_g();
        let r = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let guardian = r.guardian_pid().unwrap();
        let entry = r.ledger_entry().unwrap().to_path_buf();
        // No page is free and unreserved when the owner lets go.
        tree.set(id, "free_hugepages", 1);
        drop(r);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
        assert!(std::fs::read_to_string(&entry).unwrap().ends_with("\n2\n"));
        assert!(alive(guardian), "the guardian waits for the pages");
        tree.set(id, "free_hugepages", 3);
        eventually("the guardian gives back the rest", || !entry.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
        eventually("the guardian exits", || !alive(guardian));
    }

    #[test]
    fn compaction_is_triggered_through_proc_and_only_for_a_short_grow() {
        let tree = FakeTree::new("short");
        let sysfs = tree.sysfs();
        let root = &tree.root;
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
        let r = PoolReservation::grow(&sysfs, one_g(), 1).unwrap();
        assert_eq!(r.added(), 1);
        assert!(!root.join("proc/sys/vm/compact_memory").exists());
        drop(r);
    }
}
