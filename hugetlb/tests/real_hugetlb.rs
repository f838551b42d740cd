//! Tests on the real hugetlb pools of this machine. Each holds the hugetlb lock, reserves at
//! most 2 GiB, and leaves the pools as it found them (guards restore them on panic too).
//! Without root or hugetlb they report themselves skipped.
#![cfg(not(pfnstore_loom))]

use pfnstore_core::{PAGE_SIZE, Pfn};
use pfnstore_hugetlb::pagemap::{Pagemap, Resolution};
use pfnstore_hugetlb::pool::{PoolCounts, PoolId, PoolReservation, Sysfs};
use pfnstore_hugetlb::testing::{HugetlbLock, can_reserve, hugetlb_lock};
use pfnstore_hugetlb::{
    HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource, MEMFD_NAME_PREFIX, MemorySource,
    PfnKind, Prefault, Protection, SYNTHETIC_PFN_BASE, StepKind, SyntheticReason,
};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

fn pool(page_size: HugePageSize) -> PoolId {
    PoolId {
        page_size,
        node: None,
    }
}

fn counts(page_size: HugePageSize) -> PoolCounts {
    Sysfs::system().read_pool(pool(page_size)).unwrap()
}

/// Mappings and descriptors of pfnstore memfds in this process. Only tests holding the hugetlb
/// lock create memfds, so under the lock this is what the current test left behind.
fn leftovers() -> usize {
    let name = format!("memfd:{MEMFD_NAME_PREFIX}");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mapped = maps.lines().filter(|l| l.contains(&name)).count();
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains(&name)))
        .count();
    mapped + fds
}

/// The lock, if this machine lets us resize the pools of `sizes`; otherwise the test is
/// reported skipped.
fn require(test: &str, sizes: &[HugePageSize]) -> Option<HugetlbLock> {
    let lock = hugetlb_lock();
    for size in sizes {
        if let Err(why) = can_reserve(*size) {
            pfnstore_core::testing::skip(test, &why);
            return None;
        }
    }
    Some(lock)
}

fn config(bytes: u64, page_size: HugePageSize) -> HugetlbConfig {
    HugetlbConfig::new(bytes)
        .with_page_size(page_size)
        .with_strict(true)
        .with_grow_pool(true)
        .with_prefault(Prefault::Threads(2))
}

/// Sets both hugetlb pools to zero pages for the guard's lifetime.
fn empty_pools() -> [PoolReservation; 2] {
    let sysfs = Sysfs::system();
    [HugePageSize::Huge1G, HugePageSize::Huge2M].map(|s| {
        let (guard, got) = PoolReservation::set_total(&sysfs, pool(s), 0).unwrap();
        assert_eq!(
            got, 0,
            "another user holds {s} pages; cannot empty the pool"
        );
        guard
    })
}

/// Checks what a source of real hugetlb pages must satisfy: PFNs aligned, distinct, and the
/// same as pagemap says for a second mapping (the view).
fn check_real_chunks(source: &HugetlbSource, page_size: HugePageSize) {
    let chunks = source.chunks();
    assert_eq!(source.report().pfn_kind, Some(PfnKind::Real));
    assert_eq!(source.geometry().chunk_pages(), page_size.base_pages());
    let mut bases: Vec<Pfn> = chunks.iter().map(|c| c.base).collect();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.pfn_kind, PfnKind::Real);
        assert_eq!(c.page_size, page_size);
        assert_eq!(c.pages, page_size.base_pages());
        assert_eq!(c.memfd_offset, i as u64 * page_size.bytes());
        assert!(c.base.is_aligned_to(page_size.base_pages()), "{:?}", c.base);
        assert_ne!(c.base, Pfn(0));
        let loc = source.locate(Pfn(c.base.0 + 3)).unwrap();
        assert_eq!((loc.chunk, loc.page_offset), (i, 3));
        assert_eq!(loc.memfd_offset, c.memfd_offset + 3 * PAGE_SIZE);
    }
    bases.sort_unstable();
    bases.dedup();
    assert_eq!(bases.len(), chunks.len(), "two chunks share a PFN");
}

