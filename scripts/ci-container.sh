#!/usr/bin/env bash
# Builds tallyd's container image from the repository's own Dockerfile and runs it for real, then brings up the
# compose file's tallyd and Prometheus, with podman (Debian's), on a machine that has no Docker engine and reaches
# no container registry.
#
# Usage: bash scripts/ci-container.sh          (as root; CI=true and no stdin are fine)
#
# What it does, every wait bounded in time (docs/operations.md says what this proves and what it does not):
#   1. installs podman, runc, netavark, aardvark-dns, iptables, debootstrap, curl, shellcheck (Debian) and
#      podman-compose (PyPI, in a venv in the temporary directory); writes a containers.conf of its own (runtime
#      runc, `default_ulimits = []`) and points CONTAINERS_CONF at it, leaving /etc/containers alone;
#   2. makes local stand-ins for the Dockerfile's two base images from Debian's packages: a debootstrap'd bookworm
#      (minbase, slimmed as debian:bookworm-slim is) from the mirror this machine's apt sources name, imported with
#      `podman import`; and on top of it a C toolchain plus this machine's Rust toolchain (the version the
#      Dockerfile names), and a Prometheus from Debian's `prometheus` package for the compose file;
#   3. builds the image from the unmodified Dockerfile (`--build-arg BUILD_IMAGE=... RUNTIME_IMAGE=...`) and
#      reports its size and build time;
#   4. runs it on a named volume (published port on 127.0.0.1), waits for its own HEALTHCHECK, sends transactions
#      from the host, checks uid 10001 and the volume's ownership, stops it with `podman stop` during a burst of
#      transactions (exit 0, every answered transaction kept), runs `tallyd verify` on the volume, starts a second
#      container on the same volume under --network host with TALLYD_LISTEN overridden (the health check must
#      follow the port) and finds the balance kept;
#   5. `podman-compose up` of the compose file's tallyd and prometheus services (Grafana cannot be had here) on
#      the compose network: Prometheus scrapes `tallyd:8080` by service name, sees every committed transaction,
#      and every Grafana dashboard query returns data; then `podman-compose stop` (tallyd exits 0) and down.
# It removes every container, volume, network and temporary directory it made on exit, and the built image; it
# keeps the three stand-in base images (labelled with a hash of their inputs, rebuilt when the inputs change) so
# that a second run skips debootstrap. It prints "N passed, M failed" last and exits non-zero if any check failed.
#
# Environment:
#   CONTAINER_FRESH=1          remove the stand-in images first (the path a new machine takes)
#   CONTAINER_KEEP_STANDINS=0  remove the stand-in images on exit too
#   CONTAINER_KEEP_TMP=1       keep the temporary directory (logs, build output) for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly DASHBOARD="deploy/grafana/dashboards/tallyd.json"
readonly PREFIX="localhost/tallyd-ci"
readonly IMAGE="$PREFIX/tallyd:ci"                 # what this script builds
readonly COMPOSE_IMAGE="localhost/tallyd:local"     # what `image: tallyd:local` in docker-compose.yaml resolves to
readonly PROMETHEUS_STANDIN="$PREFIX/prometheus:debian-bookworm"
readonly VOLUME="tallyd-ci-data"
readonly FIRST="tallyd-ci-first"
readonly SECOND="tallyd-ci-second"
readonly PROJECT="tallyd-ci"                        # compose project name: volumes and network get this prefix
readonly PODMAN_COMPOSE_VERSION="1.6.0"
readonly STANDIN_RECIPE=1                           # bump when the way stand-ins are made changes
readonly DEMO_CARD="1234567890"                     # in the seed compiled into tallyd
readonly BURST_CARD="4000000000000042"
readonly BURST_N=300                                # transactions in flight when `podman stop` comes
readonly COMPOSE_TRANSACTIONS_N=40
readonly INSTALL_TIMEOUT_S=900
readonly DEBOOTSTRAP_TIMEOUT_S=900
readonly STANDIN_BUILD_TIMEOUT_S=900
readonly IMAGE_BUILD_TIMEOUT_S=1200
readonly HEALTHY_TIMEOUT_S=120                      # the seed's 100k accounts are applied on the first start
readonly STOP_TIMEOUT_S=30                          # the compose file's stop_grace_period
readonly PROMETHEUS_WAIT_S=90
readonly SIZE_GOAL_MB=100

TMP="$(mktemp -d -t tallyd-container.XXXXXX)"
readonly TMP
export CONTAINERS_CONF="$TMP/containers.conf"
VENV="$TMP/venv"
COMPOSE_STARTED=0
PASSED=0
FAILED=0
FAILED_NAMES=()
STARTED_AT=$SECONDS

