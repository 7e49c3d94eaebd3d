"""Every Redis key disagg uses, named in one place.

All keys start with ``disagg:`` so a shared Redis can hold other data, and so
leak checks can scan exactly our keyspace. Ids are validated here: an empty id
or one containing glob characters would make patterns below match the wrong
keys.
"""

from __future__ import annotations

PREFIX = "disagg:"

WORKER_PREFIX = PREFIX + "worker:"  # + worker_id -> WorkerInfo (TTL = heartbeat ttl)
WORKER_INDEX = PREFIX + "workers"  # set of worker ids; pruned of expired entries on read
KV_PREFIX = PREFIX + "kv:"  # + request_id -> KvHandle (TTL >= its lease)
SCHEDULER_PREFIX = PREFIX + "scheduler:"  # + replica_id -> SchedulerLoads (TTL: a few refreshes)
SCHEDULER_INDEX = PREFIX + "schedulers"  # set of replica ids; pruned of expired entries on read
PREFIX_SET_PREFIX = PREFIX + "prefix:"  # + worker_id -> hash {version, set: PrefixSet} (TTL)
RESTARTS = PREFIX + "restarts"  # hash: service name -> times `disagg up` restarted it

WORKER_PATTERN = WORKER_PREFIX + "*"
KV_PATTERN = KV_PREFIX + "*"

_FORBIDDEN = frozenset("*?[]\\ \n\r\t")


def check_id(value: str, what: str = "id") -> str:
    """value if it is a usable key component; ValueError otherwise."""
    if not value or any(c in _FORBIDDEN for c in value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def worker_key(worker_id: str) -> str:
    return WORKER_PREFIX + check_id(worker_id, "worker_id")


def kv_key(request_id: str) -> str:
    return KV_PREFIX + check_id(request_id, "request_id")


def scheduler_key(replica_id: str) -> str:
    return SCHEDULER_PREFIX + check_id(replica_id, "replica_id")


def prefix_set_key(worker_id: str) -> str:
    return PREFIX_SET_PREFIX + check_id(worker_id, "worker_id")
