//! Which results make which rows of the summary: metadata,
//! bytes, allocator (with LLFree's published figures), the facade, prefault, handover.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::criterion_results::Measured;
use crate::footprint::{BytesPerGib, FRAGMENTATIONS};
use crate::summary::logs::Prefault;
use crate::summary::table::{Baseline, Row, Unit, human};

/// The label of LLFree's published figures.
pub const LLFREE: &str = "LLFree (published, another machine)";
// LLFree's published figures: L. Wrenger, F. Rommel, A. Halbuer, C. Dietrich, D. Lohmann,
// "LLFree: Scalable and Optionally-Persistent Page-Frame Allocation", USENIX ATC 2023
// (https://www.usenix.org/conference/atc23/presentation/wrenger; code: github luhsra/llfree-rs),
// its user-space evaluation: ~91 ns per 4 KiB alloc+free
// pair and ~70 ns per 2 MiB pair, flat from 1 to 26 cores, with Linux's buddy allocator ~10x
// slower under concurrent bulk allocation. They were measured on another machine: the summary
// shows them beside this run's figures, never as a ratio that claims more.
/// LLFree (USENIX ATC 2023), user space: one 4 KiB alloc+free pair, ns.
pub const LLFREE_4K_PAIR_NS: f64 = 91.0;
/// The same for a 2 MiB pair, ns.
pub const LLFREE_2M_PAIR_NS: f64 = 70.0;

// The allocator's targets. They come from LLFree measured on this machine beside
// pfnstore by the llfree-cmp harness (outside the workspace, one binary, one run): 4 KiB
// pair 37.9 ns, 2 MiB pair 33.0 ns; bulk 1M x 4 KiB 21.8 ns per alloc, 19.0 ns per free
// newest first, 20.1 ns per free in random order. They are targets, not measurements of
// this run.
/// Where the allocator's targets come from.
const ALLOCATOR_TARGET: &str = "allocator target: LLFree measured on this machine";
/// Allocator target: a 4 KiB pair on one thread at or below LLFree's figure here, ns.
const TARGET_4K_PAIR_NS: f64 = 38.0;
/// Allocator target: a 2 MiB pair, ns.
const TARGET_2M_PAIR_NS: f64 = 33.0;
/// Allocator target: a 1 GiB pair stays at or below this, ns.
const TARGET_1G_PAIR_NS: f64 = 60.0;
/// Allocator target: bulk 4 KiB at most 1.5x LLFree's per alloc and per free (in any order), ns.
const TARGET_BULK_ALLOC_NS: f64 = 1.5 * 21.8;
/// See [`TARGET_BULK_ALLOC_NS`].
const TARGET_BULK_FREE_NEWEST_NS: f64 = 1.5 * 19.0;
/// See [`TARGET_BULK_ALLOC_NS`].
const TARGET_BULK_FREE_RANDOM_NS: f64 = 1.5 * 20.1;
/// Live-update target: a uniform 1 TiB store hands over in under this, ns.
const TARGET_HANDOVER_NS: f64 = 10e6;
/// Live-update target: and its snapshot is under this, bytes.
const TARGET_SNAPSHOT_BYTES: f64 = (1u64 << 20) as f64;

/// Everything a summary is made from.
#[derive(Debug)]
pub struct Inputs {
    /// Criterion's results, by full id.
    pub results: BTreeMap<String, Measured>,
    /// Results written before this are from an earlier run and left out.
    pub since: Option<SystemTime>,
    /// CPUs of the machine (for the thread rows' notes).
    pub cores: usize,
    /// Metadata bytes per GiB at each fragmentation, or why they are missing.
    pub bytes: Result<Vec<BytesPerGib>, String>,
    /// The handover bench's snapshot sizes: case, bytes.
    pub snapshot_sizes: Vec<(String, u64)>,
    /// The benches' skips: what, why.
    pub skips: Vec<(String, String)>,
    /// `pfnstore prefault`'s figures, or why there are none.
    pub prefault: Result<Vec<Prefault>, String>,
}

impl Inputs {
    /// A result of this run.
    fn get(&self, id: &str) -> Option<&Measured> {
        self.results
            .get(id)
            .filter(|m| self.since.is_none_or(|since| m.written >= since))
    }

    /// The median per iteration of `id`, ns.
    fn median(&self, id: &str) -> Option<f64> {
        self.get(id).map(|m| m.median_ns)
    }

