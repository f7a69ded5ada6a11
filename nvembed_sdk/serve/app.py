"""``create_app(embedder_or_factory, settings)``: the FastAPI application, independent of its host.

The app owns one :class:`ServeState` (``app.state.nvembed``): the embedder, the batcher, the
metrics and the readiness flags. Its lifespan starts them (load, warm-up batch, ready) and stops
them (drain the batcher). A host that does not run ASGI lifespan events can call
``await state.start()`` / ``await state.stop()`` itself; a host that catches SIGTERM calls
``state.begin_drain()`` first so readiness goes false and no new request is admitted.

Routes: ``POST /v1/embeddings`` (OpenAI + NIM), ``GET /v1/models``, ``/health/live``,
``/health/ready``, ``/metrics``. Every error is OpenAI's envelope; nothing reads or writes a
file a request names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvembed_sdk.embedder import Embedder, query_instruction
from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.serve.auth import OPEN_PATHS, check_bearer
from nvembed_sdk.serve.batcher import Batcher, Closed, QueueFull, TooLarge
from nvembed_sdk.serve.metrics import Metrics
from nvembed_sdk.serve.schema import (
    APIError,
    EmbeddingRequest,
    embedding_response,
    error_body,
    parse_inputs,
    split_model_name,
    truncate_dims,
    truncate_ids,
)
from nvembed_sdk.serve.settings import ServeSettings

log = logging.getLogger("nvembed_sdk.serve")
access_log = logging.getLogger("nvembed_sdk.serve.access")

_NO_LIMIT = 1 << 30  # tokenise without truncation; the request's `truncate` decides


def declared_dims(embedder: Embedder) -> tuple[int, ...]:
    """Widths the artifact says it may be truncated to (``matryoshka_dims``), else ()."""
    found = embedder.manifest.get("model", {}).get("matryoshka_dims") or embedder.manifest.get("matryoshka_dims")
    if not found:
        cfg = Path(str(embedder.runner.path))
        cfg = (cfg if cfg.is_dir() else cfg.parent) / "config.json"
        if cfg.is_file():
            with contextlib.suppress(ValueError, OSError):
                found = json.loads(cfg.read_text(encoding="utf-8")).get("matryoshka_dims")
    return tuple(int(d) for d in found or ())


class ServeState:
    """Everything one app instance runs on (see the module docstring for the lifecycle)."""

    def __init__(self, embedder_or_factory: Embedder | Callable[[], Embedder], settings: ServeSettings) -> None:
        self.settings = settings
        self._source = embedder_or_factory
        self._owns_embedder = not isinstance(embedder_or_factory, Embedder)
        self.embedder: Embedder | None = None
        self.batcher: Batcher | None = None
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.admitted = 0
        self.answered = 0
        self.model_name = settings.served_model_name or "nvembed"
        self.dims: tuple[int, ...] = ()
        self.max_length = 0
        self.vocab_size = 0
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(settings.tokenize_threads, thread_name_prefix="nvembed-tokenize")

    async def load(self) -> None:
        """Load the embedder (a factory runs off the event loop) and start the batcher.

        Idempotent: a host that started the state itself (Ray Serve, before taking traffic)
        then runs the lifespan, whose ``load`` and ``warm_up`` do nothing the second time."""
        if self.batcher is not None:
            return
        if self.embedder is None:
            src = self._source
            self.embedder = src if isinstance(src, Embedder) else await asyncio.to_thread(src)
        emb = self.embedder
        s = self.settings
        if s.served_model_name is None:
            path = Path(str(emb.runner.path))
            self.model_name = (path if path.is_dir() else path.parent).name
        self.dims = s.matryoshka_dims if s.matryoshka_dims is not None else declared_dims(emb)
        self.max_length = emb.text.max_length
        self.vocab_size = emb.text.vocab_size
        self.batcher = Batcher(emb.runner.run, emb.text.collate, emb.dim, s.max_batch_tokens, s.max_batch_requests,
                               s.max_queue_tokens, observer=self.metrics).start()

    async def warm_up(self) -> None:
        """One batch through the queue (the worker thread's first pass: CUDA/TensorRT context,
        ORT arenas), then ready."""
        assert self.batcher is not None and self.embedder is not None
        if self.ready:
            return
        if self.settings.warmup:
            rows = self.embedder.text.tokenize(["warm-up"], "")
            await self.batcher.submit(rows, [0]).future
        if not self.draining:
            self.ready = True
            self.metrics.ready.set(1)
        log.info("ready: model %s (%s), max batch tokens %d", self.model_name, self.embedder,
                 self.settings.max_batch_tokens)

    async def start(self) -> None:
        """``load`` then ``warm_up``, for hosts that do not run the ASGI lifespan."""
        await self.load()
        await self.warm_up()

    def begin_drain(self) -> None:
        """Readiness goes false and new requests get 503; admitted ones still finish."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
        self.pool.shutdown(wait=True)
        log.info("drained: admitted %d requests, answered %d", self.admitted, self.answered)
        if self._owns_embedder and self.embedder is not None:
            self.embedder.close()


