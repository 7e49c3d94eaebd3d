"""deploy/k8s/ rendered and checked: Kubernetes schemas, then what the services need.

Rendering: tests/deploy/kustomize.py (resources, components, strategic-merge patches,
images: what deploy/k8s uses; anything else is refused), cross-checked against
``kubectl kustomize`` where a kubectl binary is found. Validation: the PyPI package
``kubernetes-validate`` (a dev dependency; it ships the OpenAPI-derived JSON schemas, no
network needed) in strict mode (unknown fields rejected) against Kubernetes K8S_VERSION.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from disagg.cli import build_parser
from disagg.engine.config import EngineConfig
from disagg.metrics import names
from disagg.runtime.config import SchedulerConfig, WorkerConfig
from tests.deploy.helpers import DEPLOY, REPO
from tests.deploy.k8s import (
    K8S,
    K8S_VERSION,
    ROLES,
    TREES,
    container_argv,
    deployment,
    main_container,
    one,
    pod_spec,
    rendered,
    secret_example,
)
from tests.deploy.kustomize import Unsupported, merge, object_id, render

# Custom resources: no schema in kubernetes-validate; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
DRAIN_SOURCES = (
    REPO / "disagg" / "worker" / "host.py",
    REPO / "services" / "scheduler" / "main.py",
)


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_rendered_objects_validate_against_the_kubernetes_schema(tree: str) -> None:
    objs = rendered(tree)
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget"} <= kinds
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):
                _validate(obj)
            continue
        try:
            _validate(obj)
        except ValidationError as e:
            pytest.fail(f"{tree}: {object_id(obj)} at {list(e.path)}: {e.message}")


def test_the_secret_is_an_example_not_a_resource() -> None:
    secret = secret_example()
    _validate(secret)
    assert set(secret["stringData"]) == {"DISAGG_API_KEY", "DISAGG_CLUSTER_TOKEN"}
    assert "kubectl" in (K8S / "base" / "secret.example.yaml").read_text()  # says how
    for tree in TREES:  # placeholders never applied by `kubectl apply -k`
        assert not [o for o in rendered(tree) if o["kind"] == "Secret"], tree


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(readinesProbe=c.pop("readinessProbe")),
        lambda c: c["readinessProbe"]["grpc"].update(port="grpc"),  # grpc probes take a number
        lambda c: c["env"].append({"name": "X", "valueFrom": {"podRef": {}}}),
    ],
    ids=["misspelt-field", "named-grpc-port", "unknown-env-source"],
)
def test_the_schema_rejects_a_broken_manifest(break_it: Any) -> None:
    dep = copy.deepcopy(deployment(rendered("cpu"), "decode"))
    _validate(dep)
    break_it(main_container(dep))
    with pytest.raises(ValidationError):
        _validate(dep)


def _kubectl() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


@pytest.mark.parametrize("tree", sorted(TREES))
def test_the_renderer_agrees_with_kubectl_kustomize(tree: str) -> None:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (tests/deploy/README.md says where to get one)")
    out = subprocess.run(
        [kubectl, "kustomize", str(TREES[tree])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {object_id(o): o for o in yaml.safe_load_all(out) if o}
    ours = {object_id(o): o for o in rendered(tree)}
    assert ours == theirs


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{K8S / 'base'}]\nnamePrefix: x-\n")
    with pytest.raises(Unsupported):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{K8S / 'base'}]\npatches: [{{path: p.yaml, target: {{kind: Deployment}}}}]\n"
    )
    with pytest.raises(Unsupported):
        render(tmp_path)
    with pytest.raises(Unsupported):  # a list whose merge key it does not know
        merge({"spec": {"hostAliases": [{"ip": "1"}]}}, {"spec": {"hostAliases": [{"ip": "2"}]}})
    base = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    patch = {"env": [{"name": "C", "value": "3"}, {"name": "B", "value": None}]}
    assert merge(base, patch) == {
        "env": [{"name": "C", "value": "3"}, {"name": "B"}, base["env"][0]]
    }


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_role_runs_the_image_with_a_real_command_and_real_settings(tree: str) -> None:
    objs = rendered(tree)
    known = {
        "DISAGG_" + f.name.upper()
        for cls in (EngineConfig, WorkerConfig, SchedulerConfig)
        for f in dataclasses.fields(cls)
    }
    known |= {"DISAGG_LOG_LEVEL", "DISAGG_CACHE_DIR"}  # read by logs.py and model_loader.py
    known |= {"DISAGG_CLUSTER_TOKEN"}  # passed for the cluster credential, not read yet
    config = one(objs, "ConfigMap", "disagg-config")["data"]
    assert set(config) <= known, set(config) - known
    images = set()
    for role in ROLES:
        c = main_container(deployment(objs, role))
        images.add(c["image"])
        argv = container_argv(c)
        assert argv[:2] == ["disagg", role]
        build_parser().parse_args(argv[1:])  # the command is one the CLI accepts
        named = {v["name"] for v in c["env"]}
        assert named <= known, named - known
        assert [s["configMapRef"]["name"] for s in c["envFrom"]] == ["disagg-config"]
        for v in c["env"]:  # every reference names a Secret we document and a key in it
            ref = v.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert (ref["name"], ref["key"]) in _documented_secret_keys(), ref
    assert len(images) == 1  # one image for every role
    assert config["DISAGG_HOST"] == "0.0.0.0"  # bound on the pod's interfaces


def _documented_secret_keys() -> set[tuple[str, str]]:
    keys = {("disagg-secrets", k) for k in secret_example()["stringData"]}
    return keys | {("disagg-redis", "url")}  # components/external-valkey's kustomization


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in container["env"]}


@pytest.mark.parametrize("tree", sorted(TREES))
def test_probes_ports_and_addresses(tree: str) -> None:
    objs = rendered(tree)
    for role in ROLES:
        c = main_container(deployment(objs, role))
        env = _env(c)
        port = int(env["DISAGG_PORT"]["value"])
        assert port in {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (role, probe)  # grpc.health.v1, server ""
        if role != "scheduler":
            ref = env["DISAGG_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]
            assert ref == {"fieldPath": "status.podIP"}  # registered address: the pod's IP
            metrics = int(env["DISAGG_METRICS_PORT"]["value"])
            assert metrics in {p["containerPort"] for p in c["ports"]}


def _drain_grace_s() -> float:
    """The longest in-flight grace of a draining service (`server.stop(grace_s=...)`)."""
    graces = [
        float(g)
        for src in DRAIN_SOURCES
        for g in re.findall(r"\.stop\(grace_s=([0-9.]+)\)", src.read_text())
    ]
    assert len(graces) == len(DRAIN_SOURCES), "drain grace not found: update this test"
    return max(graces)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_termination_grace_covers_the_drain(tree: str) -> None:
    objs = rendered(tree)
    for role in ROLES:
        dep = deployment(objs, role)
        c = main_container(dep)
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod_spec(dep)["terminationGracePeriodSeconds"]
        # preStop pause, then the drain, then engine and Redis shutdown: keep 10 s of room
        assert grace >= pre_stop + _drain_grace_s() + 10, (role, grace)
    sched = main_container(deployment(objs, "scheduler"))
    assert sched["lifecycle"]["preStop"]["sleep"]["seconds"] > 0  # Service drops it first


@pytest.mark.parametrize("tree", sorted(TREES))
def test_service_and_disruption_budgets_select_the_right_pods(tree: str) -> None:
    objs = rendered(tree)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            w["metadata"]["name"]
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]

    svc = one(objs, "Service", "disagg-scheduler")
    assert selected(svc["spec"]["selector"]) == ["disagg-scheduler"]
    sched = main_container(deployment(objs, "scheduler"))
    named = {p["name"]: p["containerPort"] for p in sched["ports"]}
    ports = {p["port"]: named[p["targetPort"]] for p in svc["spec"]["ports"]}
    env = _env(sched)
    assert ports == {
        50051: int(env["DISAGG_PORT"]["value"]),
        8000: int(env["DISAGG_HTTP_PORT"]["value"]),
    }
    budgets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodDisruptionBudget"}
    for role in ROLES:
        pdb = budgets[f"disagg-{role}"]
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == [f"disagg-{role}"]
    replicas = deployment(objs, "scheduler")["spec"]["replicas"]
    assert budgets["disagg-scheduler"]["spec"].get("minAvailable", 0) < replicas


@pytest.mark.parametrize("tree", ["cpu", "gpu"])
def test_valkey_statefulset_with_a_volume(tree: str) -> None:
    objs = rendered(tree)
    sts = one(objs, "StatefulSet", "disagg-valkey")
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = main_container(sts)["volumeMounts"]
    assert [m["name"] for m in mounts] == [claim["metadata"]["name"]]
    url = one(objs, "ConfigMap", "disagg-config")["data"]["DISAGG_REDIS_URL"]
    assert url == f"redis://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/0"


def test_external_valkey_replaces_the_statefulset() -> None:
    objs = rendered("production")
    assert not [o for o in objs if o["metadata"]["name"] == "disagg-valkey"]
    assert "DISAGG_REDIS_URL" not in one(objs, "ConfigMap", "disagg-config")["data"]
    for role in ROLES:
        ref = _env(main_container(deployment(objs, role)))["DISAGG_REDIS_URL"]
        assert ref["valueFrom"]["secretKeyRef"] == {"name": "disagg-redis", "key": "url"}


def test_gpu_overlay_asks_one_gpu_per_worker_and_cpu_none() -> None:
    gpu, cpu = rendered("gpu"), rendered("cpu")
    for role in ("prefill", "decode"):
        dep = deployment(gpu, role)
        assert main_container(dep)["resources"]["limits"]["nvidia.com/gpu"] == 1
        spec = pod_spec(dep)
        assert spec["runtimeClassName"] == "nvidia"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    assert "nvidia.com/gpu" not in str(deployment(gpu, "scheduler"))
    assert "nvidia" not in str(cpu)
    assert one(gpu, "ConfigMap", "disagg-config")["data"]["DISAGG_DEVICE"] == "cuda"
    cpu_config = one(cpu, "ConfigMap", "disagg-config")["data"]
    assert (cpu_config["DISAGG_DEVICE"], cpu_config["DISAGG_DTYPE"]) == ("cpu", "float32")


def _known_metrics() -> set[str]:
    return {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}


@pytest.mark.parametrize("tree", sorted(TREES))
def test_prometheus_annotations_name_the_metrics_ports(tree: str) -> None:
    objs = rendered(tree)
    for role in ROLES:
        dep = deployment(objs, role)
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        env = _env(main_container(dep))
        port = env["DISAGG_HTTP_PORT" if role == "scheduler" else "DISAGG_METRICS_PORT"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == port["value"]
        assert notes["prometheus.io/path"] == "/metrics"


def test_hpa_scales_decode_on_a_disagg_metric() -> None:
    objs = rendered("production")
    hpa = one(objs, "HorizontalPodAutoscaler", "disagg-decode")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "disagg-decode",
    }
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in _known_metrics() and name.startswith("disagg:")
    assert "replicas" not in deployment(objs, "decode")["spec"]  # the HPA owns the count
    values = (K8S / "components" / "hpa-decode" / "prometheus-adapter-values.yaml").read_text()
    (rule,) = yaml.safe_load(values)["rules"]["custom"]
    assert f'__name__="{name}"' in rule["seriesQuery"]


def test_podmonitor_scrapes_named_metrics_ports() -> None:
    objs = rendered("production")
    pm = one(objs, "PodMonitor", "disagg")
    names_by_role = {
        role: {p["name"] for p in main_container(deployment(objs, role))["ports"]} for role in ROLES
    }
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert ports == {"http", "metrics"}
    assert "http" in names_by_role["scheduler"]
    assert all("metrics" in names_by_role[r] for r in ("prefill", "decode"))
    assert pm["spec"]["selector"]["matchExpressions"][0]["values"] == list(ROLES)
    # job = the role, as deploy/prometheus.yml names the jobs the dashboard selects on
    jobs = {
        j["job_name"]
        for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    }
    for role in ROLES:
        labels = deployment(objs, role)["spec"]["template"]["metadata"]["labels"]
        assert labels[pm["spec"]["jobLabel"]] == role and role in jobs


def test_production_example_sets_the_image_and_a_model_volume() -> None:
    objs = rendered("production")
    for role in ROLES:
        dep = deployment(objs, role)
        c = main_container(dep)
        assert c["image"] == "registry.example.com/disagg:0.1.0"
        claim = {v["name"]: v for v in pod_spec(dep)["volumes"]}["models"]
        assert claim["persistentVolumeClaim"]["claimName"] == "disagg-models"
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    one(objs, "PersistentVolumeClaim", "disagg-models")
    model = one(objs, "ConfigMap", "disagg-config")["data"]["DISAGG_MODEL"]
    assert model.startswith("/models/")


def test_every_manifest_file_is_used_or_documented() -> None:
    """No stray file under deploy/k8s: each is rendered, or the Secret/adapter example."""
    used = {p.resolve() for p in _referenced_files()}
    extra = {
        K8S / "base" / "secret.example.yaml",
        K8S / "components" / "hpa-decode" / "prometheus-adapter-values.yaml",
    }
    stray = {p.resolve() for p in K8S.rglob("*.yaml")} - used - {p.resolve() for p in extra}
    assert not stray, stray


def _referenced_files() -> set[Path]:
    out: set[Path] = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        out.add(kfile)
        k = yaml.safe_load(kfile.read_text())
        for entry in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
            path = kfile.parent / entry
            if path.is_file():
                out.add(path)
    return out
