# tallyd container image.
#
# Two stages: the official Rust image builds the release binary with exactly the command CI builds with
# natively (`cargo build --release --locked`), then only that binary goes into a slim Debian of the same
# release (bookworm), so the glibc it was linked against is the one it runs on.
#
# The seed (users.db.sql) is compiled into the binary: a fresh volume is seeded on the first start.
# See docs/operations.md for what was and was not verified of this file.

ARG RUST_VERSION=1.95
# The two base images. The defaults are the official tags, which `docker build` pulls; CI cannot reach a registry
# and passes local stand-ins made from Debian's packages instead (scripts/ci-container.sh, docs/operations.md):
#   --build-arg BUILD_IMAGE=... --build-arg RUNTIME_IMAGE=...
ARG BUILD_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# The whole (filtered by .dockerignore) work tree: Cargo.lock must be there for --locked.
COPY . .
RUN cargo build --release --locked

FROM ${RUNTIME_IMAGE} AS runtime
# curl is only for HEALTHCHECK: tallyd has no health-check subcommand and the slim image has no HTTP client.
# Versions are not pinned (DL3008): bookworm's security updates replace old versions in the archive, so a pin
# would break the build at the next point release; the base image tag is what fixes the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed, non-root uid/gid so that volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 tallyd \
    && useradd --system --uid 10001 --gid tallyd --home-dir /var/lib/tallyd --shell /usr/sbin/nologin tallyd \
    && mkdir -p /var/lib/tallyd \
    && chown tallyd:tallyd /var/lib/tallyd
COPY --from=build /src/target/release/tallyd /usr/local/bin/tallyd

# Inside the container only: listen on every interface so the published port and other containers reach it.
ENV TALLYD_LISTEN=0.0.0.0:8080 \
    TALLYD_DB=/var/lib/tallyd/users.db
# The SQLite file and its -wal/-shm companions live on this volume; a named volume created from it inherits
# the tallyd ownership set above.
VOLUME ["/var/lib/tallyd"]
WORKDIR /var/lib/tallyd
# Numeric, so that runtimes checking runAsNonRoot can tell it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# The first start applies the 100k-account seed: give it time before failures count.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--max-time", "2", "http://127.0.0.1:8080/healthz"]

# SIGTERM (docker stop) makes tallyd stop accepting, drain its queue, commit and exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tallyd"]
CMD ["serve"]
