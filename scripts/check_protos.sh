#!/usr/bin/env bash
# Fails (printing the diff) when the committed generated code in disagg/v1/ is not
# what scripts/gen_protos.sh makes from protos/ now. Regenerates into a temp copy:
# the work tree is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/scripts" "$tmp/disagg/v1"
cp scripts/gen_protos.sh "$tmp/scripts/"
cp -r protos "$tmp/protos"
cp disagg/v1/__init__.py "$tmp/disagg/v1/"
bash "$tmp/scripts/gen_protos.sh"
if ! diff -ru -x __pycache__ disagg/v1 "$tmp/disagg/v1"; then
  echo "check_protos: disagg/v1/ is stale; run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "check_protos: disagg/v1/ matches protos/"
