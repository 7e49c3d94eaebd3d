"""The Llama family (Llama 2/3, Qwen2, Mistral) over the paged pool: the engine's own forward.

What it reads from a checkpoint: the same safetensors ``transformers`` loads,
names ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``{input,post_attention}_layernorm``, ``model.embed_tokens``, ``model.norm``,
``lm_head`` (or the embeddings when ``tie_word_embeddings``). Biases are taken
wherever the checkpoint has them (Qwen2's q/k/v, Llama's ``attention_bias`` /
``mlp_bias``). Q, K and V are fused into one matrix, gate and up into another.

One step (every scheduled token of every request flattened into T rows):

1. ``first``: embed, RMSNorm, QKV, RoPE -> q, k, v of layer 0 and the residual;
2. per layer: paged attention (``paged_attention.PagedAttention``: writes K/V
   into the pool, attends over it), then ``mid``: o-proj, residual + RMSNorm,
   SiLU-gated MLP, residual + the next layer's RMSNorm, QKV, RoPE;
3. ``head``: the last layer's o-proj and MLP, final norm on each sequence's
   last token, LM head -> logits.

``first``/``mid``/``head`` are pure functions of tensors, the same for every
layer: compiled once per decode bucket and reused by all layers (compile.py).
Sliding window: honoured per layer (``layer_types`` / ``sliding_window``).
Not covered (the engine falls back to transformers' modules, logged once):
other model types, ``dynamic`` / ``yarn`` / ``longrope`` RoPE, partial rotary,
activations other than SiLU, Qwen3-style q/k norms. Decisions: ADR 0006.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from disagg.engine.attention import PagedMetadata
from disagg.engine.models.layers import (
    Linear,
    add_rms_norm,
    apply_rope,
    can_prepack,
    linear,
    rms_norm,
    rope_cos_sin,
    rope_from_config,
)
from disagg.engine.models.weights import Checkpoint
from disagg.engine.paged_attention import PagedAttention, gathered_decode

MODEL_TYPES = ("llama", "qwen2", "mistral")


class Dims(NamedTuple):
    """Ints and floats a compiled step specialises on (equal values share compiled code)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


class LayerWeights(NamedTuple):
    """One decoder layer; linear entries are ``Linear.arg`` (weight or prepacked key)."""

    ln1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class LlamaSpec:
    """What the forward needs from a transformers config; ``from_config`` says what it rejects."""

    dims: Dims
    num_layers: int
    vocab_size: int
    tie_embeddings: bool
    windows: tuple[int, ...]  # per layer: sliding window in tokens, 0 = full attention
    rope_params: dict[str, Any]

    @classmethod
    def from_config(cls, c: Any) -> LlamaSpec:
        """ValueError (with the reason) for a config this file does not cover."""
        if c.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {c.model_type!r}")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c.hidden_act!r}")
        if getattr(c, "pretraining_tp", 1) not in (None, 1):
            raise ValueError("pretraining_tp > 1")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        rope_params = dict(getattr(c, "rope_parameters", None) or {})
        rope_params.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
        rope_from_config(rope_params, head_dim)  # raises for an uncovered rope type
        return cls(
            dims=Dims(c.num_attention_heads, kv_heads, head_dim, float(c.rms_norm_eps)),
            num_layers=c.num_hidden_layers,
            vocab_size=c.vocab_size,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            windows=_windows(c),
            rope_params=rope_params,
        )


def _windows(c: Any) -> tuple[int, ...]:
    window = getattr(c, "sliding_window", None) or 0
    types = getattr(c, "layer_types", None)
    if types is None:  # Mistral: one window (or none) for every layer
        return (int(window),) * c.num_hidden_layers
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


# ------------------------------------------------------- the step's pieces


