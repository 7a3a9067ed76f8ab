"""`blip2 serve`: an HTTP server for one checkpoint (FastAPI + uvicorn: the `serve` extra).

    POST /v1/chat/completions  OpenAI-style chat: one image (data: URL) and text; `stream: true` sends
                               server-sent events, token by token (beam search: at the end)
    POST /v1/caption           captions (LLM checkpoints; stage-1 checkpoints with a Q-Former LM head)
    POST /v1/itm               image-text match scores: P(match) from the ITM head and the ITC similarity
    GET  /health               status and batching statistics
    GET  /metrics              Prometheus metrics (blip2.serve.telemetry)
    GET  /v1/models            the model and what it can do
    GET  /                     a web page: drop an image, ask, watch the answer stream in

Every error is JSON {"error": {"message", "type", "code"}}; what the client got wrong gets a 4xx (413 for
bodies and images over the limits, 401 without the API key when one is set, 429 with Retry-After when
`max_queue` requests already wait), a full set of slots a 503. Requests run through the continuous batcher
(blip2.serve.continuous) or, with engine="batch", the batch-at-once one (blip2.serve.batching); a client that
disconnects gives its slot back at once. Every response carries an X-Request-ID.
"""

# No `from __future__ import annotations` here: FastAPI reads the route annotations (request models, Request),
# which `_web` imports and `_add_task_routes` puts in scope, from the live function objects.
import asyncio
import copy
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files
from types import SimpleNamespace

from ..api import __version__, load
from .batching import Backlogged, Batcher, Job, QueueFull
from .continuous import ContinuousBatcher
from .engine import Engine, RequestError, ServeSettings
from .middleware import BodyLimit, Operations, dumps, error_body
from .telemetry import Metrics
from .vcache import VisualCache

__all__ = ["create_app", "serve", "BackgroundServer"]


def _error_of(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), exc.status, exc.code)
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", 500, "internal_error")


_ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/caption", "/v1/itm")


def make_batcher(engine: Engine, settings: ServeSettings) -> Batcher:
    """The continuous batcher (with its visual-prompt cache) or, with engine="batch", the batch-at-once one."""
    s = settings
    if s.engine == "batch":
        return Batcher(engine.run, s.max_batch_rows, s.max_wait_ms / 1000, s.max_pending, s.max_queue)
    cache = VisualCache(int(s.visual_cache_mb * 2**20)) if s.visual_cache_mb > 0 else None
    return ContinuousBatcher(engine, s.max_batch_rows, s.max_wait_ms / 1000, s.max_pending, s.max_queue,
                             s.prefill_chunk, cache)


def create_app(model, settings: ServeSettings | None = None):
    """A FastAPI app serving `model` (a blip2 Blip2Model with its processor attached)."""
    web = _web()
    settings = settings or ServeSettings()
    engine = Engine(model, settings)
    batcher = make_batcher(engine, settings)
    metrics = Metrics(batcher.stats)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # graceful: running and queued requests finish (up to shutdown_timeout_s), new ones get 503
        await web.run_in_threadpool(batcher.stop, 10.0, settings.shutdown_timeout_s)

    app = web.FastAPI(title="blip2", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:  # off by default: browsers then refuse cross-site calls
        app.add_middleware(web.CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Operations, metrics=metrics, api_key=settings.api_key, endpoints=_ENDPOINTS)
    _add_error_handlers(app, web)
    _add_info_routes(app, web, engine, batcher, settings.model_name, metrics)
    _add_task_routes(app, web, engine, settings, _Jobs(batcher, metrics))
    return app


def _web() -> SimpleNamespace:
    """The names of the `serve` extra the app is made of, imported when an app is made."""
    # deferred: fastapi, starlette and pydantic (the request schemas) are the optional `serve` extra
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, Response, StreamingResponse

    from . import schemas

    def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
        return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)

    return SimpleNamespace(FastAPI=FastAPI, CORSMiddleware=CORSMiddleware, Request=Request, RequestValidationError=RequestValidationError,
                           run_in_threadpool=run_in_threadpool, HTTPException=HTTPException,
                           HTMLResponse=HTMLResponse, Response=Response, StreamingResponse=StreamingResponse,
                           schemas=schemas, json=json_response)