# ---------------------------------------------------------------------------------------------------------
# Harness (as in scripts/ci-ops.sh)

cleanup() {
    local mount
    if command -v podman >/dev/null && [[ -f "$CONTAINERS_CONF" ]]; then
        if (( COMPOSE_STARTED )); then
            compose down -v >"$TMP/compose-down.log" 2>&1 || true
        fi
        timeout 60 podman rm -f -t 5 "$FIRST" "$SECOND" >/dev/null 2>&1 || true
        # Whatever podman-compose left (a failed `up` may leave containers outside `down`'s reach).
        podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r timeout 60 podman rm -f -t 5 \
            >/dev/null 2>&1 || true
        podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f \
            >/dev/null 2>&1 || true
        podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
        podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
        podman rmi "$COMPOSE_IMAGE" "$IMAGE" >/dev/null 2>&1 || true
        if [[ "${CONTAINER_KEEP_STANDINS:-1}" == 0 ]]; then
            podman rmi "$PROMETHEUS_STANDIN" "$(build_standin)" "$(runtime_standin)" >/dev/null 2>&1 || true
        fi
    fi
    # debootstrap mounts /proc and /sys inside its target while it runs: never let rm descend into them.
    while read -r mount; do
        umount -l "$mount" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET | grep -F "$TMP/" | sort -r)
    if [[ "${CONTAINER_KEEP_TMP:-0}" == 1 ]]; then
        echo "kept $TMP"
    else
        rm -rf --one-file-system "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
        sed 's/^/       /' "$log" | tail -n 14
    else
        FAILED=$(( FAILED + 1 ))
        FAILED_NAMES+=("$name")
        echo "FAIL - $name (exit $rc)"
        sed 's/^/       /' "$log" | tail -n 40
    fi
}

