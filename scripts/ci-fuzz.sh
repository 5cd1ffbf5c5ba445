#!/usr/bin/env bash
# Fuzzes the request decoders for a bounded time: libFuzzer (cargo fuzz) drives two targets, each
# checking every answer against a model of the rules (fuzz/src/lib.rs). See docs/fuzzing.md.
#   decode_transaction: `tallyd::http::decode::transaction` (POST /transaction bodies);
#   decode_ledger: `decode::transfer`, `decode::bulk` (POST /transfers/bulk bodies and NDJSON lines),
#   `decode::open_account`, `decode::idempotency_key` and the path and query parameters (the first
#   input byte picks one).
#
# Installs cargo-fuzz if missing. Only stable Rust exists here, so RUSTC_BOOTSTRAP=1 lets it pass
# the nightly-only flags (-Zsanitizer=address and friends) that cargo fuzz needs.
# Each run starts from a temporary copy of the repo's corpus and regression inputs for its target,
# so the clone stays clean; fuzz/artifacts/<target>/ (ignored by git) receives any crashing input.
#
# FUZZ_SECONDS (default 60) bounds the fuzzing of each target; FUZZ_TARGETS (default both) picks
# targets; FUZZ_KEEP_CORPUS=DIR keeps the grown corpora, in DIR/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_TARGETS="${FUZZ_TARGETS:-decode_transaction decode_ledger}"
# The fuzzing run may take this much longer than FUZZ_SECONDS (loading the corpus, final merge)
# before it is killed as hung.
RUN_GRACE_SECONDS=120
# One input taking longer than this is a hang (libFuzzer's default is 1200 s); the slowest so far
# took well under a second, with AddressSanitizer.
INPUT_SECONDS_MAX=10
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" CARGO_TERM_COLOR=never

targets=0
for target in $FUZZ_TARGETS; do targets=$((targets + 1)); done
passed=0

failed() {
  echo "ci-fuzz: $*" >&2
  echo "fuzz: $passed passed, 1 failed"
  exit 1
}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "ci-fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Regression inputs of decode_transaction sit at the top of fuzz/regressions/, those of another
# target in fuzz/regressions/<target>/.
regressions_of() {
  if [ "$1" = decode_transaction ]; then
    find fuzz/regressions -maxdepth 1 -type f ! -name '*.md'
  else
    find "fuzz/regressions/$1" -type f ! -name '*.md' 2>/dev/null || true
  fi
}

for target in $FUZZ_TARGETS; do
  corpus="$work/corpus/$target"
  mkdir -p "$corpus"
  cp fuzz/corpus/$target/* "$corpus/"
  regressions_of "$target" | while read -r file; do cp "$file" "$corpus/"; done
  corpus_before=$(find "$corpus" -type f | wc -l)

  echo "ci-fuzz: building $target"
  cargo fuzz build --fuzz-dir fuzz "$target"

  echo "ci-fuzz: fuzzing $target for ${FUZZ_SECONDS}s from $corpus_before inputs"
  log="$work/$target.log"
  started=$SECONDS
  status=0
  timeout --signal=KILL $((FUZZ_SECONDS + RUN_GRACE_SECONDS)) \
    cargo fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
    -dict=fuzz/decode.dict \
    -max_total_time="$FUZZ_SECONDS" \
    -timeout="$INPUT_SECONDS_MAX" \
    -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  elapsed=$((SECONDS - started))

  if [ "$status" -ne 0 ]; then
    tail -n 80 "$log"
    failed "$target: libFuzzer exited with $status after ${elapsed}s: a crash, a broken property or a hang (input in fuzz/artifacts/$target/)"
  fi
  if [ -n "$(ls -A "fuzz/artifacts/$target" 2>/dev/null)" ]; then
    ls -l "fuzz/artifacts/$target"
    failed "fuzz/artifacts/$target/ holds crashing inputs"
  fi

  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::' "$log" || true
  executions=$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log")
  [ -n "$executions" ] || failed "$target: libFuzzer printed no final stats"
  corpus_after=$(find "$corpus" -type f | wc -l)
  if [ -n "${FUZZ_KEEP_CORPUS:-}" ]; then
    mkdir -p "$FUZZ_KEEP_CORPUS/$target"
    cp "$corpus"/* "$FUZZ_KEEP_CORPUS/$target/"
  fi
  echo "ci-fuzz: $target ran $executions inputs in ${elapsed}s, corpus $corpus_before -> $corpus_after files, no crash"
  passed=$((passed + 1))
done
echo "fuzz: $passed passed, 0 failed"
[ "$passed" -eq "$targets" ]
