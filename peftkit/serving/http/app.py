"""The OpenAI-compatible HTTP server: ``create_app(engine, registry, tokenizer)`` returns a FastAPI app.

One request's path::

    body (schemas.py) -> registry.resolve(model, fallback) -> ServedExpert, level
         -> decoding: the expert's manifest settings, each request field layered over them
         -> prompt ids (the chat template for chat) -> engine.submit -> TokenEvents
         -> one JSON answer, or SSE chunks ``data: {...}`` ending with ``data: [DONE]``

The engine runs in its own thread; ``submit(..., loop)`` hands events back to this event loop (it is
called in a worker thread: it may compile a grammar, which must not stall the other streams). A client
that disconnects cancels its request (``handle.cancel()``), queued or running, so its batch slot frees
at once. Errors answer OpenAI-style bodies (errors.py); ``/metrics`` is Prometheus text
(metrics.py). ``api_key`` protects every endpoint except ``/health`` (200 while the engine's thread
runs, 503 when it does not).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from peftkit.decoding import DecodingSettings, resolve_decoding
from peftkit.serving.http.errors import APIError, from_serving_error, install_error_handlers
from peftkit.serving.http.metrics import ServerMetrics
from peftkit.serving.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    LoadExpert,
    UnloadExpert,
)
from peftkit.serving.types import ServedExpert, ServeRequest, ServingError, UnknownExpert

BASE = "base"


def create_app(
    engine: Any,
    registry: Any,
    tokenizer: Any,
    *,
    api_key: str | None = None,
    enable_admin: bool = False,
    max_prompt_tokens: int | None = None,
    served_name: str = BASE,
) -> FastAPI:
    """The server's FastAPI app. It connects the engine's prefix store to the registry
    (``registry.add_unload_listener(engine.prefix_store.forget)``).

    Args:
        engine: a started :class:`~peftkit.serving.engine.Engine`.
        registry: the :class:`~peftkit.serving.registry.ExpertRegistry` that names the experts.
        tokenizer: the base model's tokenizer (prompts and the chat template).
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``.
        enable_admin: add ``POST /admin/experts/load`` and ``/admin/experts/unload``.
        max_prompt_tokens: longer prompts answer 413 before reaching the engine.
        served_name: the base model's name, shown by ``/v1/models``.
    """
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None, openapi_url=None)
    # an expert that leaves the registry (unloaded, evicted, reloaded) takes its cached keys/values with it
    registry.add_unload_listener(engine.prefix_store.forget)
    metrics = ServerMetrics(engine)
    install_error_handlers(app, metrics.error)
    server = _Server(engine, registry, tokenizer, metrics, max_prompt_tokens, served_name)
    app.state.server = server

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.running:
            return JSONResponse({"status": "ok"})
        metrics.error(503)
        error = APIError(503, "the engine's background thread is not running (not started, stopped, or it died: "
                         "see the server log); no request can be answered", code="engine_not_running")  # fmt: skip
        return JSONResponse({"status": "unavailable", **error.body()}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": server.models()})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        for entry in server.models():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise APIError(404, f"no expert named {name!r}", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.generate(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.generate(body, request, chat=True)

    if enable_admin:

        @app.post("/admin/experts/load")
        async def load_expert(body: LoadExpert) -> JSONResponse:
            try:
                served = await run_in_threadpool(registry.load, body.path)
            except ServingError:
                raise
            except PermissionError as exc:
                raise APIError(403, str(exc), param="path", code="path_refused") from None
            except FileNotFoundError as exc:
                raise APIError(404, str(exc), param="path", code="not_found") from None
            except ValueError as exc:
                raise APIError(400, str(exc), param="path", code="invalid_value") from None
            loaded = served if isinstance(served, list) else [served]
            return JSONResponse({"loaded": [e if isinstance(e, str) else e.name for e in loaded if e is not None]})

        @app.post("/admin/experts/unload")
        async def unload_expert(body: UnloadExpert) -> JSONResponse:
            try:
                await run_in_threadpool(registry.unload, body.name)
            except UnknownExpert as exc:
                raise from_serving_error(exc, param="name") from None
            except KeyError:
                raise APIError(404, f"no expert named {body.name!r}", param="name", code="model_not_found") from None
            return JSONResponse({"unloaded": body.name})

    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key, on_refused=lambda: metrics.error(401))
    return app


class ApiKeyMiddleware:
    """Refuse (401) any request but ``/health`` whose ``Authorization`` is not ``Bearer <key>``.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``), so streaming and disconnects pass through
    untouched. The key comparison is constant-time (``hmac.compare_digest``).
    """

    OPEN_PATHS = ("/health",)

    def __init__(self, app: Any, key: str, on_refused: Any = None) -> None:
        self.app, self.key, self.on_refused = app, key.encode(), on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                if self.on_refused is not None:
                    self.on_refused()
                given = "no API key" if not header else "an invalid API key"
                error = APIError(401, f"{given}: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server:
    """What the routes share: resolving a request into a :class:`ServeRequest` and answering it."""

    def __init__(
        self, engine: Any, registry: Any, tokenizer: Any, metrics: ServerMetrics, max_prompt: int | None, name: str
    ) -> None:
        self.engine, self.registry, self.tokenizer, self.metrics = engine, registry, tokenizer, metrics
        self.max_prompt, self.served_name = max_prompt, name
        self.created = int(time.time())

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``: ``base`` then the experts (``registry.describe()`` adds their details)."""
        entries = [{"id": BASE, "object": "model", "created": self.created, "owned_by": "peftkit",
                    "root": self.served_name}]  # fmt: skip
        for row in self.registry.describe():  # {id, kind, source, loaded, bytes, version}
            if row["id"] != BASE:
                entries.append({"object": "model", "created": self.created, "owned_by": "peftkit",
                                "root": self.served_name, "parent": self.served_name, **row})  # fmt: skip
        return entries

    async def resolve(self, body: GenerationRequest) -> tuple[ServedExpert | None, str]:
        """The expert that serves ``body`` (in a worker thread: an expert not loaded is read from disk)."""
        try:
            return await run_in_threadpool(self.registry.resolve, body.model, list(body.fallback))
        except UnknownExpert as exc:
            raise from_serving_error(exc, param="model") from None

    def settings(self, body: GenerationRequest, expert: ServedExpert | None) -> DecodingSettings:
        """The expert's manifest settings, with each field the request gives layered over them."""
        settings = expert.decoding if expert is not None else DecodingSettings()
        for name, field, value in body.decoding_values():
            try:
                settings, _ = resolve_decoding((name, {field: value}), base=settings)
            except ValueError as exc:
                raise APIError(400, str(exc), param=name, code="invalid_value") from None
        if body.response_format is not None and body.response_format.type == "text":
            settings = settings.model_copy(update={"grammar": None})
        return settings

    def prompt_ids(self, body: GenerationRequest, chat: bool) -> list[int]:
        if chat:
            from peftkit.session import ChatTemplate

            assert isinstance(body, ChatCompletionRequest)
            ids = ChatTemplate(self.tokenizer).conversation_ids([m.as_template_message() for m in body.messages])
            param = "messages"
        else:
            assert isinstance(body, CompletionRequest)
            param = "prompt"
            if isinstance(body.prompt, str):
                ids = list(self.tokenizer(body.prompt)["input_ids"])
            else:
                ids = [int(i) for i in body.prompt]
                vocab = len(self.tokenizer)
                bad = [i for i in ids if not 0 <= i < vocab]
                if bad:
                    raise APIError(400, f"prompt: token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        if not ids:
            raise APIError(400, f"{param}: the prompt has no tokens", param=param)
        if self.max_prompt is not None and len(ids) > self.max_prompt:
            raise APIError(413, f"{param}: the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{self.max_prompt}", param=param, code="prompt_too_long")  # fmt: skip
        return ids

    async def submit(self, serve: ServeRequest) -> Any:
        """``engine.submit`` in a worker thread (it may compile a grammar: seconds that must not stall the
        other streams). Its errors reach the caller unchanged; a caller cancelled meanwhile does not wait for
        the thread, and the request it submits is then cancelled in the engine."""
        loop = asyncio.get_running_loop()
        submitted = loop.run_in_executor(None, functools.partial(self.engine.submit, serve, loop=loop))
        try:
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(_cancel_submitted)
            raise

    async def generate(self, body: GenerationRequest, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        expert, level = await self.resolve(body)
        settings = self.settings(body, expert)
        ids = self.prompt_ids(body, chat)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        serve = ServeRequest(request_id=request_id, prompt_ids=ids, expert=expert, settings=settings, level=level)
        try:
            handle = await self.submit(serve)
        except ServingError as exc:
            raise from_serving_error(exc, param="messages" if chat else "prompt") from None
        except ValueError as exc:  # a token id outside the model's vocabulary, a grammar that does not compile
            raise APIError(400, str(exc), param="messages" if chat else "prompt", code="invalid_value") from None
        tried = [body.model, *body.fallback]
        fallback_level = tried.index(level) if level in tried else level  # 0: the model asked for
        reply = _Reply(self, request_id, body, expert.name if expert is not None else BASE, fallback_level, chat, start)
        if body.stream:
            return _EventStream(reply, handle)
        return JSONResponse(await reply.collect(handle, request))


class _Reply:
    """One request's answer: OpenAI's response shapes, with ``expert`` (the expert that served it) and
    ``fallback_level`` (its index in ``[model, *fallback]``: 0 is the model asked for) added."""

    def __init__(
        self, server: _Server, request_id: str, body: GenerationRequest, expert: str, level: int | str, chat: bool,
        start: float,
    ) -> None:  # fmt: skip
        self.server, self.id, self.body, self.expert, self.level = server, request_id, body, expert, level
        self.chat, self.start = chat, start
        self.created = int(time.time())
        self.endpoint = "chat" if chat else "completions"
        self.first_token = True
        self.finished = False  # the final event was sent

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "expert": self.expert, "fallback_level": self.level}  # fmt: skip

    def _observe(self, event: Any) -> None:
        metrics = self.server.metrics
        if self.first_token and (event.token_id is not None or event.text):
            self.first_token = False
            metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.start)
        if event.finish_reason is not None:
            metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.start)
            metrics.requests.labels(self.expert, event.finish_reason).inc()

    @staticmethod
    def _usage(event: Any) -> dict[str, int] | None:
        usage = event.usage
        if usage is None:
            return None
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens}  # fmt: skip

    async def collect(self, handle: Any, request: Request) -> dict[str, Any]:
        """Wait for the whole answer; a client that leaves meanwhile cancels the request."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        pieces, last = [], None
        try:
            async for event in handle:
                self._observe(event)
                pieces.append(event.text)
                if event.finish_reason is not None:
                    last = event
                    break
        finally:
            watcher.cancel()
            if last is None:
                handle.cancel()
        if last is None or last.finish_reason == "error":
            raise APIError(500, "the engine failed while generating this request", code="engine_error")
        text = "".join(pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": self._usage(last)}

    def _chunk(self, delta: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            content: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                content["content"] = delta
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            chunk = {**self._head("text_completion"), "choices": [choice]}
        if self.body.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    async def stream(self, handle: Any) -> AsyncIterator[str]:
        """SSE chunks. Cancelled (the client left) or failed, the request is cancelled in the engine."""
        try:
            if self.chat:
                yield self._chunk(None, None, role=True)
            async for event in handle:
                self._observe(event)
                if event.text:
                    yield self._chunk(event.text, None)
                if event.finish_reason is None:
                    continue
                self.finished = True
                if event.finish_reason == "error":
                    error = APIError(500, "the engine failed while generating this request", code="engine_error")
                    yield _sse(error.body())
                else:
                    yield self._chunk(None, event.finish_reason)
                    if self.body.include_usage:
                        obj = "chat.completion.chunk" if self.chat else "text_completion"
                        yield _sse({**self._head(obj), "choices": [], "usage": self._usage(event)})
                break
            yield "data: [DONE]\n\n"
        finally:
            if not self.finished:  # the client left, or the stream failed
                handle.cancel()


class _EventStream(StreamingResponse):
    """The SSE response of one request. Whatever ends it (the client leaving, even before the first
    chunk, or an error), a request whose final event was not sent is cancelled in the engine."""

    def __init__(self, reply: _Reply, handle: Any) -> None:
        super().__init__(reply.stream(handle), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self.reply, self.handle = reply, handle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.reply.finished:  # its final event never reached the client
                self.handle.cancel()
                self.reply.server.metrics.requests.labels(self.reply.expert, "abort").inc()


async def _cancel_on_disconnect(request: Request, handle: Any) -> None:
    """Cancel ``handle`` when the client disconnects (the body has been read: ``receive`` now waits
    for ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


def _cancel_submitted(submitted: asyncio.Future[Any]) -> None:
    """Cancel the request a worker thread submitted for a caller that is gone."""
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
