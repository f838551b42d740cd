//! [`HugetlbSource`]: memory from a hugetlb memfd, obtained down the fallback ladder.

use std::ops::Range;
use std::time::Instant;

use memmap2::MmapRaw;
use pfnstore_core::sync::Arc;
use pfnstore_core::{Geometry, Pfn};

use crate::backing::{self, MemfdFile};
use crate::pagemap::{Pagemap, Resolution};
use crate::pool::{self, PoolId, PoolReservation, Sysfs};
use crate::report::{LadderStep, StepFailure, StepKind, Timings};
use crate::{
    Chunk, ChunkIndex, ChunkLocation, HostMapping, HostView, HugePageSize, HugetlbConfig,
    HugetlbError, Memfd, MemorySource, PfnKind, Prefault, SourceReport, SyntheticReason,
};

/// Where synthetic PFNs of a [`HugetlbSource`] start: 2^40 pages (4 PiB), above any real
/// frame, so that a synthetic PFN is recognisable in logs.
pub const SYNTHETIC_PFN_BASE: Pfn = Pfn(1 << 40);

/// Memory from a memfd backed by 1G or 2M hugetlb pages, or by ordinary pages when the
/// ladder fell that far. See the crate docs for the ladder and the PFN rules.
///
/// Dropping the source unmaps its memory, closes its memfd (once every [`HostView`] of it is
/// gone too) and then gives back the pool pages it added.
#[derive(Debug)]
pub struct HugetlbSource {
    chunks: Vec<Chunk>,
    index: ChunkIndex,
    report: SourceReport,
    config: HugetlbConfig,
    page_size: HugePageSize,
    geometry: Geometry,
    sysfs: Sysfs,
    // Field order is drop order: mappings first, then the memfd, then the pool pages.
    segments: Vec<MmapRaw>,
    memfd: Arc<MemfdFile>,
    reservations: Vec<PoolReservation>,
}

/// Memory obtained by one successful step, not yet turned into chunks.
struct Piece {
    map: MmapRaw,
    pfns: Result<Vec<Pfn>, SyntheticReason>,
    reservation: Option<PoolReservation>,
}

impl HugetlbSource {
    /// Obtains `config.bytes` of memory: the preferred page size first, then (unless
    /// `strict`) each smaller one. On failure the error is [`HugetlbError::NoMemory`] with the
    /// report of every step, or a validation error; nothing is left behind either way.
    pub fn new(config: HugetlbConfig) -> Result<HugetlbSource, HugetlbError> {
        HugetlbSource::with_sysfs(config, Sysfs::system())
    }

    /// [`HugetlbSource::new`] reading pools and nodes from `sysfs`.
    pub fn with_sysfs(config: HugetlbConfig, sysfs: Sysfs) -> Result<HugetlbSource, HugetlbError> {
        validate_request(&sysfs, &config, config.page_size.chunk_bytes(), 0)?;
        let mut report = SourceReport {
            requested_bytes: config.bytes,
            preferred: config.page_size,
            strict: config.strict,
            numa_node: config.numa_node,
            prefault: config.prefault,
            steps: Vec::new(),
            obtained: None,
            pfn_kind: None,
            bytes: 0,
            timings: Timings::default(),
        };
        let ladder = std::iter::successors(Some(config.page_size), |s| s.smaller())
            .take(if config.strict { 1 } else { 3 });
        for page_size in ladder {
            let mut step = new_step(StepKind::Create, page_size, config.bytes);
            let mut timings = Timings::default();
            let attempt = (|| {
                let reservation = grow_pool_if_asked(
                    &sysfs,
                    &config,
                    page_size,
                    config.bytes,
                    &mut step,
                    &mut timings,
                )?;
                let t = Instant::now();
                let memfd = MemfdFile::create(page_size, config.bytes)?;
                timings.map += t.elapsed();
                let piece = map_piece(&memfd, 0, config.bytes, &config, reservation, &mut timings)?;
                Ok::<_, HugetlbError>((memfd, piece))
            })();
            match attempt {
                Ok((memfd, piece)) => {
                    step.outcome = Ok(());
                    report.steps.push(step);
                    report.timings = timings;
                    return Ok(HugetlbSource::assemble(
                        config, sysfs, report, page_size, memfd, piece,
                    ));
                }
                Err(e) => {
                    step.outcome = Err(StepFailure::from(&e));
                    report.steps.push(step);
                }
            }
        }
        Err(HugetlbError::NoMemory {
            report: Box::new(report),
        })
    }

