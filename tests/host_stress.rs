//! Stress on stores WITH HOST MEMORY: threads convert, populate, punch, fault, pin, read and
//! write in several files at once (some files shared between threads) on ordinary 4 KiB memory,
//! on a memfd whose chunks sit in shuffled order, and on real 2 MiB and 1 GiB hugetlb pages.
//!
//! Every byte written is a stamp: 32-byte records naming the file, the page, the record's place
//! in the page and a generation no other write uses. Each page of each file belongs to one
//! thread (a whole file, or 16-page segments of a file the threads share), and that thread keeps
//! an exact model of it: shareability, the generation of every record, pins, whether it is known
//! to be backed. So every result is checked exactly: a read returns exactly what this file last
//! wrote there (zeros for never-written and punched pages), a private page is never readable
//! (`PrivateAccess`, naming the first private byte), a pin fails exactly on the first pinned
//! page. Threads also read across other threads' segments; those bytes must be zeros or this
//! file's own stamps for that very place (word by word, as a concurrent write may tear them).
//!
//! Between rounds all threads stop and one checks the whole store: the invariants, the
//! metadata against the model, every byte through the API, every backed byte read straight from
//! the memfd at the offset the file says backs it (private pages included), the kernel's
//! protection of every file mapping (`/proc/self/maps`: a protection unit is read-write exactly
//! when one of its pages is backed and shared, and maps the memfd at the file's extents), and
//! that no frame backs two offsets. At the end everything is converted to shared and checked
//! once more (PRESERVE kept every private byte), the files go, the allocator is empty, and a
//! hugetlb pool is back to its old size. With the threads stopped, the checkpoints also drive
//! the transitions random operations rarely reach: every file wholly private at once (each unit
//! revoked, not a byte readable) and back, and a whole file punched (its memory released) and
//! populated again.
//!
//! Two smaller tests: the VMM reading bytes a guest thread is writing (torn only between
//! 8-byte words, and no data race), and file lives in a loop that must leave no descriptor and
//! no mapping behind.
//!
//! `PFNSTORE_STRESS_SCALE` multiplies the operations per round (default 1; the sanitizer
//! script lowers it with `PFNSTORE_STRESS_DIVISOR`); `PFNSTORE_STRESS_SEED` changes the
//! sequences for a soak run (a failure message names the round and operation; rerun with the
//! same seed to see it again, as far as thread timing allows). A watchdog aborts the process when no
//! operation completes for five minutes: that is a deadlock, not slowness.
//!
//! The parts: `stamps` (the bytes), `model` (what threads know, how a scenario is laid out),
//! `harness` (threads and rounds), `ops` (one thread's operations), `checks` (the checks between
//! rounds), `kernel` (`/proc/self/maps` and `/proc/self/fd`).

mod common;

/// Returns `Err(format!(..))` from the enclosing function unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

#[path = "host_stress/checks.rs"]
mod checks;
#[path = "host_stress/harness.rs"]
mod harness;
#[path = "host_stress/kernel.rs"]
mod kernel;
#[path = "host_stress/model.rs"]
mod model;
#[path = "host_stress/ops.rs"]
mod ops;
#[path = "host_stress/stamps.rs"]
mod stamps;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use common::{GIB, PAGE, dyn_sub};
use harness::Harness;
use kernel::{fd_count, maps_lines};
use model::{FileSpec, Owner, Plan, scaled, seeded};
use pfnstore::core::testing::skip;
use pfnstore::hugetlb::pool::{PoolId, Sysfs};
use pfnstore::hugetlb::testing::{ShuffledSource, can_reserve, hugetlb_lock};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault};
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{
    ConvertMode, FileOptions, Interest, PinOwner, Shareability, Store, StoreError, StoreOptions,
};

const MIB: u64 = 1 << 20;

