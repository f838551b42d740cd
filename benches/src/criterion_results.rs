//! Reading criterion's results: every benchmark's median under a criterion directory
//! (`target/criterion/<group>/<id>/new/{benchmark,estimates}.json`), by its full id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

/// One benchmark's last result.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Criterion's full id (`metadata/convert_1t/pfnstore`).
    pub full_id: String,
    /// The median estimate of one iteration, in ns.
    pub median_ns: f64,
    /// The throughput's element count per iteration, where the bench declared one.
    pub elements: Option<u64>,
    /// When `estimates.json` was written.
    pub written: SystemTime,
}

impl Measured {
    /// The median per element (per iteration where no throughput was declared), in ns.
    pub fn per_element_ns(&self) -> f64 {
        self.median_ns / self.elements.unwrap_or(1).max(1) as f64
    }
}

/// The criterion directory: `$CARGO_TARGET_DIR/criterion`, else `target/criterion`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("criterion")
}

/// Every result below `dir`, by full id. Unreadable or malformed result directories are left
/// out (criterion rewrites them on every run).
pub fn collect(dir: &Path) -> BTreeMap<String, Measured> {
    let mut found = BTreeMap::new();
    walk(dir, &mut found);
    found
}

fn walk(dir: &Path, out: &mut BTreeMap<String, Measured>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            if let Some(m) = read(&path) {
                out.insert(m.full_id.clone(), m);
            }
        } else {
            walk(&path, out);
        }
    }
}

/// The result in one `new` directory.
pub fn read(new_dir: &Path) -> Option<Measured> {
    let benchmark = std::fs::read_to_string(new_dir.join("benchmark.json")).ok()?;
    let estimates_path = new_dir.join("estimates.json");
    let estimates = std::fs::read_to_string(&estimates_path).ok()?;
    let written = std::fs::metadata(&estimates_path).ok()?.modified().ok()?;
    parse(&benchmark, &estimates, written)
}

/// A result from the text of `benchmark.json` and `estimates.json`.
pub fn parse(benchmark: &str, estimates: &str, written: SystemTime) -> Option<Measured> {
    let benchmark: Value = serde_json::from_str(benchmark).ok()?;
    let estimates: Value = serde_json::from_str(estimates).ok()?;
    let full_id = benchmark.get("full_id")?.as_str()?.to_string();
    let median_ns = estimates.get("median")?.get("point_estimate")?.as_f64()?;
    let elements = benchmark
        .get("throughput")
        .and_then(|t| t.get("Elements"))
        .and_then(Value::as_u64);
    Some(Measured {
        full_id,
        median_ns,
        elements,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCHMARK: &str = r#"{"group_id":"pair_threads","function_id":"2","value_str":null,"throughput":{"Elements":400000},"full_id":"pair_threads/2","directory_name":"pair_threads/2","title":"pair_threads/2"}"#;
    const ESTIMATES: &str = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":5.0,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":8000000.0,"standard_error":0.3}}"#;

    #[test]
    fn median_and_throughput_are_read() {
        let m = parse(BENCHMARK, ESTIMATES, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(m.full_id, "pair_threads/2");
        assert_eq!(m.median_ns, 8_000_000.0);
        assert_eq!(m.elements, Some(400_000));
        assert_eq!(m.per_element_ns(), 20.0);
    }

    #[test]
    fn no_throughput_is_per_iteration() {
        let b = r#"{"full_id":"metadata/convert_1t/pfnstore","throughput":null}"#;
        let m = parse(b, ESTIMATES, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(m.elements, None);
        assert_eq!(m.per_element_ns(), 8_000_000.0);
    }

    #[test]
    fn malformed_results_are_left_out() {
        assert!(parse("{", ESTIMATES, SystemTime::UNIX_EPOCH).is_none());
        assert!(parse(BENCHMARK, r#"{"mean":{}}"#, SystemTime::UNIX_EPOCH).is_none());
    }

    #[test]
    fn a_directory_tree_is_walked() {
        let dir =
            std::env::temp_dir().join(format!("pfnstore-criterion-results-{}", std::process::id()));
        let new = dir.join("pair_threads").join("2").join("new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("benchmark.json"), BENCHMARK).unwrap();
        std::fs::write(new.join("estimates.json"), ESTIMATES).unwrap();
        // A base directory criterion keeps beside `new` is not a result of the last run.
        let base = dir.join("pair_threads").join("2").join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("benchmark.json"), BENCHMARK).unwrap();
        let found = collect(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["pair_threads/2"].median_ns, 8_000_000.0);
    }
}
