"""The building blocks of the engine's own model files: linear layers, RMSNorm, RoPE.

Pure functions over tensors, written to be traced by ``torch.compile`` (no
Python state read inside them) and to reproduce ``transformers``' arithmetic
(RMSNorm in float32, RoPE from the same inverse frequencies).

Linear layers on CPU keep their weights prepacked for oneDNN (the blocked
layout its GEMM kernels read): measured on this machine 1.3-1.7x the MKL
``F.linear`` of the same fp32 weights at 32-64 rows (docs/adr/0006). Inside a
compiled graph a prepacked weight cannot be an input (its layout is opaque),
so the graph sees a small *key* tensor and calls ``disagg::linear``, a custom
op that looks the packed weight up by that key.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# key.data_ptr() -> (prepacked weight, bias); an entry lives as long as its key tensor.
_PACKED: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}


@torch.library.custom_op("disagg::linear", mutates_args=())
def _packed_linear(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    weight, bias = _PACKED[key.data_ptr()]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_packed_linear.register_fake
def _(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], key.shape[0])


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking: CPU, fp32 (bf16 only where the CPU has native bf16 FMAs)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass(frozen=True)
class Linear:
    """y = x @ weight.T + bias. ``arg`` is what a compiled graph takes: the weight, or a key."""

    arg: torch.Tensor  # dense weight [out, in], or a uint8 key [out, 1] of a prepacked one
    bias: torch.Tensor | None

    @classmethod
    def make(cls, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool) -> Linear:
        if not prepack:
            return cls(weight, bias)
        # The batch-size hint only picks the blocking; any row count works (ADR 0006).
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        key = torch.empty(weight.shape[0], 1, dtype=torch.uint8)
        _PACKED[key.data_ptr()] = (packed, bias)
        weakref.finalize(key, _PACKED.pop, key.data_ptr(), None)
        return cls(key, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.arg, self.bias)


def linear(x: torch.Tensor, arg: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear over a ``Linear.arg`` (traceable: the branch is on a dtype, which a graph guards)."""
    if arg.dtype == torch.uint8:
        return _packed_linear(x, arg)
    return F.linear(x, arg, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    r = residual + x
    return rms_norm(r, weight, eps), r


# ------------------------------------------------------------------ RoPE


ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_config(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32) for a config's ``rope_parameters``;
    ValueError for a type it does not cover. (Their ``attention_scaling`` is 1.)

    default / linear / llama3 are static: a token's rotation depends only on its
    position, as the paged pool needs (its K is written once). ``dynamic`` NTK
    rescales every cached key with the longest sequence of the current batch,
    which a pool shared by batches of any composition cannot reproduce.
    """
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} (the native path covers {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1")
    base = float(params["rope_theta"])
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (base**exponent)
    if kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (transformers' _compute_llama3_parameters)."""
    factor, low, high = (
        float(p["factor"]),
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
    )
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim / 2] of each token's position (float32 angles, as transformers)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated by half (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
