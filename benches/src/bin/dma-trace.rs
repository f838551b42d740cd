//! The DMA-mapping trace (benches/RESULTS.md, "DMA mappings over a confidential guest's
//! life"): one deterministic life of a confidential guest on
//! a synthetic 64 GiB store, replayed once per mapper policy with the reference
//! [`IommuMapper`] registered, and a markdown table of what each policy costs.
//!
//! The life:
//!
//! 1. boot: a populated 64 GiB file, all private;
//! 2. the swiotlb (64 MiB, or 1 GiB in the second run) and one 4 KiB page per vCPU (8 vCPUs)
//!    go shared, for good;
//! 3. 100,000 bounce buffers: a random range of 4 KiB to 2 MiB (uniform in pages, at a random
//!    page, clear of the swiotlb, the vCPU pages and the buffers in flight) goes shared, and
//!    back to private once `--in-flight` newer buffers were shared (default 16; 1 converts
//!    every buffer back right away);
//! 4. teardown: the file is destroyed.
//!
//! A third scenario is the worst case the issue names for per-run mapping: 4 KiB converted to
//! private and back inside a shared, 1 GiB-aligned 1 GiB (1,000 times).
//!
//! Per policy: live mappings (most at any time, after the trace, after teardown), map and unmap
//! calls per conversion and bytes unmapped and mapped per conversion (over the bounce phase:
//! one conversion is one `convert` call), and whether the most live mappings fit under vfio
//! type1's default `dma_entry_limit` of 65,535. The mapper checks every plan (an unmap must name
//! whole earlier mappings); a violation fails the run.
//!
//! ```text
//! cargo run --release -p pfnstore-benches --bin dma-trace -- [--buffers N] [--in-flight N] [--seed N]
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use pfnstore::core::PageSize;
use pfnstore::core::testing::XorShift;
use pfnstore::subscribers::{DmaPolicy, IommuMapper, MapperStats};
use pfnstore::{
    ConvertMode, FileOptions, GuestFile, Interest, OffsetRange, PageOffset, Shareability,
    Subscriber,
};
use pfnstore_benches::stores::{self, GIB};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// vfio type1's default `dma_entry_limit`.
const DMA_ENTRY_LIMIT: u64 = 65_535;
const GUEST_GIB: u64 = 64;
const VCPUS: u64 = 8;

/// What the trace does, fixed by the command line.
#[derive(Debug, Clone, Copy)]
struct Trace {
    buffers: u64,
    in_flight: usize,
    seed: u64,
}

/// One scenario: where the swiotlb lies, and what runs after boot.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    swiotlb: (u64, u64),
    /// Bounce buffers (false: the 4 KiB-inside-shared-1 GiB worst case instead).
    bounce: bool,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "64 GiB guest, 64 MiB swiotlb + 8 vCPU pages shared, bounce buffers",
        // Below 4 GiB, 2 MiB-aligned, as the guest kernel allocates it (top-down in low memory).
        swiotlb: (3584 * MIB - 64 * MIB, 64 * MIB),
        bounce: true,
    },
    Scenario {
        name: "64 GiB guest, 1 GiB swiotlb + 8 vCPU pages shared, bounce buffers",
        // 2 MiB- but not 1 GiB-aligned: two 1 GiB blocks partly shared.
        swiotlb: (2560 * MIB, GIB),
        bounce: true,
    },
    Scenario {
        name: "worst case for per-run mapping: 4 KiB to private and back inside a shared 1 GiB",
        swiotlb: (2 * GIB, GIB),
        bounce: false,
    },
];

const POLICIES: [(&str, DmaPolicy); 4] = [
    ("Blocks (iommufd, plan blocks)", DmaPolicy::Blocks),
    ("Runs(2M) (vfio type1)", DmaPolicy::Runs(PageSize::Size2M)),
    ("Runs(1G)", DmaPolicy::Runs(PageSize::Size1G)),
    ("PerPage (QEMU, cloud-hypervisor)", DmaPolicy::PerPage),
];

/// What one policy did in one scenario.
#[derive(Debug)]
struct Outcome {
    after_boot: MapperStats,
    after_trace: MapperStats,
    after_teardown: MapperStats,
    conversions: u64,
    bytes_converted: u64,
    seconds: f64,
}