/// Writes through one view, reads through another and through the source's own mapping.
fn check_views_share_bytes(source: &HugetlbSource) {
    let a = source.map_view().unwrap();
    let b = source.map_view().unwrap();
    assert_eq!(a.len(), source.bytes());
    let last = source.bytes() - 8;
    for (i, offset) in [0, 4096, source.bytes() / 2 + 17, last]
        .into_iter()
        .enumerate()
    {
        let value = 0x5eed_0000_0000_0000u64 + i as u64;
        a.write(offset, &value.to_le_bytes()).unwrap();
        let mut back = [0u8; 8];
        b.read(offset, &mut back).unwrap();
        assert_eq!(u64::from_le_bytes(back), value, "view b at {offset:#x}");
        let loc_chunk = &source.chunks()[(offset / source.chunks()[0].bytes()) as usize];
        let host = loc_chunk.host.unwrap();
        let within = (offset - loc_chunk.memfd_offset) as usize;
        assert!(within + 8 <= host.len());
        // SAFETY: `host` is the source's live mapping of this chunk (the source outlives this
        // read), `within + 8` is inside it, and the page is populated and not revoked there.
        let primary = unsafe { host.as_ptr().add(within).cast::<u64>().read_unaligned() };
        assert_eq!(primary, value, "primary mapping at {offset:#x}");
    }
    // pagemap through the view agrees with the chunks' PFNs (view pages are faulted now).
    let page = source.page_size();
    let stride = page.bytes();
    let pagemap = Pagemap::open().unwrap();
    for (i, c) in source.chunks().iter().enumerate() {
        // Touch every 4K page of the chunk in view b, so that all its entries are present.
        let mut buf = vec![0u8; stride as usize];
        b.read(c.memfd_offset, &mut buf).unwrap();
        let addr = b.as_ptr() as usize + c.memfd_offset as usize;
        let r = pagemap
            .resolve(addr, stride as usize, page, c.memfd_offset)
            .unwrap();
        assert_eq!(r, Resolution::Real(vec![c.base]), "chunk {i}");
    }
}

#[test]
fn two_1g_pages_real_pfns_two_views_pool_restored() {
    let Some(_lock) = require(
        "two_1g_pages_real_pfns_two_views_pool_restored",
        &[HugePageSize::Huge1G],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge1G);
    {
        let source = HugetlbSource::new(config(2 * GIB, HugePageSize::Huge1G)).unwrap();
        assert_eq!(source.report().obtained, Some(HugePageSize::Huge1G));
        assert_eq!(source.chunks().len(), 2);
        check_real_chunks(&source, HugePageSize::Huge1G);
        check_views_share_bytes(&source);
        let grown = source.pool_pages_added();
        assert_eq!(
            counts(HugePageSize::Huge1G).total,
            before.total + grown,
            "the source keeps what it added"
        );
        assert_eq!(grown, 2u64.saturating_sub(before.available()));
        println!("{}", source.report());
    }
    assert_eq!(counts(HugePageSize::Huge1G), before, "pool restored");
    assert_eq!(leftovers(), 0);
}

/// Punches page `index` of a source of `page_size` pages and checks it went back to the pool,
/// reads as zeros, and comes back from the pool when written.
fn check_punch_hole(page_size: HugePageSize, pages: u64) {
    let source = HugetlbSource::new(config(pages * page_size.bytes(), page_size)).unwrap();
    check_real_chunks(&source, page_size);
    let view = source.map_view().unwrap();
    let page = page_size.bytes();
    let offset = page; // the second page
    view.write(offset + 100, b"before the punch").unwrap();
    view.write(0, b"first page stays").unwrap();
    let free_before = counts(page_size).free;
    view.punch_hole(offset, page).unwrap();
    assert_eq!(
        counts(page_size).free,
        free_before + 1,
        "the punched page is back in the pool"
    );
    assert!(view.is_hole(offset));
    let mut buf = [0xffu8; 16];
    view.read(offset + 100, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 16], "a hole reads as zeros");
    view.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"first page stays");
    // Writing takes a page from the pool again, zeroed except for what was written.
    view.write(offset + 8, b"again").unwrap();
    assert!(!view.is_hole(offset));
    assert_eq!(counts(page_size).free, free_before);
    let mut again = [0xffu8; 24];
    view.read(offset, &mut again).unwrap();
    assert_eq!(&again[8..13], b"again");
    assert!(again[..8].iter().chain(&again[13..]).all(|b| *b == 0));
    // Bad ranges are refused.
    assert!(matches!(
        view.punch_hole(offset + 4096, page),
        Err(HugetlbError::NotPageAligned { .. })
    ));
    assert!(matches!(
        view.punch_hole(source.bytes(), page),
        Err(HugetlbError::OutOfBounds { .. })
    ));
}

