//! The benchmark summary: one markdown table of every benchmark (pfnstore, each baseline, the
//! ratio baseline / pfnstore, above 1 meaning pfnstore is faster or smaller, the target where
//! the brief or an issue sets one and whether this run met it), then the scale curve; and the same as `<out>/summary.json` with the raw criterion medians (ns), the machine
//! (cores, CPU, kernel, load average before and after), the date and the git revision.
//!
//! `scripts/bench.sh` runs the benches, `scale-curve` and `pfnstore prefault`, then this:
//!
//! ```text
//! bash scripts/bench.sh       # the whole thing, under five minutes on two cores
//! cargo run --release -p pfnstore-benches --bin bench-summary -- \
//!     [--criterion target/criterion] [--out target/pfnstore-bench] [--logs DIR] \
//!     [--since EPOCH_SECONDS] [--load-before "$(cat /proc/loadavg)"] [--load-after ...] \
//!     [--command TEXT] [--elapsed SECONDS]
//! ```
//!
//! Its inputs: criterion's results (only those written at or after `--since`, so that an
//! earlier run's do not mix in), `<logs>/*.log` (the benches' output: snapshot sizes, skips;
//! `prefault.log`: `pfnstore prefault`'s output), `<out>/scale-curve.json`. Metadata bytes per
//! GiB are computed here, with a counting allocator (they are deterministic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use pfnstore_benches::criterion_results::{self, Measured};
use pfnstore_benches::footprint::metadata_bytes_per_gib;
use pfnstore_benches::scale_curve::{self, ScalePoint};
use pfnstore_benches::summary::logs;
use pfnstore_benches::summary::machine::{self, Machine};
use pfnstore_benches::summary::rows::{self, Inputs};
use pfnstore_benches::summary::table::{self, Row};
use pfnstore_core::testing::CountingAllocator;
use serde::Serialize;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// GiB of the space the bytes-per-GiB rows are measured on (as in the metadata bench).
const BYTES_GIB: u64 = 4;

#[derive(Debug, Default)]
struct Args {
    criterion: Option<PathBuf>,
    out: Option<PathBuf>,
    logs: Option<PathBuf>,
    since: Option<u64>,
    load_before: Option<String>,
    load_after: Option<String>,
    command: Option<String>,
    elapsed: Option<f64>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args::default();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--criterion" => parsed.criterion = Some(value.into()),
            "--out" => parsed.out = Some(value.into()),
            "--logs" => parsed.logs = Some(value.into()),
            "--since" => {
                parsed.since = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--since {value}: seconds since the epoch"))?,
                )
            }
            "--load-before" => parsed.load_before = Some(value),
            "--load-after" => parsed.load_after = Some(value),
            "--command" => parsed.command = Some(value),
            "--elapsed" => {
                parsed.elapsed = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--elapsed {value}: seconds"))?,
                )
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(parsed)
}

/// One criterion median as the JSON keeps it.
#[derive(Debug, Serialize)]
struct Median {
    median_ns: f64,
    elements: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    date: String,
    git_revision: String,
    command: Option<&'a str>,
    elapsed_seconds: Option<f64>,
    machine: Machine,
    ratio: &'static str,
    rows: &'a [Row],
    unused_results: &'a [&'a str],
    medians_ns: BTreeMap<&'a str, Median>,
    scale_curve: Result<Vec<ScalePoint>, String>,
    prefault: &'a Result<Vec<logs::Prefault>, String>,
}

