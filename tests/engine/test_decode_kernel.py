"""The C++ decode-attention kernel (engine/kernels): equal to the torch decode paths on
the shapes the engine gives it, refusing what it cannot serve, chosen by default on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from disagg.engine.engine import LLMEngine
from disagg.engine.kernels import cpu
from disagg.engine.paged_attention import fused_decode, gathered_decode
from disagg.engine.testing import OutputCollector, engine_config, prompt_of, request

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    cpu.available(CPU, torch.float32) is not None, reason="no C++ compiler to build the kernel"
)


def _case(b: int, heads: int, kv_heads: int, d: int, bs: int, max_len: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    width = -(-max_len // bs)
    pool = b * width + 5
    k = torch.randn(pool, bs, kv_heads, d, generator=g)
    v = torch.randn(pool, bs, kv_heads, d, generator=g)
    lens = torch.randint(1, max_len + 1, (b,), generator=g)
    lens[0] = max_len
    ids = torch.randperm(pool, generator=g)[: b * width].view(b, width)
    for r in range(b):  # the runner's padding: a row's own last block repeated
        used = -(-int(lens[r]) // bs)
        ids[r, used:] = ids[r, used - 1]
    q = torch.randn(b, heads, d, generator=g)
    return q, k, v, ids, lens


@pytest.mark.parametrize(
    "b,heads,kv_heads,d,bs",
    [
        (1, 4, 4, 16, 16),
        (3, 4, 2, 16, 16),
        (17, 9, 3, 64, 16),
        (5, 8, 1, 128, 32),
        (40, 4, 2, 32, 8),
    ],
)
@pytest.mark.parametrize("window", [0, 7, 40])
def test_kernel_equals_the_torch_decode_paths(
    b: int, heads: int, kv_heads: int, d: int, bs: int, window: int
) -> None:
    q, k, v, ids, lens = _case(b, heads, kv_heads, d, bs, max_len=70, seed=b * 31 + window)
    expected = gathered_decode(q, k, v, ids, lens, 0.2, window)
    got = cpu.paged_decode(q, k, v, ids, lens, 0.2, window)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(
        got, fused_decode(q, k, v, ids, lens, 0.2, window), atol=2e-5, rtol=1e-4
    )


def test_kernel_reads_only_each_rows_valid_tokens() -> None:
    # Poison everything a row must not see: slots past its length and other rows' blocks.
    q, k, v, ids, lens = _case(4, 4, 2, 16, 16, max_len=40, seed=3)
    expected = cpu.paged_decode(q, k, v, ids, lens, 0.25, 0)
    used = torch.zeros(k.shape[0] * k.shape[1], dtype=torch.bool)
    for r in range(4):
        for t in range(int(lens[r])):
            used[ids[r, t // 16] * 16 + t % 16] = True
    for cache in (k, v):
        cache.view(-1, 2, 16)[~used] = float("nan")
    torch.testing.assert_close(cpu.paged_decode(q, k, v, ids, lens, 0.25, 0), expected)


def test_kernel_refuses_lengths_outside_the_table() -> None:
    q, k, v, ids, lens = _case(2, 4, 2, 16, 16, max_len=20, seed=5)
    for bad in (0, ids.shape[1] * 16 + 1):
        wrong = lens.clone()
        wrong[1] = bad
        with pytest.raises(ValueError, match="refused"):
            cpu.paged_decode(q, k, v, ids, wrong, 0.25, 0)
    with pytest.raises(ValueError, match="int64"):  # a wrong dtype would be read as garbage
        cpu.paged_decode(q, k, v, ids.int(), lens, 0.25, 0)
    with pytest.raises(ValueError, match="shape"):
        cpu.paged_decode(q, k, v, ids[:1], lens, 0.25, 0)
    empty = cpu.paged_decode(q[:0], k, v, ids[:0], lens[:0], 0.25, 0)
    assert empty.shape == (0, 4, 16)


def test_kernel_serves_only_fp32_pools_on_cpu() -> None:
    assert cpu.available(CPU, torch.float32) is None
    assert "dtype" in str(cpu.available(CPU, torch.bfloat16))
    assert "device" in str(cpu.available(torch.device("cuda"), torch.float32))


def test_without_a_compiler_the_kernel_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import torch; from disagg.engine.kernels import cpu;"
        "print(cpu.available(torch.device('cpu'), torch.float32))"
    )
    env = {**os.environ, "PATH": str(tmp_path), "DISAGG_KERNEL_CACHE": str(tmp_path / "k")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "no C++ compiler" in out.stdout


def test_the_engine_uses_the_kernel_unless_told_otherwise(tiny_model: str) -> None:
    default = LLMEngine(engine_config(tiny_model, model_impl="native"))
    assert default.runner.decode_kernel == "cpp"  # type: ignore[attr-defined]
    torch_path = LLMEngine(engine_config(tiny_model, model_impl="native", decode_kernel="torch"))
    assert torch_path.runner.decode_kernel == "torch"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="decode_kernel"):
        engine_config(tiny_model, decode_kernel="avx")


def test_rows_of_very_different_lengths_share_one_kernel_call(tiny_model: str, reference) -> None:  # type: ignore[no-untyped-def]
    # The torch paths split such a batch into length groups (padding costs them); the
    # kernel reads each row's own length, so one call serves both, greedy-equal.
    eng = LLMEngine(engine_config(tiny_model, model_impl="native", compile=False))
    attention = eng.runner.model.attention  # type: ignore[attr-defined]
    rows: list[int] = []
    kernel = attention.decode

    def counted(q, *rest):  # type: ignore[no-untyped-def]
        rows.append(q.shape[0])
        return kernel(q, *rest)

    attention.decode = counted
    eng.start()
    try:
        sink = OutputCollector()
        reqs = [request(prompt_of(n, n), sink, max_tokens=12) for n in (3, 200)]
        for r in reqs:
            eng.submit(r)
        sink.wait([r.request_id for r in reqs])
        for r in reqs:
            assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 12)
    finally:
        eng.stop()
    assert 2 in rows  # both rows in one call, though 200 tokens span 13 blocks and 3 one