#[test]
fn punching_a_1g_page_returns_it_to_the_pool() {
    let Some(_lock) = require(
        "punching_a_1g_page_returns_it_to_the_pool",
        &[HugePageSize::Huge1G],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge1G);
    check_punch_hole(HugePageSize::Huge1G, 2);
    assert_eq!(counts(HugePageSize::Huge1G), before);
    assert_eq!(leftovers(), 0);
}

#[test]
fn huge_2m_pages_real_pfns_views_and_punch_hole() {
    let Some(_lock) = require(
        "huge_2m_pages_real_pfns_views_and_punch_hole",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge2M);
    {
        let source = HugetlbSource::new(config(8 * MIB2, HugePageSize::Huge2M)).unwrap();
        assert_eq!(source.chunks().len(), 8);
        check_real_chunks(&source, HugePageSize::Huge2M);
        check_views_share_bytes(&source);
    }
    check_punch_hole(HugePageSize::Huge2M, 4);
    assert_eq!(counts(HugePageSize::Huge2M), before);
    assert_eq!(leftovers(), 0);
}

#[test]
fn empty_pools_fall_back_to_ordinary_memory_and_say_why() {
    let Some(_lock) = require(
        "empty_pools_fall_back_to_ordinary_memory_and_say_why",
        &[HugePageSize::Huge1G, HugePageSize::Huge2M],
    ) else {
        return;
    };
    let _empty = empty_pools();
    let source = HugetlbSource::new(
        config(GIB, HugePageSize::Huge1G)
            .with_strict(false)
            .with_grow_pool(false),
    )
    .unwrap();
    let report = source.report();
    let steps: Vec<_> = report
        .steps
        .iter()
        .map(|s| (s.page_size, s.outcome.as_ref().err().and_then(|e| e.errno)))
        .collect();
    assert_eq!(
        steps,
        vec![
            (HugePageSize::Huge1G, Some(libc::ENOMEM)),
            (HugePageSize::Huge2M, Some(libc::ENOMEM)),
            (HugePageSize::Base4K, None),
        ]
    );
    assert!(report.steps[2].outcome.is_ok());
    assert_eq!(report.steps[0].pool_before.map(|p| p.total), Some(0));
    assert_eq!(report.obtained, Some(HugePageSize::Base4K));
    assert_eq!(
        report.pfn_kind,
        Some(PfnKind::Synthetic {
            reason: SyntheticReason::OrdinaryPages
        })
    );
    let text = report.to_string();
    assert!(
        text.contains("errno 12") && text.contains("set nr_hugepages"),
        "{text}"
    );
    // Ordinary memory: one 1 GiB chunk of synthetic PFNs, still readable and writable.
    assert_eq!(source.chunks().len(), 1);
    assert_eq!(source.chunks()[0].base, SYNTHETIC_PFN_BASE);
    let view = source.map_view().unwrap();
    view.write(GIB - 5, b"tail!").unwrap();
    let mut b = [0u8; 5];
    view.read(GIB - 5, &mut b).unwrap();
    assert_eq!(&b, b"tail!");
}

#[test]
fn strict_mode_fails_typed_and_leaves_nothing_behind() {
    let Some(_lock) = require(
        "strict_mode_fails_typed_and_leaves_nothing_behind",
        &[HugePageSize::Huge1G, HugePageSize::Huge2M],
    ) else {
        return;
    };
    let _empty = empty_pools();
    let before = (counts(HugePageSize::Huge1G), counts(HugePageSize::Huge2M));
    for page_size in [HugePageSize::Huge1G, HugePageSize::Huge2M] {
        let err = HugetlbSource::new(config(GIB, page_size).with_grow_pool(false)).unwrap_err();
        let HugetlbError::NoMemory { report } = &err else {
            panic!("expected NoMemory, got {err:?}");
        };
        assert_eq!(report.steps.len(), 1, "strict tries one rung");
        assert_eq!(
            report.steps[0].outcome.as_ref().unwrap_err().errno,
            Some(libc::ENOMEM)
        );
        assert!(
            err.to_string().contains("hint: run as root with grow_pool"),
            "{err}"
        );
        assert_eq!(report.obtained, None);
    }
    assert_eq!(leftovers(), 0);
    assert_eq!(
        (counts(HugePageSize::Huge1G), counts(HugePageSize::Huge2M)),
        before
    );
}

