//! The scale curve's points (what `scale-curve` measures and writes, and `bench-summary` reads
//! back), and the order statistics it reports.

use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

/// One store size of the scale curve: a synthetic store with `files` files, measured uniform
/// and then at the target fragmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalePoint {
    /// The store's memory, TiB.
    pub tib: u64,
    /// Files in the store.
    pub files: u64,
    /// Bytes per file.
    pub file_bytes: u64,
    /// The fraction of the files' 4 KiB pages the fill was to convert to shared.
    pub target_fraction: f64,
    /// The fraction it converted (distinct pages; equal to the target unless capped).
    pub reached_fraction: f64,
    /// Pages converted by the fill (each an isolated 4 KiB conversion: two boundaries).
    pub converted_pages: u64,
    /// Threads of the fill (each on its own files).
    pub fill_threads: u64,
    /// Wall time of the fill, seconds.
    pub fill_seconds: f64,
    /// Metadata bytes of the store and its files with every file uniform (all private).
    pub uniform_metadata_bytes: u64,
    /// Metadata bytes at the reached fragmentation.
    pub metadata_bytes: u64,
    /// Timed 4 KiB conversions per storm (on one thread).
    pub storm_ops: u64,
    /// Storm on the uniform store: median and 99th percentile of one 4 KiB conversion, ns.
    pub uniform_median_ns: f64,
    /// See `uniform_median_ns`.
    pub uniform_p99_ns: f64,
    /// Storm at the reached fragmentation: median and 99th percentile, ns.
    pub median_ns: f64,
    /// See `median_ns`.
    pub p99_ns: f64,
    /// One whole file (of the fragmented store), fragmented → all shared, ms.
    pub whole_file_fragmented_to_shared_ms: f64,
    /// Then the same file all shared → all private, ms.
    pub whole_file_to_private_ms: f64,
    /// Then all private → all shared again, ms.
    pub whole_file_to_shared_ms: f64,
}

/// The points as a markdown table.
pub fn markdown(points: &[ScalePoint]) -> String {
    let mut out = String::from(
        "| store | files x size | pages converted (fraction) | fill | metadata uniform | metadata fragmented | added per converted page | 4 KiB conversion, uniform: median / p99 | fragmented: median / p99 | whole file: fragmented -> shared / -> private / -> shared |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        let per_page = (p.metadata_bytes.saturating_sub(p.uniform_metadata_bytes)) as f64
            / p.converted_pages.max(1) as f64;
        out.push_str(&format!(
            "| {} TiB | {} x {} MiB | {} ({:.3} %) | {:.1} s on {} threads | {} | {} | {:.1} B | {:.0} / {:.0} ns | {:.0} / {:.0} ns | {:.2} / {:.3} / {:.3} ms |\n",
            p.tib,
            p.files,
            p.file_bytes / MIB,
            p.converted_pages,
            p.reached_fraction * 100.0,
            p.fill_seconds,
            p.fill_threads,
            human_bytes(p.uniform_metadata_bytes as f64),
            human_bytes(p.metadata_bytes as f64),
            per_page,
            p.uniform_median_ns,
            p.uniform_p99_ns,
            p.median_ns,
            p.p99_ns,
            p.whole_file_fragmented_to_shared_ms,
            p.whole_file_to_private_ms,
            p.whole_file_to_shared_ms,
        ));
    }
    out
}

fn human_bytes(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= MIB as f64 {
        format!("{:.1} MiB", b / MIB as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The `p`-th percentile (0 to 100) of ascending `sorted` samples, by the nearest-rank rule:
/// the smallest sample with at least `p` % of the samples at or below it. `None` when empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn points_survive_json() {
        let point = ScalePoint {
            tib: 4,
            files: 1000,
            file_bytes: 4_395_630_592,
            target_fraction: 0.01,
            reached_fraction: 0.01,
            converted_pages: 10_737_418,
            fill_threads: 2,
            fill_seconds: 9.5,
            uniform_metadata_bytes: 300_000,
            metadata_bytes: 90_000_000,
            storm_ops: 200_000,
            uniform_median_ns: 900.0,
            uniform_p99_ns: 2000.0,
            median_ns: 1100.0,
            p99_ns: 3000.0,
            whole_file_fragmented_to_shared_ms: 12.0,
            whole_file_to_private_ms: 0.1,
            whole_file_to_shared_ms: 0.1,
        };
        let text = serde_json::to_string(&[&point]).unwrap();
        let back: Vec<ScalePoint> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, vec![point]);
    }
}
