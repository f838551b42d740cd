//! `pfnstore demo`: builds a store, a guest-memory file and the two reference subscribers,
//! converts one 4 KiB page inside a 1 GiB block and back, and prints what happened: the
//! block plans, the IOMMU mappings, the metadata bytes.

use std::io::Write;
use std::sync::Arc;

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::{HugePageSize, HugetlbConfig, HugetlbSource, Prefault, SyntheticSource};
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{ConvertMode, FileOptions, Interest, Shareability, Store, StoreOptions, Subscriber};

use super::show::{PageKind, Plan, Source, block_bytes, is_synthetic};
use super::units::{self, Bytes, GIB, SizeLimit};
use super::{Outcome, UsageError};

/// Arguments of `pfnstore demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the store: 2G, 16T, ... (a bare number is GiB; --size-gib is the same flag).
    /// A whole number of GiB, up to 1 PiB on synthetic memory and up to this machine's memory
    /// with --hugetlb.
    #[arg(long, alias = "size-gib", value_name = "SIZE", default_value = "2G",
          value_parser = units::store_size)]
    pub size: Bytes,
    /// Use real hugetlb memory (1 GiB pages, falling back as the report says) instead of
    /// synthetic PFNs.
    #[arg(long)]
    pub hugetlb: bool,
    /// With --hugetlb: grow the 1 GiB pool by what is missing (root; given back on exit).
    #[arg(long, requires = "hugetlb")]
    pub grow_pool: bool,
}

impl Args {
    /// The demonstration on a synthetic store of `size`.
    pub fn synthetic(size: Bytes) -> Args {
        Args {
            size,
            hugetlb: false,
            grow_pool: false,
        }
    }
}

const PAGE: u64 = 4096;

/// Runs the demonstration.
pub fn run(args: &Args, out: &mut dyn Write) -> Outcome {
    let store = if args.hugetlb {
        let size = SizeLimit::machine()?
            .check(args.size)
            .map_err(|message| UsageError {
                command: "demo",
                message: format!(
                    "invalid value '{}' for '--size <SIZE>' with --hugetlb: {message}",
                    args.size
                ),
            })?;
        let source = HugetlbSource::new(HugetlbConfig {
            bytes: size.0,
            page_size: HugePageSize::Huge1G,
            strict: false,
            numa_node: None,
            grow_pool: args.grow_pool,
            prefault: Prefault::threads_per_cpu(),
            mlock: false,
        })?;
        Store::from_hugetlb(source, StoreOptions::default())?
    } else {
        let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), args.size.0 / GIB)?;
        Store::synthetic(source, StoreOptions::default())?
    };
    let geometry = store.geometry();
    writeln!(
        out,
        "memory source:\n{}",
        indent(&Source(store.source_report()).to_string())
    )?;
    let chunk_pages = geometry.chunk_pages();
    let file = store.create_file(FileOptions::new(chunk_pages * PAGE).populated())?;
    let iommu = Arc::new(IommuMapper::new("iommu", geometry));
    let kvm = Arc::new(KvmMmu::new("kvm", &store));
    let subscribers: [Arc<dyn Subscriber>; 2] = [iommu.clone(), kvm.clone()];
    let _registrations: Vec<_> = subscribers
        .iter()
        .map(|s| store.subscribe(s, Interest::All))
        .collect();
    let (block, pfn) = kvm.fault(file.id(), 0, Shareability::Private)?;
    let block = block_bytes(&geometry, block);
    let report = store.source_report();
    // What the guest gets is the store's block; what backs it is what the source obtained,
    // which after a fallback is not what was asked for.
    let fault = match (report.obtained, report.pfn_kind) {
        _ if is_synthetic(report) => {
            format!("maps a {block} block at {pfn}; PFNs synthetic, no memory behind them")
        }
        (Some(size), Some(kind)) if size.is_hugetlb() => {
            format!(
                "maps a {block} block at {pfn}, backed by {}; PFNs {kind}",
                PageKind(size)
            )
        }
        (size, kind) => {
            let size = size.unwrap_or(HugePageSize::Base4K);
            format!(
                "gets a {block} block at {pfn} of the store's PFNs, but the memory behind it is \
                 {}, which an MMU maps {} at a time; PFNs {}",
                PageKind(size),
                Bytes(size.bytes()),
                kind.map_or("unknown".to_string(), |k| k.to_string()),
            )
        }
    };
    writeln!(
        out,
        "file {}: {}, all private; a guest fault at offset 0 {fault}",
        file.id().0,
        Bytes(file.size()),
    )?;

    // A page inside the first chunk, whatever its size (1 GiB, or 2 MiB after a fallback).
    let offset = (1000 % chunk_pages) * PAGE;
    let plan = |plan| Plan {
        plan,
        geometry: &geometry,
    };
    let shared = file.convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)?;
    writeln!(
        out,
        "convert 4 KiB at {offset:#x} to shared:  {}",
        plan(&shared.plan)
    )?;
    writeln!(
        out,
        "  IOMMU mappings now: {}; max mapping order at 0: {}",
        iommu.mappings(),
        block_bytes(&geometry, file.max_mapping_size(0)?)
    )?;
    if store.has_host_memory() {
        file.write(offset, b"hello from the host")?;
        writeln!(out, "  the host wrote 19 bytes into the shared page")?;
    }
    let back = file.convert(offset, PAGE, Shareability::Private, ConvertMode::Zero)?;
    writeln!(
        out,
        "convert it back to private (ZERO): {}",
        plan(&back.plan)
    )?;
    writeln!(
        out,
        "  IOMMU mappings now: {}; max mapping order at 0: {}",
        iommu.mappings(),
        block_bytes(&geometry, file.max_mapping_size(0)?)
    )?;
    let stats = file.stats();
    writeln!(
        out,
        "file metadata: {} record(s), {} for {} (a struct page array: {})",
        stats.metadata.nodes,
        Bytes(stats.metadata.bytes),
        Bytes(stats.size),
        Bytes(stats.size / PAGE * 64)
    )?;
    let problems: Vec<_> = iommu
        .violations()
        .into_iter()
        .chain(kvm.violations())
        .chain(kvm.audit())
        .collect();
    if problems.is_empty() {
        writeln!(out, "reference subscribers: every plan was exact")?;
    } else {
        return Err(format!(
            "reference subscribers found problems: {}",
            problems.join("; ")
        )
        .into());
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