#[test]
fn bad_input_is_typed_and_leaves_nothing_behind() {
    let Some(_lock) = require(
        "bad_input_is_typed_and_leaves_nothing_behind",
        &[HugePageSize::Huge1G],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge1G);
    let try_new = |c: HugetlbConfig| HugetlbSource::new(c).unwrap_err();
    assert!(matches!(
        try_new(config(0, HugePageSize::Huge1G)),
        HugetlbError::ZeroSize
    ));
    assert!(matches!(
        try_new(config(GIB + MIB2, HugePageSize::Huge1G)),
        HugetlbError::SizeNotMultiple {
            bytes,
            chunk_bytes: GIB
        } if bytes == GIB + MIB2
    ));
    assert!(matches!(
        try_new(config(3 << 20, HugePageSize::Huge2M)),
        HugetlbError::SizeNotMultiple { .. }
    ));
    let mem_total = Sysfs::system().mem_total().unwrap();
    let too_big = (mem_total / GIB + 1) * GIB;
    assert!(matches!(
        try_new(config(too_big, HugePageSize::Huge1G)),
        HugetlbError::LargerThanMachine { bytes, .. } if bytes == too_big
    ));
    assert!(matches!(
        try_new(config(GIB, HugePageSize::Huge1G).with_numa_node(Some(4095))),
        HugetlbError::UnknownNumaNode { node: 4095, .. }
    ));
    assert_eq!(counts(HugePageSize::Huge1G), before);
    assert_eq!(leftovers(), 0);
}

