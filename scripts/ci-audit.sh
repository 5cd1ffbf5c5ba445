#!/usr/bin/env bash
# cargo audit of every lock file in the repository (the server's, fuzz/, loadtest/, tools/lossyfs/) against the
# RustSec advisory database: fails on any known vulnerability (and on a yanked crate); unmaintained and unsound
# notices are printed, not failed on.
#
# Usage: bash scripts/ci-audit.sh        (installs cargo-audit from crates.io with `cargo install --locked`)
#
# The advisory database lives on GitHub, which this CI cannot reach (only package registries). So:
#   1. if `cargo audit` can fetch the live database, it is used;
#   2. otherwise the committed snapshot tools/advisory-db/ is used, and this script says so loudly, with the
#      snapshot's date. The snapshot holds the advisories of every crate named in the lock files
#      (scripts/audit/refresh-advisories.sh makes it from an advisory-db checkout); a lock file naming a crate the
#      snapshot did not cover fails the run, so that adding a dependency forces a refresh.
# Prints "N passed, M failed" last and exits non-zero if any check failed.
#
# Environment: CARGO_AUDIT_VERSION (default 0.22.2); AUDIT_OFFLINE=1 skips trying the live database.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly SNAPSHOT="$ROOT/tools/advisory-db"
readonly CARGO_AUDIT_VERSION="${CARGO_AUDIT_VERSION:-0.22.2}"
readonly INSTALL_TIMEOUT_S=1800
PASSED=0
FAILED=0
TMP="$(mktemp -d -t tallyd-audit.XXXXXX)"
readonly TMP
trap 'rm -rf "$TMP"' EXIT

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
        sed 's/^/       /' "$log" | tail -n 20
    else
        FAILED=$(( FAILED + 1 ))
        echo "FAIL - $name (exit $rc)"
        sed 's/^/       /' "$log" | tail -n 60
    fi
}

lock_files() {
    find "$ROOT" -name Cargo.lock -not -path '*/target/*' -not -path '*/bench/out/*' | sort
}

install_audit() {
    if cargo audit --version 2>/dev/null | grep -q "cargo-audit-audit $CARGO_AUDIT_VERSION\|cargo-audit $CARGO_AUDIT_VERSION"; then
        echo "already installed: $(cargo audit --version)"
        return 0
    fi
    timeout "$INSTALL_TIMEOUT_S" cargo install --locked --quiet cargo-audit --version "$CARGO_AUDIT_VERSION"
    cargo audit --version
}

# Which database: the live one if it can be fetched, else the snapshot (said loudly).
choose_database() {
    if [[ "${AUDIT_OFFLINE:-0}" != 1 ]] && timeout 120 cargo audit fetch --db "$TMP/live-db" >"$TMP/fetch.log" 2>&1; then
        echo "$TMP/live-db" >"$TMP/db"
        echo "using the live RustSec advisory database"
        return 0
    fi
    echo "$SNAPSHOT" >"$TMP/db"
    echo "*** the live RustSec advisory database cannot be fetched here (no access beyond package registries):"
    echo "*** auditing against the committed snapshot tools/advisory-db/ instead. $(grep -o 'at commit [0-9a-f]* ([^)]*)' "$SNAPSHOT/README.md")"
    echo "*** advisories published after that date are not seen; refresh with scripts/audit/refresh-advisories.sh"
}

# Every crate of every lock file was covered by the snapshot (only needed when the snapshot is used).
snapshot_covers_the_lock_files() {
    local db missing
    db="$(cat "$TMP/db")"
    if [[ "$db" != "$SNAPSHOT" ]]; then
        echo "the live database covers every crate"
        return 0
    fi
    missing="$(lock_files | xargs sed -n 's/^name = "\(.*\)"$/\1/p' | sort -u | comm -23 - <(sort -u "$SNAPSHOT/covered.txt"))"
    if [[ -n "$missing" ]]; then
        echo "crates in the lock files that tools/advisory-db/ was not made for (run scripts/audit/refresh-advisories.sh):"
        echo "$missing"
        return 1
    fi
    echo "all $(wc -l <"$SNAPSHOT/covered.txt") crate names of the lock files are covered by the snapshot"
}

audit_lock() {
    local lock="$1" db
    db="$(cat "$TMP/db")"
    # --no-fetch: the database chosen above; --stale: a snapshot is old by nature. Warnings (unmaintained, unsound)
    # are shown; vulnerabilities and yanked crates fail.
    cargo audit --no-fetch --stale --db "$db" --file "$lock" --deny yanked
}

echo "ci-audit: $ROOT"
check "cargo-audit $CARGO_AUDIT_VERSION installed (cargo install --locked)" install_audit
check "advisory database chosen" choose_database
check "the advisory snapshot covers every crate of every lock file" snapshot_covers_the_lock_files
while read -r lock; do
    check "cargo audit ${lock#"$ROOT"/}: no known vulnerability" audit_lock "$lock"
done < <(lock_files)

echo
echo "$PASSED passed, $FAILED failed"
(( FAILED == 0 ))
