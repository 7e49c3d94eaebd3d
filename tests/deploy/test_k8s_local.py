"""The cpu overlay's Deployments run as local processes with the manifests' own argv and env.

What each pod would get, mapped to one host without a cluster (as test_compose_local.py
does for compose):
1. deploy/k8s/overlays/cpu rendered (tests/deploy/kustomize.py). The ConfigMap gets the
   patch a user of a small machine would apply: DISAGG_MODEL = the tiny random model's
   directory, a 16 MiB KV pool, one torch thread.
2. Valkey's StatefulSet -> an embedded Valkey; each Deployment -> one process running its
   container's argv (the Dockerfile's ENTRYPOINT + `args`) with its env as the kubelet
   builds it (envFrom the ConfigMap, env over it, Secret keys from secret.example.yaml,
   `status.podIP` -> 127.0.0.1), 0.0.0.0 -> 127.0.0.1, each pod's ports remapped to free
   ones, Service host:port -> the port the selected pod got.
3. All Deployments start at once (Kubernetes has no start order); each is ready when its
   readiness probe, a grpc.health.v1 Check on the probe's port, says SERVING.
4. Then: both workers registered under their advertised (pod IP) addresses; a request
   without the Secret's API key is refused; a greedy one with it equals transformers'
   generate; each pod's Prometheus annotations point at its /metrics; the HPA's metric is
   (components/hpa-decode) among the decode worker's; SIGTERM drains each within terminationGracePeriodSeconds.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from disagg.engine.testing import greedy_reference, make_tiny_llama
from disagg.metastore.embedded import start_embedded_valkey
from disagg.metrics.scrape import parse
from tests.deploy.helpers import (
    base_env,
    generate_ids,
    grpc_health_serving,
    list_workers,
    local_argv,
    stop_process_group,
    wait_for,
)
from tests.deploy.k8s import (
    ROLES,
    TREES,
    container_argv,
    container_env,
    deployment,
    main_container,
    one,
    pod_spec,
    secret_example,
    secret_values,
)
from tests.deploy.kustomize import Obj, merge, render
from tests.ports import free_port

READY_S = 180.0
SMALL_MACHINE = {"DISAGG_KV_CACHE_MB": "16", "DISAGG_THREADS": "1"}


class LocalPods:
    """The rendered Deployments as local processes (see the module docstring)."""

    def __init__(self, objects: list[Obj], logs: Path):
        self.objects = objects
        self.logs = logs
        self.valkey = start_embedded_valkey()
        secret = secret_example()
        self.secrets = {secret["metadata"]["name"]: secret_values(secret)}
        self.deployments = {role: deployment(objects, role) for role in ROLES}
        self.workloads = {
            o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
        }
        valkey = main_container(one(objects, "StatefulSet", "disagg-valkey"))
        # (workload, container port) -> local port
        self.ports = {
            ("disagg-valkey", p["containerPort"]): self.valkey.port for p in valkey["ports"]
        }
        for dep in self.deployments.values():
            for port in self._pod_ports(dep):
                self.ports[(dep["metadata"]["name"], port)] = free_port()
        self.services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @staticmethod
    def _pod_ports(dep: Obj) -> set[int]:
        c = main_container(dep)
        out = {p["containerPort"] for p in c["ports"]}
        return out | {int(v["value"]) for v in c["env"] if v["name"].endswith("_PORT")}

    def _service_port(self, m: re.Match[str]) -> str:
        """host:port of a Service -> 127.0.0.1:the local port of the pod it selects."""
        svc = self.services[m.group(1)]
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(m.group(2))]
        target = port["targetPort"]
        for (workload, container_port), local in self.ports.items():
            w = self.workloads[workload]
            labels = w["spec"]["template"]["metadata"]["labels"]
            if not svc["spec"]["selector"].items() <= labels.items():
                continue
            named = {p["name"]: p["containerPort"] for p in main_container(w)["ports"]}
            if named.get(target, target) == container_port:
                return f"127.0.0.1:{local}"
        raise AssertionError(f"Service {m.group(0)} selects no pod port")

    def local(self, value: str, workload: str) -> str:
        """A pod's string (env value, argv item) as it must read on this host."""
        hosts = "|".join(re.escape(n) for n in self.services)
        value = re.sub(rf"\b({hosts}):(\d+)", self._service_port, value)
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value.isdigit() and (workload, int(value)) in self.ports:
            return str(self.ports[(workload, int(value))])
        return value

    def start(self, role: str) -> None:
        dep = self.deployments[role]
        name = dep["metadata"]["name"]
        c = main_container(dep)
        fields = {"status.podIP": "127.0.0.1", "metadata.name": f"{name}-0"}
        env = container_env(c, self.objects, self.secrets, fields)
        env = {k: self.local(v, name) for k, v in env.items()}
        argv = local_argv([self.local(a, name) for a in container_argv(c)])
        with open(self.logs / f"{role}.log", "wb") as log:  # the child keeps its own copy
            self.procs[role] = subprocess.Popen(
                argv,
                env={**base_env(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def port(self, role: str, container_port: int) -> int:
        return self.ports[(f"disagg-{role}", container_port)]

    def ready(self, role: str) -> bool:
        """The readiness probe as the kubelet runs it: grpc.health.v1 Check on its port."""
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}\n{self.tail()}"
        probe = main_container(self.deployments[role])["readinessProbe"]["grpc"]
        address = f"127.0.0.1:{self.port(role, probe['port'])}"
        return grpc_health_serving(address, probe.get("service", ""))

    def tail(self) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def terminate(self, role: str) -> int:
        """SIGTERM as the kubelet sends it; the exit code (-9: still running past the grace)."""
        grace = pod_spec(self.deployments[role])["terminationGracePeriodSeconds"]
        proc = self.procs.pop(role)
        stop_process_group(proc, timeout_s=grace)
        return proc.returncode

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process_group(proc)
        self.valkey.stop()


@pytest.fixture()
def pods(tmp_path: Path) -> Iterator[LocalPods]:
    model = tmp_path / "models" / "tiny"
    make_tiny_llama(str(model))
    objects = render(TREES["cpu"])
    patch = {
        "metadata": {"name": "disagg-config"},
        "data": {**SMALL_MACHINE, "DISAGG_MODEL": str(model)},
    }
    objects = [merge(o, patch) if o["kind"] == "ConfigMap" else o for o in objects]
    logs = tmp_path / "logs"
    logs.mkdir()
    system = LocalPods(objects, logs)
    try:
        yield system
    finally:
        system.stop()


def _scrape(port: int, path: str) -> dict[Any, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return dict(parse(resp.read().decode()))


def test_cpu_overlay_serves_as_local_processes(pods: LocalPods, tmp_path: Path) -> None:
    for role in ROLES:  # all at once, as the Deployments are applied together
        pods.start(role)
    for role in ROLES:
        wait_for(lambda r=role: pods.ready(r), READY_S, f"{role} readiness", pods.tail)

    address = f"127.0.0.1:{pods.port('scheduler', 50051)}"
    api_key = pods.secrets["disagg-secrets"]["DISAGG_API_KEY"]
    wait_for(lambda: len(list_workers(address, api_key)) == 2, 30, "registry", pods.tail)
    advertised = {w.address for w in list_workers(address, api_key)}
    assert advertised == {
        f"127.0.0.1:{pods.port('prefill', 50061)}",  # status.podIP:DISAGG_PORT
        f"127.0.0.1:{pods.port('decode', 50062)}",
    }

    prompt = [5, 17, 42, 99, 7, 300, 12]
    want = greedy_reference(str(tmp_path / "models" / "tiny"))(prompt, 8)
    assert len(set(want)) > 1, "reference output not diverse"
    with pytest.raises(grpc.RpcError) as refused:
        generate_ids(address, prompt, 8)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ids, last = generate_ids(address, prompt, 8, api_key=api_key)
    assert ids == want
    assert last.prefill_worker.startswith("prefill-") and last.decode_worker.startswith("decode-")

    scraped = {}
    for role in ROLES:  # what a Prometheus honouring the annotations scrapes
        notes = pods.deployments[role]["spec"]["template"]["metadata"]["annotations"]
        port = pods.port(role, int(notes["prometheus.io/port"]))
        scraped[role] = {n for (n, _) in _scrape(port, notes["prometheus.io/path"])}
        assert any(n.startswith("disagg:") for n in scraped[role]), role
        assert "disagg:gc_pause_seconds_count" in scraped[role], role  # the process's stalls
    hpa = one(render(TREES["production"]), "HorizontalPodAutoscaler", "disagg-decode")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in scraped["decode"]

    for role in ("decode", "prefill", "scheduler"):  # drain within the grace period
        code = pods.terminate(role)
        assert code == 0, f"{role} exited {code} on SIGTERM\n{pods.tail()}"
