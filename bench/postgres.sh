#!/usr/bin/env bash
# bench/postgres.sh: tallyd on PostgreSQL, measured beside its baselines in one run (issue 14).
#
# Makes a throwaway PostgreSQL 15 cluster (scripts/lib/postgres.sh; fsync and synchronous_commit on,
# as in production), then for each target starts tallyd on a fresh database and drives it with wrk
# (bench/transfers.lua, POST /transfers between 100,000 seeded cards) for DURATION at CONNS
# connections, and checks afterwards that the database holds at least as many transactions as were
# answered 200. Targets, in this order:
#   pgbench      PostgreSQL's own TPC-B-like benchmark on the same cluster (the database's ceiling here)
#   sqlite       tallyd on SQLite (one writer, balances in memory)
#   pg-naive     one PostgreSQL transaction per request (--batch-max 1), NAIVE_WORKERS in flight
#   pg-wN        tallyd on PostgreSQL, --workers N batches in flight (WORKERS)
#   pg-2i, pg-3i two and three instances of --workers MULTI_WORKERS on one database, the connections
#                split between them
#   pg-hot       pg-w$HOT_WORKERS with every transfer paying one card (bench/transfers.lua hot)
# Beside each PostgreSQL row: tallyd's peak RSS, PostgreSQL's memory (the sum of its processes'
# proportional set sizes at the end of the run) and CPU seconds during the run, and transfers per
# PostgreSQL CPU second. Results go to bench/RESULTS-postgres.md (or $RESULTS).
#
# Options (environment): DURATION=8s CONNS=256 WORKERS="1 2 4" MULTI_WORKERS=2 HOT_WORKERS=4
#   NAIVE_WORKERS=8 PGBENCH_CLIENTS=64 SKIP_BUILD=1 RESULTS=path
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=../scripts/lib/postgres.sh
source "$ROOT/scripts/lib/postgres.sh"
DURATION="${DURATION:-8s}"
CONNS="${CONNS:-256}"
WORKERS="${WORKERS:-1 2 4}"
MULTI_WORKERS="${MULTI_WORKERS:-2}"
HOT_WORKERS="${HOT_WORKERS:-4}"
NAIVE_WORKERS="${NAIVE_WORKERS:-8}"
PGBENCH_CLIENTS="${PGBENCH_CLIENTS:-64}"
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

# wrk against PORT at CONNS connections with bench/transfers.lua and its ARGS; prints
# "rate ok200 p50_us p99_us requests".
drive() {
  local port="$1" conns="$2"
  shift 2
  local line
  line="$(wrk -t2 -c"$conns" -d"$DURATION" -s bench/transfers.lua "http://127.0.0.1:$port" -- "$@" 2>/dev/null | grep '^BENCH')"
  local field
  field() { sed "s/.* $1=\([0-9]*\).*/\1/" <<<"$line"; }
  local ok duration
  ok="$(field ok200)"
  duration="$(field duration_us)"
  echo "$((ok * 1000000 / duration)) $ok $(field p50_us) $(field p99_us) $(field requests)"
}

pg_count() { "$PG_BIN/psql" "$1" -qAtc "SELECT count(*) FROM transactions"; }

# CPU seconds (user + system, in clock ticks) used so far by the cluster's processes.
pg_ticks() {
  local total=0 pid
  for pid in $(pgrep -u postgres postgres); do
    read -r -a stat <"/proc/$pid/stat" 2>/dev/null || continue
    total=$((total + stat[13] + stat[14]))
  done
  echo "$total"
}

# The cluster's memory now: the sum of its processes' proportional set sizes (shared buffers
# counted once between them), in MiB.
pg_pss_mib() {
  local total=0 pid kb
  for pid in $(pgrep -u postgres postgres); do
    kb="$(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)"
    total=$((total + ${kb:-0}))
  done
  echo "$((total / 1024))"
}

# The largest peak RSS of the tallyd processes running now, in MiB.
tallyd_hwm_mib() {
  local most=0 pid kb
  while read -r pid; do
    kb="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)"
    [ "${kb:-0}" -gt "$most" ] && most="$kb"
  done <"$WORK/pids"
  echo "$((most / 1024))"
}

ROWS=()
# record TARGET RESULT STORED [TALLYD_MIB PG_MIB PG_CPU_S]
record() {
  local target="$1" result="$2" stored="$3" tallyd_mib="${4:--}" pg_mib="${5:--}" pg_cpu="${6:--}"
  read -r rate ok p50 p99 requests <<<"$result"
  local verdict="ok" per_cpu="-"
  [ "$stored" = "-" ] || [ "$stored" -ge "$ok" ] || verdict="LOST $((ok - stored))"
  if [ "$pg_cpu" != "-" ]; then
    per_cpu="$(python3 -c "import sys; print(round(int(sys.argv[1]) / max(float(sys.argv[2]), 0.01)))" "$ok" "$pg_cpu")"
  fi
  local ms
  ms() { echo "$(($1 / 1000)).$((($1 % 1000) / 100))"; }
  ROWS+=("| $target | $rate | $(ms "$p50") | $(ms "$p99") | $ok of $requests | $stored ($verdict) | $tallyd_mib | $pg_mib | $pg_cpu | $per_cpu |")
  echo "${ROWS[-1]}"
}

