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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from);
            target.join("criterion")
        });
    let mut found = Vec::new();
    collect(&dir, &mut found);
    if found.is_empty() {
        eprintln!(
            "no criterion results under {} (run the benches first)",
            dir.display()
        );
        std::process::exit(1);
    }
    // row -> implementation -> median ns
    let mut rows: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (full_id, median) in found {
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

/// Every `.../new/benchmark.json` below `dir`, with the median of its `estimates.json`.
fn collect(dir: &Path, out: &mut Vec<(String, f64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "new") {
                if let Some(result) = read(&path) {
                    out.push(result);
                }
            } else {
                collect(&path, out);
            }
        }
    }
}

fn read(new_dir: &Path) -> Option<(String, f64)> {
    let benchmark = std::fs::read_to_string(new_dir.join("benchmark.json")).ok()?;
    let estimates = std::fs::read_to_string(new_dir.join("estimates.json")).ok()?;
    let full_id = string_field(&benchmark, "full_id")?;
    let median = &estimates[estimates.find("\"median\"")?..];
    let value = number_field(median, "point_estimate")?;
    Some((full_id, value))
}

fn string_field(json: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\":\"");
    let start = json.find(&key)? + key.len();
    let end = start + json[start..].find('"')?;
    Some(json[start..end].to_string())
}

fn number_field(json: &str, name: &str) -> Option<f64> {
    let key = format!("\"{name}\":");
    let start = json.find(&key)? + key.len();
    let end = start + json[start..].find([',', '}'])?;
    json[start..end].trim().parse().ok()
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
    fn fields_are_extracted() {
        let b = r#"{"group_id":"g","full_id":"alloc/2M/vm-allocator","x":1}"#;
        assert_eq!(
            string_field(b, "full_id").as_deref(),
            Some("alloc/2M/vm-allocator")
        );
        let e = r#"{"mean":{"point_estimate":5.0},"median":{"confidence_interval":{"lower_bound":1.0},"point_estimate":93.5,"standard_error":0.3}}"#;
        let median = &e[e.find("\"median\"").unwrap()..];
        assert_eq!(number_field(median, "point_estimate"), Some(93.5));
        assert_eq!(human(1500.0), "1.50 us");
    }
}
