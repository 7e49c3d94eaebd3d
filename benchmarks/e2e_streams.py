"""32 concurrent streams end to end through `disagg up` vs the engine alone, one run.

Both sides get the same 32 requests (128 random prompt tokens, 128 new tokens,
greedy, EOS ignored) on the same 2 threads:

1. engine: `LLMEngine` in this process, all requests submitted at once;
2. served: `disagg up --prefill 0 --decode 1 --threads 2` (one worker doing both
   phases, so the same engine work) and 32 concurrent gRPC `Generate` streams
   through the scheduler.

Throughput = generated tokens / first submit to last token, on both sides.
Prints a table; `--json PATH` writes `engine_tok_s`, `served_tok_s`, `served_vs_engine`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time


def _requests(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(n)]


def engine_tok_s(model: str, prompts: list[list[int]], new: int, threads: int) -> float:
    from disagg.engine.api import EngineRequest, SamplingParams, TokenOutput
    from disagg.engine.config import EngineConfig
    from disagg.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=model, threads=threads, num_blocks=2048))
    eng.start()
    try:
        done = threading.Semaphore(0)
        count = [0]

        def on_output(out: TokenOutput) -> None:
            count[0] += len(out.token_ids)
            if out.finish is not None:
                done.release()

        sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        start = time.monotonic()
        for i, p in enumerate(prompts):
            eng.submit(EngineRequest(f"bench-{i}", p, sp, on_output))
        for _ in prompts:
            done.acquire()
        return count[0] / (time.monotonic() - start)
    finally:
        eng.stop()


def served_tok_s(model: str, prompts: list[list[int]], new: int, threads: int) -> float:
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "disagg.cli",
        "up",
        "--prefill",
        "0",
        "--decode",
        "1",
        "--threads",
        str(threads),
        "--port",
        str(port),
        "--http-port",
        "-1",
        "--num-blocks",
        "2048",
    ]
    if model:
        argv += ["--model", model]
    up = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "ready" in line:
                break
        counts = [0] * len(prompts)

        def one(i: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                req = scheduler_pb2.GenerateRequest(
                    prompt_token_ids=prompts[i], max_tokens=new, temperature=0, ignore_eos=True
                )
                for r in scheduler_pb2_grpc.SchedulerStub(ch).Generate(req):
                    counts[i] += len(r.token_ids)

        threads_ = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        start = time.monotonic()
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        elapsed = time.monotonic() - start
        assert all(c == new for c in counts), counts
        return sum(counts) / elapsed
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="", help="local HF model dir; default SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", dest="json_path", default="")
    a = p.parse_args()
    from disagg.engine.model_loader import resolve_model
    from disagg.tokenization.loader import load_tokenizer

    vocab = load_tokenizer(resolve_model(a.model)).vocab_size
    prompts = _requests(a.requests, a.prompt_len, vocab, seed=1)
    eng = engine_tok_s(a.model, prompts, a.new_tokens, a.threads)
    served = served_tok_s(a.model, prompts, a.new_tokens, a.threads)
    res = {
        "engine_tok_s": eng,
        "served_tok_s": served,
        "served_vs_engine": served / eng,
        "requests": a.requests,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "threads": a.threads,
    }
    print(f"{'engine alone':<28}{eng:10.1f} tok/s")
    print(f"{'disagg up, 32 gRPC streams':<28}{served:10.1f} tok/s")
    print(f"{'served / engine':<28}{served / eng:10.2f} x")
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