    /// The results of this run, by full id.
    pub fn this_run(&self) -> impl Iterator<Item = &Measured> {
        self.results
            .values()
            .filter(|m| self.since.is_none_or(|since| m.written >= since))
    }

    fn skip_reason(&self, what: &str) -> Option<&str> {
        self.skips
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, why)| why.as_str())
    }
}

/// A time row: pfnstore's `ours` id and `(name, id)` baselines measured here.
fn timed(inputs: &Inputs, benchmark: String, ours: &str, baselines: &[(&str, String)]) -> Row {
    let mut row = Row::new(benchmark, Unit::Ns, inputs.median(ours));
    let mut sources = vec![ours.to_string()];
    for (name, id) in baselines {
        if let Some(v) = inputs.median(id) {
            row = row.with(Baseline::measured(*name, v));
            sources.push(id.clone());
        }
    }
    if row.pfnstore.is_none() {
        row = row.noted("not measured: no criterion result from this run");
    }
    row.from_sources(sources)
}

/// Every row of the summary.
pub fn rows(inputs: &Inputs) -> Vec<Row> {
    let mut rows = Vec::new();
    metadata(inputs, &mut rows);
    bytes(inputs, &mut rows);
    allocator(inputs, &mut rows);
    facade(inputs, &mut rows);
    prefault(inputs, &mut rows);
    handover(inputs, &mut rows);
    rows
}

/// The results of this run that no row shows (a renamed benchmark shows up here rather than
/// as a silent "not measured").
pub fn unused<'a>(inputs: &'a Inputs, rows: &[Row]) -> Vec<&'a str> {
    let shown: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.sources.iter().map(String::as_str))
        .collect();
    inputs
        .this_run()
        .map(|m| m.full_id.as_str())
        .filter(|id| !shown.contains(id))
        .collect()
}

const BITMAP: &str = "bitmap + counters, Mutex";
/// The brief (section 6) on speed.
const BEAT_BITMAP: &str = "≤ bitmap (brief §6: the baseline to beat on speed)";
const RANGEMAP: &str = "rangemap, Mutex";
/// The decided speed target of the metadata fast path (in a fragmented space).
const BEAT_RANGEMAP_FRAGMENTED: &str = "≥ 3x rangemap in a fragmented space (the settled target)";
const STRUCT_PAGE: &str = "struct page array (64 B per 4 KiB)";

fn metadata(inputs: &Inputs, rows: &mut Vec<Row>) {
    for (id, words) in [
        ("shared_1g", "a uniform shared 1 GiB"),
        ("private_1g", "a uniform private 1 GiB"),
        (
            "shared_1g_of_1pct_fragmented_space",
            "a uniform shared 1 GiB, 1 % of the other chunks' pages converted",
        ),
    ] {
        let group = format!("metadata/convert_4k_and_back_in_{id}");
        let row = timed(
            inputs,
            format!("metadata: 4 KiB convert-and-back in {words} (64 GiB space)"),
            &format!("{group}/pfnstore"),
            &[
                (BITMAP, format!("{group}/bitmap")),
                (RANGEMAP, format!("{group}/rangemap")),
                (STRUCT_PAGE, format!("{group}/struct_page")),
            ],
        );
        // The speed target of the fast path was settled for the space of a running VM: at
        // least 3x rangemap once the space is fragmented (ARCHITECTURE.md, "Benchmarks").
        rows.push(if id.contains("fragmented") {
            row.target_ratio(RANGEMAP, 3.0, BEAT_RANGEMAP_FRAGMENTED)
        } else {
            row.target_ratio(BITMAP, 1.0, BEAT_BITMAP)
        });
    }
    for (_, label) in FRAGMENTATIONS {
        let group = "metadata/max_mapping_size";
        rows.push(
            timed(
                inputs,
                format!(
                    "metadata: max mapping size query, {label} of 4 KiB pages converted (8 GiB)"
                ),
                &format!("{group}/pfnstore/{label}"),
                &[
                    (BITMAP, format!("{group}/bitmap/{label}")),
                    (RANGEMAP, format!("{group}/rangemap/{label}")),
                ],
            )
            .target_ratio(BITMAP, 1.0, BEAT_BITMAP),
        );
    }
    for (group, words, baselines) in [
        (
            "metadata/convert_1g_and_back",
            "1 GiB to private and back (64 GiB space)",
            &[("bitmap", BITMAP), ("struct_page", STRUCT_PAGE)][..],
        ),
        (
            "metadata/convert_64g_and_back",
            "64 GiB to private and back (64 GiB space)",
            &[("bitmap", BITMAP)][..],
        ),
        (
            "metadata/convert_1t",
            "1 TiB converted one way (1 TiB space)",
            &[("bitmap", BITMAP)][..],
        ),
    ] {
        let baselines: Vec<(&str, String)> = baselines
            .iter()
            .map(|(id, name)| (*name, format!("{group}/{id}")))
            .collect();
        rows.push(
            timed(
                inputs,
                format!("metadata: {words}"),
                &format!("{group}/pfnstore"),
                &baselines,
            )
            .target_ratio(BITMAP, 1.0, BEAT_BITMAP),
        );
    }
}

