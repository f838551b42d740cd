//! Handing a source to another process: [`SourceRecord`], what the receiving process rebuilds
//! the source from, and [`rebuild`].
//!
//! A live update passes a running store to a new VMM process without touching guest memory.
//! For the memory layer that is three steps:
//!
//! 1. The old process writes down its source with [`MemorySource::handover_record`] and sends the record
//!    (serialised by the caller; the types here are plain data) and the source's memfd
//!    ([`MemorySource::memfd`], over a Unix socket with `SCM_RIGHTS`).
//! 2. The new process calls [`rebuild`] with the record and the received descriptor. It maps
//!    the memfd without copying, zeroing or allocating anything, re-reads the PFNs of chunks
//!    with real PFNs through pagemap and checks them against the record, and, last, takes over
//!    the pool growth the old source owned ([`crate::pool::PoolReservation::adopt`]).
//! 3. Once the new process confirmed, the old one calls [`MemorySource::relinquish`]: its
//!    source gives nothing back when dropped (it only unmaps and closes its descriptor).
//!
//! If the new process fails before it confirms (a typed error from [`rebuild`] takes nothing
//! over; a failure or crash after it hands the growth back), the old source is as it was.
//! [`crate::pool`] ("Handing a growth to another process") tells how the growth changes owner.

use std::fmt;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use pfnstore_core::sync::Arc;
use pfnstore_core::{Geometry, PAGE_SIZE, Pfn};

use crate::backing::MemfdFile;
use crate::memfd::FdInfo;
use crate::pool::PoolId;
use crate::{
    Chunk, HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource, MemorySource, PfnKind,
    Prefault, SyntheticSource,
};

/// Everything another process needs to rebuild a source from its memfd: plain data, which the
/// caller serialises as it likes. Made by [`MemorySource::handover_record`], used by [`rebuild`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRecord {
    /// Which kind of source it is (and so which type rebuilds it).
    pub kind: SourceKind,
    /// The size of the pages backing the memfd (for a synthetic source: the size its chunks
    /// stand for).
    pub page_size: HugePageSize,
    /// The PFN geometry (`geometry.order(PageSize::Size2M)` and
    /// `geometry.order(PageSize::Size1G)` are its mid and chunk orders, for
    /// [`Geometry::new`]).
    pub geometry: Geometry,
    /// Bytes of the memfd that hold the source's memory (0 without a memfd).
    pub memfd_len: u64,
    /// The memfd's (device, inode), so that the receiver can tell it was handed the right
    /// descriptor; `None` without a memfd.
    pub memfd_id: Option<(u64, u64)>,
    /// The chunks, in [`MemorySource::chunks`] order (memfd order for hugetlb and synthetic
    /// sources; PFN order for [`crate::testing::ShuffledSource`]).
    pub chunks: Vec<ChunkRecord>,
    /// Byte ranges of the memfd punched out and not written since (whole pages, sorted,
    /// disjoint): they have no memory, and the receiver must not touch them, which would take
    /// a page from the pool.
    pub holes: Vec<Range<u64>>,
    /// What the source was asked for (the receiver grows with the same settings).
    pub request: RequestRecord,
    /// The pool growth the source owns, which the receiver takes over.
    pub pool_growth: Vec<GrowthRecord>,
}

/// The kinds of source a [`SourceRecord`] can describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// A [`HugetlbSource`]: a hugetlb memfd, or an ordinary one where the ladder fell back.
    Hugetlb,
    /// A [`crate::testing::ShuffledSource`] (tests).
    Shuffled,
    /// A [`SyntheticSource`]: no memory, no memfd.
    Synthetic,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Hugetlb => "hugetlb memfd",
            SourceKind::Shuffled => "shuffled test memfd",
            SourceKind::Synthetic => "synthetic",
        })
    }
}

/// One chunk of a [`SourceRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRecord {
    /// First PFN.
    pub base: Pfn,
    /// Byte offset in the memfd.
    pub memfd_offset: u64,
    /// Whether `base` is the machine's PFN (then the receiver checks it through pagemap).
    pub pfn_kind: PfnKind,
}

/// What a source was asked for: the settings of its future growth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestRecord {
    /// Bytes asked for at creation.
    pub requested_bytes: u64,
    /// The first rung of the ladder tried.
    pub preferred: HugePageSize,
    /// Whether falling back was forbidden.
    pub strict: bool,
    /// The NUMA node asked for.
    pub numa_node: Option<u32>,
    /// Whether the source may grow pools.
    pub grow_pool: bool,
    /// How pages are prefaulted.
    pub prefault: Prefault,
    /// Whether the mapping is mlocked.
    pub mlock: bool,
}

