//! [`HugetlbSource`]: memory from a hugetlb memfd, obtained down the fallback ladder.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::time::Instant;

use memmap2::MmapRaw;
use pfnstore_core::sync::{Arc, Mutex};
use pfnstore_core::{Geometry, Pfn};

use crate::backing::{self, MemfdFile};
use crate::handover::{self, RecordProblem, SourceKind, SourceRecord};
use crate::pagemap::{Pagemap, Resolution};
use crate::pool::{self, PoolId, PoolReservation, Sysfs};
use crate::report::{LadderStep, StepFailure, StepKind, Timings};
use crate::{
    Chunk, ChunkIndex, ChunkLocation, GrowthRecord, HostMapping, HostView, HugePageSize,
    HugetlbConfig, HugetlbError, Memfd, MemorySource, PfnKind, Prefault, SourceReport,
    SyntheticReason,
};

/// Where synthetic PFNs of a [`HugetlbSource`] start: 2^40 pages (4 PiB), above any real
/// frame, so that a synthetic PFN is recognisable in logs.
pub const SYNTHETIC_PFN_BASE: Pfn = Pfn(1 << 40);

/// Memory from a memfd backed by 1G or 2M hugetlb pages, or by ordinary pages when the
/// ladder fell that far. See the crate docs for the ladder and the PFN rules.
///
/// Dropping the source unmaps its memory, closes its memfd (once every [`HostView`] of it is
/// gone too) and then gives back the pool pages it added (none after
/// [`MemorySource::relinquish`]).
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
    /// Locked only to read them and by `relinquish`, which needs `&self` (the store holds a
    /// `Box<dyn MemorySource>`).
    reservations: Mutex<Vec<PoolReservation>>,
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
            reservations: Mutex::new(Vec::new()),
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
        self.reservations.get_mut().extend(piece.reservation);
    }

    /// The page size obtained.
    pub fn page_size(&self) -> HugePageSize {
        self.page_size
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.report.bytes
    }

    /// Pool pages this source added or took over in a rebuild (and gives back when dropped);
    /// 0 after [`MemorySource::relinquish`]. Between another process's adoption and the
    /// relinquish they are still counted here, though dropping the source would give none back
    /// (see [`crate::pool`], "Handing a growth to another process").
    pub fn pool_pages_added(&self) -> u64 {
        self.reservations
            .lock()
            .iter()
            .map(PoolReservation::added)
            .sum()
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
        // Holding the holes' read lock keeps pages from being punched while they are checked.
        let holes = self.memfd.holes.read();
        for (i, chunk) in self.chunks.iter().enumerate() {
            if holes.contains(&(chunk.memfd_offset / self.page_size.bytes())) {
                continue;
            }
            // The source's own mapping may no longer map the page (punched and written again
            // through a view): populating maps it again, which allocates nothing for a page the
            // file has (the page is not a hole: checked above, under the lock).
            check_frame(&pagemap, i, chunk, self.page_size)?;
        }
        Ok(())
    }

    /// Rebuilds a source that another process recorded ([`MemorySource::handover_record`]) from its
    /// memfd, as the receiving side of a handover (see [`crate::handover`]):
    ///
    /// * checks the record against itself (the chunks tile the memfd, all with one PFN kind;
    ///   real PFNs only for hugetlb pages, one page per chunk, aligned; synthetic ones where
    ///   this source puts them; holes whole pages) and against the memfd (page size from
    ///   fstatfs, length and identity from fstat): [`HugetlbError::InvalidRecord`],
    ///   [`HugetlbError::MemfdPageSize`], [`HugetlbError::MemfdLength`],
    ///   [`HugetlbError::WrongMemfd`];
    /// * maps the memfd `MAP_SHARED | MAP_NORESERVE`: the pages are the file's already (the
    ///   holes, like those of views, get no pool reservation). Nothing is copied, zeroed or
    ///   allocated;
    /// * for real PFNs: checks that the memfd holds exactly the pages the record says are
    ///   backed (fstat's block count, which needs no page touched:
    ///   [`HugetlbError::BackedPages`]), maps each backed chunk's page into the page tables
    ///   (`MADV_POPULATE_READ`; a page found missing after all is punched out again,
    ///   [`HugetlbError::PageMissing`]) and reads its PFN from pagemap: one that differs from the
    ///   record is [`HugetlbError::PfnMoved`] naming the first such chunk, PFNs hidden (no
    ///   `CAP_SYS_ADMIN`) are [`HugetlbError::PfnKindChanged`]. Synthetic PFNs are taken as
    ///   recorded and nothing is faulted;
    /// * mlocks the mapping on fault if the source was mlocked (`MLOCK_ONFAULT`: locking
    ///   ordinary pages would fault in the holes);
    /// * last, takes over the pool growth the record lists
    ///   ([`PoolReservation::adopt`]), so that an error before takes nothing over.
    ///
    /// The rebuilt source's report has no ladder steps (they happened in the process that
    /// obtained the memory); its timings are the rebuild's.
    pub fn rebuild(record: &SourceRecord, memfd: OwnedFd) -> Result<HugetlbSource, HugetlbError> {
        HugetlbSource::rebuild_with_sysfs(record, memfd, Sysfs::system())
    }

    /// [`HugetlbSource::rebuild`] with pools, nodes and the ledger from `sysfs`.
    pub fn rebuild_with_sysfs(
        record: &SourceRecord,
        memfd: OwnedFd,
        sysfs: Sysfs,
    ) -> Result<HugetlbSource, HugetlbError> {
        let (pfn_kind, page_size) = check_record(record)?;
        let memfd = handover::adopt_memfd(record, memfd)?;
        let mut timings = Timings::default();
        let t = Instant::now();
        let map = memfd.map(0, record.memfd_len, false, true)?;
        timings.map = t.elapsed();
        if pfn_kind == PfnKind::Real {
            check_frames(record, &memfd, &map, &mut timings)?;
        }
        if record.request.mlock {
            lock_on_fault(&map, page_size)?;
        }
        let reservations = PoolReservation::adopt_all(&sysfs, &record.pool_growth)?;
        let chunk_bytes = record.geometry.chunk_pages() * pfnstore_core::PAGE_SIZE;
        let addr = map.as_mut_ptr() as usize;
        let chunks: Vec<Chunk> = record
            .chunks
            .iter()
            .map(|c| Chunk {
                base: c.base,
                pages: record.geometry.chunk_pages(),
                page_size,
                pfn_kind,
                memfd_offset: c.memfd_offset,
                host: Some(HostMapping::new(
                    addr + c.memfd_offset as usize,
                    chunk_bytes as usize,
                )),
            })
            .collect();
        let request = &record.request;
        let report = SourceReport {
            requested_bytes: request.requested_bytes,
            preferred: request.preferred,
            strict: request.strict,
            numa_node: request.numa_node,
            prefault: request.prefault,
            steps: Vec::new(),
            obtained: Some(page_size),
            pfn_kind: Some(pfn_kind),
            bytes: record.memfd_len,
            timings,
        };
        Ok(HugetlbSource {
            index: ChunkIndex::new(&chunks),
            chunks,
            report,
            config: handover::config_of(request),
            page_size,
            geometry: record.geometry,
            sysfs,
            segments: vec![map],
            memfd,
            reservations: Mutex::new(reservations),
        })
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

impl HugetlbSource {
    /// What another process needs to rebuild this source (see
    /// [`MemorySource::handover_record`]).
    pub fn record(&self) -> SourceRecord {
        let pool_growth = self
            .reservations
            .lock()
            .iter()
            .filter_map(|r| {
                let name = r.ledger_entry()?.file_name()?.to_str()?;
                Some(GrowthRecord {
                    pool: r.pool(),
                    pages: r.added(),
                    ledger_entry: name.to_string(),
                })
            })
            .collect();
        SourceRecord {
            kind: SourceKind::Hugetlb,
            page_size: self.page_size,
            geometry: self.geometry,
            memfd_len: self.report.bytes,
            memfd_id: handover::memfd_identity(&self.memfd),
            chunks: handover::chunk_records(&self.chunks),
            holes: handover::hole_records(&self.memfd),
            request: handover::request_record(&self.config),
            pool_growth,
        }
    }
}

impl MemorySource for HugetlbSource {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn handover_record(&self) -> Option<SourceRecord> {
        Some(self.record())
    }

    fn relinquish(&self) -> Result<(), HugetlbError> {
        let mut reservations = self.reservations.lock();
        PoolReservation::relinquish_all(&self.sysfs, &mut reservations)?;
        reservations.clear();
        Ok(())
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

/// Checks a record of a [`HugetlbSource`] against itself; returns its PFN kind and page size.
fn check_record(record: &SourceRecord) -> Result<(PfnKind, HugePageSize), HugetlbError> {
    handover::check_kind(record, SourceKind::Hugetlb)?;
    let page_size = record.page_size;
    let pfn_kind = handover::pfn_kind_of(record, |kind| match kind {
        PfnKind::Real => page_size.is_hugetlb(),
        PfnKind::Synthetic { reason } => !matches!(
            reason,
            SyntheticReason::NoMemory | SyntheticReason::Shuffled
        ),
    })?;
    let geometry = record.geometry;
    let chunk_pages = geometry.chunk_pages();
    let fits = match pfn_kind {
        PfnKind::Real => geometry == page_size.geometry(),
        PfnKind::Synthetic { .. } => chunk_pages.is_multiple_of(page_size.base_pages()),
    };
    if !fits {
        return Err(handover::invalid(None, RecordProblem::Geometry));
    }
    handover::check_tiling(record)?;
    let chunk_bytes = chunk_pages * pfnstore_core::PAGE_SIZE;
    for (i, c) in record.chunks.iter().enumerate() {
        // This source keeps its chunks in memfd order (`add_piece` appends).
        if c.memfd_offset != i as u64 * chunk_bytes {
            return Err(handover::invalid(
                Some(i),
                RecordProblem::MemfdOffset {
                    memfd_offset: c.memfd_offset,
                },
            ));
        }
        // Real PFNs come from pagemap (aligned, never 0); synthetic ones are where `add_piece`
        // puts them, so that growing goes on from there.
        let in_place = match pfn_kind {
            PfnKind::Real => c.base.0 != 0 && c.base.is_aligned_to(chunk_pages),
            PfnKind::Synthetic { .. } => {
                c.base.0 == SYNTHETIC_PFN_BASE.0 + c.memfd_offset / chunk_bytes * chunk_pages
            }
        };
        if !in_place {
            return Err(handover::invalid(
                Some(i),
                RecordProblem::Base { base: c.base },
            ));
        }
    }
    Ok((pfn_kind, page_size))
}

/// For a record with real PFNs (one huge page per chunk): checks that the memfd holds the
/// pages the record says are backed, faults each backed chunk's page into `map`'s page tables
/// and checks its PFN.
fn check_frames(
    record: &SourceRecord,
    memfd: &MemfdFile,
    map: &MmapRaw,
    timings: &mut Timings,
) -> Result<(), HugetlbError> {
    let page_size = record.page_size;
    let expected = handover::expected_backed_pages(record);
    let mut backed = handover::backed_pages(memfd)?;
    if backed != expected {
        return Err(HugetlbError::BackedPages {
            expected,
            found: backed,
        });
    }
    let pagemap = Pagemap::open()?;
    let page = page_size.bytes();
    let addr = map.as_mut_ptr() as usize;
    for (i, c) in record.chunks.iter().enumerate() {
        if handover::in_hole(record, c.memfd_offset) {
            continue;
        }
        let chunk = Chunk {
            base: c.base,
            pages: page_size.base_pages(),
            page_size,
            pfn_kind: PfnKind::Real,
            memfd_offset: c.memfd_offset,
            host: Some(HostMapping::new(
                addr + c.memfd_offset as usize,
                page as usize,
            )),
        };
        let t = Instant::now();
        populate_read(&chunk, page_size)?;
        timings.prefault += t.elapsed();
        // The page count was right, yet this page was missing (another was written where the
        // record has a hole): populating took a page from the pool. Give it back.
        let now = handover::backed_pages(memfd)?;
        if now != backed {
            let _ = memfd.punch_hole(c.memfd_offset, page);
            return Err(HugetlbError::PageMissing {
                chunk: i,
                memfd_offset: c.memfd_offset,
            });
        }
        backed = now;
        let t = Instant::now();
        check_frame_populated(&pagemap, i, &chunk, page_size)?;
        timings.pfn_resolve += t.elapsed();
    }
    Ok(())
}

/// Maps a chunk's page into its host mapping for reading: for a page the file has, this
/// allocates nothing.
fn populate_read(chunk: &Chunk, page_size: HugePageSize) -> Result<(), HugetlbError> {
    let host = chunk
        .host
        .expect("a chunk with real PFNs is mapped by its source");
    // SAFETY: MADV_POPULATE_READ only faults pages of our own mapping of this chunk in for
    // reading; it changes no memory. Callers make sure the page is not a hole.
    let rc = unsafe { libc::madvise(host.as_ptr().cast(), host.len(), libc::MADV_POPULATE_READ) };
    if rc != 0 {
        return Err(HugetlbError::os(
            "MADV_POPULATE_READ",
            page_size,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Checks that chunk `index`'s huge page is at the PFN recorded, faulting it in first (the
/// page must not be a hole).
fn check_frame(
    pagemap: &Pagemap,
    index: usize,
    chunk: &Chunk,
    page_size: HugePageSize,
) -> Result<(), HugetlbError> {
    populate_read(chunk, page_size)?;
    check_frame_populated(pagemap, index, chunk, page_size)
}

/// Checks that chunk `index`'s huge page, mapped, is at the PFN recorded.
fn check_frame_populated(
    pagemap: &Pagemap,
    index: usize,
    chunk: &Chunk,
    page_size: HugePageSize,
) -> Result<(), HugetlbError> {
    let host = chunk
        .host
        .expect("a chunk with real PFNs is mapped by its source");
    match pagemap.huge_page_pfn(host.as_ptr() as usize, page_size, chunk.memfd_offset)? {
        Some(now) if now == chunk.base => Ok(()),
        Some(now) => Err(HugetlbError::PfnMoved {
            chunk: index,
            memfd_offset: chunk.memfd_offset,
            recorded: chunk.base,
            now,
        }),
        None => Err(HugetlbError::PfnKindChanged {
            was: Some(PfnKind::Real),
            now: PfnKind::Synthetic {
                reason: SyntheticReason::PagemapHidden,
            },
        }),
    }
}

/// mlock2(MLOCK_ONFAULT): pages are locked as they are faulted in, none is faulted now.
fn lock_on_fault(map: &MmapRaw, page_size: HugePageSize) -> Result<(), HugetlbError> {
    // SAFETY: mlock2 changes the locking of our own mapping [ptr, ptr + len), which no Rust
    // reference covers; it reads and writes no memory.
    let rc = unsafe { libc::mlock2(map.as_mut_ptr().cast(), map.len(), libc::MLOCK_ONFAULT) };
    if rc != 0 {
        return Err(HugetlbError::os(
            "mlock",
            page_size,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
