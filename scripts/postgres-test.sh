#!/usr/bin/env bash
# Starts a throwaway PostgreSQL (Debian's, any version the machine has; CI installs 15)
# for the test suite on 127.0.0.1:${PGTEST_PORT:-54329}, its data in
# ${PGTEST_DIR:-/tmp/cyberbackup-pgtest} (run as the system user `postgres` when called
# by root, else as the caller), and prints the URL the tests take from
# CYBERBACKUP_TEST_POSTGRES. Run again, it reuses a running one; the tests run it
# themselves when that variable is not set, and leave the server running for the next
# run (stop it with `bash scripts/postgres-test.sh stop`).
#
# The cluster runs with fsync off: it holds only the suite's scratch schemas, and the
# suite tests the registry's logic against the real engine, not the disk's durability.
# It takes TLS too (ssl = on), with a certificate for 127.0.0.1 signed by a test CA it
# makes in its directory: tls/ca.crt (and tls/other-ca.crt, a CA that signed nothing),
# so the tests can connect with sslmode=verify-full.
#
#   export CYBERBACKUP_TEST_POSTGRES=$(bash scripts/postgres-test.sh)
#   bash scripts/postgres-test.sh stop
set -euo pipefail
port=${PGTEST_PORT:-54329}
dir=${PGTEST_DIR:-/tmp/cyberbackup-pgtest}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ]; then
  echo "postgres-test: no PostgreSQL server (apt-get install postgresql)" >&2
  exit 1
fi
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "${1:-}" = stop ] || [ "${1:-}" = purge ]; then
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
  fi
  # purge: its data removed too.
  [ "$1" = purge ] && rm -rf "$dir" "$dir.lock"
  exit 0
fi
# Test binaries run in parallel: one start at a time.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
  fi
  tls=$dir/tls
  if [ ! -f "$tls/server.crt" ]; then
    mkdir -p "$tls"
    ca() { # name, subject
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$tls/$1.key" -out "$tls/$1.crt" 2>/dev/null
    }
    ca ca "cyberbackup test CA"
    ca other-ca "cyberbackup test CA that signed nothing"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
      -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "extendedKeyUsage=serverAuth" >"$tls/server.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
      -CAcreateserial -days 3650 -extfile "$tls/server.ext" -out "$tls/server.crt" 2>/dev/null
    [ "$(id -u)" = 0 ] && chown -R postgres: "$tls"
    chmod 600 "$tls/server.key"
  fi
  # The server must not hold the lock (fd 9) for its lifetime.
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 9>&- \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key" \
    start >/dev/null
fi
echo "postgres://postgres@127.0.0.1:$port/postgres"
