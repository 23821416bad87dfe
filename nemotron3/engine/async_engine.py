"""`AsyncLLMEngine`: the streaming front end of `LLMEngine`, what the server runs.

    engine = AsyncLLMEngine.from_llm(LLM("models/pico"))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].delta_text, end="")

Design decisions: the sync engine is stepped in ONE worker thread (the model never runs on the event loop,
which stays responsive); adds and aborts are queued under a lock and applied before the next step, so the
engine itself needs no locking. `generate` runs `check_request` before it yields anything, so a bad request
fails before a response starts; a model error fails every open request and the engine keeps serving. The
server reads only this class's public surface (tokenizer, max_model_len, check_request, snapshot, ...).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from typing import AsyncIterator

from .engine import LLMEngine, RequestError
from .llm import LLM, load_model
from .outputs import EngineSnapshot, RequestOutput
from .sampling import SamplingParams


class AsyncLLMEngine:
    """Streaming front end for the server: `async for out in engine.generate(prompt, params, request_id)`
    yields a `RequestOutput` each time the request progresses (`delta_text` / `delta_token_ids` hold the
    new part); `await engine.abort(request_id)` stops one. A background task steps the engine in a
    single worker thread (the model never runs on the event loop, which stays responsive); requests
    added or aborted while a step runs take effect at the next step. Leaving the `async for` early (or
    cancelling the consumer) aborts the request."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemotron3-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: deque = deque()           # ('add', rid, prompt, params) | ('abort', rid)
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errored: BaseException | None = None

    @classmethod
    def from_llm(cls, llm: LLM) -> "AsyncLLMEngine":
        return cls(llm.engine)

    @classmethod
    def from_model(cls, model, tokenizer=None, dtype=None, weight_dtype="auto", **engine_kwargs) -> "AsyncLLMEngine":
        net, tok = load_model(model, tokenizer, dtype, weight_dtype)
        return cls(LLMEngine(net, tok, **engine_kwargs))

    # ---- what the server reads (it never touches the sync engine): read-only views of the engine's ----
    tokenizer = property(lambda self: self.engine.tokenizer)
    max_model_len = property(lambda self: self.engine.max_model_len)
    medium_thinking_budget = property(lambda self: self.engine.medium_thinking_budget)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, max_model_len: int | None = None) -> int:
        """`LLMEngine.check_request`: the server calls it before it starts a response."""
        return self.engine.check_request(prompt_ids, params, max_model_len)

    def snapshot(self) -> EngineSnapshot:
        return self.engine.snapshot()

    def _ensure_loop(self):
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        request_id = request_id or f"req-{id(object())}-{time.monotonic_ns()}"
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already running", "request_id")
        self.engine.check_request(self.engine.prompt_ids(prompt)[1], params)    # fail fast, before any output
        self._ensure_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        with self._lock:
            self._pending.append(("add", request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                with self._lock:
                    self._pending.append(("abort", request_id))
                if self._wake is not None:
                    self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its stream ends with a finish_reason 'abort' output."""
        with self._lock:
            self._pending.append(("abort", request_id))
        if self._wake is not None:
            self._wake.set()

    def _step(self) -> list:
        """Runs in the worker thread: apply queued adds/aborts, then one engine step."""
        results: list = []
        with self._lock:
            ops = list(self._pending)
            self._pending.clear()
        eng = self.engine
        for op in ops:
            if op[0] == "add":
                _, rid, prompt, params = op
                try:
                    eng.add_request(rid, prompt, params)
                except ValueError as e:
                    results.append((rid, e))
            else:
                out = eng.cancel(op[1])
                if out is not None:
                    results.append((op[1], out))
        if eng.has_unfinished_requests():
            results.extend((o.request_id, o) for o in eng.step())
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                idle = not self._pending
            if idle and not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._step)
            except Exception as e:                # a model error: fail every open request, keep serving
                self.errored = e
                for q in self._queues.values():
                    q.put_nowait(e)
                self.engine.drop_all_requests()
                continue
            for rid, item in results:
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(item)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)
