#!/usr/bin/env bash
# bench/tigerbeetle.sh: TigerBeetle's own benchmark on this machine, with the account count and batch sizes
# of tallyd's bulk rows, so the two can stand side by side in bench/RESULTS.md.
#
# Usage: bench/tigerbeetle.sh <tigerbeetle-checkout>
#
# The checkout must be a git clone (TigerBeetle's build.zig runs `git rev-parse` and `git tag`), not an
# archive. The script installs the Zig release the checkout pins (zig/download.sh's ZIG_RELEASE, or
# .zigversion) from PyPI's `ziglang` package into a venv, builds the release binary (`zig build -Drelease`,
# every output under TB_OUT, nothing written into the checkout), then runs
# `tigerbeetle benchmark` once per row and run. The benchmark formats a single-replica data file, starts that
# replica on 127.0.0.1 with a port the OS picks (`--addresses=0`), creates the accounts, sends the transfers
# from one client with one batch in flight, and prints the transfer rate, the batch latency percentiles (1 ms
# buckets, truncated: a batch under 1 ms counts as 0), the replica's peak RSS and the data file's size.
# TigerBeetle writes every block with O_DIRECT|O_DSYNC, its only mode: the counterpart of `--durability full`.
#
# Rows (ROWS, each DIST_BATCH): DIST is uniform (debit and credit accounts uniform), zipf
# (`--account-distribution=zipfian`: YCSB's theta 0.99, shuffled, both sides) or hot (`--account-count-hot=1
# --transfer-hot-percent=100`: every transfer debits one account, credits uniform); BATCH is a number or
# `max`, the largest batch this TigerBeetle sends (its default `--transfer-batch-count`, 8,189 at 52ad553: the
# CLI accepts 8,190 but the replica then panics, the multi-batch trailer takes the last event's room), which
# is what tallyd's 8,190 rows are compared with. Batches under 1,000 send TRANSFERS_SMALL transfers, the
# others TRANSFERS_LARGE.
#
# Per run it records transfers/s ("load accepted"), p50/p99/p100 batch latency, the mean batch latency
# (batch phase duration / batches: one batch in flight, so this is the mean round trip, finer than the
# percentiles), the replica's peak RSS, bytes written per transfer (block output of the whole benchmark
# process tree from /usr/bin/time -v, i.e. the replica's O_DIRECT writes, minus the same figure for a run
# with the same accounts and 1 transfer, over the transfer count), the data file's growth per transfer, and the
# run's CPU share (user + system over wall time, from /usr/bin/time: low when other work takes the cores).
# Medians over RUNS go to TB_RESULTS (markdown, also printed) and TB_TSV (one line per row, for bench/run.sh).
#
# Options (environment):
#   ACCOUNTS=100000          --account-count           RUNS=3             runs per row, median shown
#   TRANSFERS_SMALL=200000   transfers at batch < 1000 TRANSFERS_LARGE=10000000  transfers at larger batches
#   ROWS="uniform_100 zipf_100 hot_100 uniform_max zipf_max hot_max"
#   QUICK=1                  TRANSFERS_SMALL=20000 TRANSFERS_LARGE=200000 RUNS=1, results to bench/out/*-quick.*
#   TB_OUT=bench/out/tigerbeetle  venv, zig caches, binary (raw logs and every run: beside TB_TSV, *-logs/ and *-runs.tsv)
#   ZIG_VENV=$TB_OUT/zig-venv     where `pip install ziglang==<pinned>` goes
#   ZIG_VERSION=<pinned>     override the version read from the checkout
#   TB_RESULTS=bench/out/tigerbeetle.md   TB_TSV=bench/out/tigerbeetle.tsv
#   BENCH_TMP=dir            where the data files go, the disk of tallyd's bench databases (default /tmp;
#                            it must support O_DIRECT, so not tmpfs). One at a time, deleted after its run, but
#                            large: 1.1 GB formatted, growing about 1.8 KB a transfer (19 GB at 10,000,000 at
#                            52ad553); the script refuses to start unless 1.2 GB + 2 KB a transfer of the
#                            largest row is free there (SKIP_DISK_CHECK=1 skips that)
#   RUN_TIMEOUT=600          seconds a benchmark run may take before it is killed (the script then fails)
#   BUILD_TIMEOUT=1800       seconds the build may take      SKIP_BUILD=1  use $TB_OUT/zig-out/bin/tigerbeetle
# Every process it starts runs in its own process group, killed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[tigerbeetle] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 ]] || die "usage: bench/tigerbeetle.sh <tigerbeetle-checkout>"
[[ -d "$1" ]] || die "no such directory: $1"
CHECKOUT="$(cd "$1" && pwd)"
[[ -f "$CHECKOUT/build.zig" && -f "$CHECKOUT/src/tigerbeetle/benchmark_load.zig" ]] ||
    die "$CHECKOUT does not look like a TigerBeetle checkout (no build.zig or src/tigerbeetle/benchmark_load.zig)"
