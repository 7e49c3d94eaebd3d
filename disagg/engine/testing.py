"""Test helpers shared by every test folder: a tiny random-weight Llama on disk and
the transformers greedy reference every serving path must reproduce.

Not used in production code. The model uses a large ``initializer_range`` so its
greedy output depends on the whole context (with the default 0.02 a tiny random
model repeats one token, which hides KV-cache bugs).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

from disagg.engine.api import EngineRequest, RequestMode, SamplingParams
from disagg.engine.config import EngineConfig

TINY_VOCAB = 512
TINY_MAX_CONTEXT = 256
TINY_EOS = 2

GreedyReference = Callable[[Sequence[int], int], list[int]]  # greedy(prompt, n) -> new token ids


def _make_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, TINY_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


def make_tiny_llama(path: str, seed: int = 0) -> str:
    """Writes a tiny random Llama (+ word-level tokenizer "t3 t4 ...") to path; returns path.

    vocab 512, 2 layers, 4 heads / 2 KV heads (GQA), head_dim 16, max context 256,
    eos id 2. Idempotent: an existing model at path is kept.
    """
    return make_tiny_model(path, "llama", seed)


_FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def make_tiny_model(path: str, family: str = "llama", seed: int = 0, **config: Any) -> str:
    """A tiny random model of a family ("llama", "qwen2", "mistral") at path, like
    ``make_tiny_llama``; ``config`` overrides fields of its transformers config
    (rope_scaling, sliding_window, attention_bias, tie_word_embeddings, ...).

    Every bias the model has is drawn at random too (transformers initialises
    them to zero, which would hide a bias the forward forgets).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    fields: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": TINY_MAX_CONTEXT,
        "initializer_range": 0.3,
        "bos_token_id": 1,
        "eos_token_id": TINY_EOS,
        "pad_token_id": 0,
    }
    cfg = getattr(transformers, _FAMILIES[family])(**{**fields, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, cfg.initializer_range)
    model.save_pretrained(path)
    _make_tokenizer(path)
    return path


def greedy_reference(model_dir: str) -> GreedyReference:
    """greedy(prompt, n): the new tokens of transformers ``generate(do_sample=False)``.

    Loads the model once (float32, CPU) and memoizes each (prompt, n). Like the
    engine, generation stops after the model's EOS (its generation_config), so the
    result may be shorter than n and then ends with EOS.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in memo:
            out = model.generate(
                torch.tensor([list(prompt)]),
                # Explicit: inferred from the pad id, it would mask prompt tokens equal to it.
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                # Never written for one row: generate pads only rows that finished while
                # others go on, and a single row ends generation at its EOS. Given only to
                # avoid the "Setting pad_token_id to eos_token_id" fallback warning.
                pad_token_id=0,
            )
            memo[key] = out[0, len(prompt) :].tolist()
        return list(memo[key])

    return greedy


class OutputCollector:
    """Collects TokenOutputs per request id; ``wait`` blocks until all given ids finished."""

    def __init__(self) -> None:
        import threading

        self._cv = threading.Condition()
        self.outputs: dict[str, list] = {}

    def __call__(self, out) -> None:  # type: ignore[no-untyped-def]
        with self._cv:
            self.outputs.setdefault(out.request_id, []).append(out)
            self._cv.notify_all()

    def finished(self, request_id: str) -> bool:
        outs = self.outputs.get(request_id, [])
        return bool(outs) and outs[-1].finish is not None

    def wait(self, request_ids, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        with self._cv:
            ok = self._cv.wait_for(lambda: all(self.finished(r) for r in request_ids), timeout)
        if not ok:
            missing = [r for r in request_ids if not self.finished(r)]
            raise TimeoutError(f"requests not finished: {missing}")

    def tokens(self, request_id: str) -> list[int]:
        return [t for out in self.outputs.get(request_id, []) for t in out.token_ids]

    def finish(self, request_id: str):  # type: ignore[no-untyped-def]
        return self.outputs[request_id][-1].finish


_ids = itertools.count()


def engine_config(model: str, **kw: Any) -> EngineConfig:
    """Small-pool, one-thread EngineConfig for tests."""
    base: dict[str, Any] = {"model": model, "block_size": 16, "num_blocks": 64, "threads": 1}
    base.update(kw)
    return EngineConfig(**base)


def assert_engine_empty(eng: Any) -> None:
    """No block allocated, held or reserved; no request left (vLLM's assert_scheduler_empty)."""
    s = eng.stats()
    assert s.free_blocks == s.total_blocks, f"leaked {s.total_blocks - s.free_blocks} blocks"
    assert s.held == 0 and s.running == 0 and s.waiting == 0
    assert not eng._handoff and not eng._seqs


def request(
    prompt: list[int],
    sink: Any,
    rid: str | None = None,
    mode: RequestMode = RequestMode.GENERATE,
    first_token_id: int | None = None,
    **sampling: Any,
) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    return EngineRequest(
        request_id=rid or f"r{next(_ids)}",
        prompt_token_ids=list(prompt),
        sampling=SamplingParams(**sampling),
        on_output=sink,
        mode=mode,
        first_token_id=first_token_id,
    )


def prompt_of(n: int, seed: int = 0) -> list[int]:
    """n random token ids of the tiny vocabulary (no special ids), reproducible by seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()