fail_because() {
    echo "$1" >&2
    return 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The Rust version the Dockerfile names (ARG RUST_VERSION=1.95), and the stand-in names derived from it.
rust_version() { sed -n 's/^ARG RUST_VERSION=\([0-9.]*\)$/\1/p' "$ROOT/Dockerfile" | head -n 1; }
runtime_standin() { echo "$PREFIX/debian:bookworm-slim"; }
build_standin() { echo "$PREFIX/rust:$(rust_version)-bookworm"; }

# Label of a stand-in image: a hash of everything it was made from (the recipe: the function's own text), so a
# stale one is rebuilt.
standin_label() { podman image inspect --format '{{index .Labels "tallyd.ci.inputs"}}' "$1" 2>/dev/null || true; }
inputs_hash() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# quiet_podman SECONDS ARGS...: `podman ARGS` bounded by SECONDS. Without systemd, podman logs an error for every
# health-check timer it cannot create or remove (none is needed: this script runs the checks itself with
# `podman healthcheck run`): those lines are dropped, every other message is kept.
quiet_podman() {
    local seconds="$1"
    shift
    timeout "$seconds" podman "$@" 2> >(grep -v -e 'unable to get systemd connection' -e 'failed to connect to syslog' >&2)
}

compose() {
    timeout 300 "$VENV/bin/podman-compose" --project-name "$PROJECT" -f "$ROOT/docker-compose.yaml" "$@"
}

# ---------------------------------------------------------------------------------------------------------
# 1. Tools

install_tools() {
    local packages=(podman runc netavark aardvark-dns iptables debootstrap curl shellcheck) missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if (( ${#missing[@]} == 0 )); then
        echo "already installed: ${packages[*]}"
    else
        echo "installing: ${missing[*]}"
        # Another process may hold dpkg's lock for a while: wait for it rather than fail.
        timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 update -q >"$TMP/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive timeout "$INSTALL_TIMEOUT_S" apt-get -o DPkg::Lock::Timeout=300 \
            install -y -q --no-install-recommends "${missing[@]}" >>"$TMP/apt.log" 2>&1 \
            || { tail -n 20 "$TMP/apt.log"; fail_because "apt-get install failed"; }
    fi
    python3 -m venv "$VENV"
    timeout "$INSTALL_TIMEOUT_S" "$VENV/bin/pip" install -q --disable-pip-version-check \
        "podman-compose==$PODMAN_COMPOSE_VERSION"
    # crun fails on this kernel's cgroup layout and setrlimit is refused: runc, and no default ulimits.
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
    podman --version
    runc --version | head -n 1
    "$VENV/bin/podman-compose" --version | head -n 1
    echo "no systemd here: podman cannot schedule health checks, so this script runs them with 'podman healthcheck run'"
    podman info --format 'runtime {{.Host.OCIRuntime.Name}}, storage {{.Store.GraphDriverName}}, network {{.Host.NetworkBackend}}, cgroups {{.Host.CgroupsVersion}}'
}

shell_lint() {
    timeout 60 shellcheck --severity=style "$ROOT/scripts/ci-container.sh"
    echo "shellcheck: no findings"
}

# ---------------------------------------------------------------------------------------------------------
# 2. Stand-ins for the base images

# debian:bookworm-slim: debootstrap --variant=minbase from this machine's mirror, then what the official image's
# build (debuerreotype --slimify) does: no docs but copyright files, no man pages or locales, apt lists dropped.
make_runtime_standin() {
    local mirror security key rootfs="$TMP/rootfs" image
    image="$(runtime_standin)"
    mirror="$(python3 "$ROOT/scripts/container/apt_sources.py" bookworm)"
    security="$(python3 "$ROOT/scripts/container/apt_sources.py" bookworm-security || true)"
    key="$(inputs_hash "$STANDIN_RECIPE" "$mirror" "$security" "$(declare -f make_runtime_standin)")"
    echo "mirror from apt sources: $mirror (security: ${security:-none})"
    if [[ "$(standin_label "$image")" == "$key" ]]; then
        echo "$image is already there, made from the same inputs ($key): reused"
        return 0
    fi
    podman rmi -f "$image" >/dev/null 2>&1 || true
    local started=$SECONDS
    timeout "$DEBOOTSTRAP_TIMEOUT_S" debootstrap --variant=minbase bookworm "$rootfs" "$mirror" \
        >"$TMP/debootstrap.log" 2>&1 || { tail -n 20 "$TMP/debootstrap.log"; fail_because "debootstrap failed"; }
    echo "debootstrap: $(( SECONDS - started ))s, $(du -sm "$rootfs" | cut -f1) MB"
    mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/etc/apt/apt.conf.d"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
        "$rootfs"/etc/apt/sources.list "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    # Sources as the official image has them (deb822, with updates and security), on this machine's mirror.
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [[ -n "$security" ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$security"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"$rootfs/etc/apt/sources.list.d/debian.sources"
    echo "slimmed to $(du -sm "$rootfs" | cut -f1) MB"
    tar --numeric-owner -C "$rootfs" -c . | timeout 300 podman import --quiet \
        --change 'CMD ["bash"]' --change "LABEL tallyd.ci.inputs=$key" - "$image" >/dev/null
    rm -rf --one-file-system "$rootfs"
    echo "$image imported ($key) in $(( SECONDS - started ))s"
}

# rust:<RUST_VERSION>-bookworm: the runtime stand-in plus a C toolchain (the bundled SQLite is C) and this
# machine's Rust toolchain, laid out as the official image does (RUSTUP_HOME=/usr/local/rustup,
# CARGO_HOME=/usr/local/cargo, rustup's proxies on PATH).
make_build_standin() {
    local want have sysroot triple release toolchain rustup_bin ca_bundle key image ctx="$TMP/build-standin"
    image="$(build_standin)"
    want="$(rust_version)"
    [[ -n "$want" ]] || fail_because "no 'ARG RUST_VERSION=' in the Dockerfile"
    have="$(rustc --version)"
    release="$(rustc -vV | sed -n 's/^release: //p')"
    triple="$(rustc -vV | sed -n 's/^host: //p')"
    [[ "$release" == "$want" || "$release" == "$want".* ]] \
        || fail_because "the Dockerfile names Rust $want, this machine has $have"
    sysroot="$(rustc --print sysroot)"
    rustup_bin="$(realpath "$(command -v rustup)")"
    # This machine reaches crates.io through a TLS-inspecting proxy whose CA only its own trust store has: cargo in
    # the build stage needs that store (the mirror for apt is plain HTTP and signed, so the runtime stage does not).
    ca_bundle="$(realpath "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}")"
    [[ -s "$ca_bundle" ]] || fail_because "no CA bundle at $ca_bundle"
    toolchain="$release-$triple"
    key="$(inputs_hash "$STANDIN_RECIPE" "$have" "$(podman image inspect --format '{{.Id}}' "$(runtime_standin)")" \
        "$(sha256sum <"$ca_bundle")" "$(declare -f make_build_standin)")"
    echo "Dockerfile: Rust $want; this machine: $have at $sysroot"
    if [[ "$(standin_label "$image")" == "$key" ]]; then
        echo "$image is already there, made from the same inputs ($key): reused"
        return 0
    fi
    podman rmi -f "$image" >/dev/null 2>&1 || true
    mkdir -p "$ctx"
    cat >"$ctx/Containerfile" <<'EOF'
ARG BASE
FROM ${BASE}
ARG TOOLCHAIN
ARG INPUTS
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p "$RUSTUP_HOME/toolchains/$TOOLCHAIN" "$CARGO_HOME/bin" \
    && tar -C /host/toolchain --exclude=./share/doc -cf - . | tar -C "$RUSTUP_HOME/toolchains/$TOOLCHAIN" -xf - \
    && cp /host/rustup "$CARGO_HOME/bin/rustup" \
    && for proxy in cargo rustc rustdoc; do ln "$CARGO_HOME/bin/rustup" "$CARGO_HOME/bin/$proxy"; done \
    && printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$TOOLCHAIN" \
        >"$RUSTUP_HOME/settings.toml" \
    && chmod -R a+w "$RUSTUP_HOME" "$CARGO_HOME" \
    && cp /host/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt \
    && rustc --version && cargo --version && gcc --version | head -n 1
LABEL tallyd.ci.inputs=${INPUTS}
EOF
    local started=$SECONDS
    timeout "$STANDIN_BUILD_TIMEOUT_S" podman build --pull=never --network host --layers=false \
        --build-arg "BASE=$(runtime_standin)" --build-arg "TOOLCHAIN=$toolchain" --build-arg "INPUTS=$key" \
        -v "$sysroot:/host/toolchain:ro" -v "$rustup_bin:/host/rustup:ro" -v "$ca_bundle:/host/ca-certificates.crt:ro" \
        -t "$image" "$ctx" >"$TMP/build-standin.log" 2>&1 \
        || { tail -n 30 "$TMP/build-standin.log"; fail_because "building $image failed"; }
    grep -E '^(rustc|cargo|gcc) ' "$TMP/build-standin.log" || true
    echo "$image built ($key) in $(( SECONDS - started ))s"
}

# The compose file's Prometheus, from Debian's package (2.42; the compose file's default is prom/prometheus:v3.5.0),
# laid out as the official image is: /prometheus a volume owned by nobody, running as nobody. wget is there for
# the compose file's health check (busybox's wget in the official image).
make_prometheus_standin() {
    local key image="$PROMETHEUS_STANDIN" ctx="$TMP/prometheus-standin"
    key="$(inputs_hash "$STANDIN_RECIPE" "$(podman image inspect --format '{{.Id}}' "$(runtime_standin)")" \
        "$(declare -f make_prometheus_standin)")"
    if [[ "$(standin_label "$image")" == "$key" ]]; then
        echo "$image is already there, made from the same inputs ($key): reused"
        return 0
    fi
    podman rmi -f "$image" >/dev/null 2>&1 || true
    mkdir -p "$ctx"
    cat >"$ctx/Containerfile" <<'EOF'
ARG BASE
FROM ${BASE}
ARG INPUTS
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
LABEL tallyd.ci.inputs=${INPUTS}
EOF
    local started=$SECONDS
    timeout "$STANDIN_BUILD_TIMEOUT_S" podman build --pull=never --network host --layers=false \
        --build-arg "BASE=$(runtime_standin)" --build-arg "INPUTS=$key" -t "$image" "$ctx" \
        >"$TMP/prometheus-standin.log" 2>&1 \
        || { tail -n 30 "$TMP/prometheus-standin.log"; fail_because "building $image failed"; }
    echo "$image built ($key) in $(( SECONDS - started ))s: $(podman run --rm --network none "$image" --version 2>&1 | head -n 1)"
}

# ---------------------------------------------------------------------------------------------------------
# 3. The image, from the repository's Dockerfile

build_image() {
    local started=$SECONDS
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    # --no-cache: every run compiles for real, as a first `docker build` does.
    timeout "$IMAGE_BUILD_TIMEOUT_S" podman build --format docker --pull=never --no-cache --layers=false --network host \
        --build-arg "BUILD_IMAGE=$(build_standin)" --build-arg "RUNTIME_IMAGE=$(runtime_standin)" \
        -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" >"$TMP/build.log" 2>&1 \
        || { tail -n 40 "$TMP/build.log"; fail_because "podman build failed"; }
    echo $(( SECONDS - started )) >"$TMP/build.seconds"
    grep -E 'Finished|Compiling tallyd' "$TMP/build.log" | sed 's/^ *//' || true
    echo "built $IMAGE from Dockerfile in $(cat "$TMP/build.seconds")s"
}

image_facts() {
    local size_mb
    size_mb="$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f", $1 / 1000000}')"
    echo "$size_mb" >"$TMP/image.mb"
    podman image inspect --format 'user {{.Config.User}}, volumes {{.Config.Volumes}}, ports {{.Config.ExposedPorts}}, stop signal {{.Config.StopSignal}}' "$IMAGE"
    podman image inspect --format 'healthcheck {{.Config.Healthcheck.Test}}' "$IMAGE"
    podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110 | head -n 12
    echo "image size: $size_mb MB (goal: under $SIZE_GOAL_MB MB)"
    awk -v s="$size_mb" -v g="$SIZE_GOAL_MB" 'BEGIN { exit !(s < g) }' || fail_because "the image is $size_mb MB"
}

# ---------------------------------------------------------------------------------------------------------
# 4. Running it

# Polls the health check the image defines (`podman healthcheck run` executes it; without systemd, podman has no
# timer to run it periodically) until it passes, and shows the status podman records.
wait_healthy() {
    local name="$1" deadline=$(( SECONDS + HEALTHY_TIMEOUT_S )) started=$SECONDS
    until timeout 10 podman healthcheck run "$name" >/dev/null 2>&1; do
        [[ "$(podman inspect --format '{{.State.Running}}' "$name")" == true ]] \
            || { podman logs --tail 20 "$name"; fail_because "$name is not running"; }
        (( SECONDS < deadline )) || { podman logs --tail 20 "$name";
            fail_because "$name not healthy within ${HEALTHY_TIMEOUT_S}s"; }
        sleep 1
    done
    echo "$name: healthy after $(( SECONDS - started ))s; podman records status" \
        "'$(podman inspect --format '{{.State.Health.Status}}' "$name")'"
    [[ "$(podman inspect --format '{{.State.Health.Status}}' "$name")" == healthy ]] \
        || fail_because "podman inspect does not say healthy"
}

balance_of() {
    curl -fsS --max-time 5 "http://$1/balance?card_number=$2" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["balance"])'
}

post() {
    curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        --data "{\"card_number\":\"$2\",\"amount\":$3}" "http://$1/transaction"
}

start_first() {
    podman volume create "$VOLUME" >/dev/null
    # As docs/operations.md says to run it without compose: a published port on the host's loopback.
    quiet_podman 60 run -d --name "$FIRST" -p "127.0.0.1:$PORT_FIRST:8080" -v "$VOLUME:/var/lib/tallyd" "$IMAGE" >/dev/null
    wait_healthy "$FIRST"
    podman logs "$FIRST" 2>&1 | grep -a -E 'seed|listening' | sed 's/\x1b\[[0-9;]*m//g'
}

first_traffic() {
    local addr="127.0.0.1:$PORT_FIRST" before after code
    before="$(balance_of "$addr" "$DEMO_CARD")"
    code="$(post "$addr" "$DEMO_CARD" 150)"
    [[ "$code" == 200 ]] || fail_because "POST /transaction +150 -> $code"
    code="$(post "$addr" "$DEMO_CARD" -40)"
    [[ "$code" == 200 ]] || fail_because "POST /transaction -40 -> $code"
    code="$(post "$addr" "$DEMO_CARD" -999999999999)"
    [[ "$code" == 422 ]] || fail_because "POST /transaction -999999999999 -> $code, expected 422"
    after="$(balance_of "$addr" "$DEMO_CARD")"
    echo "GET /balance: $before -> $after after +150, -40 and one refused withdrawal"
    (( after == before + 110 )) || fail_because "expected $(( before + 110 ))"
    balance_of "$addr" "$BURST_CARD" >"$TMP/burst.before"
    echo "$after" >"$TMP/demo.balance"
}

process_uid() {
    local pid uids comm
    pid="$(podman inspect --format '{{.State.Pid}}' "$FIRST")"
    comm="$(cat "/proc/$pid/comm")"
    uids="$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")"
    echo "container process $pid ($comm): real/effective/saved/fs uid $uids, gid $(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")"
    podman top "$FIRST" user group pid args
    [[ "$comm" == tallyd ]] || fail_because "the container's process is $comm, not tallyd"
    [[ "$uids" == "10001 10001 10001 10001" ]] || fail_because "expected uid 10001"
}

volume_ownership() {
    local mountpoint
    mountpoint="$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")"
    stat -c '%u:%g %a %n' "$mountpoint" "$mountpoint"/users.db*
    [[ "$(stat -c '%u:%g' "$mountpoint/users.db")" == 10001:10001 ]] || fail_because "users.db is not owned by 10001"
    [[ "$(stat -c '%u:%g' "$mountpoint")" == 10001:10001 ]] || fail_because "the volume is not owned by 10001"
}