/// Every test of this file runs alone: the leak test counts the process's descriptors and
/// mappings, and the stress tests want the machine's two cores to themselves.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Four threads: each its own file (two start shared, two private), and two files all of
/// them share in 16-page segments (one shared, one private at first).
fn four_thread_files(own_pages: u64, shared_pages: u64) -> Vec<FileSpec> {
    let mut specs: Vec<FileSpec> = (0..4)
        .map(|t| FileSpec::whole(own_pages, t % 2 == 0, Owner::Thread(t)))
        .collect();
    specs.push(FileSpec::whole(shared_pages, true, Owner::Striped(16)));
    specs.push(FileSpec::whole(shared_pages, false, Owner::Striped(16)));
    specs
}

fn plan(seed: u64, ops: usize, boundary: u64) -> Plan {
    Plan {
        threads: 4,
        rounds: 3,
        ops: scaled(ops),
        boundary,
        long: 1100,
        seed: seeded(seed),
    }
}

#[test]
fn ordinary_4k_memory_keeps_files_apart_under_concurrency() {
    let _serial = serial();
    let source = HugetlbSource::new(
        HugetlbConfig::new(GIB)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true)
            .with_prefault(Prefault::None),
    )
    .expect("ordinary memory");
    let store = Store::from_hugetlb(source, StoreOptions::default().with_shards(2)).unwrap();
    Harness::new(
        "ordinary 4K",
        store,
        four_thread_files(2048, 2048),
        plan(0x4B, 1500, 512),
    )
    .run();
}

#[test]
fn shuffled_chunks_keep_files_apart_under_concurrency() {
    let _serial = serial();
    // 2 MiB chunks in shuffled memfd order: a copy that runs from one chunk into the
    // PFN-next one reaches some other chunk's bytes.
    let source =
        ShuffledSource::new(HugePageSize::Base4K, 32, seeded(0x5F)).expect("shuffled source");
    let order = source.order();
    let store = Store::new(Box::new(source), StoreOptions::default().with_shards(2)).unwrap();
    eprintln!("shuffled memfd order of the chunks: {order:?}");
    Harness::new(
        "shuffled 4K",
        store,
        four_thread_files(2048, 2048),
        plan(0x5F, 1500, 512),
    )
    .run();
}

/// The pool of `size`, its total now.
fn pool_total(size: HugePageSize) -> Option<u64> {
    let id = PoolId {
        page_size: size,
        node: None,
    };
    Sysfs::system().read_pool(id).ok().map(|c| c.total)
}

/// A store on real hugetlb pages of `size` (`bytes` of them, the pool grown for them), or why
/// not.
fn hugetlb_store(size: HugePageSize, bytes: u64) -> Result<Store, String> {
    can_reserve(size)?;
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes)
            .with_page_size(size)
            .with_strict(true)
            .with_grow_pool(true)
            .with_prefault(Prefault::MapPopulate),
    )
    .map_err(|e| format!("no {size} pages could be had: {e}"))?;
    Store::from_hugetlb(source, StoreOptions::default().with_shards(2)).map_err(|e| e.to_string())
}

#[test]
fn real_2m_hugetlb_keeps_files_apart_under_concurrency() {
    let test = "real_2m_hugetlb_keeps_files_apart_under_concurrency";
    let _serial = serial();
    let _lock = hugetlb_lock();
    let Some(before) = pool_total(HugePageSize::Huge2M) else {
        return skip(test, "the 2 MiB pool cannot be read");
    };
    {
        let store = match hugetlb_store(HugePageSize::Huge2M, 64 * MIB) {
            Ok(store) => store,
            Err(why) => return skip(test, &why),
        };
        // Each own file two huge pages, each shared file four: 16 of the 32.
        Harness::new(
            "real 2M",
            store,
            four_thread_files(1024, 2048),
            plan(0x2A, 1200, 512),
        )
        .run();
    }
    assert_eq!(
        pool_total(HugePageSize::Huge2M),
        Some(before),
        "the 2 MiB pool is back"
    );
}

