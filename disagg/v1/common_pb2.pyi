from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STATE_UNSPECIFIED: _ClassVar[KvState]
    KV_STATE_PREFILLING: _ClassVar[KvState]
    KV_STATE_READY: _ClassVar[KvState]
    KV_STATE_TRANSFERRING: _ClassVar[KvState]
    KV_STATE_CONSUMED: _ClassVar[KvState]
    KV_STATE_EXPIRED: _ClassVar[KvState]
    KV_STATE_FAILED: _ClassVar[KvState]

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
KV_STATE_UNSPECIFIED: KvState
KV_STATE_PREFILLING: KvState
KV_STATE_READY: KvState
KV_STATE_TRANSFERRING: KvState
KV_STATE_CONSUMED: KvState
KV_STATE_EXPIRED: KvState
KV_STATE_FAILED: KvState
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "kv_transfer_ms", "decode_ms", "ttft_ms", "e2e_ms", "kv_transport")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    ttft_ms: float
    e2e_ms: float
    kv_transport: str
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., kv_transfer_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., kv_transport: _Optional[str] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("request_id", "owner_worker_id", "owner_address", "block_ids", "num_tokens", "layout", "state", "lease_expires_unix_ms", "first_token_id", "nixl")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NIXL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    owner_worker_id: str
    owner_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    layout: KvLayout
    state: KvState
    lease_expires_unix_ms: int
    first_token_id: int
    nixl: NixlPool
    def __init__(self, request_id: _Optional[str] = ..., owner_worker_id: _Optional[str] = ..., owner_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., state: _Optional[_Union[KvState, str]] = ..., lease_expires_unix_ms: _Optional[int] = ..., first_token_id: _Optional[int] = ..., nixl: _Optional[_Union[NixlPool, _Mapping]] = ...) -> None: ...

class NixlPool(_message.Message):
    __slots__ = ("agent_name", "mem_type", "device_id", "k_addrs", "v_addrs", "block_bytes", "num_blocks")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    K_ADDRS_FIELD_NUMBER: _ClassVar[int]
    V_ADDRS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    mem_type: str
    device_id: int
    k_addrs: _containers.RepeatedScalarFieldContainer[int]
    v_addrs: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    num_blocks: int
    def __init__(self, agent_name: _Optional[str] = ..., mem_type: _Optional[str] = ..., device_id: _Optional[int] = ..., k_addrs: _Optional[_Iterable[int]] = ..., v_addrs: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class GpuTelemetry(_message.Message):
    __slots__ = ("available", "name", "utilization_pct", "memory_used_bytes", "memory_total_bytes", "sm_clock_mhz", "power_w", "unavailable_reason")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    available: bool
    name: str
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    sm_clock_mhz: int
    power_w: float
    unavailable_reason: str
    def __init__(self, available: _Optional[bool] = ..., name: _Optional[str] = ..., utilization_pct: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ..., power_w: _Optional[float] = ..., unavailable_reason: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "model", "layout", "free_blocks", "total_blocks", "queued_prefill_tokens", "running_requests", "waiting_requests", "max_context", "started_unix_ms", "heartbeat_unix_ms", "gpu", "pid", "prefill_base_ms", "prefill_ms_per_token", "kv_transports")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BASE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    model: str
    layout: KvLayout
    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int
    running_requests: int
    waiting_requests: int
    max_context: int
    started_unix_ms: int
    heartbeat_unix_ms: int
    gpu: GpuTelemetry
    pid: int
    prefill_base_ms: float
    prefill_ms_per_token: float
    kv_transports: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., max_context: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., heartbeat_unix_ms: _Optional[int] = ..., gpu: _Optional[_Union[GpuTelemetry, _Mapping]] = ..., pid: _Optional[int] = ..., prefill_base_ms: _Optional[float] = ..., prefill_ms_per_token: _Optional[float] = ..., kv_transports: _Optional[_Iterable[str]] = ...) -> None: ...
