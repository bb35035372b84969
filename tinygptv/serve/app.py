"""The FastAPI application: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, the web page at ``/``.

Response extension: ``choices[0].message.grounding`` (non-streamed) or, streamed, ``choices[0].delta.grounding``
in the chunk that carries ``finish_reason``: the boxes of the answer (``{<x1><y1><x2><y2>}`` on the 0–100 grid)
as ``[{"x1", "y1", "x2", "y2", "label", "image"}]`` in pixels of the most recent image of the request
(``image`` is its 0-based index among the request's images); an empty list when there is none.

Auth: with an API key every route needs ``Authorization: Bearer KEY`` except ``/health`` and the page ``/``
(static, no data: the page asks for the key and sends it with its API calls).

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (schema, JSON, image,
limits), 401 API key, 413 body size (checked before parsing), 429 queue full (``Retry-After: 1``), 504 timeout
(queueing included; mid-stream it arrives as a ``data: {"error": …}`` event before ``[DONE]``). A client that
disconnects cancels its request (see :mod:`tinygptv.serve.worker` for batching).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygptv.infer.engine import Engine
from tinygptv.infer.grounding import parse_boxes
from tinygptv.serve.errors import ApiError, server_error, timed_out
from tinygptv.serve.protocol import ChatCompletionRequest, Limits, PromptCounter, decode_json_error, prepare
from tinygptv.serve.worker import BatchWorker, Delta, Done, Failed, Job, Started

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page.html"
PUBLIC_PATHS = frozenset({"/", "/health"})
POLL_S = 0.1  # how often a waiting request checks whether its client is still connected
GRACE_S = 0.5  # the worker reports timeouts itself; the handler gives up this much later


@dataclass
class ServeSettings:
    """Server behaviour (the ``tinygptv serve`` options)."""

    model_id: str = "tinygptv"
    max_batch: int = 8
    queue_size: int = 64
    batch_wait_s: float = 0.0
    timeout_s: float = 60.0
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    limits: Limits = field(default_factory=Limits)


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Gate:
    """ASGI middleware: the API key check and the request-body size limit, before any parsing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in PUBLIC_PATHS and not self._authorized(scope):
            err = ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
            return await error_response(err)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than the limit of {self.max_body} bytes",
                             "invalid_request_error", None, "body_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body:
            return await error_response(too_large)(scope, receive, send)
        body = bytearray()
        while True:  # read the whole (bounded) body here, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


class ClientGone(Exception):
    """The client disconnected while its request was waiting or running."""


def grounding(text: str, sizes: list[tuple[int, int]]) -> list[dict]:
    """Boxes of ``text`` in pixels of the last image (see the module docstring)."""
    if not sizes:
        return []
    w, h = sizes[-1]
    return [{"x1": round(b.x1, 2), "y1": round(b.y1, 2), "x2": round(b.x2, 2), "y2": round(b.y2, 2),
             "label": b.label, "image": len(sizes) - 1} for b in parse_boxes(text, w, h)]


def create_app(engine: Engine, settings: ServeSettings | None = None, generate=None) -> FastAPI:
    """The application around ``engine``; ``generate`` replaces ``generate_tokens`` (tests script answers)."""
    settings = settings or ServeSettings()
    extra = {} if generate is None else {"generate": generate}
    worker = BatchWorker(engine, settings.max_batch, settings.queue_size, settings.batch_wait_s, **extra)
    counter = PromptCounter(engine)
    context = engine.model.cfg.lm.max_position_embeddings
    started_at = int(time.time())
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app):
        worker.start()
        log.info("serving %s (max batch %d, queue %d, timeout %gs)", settings.model_id, settings.max_batch,
                 settings.queue_size, settings.timeout_s)
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="tinygptv", version="1", lifespan=lifespan, redoc_url=None,
                  description="OpenAI-compatible chat completions for TinyGPT-V (images as data: URLs).")
    app.state.worker, app.state.engine, app.state.settings = worker, engine, settings
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return error_response(decode_json_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, code))

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return error_response(server_error("internal server error; see the server log"))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        """Liveness, queue depth and batching counters (no authentication)."""
        return {"status": "ok", "model": settings.model_id, "auth": bool(settings.api_key), "queue": worker.pending,
                "queue_size": settings.queue_size, "max_batch": settings.max_batch, "stats": worker.stats.to_dict()}

    @app.get("/v1/models")
    async def models() -> dict:
        """The one model this server answers with."""
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": started_at,
                                            "owned_by": "tinygptv", "context_length": context,
                                            "image_tokens": counter.queries}]}

    async def next_event(queue: asyncio.Queue, job: Job, request: Request):
        while True:
            remaining = job.deadline + GRACE_S - time.monotonic()
            if remaining <= 0:
                job.cancel()
                return Failed(timed_out(settings.timeout_s))
            try:
                return await asyncio.wait_for(queue.get(), timeout=min(POLL_S, remaining))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone from None

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions (``stream`` for server-sent events); see the module docs for extensions."""
        prepared = await run_in_threadpool(prepare, body, engine, counter, settings.limits, context)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(prepared.request, prepared.cfg, prepared.prompt_tokens,
                  lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), settings.timeout_s, body.stream)
        worker.submit(job)
        rid, created, t0 = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        base = {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_id}

        def usage(done: Done) -> dict:
            n = len(done.token_ids)
            log.info("%s: %d prompt + %d completion tokens in %.2f s (%s)", rid, done.prompt_tokens, n,
                     time.perf_counter() - t0, done.finish_reason)
            return {"prompt_tokens": done.prompt_tokens, "completion_tokens": n, "total_tokens": done.prompt_tokens + n}

        try:
            event = await next_event(queue, job, request)
            if not body.stream:
                while not isinstance(event, (Done, Failed)):
                    event = await next_event(queue, job, request)
        except ClientGone:
            log.info("%s: client disconnected before the answer started", rid)
            return Response(status_code=499)
        if isinstance(event, Failed):
            return error_response(event.error)
        if not body.stream:
            message = {"role": "assistant", "content": event.text,
                       "grounding": grounding(event.text, prepared.image_sizes)}
            return JSONResponse({**base, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": event.finish_reason}],
                "usage": usage(event)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def sse(delta: dict, finish: str | None = None) -> str:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            try:
                yield sse({"role": "assistant", "content": ""})
                while True:
                    ev = await next_event(queue, job, request)
                    if isinstance(ev, Delta):
                        yield sse({"content": ev.text})
                    elif isinstance(ev, Done):
                        counts = usage(ev)
                        yield sse({"grounding": grounding(ev.text, prepared.image_sizes)}, ev.finish_reason)
                        if include_usage:
                            tail = {**base, "object": "chat.completion.chunk", "choices": [], "usage": counts}
                            yield f"data: {json.dumps(tail)}\n\n"
                        break
                    elif isinstance(ev, Failed):
                        yield f"data: {json.dumps(ev.error.body())}\n\n"
                        break
                yield "data: [DONE]\n\n"
            except ClientGone:
                log.info("%s: client disconnected; generation cancelled", rid)
            finally:
                job.cancel()

        if not isinstance(event, Started):
            return error_response(server_error(f"unexpected first event {type(event).__name__}"))
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
