"""Online correctness checks: a served greedy request re-run collocated, token ids compared.

Disaggregation moves KV between processes; a bug there (a block off by one, a
stale import) silently changes what the model sees. Greedy output does not
depend on where the prompt was prefilled, so re-running a request on one
worker and comparing token ids catches it.

1. Sample (``wants``): a greedy request with ``verify`` set, or any greedy
   request with probability ``fraction`` (--verify-fraction).
2. Queue (``submit``, by the orchestrator as the stream finishes, stop or
   length only): the prompt, its sampling and the token ids the client got.
   A full queue drops the job (``verify_skipped_total{reason="queue_full"}``).
3. Re-run, in the background, one at a time, after the client's stream: the
   same prompt and sampling with max_tokens = the tokens served, on the decode
   worker that served it (another one if it is gone) and without a KV ticket,
   so that worker prefills the prompt itself: the collocated path. It has a
   request id of its own, is not admitted (never counts against
   max_inflight, never refuses a client) and is not routed.
4. Compare: ``verify_total{result="match"|"mismatch"}``; a mismatch logs both
   sequences. A re-run that fails counts as skipped (reason "error"), not as
   a mismatch.
What the client sees is never touched: the job is queued with the stream's last
event, whose content is fixed by then, and starts once that event is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from disagg.metrics.scheduler import SchedulerMetrics
from disagg.policy.routing import WorkerView
from disagg.runtime.ids import new_request_id
from services.scheduler.requests import GenerationRequest
from services.scheduler.workers import DecodeLost, WorkerClient

log = logging.getLogger(__name__)

MAX_PENDING = 64  # jobs waiting for the verifier; more are dropped (counted)


@dataclass(frozen=True)
class VerifyJob:
    request: GenerationRequest  # as served
    served: tuple[int, ...]  # token ids the client got
    decode_worker: str  # worker_id that decoded it
    prefill_worker: str  # worker_id that prefilled it ("" = the decode worker)


@dataclass(frozen=True)
class Verdict:
    match: bool
    rerun: tuple[int, ...]  # the collocated run's token ids
    worker: str  # where it re-ran


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Verifier:
    def __init__(
        self,
        workers: WorkerClient,
        decode_workers: Callable[[], list[WorkerView]],
        metrics: SchedulerMetrics,
        fraction: float = 0.0,
        max_pending: int = MAX_PENDING,
        rand: Callable[[], float] = random.random,
    ):
        self._workers = workers
        self._decode_workers = decode_workers  # the registry's live decode workers
        self._metrics = metrics
        self._fraction = fraction
        self._rand = rand
        self._queue: asyncio.Queue[VerifyJob] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task[None] | None = None

    def wants(self, req: GenerationRequest) -> bool:
        if req.sampling.temperature != 0:
            return False
        return req.verify or (self._fraction > 0 and self._rand() < self._fraction)

    def submit(self, job: VerifyJob) -> None:
        """Queues a job; never blocks and never raises."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.not_verified("queue_full")
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def settle(self) -> None:
        """Waits until every queued job is done (tests, shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._one(job)
            finally:
                self._queue.task_done()

    async def _one(self, job: VerifyJob) -> None:
        try:
            verdict = await self.check(job)
        except (DecodeLost, LookupError) as e:
            log.warning("verify skipped request_id=%s error=%s", job.request.request_id, e)
            self._metrics.not_verified("error")
            return
        except Exception as e:  # a check must never take the scheduler down
            log.exception("verify failed request_id=%s: %s", job.request.request_id, e)
            self._metrics.not_verified("error")
            return
        self._metrics.verified(verdict.match)
        if not verdict.match:
            log.warning(
                "verify mismatch request_id=%s prefill_worker=%s decode_worker=%s "
                "rerun_worker=%s first_difference=%s served=%s collocated=%s",
                job.request.request_id,
                job.prefill_worker or job.decode_worker,
                job.decode_worker,
                verdict.worker,
                first_difference(job.served, verdict.rerun),
                list(job.served),
                list(verdict.rerun),
            )

    async def check(self, job: VerifyJob) -> Verdict:
        """The collocated re-run of job and its comparison; raises when it cannot run."""
        worker = self._target(job.decode_worker)
        req = job.request
        rerun_req = dataclasses.replace(
            req,
            request_id=f"verify-{new_request_id()}",
            sampling=dataclasses.replace(req.sampling, max_tokens=max(1, len(job.served))),
            verify=False,
        )
        tokens: list[int] = []
        async with contextlib.aclosing(self._workers.decode(worker, rerun_req, None)) as updates:
            async for up in updates:
                tokens.extend(up.token_ids)
                if up.finish_reason == "error":
                    raise DecodeLost(f"{worker.worker_id}: the collocated re-run failed")
        rerun = tuple(tokens)
        return Verdict(rerun == job.served, rerun, worker.worker_id)

    def _target(self, decode_worker: str) -> WorkerView:
        live = self._decode_workers()
        for w in live:
            if w.worker_id == decode_worker:
                return w
        if not live:
            raise LookupError("no decode worker to re-run on")
        return max(live, key=lambda w: (w.free_blocks, w.worker_id))
