"""`create_app`: the OpenAI- and Anthropic-compatible HTTP server over `AsyncLLMEngine` (FastAPI).

    app = create_app(LLM("models/pico"), served_model_name="pico", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `nemotron3 serve` does

The layers, as vLLM's entrypoints: `app.py` (this: wiring) -> `openai.py` / `responses.py` / `anthropic.py`
(protocols: request -> plan, outputs -> responses) -> `serving.py` (limits, the engine's request checks,
rendering, running a request with metrics) -> the engine. `http.py` holds the middleware, JSON body handling
and error shaping, `protocol.py` / `protocol_responses.py` the request and response models, `metrics.py` the
Prometheus metrics. Every request is its own engine request (nothing is serialised behind a lock); the
engine's text deltas run through `chat.parsers.StreamParser` to split reasoning, content and tool calls.

Limits: request bodies over `max_body_bytes` get 413; `n` is capped by `max_n`; the sequences in flight by
`max_pending` (429); `max_tokens` must fit the context (`max_model_len`); request bodies idle for
`body_timeout` seconds get 408. The API key (if set) is checked, with constant-time compare, on everything but
the chat page and /health (/metrics too unless `metrics_public`). The chat page is served from the same
origin, so no CORS headers.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse

from ..engine import LLM, AsyncLLMEngine, LLMEngine
from . import anthropic, openai, responses
from .http import PUBLIC_PATHS, GuardMiddleware, JSONBodyRoute, add_error_handlers, document_responses
from .metrics import CONTENT_TYPE
from .serving import Server

STATIC = Path(__file__).parent / "static"


def create_app(engine_or_llm, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               max_model_len: int | None = None, *, max_pending: int = 256, max_body_bytes: int = 8 << 20,
               max_n: int = 16, metrics_public: bool = False, body_timeout: float = 30.0,
               responses_store_size: int = 1024) -> FastAPI:
    """The FastAPI app. `engine_or_llm`: an `AsyncLLMEngine`, `LLMEngine` or `LLM`. `max_model_len` may
    lower (never raise) the engine's context limit; `max_pending` caps the sequences in flight (429 above
    it); `max_body_bytes` caps request bodies (413); `max_n` caps `n`; `metrics_public` serves /metrics
    without the API key; `body_timeout`: seconds a request body may stall (408); `responses_store_size`
    bounds the Responses API's in-memory store (least recently used evicted first; 0 stores nothing)."""
    if isinstance(engine_or_llm, LLM):
        engine = AsyncLLMEngine.from_llm(engine_or_llm)
    elif isinstance(engine_or_llm, LLMEngine):
        engine = AsyncLLMEngine(engine_or_llm)
    elif isinstance(engine_or_llm, AsyncLLMEngine):
        engine = engine_or_llm
    else:
        raise TypeError(f"create_app needs an AsyncLLMEngine, LLMEngine or LLM, got {type(engine_or_llm).__name__}")
    owns = engine is not engine_or_llm
    if max_model_len is not None and max_model_len > engine.max_model_len:
        raise ValueError(f"max_model_len={max_model_len} exceeds the engine's max_model_len={engine.max_model_len}")
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or ["nemotron3"])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("served_model_name must be a non-empty string or list of strings")
    server = Server(engine, names, api_key or None, max_model_len or engine.max_model_len, max_pending,
                    max_body_bytes, max_n)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owns:
            await engine.shutdown()

    app = FastAPI(title="nemotron3", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.route_class = JSONBodyRoute
    app.state.server = server
    add_error_handlers(app, server.metrics.error)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)   # HEAD: Claude Code's probe
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE.split(";")[0]: {}}}})
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE)

    openai.add_routes(app, server)
    responses.add_routes(app, server, responses_store_size)
    anthropic.add_routes(app, server)
    public = PUBLIC_PATHS | ({"/metrics"} if metrics_public else set())
    document_responses(app, bool(server.api_key), public)
    app.add_middleware(GuardMiddleware, api_key=server.api_key, max_body_bytes=server.max_body_bytes,
                       on_error=server.metrics.error, metrics_public=metrics_public, body_timeout=body_timeout)
    return app
