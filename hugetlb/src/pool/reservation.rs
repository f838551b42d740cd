//! [`PoolReservation`]: a change to a pool that is undone when dropped, or by its guardian or
//! [`crate::pool::reconcile`] when its owner dies first.

use std::path::{Path, PathBuf};

use crate::pool::guardian::Guardian;
use crate::pool::{GUARDIAN_PATIENCE, PoolId, PoolLock, Sysfs, ledger};
use crate::{GrowthRecord, HugetlbError};

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
        Ok(PoolReservation::watched(
            sysfs, id, added, entry, &lock_file,
        ))
    }

    /// A reservation of the growth recorded in `entry`, with a guardian started for it.
    fn watched(
        sysfs: &Sysfs,
        id: PoolId,
        added: u64,
        entry: PathBuf,
        lock_file: &Path,
    ) -> PoolReservation {
        let guardian = match Guardian::spawn(lock_file, &entry, GUARDIAN_PATIENCE) {
            Ok(guardian) => Some(guardian),
            Err(e) => {
                eprintln!(
                    "pfnstore-hugetlb: {e}; if this process dies without dropping the \
                     reservation, pool::reconcile gives the {id}'s {added} pages back"
                );
                None
            }
        };
        PoolReservation {
            sysfs: sysfs.clone(),
            id,
            restore: Restore::Owed {
                added,
                entry: Some(entry),
                guardian,
            },
        }
    }

    /// Takes over a pool growth that another process recorded ([`crate::SourceRecord`]'s
    /// `pool_growth`), as the receiving side of a handover: its ledger entry becomes this
    /// process's (renamed, so that exactly one entry owes the pages at any moment) and a guardian
    /// of this process watches it. The pool is not touched. Dropping the reservation gives the
    /// pages back, except while the handover is unconfirmed (the old owner has not called
    /// [`PoolReservation::relinquish`]) and the old owner lives: then the growth goes back to
    /// the old owner, which resumes as if nothing happened. See [`crate::pool`], "Handing a
    /// growth to another process".
    ///
    /// A growth whose entry is gone (given back already: the old owner died and its guardian
    /// found free pages, or another process adopted it) gives a reservation of nothing. An
    /// entry of another pool, or owing more than `growth.pages`, is
    /// [`HugetlbError::LedgerMismatch`] and is left alone.
    pub fn adopt(sysfs: &Sysfs, growth: &GrowthRecord) -> Result<PoolReservation, HugetlbError> {
        let mut adopted = PoolReservation::adopt_all(sysfs, std::slice::from_ref(growth))?;
        Ok(adopted.pop().expect("one reservation per growth"))
    }

    /// [`PoolReservation::adopt`] for several growths at once: every entry is checked before
    /// any is taken, so that an error takes none (one reservation per growth, in order).
    pub(crate) fn adopt_all(
        sysfs: &Sysfs,
        growths: &[GrowthRecord],
    ) -> Result<Vec<PoolReservation>, HugetlbError> {
        if growths.is_empty() {
            return Ok(Vec::new());
        }
        let lock = sysfs.lock_pools()?;
        let mut found = Vec::with_capacity(growths.len());
        for growth in growths {
            let pool_dir = sysfs.pool_dir(growth.pool)?;
            found.push(ledger::adoptable(
                sysfs,
                &lock,
                &growth.ledger_entry,
                &pool_dir,
                growth.pages,
            )?);
        }
        let mut taken = Vec::with_capacity(growths.len());
        let mut failure = None;
        for (growth, found) in growths.iter().zip(found) {
            let Some((old, contents)) = found else {
                taken.push((growth.pool, 0, None));
                continue;
            };
            match ledger::adopt(sysfs, &lock, &old, &contents) {
                Ok(entry) => taken.push((growth.pool, contents.owed, Some(entry))),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let lock_file = lock.path().to_path_buf();
        // Guardians start, and a failed adoption is undone, with the lock released: both take
        // it.
        drop(lock);
        let unwatched = |(id, added, entry)| PoolReservation {
            sysfs: sysfs.clone(),
            id,
            restore: Restore::Owed {
                added,
                entry,
                guardian: None,
            },
        };
        if let Some(e) = failure {
            // Dropping what was taken settles it, which hands it back to its old owner (alive:
            // it is the one handing over) or, if that died meanwhile, gives it back.
            drop(taken.into_iter().map(unwatched).collect::<Vec<_>>());
            return Err(e);
        }
        Ok(taken
            .into_iter()
            .map(|(id, added, entry)| match entry {
                Some(entry) => PoolReservation::watched(sysfs, id, added, entry, &lock_file),
                None => unwatched((id, added, None)),
            })
            .collect())
    }

    /// Confirms the handover of this growth, as the old owner, once the new owner has adopted
    /// it ([`PoolReservation::adopt`]) and confirmed: the growth is the new owner's for good
    /// (a settle of its entry no longer hands it back here), this reservation owns nothing
    /// (dropping it gives nothing back, [`PoolReservation::added`] is 0) and its guardian exits.
    ///
    /// [`HugetlbError::NotAdopted`] if the growth is still this reservation's ledger entry
    /// (nobody adopted it, or the new owner failed and handed it back): nothing changed. A
    /// reservation of [`PoolReservation::set_total`] is no growth and is left as it is.
    pub fn relinquish(&mut self) -> Result<(), HugetlbError> {
        let sysfs = self.sysfs.clone();
        PoolReservation::relinquish_all(&sysfs, std::slice::from_mut(self))
    }

    /// [`PoolReservation::relinquish`] for several reservations under one lock: all or none.
    pub(crate) fn relinquish_all(
        sysfs: &Sysfs,
        reservations: &mut [PoolReservation],
    ) -> Result<(), HugetlbError> {
        let owning: Vec<&PoolReservation> = reservations
            .iter()
            .filter(|r| r.ledger_entry().is_some())
            .collect();
        if !owning.is_empty() {
            let lock = sysfs.lock_pools()?;
            for r in &owning {
                r.check_adopted(&lock)?;
            }
            for r in &owning {
                if let Some(entry) = r.ledger_entry() {
                    ledger::relinquish(&lock, entry)?;
                }
            }
        }
        for r in reservations.iter_mut() {
            if let Restore::Owed {
                added,
                entry,
                guardian,
            } = &mut r.restore
            {
                *added = 0;
                *entry = None;
                if let Some(guardian) = guardian.take() {
                    guardian.stand_down();
                }
            }
        }
        Ok(())
    }

    /// Whether this reservation's growth has been adopted by another owner.
    fn check_adopted(&self, lock: &PoolLock) -> Result<(), HugetlbError> {
        match &self.restore {
            Restore::Owed { entry: None, .. } => Ok(()),
            Restore::Owed {
                entry: Some(entry), ..
            } if ledger::adopted(lock, entry) => Ok(()),
            Restore::Owed {
                entry: Some(entry), ..
            } => Err(HugetlbError::NotAdopted {
                pool: self.id,
                entry: entry.clone(),
            }),
            // Not a growth: nothing to hand over (it restores its pool when dropped).
            Restore::Total(_) => Ok(()),
        }
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

    /// Pages added by [`PoolReservation::grow`] or taken over by [`PoolReservation::adopt`]
    /// (0 for [`PoolReservation::set_total`], and after [`PoolReservation::relinquish`]).
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
                Ok(ledger::settle_own(&lock, entry)?.map_or(0, |s| s.still_owed()))
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

    fn growth_of(r: &PoolReservation) -> GrowthRecord {
        GrowthRecord {
            pool: r.pool(),
            pages: r.added(),
            ledger_entry: name(r.ledger_entry().unwrap()),
        }
    }

    fn name(entry: &Path) -> String {
        entry.file_name().unwrap().to_str().unwrap().to_string()
    }

    fn contents(entry: &Path) -> String {
        std::fs::read_to_string(entry).unwrap()
    }

    /// The whole handover: adopt, relinquish, both let go; the pool shrinks once, when the new
    /// owner lets go.
    #[test]
    fn a_confirmed_handover_moves_the_growth_and_the_pool_shrinks_once() {
        let tree = FakeTree::new("handover");
        let sysfs = tree.sysfs();
        let id = one_g();
        let mut old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let old_entry = old.ledger_entry().unwrap().to_path_buf();
        let old_guardian = old.guardian_pid().unwrap();
        let growth = growth_of(&old);
        let new = PoolReservation::adopt(&sysfs, &growth).unwrap();
        let new_entry = new.ledger_entry().unwrap().to_path_buf();
        assert_ne!(new_entry, old_entry);
        assert!(!old_entry.exists(), "renamed, not copied");
        assert_eq!(new.added(), 2);
        assert_eq!(
            contents(&new_entry),
            format!(
                "{}\n2\nfrom {}\n",
                sysfs.pool_dir(id).unwrap().display(),
                growth.ledger_entry
            )
        );
        let new_guardian = new.guardian_pid().expect("the new owner's guardian");
        assert!(alive(new_guardian) && alive(old_guardian));
        assert_eq!(
            sysfs.read_pool(id).unwrap().total,
            6,
            "the pool is not touched"
        );
        old.relinquish().unwrap();
        assert_eq!((old.added(), old.ledger_entry()), (0, None));
        eventually("the old guardian stands down", || !alive(old_guardian));
        assert!(
            !contents(&new_entry).contains("from"),
            "the handover is confirmed"
        );
        drop(old);
        assert_eq!(
            sysfs.read_pool(id).unwrap().total,
            6,
            "the old owner gives nothing"
        );
        assert_eq!(ledger::ledger_entries(&sysfs).unwrap(), vec![new_entry]);
        drop(new);
        assert_eq!(
            sysfs.read_pool(id).unwrap().total,
            4,
            "the new owner gives back"
        );
        assert!(ledger::ledger_entries(&sysfs).unwrap().is_empty());
        eventually("the new guardian stands down", || !alive(new_guardian));
    }

    /// Before the old owner confirms, both hold a reservation of the growth; whichever lets go
    /// first gives nothing back, the other gives it back once.
    #[test]
    fn before_the_handover_is_confirmed_either_owner_may_let_go_first() {
        let tree = FakeTree::new("unconfirmed");
        let sysfs = tree.sysfs();
        let id = one_g();
        // The new owner fails after adopting (the old owner lives): the growth goes back.
        let mut old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let old_entry = old.ledger_entry().unwrap().to_path_buf();
        let new = PoolReservation::adopt(&sysfs, &growth_of(&old)).unwrap();
        let new_entry = new.ledger_entry().unwrap().to_path_buf();
        drop(new);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6, "nothing given back");
        assert!(!new_entry.exists());
        assert_eq!(
            contents(&old_entry),
            format!("{}\n2\n", sysfs.pool_dir(id).unwrap().display()),
            "the old entry is back, as it was"
        );
        assert!(matches!(
            old.relinquish(),
            Err(HugetlbError::NotAdopted { pool, entry }) if pool == id && entry == old_entry
        ));
        assert_eq!(old.added(), 2, "a refused relinquish changes nothing");
        drop(old);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
        assert!(ledger::ledger_entries(&sysfs).unwrap().is_empty());

        // The old owner lets go without confirming while the new one lives: the new one owns
        // the growth for good, and no page is given back while it holds them.
        let old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let new = PoolReservation::adopt(&sysfs, &growth_of(&old)).unwrap();
        let new_entry = new.ledger_entry().unwrap().to_path_buf();
        drop(old);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
        assert!(!contents(&new_entry).contains("from"));
        // The new owner's pages are in use when it lets go: nothing is free to give back.
        tree.set(id, "free_hugepages", 1);
        let guardian = new.guardian_pid().unwrap();
        drop(new);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6, "pages in use stay");
        tree.set(id, "free_hugepages", 3);
        eventually("the guardian gives them back", || !new_entry.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4, "once");
        eventually("the guardian exits", || !alive(guardian));
    }

    /// A new owner that dies before the handover is confirmed: its guardian hands the growth
    /// back to the old owner, which still lives; when the predecessor is dead too, the guardian
    /// gives the pages back as usual.
    #[test]
    fn the_guardian_of_a_dead_new_owner_hands_the_growth_back() {
        let tree = FakeTree::new("guardian-hand-back");
        let sysfs = tree.sysfs();
        let id = one_g();
        let old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let old_entry = old.ledger_entry().unwrap().to_path_buf();
        let new = PoolReservation::adopt(&sysfs, &growth_of(&old)).unwrap();
        let new_entry = new.ledger_entry().unwrap().to_path_buf();
        let guardian = new.guardian_pid().unwrap();
        new.abandon();
        // (The test reads the ledger without the pool lock: it waits for the guardian to be
        // done rather than look between its rename and its rewrite.)
        eventually("the guardian exits", || !alive(guardian));
        assert!(
            old_entry.exists() && !new_entry.exists(),
            "the old owner's again"
        );
        assert!(!contents(&old_entry).contains("from"));
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6, "nothing given back");
        drop(old);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);

        // The growth of a predecessor that is gone (start time 1 is nobody's).
        let old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let dead = old_entry.with_file_name(format!("{}.1.99", std::process::id()));
        std::fs::rename(old.ledger_entry().unwrap(), &dead).unwrap();
        let growth = GrowthRecord {
            ledger_entry: name(&dead),
            ..growth_of(&old)
        };
        drop(old);
        assert_eq!(
            sysfs.read_pool(id).unwrap().total,
            6,
            "not the old entry's any more"
        );
        let new = PoolReservation::adopt(&sysfs, &growth).unwrap();
        let new_entry = new.ledger_entry().unwrap().to_path_buf();
        new.abandon();
        eventually("the guardian gives the pages back", || !new_entry.exists());
        assert!(!dead.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
    }

    /// An adopted entry whose owner died (its guardian gone too) is handed back by
    /// `reconcile` while the old owner lives, and taken back by the old owner when it lets go.
    #[test]
    fn reconcile_and_the_old_owner_take_back_a_dead_new_owners_growth() {
        let tree = FakeTree::new("reclaim");
        let sysfs = tree.sysfs();
        let id = one_g();
        let me = std::process::id();
        let old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let old_entry = old.ledger_entry().unwrap().to_path_buf();
        let pool_dir = sysfs.pool_dir(id).unwrap();
        // What a new owner that died at once leaves: its entry, adopted from ours.
        let dead_new = old_entry.with_file_name(format!("{me}.1.50"));
        let adopted = ledger::tests::entry(&pool_dir, 2, Some(&old_entry));
        std::fs::remove_file(&old_entry).unwrap();
        ledger::write_entry(&dead_new, &adopted).unwrap();
        let settled = ledger::reconcile(&sysfs).unwrap();
        assert_eq!(settled.len(), 1);
        assert_eq!(
            settled[0].handed_back_to.as_deref(),
            Some(old_entry.as_path())
        );
        assert_eq!((settled[0].given_back, settled[0].still_owed()), (0, 0));
        assert!(old_entry.exists() && !dead_new.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 6);
        // Again, but now the old owner lets go first: it takes the entry back and settles it.
        std::fs::remove_file(&old_entry).unwrap();
        ledger::write_entry(&dead_new, &adopted).unwrap();
        drop(old);
        assert!(!dead_new.exists() && !old_entry.exists());
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
        assert!(ledger::ledger_entries(&sysfs).unwrap().is_empty());
    }

    #[test]
    fn an_entry_that_is_not_as_recorded_is_not_adopted() {
        let tree = FakeTree::new("adopt-mismatch");
        let sysfs = tree.sysfs();
        let id = one_g();
        let old = PoolReservation::grow(&sysfs, id, 2).unwrap();
        let old_entry = old.ledger_entry().unwrap().to_path_buf();
        let good = growth_of(&old);
        let two_m = PoolId {
            page_size: HugePageSize::Huge2M,
            node: None,
        };
        for bad in [
            GrowthRecord {
                pool: two_m,
                ..good.clone()
            },
            GrowthRecord {
                pages: 1,
                ..good.clone()
            },
            GrowthRecord {
                ledger_entry: "../hugetlb-pool.lock".into(),
                ..good.clone()
            },
            GrowthRecord {
                ledger_entry: format!(".{}.tmp", good.ledger_entry),
                ..good.clone()
            },
        ] {
            assert!(
                matches!(
                    PoolReservation::adopt(&sysfs, &bad),
                    Err(HugetlbError::LedgerMismatch { .. })
                ),
                "{bad:?}"
            );
        }
        // Two growths, the second wrong: neither is taken.
        let err = PoolReservation::adopt_all(
            &sysfs,
            &[
                good.clone(),
                GrowthRecord {
                    pages: 1,
                    ..good.clone()
                },
            ],
        );
        assert!(matches!(err, Err(HugetlbError::LedgerMismatch { .. })));
        assert!(old_entry.exists());
        assert_eq!(
            ledger::ledger_entries(&sysfs).unwrap(),
            vec![old_entry.clone()]
        );
        // A growth whose entry is gone (given back already) is a reservation of nothing.
        let gone = GrowthRecord {
            ledger_entry: format!("{}.1.77", std::process::id()),
            ..good.clone()
        };
        let nothing = PoolReservation::adopt(&sysfs, &gone).unwrap();
        assert_eq!((nothing.added(), nothing.ledger_entry()), (0, None));
        drop(nothing);
        drop(old);
        assert_eq!(sysfs.read_pool(id).unwrap().total, 4);
    }
}
