//! Helpers shared by the facade's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex};

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::SyntheticSource;
use pfnstore::{
    Change, ChangeKind, MappingPlan, OffsetRange, PageOffset, Store, StoreOptions, Subscriber,
    UnmapError, Veto,
};

pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const PAGE: u64 = 4096;

/// A store of `chunks` synthetic chunks in `geometry` (PFNs from 0x100000).
pub(crate) fn synthetic(geometry: Geometry, chunks: u64, shards: usize) -> Store {
    let source = SyntheticSource::new(geometry, Pfn(1 << 20), chunks).expect("synthetic source");
    Store::synthetic(source, StoreOptions::default().with_shards(shards)).expect("store")
}

/// 1/8/64-page blocks: every split and merge level within a few pages.
pub(crate) fn tiny() -> Geometry {
    Geometry::new(3, 6).unwrap()
}

/// Pages `a..b` of a file.
pub(crate) fn pages(a: u64, b: u64) -> OffsetRange {
    OffsetRange::new(PageOffset(a), PageOffset(b)).unwrap()
}

/// What a [`Recorder`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Prepare(ChangeKind, OffsetRange),
    Unmap(ChangeKind, MappingPlan),
    Map(ChangeKind, MappingPlan),
    Restore(ChangeKind),
    Abort(ChangeKind),
}

impl Event {
    /// The callback's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Event::Prepare(..) => "prepare",
            Event::Unmap(..) => "unmap",
            Event::Map(..) => "map",
            Event::Restore(..) => "restore",
            Event::Abort(..) => "abort",
        }
    }
}

/// A subscriber that records every callback and can veto or fail.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub name: String,
    pub events: Mutex<Vec<Event>>,
    pub veto: Mutex<Option<String>>,
    /// Fail the unmap of changes whose region overlaps these pages.
    pub fail_unmap: Mutex<Option<OffsetRange>>,
}

impl Recorder {
    pub(crate) fn new(name: &str) -> Arc<Recorder> {
        Arc::new(Recorder {
            name: name.to_string(),
            ..Default::default()
        })
    }

    pub(crate) fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The callbacks' names, in order.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.events().iter().map(Event::name).collect()
    }

    pub(crate) fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, change: &Change<'_>) -> Result<(), Veto> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Prepare(change.kind, change.range));
        match self.veto.lock().unwrap().clone() {
            Some(reason) => Err(Veto::new(reason)),
            None => Ok(()),
        }
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Unmap(change.kind, change.plan.clone()));
        match *self.fail_unmap.lock().unwrap() {
            Some(fail) if change.plan.region().is_some_and(|r| r.overlaps(&fail)) => {
                Err(UnmapError {
                    range: fail,
                    reason: "recorder told to fail".into(),
                })
            }
            _ => Ok(()),
        }
    }

    fn map(&self, change: &Change<'_>) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Map(change.kind, change.plan.clone()));
    }

    fn restore(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Restore(change.kind));
        Ok(())
    }

    fn abort(&self, change: &Change<'_>) {
        self.events.lock().unwrap().push(Event::Abort(change.kind));
    }
}

/// `Arc<T>` as the trait object the store registers.
pub(crate) fn dyn_sub<T: Subscriber + 'static>(s: &Arc<T>) -> Arc<dyn Subscriber> {
    Arc::clone(s) as Arc<dyn Subscriber>
}

// ---------------------------------------------------------------------------------------------
// Stores with host memory, and independent views of what the kernel maps where.
// ---------------------------------------------------------------------------------------------

/// A store over a [`pfnstore::hugetlb::testing::ShuffledSource`] of ordinary memory: 2 MiB
/// chunks (512 pages) with consecutive PFNs, chunk `i` at memfd slot `order[i]`.
pub(crate) fn shuffled_store(order: &[u64], shards: usize) -> Store {
    let source = pfnstore::hugetlb::testing::ShuffledSource::with_order(
        pfnstore::hugetlb::HugePageSize::Base4K,
        order,
    )
    .expect("shuffled source");
    Store::new(
        Box::new(source),
        StoreOptions::default().with_shards(shards),
    )
    .expect("store")
}

/// Like [`shuffled_store`], `chunks` chunks in an order drawn from `seed`.
pub(crate) fn shuffled_store_seeded(chunks: u64, seed: u64, shards: usize) -> Store {
    let source = pfnstore::hugetlb::testing::ShuffledSource::new(
        pfnstore::hugetlb::HugePageSize::Base4K,
        chunks,
        seed,
    )
    .expect("shuffled source");
    Store::new(
        Box::new(source),
        StoreOptions::default().with_shards(shards),
    )
    .expect("store")
}

/// A store over `bytes` (a multiple of 1 GiB) of ordinary memory: a 4 KiB memfd, 1 GiB
/// chunks, nothing prefaulted (the memfd stays sparse until touched).
pub(crate) fn ordinary_store(bytes: u64, shards: usize) -> Store {
    use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault};
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true)
            .with_prefault(Prefault::None),
    )
    .expect("ordinary memory source");
    Store::from_hugetlb(source, StoreOptions::default().with_shards(shards)).expect("store")
}

