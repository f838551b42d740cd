//! Conversion transactions through the facade (issues 6 and 13).
//!
//! * `conversion/...`: 4K inside a uniform 1G and back with three no-op subscribers, a whole
//!   1 GiB, 64 GiB and 1 TiB (synthetic memory);
//! * `conversion/end-to-end 4K convert-and-back/...`: `GuestFile::convert` to shared and back
//!   in a populated private file, no subscribers, on each kind of store: synthetic (no host
//!   mapping), ordinary 4 KiB memory in a 1 GiB and in a 2 MiB file (the last rung of the
//!   fallback ladder), and real 1 GiB hugetlb pages (skipped, with the reason printed, where
//!   the pool cannot be grown), the last three with the file's host mapping. The metadata-only
//!   figure to compare with is `metadata/convert_4k_and_back_in_private_1g` (the metadata
//!   bench);
//! * `conversion/host mapping: protect one unit read-write and back/...`: the host mapping's
//!   part of the above, alone: `FileMapping::protect` of one protection unit (2 MiB of ordinary
//!   memory, a 1 GiB hugetlb page) to read-write and back, on a bare mapping of the store's
//!   memfd;
//! * `conversion/disjoint files, ...`: each thread converts 4K in its own file, on one and on
//!   two threads, time per pair (the ratio of the two is the scaling).
//!
//! Run: `cargo bench -p pfnstore-benches --bench conversion -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkGroup, Criterion, criterion_group, measurement::WallTime};
use pfnstore::hugetlb::{FileMapping, HugePageSize, Protection};
use pfnstore::{
    Change, ConvertMode, FileOptions, GuestFile, Interest, Registration, Shareability, Store,
    Subscriber, UnmapError,
};
use pfnstore_benches::stores::{self, GIB};
use pfnstore_benches::workers::Workers;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A subscriber that accepts everything and does nothing: the cost of the protocol itself.
struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        black_box(change.plan.unmap().len());
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        black_box(change.plan.map().len());
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn with_subscribers(store: &Store, n: usize) -> (Vec<Arc<dyn Subscriber>>, Vec<Registration>) {
    let subs: Vec<Arc<dyn Subscriber>> = (0..n)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let regs = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All).expect("subscribe"))
        .collect();
    (subs, regs)
}

fn convert_and_back(file: &GuestFile, offset: u64, len: u64) {
    file.convert(offset, len, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    file.convert(offset, len, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
}

/// The protocol with three no-op subscribers, on synthetic memory.
fn with_three_subscribers(group: &mut BenchmarkGroup<'_, WallTime>) {
    let s = stores::synthetic(2, 1);
    let (_subs, _regs) = with_subscribers(&s, 3);
    let file = s.create_file(FileOptions::new(GIB).populated()).unwrap();
    group.bench_function("4K in uniform 1G, split + merge, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&file, 1000 * PAGE, PAGE))
    });
    group.bench_function("whole 1 GiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&file, 0, GIB))
    });

    let big = stores::synthetic(1024, 2);
    let (_subs_big, _regs_big) = with_subscribers(&big, 3);
    let tib = big
        .create_file(FileOptions::new(1024 * GIB).populated())
        .unwrap();
    group.bench_function("whole 1 TiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&tib, 0, 1024 * GIB))
    });
    group.bench_function("64 GiB and back, 3 subscribers", |b| {
        b.iter(|| convert_and_back(&tib, 0, 64 * GIB))
    });
}

/// `GuestFile::convert` of page 1000 (of a 2 MiB file: page 100) to shared and back, in a
/// populated private file of `file_bytes`, no subscribers.
fn end_to_end(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    store: &Store,
    file_bytes: u64,
) {
    let file = store
        .create_file(FileOptions::new(file_bytes).populated())
        .expect("file");
    let offset = if file_bytes > 1000 * PAGE { 1000 } else { 100 } * PAGE;
    group.bench_function(format!("end-to-end 4K convert-and-back/{name}"), |b| {
        b.iter(|| convert_and_back(&file, offset, PAGE))
    });
}

