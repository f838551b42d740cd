//! The facade against a per-page reference model: random sequences of conversions, pins,
//! unpins, punch-holes, population, faults and host accesses on two files, with vetoes
//! switched on and off. Every result and error is compared, the attributes of every page are
//! compared after every step, and the reference subscribers' own checks must never fire.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use pfnstore::core::{PageSize, Pfn};
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{ConvertMode, FileOptions, GuestFile, Interest, PinOwner, Shareability, StoreError};
use proptest::prelude::*;

const FILE_PAGES: u64 = 160; // two and a half chunks of the tiny geometry
const CHUNK: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    Convert {
        file: usize,
        start: u64,
        len: u64,
        shared: bool,
    },
    Pin {
        file: usize,
        start: u64,
        len: u64,
        owner: u32,
    },
    Unpin {
        file: usize,
        start: u64,
        len: u64,
        owner: u32,
    },
    Punch {
        file: usize,
        start: u64,
        len: u64,
    },
    Populate {
        file: usize,
        start: u64,
        len: u64,
    },
    Fault {
        file: usize,
        page: u64,
        shared: bool,
    },
    Read {
        file: usize,
        offset: u64,
        len: u64,
    },
    Veto(bool),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..FILE_PAGES, 1..=8u64),
        (0..FILE_PAGES, 1..=70u64),
        // Sometimes beyond the end.
        (FILE_PAGES - 4..FILE_PAGES + 4, 1..=8u64),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..2usize, range(), any::<bool>()).prop_map(|(file, (start, len), shared)| Op::Convert { file, start, len, shared }),
        2 => (0..2usize, range(), 1..3u32).prop_map(|(file, (start, len), owner)| Op::Pin { file, start, len, owner }),
        2 => (0..2usize, range(), 1..3u32).prop_map(|(file, (start, len), owner)| Op::Unpin { file, start, len, owner }),
        2 => (0..2usize, range()).prop_map(|(file, (start, len))| Op::Punch { file, start, len }),
        2 => (0..2usize, range()).prop_map(|(file, (start, len))| Op::Populate { file, start, len }),
        2 => (0..2usize, 0..FILE_PAGES, any::<bool>()).prop_map(|(file, page, shared)| Op::Fault { file, page, shared }),
        1 => (0..2usize, 0..FILE_PAGES * PAGE, 1..3 * PAGE).prop_map(|(file, offset, len)| Op::Read { file, offset, len }),
        1 => any::<bool>().prop_map(Op::Veto),
    ]
}

/// The reference: one entry per page.
#[derive(Debug, Clone)]
struct RefFile {
    shared: Vec<bool>,
    pins: Vec<BTreeMap<u32, u32>>,
    backed: Vec<bool>,
}

impl RefFile {
    fn new() -> RefFile {
        RefFile {
            shared: vec![false; FILE_PAGES as usize],
            pins: vec![BTreeMap::new(); FILE_PAGES as usize],
            backed: vec![false; FILE_PAGES as usize],
        }
    }

    fn check(
        &self,
        file: &GuestFile,
        start: u64,
        len: u64,
    ) -> Result<std::ops::Range<usize>, StoreError> {
        if start + len > FILE_PAGES {
            return Err(StoreError::BeyondEnd {
                file: file.id(),
                offset: (start * PAGE).max(FILE_PAGES * PAGE),
                size: FILE_PAGES * PAGE,
            });
        }
        Ok(start as usize..(start + len) as usize)
    }

    fn first_pin(&self, pages: std::ops::Range<usize>) -> Option<(usize, u32)> {
        pages
            .clone()
            .find_map(|p| self.pins[p].keys().next().map(|o| (p, *o)))
    }

    /// Largest aligned block around `page` inside the file with uniform mapping attributes:
    /// shareability, and whether memory backs it.
    fn max_order(&self, page: u64) -> PageSize {
        let key = |p: u64| (self.shared[p as usize], self.backed[p as usize]);
        for (size, pages) in [(PageSize::Size1G, CHUNK), (PageSize::Size2M, 8)] {
            let start = page / pages * pages;
            if start + pages > FILE_PAGES {
                continue;
            }
            let first = key(start);
            if (start..start + pages).all(|p| key(p) == first) {
                return size;
            }
        }
        PageSize::Size4K
    }
}

struct World {
    store: pfnstore::Store,
    files: Vec<GuestFile>,
    refs: Vec<RefFile>,
    veto: Arc<Recorder>,
    iommu: Arc<IommuMapper>,
    mmu: Arc<KvmMmu>,
    _regs: Vec<pfnstore::Registration>,
}

impl World {
    fn new() -> World {
        let store = synthetic(tiny(), 6, 2);
        let files: Vec<_> = (0..2)
            .map(|_| {
                store
                    .create_file(FileOptions::new(FILE_PAGES * PAGE))
                    .unwrap()
            })
            .collect();
        let veto = Recorder::new("vetoer");
        let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
        let mmu = Arc::new(KvmMmu::new("kvm", &store));
        let regs = vec![
            store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap(),
            store.subscribe(&dyn_sub(&veto), Interest::All).unwrap(),
            store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap(),
        ];
        World {
            store,
            files,
            refs: vec![RefFile::new(), RefFile::new()],
            veto,
            iommu,
            mmu,
            _regs: regs,
        }
    }

