//! The sharded store: one slot per chunk of the span, each with its own lock and a lock-free
//! summary of its mapping uniformity.
//!
//! This file holds the slots, the span arithmetic and chunk management; reading is in
//! `queries`, changing in `mutations` (one range) and `bulk` (many ranges in one pass per
//! chunk), and the self-check for tests in `invariants`.

use std::ops::Deref;

use pfnstore_core::sync::RwLock;
use pfnstore_core::sync::atomic::{AtomicU64, Ordering};
use pfnstore_core::{Geometry, PageSize, Pfn, PfnRange, RangeError};

use crate::chunk::ChunkState;
use crate::share_plane::PlaneShape;
use crate::summary::SummaryLayout;
use crate::{MetadataError, Shareability};

mod bulk;
mod invariants;
mod mutations;
mod queries;

/// The most chunk slots a store allocates (64 MiB of slots; 4 PiB of memory in 1G chunks).
pub const MAX_CHUNKS: u64 = 1 << 20;

/// One chunk of the span: 64 bytes, one cache line.
#[cfg_attr(not(pfnstore_loom), repr(align(64)))]
#[derive(Debug)]
struct Slot {
    /// Written only with the chunk's write lock held; read without any lock by
    /// [`MetadataStore::max_mapping_size`]. See [`crate::summary`] for its bits.
    summary: AtomicU64,
    state: RwLock<Option<ChunkState>>,
}

/// The attribute store of a PFN span: shareability, pins, quarantine, scrub state and owner
/// of every page of its managed chunks. See the crate docs for the concepts, the lock order
/// and the representation.
#[derive(Debug)]
pub struct MetadataStore {
    geometry: Geometry,
    span: PfnRange,
    first_chunk: u64,
    summary: SummaryLayout,
    slots: Box<[Slot]>,
}

/// Holds a chunk's lock guards in ascending PFN order.
type Guards<G> = [G];

impl MetadataStore {
    /// A store for the chunks of `span` (chunk-aligned), none of them managed yet.
    pub fn new(geometry: Geometry, span: PfnRange) -> Result<MetadataStore, MetadataError> {
        span.check_aligned_to(geometry.chunk_pages())?;
        let chunks = span.len() >> geometry.order(PageSize::Size1G);
        if chunks > MAX_CHUNKS {
            return Err(MetadataError::SpanTooLarge {
                chunks,
                max: MAX_CHUNKS,
            });
        }
        let slots = (0..chunks)
            .map(|_| Slot {
                summary: AtomicU64::new(0),
                state: RwLock::new(None),
            })
            .collect();
        Ok(MetadataStore {
            geometry,
            span,
            first_chunk: geometry.chunk_index(span.start()),
            summary: SummaryLayout::new(geometry),
            slots,
        })
    }

    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The PFN span the store may manage.
    pub fn span(&self) -> PfnRange {
        self.span
    }

    fn chunk_pages(&self) -> u32 {
        // chunk_order <= 30 (Geometry's invariant), so a chunk's page count fits in a u32.
        self.geometry.chunk_pages() as u32
    }

    fn mid_order(&self) -> u32 {
        self.geometry.order(PageSize::Size2M)
    }

    fn plane_shape(&self) -> PlaneShape {
        PlaneShape::new(self.chunk_pages(), self.mid_order())
    }

    fn slot_index(&self, pfn: Pfn) -> usize {
        (self.geometry.chunk_index(pfn) - self.first_chunk) as usize
    }

    fn chunk_base(&self, index: usize) -> Pfn {
        Pfn((self.first_chunk + index as u64) << self.geometry.order(PageSize::Size1G))
    }

