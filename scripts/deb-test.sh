#!/usr/bin/env bash
# The Debian package of the server, end to end: builds it with cargo-deb, installs it
# (apt, for its dependencies), checks the user, files and conffile it put in place,
# starts the server from it as its systemd unit does, backs a directory up and restores
# it with the workspace's client, stops the server with SIGTERM (exit code 0, no RUNNING
# marker left), and purges the package, leaving the machine as it was.
#
# With systemd as PID 1 the server is started by `systemctl start`; otherwise (a
# container, CI) the unit's ExecStart runs as its User/Group in its WorkingDirectory,
# with its memlock and file limits, and a socket of ours plays systemd's NOTIFY_SOCKET.
#
# Run as root on Debian, on a machine without the package, the user cyberbackup or
# /var/lib/cyberbackup (it refuses otherwise: it would delete them). CI runs it after
# the test suite: the installed /etc/cyberbackup/server.toml must not be there while
# the suite's servers run. Every wait has a deadline; the exit code says pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

PKG=cyberbackup-server
UNIT=cyberbackup-server.service
USER_NAME=cyberbackup
STATE=/var/lib/cyberbackup
CONF=/etc/cyberbackup/server.toml
PORT=1256
START_LIMIT=60   # seconds for the server to listen
STOP_LIMIT=90    # the unit's TimeoutStopSec

step() { printf '\n== deb-test: %s\n' "$*"; }
fail() {
  printf '\ndeb-test: FAILED: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "must run as root (it installs a package)"
command -v dpkg >/dev/null || fail "dpkg not found: this test needs Debian or a derivative"
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'installed\|config-files'; then
  fail "$PKG is already installed: this test would purge it; remove it first"
fi
for p in "$STATE" "$CONF"; do
  [ ! -e "$p" ] || fail "$p exists: this test would delete it; move it away first"
done
! getent passwd "$USER_NAME" >/dev/null || fail "user $USER_NAME exists: this test would delete it"
if command -v ss >/dev/null && ss -Hltn "sport = :$PORT" | grep -q .; then
  fail "port $PORT is in use: the packaged server listens there"
fi

tmp=$(mktemp -d /tmp/deb-test.XXXXXX)
chmod 755 "$tmp"
server_pid=""
listener_pid=""
use_systemd=0
if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && [ -d /run/systemd/system ]; then
  use_systemd=1
fi

cleanup() {
  local rc=$?
  set +e
  if [ "$use_systemd" = 1 ]; then
    timeout "$STOP_LIMIT" systemctl stop "$UNIT" 2>/dev/null
  fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [ -n "$listener_pid" ] && kill -0 "$listener_pid" 2>/dev/null; then
    kill "$listener_pid" 2>/dev/null
    wait "$listener_pid" 2>/dev/null
  fi
  if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'installed\|config-files'; then
    echo "deb-test: purging $PKG"
    DEBIAN_FRONTEND=noninteractive timeout 300 dpkg --purge "$PKG" >"$tmp/purge.log" 2>&1 \
      || { echo "deb-test: dpkg --purge failed:"; cat "$tmp/purge.log"; rc=1; }
  fi
  # What the package keeps on purge on purpose (the backups and their owner) goes too:
  # this test made them.
  rm -rf "$STATE"
  getent passwd "$USER_NAME" >/dev/null && deluser --system --quiet "$USER_NAME" >/dev/null 2>&1
  getent group "$USER_NAME" >/dev/null && delgroup --system --quiet "$USER_NAME" >/dev/null 2>&1
  rmdir /etc/cyberbackup 2>/dev/null
  rm -rf "$tmp"
  if [ "$rc" = 0 ]; then
    echo "deb-test: passed"
  else
    echo "deb-test: FAILED (exit $rc)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

step "cargo-deb"
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked
fi
cargo deb --version

step "building the package (release build of the server)"
cargo deb -p "$PKG" --output "$tmp/" >"$tmp/deb-build.log" 2>&1 \
  || { cat "$tmp/deb-build.log"; fail "cargo deb failed"; }
deb=$(find "$tmp" -maxdepth 1 -name "${PKG}_*.deb" | head -1)
[ -n "$deb" ] || { cat "$tmp/deb-build.log"; fail "no .deb in $tmp"; }
echo "built $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"

step "installing"
install_deb() {
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends "$deb"
}
# apt resolves the dependencies (adduser); with stale or no package lists it may need
# an update first.
install_deb >"$tmp/install.log" 2>&1 || {
  timeout 600 apt-get update >>"$tmp/install.log" 2>&1
  install_deb >>"$tmp/install.log" 2>&1
} || { cat "$tmp/install.log"; fail "installing $deb failed"; }
cat "$tmp/install.log"

step "checking what the package installed"
getent passwd "$USER_NAME" >/dev/null || fail "no user $USER_NAME"
getent group "$USER_NAME" >/dev/null || fail "no group $USER_NAME"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd "$USER_NAME")
[ "$uid" -lt 1000 ] || fail "$USER_NAME is not a system user (uid $uid)"
[ "$gid" = "$(getent group "$USER_NAME" | cut -d: -f3)" ] || fail "$USER_NAME's group is not $USER_NAME"
[ "$home" = "$STATE" ] || fail "$USER_NAME's home is $home, not $STATE"
case "$shell" in */nologin | */false) ;; *) fail "$USER_NAME has a login shell ($shell)" ;; esac
[ -x /usr/bin/cyberbackup-server ] || fail "/usr/bin/cyberbackup-server missing"
unit_file=""
for d in /lib/systemd/system /usr/lib/systemd/system; do
  [ -f "$d/$UNIT" ] && unit_file="$d/$UNIT" && break