def _add_error_handlers(app, web: SimpleNamespace) -> None:
    """Every error as JSON {"error": {...}}: what the client got wrong a 4xx, a bug a 500."""
    json_response = web.json

    @app.exception_handler(web.RequestValidationError)
    async def _invalid(request, exc):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and not (ctype == "application/json" or ctype.endswith("+json")):
            # FastAPI parses JSON only with a JSON content type: a page on another site cannot then post to a
            # local server without the browser asking (CORS preflight), and this server never says yes
            return json_response(error_body(f"send the body as JSON with Content-Type: application/json "
                                             f"(got {ctype or 'none'!r})", 415, "unsupported_media_type"), 415)
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return json_response(error_body("the request body is not valid JSON", 400, "invalid_json"), 400)
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = str(first.get("msg", "invalid request"))
        return json_response(error_body(f"{loc}: {msg}" if loc else msg, 400, "invalid_request"), 400)

    @app.exception_handler(web.HTTPException)
    async def _http(request, exc):
        return json_response(error_body(str(exc.detail), exc.status_code), exc.status_code)

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):
        status, body = _error_of(exc)
        return json_response(body, status, exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # a bug: still JSON
        status, body = _error_of(exc)
        return json_response(body, status)


class _Jobs:
    """Jobs between the HTTP handlers and the batcher: submitted, awaited, released when nobody waits."""

    def __init__(self, batcher: Batcher, metrics: Metrics):
        self.batcher, self.metrics = batcher, metrics

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue the job; its events arrive in the returned asyncio queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        metrics = self.metrics

        def emit(event):
            if event[0] == "done" and "choices" in event[1]:  # a generation: tokens and time to first token
                metrics.tokens.inc(sum(c["tokens"] for c in event[1]["choices"]))
                if job.payload.first_token_at is not None:
                    metrics.ttft.observe(job.payload.first_token_at - job.arrived)
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        job.emit = emit
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise RequestError(f"the server is busy ({e}); retry later", status=503, code="busy") from None
        except Backlogged as e:
            raise RequestError(f"too many requests ({e}); retry later", status=429, code="rate_limited",
                               headers={"Retry-After": "1"}) from None
        return events

    def release(self, job: Job) -> None:
        if not job.settled:
            self.batcher.cancel(job)

    async def result_of(self, request, job: Job, events: asyncio.Queue):
        """The job's result; cancels the job (freeing its slot) if the client disconnects while waiting."""
        getter = asyncio.ensure_future(events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=0.25)
                if done:
                    kind, *rest = getter.result()
                    if kind == "done":
                        return rest[0]
                    if kind == "error":
                        raise rest[-1]
                    getter = asyncio.ensure_future(events.get())  # a streamed delta: not wanted here
                elif await request.is_disconnected():
                    return None
        finally:
            getter.cancel()
            self.release(job)

    def stream(self, web: SimpleNamespace, content, job: Job):
        """Server-sent events that cancel their job when the response ends early (client gone)."""
        release = self.release

        class JobStream(web.StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    release(job)

        return JobStream(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_info_routes(app, web: SimpleNamespace, engine: Engine, batcher: Batcher, name: str,
                     metrics: Metrics) -> None:
    """GET /, /health, /metrics and /v1/models."""
    page = (files("blip2.serve") / "static" / "index.html").read_text(encoding="utf-8")
    started = int(time.time())

    @app.get("/", include_in_schema=False)
    async def index():
        return web.HTMLResponse(page)

    @app.get("/health")
    async def health():
        return web.json({"status": "ok", "model": name, **batcher.stats()})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        data, ctype = metrics.render()
        return web.Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return web.json({"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "blip2",
             "architecture": engine.arch, "capabilities": engine.capabilities()}]})


def _add_task_routes(app, web: SimpleNamespace, engine: Engine, settings: ServeSettings, jobs: _Jobs) -> None:
    """POST /v1/chat/completions, /v1/caption and /v1/itm: prepare the job in a thread, batch it, answer."""
    S, Request, Response, name = web.schemas, web.Request, web.Response, settings.model_name

    @app.post("/v1/chat/completions")
    async def chat(body: S.ChatRequest, request: Request):
        if not engine.has_llm:
            raise RequestError("this checkpoint has no language model to chat with; use /v1/caption or /v1/itm")

        def prepare() -> Job:
            url, text = S.chat_inputs(body.messages, engine.template)
            image = S.load_image(url, settings)
            return engine.generation_job(image, text, body.decoding(), body.new_tokens(settings), body.seed,
                                         body.stream)

        job = await web.run_in_threadpool(prepare)
        events = jobs.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return jobs.stream(web, _chat_events(events, rid, created, name, body.n, usage), job)
        result = await jobs.result_of(request, job, events)
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return web.json(_chat_completion(result, rid, created, name))

    @app.post("/v1/caption")
    async def caption(body: S.CaptionRequest, request: Request):
        def prepare() -> Job:
            image = S.load_image(body.image, settings)
            text = body.prompt.strip() if body.prompt else ""
            return engine.generation_job(image, text, body.decoding(), body.new_tokens(settings), body.seed, False)

        job = await web.run_in_threadpool(prepare)
        result = await jobs.result_of(request, job, jobs.submit(job))
        if result is None:
            return Response(status_code=499)
        out = {"id": f"caption-{uuid.uuid4().hex[:24]}", "object": "caption", "created": int(time.time()),
               "model": name, "captions": [{k: c[k] for k in ("index", "text", "finish_reason")}
                                           for c in result["choices"]], "usage": _usage(result)}
        if result["seed"] is not None:
            out["seed"] = result["seed"]
        return web.json(out)

    @app.post("/v1/itm")
    async def itm(body: S.ItmRequest, request: Request):
        def prepare() -> Job:
            return engine.itm_job(S.load_image(body.image, settings), body.texts)

        job = await web.run_in_threadpool(prepare)
        result = await jobs.result_of(request, job, jobs.submit(job))
        if result is None:
            return Response(status_code=499)
        return web.json({"object": "itm", "model": name, "scores": result["scores"]})


def _usage(result: dict) -> dict:
    done = sum(c["tokens"] for c in result["choices"])
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": done,
            "total_tokens": result["prompt_tokens"] + done}


