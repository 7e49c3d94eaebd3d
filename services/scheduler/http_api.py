"""OpenAI-compatible HTTP front end (aiohttp, on the scheduler's event loop).

A request's way through it:
1. Middleware: API key (Bearer; /health and /metrics stay open), then any
   ``ApiError`` becomes an OpenAI error body
   ``{"error": {"message", "type", "param", "code"}}``.
2. The client's slot (services.scheduler.limits: none left is a 429 at once),
   then the body: over ``max_body_bytes`` is a 413, one that stops arriving
   for ``client_timeout_s`` a 408.
3. Parse the JSON into a ``RawRequest`` (types checked per field; what this
   server does not do -- n > 1, logprobs, tools, ... -- is a 400 naming it).
4. ``build_off_loop`` (the same as gRPC, so greedy text is the same: a prompt
   too long for the context by its length alone is a 400 untokenized, a long
   one is tokenized in a thread) and ``Orchestrator.generate``. The first event
   is awaited before any byte is sent, so 429 / 503 / 400 from admission are
   real HTTP statuses.
5. Non-streaming: collect the events into one body. Streaming: one SSE chunk
   per event, a usage chunk when asked, then ``data: [DONE]``.
A client that goes away cancels the handler (handler_cancellation), which
closes the orchestrator's generator, which cancels the worker RPCs. So does a
client that stays but reads nothing of its stream for ``client_timeout_s``
(a write that does not drain in that time drops the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from disagg.engine.model_loader import default_cache_dir, served_name
from disagg.metrics.http import bound_port, metrics_handler
from disagg.tokenization.prompts import ChatTurn
from services.scheduler.auth import OPEN_HTTP_PATHS, bearer_ok, cache_salt
from services.scheduler.limits import (
    RETRY_AFTER_S,
    ClientSlots,
    FrontLimits,
    bearer_token,
    build_off_loop,
    client_key,
)
from services.scheduler.orchestrator import Orchestrator
from services.scheduler.registry import WorkerRegistry
from services.scheduler.requests import (
    GenerationEvent,
    InvalidRequest,
    Overloaded,
    RawRequest,
    RequestFactory,
    Unavailable,
)

log = logging.getLogger(__name__)

OFF_LOOP_JSON_BYTES = 64 << 10  # bodies larger than this are parsed in a thread
# Kernel send buffer of an SSE stream (Linux doubles it). A token stream needs little,
# and the kernel's autotuning would let a client that stops reading park megabytes
# before a write blocks, so its client_timeout_s would start only that much later.
STREAM_SNDBUF = 64 << 10


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def _bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_for(exc: Exception, param_map: dict[str, str] | None = None) -> ApiError:
    """The HTTP error for an orchestrator / build_request exception."""
    if isinstance(exc, InvalidRequest):
        param = (param_map or {}).get(exc.field, exc.field)
        return _bad(param, str(exc))
    if isinstance(exc, Overloaded):
        retry = max(1, math.ceil(exc.retry_after_s))
        return ApiError(
            429,
            f"{exc}; retry after {retry}s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, Unavailable):
        return ApiError(503, str(exc), "server_error", code="service_unavailable")
    return ApiError(
        500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error"
    )


# --- parsing -----------------------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _field(body: dict[str, Any], name: str, kind: str) -> Any:
    """body[name] if present and not null (checked to be of kind), else None."""
    value = body.get(name)
    if value is not None and not _TYPES[kind](value):
        raise _bad(
            name, f"'{name}' must be of type {kind}, got {type(value).__name__}", "invalid_type"
        )
    return value


def _unsupported(body: dict[str, Any], chat: bool) -> None:
    n = _field(body, "n", "integer")
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported, got n={n}", "unsupported_value")
    best_of = _field(body, "best_of", "integer")
    if best_of is not None and best_of != 1:
        raise _bad("best_of", "only best_of=1 is supported", "unsupported_value")
    disabled: dict[str, tuple[Any, ...]] = {  # field -> values that mean "off"
        "logprobs": (None, False) if chat else (None,),
        "top_logprobs": (None, 0),
        "echo": (None, False),
        "suffix": (None, ""),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "logit_bias": (None, {}),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "audio": (None,),
        "prediction": (None,),
    }
    for name, off in disabled.items():
        value = body.get(name)
        if not any(value is o or (type(value) is type(o) and value == o) for o in off):
            raise _bad(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad(
            "response_format",
            "only response_format {'type': 'text'} is supported",
            "unsupported_parameter",
        )


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise _bad("stop", "'stop' must be a string or an array of strings", "invalid_type")


def _prompt(body: dict[str, Any]) -> tuple[str, list[int]]:
    """(text, token ids) of a completions prompt: a string, token ids, or a batch of one."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if isinstance(p, str):
        return p, []
    if isinstance(p, list) and p and all(_TYPES["integer"](t) for t in p):
        return "", p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p):
        raise _bad(
            "prompt",
            "batched prompts are not supported; send one prompt per request",
            "unsupported_value",
        )
    if p is None:
        raise _bad("prompt", "'prompt' is required", "missing_required_parameter")
    raise _bad(
        "prompt",
        "'prompt' must be a string, an array of token ids, or an array of one of those",
        "invalid_type",
    )