    fn assemble(
        config: HugetlbConfig,
        sysfs: Sysfs,
        mut report: SourceReport,
        page_size: HugePageSize,
        memfd: MemfdFile,
        piece: Piece,
    ) -> HugetlbSource {
        let pfn_kind = match &piece.pfns {
            Ok(_) => PfnKind::Real,
            Err(reason) => PfnKind::Synthetic { reason: *reason },
        };
        // Real PFNs are contiguous only within one page; synthetic ones may form chunks of the
        // preferred size.
        let geometry = match pfn_kind {
            PfnKind::Real => page_size.geometry(),
            PfnKind::Synthetic { .. } => config.page_size.geometry(),
        };
        report.obtained = Some(page_size);
        report.pfn_kind = Some(pfn_kind);
        let mut source = HugetlbSource {
            chunks: Vec::new(),
            index: ChunkIndex::default(),
            report,
            config,
            page_size,
            geometry,
            sysfs,
            segments: Vec::new(),
            memfd: Arc::new(memfd),
            reservations: Vec::new(),
        };
        source.add_piece(0, piece);
        source
    }

    /// Turns a piece mapped at memfd byte `offset` into chunks.
    fn add_piece(&mut self, offset: u64, piece: Piece) {
        let chunk_pages = self.geometry.chunk_pages();
        let chunk_bytes = chunk_pages * pfnstore_core::PAGE_SIZE;
        let len = piece.map.len() as u64;
        let addr = piece.map.as_mut_ptr() as usize;
        let (kind, bases): (PfnKind, Vec<Pfn>) = match piece.pfns {
            Ok(pfns) => (PfnKind::Real, pfns),
            Err(reason) => {
                let first = offset / chunk_bytes;
                (
                    PfnKind::Synthetic { reason },
                    (first..first + len / chunk_bytes)
                        .map(|i| Pfn(SYNTHETIC_PFN_BASE.0 + i * chunk_pages))
                        .collect(),
                )
            }
        };
        for (i, base) in bases.into_iter().enumerate() {
            let within = i as u64 * chunk_bytes;
            self.chunks.push(Chunk {
                base,
                pages: chunk_pages,
                page_size: self.page_size,
                pfn_kind: kind,
                memfd_offset: offset + within,
                host: Some(HostMapping::new(
                    addr + within as usize,
                    chunk_bytes as usize,
                )),
            });
        }
        self.index = ChunkIndex::new(&self.chunks);
        self.report.bytes += len;
        self.segments.push(piece.map);
        self.reservations.extend(piece.reservation);
    }

    /// The page size obtained.
    pub fn page_size(&self) -> HugePageSize {
        self.page_size
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.report.bytes
    }

    /// Pool pages this source added (and gives back when dropped).
    pub fn pool_pages_added(&self) -> u64 {
        self.reservations.iter().map(PoolReservation::added).sum()
    }

    /// A second shared mapping of the whole memfd (as large as the source is now), for the
    /// VMM's own accesses: bounds-checked reads and writes, revocation per page, punch-hole.
    pub fn map_view(&self) -> Result<HostView, HugetlbError> {
        HostView::from_memfd(Memfd::owned(&self.memfd, self.report.bytes))
    }

