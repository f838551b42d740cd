//! The whole-store check between rounds, and the transitions exercised with every thread
//! stopped.

use std::os::unix::fs::FileExt;
use std::sync::MutexGuard;

use pfnstore::{ConvertMode, GuestFile, PinOwner, Shareability, StoreError};

use crate::common::PAGE;
use crate::harness::Harness;
use crate::kernel::{check_protection, each_vma, read_maps};
use crate::model::{PageModel, ThreadModel};
use crate::stamps::{Content, compare, expected_bytes};

impl Harness {
    pub(crate) fn page_model<'a>(
        &self,
        models: &'a [MutexGuard<'_, ThreadModel>],
        f: usize,
        page: u64,
    ) -> Option<&'a PageModel> {
        let spec = &self.specs[f];
        let slot = spec.slot(page)?;
        Some(&models[spec.owner_of(page, self.plan.threads)].files[f][slot])
    }

    /// The whole-store check, with every thread stopped.
    pub(crate) fn check_all(&self, models: &[MutexGuard<'_, ThreadModel>]) -> Result<(), String> {
        self.store_invariants()?;
        let vmas = read_maps();
        let memfd = self.memfd_file()?;
        let mut frames: Vec<(u64, u64, usize, u64)> = Vec::new();
        let mut held = 0;
        for (f, file) in self.files.iter().enumerate() {
            file.check_invariants()
                .map_err(|e| format!("file {f}: {e}"))?;
            self.check_metadata(models, f)?;
            self.check_bytes(models, f)?;
            let extents = file.extents().map_err(|e| e.to_string())?;
            self.check_memfd(models, f, &extents, &memfd)?;
            check_protection(
                file,
                0..self.specs[f].pages,
                self.units[f],
                self.granule,
                &extents,
                &vmas,
            )
            .map_err(|e| format!("file {f}: {e}"))?;
            let chunk = self.store.geometry().chunk_pages();
            for e in &extents {
                // An extent is contiguous in the memfd; its frames only within a chunk (two
                // chunks may be neighbours in the memfd and not in PFNs): `pfn` names the
                // first, the file translates the rest.
                let (mut offset, end, mut pfn) = (e.offset, e.offset + e.len, e.pfn);
                loop {
                    let run = (pfn.0 / chunk + 1) * chunk - pfn.0;
                    let run = run.min((end - offset) / PAGE);
                    frames.push((pfn.0, pfn.0 + run, f, offset));
                    let owner = self.store.owner_of(pfn).map_err(|e| e.to_string())?;
                    ensure!(
                        owner == Some(file.id()),
                        "{pfn} backing offset {offset:#x} of file {f} belongs to {owner:?}"
                    );
                    offset += run * PAGE;
                    if offset >= end {
                        break;
                    }
                    pfn = file
                        .pfn_at(offset)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| {
                            format!(
                                "offset {offset:#x} of file {f} is in an extent but has no frame"
                            )
                        })?;
                }
            }
            held += file.stats().held_pages;
            self.tick();
        }
        frames.sort_unstable();
        for pair in frames.windows(2) {
            ensure!(
                pair[0].1 <= pair[1].0,
                "frames {:#x}.. back offset {:#x} of file {} and offset {:#x} of file {}",
                pair[1].0,
                pair[0].3,
                pair[0].2,
                pair[1].3,
                pair[1].2
            );
        }
        let allocated = self.store.stats().allocator.total.allocated_pages;
        ensure!(
            allocated == held,
            "the allocator has {allocated} pages allocated, the files hold {held}"
        );
        ensure!(
            self.iommu.violations().is_empty(),
            "iommu: {:?}",
            self.iommu.violations()
        );
        ensure!(
            self.mmu.violations().is_empty(),
            "kvm: {:?}",
            self.mmu.violations()
        );
        ensure!(
            self.mmu.audit().is_empty(),
            "kvm audit: {:?}",
            self.mmu.audit()
        );
        Ok(())
    }

    /// With every thread stopped, the transitions random operations rarely reach: every page
    /// of every file private at once (each unit revoked) and back; a whole file punched (its
    /// memory released) and populated again. The pins go first, each by its owner.
    pub(crate) fn exercise(
        &self,
        models: &mut [MutexGuard<'_, ThreadModel>],
        round: usize,
    ) -> Result<(), String> {
        for (t, model) in models.iter_mut().enumerate() {
            for (f, first, pages) in std::mem::take(&mut model.pins) {
                self.files[f]
                    .unpin(first * PAGE, pages * PAGE, PinOwner(t as u32))
                    .map_err(|e| format!("unpin for thread {t}: {e}"))?;
                for p in first..first + pages {
                    let slot = self.specs[f].slot(p).expect("a page of a window");
                    model.files[f][slot].pins -= 1;
                }
            }
        }
        let vmas_of = |file: &GuestFile| -> Result<(), String> {
            let extents = file.extents().map_err(|e| e.to_string())?;
            let unit = file.stats().protection_unit / PAGE;
            check_protection(
                file,
                0..file.size() / PAGE,
                unit,
                self.granule,
                &extents,
                &read_maps(),
            )
        };
        if round.is_multiple_of(2) {
            for (f, file) in self.files.iter().enumerate() {
                file.convert(0, file.size(), Shareability::Private, ConvertMode::Preserve)
                    .map_err(|e| format!("file {f} to private: {e}"))?;
                vmas_of(file).map_err(|e| format!("file {f} wholly private: {e}"))?;
                // Not a byte of it is readable through its mapping.
                let region = file.host_mapping().ok_or("no host mapping")?;
                let base = region.as_ptr() as u64;
                each_vma(&read_maps(), base, base + region.len(), |vma, at| {
                    ensure!(
                        vma.perms.starts_with("---"),
                        "file {f} is wholly private, yet offset {:#x} is mapped {}",
                        at - base,
                        vma.perms
                    );
                    Ok(())
                })?;
            }
            // Back to what the model says, run by run (outside the windows: the initial state).
            for (f, file) in self.files.iter().enumerate() {
                let spec = &self.specs[f];
                let shared_at = |p: u64| match spec.slot(p) {
                    Some(slot) => models[spec.owner_of(p, self.plan.threads)].files[f][slot].shared,
                    None => spec.shared,
                };
                let mut p = 0;
                while p < spec.pages {
                    let shared = shared_at(p);
                    let mut q = p + 1;
                    // Outside the windows, pages are all alike: jump to the next window edge.
                    while q < spec.pages && shared_at(q) == shared {
                        q = match spec.slot(q) {
                            Some(_) => q + 1,
                            None => spec
                                .windows
                                .iter()
                                .map(|w| w.start)
                                .filter(|s| *s > q)
                                .min()
                                .unwrap_or(spec.pages),
                        };
                    }
                    if shared {
                        file.convert(
                            p * PAGE,
                            (q - p) * PAGE,
                            Shareability::Shared,
                            ConvertMode::Preserve,
                        )
                        .map_err(|e| {
                            format!("file {f} pages {p:#x}..{q:#x} back to shared: {e}")
                        })?;
                    }
                    p = q;
                }
                vmas_of(file).map_err(|e| format!("file {f} restored: {e}"))?;
            }
        } else {
            let f = (round / 2) % self.files.len();
            let file = &self.files[f];
            file.punch_hole(0, file.size())
                .map_err(|e| format!("punching all of file {f}: {e}"))?;
            ensure!(
                file.stats().held_pages == 0,
                "file {f} holds {} pages with nothing backed",
                file.stats().held_pages
            );
            vmas_of(file).map_err(|e| format!("file {f} punched: {e}"))?;
            file.populate(0, file.size())
                .map_err(|e| format!("populating all of file {f}: {e}"))?;
            vmas_of(file).map_err(|e| format!("file {f} populated again: {e}"))?;
            for (t, model) in models.iter_mut().enumerate() {
                for w in &self.specs[f].windows {
                    for p in w.clone() {
                        if self.specs[f].owner_of(p, self.plan.threads) == t {
                            let page = &mut model.files[f][self.specs[f].slot(p).expect("in")];
                            page.content = Content::ZERO;
                            page.backed = true;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn store_invariants(&self) -> Result<(), String> {
        self.store
            .check_invariants()
            .map_err(|e| format!("store: {e}"))
    }

    pub(crate) fn memfd_file(&self) -> Result<std::fs::File, String> {
        let memfd = self.store.memfd().ok_or("the store has no memfd")?;
        let fd = memfd
            .fd()
            .try_clone_to_owned()
            .map_err(|e| format!("dup of the memfd: {e}"))?;
        Ok(std::fs::File::from(fd))
    }

    /// The metadata agrees with the model: shareability, pins, and backing where known.
    pub(crate) fn check_metadata(
        &self,
        models: &[MutexGuard<'_, ThreadModel>],
        f: usize,
    ) -> Result<(), String> {
        let file = &self.files[f];
        for w in &self.specs[f].windows {
            let runs = file
                .attribute_runs(w.start * PAGE, (w.end - w.start) * PAGE)
                .map_err(|e| e.to_string())?;
            for run in runs {
                ensure!(
                    run.quarantined.is_none(),
                    "file {f}: {:?} is quarantined",
                    run.range
                );
                for p in run.range.start().0..run.range.end().0 {
                    let Some(m) = self.page_model(models, f, p) else {
                        continue;
                    };
                    let shared = run.shareability == Shareability::Shared;
                    ensure!(
                        m.shared == shared,
                        "file {f} page {p:#x} is {:?}, the model says shared={}",
                        run.shareability,
                        m.shared
                    );
                    ensure!(
                        (m.pins == 0) == run.pins.is_empty(),
                        "file {f} page {p:#x} has pins {:?}, the model {}",
                        run.pins,
                        m.pins
                    );
                    ensure!(
                        run.backed || (!m.backed && m.content.is_zero()),
                        "file {f} page {p:#x} is not backed, but the model knows it backed"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every page through the API: shared runs read back exactly, private pages refuse.
    pub(crate) fn check_bytes(
        &self,
        models: &[MutexGuard<'_, ThreadModel>],
        f: usize,
    ) -> Result<(), String> {
        let file = &self.files[f];
        let id = file.id().0;
        for w in &self.specs[f].windows {
            let mut p = w.start;
            while p < w.end {
                let shared = self.page_model(models, f, p).is_some_and(|m| m.shared);
                let mut q = p + 1;
                while q < w.end && self.page_model(models, f, q).is_some_and(|m| m.shared) == shared
                {
                    q += 1;
                }
                if shared {
                    let mut buf = vec![0xA5u8; ((q - p) * PAGE) as usize];
                    file.read(p * PAGE, &mut buf).map_err(|e| {
                        format!("file {f} read of shared pages {p:#x}..{q:#x}: {e}")
                    })?;
                    let want = expected_bytes(id, p * PAGE, q * PAGE, |page| {
                        &self
                            .page_model(models, f, page)
                            .expect("in the window")
                            .content
                    });
                    compare("check", id, p * PAGE, &buf, &want)?;
                } else {
                    for probe in [p, q - 1] {
                        let mut buf = [0u8; 8];
                        match file.read(probe * PAGE + 8, &mut buf) {
                            Err(StoreError::PrivateAccess { offset, .. })
                                if offset == probe * PAGE + 8 => {}
                            other => {
                                return Err(format!(
                                    "file {f}: read of private page {probe:#x} gave {other:?}"
                                ));
                            }
                        }
                    }
                }
                p = q;
            }
        }
        Ok(())
    }

    /// Every backed byte of the windows, read straight from the memfd where the file says it
    /// lies, is what the model says (private pages too).
    pub(crate) fn check_memfd(
        &self,
        models: &[MutexGuard<'_, ThreadModel>],
        f: usize,
        extents: &[pfnstore::FileExtent],
        memfd: &std::fs::File,
    ) -> Result<(), String> {
        let id = self.files[f].id().0;
        for e in extents {
            for w in &self.specs[f].windows {
                let start = (e.offset / PAGE).max(w.start);
                let end = ((e.offset + e.len) / PAGE).min(w.end);
                if start >= end {
                    continue;
                }
                let mut buf = vec![0u8; ((end - start) * PAGE) as usize];
                let at = e.memfd_offset + (start * PAGE - e.offset);
                memfd
                    .read_exact_at(&mut buf, at)
                    .map_err(|err| format!("pread of the memfd at {at:#x}: {err}"))?;
                let want = expected_bytes(id, start * PAGE, end * PAGE, |page| {
                    &self
                        .page_model(models, f, page)
                        .expect("in the window")
                        .content
                });
                compare(
                    &format!("memfd at {at:#x} ({} backing it)", e.pfn),
                    id,
                    start * PAGE,
                    &buf,
                    &want,
                )?;
            }
        }
        Ok(())
    }
}