/// One line of `/proc/self/maps`: a kernel memory region (VMA) as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelRegion {
    pub start: usize,
    pub end: usize,
    /// `rwxp`/`rwxs` flags, e.g. `rw-s` or `---p`.
    pub perms: String,
    /// File offset of `start` (the memfd offset for a memfd mapping).
    pub offset: u64,
    /// The inode of the mapped file (0 for anonymous memory).
    pub inode: u64,
    pub path: String,
}

impl KernelRegion {
    /// Whether a load from the region would succeed (a page without `r` faults).
    pub(crate) fn readable(&self) -> bool {
        self.perms.starts_with('r')
    }

    /// Whether a store to the region would succeed.
    pub(crate) fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }

    /// The memfd offset that byte `addr` of the region maps (for a file mapping).
    pub(crate) fn file_offset_of(&self, addr: usize) -> u64 {
        self.offset + (addr - self.start) as u64
    }
}

/// Every kernel region of this process, from `/proc/self/maps` (one read; see
/// [`stable_regions`] for reading a part of it that other threads may be changing).
pub(crate) fn kernel_regions() -> Vec<KernelRegion> {
    read_kernel_regions()
}

/// `pick` of the kernel regions, read until two reads in a row agree. Other tests of the
/// binary change their own mappings meanwhile, and the kernel writes the maps file a page at
/// a time, resuming after the last region it showed, so a read that races with such a change
/// can show a region twice or cut. Only the part the caller looks at has to be stable; if it
/// never is (another thread keeps changing it), the last read is returned.
pub(crate) fn stable_regions<T: PartialEq>(pick: impl Fn(Vec<KernelRegion>) -> T) -> T {
    let mut last = pick(read_kernel_regions());
    for _ in 0..100 {
        let now = pick(read_kernel_regions());
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

fn read_kernel_regions() -> Vec<KernelRegion> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset, _dev, inode) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let path = fields.collect::<Vec<_>>().join(" ");
            let (start, end) = range.split_once('-')?;
            Some(KernelRegion {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                perms: perms.to_string(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                inode: inode.parse().ok()?,
                path,
            })
        })
        .collect()
}

/// The kernel region holding byte `addr`, if any.
pub(crate) fn kernel_region(addr: usize) -> Option<KernelRegion> {
    stable_regions(|regions| {
        regions
            .into_iter()
            .find(|r| r.start <= addr && addr < r.end)
    })
}

/// The kernel regions overlapping `start..end`.
pub(crate) fn kernel_regions_in(start: usize, end: usize) -> Vec<KernelRegion> {
    stable_regions(|regions| {
        regions
            .into_iter()
            .filter(|r| r.start < end && start < r.end)
            .collect()
    })
}

/// The bytes the kernel has behind `addr..addr + len` of this process, whatever their
/// protection: `/proc/self/mem` reads with `FOLL_FORCE`, so it reads `PROT_NONE` pages of a
/// shared mapping too (and an anonymous reservation as zeros). It says which memory an address
/// reaches, not whether the host may touch it (see [`KernelRegion::readable`] for that), and
/// it never faults the calling thread.
pub(crate) fn forced_read(addr: usize, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open("/proc/self/mem")?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr as u64)?;
    Ok(buf)
}

/// A duplicate of the store's memfd, to read its bytes with `pread` (independent of every
/// mapping the store made).
pub(crate) fn memfd_file(store: &Store) -> std::fs::File {
    let memfd = store.memfd().expect("a store with host memory has a memfd");
    std::fs::File::from(memfd.fd().try_clone_to_owned().expect("dup the memfd"))
}

/// `len` bytes of the store's memfd at `memfd_offset`, read with `pread`.
pub(crate) fn memfd_bytes(store: &Store, memfd_offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    memfd_file(store)
        .read_exact_at(&mut buf, memfd_offset)
        .expect("pread the memfd");
    buf
}

/// The inode of the store's memfd.
pub(crate) fn memfd_inode(store: &Store) -> u64 {
    use std::os::unix::fs::MetadataExt;
    memfd_file(store).metadata().expect("fstat the memfd").ino()
}

/// How many of this process's descriptors and kernel regions still refer to inode `ino`
/// (a memfd's). Both must be 0 once a store has given its memory back.
pub(crate) fn references_to_inode(ino: u64) -> (usize, usize) {
    use std::os::unix::fs::MetadataExt;
    let fds = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino))
        .count();
    let regions = stable_regions(|regions| regions.iter().filter(|r| r.inode == ino).count());
    (fds, regions)
}

/// Runs `work` on a thread of its own and returns its result; fails the test (instead of
/// hanging the run) if it has not finished after `deadline`. A hang detector, not a timing
/// assertion: the deadline is far beyond what the work needs.
pub(crate) fn with_watchdog<T: Send + 'static>(
    what: &str,
    deadline: std::time::Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
        })
        .expect("spawn the watched thread");
    match finished.recv_timeout(deadline) {
        Ok(Ok(value)) => {
            let _ = worker.join();
            value
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: still running after {deadline:?}: a hang (deadlock or livelock)"),
    }
}

