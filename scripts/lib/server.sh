# Shared by bench/run.sh and scripts/ci-loadtest.sh (source it): start a server in the background,
# learn its address from its `listening addr=IP:PORT` log line, and stop it the way an operator would.

# start_server LOG CMD...: starts CMD with its stderr in LOG and sets SERVER_PID and SERVER_ADDR.
# Returns 1, after printing LOG, if CMD exits or says nothing within 120 s.
start_server() {
    local server_log="$1" tries
    shift
    NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$@" >/dev/null 2>"$server_log" &
    SERVER_PID=$!
    SERVER_ADDR=""
    for tries in $(seq 1 1200); do
        SERVER_ADDR="$(sed 's/\x1b\[[0-9;]*m//g' "$server_log" | grep -o 'listening addr=[0-9.]*:[0-9]*' | head -n1 | cut -d= -f2 || true)"
        [[ -n "$SERVER_ADDR" ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "no 'listening addr=' line from: $*" >&2
    cat "$server_log" >&2
    return 1
}

# stop_server: SIGTERM (graceful drain), up to 60 s, then SIGKILL. Sets SERVER_EXIT (137 when it
# had to be killed) and clears SERVER_PID.
stop_server() {
    local tries
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for tries in $(seq 1 600); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    SERVER_EXIT=0
    wait "$SERVER_PID" 2>/dev/null || SERVER_EXIT=$?
    SERVER_PID=""
}
