#!/usr/bin/env bash
# Runs everything pfnstore checks: formatting, clippy, every unit/property/integration/doc test,
# and the loom models (in their own target dir, so the normal build is not invalidated).
# Prints a closing line "summary: N passed, N failed, N skipped"; a test that cannot run on this
# machine (no root, no hugetlb, no /dev/kvm) is counted as skipped, with its reason listed.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${LOOM_MAX_PREEMPTIONS:=2}"
export LOOM_MAX_PREEMPTIONS
export CARGO_TERM_COLOR=never

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PFNSTORE_SKIP_LOG="$work/skipped"
: >"$PFNSTORE_SKIP_LOG"
log="$work/test-output"

step() {
    local name=$1
    shift
    echo "==> $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    echo "==> $name took $((SECONDS - t0)) s"
}

step fmt cargo fmt --all --check
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
step docs env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
step tests cargo test --workspace --locked
# The vm-memory adapter and the example VMM exist only with the `vm-memory` feature: clippy
# and the docs of that code, then its tests (tests/vm_memory.rs; tests/kvm_example.rs, which
# runs examples/kvm_vmm and reports itself skipped without /dev/kvm) and the module's doc
# example. Only those targets, so that the summary does not count the package's other tests
# twice.
step clippy-vm-memory cargo clippy -p pfnstore --no-deps --features vm-memory --all-targets --locked -- -D warnings
step docs-vm-memory env RUSTDOCFLAGS="-D warnings" cargo doc -p pfnstore --features vm-memory --no-deps --locked
step tests-vm-memory cargo test -p pfnstore --features vm-memory --locked --test vm_memory --test kvm_example
step doctests-vm-memory cargo test -p pfnstore --features vm-memory --locked --doc -- vm_memory
# The loom models: the loom-tests crate, plus in-crate models (modules named loom_models) that
# need private items. LOOM_MAX_PREEMPTIONS bounds the search so the run stays short.
step loom env RUSTFLAGS="--cfg pfnstore_loom" cargo test --locked --release --target-dir target/loom \
    -p pfnstore-loom-tests
step loom-in-crate env RUSTFLAGS="--cfg pfnstore_loom" cargo test --locked --release --target-dir target/loom \
    -p pfnstore-allocator -p pfnstore-metadata --lib -- loom_models
# The same models with the test-only mutations switched on: each model a mutation breaks is
# `should_panic` under it. In each of the two builds, every mutation has a model that no other
# mutation of that build breaks, so a build passes only if loom finds every bug planted in it.
# (`no_range_lock` breaks most models that take range locks, and `unregister_no_wait` the
# models of waiting unregisters, so the mutations those models catch are in the other build.)
# ARCHITECTURE.md, "Proving the models can fail", has the list.
mutations() {
    printf -- '--cfg pfnstore_loom'
    printf -- ' --cfg pfnstore_loom_mutation="%s"' "$@"
}
step loom-mutations env RUSTFLAGS="$(mutations allocator_split_alloc no_range_lock \
    unregister_waits_in_callback unregister_waits_for_all release_before_unmap)" \
    cargo test --locked --release --target-dir target/loom-mutations -p pfnstore-loom-tests
step loom-mutations-2 env RUSTFLAGS="$(mutations unregister_no_wait snapshot_per_phase \
    activate_unlocked rollback_unlocked callbacks_wait shared_ignores_hull \
    write_unchecked_after_populate pin_unlocked refresh_unlocked destroy_flag_late)" \
    cargo test --locked --release --target-dir target/loom-mutations-2 -p pfnstore-loom-tests
# The shard lock's planted bug breaks the allocator models in its own way (loom's cell check
# fires before any page is handed out twice), so it gets a build of its own.
step loom-mutations-lock env RUSTFLAGS="$(mutations allocator_racy_lock)" \
    cargo test --locked --release --target-dir target/loom-mutations-lock -p pfnstore-loom-tests --test allocator

passed=0 failed=0
while read -r p f; do
    passed=$((passed + p))
    failed=$((failed + f))
done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$log")
skipped=$(wc -l <"$PFNSTORE_SKIP_LOG")
if [ "$skipped" -gt 0 ]; then
    echo "Skipped tests (they returned early, the harness counted them as passed):"
    sed 's/^/  /' "$PFNSTORE_SKIP_LOG"
fi
echo "summary: $((passed - skipped)) passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