fn bytes(inputs: &Inputs, rows: &mut Vec<Row>) {
    match &inputs.bytes {
        Ok(table) => {
            for b in table {
                rows.push(
                    Row::new(
                        format!(
                            "metadata bytes, {} of 4 KiB pages converted at random",
                            b.label
                        ),
                        Unit::BytesPerGib,
                        Some(b.pfnstore),
                    )
                    .with(Baseline::measured(BITMAP, b.bitmap))
                    .with(Baseline::measured(RANGEMAP, b.rangemap))
                    .with(Baseline::measured(STRUCT_PAGE, b.struct_page))
                    .target_ratio(
                        BITMAP,
                        1.0,
                        "≤ bitmap (brief §4: never more than a per-4 KiB bitmap)",
                    )
                    .from_sources(["pfnstore_benches::footprint (counting allocator)".into()]),
                );
            }
        }
        Err(why) => rows.push(
            Row::new("metadata bytes per GiB", Unit::BytesPerGib, None)
                .noted(format!("not measured: {why}")),
        ),
    }
}

/// Criterion's median per element of the iteration (the bench's declared throughput), ns.
fn per_op(inputs: &Inputs, id: &str) -> Option<f64> {
    inputs.get(id).map(Measured::per_element_ns)
}

/// The time per element of one thread, where `threads` threads each did an equal share of
/// the iteration's elements at once: the iteration's time over one thread's share.
fn per_thread(inputs: &Inputs, id: &str, threads: u64) -> Option<f64> {
    inputs.get(id).map(|m| m.per_element_ns() * threads as f64)
}

