#!/usr/bin/env bash
# Fuzzes the request decoder for a bounded time: libFuzzer (cargo fuzz) drives
# `tallyd::http::decode::transaction` through the target fuzz/fuzz_targets/decode_transaction.rs,
# which checks every answer against a model of the rules (fuzz/src/lib.rs). See docs/fuzzing.md.
#
# Installs cargo-fuzz if missing. Only stable Rust exists here, so RUSTC_BOOTSTRAP=1 lets it pass
# the nightly-only flags (-Zsanitizer=address and friends) that cargo fuzz needs.
# The run starts from a temporary copy of the repo's corpus and regression inputs, so the clone
# stays clean; fuzz/artifacts/ (ignored by git) receives any crashing input.
#
# FUZZ_SECONDS (default 60) bounds the fuzzing itself; FUZZ_KEEP_CORPUS=DIR keeps the grown corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TARGET=decode_transaction
# The fuzzing run may take this much longer than FUZZ_SECONDS (loading the corpus, final merge)
# before it is killed as hung.
RUN_GRACE_SECONDS=120
# One input taking longer than this is a hang (libFuzzer's default is 1200 s); the slowest so far
# took well under a second, with AddressSanitizer.
INPUT_SECONDS_MAX=10
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" CARGO_TERM_COLOR=never

failed() {
  echo "ci-fuzz: $*" >&2
  echo "fuzz: 0 passed, 1 failed"
  exit 1
}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "ci-fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
corpus="$work/corpus"
mkdir -p "$corpus"
cp fuzz/corpus/$TARGET/* "$corpus/"
find fuzz/regressions -type f ! -name '*.md' -exec cp {} "$corpus/" \;
corpus_before=$(find "$corpus" -type f | wc -l)

echo "ci-fuzz: building $TARGET"
cargo fuzz build --fuzz-dir fuzz "$TARGET"

echo "ci-fuzz: fuzzing $TARGET for ${FUZZ_SECONDS}s from $corpus_before inputs"
log="$work/libfuzzer.log"
started=$SECONDS
status=0
timeout --signal=KILL $((FUZZ_SECONDS + RUN_GRACE_SECONDS)) \
  cargo fuzz run --fuzz-dir fuzz "$TARGET" "$corpus" -- \
  -dict=fuzz/decode.dict \
  -max_total_time="$FUZZ_SECONDS" \
  -timeout="$INPUT_SECONDS_MAX" \
  -print_final_stats=1 \
  >"$log" 2>&1 || status=$?
elapsed=$((SECONDS - started))

if [ "$status" -ne 0 ]; then
  tail -n 80 "$log"
  failed "libFuzzer exited with $status after ${elapsed}s: a crash, a broken property or a hang (input in fuzz/artifacts/$TARGET/)"
fi
if [ -n "$(ls -A "fuzz/artifacts/$TARGET" 2>/dev/null)" ]; then
  ls -l "fuzz/artifacts/$TARGET"
  failed "fuzz/artifacts/$TARGET/ holds crashing inputs"
fi

grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::' "$log" || true
executions=$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log")
[ -n "$executions" ] || failed "libFuzzer printed no final stats"
corpus_after=$(find "$corpus" -type f | wc -l)
if [ -n "${FUZZ_KEEP_CORPUS:-}" ]; then
  mkdir -p "$FUZZ_KEEP_CORPUS"
  cp "$corpus"/* "$FUZZ_KEEP_CORPUS/"
fi
echo "ci-fuzz: $TARGET ran $executions inputs in ${elapsed}s, corpus $corpus_before -> $corpus_after files, no crash"
echo "fuzz: 1 passed, 0 failed"
