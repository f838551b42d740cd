//! `pfnstore prefault`: obtains and prefaults memory with MAP_POPULATE and with parallel
//! MADV_POPULATE_WRITE threads, for 1 GiB, 2 MiB and ordinary pages, and the cost of resolving
//! PFNs through pagemap. Grows hugetlb pools only with `--grow-pool`; what it adds is given
//! back when each source is dropped.
//!
//! A fair comparison needs three things the first version lacked:
//!
//! * **Cold apart from warm.** The first time memory is touched can cost far more than later
//!   times (on a VM the host backs guest memory on first touch). Each page size starts with
//!   one *cold* obtain, reported on its own line and compared with nothing.
//! * **Alternating order.** The warm rounds time both methods, and the method that goes first
//!   alternates, so that neither always runs on memory the other has just released.
//! * **No speed-up from one run.** A ratio is printed only from two or more warm runs of each
//!   method (their medians); with one, the times are printed and the reason for no ratio.

use std::io::Write;
use std::time::Duration;

use pfnstore::hugetlb::{
    HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource, MemorySource, PfnKind, Prefault,
};

use super::Outcome;
use super::show::{self, PageKind, PrefaultMethod};
use super::units::{self, Bytes, GIB};

/// Arguments of `pfnstore prefault`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Memory to obtain per run: 1G, 4G, ... (a bare number is GiB; --gib is the same flag).
    /// A whole number of GiB, at most this machine's memory.
    #[arg(long, alias = "gib", value_name = "SIZE", default_value = "2G",
          value_parser = units::machine_size)]
    pub size: Bytes,
    /// Threads for MADV_POPULATE_WRITE, 1 or more (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Grow the hugetlb pools by what is missing (root), giving it back after each run.
    #[arg(long)]
    pub grow_pool: bool,
    /// Warm rounds per page size (1 to 100), each timing both methods; the speed-up is printed
    /// from 2 rounds on.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
}

/// What one obtain cost.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// memfd + mmap + prefault.
    obtain: Duration,
    /// Growing the pool (zero without `--grow-pool`).
    pool_grow: Duration,
    /// Reading pagemap, when the PFNs are real.
    pagemap: Option<Duration>,
}

fn measure(
    bytes: Bytes,
    page_size: HugePageSize,
    prefault: Prefault,
    grow_pool: bool,
) -> Result<Sample, HugetlbError> {
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes.0)
            .with_page_size(page_size)
            .with_strict(true)
            .with_grow_pool(grow_pool)
            .with_prefault(prefault),
    )?;
    let report = source.report();
    let t = report.timings;
    Ok(Sample {
        obtain: t.map + t.prefault,
        pool_grow: t.pool_grow,
        pagemap: (report.pfn_kind == Some(PfnKind::Real)).then_some(t.pfn_resolve),
    })
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2
    }
}

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

fn gib_per_s(bytes: Bytes, t: Duration) -> f64 {
    (bytes.0 as f64 / GIB as f64) / t.as_secs_f64().max(1e-9)
}

/// The two methods compared, by the short name the order line uses.
fn short_name(method: Prefault) -> &'static str {
    match method {
        Prefault::Threads(_) => "threads",
        _ => "MAP_POPULATE",
    }
}

/// The width of the page-kind column.
const KIND: usize = 21;

