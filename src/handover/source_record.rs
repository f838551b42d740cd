//! The memory source's record ([`SourceRecord`]) in a snapshot.

use pfnstore_core::{Geometry, PageSize, Pfn};
use pfnstore_hugetlb::pool::PoolId;
use pfnstore_hugetlb::{
    ChunkRecord, GrowthRecord, HugePageSize, PfnKind, Prefault, RequestRecord, SourceKind,
    SourceRecord, SyntheticReason,
};

use super::HandoverError;
use super::codec::{Reader, Writer};

fn page_size_code(size: HugePageSize) -> u8 {
    match size {
        HugePageSize::Base4K => 0,
        HugePageSize::Huge2M => 1,
        HugePageSize::Huge1G => 2,
    }
}

fn page_size_of(code: u8, at: &Reader<'_>) -> Result<HugePageSize, HandoverError> {
    Ok(match code {
        0 => HugePageSize::Base4K,
        1 => HugePageSize::Huge2M,
        2 => HugePageSize::Huge1G,
        other => return Err(at.malformed(format!("page size code {other}"))),
    })
}

fn pfn_kind_code(kind: PfnKind) -> u8 {
    match kind {
        PfnKind::Real => 0,
        PfnKind::Synthetic { reason } => match reason {
            SyntheticReason::NoMemory => 1,
            SyntheticReason::OrdinaryPages => 2,
            SyntheticReason::PagemapHidden => 3,
            SyntheticReason::NotPrefaulted => 4,
            SyntheticReason::Shuffled => 5,
        },
    }
}

fn pfn_kind_of(code: u8, at: &Reader<'_>) -> Result<PfnKind, HandoverError> {
    let reason = match code {
        0 => return Ok(PfnKind::Real),
        1 => SyntheticReason::NoMemory,
        2 => SyntheticReason::OrdinaryPages,
        3 => SyntheticReason::PagemapHidden,
        4 => SyntheticReason::NotPrefaulted,
        5 => SyntheticReason::Shuffled,
        other => return Err(at.malformed(format!("PFN kind code {other}"))),
    };
    Ok(PfnKind::Synthetic { reason })
}

fn option_u32(w: &mut Writer, v: Option<u32>) {
    w.u8(u8::from(v.is_some()));
    w.u32(v.unwrap_or(0));
}

fn read_option_u32(r: &mut Reader<'_>) -> Result<Option<u32>, HandoverError> {
    let some = r.u8()? != 0;
    let v = r.u32()?;
    Ok(some.then_some(v))
}

pub(crate) fn encode(record: &SourceRecord, w: &mut Writer) {
    w.u8(match record.kind {
        SourceKind::Hugetlb => 0,
        SourceKind::Shuffled => 1,
        SourceKind::Synthetic => 2,
    });
    w.u8(page_size_code(record.page_size));
    w.u32(record.geometry.order(PageSize::Size2M));
    w.u32(record.geometry.order(PageSize::Size1G));
    w.u64(record.memfd_len);
    w.u8(u8::from(record.memfd_id.is_some()));
    let (dev, ino) = record.memfd_id.unwrap_or((0, 0));
    w.u64(dev);
    w.u64(ino);
    // Chunks as runs: a chunk that continues the previous one (next PFN base and next memfd
    // offset, same kind) costs nothing more, so a synthetic or well-ordered source is a
    // handful of records however large.
    let chunk_pages = record.geometry.chunk_pages();
    let chunk_bytes = chunk_pages * pfnstore_core::PAGE_SIZE;
    let mut runs: Vec<(ChunkRecord, u64)> = Vec::new();
    for c in &record.chunks {
        match runs.last_mut() {
            Some((first, n))
                if first.pfn_kind == c.pfn_kind
                    && first.base.0 + *n * chunk_pages == c.base.0
                    && first.memfd_offset + *n * chunk_bytes == c.memfd_offset =>
            {
                *n += 1;
            }
            _ => runs.push((*c, 1)),
        }
    }
    w.u64(runs.len() as u64);
    for (c, n) in &runs {
        w.u64(c.base.0);
        w.u64(c.memfd_offset);
        w.u8(pfn_kind_code(c.pfn_kind));
        w.u64(*n);
    }
    w.u64(record.holes.len() as u64);
    for h in &record.holes {
        w.u64(h.start);
        w.u64(h.end);
    }
    let q = &record.request;
    w.u64(q.requested_bytes);
    w.u8(page_size_code(q.preferred));
    w.u8(u8::from(q.strict));
    option_u32(w, q.numa_node);
    w.u8(u8::from(q.grow_pool));
    match q.prefault {
        Prefault::None => {
            w.u8(0);
            w.u64(0);
        }
        Prefault::MapPopulate => {
            w.u8(1);
            w.u64(0);
        }
        Prefault::Threads(n) => {
            w.u8(2);
            w.u64(n as u64);
        }
    }
    w.u8(u8::from(q.mlock));
    w.u64(record.pool_growth.len() as u64);
    for g in &record.pool_growth {
        w.u8(page_size_code(g.pool.page_size));
        option_u32(w, g.pool.node);
        w.u64(g.pages);
        w.bytes(g.ledger_entry.as_bytes());
    }
}