def _content(i: int, m: dict[str, Any]) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise _bad(
                    "messages",
                    f"message {i}: only text content parts are supported",
                    "unsupported_value",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(
        "messages",
        f"message {i}: 'content' must be a string or an array of text parts",
        "invalid_type",
    )


def _messages(body: dict[str, Any]) -> list[ChatTurn]:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty array", "invalid_type")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(
                "messages", f"message {i} must be an object with a string 'role'", "invalid_type"
            )
        if m.get("tool_calls"):
            raise _bad(
                "messages", f"message {i}: tool calls are not supported", "unsupported_value"
            )
        turns.append(ChatTurn(m["role"], _content(i, m)))
    return turns


@dataclass(frozen=True)
class Parsed:
    raw: RawRequest
    model: str | None
    stream: bool
    include_usage: bool
    param_map: dict[str, str]  # build_request field -> the request's field name


def parse_body(body: Any, chat: bool) -> Parsed:
    """A completions / chat.completions JSON body as a RawRequest (ApiError 400 when malformed)."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object", "invalid_type")
    _unsupported(body, chat)
    stream = bool(_field(body, "stream", "boolean"))
    opts = _field(body, "stream_options", "object")
    if opts is not None and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = bool(opts and _field(opts, "include_usage", "boolean"))
    max_tokens = _field(body, "max_tokens", "integer")
    param_map = {"prompt_token_ids": "prompt"}
    if chat and _field(body, "max_completion_tokens", "integer") is not None:
        max_tokens = body["max_completion_tokens"]
        param_map["max_tokens"] = "max_completion_tokens"
    text, ids = ("", []) if chat else _prompt(body)
    raw = RawRequest(
        prompt=text,
        prompt_token_ids=ids,
        messages=_messages(body) if chat else (),
        max_tokens=max_tokens,
        temperature=_field(body, "temperature", "number"),
        top_p=_field(body, "top_p", "number"),
        top_k=_field(body, "top_k", "integer"),  # extension (vLLM's too)
        seed=_field(body, "seed", "integer"),
        stop=_stop(body),
        ignore_eos=bool(_field(body, "ignore_eos", "boolean")),  # extension, for benchmarks
        ttft_slo_ms=_field(body, "ttft_slo_ms", "number"),  # extension: SLO admission
        itl_slo_ms=_field(body, "itl_slo_ms", "number"),
        verify=bool(_field(body, "verify", "boolean")),  # extension: online correctness check
    )
    return Parsed(raw, _field(body, "model", "string"), stream, include_usage, param_map)


# --- responses ---------------------------------------------------------------------------------


def _usage(ev: GenerationEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": ev.cached_tokens},
    }


@dataclass(frozen=True)
class _Shape:
    """The OpenAI object shapes of one response (completion or chat completion)."""

    chat: bool
    id: str
    model: str
    created: int

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, last: GenerationEvent) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(last)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(last)}

    def chunk(self, text: str, finish: str | None, first: bool, with_usage: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, last: GenerationEvent) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(last)}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _check_finish(ev: GenerationEvent) -> None:
    if ev.finish_reason == "error":
        raise ApiError(
            500,
            f"generation failed: {ev.error or 'a worker reported an error'}",
            "server_error",
            code="generation_error",
        )


# --- the application ---------------------------------------------------------------------------


class HttpApi:
    def __init__(
        self,
        orchestrator: Orchestrator,
        registry: WorkerRegistry,
        requests: RequestFactory,
        model_name: str,
        api_key: str = "",
        metrics: CollectorRegistry | None = None,
        limits: FrontLimits | None = None,
        slots: ClientSlots | None = None,
    ):
        self._orch = orchestrator
        self._registry = registry
        self._requests = requests
        self.model_name = model_name
        self._api_key = api_key
        self._metrics = metrics
        self._limits = limits or FrontLimits()
        self._slots = slots or ClientSlots(0)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self._limits.max_body_bytes
        )
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        if self._metrics is not None:
            app.router.add_get("/metrics", metrics_handler(self._metrics))
        return app

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Serves on host:port (0 = a free port); returns the bound port.
        reuse_port: share the port with scheduler replicas (SO_REUSEPORT)."""
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=5.0,
            keepalive_timeout=self._limits.keepalive_s,  # aiohttp's own default is an hour
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None).start()
        self.port = bound_port(self._runner)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in OPEN_HTTP_PATHS and not bearer_ok(
            request.headers.get("Authorization"), self._api_key
        ):
            return ApiError(
                401,
                "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            ).response()
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if e.status == 413:
                return self._too_large().response()
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status)
            return ApiError(e.status, e.reason, code=code).response()

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body exceeds this server's limit of {self._limits.max_body_bytes} bytes",
            code="request_too_large",
        )

    async def _health(self, _: web.Request) -> web.Response:
        infos = self._registry.infos()
        decode = sum(1 for v in self._registry.snapshot() if v.role == "decode")
        body = {"status": "ok" if decode else "no decode worker", "workers": len(infos)}
        return web.json_response(body, status=200 if decode else 503)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "disagg",
            "root": self.model_name,
            "max_model_len": self._requests.max_context,
            "vocab_size": self._requests.vocab_size,
        }

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _client(self, request: web.Request) -> str:
        token = bearer_token(request.headers.get("Authorization"))
        return client_key(self._api_key, token, request.remote or "")

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        client = self._client(request)
        if not self._slots.try_acquire(client):
            raise error_for(Overloaded(self._slots.refusal(), retry_after_s=RETRY_AFTER_S))
        try:
            return await self._generate_in_slot(request, chat)
        finally:
            self._slots.release(client)

    async def _body(self, request: web.Request) -> Any:
        """The JSON body: 413 when too large (by its Content-Length before any read), 408
        when it stops arriving, parsed in a thread when large."""
        if (request.content_length or 0) > self._limits.max_body_bytes:
            raise self._too_large()
        try:
            async with asyncio.timeout(self._limits.client_timeout_s):
                data = await request.read()
        except TimeoutError as e:
            raise ApiError(
                408,
                f"the request body did not arrive within {self._limits.client_timeout_s:g}s",
                code="request_timeout",
            ) from e
        try:
            if len(data) > OFF_LOOP_JSON_BYTES:
                return await asyncio.to_thread(json.loads, data)
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(None, f"the request body is not valid JSON: {e}", "invalid_json") from e

    async def _generate_in_slot(self, request: web.Request, chat: bool) -> web.StreamResponse:
        parsed = parse_body(await self._body(request), chat)
        self._check_model(parsed.model)
        try:
            req = await build_off_loop(self._requests, parsed.raw)
        except InvalidRequest as e:
            raise error_for(e, parsed.param_map) from e
        salt = cache_salt(self._api_key, request.headers.get("Authorization"))
        if salt:
            req = dataclasses.replace(req, cache_salt=salt)
        shape = _Shape(
            chat,
            ("chatcmpl-" if chat else "cmpl-") + req.request_id,
            self.model_name,
            int(time.time()),
        )
        gen = cast(AsyncGenerator[GenerationEvent, None], self._orch.generate(req))
        async with contextlib.aclosing(gen) as events:
            try:
                first = await anext(events)
            except (InvalidRequest, Overloaded, Unavailable) as e:
                raise error_for(e, parsed.param_map) from e
            if parsed.stream:
                return await self._stream(request, shape, parsed, first, events)
            return await self._collect(shape, parsed, first, events)

    async def _collect(
        self,
        shape: _Shape,
        parsed: Parsed,
        first: GenerationEvent,
        events: AsyncIterator[GenerationEvent],
    ) -> web.Response:
        parts, last = [first.text], first
        try:
            async for ev in events:
                parts.append(ev.text)
                last = ev
        except (InvalidRequest, Overloaded, Unavailable) as e:
            raise error_for(e, parsed.param_map) from e
        _check_finish(last)
        return web.json_response(shape.full("".join(parts), last))

    async def _stream(
        self,
        request: web.Request,
        shape: _Shape,
        parsed: Parsed,
        first: GenerationEvent,
        events: AsyncIterator[GenerationEvent],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        _bound_send_buffer(request)
        ev: GenerationEvent | None = first
        is_first = True
        try:
            while ev is not None:
                if ev.finish_reason == "error":
                    _check_finish(ev)
                chunk = shape.chunk(ev.text, ev.finish_reason, is_first, parsed.include_usage)
                await self._bounded(request, resp.write(_sse(chunk)))
                is_first = False
                if ev.finish_reason is not None:
                    if parsed.include_usage:
                        await self._bounded(request, resp.write(_sse(shape.usage_chunk(ev))))
                    break
                ev = await anext(events, None)
            end = b"data: [DONE]\n\n"
        except ConnectionResetError:  # the client left (or stalled): leaving closes the generation
            return resp
        except (InvalidRequest, Overloaded, Unavailable, ApiError) as e:
            err = e if isinstance(e, ApiError) else error_for(e, parsed.param_map)
            end = _sse(err.body()) + b"data: [DONE]\n\n"
        with contextlib.suppress(ConnectionResetError):
            await self._bounded(request, resp.write(end))
            await self._bounded(request, resp.write_eof())
        return resp

    async def _bounded(self, request: web.Request, write: Awaitable[None]) -> None:
        """A write of the stream, bounded: a client that takes none of it within
        client_timeout_s (its socket buffers full, so the write cannot drain) is dropped."""
        try:
            async with asyncio.timeout(self._limits.client_timeout_s):
                await write
        except TimeoutError:
            log.info(
                "stream dropped: the client read nothing for %gs", self._limits.client_timeout_s
            )
            if request.transport is not None:
                request.transport.abort()
            raise _ClientStalled from None


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)


class _ClientStalled(ConnectionResetError):
    """A streaming client read nothing for client_timeout_s; its connection is closed."""


def make_http_api(
    orchestrator: Orchestrator,
    registry: WorkerRegistry,
    requests: RequestFactory,
    cfg: Any,
    metrics: CollectorRegistry | None,
    slots: ClientSlots | None = None,
) -> HttpApi:
    """The HTTP front end for a scheduler; cfg is its SchedulerConfig; slots, the per-client
    counts it shares with the gRPC front end."""
    return HttpApi(
        orchestrator,
        registry,
        requests,
        served_name(cfg.model or default_cache_dir()),
        cfg.api_key,
        metrics,
        FrontLimits.of(cfg),
        slots,
    )
