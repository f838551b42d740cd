use std::os::fd::AsFd;

use pfnstore_core::sync::Arc;
use pfnstore_core::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::backing::MemfdFile;
use crate::pool::{PoolId, PoolReservation, Sysfs};
use crate::{HostView, Memfd};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;

/// Kernel regions of this process that overlap the mapping (from /proc/self/maps). Other
/// tests of this binary change their own mappings meanwhile, and the kernel writes the maps
/// file a page at a time, resuming after the last region it showed: a read that races with
/// such a change can show a region twice or cut. So the file is read until two reads in a row
/// agree about this mapping's range (if they never do, the last read counts).
fn kernel_regions(m: &FileMapping) -> u64 {
    let start = m.as_ptr() as u64;
    let end = start + m.len();
    let ours = || -> Vec<(u64, u64)> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .map(|line| {
                let (a, b) = line
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                )
            })
            .filter(|&(a, b)| a < end && b > start)
            .collect()
    };
    let mut last = ours();
    for _ in 0..100 {
        let now = ours();
        if now == last {
            break;
        }
        last = now;
    }
    last.len() as u64
}

/// The count the mapping keeps is the kernel's (the module's claim), and never less.
fn assert_regions_match(m: &FileMapping) {
    assert_eq!(
        m.regions(),
        kernel_regions(m),
        "{:#?}",
        m.states(0, m.len())
    );
}

/// A memfd of `pages` pages of `page_size` (allocated), page `i` filled with byte `i + 1`,
/// and a view of it to check bytes through.
fn filled_memfd(page_size: HugePageSize, pages: u64) -> (Arc<MemfdFile>, HostView) {
    let len = pages * page_size.bytes();
    let memfd = Arc::new(MemfdFile::create(page_size, len).unwrap());
    memfd.allocate(0, len).unwrap();
    let view = HostView::from_memfd(Memfd::owned(&memfd, len)).unwrap();
    for i in 0..pages {
        let bytes = vec![i as u8 + 1; page_size.bytes() as usize];
        view.write(i * page_size.bytes(), &bytes).unwrap();
    }
    (memfd, view)
}

fn page_bytes(m: &FileMapping, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    m.read(offset, &mut buf).unwrap();
    buf
}

/// Maps memfd pages `order[j]` to file pages `j`, one `map` each.
fn map_in_order(m: &FileMapping, memfd: &MemfdFile, order: &[u64], page: u64) {
    for (j, p) in order.iter().enumerate() {
        m.map(
            j as u64 * page,
            memfd.file.as_fd(),
            p * page,
            page,
            Protection::ReadWrite,
        )
        .unwrap();
    }
}

static BIG: VmaBudget = VmaBudget::with_limit(1_000);

#[test]
fn extents_out_of_memfd_order_land_where_they_should() {
    let (memfd, view) = filled_memfd(HugePageSize::Base4K, 4);
    let m = FileMapping::reserve_in(8 * K4 - 100, HugePageSize::Base4K, &BIG).unwrap();
    assert_eq!(m.len(), 8 * K4);
    assert_eq!(m.as_ptr() as u64 % K4, 0);
    let order = [3, 0, 2, 1];
    map_in_order(&m, &memfd, &order, K4);
    for (j, p) in order.iter().enumerate() {
        assert_eq!(
            page_bytes(&m, j as u64 * K4, K4),
            vec![*p as u8 + 1; K4 as usize],
            "file page {j}"
        );
    }
    // A read across file pages 0 and 1 reads memfd pages 3 and 0: not memfd-contiguous.
    assert_eq!(page_bytes(&m, K4 - 4, 8), [4, 4, 4, 4, 1, 1, 1, 1]);
    m.write(2 * K4 + 100, b"hello").unwrap();
    let mut back = [0u8; 5];
    view.read(2 * K4 + 100, &mut back).unwrap();
    assert_eq!(&back, b"hello", "file page 2 is memfd page 2");
    m.write(3 * K4 + 7, b"x").unwrap();
    view.read(K4 + 7, &mut back[..1]).unwrap();
    assert_eq!(&back[..1], b"x", "file page 3 is memfd page 1");
    assert_eq!(
        m.state_at(2 * K4 + 100).unwrap(),
        MappingState::Mapped {
            memfd_offset: 2 * K4 + 100,
            page_size: HugePageSize::Base4K,
            protection: Protection::ReadWrite
        }
    );
    assert_eq!(
        m.state_at(K4).unwrap(),
        MappingState::Mapped {
            memfd_offset: 0,
            page_size: HugePageSize::Base4K,
            protection: Protection::ReadWrite
        }
    );
    assert_eq!(m.state_at(4 * K4).unwrap(), MappingState::Reserved);
    let mut two = [0u8; 2];
    assert!(matches!(
        m.read(4 * K4 - 1, &mut two),
        Err(HugetlbError::NotMapped { offset }) if offset == 4 * K4
    ));
    assert!(m.is_accessible(0, 4 * K4));
    assert!(!m.is_accessible(0, 4 * K4 + 1));
    // 4 pieces at memfd offsets 3, 0, 2, 1 and the reservation after them.
    assert_eq!(m.regions(), 5);
    assert_regions_match(&m);
    assert_eq!(m.states(0, m.len()).unwrap().len(), 5);
}

