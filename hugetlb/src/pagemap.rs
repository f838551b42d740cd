//! Physical frame numbers from `/proc/self/pagemap`.
//!
//! pagemap has one little-endian u64 per 4 KiB virtual page: bit 63 "present", bits 0–54 the
//! PFN. The kernel shows the PFN only to openers with `CAP_SYS_ADMIN`; everyone else reads
//! zero there. A huge page is physically contiguous and naturally aligned, so every 4 KiB entry
//! of it must read `first + i` with `first` aligned to the huge page: this module checks that
//! for every entry rather than trusting the first one.

use std::fs::File;
use std::os::unix::fs::FileExt;

use pfnstore_core::{PAGE_SIZE, Pfn};

use crate::error::hint;
use crate::{HugePageSize, HugetlbError, PagemapProblem};

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;
const ENTRY_BYTES: usize = 8;

/// What pagemap says about the huge pages of a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The first PFN of each page, checked aligned and contiguous.
    Real(Vec<Pfn>),
    /// Every page is present but pagemap shows PFN 0: the opener lacks `CAP_SYS_ADMIN`.
    Hidden,
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens the calling process's pagemap. The capabilities that decide whether PFNs are
    /// shown are those of the opening thread at this moment.
    pub fn open() -> Result<Pagemap, HugetlbError> {
        let path = "/proc/self/pagemap";
        File::open(path)
            .map(|file| Pagemap { file })
            .map_err(|e| HugetlbError::Sysfs {
                path: path.into(),
                problem: e.to_string(),
                errno: e.raw_os_error(),
                hint: hint::ROOT,
            })
    }

    /// Resolves the `len / page_size` pages mapped at `addr` (which must be prefaulted).
    /// `memfd_offset` is the byte offset of `addr` in its memfd, used to name pages in errors.
    pub fn resolve(
        &self,
        addr: usize,
        len: usize,
        page_size: HugePageSize,
        memfd_offset: u64,
    ) -> Result<Resolution, HugetlbError> {
        let per_page = page_size.base_pages() as usize;
        let pages = len / page_size.bytes() as usize;
        let mut buf = vec![0u8; per_page * ENTRY_BYTES];
        let mut firsts = Vec::with_capacity(pages);
        let mut hidden = false;
        for page in 0..pages {
            let vaddr = addr + page * page_size.bytes() as usize;
            let at = (vaddr as u64 / PAGE_SIZE) * ENTRY_BYTES as u64;
            self.file
                .read_exact_at(&mut buf, at)
                .map_err(|e| HugetlbError::Sysfs {
                    path: "/proc/self/pagemap".into(),
                    problem: format!("reading {} entries at {at:#x}: {e}", per_page),
                    errno: e.raw_os_error(),
                    hint: hint::ROOT,
                })?;
            let offset = memfd_offset + page as u64 * page_size.bytes();
            match check_huge_page(&buf, page_size).map_err(|(index, problem)| {
                HugetlbError::Pagemap {
                    offset: offset + index * PAGE_SIZE,
                    problem,
                }
            })? {
                Some(first) => firsts.push(first),
                None => hidden = true,
            }
        }
        Ok(if hidden {
            Resolution::Hidden
        } else {
            Resolution::Real(firsts)
        })
    }
}

impl Pagemap {
    /// The first PFN of the huge page of `page_size` mapped (and populated) at `addr`, read from
    /// its first 4 KiB entry only: a hugetlb page is mapped whole and is physically contiguous,
    /// so that entry names the whole page (what [`Pagemap::resolve`] checks entry by entry when
    /// memory is first obtained). `Ok(None)` when pagemap hides PFNs (no `CAP_SYS_ADMIN`).
    /// `memfd_offset`, the page's byte offset in its memfd, names it in errors.
    pub fn huge_page_pfn(
        &self,
        addr: usize,
        page_size: HugePageSize,
        memfd_offset: u64,
    ) -> Result<Option<Pfn>, HugetlbError> {
        let mut buf = [0u8; ENTRY_BYTES];
        let at = (addr as u64 / PAGE_SIZE) * ENTRY_BYTES as u64;
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| HugetlbError::Sysfs {
                path: "/proc/self/pagemap".into(),
                problem: format!("reading the entry at {at:#x}: {e}"),
                errno: e.raw_os_error(),
                hint: hint::ROOT,
            })?;
        let entry = u64::from_le_bytes(buf);
        let problem = |problem| HugetlbError::Pagemap {
            offset: memfd_offset,
            problem,
        };
        if entry & PRESENT == 0 {
            return Err(problem(PagemapProblem::NotPresent));
        }
        let pfn = Pfn(entry & PFN_MASK);
        let align_pages = page_size.base_pages();
        if pfn.0 == 0 {
            Ok(None)
        } else if !pfn.is_aligned_to(align_pages) {
            Err(problem(PagemapProblem::Unaligned { pfn, align_pages }))
        } else {
            Ok(Some(pfn))
        }
    }
}