/// Runs the measurement and prints the table.
pub(crate) fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let size = args.size;
    let runs = args.runs as usize;
    // Index 0 goes first in even rounds, index 1 in odd ones.
    let methods = [Prefault::Threads(threads), Prefault::MapPopulate];
    writeln!(
        out,
        "prefault: obtaining {size} per run (memfd + mmap + prefault), one page size at a time; {}",
        if args.grow_pool {
            "pools are grown by what is missing and given back after each run"
        } else {
            "pools are not grown (--grow-pool grows them)"
        }
    )?;
    writeln!(
        out,
        "per page size: one cold obtain first (first touch; on a VM it can include the host \
         backing memory the guest never touched), then {runs} warm round{} timing both methods, \
         alternating which goes first",
        if runs == 1 { "" } else { "s" }
    )?;
    let mut measured_any = false;
    for page_size in HugePageSize::LADDER {
        let kind = PageKind(page_size).to_string();
        let cold_method = Prefault::MapPopulate;
        let cold = match measure(size, page_size, cold_method, args.grow_pool) {
            Ok(sample) => sample,
            Err(e) => {
                writeln!(out, "{kind:<KIND$} not measured: {}", show::failure(&e))?;
                continue;
            }
        };
        measured_any = true;
        writeln!(
            out,
            "{kind:<KIND$} cold: the first obtain ({}) took {:.1} ms, {:.2} GiB/s; not compared",
            PrefaultMethod(cold_method),
            ms(cold.obtain),
            gib_per_s(size, cold.obtain)
        )?;

        let mut warm: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        let mut order = Vec::new();
        let mut failure = None;
        'rounds: for round in 0..runs {
            let first = round % 2;
            order.push(short_name(methods[first]));
            for i in [first, 1 - first] {
                match measure(size, page_size, methods[i], args.grow_pool) {
                    Ok(sample) => warm[i].push(sample),
                    Err(e) => {
                        failure = Some(e);
                        break 'rounds;
                    }
                }
            }
        }
        if let Some(e) = failure {
            writeln!(
                out,
                "{kind:<KIND$} warm rounds not measured: {}",
                show::failure(&e)
            )?;
            continue;
        }
        let mut medians = [Duration::ZERO; 2];
        for (i, method) in methods.iter().enumerate() {
            let times: Vec<Duration> = warm[i].iter().map(|s| s.obtain).collect();
            medians[i] = median(&times);
            let spread = if runs > 1 {
                let min = times.iter().min().copied().unwrap_or_default();
                format!(" median (min {:.1})", ms(min))
            } else {
                String::new()
            };
            let pool = median(&warm[i].iter().map(|s| s.pool_grow).collect::<Vec<_>>());
            let pool = if args.grow_pool && page_size.is_hugetlb() {
                format!(", pool grown in {:.1} ms", ms(pool))
            } else {
                String::new()
            };
            let pagemap: Vec<Duration> = warm[i].iter().filter_map(|s| s.pagemap).collect();
            let pagemap = if pagemap.is_empty() {
                String::new()
            } else {
                format!(
                    ", pagemap {:.2} ms/GiB",
                    ms(median(&pagemap)) / (size.0 / GIB) as f64
                )
            };
            writeln!(
                out,
                "{kind:<KIND$} {:<34} warm {:.1} ms{spread}, {:.2} GiB/s{pool}{pagemap}",
                PrefaultMethod(*method).to_string(),
                ms(medians[i]),
                gib_per_s(size, medians[i]),
            )?;
        }
        writeln!(
            out,
            "{kind:<KIND$} order of the {runs} warm round{}: {}",
            if runs == 1 { "" } else { "s" },
            order
                .iter()
                .map(|m| format!("{m} first"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        if runs >= 2 {
            let [threaded, populate] = medians;
            writeln!(
                out,
                "{kind:<KIND$} speed-up: threads are {:.2}x as fast as MAP_POPULATE (medians of {runs} warm runs each)",
                populate.as_secs_f64() / threaded.as_secs_f64().max(1e-9)
            )?;
        } else {
            writeln!(
                out,
                "{kind:<KIND$} no speed-up: one warm run per method is too few to compare; use --runs 2 or more"
            )?;
        }
    }
    if measured_any {
        Ok(())
    } else {
        Err("nothing could be measured: every page size failed (see above)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(5)]), ms(5));
        assert_eq!(median(&[ms(9), ms(1), ms(5)]), ms(5));
        assert_eq!(median(&[ms(8), ms(2), ms(4), ms(6)]), ms(5));
    }
}
