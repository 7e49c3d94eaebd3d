"""The incremental detokenizer stays linear on long outputs and equal to the whole decode
(issue 14, hole 5: with ``ignore_eos`` a window that never releases text grew without end).

Cost is counted, not timed: a tokenizer wrapper sums the tokens of every decode call.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from disagg.tokenization.detokenizer import IncrementalDetokenizer

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Caf\u00e9 na\u00efve \u00fcber "
    "\u4e16\u754c\u4f60\u597d \U0001f642\U0001f30d \u0436\u0443\u0440\u043d\u0430\u043b "
    "\u3053\u3093\u306b\u3061\u306f  \t\n  def f(x):\n    return x ** 2\n"
)


class Counting:
    """A tokenizer whose decode calls are counted (tokens decoded, in all)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.decoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def decode(self, ids: Sequence[int], **kw: Any) -> str:
        self.decoded += len(ids)
        return str(self._tok.decode(ids, **kw))


def _feed(tok: Any, prompt: Sequence[int], out: Sequence[int], seed: int = 0) -> str:
    """The deltas of a detokenizer fed out in random chunks of 1-3 tokens, joined."""
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tok, prompt)
    parts, i = [], 0
    while i < len(out):
        n = rng.choice((1, 1, 1, 2, 3))
        parts.append(detok.add(out[i : i + n]))
        i += n
    return "".join(parts)


@pytest.fixture(scope="module")
def smol(smollm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


@pytest.fixture(scope="module")
def tiny(tiny_model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _ignore_eos_output(text_ids: list[int], eos: int, rng: random.Random) -> list[int]:
    """text_ids with runs of EOS (0 to 80 long) between pieces, as ignore_eos streams go on."""
    out: list[int] = []
    for i in range(0, len(text_ids), 50):
        out += text_ids[i : i + 50] + [eos] * rng.choice((0, 0, 1, 80))
    return out + [eos] * 500


@pytest.mark.smollm
def test_long_byte_level_output_equals_the_whole_decode_in_linear_cost(smol: Any) -> None:
    text_ids = smol(MULTILINGUAL * 40)["input_ids"]
    out = _ignore_eos_output(text_ids, smol.eos_token_id, random.Random(1))
    garbage = [111 + i % 50 for i in range(2000)]  # lone UTF-8 continuation bytes
    out = out[:2000] + garbage + out[2000:]
    assert len(out) > 6000
    counting = Counting(smol)
    got = _feed(counting, smol("Write:")["input_ids"], out)
    assert got == smol.decode(out, skip_special_tokens=True)
    assert counting.decoded < 40 * len(out)  # a bounded window; the whole run's was ~run^2/2


def test_long_word_level_output_equals_the_whole_decode_in_linear_cost(tiny: Any) -> None:
    rng = random.Random(2)
    words = [rng.randrange(3, 512) for _ in range(3000)]
    out = _ignore_eos_output(words, tiny.eos_token_id, rng)
    prompt = tiny("t5 t6 t7")["input_ids"]
    counting = Counting(tiny)
    got = _feed(counting, prompt, out, seed=3)
    assert tiny.decode(prompt) + got == tiny.decode(prompt + out, skip_special_tokens=True)
    assert counting.decoded < 40 * len(out)


@pytest.mark.parametrize("n", [2000, 8000])
def test_a_run_of_eos_costs_the_same_per_token_however_long(tiny: Any, n: int) -> None:
    """ignore_eos on a model that repeats EOS: nothing to release, ever; the cost per token
    must not depend on the run's length (the window used to hold the whole run)."""
    counting = Counting(tiny)
    detok = IncrementalDetokenizer(counting, tiny("t5")["input_ids"])
    assert all(detok.add([tiny.eos_token_id]) == "" for _ in range(n))
    assert detok.add(tiny("t9")["input_ids"]) == " t9"
    assert counting.decoded < 100 * n
