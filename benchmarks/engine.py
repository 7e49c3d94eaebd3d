"""Engine throughput against transformers' own paths, measured in one run.

Paths, on the same requests (``--requests`` prompts of ``--prompt-len`` random
tokens, ``--new-tokens`` generated each, EOS ignored, greedy):

- ``engine``: ``LLMEngine`` with every request submitted at once. Decode tok/s =
  tokens emitted after the last request's first token / time from then to the
  end; total tok/s = all generated tokens / submit-to-last-token.
- ``hf_generate_batch``: ``model.generate_batch`` (transformers' continuous
  batching over its paged cache), end to end.
- ``hf_generate``: static batched ``model.generate`` (one padded batch), end to end.
- ``bare_forward``: the model alone at the same batch and context: a
  ``DynamicCache`` prefilled once (untimed), then ``new_tokens`` single-token
  forwards of the whole batch (greedy argmax fed back). No scheduling, no paging.
- ``prefill_2048``: the engine prefilling one ``--prefill-len`` prompt (one
  chunk, budget >= prompt) and ``prefill_2048_chunked`` (budget
  ``--chunk``); ``bare_prefill_2048``: one bare forward of the prompt, no cache,
  logits of the last token only (as the engine).

Every engine, transformers' generate/bare forward, and its ``generate_batch``
run in processes of their own (one OpenMP team each: ADR 0006), driven one
measurement at a time. Rounds are interleaved and the
medians are reported (and each path's best round: other jobs only slow a
path down). Every round uses fresh prompts (the engine's prefix cache
must not hit). ``--profile-out`` also writes the cost profile the cluster
planner calibrates from. See benchmarks/README.md.

``--vllm-ab``: only the end-to-end goal against vLLM's CPU backend: the engine
(one ``LLMEngine``, default config) and ``vllm_cpu.py`` on the same prompts,
which one goes first alternating by round; per-round ratios and their median.
A cheaper, tighter measure of ``engine_vs_vllm_cpu`` than the full run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disagg.engine.api import EngineRequest, SamplingParams, TokenOutput
from disagg.engine.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.model_loader import resolve_model


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    prompt_len: int = 128
    new_tokens: int = 128
    prefill_len: int = 2048
    chunk: int = 512  # max_num_batched_tokens of the chunked prefill run
    prefill_reps: int = 3  # prompts per round of the one-prompt prefill comparison
    rounds: int = 2
    threads: int = 2
    block_size: int = 16
    batch_sizes: tuple[int, ...] = (1, 64)  # decode also at these batch sizes (vs bare)
    sweep_new_tokens: int = 64  # new tokens per request at those batch sizes


QUICK = Workload(
    requests=4,
    prompt_len=16,
    new_tokens=8,
    prefill_len=64,
    chunk=32,
    prefill_reps=1,
    rounds=1,
    batch_sizes=(1, 6),
    sweep_new_tokens=4,
)


def prompts(w: Workload, vocab: int, seed: int, n: int | None = None, length: int | None = None):
    """Reproducible random prompts (token ids above the special range)."""
    g = torch.Generator().manual_seed(seed)
    lo = min(100, vocab // 4)
    shape = (n or w.requests, length or w.prompt_len)
    return torch.randint(lo, vocab, shape, generator=g).tolist()


# ---------------------------------------------------------------- the engine


@dataclass
class _Sink:
    """Per-request token timestamps; ``done`` set when every request finished."""

    expected: int
    times: dict[str, list[float]] = field(default_factory=dict)
    finished: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, out: TokenOutput) -> None:
        now = time.perf_counter()
        self.times.setdefault(out.request_id, []).extend([now] * len(out.token_ids))
        if out.finish is not None:
            if out.error:
                raise RuntimeError(out.error)
            self.finished += 1
            if self.finished == self.expected:
                self.done.set()


def engine_config(model: str, w: Workload, **kw: Any) -> EngineConfig:
    per_seq = -(-(w.prompt_len + max(w.new_tokens, w.sweep_new_tokens)) // w.block_size)
    seqs = max(w.requests, *w.batch_sizes)
    need = max(seqs * per_seq, -(-(w.prefill_len + 1) // w.block_size), 1) + 8
    base: dict[str, Any] = {
        "model": model,
        "dtype": "float32",
        "device": "cpu",
        "block_size": w.block_size,
        "num_blocks": need,
        "threads": w.threads,
        "max_num_seqs": seqs,
    }
    base.update(kw)
    return EngineConfig(**base)


def engine_generate(eng: LLMEngine, batch: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Submits every prompt at once; returns decode/total tok/s and seconds."""
    sink = _Sink(len(batch))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"b{i}", list(p), params, sink) for i, p in enumerate(batch)]
    t0 = time.perf_counter()
    for r in reqs:
        eng.submit(r)
    if not sink.done.wait(timeout=3600):
        raise TimeoutError("engine run did not finish")
    end = max(ts[-1] for ts in sink.times.values())
    decode_start = max(ts[0] for ts in sink.times.values())
    decode_tokens = sum(1 for ts in sink.times.values() for t in ts if t > decode_start)
    total_tokens = sum(len(ts) for ts in sink.times.values())
    assert total_tokens == len(batch) * new_tokens, total_tokens
    decode_s = max(end - decode_start, 1e-9)
    return {
        "decode_tok_s": decode_tokens / decode_s if decode_tokens else 0.0,
        "total_tok_s": total_tokens / (end - t0),
        "decode_s": decode_s,
        "total_s": end - t0,
        "decode_tokens": decode_tokens,
    }


