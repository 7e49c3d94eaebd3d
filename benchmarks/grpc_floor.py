"""What grpc.aio itself costs a relaying process, with no logic: the scheduler's floor.

The scheduler is a relay: per request, one server-streaming call from the client
(``Generate``), one unary call to a prefill worker, one server-streaming call to
a decode worker, and every decode message written on to the client. This
measures that shape with the logic removed: a front process serves the standard
gRPC health service's ``Watch`` (a server stream) and, per call, makes the
worker calls against a backend process (``Check`` as the unary call, ``Watch``
streaming ``--messages`` responses), relaying each response. The front's CPU
time (utime + stime from /proc) over the requests is the floor any Python
scheduler on grpc.aio pays on this CPU; ``benchmarks/scheduler.py`` reports the
real one (``request_cpu_ms``, ``token_cpu_us``).

Shapes, each ``--requests`` requests, 64 in flight over 4 connections; the
front pinned to core 0, the backend and the client to core 1 (as scheduler.py):
- ``call``: the client's call answered at once with one message (no worker call);
- ``call+unary``: plus one unary call to the backend (the prefill);
- ``call+unary+stream``: plus one backend stream of ``--messages`` responses,
  each relayed (the decode); ``per_message_us`` = the extra CPU of each further
  relayed message (read from the backend, written to the client).

    python benchmarks/grpc_floor.py --json benchmarks/results/grpc-floor-cpu2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scheduler import _pin

SERVING = health_pb2.HealthCheckResponse.SERVING
CONNECTIONS, IN_FLIGHT = 4, 64


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class _Backend(health_pb2_grpc.HealthServicer):
    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def Watch(self, request: Any, context: Any) -> Any:
        n = int(request.service or "1")
        for _ in range(n):
            yield health_pb2.HealthCheckResponse(status=SERVING)


def _backend_main(port_q: Any, stop: Any) -> None:
    _pin(1)

    async def run() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(_Backend(), server)
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(None)

    asyncio.run(run())


def _front_main(backend_port: int, unary: bool, messages: int, port_q: Any, cpu_q: Any) -> None:
    """Serves Watch: [Check on the backend] [relay a backend Watch of `messages`]."""
    _pin(0)

    async def run() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}")
        backend = health_pb2_grpc.HealthStub(channel)
        relay = health_pb2.HealthCheckRequest(service=str(messages))

        class Front(health_pb2_grpc.HealthServicer):
            async def Watch(self, request: Any, context: Any) -> Any:
                if unary:
                    await backend.Check(health_pb2.HealthCheckRequest())
                if messages:
                    async for response in backend.Watch(relay):
                        yield response
                else:
                    yield health_pb2.HealthCheckResponse(status=SERVING)

            async def Check(self, request: Any, context: Any) -> Any:  # the run's markers
                cpu_q.put(_cpu_s())
                return health_pb2.HealthCheckResponse(status=SERVING)

        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Front(), server)
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def _load(port: int, requests: int) -> float:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CONNECTIONS)]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            async for _ in stubs[i % CONNECTIONS].Watch(health_pb2.HealthCheckRequest()):
                pass

    await asyncio.gather(*(one(i) for i in range(200)))  # warm: connections, code paths
    await stubs[0].Check(health_pb2.HealthCheckRequest())  # marker: front CPU before
    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.monotonic() - t0
    await stubs[0].Check(health_pb2.HealthCheckRequest())  # marker: front CPU after
    for c in channels:
        await c.close()
    return wall


def measure(shape: str, unary: bool, messages: int, requests: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, port_q, cpu_q = ctx.Event(), ctx.Queue(), ctx.Queue()
    backend = ctx.Process(target=_backend_main, args=(port_q, stop), daemon=True)
    backend.start()
    backend_port = port_q.get(timeout=60)
    front = ctx.Process(
        target=_front_main, args=(backend_port, unary, messages, port_q, cpu_q), daemon=True
    )
    front.start()
    front_port = port_q.get(timeout=60)
    _pin(1)
    try:
        wall = asyncio.run(_load(front_port, requests))
        cpu = -cpu_q.get(timeout=60) + cpu_q.get(timeout=60)
    finally:
        front.kill()
        stop.set()
        backend.join(10)
    return {
        "shape": shape,
        "messages": max(1, messages),
        "requests": requests,
        "front_cpu_s": round(cpu, 3),
        "cpu_ms_per_request": round(1000 * cpu / requests, 4),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--messages", type=int, default=17, help="decode messages relayed (>= 2)")
    p.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    p.add_argument("--json", default="")
    args = p.parse_args()
    shapes = [
        ("call", False, 0),
        ("call+unary", True, 0),
        ("call+unary+stream", True, 1),
        (f"call+unary+stream{args.messages}", True, args.messages),
    ]
    samples: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in shapes}
    for _ in range(args.rounds):  # interleaved, round by round
        for name, unary, messages in shapes:
            samples[name].append(measure(name, unary, messages, args.requests))
    rows = []
    for runs in samples.values():
        runs.sort(key=lambda r: r["cpu_ms_per_request"])
        rows.append({**runs[len(runs) // 2], "samples_ms": [r["cpu_ms_per_request"] for r in runs]})
    by = {r["shape"]: r["cpu_ms_per_request"] for r in rows}
    one, many = by["call+unary+stream"], by[f"call+unary+stream{args.messages}"]
    out = {
        "rows": rows,
        "call_ms": by["call"],
        "unary_call_ms": round(by["call+unary"] - by["call"], 4),
        "stream_call_ms": round(one - by["call+unary"], 4),
        "per_message_us": round(1000 * (many - one) / (args.messages - 1), 2),
        "cpu": os.cpu_count(),
    }
    print("shape | cpu_ms_per_request (median) | samples")
    for r in rows:
        print(f"{r['shape']} | {r['cpu_ms_per_request']} | {r['samples_ms']}")
    print(
        f"client call {out['call_ms']} ms, + unary worker call {out['unary_call_ms']} ms, "
        f"+ worker stream {out['stream_call_ms']} ms, each further relayed message "
        f"{out['per_message_us']} us"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