def _chat_completion(result: dict, rid: str, created: int, name: str) -> dict:
    out = {"id": rid, "object": "chat.completion", "created": created, "model": name,
           "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                        "finish_reason": c["finish_reason"]} for c in result["choices"]],
           "usage": _usage(result)}
    if result["seed"] is not None:
        out["seed"] = result["seed"]  # the seed that reproduces these samples
    return out


async def _chat_events(events: asyncio.Queue, rid: str, created: int, name: str, n: int, usage: bool = False):
    """OpenAI's chat.completion.chunk stream: a role chunk, content deltas, a finish chunk per choice, (with
    stream_options.include_usage) a chunk with the usage and no choices, [DONE]."""

    def chunk(choices: list[dict], **extra) -> str:
        return "data: " + dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": name, "choices": choices, **extra}) + "\n\n"

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(n)])
    while True:
        kind, *rest = await events.get()
        if kind == "delta":
            i, text = rest
            yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}])
        elif kind == "done":
            result = rest[0]
            yield chunk([{"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}
                         for c in result["choices"]])
            if usage:
                yield chunk([], usage=_usage(result))
            break
        else:  # the status line is already sent: the error travels as an event
            yield "data: " + dumps(_error_of(rest[-1])[1]) + "\n\n"
            break
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------- running


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          dtype=None, device=None, log_level: str = "info", quantize: str | None = None, adapter=None,
          precision: str = "auto") -> None:
    """Load a checkpoint (quantised / with a LoRA adapter / the precision policy: see `blip2.load`) and serve it
    until interrupted."""
    import uvicorn  # deferred: the optional `serve` extra

    model = load(model_dir, dtype=dtype, device=device, quantize=quantize, adapter=adapter, precision=precision)
    settings = settings or ServeSettings()
    # our per-request log line (with the request id) replaces uvicorn's access log, on uvicorn's handler
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["blip2.serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level, log_config=log_config,
                access_log=False, timeout_graceful_shutdown=settings.shutdown_timeout_s)


class BackgroundServer:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn  # deferred: the optional `serve` extra

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
