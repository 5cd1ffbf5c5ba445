#!/usr/bin/env bash
# bench/run.sh: tallyd's throughput benchmark, one command.
#
# Builds the release binaries, then for each run starts a server on a fresh database (tallyd seeds its
# 100,000 cards), drives POST /transaction with wrk (bench/transaction.lua: random card, signed amount) for a
# bounded time, and records requests/s, p50/p99 latency, resident memory and how many journal rows the database
# holds afterwards (at least one per 200, or the run is marked as losing transactions). The same load runs
# against two references in the same session: the ceiling (examples/noop.rs, HTTP only) and the naive design
# (tallyd --batch-max 1); `--durability normal` is measured beside them, labelled. Medians over RUNS go to
# bench/RESULTS.md with the date, the machine and the exact commands.
#
# Options (environment):
#   DURATION=15s   wrk's -d for each run            RUNS=3        runs per target and connection count
#   CONNS="64 256" connection counts                 THREADS=2     wrk's -t (the machine has 2 cores)
#   TARGETS="noop tallyd batch1 normal"              QUICK=1       DURATION=3s RUNS=1, results to bench/out/
#   (also: workers1, workers2, workers4: tallyd with --workers N, to compare pool sizes;
#    keyed: POST /transaction with a new Idempotency-Key on every request;
#    transfers, transfers_zipf, transfers_hot: POST /transfers between uniform random cards, Zipf-skewed
#    cards (s = 1.0), or from random cards to one merchant card;
#    baseline: POST /transaction on the release built from BASELINE_REV, to compare before and after a change;
#    tallyd_1m, tallyd_10m, transfers_1m, transfers_10m: tallyd and transfers on a database of 1,000,000 or
#    10,000,000 seeded cards (made once per run from users.db.sql with its bound raised, then copied for each
#    run), with the engine's bytes per account and the start-up time after a clean stop and after SIGKILL;
#    the 100,000-card rows of tallyd and transfers measure their start-up too, for the scale table)
#    https: tallyd over TLS (a self-signed P-256 certificate made with openssl for the run), keep-alive;
#    keyed_auth: tallyd with an API key created on the fresh database, sent on every request as a Bearer token;
#    bulk100, bulk8190, bulk8190_zipf, bulk8190_hot: POST /transfers/bulk of 100 or 8,190 transfers a request
#    (bench/bulk.lua: uniform, Zipf s = 1.0, or all to one merchant card), with transfers/s counted from the items
#    answered 200 and bytes written per transfer from /proc/<pid>/io write_bytes;
#    bulk_mixed: bulk8190's load and, beside it on SINGLE_CONNS more connections, POST /transfers (uniform), whose
#    own p50/p99 is reported: single transfers under a concurrent bulk load)
#   SINGLE_CONNS=16  connections of bulk_mixed's single transfers
#   TIGERBEETLE=cmd  optional: a command run once after the runs (e.g. bench/tigerbeetle.sh, written elsewhere)
#                    whose output is appended to the results as it is
#   BASELINE_REV=758fffc  the commit the baseline target builds (in a git worktree under bench/out/)
#   RESULTS=path   where the table goes              BENCH_TMP=dir where the fresh databases go (default /tmp)
#   JOBS=2         cargo build -j                    SKIP_BUILD=1  use the binaries already built
# Every server listens on 127.0.0.1 with a port the OS picks; every process it starts is killed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${QUICK:-0}" == 1 ]]; then
    DURATION="${DURATION:-3s}"
    RUNS="${RUNS:-1}"
    RESULTS="${RESULTS:-$ROOT/bench/out/RESULTS-quick.md}"
