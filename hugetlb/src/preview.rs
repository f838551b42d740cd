//! What a source would get, worked out from the pools without obtaining anything: the
//! dry run behind `pfnstore hugetlb --size-gib N`.

use std::fmt;

use crate::pool::{PoolCounts, PoolId, Sysfs};
use crate::{HugePageSize, HugetlbError};

/// The verdict for one rung of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewVerdict {
    /// The pool has enough free, unreserved pages.
    Fits,
    /// The pool is short by `missing` pages; a source with `grow_pool` would add them.
    FitsIfGrown {
        /// Pages to add.
        missing: u64,
    },
    /// The pool is short by `missing` pages and this process may not grow it.
    Short {
        /// Pages missing.
        missing: u64,
    },
    /// The kernel has no pool of this size.
    NoPool,
    /// Ordinary memory: always possible (the size check against the machine is separate).
    Ordinary,
}

/// One rung of a previewed ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewStep {
    /// The page size.
    pub page_size: HugePageSize,
    /// Pages needed.
    pub needed: u64,
    /// The pool as read.
    pub pool: Option<PoolCounts>,
    /// The verdict.
    pub verdict: PreviewVerdict,
}

impl PreviewStep {
    /// Whether a source would stop at this rung (with pool growth if `grow_pool`).
    pub fn would_succeed(&self, grow_pool: bool) -> bool {
        match self.verdict {
            PreviewVerdict::Fits | PreviewVerdict::Ordinary => true,
            PreviewVerdict::FitsIfGrown { .. } => grow_pool,
            PreviewVerdict::Short { .. } | PreviewVerdict::NoPool => false,
        }
    }
}

impl fmt::Display for PreviewStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} pages needed", self.page_size, self.needed)?;
        if let Some(p) = self.pool {
            write!(f, ", pool {p}")?;
        }
        match self.verdict {
            PreviewVerdict::Fits => write!(f, " -> fits"),
            PreviewVerdict::FitsIfGrown { missing } => {
                write!(f, " -> fits if the pool is grown by {missing} (grow_pool)")
            }
            PreviewVerdict::Short { missing } => {
                write!(f, " -> short by {missing} pages, pool not writable here")
            }
            PreviewVerdict::NoPool => write!(f, " -> the kernel has no such pool"),
            PreviewVerdict::Ordinary => write!(f, " -> ordinary memory, synthetic PFNs"),
        }
    }
}

/// The ladder a source of `bytes` would walk from `preferred`, judged on the pools as read
/// now. `can_grow` tells whether pools may be grown here (see
/// [`Sysfs::can_grow`] for the check).
pub fn preview(
    sysfs: &Sysfs,
    bytes: u64,
    preferred: HugePageSize,
    numa_node: Option<u32>,
    can_grow: bool,
) -> Result<Vec<PreviewStep>, HugetlbError> {
    let mut steps = Vec::new();
    for page_size in std::iter::successors(Some(preferred), |s| s.smaller()) {
        let needed = bytes.div_ceil(page_size.bytes());
        if !page_size.is_hugetlb() {
            steps.push(PreviewStep {
                page_size,
                needed,
                pool: None,
                verdict: PreviewVerdict::Ordinary,
            });
            continue;
        }
        let id = PoolId {
            page_size,
            node: numa_node,
        };
        if !sysfs.pool_dir(id)?.is_dir() {
            steps.push(PreviewStep {
                page_size,
                needed,
                pool: None,
                verdict: PreviewVerdict::NoPool,
            });
            continue;
        }
        let pool = sysfs.read_pool(id)?;
        let missing = needed.saturating_sub(pool.available());
        let verdict = match (missing, can_grow) {
            (0, _) => PreviewVerdict::Fits,
            (missing, true) => PreviewVerdict::FitsIfGrown { missing },
            (missing, false) => PreviewVerdict::Short { missing },
        };
        steps.push(PreviewStep {
            page_size,
            needed,
            pool: Some(pool),
            verdict,
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_judges_each_rung_from_the_pools() {
        let root = std::env::temp_dir().join(format!("pfnstore-preview-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let one_g = root.join("sys/kernel/mm/hugepages/hugepages-1048576kB");
        std::fs::create_dir_all(&one_g).unwrap();
        for (f, v) in [
            ("nr_hugepages", 3),
            ("free_hugepages", 2),
            ("resv_hugepages", 1),
            ("surplus_hugepages", 0),
        ] {
            std::fs::write(one_g.join(f), format!("{v}\n")).unwrap();
        }
        let sysfs = Sysfs::at(root.join("sys"), root.join("proc"));
        let steps = preview(&sysfs, 4 << 30, HugePageSize::Huge1G, None, true).unwrap();
        let verdicts: Vec<_> = steps
            .iter()
            .map(|s| (s.page_size, s.needed, s.verdict))
            .collect();
        assert_eq!(
            verdicts,
            vec![
                (
                    HugePageSize::Huge1G,
                    4,
                    PreviewVerdict::FitsIfGrown { missing: 3 }
                ),
                (HugePageSize::Huge2M, 2048, PreviewVerdict::NoPool),
                (HugePageSize::Base4K, 1 << 20, PreviewVerdict::Ordinary),
            ]
        );
        assert!(!steps[0].would_succeed(false) && steps[0].would_succeed(true));
        let steps = preview(&sysfs, 1 << 30, HugePageSize::Huge1G, None, false).unwrap();
        assert_eq!(steps[0].verdict, PreviewVerdict::Fits);
        let steps = preview(&sysfs, 2 << 30, HugePageSize::Huge1G, None, false).unwrap();
        assert_eq!(steps[0].verdict, PreviewVerdict::Short { missing: 1 });
        assert!(steps[0].to_string().contains("short by 1"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
