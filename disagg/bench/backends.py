"""One streamed request, timed chunk by chunk, over OpenAI HTTP (SSE) or gRPC.

A chunk counts as token arrival when it carries text or is not the closing
chunk (a closing chunk with only a finish_reason is not a token). Token
counts come from the server's usage (``stream_options.include_usage``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from disagg.bench.workload import BenchRequest


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, send -> last byte
    itl: list[float] = field(default_factory=list)  # gaps between token chunks, seconds
    prompt_len: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None with fewer than two tokens."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class _Timer:
    def __init__(self, result: RequestResult):
        self.r = result
        self.r.start = self._last = time.perf_counter()
        self._first = True

    def token(self) -> None:
        now = time.perf_counter()
        if self._first:
            self.r.ttft = now - self.r.start
            self._first = False
        else:
            self.r.itl.append(now - self._last)
        self._last = now

    def done(self) -> None:
        self.r.latency = time.perf_counter() - self.r.start
        self.r.success = not self._first and not self.r.error
        if self.r.success and not self.r.output_tokens:  # no usage from the server: count chunks
            self.r.output_tokens = 1 + len(self.r.itl)


class HttpBackend:
    """POST /v1/completions or /v1/chat/completions with stream=true."""

    def __init__(
        self,
        base_url: str,
        endpoint: str,
        model: str,
        api_key: str,
        temperature: float,
        ignore_eos: bool,
    ):
        import aiohttp

        self.url = base_url.rstrip("/") + endpoint
        self.chat = endpoint.endswith("/chat/completions")
        self.model = model
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None),
            connector=aiohttp.TCPConnector(limit=0),
        )

    def _payload(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            if not req.messages and not req.prompt:
                raise ValueError(
                    "the chat endpoint needs text prompts or messages (use --endpoint /v1/completions)"
                )
            body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt_token_ids or req.prompt
        return body

    async def send(self, req: BenchRequest) -> RequestResult:
        result = RequestResult(prompt_len=req.prompt_len)
        timer = _Timer(result)
        try:
            async with self._session.post(self.url, json=self._payload(req)) as resp:
                if resp.status != 200:
                    result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    await self._read(resp, timer, result)
        except Exception as e:  # a benchmark records failures, it does not stop on them
            result.error = f"{type(e).__name__}: {e}"
        timer.done()
        return result

    async def _read(self, resp: Any, timer: _Timer, result: RequestResult) -> None:
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                result.error = str(msg["error"].get("message", msg["error"]))
                break
            if msg.get("usage"):
                result.output_tokens = int(msg["usage"].get("completion_tokens", 0))
                result.prompt_len = int(msg["usage"].get("prompt_tokens", 0)) or result.prompt_len
            for choice in msg.get("choices") or []:
                text = (
                    (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                )
                if text or choice.get("finish_reason") is None:
                    timer.token()

    async def close(self) -> None:
        await self._session.close()


class GrpcBackend:
    """disagg.v1.Scheduler/Generate (server streaming) through disagg.client.AsyncClient.

    No retries: a refused request is a failure the benchmark reports, not one it hides.
    """

    def __init__(self, address: str, api_key: str, temperature: float, ignore_eos: bool):
        from disagg.client import NO_RETRY, AsyncClient

        self._client = AsyncClient(address, api_key=api_key or None, retry=NO_RETRY)
        self.temperature = temperature
        self.ignore_eos = ignore_eos

    async def send(self, req: BenchRequest) -> RequestResult:
        from disagg.client import ClientError

        result = RequestResult(prompt_len=req.prompt_len)
        timer = _Timer(result)
        try:
            async for ev in self._client.generate(
                req.prompt or None,
                prompt_token_ids=req.prompt_token_ids,
                messages=req.messages,
                max_tokens=req.max_tokens,
                temperature=self.temperature,
                ignore_eos=self.ignore_eos,
            ):
                if ev.token_ids:
                    timer.token()
                if ev.usage is not None:
                    result.output_tokens = ev.usage.completion_tokens
                    result.prompt_len = ev.usage.prompt_tokens or result.prompt_len
        except ClientError as e:
            result.error = f"{e.code.name}: {e.details}"
        timer.done()
        return result

    async def close(self) -> None:
        await self._client.close()
