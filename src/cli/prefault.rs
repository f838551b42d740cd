//! `pfnstore prefault`: obtains and prefaults N GiB with MAP_POPULATE and with parallel
//! MADV_POPULATE_WRITE threads, for 1G, 2M and ordinary pages side by side, and the cost of
//! resolving PFNs through pagemap. Grows hugetlb pools only with `--grow-pool`; what it adds
//! is given back when each source is dropped.

use std::time::Duration;

use pfnstore::hugetlb::{
    HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource, MemorySource, PfnKind, Prefault,
    Timings,
};

/// Arguments of `pfnstore prefault`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// GiB to obtain per run.
    #[arg(long, default_value_t = 2)]
    pub gib: u64,
    /// Threads for MADV_POPULATE_WRITE (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Grow the hugetlb pools by what is missing (root), giving it back afterwards.
    #[arg(long)]
    pub grow_pool: bool,
    /// Runs per cell; the best is printed (less noise from other load).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

struct Cell {
    timings: Timings,
    pfn_kind: Option<PfnKind>,
}

fn gib_per_s(bytes: u64, t: Duration) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64) / t.as_secs_f64().max(1e-9)
}

fn measure(
    bytes: u64,
    page_size: HugePageSize,
    prefault: Prefault,
    grow_pool: bool,
) -> Result<Cell, HugetlbError> {
    let source = HugetlbSource::new(HugetlbConfig {
        bytes,
        page_size,
        strict: true,
        numa_node: None,
        grow_pool,
        prefault,
        mlock: false,
    })?;
    let report = source.report();
    Ok(Cell {
        timings: report.timings,
        pfn_kind: report.pfn_kind,
    })
}

/// Runs the measurement and prints the table.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = args
        .gib
        .checked_mul(1 << 30)
        .filter(|b| *b > 0)
        .ok_or("--gib must be between 1 and 2^34")?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "obtaining and prefaulting {} GiB; 'obtain' = memfd+mmap+prefault (pool growth shown apart); best of {}",
        args.gib,
        args.runs.max(1)
    );
    println!(
        "{:<14} {:<22} {:>10} {:>10} {:>11} {:>16}",
        "pages", "prefault", "obtain ms", "GiB/s", "pool ms", "pagemap ms/GiB"
    );
    for page_size in HugePageSize::LADDER {
        let mut rates = Vec::new();
        for prefault in [Prefault::MapPopulate, Prefault::Threads(threads)] {
            let label = match prefault {
                Prefault::Threads(n) => format!("MADV_POPULATE_WRITE x{n}"),
                _ => "MAP_POPULATE".to_string(),
            };
            let mut best: Option<Cell> = None;
            let mut failure = None;
            for _ in 0..args.runs.max(1) {
                match measure(bytes, page_size, prefault, args.grow_pool) {
                    Ok(cell) => {
                        let t = |c: &Cell| c.timings.map + c.timings.prefault;
                        if best.as_ref().is_none_or(|b| t(&cell) < t(b)) {
                            best = Some(cell);
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            match (best, failure) {
                (Some(cell), None) => {
                    let obtain = cell.timings.map + cell.timings.prefault;
                    let rate = gib_per_s(bytes, obtain);
                    rates.push(rate);
                    let pagemap = if cell.pfn_kind == Some(PfnKind::Real) {
                        format!(
                            "{:.2}",
                            cell.timings.pfn_resolve.as_secs_f64() * 1e3 / args.gib as f64
                        )
                    } else {
                        "-".to_string()
                    };
                    println!(
                        "{:<14} {:<22} {:>10.1} {:>10.2} {:>11.1} {:>16}",
                        page_size.to_string(),
                        label,
                        obtain.as_secs_f64() * 1e3,
                        rate,
                        cell.timings.pool_grow.as_secs_f64() * 1e3,
                        pagemap
                    );
                }
                (_, Some(e)) => {
                    let why = e.to_string();
                    let why = why.lines().find(|l| l.contains("FAILED")).unwrap_or(&why);
                    println!(
                        "{:<14} {:<22} not measured: {}",
                        page_size.to_string(),
                        label,
                        why.trim()
                    );
                }
                (None, None) => {
                    unreachable!("at least one run happens and each gives a cell or an error")
                }
            }
        }
        if let [populate, threaded] = rates[..] {
            println!(
                "{:<14} threads / MAP_POPULATE = {:.2}x",
                page_size.to_string(),
                threaded / populate
            );
        }
    }
    Ok(())
}
