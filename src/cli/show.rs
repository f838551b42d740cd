//! How the library's values read to a user of the command: page kinds, block sizes, prefault
//! methods, memory sources and plans, in human units and words rather than `Debug` names.
//! (The library's own `Display` impls are for logs; these are for the CLI's reports.)

use std::fmt;

use pfnstore::core::{Geometry, PAGE_SIZE, PageSize};
use pfnstore::hugetlb::preview::{PreviewStep, PreviewVerdict};
use pfnstore::hugetlb::{
    HugePageSize, HugetlbError, PfnKind, Prefault, SourceReport, StepKind, SyntheticReason,
};
use pfnstore::{MappingPlan, PlanEntry};

use super::units::Bytes;

/// The pages memory is made of: `1 GiB hugetlb pages`, `ordinary 4 KiB pages`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageKind(pub HugePageSize);

impl fmt::Display for PageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = Bytes(self.0.bytes());
        if self.0.is_hugetlb() {
            write!(f, "{size} hugetlb pages")
        } else {
            write!(f, "ordinary {size} pages")
        }
    }
}

/// The bytes of a mapping level in `geometry` (`Size1G` is 1 GiB on x86-64, 2 MiB in the
/// geometry of a 2 MiB hugetlb source).
pub(crate) fn block_bytes(geometry: &Geometry, size: PageSize) -> Bytes {
    Bytes(geometry.pages(size) * PAGE_SIZE)
}

/// How pages are prefaulted: `MAP_POPULATE`, `MADV_POPULATE_WRITE on 2 threads`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrefaultMethod(pub Prefault);

impl fmt::Display for PrefaultMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Prefault::None => f.write_str("not prefaulted"),
            Prefault::MapPopulate => f.write_str("MAP_POPULATE"),
            Prefault::Threads(1) => f.write_str("MADV_POPULATE_WRITE on 1 thread"),
            Prefault::Threads(n) => write!(f, "MADV_POPULATE_WRITE on {n} threads"),
        }
    }
}

/// Whether a report is that of a synthetic source (PFNs with no memory behind them).
pub(crate) fn is_synthetic(report: &SourceReport) -> bool {
    report.pfn_kind
        == Some(PfnKind::Synthetic {
            reason: SyntheticReason::NoMemory,
        })
}

/// A memory source's report: what was asked, each step of the fallback ladder, what was
/// obtained. A synthetic source says that it is one, in one line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a>(pub &'a SourceReport);

impl fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = self.0;
        if is_synthetic(report) {
            let chunk = report.obtained.unwrap_or(report.preferred).bytes();
            return write!(
                f,
                "synthetic: {} of made-up PFNs in {} chunks, no memory behind them",
                Bytes(report.bytes),
                Bytes(chunk)
            );
        }
        writeln!(
            f,
            "asked: {} of {}{}{}, {}",
            Bytes(report.requested_bytes),
            PageKind(report.preferred),
            if report.strict {
                " only"
            } else {
                ", falling back if needed"
            },
            report
                .numa_node
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default(),
            PrefaultMethod(report.prefault)
        )?;
        for (i, step) in report.steps.iter().enumerate() {
            write!(
                f,
                "step {}: {} {} of {}",
                i + 1,
                match step.kind {
                    StepKind::Create => "create",
                    StepKind::Grow => "grow",
                },
                Bytes(step.bytes),
                PageKind(step.page_size)
            )?;
            if let Some(pool) = step.pool_before {
                write!(f, " [pool: {pool}]")?;
            }
            if step.pool_grown_by > 0 {
                write!(f, " [pool grown by {} pages]", step.pool_grown_by)?;
            }
            match &step.outcome {
                Ok(()) => writeln!(f, ": ok")?,
                Err(e) => writeln!(f, ": failed: {}", e.message)?,
            }
        }
        match (report.obtained, report.pfn_kind) {
            (Some(size), Some(kind)) => write!(
                f,
                "obtained: {} of {}, PFNs {kind}",
                Bytes(report.bytes),
                PageKind(size)
            ),
            _ => write!(f, "obtained: nothing"),
        }
    }
}