git -C "$CHECKOUT" rev-parse --verify -q HEAD >/dev/null ||
    die "$CHECKOUT is not a git clone; TigerBeetle's build.zig runs git, so clone it (an archive will not build)"

if [[ "${QUICK:-0}" == 1 ]]; then
    TRANSFERS_SMALL="${TRANSFERS_SMALL:-20000}"
    TRANSFERS_LARGE="${TRANSFERS_LARGE:-200000}"
    RUNS="${RUNS:-1}"
    TB_RESULTS="${TB_RESULTS:-$ROOT/bench/out/tigerbeetle-quick.md}"
    TB_TSV="${TB_TSV:-$ROOT/bench/out/tigerbeetle-quick.tsv}"
fi
ACCOUNTS="${ACCOUNTS:-100000}"
TRANSFERS_SMALL="${TRANSFERS_SMALL:-200000}"
TRANSFERS_LARGE="${TRANSFERS_LARGE:-10000000}"
RUNS="${RUNS:-3}"
ROWS="${ROWS:-uniform_100 zipf_100 hot_100 uniform_max zipf_max hot_max}"
TB_OUT="${TB_OUT:-$ROOT/bench/out/tigerbeetle}"
ZIG_VENV="${ZIG_VENV:-$TB_OUT/zig-venv}"
TB_RESULTS="${TB_RESULTS:-$ROOT/bench/out/tigerbeetle.md}"
TB_TSV="${TB_TSV:-$ROOT/bench/out/tigerbeetle.tsv}"
RUN_TIMEOUT="${RUN_TIMEOUT:-600}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-1800}"
TB="$TB_OUT/zig-out/bin/tigerbeetle"
# Raw logs and the per-run TSV are named after TB_TSV, so a QUICK run does not overwrite a full one's.
LOGS="${TB_TSV%.tsv}-logs"
mkdir -p "$TB_OUT" "$LOGS" "$(dirname "$TB_RESULTS")" "$(dirname "$TB_TSV")"

for row in $ROWS; do
    [[ "$row" =~ ^(uniform|zipf|hot)_([0-9]+|max)$ ]] || die "bad row '$row' (DIST_BATCH: uniform|zipf|hot, a number or max)"
done

