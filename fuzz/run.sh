#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time and fails on any crash.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60, every target)
#
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain; without one,
# stable is used with RUSTC_BOOTSTRAP=1. New inputs libFuzzer finds go to fuzz/scratch/
# (ignored by git); the committed seeds in fuzz/corpus/ are only read. A crash leaves
# its input in fuzz/artifacts/<target>/: replay it with
#   cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
# then make it a named test in protocol/src/v3/fuzzing/tests.rs.
# FUZZ_SANITIZER=address (or another cargo-fuzz sanitizer) trades speed for checks on
# the unsafe code of the dependencies; the default, none, suits the `forbid(unsafe)`
# protocol crate and keeps the executions per second high.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_header request_payload session v4_frames v4_session)

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
flags=(--sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions)

cargo "${toolchain[@]}" fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "scratch/$t" "corpus/$t"
  echo "== $t: ${secs}s"
  if ! cargo "${toolchain[@]}" fuzz run "${flags[@]}" "$t" "scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crash in ${targets[*]}"