/// Why obtaining memory failed, in one line: the failure of the last step when the whole
/// ladder failed (the rest of the report is in [`Source`]).
pub(crate) fn failure(error: &HugetlbError) -> String {
    if let HugetlbError::NoMemory { report } = error
        && let Some(Err(last)) = report.steps.last().map(|s| &s.outcome)
    {
        return last.message.clone();
    }
    error.to_string()
}

/// One rung of a dry-run ladder: what it needs, the pool, the verdict.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rung<'a>(pub &'a PreviewStep);

impl fmt::Display for Rung<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = self.0;
        write!(
            f,
            "{}: {} pages needed",
            PageKind(step.page_size),
            step.needed
        )?;
        if let Some(pool) = step.pool {
            write!(f, ", pool {pool}")?;
        }
        match step.verdict {
            PreviewVerdict::Fits => write!(f, " -> fits"),
            PreviewVerdict::FitsIfGrown { missing } => {
                write!(f, " -> fits with --grow-pool (grows it by {missing})")
            }
            PreviewVerdict::Short { missing } => {
                write!(
                    f,
                    " -> short by {missing} pages; the pool is not writable here"
                )
            }
            PreviewVerdict::NoPool => write!(f, " -> the kernel has no such pool"),
            PreviewVerdict::Ordinary => write!(f, " -> ordinary memory, synthetic PFNs"),
        }
    }
}

/// A conversion plan by block size: `unmap 1 x 1 GiB in 1 run; map 511 x 2 MiB + 512 x 4 KiB
/// in 5 runs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan<'a> {
    /// The plan.
    pub plan: &'a MappingPlan,
    /// The geometry its block sizes are in.
    pub geometry: &'a Geometry,
}

impl fmt::Display for Plan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |entries: &[PlanEntry]| {
            let blocks: Vec<String> = PageSize::LARGEST_FIRST
                .iter()
                .filter_map(|&size| {
                    let count: u64 = entries
                        .iter()
                        .filter(|e| e.run.size() == size)
                        .map(|e| e.run.count())
                        .sum();
                    (count > 0).then(|| format!("{count} x {}", block_bytes(self.geometry, size)))
                })
                .collect();
            if blocks.is_empty() {
                return "nothing".to_string();
            }
            let runs = entries.len();
            format!(
                "{} in {runs} run{}",
                blocks.join(" + "),
                if runs == 1 { "" } else { "s" }
            )
        };
        write!(
            f,
            "unmap {}; map {}",
            side(self.plan.unmap()),
            side(self.plan.map())
        )
    }
}

/// `text` indented by two spaces, line by line.
pub(crate) fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_kinds_and_methods_read_as_words() {
        assert_eq!(
            PageKind(HugePageSize::Huge1G).to_string(),
            "1 GiB hugetlb pages"
        );
        assert_eq!(
            PageKind(HugePageSize::Huge2M).to_string(),
            "2 MiB hugetlb pages"
        );
        assert_eq!(
            PageKind(HugePageSize::Base4K).to_string(),
            "ordinary 4 KiB pages"
        );
        assert_eq!(
            PrefaultMethod(Prefault::Threads(2)).to_string(),
            "MADV_POPULATE_WRITE on 2 threads"
        );
        let g = Geometry::X86_64;
        assert_eq!(block_bytes(&g, PageSize::Size1G).to_string(), "1 GiB");
        assert_eq!(block_bytes(&g, PageSize::Size2M).to_string(), "2 MiB");
        let two_m = HugePageSize::Huge2M.geometry();
        assert_eq!(block_bytes(&two_m, PageSize::Size1G).to_string(), "2 MiB");
    }

    #[test]
    fn a_synthetic_source_says_so() {
        let source = pfnstore::hugetlb::SyntheticSource::new(
            Geometry::X86_64,
            pfnstore::core::Pfn(1 << 18),
            2,
        )
        .unwrap();
        let text = Source(pfnstore::hugetlb::MemorySource::report(&source)).to_string();
        assert_eq!(
            text,
            "synthetic: 2 GiB of made-up PFNs in 1 GiB chunks, no memory behind them"
        );
    }
}
