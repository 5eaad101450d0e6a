#!/usr/bin/env bash
# One node on its embedded defaults against the same node on PostgreSQL and on S3 +
# PostgreSQL (issue 22): a backup of DATA then a restore of it, each from a cold page
# cache, modes alternated, N rounds; prints wall, client user/sys, the node's CPU and
# the CPU of the Garage and PostgreSQL processes.
#
#   PGURL=postgres://postgres@127.0.0.1:54330/postgres \
#   DATA=/var/tmp/g1.bin N=2 MODES="local pg s3pg" bash benches/scripts/scaleout-ab.sh
#   ... MODES=agg A=/var/tmp/h1.bin B2=/var/tmp/h2.bin  (two clients at once, through
#   one node, then through two)
#   Modes: local, local-unpacked (--pack-below 0), pg, s3pg, s3pg-unpacked (packing is
#   on by default: small chunks in packs, docs/PACKS.md).
#
# PGURL should be a durable cluster (fsync, synchronous_commit on), not the tests'
# (fsync off); the schema `bench` in it is dropped and made anew each run. The object
# store is scripts/garage-test.sh's. Root (drops the page cache); release binaries in
# target/release.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$PWD/target/release
: "${PGURL:?a PostgreSQL URL}"
read -r EP BK RG KI KS <<<"$(bash scripts/garage-test.sh)"
work=$(mktemp -d /var/tmp/scaleout-ab.XXXXXX)
trap 'rm -rf "$work"' EXIT
export CYBERBACKUP_PASSWORD=bench CYBERBACKUP_KDF=test
others() { local t=0 p; for p in $(pgrep -x garage) $(pgrep -x postgres); do
  t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# Objects in the bucket (Garage's counters lag a little behind the writes).
objects() { garage -c "${GARAGETEST_DIR:-/tmp/cyberbackup-garagetest}/n0/garage.toml" \
  bucket info "$BK" 2>/dev/null | awk '/^Objects:/ {print $2}'; }
secs() { echo "scale=2; $1/100" | bc; }
start() { # dir extra... -> pid and address in $dir
  local d=$1; shift
  mkdir -p "$d/repo"
  "$bin/cyberbackup-server" --bind 127.0.0.1 --port 0 --admin-listen off \
    --repository "$d/repo" --storage "$d/st" --database "$d/v3.db" --log warn "$@" >"$d/out" 2>"$d/err" &
  echo $! >"$d/pid"
  for _ in $(seq 100); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
  awk '{print $NF}' "$d/out"
}
extra() { # mode round
  psql -q "$PGURL" -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS bench CASCADE; CREATE SCHEMA bench" >/dev/null
  local reg="--registry $PGURL?options=-csearch_path%3Dbench"
  local s3="$reg --s3-endpoint $EP --s3-bucket $BK --s3-region $RG --s3-access-key-id $KI --s3-secret-access-key $KS --s3-prefix bench-$2-$RANDOM/"
  case $1 in
    local) ;;
    local-unpacked) echo "--pack-below 0" ;;
    pg) echo "$reg" ;;
    s3pg-unpacked) echo "$s3 --pack-below 0" ;;
    *) echo "$s3" ;;
  esac
}
for round in $(seq "${N:-2}"); do
  for mode in ${MODES:-local pg s3pg}; do
    d=$work/$mode-$round
    if [ "$mode" = agg ]; then
      for nodes in one two; do
        dn=$d-$nodes; mkdir -p "$dn/a" "$dn/b/repo"
        args=$(extra s3pg "$round")
        # shellcheck disable=SC2086
        sa=$(start "$dn/a" $args)
        cp "$dn/a/repo/server.key" "$dn/b/repo/"
        # shellcheck disable=SC2086
        sb=$(start "$dn/b" $args)
        [ "$nodes" = two ] || sb=$sa
        CYBERBACKUP_CONFIG_DIR=$dn/c1 "$bin/cyberbackup" -q init -s "$sa" -a u1 >/dev/null
        CYBERBACKUP_CONFIG_DIR=$dn/c2 "$bin/cyberbackup" -q init -s "$sb" -a u2 >/dev/null
        sync; echo 3 >/proc/sys/vm/drop_caches
        c0=$(( $(ticks "$(cat "$dn/a/pid")") + $(ticks "$(cat "$dn/b/pid")") )); t0=$(date +%s.%N)
        CYBERBACKUP_CONFIG_DIR=$dn/c1 "$bin/cyberbackup" -q backup "$A" & p1=$!
        CYBERBACKUP_CONFIG_DIR=$dn/c2 "$bin/cyberbackup" -q backup "$B2" & p2=$!
        wait $p1 $p2; t1=$(date +%s.%N)
        c1=$(( $(ticks "$(cat "$dn/a/pid")") + $(ticks "$(cat "$dn/b/pid")") ))
        echo "agg $nodes node(s): wall $(echo "$t1 - $t0" | bc) s, nodes' CPU $(secs $((c1 - c0))) s"
        kill "$(cat "$dn/a/pid")" "$(cat "$dn/b/pid")"; wait 2>/dev/null || true
      done
      continue
    fi
    args=$(extra "$mode" "$round")
    # shellcheck disable=SC2086
    addr=$(start "$d" $args)
    pid=$(cat "$d/pid")
    CYBERBACKUP_CONFIG_DIR=$d/cfg "$bin/cyberbackup" -q init -s "$addr" -a bench >/dev/null
    for op in backup restore; do
      rm -rf "$d/rt"; mkdir "$d/rt"; sync; echo 3 >/proc/sys/vm/drop_caches
      s0=$(ticks "$pid"); o0=$(others); n0=$(objects)
      if [ $op = backup ]; then
        /usr/bin/time -o "$d/t" -f "%e %U %S" env CYBERBACKUP_CONFIG_DIR="$d/cfg" "$bin/cyberbackup" -q backup "$DATA"
      else
        /usr/bin/time -o "$d/t" -f "%e %U %S" env CYBERBACKUP_CONFIG_DIR="$d/cfg" "$bin/cyberbackup" -q restore latest --target "$d/rt"
      fi
      s1=$(ticks "$pid"); o1=$(others); sleep 2
      echo "$mode $op: wall/user/sys $(cat "$d/t") node=$(secs $((s1 - s0))) garage+postgres=$(secs $((o1 - o0))) objects+=$(( $(objects) - n0 ))"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$d"
  done
done
