//! The benchmark summary (`bench-summary`, run by `scripts/bench.sh`): one table of every
//! benchmark with pfnstore's figure next to each baseline's and their ratio, and the same as
//! JSON with the raw medians, the machine and the revision.
//!
//! * [`table`]: the row model, ratios and the markdown rendering;
//! * [`rows`]: which criterion results make which rows;
//! * [`logs`]: what the benches and `pfnstore prefault` print that criterion does not keep
//!   (snapshot sizes, skips, prefault times);
//! * [`machine`]: cores, CPU, kernel, load average, date, git revision.

pub mod logs;
pub mod machine;
pub mod rows;
pub mod table;
