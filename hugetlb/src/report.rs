//! What a source was asked for, what it found and what it got: the fallback ladder, step by
//! step, in a form the CLI prints and a VMM can log.

use std::fmt;
use std::time::Duration;

use crate::pool::id::PoolCounts;
use crate::{HugePageSize, HugetlbError, PfnKind, Prefault};

/// The whole story of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    /// Bytes asked for at creation.
    pub requested_bytes: u64,
    /// The first rung tried.
    pub preferred: HugePageSize,
    /// Whether falling back was forbidden.
    pub strict: bool,
    /// The NUMA node asked for.
    pub numa_node: Option<u32>,
    /// How pages were prefaulted.
    pub prefault: Prefault,
    /// Every attempt, in order: the ladder at creation, then one per [`grow`].
    ///
    /// [`grow`]: crate::MemorySource::grow
    pub steps: Vec<LadderStep>,
    /// The page size obtained, if any step succeeded.
    pub obtained: Option<HugePageSize>,
    /// Whether the chunks' PFNs are real.
    pub pfn_kind: Option<PfnKind>,
    /// Bytes the source holds now.
    pub bytes: u64,
    /// Time spent in the successful creation step.
    pub timings: Timings,
}

/// Time spent obtaining memory, by phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// Growing the pool through sysfs.
    pub pool_grow: Duration,
    /// memfd_create, ftruncate, mmap (including MAP_POPULATE when that is the prefault).
    pub map: Duration,
    /// Prefaulting after mmap (MADV_POPULATE_WRITE, on one or more threads).
    pub prefault: Duration,
    /// Reading and checking pagemap.
    pub pfn_resolve: Duration,
}

/// Why a step was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A rung of the ladder at creation.
    Create,
    /// Growing an existing source.
    Grow,
}

/// One attempt to obtain memory of one page size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderStep {
    /// Creation or growth.
    pub kind: StepKind,
    /// The page size tried.
    pub page_size: HugePageSize,
    /// Bytes asked for.
    pub bytes: u64,
    /// The pool as found before anything was done (hugetlb sizes; `None` when it could not be
    /// read or for ordinary pages).
    pub pool_before: Option<PoolCounts>,
    /// Pages added to the pool for this step (and kept while the source lives).
    pub pool_grown_by: u64,
    /// Success, or what failed.
    pub outcome: Result<(), StepFailure>,
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// The errno, when the kernel refused something.
    pub errno: Option<i32>,
    /// The error, as text.
    pub message: String,
}

impl From<&HugetlbError> for StepFailure {
    fn from(e: &HugetlbError) -> StepFailure {
        StepFailure {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}

/// A byte count in the largest binary unit that keeps it whole (`2 GiB`, `1536 MiB`, `4 KiB`).
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 5] =
            [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)];
        let (unit, shift) = UNITS
            .into_iter()
            .find(|&(_, shift)| self.0 >> shift > 0 && self.0 & ((1u64 << shift) - 1) == 0)
            .unwrap_or(("B", 0));
        write!(f, "{} {unit}", self.0 >> shift)
    }
}

impl fmt::Display for SourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "asked: {} of {}{}{}, prefault {}",
            Bytes(self.requested_bytes),
            self.preferred,
            if self.strict {
                " (strict)"
            } else {
                ", falling back if needed"
            },
            self.numa_node
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default(),
            self.prefault
        )?;
        for (i, step) in self.steps.iter().enumerate() {
            write!(
                f,
                "  step {}: {} {} of {}",
                i + 1,
                match step.kind {
                    StepKind::Create => "create",
                    StepKind::Grow => "grow",
                },
                Bytes(step.bytes),
                step.page_size
            )?;
            if let Some(pool) = step.pool_before {
                write!(f, " [pool: {pool}]")?;
            }
            if step.pool_grown_by > 0 {
                write!(f, " [pool grown by {}]", step.pool_grown_by)?;
            }
            match &step.outcome {
                Ok(()) => writeln!(f, ": ok")?,
                Err(e) => writeln!(
                    f,
                    ": FAILED{}: {}",
                    e.errno.map(|n| format!(" (errno {n})")).unwrap_or_default(),
                    e.message
                )?,
            }
        }
        match (self.obtained, self.pfn_kind) {
            (Some(size), Some(kind)) => {
                writeln!(f, "obtained: {} of {size}, PFNs {kind}", Bytes(self.bytes))
            }
            _ => writeln!(f, "obtained: nothing"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_use_the_largest_unit_that_keeps_them_whole() {
        let shown = |b: u64| Bytes(b).to_string();
        assert_eq!(shown(0), "0 B");
        assert_eq!(shown(4096), "4 KiB");
        assert_eq!(shown(2 << 30), "2 GiB");
        assert_eq!(shown(1536 << 20), "1536 MiB");
        assert_eq!(shown(16 << 40), "16 TiB");
        assert_eq!(shown(4097), "4097 B");
    }

    #[test]
    fn prefault_methods_read_as_words() {
        assert_eq!(
            Prefault::Threads(2).to_string(),
            "MADV_POPULATE_WRITE on 2 threads"
        );
        assert_eq!(Prefault::MapPopulate.to_string(), "MAP_POPULATE");
        assert!(!Prefault::None.to_string().contains("None"));
    }
}
