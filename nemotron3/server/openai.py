"""The OpenAI routes: `/v1/chat/completions`, `/v1/completions` and `/v1/models`, as vLLM serves them.

Design decisions (the shared request -> engine core is serving.py):

* **Reasoning.** Chat prompts are rendered with `enable_thinking` (default on, Nemotron 3's default).
  `reasoning_effort` maps onto the engine's modes: none/minimal/off -> off, low -> medium with a quarter of the
  medium budget, medium -> medium, high/regular -> regular (no budget). A thinking budget comes from
  `chat_template_kwargs` (`thinking_budget`, `reasoning_budget` or `max_thinking_tokens`) or a top-level
  `thinking_budget`; the text comes back split into `reasoning_content` and `content`.
* **tool_choice.** `auto`: tools in the prompt, calls parsed. `none`: tools left out of the prompt and
  `<tool_call>` text left as content. `required` / a named function: see serving.py.
  `parallel_tool_calls=false` keeps the first call.
* **response_format** json_schema / json_object: grammar-constrained decoding (serving.py, engine/grammar.py).
* **What is not implemented is refused** (`check_unsupported`: `suffix`, `best_of` != n,
  prompt logprobs), never silently ignored. `n` is capped by `max_n`.
* Streams end with `data: [DONE]`; an error after the stream started becomes an error event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat.parsers import StreamParser, ToolCall, parse_output
from . import protocol
from .http import SSE_HEADERS, sse, until_disconnect
from .protocol import APIError
from .serving import ChatPlan, ChatStreamState, Server, answer_mode, with_system_note

log = logging.getLogger("nemotron3.server")

RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template",
                            "documents", "continue_final_message"}
BUDGET_KEYS = ("thinking_budget", "reasoning_budget", "max_thinking_tokens")
EFFORT = {"none": "off", "minimal": "off", "off": "off", "low": "low", "medium": "medium", "regular": "regular",
          "high": "regular"}


def _sampling_fields(server: Server, req, stop: list[str]) -> dict:
    """The SamplingParams fields chat and completions requests share, with OpenAI's defaults."""
    return dict(n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                seed=req.seed, min_tokens=req.min_tokens, stop=stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
                **server.penalties(req))


def check_unsupported(req) -> None:
    """Refuse (400) what a chat or completion request may carry but this server does not implement."""
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise APIError(400, "best_of is not supported (it must equal n)", param="best_of")
    if getattr(req, "echo", False) and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")


async def openai_sse(gen, what: str) -> AsyncIterator[str]:
    """Stream `gen`'s SSE lines; an error mid-stream becomes an OpenAI error event; always end with [DONE].
    Closing this stream (client disconnect) closes `gen`, which aborts its engine requests."""
    try:
        async with aclosing(gen) as g:
            async for line in g:
                yield line
    except APIError as e:
        yield sse(protocol.openai_error(e.status, e.message, e.type, e.param, e.code))
    except Exception:
        log.exception("%s stream failed", what)
        yield sse(protocol.openai_error(500, "internal server error"))
    yield "data: [DONE]\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _openai_call(tc: ToolCall) -> dict:
    return {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments_json}}


async def merge(gens: list) -> AsyncIterator:
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


def _content(content, where: str, required: bool) -> str | None:
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


def _tool_args(args, where: str) -> dict:
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


def chat_messages(server, messages: list[protocol.ChatMessage]) -> list[dict]:
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
            msg["content"] = _content(m.content, where, required=not m.tool_calls) or ""
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
                                               "arguments": _tool_args(c.function.arguments, w)}})
                msg["tool_calls"] = calls
        else:
            msg["content"] = _content(m.content, where, required=True)
            if role == "tool" and m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
        out.append(msg)
    return out


