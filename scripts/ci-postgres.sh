#!/usr/bin/env bash
# PostgreSQL suite (issue 14): the integration suites against a real PostgreSQL server.
#
# 1. Installs Debian's postgresql (apt-get update first) and makes a throwaway cluster in a
#    temporary directory owned by the postgres user, on 127.0.0.1 on a free port, with password
#    authentication (scripts/lib/postgres.sh). Nothing is assumed installed or running.
# 2. Runs tests/postgres.rs (migrations under the advisory lock, two instances on one database
#    conserving money, one idempotency key sent to two instances at once), tests/postgres_replica.rs
#    (the read routes on a hot standby made with pg_basebackup, its replay paused) and the shared suites
#    (server, idempotency, ledger, holds, bulk, hostile, crash, overload, retries, auth, rate_limit:
#    each test that reads SQLite's own files or locks says so and skips; the API keys are created
#    in the PostgreSQL database with `tallyd keys --db postgres://...`), then tests/postgres_restart.rs (PostgreSQL
#    stopped -m immediate under load and started again), with TALLYD_TEST_DB pointing at the
#    cluster: the harness (tests/common) then starts every server on a fresh database of its own
#    there instead of a SQLite file.
# 3. Stops the cluster and removes it, also when a step failed.
#
# Usage: bash scripts/ci-postgres.sh [SUITE...]   (default: the suites below)
# Prints "N passed, M failed" last and exits non-zero when any suite failed. Needs root (or a
# user that can run initdb).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
cd "$ROOT"
# shellcheck source=lib/postgres.sh
source "$ROOT/scripts/lib/postgres.sh"

readonly DEFAULT_SUITES=(postgres postgres_replica server idempotency ledger holds bulk hostile crash overload retries auth rate_limit postgres_restart)
if [ "$#" -gt 0 ]; then
  SUITES=("$@")
else
  SUITES=("${DEFAULT_SUITES[@]}")
fi
readonly STEP_TIMEOUT_S=1800
PASSED=0
FAILED=0
FAILED_NAMES=()

trap pg_down EXIT
pg_up

run_suite() {
  local suite="$1"
  echo "=== tests/$suite.rs on PostgreSQL"
  if TALLYD_TEST_DB="$PG_URL" timeout "$STEP_TIMEOUT_S" cargo test --locked --test "$suite" -- --test-threads=2; then
    PASSED=$((PASSED + 1))
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$suite")
  fi
}

for suite in "${SUITES[@]}"; do
  run_suite "$suite"
done

if [ "$FAILED" -gt 0 ]; then
  echo "failed: ${FAILED_NAMES[*]}"
  tail -n 50 "$PG_WORK/server.log" || true
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
