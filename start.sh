#!/usr/bin/env bash
# Starts CyberBackup on its embedded defaults — the backup server (port 1256, the v4
# repository and the v3 files and SQLite registries under ./data) and the bridge with the browser UI (port 9090) — and
# prints the URL to open. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet -p cyberbackup-server -p cyberbackup-bridge
mkdir -p data
./target/release/cyberbackup-server --bind 127.0.0.1 --port "${CYBERBACKUP_PORT:-1256}" \
  --storage data/received_files --database data/defensive.db --repository data/repository &
server=$!
trap 'kill $server $bridge 2>/dev/null; wait 2>/dev/null' EXIT INT TERM
# The bridge's sign-in token: made once, kept private, so the link below stays valid.
mkdir -p data/bridge
if [ ! -s data/bridge/token ]; then
  (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > data/bridge/token)
fi
./target/release/cyberbackup-bridge --listen "127.0.0.1:${CYBERBACKUP_BRIDGE_PORT:-9090}" \
  --server "127.0.0.1:${CYBERBACKUP_PORT:-1256}" --config-dir data/device \
  --token-file data/bridge/token >/dev/null &
bridge=$!
sleep 1
echo
ok=1
kill -0 "$server" 2>/dev/null || { echo "The backup server did not start (see its messages above)."; ok=0; }
kill -0 "$bridge" 2>/dev/null || { echo "The bridge did not start (see its messages above)."; ok=0; }
[ "$ok" = 1 ] || exit 1
echo "CyberBackup is running. Open this link in your browser (it signs you in):"
echo "  http://127.0.0.1:${CYBERBACKUP_BRIDGE_PORT:-9090}/?token=$(cat data/bridge/token)"
echo "(backup server on 127.0.0.1:${CYBERBACKUP_PORT:-1256}; data in ./data; Ctrl-C stops both)"
wait
