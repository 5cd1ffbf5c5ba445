#!/usr/bin/env bash
# Power-loss suite (issue 7): proves that a 2xx from tallyd survives the machine losing power, and
# that the test would notice if it did not.
#
# 1. Installs fuse3 (FUSE mount helper; lossyfs mounts with mount(2) itself when root) and checks
#    /dev/fuse.
# 2. Builds tools/lossyfs (its own cargo package and target dir) and runs its tests: the
#    filesystem's rules one by one, and SQLite WAL with synchronous FULL (keeps every commit) vs
#    NORMAL (must lose some).
# 3. Runs tools/lossyfs/powerloss.py: tallyd on lossyfs under concurrent load, power cut at a
#    random moment, boot, audit. durability=full must lose 0 acknowledged transactions over
#    POWERLOSS_CYCLES_FULL cycles; durability=normal must lose at least one over
#    POWERLOSS_CYCLES_NORMAL cycles, or the simulator is wrong.
#
# Usage: [TALLYD_BIN=target/release/tallyd] bash scripts/ci-powerloss.sh
#
# Environment:
#   TALLYD_BIN               tallyd binary (default: built here with cargo build --release)
#   POWERLOSS_CYCLES_FULL    cycles with durability=full (default 10; the long suite uses 50)
#   POWERLOSS_CYCLES_NORMAL  cycles with durability=normal (default 3)
#   POWERLOSS_SEED           replay a run (each run prints its seed)
#   POWERLOSS_KEEP_TMP=1     keep the work directory (logs, backing directories)
# Prints "N passed, M failed" last and exits non-zero when any step failed. Needs root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly LOSSYFS_DIR="$ROOT/tools/lossyfs"
readonly CYCLES_FULL="${POWERLOSS_CYCLES_FULL:-10}"
readonly CYCLES_NORMAL="${POWERLOSS_CYCLES_NORMAL:-3}"
readonly STEP_TIMEOUT_S=1200
readonly INSTALL_TIMEOUT_S=900

WORK="$(mktemp -d -t tallyd-powerloss.XXXXXX)"
readonly WORK
PASSED=0
FAILED=0
FAILED_NAMES=()

# The driver ends its own children; this is the backstop for when the driver itself was killed
# (step timeout): it ends the processes the driver recorded in DIR/pids, by pid, and detaches the
# mounts under DIR (lossyfs exits by itself once unmounted).
reap() {
    local dir="$1" pid mnt
    if [[ -f "$dir/pids" ]]; then
        while read -r pid; do
            # Only a process that is still one of ours: its command line names this directory.
            if grep -qF "$dir" "/proc/$pid/cmdline" 2>/dev/null; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$dir/pids"
    fi
    awk -v dir="$dir" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts |
        while read -r mnt; do
            umount -l "$mnt" 2>/dev/null || true
        done
}

cleanup() {
    reap "$WORK/full"
    reap "$WORK/normal"
    if [[ "${POWERLOSS_KEEP_TMP:-0}" == 1 ]]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() {
    local name="$1"
    shift
    echo "=== $name"
    if timeout --kill-after=10 "$STEP_TIMEOUT_S" "$@"; then
        PASSED=$((PASSED + 1))
        echo "--- ok: $name"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "--- FAILED: $name"
    fi
}

if [[ "$(id -u)" != 0 ]]; then
    echo "ci-powerloss.sh needs root (to mount FUSE)" >&2
    exit 2
fi
if ! command -v fusermount3 >/dev/null || ! command -v python3 >/dev/null; then
    echo "=== installing fuse3"
    timeout "$INSTALL_TIMEOUT_S" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout "$INSTALL_TIMEOUT_S" \
        apt-get install -y -qq fuse3 python3 >/dev/null
fi
if [[ ! -c /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
    [[ -c /dev/fuse ]] || mknod -m 0666 /dev/fuse c 10 229
fi

echo "=== building lossyfs"
cargo build --release --locked -j2 --manifest-path "$LOSSYFS_DIR/Cargo.toml"
LOSSYFS_BIN="$LOSSYFS_DIR/target/release/lossyfs"

if [[ -z "${TALLYD_BIN:-}" ]]; then
    echo "=== building tallyd"
    (cd "$ROOT" && cargo build --release --locked -j2 --bin tallyd)
    TALLYD_BIN="$ROOT/target/release/tallyd"
fi
TALLYD_BIN="$(realpath "$TALLYD_BIN")"
[[ -x "$TALLYD_BIN" ]] || { echo "TALLYD_BIN=$TALLYD_BIN is not an executable" >&2; exit 2; }

step "lossyfs tests (filesystem rules; SQLite WAL FULL keeps, NORMAL loses)" \
    cargo test --release --locked -j2 --manifest-path "$LOSSYFS_DIR/Cargo.toml"

SEED_ARGS=()
[[ -n "${POWERLOSS_SEED:-}" ]] && SEED_ARGS=(--seed "$POWERLOSS_SEED")

mkdir -p "$WORK/full" "$WORK/normal"
step "tallyd durability=full: $CYCLES_FULL power cuts under load, 0 acknowledged lost" \
    python3 "$LOSSYFS_DIR/powerloss.py" --tallyd "$TALLYD_BIN" --lossyfs "$LOSSYFS_BIN" \
    --workdir "$WORK/full" --durability full --cycles "$CYCLES_FULL" "${SEED_ARGS[@]}"
reap "$WORK/full"
step "tallyd durability=normal: $CYCLES_NORMAL power cuts under load, losses detected" \
    python3 "$LOSSYFS_DIR/powerloss.py" --tallyd "$TALLYD_BIN" --lossyfs "$LOSSYFS_BIN" \
    --workdir "$WORK/normal" --durability normal --cycles "$CYCLES_NORMAL" --expect-loss \
    "${SEED_ARGS[@]}"
reap "$WORK/normal"

for name in "${FAILED_NAMES[@]}"; do
    echo "failed: $name"
done
echo "$PASSED passed, $FAILED failed"
[[ "$FAILED" == 0 ]]
