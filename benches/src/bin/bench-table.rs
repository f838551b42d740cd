//! Prints the side-by-side table of the last criterion run: for every benchmark, pfnstore's
//! median time next to each baseline's, and the ratio (baseline / ours; above 1 means pfnstore
//! is faster).
//!
//! ```text
//! cargo bench -p pfnstore-benches -- --warm-up-time 1 --measurement-time 2
//! cargo run --release -p pfnstore-benches --bin bench-table [criterion dir]
//! ```
//!
//! The criterion directory defaults to `$CARGO_TARGET_DIR/criterion`, else `target/criterion`.
//! `bench-summary` (run by `scripts/bench.sh`) gives every row of the benchmark issue, with
//! published figures, the machine and JSON; this is the raw table of whatever criterion has.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfnstore_benches::criterion_results;

/// Implementation names used in benchmark ids; the first ones are pfnstore's.
const OURS: [&str; 2] = ["pfnstore", "ours-sharded"];
const KNOWN: [&str; 7] = [
    "pfnstore",
    "ours-sharded",
    "ours-1-shard",
    "bitmap",
    "rangemap",
    "struct_page",
    "vm-allocator",
];

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(criterion_results::default_dir, PathBuf::from);
    let found = criterion_results::collect(&dir);
    if found.is_empty() {
        eprintln!(
            "no criterion results under {} (run the benches first)",
            dir.display()
        );
        std::process::exit(1);
    }
    // row -> implementation -> median ns
    let mut rows: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (full_id, measured) in found {
        let median = measured.median_ns;
        let parts: Vec<&str> = full_id.split('/').collect();
        let (implementation, row) = match parts.iter().position(|p| KNOWN.contains(p)) {
            Some(i) => {
                let mut rest = parts.clone();
                rest.remove(i);
                (parts[i].to_string(), rest.join("/"))
            }
            None => ("pfnstore".to_string(), full_id.clone()),
        };
        rows.entry(row).or_default().insert(implementation, median);
    }
    // The first column fits the longest row name.
    let w = rows.keys().map(String::len).max().unwrap_or(0).max(62);
    println!(
        "{:<w$} {:>12} {:>14} {:>12} {:>8}",
        "benchmark", "pfnstore", "baseline", "time", "ratio"
    );
    for (row, impls) in rows {
        let ours = OURS.iter().find_map(|o| impls.get(*o).map(|t| (*o, *t)));
        let Some((ours_name, ours_time)) = ours else {
            for (name, t) in &impls {
                println!(
                    "{row:<w$} {:>12} {name:>14} {:>12} {:>8}",
                    "-",
                    human(*t),
                    "-"
                );
            }
            continue;
        };
        let baselines: Vec<_> = impls
            .iter()
            .filter(|(n, _)| n.as_str() != ours_name)
            .collect();
        if baselines.is_empty() {
            println!(
                "{row:<w$} {:>12} {:>14} {:>12} {:>8}",
                human(ours_time),
                "-",
                "-",
                "-"
            );
        }
        for (name, t) in baselines {
            println!(
                "{row:<w$} {:>12} {name:>14} {:>12} {:>7.2}x",
                human(ours_time),
                human(*t),
                t / ours_time
            );
        }
    }
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_human() {
        assert_eq!(human(93.5), "93.5 ns");
        assert_eq!(human(1500.0), "1.50 us");
        assert_eq!(human(2.5e6), "2.50 ms");
    }
}