/// A pool growth a source owns: pages it added to a pool, recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrowthRecord {
    /// The pool.
    pub pool: PoolId,
    /// Pages added.
    pub pages: u64,
    /// The name (not the path) of its ledger entry in the run directory's ledger, which the
    /// receiver renames to an entry of its own.
    pub ledger_entry: String,
}

/// What is wrong with a [`SourceRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordProblem {
    /// Rebuilt as another kind of source than it records.
    Kind {
        /// The kind asked to rebuild it.
        expected: SourceKind,
        /// The record's kind.
        found: SourceKind,
    },
    /// A source with memory without its memfd.
    MissingMemfd,
    /// A memfd for a source without memory.
    UnexpectedMemfd,
    /// No chunks.
    NoChunks,
    /// The geometry does not fit the page size (chunks with real PFNs are one page; the
    /// kind's own geometry otherwise).
    Geometry,
    /// The chunks do not tile the memfd: their number times the chunk size is not its length.
    Length {
        /// Bytes the chunks cover.
        chunks_bytes: u64,
    },
    /// A chunk's memfd offset is not a multiple of the chunk size, lies past the memfd's end,
    /// or is another chunk's too.
    MemfdOffset {
        /// The offset.
        memfd_offset: u64,
    },
    /// A chunk's base PFN is not where this kind of source puts it (aligned to the chunk; for
    /// synthetic and shuffled sources, consecutive from the first).
    Base {
        /// The PFN.
        base: Pfn,
    },
    /// A chunk's PFN kind is not one this source can have, or differs from the first chunk's.
    PfnKind {
        /// The kind.
        kind: PfnKind,
    },
    /// A hole that is not whole pages inside the memfd, or overlaps or precedes the one before.
    Hole {
        /// The hole's byte range.
        range: Range<u64>,
    },
}

impl fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordProblem::Kind { expected, found } => {
                write!(f, "a {found} source cannot be rebuilt as a {expected} one")
            }
            RecordProblem::MissingMemfd => f.write_str("a source with memory needs its memfd"),
            RecordProblem::UnexpectedMemfd => f.write_str("a synthetic source takes no memfd"),
            RecordProblem::NoChunks => f.write_str("no chunks"),
            RecordProblem::Geometry => f.write_str("the geometry does not fit the page size"),
            RecordProblem::Length { chunks_bytes } => write!(
                f,
                "the chunks cover {chunks_bytes:#x} bytes, not the memfd's length"
            ),
            RecordProblem::MemfdOffset { memfd_offset } => write!(
                f,
                "memfd offset {memfd_offset:#x} is unaligned, past the end or taken"
            ),
            RecordProblem::Base { base } => write!(f, "base {base} is not where it belongs"),
            RecordProblem::PfnKind { kind } => write!(f, "PFNs {kind} do not fit this source"),
            RecordProblem::Hole { range } => write!(
                f,
                "hole {:#x}..{:#x} is not whole pages in order inside the memfd",
                range.start, range.end
            ),
        }
    }
}

/// Rebuilds a source another process recorded ([`MemorySource::handover_record`]): the type the
/// record's kind names, from the record and (for sources with memory) the memfd it was sent.
/// See [`HugetlbSource::rebuild`], [`SyntheticSource::rebuild`] and
/// [`crate::testing::ShuffledSource::rebuild`] for what each checks. On error nothing was
/// taken over: the old owner's source is as it was.
pub fn rebuild(
    record: &SourceRecord,
    memfd: Option<OwnedFd>,
) -> Result<Box<dyn MemorySource>, HugetlbError> {
    match (record.kind, memfd) {
        (SourceKind::Synthetic, None) => Ok(Box::new(SyntheticSource::rebuild(record)?)),
        (SourceKind::Synthetic, Some(_)) => Err(invalid(None, RecordProblem::UnexpectedMemfd)),
        (_, None) => Err(invalid(None, RecordProblem::MissingMemfd)),
        (SourceKind::Hugetlb, Some(fd)) => Ok(Box::new(HugetlbSource::rebuild(record, fd)?)),
        #[cfg(not(pfnstore_loom))]
        (SourceKind::Shuffled, Some(fd)) => Ok(Box::new(crate::testing::ShuffledSource::rebuild(
            record, fd,
        )?)),
        #[cfg(pfnstore_loom)]
        (SourceKind::Shuffled, Some(_)) => Err(invalid(
            None,
            RecordProblem::Kind {
                expected: SourceKind::Hugetlb,
                found: SourceKind::Shuffled,
            },
        )),
    }
}