def create_app(embedder_or_factory: Embedder | Callable[[], Embedder], settings: ServeSettings | None = None) -> FastAPI:
    """Build the embedding app.

    Args:
        embedder_or_factory: a loaded :class:`Embedder`, or a zero-argument callable returning
            one (called at startup, off the event loop; the app then closes it at shutdown).
        settings: limits, auth and names. Defaults to ``ServeSettings()``.

    Returns:
        A FastAPI app; host it with uvicorn (:func:`nvembed_sdk.serve.server.serve`) or any ASGI host.
    """
    settings = settings or ServeSettings()
    state = ServeState(embedder_or_factory, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.load()
        # warm up in the background: the port opens at once, /health/ready says 503 until done
        warm = asyncio.create_task(state.warm_up())
        warm.add_done_callback(_log_warmup_failure)
        try:
            yield
        finally:
            if not warm.done():
                warm.cancel()
            await state.stop()

    app = FastAPI(title="nvembed serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.nvembed = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_AccessLog, enabled=settings.access_log)

    def envelope(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return envelope(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)[:500], "invalid_request_error"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"{request.url.path} | {exc.detail}", "invalid_request_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug, still in the envelope
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if request.url.path not in OPEN_PATHS:
            check_bearer(request.headers.get("authorization"), settings.api_key)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if state.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        names = [state.model_name, f"{state.model_name}-query", f"{state.model_name}-passage"]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": state.created,
                                            "owned_by": "nvembed-sdk", "root": state.model_name} for n in names]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await _embed(request)
        except APIError as exc:
            state.metrics.requests.labels(str(exc.status)).inc()
            return envelope(exc)
        state.metrics.requests.labels("200").inc()
        state.metrics.total_s.observe(time.perf_counter() - t0)
        return response

    async def _embed(request: Request) -> Response:
        authorize(request)
        if state.draining or not state.ready or state.batcher is None:
            raise APIError(503, "server | got a request while " + ("draining" if state.draining else "starting")
                           + ". Note: retry on another replica or after /health/ready says ready",
                           type="service_unavailable", code="not_ready", headers={"Retry-After": "1"})
        body = await _read_body(request, settings.max_body_bytes)
        req = _parse(body)
        batcher = state.batcher
        if batcher.full():  # refuse before tokenising
            state.metrics.rejected.labels("queue_full").inc()
            raise _queue_full(settings)
        model, suffix_type = split_model_name(req.model, state.model_name)
        if model != state.model_name:
            raise APIError(404, f"model | got {req.model!r}. Note: this server serves {state.model_name!r} "
                                f"(and {state.model_name}-query / -passage); see /v1/models",
                           param="model", code="model_not_found")
        input_type = req.input_type or suffix_type or settings.default_input_type
        if req.dimensions is not None and req.dimensions != batcher.dim and req.dimensions not in state.dims:
            allowed = f"one of {list(state.dims)}" if state.dims else "not truncatable: this model declares no matryoshka_dims"
            raise APIError(400, f"dimensions | got {req.dimensions}. Note: the model's width is {batcher.dim}; "
                                f"{allowed}", param="dimensions", code="unsupported_dimensions")
        inputs = parse_inputs(req.input, settings.max_inputs, state.vocab_size)
        if req.instruction is not None:
            instruction = req.instruction
        elif input_type == "query":
            instruction = query_instruction(req.task or settings.default_task)
        else:
            instruction = ""
        t_tok = time.perf_counter()
        loop = asyncio.get_running_loop()
        rows, starts = await loop.run_in_executor(state.pool, _tokenize, state, inputs, instruction, req.truncate)
        state.metrics.tokenize_s.observe(time.perf_counter() - t_tok)
        tokens = sum(len(r) for r in rows)
        request.state.nvembed = {"inputs": len(rows), "tokens": tokens}
        try:
            job = batcher.submit(rows, starts)
        except QueueFull:
            state.metrics.rejected.labels("queue_full").inc()
            raise _queue_full(settings) from None
        except TooLarge:
            state.metrics.rejected.labels("too_large").inc()
            raise APIError(413, f"input | got {tokens} tokens in one request. Note: the queue holds at most "
                                f"{settings.max_queue_tokens} (--max-queue-tokens); split the request",
                           param="input", code="request_too_large") from None
        except Closed:
            raise APIError(503, "server | draining. Note: retry on another replica", type="service_unavailable",
                           code="not_ready", headers={"Retry-After": "1"}) from None
        state.admitted += 1
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():  # the client went away: drop what has not run
            batcher.cancel(job)
            job.future.cancel()
            state.answered += 1  # nobody to answer; counted so the drain log balances
            state.metrics.rejected.labels("client_gone").inc()
            return Response(status_code=499)
        vectors = job.future.result()
        if req.dimensions is not None and req.dimensions != batcher.dim:
            vectors = truncate_dims(vectors, req.dimensions)
        state.metrics.texts.inc(len(rows))
        state.metrics.tokens.inc(tokens)
        body_out = embedding_response(vectors, req.encoding_format, req.model or state.model_name, tokens)
        state.answered += 1
        return Response(body_out, media_type="application/json")

    return app


def _log_warmup_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:  # stays not ready; say why
        log.error("warm-up failed, /health/ready stays 503: %r", task.exception())


def _queue_full(settings: ServeSettings) -> APIError:
    return APIError(429, f"queue | over {settings.max_queue_tokens} queued tokens (--max-queue-tokens). Note: "
                         f"retry after {settings.retry_after_s}s or send smaller requests",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"body | over {limit} bytes. Note: the server accepts at most {limit} bytes per "
                            "request (--max-body-bytes); split the request", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise too_big
    return bytes(chunks)


def _parse(body: bytes) -> EmbeddingRequest:
    if not body.strip():
        raise APIError(400, "body | got nothing. Note: send a JSON object with an 'input' field", code="invalid_json")
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"body | got invalid JSON ({first['msg']}). Note: send a JSON object",
                           code="invalid_json") from None
        if first["type"] == "model_type":
            raise APIError(400, "body | got a JSON value that is not an object. Note: send a JSON object "
                                "with an 'input' field", code="invalid_json") from None
        loc = [str(p) for p in first["loc"]]
        param = loc[0] if loc else None
        if param == "input":
            msg = ("input | got a value of the wrong type. Note: a string, a list of strings, a list of token "
                   "ids or a list of token-id lists")
            if first["type"] == "missing":
                msg = "input | got nothing. Note: the 'input' field is required"
        else:
            got = first.get("input")
            msg = f"{'.'.join(loc) or 'body'} | got {json.dumps(got)[:80] if got is not None else 'nothing'}. Note: {first['msg']}"
        raise APIError(422, msg, param=param, code="invalid_value") from None


def _tokenize(state: ServeState, inputs: Any, instruction: str, truncate: str) -> tuple[list[list[int]], list[int]]:
    """Model input rows (BOS ... EOS, NIM truncation applied) and each row's pool start ``L``."""
    text = state.embedder.text  # type: ignore[union-attr]
    start = text.instruction_length(instruction)
    if start >= state.max_length:  # truncation would keep only instruction: nothing to pool (NaN vectors)
        raise APIError(400, fmt("instruction", f"{start} tokens", f"the model takes at most {state.max_length} "
                                "tokens in all, the text's included; send a shorter instruction or task"),
                       param="instruction", code="instruction_too_long")
    if inputs.texts is not None:
        try:
            raw = text.tokenize(inputs.texts, instruction, _NO_LIMIT)
        except InputError as exc:  # the instruction's last word merges with a text: nothing to pool
            raise APIError(400, str(exc), param="instruction", code="invalid_instruction") from None
    else:  # ids go straight to the model: the client sent BOS, the instruction and EOS itself
        raw = inputs.ids
        for i, row in enumerate(raw):
            if len(row) <= start:
                raise APIError(400, f"input[{i}] | got {len(row)} token ids. Note: a query row starts with the "
                                    f"instruction's {start} tokens and needs more after them", param="input")
    rows = [truncate_ids(r, start, state.max_length, truncate, i) for i, r in enumerate(raw)]
    return rows, [start] * len(rows)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _AccessLog:
    """Pure ASGI middleware: one JSON log line per request (method, path, status, ms, counts; never texts)."""

    def __init__(self, app: Any, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            extra = (scope.get("state") or {}).get("nvembed", {})
            client = scope.get("client")
            access_log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status[0],
                                        "ms": round((time.perf_counter() - t0) * 1000, 2),
                                        "client": client[0] if client else None, **extra}))