# `podman stop` (SIGTERM) while transactions are in flight: exit 0, and later every answered one is kept.
stop_during_burst() {
    local addr="127.0.0.1:$PORT_FIRST" started rc
    seq 1 "$BURST_N" | xargs -P 8 -I{} curl -sS --max-time 10 -o /dev/null -w '%{http_code}\n' \
        -H 'content-type: application/json' --data "{\"card_number\":\"$BURST_CARD\",\"amount\":1}" \
        "http://$addr/transaction" >"$TMP/burst.codes" 2>/dev/null &
    local burst=$!
    sleep 0.5
    started=$SECONDS
    quiet_podman $(( STOP_TIMEOUT_S + 30 )) stop -t "$STOP_TIMEOUT_S" "$FIRST" >/dev/null
    wait "$burst" || true
    rc="$(podman inspect --format '{{.State.ExitCode}}' "$FIRST")"
    grep -c '^200$' "$TMP/burst.codes" >"$TMP/burst.ok" || true
    echo "podman stop: $(( SECONDS - started ))s, exit status $rc;" \
        "burst of $BURST_N: $(cat "$TMP/burst.ok") answered 200 ($(sort "$TMP/burst.codes" | uniq -c | tr '\n' ' '))"
    podman logs --tail 4 "$FIRST" 2>&1 | sed 's/\x1b\[[0-9;]*m//g'
    [[ "$rc" == 0 ]] || fail_because "expected exit status 0 after SIGTERM"
    (( $(cat "$TMP/burst.ok") > 0 )) || fail_because "no transaction of the burst was answered before the stop"
}