# pg_target NAME INSTANCES "TALLYD FLAGS" [WRK ARGS...]: INSTANCES tallyds on one fresh database,
# CONNS connections split between them, and the row.
pg_target() {
  local name="$1" instances="$2" flags="$3"
  shift 3
  local url ports=() i
  url="$(fresh_pg "${name//-/_}")"
  for ((i = 0; i < instances; i++)); do
    # shellcheck disable=SC2086
    ports+=("$(start "$url" $flags)")
  done
  local before after conns=$((CONNS / instances))
  before="$(pg_ticks)"
  for ((i = 0; i < instances; i++)); do
    drive "${ports[$i]}" "$conns" "$@" >"$WORK/drive-$i" &
  done
  wait
  after="$(pg_ticks)"
  local pg_mib tallyd_mib
  pg_mib="$(pg_pss_mib)"
  tallyd_mib="$(tallyd_hwm_mib)"
  stop_all
  local rate=0 ok=0 p50=0 p99=0 requests=0 r o a b q
  for ((i = 0; i < instances; i++)); do
    read -r r o a b q <"$WORK/drive-$i"
    rate=$((rate + r)) ok=$((ok + o)) requests=$((requests + q)) p50=$((p50 > a ? p50 : a)) p99=$((p99 > b ? p99 : b))
  done
  local cpu
  cpu="$(python3 -c "import os, sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / os.sysconf('SC_CLK_TCK'), 1))" "$before" "$after")"
  record "$name" "$rate $ok $p50 $p99 $requests" "$(pg_count "$url")" "$tallyd_mib" "$pg_mib" "$cpu"
}

# 1. PostgreSQL's own TPC-B-like benchmark, scale 10, prepared statements.
pgbench_db="bench_pgbench_$RANDOM"
pg_psql -c "CREATE DATABASE $pgbench_db" >/dev/null
pg_as_postgres "$PG_BIN/pgbench" -h "$PG_WORK" -p "$PG_PORT" -U "$PG_USER_NAME" -i -q -s 10 "$pgbench_db" >/dev/null 2>&1
PGBENCH_LINE="$(pg_as_postgres "$PG_BIN/pgbench" -h "$PG_WORK" -p "$PG_PORT" -U "$PG_USER_NAME" -M prepared \
  -c "$PGBENCH_CLIENTS" -j 2 -T "${DURATION%s}" "$pgbench_db" 2>/dev/null | grep -E '^tps' | head -1)"
PGBENCH_TPS="$(sed 's/^tps = \([0-9]*\).*/\1/' <<<"$PGBENCH_LINE")"
echo "pgbench: $PGBENCH_LINE"

# 2. SQLite, the reference.
db="$WORK/sqlite.db"
port="$(start "$db")"
result="$(drive "$port" "$CONNS")"
sqlite_mib="$(tallyd_hwm_mib)"
stop_all
record sqlite "$result" "$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM transactions').fetchone()[0])" "$db")" "$sqlite_mib"
rm -f "$db"*

# 3. PostgreSQL.
pg_target pg-naive 1 "--workers $NAIVE_WORKERS --batch-max 1"
for workers in $WORKERS; do
  pg_target "pg-w$workers" 1 "--workers $workers"
done
pg_target pg-2i 2 "--workers $MULTI_WORKERS"
pg_target pg-3i 3 "--workers $MULTI_WORKERS"
pg_target pg-hot 1 "--workers $HOT_WORKERS" 100000 hot

{
  echo "# tallyd on PostgreSQL beside its baselines"
  echo
  echo "Measured $(date -u +%F) with \`bash bench/postgres.sh\` (DURATION=$DURATION, CONNS=$CONNS, wrk -t2, POST /transfers"
  echo "between 100,000 seeded cards) on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //');"
  echo "PostgreSQL $("$PG_BIN/postgres" --version | sed 's/.* //') on the same machine (a throwaway cluster, fsync and"
  echo "synchronous_commit on), so wrk, tallyd and PostgreSQL share the cores. One run each, in one session."
  echo "Load average when the runs ended: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "PostgreSQL's own ceiling here, \`pgbench -M prepared -c $PGBENCH_CLIENTS -j 2\` (TPC-B-like, scale 10, one"
  echo "commit per transaction): **${PGBENCH_TPS:-?} transactions/s**."
  echo
  echo "Rate: durable 200s per second. p50/p99 in ms (the worst instance's). Stored: transactions in the database"
  echo "afterwards (at least the 200s: ok). tallyd MiB: peak RSS (the largest instance). PG MiB: the cluster's"
  echo "proportional set size at the end. PG CPU s: the cluster's CPU seconds during the run. Per PG CPU s: 200s"
  echo "per PostgreSQL CPU second."
  echo
  echo "| target | 200/s | p50 ms | p99 ms | 200s of requests | stored | tallyd MiB | PG MiB | PG CPU s | per PG CPU s |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$RESULTS"
echo "wrote $RESULTS"
