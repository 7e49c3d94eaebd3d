"""Reading deploy/k8s/ as Kubernetes would: rendered objects, and a container's argv and env.

- ``rendered(name)``: an overlay (``cpu``, ``gpu``) or example (``production``) rendered by
  tests/deploy/kustomize.py.
- ``container_env(container, objects, secrets, fields)``: the environment the kubelet
  gives a container: ``envFrom`` first, then ``env`` over it, ConfigMap and Secret
  references resolved, downward-API ``fieldRef`` values from ``fields``.
- ``container_argv(container)``: ``command`` (else the image's ENTRYPOINT) + ``args``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from tests.deploy.helpers import DEPLOY, image_entrypoint
from tests.deploy.kustomize import Obj, load_documents, render

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"  # the Kubernetes API the manifests are validated against
TREES = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "production": K8S / "examples" / "production",
}
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
ROLES = ("scheduler", "prefill", "decode")


def rendered(name: str) -> list[Obj]:
    return render(TREES[name])


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def deployment(objects: list[Obj], role: str) -> Obj:
    return one(objects, "Deployment", f"disagg-{role}")


def pod_spec(workload: Obj) -> Obj:
    """The workload's pod spec (the object itself, not a copy)."""
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def main_container(workload: Obj) -> Obj:
    """The workload's one container (the object itself, not a copy)."""
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    container: Obj = containers[0]
    return container


def secret_example() -> Obj:
    (secret,) = load_documents(SECRET_EXAMPLE)
    return secret


def secret_values(secret: Obj) -> dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**out, **(secret.get("stringData") or {})}


def container_env(
    container: Obj,
    objects: list[Obj],
    secrets: dict[str, dict[str, str]],
    fields: dict[str, str],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it (see the module docstring)."""
    maps = {o["metadata"]["name"]: o.get("data") or {} for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= {k: str(v) for k, v in maps[source["configMapRef"]["name"]].items()}
        else:
            env |= secrets[source["secretRef"]["name"]]
    for var in container.get("env", []):
        env[var["name"]] = _value(var, maps, secrets, fields)
    return env


def _value(
    var: Obj, maps: dict[str, Any], secrets: dict[str, dict[str, str]], fields: dict[str, str]
) -> str:
    if "value" in var:
        return str(var["value"])
    ref = var["valueFrom"]
    if "configMapKeyRef" in ref:
        return str(maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]])
    if "secretKeyRef" in ref:
        return secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
    if "fieldRef" in ref:
        return fields[ref["fieldRef"]["fieldPath"]]
    raise AssertionError(f"unsupported env source {ref}")


def container_argv(container: Obj) -> list[str]:
    """What the container runs: command (else the Dockerfile's ENTRYPOINT) + args."""
    argv = [*(container.get("command") or image_entrypoint()), *container.get("args", [])]
    assert not any("$(" in a for a in argv), "variable expansion in args is not modelled"
    return argv


def tree_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))