def thinking_settings(server, effort: str | None, kwargs: dict, budget: int | None, param_kwargs: str
                      ) -> tuple[str, int | None]:
    """(reasoning mode, thinking budget) from reasoning_effort / enable_thinking / budget keys;
    sets enable_thinking=False in the template kwargs when thinking is off."""
    for k in BUDGET_KEYS:
        if k in kwargs:
            v = kwargs.pop(k)
            if v is not None:
                v = protocol.integral(v)
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
                budget = max(1, server.engine.medium_thinking_budget // 4)
    if enable is False:
        mode = "off"
    if mode == "off":
        kwargs["enable_thinking"] = False
    return mode, budget


def _format(req) -> dict | None:
    return req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None


def plan_chat(server, req: protocol.ChatCompletionRequest) -> ChatPlan:
    server.check_n(req.n)
    check_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = chat_messages(server, req.messages)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    if tools:
        for i, t in enumerate(tools):
            if t.get("type") != "function":
                raise APIError(400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
        server.check_tools(tools)
    choice = req.tool_choice
    names = [t["function"]["name"] for t in tools or []]
    forced_name, note = None, None
    if isinstance(choice, protocol.NamedToolChoice):
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
        messages = with_system_note(messages, note)
    kwargs = dict(req.chat_template_kwargs or {})
    bad = RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if bad:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(bad))}",
                       param="chat_template_kwargs")
    mode, budget = thinking_settings(server, req.reasoning_effort, kwargs, req.thinking_budget,
                                     "chat_template_kwargs")
    text, ids = server.render(messages, template_tools, kwargs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    fields = server.constraints(tools, forced_name, choice == "required", parse_tools, req.parallel_tool_calls,
                                server.structured(_format(req), "response_format"))
    params = server.params(
        **_sampling_fields(server, req, server.check_stop(req.stop)), max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, skip_special_tokens=False,
        reasoning_mode=answer_mode(mode, budget, fields), thinking_budget=budget, **fields)
    names = {"prompt": "messages", "structured_outputs": "response_format" if req.response_format else "tools"}
    if req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    params = server.check_request(ids, params, names)
    return ChatPlan(ids, params, thinking=text.rfind("<think>") > text.rfind("</think>"), tools=tools,
                    parse_tools=parse_tools, parallel=req.parallel_tool_calls,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    top_logprobs=req.top_logprobs or 0)


def chat_logprobs(server, token_ids, logprobs, top_n) -> list[dict]:
    out = []
    for t, d in zip(token_ids, logprobs or []):
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank)[:top_n] if top_n else []

        def entry(tok, lp):
            s = lp.decoded_token if lp.decoded_token is not None else server.token_text(tok)
            return {"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8"))}

        e = entry(t, d[t])
        e["top_logprobs"] = [entry(k, v) for k, v in ranked]
        out.append(e)
    return out


def _usage(final, include_details=True) -> dict:
    comp = sum(len(c.token_ids) for c in final.outputs)
    prompt = len(final.prompt_token_ids)
    u = {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}
    if include_details:
        u["prompt_tokens_details"] = {"cached_tokens": final.metrics.num_cached_tokens}
        u["completion_tokens_details"] = {"reasoning_tokens": final.metrics.reasoning_tokens}
    return u


def chat_response(server, final, plan: ChatPlan, rid: str, model: str) -> dict:
    choices = []
    for c in final.outputs:
        d = parse_output(c.text, plan.thinking, plan.tools, plan.parse_tools)
        calls = d.tool_calls if plan.parallel else d.tool_calls[:1]
        finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        msg = {"role": "assistant", "content": d.content if (d.content or not calls) else None,
               "reasoning_content": d.reasoning or None,
               "tool_calls": [_openai_call(tc) for tc in calls]}
        lp = {"content": chat_logprobs(server, c.token_ids, c.logprobs, plan.top_logprobs)} \
            if plan.params.logprobs is not None else None
        choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": finish,
                        "stop_reason": c.stop_reason})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(final)}