/// The concatenated `*.log` files of `dir` (none: empty).
fn read_logs(dir: Option<&Path>) -> String {
    let Some(Ok(entries)) = dir.map(std::fs::read_dir) else {
        return String::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

fn prefault_of(dir: Option<&Path>) -> Result<Vec<logs::Prefault>, String> {
    let Some(dir) = dir else {
        return Err("not run (no --logs directory)".into());
    };
    let path = dir.join("prefault.log");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("not run ({}: {e})", path.display()))?;
    Ok(logs::prefault(&text))
}

fn scale_points(path: &Path) -> Result<Vec<ScalePoint>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("not run ({}: {e})", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(args: Args) -> Result<(), String> {
    let criterion = args
        .criterion
        .clone()
        .unwrap_or_else(criterion_results::default_dir);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/pfnstore-bench"));
    let since = args.since.map(|s| UNIX_EPOCH + Duration::from_secs(s));
    let results = criterion_results::collect(&criterion);
    let log_text = read_logs(args.logs.as_deref());
    let machine = Machine::here(args.load_before.as_deref(), args.load_after.as_deref());
    let inputs = Inputs {
        results,
        since,
        cores: machine.cores,
        bytes: metadata_bytes_per_gib(BYTES_GIB),
        snapshot_sizes: logs::snapshot_sizes(&log_text),
        skips: logs::skips(&log_text),
        prefault: prefault_of(args.logs.as_deref()),
    };
    if inputs.this_run().next().is_none() {
        return Err(format!(
            "no criterion results under {}{} (run the benches first)",
            criterion.display(),
            if since.is_some() {
                " written since the run started"
            } else {
                ""
            }
        ));
    }
    let rows = rows::rows(&inputs);
    let unused = rows::unused(&inputs, &rows);
    let scale = scale_points(&out.join("scale-curve.json"));

    let mut text = String::new();
    text.push_str(&format!(
        "pfnstore benchmark summary: {} at {}, {} cores ({}), kernel {}, hugetlb pools {}, load average {} before, {} after{}\n\n",
        machine::now_utc(),
        machine::git_revision(),
        machine.cores,
        machine.cpu,
        machine.kernel,
        machine::pools_text(&machine.hugetlb_pools),
        load(&machine.load_before),
        load(&machine.load_after),
        args.elapsed
            .map_or(String::new(), |s| format!(", measured in {s:.0} s")),
    ));
    text.push_str(
        "Ratio = baseline / pfnstore: above 1, pfnstore is faster (or smaller). Published \
         figures come from another machine. Targets are the goals the brief and the issues set \
         (each names its source); met? is judged on this run's figures.\n\n",
    );
    text.push_str(&table::markdown(&rows));
    text.push('\n');
    if !unused.is_empty() {
        text.push_str(&format!(
            "Results of this run that no row shows (a renamed benchmark?): {}\n\n",
            unused.join(", ")
        ));
    }
    match &scale {
        Ok(points) => {
            text.push_str("Scale curve (synthetic stores, 1,000 files each):\n\n");
            text.push_str(&scale_curve::markdown(points));
        }
        Err(why) => text.push_str(&format!("Scale curve: {why}\n")),
    }
    print!("{text}");

    let summary = Summary {
        date: machine::now_utc(),
        git_revision: machine::git_revision(),
        command: args.command.as_deref(),
        elapsed_seconds: args.elapsed,
        machine,
        ratio: "baseline / pfnstore (above 1: pfnstore is faster or smaller)",
        rows: &rows,
        unused_results: &unused,
        medians_ns: inputs
            .this_run()
            .map(|m: &Measured| {
                (
                    m.full_id.as_str(),
                    Median {
                        median_ns: m.median_ns,
                        elements: m.elements,
                    },
                )
            })
            .collect(),
        scale_curve: scale,
        prefault: &inputs.prefault,
    };
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    let json_path = out.join("summary.json");
    std::fs::write(&json_path, json).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let md_path = out.join("summary.md");
    std::fs::write(&md_path, &text).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!(
        "\nwritten: {} and {}",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

fn load(l: &Option<[f64; 3]>) -> String {
    l.map_or("unknown".to_string(), |[a, b, c]| format!("{a} {b} {c}"))
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench-summary: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("bench-summary: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs this binary's counting allocator: every design's bytes are seen, none is zero
    /// where the design keeps memory, and the struct-page array is 64 bytes per 4 KiB page.
    #[test]
    fn bytes_per_gib_are_measured() {
        let rows = metadata_bytes_per_gib(1).unwrap();
        assert_eq!(rows.len(), 5);
        let page_records = 64.0 * (1u64 << 18) as f64;
        for r in &rows {
            assert!(
                r.struct_page >= page_records && r.struct_page < 1.1 * page_records,
                "{r:?}"
            );
            assert!(r.bitmap >= (1u64 << 15) as f64, "{r:?}");
            assert!(r.pfnstore > 0.0, "{r:?}");
        }
        // Converted pages cost the range designs memory.
        assert!(rows[4].rangemap > rows[1].rangemap && rows[1].rangemap > 0.0);
        assert!(rows[4].pfnstore > rows[0].pfnstore);
    }

    #[test]
    fn arguments() {
        let a = parse_args(
            ["--since", "17", "--load-before", "1.0 2.0 3.0 1/2 3"]
                .iter()
                .map(|s| s.to_string()),
        )
        .unwrap();
        assert_eq!(a.since, Some(17));
        assert_eq!(a.load_before.as_deref(), Some("1.0 2.0 3.0 1/2 3"));
        assert!(parse_args(["--since", "x"].iter().map(|s| s.to_string())).is_err());
        assert!(parse_args(["--what", "x"].iter().map(|s| s.to_string())).is_err());
    }

    /// A fixture criterion directory and logs in a temp dir: the summary finds this run's
    /// results, computes ratios, reads the logs and writes both files.
    #[test]
    fn a_fixture_run_is_summarised() {
        let dir =
            std::env::temp_dir().join(format!("pfnstore-bench-summary-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let result = |id: &str, median: f64| {
            let new = dir
                .join("criterion")
                .join(id.replace(['/', ' ', ','], "_"))
                .join("new");
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(
                new.join("benchmark.json"),
                format!(r#"{{"full_id":"{id}","throughput":null}}"#),
            )
            .unwrap();
            std::fs::write(
                new.join("estimates.json"),
                format!(r#"{{"median":{{"point_estimate":{median}}}}}"#),
            )
            .unwrap();
        };
        result("metadata/convert_1g_and_back/pfnstore", 1_000.0);
        result("metadata/convert_1g_and_back/bitmap", 16_000.0);
        result("handover/snapshot, 1 TiB uniform", 100_000.0);
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(
            logs.join("handover.log"),
            "handover: 1 TiB uniform: snapshot 8434 bytes\n",
        )
        .unwrap();
        let out = dir.join("out");
        let args = Args {
            criterion: Some(dir.join("criterion")),
            out: Some(out.clone()),
            logs: Some(logs),
            since: Some(0),
            load_before: Some("0.5 0.4 0.3 1/100 1".into()),
            ..Args::default()
        };
        run(args).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(json["machine"]["load_before"][0], 0.5);
        assert!(json["machine"]["load_after"].is_null());
        assert_eq!(
            json["medians_ns"]["metadata/convert_1g_and_back/bitmap"]["median_ns"],
            16_000.0
        );
        let rows = json["rows"].as_array().unwrap();
        let row = rows
            .iter()
            .find(|r| r["benchmark"] == "metadata: 1 GiB to private and back (64 GiB space)")
            .unwrap();
        assert_eq!(row["baselines"][0]["ratio"], 16.0);
        assert!(md.contains("| metadata: 1 GiB to private and back (64 GiB space) | 1.00 µs | bitmap + counters, Mutex | 16.00 µs | 16.0x |"));
        assert!(md.contains("| handover: snapshot bytes, 1 TiB uniform | 8.2 KiB | — | — | — |"));
        // Rows without a result say so; the bytes rows are computed, not read.
        assert!(md.contains("not measured: no criterion result from this run"));
        assert!(md.contains("metadata bytes, 1% of 4 KiB pages converted at random"));
        assert!(md.contains("Scale curve: not run"));
        assert!(!md.contains("no row shows"));
        assert_eq!(json["unused_results"].as_array().map(Vec::len), Some(0));
        assert!(
            json["prefault"]["Err"]
                .as_str()
                .unwrap()
                .contains("not run")
        );
    }
}