verify_volume() {
    quiet_podman 120 run --rm --network none -v "$VOLUME:/var/lib/tallyd" "$IMAGE" verify --db /var/lib/tallyd/users.db
}

# A new container on the same volume, this time under --network host with TALLYD_LISTEN overridden: the image's
# health check must follow the port.
start_second() {
    [[ "$(podman inspect --format '{{.State.Running}}' "$FIRST")" != true ]] \
        || fail_because "$FIRST is still running: no second server on its database"
    quiet_podman 60 run -d --name "$SECOND" --network host -e "TALLYD_LISTEN=127.0.0.1:$PORT_SECOND" \
        -v "$VOLUME:/var/lib/tallyd" "$IMAGE" >/dev/null
    wait_healthy "$SECOND"
    podman logs "$SECOND" 2>&1 | grep -a -E 'seed|listening|open' | sed 's/\x1b\[[0-9;]*m//g'
    if podman logs "$SECOND" 2>&1 | grep -q 'created a new database'; then
        fail_because "the second container seeded a new database instead of opening the volume's"
    fi
}

balance_kept() {
    local addr="127.0.0.1:$PORT_SECOND" demo burst want_burst
    [[ -s "$TMP/burst.ok" && -s "$TMP/demo.balance" ]] || fail_because "the first run left no balances to compare"
    demo="$(balance_of "$addr" "$DEMO_CARD")"
    burst="$(balance_of "$addr" "$BURST_CARD")"
    want_burst=$(( $(cat "$TMP/burst.before") + $(cat "$TMP/burst.ok") ))
    echo "card $DEMO_CARD: $demo (was $(cat "$TMP/demo.balance")); card $BURST_CARD: $burst" \
        "(was $(cat "$TMP/burst.before") + $(cat "$TMP/burst.ok") answered deposits of 1 = $want_burst)"
    (( demo == $(cat "$TMP/demo.balance") )) || fail_because "the demo card's balance was not kept"
    (( burst == want_burst )) || fail_because "the answered deposits of the burst are not all there (or more are)"
}