/// Checks the pagemap entries of one huge page: all present, the first aligned, the rest
/// contiguous. `Ok(None)` when the PFNs are hidden (all present, all zero). On failure, the
/// index of the offending 4K entry and the problem.
pub fn check_huge_page(
    entries: &[u8],
    page_size: HugePageSize,
) -> Result<Option<Pfn>, (u64, PagemapProblem)> {
    let align = page_size.base_pages();
    let mut first = None;
    for (i, raw) in entries.chunks_exact(ENTRY_BYTES).enumerate() {
        let i = i as u64;
        let entry = u64::from_le_bytes(raw.try_into().expect("chunks_exact yields 8 bytes"));
        if entry & PRESENT == 0 {
            return Err((i, PagemapProblem::NotPresent));
        }
        let pfn = Pfn(entry & PFN_MASK);
        match first {
            None => {
                if pfn.0 != 0 && !pfn.is_aligned_to(align) {
                    return Err((
                        i,
                        PagemapProblem::Unaligned {
                            pfn,
                            align_pages: align,
                        },
                    ));
                }
                first = Some(pfn);
            }
            Some(Pfn(0)) if pfn.0 == 0 => {}
            Some(f) => {
                let expected = Pfn(f.0 + i);
                if pfn != expected {
                    return Err((
                        i,
                        PagemapProblem::NotContiguous {
                            expected,
                            found: pfn,
                        },
                    ));
                }
            }
        }
    }
    Ok(first.filter(|f| f.0 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pfns: impl IntoIterator<Item = u64>) -> Vec<u8> {
        pfns.into_iter()
            .flat_map(|p| (PRESENT | (1 << 61) | p).to_le_bytes())
            .collect()
    }

    #[test]
    fn a_contiguous_aligned_2m_page_resolves_to_its_first_pfn() {
        let e = entries(0x1200..0x1200 + 512);
        assert_eq!(
            check_huge_page(&e, HugePageSize::Huge2M),
            Ok(Some(Pfn(0x1200)))
        );
    }

    #[test]
    fn zero_pfns_mean_hidden() {
        let e = entries(std::iter::repeat_n(0, 512));
        assert_eq!(check_huge_page(&e, HugePageSize::Huge2M), Ok(None));
    }

    #[test]
    fn gaps_misalignment_and_absence_name_the_entry() {
        let mut pfns: Vec<u64> = (0x1200..0x1200 + 512).collect();
        pfns[7] = 0x9999;
        assert_eq!(
            check_huge_page(&entries(pfns), HugePageSize::Huge2M),
            Err((
                7,
                PagemapProblem::NotContiguous {
                    expected: Pfn(0x1207),
                    found: Pfn(0x9999)
                }
            ))
        );
        assert_eq!(
            check_huge_page(&entries(0x1201..0x1201 + 512), HugePageSize::Huge2M),
            Err((
                0,
                PagemapProblem::Unaligned {
                    pfn: Pfn(0x1201),
                    align_pages: 512
                }
            ))
        );
        let mut e = entries(0x1200..0x1200 + 512);
        e[3 * 8 + 7] = 0; // clear "present" of entry 3
        assert_eq!(
            check_huge_page(&e, HugePageSize::Huge2M),
            Err((3, PagemapProblem::NotPresent))
        );
        // Hidden PFNs must be hidden throughout; a real PFN among zeros is a contradiction.
        let mut pfns = vec![0u64; 512];
        pfns[5] = 0x40005;
        assert!(check_huge_page(&entries(pfns), HugePageSize::Huge2M).is_err());
    }
}