fn allocator(inputs: &Inputs, rows: &mut Vec<Row>) {
    for (group, words) in [
        ("alloc_free_empty", "on an empty 64 GiB"),
        (
            "alloc_free_10k_holes",
            "among 10,000 one-page holes (64 GiB)",
        ),
    ] {
        for size in ["4K", "2M", "1G"] {
            rows.push(timed(
                inputs,
                format!("allocator: {size} alloc+free {words}, pfnstore 8 shards"),
                &format!("{group}/{size}/ours-sharded"),
                &[
                    (
                        "vm-allocator, Mutex",
                        format!("{group}/{size}/vm-allocator"),
                    ),
                    ("pfnstore, 1 shard", format!("{group}/{size}/ours-1-shard")),
                ],
            ));
        }
    }
    let cores = inputs.cores;
    for n in [1u64, 2, 8] {
        let id = |imp: &str| format!("threads/{n}/{imp}");
        let mut row = Row::new(
            format!(
                "allocator: random sizes (4K/2M/1G at 70/25/5 %, 16 live per thread), {n} thread(s) on {cores} cores, wall time per operation, pfnstore 8 shards"
            ),
            Unit::Ns,
            per_op(inputs, &id("ours-sharded")),
        );
        for (name, imp) in [
            ("vm-allocator, Mutex", "vm-allocator"),
            ("pfnstore, 1 shard", "ours-1-shard"),
        ] {
            if let Some(v) = per_op(inputs, &id(imp)) {
                row = row.with(Baseline::measured(name, v));
            }
        }
        rows.push(missing_noted(row).from_sources([
            id("ours-sharded"),
            id("vm-allocator"),
            id("ours-1-shard"),
        ]));
    }

    let llfree_flat = "flat from 1 to 26 cores";
    for (id, words, published, target) in [
        (
            "pair/4K/1-shard",
            "4K alloc+free pair, 1 thread, 1 shard",
            Some(LLFREE_4K_PAIR_NS),
            Some(TARGET_4K_PAIR_NS),
        ),
        (
            "pair/4K/8-shards",
            "4K alloc+free pair, 1 thread, 8 shards",
            None,
            None,
        ),
        (
            "pair/2M/1-shard",
            "2M alloc+free pair, 1 thread, 1 shard",
            Some(LLFREE_2M_PAIR_NS),
            Some(TARGET_2M_PAIR_NS),
        ),
        (
            "pair/1G/1-shard",
            "1G alloc+free pair, 1 thread, 1 shard",
            None,
            Some(TARGET_1G_PAIR_NS),
        ),
    ] {
        let mut row = Row::new(
            format!("allocator: {words} (16 GiB)"),
            Unit::Ns,
            inputs.median(id),
        );
        if let Some(ns) = published {
            row = row.with(Baseline::published(LLFREE, Some(ns), "user space"));
        }
        if let Some(limit) = target {
            row = row.target_at_most(limit, ALLOCATOR_TARGET);
        }
        rows.push(missing_noted(row).from_sources([id.to_string()]));
    }
    let newest_first = per_op(inputs, "bulk_4k/free-newest-first");
    for (id, words, limit) in [
        ("bulk_4k/alloc", "per alloc", TARGET_BULK_ALLOC_NS),
        (
            "bulk_4k/free-newest-first",
            "per free, newest first",
            TARGET_BULK_FREE_NEWEST_NS,
        ),
        (
            "bulk_4k/free-random",
            "per free, in random order",
            TARGET_BULK_FREE_RANDOM_NS,
        ),
    ] {
        let mut row = Row::new(
            format!(
                "allocator: bulk, up to 1M 4K frames from empty on 1 thread (1 shard), {words}"
            ),
            Unit::Ns,
            per_op(inputs, id),
        );
        if id == "bulk_4k/free-random" {
            // Allocator target: any free order, and random order within 2x of newest first.
            if let Some(v) = newest_first {
                row = row.with(Baseline::measured("pfnstore, newest first (this run)", v));
            }
            let met = row.pfnstore.map(|v| v <= limit).and_then(|under| {
                let ratio = row.baselines.first().and_then(|b| b.ratio)?;
                Some(under && ratio >= 0.5)
            });
            row = row.target(
                format!(
                    "≤ {} and ≤ 2x newest first ({ALLOCATOR_TARGET}, 1.5x it)",
                    human(Unit::Ns, limit)
                ),
                met,
            );
        } else {
            row = row.target_at_most(limit, &format!("{ALLOCATOR_TARGET}, 1.5x it"));
        }
        rows.push(missing_noted(row).from_sources([id.to_string()]));
    }
    for (id, words) in [
        (
            "fragmented_16g/free-random-half",
            "16 GiB filled with 4K frames, a random half freed, per free",
        ),
        (
            "fragmented_16g/2M-alloc-failing",
            "that fragmented 16 GiB, a 2M alloc that finds no free 2M block",
        ),
        (
            "fragmented_16g/2M-alloc-among-64-free-blocks",
            "then 64 whole 2M blocks freed, per 2M alloc that finds one (64 of 64 asserted)",
        ),
    ] {
        let row = Row::new(format!("allocator: {words}"), Unit::Ns, per_op(inputs, id));
        rows.push(missing_noted(row).from_sources([id.to_string()]));
    }
    let one_thread = |group: &str| per_thread(inputs, &format!("{group}/1"), 1);
    for n in [1u64, 2, 8] {
        let id = format!("pair_threads/{n}");
        let mut row = Row::new(
            format!(
                "allocator: 4K alloc+free pairs on {n} thread(s) on {cores} cores (shards = threads), time per pair per thread{}",
                oversubscribed(n, cores)
            ),
            Unit::Ns,
            per_thread(inputs, &id, n),
        )
        .with(Baseline::published(LLFREE, Some(LLFREE_4K_PAIR_NS), llfree_flat));
        if n > 1
            && let Some(v) = one_thread("pair_threads")
        {
            row = row.with(Baseline::measured(ONE_THREAD, v));
        }
        row = match n {
            // Throughput n / t_n against 1 / t_1: at least 1.8 means t_1 / t_n >= 1.8 / n.
            2 => row.target_ratio(
                ONE_THREAD,
                1.8 / n as f64,
                "throughput ≥ 1.8x 1 thread's (allocator target)",
            ),
            8 => {
                let per_op = |threads: u64| per_op(inputs, &format!("pair_threads/{threads}"));
                let met = per_op(8).zip(per_op(2)).map(|(eight, two)| eight <= two);
                let text = match (per_op(8), per_op(2)) {
                    (Some(eight), Some(two)) => format!(
                        "per operation no slower than 2 threads (allocator target): {} vs {} wall time per pair",
                        human(Unit::Ns, eight),
                        human(Unit::Ns, two)
                    ),
                    _ => "per operation no slower than 2 threads (allocator target)".to_string(),
                };
                row.target(text, met)
            }
            _ => row,
        };
        rows.push(missing_noted(row).from_sources([id]));
    }
    for n in [1u64, 2, 8] {
        let id = format!("bulk_4k_threads/{n}");
        let mut row = Row::new(
            format!(
                "allocator: bulk, each of {n} thread(s) on {cores} cores allocates 65,536 4K frames then frees them (shards = threads), time per alloc+free per thread{}",
                oversubscribed(n, cores)
            ),
            Unit::Ns,
            per_thread(inputs, &id, n),
        )
        .with(Baseline::published(LLFREE, Some(LLFREE_4K_PAIR_NS), llfree_flat));
        if n > 1 {
            row = row.with(Baseline::published(
                "Linux buddy allocator (published, another machine)",
                None,
                "~10x slower per operation under concurrent bulk allocation",
            ));
            if let Some(v) = one_thread("bulk_4k_threads") {
                row = row.with(Baseline::measured(ONE_THREAD, v));
            }
        }
        rows.push(missing_noted(row).from_sources([id]));
    }
}

