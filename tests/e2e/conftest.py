from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
import torch

from disagg.metastore.embedded import EmbeddedValkey


@pytest.fixture()
def fresh_redis(valkey: EmbeddedValkey) -> str:
    """The shared Valkey, emptied: no worker or KV key of an earlier test survives."""
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    return valkey.url


def make_reference(model_dir: str) -> Callable[[list[int], int], list[int]]:
    """greedy(prompt_ids, n): transformers generate(do_sample=False) new tokens (stops at EOS)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(prompt: list[int], n: int) -> list[int]:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=model.config.eos_token_id,
        )
        return list(out[0, len(prompt) :].tolist())

    return greedy


@pytest.fixture(scope="module")
def tiny_reference(tiny_model: str) -> Callable[[list[int], int], list[int]]:
    return make_reference(tiny_model)