#[test]
fn unmap_protect_and_zero() {
    let (memfd, view) = filled_memfd(HugePageSize::Base4K, 4);
    let m = FileMapping::reserve_in(8 * K4, HugePageSize::Base4K, &BIG).unwrap();
    let order = [3, 0, 2, 1];
    map_in_order(&m, &memfd, &order, K4);

    m.unmap(K4, K4).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(
        m.read(K4 + 10, &mut byte),
        Err(HugetlbError::NotMapped { offset }) if offset == K4 + 10
    ));
    assert!(matches!(
        m.write(0, &[0u8; 4097]),
        Err(HugetlbError::NotMapped { offset }) if offset == K4
    ));
    assert_eq!(m.state_at(K4).unwrap(), MappingState::Reserved);
    assert_eq!(page_bytes(&m, 0, 1), [4]);
    assert_eq!(page_bytes(&m, 2 * K4, 1), [3]);
    // The memfd page behind it is untouched: unmapping is not punching.
    view.read(0, &mut byte).unwrap();
    assert_eq!(byte, [1]);
    assert_regions_match(&m);
    m.unmap(K4, K4).unwrap(); // reserved already: nothing to do

    // Revoke everything mapped in 0..3 pages; the reserved page stays reserved.
    m.protect(0, 3 * K4, Protection::None).unwrap();
    assert!(matches!(
        m.read(0, &mut byte),
        Err(HugetlbError::Revoked { offset: 0 })
    ));
    assert!(matches!(
        m.zero(2 * K4 + 5, 1),
        Err(HugetlbError::Revoked { offset }) if offset == 2 * K4 + 5
    ));
    assert!(matches!(
        m.write(K4, b"no"),
        Err(HugetlbError::NotMapped { .. })
    ));
    assert_eq!(m.state_at(K4).unwrap(), MappingState::Reserved);
    assert_eq!(
        page_bytes(&m, 3 * K4, 1),
        [2],
        "page 3 was not in the range"
    );
    assert!(!m.is_accessible(0, 1));
    assert_regions_match(&m);

    m.protect(0, 4 * K4, Protection::ReadWrite).unwrap();
    assert_eq!(page_bytes(&m, 0, 1), [4]);
    assert_regions_match(&m);

    m.zero(2 * K4 + 50, 100).unwrap();
    let mut page = vec![0u8; K4 as usize];
    view.read(2 * K4, &mut page).unwrap();
    assert!(page[..50].iter().all(|b| *b == 3));
    assert!(page[50..150].iter().all(|b| *b == 0));
    assert!(page[150..].iter().all(|b| *b == 3));

    // Neighbouring pages at consecutive memfd offsets are one region, as in the kernel.
    m.map(4 * K4, memfd.file.as_fd(), 0, K4, Protection::ReadWrite)
        .unwrap();
    let before = m.regions();
    m.map(5 * K4, memfd.file.as_fd(), K4, K4, Protection::ReadWrite)
        .unwrap();
    assert_eq!(m.regions(), before, "merged with its neighbour");
    assert_eq!(page_bytes(&m, 5 * K4 - 1, 2), [1, 2]);
    assert_regions_match(&m);
    // Remapping replaces: file page 4 now shows memfd page 3.
    m.map(
        4 * K4,
        memfd.file.as_fd(),
        3 * K4,
        K4,
        Protection::ReadWrite,
    )
    .unwrap();
    assert_eq!(page_bytes(&m, 4 * K4, 1), [4]);
    assert_regions_match(&m);
    m.unmap(0, m.len()).unwrap();
    assert_eq!(m.regions(), 1);
    assert_regions_match(&m);
}