pub(crate) fn invalid(chunk: Option<usize>, problem: RecordProblem) -> HugetlbError {
    HugetlbError::InvalidRecord { chunk, problem }
}

/// The record of `chunks`.
pub(crate) fn chunk_records(chunks: &[Chunk]) -> Vec<ChunkRecord> {
    chunks
        .iter()
        .map(|c| ChunkRecord {
            base: c.base,
            memfd_offset: c.memfd_offset,
            pfn_kind: c.pfn_kind,
        })
        .collect()
}

/// The holes of `memfd` as byte ranges.
pub(crate) fn hole_records(memfd: &MemfdFile) -> Vec<Range<u64>> {
    let page = memfd.page_size.bytes();
    memfd
        .holes
        .read()
        .iter()
        .map(|r| r.start * page..r.end * page)
        .collect()
}

/// The (device, inode) of `memfd`, if fstat answers (it does for an open memfd).
pub(crate) fn memfd_identity(memfd: &MemfdFile) -> Option<(u64, u64)> {
    FdInfo::probe(memfd.file.as_fd()).ok().map(|info| info.id)
}

/// The settings of `config`.
pub(crate) fn request_record(config: &HugetlbConfig) -> RequestRecord {
    RequestRecord {
        requested_bytes: config.bytes,
        preferred: config.page_size,
        strict: config.strict,
        numa_node: config.numa_node,
        grow_pool: config.grow_pool,
        prefault: config.prefault,
        mlock: config.mlock,
    }
}

/// The config a rebuilt source grows with.
pub(crate) fn config_of(request: &RequestRecord) -> HugetlbConfig {
    HugetlbConfig {
        bytes: request.requested_bytes,
        page_size: request.preferred,
        strict: request.strict,
        numa_node: request.numa_node,
        grow_pool: request.grow_pool,
        prefault: request.prefault,
        mlock: request.mlock,
    }
}

/// Checks that `record` is of `kind`.
pub(crate) fn check_kind(record: &SourceRecord, kind: SourceKind) -> Result<(), HugetlbError> {
    if record.kind == kind {
        Ok(())
    } else {
        Err(invalid(
            None,
            RecordProblem::Kind {
                expected: kind,
                found: record.kind,
            },
        ))
    }
}

/// The one PFN kind of all of `record`'s chunks, which must be one of `allowed`.
pub(crate) fn pfn_kind_of(
    record: &SourceRecord,
    allowed: impl Fn(PfnKind) -> bool,
) -> Result<PfnKind, HugetlbError> {
    let first = record
        .chunks
        .first()
        .ok_or(invalid(None, RecordProblem::NoChunks))?
        .pfn_kind;
    for (i, c) in record.chunks.iter().enumerate() {
        if c.pfn_kind != first || !allowed(c.pfn_kind) {
            return Err(invalid(
                Some(i),
                RecordProblem::PfnKind { kind: c.pfn_kind },
            ));
        }
    }
    Ok(first)
}

/// Checks that the chunks tile the memfd: each at a distinct multiple of the chunk size below
/// its length, as many as fill it.
pub(crate) fn check_tiling(record: &SourceRecord) -> Result<(), HugetlbError> {
    let chunk_bytes = record.geometry.chunk_pages() * PAGE_SIZE;
    let chunks_bytes = (record.chunks.len() as u64).saturating_mul(chunk_bytes);
    if chunks_bytes != record.memfd_len {
        return Err(invalid(None, RecordProblem::Length { chunks_bytes }));
    }
    let mut taken = vec![false; record.chunks.len()];
    for (i, c) in record.chunks.iter().enumerate() {
        let slot = c.memfd_offset / chunk_bytes;
        let free = c.memfd_offset.is_multiple_of(chunk_bytes)
            && usize::try_from(slot)
                .ok()
                .and_then(|s| taken.get_mut(s))
                .is_some_and(|t| !std::mem::replace(t, true));
        if !free {
            return Err(invalid(
                Some(i),
                RecordProblem::MemfdOffset {
                    memfd_offset: c.memfd_offset,
                },
            ));
        }
    }
    Ok(())
}

/// Checks that the chunk bases are consecutive from `first`.
pub(crate) fn check_consecutive(record: &SourceRecord, first: Pfn) -> Result<(), HugetlbError> {
    let chunk_pages = record.geometry.chunk_pages();
    for (i, c) in record.chunks.iter().enumerate() {
        let expected = (i as u64)
            .checked_mul(chunk_pages)
            .and_then(|off| first.0.checked_add(off));
        if expected != Some(c.base.0) {
            return Err(invalid(Some(i), RecordProblem::Base { base: c.base }));
        }
    }
    Ok(())
}

