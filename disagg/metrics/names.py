"""Metric names and buckets (``disagg:`` prefix, as vLLM's ``vllm:``)."""

from __future__ import annotations

PREFIX = "disagg:"

TTFT = PREFIX + "time_to_first_token_seconds"
ITL = PREFIX + "inter_token_latency_seconds"
E2E = PREFIX + "e2e_request_latency_seconds"
QUEUE = PREFIX + "queue_time_seconds"
PREFILL = PREFIX + "prefill_time_seconds"
KV_TRANSFER = PREFIX + "kv_transfer_time_seconds"
DECODE = PREFIX + "decode_time_seconds"

KV_TRANSFER_BYTES = PREFIX + "kv_transfer_bytes"  # counter; exposed with _total
# A decode worker's own view of its KV imports, label transport (nixl | grpc):
KV_TRANSFER_SECONDS = PREFIX + "kv_transfer_seconds"  # histogram: reserve until verified
KV_TRANSFER_RECEIVED_BYTES = PREFIX + "kv_transfer_received_bytes"  # counter (_total)
KV_TRANSFER_FAILURES = PREFIX + "kv_transfer_failures"  # counter (_total): fell back to local
REQUESTS = PREFIX + "requests"  # counter, label finish_reason
REJECTED = PREFIX + "requests_rejected"  # counter, label reason
MIGRATIONS = PREFIX + "request_migrations"  # counter: streams moved off a lost decode worker
PREFIX_QUERIES = PREFIX + "prefix_cache_queries"  # counter (prompt tokens looked up)
PREFIX_HITS = PREFIX + "prefix_cache_hits"  # counter (prompt tokens served from the cache)
SLO_MET = PREFIX + "slo_met"  # counter
VERIFY = PREFIX + "verify"  # counter, label result: match | mismatch (online correctness checks)
VERIFY_SKIPPED = PREFIX + "verify_skipped"  # counter, label reason: queue_full | error
REGISTRY_BAD_RECORDS = PREFIX + "registry_bad_records"  # counter: malformed Redis records skipped
SERVICE_RESTARTS = PREFIX + "service_restarts"  # counter, label service: restarts by `disagg up`
GC_PAUSE = PREFIX + "gc_pause_seconds"  # histogram, label generation: the collector's stalls

RUNNING = PREFIX + "requests_running"
WAITING = PREFIX + "requests_waiting"
BLOCKS_USED = PREFIX + "kv_cache_blocks_used"
BLOCKS_TOTAL = PREFIX + "kv_cache_blocks_total"

# GPU of a worker (NVML, read at scrape time), labels worker, role, gpu. Without a
# driver only GPU_AVAILABLE is exposed (0): no utilization sample at all, not a 0.
GPU_AVAILABLE = PREFIX + "gpu_available"
GPU_UTILIZATION = PREFIX + "gpu_utilization_percent"
GPU_MEMORY_USED = PREFIX + "gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = PREFIX + "gpu_memory_total_bytes"
GPU_SM_CLOCK = PREFIX + "gpu_sm_clock_mhz"
GPU_POWER = PREFIX + "gpu_power_watts"

# Seconds. Fine at the low end: a tiny model on CPU answers in milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                   0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip
