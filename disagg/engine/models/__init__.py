"""The engine's own model files, one per family (as vLLM, SGLang and nano-vllm carry).

``load_native`` returns the model for a checkpoint or raises ValueError saying
why this package does not cover it; the engine then runs ``transformers``'
modules through the paged attention interface instead (attention.py).
"""

from __future__ import annotations

from typing import Any

import torch

from disagg.engine.models.llama import LlamaModel, load_llama

NativeModel = LlamaModel


def load_native(config: Any, path: str, dtype: torch.dtype, device: torch.device) -> NativeModel:
    """The native model of the checkpoint at path; ValueError (the reason) when not covered."""
    return load_llama(config, path, dtype, device)
