#!/usr/bin/env bash
# Sets up .venv if needed (scripts/setup.sh), then runs `disagg up` with the given flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2  # stdout stays for the `ready` line
# shellcheck disable=SC1091
. .venv/bin/activate
exec disagg up "$@"
