"""The tokenizer and the limits the scheduler needs, without loading weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: Any
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def load_tokenizer(path: str) -> TokenizerInfo:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    try:
        eos = _as_ids(GenerationConfig.from_pretrained(path).eos_token_id)
    except OSError:
        eos = ()
    eos = eos or _as_ids(cfg.eos_token_id) or _as_ids(tok.eos_token_id)
    return TokenizerInfo(tok, int(cfg.vocab_size), int(cfg.max_position_embeddings), eos)