/// The environment variable that tells a test binary it runs as [`run_in_child`]'s child.
pub(crate) const CHILD_ENV: &str = "PFNSTORE_TEST_CHILD";

/// Runs test `name` of this test binary again in a child process, for tests that exhaust a
/// per-process resource (memory regions) and must not disturb the tests running beside them.
/// Returns `true` in the parent, after checking that the child passed (its output is shown),
/// and `false` in the child, which then does the work.
pub(crate) fn run_in_child(name: &str) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new(exe)
        // The parent runs the test, so the child must too, ignored or not.
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, name)
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("--- child {name} stdout:\n{stdout}\n--- child stderr:\n{stderr}");
    assert!(
        output.status.success(),
        "child {name} failed: {}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "child {name} did not run the test: {stdout}"
    );
    // A skip in the child is reported by the child itself (it appends to the skip log).
    true
}

/// The bytes of a file tagged `tag` at offsets `offset..offset + len`: every fourth byte is
/// the tag, so no window of four bytes of one file equals the same window of another.
pub(crate) fn tagged_bytes(tag: u8, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|o| match o % 4 {
            0 => tag,
            1 => (o >> 12) as u8,
            2 => (o >> 20) as u8 ^ 0x55,
            _ => (o >> 2) as u8,
        })
        .collect()
}

/// #11.1 on `store` (chunks of `chunk` bytes): two files of two chunks each, shared and
/// populated, written with their own bytes; reads and writes that straddle the chunk boundary
/// return and change only the file's own bytes; afterwards the whole memfd holds exactly each
/// file's bytes at its extents' memfd offsets and zeros everywhere else (no write strayed into
/// another file or into free memory). Returns the files (the caller checks the store's
/// invariants).
pub(crate) fn check_files_stay_apart(store: &Store, chunk: u64) -> Vec<pfnstore::GuestFile> {
    use pfnstore::FileOptions;
    let size = 2 * chunk;
    let tags = [0xA1u8, 0xB2];
    let files: Vec<pfnstore::GuestFile> = tags
        .iter()
        .map(|_| {
            store
                .create_file(FileOptions::new(size).shared().populated())
                .expect("file")
        })
        .collect();
    let mut models: Vec<Vec<u8>> = tags.iter().map(|t| tagged_bytes(*t, 0, size)).collect();
    for (file, model) in files.iter().zip(&models) {
        file.write(0, model).expect("write the whole file");
    }
    let windows = [
        (chunk - 16, 32),
        (chunk - 1, 2),
        (chunk - PAGE - 8, PAGE + 16),
        (chunk - 3 * PAGE, 6 * PAGE),
        (0, size),
    ];
    let check_reads = |models: &[Vec<u8>]| {
        for (i, (file, model)) in files.iter().zip(models).enumerate() {
            for (offset, len) in windows {
                let mut buf = vec![0u8; len as usize];
                file.read(offset, &mut buf).expect("read");
                let want = &model[offset as usize..(offset + len) as usize];
                assert!(
                    buf == want,
                    "file {i}: read({offset:#x}, {len:#x}) returned bytes that are not the file's \
                     (first difference at +{:#x}: {:#x} for {:#x})",
                    first_difference(&buf, want),
                    buf[first_difference(&buf, want)],
                    want[first_difference(&buf, want)]
                );
            }
        }
    };
    check_reads(&models);
    // Writes straddling the boundary, in each file.
    let writes: [(usize, u64, Vec<u8>); 3] = [
        (0, chunk - 16, vec![0x5A; 32]),
        (1, chunk - 3, vec![0x6B; 100]),
        (0, chunk - PAGE + 1, vec![0x7C; 2 * PAGE as usize - 2]),
    ];
    for (i, offset, data) in &writes {
        files[*i].write(*offset, data).expect("write");
        models[*i][*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    check_reads(&models);
    // The memfd as a whole: each file's bytes where its extents say, zeros elsewhere.
    let memfd_len = store.memfd().expect("memfd").len() as usize;
    let image = memfd_bytes(store, 0, memfd_len);
    let mut expected = vec![0u8; memfd_len];
    for (file, model) in files.iter().zip(&models) {
        for e in file.extents().expect("extents") {
            let (m, o, l) = (e.memfd_offset as usize, e.offset as usize, e.len as usize);
            expected[m..m + l].copy_from_slice(&model[o..o + l]);
        }
    }
    if image != expected {
        let at = first_difference(&image, &expected);
        panic!(
            "memfd byte {at:#x} is {:#x}, expected {:#x}: a copy went outside its file",
            image[at], expected[at]
        );
    }
    for file in &files {
        file.check_invariants().expect("file invariants");
    }
    files
}

/// The index of the first byte where `a` and `b` differ (their length if none).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}