#[test]
fn bad_input_is_typed_and_changes_nothing() {
    let (memfd, _view) = filled_memfd(HugePageSize::Base4K, 2);
    let m = FileMapping::reserve_in(4 * K4, HugePageSize::Base4K, &BIG).unwrap();
    m.map(0, memfd.file.as_fd(), 0, K4, Protection::ReadWrite)
        .unwrap();
    let before = m.states(0, m.len()).unwrap();
    let fd = memfd.file.as_fd();
    let rw = Protection::ReadWrite;
    assert!(matches!(
        m.map(100, fd, 0, K4, rw),
        Err(HugetlbError::NotPageAligned { offset: 100, .. })
    ));
    assert!(matches!(
        m.map(K4, fd, 100, K4, rw),
        Err(HugetlbError::NotPageAligned { offset: 100, .. })
    ));
    assert!(matches!(
        m.map(K4, fd, 0, 0, rw),
        Err(HugetlbError::NotPageAligned { len: 0, .. })
    ));
    assert!(matches!(
        m.map(3 * K4, fd, 0, 2 * K4, rw),
        Err(HugetlbError::OutOfBounds { offset, size, .. }) if offset == 3 * K4 && size == 4 * K4
    ));
    assert!(matches!(
        m.map(K4, fd, K4, 2 * K4, rw),
        Err(HugetlbError::OutOfBounds { offset: K4, size, .. }) if size == 2 * K4
    ));
    assert!(matches!(
        m.map(u64::MAX - K4 + 1, fd, 0, K4, rw),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    assert!(matches!(
        m.unmap(K4, 10),
        Err(HugetlbError::NotPageAligned { .. })
    ));
    assert!(matches!(
        m.protect(0, 8 * K4, Protection::None),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    let mut buf = [0u8; 2];
    assert!(matches!(
        m.read(4 * K4 - 1, &mut buf),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    assert!(matches!(
        m.read(u64::MAX, &mut buf),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    assert!(matches!(
        m.state_at(4 * K4),
        Err(HugetlbError::OutOfBounds { .. })
    ));
    m.read(4 * K4, &mut []).unwrap();
    assert_eq!(m.states(0, m.len()).unwrap(), before);
    assert!(matches!(
        FileMapping::reserve_in(0, HugePageSize::Base4K, &BIG),
        Err(HugetlbError::ZeroSize)
    ));
    assert!(matches!(
        FileMapping::reserve_in(u64::MAX - 5, HugePageSize::Huge2M, &BIG),
        Err(HugetlbError::Os { .. })
    ));
    // A 2 MiB-aligned reservation starts on a 2 MiB boundary.
    let aligned = FileMapping::reserve_in(M2 + 1, HugePageSize::Huge2M, &BIG).unwrap();
    assert_eq!(aligned.as_ptr() as u64 % M2, 0);
    assert_eq!(aligned.len(), 2 * M2);
    assert_regions_match(&aligned);
}

#[test]
fn a_change_past_the_budget_is_refused_before_anything_changes() {
    static SMALL: VmaBudget = VmaBudget::with_limit(4);
    let (memfd, _view) = filled_memfd(HugePageSize::Base4K, 4);
    let fd = memfd.file.as_fd();
    let rw = Protection::ReadWrite;
    let m = FileMapping::reserve_in(8 * K4, HugePageSize::Base4K, &SMALL).unwrap();
    assert_eq!((SMALL.used(), m.budget().limit()), (1, 4));
    // Reserved | memfd 0 | reserved: 3 regions.
    m.map(K4, fd, 0, K4, rw).unwrap();
    assert_eq!(SMALL.used(), 3);
    let refused = |m: &FileMapping, at: u64, op: &dyn Fn() -> Result<(), HugetlbError>| {
        let before = (
            m.states(0, m.len()).unwrap(),
            SMALL.used(),
            kernel_regions(m),
        );
        let result = op();
        assert!(
            matches!(result, Err(HugetlbError::MapCountLimit { offset, regions: 5, limit: 4 }) if offset == at),
            "{result:?}"
        );
        assert_eq!(
            (
                m.states(0, m.len()).unwrap(),
                SMALL.used(),
                kernel_regions(m)
            ),
            before
        );
    };
    refused(&m, 3 * K4, &|| m.map(3 * K4, fd, 2 * K4, K4, rw));
    assert_eq!(m.state_at(3 * K4).unwrap(), MappingState::Reserved);
    // Extending the run at the next memfd offset adds no region.
    m.map(2 * K4, fd, K4, K4, rw).unwrap();
    assert_eq!(SMALL.used(), 3);
    // Revoking one page of the run splits it: 4, still within.
    m.protect(K4, K4, Protection::None).unwrap();
    assert_eq!(SMALL.used(), 4);
    assert_regions_match(&m);
    // Unmapping the middle of a 3-page run would add two.
    m.protect(K4, K4, rw).unwrap();
    m.map(3 * K4, fd, 2 * K4, K4, rw).unwrap();
    assert_eq!(SMALL.used(), 3);
    refused(&m, 2 * K4, &|| m.unmap(2 * K4, K4));
    refused(&m, 2 * K4, &|| m.protect(2 * K4, K4, Protection::None));
    // What merges is allowed at the limit and gives regions back.
    m.unmap(K4, 3 * K4).unwrap();
    assert_eq!(SMALL.used(), 1);
    assert_regions_match(&m);
    drop(m);
    assert_eq!(SMALL.used(), 0);
    // The reservation itself is a region.
    static NONE: VmaBudget = VmaBudget::with_limit(0);
    assert!(matches!(
        FileMapping::reserve_in(K4, HugePageSize::Base4K, &NONE),
        Err(HugetlbError::MapCountLimit {
            offset: 0,
            regions: 1,
            limit: 0
        })
    ));
}

/// Copies never fault and never see a half-applied protection change: readers and writers
/// run while another thread revokes, restores, unmaps and maps the same pages.
#[test]
fn accesses_racing_protection_changes_fail_typed_and_never_fault() {
    let (memfd, _view) = filled_memfd(HugePageSize::Base4K, 4);
    let m = FileMapping::reserve_in(4 * K4, HugePageSize::Base4K, &BIG).unwrap();
    map_in_order(&m, &memfd, &[0, 1, 2, 3], K4);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u8 {
            let (m, stop) = (&m, &stop);
            s.spawn(move || {
                let mut ok = 0u64;
                let mut buf = vec![0u8; 3 * K4 as usize];
                while !stop.load(Ordering::Relaxed) {
                    let result = if t == 0 {
                        m.read(K4 / 2, &mut buf)
                    } else {
                        m.write(K4 / 2, &buf)
                    };
                    match result {
                        Ok(()) => ok += 1,
                        Err(HugetlbError::Revoked { .. } | HugetlbError::NotMapped { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                ok
            });
        }
        for round in 0..300u64 {
            let page = round % 4 * K4;
            m.protect(page, K4, Protection::None).unwrap();
            m.protect(page, K4, Protection::ReadWrite).unwrap();
            m.unmap(page, K4).unwrap();
            m.map(page, memfd.file.as_fd(), page, K4, Protection::ReadWrite)
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_regions_match(&m);
    assert_eq!(m.regions(), 1, "all four pages back at consecutive offsets");
}

#[test]
fn huge_2m_pages_map_out_of_order_unmap_and_protect() {
    let test = "huge_2m_pages_map_out_of_order_unmap_and_protect";
    let _lock = crate::testing::hugetlb_lock();
    if let Err(why) = crate::testing::can_reserve(HugePageSize::Huge2M) {
        pfnstore_core::testing::skip(test, &why);
        return;
    }
    let sysfs = Sysfs::system();
    let id = PoolId {
        page_size: HugePageSize::Huge2M,
        node: None,
    };
    let missing = 4u64.saturating_sub(sysfs.read_pool(id).unwrap().available());
    let _pages = (missing > 0).then(|| PoolReservation::grow(&sysfs, id, missing).unwrap());
    {
        let (memfd, view) = filled_memfd(HugePageSize::Huge2M, 4);
        let fd = memfd.file.as_fd();
        let rw = Protection::ReadWrite;
        let small = FileMapping::reserve_in(8 * M2, HugePageSize::Base4K, &BIG).unwrap();
        assert!(matches!(
            small.map(0, fd, 0, M2, rw),
            Err(HugetlbError::MappingAlignment {
                page_size: HugePageSize::Huge2M,
                align: HugePageSize::Base4K
            })
        ));
        let m = FileMapping::reserve_in(8 * M2, HugePageSize::Huge2M, &BIG).unwrap();
        assert!(matches!(
            m.map(K4, fd, 0, M2, rw),
            Err(HugetlbError::NotPageAligned {
                page_size: HugePageSize::Huge2M,
                ..
            })
        ));
        let order = [3, 0, 2, 1];
        map_in_order(&m, &memfd, &order, M2);
        for (j, p) in order.iter().enumerate() {
            let at = j as u64 * M2;
            assert_eq!(page_bytes(&m, at, 16), vec![*p as u8 + 1; 16], "page {j}");
            assert_eq!(page_bytes(&m, at + M2 - 16, 16), vec![*p as u8 + 1; 16]);
        }
        assert_eq!(page_bytes(&m, M2 - 2, 4), [4, 4, 1, 1]);
        m.write(3 * M2 + 9, b"huge").unwrap();
        let mut back = [0u8; 4];
        view.read(M2 + 9, &mut back).unwrap();
        assert_eq!(&back, b"huge");
        assert_regions_match(&m);
        // hugetlb regions never merge: a neighbour at the next memfd offset is a region of
        // its own (an ordinary memfd's would join its neighbour).
        let before = m.regions();
        m.map(4 * M2, fd, 2 * M2, M2, rw).unwrap();
        m.map(5 * M2, fd, 3 * M2, M2, rw).unwrap();
        assert_eq!(m.regions(), before + 2);
        assert_regions_match(&m);
        // Cuts inside a huge page are refused.
        assert!(matches!(
            m.unmap(M2 + K4, K4),
            Err(HugetlbError::NotPageAligned { .. })
        ));
        assert!(matches!(
            m.protect(0, M2 + K4, Protection::None),
            Err(HugetlbError::NotPageAligned { .. })
        ));
        m.protect(M2, 2 * M2, Protection::None).unwrap();
        let mut byte = [0u8; 1];
        assert!(matches!(
            m.read(2 * M2, &mut byte),
            Err(HugetlbError::Revoked { offset }) if offset == 2 * M2
        ));
        assert_regions_match(&m);
        m.protect(M2, 2 * M2, rw).unwrap();
        assert_eq!(page_bytes(&m, 2 * M2, 1), [3]);
        assert_regions_match(&m);
        m.unmap(0, M2).unwrap();
        assert!(matches!(
            m.read(0, &mut byte),
            Err(HugetlbError::NotMapped { offset: 0 })
        ));
        m.zero(M2, M2).unwrap();
        view.read(0, &mut byte).unwrap();
        assert_eq!(byte, [0], "file page 1 is memfd page 0");
        assert_regions_match(&m);
        m.unmap(0, m.len()).unwrap();
        assert_eq!(m.regions(), 1);
        assert_regions_match(&m);
    }
}

#[test]
fn mappings_and_memfds_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<FileMapping>();
    shared::<crate::Memfd<'static>>();
    shared::<crate::testing::ShuffledSource>();
}
