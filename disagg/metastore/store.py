"""MetaStore: the control-plane records in Redis/Valkey, as protobuf messages.

Contract:
- Values are serialized ``disagg.v1.common_pb2`` messages; keys come from
  ``disagg.metastore.keys``, under the store's deployment ``namespace``: a
  store never reads or writes another namespace's keys. Nothing here holds KV
  bytes.
- The URL goes to redis-py unchanged: ``redis://[[user]:password@]host:port/db``,
  ``rediss://`` for TLS (``?ssl_ca_certs=PATH`` etc.), ``unix://``. It may
  carry a password: log ``redacted(url)``, never the URL.
- Worker records expire by TTL (PX), so a dead worker vanishes without anyone
  deleting it. ``list_workers`` is two round trips whatever the number of
  workers (SMEMBERS of the index, then one script that reads every record and
  prunes index entries whose record expired, atomically).
- ``set_kv_state`` is an atomic compare-and-set: a state change is applied
  only if the handle still exists and its state is in ``expected``; the key's
  TTL is kept. It is a GET and a script that swaps the value only if it is
  still the one read (no WATCH: a call cancelled by a deadline must not leave
  a connection watching, whose cleanup would wait out the socket timeout).
- Every call is safe to cancel (``asyncio.timeout``): each is one command,
  one script or one MULTI/EXEC, and redis-py drops a connection whose reply
  was not read.
- Lost connections, refused connections and timeouts raise
  ``MetaStoreUnavailable`` so callers can retry; nothing here retries beyond a
  short reconnect (which also hides a stale pooled connection after a restart).
- ``Heartbeat`` keeps one worker registered and outlives Redis outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from disagg.metastore import keys
from disagg.v1 import common_pb2, control_pb2

log = logging.getLogger(__name__)

# After Redis was unreachable, workers whose records expired meanwhile are still taken
# as registered for this long (their heartbeats could not land either): the scheduler's
# registry routes to them, decode workers pull KV from them.
OUTAGE_GRACE_S = 5.0

_CAS_ATTEMPTS = 64  # lost races tolerated before giving up on one set_kv_state
_SCAN_COUNT = 1000

# KEYS[1] = an index set (workers, scheduler replicas); KEYS[i+1] = the record of ARGV[i].
# Returns the records that exist; drops index entries whose record expired.
_LIST_AND_PRUNE = """
local out = {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    out[#out + 1] = v
  else
    redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return out
"""


# KEYS[1] = a record; ARGV[1] = its value as read, ARGV[2] = the new value.
# 1: swapped (TTL kept); 0: it changed meanwhile; -1: it is gone.
_SWAP_IF_UNCHANGED = """
local v = redis.call('GET', KEYS[1])
if not v then
  return -1
end
if v ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

_ROLES = frozenset({common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_DECODE})


class MetaStoreError(Exception):
    """Base of the errors MetaStore raises on purpose."""


class MetaStoreUnavailable(MetaStoreError):
    """Redis could not be reached (refused, dropped, timed out). Retry later."""


class MetaStoreConflict(MetaStoreError):
    """A compare-and-set lost the race too many times in a row."""


@contextlib.contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        raise MetaStoreUnavailable(f"{type(e).__name__}: {e}") from e


def redacted(url: str) -> str:
    """url with its password (if any) replaced by ``***``: safe to log or print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    # The client does not decode responses, so values are always bytes.
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


def _px(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    return max(1, round(ttl_s * 1000))


class MetaStore:
    """Async client of the control plane. Create and use inside one event loop."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = keys.DEFAULT_NAMESPACE,
        timeout_s: float = 2.0,
        retries: int = 2,
    ) -> None:
        self.url = url
        self.keys = keys.Keys(namespace)
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
        self._list_script = self._client.register_script(_LIST_AND_PRUNE)
        self._swap_script = self._client.register_script(_SWAP_IF_UNCHANGED)
        self.bad_records = 0  # records skipped because they did not parse or made no sense

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        """Returns when Redis answers; MetaStoreUnavailable otherwise."""
        with _unavailable_on_error():
            await self._client.ping()

    # -- worker registry -------------------------------------------------

    async def register_worker(self, info: common_pb2.WorkerInfo, ttl_s: float) -> None:
        """Writes info (a heartbeat); the record vanishes ttl_s after the last one."""
        key = self.keys.worker(info.worker_id)
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(key, info.SerializeToString(), px=_px(ttl_s))
                pipe.sadd(self.keys.worker_index, info.worker_id)
                await pipe.execute()

    async def remove_worker(self, worker_id: str) -> None:
        key = self.keys.worker(worker_id)
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.srem(self.keys.worker_index, worker_id)
                await pipe.execute()

    async def list_workers(
        self, role: common_pb2.WorkerRole | None = None
    ) -> list[common_pb2.WorkerInfo]:
        """Live workers (of role, if given), sorted by worker_id."""
        with _unavailable_on_error():
            ids = sorted(_text(m) for m in await self._client.smembers(self.keys.worker_index))
            if not ids:
                return []
            worker_keys = [self.keys.worker_prefix + i for i in ids]
            raws = await self._list_script(keys=[self.keys.worker_index, *worker_keys], args=ids)
        infos = [i for i in map(self._worker_info, raws) if i is not None]
        return [i for i in infos if role is None or i.role == role]

    def _worker_info(self, raw: bytes | str) -> common_pb2.WorkerInfo | None:
        """One registry record, or None (counted in bad_records) when it is not a usable
        WorkerInfo: Redis is shared infrastructure, and one bad record must not hide
        every good one."""
        try:
            info = common_pb2.WorkerInfo.FromString(_raw(raw))
            keys.check_id(info.worker_id, "worker_id")
        except (DecodeError, ValueError) as e:
            self._bad("worker", e)
            return None
        if info.role not in _ROLES or not info.address or info.layout.block_size <= 0:
            self._bad("worker", ValueError(f"incomplete record of {info.worker_id!r}"))
            return None
        return info

    def _bad(self, kind: str, why: Exception) -> None:
        self.bad_records += 1
        log.warning("skipping a malformed %s record in Redis: %s", kind, why)

    # -- scheduler replicas ----------------------------------------------

    async def put_scheduler_loads(
        self, loads: control_pb2.SchedulerLoads, ttl_s: float, *, push: bool = False
    ) -> None:
        """One replica's in-flight work per worker; it vanishes ttl_s after the last write.
        push: also PUBLISHed to the replicas watching (``watch_scheduler_loads``)."""
        key = self.keys.scheduler(loads.replica_id)
        raw = loads.SerializeToString()
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(key, raw, px=_px(ttl_s))
                pipe.sadd(self.keys.scheduler_index, loads.replica_id)
                if push:
                    pipe.publish(self.keys.scheduler_loads_channel, raw)
                await pipe.execute()

    async def watch_scheduler_loads(
        self, until: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[control_pb2.SchedulerLoads]:
        """The records replicas push, as they come (a dedicated connection); ends when
        until() turns true (checked at least every second), or by raising
        MetaStoreUnavailable when the connection fails."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            with _unavailable_on_error():
                await pubsub.subscribe(self.keys.scheduler_loads_channel)
            while not until():
                with _unavailable_on_error():
                    msg = await pubsub.get_message(timeout=1.0)  # None after 1 s quiet
                if msg is None or msg.get("type") != "message":
                    continue
                try:
                    yield control_pb2.SchedulerLoads.FromString(_raw(msg["data"]))
                except DecodeError as e:
                    self._bad("scheduler", e)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def remove_scheduler(self, replica_id: str) -> None:
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.scheduler(replica_id))
                pipe.srem(self.keys.scheduler_index, replica_id)
                await pipe.execute()

    async def list_scheduler_loads(self) -> list[control_pb2.SchedulerLoads]:
        """Every live replica's record, sorted by replica id."""
        with _unavailable_on_error():
            ids = sorted(_text(m) for m in await self._client.smembers(self.keys.scheduler_index))
            if not ids:
                return []
            record_keys = [self.keys.scheduler_prefix + i for i in ids]
            raws = await self._list_script(keys=[self.keys.scheduler_index, *record_keys], args=ids)
        out = []
        for raw in raws:
            try:
                out.append(control_pb2.SchedulerLoads.FromString(_raw(raw)))
            except DecodeError as e:
                self._bad("scheduler", e)
        return out

    # -- prefix index ----------------------------------------------------

    async def put_prefix_set(self, prefix: control_pb2.PrefixSet, ttl_s: float) -> None:
        """A worker's whole prefix cache, replacing the last one; gone ttl_s after the last write."""
        key = self.keys.prefix_set(prefix.worker_id)
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    key, mapping={"version": prefix.version, "set": prefix.SerializeToString()}
                )
                pipe.pexpire(key, _px(ttl_s))
                await pipe.execute()

    async def touch_prefix_set(self, worker_id: str, ttl_s: float) -> bool:
        """Keeps an unchanged set alive (the worker is); False when there is none any more
        (it expired during an outage, or Redis restarted): write it again."""
        with _unavailable_on_error():
            return bool(await self._client.pexpire(self.keys.prefix_set(worker_id), _px(ttl_s)))

    async def prefix_versions(self, worker_ids: Collection[str]) -> dict[str, int]:
        """worker id -> version of its published set (workers with none omitted)."""
        ids = list(worker_ids)
        if not ids:
            return {}
        with _unavailable_on_error():
            async with self._client.pipeline(transaction=False) as pipe:
                for w in ids:
                    pipe.hget(self.keys.prefix_set(w), "version")
                raws = await pipe.execute()
        return {w: int(v) for w, v in zip(ids, raws, strict=True) if v is not None}

    async def get_prefix_set(self, worker_id: str) -> control_pb2.PrefixSet | None:
        with _unavailable_on_error():
            raw = await self._client.hget(self.keys.prefix_set(worker_id), "set")
        if raw is None:
            return None
        try:
            return control_pb2.PrefixSet.FromString(_raw(raw))
        except DecodeError as e:
            self._bad("prefix", e)
            return None

    # -- supervision -----------------------------------------------------

    async def record_restart(self, service: str, count: int) -> None:
        """``disagg up`` restarted service; count is its total this run."""
        with _unavailable_on_error():
            await self._client.hset(self.keys.restarts, keys.check_id(service, "service"), count)

    async def clear_restarts(self) -> None:
        """A new ``disagg up`` run starts counting from zero."""
        with _unavailable_on_error():
            await self._client.delete(self.keys.restarts)

    async def restarts(self) -> dict[str, int]:
        """Service name -> restarts this run (empty when nothing was restarted)."""
        with _unavailable_on_error():
            raw = await self._client.hgetall(self.keys.restarts)
        return {_text(k): int(v) for k, v in raw.items()}

    # -- KV handles ------------------------------------------------------

    async def put_kv_handle(self, handle: common_pb2.KvHandle, ttl_s: float) -> None:
        """Creates or overwrites the handle (no compare); it expires after ttl_s."""
        key = self.keys.kv(handle.request_id)
        with _unavailable_on_error():
            await self._client.set(key, handle.SerializeToString(), px=_px(ttl_s))

    async def get_kv_handle(self, request_id: str) -> common_pb2.KvHandle | None:
        with _unavailable_on_error():
            raw = await self._client.get(self.keys.kv(request_id))
        return None if raw is None else common_pb2.KvHandle.FromString(_raw(raw))

    async def set_kv_state(
        self,
        request_id: str,
        state: common_pb2.KvState,
        expected: Collection[common_pb2.KvState] | None = None,
    ) -> common_pb2.KvHandle | None:
        """Atomically sets the handle's state if its current state is in expected.

        Returns the updated handle; None if the handle is missing (deleted or
        expired) or its state is not in expected. expected=None: any state.
        """
        key = self.keys.kv(request_id)
        with _unavailable_on_error():
            for _ in range(_CAS_ATTEMPTS):
                raw = await self._client.get(key)
                if raw is None:
                    return None
                handle = common_pb2.KvHandle.FromString(_raw(raw))
                if expected is not None and handle.state not in expected:
                    return None
                handle.state = state
                swapped = await self._swap_script(
                    keys=[key], args=[_raw(raw), handle.SerializeToString()]
                )
                if swapped == 1:
                    return handle
                if swapped == -1:  # deleted or expired meanwhile
                    return None
        raise MetaStoreConflict(f"set_kv_state({request_id}) lost {_CAS_ATTEMPTS} races")

    async def delete_kv_handle(self, request_id: str) -> bool:
        """True if a handle was deleted."""
        with _unavailable_on_error():
            return bool(await self._client.delete(self.keys.kv(request_id)))

    async def list_kv_handles(self) -> list[common_pb2.KvHandle]:
        """Every KV handle, sorted by request_id. A SCAN: for leak checks and debugging."""
        with _unavailable_on_error():
            kv_keys = [k async for k in self._client.scan_iter(self.keys.kv_pattern, _SCAN_COUNT)]
            raws = await self._client.mget(kv_keys) if kv_keys else []
        handles = [common_pb2.KvHandle.FromString(_raw(r)) for r in raws if r is not None]
        return sorted(handles, key=lambda h: h.request_id)

    async def count_kv_keys(self) -> int:
        """Number of KV handle keys (a SCAN; for leak checks)."""
        with _unavailable_on_error():
            return sum([1 async for _ in self._client.scan_iter(self.keys.kv_pattern, _SCAN_COUNT)])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Heartbeat:
    """Keeps one worker registered: calls info_fn every period_s and writes it with ttl_s.

    Lifecycle:
    1. ``await start()``: first registration; raises MetaStoreUnavailable if
       Redis is unreachable (a misconfigured URL should fail the worker's
       start, not leave it silently unregistered).
    2. Background task: every period_s, info_fn() stamped with
       heartbeat_unix_ms is registered. If Redis is unreachable (or was
       restarted and lost everything), it logs once, keeps trying each period
       and re-registers as soon as Redis is back. A beat gets ttl_s - period_s:
       one that hangs (Redis black-holed) is dropped, the next tries afresh.
    3. ``await stop()``: ends the loop (a beat in flight finishes first) and
       removes the worker record (best effort: if Redis is down, the record
       expires by TTL). A Heartbeat is not restartable.
    info_fn must be cheap and must not block: it runs on the event loop.
    """

    def __init__(
        self,
        store: MetaStore,
        info_fn: Callable[[], common_pb2.WorkerInfo],
        period_s: float,
        ttl_s: float,
    ) -> None:
        if period_s <= 0 or ttl_s <= period_s:
            raise ValueError("need 0 < period_s < ttl_s")
        self._store = store
        self._info_fn = info_fn
        self.period_s = period_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._worker_id = ""
        self.healthy = False  # the last beat reached Redis

    async def start(self) -> None:
        if self._task is not None or self._stopping.is_set():
            raise RuntimeError("heartbeat already started (or stopped: not restartable)")
        await self.beat()
        self.healthy = True
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self._worker_id}")

    async def beat(self) -> common_pb2.WorkerInfo:
        """Registers info_fn() now (also usable between periods after a big change)."""
        info = common_pb2.WorkerInfo()
        info.CopyFrom(self._info_fn())
        info.heartbeat_unix_ms = _now_ms()
        self._worker_id = info.worker_id
        await self._store.register_worker(info, self.ttl_s)
        return info

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.period_s
            if await self._stop_requested(max(0.0, next_at - loop.time())):
                return
            next_at = max(next_at, loop.time() - self.period_s)  # no burst after a stall
            await self._beat_logged()

    async def _stop_requested(self, within_s: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), within_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _beat_logged(self) -> None:
        try:
            # A beat stuck on a black-holed connection is abandoned once it could no
            # longer keep the record alive, so the next one (on a fresh connection)
            # re-registers as soon as Redis answers again.
            async with asyncio.timeout(self.ttl_s - self.period_s):
                await self.beat()
        except (MetaStoreUnavailable, TimeoutError) as e:
            if self.healthy:
                log.warning("heartbeat of %s failed, will retry: %s", self._worker_id, e)
            self.healthy = False
            return
        except Exception:
            log.exception("heartbeat of %s failed (info_fn or encoding)", self._worker_id)
            self.healthy = False
            return
        if not self.healthy:
            log.info("heartbeat of %s registered", self._worker_id)
        self.healthy = True

    async def stop(self) -> None:
        """Ends the loop (letting a beat in flight finish), then removes the record."""
        task, self._task = self._task, None
        if task is None:
            return
        # A stop event rather than task.cancel(): redis-py 8.1's asyncio client can
        # swallow a cancellation that lands mid-command, and the loop would go on.
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=self.ttl_s)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=self.ttl_s)
        try:
            await self._store.remove_worker(self._worker_id)
        except MetaStoreUnavailable as e:
            log.warning("could not remove %s (it expires by TTL): %s", self._worker_id, e)
