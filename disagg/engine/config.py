"""The engine's configuration: frozen, validated, every field with a default and a one-line doc.

Composed into the worker's ``WorkerConfig`` (disagg.runtime.config), which reads
it from ``DISAGG_*`` variables with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_IMPLS = ("auto", "native", "transformers")
DECODE_KERNELS = ("auto", "torch")


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # local HF model directory; "" = the default SmolLM2-135M-Instruct
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 on CPU)
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # KV blocks in the pool; 0 = derive from kv_cache_mb
    kv_cache_mb: int = 1024  # KV pool size in MiB when num_blocks is 0
    max_num_seqs: int = 64  # requests in one decode batch
    max_num_batched_tokens: int = 2048  # prefill tokens per step (chunk size for long prompts)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    enable_prefix_cache: bool = True  # reuse KV blocks of identical prompt prefixes
    # auto = the engine's own forward (engine/models) where it covers the model type, else
    # transformers' modules (logged once); native = own forward or fail; transformers = theirs.
    model_impl: str = "auto"
    compile: bool = True  # torch.compile the native step (decode buckets, decode attention)
    compile_warmup_s: float = 10.0  # start() compiles decode buckets, smallest first, this long
    # Decode attention of the native path: auto = the C++ kernel (engine/kernels) for an fp32
    # pool on CPU where g++ builds it, else torch's; torch = always torch's (compiled or eager).
    decode_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.num_blocks < 0 or self.kv_cache_mb <= 0:
            raise ValueError("num_blocks must be >= 0 and kv_cache_mb > 0")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be > 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.compile_warmup_s < 0:
            raise ValueError("compile_warmup_s must be >= 0")
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {', '.join(DECODE_KERNELS)}")