    /// The slot and offset of `pfn`, which must lie in the span: one subtraction and one
    /// comparison, as the span is chunk-aligned (this is on the fault path).
    #[inline]
    fn locate(&self, pfn: Pfn) -> Result<(usize, u32), MetadataError> {
        let rel = pfn.0.wrapping_sub(self.span.start().0);
        if rel >= self.span.len() {
            return Err(self.outside_span(pfn));
        }
        let index = (rel >> self.geometry.order(PageSize::Size1G)) as usize;
        // The offset is below the chunk's page count, which fits in a u32.
        Ok((index, (rel & (self.geometry.chunk_pages() - 1)) as u32))
    }

    /// The error for a `pfn` outside the span: the one `PfnRange::page(pfn)` and
    /// `check_within` give.
    #[cold]
    fn outside_span(&self, pfn: Pfn) -> MetadataError {
        match PfnRange::page(pfn) {
            Err(e) => e.into(),
            Ok(_) => RangeError::OutOfBounds { pfn }.into(),
        }
    }

    /// The part of `range` in chunk `index`, as offsets.
    fn clip(&self, range: PfnRange, index: usize) -> (u32, u32) {
        let base = self.chunk_base(index).0;
        let lo = range.start().0.max(base) - base;
        let hi = range.end().0.min(base + self.geometry.chunk_pages()) - base;
        (lo as u32, hi as u32)
    }

    /// A chunk-aligned chunk range starting at `base`, inside the span.
    fn check_chunk_base(&self, base: Pfn) -> Result<usize, MetadataError> {
        let chunk = PfnRange::from_len(base, self.geometry.chunk_pages())?;
        chunk.check_aligned_to(self.geometry.chunk_pages())?;
        chunk.check_within(&self.span)?;
        Ok(self.slot_index(base))
    }

    /// Starts managing the chunk at `base`: unowned, clean, unpinned, not quarantined, and all
    /// `initial`.
    pub fn add_chunk(&self, base: Pfn, initial: Shareability) -> Result<(), MetadataError> {
        let index = self.check_chunk_base(base)?;
        let slot = &self.slots[index];
        let mut state = slot.state.write();
        if state.is_some() {
            return Err(MetadataError::AlreadyManaged { base });
        }
        *state = Some(ChunkState::new(initial));
        slot.summary
            .store(self.summary.uniform(), Ordering::Release);
        Ok(())
    }

    /// Stops managing the chunk at `base`. Refused while any page is owned, pinned or
    /// quarantined (quarantined memory must never be handed on).
    pub fn remove_chunk(&self, base: Pfn) -> Result<(), MetadataError> {
        let index = self.check_chunk_base(base)?;
        let slot = &self.slots[index];
        let mut state = slot.state.write();
        let chunk = state
            .as_ref()
            .ok_or(MetadataError::NotManaged { pfn: base })?;
        for (start, _, c) in chunk
            .coarse
            .runs_in(0, self.chunk_pages(), self.chunk_pages())
        {
            let first_pfn = Pfn(base.0 + u64::from(start));
            if let Some(owner) = c.owner {
                return Err(MetadataError::AlreadyOwned { first_pfn, owner });
            }
            if let Some(owner) = c.pins.first_owner() {
                return Err(MetadataError::Pinned { first_pfn, owner });
            }
            if c.quarantined.is_some() {
                return Err(MetadataError::Quarantined { first_pfn });
            }
        }
        *state = None;
        slot.summary.store(0, Ordering::Release);
        Ok(())
    }

    fn check_managed<G: Deref<Target = Option<ChunkState>>>(
        &self,
        range: PfnRange,
        first: usize,
        guards: &Guards<G>,
    ) -> Result<(), MetadataError> {
        match guards.iter().position(|g| g.is_none()) {
            None => Ok(()),
            Some(k) => Err(MetadataError::NotManaged {
                pfn: range.start().max(self.chunk_base(first + k)),
            }),
        }
    }
}

/// The size of a chunk slot, for the layout test.
#[cfg(all(test, not(pfnstore_loom)))]
pub(crate) fn slot_size() -> usize {
    std::mem::size_of::<Slot>()
}
