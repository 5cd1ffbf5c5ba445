#!/usr/bin/env bash
# Browser test of tallyd's live page at / (issue 6).
#
#   TALLYD_BIN=target/release/tallyd scripts/ci-browser.sh
#
# Installs Debian's chromium if missing, starts tallyd on a free loopback port with a fresh
# database, and runs scripts/browser/check_dashboard.py: headless chromium (DevTools protocol
# over --remote-debugging-pipe) loads the page while a known mix of transactions flows, and the
# page's DOM, data-* attributes and screenshot pixels are checked against what was sent and
# against /stats. Last line: `N passed, M failed`; exit status non-zero on any failure.
#
# Env: TALLYD_BIN (required), BROWSER_DEPOSITS (1500), BROWSER_WITHDRAWALS (150),
#      BROWSER_DURATION (12 s of traffic), SCREENSHOT_OUT (where to keep the screenshot; set it to
#      docs/dashboard.png to refresh the one in the docs), BROWSER_TIMEOUT (240 s for the whole check).
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${TALLYD_BIN:?set TALLYD_BIN to the tallyd binary}"
TALLYD_BIN="$(cd "$(dirname "$TALLYD_BIN")" && pwd)/$(basename "$TALLYD_BIN")"
[ -x "$TALLYD_BIN" ] || { echo "TALLYD_BIN=$TALLYD_BIN is not an executable" >&2; exit 2; }

tmp="$(mktemp -d /tmp/tallyd-browser.XXXXXX)"
tallyd_pid=""
cleanup() {
  local rc=$?
  if [ -n "$tallyd_pid" ] && kill -0 "$tallyd_pid" 2>/dev/null; then
    kill -TERM "$tallyd_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$tallyd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$tallyd_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ]; then
    echo "--- tallyd stderr (last 30 lines) ---" >&2; tail -n 30 "$tmp/tallyd.log" >&2 2>/dev/null || true
    echo "--- chromium log (last 15 lines) ---" >&2; tail -n 15 "$tmp/chromium.log" >&2 2>/dev/null || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- chromium ------------------------------------------------------------------------------------
if ! command -v chromium >/dev/null 2>&1; then
  echo "# installing chromium from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq >&2
  timeout 900 apt-get install -y -qq chromium >"$tmp/apt.log" 2>&1 || { tail -n 20 "$tmp/apt.log" >&2; exit 1; }
fi
chromium_bin="$(command -v chromium)"

# ---- tallyd ----------------------------------------------------------------------------------------
"$TALLYD_BIN" serve --listen 127.0.0.1:0 --db "$tmp/users.db" 2>"$tmp/tallyd.log" >/dev/null &
tallyd_pid=$!
addr=""
for _ in $(seq 1 300); do   # up to 30 s: the first start loads the 100,001-account seed
  addr="$(grep -o 'listening addr=[0-9.:]*' "$tmp/tallyd.log" 2>/dev/null | head -n1 | sed 's/.*addr=//')" || true
  [ -n "$addr" ] && break
  kill -0 "$tallyd_pid" 2>/dev/null || { echo "tallyd exited before listening" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "tallyd did not print 'listening addr=' within 30 s" >&2; exit 1; }
for _ in $(seq 1 100); do
  python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$addr/healthz', timeout=2)" 2>/dev/null && break
  sleep 0.1
done
echo "# tallyd pid $tallyd_pid listening on $addr" >&2

# ---- the check -----------------------------------------------------------------------------------
shot="${SCREENSHOT_OUT:-$tmp/dashboard.png}"
set +e
timeout -k 10 "${BROWSER_TIMEOUT:-240}" python3 "$here/browser/check_dashboard.py" \
  --url "http://$addr" --pid "$tallyd_pid" --chromium "$chromium_bin" --workdir "$tmp" \
  --deposits "${BROWSER_DEPOSITS:-1500}" --withdrawals "${BROWSER_WITHDRAWALS:-150}" \
  --duration "${BROWSER_DURATION:-12}" --screenshot "$shot"
rc=$?
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "browser check timed out after ${BROWSER_TIMEOUT:-240} s"
  echo "0 passed, 1 failed"
fi
# the check stopped tallyd with SIGTERM; it must have drained and exited 0
if [ -n "$tallyd_pid" ]; then
  for _ in $(seq 1 100); do kill -0 "$tallyd_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$tallyd_pid" 2>/dev/null; then
    echo "# note: tallyd still running after the check" >&2
  else
    wait "$tallyd_pid" 2>/dev/null && trc=0 || trc=$?
    echo "# tallyd exited with status $trc after SIGTERM" >&2
  fi
fi
exit "$rc"
