#!/usr/bin/env bash
# Runs the stress and property tests under ThreadSanitizer and AddressSanitizer (with
# LeakSanitizer), each in its own target dir (target/sanitize-<name>), and ends with one line per
# sanitizer: how it ran, tests run, reports found.
#
# The standard way instruments std too: nightly (or RUSTC_BOOTSTRAP=1) with -Zbuild-std, which
# needs the toolchain's rust-src component. Where no toolchain has it, the script still runs the
# sanitizers over everything built from source (pfnstore, parking_lot, crossbeam, proptest, ...)
# against the prebuilt, uninstrumented std, with -Cunsafe-allow-abi-mismatch=sanitizer, and says
# so. What that mode misses or gets wrong:
#   * ThreadSanitizer does not see std's own synchronisation (std is not instrumented) and does
#     not model the fence in std's Arc/Weak drop, nor the contended path of std's Mutex: races
#     whose stack passes through an Arc/Weak drop, std's channels or a test's std-Mutex-guarded
#     value are suppressed (the list is below, in write_suppressions), so a
#     real race inside an Arc'd value's destructor can hide there (the script checks that a
#     planted race elsewhere is still reported: see "A planted bug per sanitizer" below);
#   * AddressSanitizer does not check accesses made inside std (memcpy and friends are still
#     intercepted).
#
# Environment:
#   SANITIZERS           which to run (default "thread address")
#   SANITIZE_TOOLCHAIN   a rustup toolchain to use (default: one with rust-src if any, else the
#                        default toolchain with RUSTC_BOOTSTRAP=1)
#   SANITIZE_TESTS       cargo arguments selecting other tests ("-p pfnstore --test stress")
#   SANITIZE_FILTER      a test-name filter for the test binaries
#   PFNSTORE_STRESS_DIVISOR  divides the host stress tests' operations (default 4 here: the
#                        sanitizers are 5-15x slower)
# Exit status: 0 if every sanitizer that could run ran its tests with no failure and no report.
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
: "${SANITIZERS:=thread address}"
: "${PFNSTORE_STRESS_DIVISOR:=4}"
export PFNSTORE_STRESS_DIVISOR

# The tests: cargo arguments, one selection per line (SANITIZE_TESTS replaces them with its
# own, SANITIZE_FILTER passes a test-name filter to the test binaries).
TESTS=(
    "-p pfnstore --test host_stress"
    "-p pfnstore --test stress"
    "-p pfnstore --test properties"
    "-p pfnstore-metadata --test transaction"
    "-p pfnstore-metadata --test threads"
    "-p pfnstore-allocator --test stress"
)
[ -n "${SANITIZE_TESTS:-}" ] && TESTS=("$SANITIZE_TESTS")
filter=()
[ -n "${SANITIZE_FILTER:-}" ] && filter=("$SANITIZE_FILTER")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()

note() { echo "sanitize: $*"; }

write_suppressions() {
    # Only for the mode without -Zbuild-std: std was compiled without -Zsanitizer=thread, so
    # its Arc/Weak drop synchronises through a fence ThreadSanitizer does not model (this also
    # covers std's thread handles), and its channels (libtest's) are invisible to it. A pattern
    # matches any frame of either stack: never name a frame every thread has (thread start).
    cat >"$work/tsan.supp" <<'SUPP'
race:<alloc::sync::Arc<*> as core::ops::drop::Drop>::drop
race:<alloc::sync::Weak<*> as core::ops::drop::Drop>::drop
race:std::sync::mpmc::
SUPP
    # std's Mutex takes its contended path inside std, unseen, so accesses under one std Mutex
    # look unsynchronised. The library locks through parking_lot (instrumented); this names the
    # one std-Mutex-guarded value of the tests that shows it: allocator/tests/stress.rs's
    # mailbox (its type appears in no other code).
    echo 'race:Vec<(pfnstore_core::range::PageRange, u32)>' >>"$work/tsan.supp"
}
write_suppressions

# --- which toolchain, and whether std can be instrumented ----------------------------------
have_rustup=false
command -v rustup >/dev/null 2>&1 && have_rustup=true

# rustc of toolchain $1 ("" for the default one).
rustc_of() {
    if [ -n "$1" ]; then rustc "+$1" "${@:2}"; else rustc "${@:2}"; fi
}