done
[ -n "$unit_file" ] || fail "$UNIT not installed in /lib/systemd/system"
cmp -s "$unit_file" contrib/systemd/"$UNIT" || fail "$unit_file differs from contrib/systemd/$UNIT"
cmp -s "$CONF" contrib/server.toml || fail "$CONF missing or not contrib/server.toml"
dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "^ $CONF " || fail "$CONF is not a conffile"
[ "$(stat -c '%U:%G %a' "$STATE")" = "$USER_NAME:$USER_NAME 750" ] \
  || fail "$STATE is $(stat -c '%U:%G %a' "$STATE"), not $USER_NAME:$USER_NAME 750"
/usr/bin/cyberbackup-server --version
if command -v systemd-analyze >/dev/null; then
  # Checks the unit's syntax, its directives and its ExecStart binary.
  systemd-analyze verify "$unit_file" || fail "systemd-analyze verify $unit_file"
  echo "systemd-analyze verify: ok"
fi
echo "user, group, binary, unit, conffile and $STATE: ok"

# The unit's settings, so the server runs the way systemd would run it.
unit() { sed -n "s/^$1=//p" "$unit_file" | tail -1; }
exec_start=$(unit ExecStart)
workdir=$(unit WorkingDirectory)
{ [ "$(unit User)" = "$USER_NAME" ] && [ "$(unit Group)" = "$USER_NAME" ]; } \
  || fail "the unit does not run as $USER_NAME"
[ "$(unit Type)" = notify ] || fail "the unit is not Type=notify"

