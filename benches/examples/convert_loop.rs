//! A tight loop of 4K convert-and-back in a private file, for profilers (`perf record`,
//! `valgrind --tool=callgrind`) and for checking how disjoint files scale:
//!
//! ```text
//! cargo run --release -p pfnstore-benches --example convert_loop -- \
//!     [pairs] [threads] [subscribers] [synthetic|ordinary|hugetlb] [file MiB]
//! ```
//!
//! Defaults: 1,000,000 pairs, 1 thread, 3 no-op subscribers, synthetic memory, 1024 MiB files.
//! `ordinary` is ordinary 4 KiB memory with each file's host mapping; `hugetlb` real 1 GiB
//! pages (root; the pool is grown by at most 2 GiB and given back at exit), host mapping too.
//! Each thread converts page 1000 of its own file to shared and back.

use std::sync::Arc;

use pfnstore::{
    Change, ConvertMode, FileOptions, Interest, Shareability, Store, Subscriber, UnmapError,
};
use pfnstore_benches::stores::{self, GIB};

struct NoOp;

impl Subscriber for NoOp {
    fn name(&self) -> &str {
        "no-op"
    }
    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        std::hint::black_box(change.plan.unmap().len());
        Ok(())
    }
    fn map(&self, change: &Change<'_>) {
        std::hint::black_box(change.plan.map().len());
    }
    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (pairs, threads, subscribers) = (arg(1, 1_000_000), arg(2, 1), arg(3, 3));
    let source = args.get(4).map_or("synthetic", String::as_str);
    let file_bytes = arg(5, 1024) << 20;
    let files_gib = (threads * file_bytes).div_ceil(GIB);
    let shards = threads as usize;
    // Held until the end: the hugetlb store gives its pages back when dropped.
    let mut _hugetlb = None;
    let store: Store = match source {
        "synthetic" => stores::synthetic(files_gib + 1, shards),
        "ordinary" => stores::ordinary(files_gib, shards).unwrap_or_else(|e| exit_skip(&e)),
        "hugetlb" => {
            let s = stores::hugetlb_1g(files_gib, shards).unwrap_or_else(|e| exit_skip(&e));
            let store = s.store.clone();
            _hugetlb = Some(s);
            store
        }
        other => {
            eprintln!("unknown source {other:?}: synthetic, ordinary or hugetlb");
            std::process::exit(2);
        }
    };
    let subs: Vec<Arc<dyn Subscriber>> = (0..subscribers)
        .map(|_| Arc::new(NoOp) as Arc<dyn Subscriber>)
        .collect();
    let _regs: Vec<_> = subs
        .iter()
        .map(|s| store.subscribe(s, Interest::All).expect("subscribe"))
        .collect();
    let files: Vec<_> = (0..threads)
        .map(|_| {
            store
                .create_file(FileOptions::new(file_bytes).populated())
                .expect("file")
        })
        .collect();
    let page = 4096 * 1000 % file_bytes;
    let start = std::time::Instant::now();
    let cpu: Vec<(f64, f64)> = std::thread::scope(|s| {
        let workers: Vec<_> = files
            .iter()
            .map(|file| {
                s.spawn(move || {
                    let before = thread_cpu();
                    for _ in 0..pairs {
                        file.convert(page, 4096, Shareability::Shared, ConvertMode::Preserve)
                            .expect("convert");
                        file.convert(page, 4096, Shareability::Private, ConvertMode::Preserve)
                            .expect("convert");
                    }
                    let after = thread_cpu();
                    (after.0 - before.0, after.1 - before.1)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let elapsed = start.elapsed();
    let per = elapsed / pairs as u32;
    let rate = (pairs * threads) as f64 / elapsed.as_secs_f64();
    let (user, system) = cpu
        .iter()
        .fold((0.0, 0.0), |(u, k), (du, dk)| (u + du, k + dk));
    let per_pair = |seconds: f64| seconds * 1e9 / (pairs * threads) as f64;
    println!(
        "{source}, {} MiB files, {threads} thread(s), {subscribers} subscriber(s): {per:?} per pair per thread, {rate:.0} pairs/s in all; CPU per pair: {:.0} ns user, {:.0} ns system",
        file_bytes >> 20,
        per_pair(user),
        per_pair(system),
    );
}

/// This thread's user and system CPU seconds so far (`/proc/thread-self/stat`, in clock ticks
/// of 10 ms: enough over a loop of a second or more), or zeros where that cannot be read.
fn thread_cpu() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return (0.0, 0.0);
    };
    // Fields after the command (which may contain spaces) start after the last ')'; utime and
    // stime are fields 14 and 15 of the line, i.e. 12 and 13 after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    const TICKS_PER_SECOND: f64 = 100.0;
    (ticks(11) / TICKS_PER_SECOND, ticks(12) / TICKS_PER_SECOND)
}

fn exit_skip(reason: &str) -> ! {
    println!("skipped: {reason}");
    std::process::exit(0);
}
