#!/usr/bin/env bash
# Dependency audit with cargo-deny, as configured in deny.toml.
#
# - bans, licenses, sources: always. They need only Cargo.lock and run offline.
# - advisories: when the RustSec advisory database can be had. It is cloned from
#   GitHub, which some machines (this project's CI among them) cannot reach; then a
#   copy already in $CARGO_HOME/advisory-dbs is used if there is one, else the check is
#   skipped with a notice -- or fails, with AUDIT_REQUIRE_ADVISORIES=1.
#
# cargo-deny is installed on first use (`cargo install cargo-deny --locked`, a few
# minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version >/dev/null 2>&1; then
  cargo install cargo-deny --locked
fi

cargo deny --offline check bans licenses sources

db_dir="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 20 git ls-remote --exit-code https://github.com/RustSec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny check advisories
elif compgen -G "$db_dir/*/.git" >/dev/null; then
  echo "audit: GitHub unreachable; checking advisories against the local copy in $db_dir (it may be stale)" >&2
  cargo deny --offline check advisories
elif [ "${AUDIT_REQUIRE_ADVISORIES:-0}" = 1 ]; then
  echo "audit: the RustSec advisory database is unreachable and there is no local copy" >&2
  exit 1
else
  echo "audit: advisories NOT checked: the RustSec advisory database (GitHub) is unreachable from here and there is no local copy" >&2
fi
