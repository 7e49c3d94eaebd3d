#!/usr/bin/env bash
# The GPU check, on a host with an NVIDIA GPU and drivers, in under 8 minutes:
#   1. the GPU is there: NVML (`disagg gpu`) and torch.cuda both see it;
#   2. the GPU tests: pytest -m gpu (engine on CUDA, worker telemetry in the heartbeat
#      and on /metrics);
#   3. the engine benchmark on cuda/bfloat16 (benchmarks/engine.py --quick), when it
#      takes --device/--dtype; otherwise said and skipped (docs/deploy.md);
#   4. the telemetry check: NVML numbers of every GPU as JSON.
# Results under out/gpu_check/. Without a GPU it says so and exits 2; a failing step exits 1.
# Uses .venv when present (scripts/setup.sh installs a CPU torch: on a GPU host install a
# CUDA build of torch into it first, see docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
PY=${PYTHON:-python}
OUT=out/gpu_check
mkdir -p "$OUT"
start=$SECONDS

step() { echo "== gpu_check: $* ($((SECONDS - start))s)"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

step "GPU present"
if [ ! -e /dev/nvidiactl ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (no /dev/nvidiactl, no nvidia-smi):" \
       "nothing checked. Run it on a GPU host." >&2
  exit 2
fi
"$PY" -m disagg.cli gpu --device cuda > "$OUT/nvml.json" || fail "NVML sees no GPU (see $OUT/nvml.json)"
cat "$OUT/nvml.json"
"$PY" - <<'PY' || fail "torch has no usable CUDA device: install a CUDA build of torch"
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 1)
PY

step "pytest -m gpu"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
  || fail "pytest -m gpu"

step "engine benchmark"
if "$PY" benchmarks/engine.py --help 2>/dev/null | grep -q -- "--device" \
   && "$PY" benchmarks/engine.py --help 2>/dev/null | grep -q -- "--dtype"; then
  timeout 180 "$PY" benchmarks/engine.py --device cuda --dtype bfloat16 --quick \
    --json "$OUT/engine.json" | tee "$OUT/engine.txt" || fail "benchmarks/engine.py"
else
  echo "gpu_check: benchmarks/engine.py takes no --device/--dtype yet: benchmark skipped" \
       "(it would measure the CPU). See docs/deploy.md." | tee "$OUT/engine.txt"
fi

step "telemetry"
"$PY" - <<'PY' > "$OUT/telemetry.json" || fail "telemetry check"
import dataclasses, json, sys
import pynvml
from disagg.runtime.telemetry import read_gpu_sample
pynvml.nvmlInit()
samples = [read_gpu_sample(i) for i in range(pynvml.nvmlDeviceGetCount())]
print(json.dumps([dataclasses.asdict(s) for s in samples], indent=2))
bad = [s for s in samples if not s.available or not s.memory_total_bytes or s.utilization_pct is None]
sys.exit(1 if bad or not samples else 0)
PY
cat "$OUT/telemetry.json"
step "done: every GPU check passed"