async def chat_stream(server, plan: ChatPlan, rid: str, model: str) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if plan.include_usage else {}

    def chunk(index, delta, logprobs=None, finish=None):
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}], **extra})

    states = [ChatStreamState(StreamParser(plan.thinking, plan.tools, plan.parse_tools), plan.parallel)
              for _ in range(plan.params.n)]
    for i in range(plan.params.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    final = None
    async with aclosing(server.run(plan.ids, plan.params, "chat")) as gen:
        async for out in gen:
            final = out
            for c in out.outputs:
                st = states[c.index]
                if st.done:
                    continue
                d = st.parser.feed(c.delta_text)
                if c.finished:
                    d += st.parser.finish()
                deltas = st.deltas(d)
                lp = None
                if plan.params.logprobs is not None and len(c.token_ids) > st.n_tokens:
                    lp = {"content": chat_logprobs(server, c.token_ids[st.n_tokens:],
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
        yield sse({**base, "choices": [], "usage": _usage(final)})


def completion_prompts(server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > server.max_pending:
        raise APIError(400, f"at most {server.max_pending} prompts per request", param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if server.tokenizer is None:
                raise APIError(400, "text prompts need a tokenizer; send token ids", param="prompt")
            ids = server.encode(p)
        else:
            ids = list(p)
        out.append(ids)                      # token ids and lengths: the engine's check_request
    return out


def plan_completion(server, req: protocol.CompletionRequest):
    server.check_n(req.n)
    check_unsupported(req)
    prompts = completion_prompts(server, req.prompt)
    stop = server.check_stop(req.stop)
    plans = []
    so = server.structured(_format(req), "response_format")
    for ids in prompts:
        params = server.params(
            **_sampling_fields(server, req, stop), max_tokens=16 if req.max_tokens is None else req.max_tokens,
            logprobs=req.logprobs, skip_special_tokens=req.skip_special_tokens, structured_outputs=so)
        plans.append((ids, server.check_request(ids, params, {"structured_outputs": "response_format"})))
    if sum(p.n for _, p in plans) > server.max_pending:
        raise APIError(400, "too many sequences in one request", param="prompt")
    return plans


def completion_logprobs(server, token_ids, logprobs, top_n, offset) -> dict:
    res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, d in zip(token_ids, logprobs or []):
        s = d[t].decoded_token if d[t].decoded_token is not None else server.token_text(t)
        res["tokens"].append(s)
        res["token_logprobs"].append(_finite(d[t].logprob))
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank)[:top_n]
        res["top_logprobs"].append({(v.decoded_token if v.decoded_token is not None else server.token_text(k)):
                                    _finite(v.logprob) for k, v in ranked} if top_n else None)
        res["text_offset"].append(offset)
        offset += len(s)
    return res


def prompt_text(server, ids) -> str:
    return server.tokenizer.decode(ids, skip_special_tokens=False) if server.tokenizer is not None else ""


def completion_response(server, finals, req, rid, model) -> dict:
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for p, final in enumerate(finals):
        echo = prompt_text(server, final.prompt_token_ids) if req.echo else ""
        for c in final.outputs:
            lp = completion_logprobs(server, c.token_ids, c.logprobs, req.logprobs, len(echo)) \
                if req.logprobs is not None else None
            choices.append({"index": p * req.n + c.index, "text": echo + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        u = _usage(final, include_details=False)
        for k in usage:
            usage[k] += u[k]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


async def completion_stream(server, plans, req, rid, model) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    sent: dict = {}                               # (prompt, choice) -> tokens sent
    offsets: dict = {}
    done: set = set()
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    async with aclosing(merge([server.run(ids, p, "completions") for ids, p in plans])) as gen:
        async for pi, out in gen:
            for c in out.outputs:
                key = (pi, c.index)
                if key in done:
                    continue
                text = c.delta_text
                if key not in sent:
                    sent[key] = 0
                    echo = prompt_text(server, out.prompt_token_ids) if req.echo else ""
                    text, offsets[key] = echo + text, len(echo)
                lp = None
                if req.logprobs is not None and len(c.token_ids) > sent[key]:
                    lp = completion_logprobs(server, c.token_ids[sent[key]:], (c.logprobs or [])[sent[key]:],
                                                  req.logprobs, offsets[key])
                    offsets[key] += sum(len(s) for s in lp["tokens"])
                sent[key] = len(c.token_ids)
                if c.finished:
                    done.add(key)
                if text or lp is not None or c.finished:
                    yield sse({**base, "choices": [{"index": pi * req.n + c.index, "text": text,
                                                     "logprobs": lp, "finish_reason": c.finish_reason,
                                                     "stop_reason": c.stop_reason}], **extra})
            if out.finished:
                u = _usage(out, include_details=False)
                for k in usage:
                    usage[k] += u[k]
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage})


def add_routes(app: FastAPI, server: Server) -> None:
    def card(name):
        return protocol.ModelCard(id=name, root=server.names[0], max_model_len=server.max_model_len)

    @app.get("/v1/models")
    async def models():
        return protocol.ModelList(data=[card(n) for n in server.names]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return card(model_id).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(req: protocol.ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        plan = await server.offload(plan_chat, server, req)
        server.admit(plan.params.n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(openai_sse(chat_stream(server, plan, rid, req.model), "chat"),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        final = await until_disconnect(request, server.final(plan.ids, plan.params, "chat"))
        if final is None:
            return Response(status_code=499)
        return JSONResponse(protocol.ChatCompletionResponse.model_validate(
            chat_response(server, final, plan, rid, req.model)).model_dump())

    @app.post("/v1/completions")
    async def completions(req: protocol.CompletionRequest, request: Request):
        server.check_model(req.model)
        plans = await server.offload(plan_completion, server, req)
        server.admit(sum(p.n for _, p in plans))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(openai_sse(completion_stream(server, plans, req, rid, req.model), "completion"),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        async def all_finals():
            return await asyncio.gather(*(server.final(ids, p, "completions") for ids, p in plans))

        finals = await until_disconnect(request, all_finals())
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(protocol.CompletionResponse.model_validate(
            completion_response(server, finals, req, rid, req.model)).model_dump())
