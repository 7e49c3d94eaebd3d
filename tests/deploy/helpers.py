"""Reading deploy/ as Docker Compose would, and running its services as local processes.

- ``load_compose(env)``: deploy/compose.yaml parsed (YAML anchors and ``<<`` merges
  resolved by PyYAML) with ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
  ``${VAR:?error}``, ``${VAR?error}`` and ``$$`` interpolated from env, as Compose
  does (a required variable unset: ``MissingVariable``). ``REQUIRED``: the
  variables compose.yaml requires, with test values.
- ``image_entrypoint()``: the ENTRYPOINT of deploy/Dockerfile (exec form).
- ``local_argv(argv)``: a container's argv as a local process (``disagg`` -> this
  interpreter's ``-m disagg.cli``).
- ``generate_ids``, ``list_workers``, ``grpc_health_serving``: gRPC calls on what runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SCHEMA = Path(__file__).with_name("compose-spec.json")

_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)
REQUIRED = {"DISAGG_CLUSTER_TOKEN": "compose-test-cluster-token"}


class MissingVariable(ValueError):
    """A ``${VAR:?error}`` (or ``${VAR?error}``) variable is not set: Compose refuses."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (the subset compose.yaml uses)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(5)
        value = env.get(name)
        unset = value is None or (m.group(2) == ":" and value == "")
        if m.group(3) == "-" and unset:
            return m.group(4)
        if m.group(3) == "?" and unset:
            raise MissingVariable(f"{name}: {m.group(4)}")
        return value or ""

    return _VAR.sub(one, text)


def _walk(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def load_raw() -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(COMPOSE.read_text()))


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    return dict(_walk(load_raw(), lambda s: interpolate(s, env)))


def image_entrypoint() -> list[str]:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT ")]
    assert len(lines) == 1, "deploy/Dockerfile needs one exec-form ENTRYPOINT"
    return list(json.loads(lines[0].removeprefix("ENTRYPOINT ")))


def local_argv(argv: list[str]) -> list[str]:
    if argv and argv[0] == "disagg":
        return [sys.executable, "-m", "disagg.cli", *argv[1:]]
    return argv


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def base_env() -> dict[str, str]:
    """This process's environment without DISAGG_* (a developer's settings must not leak in)
    and without UCX_* (an in-process worker of an earlier test pins UCX to ``lo`` in this
    process; a worker on another host inherits that and NIXL cannot reach its peers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISAGG_", "UCX_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


def wait_for(
    cond: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout_s}s\n{logs()}")
        time.sleep(0.2)


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM the process's group (it was started with start_new_session), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _auth(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate_ids(
    address: str, prompt: list[int], max_tokens: int, api_key: str = ""
) -> tuple[list[int], Any]:
    """Token ids and the last message of one greedy gRPC Generate through the scheduler."""
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    ids: list[int] = []
    last = None
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0
        )
        for resp in stub.Generate(req, timeout=60, metadata=_auth(api_key)):
            ids.extend(resp.token_ids)
            last = resp
    assert last is not None and last.finish_reason
    return ids, last


def list_workers(address: str, api_key: str = "") -> list[Any]:
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            req = scheduler_pb2.ListWorkersRequest()
            return list(stub.ListWorkers(req, timeout=2, metadata=_auth(api_key)).workers)
        except grpc.RpcError:
            return []


def grpc_health_serving(address: str, service: str = "") -> bool:
    """grpc.health.v1 Check says SERVING: what a Kubernetes `grpc:` probe asks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
