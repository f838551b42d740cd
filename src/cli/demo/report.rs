//! The demo's report: operation times, splits and merges, refusals, quarantines, DMA
//! mappings, metadata bytes.

use std::io::Write;

use pfnstore::Store;

use super::life::Outcome;
use crate::cli::units::Bytes;

const PAGE: u64 = 4096;

/// `ns` as a short duration.
fn duration(ns: u64) -> String {
    match ns {
        n if n < 10_000 => format!("{n} ns"),
        n if n < 10_000_000 => format!("{:.1} µs", n as f64 / 1e3),
        n if n < 10_000_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        n => format!("{:.1} s", n as f64 / 1e9),
    }
}

/// The `q`-quantile of sorted `samples`.
fn quantile(samples: &[u64], q: f64) -> u64 {
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}

pub(super) fn print(store: &Store, outcome: &Outcome, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "== report")?;
    writeln!(
        out,
        "{:<28} {:>9} {:>10} {:>10}",
        "operation", "count", "median", "p99"
    )?;
    for (what, samples) in &outcome.timings.0 {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            continue;
        }
        writeln!(
            out,
            "{what:<28} {:>9} {:>10} {:>10}",
            sorted.len(),
            duration(quantile(&sorted, 0.5)),
            duration(quantile(&sorted, 0.99))
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "blocks split: {}, merged back: {} (1G and 2M blocks; merges happen in the same call)",
        outcome.split_blocks, outcome.merged_blocks
    )?;
    writeln!(
        out,
        "refusals over the whole run (the reuse check included): {} while a device held the buffer pinned, {} vetoed by a busy device",
        outcome.refused_pinned, outcome.refused_vetoed
    )?;
    let stats = store.stats();
    writeln!(
        out,
        "quarantined: {} pages (a device could neither unmap nor map back; the change was rolled back); the allocator holds {} quarantined",
        outcome.quarantined_pages, stats.allocator.total.quarantined_pages
    )?;
    writeln!(
        out,
        "DMA mappings, vfio-like mapper (runs cut at 2 MiB): {} live now, {} at most, {} map + {} unmap calls, {} remapped",
        outcome.vfio.mappings,
        outcome.vfio.max_mappings,
        outcome.vfio.map_calls,
        outcome.vfio.unmap_calls,
        Bytes(outcome.vfio.bytes_mapped)
    )?;
    writeln!(
        out,
        "  a per-4 KiB policy (QEMU, cloud-hypervisor) for the same plans: {} live now, {} at most, {} map + {} unmap calls",
        outcome.per_page.mappings,
        outcome.per_page.max_mappings,
        outcome.per_page.map_calls,
        outcome.per_page.unmap_calls
    )?;
    let files: u64 = outcome.vms.iter().map(|f| f.stats().metadata.bytes).sum();
    let physical = stats.physical.bytes;
    let memory = store.capacity();
    writeln!(
        out,
        "metadata: {} for the files + {} physical = {} for {}; struct page (64 B per 4 KiB) would be {}, a bitmap (1 bit per 4 KiB) {}",
        Bytes(files),
        Bytes(physical),
        Bytes(files + physical),
        Bytes(memory),
        Bytes(memory / PAGE * 64),
        Bytes(memory / PAGE / 8)
    )?;
    if outcome.problems.is_empty() {
        writeln!(out, "reference subscribers: every plan was exact")?;
    } else {
        writeln!(
            out,
            "reference subscribers found problems: {:?}",
            outcome.problems
        )?;
    }
    Ok(())
}
