"""Frozen, validated configuration of each service.

Every field has a default and a one-line doc. Environment variables are read
in one place (``from_env``) with the ``DISAGG_`` prefix; command-line flags
override them (see disagg.cli).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from disagg.engine.config import EngineConfig
from disagg.runtime.tls import TlsFiles

T = TypeVar("T")

ENV_PREFIX = "DISAGG_"
KV_TRANSPORTS = ("auto", "nixl", "grpc")  # WorkerConfig.kv_transport, --kv-transport


@dataclass(frozen=True)
class WorkerConfig:
    role: str = "prefill"  # prefill | decode
    host: str = "127.0.0.1"  # bind address
    port: int = 0  # gRPC port; 0 = any free port
    advertise_host: str = ""  # host others use to reach this worker; "" = host
    # Control plane URL; it may hold a password, so it stays out of repr.
    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6379/0", repr=False)
    namespace: str = "disagg"  # deployment: prefix of every Redis key ("<namespace>:...")
    worker_id: str = ""  # "" = <role>-<hostname>-<pid>
    heartbeat_s: float = 1.0  # heartbeat period
    heartbeat_ttl_s: float = 3.0  # a worker silent this long vanishes from the registry
    kv_lease_s: float = 30.0  # prefill: held KV not pulled within this is freed
    # "BASE_MS,PER_TOKEN_MS": published as this worker's prefill cost instead of measuring
    # it at startup (profiled offline: no startup prefills, identical workers route alike)
    prefill_cost: str = ""
    max_chunk_bytes: int = 2 << 20  # KV transfer chunk size (under the gRPC message limit)
    transfer_timeout_s: float = 10.0  # decode: a KV pull slower than this fails
    tls_cert: str = ""  # PEM certificate: serve gRPC over TLS (and present it to peers for mTLS)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_ca: str = ""  # PEM CA: verify peers; a server with a CA requires client certificates
    metrics_port: int = -1  # Prometheus /metrics port; -1 = off, 0 = any free port
    mock: bool = False  # model-free MockEngine (disagg.mock): time per its cost model, no weights
    kv_transport: str = "auto"  # KV data plane: auto (nixl where both ends have it) | nixl | grpc
    # gRPC calls served at once, and requests on a decode worker's DecodeSessions: more get
    # RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 1024
    # Shared secret of the deployment: required on worker methods, sent to peers ("" = off).
    cluster_token: str = dataclasses.field(default="", repr=False)
    # The process's garbage collector: startup's objects frozen out of its scans once
    # serving (disagg.runtime.gc_pauses); False: Python's defaults
    gc_freeze: bool = True
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError("role must be prefill or decode")
        if not 0 <= self.port < 65536:
            raise ValueError("port out of range")
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_s")
        if self.kv_lease_s <= 0 or self.transfer_timeout_s <= 0:
            raise ValueError("kv_lease_s and transfer_timeout_s must be > 0")
        if self.max_chunk_bytes < 4096:
            raise ValueError("max_chunk_bytes must be >= 4096")
        if self.prefill_cost:
            self.fixed_prefill_cost()  # raises on a malformed value
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}")
        if self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs must be >= 1")

    def fixed_prefill_cost(self) -> tuple[float, float] | None:
        """(base_ms, per_token_ms) from prefill_cost; None when it is unset (measure)."""
        if not self.prefill_cost:
            return None
        try:
            base, per_token = (float(x) for x in self.prefill_cost.split(","))
        except ValueError:
            raise ValueError(
                f"prefill_cost must be BASE_MS,PER_TOKEN_MS, not {self.prefill_cost!r}"
            ) from None
        if not (math.isfinite(base) and math.isfinite(per_token)) or min(base, per_token) < 0:
            raise ValueError("prefill_cost: both numbers must be finite and >= 0")
        if base + per_token <= 0:
            raise ValueError("prefill_cost: at least one number must be > 0")
        return base, per_token


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = "127.0.0.1"  # bind address
    port: int = 50051  # gRPC port
    http_port: int = 8000  # OpenAI-compatible HTTP port; -1 = off
    # Control plane URL; it may hold a password, so it stays out of repr.
    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6379/0", repr=False)
    namespace: str = "disagg"  # deployment: prefix of every Redis key ("<namespace>:...")
    model: str = ""  # model dir for the tokenizer; "" = the default SmolLM2
    default_max_tokens: int = 256  # max_tokens when a request sets none
    max_inflight: int = 256  # admitted requests at once; more get RESOURCE_EXHAUSTED
    # gRPC calls at once; more: RESOURCE_EXHAUSTED. 0 = max(1024, 2 x max_inflight); set,
    # it must exceed max_inflight (admission answers first, with a retry hint)
    max_concurrent_rpcs: int = 0
    registry_refresh_s: float = 0.25  # how often the worker list is re-read from Redis
    worker_timeout_s: float = 30.0  # deadline of a prefill
    # One DecodeSession stream per decode worker carries its requests; False: a Decode
    # call per request (what workers without the method get anyway)
    decode_sessions: bool = True
    prefill_sessions: bool = True  # the same for prefill workers (PrefillSession)
    gc_freeze: bool = True  # startup's objects frozen out of the garbage collector's scans
    api_key: str = ""  # required as Bearer / authorization metadata when set
    # Shared secret of the deployment, sent on every call to a worker ("" = none).
    cluster_token: str = dataclasses.field(default="", repr=False)
    tls_cert: str = ""  # PEM certificate: serve gRPC over TLS (and present it to peers for mTLS)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_ca: str = ""  # PEM CA: verify peers; a server with a CA requires client certificates
    policy: str = "length_aware"  # routing: length_aware | least_loaded | round_robin
    slo_ttft_ms: float = 0.0  # default TTFT SLO: predicted over it -> 429 at once; 0 = none
    slo_itl_ms: float = 0.0  # default inter-token SLO, same; 0 = none
    local_prefill_tokens: int = 0  # uncached prompts shorter than this prefill on decode; 0 = off
    local_prefill_queue_ms: float = 500.0  # prefill wait from which decode may prefill locally
    prefill_dispatch_depth: int = 2  # prefills in flight per prefill worker; more queue here
    queue_max_wait_ms: float = 2000.0  # a waiting prefill this old goes first (aging bound)
    prefill_base_ms: float = 2.0  # cost-model prior of an unobserved worker: per prefill
    prefill_ms_per_token: float = 0.05  # ... and per uncached prompt token
    decision_log: str = ""  # JSONL file of replayable routing decisions; "" = log lines only
    verify_fraction: float = 0.0  # greedy requests re-run collocated and compared; 0 = none
    # Prompts with at least this many uncached tokens stream their KV layer by layer: the
    # decode worker takes it while the prefill runs (PrefillStream). 0 = off.
    kv_stream_tokens: int = 0
    replica_id: str = ""  # id among replicas sharing Redis; "" = scheduler-<host>-<pid>-<hex>
    reuse_port: bool = False  # SO_REUSEPORT: share the gRPC/HTTP ports with replicas on this host
    max_body_bytes: int = 1 << 20  # largest HTTP body (else 413) / gRPC message accepted
    max_inflight_per_client: int = 0  # per client (API key, else peer address); 0 = no own cap
    client_timeout_s: float = 30.0  # client silent this long (body unsent, stream unread): dropped
    http_keepalive_s: float = 75.0  # an idle HTTP keep-alive connection is closed after this

    @property
    def rpc_limit(self) -> int:
        """The gRPC server's maximum_concurrent_rpcs (max_concurrent_rpcs, 0 resolved)."""
        return self.max_concurrent_rpcs or max(1024, 2 * self.max_inflight)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port out of range")
        if self.default_max_tokens <= 0 or self.max_inflight <= 0:
            raise ValueError("default_max_tokens and max_inflight must be > 0")
        if self.max_concurrent_rpcs < 0 or 0 < self.max_concurrent_rpcs <= self.max_inflight:
            raise ValueError("max_concurrent_rpcs must exceed max_inflight (0: derived from it)")
        if self.policy not in ("length_aware", "least_loaded", "round_robin"):
            raise ValueError(f"unknown policy {self.policy!r}")
        if min(self.slo_ttft_ms, self.slo_itl_ms, self.local_prefill_tokens) < 0:
            raise ValueError("slo_ttft_ms, slo_itl_ms and local_prefill_tokens must be >= 0")
        if self.kv_stream_tokens < 0:
            raise ValueError("kv_stream_tokens must be >= 0")
        if self.prefill_dispatch_depth <= 0 or self.queue_max_wait_ms <= 0:
            raise ValueError("prefill_dispatch_depth and queue_max_wait_ms must be > 0")
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError("verify_fraction must be in [0, 1]")
        if self.max_body_bytes < 1024 or self.max_inflight_per_client < 0:
            raise ValueError("max_body_bytes must be >= 1024 and max_inflight_per_client >= 0")
        if self.client_timeout_s <= 0 or self.http_keepalive_s <= 0:
            raise ValueError("client_timeout_s and http_keepalive_s must be > 0")