#[test]
fn a_pool_that_shrank_after_it_was_read_is_a_typed_error() {
    // sysfs (a copy) says pages are free; the kernel's pool is empty by the time of mmap.
    let Some(_lock) = require(
        "a_pool_that_shrank_after_it_was_read_is_a_typed_error",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let _empty = empty_pools();
    let dir = std::env::temp_dir().join(format!("pfnstore-shrunk-{}", std::process::id()));
    let pool_dir = dir.join("sys/kernel/mm/hugepages/hugepages-2048kB");
    std::fs::create_dir_all(&pool_dir).unwrap();
    std::fs::create_dir_all(dir.join("proc")).unwrap();
    for (f, v) in [
        ("nr_hugepages", 4),
        ("free_hugepages", 4),
        ("resv_hugepages", 0),
        ("surplus_hugepages", 0),
    ] {
        std::fs::write(pool_dir.join(f), format!("{v}\n")).unwrap();
    }
    std::fs::copy("/proc/meminfo", dir.join("proc/meminfo")).unwrap();
    let stale = Sysfs::at(dir.join("sys"), dir.join("proc"));
    let err = HugetlbSource::with_sysfs(config(4 * MIB2, HugePageSize::Huge2M), stale).unwrap_err();
    let HugetlbError::NoMemory { report } = &err else {
        panic!("expected NoMemory, got {err:?}");
    };
    let step = &report.steps[0];
    assert_eq!(step.pool_before.map(|p| p.free), Some(4));
    assert_eq!(step.pool_grown_by, 0, "the stale pool looked big enough");
    assert_eq!(step.outcome.as_ref().unwrap_err().errno, Some(libc::ENOMEM));
    assert_eq!(leftovers(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn growing_a_source_adds_chunks_and_gives_the_pages_back() {
    let Some(_lock) = require(
        "growing_a_source_adds_chunks_and_gives_the_pages_back",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge2M);
    {
        let mut source = HugetlbSource::new(config(2 * MIB2, HugePageSize::Huge2M)).unwrap();
        let view = source.map_view().unwrap();
        view.write(10, b"old").unwrap();
        assert_eq!(source.grow(3).unwrap(), 2..5);
        check_real_chunks(&source, HugePageSize::Huge2M);
        assert_eq!(source.bytes(), 5 * MIB2);
        assert_eq!(source.report().steps.last().unwrap().kind, StepKind::Grow);
        let bigger = source.map_view().unwrap();
        let mut b = [0u8; 3];
        bigger.read(10, &mut b).unwrap();
        assert_eq!(&b, b"old");
        bigger.write(4 * MIB2, b"new").unwrap();
        assert!(matches!(source.grow(0), Err(HugetlbError::ZeroSize)));
        // Without pool growth and with no free pages, a grow fails and changes nothing.
        let _one = PoolReservation::grow(&Sysfs::system(), pool(HugePageSize::Huge2M), 1).unwrap();
        let mut fixed =
            HugetlbSource::new(config(MIB2, HugePageSize::Huge2M).with_grow_pool(false)).unwrap();
        let chunks = fixed.chunks().to_vec();
        let maps_before = leftovers();
        let err = fixed.grow(1).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOMEM), "{err}");
        assert_eq!(fixed.chunks(), &chunks[..]);
        assert_eq!(fixed.bytes(), MIB2);
        assert_eq!(leftovers(), maps_before);
        assert!(fixed.report().steps.last().unwrap().outcome.is_err());
    }
    assert_eq!(counts(HugePageSize::Huge2M), before);
    assert_eq!(leftovers(), 0);
}

#[test]
fn revoking_a_page_from_one_view_leaves_the_other_alone() {
    let Some(_lock) = require(
        "revoking_a_page_from_one_view_leaves_the_other_alone",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let source = HugetlbSource::new(config(4 * MIB2, HugePageSize::Huge2M)).unwrap();
    let a = source.map_view().unwrap();
    let b = source.map_view().unwrap();
    a.write(MIB2 + 1, b"x").unwrap();
    a.protect(MIB2, 2 * MIB2, Protection::None).unwrap();
    assert!(a.is_revoked(MIB2) && a.is_revoked(3 * MIB2 - 1) && !a.is_revoked(3 * MIB2));
    let mut byte = [0u8; 1];
    // A read that starts before the revoked pages and runs into them fails as a whole.
    let mut two = [0u8; 2];
    assert!(matches!(
        a.read(MIB2 - 1, &mut two),
        Err(HugetlbError::Revoked { offset }) if offset == MIB2
    ));
    assert!(matches!(
        a.write(2 * MIB2, b"y"),
        Err(HugetlbError::Revoked { .. })
    ));
    assert!(matches!(a.zero(MIB2, 1), Err(HugetlbError::Revoked { .. })));
    a.read(3 * MIB2, &mut byte).unwrap();
    b.read(MIB2 + 1, &mut byte).unwrap();
    assert_eq!(&byte, b"x", "the other view still reads the page");
    assert!(matches!(
        a.protect(MIB2 + 4096, MIB2, Protection::None),
        Err(HugetlbError::NotPageAligned { .. })
    ));
    assert!(matches!(
        a.protect(0, 0, Protection::None),
        Err(HugetlbError::NotPageAligned { .. })
    ));
    assert!(matches!(
        a.read(4 * MIB2 - 1, &mut two),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    assert!(matches!(
        a.read(u64::MAX, &mut two),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    a.protect(MIB2, MIB2, Protection::ReadWrite).unwrap();
    a.read(MIB2 + 1, &mut byte).unwrap();
    assert_eq!(&byte, b"x");
    a.zero(MIB2, MIB2).unwrap();
    b.read(MIB2 + 1, &mut byte).unwrap();
    assert_eq!(byte, [0]);
    assert!(a.is_revoked(2 * MIB2));
}

#[test]
fn a_numa_node_uses_and_restores_the_nodes_pool() {
    let Some(_lock) = require(
        "a_numa_node_uses_and_restores_the_nodes_pool",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let sysfs = Sysfs::system();
    let node = sysfs.numa_nodes().unwrap()[0];
    let id = PoolId {
        page_size: HugePageSize::Huge2M,
        node: Some(node),
    };
    if !sysfs.pool_dir(id).unwrap().is_dir() {
        pfnstore_core::testing::skip(
            "a_numa_node_uses_and_restores_the_nodes_pool",
            "no per-node hugetlb pools (kernel without NUMA)",
        );
        return;
    }
    let before = sysfs.read_pool(id).unwrap();
    for prefault in [Prefault::MapPopulate, Prefault::Threads(2)] {
        let source = HugetlbSource::new(
            config(4 * MIB2, HugePageSize::Huge2M)
                .with_numa_node(Some(node))
                .with_prefault(prefault),
        )
        .unwrap();
        check_real_chunks(&source, HugePageSize::Huge2M);
        let grown = source.report().steps[0].pool_grown_by;
        assert_eq!(grown, 4u64.saturating_sub(before.free));
        assert_eq!(sysfs.read_pool(id).unwrap().total, before.total + grown);
    }
    // Pages the kernel has not finished freeing when a source is dropped are given back by its
    // guardian as they come free: wait for that (bounded), not for a fixed moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sysfs.read_pool(id).unwrap() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(sysfs.read_pool(id).unwrap(), before);
    assert_eq!(leftovers(), 0);
}

#[test]
fn every_prefault_mode_and_mlock() {
    let Some(_lock) = require("every_prefault_mode_and_mlock", &[HugePageSize::Huge2M]) else {
        return;
    };
    for prefault in [
        Prefault::MapPopulate,
        Prefault::Threads(1),
        Prefault::Threads(3),
    ] {
        let source = HugetlbSource::new(
            config(6 * MIB2, HugePageSize::Huge2M)
                .with_prefault(prefault)
                .with_mlock(true),
        )
        .unwrap();
        check_real_chunks(&source, HugePageSize::Huge2M);
    }
    let lazy =
        HugetlbSource::new(config(2 * MIB2, HugePageSize::Huge2M).with_prefault(Prefault::None))
            .unwrap();
    assert_eq!(
        lazy.report().pfn_kind,
        Some(PfnKind::Synthetic {
            reason: SyntheticReason::NotPrefaulted
        })
    );
    assert_eq!(lazy.chunks()[0].base, SYNTHETIC_PFN_BASE);
    drop(lazy);
    assert_eq!(leftovers(), 0);
}

/// Linux capability numbers used below.
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs `f` on a new thread whose effective capabilities lack `caps` and whose filesystem uid
/// is `fsuid`. Credentials are per thread in Linux (raw syscalls, not glibc's process-wide
/// wrappers), so the rest of the test process keeps root.
fn on_thread_without<T: Send>(caps: &[u32], fsuid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut header = CapHeader {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            // SAFETY: capget writes two CapData records (version 3) into `data` and reads
            // `header`; both live on this stack frame for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_capget,
                    &mut header as *mut CapHeader,
                    data.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
            for cap in caps {
                data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
            }
            // SAFETY: as for capget; capset reads the records and changes only this thread's
            // credentials.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_capset,
                    &mut header as *mut CapHeader,
                    data.as_ptr(),
                )
            };
            assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
            if fsuid != 0 {
                // SAFETY: setfsuid changes this thread's filesystem uid; no memory is involved.
                unsafe { libc::syscall(libc::SYS_setfsuid, fsuid) };
            }
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn without_cap_sys_admin_pfns_are_synthetic_and_say_so() {
    let Some(_lock) = require(
        "without_cap_sys_admin_pfns_are_synthetic_and_say_so",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let _pages = PoolReservation::grow(&Sysfs::system(), pool(HugePageSize::Huge2M), 2).unwrap();
    let source = on_thread_without(&[CAP_SYS_ADMIN], 0, || {
        HugetlbSource::new(config(2 * MIB2, HugePageSize::Huge2M).with_grow_pool(false))
    })
    .unwrap();
    let hidden = PfnKind::Synthetic {
        reason: SyntheticReason::PagemapHidden,
    };
    assert_eq!(source.report().pfn_kind, Some(hidden));
    assert!(source.report().to_string().contains("CAP_SYS_ADMIN"));
    let bases: Vec<Pfn> = source.chunks().iter().map(|c| c.base).collect();
    assert_eq!(
        bases,
        vec![SYNTHETIC_PFN_BASE, Pfn(SYNTHETIC_PFN_BASE.0 + 512)]
    );
    assert!(source.chunks().iter().all(|c| c.pfn_kind == hidden));
    drop(source);
    assert_eq!(leftovers(), 0);
}

#[test]
fn os_refusals_are_typed_errors_with_hints() {
    let Some(_lock) = require(
        "os_refusals_are_typed_errors_with_hints",
        &[HugePageSize::Huge2M],
    ) else {
        return;
    };
    let before = counts(HugePageSize::Huge2M);
    // A process that may not write sysfs: EACCES, hint to run as root.
    let err = on_thread_without(&[], 65534, || {
        PoolReservation::grow(&Sysfs::system(), pool(HugePageSize::Huge2M), 1).unwrap_err()
    });
    assert_eq!(err.errno(), Some(libc::EACCES), "{err}");
    assert!(
        err.to_string().contains("run as root or set nr_hugepages"),
        "{err}"
    );
    // The same inside a source: the step fails with that errno, strict mode gives up.
    let err = on_thread_without(&[], 65534, || {
        HugetlbSource::new(config(GIB, HugePageSize::Huge2M)).unwrap_err()
    });
    let HugetlbError::NoMemory { report } = &err else {
        panic!("expected NoMemory, got {err:?}");
    };
    assert_eq!(
        report.steps[0].outcome.as_ref().unwrap_err().errno,
        Some(libc::EACCES)
    );
    // mlock beyond RLIMIT_MEMLOCK without CAP_IPC_LOCK: ENOMEM or EPERM, hint to raise it.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which lives across the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    assert_eq!(rc, 0);
    if limit.rlim_cur < GIB {
        let err = on_thread_without(&[CAP_IPC_LOCK], 0, || {
            HugetlbSource::new(config(GIB, HugePageSize::Base4K).with_mlock(true)).unwrap_err()
        });
        let HugetlbError::NoMemory { report } = &err else {
            panic!("expected NoMemory, got {err:?}");
        };
        let failure = report.steps[0].outcome.as_ref().unwrap_err();
        assert!(
            matches!(failure.errno, Some(libc::ENOMEM | libc::EPERM)),
            "{failure:?}"
        );
        assert!(
            failure.message.contains("RLIMIT_MEMLOCK"),
            "{}",
            failure.message
        );
    }
    assert_eq!(counts(HugePageSize::Huge2M), before);
    assert_eq!(leftovers(), 0);
}

/// The environment variable that makes `guardian_child` the child of a death test: the page
/// size (`1G` or `2M`), the pages to ask for, and how to die (`kill`: wait for SIGKILL;
/// `exit`: `std::process::exit` without dropping anything), as `1G:1:kill`.
const GUARDIAN_CHILD: &str = "PFNSTORE_GUARDIAN_CHILD";

/// The child of the death tests (run in a child process by them, never on its own): grows the
/// pool through a source, says how much, and dies as told without dropping the source. It does
/// not take the hugetlb lock: its parent holds it for it.
#[test]
#[ignore = "run in a child process by the pool_growth_is_given_back_* tests"]
fn guardian_child() {
    let spec = std::env::var(GUARDIAN_CHILD).expect("run by a death test");
    let parts: Vec<&str> = spec.split(':').collect();
    let page_size = match parts[0] {
        "1G" => HugePageSize::Huge1G,
        _ => HugePageSize::Huge2M,
    };
    let pages: u64 = parts[1].parse().unwrap();
    let source = HugetlbSource::new(config(pages * page_size.bytes(), page_size)).unwrap();
    println!("grown {}", source.pool_pages_added());
    if parts[2] == "exit" {
        std::process::exit(0);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A child process that is killed if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `guardian_child` in a child process that grows the pool of `page_size` and dies
/// (`how`), and checks that the pool returns to its size before, with nothing left owed.
fn pool_growth_is_given_back_when_the_owner_dies(test: &str, page_size: HugePageSize, how: &str) {
    use std::io::BufRead;
    let Some(_lock) = require(test, &[page_size]) else {
        return;
    };
    let before = counts(page_size);
    // The child asks for one page more than is free, so that it must grow the pool.
    let pages = before.available() + 1;
    if pages * page_size.bytes() > 2 * GIB {
        pfnstore_core::testing::skip(
            test,
            &format!(
                "{} {page_size} pages are free; the test would take more than 2 GiB",
                pages - 1
            ),
        );
        return;
    }
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "guardian_child", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(
                GUARDIAN_CHILD,
                format!(
                    "{}:{pages}:{how}",
                    if page_size == HugePageSize::Huge1G {
                        "1G"
                    } else {
                        "2M"
                    }
                ),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    // libtest prints the test's name on the same line.
    let grown: u64 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split_once("grown ")
                .map(|(_, n)| n.trim().parse().unwrap())
        })
        .expect("the child grew the pool");
    assert!(grown >= 1, "the child had to grow the pool");
    if how == "kill" {
        assert_eq!(counts(page_size).total, before.total + grown);
        child.0.kill().unwrap();
    }
    let status = child.0.wait().unwrap();
    assert_eq!(status.success(), how == "exit", "{status}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while counts(page_size) != before {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool stayed at {} (was {before})",
            counts(page_size)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let owed: Vec<_> = pfnstore_hugetlb::pool::ledger_entries(&Sysfs::system())
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{pid}."))
        })
        .collect();
    assert!(owed.is_empty(), "left in the ledger: {owed:?}");
}

#[test]
fn pool_growth_is_given_back_when_the_owner_is_sigkilled_1g() {
    pool_growth_is_given_back_when_the_owner_dies(
        "pool_growth_is_given_back_when_the_owner_is_sigkilled_1g",
        HugePageSize::Huge1G,
        "kill",
    );
}

#[test]
fn pool_growth_is_given_back_when_the_owner_is_sigkilled_2m() {
    pool_growth_is_given_back_when_the_owner_dies(
        "pool_growth_is_given_back_when_the_owner_is_sigkilled_2m",
        HugePageSize::Huge2M,
        "kill",
    );
}

#[test]
fn pool_growth_is_given_back_when_the_owner_exits_without_dropping() {
    pool_growth_is_given_back_when_the_owner_dies(
        "pool_growth_is_given_back_when_the_owner_exits_without_dropping",
        HugePageSize::Huge2M,
        "exit",
    );
}

/// A page that leaves its frame is caught by `verify_pfns`: punch a source's first page,
/// make sure its old frame is taken by someone else, and write the page again (a new frame).
#[test]
fn verify_pfns_names_the_chunk_whose_frame_changed() {
    let test = "verify_pfns_names_the_chunk_whose_frame_changed";
    let Some(_lock) = require(test, &[HugePageSize::Huge2M]) else {
        return;
    };
    let before = counts(HugePageSize::Huge2M);
    {
        let source = HugetlbSource::new(config(2 * MIB2, HugePageSize::Huge2M)).unwrap();
        source.verify_pfns().unwrap();
        let old = source.chunks()[0].base;
        // One free page besides the one the punch frees.
        let _extra =
            PoolReservation::grow(&Sysfs::system(), pool(HugePageSize::Huge2M), 1).unwrap();
        let view = source.map_view().unwrap();
        view.punch_hole(0, MIB2).unwrap();
        source.verify_pfns().unwrap(); // a hole is skipped
        let free = counts(HugePageSize::Huge2M).available();
        if free > 16 {
            pfnstore_core::testing::skip(
                test,
                &format!("{free} free 2M pages; would take them all"),
            );
            return;
        }
        // Take every free page, then free one that is not the punched page's old frame.
        let blocker =
            HugetlbSource::new(config(free * MIB2, HugePageSize::Huge2M).with_grow_pool(false))
                .unwrap();
        let other = blocker
            .chunks()
            .iter()
            .find(|c| c.base != old)
            .expect("two free pages, one of them not the old frame");
        let new = other.base;
        blocker
            .map_view()
            .unwrap()
            .punch_hole(other.memfd_offset, MIB2)
            .unwrap();
        view.write(0, b"again").unwrap();
        match source.verify_pfns() {
            Err(HugetlbError::PfnMoved {
                chunk: 0,
                memfd_offset: 0,
                recorded,
                now,
            }) => assert_eq!((recorded, now), (old, new)),
            other => panic!("expected PfnMoved of chunk 0, got {other:?}"),
        }
    }
    assert_eq!(counts(HugePageSize::Huge2M), before);
}