/// One `FileMapping::protect` of a protection unit to read-write and one back to none, on a
/// bare mapping of `store`'s memfd laid out as a file's (the unit inside one mapped extent where
/// the memory allows): the host mapping's share of a convert-and-back, whose protection rule
/// changes one unit each way.
fn protect_pair(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, store: &Store) {
    let file = store.create_file(FileOptions::new(PAGE)).expect("file");
    let unit = file.stats().protection_unit;
    drop(file);
    let memfd = store.memfd().expect("a store with host memory has a memfd");
    let align = match memfd.page_size() {
        HugePageSize::Base4K => HugePageSize::Huge2M,
        huge => huge,
    };
    let (len, at) = if 3 * unit <= memfd.len() {
        (3 * unit, unit)
    } else {
        (unit, 0)
    };
    let mapping = FileMapping::reserve(len, align).expect("reserve");
    mapping
        .map(0, memfd.fd(), 0, len, Protection::None)
        .expect("map the memfd");
    group.bench_function(
        format!("host mapping: protect one unit read-write and back/{name}"),
        |b| {
            b.iter(|| {
                mapping.protect(at, unit, Protection::ReadWrite).unwrap();
                mapping.protect(at, unit, Protection::None).unwrap();
            })
        },
    );
}

fn end_to_end_rows(group: &mut BenchmarkGroup<'_, WallTime>) {
    let synthetic = stores::synthetic(2, 1);
    end_to_end(group, "synthetic, 1 GiB file", &synthetic, GIB);
    drop(synthetic);

    // The 4 KiB fallback: a 2 GiB store of ordinary pages, prefaulted by threads.
    match stores::ordinary(2, 1) {
        Ok(ordinary) => {
            end_to_end(
                group,
                "ordinary 4K memory + host mapping, 1 GiB file",
                &ordinary,
                GIB,
            );
            end_to_end(
                group,
                "ordinary 4K memory + host mapping, 2 MiB file",
                &ordinary,
                2 * MIB,
            );
            protect_pair(group, "ordinary 4K memory, 2 MiB unit", &ordinary);
        }
        Err(why) => println!("skipped: end-to-end on ordinary memory: {why}"),
    }

    match stores::hugetlb_1g(1, 1) {
        Ok(hugetlb) => {
            end_to_end(
                group,
                "real 1G hugetlb + host mapping, 1 GiB file",
                &hugetlb,
                GIB,
            );
            protect_pair(group, "real 1G hugetlb, 1 GiB unit", &hugetlb);
        }
        Err(why) => println!("skipped: end-to-end on real 1 GiB hugetlb: {why}"),
    }
}

/// Each thread converts 4K in its own 1 GiB file; time per conversion pair, on one and two
/// threads. `label` names the store (and subscribers).
fn disjoint_files(
    group: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    store: &Store,
    subscribers: usize,
) {
    let (_subs, _regs) = with_subscribers(store, subscribers);
    let files: Vec<_> = (0..2)
        .map(|_| {
            store
                .create_file(FileOptions::new(GIB).populated())
                .unwrap()
        })
        .collect();
    for threads in [1usize, 2] {
        // One long-lived worker per file, each converting its share of the sample's pairs; the
        // span from the first start to the last end gives criterion the time per pair at
        // that parallelism.
        let jobs = files[..threads]
            .iter()
            .map(|file| {
                let file = file.clone();
                Box::new(move |pairs: u64| {
                    for i in 0..pairs {
                        convert_and_back(&file, (i % 4096) * PAGE * 7, PAGE);
                    }
                }) as Box<dyn Fn(u64) + Send>
            })
            .collect();
        let workers = Workers::new(jobs);
        group.bench_function(
            format!("disjoint files, {label}{threads} thread(s), per op"),
            |b| b.iter_custom(|iters| workers.round(iters.div_ceil(workers.len() as u64))),
        );
    }
}

fn disjoint_rows(group: &mut BenchmarkGroup<'_, WallTime>) {
    // These rows keep their first names (earlier results in benches/RESULTS.md use them):
    // synthetic memory, three no-op subscribers.
    let synthetic = stores::synthetic(4, 2);
    disjoint_files(group, "", &synthetic, 3);
    drop(synthetic);
    let synthetic = stores::synthetic(4, 2);
    disjoint_files(group, "synthetic, no subscribers, ", &synthetic, 0);
    drop(synthetic);
    match stores::ordinary(2, 2) {
        Ok(ordinary) => disjoint_files(
            group,
            "ordinary 4K memory + host mapping, no subscribers, ",
            &ordinary,
            0,
        ),
        Err(why) => println!("skipped: disjoint files on ordinary memory: {why}"),
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("conversion");
    with_three_subscribers(&mut group);
    end_to_end_rows(&mut group);
    disjoint_rows(&mut group);
    group.finish();
}

criterion_group!(conversion, benches);

fn main() {
    conversion();
    Criterion::default().configure_from_args().final_summary();
}
