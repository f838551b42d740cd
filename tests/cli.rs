//! The `pfnstore` command as a user runs it: the built binary, its exit status, what it prints
//! on stdout and stderr. Each group below is one class of defect a CLI can have: a closed
//! reader, sizes, other arguments, what the output says, and `prefault`'s report.
//!
//! Nothing here grows a hugetlb pool. The commands that obtain memory (`prefault`,
//! `demo --hugetlb`) run under [`hugetlb_lock`] because, without growing anything, they may
//! still take free pages of the pools that other tests are counting.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use pfnstore::hugetlb::HugePageSize;
use pfnstore::hugetlb::pool::{PoolId, Sysfs};
use pfnstore::hugetlb::testing::hugetlb_lock;

const BIN: &str = env!("CARGO_BIN_EXE_pfnstore");

/// The phrase every refused size shares, whatever the command and whatever is wrong with it.
const SIZE_RULE: &str = "a size is a whole number of GiB from 1 GiB to";

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the pfnstore binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `args`, asserts success without a panic, and returns stdout.
fn succeeds(args: &[&str]) -> String {
    let out = run(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "pfnstore {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout
}

/// Asserts that `args` is refused as bad input (exit status 2) before anything is printed on
/// stdout, with a message that contains each of `fragments`; returns the message.
fn refused(args: &[&str], fragments: &[&str]) -> String {
    let out = run(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(2),
        "pfnstore {args:?} was not refused as bad input:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.is_empty(),
        "pfnstore {args:?} printed before refusing:\n{stdout}"
    );
    for fragment in fragments {
        assert!(
            stderr.contains(fragment),
            "pfnstore {args:?}: message lacks {fragment:?}:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// This machine's memory in whole GiB, as the CLI reads it.
fn machine_gib() -> u64 {
    Sysfs::system()
        .mem_total()
        .expect("/proc/meminfo is readable")
        >> 30
}

// ---------------------------------------------------------------------------------------------
// A closed reader (`pfnstore status | head -1`).

/// Runs `args` with stdout a pipe whose read end is already closed, so that the first write
/// fails with EPIPE, deterministically.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(BIN)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("the pfnstore binary runs")
}

#[test]
fn every_command_exits_quietly_into_a_closed_pipe() {
    // prefault stops at its first line, before it obtains any memory; the lock is for the
    // case where it does not.
    let _lock = hugetlb_lock();
    for args in [
        &[][..],
        &["status"],
        &["hugetlb"],
        &["demo", "--synthetic"],
        &["prefault", "--gib", "1", "--runs", "2"],
    ] {
        let out = run_into_closed_pipe(args);
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "pfnstore {args:?} into a closed pipe: {}\n{stderr}",
            out.status
        );
        assert!(
            stderr.is_empty(),
            "pfnstore {args:?} into a closed pipe said:\n{stderr}"
        );
    }
}

#[test]
fn prefault_piped_into_head_stops_after_the_first_line() {
    // `pfnstore prefault | head -1`: prefault prints its first line at once and the next
    // ones only after measuring, so the read end is gone before those writes.
    let _lock = hugetlb_lock();
    let mut child = Command::new(BIN)
        .args(["prefault", "--gib", "1", "--runs", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the pfnstore binary runs");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut first)
        .expect("one line");
    // The BufReader, and with it the read end, is dropped here.
    let out = child.wait_with_output().expect("pfnstore exits");
    let stderr = text(&out.stderr);
    assert!(!first.trim().is_empty());
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Sizes: one rule, one message naming the limit, checked before anything is printed.

#[test]
fn zero_sizes_are_refused_before_any_output() {
    for args in [
        &["status", "--size-gib", "0"][..],
        &["hugetlb", "--size-gib", "0"],
        &["demo", "--size-gib", "0"],
        &["prefault", "--gib", "0"],
        &["demo", "--size", "0G"],
    ] {
        refused(args, &[SIZE_RULE]);
    }
}

#[test]
fn sizes_beyond_the_store_limit_name_the_limit() {
    // 10^12 GiB overflows 64 bits of bytes; 17 million GiB does not but is more chunks than a
    // store has slots for. Both get the one message, naming 1 PiB.
    for args in [
        &["demo", "--size-gib", "1000000000000"][..],
        &["demo", "--size-gib", "17000000"],
        &["status", "--size-gib", "17000000"],
        &["demo", "--size", "2P"],
        &["demo", "--size", "99999999999999999999999T"],
    ] {
        refused(args, &[SIZE_RULE, "1 PiB"]);
    }
}

#[test]
fn sizes_beyond_this_machine_name_its_memory() {
    let _lock = hugetlb_lock();
    let beyond = (machine_gib() + 1).to_string();
    let limit = format!("{} GiB (this machine's memory)", machine_gib());
    for args in [
        &["hugetlb", "--size-gib", &beyond][..],
        &["prefault", "--gib", &beyond],
        &["demo", "--hugetlb", "--size-gib", &beyond],
        &["demo", "--size-gib", &beyond],
    ] {
        refused(args, &[SIZE_RULE, &limit]);
    }
}

#[test]
fn sizes_must_be_whole_gib() {
    let message = refused(&["demo", "--size", "1536M"], &[SIZE_RULE, "got 1.5 GiB"]);
    assert!(message.contains("--size"), "{message}");
    refused(&["status", "--size", "4K"], &[SIZE_RULE, "got 4 KiB"]);
}

#[test]
fn malformed_sizes_say_how_to_write_one() {
    for bad in ["2X", "G", "-1G", "1.5G", ""] {
        refused(&["demo", &format!("--size={bad}")], &["not a size", "16T"]);
    }
}

#[test]
fn sizes_take_human_units() {
    let out = succeeds(&[
        "demo",
        "--synthetic",
        "--size",
        "16T",
        "--conversions",
        "200",
    ]);
    assert!(out.contains("16 TiB"), "{out}");
    let out = succeeds(&["status", "--size", "4096M"]);
    assert!(out.contains("a store of 4 GiB"), "{out}");
    let out = succeeds(&["hugetlb", "--size", "2 GiB"]);
    assert!(out.contains("a store of 2 GiB"), "{out}");
    // The old flags still work and mean GiB.
    let out = succeeds(&[
        "demo",
        "--synthetic",
        "--size-gib",
        "3",
        "--conversions",
        "200",
    ]);
    assert!(out.contains("3 GiB"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Other arguments, checked before anything is done.

#[test]
fn an_unknown_numa_node_is_refused_before_any_output() {
    let nodes = Sysfs::system()
        .numa_nodes()
        .expect("the NUMA nodes are readable");
    // 7, the node of the report, unless this machine has it.
    let missing = (7..)
        .find(|n| !nodes.contains(n))
        .expect("a free node number")
        .to_string();
    refused(
        &["hugetlb", "--numa-node", &missing],
        &[&format!("NUMA node {missing} does not exist")],
    );
}

#[test]
fn prefault_needs_at_least_one_thread_and_one_run() {
    refused(&["prefault", "--threads", "0"], &["--threads"]);
    refused(&["prefault", "--runs", "0"], &["--runs"]);
}

#[test]
fn demo_grow_pool_is_for_real_memory() {
    refused(&["demo", "--synthetic", "--grow-pool"], &["--grow-pool"]);
}

// ---------------------------------------------------------------------------------------------
// What the output says: human units, no Debug names, the source as it is.

/// Debug names of library types that must not reach the user.
const DEBUG_NAMES: [&str; 10] = [
    "Size4K",
    "Size2M",
    "Size1G",
    "Base4K",
    "Huge2M",
    "Huge1G",
    "Threads(",
    "MapPopulate",
    "Some(",
    "None",
];

/// Asserts that `output` has no Debug names and that every "<n> <unit>" uses the largest unit
/// (n below 1024).
fn assert_human(output: &str) {
    for name in DEBUG_NAMES {
        assert!(!output.contains(name), "{name:?} in:\n{output}");
    }
    let words: Vec<&str> = output.split_whitespace().collect();
    for pair in words.windows(2) {
        let unit = pair[1].trim_end_matches([',', ';', ')', ':', '.']);
        if !["KiB", "MiB", "GiB", "TiB", "B"].contains(&unit) {
            continue;
        }
        let number = pair[0].trim_start_matches('(');
        if let Ok(n) = number.parse::<f64>() {
            assert!(n < 1024.0, "{number} {unit} in:\n{output}");
        }
    }
}

#[test]
fn status_and_demo_speak_human_units() {
    assert_human(&succeeds(&["status"]));
    let demo = succeeds(&[
        "demo",
        "--synthetic",
        "--size",
        "16T",
        "--conversions",
        "2000",
    ]);
    assert_human(&demo);
    assert!(demo.contains("maps a 1 GiB block"), "{demo}");
    assert!(
        demo.contains("the largest block at offset 0: 2 MiB"),
        "{demo}"
    );
    let hugetlb = succeeds(&["hugetlb"]);
    assert_human(&hugetlb);
}

#[test]
fn a_synthetic_source_says_it_is_synthetic() {
    let out = succeeds(&["demo", "--synthetic", "--conversions", "200"]);
    let source: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("memory source"))
        .take_while(|l| !l.is_empty())
        .collect();
    let source = source.join("\n");
    assert!(source.contains("synthetic"), "{out}");
    assert!(!source.contains("hugetlb"), "{out}");
}

#[test]
fn demo_hugetlb_says_what_it_obtained() {
    let _lock = hugetlb_lock();
    let sysfs = Sysfs::system();
    let available = |page_size| {
        sysfs
            .read_pool(PoolId {
                page_size,
                node: None,
            })
            .map_or(0, |p| p.available())
    };
    // 1 GiB asked, no pool growth: what the ladder will stop at.
    let expected = if available(HugePageSize::Huge1G) >= 1 {
        "1 GiB hugetlb pages"
    } else if available(HugePageSize::Huge2M) >= 512 {
        "2 MiB hugetlb pages"
    } else {
        "ordinary 4 KiB pages"
    };
    let out = succeeds(&["demo", "--size-gib", "1", "--conversions", "200"]);
    assert_human(&out);
    let obtained = out
        .lines()
        .find(|l| l.trim_start().starts_with("obtained:"))
        .unwrap_or_else(|| panic!("no 'obtained' line:\n{out}"));
    assert!(obtained.contains(expected), "{expected:?}:\n{out}");
    let fault = out
        .lines()
        .find(|l| l.contains("guest fault"))
        .unwrap_or_else(|| panic!("no fault line:\n{out}"));
    assert!(fault.contains(expected), "{expected:?}:\n{out}");
}

// ---------------------------------------------------------------------------------------------
// prefault: cold and warm apart, alternating order, no speed-up from one run.

/// The lines of a `prefault` report about ordinary pages (the one size every machine has).
fn ordinary_lines(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter(|l| l.starts_with("ordinary 4 KiB"))
        .collect()
}

#[test]
fn prefault_reports_cold_apart_and_alternates_the_order() {
    let _lock = hugetlb_lock();
    let out = succeeds(&["prefault", "--gib", "1", "--runs", "2"]);
    assert_human(&out);
    let lines = ordinary_lines(&out);
    let report = lines.join("\n");
    assert!(
        lines.iter().any(|l| l.contains("cold")),
        "no cold line:\n{out}"
    );
    assert!(
        report.contains("order of the 2 warm rounds: threads first, MAP_POPULATE first"),
        "{out}"
    );
    let speed_up = lines
        .iter()
        .find(|l| l.contains("speed-up"))
        .unwrap_or_else(|| panic!("no speed-up from 2 runs:\n{out}"));
    assert!(speed_up.contains("medians of 2 warm runs"), "{speed_up}");
}

#[test]
fn prefault_prints_no_speed_up_from_one_run() {
    let _lock = hugetlb_lock();
    let out = succeeds(&["prefault", "--gib", "1", "--runs", "1"]);
    let lines = ordinary_lines(&out);
    // A ratio is printed as "<number>x" ("2.00x as fast", formerly "= 33.55x").
    let is_ratio = |word: &str| {
        word.strip_suffix('x')
            .is_some_and(|n| n.parse::<f64>().is_ok())
    };
    assert!(
        !out.split_whitespace().any(is_ratio),
        "a ratio from one run:\n{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("no speed-up") && l.contains("--runs 2")),
        "{out}"
    );
}

#[test]
fn hugetlb_restore_settles_what_dead_processes_grew() {
    // Nothing is owed on a clean machine; what is printed either way names what it did.
    let _lock = hugetlb_lock();
    let out = succeeds(&["hugetlb", "--restore"]);
    assert!(
        out.contains("nothing to give back") || out.contains("gave back"),
        "{out}"
    );
    assert!(out.contains("hugetlb pools"), "{out}");
}
