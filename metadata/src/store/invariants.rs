//! The store checks its own canonical form, for tests.

use pfnstore_core::sync::atomic::Ordering;

use super::MetadataStore;
use crate::summary::MANAGED;

impl MetadataStore {
    /// Checks the canonical form of every chunk and that every summary matches its chunk.
    /// For tests; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (index, slot) in self.slots.iter().enumerate() {
            let state = slot.state.read();
            let summary = slot.summary.load(Ordering::Acquire);
            let expected = match state.as_ref() {
                None => 0,
                Some(chunk) => {
                    chunk
                        .check_canonical(self.plane_shape())
                        .map_err(|e| format!("chunk {index}: {e}"))?;
                    let window = self.summary.whole_chunk();
                    let (uniform, nonuniform) = self.uniformity(chunk, window);
                    self.summary.recompute(
                        uniform,
                        window,
                        nonuniform.as_slice().iter().copied(),
                        MANAGED,
                    )
                }
            };
            if summary != expected {
                return Err(format!(
                    "chunk {index}: summary {summary:#x}, expected {expected:#x}"
                ));
            }
        }
        Ok(())
    }
}
