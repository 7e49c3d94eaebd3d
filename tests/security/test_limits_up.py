"""The client limits through `disagg up`: the flags reach the scheduler process and bite there.

`disagg up --max-body-bytes 4096 ...`: an 8 KiB HTTP body is a 413 (official openai client),
an 8 KiB gRPC message RESOURCE_EXHAUSTED from grpc itself, while a normal request is served
on both; the per-client flags are on the scheduler's command line.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import openai
import pytest

from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, _generate, system_procs
from tests.ports import free_port as _free_port

LIMITS = (
    "--max-body-bytes",
    "4096",
    "--max-inflight-per-client",
    "3",
    "--client-timeout-s",
    "7.5",
    "--http-keepalive-s",
    "20",
)


def test_disagg_up_applies_the_client_limits(tiny_model: str, tmp_path: Path) -> None:
    http_port = _free_port()
    up = UpProcess(tiny_model, tmp_path / "up.log", extra=("--http-port", str(http_port), *LIMITS))
    try:
        up.wait_ready(READY_TIMEOUT_S)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0
        )
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="t5 " * 3000, max_tokens=2)
        assert err.value.status_code == 413
        assert err.value.response.json()["error"]["code"] == "request_too_large"
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt="t5 t6", max_tokens=3)
        assert done.usage is not None and done.usage.completion_tokens == 3

        with grpc.insecure_channel(up.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            big = scheduler_pb2.GenerateRequest(prompt="t5 " * 3000, max_tokens=2)
            with pytest.raises(grpc.RpcError) as rpc_err:
                list(stub.Generate(big, timeout=30))
            assert rpc_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ids, _, _ = _generate(up.address, prompt="t5 t6", max_tokens=3)
        assert len(ids) == 3

        sched = [p for p in system_procs(up.proc.pid, up.port) if " scheduler " in p.cmdline]
        assert len(sched) == 1
        assert " ".join(LIMITS) in sched[0].cmdline
    finally:
        up.kill_everything(system_procs(up.proc.pid, up.port))