has_rust_src() {
    local sysroot
    sysroot=$(rustc_of "$1" --print sysroot 2>/dev/null) || return 1
    [ -f "$sysroot/lib/rustlib/src/rust/library/Cargo.lock" ]
}

toolchain=""
candidates=()
if [ -n "${SANITIZE_TOOLCHAIN:-}" ]; then
    candidates=("$SANITIZE_TOOLCHAIN")
elif $have_rustup; then
    mapfile -t candidates < <(rustup toolchain list 2>/dev/null | awk '{print $1}')
fi
build_std=false
for tc in "${candidates[@]}"; do
    if has_rust_src "$tc"; then
        toolchain=$tc
        build_std=true
        break
    fi
done
if ! $build_std; then
    toolchain=${SANITIZE_TOOLCHAIN:-}
fi
version=$(rustc_of "$toolchain" --version 2>/dev/null) || {
    echo "sanitize: no usable rustc (toolchain '${toolchain:-default}')" >&2
    exit 2
}
host=$(rustc_of "$toolchain" -vV | sed -n 's/^host: //p')
cargo_cmd=(cargo)
[ -n "$toolchain" ] && cargo_cmd=(cargo "+$toolchain")
# -Z flags: nightly takes them; stable needs RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1

if $build_std; then
    how="$version, -Zbuild-std (std instrumented)"
else
    why="no installed toolchain has the rust-src component that -Zbuild-std needs"
    [ -n "${SANITIZE_TOOLCHAIN:-}" ] && why="$SANITIZE_TOOLCHAIN has no rust-src component"
    how="$version + RUSTC_BOOTSTRAP=1, std NOT instrumented ($why; installing it needs the network)"
fi
note "toolchain: ${toolchain:-default} ($version); rustup toolchains: $($have_rustup && rustup toolchain list 2>/dev/null | tr '\n' ' ')"
note "mode: $how"

# A planted bug per sanitizer, built and run exactly as the tests are: if it is not reported,
# the setup (flags, options, suppressions) hides reports and the run means nothing.
write_canaries() {
    cat >"$work/canary_thread.rs" <<'RUST'
// Two threads write one word with no synchronisation: a data race.
fn main() {
    let word = Box::into_raw(Box::new(0u64)) as usize;
    // SAFETY: none: the race is the point.
    let other = std::thread::spawn(move || unsafe { std::ptr::write_volatile(word as *mut u64, 1) });
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(word as *mut u64, 2) };
    other.join().unwrap();
}
RUST
    cat >"$work/canary_address.rs" <<'RUST'
// A read one byte past the end of a heap allocation.
fn main() {
    let v = vec![7u8; 10];
    // SAFETY: none: the overflow is the point.
    let past = unsafe { std::ptr::read_volatile(v.as_ptr().add(v.len())) };
    println!("{past}");
}
RUST
}
write_canaries

# Whether sanitizer $1, with rustc flags $2, reports its planted bug (pattern $3).
canary_reported() {
    local san=$1 flags=$2 pattern=$3
    # shellcheck disable=SC2086
    rustc_of "$toolchain" --edition 2021 -O $flags --target "$host" \
        -o "$work/canary_$san" "$work/canary_$san.rs" >"$work/canary_$san.build" 2>&1 ||
        { cat "$work/canary_$san.build"; return 1; }
    "$work/canary_$san" >"$work/canary_$san.log" 2>&1
    grep -qE "$pattern" "$work/canary_$san.log"
}

selection=()
for t in "${TESTS[@]}"; do
    # shellcheck disable=SC2206
    selection+=($t)
done