wait_listening() {
  local end=$((SECONDS + START_LIMIT))
  while [ $SECONDS -lt $end ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
      return 0
    fi
    [ -z "$server_pid" ] || kill -0 "$server_pid" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

if [ "$use_systemd" = 1 ]; then
  step "starting the server: systemctl start $UNIT (systemd is PID 1)"
  # Type=notify: returns once the server sent READY=1.
  timeout "$START_LIMIT" systemctl start "$UNIT" \
    || { systemctl status "$UNIT" --no-pager; journalctl -u "$UNIT" --no-pager | tail -50; fail "systemctl start failed"; }
  server_pid=$(systemctl show -p MainPID --value "$UNIT")
  [ "$server_pid" -gt 0 ] || fail "no main pid for $UNIT"
  wait_listening || { journalctl -u "$UNIT" --no-pager | tail -50; fail "the server does not listen on $PORT"; }
  [ "$(stat -c %U "/proc/$server_pid")" = "$USER_NAME" ] || fail "the server does not run as $USER_NAME"
else
  step "starting the server as the unit would (systemd is not PID 1: $(ps -p 1 -o comm=))"
  echo "ExecStart=$exec_start  WorkingDirectory=$workdir  User=Group=$USER_NAME"
  # systemd's part: a notify socket the service user may write to.
  notify="$tmp/notify.sock"
  python3 - "$notify" >"$tmp/notify.log" <<'EOF' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
s.settimeout(300)
while True:
    msg = s.recv(4096).decode().strip()
    print(msg, flush=True)
    if msg.startswith("STOPPING=1"):
        break
EOF
  listener_pid=$!
  for _ in $(seq 50); do [ -S "$notify" ] && break; sleep 0.1; done
  [ -S "$notify" ] || fail "the notify listener did not start (python3 missing?)"
  # The unit's limits, where this sandbox lets root raise them (systemd as PID 1 has
  # CAP_SYS_RESOURCE; a container may not): else as high as they go, with a note.
  capped() { # resource (prlimit option) and the unit's value
    local want=$2 hard
    [ "$want" = infinity ] && want=unlimited
    hard=$(prlimit --noheadings --raw --output HARD "--$1")
    if [ "$hard" != unlimited ] && { [ "$want" = unlimited ] || [ "$want" -gt "$hard" ]; }; then
      echo "note: $1 limit $want is above this sandbox's hard limit $hard: using $hard" >&2
      want=$hard
    fi
    echo "$want"
  }
  memlock=$(capped memlock "$(unit LimitMEMLOCK)")
  nofile=$(capped nofile "$(unit LimitNOFILE)")
  # shellcheck disable=SC2086  # ExecStart is a command line
  (cd "$workdir" && exec env -i PATH=/usr/bin:/bin NOTIFY_SOCKET="$notify" \
    prlimit --memlock="$memlock:$memlock" --nofile="$nofile:$nofile" -- \
    setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups --no-new-privs -- \
    $exec_start) >"$tmp/server.out" 2>"$tmp/server.err" &
  server_pid=$!
  wait_listening || {
    cat "$tmp/server.out" "$tmp/server.err"
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited before it listened (its output is above)"
    fail "the server did not listen on $PORT within ${START_LIMIT}s"
  }
  grep -q "cyberbackup-server listening on 0.0.0.0:$PORT" "$tmp/server.out" \
    || { cat "$tmp/server.out" "$tmp/server.err"; fail "no 'listening' line"; }
  end=$((SECONDS + 10))
  until grep -qx "READY=1" "$tmp/notify.log" || [ $SECONDS -ge $end ]; do sleep 0.2; done
  grep -qx "READY=1" "$tmp/notify.log" || fail "no READY=1 on NOTIFY_SOCKET"
  [ "$(stat -c %U "/proc/$server_pid")" = "$USER_NAME" ] || fail "the server does not run as $USER_NAME"
  echo "listening as $USER_NAME (pid $server_pid), READY=1 received"
fi

step "backup and restore through the packaged server"
cargo build --quiet -p cyberbackup-client --bin cyberbackup
cli=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/cyberbackup
[ -x "$cli" ] || fail "no client binary at $cli"
mkdir -p "$tmp/src/sub" "$tmp/client"
head -c 3000000 /dev/urandom >"$tmp/src/big.bin"
echo "packaged" >"$tmp/src/sub/small.txt"
run_cli() {
  env -u CYBERBACKUP_SERVER -u CYBERBACKUP_PROTOCOL CYBERBACKUP_CONFIG_DIR="$tmp/client" \
    CYBERBACKUP_PASSWORD=deb-test CYBERBACKUP_KDF=test timeout 120 "$cli" "$@"
}
run_cli init -s "127.0.0.1:$PORT" -a deb-test || fail "cyberbackup init against the packaged server"
run_cli backup "$tmp/src" || fail "cyberbackup backup"
run_cli restore latest --target "$tmp/out" || fail "cyberbackup restore"
restored=$(find "$tmp/out" -name big.bin -printf '%h\n' | head -1)
[ -n "$restored" ] || fail "the restore has no big.bin"
diff -r "$tmp/src" "$restored" || fail "the restored tree differs"
[ -z "$(find "$STATE" ! -user "$USER_NAME")" ] || fail "files in $STATE not owned by $USER_NAME: $(find "$STATE" ! -user "$USER_NAME")"
echo "backup and restore: ok; the data in $STATE belongs to $USER_NAME"

step "the operator's side of the packaged server"
# The admin listener on its default address, the admin socket for root.
python3 - <<'PY' || fail "the admin listener on 127.0.0.1:9256"
import urllib.request
for path, want in (("/healthz", "ok"), ("/readyz", "ready")):
    body = urllib.request.urlopen("http://127.0.0.1:9256" + path, timeout=10).read().decode()
    assert body.strip() == want, (path, body)
metrics = urllib.request.urlopen("http://127.0.0.1:9256/metrics", timeout=10).read().decode()
assert "cyberbackup_snapshots_committed_total 1" in metrics, metrics
PY
status=$(/usr/bin/cyberbackup-server status) || fail "cyberbackup-server status"
echo "$status" | grep -q "running: pid" || fail "status: $status"
/usr/bin/cyberbackup-server accounts | grep -q deb-test || fail "accounts does not list deb-test"
/usr/bin/cyberbackup-server check-config >/dev/null || fail "check-config"
echo "healthz, readyz, metrics, status, accounts, check-config: ok"

step "stopping the server with SIGTERM"
marker="$STATE/received_files/.incoming/RUNNING"
[ -e "$marker" ] || fail "no RUNNING marker at $marker while the server runs (has storage.rs moved it?)"
if [ "$use_systemd" = 1 ]; then
  timeout "$STOP_LIMIT" systemctl stop "$UNIT" || fail "systemctl stop timed out"
  result=$(systemctl show -p Result --value "$UNIT")
  status=$(systemctl show -p ExecMainStatus --value "$UNIT")
  { [ "$result" = success ] && [ "$status" = 0 ]; } \
    || { journalctl -u "$UNIT" --no-pager | tail -50; fail "the server stopped with result $result, status $status"; }
else
  kill -TERM "$server_pid"
  end=$((SECONDS + STOP_LIMIT))
  while kill -0 "$server_pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
  kill -0 "$server_pid" 2>/dev/null && { cat "$tmp/server.err"; fail "the server did not exit within ${STOP_LIMIT}s of SIGTERM"; }
  status=0
  wait "$server_pid" || status=$?
  server_pid=""
  [ "$status" = 0 ] || { cat "$tmp/server.err"; fail "the server exited with $status after SIGTERM"; }
  grep -qx "STOPPING=1" "$tmp/notify.log" || fail "no STOPPING=1 on NOTIFY_SOCKET"
  wait "$listener_pid" 2>/dev/null || true
  listener_pid=""
fi
[ ! -e "$marker" ] || fail "the RUNNING marker is left after a clean stop"
echo "exit code 0, no RUNNING marker"

step "purging"
DEBIAN_FRONTEND=noninteractive timeout 300 dpkg --purge "$PKG" || fail "dpkg --purge $PKG"
for p in /usr/bin/cyberbackup-server "$unit_file" "$CONF" \
  "/etc/systemd/system/multi-user.target.wants/$UNIT"; do
  [ ! -e "$p" ] || fail "$p is left after purge"
done
echo "purged: binary, unit, conffile and enablement link gone"
