#!/usr/bin/env bash
# Runs one load-generator scenario against a freshly started release server and prints
# the generator's report plus the server's CPU time during the run.
#
#   benches/scripts/load.sh RUNTIME [loadgen options...]
#   benches/scripts/load.sh glommio -c 64 --size 1MiB -d 10
#   benches/scripts/load.sh mio -c 64 --size 4KiB -d 10
#
# The server runs in a temporary directory on 127.0.0.1 with --runtime RUNTIME; its
# CPU seconds come from /proc/PID/stat (utime + stime) sampled right before and after
# the generator runs. Output: the generator's text report, then one line
# "server: cpu X s (user U, system S), peak RSS N KiB".
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime=${1:?usage: load.sh glommio|mio [loadgen options]}
shift
# Extra server flags: SERVER_FLAGS="--group-commit-max-size 0" benches/scripts/load.sh ...
read -r -a server_flags <<<"${SERVER_FLAGS:-}"
cargo build --release --quiet -p cyberbackup-server -p cyberbackup-loadgen
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
# Start from a quiet disk: what earlier runs left dirty would be flushed during this one.
sync
./target/release/cyberbackup-server --runtime "$runtime" --bind 127.0.0.1 --port 0 \
  --storage "$dir/files" --database "$dir/registry.db" --repository "$dir/repository" \
  --admin-listen 127.0.0.1:0 "${server_flags[@]}" >"$dir/out" 2>"$dir/log" &
pid=$!
for _ in $(seq 100); do grep -q listening "$dir/out" 2>/dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^cyberbackup-server listening on //p' "$dir/out")
[ -n "$addr" ] || { cat "$dir/log"; exit 1; }
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14, $15}' "/proc/$pid/stat"; }
read -r u0 s0 < <(cpu)
status=0
./target/release/cyberbackup-loadgen -s "$addr" "$@" || status=$?
read -r u1 s1 < <(cpu)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
awk -v u0="$u0" -v s0="$s0" -v u1="$u1" -v s1="$s1" -v t="$tick" -v h="$hwm" -v r="$runtime" \
  'BEGIN { printf "server (%s): cpu %.2f s (user %.2f, system %.2f), peak RSS %d KiB\n", r, (u1-u0+s1-s0)/t, (u1-u0)/t, (s1-s0)/t, h }'
exit $status
