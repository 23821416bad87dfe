"""HTTP plumbing under the API routes: SSE framing, error bodies, the guard middleware (API key, body size),
JSON body handling, validation messages, the error handlers and disconnect watching.

Design decisions:

* **Errors.** Every client mistake is a 4xx with an OpenAI-style body (Anthropic-style on /v1/messages);
  anything else is a 500 whose body says only "internal server error" (the traceback goes to the log).
* **Bodies are JSON whatever the Content-Type says**; undecodable bodies are 400s that say why, lone UTF-16
  surrogates become U+FFFD, and the size limit (413) holds for chunked bodies too.
* **The OpenAPI schema tells the truth** (`document_responses`): each route lists the error statuses it
  really answers with, and their bodies; FastAPI's 422 (never sent: validation errors are 400s) is removed.
* **Disconnects abort.** Streams are cancelled by Starlette when the client goes away; non-streaming
  requests watch for `http.disconnect` while they wait (`until_disconnect`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import scrub_surrogates
from . import protocol
from .protocol import APIError

log = logging.getLogger("nemotron3.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, status: int, message: str, type=None, param=None, code=None,
                   headers=None) -> JSONResponse:
    body = protocol.anthropic_error(status, message) if is_anthropic(path) else \
        protocol.openai_error(status, message, type, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


PUBLIC_PATHS = frozenset({"/", "/health"})


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): the API key on every path but the
    chat page and /health (and /metrics when `metrics_public`), then the request body: its size limit
    (Content-Length checked up front, chunked bodies counted while read) and an idle timeout (a client that
    stops sending mid-body gets 408 after `body_timeout` seconds and the connection is closed). Bodies are
    read here and replayed to the app. `on_error(status)` is told of every refusal (the metrics)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_error: Callable[[int], None],
                 metrics_public: bool = False, body_timeout: float = 30.0):
        self.app, self.api_key, self.max_body_bytes, self.on_error = app, api_key, max_body_bytes, on_error
        self.public = PUBLIC_PATHS | ({"/metrics"} if metrics_public else set())
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.api_key
        if key and path not in self.public:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                self.on_error(401)
                return await error_response(path, 401, "Invalid or missing API key (send 'Authorization: Bearer "
                                                       "KEY' or 'x-api-key: KEY').",
                                            code="invalid_api_key")(scope, receive, send)
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.on_error(413)
            return await error_response(path, 413, f"The request body exceeds the limit of {limit} bytes.",
                                        code="request_too_large")(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = bytearray(), True               # read it all (bounded, timed) before the app does
            while more:
                try:
                    msg = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    self.on_error(408)
                    return await error_response(path, 408, f"The request body was not received within "
                                                f"{self.body_timeout:g} s.", code="request_timeout",
                                                headers={"Connection": "close"})(scope, receive, send)
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > limit:
                    self.on_error(413)
                    return await error_response(path, 413, f"The request body exceeds the limit of {limit} bytes.",
                                                code="request_too_large")(scope, receive, send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _scrub_surrogates(obj):
    """Lone UTF-16 surrogates (a JSON `\\ud83d` escape without its pair: a string cut mid-emoji) cannot be
    tokenized or written back as UTF-8: replace them with U+FFFD, in place, without recursion."""
    def fix(x):
        return scrub_surrogates(x) if isinstance(x, str) else x

    obj = fix(obj)
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k in list(o):
                v = o.pop(k)
                v = fix(v)
                o[fix(k)] = v
                stack.append(v)
        elif isinstance(o, list):
            for i, v in enumerate(o):
                o[i] = fix(v)
                stack.append(o[i])
    return obj


class JSONBodyRequest(Request):
    """Request bodies are JSON whatever the Content-Type says; undecodable bodies are JSON errors (400s)
    that say why, and lone surrogates are replaced."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                data = json.loads(body)
            except UnicodeDecodeError:
                raise json.JSONDecodeError("the body is not valid UTF-8", "", 0) from None
            except RecursionError:
                raise json.JSONDecodeError("the JSON is nested too deeply", "", 0) from None
            self._json = _scrub_surrogates(data) if _SURROGATE_ESCAPE.search(body) else data
        return self._json


class JSONBodyRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            scope = request.scope
            if scope.get("method") == "POST":
                headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
            return await handler(JSONBodyRequest(scope, request.receive))

        return route


def _type_tag(x) -> bool:
    """Pydantic puts union member names in error locations ('str', 'list[ContentPart]', ...): not fields."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "dict", "list", "none") or
                                   any(c in x for c in "[(") or x.startswith(("function-", "tagged-union")))


def validation_message(exc: RequestValidationError, dotted: bool = False) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [x for x in e.get("loc", ()) if x != "body" and not _type_tag(x)]
    if e.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if e.get("type") == "missing" and not loc:
        return "The request body is missing (send a JSON object).", None
    param = "".join(f"[{x}]" if isinstance(x, int) and not dotted else f".{x}" for x in loc).lstrip(".") or None
    msg = e.get("msg", "invalid value")
    more = f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def add_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Every error becomes an OpenAI- or Anthropic-shaped body; `on_error(status)` counts it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        on_error(e.status)
        return error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        on_error(400)
        msg, param = validation_message(e, dotted=is_anthropic(request.url.path))
        return error_response(request.url.path, 400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        on_error(e.status_code)
        msg = {404: f"Not found: {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        on_error(500)
        return error_response(request.url.path, 500, "internal server error")


async def until_disconnect(request: Request, coro):
    """Await `coro`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and watcher.done():
            return None                      # the client is gone; nobody reads the response
        raise


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The error body of every route but /v1/messages*."""
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """The error body of /v1/messages*."""
    type: Literal["error"]
    error: AnthropicErrorDetail


ERROR_TEXT = {400: "Invalid request (the message names the field)", 401: "Invalid or missing API key",
              404: "Unknown model (or object)", 408: "The request body stalled", 413: "The request body is too large",
              429: "Too many sequences in flight; retry after `Retry-After` seconds",
              500: "Internal server error"}


def document_responses(app: FastAPI, api_key: bool, public: frozenset[str]) -> None:
    """Give every API route the error responses it really sends (call after adding the routes): 401 where the
    key is checked, 400/408/413 on bodies, 404 where a model or object is named, 429 where generation is
    admitted, 500 anywhere; and drop FastAPI's undocumented-in-practice 422."""
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        post = "POST" in route.methods
        codes = {500}
        codes |= {401} if api_key and route.path not in public else set()
        codes |= {400, 404, 408, 413} if post else {404} if "{" in route.path else set()
        codes |= {429} if post and not route.path.endswith("count_tokens") else set()
        body = {"$ref": "#/components/schemas/" + (AnthropicError if is_anthropic(route.path) else OpenAIError).__name__}
        route.responses = {**{c: {"description": ERROR_TEXT[c], "content": {"application/json": {"schema": body}}}
                              for c in sorted(codes)}, **route.responses}
        if 429 in codes:                                     # generation: `stream: true` answers with SSE
            route.responses.setdefault(200, {"content": {"text/event-stream": {"schema": {"type": "string"}}}})
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                models.pop(name, None)
            for m in (OpenAIError, AnthropicError):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                models.update(js.pop("$defs", {}))
                models[m.__name__] = js
        return app.openapi_schema

    app.openapi = openapi
