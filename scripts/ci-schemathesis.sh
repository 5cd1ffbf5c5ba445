#!/usr/bin/env bash
# The API document against a live tallyd: schemathesis fuzzes every operation from the document tallyd
# serves at /openapi.json, and a Python client generated from that document runs the README's curl examples.
#
# Usage: TALLYD_BIN=target/release/tallyd bash scripts/ci-schemathesis.sh
#
# On one tallyd on 127.0.0.1 with a fresh database (the built-in seed), in this order:
#   1. GET /openapi.json is docs/openapi.json byte for byte.
#   2. openapi-python-client generates a client from the served document, with no warning.
#   3. That client runs every curl example of the README's API section (scripts/schemathesis/readme_client.py)
#      and gets the README's statuses and bodies: the server is fresh, so the README's ids and balances hold.
#   4. schemathesis runs every operation through its four phases (the document's examples; coverage of
#      boundaries and of every kind of invalid input; fuzzing, positive and negative; stateful sequences
#      that follow the document's links, e.g. POST /accounts -> POST /transaction -> GET /transactions/{id}),
#      with every check: no 5xx, every status, content type, header and body as documented, invalid data
#      refused, valid data accepted (see scripts/schemathesis/ for the three rules JSON Schema cannot say);
#      then `st fuzz` chains calls across operations for ST_FUZZ_SECONDS with the same checks.
#   5. tallyd drains and exits 0 on SIGTERM, and `tallyd verify` finds every ledger invariant intact after
#      the fuzzing.
# It installs what it needs (python3-venv from Debian if missing; a venv in a temporary directory with the
# pinned schemathesis and openapi-python-client from PyPI), bounds every wait, stops the server it started,
# and prints "N passed, M failed" last; it exits non-zero when any check failed.
#
# Environment:
#   TALLYD_BIN         the tallyd binary (default: cargo build --release --locked, then target/release/tallyd)
#   ST_MAX_EXAMPLES    schemathesis test cases per operation and phase (default 1000)
#   ST_FUZZ_SECONDS    how long `st fuzz` chains calls after the run (default 60)
#   ST_SEED            schemathesis's seed (default fixed, so that a CI failure replays; any integer)
#   ST_VENV            reuse this venv instead of creating one (it must have both tools)
#   ST_KEEP_TMP        set to 1 to keep the temporary directory (logs, client, reports)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly HERE="$ROOT/scripts/schemathesis"
# Pinned: schemathesis's flags and checks change between releases, and a new release may add a check.
readonly SCHEMATHESIS_VERSION="4.32.5"
readonly CLIENT_GENERATOR_VERSION="0.29.1"
readonly MAX_EXAMPLES="${ST_MAX_EXAMPLES:-1000}"
readonly SEED="${ST_SEED:-20261201}"
readonly FUZZ_SECONDS="${ST_FUZZ_SECONDS:-60}"
readonly SCHEMATHESIS_TIMEOUT_S=900   # a hard stop for each command, well past the 135-400 s `st run` takes on 2 cores with 20 operations
readonly INSTALL_TIMEOUT_S=900

# shellcheck source=scripts/lib/server.sh
source "$ROOT/scripts/lib/server.sh"

TMP="$(mktemp -d -t tallyd-schemathesis.XXXXXX)"
VENV="${ST_VENV:-$TMP/venv}"
SERVER_PID=""
PASSED=0
FAILED=0
FAILED_NAMES=()

cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        stop_server
    fi
    if [[ "${ST_KEEP_TMP:-0}" == 1 ]]; then
        echo "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one named check in a subshell with errexit in force, records the verdict, and shows the check's
# output indented (its tail when it passed, more of it when it failed).
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
        sed 's/^/       /' "$log" | tail -n 30
    else
        FAILED=$(( FAILED + 1 ))
        FAILED_NAMES+=("$name")
        echo "FAIL - $name (exit $rc)"
        sed 's/^/       /' "$log" | tail -n 150
    fi
}

install_tools() {
    if [[ -n "${ST_VENV:-}" ]]; then
        echo "reusing $VENV"
    else
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 update -q
            DEBIAN_FRONTEND=noninteractive timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 \
                install -y -q --no-install-recommends python3-venv
        fi
        python3 -m venv "$VENV"
        timeout "$INSTALL_TIMEOUT_S" "$VENV/bin/pip" install -q --disable-pip-version-check \
            "schemathesis==$SCHEMATHESIS_VERSION" "openapi-python-client==$CLIENT_GENERATOR_VERSION"
    fi
    "$VENV/bin/st" --version
    "$VENV/bin/openapi-python-client" --version
}

tallyd_binary() {
    if [[ -z "${TALLYD_BIN:-}" ]]; then
        (cd "$ROOT" && cargo build --release --locked)
        TALLYD_BIN="$ROOT/target/release/tallyd"
    fi
    TALLYD_BIN="$(realpath "$TALLYD_BIN")"
    [[ -x "$TALLYD_BIN" ]] || { echo "TALLYD_BIN=$TALLYD_BIN is not an executable" >&2; exit 2; }
}