    fn vetoing(&self) -> bool {
        self.veto.veto.lock().unwrap().is_some()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Veto(on) => {
                *self.veto.veto.lock().unwrap() = on.then(|| "no".to_string());
            }
            Op::Convert {
                file,
                start,
                len,
                shared,
            } => {
                let to = if shared {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                let f = &self.files[file];
                let got = f
                    .convert(start * PAGE, len * PAGE, to, ConvertMode::Preserve)
                    .map(drop);
                let vetoing = self.vetoing();
                let r = &mut self.refs[file];
                let want = r.check(f, start, len).and_then(|pages| {
                    if let Some((p, owner)) = r.first_pin(pages.clone()) {
                        return Err(StoreError::Pinned {
                            file: f.id(),
                            offset: p as u64 * PAGE,
                            pfn: f.pfn_at(p as u64 * PAGE).unwrap(),
                            owner: PinOwner(owner),
                        });
                    }
                    if pages.clone().all(|p| r.shared[p] == shared) {
                        return Ok(());
                    }
                    if vetoing {
                        return Err(StoreError::Vetoed {
                            file: f.id(),
                            offset: start * PAGE,
                            pfn: f.pfn_at(start * PAGE).unwrap(),
                            subscriber: "vetoer".into(),
                            reason: "no".into(),
                        });
                    }
                    pages.for_each(|p| r.shared[p] = shared);
                    Ok(())
                });
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Pin {
                file,
                start,
                len,
                owner,
            } => {
                let f = &self.files[file];
                let got = f.pin(start * PAGE, len * PAGE, PinOwner(owner));
                let r = &mut self.refs[file];
                let want = r.check(f, start, len).and_then(|pages| {
                    if let Some(hole) = pages.clone().find(|p| !r.backed[*p]) {
                        return Err(StoreError::NotBacked {
                            file: f.id(),
                            offset: hole as u64 * PAGE,
                        });
                    }
                    pages.for_each(|p| *r.pins[p].entry(owner).or_default() += 1);
                    Ok(())
                });
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Unpin {
                file,
                start,
                len,
                owner,
            } => {
                let f = &self.files[file];
                let got = f.unpin(start * PAGE, len * PAGE, PinOwner(owner));
                let r = &mut self.refs[file];
                let want = r.check(f, start, len).and_then(|pages| {
                    if let Some(p) = pages.clone().find(|p| !r.pins[*p].contains_key(&owner)) {
                        return Err(StoreError::NotPinned {
                            file: f.id(),
                            offset: p as u64 * PAGE,
                            pfn: f.pfn_at(p as u64 * PAGE).unwrap(),
                            owner: PinOwner(owner),
                        });
                    }
                    for p in pages {
                        let count = r.pins[p].get_mut(&owner).unwrap();
                        *count -= 1;
                        if *count == 0 {
                            r.pins[p].remove(&owner);
                        }
                    }
                    Ok(())
                });
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Punch { file, start, len } => {
                let f = &self.files[file];
                let got = f.punch_hole(start * PAGE, len * PAGE);
                let r = &mut self.refs[file];
                let want = r.check(f, start, len).and_then(|pages| {
                    if let Some((p, owner)) = r.first_pin(pages.clone()) {
                        return Err(StoreError::Pinned {
                            file: f.id(),
                            offset: p as u64 * PAGE,
                            pfn: f.pfn_at(p as u64 * PAGE).unwrap(),
                            owner: PinOwner(owner),
                        });
                    }
                    pages.for_each(|p| r.backed[p] = false);
                    Ok(())
                });
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Populate { file, start, len } => {
                let f = &self.files[file];
                let got = f.populate(start * PAGE, len * PAGE);
                let r = &mut self.refs[file];
                let want = r
                    .check(f, start, len)
                    .map(|pages| pages.for_each(|p| r.backed[p] = true));
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Fault { file, page, shared } => {
                let access = if shared {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                let f = &self.files[file];
                let got = self.mmu.fault(f.id(), page * PAGE, access);
                let r = &mut self.refs[file];
                if r.shared[page as usize] != shared {
                    let want = if shared {
                        StoreError::PrivateAccess {
                            file: f.id(),
                            offset: page * PAGE,
                            pfn: f.pfn_at(page * PAGE).unwrap(),
                        }
                    } else {
                        StoreError::SharedAccess {
                            file: f.id(),
                            offset: page * PAGE,
                            pfn: f.pfn_at(page * PAGE).unwrap(),
                        }
                    };
                    prop_assert_eq!(got, Err(want), "{:?}", op);
                } else {
                    let uniform = r.max_order(page);
                    let (size, pfn) =
                        got.map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                    prop_assert_eq!(f.pfn_at(page * PAGE).unwrap(), Some(pfn));
                    // A first touch backs the whole uniform block around the page.
                    let first_touch = !r.backed[page as usize];
                    let pages = [
                        (PageSize::Size1G, CHUNK),
                        (PageSize::Size2M, 8),
                        (PageSize::Size4K, 1),
                    ]
                    .into_iter()
                    .find(|(s, _)| *s == uniform)
                    .unwrap()
                    .1;
                    let start = page / pages * pages;
                    for p in start..(start + pages).min(FILE_PAGES) {
                        r.backed[p as usize] |= first_touch;
                    }
                    let uniform = r.max_order(page);
                    prop_assert!(
                        size <= uniform,
                        "{:?}: mapped {:?}, uniform only {:?}",
                        op,
                        size,
                        uniform
                    );
                }
            }
            Op::Read { file, offset, len } => {
                let f = &self.files[file];
                let mut buf = vec![0u8; len as usize];
                let got = f.read(offset, &mut buf);
                let r = &self.refs[file];
                let end = offset + len;
                let want = if end > FILE_PAGES * PAGE {
                    Err(StoreError::BeyondEnd {
                        file: f.id(),
                        offset: offset.max(FILE_PAGES * PAGE),
                        size: FILE_PAGES * PAGE,
                    })
                } else {
                    let pages = offset / PAGE..end.div_ceil(PAGE);
                    match pages.clone().find(|p| !r.shared[*p as usize]) {
                        Some(p) => Err(StoreError::PrivateAccess {
                            file: f.id(),
                            offset: (p * PAGE).max(offset),
                            pfn: f.pfn_at((p * PAGE).max(offset)).unwrap(),
                        }),
                        // Holes read as zeros; backed pages need bytes a synthetic store lacks.
                        None if pages.clone().any(|p| r.backed[p as usize]) => {
                            Err(StoreError::NoHostMemory {
                                what: "reading guest memory",
                            })
                        }
                        None => Ok(()),
                    }
                };
                prop_assert_eq!(got, want, "{:?}", op);
            }
        }
        self.compare()
    }

    fn compare(&self) -> Result<(), TestCaseError> {
        for (f, r) in self.files.iter().zip(&self.refs) {
            for p in 0..FILE_PAGES {
                let a = f.attributes(p * PAGE).unwrap();
                prop_assert_eq!(
                    a.shareability == Shareability::Shared,
                    r.shared[p as usize],
                    "page {} of {:?}",
                    p,
                    f.id()
                );
                let pins: BTreeMap<u32, u32> = a.pins.iter().map(|(o, c)| (o.0, c)).collect();
                prop_assert_eq!(&pins, &r.pins[p as usize], "pins of page {}", p);
                prop_assert_eq!(
                    f.pfn_at(p * PAGE).unwrap().is_some(),
                    r.backed[p as usize],
                    "backing of page {}",
                    p
                );
                if p % 7 == 0 {
                    prop_assert_eq!(
                        f.max_mapping_size(p * PAGE).unwrap(),
                        r.max_order(p),
                        "max order of page {}",
                        p
                    );
                }
            }
            f.check_invariants()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        self.store
            .check_invariants()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let backed: u64 = self
            .refs
            .iter()
            .map(|r| r.backed.iter().filter(|b| **b).count() as u64)
            .sum();
        prop_assert_eq!(self.store.stats().allocator.total.allocated_pages, backed);
        prop_assert!(
            self.iommu.violations().is_empty(),
            "{:?}",
            self.iommu.violations()
        );
        prop_assert!(
            self.mmu.violations().is_empty(),
            "{:?}",
            self.mmu.violations()
        );
        prop_assert!(self.mmu.audit().is_empty(), "{:?}", self.mmu.audit());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_store_agrees_with_the_reference(ops in proptest::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
        }
        // Whatever happened, destroying the files gives every page back.
        for (f, r) in world.files.drain(..).zip(&world.refs) {
            let pinned = r.pins.iter().position(|p| !p.is_empty());
            match pinned {
                Some(p) => {
                    let busy = matches!(f.destroy(), Err(StoreError::FileBusy { offset, .. }) if offset == p as u64 * PAGE);
                    prop_assert!(busy, "destroy of a file pinned at page {}", p);
                }
                None => f.destroy().map_err(|e| TestCaseError::fail(e.to_string()))?,
            }
        }
    }
}

#[test]
fn no_block_reaches_past_the_end_of_the_file() {
    // The reference's own edge: the last chunk is only partly inside the file.
    let mut r = RefFile::new();
    assert_eq!(r.max_order(150), PageSize::Size2M);
    assert_eq!(r.max_order(100), PageSize::Size1G);
    r.shared[150] = true;
    assert_eq!(r.max_order(150), PageSize::Size4K);
    assert_eq!(r.max_order(129), PageSize::Size2M);
    let store = synthetic(tiny(), 4, 1);
    let f = store
        .create_file(FileOptions::new(FILE_PAGES * PAGE))
        .unwrap();
    assert_eq!(
        f.max_mapping_size(150 * PAGE).unwrap(),
        PageSize::Size2M,
        "the last chunk is cut by the file's end"
    );
    let _ = Pfn(0);
}
