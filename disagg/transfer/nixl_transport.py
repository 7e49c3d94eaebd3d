"""The NIXL transport: the decode worker READs the owner's blocks straight into its own.

Each worker process has one NIXL agent (``NixlAgent``, UCX backend: shared
memory or TCP here, RDMA or NVLink on GPU hosts) that registers the worker's
whole KV pool once, at startup: per layer, K and V are one region each (host
tensors on CPU, device tensors on CUDA). The owner puts its pool -- agent name,
region base addresses, block stride (``handle.NixlPool``) -- in every handle it
publishes. Nothing of NIXL passes through pickle: the agent metadata is NIXL's
own binary encoding in a protobuf bytes field, and descriptors are built here
from the handle's integers (NIXL refuses any that fall outside what the owner
registered).

One pull, receiver side (``NixlTransport.fetch``):
1. ``PrefillWorker/StartKvRead``: READY -> TRANSFERRING on the owner (one
   reader; the lease is re-armed). The first time this agent is seen its
   metadata comes back, is loaded (``add_remote_agent``) and the owner's pool
   descriptors are prepared once; later pulls reuse them.
2. One READ of K and V of every layer of every block, owner block b -> reserved
   block dst[i] (NIXL merges runs of contiguous blocks), posted and polled on
   the agent's own thread, so the event loop never waits on the copy.
3. The receiver verifies, then has the owner release the blocks as CONSUMED:
   the answer must say they were still held (``reads_without_owner``), else a
   lease that ran out mid-READ may have given them to another request.
On cancellation (the receiver's deadline) the READ is cancelled, or waited out,
before fetch returns, since the destination blocks go back to the pool right
after. A dead owner ends the READ in an error (or at the deadline): FAILED.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from disagg.engine.api import Engine
from disagg.engine.kv_cache import KVCache
from disagg.engine.threads import serial
from disagg.transfer import verify
from disagg.transfer.errors import ReadInFlight, TransferError
from disagg.transfer.grpc_transport import release_kv
from disagg.transfer.handle import Handle, NixlPool, nixl_pool_from_pb
from disagg.transfer.progress import Follower, completed, readable
from disagg.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# The NIXL Python API ships as nixl-cu12 / nixl-cu13 (module nixl_cu12 / nixl_cu13);
# the `nixl` meta package re-exports one of them as `nixl`.
_MODULES = ("nixl_cu12", "nixl_cu13", "nixl")
_POLL_S = 0.0005  # between two polls of a READ in flight
# NIXL's progress thread polls UCX's event fd with this timeout. The Python API
# hardcodes 0, a busy loop: measured here, an idle agent then burns ~65 % of a
# core -- every worker process, all the time. 1 ms: it still wakes at once on an
# event, and idles at ~1 % (``_agent_with_progress_delay``).
_PROGRESS_DELAY_US = 1000
_CONFIG_LOCK = threading.Lock()
_STOP_WAIT_S = 30.0  # a READ that can be neither cancelled nor finished within this: quarantined


def nixl_api() -> Any | None:
    """The NIXL Python API module, or None when no variant of it is installed."""
    for name in _MODULES:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError:
            continue
    return None


class NixlUnavailable(RuntimeError):
    """This worker cannot have a NIXL agent (no NIXL installed, or no KV tensors)."""


@dataclass
class _Remote:
    pool: NixlPool
    dlist: Any  # prepared descriptors of the owner's whole pool


def pool_descs(pool: NixlPool) -> np.ndarray:
    """Nx3 (address, length, device) rows: every block of every region, in index order."""
    bases = np.array([*pool.k_addrs, *pool.v_addrs], dtype=np.uint64)
    offsets = np.arange(pool.num_blocks, dtype=np.uint64) * np.uint64(pool.block_bytes)
    addrs = (bases[:, None] + offsets[None, :]).reshape(-1)
    return np.stack(
        [addrs, np.full_like(addrs, pool.block_bytes), np.full_like(addrs, pool.device_id)], axis=1
    )


def desc_indices(pool: NixlPool, blocks: list[int]) -> np.ndarray:
    """Indices into ``pool_descs(pool)`` of these blocks in every region (region-major)."""
    regions = np.arange(len(pool.k_addrs) + len(pool.v_addrs), dtype=np.int64)[:, None]
    idx = regions * pool.num_blocks + np.asarray(blocks, dtype=np.int64)[None, :]
    return idx.reshape(-1).astype(np.int32)


def layer_indices(pool: NixlPool, parts: list[tuple[int, list[int]]]) -> np.ndarray:
    """Indices into ``pool_descs(pool)`` of K, then V, of each (layer, blocks) part."""
    num_layers = len(pool.k_addrs)
    rows: list[np.ndarray] = []
    for layer, blocks in parts:
        b = np.asarray(blocks, dtype=np.int64)
        rows += [layer * pool.num_blocks + b, (num_layers + layer) * pool.num_blocks + b]
    return np.concatenate(rows).astype(np.int32) if rows else np.empty(0, dtype=np.int32)


def describe_pool(agent_name: str, kv: KVCache) -> NixlPool:
    k0 = kv.k[0]
    return NixlPool(
        agent_name=agent_name,
        mem_type="VRAM" if k0.is_cuda else "DRAM",
        device_id=(k0.device.index or 0) if k0.is_cuda else 0,
        k_addrs=tuple(t.data_ptr() for t in kv.k),
        v_addrs=tuple(t.data_ptr() for t in kv.v),
        block_bytes=kv.layout.bytes_per_block_per_layer,
        num_blocks=kv.num_blocks,
    )


def _agent_with_progress_delay(api: Any, name: str) -> Any:
    """``nixl_agent(name)`` (UCX, progress thread on) whose progress thread waits up to
    _PROGRESS_DELAY_US for events instead of spinning: the one setting the Python API
    does not expose, applied to the config object it builds (a subclass of the
    binding's config type, swapped in for the constructor's duration only)."""
    base = api.nixlBind.nixlAgentConfig

    class _Config(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, field: str, value: Any) -> None:
            super().__setattr__(field, _PROGRESS_DELAY_US if field == "pthrDelay" else value)

    with _CONFIG_LOCK:
        api.nixlBind.nixlAgentConfig = _Config
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        finally:
            api.nixlBind.nixlAgentConfig = base


class NixlAgent:
    """One worker's NIXL agent: its whole KV pool registered once; READs into it.

    After construction every NIXL call runs on the agent's own thread, one at a
    time, so the agent is never used from two threads at once."""

    def __init__(self, engine: Engine, worker_id: str, loopback_only: bool = True):
        """Raises NixlUnavailable when NIXL is not installed or the engine has no KV tensors.

        loopback_only (a worker bound to loopback): UCX uses no network device but
        ``lo`` (``UCX_NET_DEVICES``, unless set already), so its listening sockets
        stay on 127.0.0.1 like every other socket of the worker; shared memory is
        unaffected."""
        api = nixl_api()
        if api is None:
            raise NixlUnavailable("NIXL is not installed (pip install 'disagg[nixl]')")
        kv = verify.kv_pool(engine)
        if kv is None:
            raise NixlUnavailable("the engine has no KV tensors to register (mock engine)")
        self.name = f"{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if loopback_only:
            os.environ.setdefault("UCX_NET_DEVICES", "lo")  # read by UCX as the agent starts
        self._agent = _agent_with_progress_delay(api, self.name)
        if "UCX" not in self._agent.backends:
            raise NixlUnavailable("NIXL has no UCX backend here")
        self._kv = kv  # keeps the registered tensors alive as long as the agent
        self._registered = self._agent.register_memory([*kv.k, *kv.v])
        self.pool = describe_pool(self.name, kv)
        self.metadata: bytes = self._agent.get_agent_metadata()
        self._local = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", pool_descs(self.pool), self.pool.mem_type
        )
        self._remotes: dict[str, _Remote] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="nixl")
        log.info(
            "nixl agent %s registered %d KV regions (%s, %d blocks)",
            self.name,
            2 * len(kv.k),
            self.pool.mem_type,
            kv.num_blocks,
        )

    def knows(self, agent_name: str) -> bool:
        return agent_name in self._remotes

    async def add_remote(
        self, pool: NixlPool, metadata: bytes, owners_pool: NixlPool | None = None
    ) -> None:
        """Loads the owner's agent (metadata, when not yet known) and prepares its pool.

        pool: a handle's (relayed by others); owners_pool: the owner's own account,
        which comes with the metadata. They must agree, then and at every later pull."""
        known = self._remotes.get(pool.agent_name)
        if known is not None:
            if known.pool != pool:
                raise TransferError(f"the handle's pool is not agent {pool.agent_name}'s")
            return
        if not metadata:
            raise TransferError(f"no metadata for the unknown agent {pool.agent_name}")
        if owners_pool is not None and owners_pool != pool:
            raise TransferError(f"the handle's pool is not agent {pool.agent_name}'s")
        await self._call(self._load, pool, metadata)

    def _load(self, pool: NixlPool, metadata: bytes) -> None:
        if pool.agent_name in self._remotes:  # loaded by a concurrent pull meanwhile
            return
        try:
            name = self._agent.add_remote_agent(metadata)
        except Exception as e:
            raise TransferError(f"NIXL agent metadata refused: {e}") from e
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != pool.agent_name:
            self._agent.remove_remote_agent(name)
            raise TransferError(f"metadata is of agent {name}, the handle names {pool.agent_name}")
        try:
            dlist = self._agent.prep_xfer_dlist(name, pool_descs(pool), pool.mem_type)
        except Exception as e:  # addresses outside what the owner registered
            self._agent.remove_remote_agent(name)
            raise TransferError(f"pool of agent {name} not registered as described: {e}") from e
        self._remotes[name] = _Remote(pool, dlist)

    async def read(self, remote: str, src: list[int], dst: list[int]) -> int:
        """READs K and V of every layer of the owner's blocks src into our blocks dst;
        returns the bytes moved. Returns or raises only once the READ is over."""
        r = self._remotes[remote]
        return await self._read(r, desc_indices(self.pool, dst), desc_indices(r.pool, src))

    async def read_layers(self, remote: str, parts: list[tuple[int, list[int], list[int]]]) -> int:
        """One READ of K and V of each (layer, owner's blocks, our blocks) part; as ``read``."""
        r = self._remotes[remote]
        local_idx = layer_indices(self.pool, [(layer, dst) for layer, _, dst in parts])
        remote_idx = layer_indices(r.pool, [(layer, src) for layer, src, _ in parts])
        return await self._read(r, local_idx, remote_idx)

    async def _read(self, r: _Remote, local_idx: np.ndarray, remote_idx: np.ndarray) -> int:
        remote = r.pool.agent_name
        posting = asyncio.get_running_loop().run_in_executor(
            self._thread, self._post, r, local_idx, remote_idx
        )
        try:
            xfer, state = await asyncio.shield(posting)
        except asyncio.CancelledError:  # the post goes on (it may be copying): stop what it began
            xfer, _ = await posting
            await self._call(self._stop, xfer)
            raise
        try:
            while state == "PROC":
                await asyncio.sleep(_POLL_S)
                state = await self._call(self._agent.check_xfer_state, xfer)
        except BaseException:
            await self._call(self._stop, xfer)
            raise
        await self._call(xfer.release)
        if state != "DONE":
            raise TransferError(f"NIXL READ from agent {remote} failed ({state})")
        return len(local_idx) * self.pool.block_bytes

    def _post(self, r: _Remote, local_idx: np.ndarray, remote_idx: np.ndarray) -> tuple[Any, str]:
        try:
            xfer = self._agent.make_prepped_xfer(
                "READ", self._local, local_idx, r.dlist, remote_idx
            )
        except Exception as e:
            raise TransferError(f"NIXL READ from agent {r.pool.agent_name} refused: {e}") from e
        try:
            return xfer, self._agent.transfer(xfer)
        except Exception as e:
            self._stop(xfer)
            raise TransferError(f"NIXL READ from agent {r.pool.agent_name} failed: {e}") from e

    def _stop(self, xfer: Any) -> None:
        """Cancels a READ (releasing its handle), or waits until it is over; raises
        ReadInFlight if neither happens, so its destination is never reused."""
        try:
            xfer.release()
            return
        except Exception as e:  # NIXL could not cancel it: wait it out
            log.warning("nixl READ not cancellable (%s); waiting for it to end", e)
        deadline = time.monotonic() + _STOP_WAIT_S
        while self._agent.check_xfer_state(xfer) == "PROC" and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        try:
            xfer.release()
        except Exception as e:
            raise ReadInFlight(f"a NIXL READ could not be stopped: {e}") from e

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        """Releases descriptors and registrations (the worker is going away)."""
        self._thread.shutdown(wait=True)
        for name, r in self._remotes.items():
            _quietly(r.dlist.release)
            _quietly(self._agent.remove_remote_agent, name)
        self._remotes.clear()
        _quietly(self._local.release)
        _quietly(self._agent.deregister_memory, self._registered)


class NixlTransport:
    """The receiver's half, a ``transfer.Transport``."""

    name = "nixl"
    reads_without_owner = True

    def __init__(self, agent: NixlAgent, channel_for: Callable[[str], grpc.aio.Channel]):
        self._agent = agent
        self._channel_for = channel_for

    async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
        pool = handle.nixl
        if pool is None:
            raise TransferError(f"owner {handle.owner_worker_id} offers no NIXL pool")
        verify.check_pool(pool, engine.info.layout, handle.block_ids)
        request = worker_pb2.StartKvReadRequest(
            request_id=handle.request_id,
            include_agent_metadata=not self._agent.knows(pool.agent_name),
        )
        try:
            resp = await self._stub(handle).StartKvRead(request)
        except grpc.aio.AioRpcError as e:
            raise TransferError(
                f"StartKvRead on {handle.owner_address}: {e.code().name} {e.details()}"
            ) from e
        await self._meet(handle, pool, resp)
        return await self._agent.read(pool.agent_name, list(handle.block_ids), dst_blocks)

    async def follow(
        self, handle: Handle, dst_blocks: list[int], engine: Engine, on_done: Callable[[], None]
    ) -> tuple[int, Handle]:
        """A PREFILLING handle: each READ takes what the owner's progress allows since
        the last (layer by layer), checked finite as it lands: by the owner's done, at
        most the last layer is left. Returns the bytes moved and the completed handle."""
        pool = handle.nixl
        if pool is None:
            raise TransferError(f"owner {handle.owner_worker_id} offers no NIXL pool")
        layout = engine.info.layout
        verify.check_pool(pool, layout, ())
        request = worker_pb2.WatchKvRequest(
            request_id=handle.request_id,
            nixl=True,
            include_agent_metadata=not self._agent.knows(pool.agent_name),
        )
        follower = Follower(self._stub(handle).WatchKv(request), layout, handle.num_tokens)
        try:
            await self._meet(handle, pool, await follower.start())
            read = [0] * layout.num_layers  # leading blocks read, per layer
            nbytes = 0
            while True:
                p = await follower.next()
                verify.check_pool(pool, layout, p.block_ids)
                if p.done:
                    on_done()
                ready = readable(p, layout, handle.num_tokens)
                parts = [
                    (layer, list(p.block_ids[a:b]), dst_blocks[a:b])
                    for layer, (a, b) in enumerate(zip(read, ready, strict=True))
                    if b > a
                ]
                if parts:
                    nbytes += await self._agent.read_layers(pool.agent_name, parts)
                    landed = [(layer, dst) for layer, _, dst in parts]
                    await asyncio.to_thread(serial(verify.check_finite_parts), engine, landed)
                    read = [max(a, b) for a, b in zip(read, ready, strict=True)]
                if p.done:
                    return nbytes, completed(handle, p)
        finally:
            follower.close()

    async def release(self, handle: Handle, consumed: bool) -> bool:
        return await release_kv(self._stub(handle), handle, consumed)

    async def _meet(
        self,
        handle: Handle,
        pool: NixlPool,
        owner: worker_pb2.StartKvReadResponse | worker_pb2.KvProgress,
    ) -> None:
        """The owner's answer (StartKvRead's, or WatchKv's first progress) names the
        handle's agent; its metadata and own account of the pool load it when new."""
        if owner.agent_name != pool.agent_name:
            raise TransferError(
                f"{handle.owner_address} runs agent {owner.agent_name}, the handle names "
                f"{pool.agent_name} (a restarted owner?)"
            )
        owners = nixl_pool_from_pb(owner.pool) if owner.HasField("pool") else None
        await self._agent.add_remote(pool, owner.agent_metadata, owners)

    def _stub(self, handle: Handle) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # shutting down: nothing left to do about it
        log.debug("nixl cleanup: %s", e)