/// Checks the holes: whole pages, in order, disjoint, inside the memfd.
fn check_holes(record: &SourceRecord) -> Result<(), HugetlbError> {
    let page = record.page_size.bytes();
    let mut end = 0;
    for hole in &record.holes {
        let fits = hole.start >= end
            && hole.start < hole.end
            && hole.end <= record.memfd_len
            && hole.start.is_multiple_of(page)
            && hole.end.is_multiple_of(page);
        if !fits {
            return Err(invalid(
                None,
                RecordProblem::Hole {
                    range: hole.clone(),
                },
            ));
        }
        end = hole.end;
    }
    Ok(())
}

/// Takes the received memfd on: checks its page size, length and identity against `record`,
/// makes it close-on-exec (so that programs this process starts, the pool guardian among
/// them, do not hold guest memory) and records its holes.
pub(crate) fn adopt_memfd(
    record: &SourceRecord,
    fd: OwnedFd,
) -> Result<Arc<MemfdFile>, HugetlbError> {
    check_holes(record)?;
    let info = FdInfo::probe(fd.as_fd())?;
    if info.page_size != record.page_size {
        return Err(HugetlbError::MemfdPageSize {
            recorded: record.page_size,
            found: info.page_size,
        });
    }
    if info.len != record.memfd_len {
        return Err(HugetlbError::MemfdLength {
            recorded: record.memfd_len,
            found: info.len,
        });
    }
    if let Some(recorded) = record.memfd_id
        && recorded != info.id
    {
        return Err(HugetlbError::WrongMemfd {
            recorded,
            found: info.id,
        });
    }
    // SAFETY: fcntl(F_SETFD) sets a flag on a descriptor we own; it touches no memory.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(HugetlbError::os(
            "fcntl(FD_CLOEXEC)",
            record.page_size,
            std::io::Error::last_os_error(),
        ));
    }
    let memfd = MemfdFile::from_file(fd.into(), record.page_size);
    {
        let page = record.page_size.bytes();
        let mut holes = memfd.holes.write();
        for hole in &record.holes {
            holes.insert(hole.start / page..hole.end / page);
        }
    }
    Ok(Arc::new(memfd))
}