# The image's way to get a key (README, "Running it in production"): `tallyd keys create` inside the running
# container, on its volume; within a second every API request needs the key, while the health check (/healthz)
# goes on without one.
keys_in_container() {
    local addr="127.0.0.1:$PORT_SECOND" key code deadline=$(( SECONDS + 10 ))
    key="$(quiet_podman 60 exec "$SECOND" tallyd keys create --name ci --scope write)"
    [[ "$key" == tly_* ]] || fail_because "keys create printed '$key'"
    until [[ "$(post "$addr" "$DEMO_CARD" 1)" == 401 ]]; do
        (( SECONDS < deadline )) || fail_because "requests without a key still pass 10 s after the key was created"
        sleep 0.2
    done
    code="$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -H "authorization: Bearer $key" --data "{\"card_number\":\"$DEMO_CARD\",\"amount\":-1}" "http://$addr/transaction")"
    [[ "$code" == 200 ]] || fail_because "POST /transaction with the key -> $code"
    timeout 10 podman healthcheck run "$SECOND" >/dev/null || fail_because "the health check fails once keys exist"
    quiet_podman 60 exec "$SECOND" tallyd keys list | grep -q '^ci ' || fail_because "keys list does not show ci"
    echo "key ci created in the container: without it 401, with it 200; the health check still passes"
}

