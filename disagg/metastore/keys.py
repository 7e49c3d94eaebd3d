"""Every Redis key disagg uses, named in one place, under a deployment namespace.

All keys of a deployment start with ``<namespace>:`` (default ``disagg:``), so
one Redis can hold several deployments and other data, and leak checks can
scan exactly one deployment's keyspace. A namespace is a short run of
``[A-Za-z0-9_.-]``: no ``:`` (``a`` and ``a:kv`` would share keys) and no glob
character (patterns below would match the wrong keys). Ids are validated here
too: an empty id or one containing glob characters would make patterns match
the wrong keys.

The module-level names (``KV_PATTERN``, ``worker_key`` ...) are those of the
default namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_NAMESPACE = "disagg"

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FORBIDDEN = frozenset("*?[]\\ \n\r\t")


def check_id(value: str, what: str = "id") -> str:
    """value if it is a usable key component; ValueError otherwise."""
    if not value or any(c in _FORBIDDEN for c in value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def check_namespace(value: str) -> str:
    """value if it is a usable namespace (1-64 of ``A-Za-z0-9_.-``); ValueError otherwise."""
    if not _NAMESPACE.fullmatch(value):
        raise ValueError(f"invalid namespace {value!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class Keys:
    """The key names of one deployment."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    @property
    def prefix(self) -> str:
        return self.namespace + ":"

    @property
    def worker_prefix(self) -> str:  # + worker_id -> WorkerInfo (TTL = heartbeat ttl)
        return self.prefix + "worker:"

    @property
    def worker_index(self) -> str:  # set of worker ids; pruned of expired entries on read
        return self.prefix + "workers"

    @property
    def kv_prefix(self) -> str:  # + request_id -> KvHandle (TTL >= its lease)
        return self.prefix + "kv:"

    @property
    def scheduler_prefix(self) -> str:  # + replica_id -> SchedulerLoads (TTL: a few refreshes)
        return self.prefix + "scheduler:"

    @property
    def scheduler_index(self) -> str:  # set of replica ids; pruned of expired entries on read
        return self.prefix + "schedulers"

    @property
    def scheduler_loads_channel(self) -> str:  # pub/sub: SchedulerLoads pushed on change
        return self.prefix + "scheduler-loads"

    @property
    def prefix_set_prefix(self) -> str:  # + worker_id -> hash {version, set: PrefixSet} (TTL)
        return self.prefix + "prefix:"

    @property
    def restarts(self) -> str:  # hash: service name -> times `disagg up` restarted it
        return self.prefix + "restarts"

    @property
    def worker_pattern(self) -> str:
        return self.worker_prefix + "*"

    @property
    def kv_pattern(self) -> str:
        return self.kv_prefix + "*"

    @property
    def pattern(self) -> str:
        """Every key of this deployment."""
        return self.prefix + "*"

    def worker(self, worker_id: str) -> str:
        return self.worker_prefix + check_id(worker_id, "worker_id")

    def kv(self, request_id: str) -> str:
        return self.kv_prefix + check_id(request_id, "request_id")

    def scheduler(self, replica_id: str) -> str:
        return self.scheduler_prefix + check_id(replica_id, "replica_id")

    def prefix_set(self, worker_id: str) -> str:
        return self.prefix_set_prefix + check_id(worker_id, "worker_id")


DEFAULT = Keys()

PREFIX = DEFAULT.prefix
WORKER_PREFIX = DEFAULT.worker_prefix
WORKER_INDEX = DEFAULT.worker_index
KV_PREFIX = DEFAULT.kv_prefix
SCHEDULER_PREFIX = DEFAULT.scheduler_prefix
SCHEDULER_INDEX = DEFAULT.scheduler_index
PREFIX_SET_PREFIX = DEFAULT.prefix_set_prefix
RESTARTS = DEFAULT.restarts
WORKER_PATTERN = DEFAULT.worker_pattern
KV_PATTERN = DEFAULT.kv_pattern


def worker_key(worker_id: str) -> str:
    return DEFAULT.worker(worker_id)


def kv_key(request_id: str) -> str:
    return DEFAULT.kv(request_id)


def scheduler_key(replica_id: str) -> str:
    return DEFAULT.scheduler(replica_id)


def prefix_set_key(worker_id: str) -> str:
    return DEFAULT.prefix_set(worker_id)
