//! What names a pool and what it counts: plain values that errors and reports carry, apart
//! from the code that reads and writes the pools.

use std::fmt;

use crate::HugePageSize;

/// One pool: a huge page size, system-wide or on one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId {
    /// The page size (1G or 2M).
    pub page_size: HugePageSize,
    /// The node, or `None` for the system-wide pool.
    pub node: Option<u32>,
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "{} pool of node {n}", self.page_size),
            None => write!(f, "{} pool", self.page_size),
        }
    }
}

/// The counters of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// `nr_hugepages`: persistent pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages nobody has faulted in (reserved ones included).
    pub free: u64,
    /// `resv_hugepages`: free pages already promised to mappings (system-wide pools only;
    /// the kernel keeps no per-node count, so 0 there).
    pub reserved: u64,
    /// `surplus_hugepages`: pages beyond `total` from overcommit.
    pub surplus: u64,
}

impl PoolCounts {
    /// Pages a new mapping can still reserve: free and not promised to anyone.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

impl fmt::Display for PoolCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "total {} free {} reserved {} surplus {}",
            self.total, self.free, self.reserved, self.surplus
        )
    }
}
