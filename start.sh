#!/usr/bin/env bash
# Starts CyberBackup on its embedded defaults — the backup server (port 1256, the v4
# repository and the v3 files and SQLite registries under ./data; metrics and health on
# 127.0.0.1:9256) and the bridge with the browser UI (port 9090) — and prints the link
# to open. Ctrl-C stops both, each with one SIGTERM (the server drains), and says how
# each one ended.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet -p cyberbackup-server -p cyberbackup-bridge
mkdir -p data/bridge
# Job control: each part runs in its own process group, so Ctrl-C reaches this script
# alone, and the parts get exactly one signal each, from stop() below.
set -m
server=
bridge=
stop() {
  trap - INT TERM EXIT
  set +e
  [ -n "$bridge" ] && kill -TERM "$bridge" 2>/dev/null
  [ -n "$server" ] && kill -TERM "$server" 2>/dev/null
  if [ -n "$server" ]; then
    wait "$server"
    code=$?
    case $code in
      0) echo "backup server: stopped cleanly" ;;
      143) echo "backup server: stopped" ;;
      *) echo "backup server: exited with code $code (see its messages above)" ;;
    esac
  fi
  if [ -n "$bridge" ]; then
    wait "$bridge"
    code=$?
    case $code in
      0 | 143) echo "bridge: stopped" ;;
      *) echo "bridge: exited with code $code (see its messages above)" ;;
    esac
  fi
}
trap 'stop; exit 130' INT TERM
trap stop EXIT

# Waits up to 60 s for a line matching $2 in file $1 while process $3 lives.
wait_for() {
  for _ in $(seq 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

./target/release/cyberbackup-server --bind 127.0.0.1 --port "${CYBERBACKUP_PORT:-1256}" \
  --storage data/received_files --database data/defensive.db --repository data/repository \
  >data/server.out &
server=$!
# The bridge's sign-in token: made once, kept private, so the link below stays valid.
if [ ! -s data/bridge/token ]; then
  (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > data/bridge/token)
fi
./target/release/cyberbackup-bridge --listen "127.0.0.1:${CYBERBACKUP_BRIDGE_PORT:-9090}" \
  --server "127.0.0.1:${CYBERBACKUP_PORT:-1256}" --config-dir data/device \
  --token-file data/bridge/token >data/bridge.out &
bridge=$!
echo
ok=1
if ! wait_for data/server.out "listening on" "$server"; then
  echo "The backup server did not start (see its messages above)."
  ok=0
fi
if ! wait_for data/bridge.out "listening on" "$bridge"; then
  echo "The bridge did not start (see its messages above)."
  ok=0
fi
[ "$ok" = 1 ] || exit 1
echo "CyberBackup is running. Open this link in your browser (it signs you in):"
echo "  http://127.0.0.1:${CYBERBACKUP_BRIDGE_PORT:-9090}/?token=$(cat data/bridge/token)"
echo "(backup server on 127.0.0.1:${CYBERBACKUP_PORT:-1256}, $(sed -n 's/^cyberbackup-server admin on \(.*\)/metrics at \1metrics/p' data/server.out);"
echo " data in ./data; Ctrl-C stops both)"
# Returns when either part ends; the EXIT trap stops the other and reports both.
wait -n "$server" "$bridge" || true
