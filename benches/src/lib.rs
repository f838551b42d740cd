//! # pfnstore-benches: the baselines pfnstore is measured against
//!
//! The criterion benches in `benches/` compare pfnstore's crates with the designs a VMM or the
//! kernel would otherwise use (see ARCHITECTURE.md, "Benchmarks"). The baselines live here so
//! that they are built once, tested, and shared by the benches. The rest serves the benchmark
//! summary (`scripts/bench.sh`): reading criterion's results, the metadata footprint, the
//! scale curve's points, and the summary's rows.

pub mod criterion_results;
pub mod footprint;
pub mod metadata_baselines;
pub mod scale_curve;
pub mod stores;
pub mod summary;
pub mod workers;
