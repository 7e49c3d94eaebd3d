"""The scheduler's side of mock mode: a model directory with a config and a tokenizer, no weights.

The scheduler tokenizes, checks the context and detokenizes, so it needs a
real tokenizer even when no worker has a model. Mock mode uses a word-level
tokenizer like the tiny test model's (``"t3 t4 ..."`` <-> ids 3, 4, ...; 0-2
are unk/bos/eos), sized to the MockEngine's vocabulary and context: fast to
load, exact to round-trip, and detokenization costs the relay almost nothing.
"""

from __future__ import annotations

import os

from disagg.mock.engine import MOCK_EOS, MOCK_MAX_CONTEXT, MOCK_VOCAB


def default_mock_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "disagg", f"mock-{MOCK_VOCAB}-{MOCK_MAX_CONTEXT}")


def make_mock_model(path: str = "") -> str:
    """Writes the mock model directory (idempotent); returns its path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = path or default_mock_dir()
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    os.makedirs(path, exist_ok=True)
    LlamaConfig(
        vocab_size=MOCK_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=MOCK_MAX_CONTEXT,
        bos_token_id=1,
        eos_token_id=MOCK_EOS,
        pad_token_id=0,
    ).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, MOCK_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return path
