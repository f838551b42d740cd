//! One thread's operations, each checked exactly against the thread's model.

use std::ops::Range;
use std::sync::atomic::Ordering;

use pfnstore::core::testing::XorShift;
use pfnstore::{ConvertMode, PinOwner, Shareability, StoreError};

use crate::common::PAGE;
use crate::harness::Harness;
use crate::kernel::{check_protection, read_maps};
use crate::model::{Owner, PageModel, ThreadModel};
use crate::stamps::{Content, RECORD, check_words, compare, expected_bytes};

pub(crate) struct Ctx<'a, 'm> {
    pub(crate) h: &'a Harness,
    pub(crate) t: usize,
    pub(crate) model: &'m mut ThreadModel,
    pub(crate) rng: &'m mut XorShift,
}

impl Ctx<'_, '_> {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n.max(1))
    }

    pub(crate) fn page(&mut self, f: usize, p: u64) -> &mut PageModel {
        let slot = self.h.specs[f].slot(p).expect("a page of a window");
        &mut self.model.files[f][slot]
    }

    pub(crate) fn page_ref(&self, f: usize, p: u64) -> &PageModel {
        let slot = self.h.specs[f].slot(p).expect("a page of a window");
        &self.model.files[f][slot]
    }

    /// A file this thread works in, and a range of pages it owns there.
    pub(crate) fn pick(&mut self) -> (usize, Range<u64>) {
        let h = self.h;
        let mine: Vec<usize> = (0..h.specs.len())
            .filter(|f| h.specs[*f].touches(self.t))
            .collect();
        let f = mine[self.below(mine.len() as u64) as usize];
        let spec = &h.specs[f];
        let w = spec.windows[self.below(spec.windows.len() as u64) as usize].clone();
        match spec.owner {
            Owner::Thread(_) => {
                let start = if self.below(3) == 0 {
                    // Just before a boundary, so that the range straddles it.
                    let boundaries = (w.end - w.start) / h.plan.boundary;
                    let b = w.start + (1 + self.below(boundaries.max(1))) * h.plan.boundary;
                    b.saturating_sub(1 + self.below(4))
                        .clamp(w.start, w.end - 1)
                } else {
                    w.start + self.below(w.end - w.start)
                };
                let len = match self.below(8) {
                    0..=4 => 1 + self.below(4),
                    5 | 6 => 1 + self.below(32),
                    _ => 1 + self.below(h.plan.long),
                };
                (f, start..(start + len).min(w.end))
            }
            Owner::Striped(segment) => loop {
                let p = w.start + self.below(w.end - w.start);
                if spec.owner_of(p, h.plan.threads) != self.t {
                    continue;
                }
                let seg =
                    (p / segment * segment).max(w.start)..((p / segment + 1) * segment).min(w.end);
                let len = 1 + self.below(seg.end - p);
                break (f, p..p + len);
            },
        }
    }

    pub(crate) fn step(&mut self) -> Result<(), String> {
        let (f, pages) = self.pick();
        let op = self.below(18);
        let exclusive = matches!(self.h.specs[f].owner, Owner::Thread(_));
        let result = match op {
            0..=2 => self.convert(f, pages.clone()),
            3 => self.populate(f, pages.clone()),
            4 => self.punch(f, pages.clone()),
            5 => self.pin(f, pages.clone()),
            6 => self.unpin(),
            7 | 8 => self.fault(f, pages.clone()),
            9..=11 => self.read(f, pages.clone()),
            12..=14 => self.write(f, pages.clone()),
            15 | 16 if !exclusive => self.cross_read(f, pages.clone()),
            15 | 16 => self.read(f, pages.clone()),
            _ => self.host_address(f, pages.clone()),
        };
        self.h.tally.ops.fetch_add(1, Ordering::Relaxed);
        result.map_err(|e| format!("file {f} pages {:#x}..{:#x}: {e}", pages.start, pages.end))?;
        // The protection of a thread's own file changes only under its own hand: probe it
        // right after the change.
        if exclusive && op <= 4 && self.below(3) == 0 {
            self.h.tally.probes.fetch_add(1, Ordering::Relaxed);
            let file = &self.h.files[f];
            let extents = file.extents().map_err(|e| e.to_string())?;
            check_protection(
                file,
                pages.clone(),
                self.h.units[f],
                self.h.granule,
                &extents,
                &read_maps(),
            )
            .map_err(|e| format!("after op {op} on file {f} pages {pages:?}: {e}"))?;
        }
        Ok(())
    }

    /// The first pinned page of `pages`.
    pub(crate) fn first_pinned(&self, f: usize, pages: &Range<u64>) -> Option<u64> {
        pages.clone().find(|p| self.page_ref(f, *p).pins > 0)
    }

    /// The first private page of `pages`.
    pub(crate) fn first_private(&self, f: usize, pages: &Range<u64>) -> Option<u64> {
        pages.clone().find(|p| !self.page_ref(f, *p).shared)
    }

    /// Errors any operation that takes memory or changes the mapping may meet.
    pub(crate) fn tolerated(&self, e: &StoreError) -> bool {
        match e {
            StoreError::OutOfMemory { .. } => {
                self.h.tally.out_of_memory.fetch_add(1, Ordering::Relaxed);
                true
            }
            StoreError::MappingLimit { .. } => {
                self.h.tally.mapping_limit.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn refused(&self) {
        self.h.tally.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn convert(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let to_shared = self.below(2) == 0;
        let to = if to_shared {
            Shareability::Shared
        } else {
            Shareability::Private
        };
        let mode = if self.below(4) == 0 {
            ConvertMode::Zero
        } else {
            ConvertMode::Preserve
        };
        let pinned = self.first_pinned(f, &pages);
        let changing: Vec<u64> = pages
            .clone()
            .filter(|p| self.page_ref(f, *p).shared != to_shared)
            .collect();
        let file = &self.h.files[f];
        match file.convert(
            pages.start * PAGE,
            (pages.end - pages.start) * PAGE,
            to,
            mode,
        ) {
            Ok(outcome) => {
                ensure!(
                    pinned.is_none(),
                    "converted pinned page {pinned:?} to {to:?}"
                );
                let changed: Vec<u64> = outcome
                    .changed()
                    .iter()
                    .flat_map(|r| r.start().0..r.end().0)
                    .collect();
                ensure!(
                    changed == changing,
                    "conversion to {to:?} changed {changed:x?}, the model expected {changing:x?}"
                );
                for p in pages {
                    let page = self.page(f, p);
                    page.shared = to_shared;
                    // ZERO zeroes the whole range when anything changes (not on a no-op).
                    if mode == ConvertMode::Zero && !changing.is_empty() {
                        page.content = Content::ZERO;
                    }
                }
                Ok(())
            }
            Err(StoreError::Pinned { offset, owner, .. })
                if Some(offset / PAGE) == pinned && owner == PinOwner(self.t as u32) =>
            {
                self.refused();
                Ok(())
            }
            Err(e) if self.tolerated(&e) => Ok(()),
            Err(e) => Err(format!(
                "convert to {to:?} ({mode:?}): {e} (first pinned {pinned:?})"
            )),
        }
    }

    pub(crate) fn populate(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let file = &self.h.files[f];
        match file.populate(pages.start * PAGE, (pages.end - pages.start) * PAGE) {
            Ok(()) => {
                for p in pages {
                    self.page(f, p).backed = true;
                }
                Ok(())
            }
            Err(e) if self.tolerated(&e) => Ok(()),
            Err(e) => Err(format!("populate: {e}")),
        }
    }

    pub(crate) fn punch(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let pinned = self.first_pinned(f, &pages);
        let file = &self.h.files[f];
        match file.punch_hole(pages.start * PAGE, (pages.end - pages.start) * PAGE) {
            Ok(()) => {
                ensure!(pinned.is_none(), "punched pinned page {pinned:?}");
                for p in pages {
                    let page = self.page(f, p);
                    page.content = Content::ZERO;
                    page.backed = false;
                }
                Ok(())
            }
            Err(StoreError::Pinned { offset, owner, .. })
                if Some(offset / PAGE) == pinned && owner == PinOwner(self.t as u32) =>
            {
                self.refused();
                Ok(())
            }
            Err(e) if self.tolerated(&e) => Ok(()),
            Err(e) => Err(format!("punch: {e} (first pinned {pinned:?})")),
        }
    }

    pub(crate) fn pin(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        if self.model.pins.len() >= 16 {
            return self.unpin();
        }
        let file = &self.h.files[f];
        match file.pin(
            pages.start * PAGE,
            (pages.end - pages.start) * PAGE,
            PinOwner(self.t as u32),
        ) {
            Ok(()) => {
                for p in pages.clone() {
                    let page = self.page(f, p);
                    page.pins += 1;
                    page.backed = true;
                }
                self.model
                    .pins
                    .push((f, pages.start, pages.end - pages.start));
                Ok(())
            }
            Err(StoreError::NotBacked { offset, .. }) => {
                let p = offset / PAGE;
                ensure!(
                    pages.contains(&p) && !self.page_ref(f, p).backed,
                    "pin: page {p:#x} is not backed, the model knows it backed"
                );
                self.refused();
                Ok(())
            }
            Err(e) => Err(format!("pin: {e}")),
        }
    }

    pub(crate) fn unpin(&mut self) -> Result<(), String> {
        if self.model.pins.is_empty() {
            return Ok(());
        }
        let i = self.below(self.model.pins.len() as u64) as usize;
        let (f, first, pages) = self.model.pins.swap_remove(i);
        self.h.files[f]
            .unpin(first * PAGE, pages * PAGE, PinOwner(self.t as u32))
            .map_err(|e| format!("unpin of file {f} pages {first:#x}+{pages}: {e}"))?;
        for p in first..first + pages {
            self.page(f, p).pins -= 1;
        }
        Ok(())
    }

    pub(crate) fn fault(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let p = pages.start + self.below(pages.end - pages.start);
        let shared = self.below(2) == 0;
        let access = if shared {
            Shareability::Shared
        } else {
            Shareability::Private
        };
        let file = &self.h.files[f];
        let through_mmu = self.below(4) == 0;
        let result = if through_mmu {
            self.h
                .mmu
                .fault(file.id(), p * PAGE, access)
                .map(|(size, pfn)| (pfn, size))
        } else {
            file.fault(p * PAGE, access).map(|m| {
                assert_eq!(m.shareability, access);
                (m.pfn, m.size)
            })
        };
        let model_shared = self.page_ref(f, p).shared;
        match result {
            Ok((pfn, size)) => {
                ensure!(
                    model_shared == shared,
                    "a {access:?} fault of a page the model has shared={model_shared} succeeded"
                );
                let behind = file.pfn_at(p * PAGE).map_err(|e| e.to_string())?;
                ensure!(
                    behind == Some(pfn),
                    "fault gave {pfn}, the file translates to {behind:?}"
                );
                let owner = self.h.store.owner_of(pfn).map_err(|e| e.to_string())?;
                ensure!(
                    owner == Some(file.id()),
                    "fault gave {pfn}, which belongs to {owner:?}"
                );
                let geometry = self.h.store.geometry();
                let block = geometry.pages(size);
                ensure!(
                    block <= geometry.pages(self.h.store.max_block()),
                    "fault claims {size:?}, more than the memory's {:?}",
                    self.h.store.max_block()
                );
                ensure!(
                    pfn.0 % block == p % block,
                    "fault claims {size:?} at page {p:#x} with {pfn} not aligned like it"
                );
                self.page(f, p).backed = true;
                Ok(())
            }
            Err(StoreError::PrivateAccess { offset, .. })
                if offset == p * PAGE && shared && !model_shared =>
            {
                self.refused();
                Ok(())
            }
            Err(StoreError::SharedAccess { offset, .. })
                if offset == p * PAGE && !shared && model_shared =>
            {
                self.refused();
                Ok(())
            }
            Err(e) if self.tolerated(&e) => Ok(()),
            Err(e) => Err(format!(
                "{access:?} fault at page {p:#x} (model shared={model_shared}): {e}"
            )),
        }
    }

    /// A byte range inside `pages`, its start biased to page boundaries.
    pub(crate) fn bytes_in(&mut self, pages: &Range<u64>, align: u64) -> Range<u64> {
        let (lo, hi) = (pages.start * PAGE, pages.end * PAGE);
        let p = pages.start + self.below(pages.end - pages.start);
        let start = match self.below(4) {
            0 => p * PAGE,
            // Just before a page boundary: the copy straddles it.
            1 => ((p + 1) * PAGE).saturating_sub(16 + self.below(48)).max(lo),
            _ => p * PAGE + self.below(PAGE),
        } / align
            * align;
        let start = start.max(lo);
        let max = (hi - start).min(256 << 10);
        let len = match self.below(3) {
            0 => 1 + self.below(64),
            _ => 1 + self.below(max),
        }
        .min(max)
        .div_ceil(align)
            * align;
        start..(start + len).min(hi)
    }

    pub(crate) fn read(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let bytes = self.bytes_in(&pages, 1);
        let touched = bytes.start / PAGE..bytes.end.div_ceil(PAGE);
        let private = self.first_private(f, &touched);
        let file = &self.h.files[f];
        let id = file.id().0;
        let mut buf = vec![0x5Au8; (bytes.end - bytes.start) as usize];
        match file.read(bytes.start, &mut buf) {
            Ok(()) => {
                ensure!(
                    private.is_none(),
                    "read of {bytes:#x?} succeeded over private page {private:?}"
                );
                let want =
                    expected_bytes(id, bytes.start, bytes.end, |p| &self.page_ref(f, p).content);
                compare("read", id, bytes.start, &buf, &want)
            }
            Err(StoreError::PrivateAccess { offset, .. })
                if private.is_some_and(|p| offset == (p * PAGE).max(bytes.start)) =>
            {
                self.refused();
                Ok(())
            }
            Err(e) => Err(format!(
                "read of {bytes:#x?} (first private {private:?}): {e}"
            )),
        }
    }

    pub(crate) fn write(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let bytes = self.bytes_in(&pages, RECORD);
        let touched = bytes.start / PAGE..bytes.end.div_ceil(PAGE);
        let private = self.first_private(f, &touched);
        let generation = self.h.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let file = &self.h.files[f];
        let id = file.id().0;
        let stamp = Content::Uniform(generation);
        let data = expected_bytes(id, bytes.start, bytes.end, |_| &stamp);
        match file.write(bytes.start, &data) {
            Ok(()) => {
                ensure!(
                    private.is_none(),
                    "write of {bytes:#x?} succeeded over private page {private:?}"
                );
                for p in touched {
                    let lo = bytes.start.max(p * PAGE) - p * PAGE;
                    let hi = bytes.end.min((p + 1) * PAGE) - p * PAGE;
                    let page = self.page(f, p);
                    page.content
                        .set((lo / RECORD) as usize..(hi / RECORD) as usize, generation);
                    page.backed = true;
                }
                Ok(())
            }
            Err(StoreError::PrivateAccess { offset, .. })
                if private.is_some_and(|p| offset == (p * PAGE).max(bytes.start)) =>
            {
                self.refused();
                Ok(())
            }
            Err(e) if self.tolerated(&e) => Ok(()),
            Err(e) => Err(format!(
                "write of {bytes:#x?} (first private {private:?}): {e}"
            )),
        }
    }

    /// A read across other threads' segments of a shared file: only this file's stamps for
    /// each place (or zeros) may come back; this thread's own pages exactly.
    pub(crate) fn cross_read(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let spec = &self.h.specs[f];
        let w = spec
            .windows
            .iter()
            .find(|w| w.contains(&pages.start))
            .expect("in a window")
            .clone();
        let start = (w.start * PAGE + self.below((w.end - w.start) * PAGE)).min(w.end * PAGE - 1);
        let len = (1 + self.below(96 << 10)).min(w.end * PAGE - start);
        let bytes = start..start + len;
        let touched = bytes.start / PAGE..bytes.end.div_ceil(PAGE);
        let mine: Vec<u64> = touched
            .clone()
            .filter(|p| spec.owner_of(*p, self.h.plan.threads) == self.t)
            .collect();
        let my_private = mine.iter().copied().find(|p| !self.page_ref(f, *p).shared);
        let file = &self.h.files[f];
        let id = file.id().0;
        let mut buf = vec![0x5Au8; len as usize];
        match file.read(start, &mut buf) {
            Ok(()) => {
                ensure!(
                    my_private.is_none(),
                    "read of {bytes:#x?} succeeded over this thread's private page {my_private:?}"
                );
                let max_generation = self.h.generation.load(Ordering::Relaxed);
                check_words(id, start, &buf, max_generation)?;
                for p in mine {
                    let lo = bytes.start.max(p * PAGE);
                    let hi = bytes.end.min((p + 1) * PAGE);
                    let want = expected_bytes(id, lo, hi, |q| &self.page_ref(f, q).content);
                    let got = &buf[(lo - start) as usize..(hi - start) as usize];
                    compare("cross read, own page", id, lo, got, &want)?;
                }
                Ok(())
            }
            Err(StoreError::PrivateAccess { offset, .. })
                if bytes.contains(&offset)
                    && my_private.is_none_or(|p| offset <= (p * PAGE).max(start)) =>
            {
                self.refused();
                Ok(())
            }
            Err(e) => Err(format!(
                "cross read of {bytes:#x?} (own first private {my_private:?}): {e}"
            )),
        }
    }

    pub(crate) fn host_address(&mut self, f: usize, pages: Range<u64>) -> Result<(), String> {
        let private = self.first_private(f, &pages);
        let file = &self.h.files[f];
        let (offset, len) = (pages.start * PAGE, (pages.end - pages.start) * PAGE);
        match file.host_view_address(offset, len) {
            Ok(addr) => {
                ensure!(
                    private.is_none(),
                    "host address of private page {private:?}"
                );
                let base = file.host_mapping().ok_or("no host mapping")?.as_ptr() as u64;
                ensure!(
                    addr.as_ptr() as u64 == base + offset,
                    "host address {addr:?} is not mapping base {base:#x} + {offset:#x}"
                );
                for p in pages {
                    self.page(f, p).backed = true;
                }
                Ok(())
            }
            Err(StoreError::PrivateAccess { offset: at, .. })
                if private.is_some_and(|p| at == p * PAGE) =>
            {
                self.refused();
                Ok(())
            }
            Err(StoreError::NotBacked { offset: at, .. })
                if private.is_none()
                    && pages.contains(&(at / PAGE))
                    && !self.page_ref(f, at / PAGE).backed =>
            {
                self.refused();
                Ok(())
            }
            Err(e) => Err(format!("host address (first private {private:?}): {e}")),
        }
    }
}
