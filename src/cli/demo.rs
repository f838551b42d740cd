//! `pfnstore demo`: builds a store, a guest-memory file and the two reference subscribers,
//! converts one 4 KiB page inside a 1 GiB block and back, and prints what happened: the
//! block plans, the IOMMU mappings, the metadata bytes.

use std::sync::Arc;

use pfnstore::core::{Geometry, PageSize, Pfn};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault, SyntheticSource};
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{
    ConversionPlan, ConvertMode, FileOptions, Interest, Shareability, Store, StoreOptions,
    Subscriber,
};

/// Arguments of `pfnstore demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the store (and of the file) in GiB.
    #[arg(long, default_value_t = 2)]
    pub size_gib: u64,
    /// Use real hugetlb memory (1 GiB pages, falling back as the report says) instead of
    /// synthetic PFNs.
    #[arg(long)]
    pub hugetlb: bool,
    /// With --hugetlb: grow the 1 GiB pool by what is missing (root; given back on exit).
    #[arg(long)]
    pub grow_pool: bool,
}

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

fn describe(plan: &ConversionPlan) -> String {
    let count = |entries: &[pfnstore::PlanEntry], size| -> u64 {
        entries
            .iter()
            .filter(|e| e.run.size() == size)
            .map(|e| e.run.count())
            .sum()
    };
    let side = |entries: &[pfnstore::PlanEntry]| {
        format!(
            "{} x 1G + {} x 2M + {} x 4K in {} runs",
            count(entries, PageSize::Size1G),
            count(entries, PageSize::Size2M),
            count(entries, PageSize::Size4K),
            entries.len()
        )
    };
    format!("unmap {}; map {}", side(plan.unmap()), side(plan.map()))
}

/// Runs the demonstration.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = args
        .size_gib
        .checked_mul(GIB)
        .filter(|b| *b > 0)
        .ok_or("size must be 1 GiB or more")?;
    let store = if args.hugetlb {
        let source = HugetlbSource::new(HugetlbConfig {
            bytes,
            page_size: HugePageSize::Huge1G,
            strict: false,
            numa_node: None,
            grow_pool: args.grow_pool,
            prefault: Prefault::threads_per_cpu(),
            mlock: false,
        })?;
        Store::from_hugetlb(source, StoreOptions::default())?
    } else {
        let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), args.size_gib)?;
        Store::synthetic(source, StoreOptions::default())?
    };
    println!(
        "memory source:\n{}",
        indent(&store.source_report().to_string())
    );
    let file =
        store.create_file(FileOptions::new(store.geometry().chunk_pages() * PAGE).populated())?;
    let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
    let kvm = Arc::new(KvmMmu::new("kvm", &store));
    let subscribers: [Arc<dyn Subscriber>; 2] = [iommu.clone(), kvm.clone()];
    let _registrations: Vec<_> = subscribers
        .iter()
        .map(|s| store.subscribe(s, Interest::All))
        .collect();
    let fault = kvm.fault(file.id(), 0, Shareability::Private)?;
    println!(
        "file {}: {} bytes, all private; a guest fault at offset 0 maps a {:?} block at {}",
        file.id().0,
        file.size(),
        fault.0,
        fault.1
    );

    let offset = 1000 * PAGE;
    let out = file.convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)?;
    println!(
        "convert 4 KiB at {offset:#x} to shared:  {}",
        describe(&out.plan)
    );
    println!(
        "  IOMMU mappings now: {}; max mapping order at 0: {:?}",
        iommu.mappings(),
        file.max_mapping_order(0)?
    );
    if store.has_host_memory() {
        file.write(offset, b"hello from the host")?;
        println!("  the host wrote 19 bytes into the shared page");
    }
    let back = file.convert(offset, PAGE, Shareability::Private, ConvertMode::Zero)?;
    println!(
        "convert it back to private (ZERO): {}",
        describe(&back.plan)
    );
    println!(
        "  IOMMU mappings now: {}; max mapping order at 0: {:?}",
        iommu.mappings(),
        file.max_mapping_order(0)?
    );
    let stats = file.stats();
    println!(
        "file metadata: {} record(s), {} bytes for {} GiB (a struct page array: {} MiB)",
        stats.metadata.nodes,
        stats.metadata.bytes,
        stats.size / GIB,
        (stats.size / PAGE * 64) >> 20
    );
    let problems: Vec<_> = iommu
        .violations()
        .into_iter()
        .chain(kvm.violations())
        .chain(kvm.audit())
        .collect();
    if problems.is_empty() {
        println!("reference subscribers: every plan was exact");
    } else {
        return Err(format!("reference subscribers found problems: {problems:?}").into());
    }
    file.destroy()?;
    store.check_invariants()?;
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}