stop_second() {
    quiet_podman $(( STOP_TIMEOUT_S + 30 )) stop -t "$STOP_TIMEOUT_S" "$SECOND" >/dev/null
    local rc
    rc="$(podman inspect --format '{{.State.ExitCode}}' "$SECOND")"
    echo "exit status $rc"
    [[ "$rc" == 0 ]] || fail_because "expected exit status 0"
}

# ---------------------------------------------------------------------------------------------------------
# 5. Compose

compose_container() {
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
        --filter "label=io.podman.compose.service=$1" --format '{{.Names}}' | head -n 1
}

compose_up() {
    podman tag "$IMAGE" "$COMPOSE_IMAGE"
    # Grafana's image cannot be had here: only the two services. The compose network is the file's default one.
    PROMETHEUS_IMAGE="$PROMETHEUS_STANDIN" TALLYD_PORT="$PORT_COMPOSE_TALLYD" PROMETHEUS_PORT="$PORT_COMPOSE_PROM" \
        compose up -d --no-build tallyd prometheus >"$TMP/compose-up.log" 2>&1 \
        || { tail -n 30 "$TMP/compose-up.log"; fail_because "podman-compose up failed"; }
    podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Image}}  {{.Ports}}  {{.Networks}}'
    wait_healthy "$(compose_container tallyd)"
    wait_healthy "$(compose_container prometheus)"
    # The compose file sets only the timing of tallyd's check: the test must be the image's own.
    echo "tallyd's health test in compose: $(podman inspect --format '{{.Config.Healthcheck.Test}}' "$(compose_container tallyd)")"
    podman inspect --format '{{.Config.Healthcheck.Test}}' "$(compose_container tallyd)" | grep -q '/dev/tcp/' \
        || fail_because "the compose tallyd does not run the image's health check"
}

compose_scrape() {
    local url="http://127.0.0.1:$PORT_COMPOSE_PROM" deadline=$(( SECONDS + PROMETHEUS_WAIT_S ))
    until curl -fsS --max-time 2 "$url/api/v1/targets" >"$TMP/targets.json" 2>/dev/null \
        && grep -q '"health":"up"' "$TMP/targets.json"; do
        (( SECONDS < deadline )) || { head -c 800 "$TMP/targets.json"; echo;
            fail_because "the tallyd target is not up within ${PROMETHEUS_WAIT_S}s"; }
        sleep 1
    done
    python3 - "$TMP/targets.json" <<'EOF'
import json, sys
for t in json.load(open(sys.argv[1]))["data"]["activeTargets"]:
    print("target", t["scrapeUrl"], "job", t["labels"]["job"], "health", t["health"], "last error:", t["lastError"] or "none")
EOF
    grep -q '"scrapeUrl":"http://tallyd:8080/metrics"' "$TMP/targets.json" \
        || fail_because "the target is not tallyd:8080 by service name"
}

# Waits until Prometheus' sum of committed transactions reaches $1.
prometheus_committed_reaches() {
    local want="$1" url="http://127.0.0.1:$PORT_COMPOSE_PROM" value="" deadline=$(( SECONDS + PROMETHEUS_WAIT_S ))
    while :; do
        value="$(curl -fsS --max-time 5 -G "$url/api/v1/query" \
            --data-urlencode 'query=sum(tallyd_transactions_total{outcome="committed"})' \
            | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else "")' \
            || true)"
        if [[ -n "$value" ]] && (( value >= want )); then
            break
        fi
        (( SECONDS < deadline )) || fail_because "Prometheus shows committed = '$value' after ${PROMETHEUS_WAIT_S}s, expected $want"
        sleep 1
    done
    echo "Prometheus (in the compose network): sum(tallyd_transactions_total{outcome=\"committed\"}) = $value"
}

# Two rounds with a scrape between them, so that the dashboard's rate() and histogram_quantile() have an increase
# to work on, not only a first sample.
compose_traffic() {
    local tallyd="127.0.0.1:$PORT_COMPOSE_TALLYD" i code half=$(( COMPOSE_TRANSACTIONS_N / 2 ))
    for (( i = 1; i <= COMPOSE_TRANSACTIONS_N; i++ )); do
        code="$(post "$tallyd" "$(printf '4%015d' $(( (i * 7919) % 100000 + 1 )))" $(( i * 25 )))"
        [[ "$code" == 200 ]] || fail_because "POST /transaction -> $code"
        if (( i == half )); then
            echo "sent $half committing transactions to the compose tallyd"
            prometheus_committed_reaches "$half"
        fi
    done
    [[ "$(post "$tallyd" "4000000000999999" 100)" == 404 ]] || fail_because "an unknown card was not 404"
    [[ "$(post "$tallyd" "$DEMO_CARD" -999999999999)" == 422 ]] || fail_because "an overdraft was not 422"
    echo "sent $(( COMPOSE_TRANSACTIONS_N - half )) more, one 404, one 422"
    prometheus_committed_reaches "$COMPOSE_TRANSACTIONS_N"
}

