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
    std::thread::scope(|s| {
        for file in &files {
            s.spawn(move || {
                for _ in 0..pairs {
                    file.convert(page, 4096, Shareability::Shared, ConvertMode::Preserve)
                        .expect("convert");
                    file.convert(page, 4096, Shareability::Private, ConvertMode::Preserve)
                        .expect("convert");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let per = elapsed / pairs as u32;
    let rate = (pairs * threads) as f64 / elapsed.as_secs_f64();
    println!(
        "{source}, {} MiB files, {threads} thread(s), {subscribers} subscriber(s): {per:?} per pair per thread, {rate:.0} pairs/s in all",
        file_bytes >> 20
    );
}

fn exit_skip(reason: &str) -> ! {
    println!("skipped: {reason}");
    std::process::exit(0);
}
