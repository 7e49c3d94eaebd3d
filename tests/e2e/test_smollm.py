"""The default model end to end: SmolLM2-135M-Instruct, disaggregated, equals generate()."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from disagg.engine.testing import greedy_reference
from disagg.metastore.embedded import EmbeddedValkey
from tests.cluster import Cluster

pytestmark = pytest.mark.smollm

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.\n",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who " * 3,
]


@pytest.fixture(scope="module")
def smol_cluster(smollm_path: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(smollm_path, valkey.url, engine={"num_blocks": 128}).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def smol_reference(smollm_path: str) -> Callable[[list[int], int], list[int]]:
    return greedy_reference(smollm_path)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm_greedy_equals_generate(
    smol_cluster: Cluster, smol_reference: Callable[[list[int], int], list[int]], prompt: str
) -> None:
    tok = smol_cluster.app.orchestrator._tok  # the scheduler's tokenizer
    ids = list(tok(prompt)["input_ids"])
    want = smol_reference(ids, 24)
    got, text, last = smol_cluster.generate(prompt=prompt, max_tokens=24, temperature=0)
    assert got == want
    assert text == tok.decode(want, skip_special_tokens=True)
    assert last.usage.prompt_tokens == len(ids)
    smol_cluster.wait_no_leaks()


def test_smollm_chat_messages(
    smol_cluster: Cluster, smol_reference: Callable[[list[int], int], list[int]]
) -> None:
    tok = smol_cluster.app.orchestrator._tok
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = list(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    want = smol_reference(ids, 40)
    got, text, last = smol_cluster.generate(messages=msgs, max_tokens=40, temperature=0)
    assert got == want
    assert last.finish_reason == ("stop" if len(want) < 40 else "length")
    assert "4" in text and "<|im_end|>" not in text
    smol_cluster.wait_no_leaks()


def test_smollm_multibyte_text_streams_whole_characters(smol_cluster: Cluster) -> None:
    prompt = "Translate to French and add emoji: I love the café 🙂 and 世界."
    got, text, _ = smol_cluster.generate(
        prompt=prompt, max_tokens=40, temperature=0, ignore_eos=True
    )
    tok = smol_cluster.app.orchestrator._tok
    assert "\ufffd" not in text
    assert text == tok.decode(got, skip_special_tokens=True)
