//! `pfnstore hugetlb`: the hugetlb pools of this machine, whether 1G pages can be reserved
//! here, and what a store of a given size would get.

use pfnstore::hugetlb::HugePageSize;
use pfnstore::hugetlb::plan::plan;
use pfnstore::hugetlb::pool::Sysfs;

/// Arguments of `pfnstore hugetlb`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the store to plan for, in GiB.
    #[arg(long, default_value_t = 2)]
    pub size_gib: u64,
    /// Plan for this NUMA node's pools.
    #[arg(long)]
    pub numa_node: Option<u32>,
}

/// Prints the pools, the checks and the plan.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let sysfs = Sysfs::system();
    println!("hugetlb pools (pages):");
    println!(
        "  {:<12} {:<6} {:>7} {:>7} {:>9} {:>8}",
        "size", "node", "total", "free", "reserved", "surplus"
    );
    for p in sysfs.pools()? {
        let c = p.counts;
        println!(
            "  {:<12} {:<6} {:>7} {:>7} {:>9} {:>8}",
            p.id.page_size.to_string(),
            p.id.node.map_or("all".to_string(), |n| n.to_string()),
            c.total,
            c.free,
            if p.id.node.is_some() {
                "-".to_string()
            } else {
                c.reserved.to_string()
            },
            c.surplus
        );
    }
    let one_g = sysfs.can_grow(HugePageSize::Huge1G);
    match &one_g {
        Ok(()) => println!("1G pages can be reserved here: yes (root, nr_hugepages writable)"),
        Err(why) => println!("1G pages can be reserved here: no ({why})"),
    }
    let bytes = args
        .size_gib
        .checked_mul(1 << 30)
        .filter(|b| *b > 0)
        .ok_or("--size-gib must be between 1 and 2^34")?;
    let mem_total = sysfs.mem_total()?;
    println!(
        "a store of {} GiB{}:",
        args.size_gib,
        args.numa_node
            .map(|n| format!(" on node {n}"))
            .unwrap_or_default()
    );
    if bytes > mem_total {
        println!(
            "  exceeds this machine's memory ({} GiB): a source would refuse it",
            mem_total >> 30
        );
        return Ok(());
    }
    if let Some(node) = args.numa_node {
        sysfs.check_node(node)?;
    }
    let steps = plan(
        &sysfs,
        bytes,
        HugePageSize::Huge1G,
        args.numa_node,
        one_g.is_ok(),
    )?;
    for step in &steps {
        println!("  {step}");
    }
    for grow_pool in [false, true] {
        let got = steps
            .iter()
            .find(|s| s.would_succeed(grow_pool))
            .map_or("nothing".to_string(), |s| s.page_size.to_string());
        println!(
            "  -> {} grow_pool: {got}",
            if grow_pool { "with   " } else { "without" }
        );
    }
    Ok(())
}