fi
DURATION="${DURATION:-15s}"
RUNS="${RUNS:-3}"
CONNS="${CONNS:-64 256}"
THREADS="${THREADS:-2}"
TARGETS="${TARGETS:-noop tallyd batch1 normal}"
RESULTS="${RESULTS:-$ROOT/bench/RESULTS.md}"
JOBS="${JOBS:-2}"
CARDS=100000
WRK_TIMEOUT=10s
OUT="$ROOT/bench/out"
BASELINE_REV="${BASELINE_REV:-758fffc}"
BASELINE_DIR="$OUT/baseline-$BASELINE_REV"
BASELINE="$BASELINE_DIR/target/release/tallyd"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TALLYD="$TARGET_DIR/release/tallyd"
NOOP="$TARGET_DIR/release/examples/noop"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools --------------------------------------------------------------------------------------------------
install_debian_package() {
    [[ "$(id -u)" == 0 ]] || die "$1 is missing; install Debian's package '$1' (apt-get install -y $1)"
    log "installing $1 from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}
command -v wrk >/dev/null || install_debian_package wrk
if ! command -v sqlite3 >/dev/null && ! command -v python3 >/dev/null; then
    install_debian_package sqlite3
fi

# Prints the number of committed transactions in DB: rows of `transactions` (schema 2), or of the
# journal on a version-1 database (the baseline).
count_journal() {
    python3 - "$1" <<'PY'
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
table = "transactions" if "transactions" in tables else "journal"
print(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
PY
}

# --- processes ----------------------------------------------------------------------------------------------
WORK="$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/tallyd-bench.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server and stop_server.
source "$ROOT/scripts/lib/server.sh"

# proc_kib PID FIELD: a VmHWM/VmRSS figure from /proc, in KiB.
proc_kib() { awk -v field="$2:" '$1 == field { print $2 }' "/proc/$1/status"; }

# histogram_mean FILE NAME SCALE: NAME_sum / NAME_count * SCALE from a Prometheus scrape, or "-".
histogram_mean() {
    awk -v sum="$2_sum" -v count="$2_count" -v scale="$3" '
        $1 == sum || index($1, sum "{") == 1 { s += $2 } $1 == count || index($1, count "{") == 1 { c += $2 }
        END { if (c > 0) printf "%.2f", s / c * scale; else print "-" }' "$1"
}

# The field NAME=VALUE of a `BENCH ...` line.
bench_field() { tr ' ' '\n' <<<"$1" | awk -F= -v name="$2" '$1 == name { print $2 }'; }

# --- build --------------------------------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release --bins --examples -j $JOBS"
    cargo build --release --bins --examples -j "$JOBS" >&2
fi
[[ -x "$TALLYD" ]] || die "missing $TALLYD"
if [[ " $TARGETS " == *" baseline "* && ! -x "$BASELINE" ]]; then
    log "building the baseline ($BASELINE_REV) in $BASELINE_DIR"
    rm -rf "$BASELINE_DIR"
    git -C "$ROOT" worktree prune
    git -C "$ROOT" worktree add --detach "$BASELINE_DIR" "$BASELINE_REV" >&2
    (cd "$BASELINE_DIR" && cargo build --release --locked --bin tallyd -j "$JOBS" >&2)
fi
[[ -x "$NOOP" ]] || die "missing $NOOP"

# The command line of each target; DB is replaced by a fresh file each run.
target_command() {
    case "$1" in
    noop) echo "$NOOP 127.0.0.1:0" ;;
    tallyd) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full" ;;
    batch1) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full --batch-max 1" ;;
    normal) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability normal" ;;
    workers1) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full --workers 1" ;;
    workers2) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full --workers 2" ;;
    workers4) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full --workers 4" ;;
    keyed | keyed_auth | transfers | transfers_zipf | transfers_hot | tallyd_1m | tallyd_10m | transfers_1m | transfers_10m)
        echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full" ;;
    bulk100 | bulk8190 | bulk8190_zipf | bulk8190_hot | bulk_mixed)
        echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full" ;;
    https) echo "$TALLYD serve --listen 127.0.0.1:0 --db DB --durability full --tls-cert $WORK/tls.pem --tls-key $WORK/tls.key" ;;
    baseline) echo "$BASELINE serve --listen 127.0.0.1:0 --db DB --durability full" ;;
    *) die "unknown target $1 (noop, tallyd, batch1, normal, workers1, workers2, workers4, keyed, keyed_auth, https, transfers, transfers_zipf, transfers_hot, baseline, tallyd_1m, tallyd_10m, transfers_1m, transfers_10m, bulk100, bulk8190, bulk8190_zipf, bulk8190_hot, bulk_mixed)" ;;
    esac
}
# The wrk script and its arguments (after the card count) of each target.
target_script() {
    case "$1" in
    keyed) echo "bench/transaction.lua keyed" ;;
    transfers | transfers_1m | transfers_10m) echo "bench/transfers.lua uniform" ;;
    transfers_zipf) echo "bench/transfers.lua zipf" ;;
    transfers_hot) echo "bench/transfers.lua hot" ;;
    bulk100) echo "bench/bulk.lua uniform 100" ;;
    bulk8190 | bulk_mixed) echo "bench/bulk.lua uniform 8190" ;;
    bulk8190_zipf) echo "bench/bulk.lua zipf 8190" ;;
    bulk8190_hot) echo "bench/bulk.lua hot 8190" ;;
    *) echo "bench/transaction.lua" ;;
    esac
}
target_label() {
    case "$1" in
    noop) echo "ceiling: examples/noop (HTTP only)" ;;
    tallyd) echo "**tallyd** (durability full)" ;;
    batch1) echo "naive: tallyd --batch-max 1 (full)" ;;
    normal) echo "tallyd, durability normal (not durable on power loss)" ;;
    workers1) echo "tallyd --workers 1 (full)" ;;
    workers2) echo "tallyd --workers 2 (full)" ;;
    workers4) echo "tallyd --workers 4 (full)" ;;
    keyed) echo "tallyd, POST /transaction with an Idempotency-Key each (full)" ;;
    keyed_auth) echo "tallyd, POST /transaction with an API key on every request (full)" ;;
    https) echo "tallyd over HTTPS (TLS 1.3, keep-alive; full)" ;;
    transfers) echo "tallyd, POST /transfers, uniform random cards (full)" ;;
    transfers_zipf) echo "tallyd, POST /transfers, Zipf s=1.0 cards (full)" ;;
    transfers_hot) echo "tallyd, POST /transfers, all to one merchant card (full)" ;;
    baseline) echo "baseline: tallyd $BASELINE_REV, POST /transaction (full)" ;;
    tallyd_1m) echo "tallyd, POST /transaction, 1,000,000 cards (full)" ;;
    tallyd_10m) echo "tallyd, POST /transaction, 10,000,000 cards (full)" ;;
    transfers_1m) echo "tallyd, POST /transfers, 1,000,000 cards (full)" ;;
    transfers_10m) echo "tallyd, POST /transfers, 10,000,000 cards (full)" ;;
    bulk100) echo "tallyd, POST /transfers/bulk of 100, uniform (full)" ;;
    bulk8190) echo "tallyd, POST /transfers/bulk of 8,190, uniform (full)" ;;
    bulk8190_zipf) echo "tallyd, POST /transfers/bulk of 8,190, Zipf s=1.0 (full)" ;;
    bulk8190_hot) echo "tallyd, POST /transfers/bulk of 8,190, all to one merchant card (full)" ;;
    bulk_mixed) echo "tallyd, bulk of 8,190 with POST /transfers beside it (full)" ;;
    esac
}
is_bulk() { [[ "$1" == bulk* ]]; }
SINGLE_CONNS="${SINGLE_CONNS:-16}"
# write_bytes PID: bytes the process has caused to be written to storage so far (/proc/PID/io).
write_bytes() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$1/io"; }
# How many seeded cards a target's database holds (and its load draws from).
target_cards() {
    case "$1" in
    *_1m) echo 1000000 ;;
    *_10m) echo 10000000 ;;
    *) echo "$CARDS" ;;
    esac
}
# Whether a target's start-up is timed (after a clean stop and after SIGKILL).
timed_start() { [[ "$1" == tallyd || "$1" == transfers || "$1" == *_1m || "$1" == *_10m ]]; }