#[test]
fn real_1g_hugetlb_keeps_files_apart_under_concurrency() {
    let test = "real_1g_hugetlb_keeps_files_apart_under_concurrency";
    let _serial = serial();
    let _lock = hugetlb_lock();
    let Some(before) = pool_total(HugePageSize::Huge1G) else {
        return skip(test, "the 1 GiB pool cannot be read");
    };
    {
        let store = match hugetlb_store(HugePageSize::Huge1G, 2 * GIB) {
            Ok(store) => store,
            Err(why) => return skip(test, &why),
        };
        // Two files of one 1 GiB page each, shared by all four threads; operations in 8 MiB
        // at each end of each file.
        let pages = GIB / PAGE;
        let window = 2048;
        let specs = (0..2)
            .map(|i| FileSpec {
                pages,
                shared: i == 0,
                owner: Owner::Striped(16),
                windows: vec![0..window, pages - window..pages],
            })
            .collect();
        Harness::new(
            "real 1G",
            store,
            specs,
            // Fewer: the reference KVM MMU checks every block it maps against a plan of the
            // whole file, which costs more the more fragmented the 1 GiB chunk gets.
            plan(0x16, 500, 512),
        )
        .run();
    }
    assert_eq!(
        pool_total(HugePageSize::Huge1G),
        Some(before),
        "the 1 GiB pool is back"
    );
}

// ---------------------------------------------------------------------------------------------
// Leaks