def _qkv_rope(
    x: torch.Tensor, lw: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, dims: Dims
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = linear(x, lw.qkv, lw.qkv_bias)
    hq, hkv, d = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.head_dim
    q, k, v = qkv.split([hq, hkv, hkv], dim=-1)
    q = apply_rope(q.view(-1, dims.num_heads, d), cos, sin)
    k = apply_rope(k.view(-1, dims.num_kv_heads, d), cos, sin)
    return q, k, v.reshape(-1, dims.num_kv_heads, d)


def _attn_out_mlp(
    attn: torch.Tensor, residual: torch.Tensor, lw: LayerWeights, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """o-proj, residual + post-attention norm, gated MLP -> (MLP output, residual)."""
    h = linear(attn, lw.o, lw.o_bias)
    x, residual = add_rms_norm(h, residual, lw.ln2, eps)
    gate, up = linear(x, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, lw.down, lw.down_bias), residual


def first(
    ids: torch.Tensor,
    positions: torch.Tensor,
    embed: torch.Tensor,
    inv_freq: torch.Tensor,
    lw: LayerWeights,
    dims: Dims,
) -> tuple[torch.Tensor, ...]:
    """Embedding and layer 0 up to attention: (q, k, v, residual, cos, sin)."""
    h = F.embedding(ids, embed)
    cos, sin = rope_cos_sin(positions, inv_freq, h.dtype)
    q, k, v = _qkv_rope(rms_norm(h, lw.ln1, dims.eps), lw, cos, sin, dims)
    return q, k, v, h, cos, sin


def mid(
    attn: torch.Tensor,
    residual: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lw: LayerWeights,
    nxt: LayerWeights,
    dims: Dims,
) -> tuple[torch.Tensor, ...]:
    """Layer i after its attention, then layer i+1 up to its attention: (q, k, v, residual)."""
    h, residual = _attn_out_mlp(attn, residual, lw, dims.eps)
    x, residual = add_rms_norm(h, residual, nxt.ln1, dims.eps)
    q, k, v = _qkv_rope(x, nxt, cos, sin, dims)
    return q, k, v, residual


def head(
    attn: torch.Tensor,
    residual: torch.Tensor,
    lw: LayerWeights,
    norm: torch.Tensor,
    lm_head: torch.Tensor,
    last: torch.Tensor | None,
    dims: Dims,
) -> torch.Tensor:
    """The last layer after attention, the final norm and the LM head on the ``last`` rows."""
    h, residual = _attn_out_mlp(attn, residual, lw, dims.eps)
    r = residual + h
    if last is not None:
        r = r.index_select(0, last)
    return linear(rms_norm(r, norm, dims.eps), lm_head, None)


@dataclass
class StepFns:
    """The three pieces, each compiled or not (compile.py decides)."""

    first: Any = first
    mid: Any = mid
    head: Any = head


# ----------------------------------------------------------------- the model


class LlamaModel:
    """Weights + the forward over the pool. Stateless between steps; not thread-safe."""

    def __init__(
        self,
        spec: LlamaSpec,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: Linear,
        inv_freq: torch.Tensor,
    ) -> None:
        self.spec = spec
        self.embed, self.layers, self.norm = embed, layers, norm
        self.lm_head, self.inv_freq = lm_head, inv_freq
        scale = spec.dims.head_dim**-0.5
        self.attention = PagedAttention(scale, spec.windows, decode=gathered_decode)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: PagedMetadata,
        last: torch.Tensor | None,
        fns: StepFns,
    ) -> torch.Tensor:
        """Logits [rows of ``last`` (every row if None), vocab] of one step."""
        dims, layers = self.spec.dims, self.layers
        q, k, v, residual, cos, sin = fns.first(
            ids, positions, self.embed, self.inv_freq, layers[0], dims
        )
        after = meta.after_layer
        for i in range(len(layers) - 1):
            attn = self.attention(i, q, k, v, meta)
            if after is not None:
                after(i)
            q, k, v, residual = fns.mid(attn, residual, cos, sin, layers[i], layers[i + 1], dims)
        attn = self.attention(len(layers) - 1, q, k, v, meta)
        if after is not None:
            after(len(layers) - 1)
        return fns.head(attn, residual, layers[-1], self.norm, self.lm_head.arg, last, dims)


def load_llama(config: Any, path: str, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """The model of a checkpoint directory; ValueError when the config is not covered."""
    spec = LlamaSpec.from_config(config)
    ckpt = Checkpoint(path, dtype, device)
    prepack = can_prepack(device, dtype)
    layers = [_layer(ckpt, f"model.layers.{i}.", prepack) for i in range(spec.num_layers)]
    embed = ckpt.get("model.embed_tokens.weight")
    if spec.tie_embeddings:
        lm_weight = embed
    elif "lm_head.weight" in ckpt:
        lm_weight = ckpt.get("lm_head.weight")
    else:  # transformers would start it at random; nothing to reproduce
        raise ValueError("untied embeddings but no lm_head.weight in the checkpoint")
    lm_head = Linear.make(lm_weight, None, prepack)
    inv_freq = rope_from_config(spec.rope_params, spec.dims.head_dim).to(device)
    return LlamaModel(spec, embed, layers, ckpt.get("model.norm.weight"), lm_head, inv_freq)


def _fused(ckpt: Checkpoint, names: list[str], prepack: bool) -> Linear:
    weights = [ckpt.get(n + ".weight") for n in names]
    biases = [ckpt.maybe(n + ".bias") for n in names]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b if b is not None else w.new_zeros(w.shape[0])
                for w, b in zip(weights, biases, strict=True)
            ]
        )
    return Linear.make(torch.cat(weights), bias, prepack)


def _layer(ckpt: Checkpoint, p: str, prepack: bool) -> LayerWeights:
    attn, mlp = p + "self_attn.", p + "mlp."
    qkv = _fused(ckpt, [attn + "q_proj", attn + "k_proj", attn + "v_proj"], prepack)
    o = _fused(ckpt, [attn + "o_proj"], prepack)
    gate_up = _fused(ckpt, [mlp + "gate_proj", mlp + "up_proj"], prepack)
    down = _fused(ckpt, [mlp + "down_proj"], prepack)
    return LayerWeights(
        ln1=ckpt.get(p + "input_layernorm.weight"),
        qkv=qkv.arg,
        qkv_bias=qkv.bias,
        o=o.arg,
        o_bias=o.bias,
        ln2=ckpt.get(p + "post_attention_layernorm.weight"),
        gate_up=gate_up.arg,
        gate_up_bias=gate_up.bias,
        down=down.arg,
        down_bias=down.bias,
    )
