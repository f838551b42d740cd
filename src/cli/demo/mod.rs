//! `pfnstore demo`: the life of confidential VMs on one store.
//!
//! Several VMs (files) boot on one store with all their memory private; each converts a
//! 64 MiB swiotlb and a page per vCPU to shared; then a steady state of bounce-buffer
//! conversions runs while a device pins some buffers (their conversions back are refused),
//! a subscriber vetoes now and then, and one device fails to unmap (its range is
//! quarantined). Finally a VM is torn down and its memory, scrubbed, goes to the next VM,
//! which reads zeros. The report gives operation times, splits and merges, refusals,
//! quarantines, DMA mappings next to a per-4 KiB policy, metadata bytes next to `struct page`
//! and a bitmap, and two pictures.
//!
//! The modules: [`life`] runs the VMs, [`report`] counts and prints, [`picture`] draws.

mod life;
mod picture;
mod report;

use std::io::Write;
use std::path::PathBuf;

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::{HugetlbConfig, HugetlbSource, SyntheticSource};
use pfnstore::{Store, StoreOptions};

use super::show::{Source, indent};
use super::units::{self, Bytes, GIB, SizeLimit};
use super::{Outcome, UsageError};

/// Arguments of `pfnstore demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Size of the store: 4G, 16T, ... (a bare number is GiB). A whole number of GiB, up to
    /// this machine's memory, or up to 1 PiB with --synthetic.
    #[arg(long, alias = "size-gib", value_name = "SIZE", default_value = "4G",
          value_parser = units::store_size)]
    pub size: Bytes,
    /// Run on synthetic PFNs (no memory behind them), at any scale: `--synthetic --size 16T`.
    #[arg(long, conflicts_with = "grow_pool")]
    pub synthetic: bool,
    /// Real memory is the default; kept so that older command lines work.
    #[arg(long, hide = true, conflicts_with = "synthetic")]
    pub hugetlb: bool,
    /// Grow the 1 GiB hugetlb pool by what is missing (root; given back at exit). Without it
    /// the demo takes what the pool has and falls back to 2 MiB pages, then ordinary memory.
    #[arg(long)]
    pub grow_pool: bool,
    /// VMs running at once (one file each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vms: u64,
    /// vCPUs per VM (each converts one 4 KiB page to shared).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub vcpus: u64,
    /// Bounce-buffer conversions (shared and back) in all.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub conversions: u64,
    /// Where the pictures go.
    #[arg(long, value_name = "DIR", default_value = "target/pfnstore-demo")]
    pub out_dir: PathBuf,
    /// Seed of the run's random choices (the run is deterministic for a seed).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs the demonstration.
pub(crate) fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let store = if args.synthetic {
        let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), args.size.0 / GIB)?;
        Store::synthetic(source, StoreOptions::default())?
    } else {
        let size = SizeLimit::machine()?
            .check(args.size)
            .map_err(|message| UsageError {
                command: "demo",
                message: format!(
                    "invalid value '{}' for '--size <SIZE>' on real memory: {message} (--synthetic runs any size up to 1 PiB)",
                    args.size
                ),
            })?;
        let source = HugetlbSource::new(HugetlbConfig::new(size.0).with_grow_pool(args.grow_pool))?;
        Store::from_hugetlb(source, StoreOptions::default())?
    };
    writeln!(
        out,
        "memory source:\n{}",
        indent(&Source(store.source_report()).to_string())
    )?;
    writeln!(out)?;
    writeln!(out, "== one conversion")?;
    let tour = super::tour::run(&store, out)?;
    writeln!(out)?;
    writeln!(
        out,
        "== the life of {} VMs on {} ({} vCPUs each, {} bounce-buffer conversions)",
        args.vms, args.size, args.vcpus, args.conversions
    )?;
    let outcome = life::run(&store, args, out)?;
    writeln!(out)?;
    report::print(&store, &outcome, out)?;
    let pictures = picture::draw(&args.out_dir, &outcome, &tour, &store)?;
    writeln!(out)?;
    writeln!(out, "pictures:")?;
    for (path, what) in pictures {
        writeln!(out, "  {}: {what}", path.display())?;
    }
    Ok(())
}
