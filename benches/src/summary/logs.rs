//! What the benches and `pfnstore prefault` print that criterion does not keep: the handover
//! bench's snapshot sizes, the benches' skips, and the prefault comparison.

use serde::Serialize;

/// `handover: <case>: snapshot <n> bytes` lines (the handover bench's stderr): case and bytes.
pub fn snapshot_sizes(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("handover: ")?;
            let (case, size) = rest.rsplit_once(": snapshot ")?;
            let bytes = size.strip_suffix(" bytes")?.trim().parse().ok()?;
            Some((case.to_string(), bytes))
        })
        .collect()
}

/// `skipped: <what>: <why>` lines (the conversion bench's stdout): what and why.
pub fn skips(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("skipped: ")?;
            let (what, why) = rest.split_once(": ")?;
            Some((what.to_string(), why.to_string()))
        })
        .collect()
}

/// One page size of `pfnstore prefault`'s output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prefault {
    /// `1 GiB hugetlb pages`, `2 MiB hugetlb pages`, `ordinary 4 KiB pages`.
    pub kind: String,
    /// The first (cold) obtain, MAP_POPULATE, ms.
    pub cold_ms: Option<f64>,
    /// Warm median with parallel MADV_POPULATE_WRITE threads, ms.
    pub threads_ms: Option<f64>,
    /// How the threaded method was described (`MADV_POPULATE_WRITE on 2 threads`).
    pub threads_method: Option<String>,
    /// Warm median with MAP_POPULATE, ms.
    pub map_populate_ms: Option<f64>,
    /// The order of the warm rounds, as printed.
    pub order: Option<String>,
    /// Why nothing (or no warm round) was measured.
    pub skipped: Option<String>,
}

/// The page kinds `pfnstore prefault` prints, in its order.
const KINDS: [&str; 3] = [
    "1 GiB hugetlb pages",
    "2 MiB hugetlb pages",
    "ordinary 4 KiB pages",
];

/// The first number in `text` after `marker`.
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `pfnstore prefault`'s plain output, one entry per page kind it reported.
pub fn prefault(output: &str) -> Vec<Prefault> {
    let mut found: Vec<Prefault> = Vec::new();
    for line in output.lines() {
        let Some(kind) = KINDS.iter().find(|k| line.starts_with(**k)) else {
            continue;
        };
        let rest = line[kind.len()..].trim_start();
        let entry = match found.iter_mut().find(|p| p.kind == *kind) {
            Some(entry) => entry,
            None => {
                found.push(Prefault {
                    kind: kind.to_string(),
                    cold_ms: None,
                    threads_ms: None,
                    threads_method: None,
                    map_populate_ms: None,
                    order: None,
                    skipped: None,
                });
                found.last_mut().expect("just pushed")
            }
        };
        if let Some(why) = rest.strip_prefix("not measured: ") {
            entry.skipped = Some(why.to_string());
        } else if let Some(why) = rest.strip_prefix("warm rounds not measured: ") {
            entry.skipped = Some(format!("warm rounds: {why}"));
        } else if rest.starts_with("cold:") {
            entry.cold_ms = number_after(rest, " took ");
        } else if let Some(order) = rest.strip_prefix("order of the ") {
            entry.order = order.split_once(": ").map(|(_, o)| o.to_string());
        } else if rest.starts_with("MAP_POPULATE") {
            entry.map_populate_ms = number_after(rest, " warm ");
        } else if rest.starts_with("MADV_POPULATE_WRITE") {
            entry.threads_ms = number_after(rest, " warm ");
            entry.threads_method = rest.split_once("  ").map(|(m, _)| m.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sizes_are_read() {
        let log = "     Running benches/handover.rs\n\
                   handover: 1 TiB uniform: snapshot 8434 bytes\n\
                   Benchmarking handover/snapshot, 1 TiB uniform\n\
                   handover: 1 TiB, 0.1% of pages converted: snapshot 1661605 bytes\n";
        assert_eq!(
            snapshot_sizes(log),
            vec![
                ("1 TiB uniform".to_string(), 8434),
                ("1 TiB, 0.1% of pages converted".to_string(), 1_661_605)
            ]
        );
    }

    #[test]
    fn skips_are_read() {
        let log = "skipped: end-to-end on real 1 GiB hugetlb: 1 x 1 GiB hugetlb pages could not be had: no pages\nother\n";
        assert_eq!(
            skips(log),
            vec![(
                "end-to-end on real 1 GiB hugetlb".to_string(),
                "1 x 1 GiB hugetlb pages could not be had: no pages".to_string()
            )]
        );
    }

    // The shape of `pfnstore prefault --runs 3` (src/cli/prefault.rs).
    const PREFAULT: &str = "\
prefault: obtaining 2 GiB per run (memfd + mmap + prefault), one page size at a time; pools are grown by what is missing and given back after each run
per page size: one cold obtain first (first touch; ...), then 3 warm rounds timing both methods, alternating which goes first
1 GiB hugetlb pages   not measured: the 1 GiB pool could not be grown: only 0 of 2 pages
2 MiB hugetlb pages   cold: the first obtain (MAP_POPULATE) took 812.3 ms, 2.46 GiB/s; not compared
2 MiB hugetlb pages   MADV_POPULATE_WRITE on 2 threads   warm 120.5 ms median (min 118.0), 16.60 GiB/s, pool grown in 30.1 ms, pagemap 0.40 ms/GiB
2 MiB hugetlb pages   MAP_POPULATE                       warm 201.0 ms median (min 199.9), 9.95 GiB/s, pool grown in 29.0 ms
2 MiB hugetlb pages   order of the 3 warm rounds: threads first, MAP_POPULATE first, threads first
2 MiB hugetlb pages   speed-up: threads are 1.67x as fast as MAP_POPULATE (medians of 3 warm runs each)
ordinary 4 KiB pages  cold: the first obtain (MAP_POPULATE) took 900.0 ms, 2.22 GiB/s; not compared
ordinary 4 KiB pages  MADV_POPULATE_WRITE on 2 threads   warm 300 ms median (min 290.5), 6.67 GiB/s
ordinary 4 KiB pages  MAP_POPULATE                       warm 450.2 ms median (min 440.0), 4.44 GiB/s
";

    #[test]
    fn prefault_output_is_read() {
        let p = prefault(PREFAULT);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].kind, "1 GiB hugetlb pages");
        assert_eq!(
            p[0].skipped.as_deref(),
            Some("the 1 GiB pool could not be grown: only 0 of 2 pages")
        );
        assert_eq!(p[0].cold_ms, None);
        assert_eq!(p[1].cold_ms, Some(812.3));
        assert_eq!(p[1].threads_ms, Some(120.5));
        assert_eq!(
            p[1].threads_method.as_deref(),
            Some("MADV_POPULATE_WRITE on 2 threads")
        );
        assert_eq!(p[1].map_populate_ms, Some(201.0));
        assert_eq!(
            p[1].order.as_deref(),
            Some("threads first, MAP_POPULATE first, threads first")
        );
        assert_eq!(p[2].threads_ms, Some(300.0));
        assert_eq!(p[2].map_populate_ms, Some(450.2));
        assert_eq!(p[2].skipped, None);
    }
}