/// The thread rows' own one-thread figure.
const ONE_THREAD: &str = "pfnstore, 1 thread (this run)";

fn oversubscribed(threads: u64, cores: usize) -> String {
    if threads as usize > cores {
        format!(
            " ({threads} threads share {cores} cores: up to {}x per thread)",
            threads as usize / cores.max(1)
        )
    } else {
        String::new()
    }
}

fn missing_noted(row: Row) -> Row {
    if row.pfnstore.is_none() {
        row.noted("not measured: no criterion result from this run")
    } else {
        row
    }
}

fn facade(inputs: &Inputs, rows: &mut Vec<Row>) {
    for (name, words) in [
        (
            "4K in uniform 1G, split + merge, 3 subscribers",
            "4 KiB in a uniform 1 GiB and back (split + merge), 3 no-op subscribers, synthetic",
        ),
        (
            "whole 1 GiB and back, 3 subscribers",
            "1 GiB and back, 3 no-op subscribers, synthetic",
        ),
        (
            "64 GiB and back, 3 subscribers",
            "64 GiB and back, 3 no-op subscribers, synthetic",
        ),
        (
            "whole 1 TiB and back, 3 subscribers",
            "1 TiB and back, 3 no-op subscribers, synthetic",
        ),
    ] {
        rows.push(timed(
            inputs,
            format!("facade: GuestFile::convert of {words}"),
            &format!("conversion/{name}"),
            &[],
        ));
    }
    let metadata_alone = "metadata/convert_4k_and_back_in_private_1g/pfnstore";
    for (name, skip) in [
        ("synthetic, 1 GiB file", None),
        (
            "ordinary 4K memory + host mapping, 1 GiB file",
            Some("end-to-end on ordinary memory"),
        ),
        (
            "ordinary 4K memory + host mapping, 2 MiB file",
            Some("end-to-end on ordinary memory"),
        ),
        (
            "real 1G hugetlb + host mapping, 1 GiB file",
            Some("end-to-end on real 1 GiB hugetlb"),
        ),
    ] {
        let mut row = timed(
            inputs,
            format!("facade: end-to-end 4 KiB convert-and-back, {name}, no subscribers"),
            &format!("conversion/end-to-end 4K convert-and-back/{name}"),
            &[(
                "metadata alone (set_shareability)",
                metadata_alone.to_string(),
            )],
        );
        if row.pfnstore.is_none()
            && let Some(why) = skip.and_then(|s| inputs.skip_reason(s))
        {
            row.note = Some(format!("skipped: {why}"));
        }
        rows.push(row);
    }
    for name in [
        "ordinary 4K memory, 2 MiB unit",
        "real 1G hugetlb, 1 GiB unit",
    ] {
        let id = format!("conversion/host mapping: protect one unit read-write and back/{name}");
        if inputs.get(&id).is_some() {
            rows.push(timed(
                inputs,
                format!("facade: host mapping alone, protect one unit read-write and back, {name}"),
                &id,
                &[],
            ));
        }
    }
    for (label, words) in [
        ("", "synthetic, 3 no-op subscribers"),
        ("synthetic, no subscribers, ", "synthetic, no subscribers"),
        (
            "ordinary 4K memory + host mapping, no subscribers, ",
            "ordinary 4 KiB memory + host mapping, no subscribers",
        ),
    ] {
        let id =
            |threads: u32| format!("conversion/disjoint files, {label}{threads} thread(s), per op");
        rows.push(timed(
            inputs,
            format!("facade: 4 KiB convert-and-back in disjoint 1 GiB files, {words}, 1 thread, per pair"),
            &id(1),
            &[],
        ));
        let mut two = timed(
            inputs,
            format!(
                "facade: 4 KiB convert-and-back in disjoint 1 GiB files, {words}, 2 threads, per pair (ratio: the scaling)"
            ),
            &id(2),
            &[("same, 1 thread (this run)", id(1))],
        );
        if two.pfnstore.is_none()
            && let Some(why) = inputs.skip_reason("disjoint files on ordinary memory")
            && !label.is_empty()
            && label.starts_with("ordinary")
        {
            two.note = Some(format!("skipped: {why}"));
        }
        rows.push(two);
    }
}

