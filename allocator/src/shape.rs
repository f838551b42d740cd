//! The geometry reduced to the two block sizes placement works with, and the capacities of a
//! free run that the placement rules search by.

use pfnstore_core::Geometry;

/// Pages in a middle block and in a chunk (both powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub mid: u64,
    pub chunk: u64,
}

impl Shape {
    pub(crate) fn new(geometry: &Geometry) -> Shape {
        Shape {
            mid: geometry.mid_pages(),
            chunk: geometry.chunk_pages(),
        }
    }
}

/// `x` rounded up to a multiple of `align` (a power of two). Callers only pass PFNs below
/// `PFN_LIMIT`, which is aligned to every block size, so this never overflows.
pub(crate) const fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

/// `x` rounded down to a multiple of `align` (a power of two).
pub(crate) const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}
