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
# The release profile keeps line tables (backtraces with file:line); they are most of the binary's 59 MB. Even
# compressed (zlib) they were 22 MB, which took the image to 100 MB with holds and bulk transfers, so the image
# strips them: 10 MB. Symbols stay, so a backtrace still names every function, without file:line; the binary
# `cargo build --release` makes outside the image keeps its line tables.
# A RUN of its own (DL3059) so that the cargo RUN stays exactly CI's command, which scripts/ci-ops.sh checks.
# hadolint ignore=DL3059
RUN objcopy --strip-debug target/release/tallyd

FROM ${RUNTIME_IMAGE} AS runtime
# Nothing is installed: the HEALTHCHECK below speaks HTTP with bash's /dev/tcp, so the image needs no HTTP client
# (curl and its libraries were 15 MB of a 132 MB image) and this stage needs no package mirror.
# A fixed, non-root uid/gid so that volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 tallyd \
    && useradd --system --uid 10001 --gid tallyd --home-dir /var/lib/tallyd --shell /usr/sbin/nologin tallyd \
    && mkdir -p /var/lib/tallyd \
    && chown tallyd:tallyd /var/lib/tallyd
COPY --from=build /src/target/release/tallyd /usr/local/bin/tallyd

# Inside the container only: listen on every interface so the published port and other containers reach it.
# TALLYD_ALLOW_UNAUTHENTICATED: a container must listen on 0.0.0.0, and tallyd refuses a non-loopback address with
# no API key unless told otherwise; this keeps `docker run` working out of the box, as before keys existed, and
# tallyd logs a warning at every start while the database holds no key. The first key created in the volume
# (`docker exec CONTAINER tallyd keys create --name NAME --scope write`) turns authentication on within a
# second, for good: from then on every request but /healthz and /readyz needs a key. Set it to false to make a
# keyless start fail instead. See README, "Running it in production".
ENV TALLYD_LISTEN=0.0.0.0:8080 \
    TALLYD_DB=/var/lib/tallyd/users.db \
    TALLYD_ALLOW_UNAUTHENTICATED=true
# The SQLite file and its -wal/-shm companions live on this volume; a named volume created from it inherits
# the tallyd ownership set above.
VOLUME ["/var/lib/tallyd"]
WORKDIR /var/lib/tallyd
# Numeric, so that runtimes checking runAsNonRoot can tell it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# The first start applies the 100k-account seed: give it time before failures count.
# The port is taken from TALLYD_LISTEN when the check runs, so that it follows `-e TALLYD_LISTEN=0.0.0.0:9000` (or
# 127.0.0.1:PORT under --network host) instead of calling a healthy server unhealthy; it connects to 127.0.0.1, so
# TALLYD_LISTEN must bind 0.0.0.0 or 127.0.0.1. Healthy: the status line of GET /healthz says 200 within 2 s.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${TALLYD_LISTEN##*:}\" && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 2 _ status _ <&3 && [ \"$status\" = 200 ]"]

# SIGTERM (docker stop) makes tallyd stop accepting, drain its queue, commit and exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tallyd"]
CMD ["serve"]