# Scheduler routing/admission flags: (flag, type, help); `up` forwards the ones given.
POLICY_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--policy", str, "routing: length_aware (default) | least_loaded | round_robin"),
    ("--slo-ttft-ms", float, "default TTFT SLO: a request predicted to miss it gets 429 at once"),
    ("--slo-itl-ms", float, "default inter-token latency SLO, same"),
    (
        "--local-prefill-tokens",
        int,
        "uncached prompts shorter than this prefill on decode (0 = off)",
    ),
    ("--local-prefill-queue-ms", float, "prefill wait from which decode may prefill locally"),
    ("--prefill-dispatch-depth", int, "prefills in flight per prefill worker; more queue here"),
    ("--queue-max-wait-ms", float, "aging bound: a prefill waiting this long goes first"),
    ("--decision-log", str, "append every routing decision, replayable, to this JSONL file"),
    (
        "--verify-fraction",
        float,
        "fraction of greedy requests re-run collocated in the background and compared "
        "(disagg:verify_total); 0 = off",
    ),
    (
        "--kv-stream-tokens",
        int,
        "prompts with at least this many uncached tokens hand their KV to the decode worker "
        "layer by layer while the prefill runs (layer-wise streaming); 0 = off (default)",
    ),
    (
        "--max-body-bytes",
        int,
        "largest HTTP body (larger: 413) and gRPC message (larger: RESOURCE_EXHAUSTED); 1 MiB",
    ),
    (
        "--max-inflight-per-client",
        int,
        "requests one client (its API key, else its address) may have in flight; more get "
        "429 / RESOURCE_EXHAUSTED at once (0 = no per-client cap, the default)",
    ),
    (
        "--client-timeout-s",
        float,
        "a client that sends no more of its body, or reads none of its stream, for this long "
        "is dropped: its request cancelled, its slot and KV freed (default 30)",
    ),
    ("--http-keepalive-s", float, "idle HTTP keep-alive connections close after this (75)"),
)


def _coerce(value: str, kind: Any) -> Any:
    if kind in (bool, "bool"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return value


def from_env(cls: type[T], env: dict[str, str] | None = None, prefix: str = ENV_PREFIX) -> T:
    """Builds cls from DISAGG_<FIELD> variables (nested EngineConfig fields too)."""
    env = dict(os.environ) if env is None else env
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == "engine":
            kwargs["engine"] = from_env(EngineConfig, env, prefix)
            continue
        key = prefix + f.name.upper()
        if key in env:
            kwargs[f.name] = _coerce(env[key], f.type)
    return cls(**kwargs)


def override(cfg: T, **changes: Any) -> T:
    """cfg with the non-None changes applied (command-line flags over env)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]


def tls_of(cfg: WorkerConfig | SchedulerConfig) -> TlsFiles:
    return TlsFiles(cert=cfg.tls_cert, key=cfg.tls_key, ca=cfg.tls_ca)
