//! The kernel's view of the process: `/proc/self/maps` (what each file mapping maps, with which
//! protection) and `/proc/self/fd`.

use std::ops::Range;

use pfnstore::{GuestFile, Shareability};

use crate::common::PAGE;

#[derive(Debug, Clone)]
pub(crate) struct Vma {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) perms: String,
    pub(crate) offset: u64,
    pub(crate) path: String,
}

pub(crate) fn read_maps() -> Vec<Vma> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (range, perms, offset) = (parts.next()?, parts.next()?, parts.next()?);
            let _dev = parts.next()?;
            let _inode = parts.next()?;
            let path = parts.collect::<Vec<_>>().join(" ");
            let (a, b) = range.split_once('-')?;
            Some(Vma {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                perms: perms.to_string(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

/// Calls `check` with each VMA that covers addresses `lo..hi` and the first address of the span
/// it covers; fails where nothing is mapped.
pub(crate) fn each_vma(
    vmas: &[Vma],
    lo: u64,
    hi: u64,
    mut check: impl FnMut(&Vma, u64) -> Result<(), String>,
) -> Result<(), String> {
    let mut at = lo;
    while at < hi {
        let i = vmas.partition_point(|v| v.end <= at);
        let vma = vmas
            .get(i)
            .filter(|v| v.start <= at)
            .ok_or_else(|| format!("address {at:#x} is not mapped at all"))?;
        check(vma, at)?;
        at = vma.end.min(hi);
    }
    Ok(())
}

/// The protection rule as the kernel applies it, for the units that `pages` touches:
///
/// * a unit with a backed, shared, unquarantined page is read-write, any other is `PROT_NONE`
///   (what the file holds of it);
/// * every backed page maps the store's memfd where the file's extents say its memory lies;
/// * memory the file holds but does not back (the rest of a hugetlb page) is mapped too, with
///   the unit's protection; what it does not hold maps no memfd and is inaccessible.
///
/// `granule` is the memfd's page in 4 KiB pages: a file holds a granule while any page of it
/// is backed.
pub(crate) fn check_protection(
    file: &GuestFile,
    pages: Range<u64>,
    unit: u64,
    granule: u64,
    extents: &[pfnstore::FileExtent],
    vmas: &[Vma],
) -> Result<(), String> {
    let region = file.host_mapping().ok_or("no host mapping")?;
    let base = region.as_ptr() as u64;
    let size = file.size() / PAGE;
    let id = file.id();
    let mut u = pages.start / unit * unit;
    while u < pages.end.min(size) {
        let end = (u + unit).min(size);
        let runs = file
            .attribute_runs(u * PAGE, (end - u) * PAGE)
            .map_err(|e| e.to_string())?;
        let accessible = runs
            .iter()
            .any(|r| r.backed && r.shareability == Shareability::Shared && r.quarantined.is_none());
        let rule = |vma: &Vma, at: u64, what: &str| -> Result<(), String> {
            let ok = if accessible {
                vma.perms.starts_with("rw")
            } else {
                vma.perms.starts_with("---")
            };
            ensure!(
                ok,
                "{what} offset {:#x} of {id:?} is mapped {} but its unit {:#x}..{:#x} is {}",
                at - base,
                vma.perms,
                u * PAGE,
                end * PAGE,
                if accessible {
                    "accessible (it has a backed shared page)"
                } else {
                    "wholly private or unbacked: it must be PROT_NONE"
                }
            );
            ensure!(
                vma.path.contains("memfd:"),
                "{what} offset {:#x} of {id:?} is mapped from {:?}, not the store's memfd",
                at - base,
                vma.path
            );
            Ok(())
        };
        let held = |g: u64| {
            let g_end = (g + granule).min(size);
            runs.iter()
                .any(|r| r.backed && r.range.start().0 < g_end && r.range.end().0 > g)
        };
        for run in &runs {
            let (first, last) = (run.range.start().0, run.range.end().0);
            if run.backed {
                each_vma(
                    vmas,
                    base + first * PAGE,
                    base + last * PAGE,
                    |vma, addr| {
                        rule(vma, addr, "backed")?;
                        // The memfd offset, per extent inside this VMA.
                        let mut at = addr;
                        while at < vma.end.min(base + last * PAGE) {
                            let offset = at - base;
                            let extent = extents
                                .iter()
                                .find(|e| e.offset <= offset && offset < e.offset + e.len)
                                .ok_or_else(|| {
                                    format!("backed offset {offset:#x} is in no extent")
                                })?;
                            let want = extent.memfd_offset + (offset - extent.offset);
                            let got = vma.offset + (at - vma.start);
                            ensure!(
                                got == want,
                                "offset {offset:#x} of {id:?} maps memfd offset {got:#x}, its extent ({}) lies at {want:#x}",
                                extent.pfn
                            );
                            at = base + extent.offset + extent.len;
                        }
                        Ok(())
                    },
                )?;
                continue;
            }
            let mut p = first;
            while p < last {
                let g = p / granule * granule;
                let q = if granule == 1 {
                    last
                } else {
                    (g + granule).min(last)
                };
                if granule > 1 && held(g) {
                    each_vma(vmas, base + p * PAGE, base + q * PAGE, |vma, addr| {
                        rule(vma, addr, "held")
                    })?;
                } else {
                    each_vma(vmas, base + p * PAGE, base + q * PAGE, |vma, addr| {
                        ensure!(
                            vma.perms.starts_with("---") && !vma.path.contains("memfd:"),
                            "offset {:#x} of {id:?} holds no memory but is mapped {} from {:?}",
                            addr - base,
                            vma.perms,
                            vma.path
                        );
                        Ok(())
                    })?;
                }
                p = q;
            }
        }
        u = end;
    }
    Ok(())
}

pub(crate) fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The process's mappings. Under a sanitizer (`PFNSTORE_SANITIZER` set, as
/// scripts/sanitize.sh does) only those of memfds: the sanitizer's runtime maps and unmaps
/// anonymous memory of its own as it goes.
pub(crate) fn maps_lines() -> Vec<String> {
    let sanitized = std::env::var_os("PFNSTORE_SANITIZER").is_some();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| !sanitized || l.contains("memfd:"))
        .map(str::to_string)
        .collect()
}