fn main() {
    let trace = parse_args();
    println!(
        "# DMA mappings over a confidential guest's life\n\n{} bounce buffers, {} in flight, seed {:#x}; synthetic 64 GiB store; one conversion = one `convert` call; bytes are per conversion of the bounce phase.\n",
        trace.buffers, trace.in_flight, trace.seed
    );
    for scenario in SCENARIOS {
        println!("## {}\n", scenario.name);
        println!(
            "| policy | live max | after boot | after trace | after teardown | map calls/conv | unmap calls/conv | bytes unmapped/conv | bytes mapped/conv | max fits 65,535 | time |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
        let mut changed = 0.0;
        for (name, policy) in POLICIES {
            let o = run(scenario, policy, trace);
            let (a, b) = (&o.after_boot, &o.after_trace);
            let per = |x: u64, y: u64| (x - y) as f64 / o.conversions as f64;
            changed = o.bytes_converted as f64 / o.conversions as f64;
            println!(
                "| {name} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {:.1} s |",
                o.after_teardown.max_mappings,
                a.mappings,
                b.mappings,
                o.after_teardown.mappings,
                per(b.map_calls, a.map_calls),
                per(b.unmap_calls, a.unmap_calls),
                bytes(per(b.bytes_unmapped, a.bytes_unmapped)),
                bytes(per(b.bytes_mapped, a.bytes_mapped)),
                if o.after_teardown.max_mappings <= DMA_ENTRY_LIMIT {
                    "yes"
                } else {
                    "**no**"
                },
                o.seconds,
            );
        }
        println!(
            "\n{} changes shareability per conversion on average.\n",
            bytes(changed)
        );
    }
}

fn run(scenario: Scenario, policy: DmaPolicy, trace: Trace) -> Outcome {
    let start = Instant::now();
    let store = stores::synthetic(GUEST_GIB, 1);
    let file = store
        .create_file(FileOptions::new(GUEST_GIB * GIB).populated())
        .expect("a 64 GiB file");
    let mapper = Arc::new(IommuMapper::with_policy("dma", store.geometry(), policy));
    let subscriber: Arc<dyn Subscriber> = mapper.clone();
    let registration = store
        .subscribe(&subscriber, Interest::All)
        .expect("subscribe");

    let mut rng = XorShift::new(trace.seed | 1);
    let (swiotlb_start, swiotlb_len) = scenario.swiotlb;
    let swiotlb = range(swiotlb_start / PAGE, swiotlb_len / PAGE);
    convert(&file, swiotlb, Shareability::Shared);
    let mut fixed = vec![swiotlb];
    // One page per vCPU (the GHCB or the hypercall page), scattered below 4 GiB.
    while fixed.len() < 1 + VCPUS as usize {
        let page = range(rng.below(4 * GIB / PAGE), 1);
        if !fixed.iter().any(|f| f.overlaps(&page)) {
            convert(&file, page, Shareability::Shared);
            fixed.push(page);
        }
    }
    let after_boot = mapper.stats();

    let (mut conversions, mut bytes_converted) = (0u64, 0u64);
    let mut count = |r: OffsetRange| {
        conversions += 1;
        bytes_converted += r.len() * PAGE;
    };
    if scenario.bounce {
        let pages = GUEST_GIB * GIB / PAGE;
        let mut in_flight: VecDeque<OffsetRange> = VecDeque::with_capacity(trace.in_flight + 1);
        for _ in 0..trace.buffers {
            let len = 1 + rng.below(512);
            let buffer = loop {
                let b = range(rng.below(pages - len), len);
                let clear = |f: &OffsetRange| !f.overlaps(&b);
                if fixed.iter().all(clear) && in_flight.iter().all(clear) {
                    break b;
                }
            };
            convert(&file, buffer, Shareability::Shared);
            count(buffer);
            in_flight.push_back(buffer);
            if in_flight.len() >= trace.in_flight
                && let Some(done) = in_flight.pop_front()
            {
                convert(&file, done, Shareability::Private);
                count(done);
            }
        }
        for done in in_flight.drain(..) {
            convert(&file, done, Shareability::Private);
            count(done);
        }
    } else {
        let page = range(swiotlb.start().0 + 1000, 1);
        for _ in 0..1000 {
            convert(&file, page, Shareability::Private);
            convert(&file, page, Shareability::Shared);
            count(page);
            count(page);
        }
    }
    let after_trace = mapper.stats();

    file.destroy().expect("teardown");
    let after_teardown = mapper.stats();
    let violations = mapper.violations();
    assert!(
        violations.is_empty(),
        "{policy:?} saw plan violations: {violations:#?}"
    );
    drop(registration);
    Outcome {
        after_boot,
        after_trace,
        after_teardown,
        conversions,
        bytes_converted,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn convert(file: &GuestFile, pages: OffsetRange, to: Shareability) {
    file.convert(
        pages.start().byte(),
        pages.len() * PAGE,
        to,
        ConvertMode::Preserve,
    )
    .expect("convert");
}

fn range(start: u64, pages: u64) -> OffsetRange {
    OffsetRange::from_len(PageOffset(start), pages).expect("a valid range")
}

/// Bytes for people: B, KiB, MiB, GiB with one decimal.
fn bytes(b: f64) -> String {
    let units = [("GiB", GIB as f64), ("MiB", MIB as f64), ("KiB", 1024.0)];
    for (unit, size) in units {
        if b >= size {
            return format!("{:.1} {unit}", b / size);
        }
    }
    format!("{b:.0} B")
}

fn parse_args() -> Trace {
    let mut trace = Trace {
        buffers: 100_000,
        in_flight: 16,
        seed: 0x00d1_a5ee_d000_0013,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| parse_number(&v));
        match (flag.as_str(), value) {
            ("--buffers", Some(v)) => trace.buffers = v,
            ("--in-flight", Some(v)) if v > 0 => trace.in_flight = v as usize,
            ("--seed", Some(v)) => trace.seed = v,
            _ => {
                eprintln!("usage: dma-trace [--buffers N] [--in-flight N (>= 1)] [--seed N]");
                std::process::exit(2);
            }
        }
    }
    trace
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}
