#!/usr/bin/env bash
# The test suite: sets up .venv if needed (scripts/setup.sh), then runs pytest.
# Extra arguments go to pytest (e.g. bash scripts/test.sh tests/e2e -k grpcurl).
# pytest's exit code is ours: failures fail, and so does "no tests collected" (5).
# The 15 slowest tests are listed at the end: the suite should stay well under 15 min.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -q --durations=15 "$@"
