//! `pfnstore hugetlb`: the hugetlb pools of this machine, whether 1 GiB pages can be reserved
//! here, and what a store of a given size would get.

use std::io::Write;

use pfnstore::hugetlb::HugePageSize;
use pfnstore::hugetlb::pool::{Sysfs, reconcile};
use pfnstore::hugetlb::preview::preview;

use super::Outcome;
use super::show::{PageKind, Rung};
use super::units::{self, Bytes};

/// Arguments of `pfnstore hugetlb`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Size of the store to plan for: 4G, 16T, ... (a bare number is GiB; --size-gib is the
    /// same flag). A whole number of GiB, at most this machine's memory.
    #[arg(long, alias = "size-gib", value_name = "SIZE", default_value = "2G",
          value_parser = units::machine_size)]
    pub size: Bytes,
    /// Plan for this NUMA node's pools (a node this machine has).
    #[arg(long, value_name = "NODE", value_parser = existing_numa_node)]
    pub numa_node: Option<u32>,
    /// Give back pool pages that pfnstore processes grew and that died without giving them
    /// back (the guardian normally does this; this settles what it could not, e.g. after a
    /// reboot of the guardian's host or when it gave up), then print the pools.
    #[arg(long)]
    pub restore: bool,
}

/// clap value parser: a NUMA node number that exists here.
fn existing_numa_node(text: &str) -> Result<u32, String> {
    let node: u32 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a NUMA node number"))?;
    Sysfs::system()
        .check_node(node)
        .map_err(|e| e.to_string())?;
    Ok(node)
}

/// Prints the pools, the checks and the preview of what a store would get.
pub(crate) fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let sysfs = Sysfs::system();
    if args.restore {
        let settled = reconcile(&sysfs)?;
        if settled.is_empty() {
            writeln!(
                out,
                "nothing to give back: no pool growth of a dead pfnstore process"
            )?;
        }
        for s in settled {
            writeln!(
                out,
                "gave back {} of {} pages grown by process {} in {} ({})",
                s.given_back,
                s.owed,
                s.pid,
                s.pool_dir.display(),
                if s.given_back == s.owed {
                    "settled"
                } else {
                    "the rest is in use and stays owed"
                }
            )?;
        }
        writeln!(out)?;
    }
    print_pools(&sysfs, out)?;
    print_preview(&sysfs, args.size, args.numa_node, out)
}

/// The pools (system-wide and per node) and whether 1 GiB pages can be reserved here.
pub(crate) fn print_pools(sysfs: &Sysfs, out: &mut dyn Write) -> Outcome {
    // Read everything first, so that a failure prints no half table.
    let pools = sysfs.pools()?;
    let one_g = sysfs.can_grow(HugePageSize::Huge1G);
    writeln!(out, "hugetlb pools (pages):")?;
    writeln!(
        out,
        "  {:<10} {:<6} {:>7} {:>7} {:>9} {:>8}",
        "page size", "node", "total", "free", "reserved", "surplus"
    )?;
    for p in pools {
        let c = p.counts;
        writeln!(
            out,
            "  {:<10} {:<6} {:>7} {:>7} {:>9} {:>8}",
            Bytes(p.id.page_size.bytes()).to_string(),
            p.id.node.map_or("all".to_string(), |n| n.to_string()),
            c.total,
            c.free,
            if p.id.node.is_some() {
                "-".to_string()
            } else {
                c.reserved.to_string()
            },
            c.surplus
        )?;
    }
    match one_g {
        Ok(()) => writeln!(
            out,
            "1 GiB pages can be reserved here: yes (root, nr_hugepages writable)"
        )?,
        Err(why) => writeln!(out, "1 GiB pages can be reserved here: no ({why})")?,
    }
    Ok(())
}

/// The ladder a store of `size` (at most this machine's memory) would walk, judged on the
/// pools as they are now.
pub(crate) fn print_preview(
    sysfs: &Sysfs,
    size: Bytes,
    numa_node: Option<u32>,
    out: &mut dyn Write,
) -> Outcome {
    let can_grow = sysfs.can_grow(HugePageSize::Huge1G).is_ok();
    let steps = preview(sysfs, size.0, HugePageSize::Huge1G, numa_node, can_grow)?;
    writeln!(
        out,
        "a store of {size}{}:",
        numa_node
            .map(|n| format!(" on node {n}"))
            .unwrap_or_default()
    )?;
    for step in &steps {
        writeln!(out, "  {}", Rung(step))?;
    }
    let got = |grow_pool| {
        steps
            .iter()
            .find(|s| s.would_succeed(grow_pool))
            .map_or("nothing".to_string(), |s| PageKind(s.page_size).to_string())
    };
    writeln!(out, "  -> without --grow-pool: {}", got(false))?;
    writeln!(out, "  -> with    --grow-pool: {}", got(true))?;
    Ok(())
}
