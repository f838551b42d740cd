#!/usr/bin/env bash
# The benchmark summary: a short run of every criterion group (metadata, allocator, conversion,
# handover), the scale curve, and `pfnstore prefault`; then one markdown table of every
# benchmark (pfnstore, each baseline, the ratio), the scale curve, and
# target/pfnstore-bench/summary.json with the raw medians, the machine, its load average before
# and after, the date and the git revision. Under five minutes on two cores, once built.
#
#   bash scripts/bench.sh
#
# Quick settings (each can be overridden through the environment):
#   PFNSTORE_BENCH_WARM_UP / PFNSTORE_BENCH_MEASUREMENT / PFNSTORE_BENCH_SAMPLES: criterion's
#     warm-up time, measurement time (s) and sample size per benchmark (0.3, 0.7, 20);
#   PFNSTORE_BENCH_QUICK=1 (always set here): the handover bench's fragmented stores convert
#     0.1 % of 1 TiB's pages instead of 1 %, and say so in their names;
#   PFNSTORE_SCALE_ARGS: the scale curve's arguments (default: 1, 4 and 16 TiB with 1,000 files,
#     the fill capped at 1 % of 1 TiB's pages, so 1 TiB reaches 1 %, 4 TiB 0.25 % and 16 TiB
#     0.0625 %: the same boundaries on 16 times the memory; 100,000 timed conversions per storm).
#     `--sizes 1,4,16` without a cap converts 1 % everywhere (about 10 minutes here).
# Real hugetlb pages for the prefault rows are taken only as root (the pool is grown by what is
# missing and given back, under the same lock the tests take); otherwise those rows say skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

target=${CARGO_TARGET_DIR:-target}
out=$target/pfnstore-bench
logs=$out/logs
warm=${PFNSTORE_BENCH_WARM_UP:-0.3}
measure=${PFNSTORE_BENCH_MEASUREMENT:-0.7}
samples=${PFNSTORE_BENCH_SAMPLES:-20}
# 1 % of the 4 KiB pages of 1 TiB of files (1,000 files of 1,048 MiB).
scale_args=${PFNSTORE_SCALE_ARGS:---sizes 1,4,16 --files 1000 --fraction 0.01 --max-fill 2682880 --storm 100000}
hugetlb_lock=/tmp/pfnstore-hugetlb.lock

echo "==> building (not timed)"
cargo bench -q -p pfnstore-benches --no-run
cargo build -q --release -p pfnstore-benches --bins
cargo build -q --release --bin pfnstore

rm -rf "$logs"
rm -f "$out/scale-curve.json" "$out/scale-curve.png" "$out/summary.json" "$out/summary.md"
mkdir -p "$logs"
start=$(date +%s)
load_before=$(cat /proc/loadavg 2>/dev/null || echo unknown)
echo "==> load average before: $load_before"
export PFNSTORE_BENCH_QUICK=1

for bench in metadata allocator conversion handover; do
    t0=$SECONDS
    echo "==> criterion: $bench (warm-up ${warm} s, measurement ${measure} s, ${samples} samples)"
    cargo bench -q -p pfnstore-benches --bench "$bench" -- \
        --warm-up-time "$warm" --measurement-time "$measure" --sample-size "$samples" \
        --nresamples 1000 --noplot >"$logs/$bench.log" 2>&1 || {
        echo "bench $bench failed; its output is in $logs/$bench.log" >&2
        tail -20 "$logs/$bench.log" >&2
        exit 1
    }
    echo "    took $((SECONDS - t0)) s"
done

t0=$SECONDS
echo "==> scale curve: $scale_args"
# shellcheck disable=SC2086 # the arguments are words on purpose
"$target/release/scale-curve" $scale_args --out "$out" 2>&1 | tee "$logs/scale-curve.out" ||
    echo "    the scale curve failed (the summary says it was not run)"
echo "    took $((SECONDS - t0)) s"

t0=$SECONDS
prefault=(--size 2G --runs 3)
if [ "$(id -u)" = 0 ]; then
    prefault+=(--grow-pool)
fi
echo "==> pfnstore prefault ${prefault[*]}"
# The tests' hugetlb lock keeps this from growing the pool while a test uses it.
if command -v flock >/dev/null; then
    flock "$hugetlb_lock" "$target/release/pfnstore" prefault "${prefault[@]}" >"$logs/prefault.log" 2>&1 ||
        echo "    pfnstore prefault failed (its rows say why)"
else
    "$target/release/pfnstore" prefault "${prefault[@]}" >"$logs/prefault.log" 2>&1 ||
        echo "    pfnstore prefault failed (its rows say why)"
fi
echo "    took $((SECONDS - t0)) s"

load_after=$(cat /proc/loadavg 2>/dev/null || echo unknown)
elapsed=$(($(date +%s) - start))
echo "==> load average after: $load_after; measured in $elapsed s"
echo
"$target/release/bench-summary" --criterion "$target/criterion" --out "$out" --logs "$logs" \
    --since "$start" --load-before "$load_before" --load-after "$load_after" \
    --command "bash scripts/bench.sh" --elapsed "$elapsed"
