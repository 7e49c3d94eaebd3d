"""Every compose service's command, run as a local process with the compose environment.

What a container would get, mapped to one host without a Docker engine:
1. compose.yaml interpolated as Compose does, with the CPU settings a user without a
   GPU would set (DISAGG_DEVICE=cpu, ...) and the model volume pointing at a
   directory holding the tiny random model (DISAGG_MODEL=/models/tiny).
2. redis -> an embedded Valkey; every other service -> image ENTRYPOINT + command,
   its `environment` with service hostnames and 0.0.0.0 mapped to 127.0.0.1, each
   port it uses remapped to a free one, /models mapped to the volume's source.
   GPU reservations are ignored.
3. Services start in depends_on order; a `service_healthy` dependency must pass its
   own healthcheck command (run as written) first.
4. Then greedy requests through the scheduler (gRPC and OpenAI HTTP) equal
   transformers' generate, and each worker's /metrics says it has no GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from disagg.engine.testing import greedy_reference, make_tiny_llama
from disagg.metastore.embedded import start_embedded_valkey
from disagg.metrics.scrape import parse
from tests.deploy.helpers import (
    DEPLOY,
    REQUIRED,
    base_env,
    environment,
    generate_ids,
    image_entrypoint,
    list_workers,
    load_compose,
    local_argv,
    stop_process_group,
    wait_for,
)
from tests.ports import free_port

CPU_SETTINGS = {
    "DISAGG_DEVICE": "cpu",
    "DISAGG_DTYPE": "float32",
    "DISAGG_KV_CACHE_MB": "16",
    "DISAGG_THREADS": "1",
}
READY_S = 180.0


def _ports(service: dict[str, Any]) -> set[int]:
    """Container ports a service listens on: ports/expose targets and *_PORT variables."""
    out = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    out |= {int(p) for p in service.get("expose", [])}
    out |= {int(v) for k, v in environment(service).items() if k.endswith("_PORT") and v}
    return out


class LocalCompose:
    """The compose services as local processes (see the module docstring)."""

    def __init__(self, spec: dict[str, Any], logs: Path):
        self.services = {n: s for n, s in spec["services"].items() if not s.get("profiles")}
        self.logs = logs
        self.valkey = start_embedded_valkey()
        self.port_map = {6379: self.valkey.port}
        for name, s in self.services.items():
            if name != "redis":
                self.port_map |= {p: free_port() for p in _ports(s)}
        self.hosts = "|".join(re.escape(n) for n in self.services)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def local(self, value: str, volumes: dict[str, str]) -> str:
        """A container's string (env value, argv item) as it must read on this host."""
        value = re.sub(rf"\b(?:{self.hosts}|0\.0\.0\.0|127\.0\.0\.1):(\d+)", self._hostport, value)
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value.isdigit() and int(value) in self.port_map:
            return str(self.port_map[int(value)])
        for target, source in volumes.items():
            if value == target or value.startswith(target + "/"):
                return source + value[len(target) :]
        return value

    def _hostport(self, m: re.Match[str]) -> str:
        return f"127.0.0.1:{self.port_map.get(int(m.group(1)), int(m.group(1)))}"

    def _volumes(self, service: dict[str, Any]) -> dict[str, str]:
        out = {}
        for v in service.get("volumes", []):
            source, target = v.split(":")[:2]
            out[target] = str((DEPLOY / source).resolve())
        return out

    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name: str) -> None:
            for dep in self.services[name].get("depends_on", {}):
                visit(dep)
            if name not in done:
                done.append(name)

        for name in self.services:
            visit(name)
        return done

    def healthy(self, name: str) -> bool:
        if name == "redis":
            return self.valkey.running
        for proc_name, proc in self.procs.items():
            assert proc.poll() is None, f"{proc_name} exited {proc.returncode}\n{self.tail()}"
        s = self.services[name]
        test = s["healthcheck"]["test"]
        assert test[0] == "CMD", test
        argv = local_argv([self.local(a, {}) for a in test[1:]])
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def start(self, name: str) -> None:
        s = self.services[name]
        for dep, cond in s.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
            wait_for(lambda d=dep: self.healthy(d), READY_S, f"{dep} health", self.tail)
        if name == "redis":
            return
        volumes = self._volumes(s)
        env = {k: self.local(v, volumes) for k, v in environment(s).items()}
        argv = local_argv([*image_entrypoint(), *(self.local(a, volumes) for a in s["command"])])
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own copy
            self.procs[name] = subprocess.Popen(
                argv,
                env={**base_env(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def port(self, container_port: int) -> int:
        return self.port_map[container_port]

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process_group(proc)
        self.valkey.stop()


@pytest.fixture()
def compose(tmp_path: Path) -> Iterator[LocalCompose]:
    models = tmp_path / "models"
    make_tiny_llama(str(models / "tiny"))
    spec = load_compose(
        {
            **REQUIRED,
            **CPU_SETTINGS,
            "DISAGG_MODELS_DIR": str(models),
            "DISAGG_MODEL": "/models/tiny",
        }
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    system = LocalCompose(spec, logs)
    try:
        yield system
    finally:
        system.stop()


def test_compose_services_serve_as_local_processes(compose: LocalCompose, tmp_path: Path) -> None:
    order = compose.order()
    assert order.index("redis") < min(order.index(n) for n in ("scheduler", "prefill", "decode"))
    for name in order:
        compose.start(name)
    for name in ("scheduler", "prefill", "decode"):  # every healthcheck passes as written
        wait_for(lambda n=name: compose.healthy(n), READY_S, f"{name} health", compose.tail)
    grpc_address = f"127.0.0.1:{compose.port(50051)}"
    wait_for(lambda: len(list_workers(grpc_address)) == 2, 30, "registry", compose.tail)
    workers = list_workers(grpc_address)
    ports = {compose.port(50061), compose.port(50062)}
    assert {w.address for w in workers} == {f"127.0.0.1:{p}" for p in ports}

    model = str(tmp_path / "models" / "tiny")
    prompt = [5, 17, 42, 99, 7, 300, 12]
    want = greedy_reference(model)(prompt, 8)
    assert len(set(want)) > 1, "reference output not diverse"
    ids, last = generate_ids(grpc_address, prompt, 8)
    assert ids == want
    assert last.prefill_worker.startswith("prefill-") and last.decode_worker.startswith("decode-")

    body = json.dumps({"model": "tiny", "prompt": "t5 t17 t42", "max_tokens": 4, "temperature": 0})
    req = urllib.request.Request(
        f"http://127.0.0.1:{compose.port(8000)}/v1/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        completion = json.loads(resp.read())
    assert completion["usage"]["completion_tokens"] == 4

    for port, role in ((9401, "prefill"), (9402, "decode")):  # no GPU: said, no number made up
        with urllib.request.urlopen(
            f"http://127.0.0.1:{compose.port(port)}/metrics", timeout=10
        ) as resp:
            samples = parse(resp.read().decode())
        available = [
            (dict(lab)["role"], v) for (n, lab), v in samples.items() if n == "disagg:gpu_available"
        ]
        assert available == [(role, 0.0)]
        assert not [n for (n, _) in samples if n.startswith("disagg:gpu_utilization")]