pub(crate) fn decode(r: &mut Reader<'_>) -> Result<SourceRecord, HandoverError> {
    let kind = match r.u8()? {
        0 => SourceKind::Hugetlb,
        1 => SourceKind::Shuffled,
        2 => SourceKind::Synthetic,
        other => return Err(r.malformed(format!("source kind {other}"))),
    };
    let code = r.u8()?;
    let page_size = page_size_of(code, r)?;
    let (mid, chunk) = (r.u32()?, r.u32()?);
    let geometry = Geometry::new(mid, chunk).map_err(|e| r.malformed(e.to_string()))?;
    let memfd_len = r.u64()?;
    let has_id = r.u8()? != 0;
    let id = (r.u64()?, r.u64()?);
    let memfd_id = has_id.then_some(id);
    let chunk_pages = geometry.chunk_pages();
    let chunk_bytes = chunk_pages * pfnstore_core::PAGE_SIZE;
    let runs = r.count(25)?;
    let mut chunks = Vec::new();
    for _ in 0..runs {
        let (base, memfd_offset) = (r.u64()?, r.u64()?);
        let code = r.u8()?;
        let pfn_kind = pfn_kind_of(code, r)?;
        let n = r.u64()?;
        if n == 0 || n > (1 << 24) || chunks.len() as u64 + n > (1 << 24) {
            return Err(r.malformed(format!("a run of {n} chunks")));
        }
        for i in 0..n {
            chunks.push(ChunkRecord {
                base: Pfn(base.saturating_add(i.saturating_mul(chunk_pages))),
                memfd_offset: memfd_offset.saturating_add(i.saturating_mul(chunk_bytes)),
                pfn_kind,
            });
        }
    }
    let holes_n = r.count(16)?;
    let mut holes = Vec::with_capacity(holes_n);
    for _ in 0..holes_n {
        holes.push(r.u64()?..r.u64()?);
    }
    let requested_bytes = r.u64()?;
    let code = r.u8()?;
    let preferred = page_size_of(code, r)?;
    let strict = r.u8()? != 0;
    let numa_node = read_option_u32(r)?;
    let grow_pool = r.u8()? != 0;
    let (code, threads) = (r.u8()?, r.u64()?);
    let prefault = match code {
        0 => Prefault::None,
        1 => Prefault::MapPopulate,
        2 => Prefault::Threads(usize::try_from(threads).unwrap_or(1).max(1)),
        other => return Err(r.malformed(format!("prefault code {other}"))),
    };
    let mlock = r.u8()? != 0;
    let growth_n = r.count(22)?;
    let mut pool_growth = Vec::with_capacity(growth_n);
    for _ in 0..growth_n {
        let code = r.u8()?;
        let page_size = page_size_of(code, r)?;
        let node = read_option_u32(r)?;
        let pages = r.u64()?;
        let name = r.bytes()?;
        let ledger_entry = String::from_utf8(name.to_vec())
            .map_err(|_| r.malformed("a ledger entry name that is not UTF-8"))?;
        pool_growth.push(GrowthRecord {
            pool: PoolId { page_size, node },
            pages,
            ledger_entry,
        });
    }
    Ok(SourceRecord {
        kind,
        page_size,
        geometry,
        memfd_len,
        memfd_id,
        chunks,
        holes,
        request: RequestRecord {
            requested_bytes,
            preferred,
            strict,
            numa_node,
            grow_pool,
            prefault,
            mlock,
        },
        pool_growth,
    })
}
