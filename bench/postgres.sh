#!/usr/bin/env bash
# bench/postgres.sh: tallyd on PostgreSQL, measured beside tallyd on SQLite in the same session.
#
# Makes a throwaway PostgreSQL 15 cluster (scripts/lib/postgres.sh; fsync and synchronous_commit on,
# as in production), then for each target starts tallyd on a fresh database and drives it with wrk
# (bench/transaction.lua or bench/transfers.lua) for DURATION at CONNS connections, and checks
# afterwards that the database holds at least as many transactions as were answered 200.
# Targets: sqlite (the reference: one writer, balances in memory), pg-wN (PostgreSQL, --workers N
# batches in flight), pg-2x2 (two instances of --workers 2 on one database, half the connections each).
# Results go to bench/RESULTS-postgres.md (or $RESULTS) with the date and the machine.
#
# Options (environment): DURATION=10s CONNS=64 WORKERS="1 2 4 8" SKIP_BUILD=1 RESULTS=path
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=../scripts/lib/postgres.sh
source "$ROOT/scripts/lib/postgres.sh"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
WORKERS="${WORKERS:-1 2 4 8}"
RESULTS="${RESULTS:-$ROOT/bench/RESULTS-postgres.md}"
BIN="$ROOT/target/release/tallyd"
WORK="$(mktemp -d -t tallyd-pgbench.XXXXXX)"
cleanup() {
  stop_all
  pg_down
  rm -rf "$WORK"
}
trap cleanup EXIT
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --locked
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
pg_up

# Starts tallyd on DB with extra flags; prints its port. Called in $(...), so the pid goes to a
# file that stop_all reads (an array set in the subshell would not reach the caller).
start() {
  local db="$1" log
  log="$(mktemp "$WORK/tallyd-XXXXXX.log")"
  shift
  TALLYD_DB="$db" "$BIN" serve --listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  echo "$!" >>"$WORK/pids"
  for _ in $(seq 600); do
    if grep -q "listening addr=" "$log"; then
      grep -o 'listening addr=[0-9.:]*' "$log" | head -1 | sed 's/.*://'
      return 0
    fi
    sleep 0.1
  done
  cat "$log" >&2
  return 1
}

stop_all() {
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do
      kill "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done <"$WORK/pids"
    rm -f "$WORK/pids"
  fi
}

fresh_pg() {
  local name="bench_$1_$RANDOM"
  pg_psql -c "CREATE DATABASE $name" >/dev/null
  echo "${PG_URL%/*}/$name"
}

# wrk against PORT with SCRIPT at CONNS connections; prints "requests/s ok200 p50_us p99_us".
drive() {
  local port="$1" script="$2" conns="$3"
  local line
  line="$(wrk -t2 -c"$conns" -d"$DURATION" -s "bench/$script" "http://127.0.0.1:$port" 2>/dev/null | grep '^BENCH')"
  local requests duration ok p50 p99
  requests="$(sed 's/.* requests=\([0-9]*\).*/\1/' <<<"$line")"
  duration="$(sed 's/.* duration_us=\([0-9]*\).*/\1/' <<<"$line")"
  ok="$(sed 's/.* ok200=\([0-9]*\).*/\1/' <<<"$line")"
  p50="$(sed 's/.* p50_us=\([0-9]*\).*/\1/' <<<"$line")"
  p99="$(sed 's/.* p99_us=\([0-9]*\).*/\1/' <<<"$line")"
  echo "$((ok * 1000000 / duration)) $ok $p50 $p99 $requests"
}

pg_count() { "$PG_BIN/psql" "$1" -qAtc "SELECT count(*) FROM transactions"; }

ROWS=()
record() { # target route result stored
  local target="$1" route="$2" result="$3" stored="$4"
  read -r rate ok p50 p99 requests <<<"$result"
  local verdict="ok"
  [ "$stored" -ge "$ok" ] || verdict="LOST $((ok - stored))"
  ROWS+=("| $target | $route | $rate | $((p50 / 1000)).$(((p50 % 1000) / 100)) | $((p99 / 1000)).$(((p99 % 1000) / 100)) | $ok of $requests | $stored ($verdict) |")
  echo "${ROWS[-1]}"
}

for route in transaction.lua transfers.lua; do
  db="$WORK/sqlite-$route.db"
  port="$(start "$db")"
  result="$(drive "$port" "$route" "$CONNS")"
  stop_all
  record sqlite "$route" "$result" "$(sqlite3 "$db" 'SELECT count(*) FROM transactions' 2>/dev/null || python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM transactions').fetchone()[0])" "$db")"
  rm -f "$db"*
  for workers in $WORKERS; do
    url="$(fresh_pg "w$workers")"
    port="$(start "$url" --workers "$workers")"
    result="$(drive "$port" "$route" "$CONNS")"
    stop_all
    record "pg-w$workers" "$route" "$result" "$(pg_count "$url")"
  done
  url="$(fresh_pg two)"
  first="$(start "$url" --workers 2)"
  second="$(start "$url" --workers 2)"
  half=$((CONNS / 2))
  drive "$first" "$route" "$half" >"$WORK/first" &
  driver=$!
  drive "$second" "$route" "$half" >"$WORK/second"
  wait "$driver"
  stop_all
  read -r r1 o1 p50a p99a q1 <"$WORK/first"
  read -r r2 o2 p50b p99b q2 <"$WORK/second"
  record "pg-2x2" "$route" "$((r1 + r2)) $((o1 + o2)) $(((p50a + p50b) / 2)) $((p99a > p99b ? p99a : p99b)) $((q1 + q2))" "$(pg_count "$url")"
done

{
  echo "# tallyd on PostgreSQL beside SQLite"
  echo
  echo "Measured $(date -u +%F) with \`bash bench/postgres.sh\` (DURATION=$DURATION, CONNS=$CONNS, wrk -t2) on $(nproc) cores,"
  echo "$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); PostgreSQL $("$PG_BIN/postgres" --version | sed 's/.* //') on the same machine"
  echo "(a throwaway cluster, fsync on), so wrk, tallyd and PostgreSQL share the 2 cores. One run each."
  echo "Load average when the runs ended: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine shows here)."
  echo "Rate: durable 200s per second; p50/p99 in ms; stored: transactions in the database after the run."
  echo
  echo "| target | script | 200/s | p50 ms | p99 ms | 200s of requests | stored |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$RESULTS"
echo "wrote $RESULTS"
