#!/usr/bin/env bash
# The README's first command, as a new user runs it: `tallyd serve` with no argument, in a fresh
# directory, must create users.db from the seed, listen on 127.0.0.1:8080, commit a transaction and
# stop cleanly on SIGTERM. Uses TALLYD_BIN (default: target/release/tallyd).
set -euo pipefail
bin="${TALLYD_BIN:-$PWD/target/release/tallyd}"
dir="$(mktemp -d)"
log="$dir/tallyd.log"
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

cd "$dir"
"$bin" serve 2>"$log" &
pid=$!
for _ in $(seq 1 300); do grep -q "listening addr=127.0.0.1:8080" "$log" && break; sleep 0.1; done
grep -q "listening addr=127.0.0.1:8080" "$log" || { cat "$log"; echo "tallyd did not listen on 127.0.0.1:8080"; exit 1; }

reply=$(curl -sS --max-time 10 -X POST http://127.0.0.1:8080/transaction \
  -H 'content-type: application/json' -d '{"card_number": "1234567890", "amount": 150}')
echo "$reply"
echo "$reply" | grep -q '"balance":100150' || { echo "unexpected reply"; exit 1; }
curl -sS --max-time 10 'http://127.0.0.1:8080/balance?card_number=1234567890' | grep -q '"balance":100150'

kill -TERM "$pid"
wait "$pid"
pid=""
[ -f users.db ] || { echo "no users.db was created"; exit 1; }
"$bin" verify --db users.db
echo "smoke: 1 passed, 0 failed"
