#!/usr/bin/env bash
# Refreshes tools/advisory-db/: the RustSec advisories of every crate named in the project's lock files, taken
# from a checkout of https://github.com/rustsec/advisory-db (CI cannot reach GitHub, only package registries, so
# scripts/ci-audit.sh audits against this committed snapshot when it cannot fetch the live database).
#
# Usage: bash scripts/audit/refresh-advisories.sh PATH_TO_ADVISORY_DB_CHECKOUT
# Run it when a lock file gains a crate (ci-audit.sh fails until then) and from time to time for new advisories.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SOURCE="${1:?give the path of an advisory-db checkout}"
OUT="$ROOT/tools/advisory-db"
[[ -d "$SOURCE/crates" ]] || { echo "$SOURCE has no crates/ directory" >&2; exit 2; }

# Every crate name in every lock file of the repository.
names="$(find "$ROOT" -name Cargo.lock -not -path '*/target/*' -not -path '*/bench/out/*' -print0 \
    | xargs -0 sed -n 's/^name = "\(.*\)"$/\1/p' | sort -u)"
rm -rf "$OUT"
mkdir -p "$OUT/crates"
copied=0
while read -r name; do
    if [[ -d "$SOURCE/crates/$name" ]]; then
        cp -r "$SOURCE/crates/$name" "$OUT/crates/$name"
        copied=$((copied + 1))
    fi
done <<<"$names"
printf '%s\n' "$names" >"$OUT/covered.txt"
commit="$(git -C "$SOURCE" rev-parse HEAD 2>/dev/null || echo unknown)"
date="$(git -C "$SOURCE" log -1 --format=%cI 2>/dev/null || date -u +%FT%TZ)"
cat >"$OUT/README.md" <<MD
# RustSec advisories for tallyd's dependencies (a filtered snapshot)

Made by \`scripts/audit/refresh-advisories.sh\` from rustsec/advisory-db at commit $commit ($date):
the advisories of the $(wc -l <"$OUT/covered.txt") crates named in the repository's lock files ($copied of them
have any). \`covered.txt\` lists the names; \`scripts/ci-audit.sh\` refuses a lock file naming a crate that is not
in it, so that the snapshot is refreshed whenever a dependency is added. Licence: CC0-1.0 (the advisory database's).
MD
echo "tools/advisory-db: $copied crates with advisories out of $(wc -l <"$OUT/covered.txt"), snapshot $commit ($date)"