/// One life of three files: created, populated, mapped, faulted, converted both ways (PRESERVE
/// and ZERO), written and read across chunks, pinned, punched, watched by subscribers, and
/// ended by `destroy` or by dropping the last handle.
fn file_lives(store: &Store, cycle: u64) {
    let a = store
        .create_file(FileOptions::new(4 * MIB).shared().populated())
        .unwrap();
    let b = store.create_file(FileOptions::new(2 * MIB)).unwrap();
    let c = store
        .create_file(FileOptions::new(6 * MIB).shared())
        .unwrap();
    // Subscribed after the files exist (the harness subscribes before): a replay's path.
    let mmu = Arc::new(KvmMmu::new("kvm", store));
    let all = store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap();
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let one = store
        .subscribe(&dyn_sub(&iommu), Interest::File(c.id()))
        .unwrap();

    let stamp = [cycle as u8 | 1; 64];
    a.write(2 * MIB - 32, &stamp).unwrap();
    let mut back = [0u8; 64];
    a.read(2 * MIB - 32, &mut back).unwrap();
    assert_eq!(back, stamp);
    assert!(a.host_mapping().is_some());
    a.host_view_address(0, 4 * MIB).unwrap();
    a.fault(PAGE, Shareability::Shared).unwrap();
    mmu.fault(a.id(), 3 * PAGE, Shareability::Shared).unwrap();
    a.convert(MIB, 2 * MIB, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    a.convert(MIB, 2 * MIB, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    a.read(2 * MIB - 32, &mut back).unwrap();
    assert_eq!(back, [0u8; 64], "ZERO cleared the bytes");
    a.pin(0, 8 * PAGE, PinOwner(1)).unwrap();
    a.punch_hole(64 * PAGE, 64 * PAGE).unwrap();
    a.populate(64 * PAGE, 8 * PAGE).unwrap();
    a.unpin(0, 8 * PAGE, PinOwner(1)).unwrap();

    b.populate(0, 2 * MIB).unwrap();
    b.fault(5 * PAGE, Shareability::Private).unwrap();
    b.convert(0, MIB, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    b.write(MIB - 4, &[7; 8]).unwrap_err();
    b.write(MIB - 16, &[7; 8]).unwrap();

    // Across the file's 2 MiB chunks, whatever their memfd order.
    c.write(2 * MIB - 100, &[9; 200]).unwrap();
    c.write(4 * MIB - 100, &[9; 200]).unwrap();
    assert!(!c.extents().unwrap().is_empty());
    c.pin(2 * MIB, PAGE, PinOwner(2)).unwrap();
    assert!(matches!(
        c.clone().destroy(),
        Err(StoreError::FileBusy { .. })
    ));
    c.unpin(2 * MIB, PAGE, PinOwner(2)).unwrap();

    drop(one);
    a.destroy().unwrap();
    drop(b);
    c.destroy().unwrap();
    drop(all);
}

#[test]
fn file_lives_leak_no_descriptor_and_no_mapping() {
    let _serial = serial();
    let store = Store::new(
        Box::new(ShuffledSource::new(HugePageSize::Base4K, 16, 0x1EAC).unwrap()),
        StoreOptions::default(),
    )
    .unwrap();
    // A first life warms up what is made once (thread-local state, the allocator's arenas).
    file_lives(&store, 0);
    let (fds, maps) = (fd_count(), maps_lines());
    const CYCLES: u64 = 150;
    for cycle in 1..=CYCLES {
        file_lives(&store, cycle);
        if cycle % 25 == 0 {
            // A whole store too: its memfd and its scrub view go with it.
            let other = Store::new(
                Box::new(ShuffledSource::new(HugePageSize::Base4K, 8, cycle).unwrap()),
                StoreOptions::default(),
            )
            .unwrap();
            file_lives(&other, cycle);
        }
    }
    let stats = store.stats();
    assert_eq!(
        (stats.files, stats.allocator.total.allocated_pages),
        (0, 0),
        "every file is gone"
    );
    store.check_invariants().unwrap();
    let (fds_after, maps_after) = (fd_count(), maps_lines());
    let new: Vec<&String> = maps_after.iter().filter(|l| !maps.contains(l)).collect();
    assert_eq!(
        (fds_after, maps_after.len()),
        (fds, maps.len()),
        "after {CYCLES} file lives: descriptors {fds} -> {fds_after}, mappings {} -> {}; new mappings: {new:#?}",
        maps.len(),
        maps_after.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Racing bytes

/// The VMM reads what a guest (another thread) is writing, through the store: bytes may mix
/// two writes, but only between aligned 8-byte words, and never anything that was not
/// written. (Copies are relaxed 8-byte atomics, so this is also no data race: under
/// ThreadSanitizer a plain copy shows up here as one.)
#[test]
fn racing_reads_and_writes_of_the_same_bytes_tear_only_between_words() {
    let _serial = serial();
    let store = Store::new(
        Box::new(ShuffledSource::new(HugePageSize::Base4K, 4, 0x7EA).unwrap()),
        StoreOptions::default(),
    )
    .unwrap();
    let file = store
        .create_file(FileOptions::new(8 * MIB).shared().populated())
        .unwrap();
    // Across the boundary of two chunks that are not neighbours in the memfd.
    let (start, len) = (2 * MIB - 3 * PAGE, 6 * PAGE);
    const ROUNDS: u64 = 3000;
    let written = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for generation in 1..=ROUNDS {
                let data: Vec<u8> =
                    std::iter::repeat_n(generation.to_le_bytes(), (len / 8) as usize)
                        .flatten()
                        .collect();
                file.write(start, &data).unwrap();
                written.store(generation, std::sync::atomic::Ordering::Release);
            }
        });
        s.spawn(|| {
            let mut buf = vec![0u8; len as usize];
            loop {
                let done = written.load(std::sync::atomic::Ordering::Acquire);
                file.read(start, &mut buf).unwrap();
                let after = written.load(std::sync::atomic::Ordering::Acquire);
                for (i, word) in buf.chunks(8).enumerate() {
                    let value = u64::from_le_bytes(word.try_into().unwrap());
                    assert!(
                        (done..=after + 1).contains(&value),
                        "word {i} reads {value:#x}, but the writes under way were {done}..={}",
                        after + 1
                    );
                }
                if done == ROUNDS {
                    break;
                }
            }
        });
    });
}
