//! # pfnstore loom models
//!
//! The models live in `tests/` (one file per concurrent path) and in `#[cfg(all(test,
//! pfnstore_loom))]` modules of the crates whose private items they need. They compile to
//! nothing unless the workspace is built with `RUSTFLAGS="--cfg pfnstore_loom"`, which switches
//! the sync facade in `pfnstore-core` to loom's primitives:
//!
//! ```text
//! RUSTFLAGS="--cfg pfnstore_loom" LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test --release --target-dir target/loom -p pfnstore-loom-tests
//! ```
//!
//! `scripts/test-all.sh` runs them that way; ARCHITECTURE.md says how to run one model deeper.
//!
//! This library holds what the models share: the loom builder with the project's bounds, and
//! (under loom) `domains`, tiny conversion domains, and `mapper`, a subscriber that holds
//! exactly what the plans tell it and checks every callback against what it holds.

/// The preemption bound the models use unless `LOOM_MAX_PREEMPTIONS` says otherwise.
pub const DEFAULT_MAX_PREEMPTIONS: usize = 2;

/// Scheduling decisions one execution may take unless `LOOM_MAX_BRANCHES` says otherwise.
/// A change transaction takes a few dozen locks and atomics, so a model with three or four of
/// them needs more than loom's default of 1,000; a spinning wait still hits this bound (that is
/// how a livelock shows).
pub const DEFAULT_MAX_BRANCHES: usize = 20_000;

/// A loom builder with the project's defaults: a bounded number of preemptions (overridable
/// through `LOOM_MAX_PREEMPTIONS`), so the whole suite stays within CI's budget.
#[cfg(pfnstore_loom)]
pub fn model_builder() -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_MAX_PREEMPTIONS);
    }
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        builder.max_branches = DEFAULT_MAX_BRANCHES;
    }
    builder
}

#[cfg(pfnstore_loom)]
pub mod domains;
#[cfg(pfnstore_loom)]
pub mod mapper;
