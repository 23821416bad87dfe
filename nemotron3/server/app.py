"""OpenAI- and Anthropic-compatible HTTP server over `AsyncLLMEngine` (FastAPI).

    app = create_app(LLM("models/pico"), served_model_name="pico", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `nemotron3 serve` does

A thin layer: requests are validated (`protocol.py`), chats rendered with the tokenizer's chat template (the
checkpoint's own when its tokenizer_config.json has one), the prompt ids handed to the engine's continuous
batcher (every request is its own engine request: nothing is serialised behind a lock), and the engine's
text deltas run through `chat.parsers.StreamParser` to split reasoning, content and tool calls.

Design decisions (see also the README's "Serving" section):

* **Errors.** Every client mistake is a 4xx with an OpenAI-style body (Anthropic-style on /v1/messages);
  anything else is a 500 whose body says only "internal server error" (the traceback goes to the log).
  Checks that the engine would make later (context length, max_tokens, sampling values, token ids) are
  made before a streaming response starts, so they get a real status code, not an error event.
* **Admission: 429, no queueing in the server.** The engine already queues sequences beyond
  `max_num_seqs`; the server refuses (429, `Retry-After: 1`) a request that would bring the sequences it
  has in flight above `max_pending`. Nothing waits in the server, so nothing can hang there.
* **Disconnects abort.** Streams are cancelled by Starlette when the client goes away; non-streaming
  requests watch for `http.disconnect` while they wait. Either way the engine request is aborted and its
  cache slot freed at the next engine step.
* **Reasoning.** Chat prompts are rendered with `enable_thinking` (default on, Nemotron 3's default; the
  Anthropic endpoint defaults to off, as Anthropic's API does). `reasoning_effort` maps onto the engine's
  modes: none/minimal/off -> off, low -> medium with a quarter of the medium budget, medium -> medium,
  high/regular -> regular (no budget). A thinking budget comes from `chat_template_kwargs`
  (`thinking_budget`, `reasoning_budget` or `max_thinking_tokens`) or a top-level `thinking_budget`.
* **tool_choice.** `auto`: tools in the prompt, calls parsed. `none`: tools left out of the prompt and
  `<tool_call>` text left as content. `required` / a named function: a line appended to the system prompt
  ("You must call ...") AND the engine forces the answer (the first tokens after `</think>`, or the first
  tokens when thinking is off) to begin `<tool_call>\\n<function=` (`required`) or
  `<tool_call>\\n<function=NAME>\\n` (named); the model writes the parameters. `parallel_tool_calls=false`
  keeps the first call.
* **Limits.** Request bodies over `max_body_bytes` get 413; `n` is capped by `max_n`; `max_tokens` must fit
  the context (`max_model_len`); the API key (if set) is checked on /v1/* only, with constant-time compare.
  The chat page is served from the same origin, so no CORS headers are sent.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat.parsers import CALL_OPEN, Delta, StreamParser, ToolCall, parse_output
from ..engine import LLM, AsyncLLMEngine, LLMEngine, SamplingParams
from ..tokenizer import encode_text, scrub_surrogates
from . import protocol as P
from .metrics import ServerMetrics
from .protocol import APIError

log = logging.getLogger("nemotron3.server")

STATIC = Path(__file__).parent / "static"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template",
                            "documents", "continue_final_message"}
BUDGET_KEYS = ("thinking_budget", "reasoning_budget", "max_thinking_tokens")
EFFORT = {"none": "off", "minimal": "off", "off": "off", "low": "low", "medium": "medium", "regular": "regular",
          "high": "regular"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _openai_sse(gen, what: str) -> AsyncIterator[str]:
    """Stream `gen`'s SSE lines; an error mid-stream becomes an OpenAI error event; always end with [DONE].
    Closing this stream (client disconnect) closes `gen`, which aborts its engine requests."""
    try:
        async with aclosing(gen) as g:
            async for line in g:
                yield line
    except APIError as e:
        yield _sse(P.openai_error(e.status, e.message, e.type, e.param, e.code))
    except Exception:
        log.exception("%s stream failed", what)
        yield _sse(P.openai_error(500, "internal server error"))
    yield "data: [DONE]\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class ChatPlan:
    """Everything a chat request turns into before it reaches the engine."""

    def __init__(self, ids, params, thinking, tools, parse_tools, parallel, include_usage, top_logprobs):
        self.ids, self.params, self.thinking = ids, params, thinking
        self.tools, self.parse_tools, self.parallel = tools, parse_tools, parallel
        self.include_usage, self.top_logprobs = include_usage, top_logprobs


class Server:
    """State shared by the routes: the engine, the tokenizer, limits and metrics."""

    def __init__(self, engine: AsyncLLMEngine, names: list[str], api_key: str | None, max_model_len: int,
                 max_pending: int, max_body_bytes: int, max_n: int):
        self.engine, self.core = engine, engine.engine
        self.tokenizer = engine.tokenizer
        self.names, self.api_key = names, api_key
        self.max_model_len, self.max_pending, self.max_body_bytes, self.max_n = \
            max_model_len, max_pending, max_body_bytes, max_n
        self.vocab_size = self.core.model.config.vocab_size
        self.inflight = 0                          # sequences the server has handed to the engine
        self.metrics = ServerMetrics(names[0])
        self._n = 0

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist. Available: {', '.join(self.names)}.",
                           param="model", code="model_not_found")

    def admit(self, n: int) -> None:
        if self.inflight + n > self.max_pending:
            raise APIError(429, f"The server is at its limit of {self.max_pending} sequences in flight; "
                                "retry shortly.", code="too_many_requests", headers={"Retry-After": "1"})

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise APIError(400, f"n must be <= {self.max_n}, got {n}", param="n")

    def check_length(self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        L = self.max_model_len
        if prompt_len >= L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, your prompt has "
                                f"{prompt_len} tokens, which leaves no room to generate.",
                           param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return L - prompt_len
        if prompt_len + max_tokens > L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                f"completion). Reduce {param} to at most {L - prompt_len}.",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def check_stop(self, stop, param="stop") -> list[str]:
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > P.MAX_STOP:
            raise APIError(400, f"{param}: at most {P.MAX_STOP} stop sequences are allowed", param=param)
        for s in stop:
            if not s:
                raise APIError(400, f"{param}: stop sequences must be non-empty strings", param=param)
            if len(s) > P.MAX_STOP_LEN:
                raise APIError(400, f"{param}: stop sequences must be at most {P.MAX_STOP_LEN} characters",
                               param=param)
        return stop

    def check_unsupported(self, req) -> None:
        for t in req.stop_token_ids or []:
            if not 0 <= t < self.vocab_size:
                raise APIError(400, f"stop token id {t} out of range [0, {self.vocab_size})", param="stop_token_ids")

    def penalties(self, req) -> dict:
        """presence / frequency / repetition penalties and logit_bias (OpenAI: token-id strings as keys)."""
        bias = None
        if req.logit_bias:
            bias = {}
            for key, v in req.logit_bias.items():
                if not key.isdigit() or not int(key) < self.vocab_size:
                    raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {self.vocab_size})",
                                   param="logit_bias")
                bias[int(key)] = v
        return dict(presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                    logit_bias=bias)

    def params(self, **kw) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            field = re.match(r"SamplingParams\.(\w+)", str(e))
            raise APIError(400, str(e).replace("SamplingParams.", ""), param=field and field.group(1)) from None

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    # ------------------------------------------------------------------ running requests
    async def run(self, ids: list[int], params: SamplingParams, endpoint: str) -> AsyncIterator:
        """Stream one engine request's outputs, recording metrics; leaving early aborts it."""
        self._n += 1
        rid = f"{endpoint}-{self._n}-{uuid.uuid4().hex[:8]}"
        self.inflight += params.n
        self.metrics.request(endpoint)
        t0 = last = time.monotonic()
        first, finished = True, False
        try:
            async with aclosing(self.engine.generate(ids, params, rid)) as gen:
                async for out in gen:
                    now = time.monotonic()
                    new = sum(len(c.delta_token_ids) for c in out.outputs)
                    if new:
                        if first:
                            self.metrics.first_token(now - t0)
                            first = False
                        else:
                            self.metrics.tokens(now - last, new)
                        last = now
                    if out.finished:
                        finished = True
                        self.metrics.done(out, now - t0)
                    yield out
        except ValueError as e:                  # the engine refused the request (add_request's checks)
            finished = True
            raise APIError(400, str(e)) from None
        finally:
            self.inflight -= params.n
            if not finished:
                self.metrics.aborted(params.n)

    async def final(self, ids, params, endpoint):
        out = None
        async with aclosing(self.run(ids, params, endpoint)) as gen:
            async for out in gen:
                pass
        return out

    # ------------------------------------------------------------------ chat: request -> plan
    def _content(self, content, where: str, required: bool) -> str | None:
        if content is None:
            if required:
                raise APIError(400, f"{where}.content is required", param=f"{where}.content")
            return None
        if isinstance(content, str):
            return content
        parts = []
        for j, part in enumerate(content):
            if part.type not in ("text", "input_text", "output_text") or part.text is None:
                raise APIError(400, f"{where}.content[{j}]: only text content parts are supported "
                                    f"(got type {part.type!r})", param=f"{where}.content")
            parts.append(part.text)
        return "".join(parts)

    def _tool_args(self, args, where: str) -> dict:
        if args is None or args == "":
            return {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise APIError(400, f"{where}.function.arguments is not valid JSON", param=where) from None
        if not isinstance(args, dict):
            raise APIError(400, f"{where}.function.arguments must be a JSON object", param=where)
        return args

    def chat_messages(self, messages: list[P.ChatMessage]) -> list[dict]:
        if not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant", "tool"):
                raise APIError(400, f"{where}.role must be one of system, developer, user, assistant, tool "
                                    f"(got {m.role!r})", param=f"{where}.role")
            msg: dict[str, Any] = {"role": role}
            if role == "assistant":
                msg["content"] = self._content(m.content, where, required=not m.tool_calls) or ""
                reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
                if reasoning:
                    msg["reasoning_content"] = reasoning
                if m.tool_calls:
                    calls = []
                    for j, c in enumerate(m.tool_calls):
                        w = f"{where}.tool_calls[{j}]"
                        if not c.function.name:
                            raise APIError(400, f"{w}.function.name must be non-empty", param=w)
                        calls.append({"id": c.id or f"call_{j}", "type": "function",
                                      "function": {"name": c.function.name,
                                                   "arguments": self._tool_args(c.function.arguments, w)}})
                    msg["tool_calls"] = calls
            else:
                msg["content"] = self._content(m.content, where, required=True)
                if role == "tool" and m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    msg["name"] = m.name
            out.append(msg)
        return out

    def check_tools(self, tools: list[dict], param="tools") -> None:
        seen = set()
        for i, t in enumerate(tools):
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME.match(name):
                raise APIError(400, f"{param}[{i}]: a tool name must be 1-64 characters from [A-Za-z0-9_.:-], "
                                    f"got {name!r}", param=f"{param}[{i}]")
            if name in seen:
                raise APIError(400, f"{param}[{i}]: duplicate tool name {name!r}", param=f"{param}[{i}]")
            seen.add(name)
            schema = fn.get("parameters")
            if schema is not None:
                if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                    raise APIError(400, f"{param}[{i}]: the parameters schema must be a JSON Schema object "
                                        "(type 'object')", param=f"{param}[{i}]")
                props = schema.get("properties", {})
                if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
                    raise APIError(400, f"{param}[{i}]: parameters.properties must map names to schemas",
                                   param=f"{param}[{i}]")

    def render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> tuple[str, list[int]]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            raise APIError(400, "this model has no tokenizer with a chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False, **kwargs)
        except Exception as e:                  # TemplateError (raise_exception), bad kwargs, ...
            raise APIError(400, f"the chat could not be rendered with the model's chat template: {e}") from None
        return text, self.encode(text)

    def thinking_settings(self, effort: str | None, kwargs: dict, budget: int | None, param_kwargs: str
                          ) -> tuple[str, int | None]:
        """(reasoning mode, thinking budget) from reasoning_effort / enable_thinking / budget keys;
        sets enable_thinking=False in the template kwargs when thinking is off."""
        for k in BUDGET_KEYS:
            if k in kwargs:
                v = kwargs.pop(k)
                if v is not None:
                    v = P.integral(v)
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise APIError(400, f"{param_kwargs}.{k} must be an integer >= 0", param=param_kwargs)
                    budget = v
        enable = kwargs.get("enable_thinking")
        if enable is not None and not isinstance(enable, bool):
            raise APIError(400, f"{param_kwargs}.enable_thinking must be a boolean", param=param_kwargs)
        mode = "regular"
        if effort is not None:
            if effort not in EFFORT:
                raise APIError(400, f"reasoning_effort must be one of {', '.join(EFFORT)}, got {effort!r}",
                               param="reasoning_effort")
            mode = EFFORT[effort]
            if mode == "low":
                mode = "medium"
                if budget is None:
                    budget = max(1, self.core.medium_thinking_budget // 4)
        if enable is False:
            mode = "off"
        if mode == "off":
            kwargs["enable_thinking"] = False
        return mode, budget

    def plan_chat(self, req: P.ChatCompletionRequest) -> ChatPlan:
        self.check_n(req.n)
        self.check_unsupported(req)
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported by this server "
                                "(structured outputs are not implemented)", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        messages = self.chat_messages(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        if tools:
            for i, t in enumerate(tools):
                if t.get("type") != "function":
                    raise APIError(400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
            self.check_tools(tools)
        choice = req.tool_choice
        names = [t["function"]["name"] for t in tools or []]
        forced_name, note = None, None
        if isinstance(choice, P.NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                                    "tools", param="tool_choice")
            forced_name = choice.function.name
            note = f"You must call the function `{forced_name}` now."
        elif choice == "required":
            if not tools:
                raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
            note = "You must call at least one of the functions listed above."
        parse_tools = bool(tools) and choice != "none"
        template_tools = tools if parse_tools else None
        if note:
            messages = _with_system_note(messages, note)
        kwargs = dict(req.chat_template_kwargs or {})
        bad = RESERVED_TEMPLATE_KWARGS & set(kwargs)
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(bad))}",
                           param="chat_template_kwargs")
        mode, budget = self.thinking_settings(req.reasoning_effort, kwargs, req.thinking_budget,
                                              "chat_template_kwargs")
        text, ids = self.render(messages, template_tools, kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.check_length(len(ids), max_tokens,
                                       "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        prefix = None
        if note:
            prefix = self.encode(f"{CALL_OPEN}\n<function={forced_name}>\n" if forced_name else f"{CALL_OPEN}\n<function=")
        params = self.params(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
            stop=self.check_stop(req.stop), stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None, skip_special_tokens=False,
            include_stop_str_in_output=req.include_stop_str_in_output, reasoning_mode=mode,
            thinking_budget=budget, answer_prefix_ids=prefix, **self.penalties(req))
        thinking = text.rfind("<think>") > text.rfind("</think>")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatPlan(ids, params, thinking, tools, parse_tools, req.parallel_tool_calls, include_usage,
                        req.top_logprobs or 0)

    # ------------------------------------------------------------------ chat: outputs
    def chat_logprobs(self, token_ids, logprobs, top_n) -> list[dict]:
        out = []
        for t, d in zip(token_ids, logprobs or []):
            ranked = sorted(d.items(), key=lambda kv: kv[1].rank)[:top_n] if top_n else []

            def entry(tok, lp):
                s = lp.decoded_token if lp.decoded_token is not None else self.token_text(tok)
                return {"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8"))}

            e = entry(t, d[t])
            e["top_logprobs"] = [entry(k, v) for k, v in ranked]
            out.append(e)
        return out

    def usage(self, final, include_details=True) -> dict:
        comp = sum(len(c.token_ids) for c in final.outputs)
        prompt = len(final.prompt_token_ids)
        u = {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}
        if include_details:
            u["prompt_tokens_details"] = {"cached_tokens": final.metrics.num_cached_tokens}
            u["completion_tokens_details"] = {"reasoning_tokens": final.metrics.reasoning_tokens}
        return u

    def chat_response(self, final, plan: ChatPlan, rid: str, model: str) -> dict:
        choices = []
        for c in final.outputs:
            d = parse_output(c.text, plan.thinking, plan.tools, plan.parse_tools)
            calls = d.tool_calls if plan.parallel else d.tool_calls[:1]
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            msg = {"role": "assistant", "content": d.content if (d.content or not calls) else None,
                   "reasoning_content": d.reasoning or None,
                   "tool_calls": [_openai_call(tc) for tc in calls]}
            lp = {"content": self.chat_logprobs(c.token_ids, c.logprobs, plan.top_logprobs)} \
                if plan.params.logprobs is not None else None
            choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": finish,
                            "stop_reason": c.stop_reason})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": self.usage(final)}

    async def chat_stream(self, plan: ChatPlan, rid: str, model: str) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        extra = {"usage": None} if plan.include_usage else {}

        def chunk(index, delta, logprobs=None, finish=None):
            return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}], **extra})

        states = [_ChatStreamState(StreamParser(plan.thinking, plan.tools, plan.parse_tools), plan.parallel)
                  for _ in range(plan.params.n)]
        for i in range(plan.params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        final = None
        async with aclosing(self.run(plan.ids, plan.params, "chat")) as gen:
            async for out in gen:
                final = out
                for c in out.outputs:
                    st = states[c.index]
                    if st.done:
                        continue
                    d = st.parser.feed(c.delta_text)
                    if c.finished:
                        d += st.parser.finish()
                    deltas = st.deltas(d, c.finished)
                    lp = None
                    if plan.params.logprobs is not None and len(c.token_ids) > st.n_tokens:
                        lp = {"content": self.chat_logprobs(c.token_ids[st.n_tokens:],
                                                            (c.logprobs or [])[st.n_tokens:], plan.top_logprobs)}
                    st.n_tokens = len(c.token_ids)
                    for k, delta in enumerate(deltas):
                        yield chunk(c.index, delta, lp if k == 0 else None)
                    if lp is not None and not deltas:
                        yield chunk(c.index, {}, lp)
                    if c.finished:
                        st.done = True
                        reason = "tool_calls" if st.n_calls and c.finish_reason == "stop" else c.finish_reason
                        yield chunk(c.index, {}, None, reason)
        if plan.include_usage and final is not None:
            yield _sse({**base, "choices": [], "usage": self.usage(final)})

    # ------------------------------------------------------------------ completions
    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > self.max_pending:
            raise APIError(400, f"at most {self.max_pending} prompts per request", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise APIError(400, "text prompts need a tokenizer; send token ids", param="prompt")
                ids = self.encode(p)
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(400, f"prompt token id {bad[0]} out of range [0, {self.vocab_size})",
                                   param="prompt")
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append(ids)
        return out

    def plan_completion(self, req: P.CompletionRequest):
        self.check_n(req.n)
        self.check_unsupported(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (it must equal n)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        prompts = self.completion_prompts(req.prompt)
        stop = self.check_stop(req.stop)
        plans = []
        for ids in prompts:
            max_tokens = self.check_length(len(ids), 16 if req.max_tokens is None else req.max_tokens)
            plans.append((ids, self.params(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **self.penalties(req))))
        if sum(p.n for _, p in plans) > self.max_pending:
            raise APIError(400, "too many sequences in one request", param="prompt")
        return plans

    def completion_logprobs(self, token_ids, logprobs, top_n, offset) -> dict:
        res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, d in zip(token_ids, logprobs or []):
            s = d[t].decoded_token if d[t].decoded_token is not None else self.token_text(t)
            res["tokens"].append(s)
            res["token_logprobs"].append(_finite(d[t].logprob))
            ranked = sorted(d.items(), key=lambda kv: kv[1].rank)[:top_n]
            res["top_logprobs"].append({(v.decoded_token if v.decoded_token is not None else self.token_text(k)):
                                        _finite(v.logprob) for k, v in ranked} if top_n else None)
            res["text_offset"].append(offset)
            offset += len(s)
        return res

    def prompt_text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    def completion_response(self, finals, req, rid, model) -> dict:
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for p, final in enumerate(finals):
            echo = self.prompt_text(final.prompt_token_ids) if req.echo else ""
            for c in final.outputs:
                lp = self.completion_logprobs(c.token_ids, c.logprobs, req.logprobs, len(echo)) \
                    if req.logprobs is not None else None
                choices.append({"index": p * req.n + c.index, "text": echo + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            u = self.usage(final, include_details=False)
            for k in usage:
                usage[k] += u[k]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage}

    async def completion_stream(self, plans, req, rid, model) -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        sent: dict = {}                               # (prompt, choice) -> tokens sent
        offsets: dict = {}
        done: set = set()
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        async with aclosing(_merge([self.run(ids, p, "completions") for ids, p in plans])) as gen:
            async for pi, out in gen:
                for c in out.outputs:
                    key = (pi, c.index)
                    if key in done:
                        continue
                    text = c.delta_text
                    if key not in sent:
                        sent[key] = 0
                        echo = self.prompt_text(out.prompt_token_ids) if req.echo else ""
                        text, offsets[key] = echo + text, len(echo)
                    lp = None
                    if req.logprobs is not None and len(c.token_ids) > sent[key]:
                        lp = self.completion_logprobs(c.token_ids[sent[key]:], (c.logprobs or [])[sent[key]:],
                                                      req.logprobs, offsets[key])
                        offsets[key] += sum(len(s) for s in lp["tokens"])
                    sent[key] = len(c.token_ids)
                    if c.finished:
                        done.add(key)
                    if text or lp is not None or c.finished:
                        yield _sse({**base, "choices": [{"index": pi * req.n + c.index, "text": text,
                                                         "logprobs": lp, "finish_reason": c.finish_reason,
                                                         "stop_reason": c.stop_reason}], **extra})
                if out.finished:
                    u = self.usage(out, include_details=False)
                    for k in usage:
                        usage[k] += u[k]
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage})


class _ChatStreamState:
    """Per-choice streaming state: the parser, whitespace held back around tool calls, call indices."""

    def __init__(self, parser: StreamParser, parallel: bool):
        self.parser, self.parallel = parser, parallel
        self.n_tokens = 0
        self.n_calls = 0
        self.pending_ws = ""                 # whitespace-only content, dropped if a tool call follows
        self.done = False

    def deltas(self, d: Delta, final: bool) -> list[dict]:
        out = []
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        content = d.content
        if content:
            if self.parser.parse_tools:
                content = self.pending_ws + content
                self.pending_ws = ""
                stripped = content.rstrip()
                self.pending_ws = content[len(stripped):]
                content = stripped
                if self.n_calls and content:
                    content = content.lstrip()   # whitespace right after a call is layout
            if content:
                out.append({"content": content})
        for tc in d.tool_calls:
            if self.n_calls and not self.parallel:
                continue
            self.pending_ws = ""
            out.append({"tool_calls": [{"index": self.n_calls, "id": tc.id, "type": "function",
                                        "function": {"name": tc.name, "arguments": tc.arguments_json}}]})
            self.n_calls += 1
        if final and self.pending_ws and not self.n_calls:
            out.append({"content": self.pending_ws})
            self.pending_ws = ""
        return out


def _openai_call(tc: ToolCall) -> dict:
    return {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments_json}}


def _with_system_note(messages: list[dict], note: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = (first.get("content") or "").rstrip() + ("\n\n" if first.get("content") else "") + note
        return [first] + messages[1:]
    return [{"role": "system", "content": note}] + messages


async def _merge(gens: list) -> AsyncIterator:
    """Interleave several async iterators, yielding (index, item); closing it cancels them all."""
    q: asyncio.Queue = asyncio.Queue()
    DONE = object()

    async def pump(i, g):
        try:
            async with aclosing(g):
                async for item in g:
                    await q.put((i, item))
            await q.put((i, DONE))
        except BaseException as e:        # noqa: BLE001 - handed to the consumer
            await q.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is DONE:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


# ====================================================================== the app

def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, status: int, message: str, type=None, param=None, code=None,
                   headers=None) -> JSONResponse:
    body = P.anthropic_error(status, message) if _is_anthropic(path) else \
        P.openai_error(status, message, type, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): the API key on /v1/*, then the
    request body size limit (Content-Length checked up front; chunked bodies counted while read)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.server.api_key
        if key and path.startswith("/v1"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                self.server.metrics.error(401)
                return await error_response(path, 401, "Invalid or missing API key (send 'Authorization: Bearer "
                                                       "KEY' or 'x-api-key: KEY').",
                                            code="invalid_api_key")(scope, receive, send)
        limit = self.server.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.server.metrics.error(413)
            return await error_response(path, 413, f"The request body exceeds the limit of {limit} bytes.",
                                        code="request_too_large")(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH") and length is None:
            body, more = bytearray(), True               # chunked: read it all (bounded) before the app does
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > limit:
                    self.server.metrics.error(413)
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


def _validation_message(exc: RequestValidationError, dotted: bool = False) -> tuple[str, str | None]:
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


def create_app(engine_or_llm, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               max_model_len: int | None = None, *, max_pending: int = 256, max_body_bytes: int = 8 << 20,
               max_n: int = 16) -> FastAPI:
    """The FastAPI app. `engine_or_llm`: an `AsyncLLMEngine`, `LLMEngine` or `LLM`. `max_model_len` may
    lower (never raise) the engine's context limit; `max_pending` caps the sequences in flight (429 above
    it); `max_body_bytes` caps request bodies (413); `max_n` caps `n`."""
    if isinstance(engine_or_llm, LLM):
        engine = AsyncLLMEngine.from_llm(engine_or_llm)
    elif isinstance(engine_or_llm, LLMEngine):
        engine = AsyncLLMEngine(engine_or_llm)
    elif isinstance(engine_or_llm, AsyncLLMEngine):
        engine = engine_or_llm
    else:
        raise TypeError(f"create_app needs an AsyncLLMEngine, LLMEngine or LLM, got {type(engine_or_llm).__name__}")
    owns = engine is not engine_or_llm
    engine_len = engine.engine.max_model_len
    if max_model_len is not None and max_model_len > engine_len:
        raise ValueError(f"max_model_len={max_model_len} exceeds the engine's max_model_len={engine_len}")
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or ["nemotron3"])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("served_model_name must be a non-empty string or list of strings")
    server = Server(engine, names, api_key or None, max_model_len or engine_len, max_pending, max_body_bytes, max_n)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owns:
            await engine.shutdown()

    app = FastAPI(title="nemotron3", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.route_class = JSONBodyRoute
    app.state.server = server

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        server.metrics.error(e.status)
        return error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        server.metrics.error(400)
        msg, param = _validation_message(e, dotted=_is_anthropic(request.url.path))
        return error_response(request.url.path, 400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        server.metrics.error(e.status_code)
        msg = {404: f"Not found: {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        server.metrics.error(500)
        return error_response(request.url.path, 500, "internal server error")

    # ---------------------------------------------------------------- routes
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.core),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(name):
        return P.ModelCard(id=name, root=names[0], max_model_len=server.max_model_len)

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[card(n) for n in names]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return card(model_id).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        plan = server.plan_chat(req)
        server.admit(plan.params.n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(_openai_sse(server.chat_stream(plan, rid, req.model), "chat"), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        final = await until_disconnect(request, server.final(plan.ids, plan.params, "chat"))
        if final is None:
            return Response(status_code=499)
        return JSONResponse(P.ChatCompletionResponse.model_validate(
            server.chat_response(final, plan, rid, req.model)).model_dump())

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        server.check_model(req.model)
        plans = server.plan_completion(req)
        server.admit(sum(p.n for _, p in plans))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(_openai_sse(server.completion_stream(plans, req, rid, req.model), "completion"),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        async def all_finals():
            return await asyncio.gather(*(server.final(ids, p, "completions") for ids, p in plans))

        finals = await until_disconnect(request, all_finals())
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(P.CompletionResponse.model_validate(
            server.completion_response(finals, req, rid, req.model)).model_dump())

    from .messages import add_routes
    add_routes(app, server)

    app.add_middleware(GuardMiddleware, server=server)
    return app