compose_dashboard() {
    python3 "$ROOT/scripts/lib/ops_checks.py" dashboard-queries "$ROOT/$DASHBOARD" \
        "http://127.0.0.1:$PORT_COMPOSE_PROM" --timeout-s "$PROMETHEUS_WAIT_S"
}

compose_stop() {
    local name rc
    name="$(compose_container tallyd)"
    compose stop >"$TMP/compose-stop.log" 2>&1 || { tail -n 20 "$TMP/compose-stop.log"; fail_because "compose stop failed"; }
    rc="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
    echo "podman-compose stop: $name exited with status $rc"
    [[ "$rc" == 0 ]] || fail_because "expected exit status 0"
}

# ---------------------------------------------------------------------------------------------------------

main() {
    cd "$ROOT"
    echo "ci-container: $ROOT, temporary directory $TMP"
    check "tools: podman, runc, debootstrap, podman-compose; containers.conf (runc, no default ulimits)" install_tools
    if (( FAILED > 0 )); then
        echo "$PASSED passed, $FAILED failed"
        exit 1
    fi
    check "shellcheck scripts/ci-container.sh" shell_lint
    if [[ "${CONTAINER_FRESH:-0}" == 1 ]]; then
        podman rmi -f "$PROMETHEUS_STANDIN" "$(build_standin)" "$(runtime_standin)" >/dev/null 2>&1 || true
        echo "CONTAINER_FRESH=1: removed the stand-in images"
    fi
    PORT_FIRST="$(free_port)"
    PORT_SECOND="$(free_port)"
    PORT_COMPOSE_TALLYD="$(free_port)"
    PORT_COMPOSE_PROM="$(free_port)"

    check "stand-in for debian:bookworm-slim: debootstrap from this machine's mirror, podman import" \
        make_runtime_standin
    check "stand-in for rust:$(rust_version)-bookworm: gcc and this machine's Rust toolchain" make_build_standin
    check "image built from the unmodified Dockerfile with the stand-ins as build arguments" build_image
    if podman image exists "$IMAGE"; then
        check "image size under $SIZE_GOAL_MB MB; USER, VOLUME, EXPOSE, HEALTHCHECK as the Dockerfile says" image_facts
        check "runs on a named volume with a published 127.0.0.1 port; its own HEALTHCHECK reports healthy" start_first
        if [[ "$(podman inspect --format '{{.State.Running}}' "$FIRST" 2>/dev/null)" == true ]]; then
            check "POST /transaction and GET /balance from the host" first_traffic
            check "the process runs as uid 10001" process_uid
            check "the database on the volume is owned by 10001" volume_ownership
            check "podman stop during a burst of transactions: SIGTERM, exit status 0" stop_during_burst
            check "tallyd verify on the stopped volume" verify_volume
            check "a new container on the same volume (--network host, TALLYD_LISTEN=127.0.0.1:$PORT_SECOND) is healthy" \
                start_second
            check "the balances were kept, every answered transaction of the burst included" balance_kept
            check "tallyd keys create in the container turns keys on; the health check needs none" keys_in_container
            check "the second container stops with exit status 0" stop_second
        fi
        check "stand-in for the compose file's Prometheus, from Debian's prometheus package" make_prometheus_standin
        COMPOSE_STARTED=1
        check "podman-compose up tallyd prometheus (PROMETHEUS_IMAGE=stand-in): both healthy" compose_up
        check "Prometheus scrapes tallyd:8080 by service name in the compose network" compose_scrape
        check "Prometheus shows the committed transactions sent to the compose tallyd" compose_traffic
        check "every Grafana dashboard query returns data from the compose Prometheus" compose_dashboard
        check "podman-compose stop: tallyd exits 0" compose_stop
    fi

    echo "image: $(cat "$TMP/image.mb" 2>/dev/null || echo '?') MB; build: $(cat "$TMP/build.seconds" 2>/dev/null || echo '?')s;" \
        "total: $(( SECONDS - STARTED_AT ))s"
    if (( FAILED > 0 )); then
        echo "failed checks:"
        printf '  - %s\n' "${FAILED_NAMES[@]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    (( FAILED == 0 ))
}

main "$@"