served_document_is_the_file() {
    "$VENV/bin/python" - "http://$SERVER_ADDR/openapi.json" "$ROOT/docs/openapi.json" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as response:
    served, media = response.read(), response.headers.get("content-type")
assert media == "application/json", media
assert served == open(sys.argv[2], "rb").read(), "GET /openapi.json differs from docs/openapi.json"
print(f"{len(served)} bytes, {media}")
EOF
}

generate_client() {
    # No post hooks: they would run ruff, which is not installed; with none, any warning is about the document.
    printf 'post_hooks: []\n' >"$TMP/client-config.yaml"
    (cd "$TMP" && timeout 300 "$VENV/bin/openapi-python-client" generate --url "http://$SERVER_ADDR/openapi.json" \
        --config "$TMP/client-config.yaml" --output-path "$TMP/client/tallyd_client" --meta none --fail-on-warning)
    ls "$TMP/client/tallyd_client/api"
}

readme_examples_through_the_client() {
    PYTHONPATH="$TMP/client" timeout 300 "$VENV/bin/python" "$HERE/readme_client.py" \
        "$ROOT/README.md" "$ROOT/docs/openapi.json" "http://$SERVER_ADDR"
}

# st COMMAND LOG ARGS...: runs schemathesis's COMMAND (run, fuzz) on the served document with every check and
# tallyd's configuration and hooks, from the temporary directory and with no example database, so that no earlier
# run changes this one. One worker: with two threads, Hypothesis's concurrent ast.parse trips CPython 3.11's
# "AST constructor recursion depth mismatch" SystemError (python/cpython#106905), a runtime error of the tool.
st() {
    local command="$1" log="$2" started=$SECONDS rc=0
    shift 2
    (cd "$TMP" && SCHEMATHESIS_HOOKS="$HERE/hooks.py" timeout "$SCHEMATHESIS_TIMEOUT_S" "$VENV/bin/st" \
        --config-file "$HERE/schemathesis.toml" --no-color \
        "$command" "http://$SERVER_ADDR/openapi.json" --checks all --mode all --seed "$SEED" --workers 1 \
        --request-timeout 30 --generation-database none --report junit --report-dir "$TMP/report-$command" \
        "$@") >"$log" 2>&1 || rc=$?
    # The whole report when it failed; the summary when it passed.
    if (( rc != 0 )); then
        cat "$log"
    else
        sed -n '/SUMMARY/,$p' "$log"
    fi
    echo "schemathesis $command: $(grep -Eo '[0-9]+ generated.*' "$log" | tail -n 1) in $(( SECONDS - started )) s (seed $SEED)"
    return "$rc"
}

# Every operation through the four phases, a bounded number of cases each.
run_schemathesis() {
    st run "$TMP/schemathesis-run.log" --phases examples,coverage,fuzzing,stateful --max-examples "$MAX_EXAMPLES"
}

# Then chains of calls across operations (along the links, and what it learns from answers) for a fixed time.
fuzz_schemathesis() {
    st fuzz "$TMP/schemathesis-fuzz.log" --max-time "$FUZZ_SECONDS"
}

# After stop_server, which must run in this shell (the server is its child, not a check's subshell's).
stopped_cleanly() {
    [[ "$SERVER_EXIT" == 0 ]] || { echo "tallyd exited $SERVER_EXIT on SIGTERM"; tail -n 20 "$TMP/tallyd.log"; exit 1; }
    echo "exit 0"
}

ledger_verifies() {
    timeout 300 "$TALLYD_BIN" verify --db "$TMP/tallyd.db" | tail -n 12
}

main() {
    cd "$ROOT"
    check "schemathesis $SCHEMATHESIS_VERSION and openapi-python-client $CLIENT_GENERATOR_VERSION installed" install_tools
    tallyd_binary
    if start_server "$TMP/tallyd.log" "$TALLYD_BIN" serve --listen 127.0.0.1:0 --db "$TMP/tallyd.db"; then
        echo "tallyd listens on $SERVER_ADDR"
        check "GET /openapi.json is docs/openapi.json byte for byte" served_document_is_the_file
        check "openapi-python-client generates a client from the served document with no warning" generate_client
        if [[ -d "$TMP/client/tallyd_client" ]]; then
            check "the generated client runs every README curl example and gets its answer" \
                readme_examples_through_the_client
        fi
        check "schemathesis run: every operation, every phase and check, no failure" run_schemathesis
        check "schemathesis fuzz: ${FUZZ_SECONDS} s of multi-step sequences, no failure" fuzz_schemathesis
        stop_server
        check "tallyd drains and exits 0 on SIGTERM after the fuzzing" stopped_cleanly
        check "tallyd verify: every ledger invariant holds after the fuzzing" ledger_verifies
    else
        SERVER_PID=""
        check "tallyd starts" false
    fi

    if (( FAILED > 0 )); then
        echo "failed checks:"
        printf '  - %s\n' "${FAILED_NAMES[@]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    (( FAILED == 0 ))
}

main "$@"
