#!/usr/bin/env bash
# The proto contract: `buf lint` (protos/buf.yaml) and `buf breaking` against a baseline.
#
# buf comes from npm (@bufbuild/buf, pinned in tools/buf/package-lock.json), installed by
# `npm ci` into tools/buf/node_modules (gitignored; reinstalled only when the lock changes).
#
# Baseline of the breaking check, the first that exists:
#   1. $BUF_AGAINST: a git ref, or a directory holding the baseline's proto files;
#   2. the newest tag reachable from HEAD (the last release);
#   3. the merge base of HEAD and origin/main (no origin/main: HEAD); when that is HEAD
#      itself (CI on main, a clone whose origin/main is HEAD, no remote) its parent, so
#      the last commit and any uncommitted change are checked.
# No baseline (a shallow clone without the ref, no git): the breaking check is skipped
# with a message, the lint still runs. The baseline's files are taken with `git archive`
# into a temp dir, so the work tree is never touched.
#
#   bash scripts/check_buf.sh                 # lint + breaking (CI)
#   BUF_AGAINST=v0.1.0 bash scripts/check_buf.sh
#   bash scripts/check_buf.sh --protos DIR    # check another copy of protos/ (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
protos=protos
while [ $# -gt 0 ]; do
  case $1 in
    --protos) protos=$2; shift 2 ;;
    *) echo "check_buf: unknown argument $1" >&2; exit 2 ;;
  esac
done

tools=tools/buf
buf=$tools/node_modules/.bin/buf
stamp=$tools/node_modules/.lock-sha
want=$(sha256sum "$tools/package-lock.json" | cut -d' ' -f1)
if [ ! -x "$buf" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "check_buf: npm ci in $tools"
  (cd "$tools" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi
echo "check_buf: $("$buf" --version) lint $protos"
"$buf" lint "$protos"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

baseline_ref() {
  git rev-parse --git-dir >/dev/null 2>&1 || return 1
  local ref base
  ref=$(git describe --tags --abbrev=0 HEAD 2>/dev/null) && { echo "$ref"; return 0; }
  base=$(git merge-base HEAD origin/main 2>/dev/null) || base=$(git rev-parse HEAD) || return 1
  if [ "$base" = "$(git rev-parse HEAD)" ]; then
    git rev-parse --verify --quiet HEAD^ || echo "$base"
  else
    echo "$base"
  fi
}

against=${BUF_AGAINST:-}
if [ -n "$against" ] && [ -d "$against" ]; then
  cp -r "$against" "$tmp/base"
else
  [ -n "$against" ] || against=$(baseline_ref) || against=""
  if [ -z "$against" ] || ! git cat-file -e "$against:protos" 2>/dev/null; then
    echo "check_buf: no baseline (${against:-no tag, no origin/main}) with protos/: breaking check skipped"
    exit 0
  fi
  mkdir -p "$tmp/base"
  git archive "$against" protos | tar -x -C "$tmp/base" --strip-components=1
fi
# The baseline may predate buf.yaml: compare under today's configuration.
cp "$root/protos/buf.yaml" "$tmp/base/buf.yaml"
echo "check_buf: breaking $protos against ${against:-$BUF_AGAINST}"
"$buf" breaking "$protos" --against "$tmp/base"
echo "check_buf: ok"