/// Pages of `memfd`'s page size the file holds now: hugetlbfs and tmpfs count a file's
/// allocated memory in `st_blocks` (512-byte units), which is how the pages can be counted
/// without touching (and so allocating) any.
pub(crate) fn backed_pages(memfd: &MemfdFile) -> Result<u64, HugetlbError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `struct stat` into `st`, which is large enough and lives across
    // the call; the descriptor is open (owned by `memfd`).
    let rc = unsafe { libc::fstat(memfd.file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(HugetlbError::os(
            "fstat",
            memfd.page_size,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fstat succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.st_blocks as u64 * 512 / memfd.page_size.bytes())
}

/// Pages of `record`'s memfd that hold memory: all but its holes.
pub(crate) fn expected_backed_pages(record: &SourceRecord) -> u64 {
    let holes: u64 = record.holes.iter().map(|h| h.end - h.start).sum();
    (record.memfd_len - holes) / record.page_size.bytes()
}

/// Whether the memfd page at byte `offset` is one of the record's holes.
pub(crate) fn in_hole(record: &SourceRecord, offset: u64) -> bool {
    let after = record.holes.partition_point(|h| h.start <= offset);
    after > 0 && record.holes[after - 1].end > offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SyntheticReason;

    fn record(kind: SourceKind, chunks: Vec<ChunkRecord>, len: u64) -> SourceRecord {
        SourceRecord {
            kind,
            page_size: HugePageSize::Huge2M,
            geometry: HugePageSize::Huge2M.geometry(),
            memfd_len: len,
            memfd_id: None,
            chunks,
            holes: Vec::new(),
            request: request_record(&HugetlbConfig::new(len)),
            pool_growth: Vec::new(),
        }
    }

    fn chunk(base: u64, memfd_offset: u64) -> ChunkRecord {
        ChunkRecord {
            base: Pfn(base),
            memfd_offset,
            pfn_kind: PfnKind::Real,
        }
    }

    const M2: u64 = 2 << 20;

    #[test]
    fn tiling_names_the_chunk_that_breaks_it() {
        let good = record(
            SourceKind::Hugetlb,
            vec![chunk(0x400, M2), chunk(0x200, 0)],
            2 * M2,
        );
        check_tiling(&good).unwrap();
        let mut r = good.clone();
        r.chunks[1].memfd_offset = M2;
        assert_eq!(
            check_tiling(&r).unwrap_err().to_string(),
            invalid(Some(1), RecordProblem::MemfdOffset { memfd_offset: M2 }).to_string()
        );
        r.chunks[1].memfd_offset = 4096;
        assert!(matches!(
            check_tiling(&r),
            Err(HugetlbError::InvalidRecord {
                chunk: Some(1),
                problem: RecordProblem::MemfdOffset { memfd_offset: 4096 }
            })
        ));
        r.chunks[1].memfd_offset = 2 * M2;
        assert!(matches!(
            check_tiling(&r),
            Err(HugetlbError::InvalidRecord { chunk: Some(1), .. })
        ));
        let mut r = good.clone();
        r.memfd_len = 3 * M2;
        assert!(matches!(
            check_tiling(&r),
            Err(HugetlbError::InvalidRecord {
                chunk: None,
                problem: RecordProblem::Length { chunks_bytes }
            }) if chunks_bytes == 2 * M2
        ));
    }

    #[test]
    fn pfn_kinds_must_agree_and_fit() {
        let mut r = record(
            SourceKind::Hugetlb,
            vec![chunk(0x200, 0), chunk(0x400, M2)],
            2 * M2,
        );
        assert_eq!(pfn_kind_of(&r, |_| true).unwrap(), PfnKind::Real);
        let shuffled = PfnKind::Synthetic {
            reason: SyntheticReason::Shuffled,
        };
        r.chunks[1].pfn_kind = shuffled;
        assert!(matches!(
            pfn_kind_of(&r, |_| true),
            Err(HugetlbError::InvalidRecord {
                chunk: Some(1),
                problem: RecordProblem::PfnKind { kind }
            }) if kind == shuffled
        ));
        r.chunks[1].pfn_kind = PfnKind::Real;
        assert!(matches!(
            pfn_kind_of(&r, |k| k != PfnKind::Real),
            Err(HugetlbError::InvalidRecord { chunk: Some(0), .. })
        ));
        r.chunks.clear();
        assert!(matches!(
            pfn_kind_of(&r, |_| true),
            Err(HugetlbError::InvalidRecord {
                problem: RecordProblem::NoChunks,
                ..
            })
        ));
    }

    #[test]
    fn holes_are_whole_pages_in_order_inside_the_memfd() {
        let mut r = record(
            SourceKind::Hugetlb,
            vec![chunk(0x200, 0), chunk(0x400, M2), chunk(0x600, 2 * M2)],
            3 * M2,
        );
        r.holes = vec![0..M2, 2 * M2..3 * M2];
        check_holes(&r).unwrap();
        assert_eq!(expected_backed_pages(&r), 1);
        assert!(in_hole(&r, 0) && in_hole(&r, M2 - 1) && in_hole(&r, 2 * M2));
        assert!(!in_hole(&r, M2) && !in_hole(&r, 2 * M2 - 1) && !in_hole(&r, 3 * M2));
        // Each case: a hole that breaks the rules after a good one (or none).
        for bad in [
            (None, 0..4096),
            (None, M2..M2),
            (None, 2 * M2..4 * M2),
            (Some(M2..2 * M2), 0..M2),
            (Some(0..2 * M2), M2..3 * M2),
        ] {
            r.holes = bad.0.clone().into_iter().chain([bad.1.clone()]).collect();
            assert!(
                matches!(
                    check_holes(&r),
                    Err(HugetlbError::InvalidRecord {
                        problem: RecordProblem::Hole { .. },
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn consecutive_bases_and_the_dispatcher_refuses_missing_or_extra_memfds() {
        let r = record(
            SourceKind::Synthetic,
            vec![chunk(0x200, 0), chunk(0x400, M2), chunk(0x600, 2 * M2)],
            0,
        );
        check_consecutive(&r, Pfn(0x200)).unwrap();
        assert!(matches!(
            check_consecutive(&r, Pfn(0)),
            Err(HugetlbError::InvalidRecord { chunk: Some(0), .. })
        ));
        let memfd = MemfdFile::create(HugePageSize::Base4K, 4096).unwrap();
        let fd: OwnedFd = memfd.file.try_clone().unwrap().into();
        assert!(matches!(
            rebuild(&r, Some(fd)),
            Err(HugetlbError::InvalidRecord {
                problem: RecordProblem::UnexpectedMemfd,
                ..
            })
        ));
        let mut r = r;
        r.kind = SourceKind::Hugetlb;
        assert!(matches!(
            rebuild(&r, None),
            Err(HugetlbError::InvalidRecord {
                problem: RecordProblem::MissingMemfd,
                ..
            })
        ));
        assert!(check_kind(&r, SourceKind::Shuffled).is_err());
        assert!(check_kind(&r, SourceKind::Hugetlb).is_ok());
    }
}