    /// Checks that every chunk's huge page is still at the PFN the source recorded, reading
    /// `/proc/self/pagemap` again; the first chunk found elsewhere is named in
    /// [`HugetlbError::PfnMoved`]. Sources with synthetic PFNs have nothing to check, and pages
    /// punched out (and not written since) are skipped: they have no frame.
    ///
    /// See the crate docs on migration: the kernel can move a hugetlb page (compaction, memory
    /// offlining, a contiguous allocation) while its virtual mappings stay valid, and a PFN
    /// read earlier is then stale. A page written again after a punch-hole is also a new page.
    pub fn verify_pfns(&self) -> Result<(), HugetlbError> {
        if self.report.pfn_kind != Some(PfnKind::Real) {
            return Ok(());
        }
        let pagemap = Pagemap::open()?;
        let page = self.page_size;
        // Holding the holes' read lock keeps pages from being punched while they are checked.
        let holes = self.memfd.holes.read();
        for (i, chunk) in self.chunks.iter().enumerate() {
            if holes.contains(&(chunk.memfd_offset / page.bytes())) {
                continue;
            }
            let host = chunk
                .host
                .expect("a chunk with real PFNs is mapped by its source");
            // The source's own mapping may no longer map the page (punched and written again
            // through a view): map it again, which allocates nothing for a page the file has.
            // SAFETY: MADV_POPULATE_READ only faults pages of our own mapping of this chunk in
            // for reading; it changes no memory, and the page is not a hole (checked above,
            // under the lock), so no page is allocated.
            let rc = unsafe {
                libc::madvise(host.as_ptr().cast(), host.len(), libc::MADV_POPULATE_READ)
            };
            if rc != 0 {
                return Err(HugetlbError::os(
                    "MADV_POPULATE_READ",
                    page,
                    std::io::Error::last_os_error(),
                ));
            }
            match pagemap.resolve(host.as_ptr() as usize, host.len(), page, chunk.memfd_offset)? {
                Resolution::Real(now) if now.first() == Some(&chunk.base) => {}
                Resolution::Real(now) => {
                    return Err(HugetlbError::PfnMoved {
                        chunk: i,
                        memfd_offset: chunk.memfd_offset,
                        recorded: chunk.base,
                        now: now.first().copied().unwrap_or(Pfn(0)),
                    });
                }
                Resolution::Hidden => {
                    return Err(HugetlbError::PfnKindChanged {
                        was: Some(PfnKind::Real),
                        now: PfnKind::Synthetic {
                            reason: SyntheticReason::PagemapHidden,
                        },
                    });
                }
            }
        }
        Ok(())
    }

    /// Obtains `bytes` more of the source's page size at the end of the memfd.
    fn grow_bytes(&mut self, bytes: u64) -> Result<Range<usize>, HugetlbError> {
        let old_len = self.report.bytes;
        let page_size = self.page_size;
        let mut step = new_step(StepKind::Grow, page_size, bytes);
        let mut timings = Timings::default();
        let config = HugetlbConfig {
            bytes,
            ..self.config.clone()
        };
        let attempt = (|| {
            let chunk_bytes = self.geometry.chunk_pages() * pfnstore_core::PAGE_SIZE;
            validate_request(&self.sysfs, &config, chunk_bytes, old_len)?;
            let new_len = old_len.checked_add(bytes).ok_or(HugetlbError::ZeroSize)?;
            let reservation = grow_pool_if_asked(
                &self.sysfs,
                &config,
                page_size,
                bytes,
                &mut step,
                &mut timings,
            )?;
            self.memfd.set_len(new_len)?;
            let piece = map_piece(
                &self.memfd,
                old_len,
                bytes,
                &config,
                reservation,
                &mut timings,
            )
            .inspect_err(|_| {
                // Give the added pages back; the step's error is the one to report.
                let _ = self.memfd.set_len(old_len);
            })?;
            let kind = match &piece.pfns {
                Ok(_) => PfnKind::Real,
                Err(reason) => PfnKind::Synthetic { reason: *reason },
            };
            if Some(kind) != self.report.pfn_kind {
                drop(piece);
                let _ = self.memfd.set_len(old_len);
                return Err(HugetlbError::PfnKindChanged {
                    was: self.report.pfn_kind,
                    now: kind,
                });
            }
            Ok(piece)
        })();
        match attempt {
            Ok(piece) => {
                step.outcome = Ok(());
                self.report.steps.push(step);
                let first = self.chunks.len();
                self.add_piece(old_len, piece);
                Ok(first..self.chunks.len())
            }
            Err(e) => {
                step.outcome = Err(StepFailure::from(&e));
                self.report.steps.push(step);
                Err(e)
            }
        }
    }
}

impl MemorySource for HugetlbSource {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn report(&self) -> &SourceReport {
        &self.report
    }

    fn locate(&self, pfn: Pfn) -> Option<ChunkLocation> {
        self.index.locate(&self.chunks, pfn)
    }

    fn memfd(&self) -> Option<Memfd<'_>> {
        Some(Memfd::owned(&self.memfd, self.report.bytes))
    }

    fn grow(&mut self, chunks: u64) -> Result<Range<usize>, HugetlbError> {
        let chunk_bytes = self.geometry.chunk_pages() * pfnstore_core::PAGE_SIZE;
        let bytes = chunks
            .checked_mul(chunk_bytes)
            .ok_or(HugetlbError::LargerThanMachine {
                bytes: u64::MAX,
                mem_total: self.sysfs.mem_total()?,
            })?;
        self.grow_bytes(bytes)
    }
}