fn prefault(inputs: &Inputs, rows: &mut Vec<Row>) {
    let found = match &inputs.prefault {
        Ok(found) if !found.is_empty() => found,
        Ok(_) => {
            rows.push(
                Row::new("prefault", Unit::Ns, None)
                    .noted("skipped: `pfnstore prefault` printed no page size"),
            );
            return;
        }
        Err(why) => {
            rows.push(Row::new("prefault", Unit::Ns, None).noted(format!("skipped: {why}")));
            return;
        }
    };
    let ms = |v: Option<f64>| v.map(|ms| ms * 1e6);
    for p in found {
        let source = format!("pfnstore prefault ({})", p.kind);
        if let Some(why) = &p.skipped
            && p.cold_ms.is_none()
        {
            rows.push(
                Row::new(format!("prefault: {}", p.kind), Unit::Ns, None)
                    .noted(format!("skipped: {why}"))
                    .from_sources([source]),
            );
            continue;
        }
        rows.push(
            Row::new(
                format!(
                    "prefault: {}, cold (first obtain, MAP_POPULATE; not compared)",
                    p.kind
                ),
                Unit::Ns,
                ms(p.cold_ms),
            )
            .from_sources([source.clone()]),
        );
        let method = p
            .threads_method
            .clone()
            .unwrap_or_else(|| "MADV_POPULATE_WRITE threads".to_string());
        let order = p
            .order
            .as_deref()
            .map_or(String::new(), |o| format!("; order: {o}"));
        let mut row = Row::new(
            format!(
                "prefault: {}, warm median, pfnstore's {method} (ratio: the speed-up){order}",
                p.kind
            ),
            Unit::Ns,
            ms(p.threads_ms),
        );
        if let Some(v) = ms(p.map_populate_ms) {
            row = row.with(Baseline::measured("MAP_POPULATE", v));
        }
        if let Some(why) = &p.skipped {
            row = row.noted(format!("skipped: {why}"));
        }
        rows.push(row.from_sources([source]));
    }
}

