#!/usr/bin/env bash
# Starts a throwaway Garage cluster for the test suite: three nodes on 127.0.0.1
# (S3 API on ports 39100, 39110, 39120; RPC on 39101, 39111, 39121), replication
# factor 3, data and metadata synced (data_fsync, metadata_fsync), their data in
# ${GARAGETEST_DIR:-/tmp/cyberbackup-garagetest}; makes a key and a bucket, and prints
# the line the tests take from CYBERBACKUP_TEST_S3:
#   ENDPOINT BUCKET REGION KEY_ID SECRET
# Run again, it reuses a running cluster (and the objects earlier runs left: `purge`
# stops it and removes them). `stop` stops it; `stop-node N` stops node N (0-2) alone,
# `start-node N` starts it again (for the tests of a node down).
#
# Garage comes from crates.io (`cargo install garage --locked`, about 25 minutes on
# two cores); .ci/run installs it when it is missing.
set -euo pipefail
dir=${GARAGETEST_DIR:-/tmp/cyberbackup-garagetest}
garage=$(command -v garage || echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage")
if [ ! -x "$garage" ]; then
  echo "garage-test: no garage binary (cargo install garage --locked)" >&2
  exit 1
fi
secret_rpc=5f1d0c0d5f1d0c0d5f1d0c0d5f1d0c0d5f1d0c0d5f1d0c0d5f1d0c0d5f1d0c0d
key_id=GK5f1d0c0de5f1d0c0de5f1d0c
key_secret=c0de5f1d0c0de5f1d0c0de5f1d0c0de5f1d0c0de5f1d0c0de5f1d0c0de5f1d0c
bucket=cyberbackup-test
s3port() { echo $((39100 + 10 * $1)); }
rpcport() { echo $((39101 + 10 * $1)); }
g() { "$garage" -c "$dir/n0/garage.toml" "$@"; }

running() { [ -f "$dir/n$1/pid" ] && kill -0 "$(cat "$dir/n$1/pid")" 2>/dev/null; }

start_node() {
  local i=$1
  mkdir -p "$dir/n$i"
  cat >"$dir/n$i/garage.toml" <<TOML
metadata_dir = "$dir/n$i/meta"
data_dir = "$dir/n$i/data"
db_engine = "lmdb"
lmdb_map_size = "4G"
# The blobs are ciphertext: compressing them only costs CPU.
compression_level = "none"
replication_factor = 3
consistency_mode = "consistent"
metadata_fsync = true
data_fsync = true
rpc_bind_addr = "127.0.0.1:$(rpcport "$i")"
rpc_public_addr = "127.0.0.1:$(rpcport "$i")"
rpc_secret = "$secret_rpc"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$(s3port "$i")"
root_domain = ".s3.garage.localhost"
TOML
  running "$i" && return 0
  # The daemon must not hold the script's lock (fd 9).
  RUST_LOG=warn setsid "$garage" -c "$dir/n$i/garage.toml" server >"$dir/n$i/log" 2>&1 9>&- </dev/null &
  echo $! >"$dir/n$i/pid"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$(s3port "$i")") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "garage-test: node $i did not start; its log:" >&2
  tail -20 "$dir/n$i/log" >&2
  exit 1
}

stop_node() {
  if running "$1"; then
    kill "$(cat "$dir/n$1/pid")"
    for _ in $(seq 50); do running "$1" || break; sleep 0.1; done
  fi
  rm -f "$dir/n$1/pid"
}

case "${1:-}" in
  stop) for i in 0 1 2; do stop_node "$i"; done; exit 0 ;;
  # Stopped, and its data (every test's objects) removed.
  purge) for i in 0 1 2; do stop_node "$i"; done; rm -rf "$dir" "$dir.lock"; exit 0 ;;
  stop-node) stop_node "$2"; exit 0 ;;
  start-node) start_node "$2"; exit 0 ;;
esac

mkdir -p "$dir"
exec 9>"$dir.lock"
flock 9
for i in 0 1 2; do start_node "$i"; done
# The cluster's layout, key and bucket, once. A node that has just started may not
# answer its RPC yet ("No handler"), so the whole is tried again until the bucket
# answers; each step may already be done by an earlier try, and is let fail then.
configure() {
  local ids=() i
  for i in 0 1 2; do
    ids+=("$("$garage" -c "$dir/n$i/garage.toml" node id -q)") || return 1
  done
  for i in 1 2; do g node connect "${ids[$i]}" >/dev/null || return 1; done
  for i in 0 1 2; do g layout assign -z dc1 -c 1G "${ids[$i]%@*}" >/dev/null || return 1; done
  g layout apply --version 1 >/dev/null || true
  g key import --yes -n cyberbackup-test "$key_id" "$key_secret" >/dev/null || true
  g bucket create "$bucket" >/dev/null || true
  g bucket allow --read --write --owner "$bucket" --key "$key_id" >/dev/null &&
    g bucket info "$bucket" >/dev/null
}
if [ ! -f "$dir/configured" ]; then
  for _ in $(seq 30); do
    if configure 2>"$dir/configure.log"; then
      touch "$dir/configured"
      break
    fi
    sleep 1
  done
  if [ ! -f "$dir/configured" ]; then
    echo "garage-test: the cluster could not be configured:" >&2
    cat "$dir/configure.log" >&2
    exit 1
  fi
fi
echo "http://127.0.0.1:$(s3port 0) $bucket garage $key_id $key_secret"