fn new_step(kind: StepKind, page_size: HugePageSize, bytes: u64) -> LadderStep {
    LadderStep {
        kind,
        page_size,
        bytes,
        pool_before: None,
        pool_grown_by: 0,
        outcome: Ok(()),
    }
}

/// Checks a request of `config.bytes` more on top of `held` bytes.
/// `chunk_bytes` is the chunk the size must be a multiple of.
fn validate_request(
    sysfs: &Sysfs,
    config: &HugetlbConfig,
    chunk_bytes: u64,
    held: u64,
) -> Result<(), HugetlbError> {
    if config.bytes == 0 {
        return Err(HugetlbError::ZeroSize);
    }
    if !config.bytes.is_multiple_of(chunk_bytes) {
        return Err(HugetlbError::SizeNotMultiple {
            bytes: config.bytes,
            chunk_bytes,
        });
    }
    let mem_total = sysfs.mem_total()?;
    let total = held.saturating_add(config.bytes);
    if total > mem_total {
        return Err(HugetlbError::LargerThanMachine {
            bytes: total,
            mem_total,
        });
    }
    if let Some(node) = config.numa_node {
        sysfs.check_node(node)?;
    }
    Ok(())
}

/// Reads the pool into the step and, if asked, grows it by what is missing.
fn grow_pool_if_asked(
    sysfs: &Sysfs,
    config: &HugetlbConfig,
    page_size: HugePageSize,
    bytes: u64,
    step: &mut LadderStep,
    timings: &mut Timings,
) -> Result<Option<PoolReservation>, HugetlbError> {
    if !page_size.is_hugetlb() {
        return Ok(None);
    }
    let id = PoolId {
        page_size,
        node: config.numa_node,
    };
    if config.grow_pool {
        // Pages dead processes left in the pool go back before it is measured (best effort:
        // an unreadable ledger shows up when the growth is recorded).
        let _ = pool::reconcile(sysfs);
    }
    let counts = sysfs.read_pool(id)?;
    step.pool_before = Some(counts);
    let needed = bytes / page_size.bytes();
    let missing = needed.saturating_sub(counts.available());
    if missing == 0 || !config.grow_pool {
        // Short pools without grow_pool are left to fail in mmap, so that the report shows
        // the errno the kernel gives.
        return Ok(None);
    }
    let t = Instant::now();
    let reservation = PoolReservation::grow(sysfs, id, missing)?;
    timings.pool_grow += t.elapsed();
    step.pool_grown_by = reservation.added();
    Ok(Some(reservation))
}

/// Maps `bytes` at `offset` of `memfd`, binds, prefaults, locks and resolves them.
fn map_piece(
    memfd: &MemfdFile,
    offset: u64,
    bytes: u64,
    config: &HugetlbConfig,
    reservation: Option<PoolReservation>,
    timings: &mut Timings,
) -> Result<Piece, HugetlbError> {
    let page_size = memfd.page_size;
    // MAP_POPULATE faults before mbind could bind; with a node, population goes through
    // madvise after the bind instead.
    let populate_in_mmap = config.prefault == Prefault::MapPopulate && config.numa_node.is_none();
    let t = Instant::now();
    let map = memfd.map(offset, bytes, populate_in_mmap, false)?;
    timings.map += t.elapsed();
    if let Some(node) = config.numa_node {
        backing::bind_to_node(&map, page_size, node)?;
    }
    let t = Instant::now();
    backing::prefault(&map, page_size, config.prefault, populate_in_mmap)?;
    timings.prefault += t.elapsed();
    if config.mlock {
        backing::lock(&map, page_size)?;
    }
    let pfns = if !page_size.is_hugetlb() {
        Err(SyntheticReason::OrdinaryPages)
    } else if config.prefault == Prefault::None {
        Err(SyntheticReason::NotPrefaulted)
    } else {
        let t = Instant::now();
        let resolution =
            Pagemap::open()?.resolve(map.as_mut_ptr() as usize, map.len(), page_size, offset)?;
        timings.pfn_resolve += t.elapsed();
        match resolution {
            Resolution::Real(pfns) => Ok(pfns),
            Resolution::Hidden => Err(SyntheticReason::PagemapHidden),
        }
    };
    Ok(Piece {
        map,
        pfns,
        reservation,
    })
}