fn handover(inputs: &Inputs, rows: &mut Vec<Row>) {
    // The cases in the order the bench ran them; from the criterion ids where the log is
    // missing.
    let mut cases: Vec<String> = inputs
        .snapshot_sizes
        .iter()
        .map(|(case, _)| case.clone())
        .collect();
    if cases.is_empty() {
        cases = inputs
            .this_run()
            .filter_map(|m| m.full_id.strip_prefix("handover/snapshot, "))
            .map(str::to_string)
            .collect();
    }
    for case in cases {
        let bytes = inputs
            .snapshot_sizes
            .iter()
            .find(|(c, _)| *c == case)
            .map(|(_, b)| *b as f64);
        let mut size = Row::new(
            format!("handover: snapshot bytes, {case}"),
            Unit::Bytes,
            bytes,
        )
        .from_sources(["handover bench stderr".to_string()]);
        if bytes.is_none() {
            size = size.noted("not measured: the handover bench's log has no size for it");
        }
        let uniform_1t = case == "1 TiB uniform";
        if uniform_1t {
            size = size.target_at_most(TARGET_SNAPSHOT_BYTES, "live-update target");
        }
        rows.push(size);
        let snapshot_id = format!("handover/snapshot, {case}");
        let rebuild_id = format!("handover/rebuild, {case}");
        rows.push(timed(
            inputs,
            format!("handover: snapshot, {case}"),
            &snapshot_id,
            &[],
        ));
        let mut rebuild = timed(
            inputs,
            format!("handover: rebuild, {case}"),
            &rebuild_id,
            &[],
        );
        if uniform_1t {
            // The hand-over is the snapshot, its transfer (a memcpy of the bytes above) and
            // the rebuild.
            let both = inputs.median(&snapshot_id).zip(inputs.median(&rebuild_id));
            let text = format!(
                "snapshot + rebuild < {} (live-update target){}",
                human(Unit::Ns, TARGET_HANDOVER_NS),
                both.map_or(String::new(), |(s, r)| format!(
                    ": {}",
                    human(Unit::Ns, s + r)
                ))
            );
            rebuild = rebuild.target(text, both.map(|(s, r)| s + r < TARGET_HANDOVER_NS));
        }
        rows.push(rebuild);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::table::ratio;
    use std::time::Duration;

    fn measured(
        id: &str,
        median_ns: f64,
        elements: Option<u64>,
        written: SystemTime,
    ) -> (String, Measured) {
        (
            id.to_string(),
            Measured {
                full_id: id.to_string(),
                median_ns,
                elements,
                written,
            },
        )
    }

    fn inputs(results: Vec<(String, Measured)>, since: Option<SystemTime>) -> Inputs {
        Inputs {
            results: results.into_iter().collect(),
            since,
            cores: 2,
            bytes: Err("not computed in this test".into()),
            snapshot_sizes: vec![("1 TiB uniform".into(), 8434)],
            skips: vec![(
                "end-to-end on real 1 GiB hugetlb".into(),
                "no 1 GiB pages".into(),
            )],
            prefault: Err("not run".into()),
        }
    }

    fn find<'a>(rows: &'a [Row], prefix: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.benchmark.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix}"))
    }

    #[test]
    fn baselines_and_ratios_come_from_the_right_ids() {
        let now = SystemTime::now();
        let rows = rows(&inputs(
            vec![
                measured(
                    "metadata/convert_4k_and_back_in_private_1g/pfnstore",
                    50.0,
                    None,
                    now,
                ),
                measured(
                    "metadata/convert_4k_and_back_in_private_1g/bitmap",
                    40.0,
                    None,
                    now,
                ),
                measured(
                    "metadata/convert_4k_and_back_in_private_1g/struct_page",
                    25.0,
                    None,
                    now,
                ),
                measured("pair_threads/1", 10_000_000.0, Some(200_000), now),
                measured("pair_threads/2", 12_000_000.0, Some(400_000), now),
                measured("threads/2/ours-sharded", 2_000_000.0, Some(40_000), now),
                measured("threads/2/vm-allocator", 20_000_000.0, Some(40_000), now),
                measured(
                    "conversion/end-to-end 4K convert-and-back/synthetic, 1 GiB file",
                    500.0,
                    None,
                    now,
                ),
                measured("handover/snapshot, 1 TiB uniform", 100_000.0, None, now),
            ],
            None,
        ));
        let r = find(
            &rows,
            "metadata: 4 KiB convert-and-back in a uniform private 1 GiB",
        );
        assert_eq!(r.pfnstore, Some(50.0));
        assert_eq!(r.baselines.len(), 2);
        assert_eq!(ratio(r.pfnstore, r.baselines[0].value), Some(0.8));
        assert_eq!(r.baselines[1].name, STRUCT_PAGE);

        // Per thread: the round over the pairs each thread did.
        let r = find(&rows, "allocator: 4K alloc+free pairs on 2 thread(s)");
        assert_eq!(r.pfnstore, Some(60.0));
        assert_eq!(r.baselines[0].name, LLFREE);
        assert_eq!(r.baselines[0].value, Some(LLFREE_4K_PAIR_NS));
        assert_eq!(r.baselines[1].value, Some(50.0));

        // Wall time per operation: the round over every thread's operations.
        let r = find(
            &rows,
            "allocator: random sizes (4K/2M/1G at 70/25/5 %, 16 live per thread), 2 thread(s)",
        );
        assert_eq!(r.pfnstore, Some(50.0));
        assert_eq!(ratio(r.pfnstore, r.baselines[0].value), Some(10.0));

        let r = find(
            &rows,
            "facade: end-to-end 4 KiB convert-and-back, synthetic",
        );
        assert_eq!(r.pfnstore, Some(500.0));
        assert_eq!(r.baselines[0].value, Some(50.0));
        let r = find(
            &rows,
            "facade: end-to-end 4 KiB convert-and-back, real 1G hugetlb",
        );
        assert_eq!(r.pfnstore, None);
        assert_eq!(r.note.as_deref(), Some("skipped: no 1 GiB pages"));

        let r = find(&rows, "handover: snapshot bytes, 1 TiB uniform");
        assert_eq!(r.pfnstore, Some(8434.0));
        let r = find(&rows, "handover: snapshot, 1 TiB uniform");
        assert_eq!(r.pfnstore, Some(100_000.0));

        let r = find(&rows, "prefault");
        assert_eq!(r.note.as_deref(), Some("skipped: not run"));
    }

    #[test]
    fn results_no_row_shows_are_listed() {
        let now = SystemTime::now();
        let inputs = inputs(
            vec![
                measured("pair/4K/1-shard", 37.0, None, now),
                measured("metadata/renamed_group/pfnstore", 5.0, None, now),
            ],
            None,
        );
        let rows = rows(&inputs);
        assert_eq!(
            unused(&inputs, &rows),
            vec!["metadata/renamed_group/pfnstore"]
        );
    }

    fn met(row: &Row) -> Option<bool> {
        row.target.as_ref().and_then(|t| t.met)
    }

    #[test]
    fn targets_are_judged_on_this_runs_figures() {
        let now = SystemTime::now();
        let rows = rows(&inputs(
            vec![
                measured("pair/4K/1-shard", 37.0, None, now),
                measured("pair/2M/1-shard", 34.0, None, now),
                // 1 thread: 50 ns per pair; 2 threads: 55 ns per pair per thread (1.82x the
                // throughput); 8 threads: 30 ns wall per pair against 27.5 ns for 2.
                measured("pair_threads/1", 10_000_000.0, Some(200_000), now),
                measured("pair_threads/2", 22_000_000.0, Some(800_000), now),
                measured("pair_threads/8", 48_000_000.0, Some(1_600_000), now),
                measured("bulk_4k/free-newest-first", 20.0, None, now),
                measured("bulk_4k/free-random", 30.0, None, now),
                measured("handover/snapshot, 1 TiB uniform", 4e6, None, now),
                measured("handover/rebuild, 1 TiB uniform", 7e6, None, now),
                measured(
                    "metadata/convert_4k_and_back_in_shared_1g/pfnstore",
                    50.0,
                    None,
                    now,
                ),
                measured(
                    "metadata/convert_4k_and_back_in_shared_1g/bitmap",
                    40.0,
                    None,
                    now,
                ),
            ],
            None,
        ));
        assert_eq!(
            met(find(
                &rows,
                "allocator: 4K alloc+free pair, 1 thread, 1 shard"
            )),
            Some(true)
        );
        assert_eq!(
            met(find(&rows, "allocator: 2M alloc+free pair")),
            Some(false)
        );
        assert_eq!(met(find(&rows, "allocator: 1G alloc+free pair")), None);
        assert_eq!(
            met(find(&rows, "allocator: 4K alloc+free pairs on 2 thread(s)")),
            Some(true)
        );
        assert_eq!(
            met(find(&rows, "allocator: 4K alloc+free pairs on 8 thread(s)")),
            Some(false)
        );
        // 30 ns is within 1.5x LLFree's 20.1 ns, but 1.5x newest first: within 2x, met.
        assert_eq!(
            met(find(
                &rows,
                "allocator: bulk, up to 1M 4K frames from empty on 1 thread (1 shard), per free, in random order"
            )),
            Some(true)
        );
        // 4 + 7 ms: not under 10 ms.
        let r = find(&rows, "handover: rebuild, 1 TiB uniform");
        assert_eq!(met(r), Some(false));
        assert!(r.target.as_ref().unwrap().text.ends_with(": 11.00 ms"));
        // The snapshot's size (8434 bytes in the log) is under 1 MiB.
        assert_eq!(
            met(find(&rows, "handover: snapshot bytes, 1 TiB uniform")),
            Some(true)
        );
        assert_eq!(
            met(find(
                &rows,
                "metadata: 4 KiB convert-and-back in a uniform shared 1 GiB (64"
            )),
            Some(false)
        );
    }

    #[test]
    fn results_of_an_earlier_run_are_left_out() {
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(3600);
        let rows = rows(&inputs(
            vec![
                measured("metadata/convert_1t/pfnstore", 1000.0, None, earlier),
                measured("metadata/convert_1t/bitmap", 9000.0, None, now),
            ],
            Some(now),
        ));
        let r = find(&rows, "metadata: 1 TiB converted one way");
        assert_eq!(r.pfnstore, None);
        assert_eq!(
            r.note.as_deref(),
            Some("not measured: no criterion result from this run")
        );
        assert_eq!(r.baselines[0].value, Some(9000.0));
    }
}
