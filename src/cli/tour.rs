//! One conversion explained: a 4 KiB page inside a backed chunk goes shared and back, with
//! the plans the subscribers get. `status` shows it on synthetic memory; `demo` on the store
//! it runs, and draws its plan.

use std::io::Write;
use std::sync::Arc;

use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{ConvertMode, FileOptions, Interest, MappingPlan, Shareability, Store, Subscriber};

use super::Outcome;
use super::show::{PageKind, Plan, block_bytes, is_synthetic};
use super::units::Bytes;

const PAGE: u64 = 4096;

/// What the tour did, for the picture of one plan.
#[derive(Debug)]
pub(crate) struct Tour {
    /// The plan of the 4 KiB conversion to shared.
    pub plan: MappingPlan,
    /// The page converted (byte offset in its file).
    pub offset: u64,
}

/// Converts a page inside the first chunk of a one-chunk file of `store` and back.
pub(crate) fn run(store: &Store, out: &mut dyn Write) -> Result<Tour, Box<dyn std::error::Error>> {
    let geometry = store.geometry();
    let chunk_pages = geometry.chunk_pages();
    let file = store.create_file(FileOptions::new(chunk_pages * PAGE).populated())?;
    let iommu = Arc::new(IommuMapper::new("iommu", geometry));
    let kvm = Arc::new(KvmMmu::new("kvm", store));
    let subscribers: [Arc<dyn Subscriber>; 2] = [iommu.clone(), kvm.clone()];
    let _registrations = subscribers
        .iter()
        .map(|s| store.subscribe(s, Interest::File(file.id())))
        .collect::<Result<Vec<_>, _>>()?;
    let (block, pfn) = kvm.fault(file.id(), 0, Shareability::Private)?;
    let report = store.source_report();
    // What the guest gets is the store's block; what backs it is what the source obtained,
    // which after a fallback is not what was asked for.
    let behind = match report.obtained {
        _ if is_synthetic(report) => "synthetic PFNs, no memory behind them".to_string(),
        Some(size) => format!("backed by {}", PageKind(size)),
        None => "backed by memory of an unknown kind".to_string(),
    };
    writeln!(
        out,
        "a {} file, all private: a guest fault at offset 0 maps a {} block at {pfn} ({behind})",
        Bytes(file.size()),
        block_bytes(&geometry, block),
    )?;
    let offset = (1000 % chunk_pages) * PAGE;
    let shared = file.convert(offset, PAGE, Shareability::Shared, ConvertMode::Preserve)?;
    writeln!(
        out,
        "convert 4 KiB at {offset:#x} to shared:  {}",
        Plan {
            plan: &shared.plan,
            geometry: &geometry
        }
    )?;
    writeln!(
        out,
        "  IOMMU mappings now: {}; the largest block at offset 0: {}",
        iommu.mappings(),
        block_bytes(&geometry, file.max_mapping_size(0)?)
    )?;
    if store.has_host_memory() {
        let text = b"hello from the host";
        file.write(offset, text)?;
        writeln!(
            out,
            "  the host wrote {} bytes into the shared page",
            text.len()
        )?;
    }
    let back = file.convert(offset, PAGE, Shareability::Private, ConvertMode::Zero)?;
    writeln!(
        out,
        "convert it back to private (ZERO): {}",
        Plan {
            plan: &back.plan,
            geometry: &geometry
        }
    )?;
    writeln!(
        out,
        "  IOMMU mappings now: {}; the largest block at offset 0: {}",
        iommu.mappings(),
        block_bytes(&geometry, file.max_mapping_size(0)?)
    )?;
    let problems: Vec<String> = iommu
        .violations()
        .into_iter()
        .chain(kvm.violations())
        .chain(kvm.audit())
        .collect();
    if problems.is_empty() {
        writeln!(out, "reference subscribers: every plan was exact")?;
    } else {
        writeln!(out, "reference subscribers found problems: {problems:?}")?;
    }
    file.destroy()?;
    Ok(Tour {
        plan: shared.plan,
        offset,
    })
}

/// [`run`] as a command step.
pub(crate) fn show(store: &Store, out: &mut dyn Write) -> Outcome {
    run(store, out).map(drop)
}