# --- tools --------------------------------------------------------------------------------------------------
install_debian_package() {
    [[ "$(id -u)" == 0 ]] || die "$2 is missing; install Debian's package '$1' (apt-get install -y $1)"
    log "installing $1 from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}
[[ -x /usr/bin/time ]] || install_debian_package time /usr/bin/time
command -v python3 >/dev/null || install_debian_package python3 python3
python3 -c 'import venv, ensurepip' 2>/dev/null || install_debian_package python3-venv "python3's venv module"

# --- processes ----------------------------------------------------------------------------------------------
WORK="$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/tigerbeetle-bench.XXXXXX")"
CHILD_PID=""
kill_child() {
    [[ -n "$CHILD_PID" ]] || return 0
    # The child leads its own process group (setsid): the build's compilers, or /usr/bin/time, the benchmark
    # and the replica it spawned.
    kill -TERM -- "-$CHILD_PID" 2>/dev/null || kill -TERM "$CHILD_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$CHILD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$CHILD_PID" 2>/dev/null || true
    wait "$CHILD_PID" 2>/dev/null || true
    CHILD_PID=""
}
cleanup() {
    kill_child
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ "${SKIP_DISK_CHECK:-0}" != 1 ]]; then
    most=0
    for row in $ROWS; do
        if [[ "${row##*_}" != max ]] && ((${row##*_} < 1000)); then n="$TRANSFERS_SMALL"; else n="$TRANSFERS_LARGE"; fi
        ((n <= most)) || most="$n"
    done
    need=$((1200000000 + 2000 * most))
    avail="$(df -B1 --output=avail "$WORK" | tail -n1 | tr -d ' ')"
    ((avail >= need)) || die "$WORK has $((avail / 1000000)) MB free; a data file for $most transfers needs about $((need / 1000000)) MB (set BENCH_TMP, lower TRANSFERS_LARGE, or SKIP_DISK_CHECK=1)"
fi

# run_bounded DIR SECONDS STDOUT STDERR CMD...: runs CMD in DIR in a new process group (setsid), output to the
# two files; returns its exit status, or 124 after killing the whole group when it outlives SECONDS.
run_bounded() {
    local dir="$1" limit="$2" out="$3" err="$4"
    shift 4
    # The background subshell is no group leader, so setsid makes a new group without forking: $! is CMD.
    (cd "$dir" && exec setsid "$@" >"$out" 2>"$err" </dev/null) &
    CHILD_PID=$!
    local deadline=$((SECONDS + limit))
    while kill -0 "$CHILD_PID" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "killing after ${limit}s: $*"
            kill_child
            return 124
        fi
        sleep 0.2
    done
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

# --- zig ----------------------------------------------------------------------------------------------------
pinned_zig_version() {
    local version=""
    if [[ -f "$CHECKOUT/zig/download.sh" ]]; then
        version="$(sed -n 's/^ZIG_RELEASE="\{0,1\}\([0-9][0-9.]*\)"\{0,1\}.*/\1/p' "$CHECKOUT/zig/download.sh" | head -n1)"
    fi
    if [[ -z "$version" && -f "$CHECKOUT/.zigversion" ]]; then
        version="$(tr -d ' \n' <"$CHECKOUT/.zigversion")"
    fi
    if [[ -z "$version" && -f "$CHECKOUT/build.zig.zon" ]]; then
        version="$(sed -n 's/.*minimum_zig_version *= *"\([0-9.]*\)".*/\1/p' "$CHECKOUT/build.zig.zon" | head -n1)"
    fi
    echo "$version"
}
ZIG_VERSION="${ZIG_VERSION:-$(pinned_zig_version)}"
[[ -n "$ZIG_VERSION" ]] || die "cannot find the Zig version $CHECKOUT pins (zig/download.sh, .zigversion, build.zig.zon); set ZIG_VERSION"

zig_binary() { "$ZIG_VENV/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))'; }
if [[ -x "$ZIG_VENV/bin/python" ]] && [[ "$("$(zig_binary 2>/dev/null)" version 2>/dev/null || true)" == "$ZIG_VERSION" ]]; then
    log "zig $ZIG_VERSION already in $ZIG_VENV"
else
    log "installing zig $ZIG_VERSION from PyPI (ziglang==$ZIG_VERSION) into $ZIG_VENV"
    rm -rf "$ZIG_VENV"
    python3 -m venv "$ZIG_VENV"
    "$ZIG_VENV/bin/pip" install -q --disable-pip-version-check "ziglang==$ZIG_VERSION" >&2
fi
ZIG="$(zig_binary)"
[[ "$("$ZIG" version)" == "$ZIG_VERSION" ]] || die "$ZIG reports $("$ZIG" version), not $ZIG_VERSION"

# --- build --------------------------------------------------------------------------------------------------
BUILD_CMD=("$ZIG" build -Drelease --prefix "$TB_OUT/zig-out" --cache-dir "$TB_OUT/zig-cache"
    --global-cache-dir "$TB_OUT/zig-global-cache")
BUILD_S="-"
BUILD_CACHE="-"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    if [[ -d "$TB_OUT/zig-cache" ]]; then BUILD_CACHE=warm; else BUILD_CACHE=cold; fi
    log "building TigerBeetle $(git -C "$CHECKOUT" rev-parse --short=9 HEAD) ($BUILD_CACHE cache): (cd $CHECKOUT && ${BUILD_CMD[*]})"
    build_started=$SECONDS
    rc=0
    run_bounded "$CHECKOUT" "$BUILD_TIMEOUT" "$LOGS/build.out" "$LOGS/build.log" "${BUILD_CMD[@]}" || rc=$?
    BUILD_S=$((SECONDS - build_started))
    [[ "$rc" == 0 ]] || { tail -n 30 "$LOGS/build.log" >&2; die "zig build failed (exit $rc): see $LOGS/build.log"; }
    log "built in ${BUILD_S}s"
fi
[[ -x "$TB" ]] || die "missing $TB"
TB_VERSION="$("$TB" version 2>&1 | head -n1)"
TB_COMMIT="$(git -C "$CHECKOUT" rev-parse HEAD)"
TB_DIRTY="$( [[ -z "$(git -C "$CHECKOUT" status --porcelain --untracked-files=no 2>/dev/null)" ]] || echo ' (with uncommitted changes)')"

# --- runs ---------------------------------------------------------------------------------------------------
# field FILE REGEX: the first number after REGEX in FILE, or "-".
field() { awk -v re="$2" '$0 ~ re { sub(re, ""); if (match($0, /[0-9]+(\.[0-9]+)?/)) { print substr($0, RSTART, RLENGTH); found = 1; exit } } END { if (!found) print "-" }' "$1"; }

# The benchmark's flags for a distribution.
dist_flags() {
    case "$1" in
    uniform) echo "--account-distribution=uniform" ;;
    zipf) echo "--account-distribution=zipfian" ;;
    hot) echo "--account-distribution=uniform --account-count-hot=1 --transfer-hot-percent=100" ;;
    esac
}

# bench NAME TRANSFERS BATCH DIST_FLAGS...: one `tigerbeetle benchmark` on a fresh data file; sets B_OUT
# (its stdout) and B_TIME (/usr/bin/time -v's report).
bench() {
    local name="$1" transfers="$2" batch="$3"
    shift 3
    B_OUT="$LOGS/$name.out"
    B_TIME="$LOGS/$name.time"
    local data="$WORK/$name.tigerbeetle"
    rm -f "$data"
    local args=(benchmark --account-count="$ACCOUNTS" --transfer-count="$transfers" --query-count=0 "$@")
    [[ "$batch" == max ]] || args+=(--transfer-batch-count="$batch")
    args+=(--file="$data")
    local rc=0
    run_bounded "$WORK" "$RUN_TIMEOUT" "$B_OUT" "$LOGS/$name.log" /usr/bin/time -v -o "$B_TIME" "$TB" "${args[@]}" || rc=$?
    rm -f "$data"
    if [[ "$rc" != 0 ]] || ! grep -q '^load accepted' "$B_OUT"; then
        tail -n 20 "$LOGS/$name.log" >&2
        die "tigerbeetle ${args[*]} failed (exit $rc): see $LOGS/$name.log"
    fi
}
fs_output_bytes() { awk -F': ' '/File system outputs/ { print $2 * 512 }' "$1"; }

START_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
START_LOAD="$(cut -d' ' -f1-3 /proc/loadavg)"
# What else is using the CPU as the runs start (other builds on the machine skew every figure).
START_BUSY="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 5 { printf "%s%s (%s%%)", sep, $2, $1; sep = ", " }' | head -c 300)"

# The baseline: the same accounts and 1 transfer; its bytes written are subtracted from every run's, and
# its batch size (TigerBeetle's default, the largest it sends) is what `max` means.
log "baseline: $ACCOUNTS accounts, 1 transfer"
bench baseline 1 max --account-distribution=uniform
BASE_BYTES="$(fs_output_bytes "$B_TIME")"
BATCH_MAX="$(field "$B_OUT" 'transfer batch size =')"
[[ "$BATCH_MAX" =~ ^[0-9]+$ ]] || die "no 'transfer batch size' in $B_OUT"
log "baseline wrote $BASE_BYTES bytes (format + accounts); largest batch $BATCH_MAX"

RAW="${TB_TSV%.tsv}-runs.tsv"
printf 'row\trun\tdistribution\tbatch\ttransfers\ttransfers_per_s\tp50_ms\tp99_ms\tp100_ms\tmean_batch_ms\trss_mib\tbytes_per_transfer\tdatafile_growth_per_transfer\twall_s\tcpu_pct\n' >"$RAW"
for run in $(seq 1 "$RUNS"); do
    for row in $ROWS; do
        dist="${row%_*}"
        batch="${row##*_}"
        size="$batch"
        [[ "$batch" != max ]] || size="$BATCH_MAX"
        ((size <= BATCH_MAX)) || die "row $row: batch $size is over TigerBeetle's largest, $BATCH_MAX"
        if ((size < 1000)); then transfers="$TRANSFERS_SMALL"; else transfers="$TRANSFERS_LARGE"; fi
        # shellcheck disable=SC2046 # dist_flags is a list of words
        bench "$row-r$run" "$transfers" "$size" $(dist_flags "$dist")
        awk -v OFS='\t' -v row="$row" -v run="$run" -v dist="$dist" -v batch="$size" -v n="$transfers" \
            -v tps="$(field "$B_OUT" '^load accepted =')" -v p50="$(field "$B_OUT" 'batch latency p50 *=')" \
            -v p99="$(field "$B_OUT" 'batch latency p99 *=')" -v p100="$(field "$B_OUT" 'batch latency p100 *=')" \
            -v batches="$(awk '/ batches in / { print $1; exit }' "$B_OUT")" -v secs="$(field "$B_OUT" '^[0-9]+ batches in')" \
            -v rss="$(field "$B_OUT" '^rss =')" -v written="$(fs_output_bytes "$B_TIME")" -v base="$BASE_BYTES" \
            -v empty="$(field "$B_OUT" '^datafile empty =')" -v full="$(field "$B_OUT" '^datafile =')" \
            -v wall="$(awk -F': ' '/Elapsed/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$B_TIME")" \
            -v cpu="$(awk -F': ' '/User time|System time/ { s += $2 } END { print s }' "$B_TIME")" '
            function num(x) { return x != "-" && x != "" }
            BEGIN {
                print row, run, dist, batch, n, tps, p50, p99, p100,
                    (num(batches) && batches > 0) ? sprintf("%.2f", secs * 1000 / batches) : "-",
                    num(rss) ? sprintf("%.0f", rss / 1048576) : "-",
                    num(written) ? sprintf("%.0f", (written - base) / n) : "-",
                    (num(empty) && num(full)) ? sprintf("%.0f", (full - empty) / n) : "-", wall,
                    (num(wall) && wall > 0) ? sprintf("%.0f", cpu * 100 / wall) : "-"
            }' >>"$RAW"
        log "$(tail -n1 "$RAW" | awk -F'\t' '{ printf "%-11s run %s: %s transfers in batches of %s: %s/s, p50 %s ms, p99 %s ms, mean %s ms, RSS %s MiB, %s B written/transfer, CPU %s%%", $1, $2, $5, $4, $6, $7, $8, $10, $11, $12, $15 }')"
    done
done

# --- summary ------------------------------------------------------------------------------------------------
# median ROW COLUMN: the median of one column of $RAW over the runs ("-" when it has no numbers).
median() {
    awk -F'\t' -v r="$1" -v col="$2" 'NR > 1 && $1 == r && $col != "-" { print $col }' "$RAW" |
        sort -g | awk '{ v[NR] = $1; if ($1 !~ /^-?[0-9]+$/) decimals = 1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) { print v[(NR + 1) / 2]; exit }
            printf(decimals ? "%.2f\n" : "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2)
        }'
}
first() { awk -F'\t' -v r="$1" -v col="$2" 'NR > 1 && $1 == r { print $col; exit }' "$RAW"; }

disk_of() {
    local source fstype device rota
    read -r source fstype < <(df --output=source,fstype "$1" | tail -n1)
    device="$(lsblk -no PKNAME "$source" 2>/dev/null | head -n1 || true)"
    [[ -n "$device" ]] || device="$(basename "$source")"
    rota="$(cat "/sys/block/$device/queue/rotational" 2>/dev/null || echo '?')"
    echo "$source ($fstype, rotational=$rota)"
}

{
    printf 'row\ttransfers_per_s\tp50_ms\tp99_ms\trss_mib\tbytes_per_transfer\tdistribution\tbatch\ttransfers\tmean_batch_ms\tdatafile_growth_per_transfer\truns\tcpu_pct\n'
    for row in $ROWS; do
        printf 'tigerbeetle_%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$(median "$row" 6)" "$(median "$row" 7)" \
            "$(median "$row" 8)" "$(median "$row" 11)" "$(median "$row" 12)" "$(first "$row" 3)" "$(first "$row" 4)" \
            "$(first "$row" 5)" "$(median "$row" 10)" "$(median "$row" 13)" "$RUNS" "$(median "$row" 15)"
    done
} >"$TB_TSV"

{
    echo "# TigerBeetle's benchmark beside tallyd's bulk rows"
    echo
    echo "Generated by \`bench/tigerbeetle.sh\`."
    echo
    echo "- Date: $START_DATE"
    echo "- TigerBeetle: $TB_COMMIT$TB_DIRTY (\`$TB_VERSION\`), built with Zig $ZIG_VERSION from PyPI (\`ziglang==$ZIG_VERSION\`)$( [[ "$BUILD_S" == - ]] || echo ", build ${BUILD_S} s ($BUILD_CACHE cache)")"
    echo "- Machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory, Linux $(uname -r)"
    echo "- Disk holding the data files: $(disk_of "$WORK")"
    echo "- Load average (1, 5, 15 min) before the runs: $START_LOAD; after: $(cut -d' ' -f1-3 /proc/loadavg); busy at the start: ${START_BUSY:-nothing over 5%}"
    echo "- Each run: \`tigerbeetle benchmark\` formats a fresh single-replica data file, starts the replica on 127.0.0.1 and drives it from one client in the same process tree on the same cores, one batch in flight; $ACCOUNTS accounts; $RUNS run(s) per row, median shown"
    echo
    echo "| row | distribution | batch | transfers | transfers/s | p50 ms | p99 ms | mean batch ms | replica peak RSS MiB | bytes written/transfer | data file growth/transfer | CPU % |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for row in $ROWS; do
        echo "| tigerbeetle_$row | $(first "$row" 3) | $(first "$row" 4) | $(first "$row" 5) | $(median "$row" 6) | $(median "$row" 7) | $(median "$row" 8) | $(median "$row" 10) | $(median "$row" 11) | $(median "$row" 12) | $(median "$row" 13) | $(median "$row" 15) |"
    done
    echo
    echo "Latency percentiles are TigerBeetle's (1 ms buckets, truncated: under 1 ms reads 0); mean batch ms is the"
    echo "batch phase's duration over its batches. RSS is the replica's (TigerBeetle allocates its memory at start-up,"
    echo "1 GiB of it the default grid cache). Bytes written is the benchmark's block output (/usr/bin/time -v, the"
    echo "replica's O_DIRECT|O_DSYNC writes) minus that of a run with the same accounts and 1 transfer ($BASE_BYTES bytes:"
    echo "format and accounts), over the transfer count. \`max\` is the largest batch this TigerBeetle sends ($BATCH_MAX), the"
    echo "counterpart of tallyd's 8,190 rows. hot debits one account on every transfer (tallyd's credits one: the same"
    echo "single-account contention); zipf is TigerBeetle's shuffled zipfian (theta 0.99) on both sides (tallyd's s = 1.0)."
    echo "CPU % is the user + system time of the whole run (replica and client, from format to exit) over its wall time:"
    echo "about 100% or more when the replica has a core to itself, less when other work on the machine takes it."
    echo
    echo "## Exact commands"
    echo
    echo '```sh'
    echo "python3 -m venv \$ZIG_VENV && \$ZIG_VENV/bin/pip install ziglang==$ZIG_VERSION"
    echo "cd <tigerbeetle checkout> && \$ZIG_VENV/lib/python3*/site-packages/ziglang/zig build -Drelease --prefix \$TB_OUT/zig-out --cache-dir \$TB_OUT/zig-cache --global-cache-dir \$TB_OUT/zig-global-cache"
    echo "tigerbeetle benchmark --account-count=$ACCOUNTS --transfer-count=1 --query-count=0 --account-distribution=uniform --file=\$BENCH_TMP/baseline.tigerbeetle   # baseline"
    for row in $ROWS; do
        echo "tigerbeetle benchmark --account-count=$ACCOUNTS --transfer-count=$(first "$row" 5) --query-count=0 $(dist_flags "${row%_*}") --transfer-batch-count=$(first "$row" 4) --file=\$BENCH_TMP/$row.tigerbeetle   # $row"
    done
    echo '```'
    echo
    echo "Each under \`/usr/bin/time -v\`. Whole run: \`ACCOUNTS=$ACCOUNTS TRANSFERS_SMALL=$TRANSFERS_SMALL TRANSFERS_LARGE=$TRANSFERS_LARGE RUNS=$RUNS ROWS=\"$ROWS\" bench/tigerbeetle.sh <checkout>\`"
    echo
    echo "## Every run"
    echo
    echo "| $(head -n1 "$RAW" | sed 's/\t/ | /g') |"
    echo "|$(head -n1 "$RAW" | awk -F'\t' '{ for (i = 1; i <= NF; i++) printf "---|" }')"
    tail -n +2 "$RAW" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
} >"$TB_RESULTS"

log "wrote $TB_RESULTS and $TB_TSV (every run: $RAW, logs: $LOGS)"
cat "$TB_RESULTS"