run_sanitizer() {
    local san=$1
    local log="$work/$san.log" skips="$work/$san.skipped"
    : >"$skips"
    local flags="-Zsanitizer=$san"
    local extra=()
    if $build_std; then
        extra=(-Zbuild-std)
    else
        flags+=" -Cunsafe-allow-abi-mismatch=sanitizer"
    fi
    local suppressions=""
    case $san in
        thread)
            export TSAN_OPTIONS="halt_on_error=0 second_deadlock_stack=1 history_size=4"
            if ! $build_std; then
                suppressions="$work/tsan.supp"
                TSAN_OPTIONS+=" suppressions=$suppressions"
            fi
            ;;
        address)
            # Keep going after a report, so that one run shows every report.
            flags+=" -Zsanitizer-recover=address"
            export ASAN_OPTIONS="halt_on_error=0 detect_leaks=1 detect_stack_use_after_return=1"
            ;;
    esac
    note "== $san: RUSTFLAGS='$flags' ${extra[*]} --target $host --target-dir target/sanitize-$san"
    local pattern
    case $san in
        thread) pattern='^WARNING: ThreadSanitizer:' ;;
        address) pattern='^==[0-9]*==ERROR: (AddressSanitizer|LeakSanitizer):' ;;
    esac
    local canary="reported"
    if $build_std; then
        canary="not run (built with -Zbuild-std)"
    elif canary_reported "$san" "$flags" "$pattern"; then
        note "$san: the planted bug is reported: the setup shows reports"
    else
        sed "s/^/  [$san canary] /" "$work/canary_$san.log" | head -20
        summary+=("$san: not trusted: a planted bug was NOT reported with these flags and options [$how]")
        return 1
    fi
    local t0=$SECONDS
    if ! RUSTFLAGS="$flags" "${cargo_cmd[@]}" test --locked "${extra[@]}" \
        --target "$host" --target-dir "target/sanitize-$san" "${selection[@]}" --no-run \
        >"$work/$san.build" 2>&1; then
        tail -30 "$work/$san.build"
        summary+=("$san: not run: the instrumented build failed (see above) [$how]")
        return 1
    fi
    note "$san: built in $((SECONDS - t0)) s; running"
    t0=$SECONDS
    # One test at a time inside each binary: the sanitizers are slow, and the machine small.
    PFNSTORE_SANITIZER=$san PFNSTORE_SKIP_LOG="$skips" RUSTFLAGS="$flags" \
        "${cargo_cmd[@]}" test --locked "${extra[@]}" --target "$host" \
        --target-dir "target/sanitize-$san" "${selection[@]}" --no-fail-fast \
        -- --test-threads 1 "${filter[@]}" >"$log" 2>&1
    local secs=$((SECONDS - t0))
    local passed=0 failed=0 ignored=0 p f i
    while read -r p f i; do
        passed=$((passed + p))
        failed=$((failed + f))
        ignored=$((ignored + i))
    done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log")
    local skipped
    skipped=$(wc -l <"$skips")
    local reports
    reports=$(grep -cE "$pattern" "$log")
    local in_ours
    # Reports with a frame in the project's library code (not its tests).
    in_ours=$(awk -v pat="$pattern" -v root="$PWD/" '
        $0 ~ pat { if (open && ours) n++; open = 1; ours = 0; next }
        open && /^ *#[0-9]+ / && index($0, root) && !index($0, "/tests/") { ours = 1 }
        open && /^SUMMARY:/ { if (ours) n++; open = 0; ours = 0 }
        END { if (open && ours) n++; print n + 0 }' "$log")
    grep -E "^test .*(FAILED|ok)$|^test result:|SUMMARY: |panicked at" "$log" | sed "s/^/  [$san] /" | head -60
    if [ "$reports" -gt 0 ]; then
        note "$san: first report:"
        grep -m1 -A40 -E "$pattern" "$log" | sed "s/^/  [$san] /"
        cp "$log" "target/sanitize-$san/last-run.log"
        note "$san: the whole log is in target/sanitize-$san/last-run.log"
    fi
    local sup=""
    [ -n "$suppressions" ] && sup=", $(grep -c '^race:' "$suppressions") suppressions for std internals"
    summary+=("$san: $((passed + failed)) tests run ($passed passed, $failed failed, $ignored ignored, $skipped of the passed skipped), $reports reports ($in_ours with a frame in pfnstore code), ${secs} s [$how$sup; planted bug $canary]")
    [ "$failed" -eq 0 ] && [ "$reports" -eq 0 ]
}

status=0
for san in $SANITIZERS; do
    case $san in
        thread | address) run_sanitizer "$san" || status=1 ;;
        *)
            summary+=("$san: not run: unknown sanitizer (this script runs thread and address)")
            status=1
            ;;
    esac
done
echo
echo "sanitize summary:"
for line in "${summary[@]}"; do
    echo "$line"
done
exit $status