# template_db N: a database of N seeded cards, made once by tallyd itself from users.db.sql with the
# bound of its recursive CTE raised, then stopped cleanly; each run copies it.
template_db() {
    local n="$1" template="$WORK/template-$1.db"
    if [[ ! -f "$template" ]]; then
        log "making a database of $n cards"
        sed "s/WHERE i < 100000)/WHERE i < $n)/" "$ROOT/users.db.sql" >"$WORK/seed-$n.sql"
        start_server "$WORK/template-$n.log" "$TALLYD" serve --listen 127.0.0.1:0 --db "$template" --seed "$WORK/seed-$n.sql" ||
            die "could not make the $n-card database"
        stop_server
    fi
    echo "$template"
}

# started_in_ms LOG: the start-up time tallyd reports on its listening line.
started_in_ms() { sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -o 'started_in_ms=[0-9]*' | tail -n1 | cut -d= -f2; }

# gauge FILE NAME: a gauge's value from a Prometheus scrape, or "-".
gauge() { awk -v name="$2" '$1 == name { print $2; found = 1 } END { if (!found) print "-" }' "$1"; }
# The https target's certificate, made once for the whole run (wrk does not verify it).
if [[ " $TARGETS " == *" https "* ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null \
        || die "openssl could not make the https target's certificate"
fi
for target in $TARGETS; do target_command "$target" >/dev/null; done

# target_scheme TARGET: how wrk and curl reach it.
target_scheme() { [[ "$1" == https ]] && echo https || echo http; }

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.metrics.txt
RAW="$OUT/runs.tsv"
printf 'target\tconns\trun\trequests\trps\tok200\tok_rps\tp50_ms\tp99_ms\thwm_mib\trss_mib\tjournal_added\tmissing\ts422\ts503\tother\tsocket_errors\tbatch_mean\tcommit_ms\texit\tverify\taccounts\ttable_bytes_per_account\tstart_clean_ms\tstart_kill_ms\tverify_s\ttransfers_per_s\tbytes_per_transfer\tsingle_ok_rps\tsingle_p50_ms\tsingle_p99_ms\n' >"$RAW"

# run_one TARGET CONNS RUN: one server, one wrk run, one row of $RAW.
run_one() {
    local target="$1" conns="$2" run="$3"
    local name="$target-c$conns-r$run"
    local db="$WORK/$name.db"
    local cards
    cards="$(target_cards "$target")"
    [[ "$cards" == "$CARDS" ]] || cp "$(template_db "$cards")" "$db"
    local -a cmd
    read -r -a cmd <<<"$(target_command "$target")"
    cmd=("${cmd[@]/#DB/$db}")
    # keyed_auth: the key is made on the fresh database before the server starts (keys create seeds it as serve
    # would), and handed to the wrk script and to curl in the environment, never on a command line.
    export TALLYD_BENCH_KEY=""
    local -a auth=()
    if [[ "$target" == keyed_auth ]]; then
        TALLYD_BENCH_KEY="$("$TALLYD" keys create --db "$db" --name bench --scope write 2>/dev/null)" \
            || die "could not create the bench key"
        auth=(-H "authorization: Bearer $TALLYD_BENCH_KEY")
    fi
    local scheme
    scheme="$(target_scheme "$target")"
    start_server "$OUT/$name.server.log" "${cmd[@]}" || die "could not start: ${cmd[*]}"

    local journal_before=0
    [[ "$target" == noop ]] || journal_before="$(count_journal "$db")"

    local script script_args
    read -r script script_args <<<"$(target_script "$target")"
    local written_before=0 single_pid=""
    [[ "$target" == noop ]] || written_before="$(write_bytes "$SERVER_PID")"
    if [[ "$target" == bulk_mixed ]]; then
        wrk -t1 -c"$SINGLE_CONNS" -d"$DURATION" --timeout "$WRK_TIMEOUT" -s bench/transfers.lua "$scheme://$SERVER_ADDR" -- "$cards" uniform \
            >"$OUT/$name.single.wrk.log" 2>&1 &
        single_pid=$!
    fi
    # shellcheck disable=SC2086 # script_args is a list of words
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" --timeout "$WRK_TIMEOUT" -s "$script" "$scheme://$SERVER_ADDR" -- "$cards" $script_args \
        >"$OUT/$name.wrk.log" 2>&1 || die "wrk failed: see $OUT/$name.wrk.log"
    if [[ -n "$single_pid" ]]; then
        wait "$single_pid" || die "wrk (single transfers) failed: see $OUT/$name.single.wrk.log"
    fi
    local line
    line="$(grep '^BENCH ' "$OUT/$name.wrk.log" || true)"
    [[ -n "$line" ]] || die "no BENCH line from wrk: see $OUT/$name.wrk.log"
    local written=0
    [[ "$target" == noop ]] || written=$(($(write_bytes "$SERVER_PID") - written_before))

    local hwm_kib rss_kib batch_mean="-" commit_ms="-" accounts="-" per_account="-"
    hwm_kib="$(proc_kib "$SERVER_PID" VmHWM)"
    rss_kib="$(proc_kib "$SERVER_PID" VmRSS)"
    if [[ "$target" != noop ]]; then
        curl -sfk "${auth[@]}" "$scheme://$SERVER_ADDR/metrics" >"$OUT/$name.metrics.txt" || true
        batch_mean="$(histogram_mean "$OUT/$name.metrics.txt" tallyd_batch_size 1)"
        commit_ms="$(histogram_mean "$OUT/$name.metrics.txt" tallyd_batch_commit_duration_seconds 1000)"
        accounts="$(gauge "$OUT/$name.metrics.txt" tallyd_accounts)"
        per_account="$(awk -v b="$(gauge "$OUT/$name.metrics.txt" tallyd_account_table_bytes)" -v a="$accounts" \
            'BEGIN { if (a == "-" || b == "-" || a == 0) print "-"; else printf "%.1f", b / a }')"
    fi
    stop_server
    local run_exit="$SERVER_EXIT" journal_after=0
    [[ "$target" == noop ]] || journal_after="$(count_journal "$db")"
    # The start-up after that clean stop, then after a SIGKILL under load (a replay of the journal
    # after the balance checkpoint).
    local start_clean="-" start_kill="-"
    if timed_start "$target"; then
        start_server "$OUT/$name.restart.log" "${cmd[@]}" || die "could not restart: ${cmd[*]}"
        start_clean="$(started_in_ms "$OUT/$name.restart.log")"
        # shellcheck disable=SC2086
        wrk -t"$THREADS" -c"$conns" -d3s --timeout "$WRK_TIMEOUT" -s "$script" "http://$SERVER_ADDR" -- "$cards" $script_args \
            >/dev/null 2>&1 &
        local wrk_pid=$!
        sleep 2
        kill -KILL "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
        wait "$wrk_pid" 2>/dev/null || true
        start_server "$OUT/$name.recover.log" "${cmd[@]}" || die "could not start after SIGKILL: ${cmd[*]}"
        start_kill="$(started_in_ms "$OUT/$name.recover.log")"
        stop_server
    fi

    local requests duration_us ok200 s422 s503 other sock p50_us p99_us
    requests="$(bench_field "$line" requests)"
    duration_us="$(bench_field "$line" duration_us)"
    ok200="$(bench_field "$line" ok200)"
    s422="$(bench_field "$line" s422)"
    s503="$(bench_field "$line" s503)"
    other="$(bench_field "$line" other)"
    sock=$(($(bench_field "$line" connect_err) + $(bench_field "$line" read_err) + $(bench_field "$line" write_err) + $(bench_field "$line" timeout_err)))
    p50_us="$(bench_field "$line" p50_us)"
    p99_us="$(bench_field "$line" p99_us)"

    # Bulk targets: the transfers are the items answered 200 (inside 200 answers), and bulk_mixed adds the
    # single transfers' own figures.
    local items_ok="$ok200" single_ok="-" single_p50="-" single_p99="-" single_line=""
    if is_bulk "$target"; then items_ok="$(bench_field "$line" items_ok)"; fi
    if [[ "$target" == bulk_mixed ]]; then
        single_line="$(grep '^BENCH ' "$OUT/$name.single.wrk.log" || true)"
        [[ -n "$single_line" ]] || die "no BENCH line from the single transfers: see $OUT/$name.single.wrk.log"
        single_ok="$(bench_field "$single_line" ok200)"
        single_p50="$(bench_field "$single_line" p50_us)"
        single_p99="$(bench_field "$single_line" p99_us)"
        items_ok=$((items_ok + single_ok))
    fi
    local added="-" missing="-" verify="-" verify_s="-"
    if [[ "$target" != noop ]]; then
        added=$((journal_after - journal_before))
        missing=$((items_ok > added ? items_ok - added : 0))
        local verifier="$TALLYD"
        [[ "$target" != baseline ]] || verifier="$BASELINE"
        local verify_started=$SECONDS
        if "$verifier" verify --db "$db" >"$OUT/$name.verify.log" 2>&1; then verify=ok; else verify=FAIL; fi
        verify_s=$((SECONDS - verify_started))
    fi
    rm -f "$db" "$db-wal" "$db-shm"

    awk -v OFS='\t' -v t="$target" -v c="$conns" -v r="$run" -v n="$requests" -v d="$duration_us" \
        -v ok="$ok200" -v p50="$p50_us" -v p99="$p99_us" -v hwm="$hwm_kib" -v rss="$rss_kib" -v added="$added" \
        -v missing="$missing" -v s422="$s422" -v s503="$s503" -v other="$other" -v sock="$sock" \
        -v batch="$batch_mean" -v commit="$commit_ms" -v exit_code="$run_exit" -v verify="$verify" \
        -v accounts="$accounts" -v per_account="$per_account" -v start_clean="$start_clean" -v start_kill="$start_kill" \
        -v verify_s="$verify_s" -v items="$items_ok" -v written="$written" -v single_ok="$single_ok" \
        -v single_p50="$single_p50" -v single_p99="$single_p99" 'BEGIN {
            print t, c, r, n, sprintf("%.0f", n / (d / 1e6)), ok, sprintf("%.0f", ok / (d / 1e6)),
                sprintf("%.2f", p50 / 1000), sprintf("%.2f", p99 / 1000), sprintf("%.1f", hwm / 1024),
                sprintf("%.1f", rss / 1024), added, missing, s422, s503, other, sock, batch, commit, exit_code, verify,
                accounts, per_account, start_clean, start_kill, verify_s,
                sprintf("%.0f", items / (d / 1e6)), (added == "-" || added == 0) ? "-" : sprintf("%.0f", written / added),
                single_ok == "-" ? "-" : sprintf("%.0f", single_ok / (d / 1e6)),
                single_p50 == "-" ? "-" : sprintf("%.2f", single_p50 / 1000),
                single_p99 == "-" ? "-" : sprintf("%.2f", single_p99 / 1000)
        }' >>"$RAW"
    log "$(tail -n1 "$RAW" | awk -F'\t' '{ printf "%-7s c=%-4s run %s: %s req/s, %s 200/s, p50 %s ms, p99 %s ms, peak RSS %s MiB, journal +%s (missing %s), batch %s, commit %s ms, exit %s, verify %s, %s transfers/s, %s bytes/transfer, single p99 %s ms", $1, $2, $3, $5, $7, $8, $9, $10, $12, $13, $18, $19, $20, $21, $27, $28, $31 }')"
}

START_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
START_LOAD="$(cut -d' ' -f1-3 /proc/loadavg)"
log "targets: $TARGETS; connections: $CONNS; $RUNS run(s) of $DURATION each; raw logs in $OUT"
for run in $(seq 1 "$RUNS"); do
    for conns in $CONNS; do
        for target in $TARGETS; do
            run_one "$target" "$conns" "$run"
        done
    done
done

# --- summary ------------------------------------------------------------------------------------------------
# median TARGET CONNS COLUMN: the median of one column of $RAW over the runs ("-" when it has no numbers).
median() {
    awk -F'\t' -v t="$1" -v c="$2" -v col="$3" 'NR > 1 && $1 == t && $2 == c && $col != "-" { print $col }' "$RAW" |
        sort -g | awk '{ v[NR] = $1; if ($1 !~ /^-?[0-9]+$/) decimals = 1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) { print v[(NR + 1) / 2]; exit }
            printf(decimals ? "%.2f\n" : "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2)
        }'
}
# column_sum / column_all: totals and agreement over the runs of one target and connection count.
column_sum() { awk -F'\t' -v t="$1" -v c="$2" -v col="$3" 'NR > 1 && $1 == t && $2 == c && $col != "-" { s += $col; n++ } END { print n ? s : "-" }' "$RAW"; }
column_all() { awk -F'\t' -v t="$1" -v c="$2" -v col="$3" 'NR > 1 && $1 == t && $2 == c { v[$col]++ } END { s = ""; for (k in v) s = s (s ? "," : "") k; print s }' "$RAW"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

disk_of() {
    local source fstype device rota
    read -r source fstype < <(df --output=source,fstype "$1" | tail -n1)
    device="$(lsblk -no PKNAME "$source" 2>/dev/null | head -n1 || true)"
    [[ -n "$device" ]] || device="$(basename "$source")"
    rota="$(cat "/sys/block/$device/queue/rotational" 2>/dev/null || echo '?')"
    echo "$source ($fstype, rotational=$rota)"
}

mkdir -p "$(dirname "$RESULTS")"
{
    echo "# tallyd benchmark results"
    echo
    echo "Generated by \`bench/run.sh\`; see docs/loadtest.md for how to read it."
    echo
    echo "- Date: $START_DATE"
    echo "- Commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$( [[ -z "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock examples 2>/dev/null)" ]] || echo ' (with uncommitted changes)')"
    echo "- Machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory, Linux $(uname -r)"
    echo "- Disk holding the databases: $(disk_of "$WORK")"
    echo "- Load average (1, 5, 15 min) before the runs: $START_LOAD; after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure; compare rows, not runs on different days)"
    echo "- Load: $(wrk -v 2>&1 | head -n1 || true); \`-t$THREADS\`, $DURATION per run, $RUNS run(s) per row, median shown; wrk and the server share the same $(nproc) cores"
    echo "- Each run: a fresh server on a fresh database seeded with $CARDS cards, then the committed transactions counted (\`SELECT count(*) FROM transactions\`, the journal on the baseline) and \`tallyd verify\` after a graceful stop (SIGTERM)"
    echo
    echo "| target | conns | req/s | 200/s | p50 ms | p99 ms | peak RSS MiB | transactions added | 200s missing from the database (all runs) | 422 / 503 / other | socket errors | mean batch | mean commit ms | exit on SIGTERM | verify |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"
    for conns in $CONNS; do
        for target in $TARGETS; do
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s | %s | %s | %s | %s | %s |\n' \
                "$(target_label "$target")" "$conns" "$(median "$target" "$conns" 5)" "$(median "$target" "$conns" 7)" \
                "$(median "$target" "$conns" 8)" "$(median "$target" "$conns" 9)" "$(median "$target" "$conns" 10)" \
                "$(median "$target" "$conns" 12)" "$(column_sum "$target" "$conns" 13)" \
                "$(median "$target" "$conns" 14)" "$(median "$target" "$conns" 15)" "$(median "$target" "$conns" 16)" \
                "$(median "$target" "$conns" 17)" "$(median "$target" "$conns" 18)" "$(median "$target" "$conns" 19)" \
                "$(column_all "$target" "$conns" 20)" "$(column_all "$target" "$conns" 21)"
        done
    done
    if [[ " $TARGETS " == *" tallyd "* ]]; then
        echo
        echo "## tallyd (durability full) against the references and the targets"
        echo
        echo "| conns | tallyd 200/s | share of the noop ceiling | multiple of --batch-max 1 | target | p99 ms | met |"
        echo "|---:|---:|---:|---:|---|---:|---|"
        for conns in $CONNS; do
            tps="$(median tallyd "$conns" 7)"
            p99="$(median tallyd "$conns" 9)"
            case "$conns" in
            256) goal="≥ 25,000/s, p99 < 25 ms"; met="$(awk -v t="$tps" -v p="$p99" 'BEGIN { print (t >= 25000 && p < 25) ? "yes" : "no" }')" ;;
            64) goal="≥ 15,000/s"; met="$(awk -v t="$tps" 'BEGIN { print (t >= 15000) ? "yes" : "no" }')" ;;
            *) goal="-"; met="-" ;;
            esac
            echo "| $conns | $tps | $(ratio "$tps" "$(median noop "$conns" 5)") | $(ratio "$tps" "$(median batch1 "$conns" 7)") | $goal | $p99 | $met |"
        done
    fi
    if [[ " $TARGETS " == *" https "* || " $TARGETS " == *" keyed_auth "* ]]; then
        echo
        echo "## Security: HTTPS and API keys against plaintext tallyd"
        echo
        echo "| conns | target | 200/s | of the ceiling | of plaintext tallyd | goal | p50 ms | p99 ms |"
        echo "|---:|---|---:|---:|---:|---|---:|---:|"
        for conns in $CONNS; do
            for target in tallyd https keyed_auth; do
                [[ " $TARGETS " == *" $target "* ]] || continue
                tps="$(median "$target" "$conns" 7)"
                case "$target" in https) goal="≥ 0.80" ;; keyed_auth) goal="≥ 0.95" ;; *) goal="-" ;; esac
                echo "| $conns | $target | $tps | $(ratio "$tps" "$(median noop "$conns" 5)") | $(ratio "$tps" "$(median tallyd "$conns" 7)") | $goal | $(median "$target" "$conns" 8) | $(median "$target" "$conns" 9) |"
            done
        done
    fi
    if [[ " $TARGETS " == *" transfers "* || " $TARGETS " == *" keyed "* || " $TARGETS " == *" baseline "* ]]; then
        echo
        echo "## The ledger: transfers, idempotency keys, and POST /transaction against its baseline"
        echo
        echo "Each figure is durable 200s per second (median), with its share of the noop ceiling in the same run."
        echo
        echo "| conns | target | 200/s | of the ceiling | p50 ms | p99 ms | peak RSS MiB | against |"
        echo "|---:|---|---:|---:|---:|---:|---:|---|"
        for conns in $CONNS; do
            ceiling="$(median noop "$conns" 5)"
            for target in baseline tallyd keyed transfers transfers_zipf transfers_hot; do
                [[ " $TARGETS " == *" $target "* ]] || continue
                tps="$(median "$target" "$conns" 7)"
                case "$target" in
                tallyd) against="$(ratio "$tps" "$(median baseline "$conns" 7)") of baseline" ;;
                keyed) against="$(ratio "$tps" "$(median tallyd "$conns" 7)") of tallyd without keys (goal ≥ 0.90)" ;;
                transfers) against="goal ≥ 45,000/s at 256" ;;
                transfers_zipf | transfers_hot) against="$(ratio "$tps" "$(median transfers "$conns" 7)") of uniform (goal ≥ 0.90)" ;;
                *) against="-" ;;
                esac
                echo "| $conns | $target | $tps | $(ratio "$tps" "$ceiling") | $(median "$target" "$conns" 8) | $(median "$target" "$conns" 9) | $(median "$target" "$conns" 10) | $against |"
            done
        done
    fi
    if [[ " $TARGETS " == *" bulk"* ]]; then
        echo
        echo "## Bulk transfers: POST /transfers/bulk (issue 19)"
        echo
        echo "Transfers/s counts the items answered 200 inside 200 answers (bulk_mixed: with the single transfers beside"
        echo "them); p50/p99 are per request. Bytes per transfer is the server's /proc/<pid>/io write_bytes over the run"
        echo "divided by the transactions added (journal, WAL, checkpoints and write-back together). Goals (durability"
        echo "full, 100,000 accounts): bulk of 100 at least 100,000 transfers/s; bulk of 8,190 at least 250,000/s, Zipf and"
        echo "one-hot at least as fast as uniform."
        echo
        echo "| conns | target | transfers/s | goal | of uniform 8,190 | requests/s | p50 ms | p99 ms | peak RSS MiB | bytes/transfer | mean batch | mean commit ms | single 200/s | single p50 ms | single p99 ms |"
        echo "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for conns in $CONNS; do
            for target in bulk100 bulk8190 bulk8190_zipf bulk8190_hot bulk_mixed transfers; do
                [[ " $TARGETS " == *" $target "* ]] || continue
                tps="$(median "$target" "$conns" 27)"
                case "$target" in
                bulk100) goal="≥ 100,000/s: $(awk -v t="$tps" 'BEGIN { print (t >= 100000) ? "met" : "missed" }')" ;;
                bulk8190) goal="≥ 250,000/s: $(awk -v t="$tps" 'BEGIN { print (t >= 250000) ? "met" : "missed" }')" ;;
                bulk8190_zipf | bulk8190_hot) goal="≥ uniform" ;;
                *) goal="-" ;;
                esac
                echo "| $conns | $target | $tps | $goal | $(ratio "$tps" "$(median bulk8190 "$conns" 27)") | $(median "$target" "$conns" 5) | $(median "$target" "$conns" 8) | $(median "$target" "$conns" 9) | $(median "$target" "$conns" 10) | $(median "$target" "$conns" 28) | $(median "$target" "$conns" 18) | $(median "$target" "$conns" 19) | $(median "$target" "$conns" 29) | $(median "$target" "$conns" 30) | $(median "$target" "$conns" 31) |"
            done
        done
        echo
        echo "bulk_mixed runs its single transfers on $SINGLE_CONNS more connections (\`wrk -t1 -c$SINGLE_CONNS -s bench/transfers.lua\`)."
    fi
    if [[ " $TARGETS " == *_1m\ * || " $TARGETS " == *_10m\ * ]]; then
        echo
        echo "## Ten million cards: the same load on 100,000, 1,000,000 and 10,000,000 accounts"
        echo
        echo "Goals at 10,000,000 (issue 13): 200/s at least 0.90 of the 100,000 figure, p99 at most 2x, at most 32 bytes an"
        echo "account in the engine's table, peak RSS at most 400 MiB (64 MiB at 1,000,000), start-up at most 1,500 ms after a"
        echo "clean stop and after SIGKILL. Bytes per account is the engine's table (\`tallyd_account_table_bytes\` over"
        echo "\`tallyd_accounts\`); start-up is \`started_in_ms\` on the listening line (open, load, replay); verify is"
        echo "\`tallyd verify\` on the database after the run."
        echo
        echo "| conns | load | accounts | 200/s | of 100k | of the ceiling | p99 ms | of 100k p99 | peak RSS MiB | engine bytes/account | start after stop ms | start after SIGKILL ms | verify s |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for conns in $CONNS; do
            ceiling="$(median noop "$conns" 5)"
            for base in tallyd transfers; do
                for target in "$base" "${base}_1m" "${base}_10m"; do
                    [[ " $TARGETS " == *" $target "* ]] || continue
                    tps="$(median "$target" "$conns" 7)"
                    p99="$(median "$target" "$conns" 9)"
                    echo "| $conns | $base | $(median "$target" "$conns" 22) | $tps | $(ratio "$tps" "$(median "$base" "$conns" 7)") | $(ratio "$tps" "$ceiling") | $p99 | $(ratio "$p99" "$(median "$base" "$conns" 9)") | $(median "$target" "$conns" 10) | $(median "$target" "$conns" 23) | $(median "$target" "$conns" 24) | $(median "$target" "$conns" 25) | $(median "$target" "$conns" 26) |"
                done
            done
        done
    fi
    echo
    echo "## Exact commands"
    echo
    echo '```sh'
    echo "cargo build --release --bins --examples -j $JOBS"
    for target in $TARGETS; do
        echo "$(target_command "$target" | sed "s|$ROOT/||; s|DB|\$WORK/<target>-c<conns>-r<run>.db|")   # $target"
    done
    for target in $TARGETS; do
        read -r script script_args <<<"$(target_script "$target")"
        echo "wrk -t$THREADS -c<conns> -d$DURATION --timeout $WRK_TIMEOUT -s $script http://<listening addr> -- $(target_cards "$target")${script_args:+ $script_args}   # $target, conns: $CONNS"
    done
    echo "sqlite3 \$DB 'SELECT count(*) FROM transactions;'   # before and after the load (journal on the baseline)"
    echo "target/release/tallyd verify --db \$DB"
    echo '```'
    echo
    echo "Whole run: \`DURATION=$DURATION RUNS=$RUNS CONNS=\"$CONNS\" TARGETS=\"$TARGETS\" bench/run.sh\`"
    if [[ -n "${TIGERBEETLE:-}" ]]; then
        echo
        echo "## TigerBeetle beside it (\`$TIGERBEETLE\`)"
        echo
        # Optional and written elsewhere: whatever it prints, as it prints it; its failure does not fail the run.
        bash -c "$TIGERBEETLE" 2>&1 || echo "(\`$TIGERBEETLE\` exited with $?)"
    fi
    echo
    echo "## Every run"
    echo
    echo "| $(head -n1 "$RAW" | sed 's/\t/ | /g') |"
    echo "|$(head -n1 "$RAW" | awk -F'\t' '{ for (i = 1; i <= NF; i++) printf "---|" }')"
    tail -n +2 "$RAW" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
} >"$RESULTS"

log "wrote $RESULTS"
awk '/^\| target/ { show = 1 } show && /^$/ { exit } show' "$RESULTS"
sed -n '/^## tallyd/,/^## Exact/p' "$RESULTS" | sed '$d'
