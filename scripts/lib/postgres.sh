# shellcheck shell=bash
# A throwaway PostgreSQL cluster for tests: source this file, then `pg_up` and (in an EXIT trap)
# `pg_down`. Nothing is assumed installed or running: pg_up installs Debian's `postgresql` when no
# initdb is found, makes a cluster in a temporary directory owned by the `postgres` user, starts it
# on 127.0.0.1 on a free port with password (SCRAM) authentication and TLS offered (a CA of its own,
# exported as PG_CA), creates the database, and exports PG_URL
# (postgres://tallyd:tallyd@127.0.0.1:PORT/tallyd). The cluster is fsync-on, as
# production is: the tests measure what tallyd really costs.

PG_USER_NAME=tallyd
PG_PASSWORD=tallyd
PG_DATABASE=tallyd

pg_bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ]; then
      echo "$dir"
      return 0
    fi
  done
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  return 1
}

# Installs Debian's postgresql every time (a no-op when it is there), so that a machine with
# nothing installed and one with an older package behave alike; when the registry cannot be
# reached, binaries already on the machine are used.
pg_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "postgres: apt-get install postgresql"
    if ! { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; then
      echo "postgres: the install failed; looking for binaries already here"
    fi
  fi
  pg_bindir >/dev/null || { echo "postgres: no initdb found" >&2; return 1; }
}

pg_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs a PostgreSQL binary as the postgres user (initdb and postgres refuse to run as root).
pg_as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_up() {
  pg_install
  local bin
  bin="$(pg_bindir)"
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
  fi
  PG_WORK="$(mktemp -d -t tallyd-pg.XXXXXX)"
  chmod 755 "$PG_WORK"
  printf '%s\n' "$PG_PASSWORD" >"$PG_WORK/pwfile"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$PG_WORK"
  PG_PORT="$(pg_free_port)"
  pg_as_postgres "$bin/initdb" -D "$PG_WORK/data" -U "$PG_USER_NAME" --pwfile="$PG_WORK/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$PG_WORK/initdb.log" 2>&1 ||
    { cat "$PG_WORK/initdb.log"; return 1; }
  pg_tls "$PG_WORK" || return 1
  # The socket goes in the work directory: /run/postgresql may not exist on a bare machine.
  pg_as_postgres "$bin/pg_ctl" -D "$PG_WORK/data" -l "$PG_WORK/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_WORK -c max_connections=200" start >/dev/null ||
    { cat "$PG_WORK/server.log"; return 1; }
  pg_as_postgres "$bin/createdb" -h "$PG_WORK" -p "$PG_PORT" -U "$PG_USER_NAME" "$PG_DATABASE"
  PG_BIN="$bin"
  PG_CA="$PG_WORK/tls/ca.crt"
  export PG_WORK PG_PORT PG_BIN PG_CA
  export PG_URL="postgres://$PG_USER_NAME:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE"
  echo "postgres: $("$bin/postgres" --version) on 127.0.0.1:$PG_PORT (data in $PG_WORK/data)"
}

# TLS for the cluster: a CA of its own (PG_CA, for clients' PGSSLROOTCERT) and a server certificate
# for 127.0.0.1 signed by it, both valid two days, turned on in postgresql.conf (so that a restart
# keeps it). Plaintext connections are still accepted: sslmode in the URL chooses.
pg_tls() {
  local dir="$1/tls"
  mkdir -p "$dir"
  command -v openssl >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=tallyd test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1 &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
      -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1 &&
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext" &&
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
      -extfile "$dir/server.ext" -out "$dir/server.crt" >/dev/null 2>&1 ||
    { echo "postgres: making the TLS certificates failed" >&2; return 1; }
  chmod 600 "$dir/server.key"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
  chmod 755 "$dir"
  chmod 644 "$dir/ca.crt"
  printf "ssl = on\nssl_cert_file = '%s'\nssl_key_file = '%s'\n" "$dir/server.crt" "$dir/server.key" \
    >>"$1/data/postgresql.conf"
}

# psql against the throwaway cluster, over its socket.
pg_psql() {
  pg_as_postgres "$PG_BIN/psql" -h "$PG_WORK" -p "$PG_PORT" -U "$PG_USER_NAME" -d "$PG_DATABASE" -v ON_ERROR_STOP=1 -qAt "$@"
}

pg_down() {
  if [ -n "${PG_WORK:-}" ] && [ -d "$PG_WORK/data" ]; then
    pg_as_postgres "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_WORK"
  fi
}