def engine_prefill(eng: LLMEngine, prompt: list[int]) -> float:
    """Seconds from submit to the first (only) token of one prompt."""
    sink = _Sink(1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    eng.submit(EngineRequest("p", list(prompt), params, sink))
    if not sink.done.wait(timeout=3600):
        raise TimeoutError("engine prefill did not finish")
    return sink.times["p"][0] - t0


# ------------------------------------------------------ transformers' paths


def load_hf(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_generate(model: Any, batch: list[list[int]], new_tokens: int) -> float:
    """Static batched generate (all prompts the same length, so no padding); total tok/s."""
    ids = torch.tensor(batch)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == new_tokens
    return len(batch) * new_tokens / dt


def hf_generate_batch(
    model: Any, batch: list[list[int]], new_tokens: int, max_batch_tokens: int = 2048
) -> float:
    """transformers' continuous batching (``generate_batch``) on the same requests; total tok/s.

    Its paged cache is sized for the workload (its default sizes the cache
    from free host memory: gigabytes, and slow to allocate on CPU); the token
    budget per step is the engine's default.
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    page = 256
    blocks = len(batch) * -(-(max(map(len, batch)) + new_tokens) // page) + 1
    cb = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=len(batch),
    )

    cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=-1,  # ignore EOS (generate_batch's own "disabled")
        pad_token_id=0,
    )
    t0 = time.perf_counter()
    out = model.generate_batch(
        inputs=batch, generation_config=cfg, continuous_batching_config=cb, progress_bar=False
    )
    dt = time.perf_counter() - t0
    got = sum(len(r.generated_tokens) for r in out.values())
    if got != len(batch) * new_tokens:
        raise RuntimeError(
            f"generate_batch produced {got} tokens, expected {len(batch) * new_tokens}"
        )
    return got / dt


@torch.inference_mode()
def bare_decode(model: Any, batch: list[list[int]], new_tokens: int) -> float:
    """new_tokens single-token forwards of the whole batch over a prefilled DynamicCache; tok/s."""
    from transformers import DynamicCache

    ids = torch.tensor(batch)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    pos = ids.shape[1]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        position = torch.full((ids.shape[0], 1), pos, dtype=torch.long)
        out = model(input_ids=nxt, position_ids=position, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        pos += 1
    return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def bare_prefill(model: Any, prompt: list[int]) -> float:
    """One forward of the whole prompt, no cache, last-token logits; tok/s."""
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return len(prompt) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- the run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# Per model path of the engine: its metric keys. The native path (the default)
# keeps the names these results always had; the old path is prefixed.
PATH_KEYS = {
    "native": {
        "decode": "engine_tok_s",
        "total": "engine_total_tok_s",
        "prefill": "prefill_2048_tok_s",
        "chunked": "prefill_2048_chunked_tok_s",
        "prefix": "engine",
    },
    "transformers": {
        "decode": "engine_transformers_tok_s",
        "total": "engine_transformers_total_tok_s",
        "prefill": "engine_transformers_prefill_2048_tok_s",
        "chunked": "engine_transformers_prefill_2048_chunked_tok_s",
        "prefix": "engine_transformers",
    },
}


# ------------------------------------------------- one process per role
#
# Every engine and each of transformers' paths runs in its own process and is
# driven over a pipe, one measurement at a time. libgomp keeps a team of
# OpenMP threads for each thread that ever ran a parallel region, and once a
# process holds more OpenMP threads than cores it throttles the spin before a
# worker sleeps (ADR 0006, "OpenMP teams"): six engines' step threads and
# transformers in one process would run every path throttled.


def _role_functions(role: str, path: str, w: Workload, kw: dict[str, Any]) -> dict[str, Any]:
    """The measurements one role answers, after building its engine or model."""
    from disagg.engine.threads import on_passing_thread, serial_here

    if role == "hf":  # generate, bare forward: the model runs on this thread
        model = load_hf(path)
        return {
            "generate": lambda b, n: hf_generate(model, b, n),
            "bare_decode": lambda b, n: bare_decode(model, b, n),
            "bare_prefill": lambda p: bare_prefill(model, p),
        }
    if role == "hf_batch":  # generate_batch steps on its own thread: load off this one
        box: list[Any] = []
        on_passing_thread(lambda: box.append(load_hf(path)))
        serial_here()
        return {"generate_batch": lambda b, n: hf_generate_batch(box[0], b, n)}
    t0 = time.perf_counter()
    eng = LLMEngine(engine_config(path, w, **kw))
    eng.start()  # native: compiles every decode bucket now, not inside a timed round
    startup_s = time.perf_counter() - t0
    serial_here()  # this thread only submits; the engine's step thread computes

    def compile_info() -> dict[str, Any]:
        c = eng.compiler
        return {
            "enabled": c.enabled,
            "decode_buckets": list(c.buckets),
            "first_step_s": {str(b): s for b, s in sorted(c.compiled_s.items())},
            "engine_startup_s": startup_s,  # load + warm-up compile, one engine alone
        }

    return {
        "generate": lambda b, n: engine_generate(eng, b, n),
        "prefill": lambda p: engine_prefill(eng, p),
        "compile": compile_info,
        "stop": eng.stop,
    }


def _serve(conn: Any, role: str, path: str, w: Workload, kw: dict[str, Any]) -> None:
    """A role's process: answers (name, args) with ("ok", value) or ("error", traceback)."""
    import traceback

    torch.set_num_threads(w.threads)
    try:
        fns = _role_functions(role, path, w, kw)
        fns["rss_mb"] = peak_rss_mb
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while (msg := conn.recv()) is not None:
        name, args = msg
        try:
            conn.send(("ok", fns[name](*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    if "stop" in fns:
        fns["stop"]()


class Role:
    """One role (an engine config, or a transformers path) in its own spawned process."""

    def __init__(self, name: str, path: str, w: Workload, **kw: Any) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, path, w, kw), daemon=True)
        self.proc.start()
        child.close()
        self._answer()  # built (an engine: loaded and compiled)

    def _answer(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: process exited ({self.proc.exitcode})") from None
        if status != "ok":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def __call__(self, fn: str, *args: Any) -> Any:
        self.conn.send((fn, args))
        return self._answer()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


@dataclass
class PathEngines:
    """One model path's engines, each in its own process: batch decode, one-chunk
    prefill, chunked prefill."""

    gen: Role
    one: Role
    chunk: Role

    @classmethod
    def start(cls, path: str, w: Workload, impl: str) -> PathEngines:
        kw: dict[str, Any] = {"model_impl": impl, "compile_warmup_s": 3600.0}
        return cls(
            Role(f"{impl}-gen", path, w, **kw),
            Role(f"{impl}-one", path, w, max_num_batched_tokens=max(w.prefill_len, 2048), **kw),
            Role(f"{impl}-chunk", path, w, max_num_batched_tokens=w.chunk, **kw),
        )

    @property
    def all(self) -> tuple[Role, ...]:
        return (self.gen, self.one, self.chunk)

    def measure(self, keys: dict[str, str], w: Workload, batch, warm: Warm, add) -> None:  # type: ignore[no-untyped-def]
        self.gen("generate", warm.batch, 4)
        e = self.gen("generate", batch, w.new_tokens)
        add(keys["decode"], e["decode_tok_s"])
        add(keys["total"], e["total_tok_s"])


@dataclass(frozen=True)
class Warm:
    """Untimed calls each role makes right before a timed one. A role idle for minutes
    (the others measuring) ran its next call cold: measured, a 2,048-token prefill
    at 405 tok/s after 90 s idle, 491-570 tok/s back to back."""

    batch: list[list[int]]
    long: list[int]


@dataclass
class HfRoles:
    """transformers' paths: generate and the bare forward in one process (its main
    thread computes), ``generate_batch`` (its own stepping thread) in another."""

    hf: Role
    batch: Role


def _round(
    r: int, w: Workload, hf: HfRoles, paths: dict[str, PathEngines], vocab: int, add
) -> None:  # type: ignore[no-untyped-def]
    """One round: each engine path (their order alternating by round), then transformers'."""
    add("load_avg_1m", os.getloadavg()[0])
    batch = prompts(w, vocab, seed=r)
    warm = Warm(
        prompts(w, vocab, seed=5000 + r, n=2, length=8),
        prompts(w, vocab, seed=6000 + r, n=1, length=w.prefill_len)[0],
    )
    order = list(paths) if r % 2 == 0 else list(reversed(paths))
    for impl in order:
        paths[impl].measure(PATH_KEYS[impl], w, batch, warm, add)
    hf.batch("generate_batch", warm.batch, 4)
    add("hf_generate_batch_tok_s", hf.batch("generate_batch", batch, w.new_tokens))
    hf.hf("generate", warm.batch, 4)
    add("hf_generate_tok_s", hf.hf("generate", batch, w.new_tokens))
    hf.hf("bare_decode", warm.batch, 4)
    add("bare_forward_tok_s", hf.hf("bare_decode", batch, w.new_tokens))
    _prefills(r, w, hf, paths, vocab, warm, add)
    for b in w.batch_sizes:  # decode at other batch sizes, engine paths beside the bare forward
        sweep = prompts(w, vocab, seed=2000 + 10 * r + b, n=b)
        for impl in order:
            paths[impl].gen("generate", warm.batch, 4)
            decode = paths[impl].gen("generate", sweep, w.sweep_new_tokens)["decode_tok_s"]
            add(f"{PATH_KEYS[impl]['prefix']}_b{b}_tok_s", decode)
        hf.hf("bare_decode", warm.batch, 4)
        add(f"bare_b{b}_tok_s", hf.hf("bare_decode", sweep, w.sweep_new_tokens))


def _prefills(  # type: ignore[no-untyped-def]
    r: int, w: Workload, hf: HfRoles, paths: dict[str, PathEngines], vocab: int, warm: Warm, add
) -> None:
    """The one-prompt prefills: every path on the same ``prefill_reps`` prompts, their order
    rotating prompt by prompt; each path's median of them is the round's figure."""
    roles: list[tuple[str, Role]] = [("bare_prefill_2048_tok_s", hf.hf)]
    for impl, engines in paths.items():
        keys = PATH_KEYS[impl]
        roles += [(keys["prefill"], engines.one), (keys["chunked"], engines.chunk)]

    def tok_s(role: Role, prompt: list[int]) -> float:
        if role is hf.hf:
            return float(role("bare_prefill", prompt))
        return w.prefill_len / role("prefill", prompt)

    for _, role in roles:
        tok_s(role, warm.long)
    got: dict[str, list[float]] = {key: [] for key, _ in roles}
    for i in range(w.prefill_reps):
        long = prompts(w, vocab, seed=1000 + 10 * r + i, n=1, length=w.prefill_len)[0]
        k = (r + i) % len(roles)
        for key, role in roles[k:] + roles[:k]:
            got[key].append(tok_s(role, long))
    for key, values in got.items():
        add(key, statistics.median(values))


def run(
    path: str, w: Workload, log: Callable[[str], None] = print, vllm: bool = False
) -> dict[str, Any]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    roles: list[Role] = []
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    try:
        hf = HfRoles(Role("hf", path, w), Role("hf_batch", path, w))
        roles += [hf.hf, hf.batch]
        paths: dict[str, PathEngines] = {}
        for impl in PATH_KEYS:
            paths[impl] = PathEngines.start(path, w, impl)
            roles += paths[impl].all
        for r in range(w.rounds):
            _round(r, w, hf, paths, vocab, add)
            if vllm:
                add("vllm_cpu_tok_s", vllm_cpu(path, prompts(w, vocab, seed=r), w))
            log(
                f"round {r + 1}/{w.rounds}: "
                + ", ".join(f"{k}={v[-1]:.1f}" for k, v in samples.items())
            )
        res = summarize(samples)
        res["compile"] = paths["native"].gen("compile")
        res["peak_rss_mb"] = max(role("rss_mb") for role in roles)  # the largest process
    finally:
        for role in roles:
            role.close()
    res["processes"] = [role.name for role in roles]
    res["workload"] = {**w.__dict__, "batch_sizes": list(w.batch_sizes)}
    res["model"] = path
    res["torch"] = torch.__version__
    return res


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, each path's best round, and ratios: of medians, of bests, and the median
    of same-round ratios (the fairest on a shared machine: a round's paths ran minutes apart)."""
    res: dict[str, Any] = {k: statistics.median(v) for k, v in samples.items()}
    res.update(ratios(res))
    # Other jobs only ever slow a path down, so each path's best round is its
    # least-disturbed estimate; ratios of bests are reported beside the medians.
    best = {k: max(v) for k, v in samples.items()}
    res["best"] = {**best, **ratios(best)}
    rounds = len(samples["engine_tok_s"])
    per_round = [ratios({k: v[i] for k, v in samples.items() if len(v) > i}) for i in range(rounds)]
    res["same_round"] = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    res["samples"] = samples
    return res


def ratios(r: dict[str, float]) -> dict[str, float]:
    gb, bare_p = r["hf_generate_batch_tok_s"], r["bare_prefill_2048_tok_s"]
    out = {"native_vs_transformers": r["engine_tok_s"] / r["engine_transformers_tok_s"]}
    for impl, keys in PATH_KEYS.items():
        pre = keys["prefix"]
        total, decode = r[keys["total"]], r[keys["decode"]]
        out[f"{pre}_vs_generate_batch"] = total / gb
        out[f"{pre}_decode_vs_generate_batch"] = decode / gb
        out[f"{pre}_vs_generate"] = total / r["hf_generate_tok_s"]
        out[f"{pre}_vs_bare"] = decode / r["bare_forward_tok_s"]
        pf = "" if impl == "native" else f"{pre}_"
        out[f"{pf}prefill_vs_bare"] = r[keys["prefill"]] / bare_p
        out[f"{pf}prefill_chunked_vs_bare"] = r[keys["chunked"]] / bare_p
        for key in [k for k in r if k.startswith("bare_b") and k.endswith("_tok_s")]:
            b = key[len("bare_b") : -len("_tok_s")]
            if f"{pre}_b{b}_tok_s" in r:
                out[f"{pre}_vs_bare_b{b}"] = r[f"{pre}_b{b}_tok_s"] / r[key]
        if "vllm_cpu_tok_s" in r:
            out[f"{pre}_vs_vllm_cpu"] = total / r["vllm_cpu_tok_s"]
    return out


def vllm_cpu(path: str, batch: list[list[int]], w: Workload) -> float:
    """The same requests on vLLM's CPU backend (benchmarks/vllm_cpu.py, its own venv); tok/s."""
    import subprocess
    import tempfile

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_cpu.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(batch, f)
        f.flush()
        cmd = [sys.executable, script, "--model", path, "--prompts", f.name]
        cmd += ["--new-tokens", str(w.new_tokens), "--threads", str(w.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"vllm_cpu.py failed:\n{out.stderr[-3000:]}")
    result = [line for line in out.stdout.splitlines() if line.startswith('{"tok_s"')]
    return float(json.loads(result[-1])["tok_s"])


def vllm_ab(path: str, w: Workload, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The engine end to end against vLLM-CPU on the same prompts, rounds interleaved."""
    torch.set_num_threads(w.threads)
    eng = LLMEngine(engine_config(path, w, compile_warmup_s=3600.0))
    eng.start()
    rounds: list[dict[str, float]] = []
    try:
        vocab = eng.info.vocab_size
        engine_generate(eng, prompts(w, vocab, seed=10_000, n=2, length=8), 4)
        for r in range(w.rounds):
            batch = prompts(w, vocab, seed=r)
            row: dict[str, float] = {}
            for who in ("engine", "vllm") if r % 2 == 0 else ("vllm", "engine"):
                if who == "vllm":
                    row["vllm_cpu_tok_s"] = vllm_cpu(path, batch, w)
                else:
                    e = engine_generate(eng, batch, w.new_tokens)
                    row["engine_total_tok_s"] = e["total_tok_s"]
                    row["engine_tok_s"] = e["decode_tok_s"]
            row["engine_vs_vllm_cpu"] = row["engine_total_tok_s"] / row["vllm_cpu_tok_s"]
            rounds.append(row)
            log(f"round {r + 1}/{w.rounds}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
            gc.collect()
    finally:
        eng.stop()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {
        "rounds": rounds,
        "median": med,
        "load_avg_1m": os.getloadavg()[0],
        "workload": {**w.__dict__, "batch_sizes": list(w.batch_sizes)},
        "model": path,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------- the profile


def profile(
    path: str, w: Workload, quick: bool, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Prefill ms vs tokens, decode step ms vs batch x context, KV bytes per token.

    For the cluster planner's cost model. Prefill: engine, one chunk. Decode
    step: decode-phase time / decode steps of ``batch`` requests with prompts of
    ``context`` tokens (the context grows by ``steps`` over the measurement).
    """
    torch.set_num_threads(w.threads)
    lens = [16, 32, 64] if quick else [128, 512, 1024, 2048]
    batches = [1, 2] if quick else [1, 8, 32]
    contexts = [16, 32] if quick else [128, 512]
    steps = 4 if quick else 16
    blocks = max(max(batches) * (max(contexts) + steps + 1), max(lens) + 1) // w.block_size + 16
    cfg = engine_config(
        path,
        w,
        num_blocks=blocks,
        max_num_batched_tokens=max(max(lens), 2048),
        max_num_seqs=max(batches),
        compile_warmup_s=3600.0,  # every decode bucket compiled before anything is timed
    )
    eng = LLMEngine(cfg)
    eng.start()
    vocab = eng.info.vocab_size
    seed = iter(range(20_000, 30_000))
    out: dict[str, Any] = {"prefill": [], "decode": []}
    try:
        engine_prefill(eng, prompts(w, vocab, next(seed), 1, 32)[0])  # warm-up
        for n in lens:
            ms = [
                engine_prefill(eng, prompts(w, vocab, next(seed), 1, n)[0]) * 1e3
                for _ in range(w.rounds)
            ]
            out["prefill"].append({"tokens": n, "ms": statistics.median(ms)})
            log(f"profile prefill {n} tokens: {out['prefill'][-1]['ms']:.1f} ms")
        for ctx in contexts:
            for b in batches:
                ms = []
                for _ in range(w.rounds):
                    r = engine_generate(eng, prompts(w, vocab, next(seed), b, ctx), steps + 1)
                    ms.append(r["decode_s"] / max(r["decode_tokens"] / b, 1) * 1e3)
                out["decode"].append({"batch": b, "context": ctx, "step_ms": statistics.median(ms)})
                log(
                    f"profile decode batch {b} context {ctx}: {out['decode'][-1]['step_ms']:.1f} ms/step"
                )
    finally:
        eng.stop()
    lay = eng.info.layout
    out["decode_context"] = "mean"  # decode attention runs in length groups (no padding to max)
    out["kv_bytes_per_token"] = 2 * lay.num_layers * lay.bytes_per_block_per_layer // lay.block_size
    out["layout"] = lay.__dict__
    out["model"] = path
    out["threads"] = w.threads
    return out


def _rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for impl, keys in PATH_KEYS.items():
        pre, pf = keys["prefix"], ("" if impl == "native" else f"{keys['prefix']}_")
        rows += [
            (f"{impl}: engine decode", keys["decode"], "tok/s"),
            (f"{impl}: engine total", keys["total"], "tok/s"),
            (f"{impl}: prefill (1 chunk)", keys["prefill"], "tok/s"),
            (f"{impl}: prefill (chunked)", keys["chunked"], "tok/s"),
            (f"{impl}: decode / bare", f"{pre}_vs_bare", "x"),
            (f"{impl}: total / generate", f"{pre}_vs_generate", "x"),
            (f"{impl}: total / generate_batch", f"{pre}_vs_generate_batch", "x"),
            (f"{impl}: prefill / bare", f"{pf}prefill_vs_bare", "x"),
            (f"{impl}: prefill chunked / bare", f"{pf}prefill_chunked_vs_bare", "x"),
        ]
        rows += [(f"{impl}: decode b{b} / bare b{b}", f"{pre}_vs_bare_b{b}", "x") for b in _bs(res)]
        rows += [(f"{impl}: total / vllm-cpu", f"{pre}_vs_vllm_cpu", "x")]
    rows += [
        ("hf generate_batch", "hf_generate_batch_tok_s", "tok/s"),
        ("hf generate (static)", "hf_generate_tok_s", "tok/s"),
        ("bare forward decode", "bare_forward_tok_s", "tok/s"),
        ("bare prefill", "bare_prefill_2048_tok_s", "tok/s"),
        ("vllm-cpu (end to end)", "vllm_cpu_tok_s", "tok/s"),
    ]
    for b in _bs(res):
        rows += [(f"decode b{b}: {p}", f"{p}_b{b}_tok_s", "tok/s") for p in ("engine", "bare")]
        rows += [(f"decode b{b}: transformers path", f"engine_transformers_b{b}_tok_s", "tok/s")]
    rows += [
        ("native decode / transformers path", "native_vs_transformers", "x"),
        ("load average (1 min)", "load_avg_1m", ""),
        ("peak RSS", "peak_rss_mb", "MiB"),
    ]
    return [r for r in rows if r[1] in res]


def _bs(res: dict[str, Any]) -> list[int]:
    return list(res["workload"].get("batch_sizes", []))


def table(res: dict[str, Any]) -> str:
    w = res["workload"]
    head = (
        f"{w['requests']} requests x {w['prompt_len']} prompt + {w['new_tokens']} new tokens, "
        f"prefill {w['prefill_len']} (chunk {w['chunk']}), {w['threads']} threads, "
        f"median of {w['rounds']} rounds; same-round = median of per-round ratios"
    )
    best, same = res["best"], res.get("same_round", {})
    lines = [head, f"{'metric':40} {'median':>9} {'best':>9} {'same-round':>10}  unit"]
    for name, key, unit in _rows(res):
        b = f"{best[key]:9.2f}" if key in best else " " * 9
        sr = f"{same[key]:10.2f}" if key in same else " " * 10
        lines.append(f"{name:40} {res[key]:9.2f} {b} {sr}  {unit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="local HF model dir; default SmolLM2-135M-Instruct")
    p.add_argument("--json", dest="json_path", default="", help="write the results here")
    p.add_argument("--profile-out", default="", help="also write the planner cost profile here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--skip-bench", action="store_true", help="only the profile")
    p.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds (0 = workload default)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = workload default)")
    p.add_argument(
        "--vllm", action="store_true", help="also vLLM's CPU backend each round (vllm_cpu.py)"
    )
    p.add_argument(
        "--vllm-ab",
        action="store_true",
        help="only the engine end to end against vLLM-CPU, interleaved (see the docstring)",
    )
    a = p.parse_args(argv)
    w = QUICK if a.quick else Workload()
    if a.rounds or a.threads:
        w = Workload(
            **{**w.__dict__, "rounds": a.rounds or w.rounds, "threads": a.threads or w.threads}
        )
    path = resolve_model(a.model)
    if a.vllm_ab:
        res = vllm_ab(path, w, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(res["median"], indent=2))
        if a.json_path:
            with open(a.json_path, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    if not a.skip_bench:
        res = run(path, w, log=lambda s: print(s, file=sys.stderr, flush=True), vllm=a.vllm)
        print(table(res))
        if a.json_path:
            with open(a.json_path, "w") as f:
                json.dump(res, f, indent=2)
    if a.profile_out:
        prof = profile(path, w, a.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
        with open(a.profile_out, "w") as f:
            json.dump(prof, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
